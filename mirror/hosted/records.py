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

from typing import Protocol

from mirror.cache import sqlite
from mirror.hosted.metadata import HostedMetadata, ManifestRecord, NewManifest, UploadRecord
from mirror.reference import Digest


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
    """`HostedRecords` on the node's SQLite database, every call on a SQLite thread."""

    def __init__(self, db: HostedMetadata) -> None:
        self.db = db

    async def content_size(self, digest: str) -> int | None:
        return await sqlite.run(self.db.content_size, digest)

    async def add_blob(self, repo: str, digest: str, size: int, now: float) -> None:
        await sqlite.run(self.db.add_blob, repo, digest, size, now)

    async def link(self, repo: str, digest: str) -> int | None:
        return await sqlite.run(self.db.link, repo, digest)

    async def linked(self, repo: str, digest: str) -> int | None:
        return await sqlite.run(self.db.linked, repo, digest)

    async def repos_linking(self, digest: str) -> list[str]:
        return await sqlite.run(self.db.repos_linking, digest)

    async def unlink(self, repo: str, digest: str) -> bool:
        return await sqlite.run(self.db.unlink, repo, digest)

    async def total_size(self) -> int:
        return await sqlite.run(self.db.total_size)

    async def all_content(self) -> set[Digest]:
        return await sqlite.run(self.db.all_content)

    async def put_manifest(self, m: NewManifest, now: float) -> list[str]:
        return await sqlite.run(self.db.put_manifest, m, now)

    async def manifest(self, repo: str, digest: str) -> ManifestRecord | None:
        return await sqlite.run(self.db.manifest, repo, digest)

    async def tag(self, repo: str, tag: str) -> Digest | None:
        return await sqlite.run(self.db.tag, repo, tag)

    async def delete_manifest(self, repo: str, digest: str) -> bool:
        return await sqlite.run(self.db.delete_manifest, repo, digest)

    async def delete_tag(self, repo: str, tag: str) -> bool:
        return await sqlite.run(self.db.delete_tag, repo, tag)

    async def tags(self, repo: str) -> list[str] | None:
        return await sqlite.run(self.db.tags, repo)

    async def repositories(self) -> list[str]:
        return await sqlite.run(self.db.repositories)

    async def referrers(self, repo: str, subject: str) -> list[str]:
        return await sqlite.run(self.db.referrers, repo, subject)

    async def summary(self) -> list[tuple[str, list[str], int]]:
        return await sqlite.run(self.db.summary)

    async def new_upload(self, upload_id: str, repo: str, now: float) -> None:
        await sqlite.run(self.db.new_upload, upload_id, repo, now)

    async def upload(self, upload_id: str) -> UploadRecord | None:
        return await sqlite.run(self.db.upload, upload_id)

    async def advance_upload(self, upload_id: str, expected: int, offset: int, now: float) -> bool:
        return await sqlite.run(self.db.advance_upload, upload_id, expected, offset, now)

    async def touch_upload(self, upload_id: str, now: float) -> None:
        await sqlite.run(self.db.touch_upload, upload_id, now)

    async def drop_upload(self, upload_id: str) -> bool:
        return await sqlite.run(self.db.drop_upload, upload_id)

    async def upload_ids(self) -> dict[str, float]:
        return await sqlite.run(self.db.upload_ids)

    async def untagged_manifests(self) -> list[tuple[str, str]]:
        return await sqlite.run(self.db.untagged_manifests)

    async def garbage(self, committed_before: float) -> list[tuple[Digest, int]]:
        return await sqlite.run(self.db.garbage, committed_before)

    async def remove_garbage(self, digests: list[str], committed_before: float) -> list[str]:
        return await sqlite.run(self.db.remove_garbage, digests, committed_before)

    def close(self) -> None:
        self.db.close()
