"""The `BlobStore` contract, held against the node's files and the S3 object store."""

from __future__ import annotations

import inspect
import os
import time
from pathlib import Path

import pytest

from mirror.cache.blobs import FileBlobWriter, FilesystemBlobStore
from mirror.cache.s3 import S3BlobStore, S3Unavailable
from mirror.config import S3Config
from mirror.errors import DigestMismatch
from mirror.interfaces import BlobStore, BlobWriter, FillTarget, Unavailable
from mirror.reference import Digest
from tests.contracts.conftest import digest_of, protocol_members, write_natively
from tests.fixtures.mirror_server import free_port

pytestmark = pytest.mark.timeout(60)

CONTRACTS = [
    (BlobStore, FilesystemBlobStore),
    (BlobStore, S3BlobStore),
    (FillTarget, FilesystemBlobStore),
    (BlobWriter, FileBlobWriter),
]


@pytest.mark.parametrize(
    ("protocol", "impl", "name"),
    [(p, i, n) for p, i in CONTRACTS for n in sorted(protocol_members(p))],
    ids=lambda v: getattr(v, "__name__", v),
)
def test_every_member_is_implemented(protocol: type, impl: type, name: str) -> None:
    assert callable(getattr(impl, name, None)), f"{impl.__name__} lacks {name}"
    wanted = protocol_members(protocol)[name]
    assert inspect.iscoroutinefunction(getattr(impl, name)) == wanted


async def read_all(store: BlobStore, digest: Digest, offset: int = 0) -> tuple[int, bytes]:
    body = await store.open_stream(digest, offset)
    assert body is not None
    try:
        return body.size, b"".join([chunk async for chunk in body.chunks])
    finally:
        await body.close()


async def test_absent(blobs: BlobStore) -> None:
    absent = digest_of(b"never stored")
    assert await blobs.stat(absent) is None
    assert await blobs.open_stream(absent) is None
    assert await blobs.read_bytes(absent, 1024) is None
    assert await blobs.delete(absent) is False
    assert [found async for found in blobs.scan()] == []


async def test_put_read_scan_delete(blobs: BlobStore) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)  # several stream chunks
    digest = digest_of(data)
    await blobs.put_bytes(digest, data)
    assert await blobs.stat(digest) == len(data)
    assert await blobs.read_bytes(digest, len(data)) == data
    assert await blobs.read_bytes(digest, len(data) - 1) is None  # too large for the caller
    assert await read_all(blobs, digest) == (len(data), data)
    offset = len(data) - 1000
    assert await read_all(blobs, digest, offset) == (1000, data[offset:])
    assert [found async for found in blobs.scan()] == [(digest, len(data))]
    assert await blobs.delete(digest) is True
    assert await blobs.stat(digest) is None
    assert await blobs.open_stream(digest) is None
    assert [found async for found in blobs.scan()] == []


async def test_the_native_writer_then_the_read_side(blobs: BlobStore) -> None:
    data = os.urandom(70_000)
    digest = await write_natively(blobs, data)
    assert await blobs.stat(digest) == len(data)
    assert await read_all(blobs, digest) == (len(data), data)
    assert await blobs.read_bytes(digest, len(data)) == data


async def test_empty_blob(blobs: BlobStore) -> None:
    digest = digest_of(b"")
    await blobs.put_bytes(digest, b"")
    assert await blobs.stat(digest) == 0
    assert await blobs.read_bytes(digest, 10) == b""
    assert await read_all(blobs, digest) == (0, b"")


async def test_wrong_bytes_are_refused_and_never_visible(blobs: BlobStore) -> None:
    digest = digest_of(b"the real content")
    with pytest.raises(DigestMismatch):
        await blobs.put_bytes(digest, b"something else")
    assert await blobs.stat(digest) is None
    assert [found async for found in blobs.scan()] == []


class UncheckedS3BlobStore(S3BlobStore):
    """Starts without its bucket check, so a store that is down can be asked everything."""

    async def _ensure_bucket(self) -> None:
        return None


async def test_s3_down_raises_s3_unavailable() -> None:
    config = S3Config(
        endpoint=f"http://127.0.0.1:{free_port()}",  # nothing listens: the store is down
        region="us-east-1",
        bucket="contract",
        access_key="k",
        secret_key="s",
    )
    with pytest.raises(S3Unavailable):
        await S3BlobStore(config).start()
    store = UncheckedS3BlobStore(config)
    await store.start()
    digest = digest_of(b"x")
    calls = [
        lambda: store.stat(digest),
        lambda: store.open_stream(digest),
        lambda: store.read_bytes(digest, 10),
        lambda: store.put_bytes(digest, b"x"),
        lambda: store.delete(digest),
        lambda: anext(aiter(store.scan())),
    ]
    started = time.monotonic()
    try:
        for call in calls:
            with pytest.raises(S3Unavailable):
                await call()
    finally:
        await store.close()
    assert time.monotonic() - started < 30  # bounded, never a hang
    assert issubclass(S3Unavailable, Unavailable)


async def test_a_writers_hash_copy_covers_what_it_wrote_and_stands_alone(tmp_path: Path) -> None:
    """What a fill that leaves its disk behind hashes the rest of its stream on."""
    import hashlib

    store = FilesystemBlobStore(tmp_path / "cache")
    store.setup()
    data = os.urandom(3000)
    writer: BlobWriter = await store.begin_write(digest_of(data), len(data))
    await writer.write_chunks([data[:1000], memoryview(data)[1000:2000]])
    copy = await writer.hash_copy()
    await writer.write_chunks([data[2000:]])
    assert copy.hexdigest() == hashlib.sha256(data[:2000]).hexdigest()
    copy.update(data[2000:])
    assert "sha256:" + copy.hexdigest() == digest_of(data)
    await writer.commit()  # the writer's own hash was not disturbed
    assert await store.stat(digest_of(data)) == len(data)
