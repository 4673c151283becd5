"""`NoSharedTier`: a single node shares nothing, so every answer is the empty one.

The pull policy (`Mirror`) and the cache policy ask a `SharedTier` (mirror/interfaces.py) where
a cluster's node asks its `Cluster`; one node and a cluster are two wirings of the same code,
chosen once by the assembly (mirror/node.py), with no "are we a cluster" checks elsewhere.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from mirror.cache.eviction import SharedEviction
from mirror.cache.fill import FillBase, UpstreamBody
from mirror.interfaces import ByteSource
from mirror.reference import Digest


class NoSharedTier:
    """One node: fills read the upstream directly; nothing is pinned, indexed or kept
    elsewhere."""

    @property
    def store_down(self) -> bool:
        return False

    def touched(self, digest: Digest) -> None:
        return None

    async def presigned(self, digest: Digest) -> str | None:
        return None

    async def direct_stream(self, digest: Digest) -> ByteSource | None:
        return None

    async def get_manifest(self, digest: Digest, limit: int) -> bytes | None:
        return None

    async def put_manifest(self, digest: Digest, data: bytes) -> None:
        return None

    async def claim_fetch(self, key: Digest) -> bool:
        return True

    async def release_fetch(self, key: Digest) -> None:
        return None

    async def open_body(
        self,
        digest: Digest,
        upstream: Callable[[int], Awaitable[ByteSource]],
        fill: Callable[[], FillBase],
        offset: int = 0,
    ) -> UpstreamBody:
        source = await upstream(offset)
        return UpstreamBody(source.size, source.chunks(), source.close)

    async def shared_pins(self) -> list[str]:
        return []

    async def set_pins(self, images: list[str], *, pin: bool) -> None:
        return None

    async def entry(self, digest: Digest) -> tuple[int, float] | None:
        return None

    async def lead_eviction(self, pinned: set[Digest]) -> SharedEviction | None:
        return None

    async def evict(self, pinned: set[Digest], *, dry_run: bool) -> SharedEviction | None:
        return None

    async def drop(self, digests: list[Digest]) -> list[Digest]:
        return []

    async def verify(self) -> tuple[int, list[Digest]]:
        return 0, []

    def status(self) -> dict[str, object]:
        return {}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None
