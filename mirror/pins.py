"""`PinResolver`: which digests a list of pins reaches.

A pin names an image (`repo:tag` or `repo@digest`, as a client pulls it): its manifest by the
tag record (or the digest), and for a manifest everything it references, child manifests of an
index included. Manifests are read without recency (pins must not keep themselves warm), from
wherever the node finds them (memory, disk, a cluster's shared store).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from mirror.cache.metadata import MetadataStore
from mirror.mediatypes import manifest_doc
from mirror.reference import SHA256_RE, Digest, is_digest, parse_image
from mirror.upstream.routing import Router


def descriptors(data: bytes) -> tuple[list[Digest], list[Digest]]:
    """A manifest's child manifests (of an index) and blobs (config and layers)."""
    doc = manifest_doc(data)
    if doc is None:
        return [], []

    def digests(items: object) -> list[Digest]:
        return [
            Digest(d["digest"])
            for d in (items if isinstance(items, list) else [])
            if isinstance(d, dict) and SHA256_RE.fullmatch(str(d.get("digest")))
        ]

    return digests(doc.get("manifests")), digests([doc.get("config"), *(doc.get("layers") or [])])


class PinResolver:
    def __init__(
        self,
        router: Router,
        metadata: MetadataStore,
        read_manifest: Callable[[Digest], Awaitable[bytes | None]],
    ) -> None:
        self.router = router
        self.metadata = metadata
        self.read_manifest = read_manifest  # the bytes if cached anywhere, else None

    async def pinned_digests(self, pins: Iterable[str]) -> set[Digest]:
        """Every manifest and blob digest of the pinned images that the cache knows of."""
        out: set[Digest] = set()
        for pin in pins:
            name, reference = parse_image(pin)
            if is_digest(reference):
                await self.collect_digests(Digest(reference), out)
                continue
            target = self.router.route(name)
            record = await self.metadata.get_tag(
                (target.upstream.name, target.repository, reference)
            )
            if record is not None:
                await self.collect_digests(record.digest, out)
        return out

    async def collect_digests(self, digest: Digest, out: set[Digest]) -> None:
        """Add `digest` and, for a cached manifest, everything it references, to `out`."""
        if digest in out:
            return
        out.add(digest)
        data = await self.read_manifest(digest)
        if data is None:
            return
        children, blobs = descriptors(data)
        for child in children:
            await self.collect_digests(child, out)
        out.update(blobs)
