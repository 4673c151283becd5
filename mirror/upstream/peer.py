"""Another mirror node, asked for a blob it is filling (or holds) over its internal endpoint.

In a cluster one node fetches a cold blob from the upstream; the others stream it from that
node as it arrives instead of fetching it again. The owner sends the last byte only once the
digest verified, and the follower verifies again while writing its own copy.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import aiohttp

from mirror.errors import UpstreamError
from mirror.metrics import Metrics
from mirror.reference import Digest
from mirror.upstream.client import READ_BUFFER, BlobStream
from mirror.upstream.failures import describe

CLUSTER_HEADER = "X-Registry-Mirror-Cluster"  # carries the shared cluster secret
CLUSTER_PATH = "/_cluster/blobs/"


class PeerClient:
    def __init__(
        self,
        secret: str,
        *,
        metrics: Metrics | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        ca_file: Path | None = None,
    ) -> None:
        self._secret = secret
        self._ssl: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=str(ca_file)) if ca_file else True
        )
        self.metrics = metrics or Metrics()
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._session: aiohttp.ClientSession | None = None

    def open(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl),
                timeout=self._timeout,
                auto_decompress=False,
                read_bufsize=READ_BUFFER,
                headers={CLUSTER_HEADER: self._secret, "Accept-Encoding": "identity"},
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def open_blob(self, peer_url: str, digest: Digest, offset: int = 0) -> BlobStream:
        """The peer's bytes of `digest` from `offset`; UpstreamError if it cannot serve them."""
        self.open()
        assert self._session is not None
        url = f"{peer_url.rstrip('/')}{CLUSTER_PATH}{digest}"
        try:
            resp = await self._session.get(url, params={"offset": str(offset)})
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamError(
                "cluster peer unreachable", {"peer": peer_url, "reason": describe(exc)}
            ) from exc
        if resp.status != 200:
            resp.release()
            raise UpstreamError(
                "cluster peer cannot serve the blob", {"peer": peer_url, "status": resp.status}
            )
        return BlobStream(resp, self.metrics.peer_fetched_bytes.inc)
