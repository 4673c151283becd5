"""Bad input gets an OCI error, reaches no upstream, and changes nothing in the cache."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from tests.fixtures.fake_upstream import FakeUpstream
from tests.fixtures.htpasswd import basic, write_htpasswd
from tests.fixtures.mirror_server import (
    cached_files,
    free_port,
    mirror_config,
    running_mirror,
)

GOOD = "sha256:" + "a" * 64


async def raw_request(
    base: str, method: str, target: str, headers: str = ""
) -> tuple[int, dict[str, object]]:
    """Send the request target byte for byte (no client-side normalisation of dots or %);
    `headers`: more header lines, each ending in CRLF."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            f"{method} {target} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n"
            f"{headers}Connection: close\r\n\r\n".encode()
        )
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body and method != "HEAD" else {}


CASES = [
    ("GET", "/v2/../../etc/passwd/blobs/" + GOOD, 400, "NAME_INVALID"),
    ("GET", "/v2/library/../secret/manifests/latest", 400, "NAME_INVALID"),
    ("GET", "/v2/%2e%2e/%2e%2e/etc/blobs/" + GOOD, 400, "NAME_INVALID"),
    ("GET", "/v2/library%2F..%2Fsecret/manifests/latest", 400, "NAME_INVALID"),
    ("GET", "/v2/library/alpine%2f..%2f..%2fx/manifests/latest", 400, "NAME_INVALID"),
    ("GET", "/v2/Library/Alpine/manifests/latest", 400, "NAME_INVALID"),
    ("GET", "/v2/library//alpine/manifests/latest", 400, "NAME_INVALID"),
    ("GET", "/v2/" + "a" * 300 + "/manifests/latest", 400, "NAME_INVALID"),
    ("GET", "/v2/library/alpine/manifests/-bad", 400, "TAG_INVALID"),
    ("GET", "/v2/library/alpine/manifests/" + "t" * 129, 400, "TAG_INVALID"),
    ("GET", "/v2/library/alpine/blobs/sha256:xyz", 400, "DIGEST_INVALID"),
    ("GET", "/v2/library/alpine/blobs/sha256:" + "A" * 64, 400, "DIGEST_INVALID"),
    ("GET", "/v2/library/alpine/blobs/sha256:%2e%2e", 400, "DIGEST_INVALID"),
    ("GET", "/v2/library/alpine/blobs/sha512:" + "a" * 128, 400, "DIGEST_INVALID"),
    ("GET", "/v2/library/alpine/blobs/latest", 400, "DIGEST_INVALID"),
    ("GET", "/v2/library/alpine/tags/list?n=-1", 400, "PAGINATION_NUMBER_INVALID"),
    ("GET", "/v2/library/alpine/tags/list?n=abc", 400, "PAGINATION_NUMBER_INVALID"),
    # `str.isdigit()` takes a superscript two, which `int()` refuses: once a 500.
    ("GET", "/v2/library/alpine/tags/list?n=%C2%B2", 400, "PAGINATION_NUMBER_INVALID"),
    ("GET", "/v2/library/alpine/tags/list?n=%D9%A3", 400, "PAGINATION_NUMBER_INVALID"),
    ("GET", "/v2/library/alpine/tags/list?n=%201", 400, "PAGINATION_NUMBER_INVALID"),
    ("GET", "/v2/library/alpine/tags/list?n=1&last=%C2%B2", 400, "TAG_INVALID"),
    # Writes to a mirrored name: refused, naming the setting that would host it (issue 18).
    ("PUT", "/v2/library/alpine/manifests/latest", 403, "DENIED"),
    ("DELETE", "/v2/library/alpine/manifests/" + GOOD, 403, "DENIED"),
    ("DELETE", "/v2/library/alpine/blobs/" + GOOD, 403, "DENIED"),
    ("POST", "/v2/library/alpine/blobs/uploads/", 403, "DENIED"),
    ("PATCH", "/v2/library/alpine/blobs/uploads/abc", 403, "DENIED"),
    ("PUT", "/v2/library/alpine/blobs/uploads/abc?digest=" + GOOD, 403, "DENIED"),
    ("PUT", "/v2/library/alpine", 405, "UNSUPPORTED"),
    ("GET", "/v2/library/alpine/blobs/uploads/abc", 405, "UNSUPPORTED"),
    ("GET", "/v2/_catalog", 405, "UNSUPPORTED"),
    ("GET", "/admin", 405, "UNSUPPORTED"),
]


@pytest.mark.parametrize(("method", "target", "status", "code"), CASES)
async def test_bad_requests_get_oci_errors_and_change_nothing(
    fake: FakeUpstream, tmp_path: Path, method: str, target: str, status: int, code: str
) -> None:
    async with running_mirror(mirror_config(tmp_path, fake.url)) as base:
        before = cached_files(tmp_path)
        got_status, body = await raw_request(base, method, target)
        assert (got_status, body["errors"][0]["code"]) == (status, code)  # type: ignore[index]
        assert cached_files(tmp_path) == before
    assert sum(fake.requests.values()) == 0, "bad input must not reach the upstream"


async def test_base_endpoint_and_api_version_header(fake: FakeUpstream, tmp_path: Path) -> None:
    async with (
        running_mirror(mirror_config(tmp_path, fake.url)) as base,
        aiohttp.ClientSession() as s,
    ):
        async with s.get(f"{base}/v2/") as resp:
            assert resp.status == 200
            assert resp.headers["Docker-Distribution-API-Version"] == "registry/2.0"
        async with s.put(f"{base}/v2/library/x/manifests/latest", data=b"{}") as resp:
            assert resp.status == 403
            assert resp.headers["Docker-Distribution-API-Version"] == "registry/2.0"
            assert resp.headers["Content-Type"].startswith("application/json")
            assert "hosted.repositories" in (await resp.json())["errors"][0]["message"]


async def test_ns_for_another_registry_is_refused(fake: FakeUpstream, tmp_path: Path) -> None:
    """containerd says which registry a request is for: never answer with another's content."""
    fake.add_image("lib/app", "v1", [b"layer"])
    host = fake.url.removeprefix("http://")
    async with (
        running_mirror(mirror_config(tmp_path, fake.url)) as base,
        aiohttp.ClientSession() as s,
    ):
        async with s.get(f"{base}/v2/lib/app/manifests/v1?ns={host}") as r:
            assert r.status == 200
        async with s.get(f"{base}/v2/lib/app/manifests/v1?ns=ghcr.io") as r:
            assert r.status == 404
            assert (await r.json())["errors"][0]["code"] == "NAME_UNKNOWN"
    assert fake.count("GET", "/manifests/v1") == 1


@pytest.mark.parametrize("offset", ["%C2%B2", "-1", "1e3", "%EF%BC%91"])
async def test_cluster_offset_must_be_ascii_digits(
    fake: FakeUpstream, tmp_path: Path, redis_url: str, offset: str
) -> None:
    """The internal endpoint, called with the right secret, refuses a bad offset with an OCI
    error (a `²` once passed `isdigit()` and made `int()` raise: a 500)."""
    settings = {
        "metadata.kind": "redis",
        "metadata.redis_url": redis_url,
        "metadata.key_prefix": f"bad-input-{free_port()}:",
        "cluster.secret": "test-secret",
    }
    async with running_mirror(mirror_config(tmp_path, fake.url, settings=settings)) as base:
        status, body = await raw_request(
            base, "GET", f"/_cluster/blobs/{GOOD}?offset={offset}",
            "X-Registry-Mirror-Cluster: test-secret\r\n",
        )  # fmt: skip
    assert 400 <= status < 500, body
    errors = body["errors"]
    assert isinstance(errors, list) and errors[0]["code"] == "RANGE_INVALID"


USERS = {"alice": "alice-pw"}


async def test_ops_endpoints_want_a_login_when_anonymous_is_off(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """`auth.anonymous: false`: `/metrics` and `/readyz` (upstream URLs, failures) need a
    login; `/healthz` stays open and says nothing; `/metrics` on `metrics.listen` stays open."""
    users = write_htpasswd(tmp_path / "htpasswd", USERS)
    settings = {"auth.htpasswd": str(users), "auth.anonymous": False}
    for cache in ("a", "b"):
        (tmp_path / cache).mkdir()
    async with (
        running_mirror(mirror_config(tmp_path / "a", fake.url, settings=settings)) as base,
        aiohttp.ClientSession() as s,
    ):
        for path in ("/metrics", "/readyz"):
            async with s.get(base + path) as r:
                text = await r.text()
                assert r.status == 401, (path, text[:200])
                assert json.loads(text)["errors"][0]["code"] == "UNAUTHORIZED"
                assert fake.url not in text and "registry_mirror" not in text
            async with s.get(base + path, headers=basic("alice", "wrong")) as r:
                assert r.status == 401
            async with s.get(base + path, headers=basic("alice", USERS["alice"])) as r:
                assert r.status == 200, path
        async with s.get(f"{base}/readyz", headers=basic("alice", USERS["alice"])) as r:
            assert (await r.json())["upstreams"]["default"]["url"] == fake.url
        async with s.get(f"{base}/healthz") as r:
            assert r.status == 200 and await r.json() == {"status": "ok"}

    port = free_port()
    settings |= {"metrics.listen": f"127.0.0.1:{port}"}
    async with (
        running_mirror(mirror_config(tmp_path / "b", fake.url, settings=settings)) as base,
        aiohttp.ClientSession() as s,
    ):
        async with s.get(f"http://127.0.0.1:{port}/metrics") as r:
            assert r.status == 200 and "registry_mirror_" in await r.text()
        async with s.get(f"{base}/readyz") as r:
            assert r.status == 401


async def test_ops_endpoints_stay_open_when_anonymous_is_on(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    users = write_htpasswd(tmp_path / "htpasswd", USERS)
    config = mirror_config(tmp_path, fake.url, settings={"auth.htpasswd": str(users)})
    async with running_mirror(config) as base, aiohttp.ClientSession() as s:
        for path in ("/metrics", "/readyz", "/healthz"):
            async with s.get(base + path) as r:
                assert r.status == 200, path
