"""Hosted repositories in a cluster: three nodes on a real redis-server and SeaweedFS (S3). A
push through one node is visible from every node at once; one upload's chunks arrive at
different nodes (as behind a load balancer) and are committed by a third."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.fixtures.hosted_push import OCI_MANIFEST, digest_of, make_image
from tests.fixtures.mirror_server import MirrorProcess
from tests.fixtures.redis_server import RedisServer

NOWHERE = "http://127.0.0.1:9"


@pytest.fixture
def nodes(tmp_path: Path, redis_url: str, seaweed: Any) -> Iterator[list[MirrorProcess]]:
    prefix = f"h{secrets.token_hex(4)}/"
    s3 = seaweed.s3_config(prefix)
    settings = {
        "upstream": {"url": NOWHERE, "retries": 0},
        "storage": {
            "kind": "s3",
            "s3": {
                "endpoint": s3.endpoint,
                "bucket": s3.bucket,
                "prefix": prefix,
                "access_key": s3.access_key,
                "secret_key": s3.secret_key,
                "part_size": "5MiB",
            },
        },
        "metadata": {"kind": "redis", "redis_url": redis_url, "key_prefix": prefix},
        "cluster": {"secret": "test-cluster-secret"},
        "hosted": {"repositories": ["internal/*"]},
        "access": {
            "rules": [
                {"who": ["*"], "repositories": ["hosted/*"], "actions": ["pull", "push", "delete"]}
            ]
        },
    }
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump(settings))
    procs = [
        MirrorProcess(
            tmp_path / f"node{i}",
            NOWHERE,
            "--config",
            str(config),
            log_path=tmp_path / f"node{i}.log",
        )
        for i in range(3)
    ]
    for proc in procs:
        proc.start()
    try:
        yield procs
    finally:
        for proc in procs:
            proc.stop()


def test_a_push_through_one_node_is_served_by_every_node(nodes: list[MirrorProcess]) -> None:
    a, b, c = (n.url for n in nodes)
    big = bytes(range(256)) * (6 * 1024 * 4)  # 6 MiB: more than one part of the shared store
    image = make_image("cluster", big, b"small layer" * 10)
    name = "internal/app"
    with httpx.Client(timeout=60) as s:
        for data in (image.config, image.layers[1]):
            params = {"digest": digest_of(data)}
            r = s.post(f"{a}/v2/{name}/blobs/uploads/", params=params, content=data)
            assert r.status_code == 201, r.text
        # One upload, its chunks to three different nodes, committed by a fourth request.
        r = s.post(f"{a}/v2/{name}/blobs/uploads/")
        location = r.headers["Location"]
        third = len(big) // 3
        for node, start, stop in ((a, 0, third), (b, third, 2 * third), (c, 2 * third, len(big))):
            headers = {"Content-Range": f"{start}-{stop - 1}"}
            r = s.patch(node + location, content=big[start:stop], headers=headers)
            assert r.status_code == 202, r.text
            assert r.headers["Range"] == f"0-{stop - 1}"
        r = s.get(a + location)
        assert (r.status_code, r.headers["Range"]) == (204, f"0-{len(big) - 1}")
        r = s.patch(b + location, content=b"x", headers={"Content-Range": "5-5"})
        assert r.status_code == 416  # out of order, wherever it lands
        r = s.put(b + location, params={"digest": digest_of(big)})
        assert r.status_code == 201, r.text
        headers = {"Content-Type": OCI_MANIFEST}
        r = s.put(f"{c}/v2/{name}/manifests/v1", content=image.manifest, headers=headers)
        assert r.status_code == 201, r.text
        # Visible from every node at once, every blob checked against its digest.
        for node in (a, b, c):
            r = s.get(f"{node}/v2/{name}/manifests/v1", headers={"Accept": OCI_MANIFEST})
            assert r.status_code == 200
            assert digest_of(r.content) == image.digest
            for digest in image.blobs:
                r = s.get(f"{node}/v2/{name}/blobs/{digest}")
                assert r.status_code == 200
                assert digest_of(r.content) == digest
            assert s.get(f"{node}/v2/{name}/tags/list").json()["tags"] == ["v1"]
            assert s.get(f"{node}/v2/_catalog").json() == {"repositories": [name]}
        r = s.delete(f"{b}/v2/{name}/manifests/v1")
        assert r.status_code == 202
        for node in (a, c):
            assert s.get(f"{node}/v2/{name}/manifests/v1").status_code == 404
    committed = [
        e for n in nodes for e in n.log_events() if e.get("event") == "hosted_blob_committed"
    ]
    # The mirror's own log: the chunked upload was committed once, by the node that got its PUT.
    assert [e["digest"] for e in committed].count(digest_of(big)) == 1


def test_without_redis_a_push_is_refused_cleanly_and_works_again_after(
    nodes: list[MirrorProcess], redis_server: RedisServer
) -> None:
    """Redis hung: a push gets 503 UNAVAILABLE (not a 500) within a bounded time, changes
    nothing, and the same push succeeds once Redis answers again."""
    url = f"{nodes[0].url}/v2/internal/app/blobs/uploads/"
    data = b"pushed while redis was away"
    with httpx.Client(timeout=60) as s:
        redis_server.pause()
        try:
            started = time.monotonic()
            r = s.post(url, params={"digest": digest_of(data)}, content=data)
            assert time.monotonic() - started < 20
        finally:
            redis_server.resume()
        assert r.status_code == 503, r.text
        assert r.json()["errors"][0]["code"] == "UNAVAILABLE"
        assert s.head(f"{nodes[1].url}/v2/internal/app/blobs/{digest_of(data)}").status_code == 404
        r = s.post(url, params={"digest": digest_of(data)}, content=data)
        assert r.status_code == 201, r.text
        got = s.get(f"{nodes[2].url}/v2/internal/app/blobs/{digest_of(data)}")
        assert got.status_code == 200 and digest_of(got.content) == digest_of(data)
