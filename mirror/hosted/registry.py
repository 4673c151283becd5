"""`HostedRegistry`: the push, pull and delete policy of hosted repositories.

Who may do what is asked of the access rules with the subject `hosted/<name>`: pulls follow
`access.default` like mirrored names; pushes and deletes need a rule that allows them
(`actions: [push]`, `[delete]`), so nobody, anonymous or not, writes unless a rule says so.

Uploads are hashed as their bytes stream in (uploads.py) and committed only when the whole
matches the digest the client names. Where records, uploads and committed bytes live is what
`open_node` wires in: the node's own (SQLite, files) or a cluster's (Redis, the shared store).
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from mirror.access import Policy, Principal
from mirror.cache import sqlite
from mirror.cache.index import CacheIndex
from mirror.config import HostedConfig
from mirror.errors import RegistryError
from mirror.hosted.content import Busy, HostedContent, new_hasher
from mirror.hosted.metadata import ManifestRecord, NewManifest
from mirror.hosted.records import HostedRecords
from mirror.hosted.shared import SharedContent
from mirror.hosted.uploads import UploadStore
from mirror.mediatypes import OCI_INDEX
from mirror.reference import Digest, Name, parse_content_digest
from mirror.referrers_index import referrer_descriptor

log = structlog.get_logger(__name__)

SUBJECT = "hosted"  # access rules name hosted repositories `hosted/<name>`
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
INDEX_TYPES = {OCI_INDEX, DOCKER_LIST}
IMAGE_TYPES = {OCI_MANIFEST, DOCKER_MANIFEST}
_UPLOAD_ID_RE = re.compile(r"[0-9a-f]{32}")


def _nondistributable(descriptor: dict[str, Any]) -> bool:
    """Layers a registry is not expected to hold (foreign / nondistributable, or fetched from
    their `urls`): a manifest may name them without them having been pushed."""
    media_type = str(descriptor.get("mediaType", ""))
    return "nondistributable" in media_type or "foreign" in media_type or "urls" in descriptor


class HostedNames:
    """Which repository names are hosted (and which of those fall back to the upstream)."""

    def __init__(self, config: HostedConfig) -> None:
        self._hosted = [re.compile(fnmatch.translate(p)) for p in config.repositories]
        self._group = [re.compile(fnmatch.translate(p)) for p in config.group]

    def __bool__(self) -> bool:
        return bool(self._hosted)

    def is_hosted(self, name: str) -> bool:
        return any(p.fullmatch(name) for p in self._hosted)

    def is_group(self, name: str) -> bool:
        return any(p.fullmatch(name) for p in self._group)


@dataclass(frozen=True)
class UploadState:
    upload_id: str
    size: int


@dataclass(frozen=True)
class Manifest:
    digest: Digest
    media_type: str
    data: bytes


@dataclass(frozen=True)
class Pushed:
    digest: Digest
    subject: str | None
    tags: tuple[str, ...]


class HostedRegistry:
    def __init__(
        self,
        config: HostedConfig,
        records: HostedRecords,
        content: HostedContent,
        uploads: UploadStore,
        shared: SharedContent,
        index: CacheIndex,
        policy: Policy,
        *,
        logins: bool,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.names = HostedNames(config)
        self.records = records
        self.content = content
        self.uploads = uploads
        self.shared = shared
        self.index = index
        self.policy = policy
        self.logins = logins  # whether clients can log in (else a refusal is a plain DENIED)
        self.clock = clock

    # -- access -------------------------------------------------------------------------------

    def may(self, principal: Principal, name: str, action: str) -> bool:
        return self.policy.allows(principal, SUBJECT, name, action=action)

    def require(self, principal: Principal, name: str, action: str) -> None:
        if self.may(principal, name, action):
            return
        detail = {"repository": name, "action": action}
        if not principal.authenticated and self.logins:
            raise RegistryError("UNAUTHORIZED", f"authentication required to {action}", detail)
        raise RegistryError(
            "DENIED",
            f"you may not {action} {name}: no access rule allows it (access.rules, actions:"
            f" [{action}], repositories: [{SUBJECT}/...])",
            detail,
        )

    # -- blobs --------------------------------------------------------------------------------

    async def blob_size(self, name: Name, digest: Digest, *, fetch: bool = True) -> int | None:
        """The size of a blob `name` may serve, and with `fetch` its bytes on this node (a
        HEAD needs only the record); None if none."""
        size = await self.records.linked(name, digest)
        if size is None or (fetch and not await self.shared.fetch(digest)):
            return None
        return size

    def blob_path(self, digest: Digest) -> str:
        return str(self.content.path_for(digest))

    async def delete_blob(self, name: Name, digest: Digest) -> bool:
        """Unlinked from the repository; the bytes stay until `gc` finds nothing uses them."""
        return await self.records.unlink(name, digest)

    async def mount(self, name: Name, digest: Digest, source: str | None, p: Principal) -> bool:
        """Link hosted content already held (from `source`, or from any hosted repository
        the client may pull when none is named); False: not mountable, upload it."""
        repos = await self.records.repos_linking(digest)
        if source is not None:
            repos = [r for r in repos if r == source]
        if not any(self.may(p, r, "pull") for r in repos):
            return False
        return await self.records.link(name, digest) is not None

    # -- uploads ------------------------------------------------------------------------------

    async def start_upload(self, name: Name) -> str:
        upload_id = uuid.uuid4().hex
        await self.uploads.create(upload_id)
        await self.records.new_upload(upload_id, name, self.clock())
        return upload_id

    async def upload_state(self, name: Name, upload_id: str) -> UploadState:
        await self._known_upload(name, upload_id)
        size = await self.uploads.size(upload_id)
        if size is None:
            raise self._unknown_upload(upload_id)
        return UploadState(upload_id, size)

    async def _known_upload(self, name: Name, upload_id: str) -> None:
        record = None
        if _UPLOAD_ID_RE.fullmatch(upload_id):
            record = await self.records.upload(upload_id)
        if record is None or record.repo != name:
            raise self._unknown_upload(upload_id)

    @staticmethod
    def _unknown_upload(upload_id: str) -> RegistryError:
        return RegistryError("BLOB_UPLOAD_UNKNOWN", "no such upload", {"upload": upload_id[:64]})

    async def append(
        self,
        name: Name,
        upload_id: str,
        body: AsyncIterator[bytes],
        *,
        start: int | None = None,
        length: int | None = None,
    ) -> UploadState:
        """Append a chunk. `start` (Content-Range) must be where the upload stands (else 416);
        `length`, when given, must be what arrives. A chunk that fails or falls short is
        taken back: the upload stays as it was."""
        await self._known_upload(name, upload_id)
        try:
            size = await self.uploads.append(upload_id, body, start, length, self.config.quota)
        except KeyError:
            raise self._unknown_upload(upload_id) from None
        except OverflowError as exc:  # could never be committed within the quota
            await self._check_quota(int(exc.args[0]))
            raise
        except Busy:
            raise RegistryError(
                "BLOB_UPLOAD_INVALID",
                "another request is writing this upload",
                {"upload": upload_id},
                status=409,
            ) from None
        await self.records.touch_upload(upload_id, self.clock())
        return UploadState(upload_id, size)

    async def _check_quota(self, incoming: int) -> None:
        quota = self.config.quota
        if quota <= 0:
            return
        used = await self.records.total_size()
        if used + incoming > quota:
            raise RegistryError(
                "DENIED",
                f"hosted.quota reached: {used} of {quota} bytes are used; delete content and"
                " run `registry-mirror gc`, or raise the quota",
                {"quota": quota, "used": used, "incoming": incoming},
            )

    async def commit(self, name: Name, upload_id: str, digest: Digest) -> int:
        """Verify the upload against `digest` and make it a blob of `name`; its size. A
        mismatch ends the upload (DIGEST_INVALID) and keeps nothing."""
        await self._known_upload(name, upload_id)
        algorithm = digest.split(":", 1)[0]
        try:
            actual = await self.uploads.gather(upload_id, algorithm)
        except KeyError:
            raise self._unknown_upload(upload_id) from None
        if actual != digest:
            await self.cancel(name, upload_id)
            raise RegistryError(
                "DIGEST_INVALID",
                "the uploaded content does not match the digest",
                {"expected": digest, "actual": actual},
            )
        size = await asyncio.to_thread(self.content.upload_size, upload_id)
        if size is None:
            raise self._unknown_upload(upload_id)
        if await self.records.content_size(digest) is None:
            try:
                await self._check_quota(size)
            except RegistryError:
                await self.cancel(name, upload_id)
                raise
        async with self.shared.locked(digest):
            await asyncio.to_thread(self.content.place_upload, upload_id, digest)
            await self.shared.publish(digest)
            await self.records.add_blob(name, digest, size, self.clock())
        await self.uploads.remove(upload_id)
        await self.records.drop_upload(upload_id)
        await sqlite.run(self.index.remove, [digest])  # hosted bytes are counted apart
        log.info("hosted_blob_committed", repository=name, digest=digest, size=size)
        return size

    async def cancel(self, name: Name, upload_id: str) -> None:
        await self._known_upload(name, upload_id)
        await self.uploads.remove(upload_id)
        await self.records.drop_upload(upload_id)

    # -- manifests ----------------------------------------------------------------------------

    async def resolve(self, name: Name, reference: str) -> Digest | None:
        if ":" in reference:
            return Digest(reference)
        return await self.records.tag(name, reference)

    async def manifest(self, name: Name, reference: str) -> Manifest | None:
        digest = await self.resolve(name, reference)
        if digest is None:
            return None
        record: ManifestRecord | None = await self.records.manifest(name, digest)
        if record is None or not await self.shared.fetch(digest):
            return None
        data = await asyncio.to_thread(self.content.read_bytes, digest)
        if data is None:
            return None
        return Manifest(digest, record.media_type, data)

    async def put_manifest(
        self,
        name: Name,
        reference: str,
        data: bytes,
        content_type: str | None,
        tags: tuple[str, ...],
    ) -> Pushed:
        """Check and record a pushed manifest: its digest (the reference's, when it is one),
        its JSON, and that every blob it needs is in the repository."""
        if ":" in reference:
            digest = Digest(reference)
            algorithm = digest.split(":", 1)[0]
        else:
            algorithm = "sha256"
            tags = (*tags, reference)
        hasher = new_hasher(algorithm)
        hasher.update(data)
        actual = Digest(f"{algorithm}:{hasher.hexdigest()}")
        if ":" in reference and actual != reference:
            raise RegistryError(
                "DIGEST_INVALID",
                "the manifest does not match the digest it was pushed by",
                {"expected": reference, "actual": actual},
            )
        parsed = _parse_manifest(data, content_type, sparse=self.config.sparse)
        subject = parsed.subject
        descriptor = None
        if subject is not None:
            found = referrer_descriptor(data, actual, parsed.media_type)
            descriptor = json.dumps(found) if found is not None else None
        existed = await asyncio.to_thread(self.content.exists, actual)
        await asyncio.to_thread(self.content.place_bytes, actual, data)
        if not existed:
            await self.shared.publish(actual)
        record = NewManifest(
            name, actual, parsed.media_type, len(data), subject, descriptor,
            parsed.required, parsed.children, tags,
        )  # fmt: skip
        missing = await self.records.put_manifest(record, self.clock())
        if missing:
            if not existed:  # a refused push leaves nothing behind
                await asyncio.to_thread(self.content.unlink, actual)
            raise RegistryError(
                "MANIFEST_BLOB_UNKNOWN",
                "the manifest references blobs this repository does not have",
                {"digests": missing[:20]},
            )
        await sqlite.run(self.index.remove, [actual])
        log.info("hosted_manifest_pushed", repository=name, digest=actual, tags=list(tags))
        return Pushed(actual, subject, tags)

    async def delete_manifest(self, name: Name, reference: str) -> bool:
        """By digest: the manifest and the tags naming it; by tag: only the tag."""
        if ":" in reference:
            return await self.records.delete_manifest(name, reference)
        return await self.records.delete_tag(name, reference)

    async def tags(self, name: Name) -> list[str] | None:
        return await self.records.tags(name)

    async def referrers(self, name: Name, subject: Digest) -> list[dict[str, Any]]:
        found = await self.records.referrers(name, subject)
        return [json.loads(d) for d in found]

    async def repositories(self, principal: Principal) -> list[str]:
        """Hosted repositories the client may pull (the catalog shows nothing else)."""
        every = await self.records.repositories()
        return [r for r in every if self.may(principal, r, "pull")]

    async def summary(self, principal: Principal) -> list[dict[str, Any]]:
        """The hosted repositories the client may pull, with their tags (for the page)."""
        rows = await self.records.summary()
        return [
            {"repository": repo, "tags": tags, "manifests": manifests}
            for repo, tags, manifests in rows
            if self.may(principal, repo, "pull")
        ]

    async def used_bytes(self) -> int:
        return await self.records.total_size()

    async def protected(self) -> set[Digest]:
        """Every hosted digest: the cache's eviction must never remove these files."""
        return await self.records.all_content()


@dataclass(frozen=True)
class ParsedManifest:
    media_type: str
    subject: str | None
    required: tuple[str, ...]  # blobs that must be in the repository
    children: tuple[str, ...]  # everything it references (gc keeps these)


def _invalid(message: str, detail: Any = None) -> RegistryError:
    return RegistryError("MANIFEST_INVALID", message, detail)


def _descriptor_digest(descriptor: object, where: str) -> tuple[str, dict[str, Any]]:
    if not isinstance(descriptor, dict) or not isinstance(descriptor.get("digest"), str):
        raise _invalid(f"{where}: a descriptor needs a digest")
    try:
        digest = parse_content_digest(descriptor["digest"])
    except RegistryError:
        detail = {"digest": str(descriptor["digest"])[:200]}
        raise _invalid(f"{where}: invalid digest", detail) from None
    size = descriptor.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _invalid(f"{where}: a descriptor needs a size", {"digest": digest})
    return digest, descriptor


def _parse_manifest(data: bytes, content_type: str | None, *, sparse: bool) -> ParsedManifest:
    """The manifest's media type and references, or MANIFEST_INVALID saying what is wrong."""
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise _invalid("the manifest is not JSON") from None
    if not isinstance(body, dict) or body.get("schemaVersion") != 2:
        raise _invalid("only schemaVersion 2 manifests (OCI, Docker v2) are accepted")
    declared = body.get("mediaType")
    header = (content_type or "").split(";", 1)[0].strip() or None
    if declared is not None and not isinstance(declared, str):
        raise _invalid("mediaType must be a string")
    if header and declared and header != declared:
        raise _invalid(
            "the Content-Type and the manifest's mediaType differ",
            {"content_type": header, "mediaType": declared},
        )
    media_type = header or declared
    if media_type is None:
        media_type = OCI_INDEX if "manifests" in body else OCI_MANIFEST
    required: list[str] = []
    children: list[str] = []
    if media_type in INDEX_TYPES or "manifests" in body:
        manifests = body.get("manifests")
        if not isinstance(manifests, list):
            raise _invalid("an index needs a manifests list")
        for n, item in enumerate(manifests):
            children.append(_descriptor_digest(item, f"manifests[{n}]")[0])
    else:
        if "config" not in body:
            raise _invalid("an image manifest needs a config")
        digest, _ = _descriptor_digest(body["config"], "config")
        required.append(digest)
        children.append(digest)
        layers = body.get("layers", [])
        if not isinstance(layers, list):
            raise _invalid("layers must be a list")
        for n, layer in enumerate(layers):
            digest, descriptor = _descriptor_digest(layer, f"layers[{n}]")
            children.append(digest)
            if not sparse and not _nondistributable(descriptor):
                required.append(digest)
    subject = None
    if "subject" in body:
        subject, _ = _descriptor_digest(body["subject"], "subject")
    return ParsedManifest(media_type, subject, tuple(required), tuple(children))
