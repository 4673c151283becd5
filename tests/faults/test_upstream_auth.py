"""Upstream auth beyond the happy path: Basic challenges, tokens revoked mid-pull."""

from __future__ import annotations

import os
from pathlib import Path

import aiohttp

from tests.fixtures.fake_upstream import FakeUpstream
from tests.fixtures.htpasswd import basic, write_htpasswd
from tests.fixtures.mirror_server import mirror_config, running_mirror, sha256_digest


async def test_basic_challenge_uses_configured_credentials(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    fake.basic_auth = ("bob", "hunter2")
    digest = fake.add_blob(os.urandom(1000))
    # Nothing there is readable without credentials, so the mirror's clients must log in too.
    users = write_htpasswd(tmp_path / "htpasswd", {"alice": "alice-pw"})
    config = mirror_config(
        tmp_path, fake.url, username="bob", password="hunter2", settings={"auth.htpasswd": users}
    )
    url = f"/v2/lib/app/blobs/{digest}"
    async with running_mirror(config) as base, aiohttp.ClientSession() as s:
        async with s.get(base + url) as resp:
            assert resp.status == 401  # anonymous: private content is never theirs
        async with s.get(base + url, headers=basic("alice", "alice-pw")) as resp:
            assert resp.status == 200
            assert sha256_digest(await resp.read()) == digest
    assert fake.token_requests == 0


async def test_basic_challenge_without_credentials_is_denied(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    fake.basic_auth = ("bob", "hunter2")
    digest = fake.add_blob(os.urandom(1000))
    async with (
        running_mirror(mirror_config(tmp_path, fake.url)) as base,
        aiohttp.ClientSession() as s,
        s.get(f"{base}/v2/lib/app/blobs/{digest}") as resp,
    ):
        assert resp.status == 403
        assert (await resp.json())["errors"][0]["code"] == "DENIED"


async def test_token_revoked_mid_pull_is_fetched_again(fake: FakeUpstream, tmp_path: Path) -> None:
    first = fake.add_blob(os.urandom(1000))
    second = fake.add_blob(os.urandom(2000))
    async with (
        running_mirror(mirror_config(tmp_path, fake.url)) as base,
        aiohttp.ClientSession() as s,
    ):
        async with s.get(f"{base}/v2/lib/app/blobs/{first}") as resp:
            assert sha256_digest(await resp.read()) == first
        assert fake.token_requests == 1
        fake.token_version += 1  # the cached token is no longer accepted
        async with s.get(f"{base}/v2/lib/app/blobs/{second}") as resp:
            assert resp.status == 200
            assert sha256_digest(await resp.read()) == second
        assert fake.token_requests == 2
