"""One contract suite over every implementation of the hosted seams: `HostedRecords` (the
node's SQLite, a cluster's Redis) and `UploadStore` (the node's files, a cluster's shared
store with the offset in Redis)."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mirror.cache.blobs import FilesystemBlobStore
from mirror.cache.redis_store import RedisStore
from mirror.cache.s3 import S3BlobStore
from mirror.errors import RegistryError
from mirror.hosted.content import Busy, HostedContent
from mirror.hosted.metadata import NewManifest
from mirror.hosted.records import HostedRecords, LocalHostedRecords
from mirror.hosted.redis_records import RedisHostedRecords
from mirror.hosted.uploads import LocalUploads, SharedUploads, UploadStore
from mirror.reference import Digest
from tests.contracts.conftest import protocol_members
from tests.fixtures.seaweed import SeaweedS3


def d(n: int) -> str:
    return "sha256:" + f"{n:x}".rjust(64, "0")


@pytest.fixture(params=["local", "redis"])
async def records(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    if request.param == "local":
        store = LocalHostedRecords(tmp_path / "hosted.db")
        try:
            yield store
        finally:
            store.close()
        return
    redis = RedisStore(request.getfixturevalue("redis_url"), f"c{secrets.token_hex(4)}:")
    await redis.start()
    try:
        yield RedisHostedRecords(redis)
    finally:
        await redis.close()


def test_every_implementation_has_the_whole_protocol() -> None:
    members = protocol_members(HostedRecords)
    for implementation in (LocalHostedRecords, RedisHostedRecords):
        missing = [m for m in members if not hasattr(implementation, m)]
        assert missing == [], f"{implementation.__name__} lacks {missing}"


def manifest(repo: str, digest: str, *, required: tuple[str, ...] = (), **more: Any) -> NewManifest:
    fields: dict[str, Any] = {
        "media_type": "application/vnd.oci.image.manifest.v1+json",
        "size": 100,
        "subject": None,
        "descriptor": None,
        "children": required,
        "tags": (),
        **more,
    }
    return NewManifest(repo, Digest(digest), required=required, **fields)


async def test_blobs_links_and_mounts(records: HostedRecords) -> None:
    assert await records.content_size(d(1)) is None
    assert await records.linked("a/x", d(1)) is None
    assert await records.link("a/y", d(1)) is None  # not hosted: nothing to mount
    await records.add_blob("a/x", d(1), 10, 100.0)
    await records.add_blob("a/x", d(1), 10, 100.0)  # idempotent
    assert await records.content_size(d(1)) == 10
    assert await records.linked("a/x", d(1)) == 10
    assert await records.linked("a/y", d(1)) is None
    assert await records.link("a/y", d(1)) == 10
    assert sorted(await records.repos_linking(d(1))) == ["a/x", "a/y"]
    assert await records.total_size() == 10
    assert await records.all_content() == {d(1)}
    assert await records.unlink("a/y", d(1)) is True
    assert await records.unlink("a/y", d(1)) is False
    assert await records.repos_linking(d(1)) == ["a/x"]
    assert await records.repositories() == ["a/x"]


async def test_a_manifest_needs_its_blobs_linked_and_records_nothing_otherwise(
    records: HostedRecords,
) -> None:
    await records.add_blob("a/x", d(1), 10, 100.0)
    m = manifest("a/x", d(9), required=(d(1), d(2)), tags=("v1",))
    assert await records.put_manifest(m, 101.0) == [d(2)]
    assert await records.manifest("a/x", d(9)) is None
    assert await records.tag("a/x", "v1") is None
    await records.add_blob("a/x", d(2), 20, 100.0)
    assert await records.put_manifest(m, 101.0) == []
    found = await records.manifest("a/x", d(9))
    assert found is not None and (found.size, found.subject) == (100, None)
    assert await records.tag("a/x", "v1") == d(9)
    assert await records.tags("a/x") == ["v1"]
    assert await records.tags("nothing/here") is None
    assert await records.content_size(d(9)) == 100  # the manifest's bytes are content too


async def test_deletes_tags_referrers_and_summary(records: HostedRecords) -> None:
    await records.add_blob("a/x", d(1), 10, 100.0)
    image = manifest("a/x", d(9), required=(d(1),), tags=("v1", "latest"))
    descriptor = json.dumps({"digest": d(8), "artifactType": "x/sig"})
    referrer = manifest("a/x", d(8), subject=d(9), descriptor=descriptor)
    assert await records.put_manifest(image, 101.0) == []
    assert await records.put_manifest(referrer, 102.0) == []
    assert [json.loads(r)["digest"] for r in await records.referrers("a/x", d(9))] == [d(8)]
    assert await records.referrers("a/y", d(9)) == []
    assert await records.summary() == [("a/x", ["latest", "v1"], 2)]
    assert await records.delete_tag("a/x", "latest") is True
    assert await records.delete_tag("a/x", "latest") is False
    assert await records.delete_manifest("a/x", d(9)) is True
    assert await records.delete_manifest("a/x", d(9)) is False
    assert await records.tag("a/x", "v1") is None  # its tags went with it
    assert await records.tags("a/x") == []  # the repository still holds things


async def test_gc_marks_what_manifests_reference_and_sweeps_the_rest(
    records: HostedRecords,
) -> None:
    for n in (1, 2, 3):
        await records.add_blob("a/x", d(n), n, 100.0)
    await records.put_manifest(manifest("a/x", d(9), required=(d(1),), tags=("keep",)), 100.0)
    await records.put_manifest(manifest("a/x", d(7), required=(d(2),)), 100.0)  # untagged
    assert sorted(await records.untagged_manifests()) == [("a/x", d(7))]
    assert sorted(await records.garbage(200.0)) == [(Digest(d(3)), 3)]
    assert await records.garbage(50.0) == []  # committed after the cut-off: kept
    assert await records.remove_garbage([d(3), d(1)], 200.0) == [d(3)]  # d(1) referenced
    assert await records.linked("a/x", d(3)) is None
    assert await records.total_size() == 1 + 2 + 100 + 100  # two manifests of 100 bytes
    await records.delete_manifest("a/x", d(7))
    assert (Digest(d(7)), 100) in await records.garbage(200.0)
    assert await records.remove_garbage([d(2), d(7)], 200.0) == [d(2), d(7)]
    assert await records.all_content() == {d(1), d(9)}


async def test_uploads_and_their_offsets(records: HostedRecords) -> None:
    assert await records.upload("u1") is None
    await records.new_upload("u1", "a/x", 100.0)
    up = await records.upload("u1")
    assert up is not None and (up.repo, up.offset) == ("a/x", 0)
    assert await records.advance_upload("u1", 0, 10, 101.0) is True
    assert await records.advance_upload("u1", 0, 20, 102.0) is False  # not where it stood
    up = await records.upload("u1")
    assert up is not None and up.offset == 10 and up.touched == 101.0
    await records.touch_upload("u1", 150.0)
    assert await records.upload_ids() == {"u1": 150.0}
    assert await records.drop_upload("u1") is True
    assert await records.drop_upload("u1") is False
    assert await records.upload_ids() == {}


# -- upload stores ---------------------------------------------------------------------------


@pytest.fixture(params=["local", "shared"])
async def uploads(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[UploadStore, HostedRecords, HostedContent]]:
    store = FilesystemBlobStore(tmp_path / "cache")
    store.setup()
    content = HostedContent(store, tmp_path / "cache" / "hosted")
    content.setup()
    if request.param == "local":
        db = LocalHostedRecords(tmp_path / "hosted.db")
        yield LocalUploads(content), db, content
        db.close()
        return
    seaweed: SeaweedS3 = request.getfixturevalue("seaweed")
    prefix = f"c{secrets.token_hex(4)}/"
    s3 = S3BlobStore(seaweed.s3_config(prefix=prefix))
    redis = RedisStore(request.getfixturevalue("redis_url"), prefix)
    await s3.start()
    await redis.start()
    records = RedisHostedRecords(redis)
    try:
        yield SharedUploads(content, records, s3, redis, "node-a"), records, content
    finally:
        await redis.close()
        await s3.close()


async def body(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def test_chunks_in_order_make_the_whole_upload(
    uploads: tuple[UploadStore, HostedRecords, HostedContent],
) -> None:
    store, records, content = uploads
    data = bytes(range(256)) * 100
    await records.new_upload("u1", "a/x", 1.0)
    await store.create("u1")
    assert await store.size("u1") == 0
    assert await store.append("u1", body(data[:1000]), 0, 1000, 0) == 1000
    assert await store.append("u1", body(data[1000:5000], data[5000:]), None, None, 0) == len(data)
    assert await store.size("u1") == len(data)
    assert await store.gather("u1", "sha256") == "sha256:" + hashlib.sha256(data).hexdigest()
    assert content.upload_path("u1").read_bytes() == data
    assert await store.gather("u1", "sha512") == "sha512:" + hashlib.sha512(data).hexdigest()
    await store.remove("u1")
    await store.remove("u1")  # a no-op when gone


async def test_a_bad_chunk_changes_nothing(
    uploads: tuple[UploadStore, HostedRecords, HostedContent],
) -> None:
    store, records, _ = uploads
    await records.new_upload("u2", "a/x", 1.0)
    await store.create("u2")
    await store.append("u2", body(b"a" * 100), 0, 100, 0)
    with pytest.raises(RegistryError) as err:
        await store.append("u2", body(b"b" * 100), 200, 100, 0)
    assert (err.value.status, err.value.headers["Range"]) == (416, "0-99")
    with pytest.raises(RegistryError) as err:
        await store.append("u2", body(b"c" * 50), 100, 100, 0)  # fewer bytes than announced
    assert err.value.code == "SIZE_INVALID"
    with pytest.raises(OverflowError):
        await store.append("u2", body(b"d" * 100), 100, 100, 150)  # past the limit
    assert await store.size("u2") == 100
    assert await store.gather("u2", "sha256") == "sha256:" + hashlib.sha256(b"a" * 100).hexdigest()
    assert not await store.busy("u2")


async def test_unknown_and_busy_uploads(
    uploads: tuple[UploadStore, HostedRecords, HostedContent],
) -> None:
    store, records, _ = uploads
    with pytest.raises(KeyError):
        await store.append("nope", body(b"x"), None, None, 0)
    with pytest.raises(KeyError):
        await store.gather("nope", "sha256")
    await records.new_upload("u3", "a/x", 1.0)
    await store.create("u3")

    async def slow() -> AsyncIterator[bytes]:
        yield b"x"
        assert await store.busy("u3")
        with pytest.raises(Busy):
            await store.append("u3", body(b"y"), None, None, 0)
        yield b"z"

    assert await store.append("u3", slow(), None, None, 0) == 2
    assert not await store.busy("u3")
