"""Where an upload's bytes wait for their commit: `UploadStore`, with two implementations.

- `LocalUploads`: one file per upload under `<cache.dir>/hosted/uploads/`, appended to and
  hashed as chunks stream in (flocked while written, so two workers never interleave);
- `SharedUploads` (a cluster): each chunk an object of the shared store under
  `<prefix>hosted-uploads/<id>/<offset>`, the upload's offset in the shared records, moved only
  from where the chunk started; so consecutive chunks may arrive at different nodes behind a
  load balancer, and the committing node gathers them in order.

Both take a chunk back whole when it fails or falls short (the upload stays as it was), answer
416 for a chunk that does not start where the upload stands, and leave the whole upload in the
local file `uploads/<id>` once `gather` has hashed it (the commit renames that file into the
store). Pass one contract suite (tests/contracts/test_hosted_uploads_contract.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from mirror.errors import RegistryError
from mirror.hosted.content import Busy, HostedContent, new_hasher
from mirror.hosted.records import HostedRecords
from mirror.interfaces import Unavailable

WRITE_BATCH = 1024 * 1024  # bytes gathered before each write to disk


@contextlib.contextmanager
def shared_io(what: str) -> Iterator[None]:
    """A failure of the shared store (or its client) as `Unavailable`: the web layer answers
    503 for it, whatever the client library raised. The API's own answers pass through."""
    try:
        yield
    except (RegistryError, Busy, KeyError, OverflowError, Unavailable):
        raise
    except Exception as exc:
        raise Unavailable(f"shared store {what}: {type(exc).__name__}: {exc}") from exc


def range_header(offset: int) -> str:
    """The `Range` header of an upload holding `offset` bytes (`0-0` when empty)."""
    return f"0-{max(offset - 1, 0)}"


def out_of_order(upload_id: str, start: int, offset: int) -> RegistryError:
    return RegistryError(
        "BLOB_UPLOAD_INVALID",
        f"chunk starts at {start}, the upload stands at {offset}",
        {"upload": upload_id, "offset": offset},
        status=416,
        headers={"Range": range_header(offset)},
    )


def short_chunk(upload_id: str, written: int, length: int) -> RegistryError:
    return RegistryError(
        "SIZE_INVALID",
        f"the chunk has {written} bytes, its headers said {length}",
        {"upload": upload_id},
    )


class UploadStore(Protocol):
    async def create(self, upload_id: str) -> None:
        """Make room for a new, empty upload (its record is the caller's)."""

    async def size(self, upload_id: str) -> int | None:
        """Bytes received so far; None if the upload's bytes are gone."""

    async def append(
        self,
        upload_id: str,
        body: AsyncIterator[bytes],
        start: int | None,
        length: int | None,
        limit: int,
    ) -> int:
        """Append a chunk; the upload's new size. `start` must be the current size (else a
        416 `RegistryError`), `length` (if given) what arrives (else SIZE_INVALID), and the
        upload may not grow past `limit` bytes (0: no limit; else DENIED from the caller's
        quota check). `Busy` if another request is writing it; KeyError if unknown."""

    async def gather(self, upload_id: str, algorithm: str) -> str:
        """The whole upload's digest (`algorithm:hex`), its bytes left in the local file
        `uploads/<id>`; KeyError if unknown."""

    async def remove(self, upload_id: str) -> None:
        """Drop the upload's bytes wherever they are (a no-op if gone)."""

    async def busy(self, upload_id: str) -> bool:
        """Whether a request is writing it now (gc leaves it alone then)."""


@dataclass
class _Hashing:
    """An upload's running hash, valid while `offset` equals the file's size."""

    offset: int
    hasher: Any


class LocalUploads:
    """Uploads as files on this node, hashed as they stream in (the hash lives in this
    process: a chunk written by another worker makes `gather` hash the file again)."""

    def __init__(self, content: HostedContent) -> None:
        self.content = content
        self._hashing: dict[str, _Hashing] = {}

    async def create(self, upload_id: str) -> None:
        await asyncio.to_thread(self.content.create_upload, upload_id)
        self._hashing[upload_id] = _Hashing(0, new_hasher("sha256"))

    async def size(self, upload_id: str) -> int | None:
        return await asyncio.to_thread(self.content.upload_size, upload_id)

    async def append(
        self,
        upload_id: str,
        body: AsyncIterator[bytes],
        start: int | None,
        length: int | None,
        limit: int,
    ) -> int:
        loop = asyncio.get_running_loop()
        lock = self.content.writing(upload_id)
        fd = await loop.run_in_executor(None, lock.__enter__)
        try:
            offset = await asyncio.to_thread(_file_size, fd)
            if start is not None and start != offset:
                raise out_of_order(upload_id, start, offset)
            if limit and offset + (length or 0) > limit:
                raise OverflowError(offset + (length or 0))
            hashing = self._hashing.get(upload_id)
            if hashing is not None and hashing.offset != offset:
                hashing = None  # another worker wrote a chunk: `gather` hashes the file
            if hashing is None and offset == 0:
                hashing = _Hashing(0, new_hasher("sha256"))
            try:
                written = await _stream_to(fd, body, hashing)
                if length is not None and written != length:
                    raise short_chunk(upload_id, written, length)
            except BaseException:
                self._hashing.pop(upload_id, None)
                await asyncio.to_thread(os.ftruncate, fd, offset)
                raise
            if hashing is not None:
                hashing.offset = offset + written
                self._hashing[upload_id] = hashing
            else:
                self._hashing.pop(upload_id, None)
            return offset + written
        finally:
            await loop.run_in_executor(None, lock.__exit__, None, None, None)

    async def gather(self, upload_id: str, algorithm: str) -> str:
        size = await self.size(upload_id)
        if size is None:
            raise KeyError(upload_id)
        hashing = self._hashing.pop(upload_id, None)
        if hashing is not None and hashing.offset == size and algorithm == "sha256":
            return f"sha256:{hashing.hasher.hexdigest()}"
        return await asyncio.to_thread(self.content.hash_file, upload_id, algorithm)

    async def remove(self, upload_id: str) -> None:
        self._hashing.pop(upload_id, None)
        await asyncio.to_thread(self.content.remove_upload, upload_id)

    async def busy(self, upload_id: str) -> bool:
        return await asyncio.to_thread(self.content.is_busy, upload_id)


class SharedUploads:
    """Uploads whose chunks are objects of the cluster's shared store (see the module)."""

    def __init__(
        self,
        content: HostedContent,
        records: HostedRecords,
        s3: Any,  # mirror.cache.s3.S3BlobStore (the cluster extra: not imported here)
        locks: Any,  # mirror.cache.redis_store.RedisStore
        owner: str,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.content = content
        self.records = records
        self.s3 = s3
        self.locks = locks
        self.owner = owner
        self.clock = clock
        self.prefix = f"{s3.config.prefix}hosted-uploads/"

    def _key(self, upload_id: str, offset: int) -> str:
        return f"{self.prefix}{upload_id}/{offset:016d}"

    async def create(self, upload_id: str) -> None:
        return None  # nothing until the first chunk

    async def size(self, upload_id: str) -> int | None:
        record = await self.records.upload(upload_id)
        return None if record is None else record.offset

    @contextlib.asynccontextmanager
    async def _writing(self, upload_id: str) -> AsyncIterator[None]:
        lock = f"hosted-upload-{upload_id}"
        if not await self.locks.acquire_fill(lock, self.owner, 600.0):
            raise Busy(upload_id)
        try:
            yield
        finally:
            await self.locks.release_fill(lock, self.owner)

    async def append(
        self,
        upload_id: str,
        body: AsyncIterator[bytes],
        start: int | None,
        length: int | None,
        limit: int,
    ) -> int:
        with shared_io("append"):
            return await self._append(upload_id, body, start, length, limit)

    async def _append(
        self,
        upload_id: str,
        body: AsyncIterator[bytes],
        start: int | None,
        length: int | None,
        limit: int,
    ) -> int:
        async with self._writing(upload_id):
            record = await self.records.upload(upload_id)
            if record is None:
                raise KeyError(upload_id)
            offset = record.offset
            if start is not None and start != offset:
                raise out_of_order(upload_id, start, offset)
            if limit and offset + (length or 0) > limit:
                raise OverflowError(offset + (length or 0))
            part = self.content.uploads / f"{upload_id}.part-{offset}"
            fd = await asyncio.to_thread(os.open, part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            try:
                written = await _stream_to(fd, body, None)
            finally:
                await asyncio.to_thread(os.close, fd)
            try:
                if length is not None and written != length:
                    raise short_chunk(upload_id, written, length)
                if written:
                    await put_file(self.s3, self._key(upload_id, offset), part)
                if not await self.records.advance_upload(
                    upload_id, offset, offset + written, self.clock()
                ):
                    raise out_of_order(upload_id, offset, await self.size(upload_id) or 0)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    await asyncio.to_thread(part.unlink)
            return offset + written

    async def _parts(self, upload_id: str) -> list[tuple[int, str, int]]:
        """(offset, key, size) of the upload's chunk objects, in order."""
        out = []
        paginator = self.s3.client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(
            Bucket=self.s3.bucket, Prefix=f"{self.prefix}{upload_id}/"
        ):
            for item in page.get("Contents", []):
                key = str(item["Key"])
                out.append((int(key.rsplit("/", 1)[1]), key, int(item["Size"])))
        return sorted(out)

    async def gather(self, upload_id: str, algorithm: str) -> str:
        with shared_io("gather"):
            return await self._gather(upload_id, algorithm)

    async def _gather(self, upload_id: str, algorithm: str) -> str:
        size = await self.size(upload_id)
        if size is None:
            raise KeyError(upload_id)
        hasher = new_hasher(algorithm)
        path = self.content.upload_path(upload_id)
        fd = await asyncio.to_thread(os.open, path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            offset = 0
            for start, key, _ in await self._parts(upload_id):
                if start != offset:
                    continue  # a chunk whose offset never became the upload's (a failed try)
                response = await self.s3.client.get_object(Bucket=self.s3.bucket, Key=key)
                async with response["Body"] as stream:
                    while data := await stream.read(WRITE_BATCH):
                        await asyncio.to_thread(_hash_and_write, fd, hasher, data)
                        offset += len(data)
            if offset != size:
                raise RegistryError(
                    "BLOB_UPLOAD_INVALID",
                    "the upload's chunks are incomplete in the shared store",
                    {"upload": upload_id, "have": offset, "recorded": size},
                )
        finally:
            await asyncio.to_thread(os.close, fd)
        return f"{algorithm}:{hasher.hexdigest()}"

    async def remove(self, upload_id: str) -> None:
        with shared_io("remove"):
            for _, key, _ in await self._parts(upload_id):
                await self.s3.client.delete_object(Bucket=self.s3.bucket, Key=key)
        await asyncio.to_thread(self.content.remove_upload, upload_id)

    async def busy(self, upload_id: str) -> bool:
        return await self.locks.fill_owner(f"hosted-upload-{upload_id}") is not None


async def _stream_to(fd: int, body: AsyncIterator[bytes], hashing: _Hashing | None) -> int:
    written = 0
    batch: list[bytes] = []
    pending = 0
    async for data in body:
        batch.append(data)
        pending += len(data)
        if pending >= WRITE_BATCH:
            written += await asyncio.to_thread(_write_all, fd, batch, hashing)
            batch, pending = [], 0
    if batch:
        written += await asyncio.to_thread(_write_all, fd, batch, hashing)
    return written


async def put_file(s3: Any, key: str, path: Path) -> None:
    """A local file as one object of the shared store, read and sent a part at a time (a
    multipart upload: never the whole file in memory; nothing visible until complete)."""
    client, bucket = s3.client, s3.bucket
    part_size = max(int(s3.config.part_size), 5 * 1024 * 1024)
    created = await client.create_multipart_upload(Bucket=bucket, Key=key)
    upload_id = created["UploadId"]
    parts: list[dict[str, Any]] = []
    f = await asyncio.to_thread(open, path, "rb")
    try:
        with f:
            while data := await asyncio.to_thread(f.read, part_size):
                number = len(parts) + 1
                done = await client.upload_part(
                    Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data
                )
                parts.append({"ETag": done["ETag"], "PartNumber": number})
        if not parts:
            await client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            await client.put_object(Bucket=bucket, Key=key, Body=b"")
            return
        await client.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
        )
    except BaseException:
        with contextlib.suppress(Exception):
            await client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        raise


def _hash_and_write(fd: int, hasher: Any, data: bytes) -> None:
    hasher.update(data)
    _write_all(fd, [data], None)


def _file_size(fd: int) -> int:
    return os.fstat(fd).st_size


def _write_all(fd: int, chunks: list[bytes], hashing: _Hashing | None) -> int:
    written = 0
    for data in chunks:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        if hashing is not None:
            hashing.hasher.update(data)
        written += len(data)
    return written
