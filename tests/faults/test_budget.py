"""Issue 22: the upstream's pull budget. A fake upstream that counts manifest GETs against a
budget and answers with Docker Hub's rate-limit headers; the mirror must spend as little of it
as it can, keep serving what it has when it runs out, and answer 429 (never 404) when not."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp

from mirror.upstream.auth import basic_authorization
from mirror.web.keys import MIRROR
from tests.fixtures.clock import Clock
from tests.fixtures.fake_upstream import FakeUpstream, Fault
from tests.fixtures.mirror_server import (
    MirrorProcess,
    mirror_config,
    running_app,
    sha256_digest,
    wait_for_workers,
)

# What dockerd sends (each type a header of its own): every manifest type.
ACCEPT = [
    ("Accept", "application/vnd.docker.distribution.manifest.v2+json"),
    ("Accept", "application/vnd.docker.distribution.manifest.list.v2+json"),
    ("Accept", "application/vnd.oci.image.index.v1+json"),
    ("Accept", "application/vnd.oci.image.manifest.v1+json"),
]


def images(fake: FakeUpstream, count: int, size: int = 3000) -> list[tuple[str, str, list[str]]]:
    """`count` images app<i>:v1, each a config and one layer: (tag, manifest, [blobs])."""
    made = []
    for i in range(count):
        mdigest, config, layers = fake.add_image(f"lib/app{i}", "v1", [bytes([i]) * size])
        made.append((f"lib/app{i}", mdigest, [config, *layers]))
    return made


async def pull(s: aiohttp.ClientSession, base: str, repo: str, blobs: list[str]) -> str:
    """A whole image, as a client pulls it; every blob checked against its digest."""
    async with s.get(f"{base}/v2/{repo}/manifests/v1", headers=ACCEPT) as r:
        assert r.status == 200, await r.text()
        body = await r.read()
    for digest in blobs:
        async with s.get(f"{base}/v2/{repo}/blobs/{digest}") as r:
            assert r.status == 200 and sha256_digest(await r.read()) == digest
    return sha256_digest(body)


async def test_twenty_clients_two_workers_two_ttl_periods_spend_one_get_per_tag(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    fake.pull_budget = 10
    made = images(fake, 3)
    mirror = MirrorProcess(
        tmp_path / "cache", fake.url, "--tag-ttl", "1s", log_path=tmp_path / "mirror.log",
        env={"REGISTRY_MIRROR_WORKERS": "2"},
    )  # fmt: skip
    await asyncio.to_thread(mirror.start)
    try:
        pids = await asyncio.to_thread(wait_for_workers, mirror, 2)
        for _period in range(2):

            async def client(i: int) -> None:
                # A session each: its own connection, so both workers get some of them.
                async with aiohttp.ClientSession() as s:
                    for repo, mdigest, blobs in made:
                        assert await pull(s, mirror.url, repo, blobs) == mdigest

            await asyncio.gather(*(client(i) for i in range(20)))
            await asyncio.sleep(1.2)  # past the tags' TTL: the next round revalidates
        served = {e["pid"] for e in mirror.log_events() if e.get("event") == "request"}
    finally:
        await asyncio.to_thread(mirror.stop)
    assert served == pids, "both workers answered"
    assert sum(fake.manifest_gets.values()) == 3, fake.manifest_gets
    assert fake.count("GET", "/manifests/") == 3
    assert fake.count("HEAD", "/manifests/") >= 3  # revalidated, by HEAD only


async def test_a_tags_record_is_written_before_the_other_workers_are_answered(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """The race behind the test above's rare 4th GET: the fetching worker answered the other
    workers (the flight's answer file), let go of the lock, and only then wrote the tag's
    record; a worker that looked for the record in between found neither a record nor an
    answer newer than its look, and fetched the tag again. The record now comes first."""
    ((repo, mdigest, blobs),) = images(fake, 1)
    config = mirror_config(tmp_path, fake.url, tag_ttl="1m", prefetch=False)
    async with running_app(config, Clock()) as (base, app), aiohttp.ClientSession() as s:
        mirror = app[MIRROR]
        flight = mirror._manifest_flight_across
        answer = flight._write
        at_answer = []

        async def write(name: Any, found: dict[str, Any]) -> None:
            at_answer.append(await mirror.metadata.get_tag(("default", repo, "v1")))
            await answer(name, found)

        flight._write = write  # type: ignore[method-assign]  # the test watches the answer go out
        assert await pull(s, base, repo, blobs) == mdigest
    assert len(at_answer) == 1 and at_answer[0] is not None, at_answer
    assert at_answer[0].digest == mdigest
    assert fake.count("GET", "/manifests/") == 1


async def test_budget_spent_cached_tags_served_stale_cold_tag_429_blobs_go_on(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    fake.pull_budget = 3
    made = images(fake, 4)
    clock = Clock()
    config = mirror_config(tmp_path, fake.url, tag_ttl="1m", prefetch=False)
    async with running_app(config, clock) as (base, app), aiohttp.ClientSession() as s:
        for repo, mdigest, blobs in made[:3]:
            assert await pull(s, base, repo, blobs[:1]) == mdigest
        assert fake.manifest_gets["anonymous"] == 3
        clock.now += 61
        for repo, mdigest, _ in made[:3]:  # past the TTL, budget under the floor: stale, at once
            async with s.get(f"{base}/v2/{repo}/manifests/v1") as r:
                assert r.status == 200 and r.headers["Warning"].startswith("110 ")
                assert sha256_digest(await r.read()) == mdigest
        cold, _, blobs = made[3]
        async with s.get(f"{base}/v2/{cold}/manifests/v1") as r:
            assert r.status == 429
            assert int(r.headers["Retry-After"]) >= 1
            assert (await r.json())["errors"][0]["code"] == "TOOMANYREQUESTS"
        assert fake.count("GET", "/manifests/") == 3  # the spent budget was not asked again
        # Docker Hub does not count blobs: a manifest's rate limit stops no blob fetch.
        for digest in [*blobs, made[0][2][1]]:
            async with s.get(f"{base}/v2/{cold}/blobs/{digest}") as r:
                assert r.status == 200 and sha256_digest(await r.read()) == digest
        await asyncio.sleep(0.2)  # the background HEADs
        metrics = app[MIRROR].metrics.registry
        labels = {"upstream": "default", "account": "anonymous"}
        sample = metrics.get_sample_value
        assert sample("registry_mirror_upstream_account_ratelimit_remaining", labels) == 0
        assert sample("registry_mirror_upstream_account_ratelimit_limit", labels) == 3
        assert sample("registry_mirror_upstream_account_ratelimit_window_seconds", labels) == 21600
        source = {**labels, "source": "anonymous"}
        assert sample("registry_mirror_upstream_account_ratelimit_source", source) == 1
        assert sample("registry_mirror_budget_stale_answers_total", {"upstream": "default"}) == 3
        async with s.get(f"{base}/ui/") as r:  # the operator page shows the budget too
            page = await r.text()
        assert 'data-account="account 1"' in page and "0 of 3 per 21600 s" in page
    assert fake.count("HEAD", "/manifests/v1") == 3


async def test_a_pool_of_two_accounts_doubles_the_pulls_before_the_first_429(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    fake.pull_budget = 4
    fake.tag_lists = True
    fake.accounts = {"alice": "pa55-alice", "bob": "pa55-bob"}
    (tmp_path / "alice").write_text("pa55-alice\n")
    (tmp_path / "bob").write_text("pa55-bob\n")
    (tmp_path / "wrong").write_text("not-the-password\n")
    pool = [
        {"username": "mallory", "password_file": str(tmp_path / "wrong")},  # refused: skipped
        {"username": "alice", "password_file": str(tmp_path / "alice")},
        {"username": "bob", "password_file": str(tmp_path / "bob")},
    ]
    made = images(fake, 9)
    config = mirror_config(tmp_path / "cache", fake.url, credentials=pool, prefetch=False)
    async with running_app(config) as (base, _app), aiohttp.ClientSession() as s:
        for repo, mdigest, blobs in made[:8]:
            assert await pull(s, base, repo, blobs) == mdigest
        assert fake.manifest_gets == {"alice": 4, "bob": 4}
        async with s.get(f"{base}/v2/{made[8][0]}/manifests/v1") as r:
            assert r.status == 429 and int(r.headers["Retry-After"]) >= 1
    assert fake.refused_logins >= 1


async def test_a_revalidation_against_a_stalled_upstream_answers_within_the_bound(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    mdigest, _, _ = fake.add_image("lib/app", "v1", [b"layer"])
    other, _, _ = fake.add_image("lib/app", "v2", [b"other layer"])
    clock = Clock()
    config = mirror_config(tmp_path, fake.url, tag_ttl="1m", revalidate_timeout="500ms")
    async with running_app(config, clock) as (base, _app), aiohttp.ClientSession() as s:
        url = f"{base}/v2/lib/app/manifests/v1"
        async with s.get(url) as r:
            assert r.status == 200
        clock.now += 61
        fake.faults["v1"] = Fault(delay_headers=5.0)
        started = time.monotonic()
        async with s.get(url) as r:
            elapsed = time.monotonic() - started
            assert r.status == 200 and r.headers["Warning"].startswith("110 ")
            assert sha256_digest(await r.read()) == mdigest
        assert elapsed < 1.0, elapsed  # the bound (0.5s), not the upstream's 5s
        fake.faults["v2"] = Fault(delay_headers=1.0)  # a cold tag waits, as ever
        started = time.monotonic()
        async with s.get(f"{base}/v2/lib/app/manifests/v2") as r:
            assert r.status == 200 and sha256_digest(await r.read()) == other
        assert time.monotonic() - started >= 1.0


async def test_credentials_and_tokens_are_never_logged(fake: FakeUpstream, tmp_path: Path) -> None:
    fake.accounts = {"alice": "s3cret-alice", "bob": "s3cret-bob"}
    fake.tag_lists = True
    (tmp_path / "alice").write_text("s3cret-alice\n")
    (tmp_path / "bob").write_text("s3cret-bob\n")
    conf = tmp_path / "mirror.yaml"
    pool = [{"username": u, "password_file": str(tmp_path / u)} for u in ("alice", "bob")]
    conf.write_text(json.dumps({"upstream": {"credentials": pool}, "log": {"level": "debug"}}))
    (repo, mdigest, blobs), = images(fake, 1)  # fmt: skip
    mirror = MirrorProcess(
        tmp_path / "cache", fake.url, "--config", str(conf), log_path=tmp_path / "mirror.log"
    )
    await asyncio.to_thread(mirror.start)
    try:
        async with aiohttp.ClientSession() as s:
            assert await pull(s, mirror.url, repo, blobs) == mdigest
            fake.accounts["alice"] = "changed"  # alice's login is refused from now on
            fake.token_version += 1  # every token issued so far is revoked
            fake.add_image("lib/again", "v1", [b"again"])
            async with s.get(f"{mirror.url}/v2/lib/again/manifests/v1") as r:
                assert r.status == 200
    finally:
        await asyncio.to_thread(mirror.stop)
    text = (tmp_path / "mirror.log").read_text()
    assert "upstream_account_refused" in text and '"request"' in text  # it logged, and served
    basic = [
        basic_authorization(u, p) for u, p in [("alice", "s3cret-alice"), ("bob", "s3cret-bob")]
    ]
    for secret in ("s3cret-alice", "s3cret-bob", "fake-token", *basic, *(b[6:] for b in basic)):
        assert secret not in text, secret


async def test_serve_private_to_anonymous_opens_private_images_to_anonymous_clients(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    fake.accounts = {"paid": "pa55"}
    fake.tag_lists = True
    fake.private_repos = {"acme/secret"}
    mdigest, config_digest, layers = fake.add_image("acme/secret", "v1", [b"private layer"])
    for opened in (False, True):
        cache = tmp_path / str(opened)
        config = mirror_config(
            cache, fake.url, username="paid", password="pa55",
            serve_private_to_anonymous=opened, prefetch=False,
        )  # fmt: skip
        async with running_app(config) as (base, _app), aiohttp.ClientSession() as s:
            async with s.get(f"{base}/v2/acme/secret/manifests/v1", headers=ACCEPT) as r:
                if not opened:  # the default: anonymous clients never read private content
                    assert r.status == 401
                    continue
                assert r.status == 200 and sha256_digest(await r.read()) == mdigest
            for digest in [config_digest, *layers]:
                async with s.get(f"{base}/v2/acme/secret/blobs/{digest}") as r:
                    assert r.status == 200 and sha256_digest(await r.read()) == digest


async def test_the_budget_floor_decides_when_an_expired_tag_is_answered_at_once(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    fake.pull_budget = 10
    ((repo, mdigest, _),) = images(fake, 1)
    for floor, stale in ((9, False), (10, True), (0, False)):  # 9 pulls left after the first
        clock = Clock()
        config = mirror_config(tmp_path / str(floor), fake.url, tag_ttl="1m", budget_floor=floor)
        async with running_app(config, clock) as (base, _app), aiohttp.ClientSession() as s:
            fake.manifest_gets.clear()
            async with s.get(f"{base}/v2/{repo}/manifests/v1", headers=ACCEPT) as r:
                assert r.status == 200
            clock.now += 61
            async with s.get(f"{base}/v2/{repo}/manifests/v1", headers=ACCEPT) as r:
                assert r.status == 200 and sha256_digest(await r.read()) == mdigest
                assert ("Warning" in r.headers) is stale, floor
