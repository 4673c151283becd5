"""Issue 22's settings and pieces: each setting refused with a clear line when wrong; Docker
Hub's headers read; accounts chosen by budget; the bucket's fairness; prefetch's choices."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from mirror.config import ConfigError, load_config
from mirror.metrics import Metrics
from mirror.prefetch import Prefetcher, blobs_of
from mirror.reference import Digest
from mirror.startup import startup_warnings
from mirror.upstream.bandwidth import Bandwidth
from mirror.upstream.budget import Account, Budget, parse_ratelimit
from tests.fixtures.clock import Clock


def load(tmp_path: Path, **upstream: object) -> object:
    overrides = {"cache.dir": str(tmp_path)} | {f"upstream.{k}": v for k, v in upstream.items()}
    return load_config(None, env={}, overrides=overrides)


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("credentials", "alice", "a list of accounts"),
        ("credentials", [{"username": "alice"}], "credentials[0]: expected password_file"),
        ("credentials", [{"username": "a", "password": "x", "token": "y"}], "list of accounts"),
        ("max_bandwidth", "fast", "a rate such as 50MB/s"),
        ("budget_floor", -1, "budget_floor: expected zero or more"),
        ("revalidate_timeout", "soon", "a duration"),
        ("prefetch", "maybe", "true or false"),
        ("prefetch_max_size", "big", "a size"),
        ("prefetch_concurrency", 0, "prefetch_concurrency: expected 1 or more"),
        ("serve_private_to_anonymous", "perhaps", "true or false"),
    ],
)
def test_each_new_setting_is_checked_with_a_clear_line(
    tmp_path: Path, option: str, value: object, words: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, **{option: value})
    assert f"upstream.{option}" in str(caught.value) and words in str(caught.value)


def test_a_pool_reads_password_files_and_variables_and_names_each_account_once(
    tmp_path: Path,
) -> None:
    (tmp_path / "pw").write_text("from-file\n")
    pool = [
        {"username": "alice", "password_file": str(tmp_path / "pw")},
        {"username": "bob", "password_env": "BOB_TOKEN"},
    ]
    overrides = {"cache.dir": str(tmp_path), "upstream.credentials": pool}
    config = load_config(None, env={"BOB_TOKEN": "from-env"}, overrides=overrides)
    assert config.upstream.accounts() == [("alice", "from-file"), ("bob", "from-env")]
    assert "from-file" not in repr(config) and "from-env" not in repr(config)
    with pytest.raises(ConfigError, match="BOB_TOKEN is not set"):
        load_config(None, env={}, overrides=overrides)
    twice = {**overrides, "upstream.username": "alice", "upstream.password": "x"}
    with pytest.raises(ConfigError, match="each account may appear once"):
        load_config(None, env={"BOB_TOKEN": "t"}, overrides=twice)


def test_rates_parse_like_sizes_per_second(tmp_path: Path) -> None:
    assert load(tmp_path, max_bandwidth="50MB/s").upstream.max_bandwidth == 50_000_000
    assert load(tmp_path, max_bandwidth="400Mbit/s").upstream.max_bandwidth == 50_000_000
    assert load(tmp_path, max_bandwidth="1MiB").upstream.max_bandwidth == 1024**2


def test_serve_private_to_anonymous_warns_at_start_up(tmp_path: Path) -> None:
    config = load_config(
        None, env={},
        overrides={"cache.dir": str(tmp_path), "listen": "127.0.0.1:5000",
                   "upstream.serve_private_to_anonymous": True},
    )  # fmt: skip
    assert any("serve_private_to_anonymous" in w for w in startup_warnings(config))
    assert not any("serve_private" in w for w in startup_warnings(load(tmp_path)))


def test_docker_hub_headers() -> None:
    rate = parse_ratelimit(
        {
            "ratelimit-limit": "100;w=21600",
            "ratelimit-remaining": "76;w=21600",
            "docker-ratelimit-source": "192.0.2.1",
        }
    )
    assert rate is not None
    assert (rate.limit, rate.remaining, rate.window, rate.source) == (100, 76, 21600, "192.0.2.1")
    assert parse_ratelimit({"content-type": "x"}) is None


def test_accounts_by_budget_left_and_resting_after_a_refusal() -> None:
    clock = Clock()
    a, b, c = (Account(n, clock) for n in "abc")
    a.observe(parse_ratelimit({"ratelimit-limit": "10;w=3600", "ratelimit-remaining": "2"}))  # type: ignore[arg-type]  # a dict for the headers
    b.observe(parse_ratelimit({"ratelimit-limit": "10;w=3600", "ratelimit-remaining": "7"}))  # type: ignore[arg-type]  # a dict for the headers
    c.rest(30)
    budget = Budget([a, b, c])
    assert budget.order(manifest=True, spend=True) == [b, a]
    assert budget.order(manifest=False, spend=False)[-1] is c  # blobs: anyone, resting last
    assert budget.low(8) and not budget.low(7)
    b.observe(parse_ratelimit({"ratelimit-remaining": "0"}))  # type: ignore[arg-type]  # a dict for the headers
    a.observe(parse_ratelimit({"ratelimit-remaining": "0"}))  # type: ignore[arg-type]  # a dict for the headers
    assert budget.order(manifest=True, spend=True) == []
    assert budget.order(manifest=True, spend=False) == [a, b]  # a HEAD is free
    assert budget.retry_after() == 30  # c rests 30s; a, b regain one pull in 360s
    clock.now += 31
    assert budget.order(manifest=True, spend=True) == [c]


async def test_the_bucket_serves_waiting_fills_in_turn() -> None:
    clock = Clock(0.0)
    order: list[str] = []

    async def sleep(seconds: float) -> None:
        clock.now += seconds
        await asyncio.sleep(0)

    bucket = Bandwidth(64 * 1024, clock=clock, sleep=sleep)  # 64 KiB/s: a quantum a second

    async def fill(name: str) -> None:
        for _ in range(3):
            await asyncio.sleep(0)  # the chunk arrives (a network read yields)
            await bucket.take(64 * 1024)
            order.append(name)

    await asyncio.gather(fill("a"), fill("b"))
    assert order == ["a", "b", "a", "b", "a", "b"]
    assert 4.5 <= clock.now <= 5.5  # 6 quanta, one of them from the initial burst


def test_prefetch_takes_an_image_manifests_blobs_under_the_size_limit() -> None:
    d = ["sha256:" + c * 64 for c in "abc"]
    descriptors = {"config": {"digest": d[0], "size": 10}, "layers": [
        {"digest": d[1], "size": 5000}, {"digest": d[2], "size": 50}
    ]}  # fmt: skip
    data = json.dumps(descriptors).encode()
    assert blobs_of(data, 100) == ([d[0], d[2]], 1)
    assert blobs_of(b'{"manifests": []}', 100) == ([], 0)  # an index: its platform's turn
    assert blobs_of(b"not json", 100) == ([], 0)


async def test_evicting_an_image_cancels_its_prefetch() -> None:
    started, stopped = asyncio.Event(), asyncio.Event()

    async def fetch(target: object, digest: Digest, private: bool) -> str:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            stopped.set()
            raise
        return "fetched"

    class Up:
        name = metric_label = "default"

        class config:  # the shape of UpstreamConfig the prefetcher reads
            prefetch, prefetch_max_size, prefetch_concurrency = True, 1000, 2

    class Target:
        upstream = Up()

    metrics = Metrics()
    prefetcher = Prefetcher(fetch, metrics)  # type: ignore[arg-type]  # a stand-in fetch
    manifest = Digest("sha256:" + "f" * 64)
    data = b'{"config": {"digest": "sha256:%s", "size": 1}, "layers": []}' % (b"a" * 64)
    media_type = "application/vnd.oci.image.manifest.v1+json"
    prefetcher.offer(Target(), manifest, media_type, data, False)  # type: ignore[arg-type]  # a bare stand-in target
    await asyncio.wait_for(started.wait(), 5)
    prefetcher.cancel([manifest])
    await asyncio.wait_for(stopped.wait(), 5)
    await asyncio.sleep(0)
    assert prefetcher.in_flight == 0
    labels = {"upstream": "default", "outcome": "cancelled"}
    assert metrics.registry.get_sample_value("registry_mirror_prefetches_total", labels) == 1
