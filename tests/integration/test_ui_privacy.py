"""The operator page shows a viewer only what that viewer may pull.

A private upstream repository (`private/secret`, readable only with the mirror's upstream
credentials) is warmed by the admin alice while one of its layers is still streaming in:
anonymous viewers must see neither the repository's name nor the layer's digest; alice does.
The upstream is the in-process fake (it can hold a fill open), the mirror a real server.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from mirror.web.keys import MIRROR
from tests.fixtures.fake_upstream import FakeUpstream, Fault
from tests.fixtures.htpasswd import basic, write_htpasswd
from tests.fixtures.mirror_server import mirror_config, running_app, sha256_digest

UPSTREAM_CREDS = ("mirror", "upstream-secret")
USERS = {"alice": "alice-pw", "bob": "bob-pw"}
ACCEPT = {"Accept": "application/vnd.oci.image.manifest.v1+json"}


@pytest.fixture
async def private_upstream() -> AsyncIterator[FakeUpstream]:
    """An upstream that serves nothing without the mirror's credentials."""
    fake = FakeUpstream(basic_auth=UPSTREAM_CREDS)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


async def _page(s: aiohttp.ClientSession, base: str, headers: dict[str, str]) -> str:
    async with s.get(f"{base}/ui/", headers=headers) as r:
        assert r.status == 200
        return await r.text()


async def _warm_as(s: aiohttp.ClientSession, base: str, who: str, image: str) -> None:
    """The page's own warm form, as a browser posts it (CSRF cookie echoed, same origin)."""
    headers = basic(who, USERS[who])
    await _page(s, base, headers)  # sets the CSRF cookie
    token = next(c.value for c in s.cookie_jar if c.key == "registry_mirror_csrf")
    async with s.post(
        f"{base}/ui/actions/warm",
        data={"csrf": token, "image": image},
        headers={**headers, "Origin": base},
        allow_redirects=False,
    ) as r:
        assert r.status == 303, await r.text()


async def test_private_warms_and_fills_are_hidden_from_viewers_who_may_not_pull(
    private_upstream: FakeUpstream, tmp_path: Path
) -> None:
    fake = private_upstream
    slow_layer = os.urandom(1024 * 1024)
    manifest_digest, _, (small_digest, slow_digest) = fake.add_image(
        "private/secret", "1", [os.urandom(4096), slow_layer]
    )
    fake.faults[slow_digest] = Fault(delay_per_chunk=0.25)  # 16 chunks: ~4 s in flight
    settings = {
        "auth.htpasswd": str(write_htpasswd(tmp_path / "htpasswd", USERS)),
        "auth.admins": ["alice"],
        "access.rules": [
            {"who": ["anonymous"], "repositories": ["default/private/*"], "action": "deny"}
        ],
    }
    cache = tmp_path / "cache"
    cache.mkdir()
    config = mirror_config(
        cache, fake.url, settings=settings, username=UPSTREAM_CREDS[0], password=UPSTREAM_CREDS[1]
    )
    async with (
        running_app(config) as (base, app),
        aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as alice_s,
        aiohttp.ClientSession() as anon_s,
    ):
        # alice pulls the manifest (the mirror learns where its layers come from) ...
        url = f"{base}/v2/private/secret/manifests/1"
        async with alice_s.get(url, headers={**ACCEPT, **basic("alice", "alice-pw")}) as r:
            assert r.status == 200 and sha256_digest(await r.read()) == manifest_digest
        # ... and warms the image from the page: its slow layer stays in flight a while.
        await _warm_as(alice_s, base, "alice", "private/secret:1")
        deadline = time.monotonic() + 5
        while slow_digest not in {f.digest for f in app[MIRROR].fills.in_flight()}:
            assert time.monotonic() < deadline, "the warm did not start the slow fill"
            await asyncio.sleep(0.02)

        anonymous = await _page(anon_s, base, {})
        bob = await _page(anon_s, base, basic("bob", USERS["bob"]))  # no rule for bob: may pull
        admin = await _page(alice_s, base, basic("alice", USERS["alice"]))
        assert slow_digest in {f.digest for f in app[MIRROR].fills.in_flight()}

    hidden = ("private/secret", slow_digest, slow_digest.split(":")[1][:12])
    assert [leak for leak in hidden if leak in anonymous] == []
    assert 'id="hidden-fills"' in anonymous  # that something is streaming is not a secret
    for shown in ("private/secret:1", "by alice", slow_digest):
        assert shown in admin, shown
        assert shown in bob, shown
    assert small_digest not in anonymous
