"""The operator page's actions after real pulls: pin, unpin, evict, warm, who may do them, CSRF.

The principal is set by a test middleware standing in for the client-auth layer, so these test
the page's own rules (admins only, CSRF, the access policy) apart from how clients log in; the
browser test (test_ui.py) goes through the real client auth.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from mirror.access import Policy, Principal, Rule
from mirror.cache.fill import UpstreamBody
from mirror.cache.redis_store import RedisIndex, RedisStore
from mirror.reference import Digest
from mirror.web.app import make_app
from mirror.web.keys import MIRROR, NODE, PRINCIPAL
from tests.fixtures.mirror_server import (
    fills_settled,
    mirror_config,
    running_app,
    sha256_digest,
)
from tests.fixtures.real_upstream import Upstream
from tests.integration.test_cache_policy import cached, pull

PRINCIPALS = {
    "root": Principal("root", admin=True, via="basic"),
    "viewer": Principal("viewer", via="basic"),
}


@web.middleware
async def as_principal(request: web.Request, handler) -> web.StreamResponse:  # type: ignore[no-untyped-def]
    user = request.headers.get("X-Test-User")
    if user in PRINCIPALS:
        request[PRINCIPAL] = PRINCIPALS[user]
    return await handler(request)


@asynccontextmanager
async def mirror_with_principals(
    upstream: Upstream, cache: Path, settings: dict[str, object] | None = None
) -> AsyncIterator[tuple[str, web.Application]]:
    """The mirror on loopback, its clients' principal named by an `X-Test-User` header."""
    app = make_app(mirror_config(cache, upstream.url, settings=settings))
    app.middlewares.append(as_principal)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/"), app
    finally:
        await server.close()


class Client:
    """A browser-like client: keeps the CSRF cookie, posts the form's token back."""

    def __init__(self, session: aiohttp.ClientSession, base: str, user: str | None) -> None:
        self.s, self.base = session, base
        self.headers = {"X-Test-User": user} if user else {}

    async def page(self, path: str) -> tuple[int, str]:
        async with self.s.get(self.base + path, headers=self.headers) as r:
            return r.status, await r.text()

    async def token(self) -> str:
        _, html = await self.page("/ui/contents")
        match = re.search(r'name="csrf" value="([^"]+)"', html)
        if match:
            return match[1]
        cookies = self.s.cookie_jar.filter_cookies(URL(self.base + "/ui/"))
        return cookies["registry_mirror_csrf"].value  # no form shown: the session's own token

    async def post(
        self, action: str, csrf: str | None, origin: str | None = None, **fields: str
    ) -> tuple[int, str, str]:
        data = dict(fields)
        if csrf is not None:
            data["csrf"] = csrf
        headers = {**self.headers, "Origin": origin or self.base, "Sec-Fetch-Site": "same-origin"}
        async with self.s.post(
            f"{self.base}/ui/actions/{action}", data=data, headers=headers, allow_redirects=False
        ) as r:
            return r.status, r.headers.get("Location", ""), await r.text()


async def test_admin_actions_csrf_and_policy(upstream: Upstream, tmp_path: Path) -> None:
    small, multi, team = (upstream.images[k] for k in ("small", "multi", "team"))
    cache = tmp_path / "cache"
    async with mirror_with_principals(upstream, cache) as (base, app):
        async with aiohttp.ClientSession() as raw:
            for image in (small, multi, team):
                await pull(raw, base, image)
        await fills_settled(app)  # committed: a client has its bytes before the rename
        mirror = app[MIRROR]
        async with (
            aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s_admin,
            aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s_viewer,
            aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s_anon,
        ):
            admin = Client(s_admin, base, "root")
            viewer = Client(s_viewer, base, "viewer")
            anon = Client(s_anon, base, None)
            status, html = await anon.page("/ui/contents")
            assert status == 200
            for image in (small, multi, team):
                assert f'data-repository="{image.repo}"' in html
            assert "actions/" not in html  # no buttons, no warm form
            assert "sign in" not in html and (await anon.page("/ui/login"))[0] == 404  # no auth
            _, html = await anon.page("/ui/?msg=Call+0800+now&sig=0")
            assert "0800" not in html  # messages in URLs are shown only when the page signed them
            repo_page = f"/ui/repository?u=default&r={small.repo}"
            assert "actions/pin" not in (await viewer.page(repo_page))[1]
            assert "actions/pin" in (await admin.page(repo_page))[1]

            form = {"u": "default", "r": small.repo, "t": small.tag}
            # Not an admin: refused whatever the token.
            status, _, _ = await viewer.post("pin", await viewer.token(), **form)
            assert status == 403
            status, _, _ = await anon.post("pin", await anon.token(), **form)
            assert status == 403
            # An admin without the token, or with another session's token: refused.
            status, _, body = await admin.post("pin", None, **form)
            assert status == 403 and "CSRF" in body
            status, _, _ = await admin.post("pin", await viewer.token(), **form)
            assert status == 403
            token = await admin.token()
            status, _, body = await admin.post("pin", token, "http://evil.example", **form)
            assert status == 403 and "origin" in body
            assert mirror.index.pins() == set()

            status, location, _ = await admin.post("pin", token, **form)
            assert status == 303 and location.startswith("/ui/repository?")
            assert mirror.index.pins() == {small.ref}
            assert small.digest in await app[NODE].policy.pinned()
            _, html = await admin.page(repo_page)
            assert re.search(rf'data-tag="{small.tag}" data-pinned="true"', html)
            assert "actions/unpin" in html

            # A pinned image is not evicted; unpinned, it is, and only its own files go.
            status, location, _ = await admin.post("evict", token, **form)
            assert "pinned" in location and cached(cache, small)
            status, _, _ = await admin.post("unpin", token, **form)
            assert status == 303 and mirror.index.pins() == set()
            status, location, _ = await admin.post("evict", token, **form)
            assert status == 303 and "evicted" in location
            assert not cached(cache, small)
            assert cached(cache, multi) and cached(cache, team)
            assert await mirror.metadata.get_tag(("default", small.repo, small.tag)) is None
            _, html = await anon.page("/ui/contents")
            assert f'data-repository="{small.repo}"' not in html
            async with aiohttp.ClientSession() as raw:  # pulled again: fetched again, intact
                await pull(raw, base, small)
            await fills_settled(app)  # committed: a client has its bytes before the rename
            assert cached(cache, small)

            # Warm: fetched in the background, every blob verified into the cache.
            oci = upstream.images["ocismall"]
            status, location, _ = await admin.post("warm", token, image=oci.ref)
            assert status == 303 and "warming" in location
            for _ in range(100):
                if cached(cache, oci):
                    break
                await asyncio.sleep(0.1)
            assert cached(cache, oci)
            for blob in oci.all_blobs():
                path = cache / "blobs" / "sha256" / blob.digest[7:9] / blob.digest[7:]
                assert sha256_digest(path.read_bytes()) == blob.digest

            # Repositories the viewer may not pull are never shown nor acted on.
            mirror.policy = Policy([Rule(("viewer",), ("default/org/*",), allow=False)])
            _, html = await viewer.page("/ui/contents")
            assert team.repo not in html and multi.repo in html
            status, _ = await viewer.page(f"/ui/image?u=default&r={team.repo}&t={team.tag}")
            assert status == 404
            status, html = await admin.page(f"/ui/image?u=default&r={team.repo}&t={team.tag}")
            assert status == 200 and team.digest in html


async def test_overview_shows_fills_backoff_and_pull_budget(tmp_path: Path) -> None:
    """What the overview says while a blob streams in and the upstream is backing off."""
    gate = asyncio.Event()
    digest = Digest("sha256:" + "ab" * 32)

    async def body() -> AsyncIterator[bytes]:
        yield b"x" * 3000
        await gate.wait()

    async def nothing() -> None:
        return None

    async def open_body(_offset: int) -> UpstreamBody:
        return UpstreamBody(10_000, body(), nothing)

    async with (
        running_app(mirror_config(tmp_path, "http://127.0.0.1:9")) as (base, app),
        aiohttp.ClientSession() as s,
    ):
        mirror = app[MIRROR]
        fill, started = mirror.fills.join(digest, open_body)
        assert started
        await fill.wait_started()
        for _ in range(500):  # the first bytes reach the temp file
            if fill.written >= 3000:
                break
            await asyncio.sleep(0.01)
        upstream = mirror.router.upstreams["default"]
        upstream.backoff_until = time.monotonic() + 120
        upstream.last_failure = "HTTP 503"
        mirror.metrics.ratelimit_remaining.labels("default").set(42)
        async with s.get(f"{base}/ui/") as r:
            html = await r.text()
        gate.set()
    assert 'id="fill-count">1<' in html
    assert f'title="{digest}"' in html and '<progress max="10000" value="3000">' in html
    row = re.search(r'<tr data-upstream="default">(.*?)</tr>', html, re.S)
    assert row is not None
    assert "backing off" in row[1] and "HTTP 503" in row[1] and ">42<" in row[1]
    assert re.search(r"1[12][0-9] s left", row[1])


async def test_the_pages_pin_is_cluster_wide_like_the_cli(
    upstream: Upstream, redis_url: str, seaweed: Any, tmp_path: Path
) -> None:
    """On a cluster's node the page pins where `registry-mirror pin` does: for every node."""
    prefix = f"t{secrets.token_hex(4)}/"
    s3 = seaweed.s3_config(prefix)
    settings = {
        "storage.kind": "s3",
        "storage.s3": {
            "endpoint": s3.endpoint, "bucket": s3.bucket, "prefix": prefix,
            "access_key": s3.access_key, "secret_key": s3.secret_key,
        },
        "metadata": {"kind": "redis", "redis_url": redis_url, "key_prefix": prefix},
        "cluster.secret": "test-cluster-secret",
    }  # fmt: skip
    small = upstream.images["small"]
    async with mirror_with_principals(upstream, tmp_path / "cache", settings) as (base, app):
        async with aiohttp.ClientSession() as raw:
            await pull(raw, base, small)
        await fills_settled(app)
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
            admin = Client(s, base, "root")
            form = {"u": "default", "r": small.repo, "t": small.tag}
            token = await admin.token()
            status, _, _ = await admin.post("pin", token, **form)
            assert status == 303
            shared = RedisStore(redis_url, prefix)
            await shared.start()
            try:
                index = RedisIndex(shared)
                assert await index.pins() == {small.ref}  # what every node's gc spares
                # Unpinned and evicted from the page: its tag (in Redis) and the shared
                # store's copies go too, so no node serves it as cached.
                assert (await admin.post("unpin", token, **form))[0] == 303
                assert await index.pins() == set()
                status, location, _ = await admin.post("evict", token, **form)
                assert status == 303 and "evicted" in location, location
                layer = small.layers()[-1].digest
                assert await index.get(layer) is None
                assert (
                    await app[MIRROR].metadata.get_tag(("default", small.repo, small.tag)) is None
                )
            finally:
                await shared.close()
