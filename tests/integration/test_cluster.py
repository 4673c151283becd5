"""Three mirror nodes on a real SeaweedFS (S3) and a real redis-server, in front of the real
upstream: one upstream fetch per cluster, followers streaming while the owner fills, a dead
owner taken over mid-blob, tags shared, and nodes that keep serving without Redis."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import yaml

from mirror.cache.redis_store import RedisIndex, RedisStore
from mirror.cache.s3 import S3BlobStore
from tests.fixtures.mirror_server import MirrorProcess
from tests.fixtures.real_upstream import Upstream
from tests.fixtures.redis_server import RedisServer
from tests.fixtures.throttle import Throttle

MiB = 1024 * 1024
ACCEPT = {  # every manifest type: what engines send, and what makes a tag record
    "Accept": ", ".join(
        [
            "application/vnd.oci.image.index.v1+json",
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.docker.distribution.manifest.list.v2+json",
            "application/vnd.docker.distribution.manifest.v2+json",
        ]
    )
}


class Cluster:
    """N `registry-mirror serve` processes sharing one bucket prefix and one Redis prefix."""

    def __init__(
        self,
        tmp_path: Path,
        upstream_url: str,
        redis_url: str,
        seaweed: Any,
        n: int = 3,
        workers: int = 1,
        **s3_options: Any,
    ) -> None:
        self.prefix = f"t{secrets.token_hex(4)}/"
        self.s3_config = seaweed.s3_config(self.prefix)
        self.redis_url = redis_url
        settings = {
            "upstream": {"url": upstream_url, "names": ["docker.io"], "retries": 0},
            "storage": {
                "kind": "s3",
                "s3": {
                    "endpoint": self.s3_config.endpoint,
                    "bucket": self.s3_config.bucket,
                    "prefix": self.prefix,
                    "access_key": self.s3_config.access_key,
                    "secret_key": self.s3_config.secret_key,
                    "part_size": "5MiB",
                    **s3_options,
                },
            },
            "metadata": {"kind": "redis", "redis_url": redis_url, "key_prefix": self.prefix},
            "cluster": {"secret": "test-cluster-secret", "fill_lease": "2s"},
        }
        config = tmp_path / "node.yaml"
        config.write_text(yaml.safe_dump(settings))
        self.nodes = [
            MirrorProcess(
                tmp_path / f"node{i}",
                upstream_url,
                "--config",
                str(config),
                log_path=tmp_path / f"node{i}.log",
                env={"REGISTRY_MIRROR_WORKERS": str(workers)},
            )
            for i in range(n)
        ]

    def start(self) -> None:
        for node in self.nodes:
            node.start()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    async def owner(self, digest: str) -> str | None:
        store = RedisStore(self.redis_url, self.prefix)
        await store.start()
        try:
            return await store.fill_owner(digest)
        finally:
            await store.close()

    async def bucket(self) -> S3BlobStore:
        store = S3BlobStore(self.s3_config)
        await store.start()
        return store


async def wait_stored(cluster: Cluster, digest: str, limit: float = 15.0) -> None:
    """Until the shared store has `digest` (the owner completes its upload after its clients
    already have every byte)."""
    bucket = await cluster.bucket()
    try:
        deadline = time.monotonic() + limit
        while await bucket.stat(digest) is None:  # type: ignore[arg-type]
            assert time.monotonic() < deadline, f"{digest} never reached the shared store"
            await asyncio.sleep(0.05)
    finally:
        await bucket.close()


def events(node: MirrorProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in node.log_events() if e.get("event") == name]


async def fetch(url: str, progress: dict[str, int] | None = None) -> tuple[float, str, int]:
    """(wall time of the first body byte, sha256 of the body, its length)."""
    h = hashlib.sha256()
    first = 0.0
    size = 0
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as s, s.get(url) as resp:
        assert resp.status == 200, await resp.text()
        async for chunk in resp.content.iter_any():
            first = first or time.time()
            h.update(chunk)
            size += len(chunk)
            if progress is not None:
                progress[url] = size
    return first, "sha256:" + h.hexdigest(), size


async def object_digest(bucket: S3BlobStore, digest: str) -> str | None:
    body = await bucket.open_stream(digest)  # type: ignore[arg-type]
    if body is None:
        return None
    h = hashlib.sha256()
    try:
        async for chunk in body.chunks:
            h.update(chunk)
    finally:
        await body.close()
    return "sha256:" + h.hexdigest()


@pytest.fixture
async def slow_upstream(upstream: Upstream) -> AsyncIterator[str]:
    """The upstream behind a 40 MB/s link, so a 64 MiB fill lasts long enough to watch."""
    throttle = Throttle(upstream.registry.port, 40e6)
    await throttle.start()
    try:
        yield f"http://127.0.0.1:{throttle.port}"
    finally:
        await throttle.close()


def big_blob(upstream: Upstream) -> Any:
    image = upstream.images["big"]
    return image, next(b for b in image.blobs if 64 * MiB <= b.size < 128 * MiB)


async def test_thirty_clients_on_three_nodes_one_upstream_fetch(
    upstream: Upstream, slow_upstream: str, redis_url: str, seaweed: Any, tmp_path: Path
) -> None:
    image, blob = big_blob(upstream)
    # Two worker processes per node, as production nodes run (one per core).
    cluster = Cluster(tmp_path, slow_upstream, redis_url, seaweed, workers=2)
    await asyncio.to_thread(cluster.start)
    before = upstream.registry.blob_gets(blob.digest)
    try:
        urls = [f"{n.url}/v2/{image.repo}/blobs/{blob.digest}" for n in cluster.nodes]
        results = await asyncio.gather(*(fetch(urls[i % 3]) for i in range(30)))
        assert all(d == blob.digest and size == blob.size for _, d, size in results)
        await wait_stored(cluster, blob.digest)
        await asyncio.sleep(0.5)  # the registry logs a request just after answering it
        assert upstream.registry.blob_gets(blob.digest) - before == 1
        owners = [n for n in cluster.nodes if events(n, "shared_store_put")]
        assert len(owners) == 1, "exactly one node fetched and stored it"
        owner = owners[0]
        committed = events(owner, "blob_fill_committed")[0]["timestamp"]
        done = dt.datetime.fromisoformat(str(committed)).timestamp()
        assert max(first for first, _, _ in results) < done, "all stream before the fill ends"
        followers = [n for n in cluster.nodes if n is not owner]
        assert all(events(n, "blob_fill_committed") for n in followers)
        bucket = await cluster.bucket()
        try:
            assert await bucket.stat(blob.digest) == blob.size
            assert await object_digest(bucket, blob.digest) == blob.digest
            assert await bucket.uploads_in_progress() == []
        finally:
            await bucket.close()
        # A node restarted with an empty disk serves it from the shared store, not upstream.
        fresh = MirrorProcess(
            tmp_path / "fresh", slow_upstream, *cluster.nodes[0].args,
            log_path=tmp_path / "fresh.log",
        )  # fmt: skip
        await asyncio.to_thread(fresh.start)
        try:
            _, digest, _ = await fetch(f"{fresh.url}/v2/{image.repo}/blobs/{blob.digest}")
            assert digest == blob.digest
        finally:
            await asyncio.to_thread(fresh.stop)
        assert upstream.registry.blob_gets(blob.digest) - before == 1
    finally:
        await asyncio.to_thread(cluster.stop)


async def test_a_killed_owner_is_taken_over_and_nothing_partial_is_left(
    upstream: Upstream, slow_upstream: str, redis_url: str, seaweed: Any, tmp_path: Path
) -> None:
    image, blob = big_blob(upstream)
    cluster = Cluster(tmp_path, slow_upstream, redis_url, seaweed)
    await asyncio.to_thread(cluster.start)
    a, b, c = cluster.nodes
    before = upstream.registry.blob_gets(blob.digest)
    try:
        path = f"/v2/{image.repo}/blobs/{blob.digest}"
        doomed = asyncio.ensure_future(fetch(a.url + path))
        deadline = time.monotonic() + 10
        while await cluster.owner(blob.digest) != a.url:
            assert time.monotonic() < deadline, "node A never took the fill lease"
            await asyncio.sleep(0.05)
        progress: dict[str, int] = {}
        clients = [
            asyncio.ensure_future(fetch(f"{node.url}{path}?c={i}", progress))
            for i in range(4)
            for node in (b, c)
        ]
        while len(progress) < len(clients) or min(progress.values()) < MiB:
            assert time.monotonic() < deadline + 20, "followers got no bytes from the owner"
            await asyncio.sleep(0.05)
        assert a.proc is not None
        os.kill(a.proc.pid, signal.SIGKILL)  # mid-fill
        results = await asyncio.gather(*clients)
        with pytest.raises(aiohttp.ClientError):
            await doomed
        assert all(d == blob.digest and size == blob.size for _, d, size in results)
        assert any(events(n, "fill_taken_over") for n in (b, c))
        bucket = await cluster.bucket()
        try:
            deadline = time.monotonic() + 15
            while await bucket.stat(blob.digest) is None:
                assert time.monotonic() < deadline, "the new owner never stored the blob"
                await asyncio.sleep(0.1)
            assert await object_digest(bucket, blob.digest) == blob.digest
            assert await bucket.uploads_in_progress() == [], "the dead owner's upload remains"
        finally:
            await bucket.close()
        # The dead node's fetch and the rest of the blob: not one fetch per node.
        assert upstream.registry.blob_gets(blob.digest) - before <= 2
    finally:
        await asyncio.to_thread(cluster.stop)


async def test_a_tag_fetched_on_one_node_is_a_hit_on_the_others(
    upstream: Upstream, redis_url: str, seaweed: Any, tmp_path: Path
) -> None:
    image = upstream.images["ocismall"]
    cluster = Cluster(tmp_path, upstream.url, redis_url, seaweed)
    await asyncio.to_thread(cluster.start)
    manifest_gets = rf"/v2/{image.repo}/manifests/{image.tag}$"
    before = upstream.registry.count("GET", manifest_gets)
    try:
        async with httpx.AsyncClient() as client:
            for node in cluster.nodes:
                r = await client.get(
                    f"{node.url}/v2/{image.repo}/manifests/{image.tag}", headers=ACCEPT
                )
                assert r.status_code == 200
                assert hashlib.sha256(r.content).hexdigest() == image.digest.split(":")[1]
            # The operator page on a node lists what the cluster holds.
            page = await client.get(f"{cluster.nodes[2].url}/ui/contents")
            assert page.status_code == 200 and image.repo in page.text
    finally:
        await asyncio.to_thread(cluster.stop)
    assert upstream.registry.count("GET", manifest_gets) - before == 1
    caches = [
        [e["cache"] for e in events(n, "request") if "/manifests/" in str(e["path"])]
        for n in cluster.nodes
    ]
    assert caches == [["miss"], ["hit"], ["hit"]]


async def test_without_redis_every_node_keeps_serving(
    upstream: Upstream, redis_server: RedisServer, redis_url: str, seaweed: Any, tmp_path: Path
) -> None:
    small, team = upstream.images["small"], upstream.images["team"]
    cluster = Cluster(tmp_path, upstream.url, redis_url, seaweed)
    await asyncio.to_thread(cluster.start)
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            cached = small.layers()[0]
            for node in cluster.nodes:  # cached everywhere while Redis is up
                r = await client.get(f"{node.url}/v2/{small.repo}/blobs/{cached.digest}")
                assert hashlib.sha256(r.content).hexdigest() == cached.digest.split(":")[1]
            await asyncio.to_thread(redis_server.stop)
            try:
                for node in cluster.nodes:
                    r = await client.get(f"{node.url}/v2/{small.repo}/blobs/{cached.digest}")
                    assert r.status_code == 200
                    assert hashlib.sha256(r.content).hexdigest() == cached.digest.split(":")[1]
                    cold = team.layers()[0]
                    r = await client.get(f"{node.url}/v2/{team.repo}/blobs/{cold.digest}")
                    assert r.status_code == 200
                    assert hashlib.sha256(r.content).hexdigest() == cold.digest.split(":")[1]
                    r = await client.get(
                        f"{node.url}/v2/{team.repo}/manifests/{team.tag}", headers=ACCEPT
                    )
                    assert r.status_code == 200
                    ready = (await client.get(f"{node.url}/readyz")).json()
                    assert ready["status"] == "degraded" and ready["cluster"]["redis"] == "degraded"
            finally:
                await asyncio.to_thread(redis_server.restart)
    finally:
        await asyncio.to_thread(cluster.stop)
    for node in cluster.nodes:
        assert events(node, "cluster_service_down")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_MIRROR_")}
    return subprocess.run(
        [sys.executable, "-m", "mirror", *args],
        capture_output=True, text=True, timeout=120, check=False, env=env,
    )  # fmt: skip


async def test_ls_gc_and_verify_work_on_the_shared_store(
    upstream: Upstream, redis_url: str, seaweed: Any, tmp_path: Path
) -> None:
    small, oci, team = (upstream.images[k] for k in ("small", "ocismall", "team"))
    cluster = Cluster(tmp_path, upstream.url, redis_url, seaweed, n=2)
    await asyncio.to_thread(cluster.start)
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            for node, image in ((0, small), (1, oci), (0, team)):
                base = cluster.nodes[node].url
                r = await client.get(
                    f"{base}/v2/{image.repo}/manifests/{image.tag}", headers=ACCEPT
                )
                assert r.status_code == 200
                for blob in image.blobs:
                    r = await client.get(f"{base}/v2/{image.repo}/blobs/{blob.digest}")
                    assert hashlib.sha256(r.content).hexdigest() == blob.digest.split(":")[1]
                await asyncio.sleep(1.2)  # served times apart (and flushed to the index)
    finally:
        await asyncio.to_thread(cluster.stop)
    conf = ["--config", str(tmp_path / "node.yaml"), "--cache-dir", str(tmp_path / "node1")]

    listing = cli("ls", *conf)
    assert listing.returncode == 0, listing.stderr
    for image in (small, oci, team):  # node 1 only pulled ocismall: the rest is cluster-wide
        assert image.repo in listing.stdout

    # Pinned on node 1, whose disk never held it: the oldest image, first in line otherwise.
    assert cli("pin", *conf, small.ref).returncode == 0
    bucket = await cluster.bucket()
    try:
        sizes = dict([item async for item in bucket.iter_all()])
        total = sum(sizes.values())
        serving = max(team.blobs, key=lambda b: b.size).digest
        store = RedisStore(cluster.redis_url, cluster.prefix)
        await store.start()
        await RedisIndex(store).mark_serving(serving, "another-node", 60)
        await store.close()
        budget = ["storage.s3.max_size", str(int(total * 0.5))]
        settings = yaml.safe_load((tmp_path / "node.yaml").read_text())
        settings["storage"]["s3"]["max_size"] = budget[1]
        (tmp_path / "small-budget.yaml").write_text(yaml.safe_dump(settings))
        gc = cli(
            "gc",
            "--config",
            str(tmp_path / "small-budget.yaml"),
            "--cache-dir",
            str(tmp_path / "gc"),
        )
        assert gc.returncode == 0, gc.stderr
        assert "shared store: removed" in gc.stdout
        for blob in small.blobs:  # pinned cluster-wide: kept, though least recently served
            assert await bucket.stat(blob.digest) == blob.size
        for blob in oci.blobs:  # the next least recently served: gone
            assert await bucket.stat(blob.digest) is None
        assert await bucket.stat(serving) is not None, "an object a node is streaming was evicted"
        for blob in team.blobs:
            if blob.digest != serving:
                assert await bucket.stat(blob.digest) is None

        # verify: an object whose bytes do not match its key is found and removed.
        liar = max(oci.blobs, key=lambda b: b.size).digest
        upload = await bucket.begin_upload(liar, verify=False)  # type: ignore[arg-type]
        await upload.upload_part(b"not the blob")
        await upload.complete()
        checked = cli("verify", *conf)
        assert checked.returncode == 1
        assert f"removed {liar}" in checked.stdout
        assert await bucket.stat(liar) is None
    finally:
        await bucket.close()


async def test_presigned_redirects_send_clients_to_the_shared_store(
    upstream: Upstream, redis_url: str, seaweed: Any, tmp_path: Path
) -> None:
    image = upstream.images["team"]
    blob = max(image.blobs, key=lambda b: b.size)
    cluster = Cluster(tmp_path, upstream.url, redis_url, seaweed, n=2, presigned_redirects=True)
    await asyncio.to_thread(cluster.start)
    try:
        first, second = cluster.nodes
        async with httpx.AsyncClient(timeout=30) as client:
            url = f"/v2/{image.repo}/blobs/{blob.digest}"
            r = await client.get(first.url + url)  # not in the store yet: streamed, and stored
            assert r.status_code == 200
            assert hashlib.sha256(r.content).hexdigest() == blob.digest.split(":")[1]
            bucket = await cluster.bucket()
            try:
                deadline = time.monotonic() + 10
                while await bucket.stat(blob.digest) is None:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.1)
            finally:
                await bucket.close()
            r = await client.get(second.url + url)
            assert r.status_code == 307
            location = r.headers["Location"]
            assert location.startswith(cluster.s3_config.endpoint) and "Signature" in location
            r = await client.get(location)
            assert r.status_code == 200
            assert hashlib.sha256(r.content).hexdigest() == blob.digest.split(":")[1]
    finally:
        await asyncio.to_thread(cluster.stop)


async def test_without_the_shared_store_blobs_pass_through_uncached(
    upstream: Upstream, tmp_path: Path
) -> None:
    image = upstream.images["team"]
    blob = max(image.blobs, key=lambda b: b.size)
    config = tmp_path / "node.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "storage": {
                    "kind": "s3",
                    "s3": {"endpoint": "http://127.0.0.1:9", "access_key": "k", "secret_key": "s"},
                },
                "upstream": {"names": ["docker.io"]},
            }
        )
    )
    node = MirrorProcess(
        tmp_path / "cache", upstream.url, "--config", str(config), log_path=tmp_path / "node.log"
    )
    await asyncio.to_thread(node.start)
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            for _ in range(2):
                r = await client.get(f"{node.url}/v2/{image.repo}/blobs/{blob.digest}")
                assert r.status_code == 200
                assert hashlib.sha256(r.content).hexdigest() == blob.digest.split(":")[1]
            ready = (await client.get(f"{node.url}/readyz")).json()
            assert ready["status"] == "degraded" and ready["cluster"]["s3"] == "degraded"
    finally:
        await asyncio.to_thread(node.stop)
    served = [e["cache"] for e in events(node, "request") if blob.digest in str(e["path"])]
    assert served == ["bypass", "bypass"]
    assert not any(p.is_file() for p in (tmp_path / "cache" / "blobs").rglob("*"))
    assert events(node, "cluster_service_down")


async def test_without_a_local_tier_nodes_stream_from_the_store_and_keep_nothing(
    upstream: Upstream, redis_url: str, seaweed: Any, tmp_path: Path
) -> None:
    image = upstream.images["team"]
    blob = max(image.blobs, key=lambda b: b.size)
    cluster = Cluster(tmp_path, upstream.url, redis_url, seaweed, n=2, local_tier=False)
    await asyncio.to_thread(cluster.start)
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            for node in cluster.nodes:
                for _ in range(2):
                    r = await client.get(f"{node.url}/v2/{image.repo}/blobs/{blob.digest}")
                    assert r.status_code == 200
                    assert hashlib.sha256(r.content).hexdigest() == blob.digest.split(":")[1]
                await wait_stored(cluster, blob.digest)  # before the next node asks
        await asyncio.sleep(1.0)
    finally:
        await asyncio.to_thread(cluster.stop)
    caches = [
        [e["cache"] for e in events(n, "request") if blob.digest in str(e["path"])]
        for n in cluster.nodes
    ]
    assert caches == [["miss", "hit"], ["hit", "hit"]]
    for i in range(2):
        assert not any(p.is_file() for p in (tmp_path / f"node{i}" / "blobs").rglob("*"))


async def test_warm_fills_the_shared_store_for_every_node(
    upstream: Upstream, redis_url: str, seaweed: Any, tmp_path: Path
) -> None:
    image = upstream.images["multi"]
    cluster = Cluster(tmp_path, upstream.url, redis_url, seaweed, n=1)
    conf = ["--config", str(tmp_path / "node.yaml"), "--cache-dir", str(tmp_path / "warmer")]
    warmed = await asyncio.to_thread(cli, "warm", *conf, image.ref)
    assert warmed.returncode == 0, warmed.stderr
    bucket = await cluster.bucket()
    try:
        for blob in image.all_blobs():  # every platform's blobs, complete in the store
            assert await bucket.stat(blob.digest) == blob.size
        assert await bucket.uploads_in_progress() == []
    finally:
        await bucket.close()
    gets = {b.digest: upstream.registry.blob_gets(b.digest) for b in image.all_blobs()}
    await asyncio.to_thread(cluster.start)  # a node that never saw the image
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            base = cluster.nodes[0].url
            r = await client.get(f"{base}/v2/{image.repo}/manifests/{image.tag}", headers=ACCEPT)
            assert r.status_code == 200
            assert hashlib.sha256(r.content).hexdigest() == image.digest.split(":")[1]
            for blob in image.all_blobs():
                r = await client.get(f"{base}/v2/{image.repo}/blobs/{blob.digest}")
                assert hashlib.sha256(r.content).hexdigest() == blob.digest.split(":")[1]
    finally:
        await asyncio.to_thread(cluster.stop)
    assert {b.digest: upstream.registry.blob_gets(b.digest) for b in image.all_blobs()} == gets


async def test_ranges_on_blobs_the_shared_store_holds(
    upstream: Upstream, redis_url: str, seaweed: Any, tmp_path: Path
) -> None:
    """Every range form on a node streaming from the store (no local tier), checked against
    the blob's own bytes (which hash to its digest)."""
    image = upstream.images["team"]
    blob = max(image.blobs, key=lambda b: b.size)
    data = blob.path.read_bytes()
    assert "sha256:" + hashlib.sha256(data).hexdigest() == blob.digest
    size = len(data)
    cluster = Cluster(tmp_path, upstream.url, redis_url, seaweed, n=2, local_tier=False)
    await asyncio.to_thread(cluster.start)
    try:
        first, second = cluster.nodes
        path = f"/v2/{image.repo}/blobs/{blob.digest}"
        async with httpx.AsyncClient(timeout=30) as client:
            r = await client.get(first.url + path)
            assert r.status_code == 200 and r.content == data
            await wait_stored(cluster, blob.digest)
            url = second.url + path
            for asked, want in [
                ("bytes=10-99", (10, 99)),
                ("bytes=100-", (100, size - 1)),
                ("bytes=-64", (size - 64, size - 1)),
            ]:
                r = await client.get(url, headers={"Range": asked})
                assert r.status_code == 206, asked
                assert r.headers["Content-Range"] == f"bytes {want[0]}-{want[1]}/{size}"
                assert r.content == data[want[0] : want[1] + 1]
            r = await client.get(url, headers={"Range": f"bytes={size}-"})
            assert r.status_code == 416 and r.headers["Content-Range"] == f"bytes */{size}"
            r = await client.get(url, headers={"Range": "bytes=0-9,20-29"})
            assert r.status_code == 206
            assert r.headers["Content-Type"].startswith("multipart/byteranges")
            assert data[:10] in r.content and data[20:30] in r.content
            r = await client.head(url)
            assert r.headers["Accept-Ranges"] == "bytes"
            assert int(r.headers["Content-Length"]) == size
    finally:
        await asyncio.to_thread(cluster.stop)
    served = [e for e in events(second, "request") if blob.digest in str(e["path"])]
    assert served and all(e["cache"] == "hit" for e in served if e["method"] == "GET")
