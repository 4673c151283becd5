"""`registry-mirror warm`: fetch named images into the cache ahead of need.

It drives the same `Mirror` the server uses, so what it fetches is verified, recorded and
single-flight with a mirror serving the same cache directory (the fill locks are shared).
Blobs already cached are skipped, which also makes an interrupted warm resumable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field

from mirror.access import OPERATOR
from mirror.errors import RegistryError
from mirror.mediatypes import ALL_MANIFESTS, platform_of
from mirror.mirror import Mirror
from mirror.progress import Progress, human, plural
from mirror.reference import SHA256_RE, Digest, Name, Tag, parse_image


@dataclass
class WarmSummary:
    images: int = 0
    fetched_blobs: int = 0
    fetched_bytes: int = 0
    present_blobs: int = 0
    present_bytes: int = 0
    failures: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """`warmed 1 image: fetched 3 blobs (1.2 MiB), 0 already present (0 B), 0 failures`."""
        return (
            f"warmed {plural(self.images, 'image')}: fetched {plural(self.fetched_blobs, 'blob')} "
            f"({human(self.fetched_bytes)}), {self.present_blobs} already present "
            f"({human(self.present_bytes)}), {plural(len(self.failures), 'failure')}"
        )


def _wanted(platform: str, platforms: set[str] | None) -> bool:
    if platforms is None:
        return True
    return platform in platforms or "/".join(platform.split("/")[:2]) in platforms


async def _image_blobs(
    mirror: Mirror, name: Name, reference: Tag | Digest, platforms: set[str] | None
) -> list[tuple[Digest, int]]:
    """Fetch the image's manifests (recording its tag) and list its blobs."""
    answer = await mirror.manifest(name, reference, list(ALL_MANIFESTS), principal=OPERATOR)
    manifests = [json.loads(answer.manifest.data)]
    for child in manifests[0].get("manifests") or []:
        if not isinstance(child, dict) or not SHA256_RE.fullmatch(str(child.get("digest"))):
            continue
        if _wanted(platform_of(child, unknown=""), platforms):
            sub = await mirror.manifest(
                name, Digest(child["digest"]), list(ALL_MANIFESTS), principal=OPERATOR
            )
            manifests.append(json.loads(sub.manifest.data))
    blobs: list[tuple[Digest, int]] = []
    for doc in manifests:
        for desc in [doc.get("config"), *(doc.get("layers") or [])]:
            if isinstance(desc, dict) and SHA256_RE.fullmatch(str(desc.get("digest"))):
                entry = (Digest(desc["digest"]), int(desc.get("size") or 0))
                if entry not in blobs:
                    blobs.append(entry)
    return blobs


MAX_REFERRER_DEPTH = 3  # a signature of an attestation of an image: deep enough, never a loop


async def _referrer_blobs(
    mirror: Mirror, name: Name, reference: Tag | Digest
) -> list[tuple[Digest, int]]:
    """Fetch the referrers of the image (and of those, to `MAX_REFERRER_DEPTH`; a digest is
    visited once, so a referrers cycle ends) and list their blobs."""
    answer = await mirror.manifest(name, reference, list(ALL_MANIFESTS), principal=OPERATOR)
    seen = {answer.manifest.digest}
    level = [answer.manifest.digest]
    blobs: list[tuple[Digest, int]] = []
    for _ in range(MAX_REFERRER_DEPTH):
        following: list[Digest] = []
        for subject in level:
            for desc in await mirror.all_referrers(name, subject, principal=OPERATOR):
                digest = Digest(desc["digest"])
                if digest not in seen:
                    seen.add(digest)
                    following.append(digest)
                    blobs += await _image_blobs(mirror, name, digest, None)
        level = following
    return blobs


async def warm(
    mirror: Mirror,
    images: list[str],
    *,
    platforms: set[str] | None,
    concurrency: int,
    progress: Progress,
    with_referrers: bool = False,
) -> WarmSummary:
    """`with_referrers`: each image's referrers too (signatures, SBOMs, attestations, and
    theirs in turn, bounded): what an offline site needs to verify what it runs."""
    summary = WarmSummary()
    todo: list[tuple[str, Name, Digest, int]] = []
    for image in images:
        try:
            name, reference = parse_image(image)
            blobs = await _image_blobs(mirror, name, reference, platforms)
            if with_referrers:
                blobs += await _referrer_blobs(mirror, name, reference)
        except RegistryError as exc:
            summary.failures.append(f"{image}: {exc.message}")
            continue
        summary.images += 1
        for digest, size in blobs:
            if await mirror.is_cached(digest):
                summary.present_blobs += 1
                summary.present_bytes += size
            elif all(d != digest for _, _, d, _ in todo):
                todo.append((image, name, digest, size))
                progress.add(size)

    gate = asyncio.Semaphore(concurrency)

    async def fetch(image: str, name: Name, digest: Digest, size: int) -> None:
        async with gate:
            try:
                answer = await mirror.blob(name, digest, whole=True, principal=OPERATOR)
            except RegistryError as exc:
                summary.failures.append(f"{image}: {digest}: {exc.message}")
                return
            if answer.file is not None:
                answer.file.close()
            if answer.stream is not None:  # the cache could not take it (disk full)
                with contextlib.suppress(Exception):
                    await answer.stream.aclose()
                summary.failures.append(f"{image}: {digest}: the cache is full")
                return
            summary.fetched_blobs += 1
            summary.fetched_bytes += size
            progress.finished(size, digest)

    async def ticker() -> None:
        while True:
            progress.partial_bytes = mirror.bytes_filling()
            progress.tick()
            await asyncio.sleep(0.5)

    tick = asyncio.ensure_future(ticker())
    try:
        await asyncio.gather(*(fetch(*item) for item in todo))
    finally:
        tick.cancel()
        progress.partial_bytes = 0
        progress.close()
    return summary
