"""Blobs on S3-compatible object storage (AWS S3, SeaweedFS, MinIO...), shared by every node.

Keys follow the disk layout: `<prefix>blobs/sha256/<first two hex>/<hex>`. A blob is written
as a multipart upload and appears under its key only when the upload completes, which S3 makes
atomic, so a reader never sees a partial blob; an upload that is never completed (its node died)
stays invisible until `abort_stale_uploads` sweeps it. By default an upload also hashes its
parts and refuses to complete bytes that do not match the digest: a content-addressed key
must never hold the wrong content, whoever wrote it.

Every failure of the store itself (unreachable, timed out, 5xx, refused credentials) surfaces
as `S3Unavailable` so callers have one thing to catch when they fall back to the upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import aiohttp
import structlog
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from mirror.errors import DigestMismatch
from mirror.interfaces import BlobStream, Unavailable
from mirror.reference import SHA256_RE, Digest

if TYPE_CHECKING:
    from mirror.config import S3Config

log = structlog.get_logger(__name__)

# Bounded so that a dead store turns into S3Unavailable quickly rather than hanging a request;
# the read timeout is per socket read, not per object, so large GETs are not cut short.
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0
# Total attempts per request (botocore "standard" mode): one retry smooths over a dropped
# keep-alive connection without multiplying the wait when the store is really down.
MAX_ATTEMPTS = 2
MAX_POOL_CONNECTIONS = 64
CHUNK_SIZE = 1024 * 1024
# Hash parts in a worker thread only when they are large enough for that to pay off.
_THREAD_HASH_MIN = 256 * 1024


class S3Unavailable(Unavailable):
    """The object store cannot be reached or failed (connection error, timeout, 5xx)."""


def open_client(
    config: S3Config,
    *,
    connect_timeout: float = CONNECT_TIMEOUT,
    read_timeout: float = READ_TIMEOUT,
    attempts: int = MAX_ATTEMPTS,
) -> Any:
    """An aiobotocore S3 client for `config` (an async context manager): the store's, and the
    probe's (`check-config --probe`, with its own time-outs and a single attempt)."""
    boto_config = AioConfig(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"total_max_attempts": attempts, "mode": "standard"},
        max_pool_connections=MAX_POOL_CONNECTIONS,
        signature_version="s3v4",
        # Custom endpoints (SeaweedFS, MinIO) rarely have wildcard DNS for bucket hosts.
        s3={"addressing_style": "path" if config.endpoint else "auto"},
        # Checksums only where S3 requires them: callers verify sha256 digests anyway, and
        # botocore's default CRC trailers are not understood by every S3-compatible store.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return get_session().create_client(
        "s3",
        region_name=config.region or "us-east-1",
        endpoint_url=config.endpoint or None,
        aws_access_key_id=config.access_key,
        aws_secret_access_key=config.secret_key,
        config=boto_config,
    )


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code") or "")


def _unavailable(operation: str, exc: BaseException) -> S3Unavailable:
    """A short message naming the operation and the failure, never a URL or a credential."""
    if isinstance(exc, ClientError):
        detail = f"{_code(exc) or 'error'} (HTTP {_status(exc)})"
    elif isinstance(exc, TimeoutError):
        detail = "timed out"
    else:
        detail = type(exc).__name__
    return S3Unavailable(f"S3 {operation} failed: {detail}")


# What the store (or the way to it) failing looks like from here.
# (TimeoutError is an OSError.)
_FAILURES = (BotoCoreError, ClientError, aiohttp.ClientError, OSError)


def _is_absent(exc: BaseException) -> bool:
    return isinstance(exc, ClientError) and (
        _status(exc) == 404 or _code(exc) in {"NoSuchKey", "NoSuchUpload", "404", "NotFound"}
    )


S3Body = BlobStream  # a blob being streamed from the store (the name callers knew first)


class S3BlobStore:
    """A `BlobStore` (mirror/interfaces.py) on one bucket, under an optional prefix; every
    failure of the store raises `S3Unavailable`."""

    def __init__(self, config: S3Config, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.bucket = config.bucket
        self.blob_prefix = f"{config.prefix}blobs/sha256/"
        self._clock = clock
        self._stack = AsyncExitStack()
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            raise RuntimeError("S3BlobStore.start() was not called")
        return self._client

    async def start(self) -> None:
        """Create the client and the bucket if it is missing (several nodes may race: fine)."""
        config = self.config
        self._client = await self._stack.enter_async_context(open_client(config))
        try:
            await self._ensure_bucket()
        except BaseException:
            await self.close()
            raise
        log.info("s3_store_started", endpoint=config.endpoint or "aws", bucket=self.bucket)

    async def _ensure_bucket(self) -> None:
        try:
            await self.client.head_bucket(Bucket=self.bucket)
            return
        except _FAILURES as exc:
            if not _is_absent(exc):
                raise _unavailable("HeadBucket", exc) from exc
        params: dict[str, Any] = {"Bucket": self.bucket}
        region = self.config.region or "us-east-1"
        if region != "us-east-1":
            params["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            await self.client.create_bucket(**params)
        except _FAILURES as exc:
            if not (
                isinstance(exc, ClientError)
                and _code(exc) in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}
            ):
                raise _unavailable("CreateBucket", exc) from exc
        else:
            log.info("s3_bucket_created", bucket=self.bucket)

    async def close(self) -> None:
        self._client = None
        await self._stack.aclose()

    def key(self, digest: Digest) -> str:
        hexpart = digest.split(":", 1)[1]
        return f"{self.blob_prefix}{hexpart[:2]}/{hexpart}"

    async def stat(self, digest: Digest) -> int | None:
        """The blob's size, or None if it is not (yet) in the store."""
        try:
            head = await self.client.head_object(Bucket=self.bucket, Key=self.key(digest))
        except _FAILURES as exc:
            if _is_absent(exc):
                return None
            raise _unavailable("HeadObject", exc) from exc
        return int(head["ContentLength"])

    async def open_stream(self, digest: Digest, offset: int = 0) -> S3Body | None:
        """Start a GET from byte `offset`; the body is read lazily in ~1 MiB chunks (None if
        absent). `size` is what remains from `offset`."""
        extra = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            response = await self.client.get_object(
                Bucket=self.bucket, Key=self.key(digest), **extra
            )
        except _FAILURES as exc:
            if _is_absent(exc):
                return None
            raise _unavailable("GetObject", exc) from exc
        body = response["Body"]

        async def chunks() -> AsyncIterator[bytes]:
            # aiohttp hands over at most its buffer (~128 KiB) per read: gather them into
            # ~1 MiB pieces so that consumers (hashing, writes) do fewer, larger calls.
            pending: list[bytes] = []
            pending_size = 0
            try:
                while True:
                    data = await body.read(CHUNK_SIZE - pending_size)
                    if not data:
                        break
                    if not pending and len(data) >= CHUNK_SIZE:
                        yield data
                        continue
                    pending.append(data)
                    pending_size += len(data)
                    if pending_size >= CHUNK_SIZE:
                        yield b"".join(pending)
                        pending, pending_size = [], 0
            except _FAILURES as exc:
                raise _unavailable("GetObject body", exc) from exc
            if pending:
                yield b"".join(pending)

        async def close() -> None:
            body.close()

        return S3Body(size=int(response["ContentLength"]), chunks=chunks(), close=close)

    async def presigned_url(self, digest: Digest) -> str:
        """A GET URL a client can follow without credentials, valid `presign_ttl` seconds."""
        try:
            url = await self.client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": self.key(digest)},
                ExpiresIn=max(1, int(self.config.presign_ttl)),
            )
        except _FAILURES as exc:
            raise _unavailable("presign", exc) from exc
        return str(url)

    async def begin_upload(self, digest: Digest, *, verify: bool = True) -> S3Upload:
        """Start a multipart upload; nothing is visible until `S3Upload.complete`.

        `verify=False` skips hashing the parts, for callers that hash the same bytes already.
        """
        key = self.key(digest)
        try:
            created = await self.client.create_multipart_upload(
                Bucket=self.bucket, Key=key, ContentType="application/octet-stream"
            )
        except _FAILURES as exc:
            raise _unavailable("CreateMultipartUpload", exc) from exc
        return S3Upload(self, digest, key, str(created["UploadId"]), verify=verify)

    async def delete(self, digest: Digest) -> bool:
        """Remove the blob; True if it was there. S3's DELETE cannot tell, so a HEAD asks
        first (an absent blob costs no DELETE; one uploaded between the two stays)."""
        if await self.stat(digest) is None:
            return False
        try:
            await self.client.delete_object(Bucket=self.bucket, Key=self.key(digest))
        except _FAILURES as exc:
            if not _is_absent(exc):
                raise _unavailable("DeleteObject", exc) from exc
        return True

    async def read_bytes(self, digest: Digest, max_size: int) -> bytes | None:
        """A small blob (a manifest) whole, re-verified; None if absent, larger than
        `max_size` (not downloaded then) or not matching its digest."""
        body = await self.open_stream(digest)
        if body is None:
            return None
        try:
            if body.size > max_size:
                return None
            data = b"".join([chunk async for chunk in body.chunks])
        finally:
            await body.close()
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            return None
        return data

    async def put_bytes(self, digest: Digest, data: bytes) -> None:
        """Store a small blob in one part, verified (raises `DigestMismatch`, stores nothing)."""
        upload = await self.begin_upload(digest)
        try:
            await upload.upload_part(data)
            await upload.complete()
        except BaseException:
            with contextlib.suppress(S3Unavailable):
                await upload.abort()
            raise

    def scan(self) -> AsyncIterator[tuple[Digest, int]]:
        """Every stored blob with its size (the `BlobReader` name for `iter_all`)."""
        return self.iter_all()

    async def iter_all(self) -> AsyncIterator[tuple[Digest, int]]:
        """Every stored blob with its size; other keys under the prefix are ignored."""
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=self.blob_prefix):
                for entry in page.get("Contents", ()):
                    digest = self._digest_of(entry["Key"])
                    if digest is not None:
                        yield digest, int(entry["Size"])
        except _FAILURES as exc:
            raise _unavailable("ListObjectsV2", exc) from exc

    def _digest_of(self, key: str) -> Digest | None:
        shard, _, hexpart = key[len(self.blob_prefix) :].partition("/")
        digest = f"sha256:{hexpart}"
        if SHA256_RE.fullmatch(digest) and shard == hexpart[:2]:
            return Digest(digest)
        return None

    async def _list_uploads(self) -> list[dict[str, Any]]:
        paginator = self.client.get_paginator("list_multipart_uploads")
        uploads: list[dict[str, Any]] = []
        try:
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=self.blob_prefix):
                uploads.extend(page.get("Uploads", ()))
        except _FAILURES as exc:
            raise _unavailable("ListMultipartUploads", exc) from exc
        return uploads

    async def uploads_in_progress(self) -> list[str]:
        """Keys with an incomplete multipart upload (one entry per upload)."""
        return [upload["Key"] for upload in await self._list_uploads()]

    async def abort_uploads(self, digest: Digest) -> int:
        """Abort every incomplete upload of `digest` (a fill's new owner sweeping a dead
        owner's parts); returns how many."""
        key = self.key(digest)
        aborted = 0
        for upload in await self._list_uploads():
            if upload["Key"] != key:
                continue
            try:
                await self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload["UploadId"]
                )
            except _FAILURES as exc:
                if _is_absent(exc):
                    continue
                raise _unavailable("AbortMultipartUpload", exc) from exc
            aborted += 1
        return aborted

    async def abort_stale_uploads(self, older_than: float) -> int:
        """Abort uploads initiated more than `older_than` seconds ago: their writers are gone
        (a live fill completes or aborts long before), and their parts cost storage."""
        cutoff = self._clock() - older_than
        aborted = 0
        for upload in await self._list_uploads():
            if upload["Initiated"].timestamp() >= cutoff:
                continue
            try:
                await self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                )
            except _FAILURES as exc:
                if _is_absent(exc):
                    continue  # another node swept it first
                raise _unavailable("AbortMultipartUpload", exc) from exc
            aborted += 1
            log.info("s3_stale_upload_aborted", key=upload["Key"])
        return aborted


class S3Upload:
    """One blob's multipart upload: parts in call order, visible only after `complete`."""

    def __init__(
        self, store: S3BlobStore, digest: Digest, key: str, upload_id: str, *, verify: bool
    ) -> None:
        self.store = store
        self.digest = digest
        self.key = key
        self.upload_id = upload_id
        self.size = 0
        self._parts: list[dict[str, Any]] = []
        self._hash = hashlib.sha256() if verify else None
        self._state = "open"  # -> "completed" | "aborted"

    async def upload_part(self, data: bytes) -> None:
        """Upload the next part. Every part but the last must be >= 5 MiB (S3's rule).
        If it raises, the part was not counted: calling again with the same bytes is a retry."""
        if self._state != "open":
            raise RuntimeError(f"upload already {self._state}")
        number = len(self._parts) + 1
        request = self.store.client.upload_part(
            Bucket=self.store.bucket,
            Key=self.key,
            UploadId=self.upload_id,
            PartNumber=number,
            Body=data,
        )
        # Hash a copy while the part travels (hashlib releases the GIL on large buffers); it
        # replaces the running hash only if the part was stored, so a retry starts clean.
        hashed = self._hash.copy() if self._hash is not None else None
        try:
            if hashed is not None and len(data) >= _THREAD_HASH_MIN:
                part, _ = await asyncio.gather(request, asyncio.to_thread(hashed.update, data))
            else:
                if hashed is not None:
                    hashed.update(data)
                part = await request
        except _FAILURES as exc:
            raise _unavailable("UploadPart", exc) from exc
        self._hash = hashed
        self._parts.append({"ETag": part["ETag"], "PartNumber": number})
        self.size += len(data)

    async def complete(self) -> None:
        """Make the blob visible under its key, atomically. Raises `DigestMismatch` (after
        aborting) if verifying and the bytes do not hash to the digest."""
        if self._state != "open":
            raise RuntimeError(f"upload already {self._state}")
        if self._hash is not None:
            actual = "sha256:" + self._hash.hexdigest()
            if actual != self.digest:
                await self.abort()
                raise DigestMismatch(self.digest, actual)
        client, bucket = self.store.client, self.store.bucket
        try:
            if self._parts:
                await client.complete_multipart_upload(
                    Bucket=bucket,
                    Key=self.key,
                    UploadId=self.upload_id,
                    MultipartUpload={"Parts": self._parts},
                )
            else:
                # S3 refuses to complete an upload of no parts: write the empty object
                # directly and drop the upload.
                await client.put_object(Bucket=bucket, Key=self.key, Body=b"")
        except _FAILURES as exc:
            raise _unavailable("CompleteMultipartUpload", exc) from exc
        if not self._parts:
            # The empty blob is in place; an upload left behind is swept as stale later.
            with contextlib.suppress(S3Unavailable):
                await self.abort()
        self._state = "completed"

    async def abort(self) -> None:
        """Drop the upload and its parts; a no-op if it is already gone (aborted here or by
        another node's sweep) or completed."""
        if self._state != "open":
            return
        try:
            await self.store.client.abort_multipart_upload(
                Bucket=self.store.bucket, Key=self.key, UploadId=self.upload_id
            )
        except _FAILURES as exc:
            if not _is_absent(exc):
                raise _unavailable("AbortMultipartUpload", exc) from exc
        self._state = "aborted"
