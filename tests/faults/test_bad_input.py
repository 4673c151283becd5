"""Bad input gets an OCI error, reaches no upstream, and changes nothing in the cache."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from tests.fixtures.fake_upstream import FakeUpstream
from tests.fixtures.mirror_server import cached_files, mirror_config, running_mirror

GOOD = "sha256:" + "a" * 64


async def raw_request(base: str, method: str, target: str) -> tuple[int, dict[str, object]]:
    """Send the request target byte for byte (no client-side normalisation of dots or %)."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            f"{method} {target} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n"
            "Connection: close\r\n\r\n".encode()
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
    ("PUT", "/v2/library/alpine/manifests/latest", 405, "UNSUPPORTED"),
    ("DELETE", "/v2/library/alpine/manifests/" + GOOD, 405, "UNSUPPORTED"),
    ("DELETE", "/v2/library/alpine/blobs/" + GOOD, 405, "UNSUPPORTED"),
    ("POST", "/v2/library/alpine/blobs/uploads/", 405, "UNSUPPORTED"),
    ("PATCH", "/v2/library/alpine/blobs/uploads/abc", 405, "UNSUPPORTED"),
    ("PUT", "/v2/library/alpine/blobs/uploads/abc?digest=" + GOOD, 405, "UNSUPPORTED"),
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
            assert resp.status == 405
            assert resp.headers["Docker-Distribution-API-Version"] == "registry/2.0"
            assert resp.headers["Content-Type"].startswith("application/json")


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
