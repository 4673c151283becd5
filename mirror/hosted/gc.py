"""`registry-mirror gc` for hosted content: mark and sweep, and abandoned uploads.

Mark: every hosted manifest, and everything a hosted manifest references (`refs`). Sweep:
hosted content neither marked nor committed within `hosted.gc_grace`. Why that is safe against
pushes running meanwhile:
- an upload in progress is not content yet (its bytes are under `uploads/`, flocked while
  written); it becomes content only at its commit;
- a client pushes blobs before the manifest naming them: a blob committed within the grace is
  never swept, so the manifest has that long to arrive;
- the sweep forgets each digest in a transaction that checks again that nothing references
  it, and a manifest push records its references in a transaction that checks they are all
  linked: one of them comes first, and either the manifest is refused (MANIFEST_BLOB_UNKNOWN,
  the client uploads again) or the blob stays;
- a file is unlinked under the digest's lock that a commit takes to place a file and record
  it, so a push of the same bytes during the sweep never loses its file.

With `--delete-untagged`, manifests no tag reaches (directly, through an index, or as a
referrer of a kept manifest) are deleted first, so their blobs go in the same run.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field

import structlog

from mirror.hosted.registry import HostedRegistry
from mirror.reference import Digest

log = structlog.get_logger(__name__)


@dataclass
class HostedCollection:
    manifests: list[tuple[str, str]] = field(default_factory=list)  # (repo, digest) deleted
    blobs: list[tuple[Digest, int]] = field(default_factory=list)  # content swept
    uploads: list[str] = field(default_factory=list)  # abandoned uploads removed

    @property
    def freed(self) -> int:
        return sum(size for _, size in self.blobs)


async def collect(
    registry: HostedRegistry, *, dry_run: bool, delete_untagged: bool = False
) -> HostedCollection:
    now = registry.clock()
    out = HostedCollection()
    records = registry.records
    out.uploads = await _abandoned_uploads(registry, now, dry_run=dry_run)
    if delete_untagged:
        out.manifests = await records.untagged_manifests()
        if not dry_run:
            for repo, digest in out.manifests:
                await records.delete_manifest(repo, digest)
    cutoff = now - registry.config.gc_grace
    candidates = await records.garbage(cutoff)
    if dry_run:
        out.blobs = candidates
        return out
    sizes = dict(candidates)
    for digest in sizes:
        if await _sweep(registry, digest, cutoff):
            out.blobs.append((digest, sizes[digest]))
    if out.blobs or out.uploads or out.manifests:
        log.info(
            "hosted_gc",
            blobs=len(out.blobs),
            bytes=out.freed,
            uploads=len(out.uploads),
            manifests=len(out.manifests),
        )
    return out


async def _sweep(registry: HostedRegistry, digest: Digest, cutoff: float) -> bool:
    async with registry.shared.locked(digest):
        if not await registry.records.remove_garbage([digest], cutoff):
            return False  # referenced meanwhile
        await asyncio.to_thread(registry.content.unlink, digest)
        await registry.shared.delete(digest)
        return True


async def _abandoned_uploads(registry: HostedRegistry, now: float, *, dry_run: bool) -> list[str]:
    """Uploads untouched for `hosted.upload_max_age` (and upload files no upload row names,
    left by a crash, as old), unless a request is writing them right now."""
    cutoff = now - registry.config.upload_max_age
    touched = await registry.records.upload_ids()
    files = await asyncio.to_thread(_upload_files, registry)
    stale = [u for u, t in touched.items() if t < cutoff]
    stale += [name for name, mtime in files.items() if name not in touched and mtime < cutoff]
    removed = []
    for upload_id in stale:
        if await registry.uploads.busy(upload_id):
            continue
        removed.append(upload_id)
        if not dry_run:
            await registry.uploads.remove(upload_id)
            await registry.records.drop_upload(upload_id)
    return removed


def _upload_files(registry: HostedRegistry) -> dict[str, float]:
    out = {}
    for entry in os.scandir(registry.content.uploads):
        try:
            out[entry.name] = entry.stat().st_mtime
        except FileNotFoundError:
            continue
    return out
