"""The internal endpoint other nodes stream a blob from while this node fills it.

`GET /_cluster/blobs/<digest>?offset=N` with the shared secret in `X-Registry-Mirror-Cluster`:
the bytes from N of a fill in flight here (the last byte only once the digest verified) or of
the blob in this node's local tier. Anyone without the secret gets 404, as if it did not exist.
"""

from __future__ import annotations

import hmac
import re

from aiohttp import web

from mirror.errors import RegistryError
from mirror.reference import parse_digest
from mirror.upstream.peer import CLUSTER_HEADER, CLUSTER_PATH
from mirror.web.keys import CONFIG, MIRROR, ROUTE
from mirror.web.responses import SendfileResponse, stream_fill

_OFFSET_RE = re.compile(r"[0-9]{1,19}")  # ASCII digits; a blob is smaller than 10**19 bytes


def _not_found() -> RegistryError:
    return RegistryError("BLOB_UNKNOWN", "blob unknown to this node")


async def peer_blob(request: web.Request) -> web.StreamResponse:
    request[ROUTE] = "cluster"
    secret = request.app[CONFIG].cluster.secret or ""
    given = request.headers.get(CLUSTER_HEADER, "")
    if not secret or not hmac.compare_digest(given.encode(), secret.encode()):
        raise _not_found()
    digest = parse_digest(request.match_info["digest"])
    offset_text = request.query.get("offset", "0")
    if _OFFSET_RE.fullmatch(offset_text) is None:  # not isdigit(): it takes `²`
        raise RegistryError("RANGE_INVALID", "offset must be a whole number")
    offset = int(offset_text)
    mirror = request.app[MIRROR]
    headers = {"Content-Type": "application/octet-stream", "Docker-Content-Digest": digest}
    fill = await mirror.local_fill(digest)  # this process's, or another worker's, followed
    if fill is not None:
        try:
            await fill.wait_started()
        except RegistryError:
            raise _not_found() from None
        reader = fill.open_reader()
        if reader is not None:
            return await stream_fill(request, reader, fill.size, headers, start=offset)
    cached = await mirror.open_cached(digest)
    if cached is None or offset > cached.size:
        if cached is not None:
            cached.close()
        raise _not_found()
    response = SendfileResponse(cached, offset, cached.size - offset, status=200, headers=headers)
    await response.prepare(request)
    return response


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get(CLUSTER_PATH + "{digest}", peer_blob)
