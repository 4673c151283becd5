"""`HostedRecords`: what hosted repositories hold, as a seam with two implementations.

- `LocalHostedRecords`: the node's SQLite database (metadata.py), for one node;
- `RedisHostedRecords` (redis_records.py): Redis, shared by a cluster's nodes, so a push to one
  node is visible from every node at once.

Both pass one contract suite (tests/contracts/test_hosted_records_contract.py). Contracts:
absence is None/False/empty, never an exception; a backend that cannot be reached raises
(OSError/SQLite's errors locally, `RedisUnavailable` for Redis). Changes that must be seen
whole are atomic in both: `put_manifest` records nothing unless every required digest is
linked in the repository; `remove_garbage` forgets a digest only if, at that moment, nothing
references it and it was committed before the cut-off; `advance_upload` moves an upload's
offset only from the offset the caller saw.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from mirror.cache import sqlite
from mirror.hosted.metadata import HostedMetadata, ManifestRecord, NewManifest, UploadRecord
from mirror.reference import Digest

T = TypeVar("T")


class HostedRecords(Protocol):
    async def content_size(self, digest: str) -> int | None:
        """The size of hosted content `digest`; None if not hosted."""

    async def add_blob(self, repo: str, digest: str, size: int, now: float) -> None:
        """Record committed content and link it in `repo` (idempotent)."""

    async def link(self, repo: str, digest: str) -> int | None:
        """Link hosted content into `repo` (a mount); its size, or None if not hosted."""

    async def linked(self, repo: str, digest: str) -> int | None:
        """The size of `digest` if `repo` may serve it, else None."""

    async def repos_linking(self, digest: str) -> list[str]:
        """Repositories that link `digest`."""

    async def unlink(self, repo: str, digest: str) -> bool:
        """Unlink a blob from `repo`; whether it was linked."""

    async def total_size(self) -> int:
        """Bytes of all hosted content."""

    async def all_content(self) -> set[Digest]:
        """Every hosted digest."""

    async def put_manifest(self, m: NewManifest, now: float) -> list[str]:
        """Record `m` and its tags; the required digests not linked (nothing recorded then)."""

    async def manifest(self, repo: str, digest: str) -> ManifestRecord | None:
        """The manifest `digest` of `repo`; None if absent."""

    async def tag(self, repo: str, tag: str) -> Digest | None:
        """What `tag` names in `repo`; None if absent."""

    async def delete_manifest(self, repo: str, digest: str) -> bool:
        """Delete a manifest, its references and its tags; whether it existed."""

    async def delete_tag(self, repo: str, tag: str) -> bool:
        """Delete one tag; whether it existed."""

    async def tags(self, repo: str) -> list[str] | None:
        """The tags of `repo` (any order); None if the repository holds nothing at all."""

    async def repositories(self) -> list[str]:
        """Repositories holding anything, sorted."""

    async def referrers(self, repo: str, subject: str) -> list[str]:
        """Referrer descriptors (JSON) of the manifests in `repo` whose subject it is."""

    async def summary(self) -> list[tuple[str, list[str], int]]:
        """(repository, sorted tags, manifest count) for every repository, sorted."""

    async def new_upload(self, upload_id: str, repo: str, now: float) -> None:
        """Record an upload at offset 0."""

    async def upload(self, upload_id: str) -> UploadRecord | None:
        """An upload's record; None if unknown (never started, ended or cancelled)."""

    async def advance_upload(self, upload_id: str, expected: int, offset: int, now: float) -> bool:
        """Move the offset from `expected` to `offset`; False if it was not at `expected`."""

    async def touch_upload(self, upload_id: str, now: float) -> None:
        """Note activity on an upload (abandoned ones are judged by it)."""

    async def drop_upload(self, upload_id: str) -> bool:
        """Forget an upload; whether it was known."""

    async def upload_ids(self) -> dict[str, float]:
        """Every upload's id -> when last touched."""

    async def untagged_manifests(self) -> list[tuple[str, str]]:
        """(repo, digest) of manifests no tag reaches (directly, through an index, or as the
        referrer of a manifest that is kept)."""

    async def garbage(self, committed_before: float) -> list[tuple[Digest, int]]:
        """Content no manifest is or references, committed before the cut-off."""

    async def remove_garbage(self, digests: list[str], committed_before: float) -> list[str]:
        """Forget those of `digests` still garbage now (and their links); those forgotten."""

    def close(self) -> None:
        """Release connections (the node closes the shared client itself)."""


class LocalHostedRecords:
    """`HostedRecords` on the node's SQLite database, every call on a SQLite thread.

    The database is opened on first use, and reads before it exists answer "nothing" without
    creating it: a mirror that hosts nothing keeps no hosted.db open (each SQLite connection
    costs a worker three descriptors per thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: HostedMetadata | None = None

    def _open(self) -> HostedMetadata:
        if self._db is None:
            self._db = HostedMetadata(self.path)
        return self._db

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        db = self._db or await sqlite.run(self._open)
        return await sqlite.run(fn, db, *args)

    async def _read(self, fn: Callable[..., T], default: T, *args: Any) -> T:
        if self._db is None and not await asyncio.to_thread(self.path.exists):
            return default
        return await self._write(fn, *args)

    async def content_size(self, digest: str) -> int | None:
        return await self._read(HostedMetadata.content_size, None, digest)

    async def add_blob(self, repo: str, digest: str, size: int, now: float) -> None:
        await self._write(HostedMetadata.add_blob, repo, digest, size, now)

    async def link(self, repo: str, digest: str) -> int | None:
        return await self._read(HostedMetadata.link, None, repo, digest)

    async def linked(self, repo: str, digest: str) -> int | None:
        return await self._read(HostedMetadata.linked, None, repo, digest)

    async def repos_linking(self, digest: str) -> list[str]:
        return await self._read(HostedMetadata.repos_linking, [], digest)

    async def unlink(self, repo: str, digest: str) -> bool:
        return await self._read(HostedMetadata.unlink, False, repo, digest)

    async def total_size(self) -> int:
        return await self._read(HostedMetadata.total_size, 0)

    async def all_content(self) -> set[Digest]:
        return await self._read(HostedMetadata.all_content, set())

    async def put_manifest(self, m: NewManifest, now: float) -> list[str]:
        return await self._write(HostedMetadata.put_manifest, m, now)

    async def manifest(self, repo: str, digest: str) -> ManifestRecord | None:
        return await self._read(HostedMetadata.manifest, None, repo, digest)

    async def tag(self, repo: str, tag: str) -> Digest | None:
        return await self._read(HostedMetadata.tag, None, repo, tag)

    async def delete_manifest(self, repo: str, digest: str) -> bool:
        return await self._read(HostedMetadata.delete_manifest, False, repo, digest)

    async def delete_tag(self, repo: str, tag: str) -> bool:
        return await self._read(HostedMetadata.delete_tag, False, repo, tag)

    async def tags(self, repo: str) -> list[str] | None:
        return await self._read(HostedMetadata.tags, None, repo)

    async def repositories(self) -> list[str]:
        return await self._read(HostedMetadata.repositories, [])

    async def referrers(self, repo: str, subject: str) -> list[str]:
        return await self._read(HostedMetadata.referrers, [], repo, subject)

    async def summary(self) -> list[tuple[str, list[str], int]]:
        return await self._read(HostedMetadata.summary, [])

    async def new_upload(self, upload_id: str, repo: str, now: float) -> None:
        await self._write(HostedMetadata.new_upload, upload_id, repo, now)

    async def upload(self, upload_id: str) -> UploadRecord | None:
        return await self._read(HostedMetadata.upload, None, upload_id)

    async def advance_upload(self, upload_id: str, expected: int, offset: int, now: float) -> bool:
        return await self._read(
            HostedMetadata.advance_upload, False, upload_id, expected, offset, now
        )

    async def touch_upload(self, upload_id: str, now: float) -> None:
        await self._read(HostedMetadata.touch_upload, None, upload_id, now)

    async def drop_upload(self, upload_id: str) -> bool:
        return await self._read(HostedMetadata.drop_upload, False, upload_id)

    async def upload_ids(self) -> dict[str, float]:
        return await self._read(HostedMetadata.upload_ids, {})

    async def untagged_manifests(self) -> list[tuple[str, str]]:
        return await self._read(HostedMetadata.untagged_manifests, [])

    async def garbage(self, committed_before: float) -> list[tuple[Digest, int]]:
        return await self._read(HostedMetadata.garbage, [], committed_before)

    async def remove_garbage(self, digests: list[str], committed_before: float) -> list[str]:
        return await self._read(HostedMetadata.remove_garbage, [], digests, committed_before)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
