"""`S3BlobStore` against a real SeaweedFS S3 gateway on loopback.

Each test works under its own key prefix in the session's bucket, so listings see only what
that test stored. Every blob read back is checked against its digest as it streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import secrets
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from mirror.cache.s3 import CHUNK_SIZE, S3BlobStore, S3Unavailable
from mirror.config import S3Config
from mirror.errors import DigestMismatch
from mirror.reference import Digest
from tests.fixtures.seaweed import SeaweedS3

MiB = 1024 * 1024
pytestmark = pytest.mark.timeout(120)


def digest_of(data: bytes) -> Digest:
    return Digest("sha256:" + hashlib.sha256(data).hexdigest())


@pytest.fixture
async def store(seaweed: SeaweedS3) -> AsyncIterator[S3BlobStore]:
    s = S3BlobStore(seaweed.s3_config(prefix=f"t-{secrets.token_hex(4)}/"))
    await s.start()
    try:
        yield s
    finally:
        await s.close()


async def put(store: S3BlobStore, data: bytes, part_size: int = 5 * MiB) -> Digest:
    digest = digest_of(data)
    upload = await store.begin_upload(digest)
    try:
        for offset in range(0, len(data), part_size):
            await upload.upload_part(data[offset : offset + part_size])
        await upload.complete()
    except BaseException:
        await upload.abort()
        raise
    return digest


async def read_verified(store: S3BlobStore, digest: Digest) -> int:
    """Stream the blob, hashing as it comes; returns its length. Never holds it whole."""
    body = await store.open_stream(digest)
    assert body is not None
    h, received = hashlib.sha256(), 0
    try:
        async for chunk in body.chunks:
            assert 0 < len(chunk) <= CHUNK_SIZE * 2
            h.update(chunk)
            received += len(chunk)
    finally:
        await body.close()
    assert received == body.size
    assert "sha256:" + h.hexdigest() == digest
    return received


async def test_stat_and_open_of_absent_blob(store: S3BlobStore) -> None:
    absent = digest_of(b"never stored " + secrets.token_bytes(8))
    assert await store.stat(absent) is None
    assert await store.open_stream(absent) is None


def test_key_layout(seaweed: SeaweedS3) -> None:
    store = S3BlobStore(seaweed.s3_config(prefix="mirror/"))
    digest = digest_of(b"x")
    hexpart = digest.split(":")[1]
    assert store.key(digest) == f"mirror/blobs/sha256/{hexpart[:2]}/{hexpart}"


async def test_start_creates_a_missing_bucket(seaweed: SeaweedS3) -> None:
    config = dataclasses.replace(seaweed.s3_config(), bucket=f"{seaweed.bucket}-new")
    store = S3BlobStore(config)
    await store.start()
    try:
        await store.client.head_bucket(Bucket=config.bucket)
        again = S3BlobStore(config)  # another node starting on the existing bucket
        await again.start()
        await again.close()
    finally:
        await store.client.delete_bucket(Bucket=config.bucket)
        await store.close()


async def test_multipart_upload_is_visible_only_on_complete(store: S3BlobStore) -> None:
    data = os.urandom(13 * MiB)
    digest = digest_of(data)
    upload = await store.begin_upload(digest)
    assert upload.key == store.key(digest)
    for offset in range(0, len(data), 5 * MiB):  # 5 + 5 + 3 MiB
        await upload.upload_part(data[offset : offset + 5 * MiB])
    assert upload.size == len(data)
    # All parts are in, but nothing is visible under the key yet.
    assert await store.stat(digest) is None
    assert await store.open_stream(digest) is None
    assert upload.key in await store.uploads_in_progress()

    await upload.complete()
    assert await store.stat(digest) == len(data)
    assert upload.key not in await store.uploads_in_progress()
    assert await read_verified(store, digest) == len(data)
    await upload.abort()  # after complete: a no-op, the blob stays
    assert await store.stat(digest) == len(data)


async def test_abort_leaves_no_object_and_no_upload(store: S3BlobStore) -> None:
    data = os.urandom(6 * MiB)
    digest = digest_of(data)
    upload = await store.begin_upload(digest)
    await upload.upload_part(data[: 5 * MiB])
    assert await store.uploads_in_progress() == [upload.key]
    await upload.abort()
    await upload.abort()  # idempotent
    assert await store.stat(digest) is None
    assert await store.uploads_in_progress() == []
    assert [d async for d in store.iter_all()] == []


async def test_abort_after_another_node_swept_it(store: S3BlobStore, seaweed: SeaweedS3) -> None:
    digest = digest_of(b"swept elsewhere")
    upload = await store.begin_upload(digest)
    await upload.upload_part(b"swept elsewhere")
    other = S3BlobStore(store.config)
    await other.start()
    try:
        other_upload = await other.begin_upload(digest)
        await other_upload.abort()
        # The other node aborts *our* upload by its id, as a sweep would.
        await other.client.abort_multipart_upload(
            Bucket=other.bucket, Key=upload.key, UploadId=upload.upload_id
        )
    finally:
        await other.close()
    await upload.abort()  # already gone: no error
    assert await store.stat(digest) is None


async def test_empty_blob(store: S3BlobStore) -> None:
    digest = digest_of(b"")
    upload = await store.begin_upload(digest)
    await upload.complete()
    assert await store.stat(digest) == 0
    assert await read_verified(store, digest) == 0
    assert await store.uploads_in_progress() == []


async def test_wrong_bytes_never_become_visible(store: S3BlobStore) -> None:
    claimed = digest_of(b"the real content")
    upload = await store.begin_upload(claimed)
    await upload.upload_part(b"something else")
    with pytest.raises(DigestMismatch):
        await upload.complete()
    assert await store.stat(claimed) is None
    assert await store.uploads_in_progress() == []


async def test_abort_stale_uploads(seaweed: SeaweedS3) -> None:
    config = seaweed.s3_config(prefix=f"t-{secrets.token_hex(4)}/")
    store = S3BlobStore(config)
    await store.start()
    later = S3BlobStore(config, clock=lambda: time.time() + 7200)
    await later.start()
    try:
        uploads = [await store.begin_upload(digest_of(bytes([i]))) for i in range(3)]
        await uploads[0].upload_part(b"\x00")
        assert await store.abort_stale_uploads(older_than=3600) == 0
        assert len(await store.uploads_in_progress()) == 3
        # Two hours on, all three are older than an hour.
        assert await later.abort_stale_uploads(older_than=3600) == 3
        assert await store.uploads_in_progress() == []
        for upload in uploads:
            await upload.abort()  # swept already: no error
    finally:
        await later.close()
        await store.close()


async def test_delete(store: S3BlobStore) -> None:
    digest = await put(store, b"to be deleted")
    assert await store.stat(digest) == len(b"to be deleted")
    await store.delete(digest)
    assert await store.stat(digest) is None
    await store.delete(digest)  # absent: fine


async def test_iter_all_lists_exactly_the_blobs(store: S3BlobStore) -> None:
    blobs = {b"first", b"second blob", os.urandom(6 * MiB)}
    expected = {await put(store, data): len(data) for data in blobs}
    # Neither a stray key under the prefix nor an upload in progress is a blob.
    await store.client.put_object(
        Bucket=store.bucket, Key=f"{store.blob_prefix}zz/not-a-digest", Body=b"x"
    )
    wrong_shard = digest_of(b"misfiled").split(":")[1]
    await store.client.put_object(
        Bucket=store.bucket, Key=f"{store.blob_prefix}00/{wrong_shard}", Body=b"misfiled"
    )
    pending = await store.begin_upload(digest_of(b"pending"))
    await pending.upload_part(b"pending")
    try:
        listed = {digest: size async for digest, size in store.iter_all()}
    finally:
        await pending.abort()
    assert listed == expected


async def test_presigned_url_serves_the_blob(store: S3BlobStore) -> None:
    data = os.urandom(2 * MiB + 17)
    digest = await put(store, data)
    url = await store.presigned_url(digest)
    assert url.startswith(store.config.endpoint + "/")
    assert store.config.secret_key not in url
    async with httpx.AsyncClient(timeout=10) as client:
        h, received = hashlib.sha256(), 0
        async with client.stream("GET", url) as response:
            assert response.status_code == 200
            async for chunk in response.aiter_bytes():
                h.update(chunk)
                received += len(chunk)
        assert received == len(data)
        assert "sha256:" + h.hexdigest() == digest
        # Without the signature the same object is refused.
        assert (await client.get(url.split("?")[0])).status_code in (401, 403)


async def test_closed_port_is_unavailable_quickly() -> None:
    config = S3Config(
        endpoint="http://127.0.0.1:9", bucket="nowhere", access_key="k", secret_key="s3cr3t"
    )
    store = S3BlobStore(config)
    started = time.monotonic()
    with pytest.raises(S3Unavailable) as info:
        await store.start()
    assert time.monotonic() - started < 5
    assert "s3cr3t" not in str(info.value)


class Relay:
    """A loopback TCP relay to the store that a test can cut (listener and connections)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.connections: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections.add(writer)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.connections.add(up_writer)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.connections):
            writer.transport.abort()
        await self.server.wait_closed()


async def relayed_store(seaweed: SeaweedS3, relay: Relay) -> S3BlobStore:
    config = dataclasses.replace(
        seaweed.s3_config(prefix=f"t-{secrets.token_hex(4)}/"),
        endpoint=f"http://127.0.0.1:{await relay.start()}",
    )
    store = S3BlobStore(config)
    await store.start()
    return store


async def test_store_going_away_is_unavailable_quickly(seaweed: SeaweedS3) -> None:
    """Started fine, then the store's port closes."""
    relay = Relay(seaweed.s3_port)
    store = await relayed_store(seaweed, relay)
    try:
        digest = digest_of(b"absent")
        assert await store.stat(digest) is None  # works through the relay
        await relay.cut()
        started = time.monotonic()
        with pytest.raises(S3Unavailable) as info:
            await store.stat(digest)
        assert time.monotonic() - started < 5
        assert seaweed.secret_key not in str(info.value)
        with pytest.raises(S3Unavailable):
            await store.begin_upload(digest)
    finally:
        await store.close()


async def test_stream_breaking_midway_raises_unavailable(seaweed: SeaweedS3) -> None:
    relay = Relay(seaweed.s3_port)
    store = await relayed_store(seaweed, relay)
    try:
        data = os.urandom(8 * MiB)
        digest = await put(store, data)
        body = await store.open_stream(digest)
        assert body is not None
        received = 0
        with pytest.raises(S3Unavailable):
            async for chunk in body.chunks:
                received += len(chunk)
                if received >= CHUNK_SIZE:
                    await relay.cut()
        await body.close()
        assert CHUNK_SIZE <= received < len(data)
    finally:
        await store.close()


async def test_presigned_url_expires(seaweed: SeaweedS3) -> None:
    config = dataclasses.replace(
        seaweed.s3_config(prefix=f"t-{secrets.token_hex(4)}/"), presign_ttl=1
    )
    store = S3BlobStore(config)
    await store.start()
    try:
        digest = await put(store, b"short-lived")
        url = await store.presigned_url(digest)
        async with httpx.AsyncClient(timeout=10) as client:
            assert (await client.get(url)).content == b"short-lived"
            await asyncio.sleep(2.1)
            assert (await client.get(url)).status_code == 403
    finally:
        await store.close()
