"""The operator page's pure parts: its config, time series, CSRF checks, numbers and charts."""

from __future__ import annotations

from pathlib import Path

import pytest

from mirror.config import ConfigError, UiConfig, load_config
from mirror.metrics import Metrics
from mirror.stats import RingSeries, Sampler, parse_scrape
from mirror.web import ui_support as s
from tests.fixtures.clock import Clock


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("", UiConfig(True, "/ui/")),
        ("ui: false\n", UiConfig(False, "/ui/")),
        ("ui: true\n", UiConfig(True, "/ui/")),
        ("ui: /ops\n", UiConfig(True, "/ops/")),
        ("ui:\n  enabled: false\n", UiConfig(False, "/ui/")),
        ("ui:\n  path: /mirror/ui\n", UiConfig(True, "/mirror/ui/")),
    ],
)
def test_ui_config_forms(tmp_path: Path, yaml_text: str, expected: UiConfig) -> None:
    conf = tmp_path / "mirror.yaml"
    conf.write_text(yaml_text)
    assert load_config(conf, env={}).ui == expected


@pytest.mark.parametrize(
    "yaml_text",
    ["ui: maybe\n", "ui:\n  path: /v2/ui\n", "ui: /\n", "ui:\n  colour: red\n", "ui: /metrics\n"],
)
def test_bad_ui_config_names_the_key(tmp_path: Path, yaml_text: str) -> None:
    conf = tmp_path / "mirror.yaml"
    conf.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(conf, env={})
    assert err.value.key == "ui"


def test_ui_off_by_environment() -> None:
    assert not load_config(None, env={"REGISTRY_MIRROR_UI": "false"}).ui.enabled


def test_ring_series_buckets_and_gaps() -> None:
    ring = RingSeries(10.0, 6)
    ring.add(100.0, 1)
    ring.add(105.0, 2)  # same bucket
    ring.add(131.0, 5)  # two empty buckets between
    points = ring.points(135.0)
    assert points == [(80.0, 0), (90.0, 0), (100.0, 3), (110.0, 0), (120.0, 0), (130.0, 5)]
    assert ring.points(500.0) == [(t, 0.0) for t in (450.0, 460.0, 470.0, 480.0, 490.0, 500.0)]


def test_sampler_records_increases_of_the_metrics_counters() -> None:
    clock = Clock(1000.0)
    metrics = Metrics()

    def read() -> dict[str, float]:
        return parse_scrape(metrics.scrape()).totals

    sampler = Sampler(read, windows={"hour": (10.0, 4), "day": (60.0, 3)}, clock=clock)
    metrics.cache_hits.labels("blob").inc(2)  # before the first reading: the baseline
    sampler.sample()
    clock.now += 10
    metrics.cache_hits.labels("blob").inc(3)
    metrics.cache_hits.labels("manifest").inc(1)
    metrics.cache_misses.labels("blob").inc()
    metrics.upstream_fetched_bytes.labels("default").inc(4096)
    metrics.upstream_fetched_bytes.labels("ghcr").inc(1024)
    metrics.cache_served_bytes.inc(100)
    sampler.sample()
    assert [v for _, v in sampler.points("hour", "hits")] == [0, 0, 0, 4]
    assert [v for _, v in sampler.points("hour", "misses")][-1] == 1
    assert [v for _, v in sampler.points("hour", "fetched_bytes")][-1] == 5120
    assert [v for _, v in sampler.points("day", "served_bytes")][-1] == 100
    clock.now += 10
    sampler.sample({"hits": 1.0}, taken=5.0)  # a counter that went back (a restarted worker)
    assert [v for _, v in sampler.points("hour", "hits")][-2:] == [4, 1]  # counts anew
    sampler.sample({"hits": 0.0}, taken=4.0)  # read before the last one: dropped
    sampler.sample({"hits": 3.0}, taken=6.0)
    assert [v for _, v in sampler.points("hour", "hits")][-2:] == [4, 3]


def test_scrape_values_by_label() -> None:
    metrics = Metrics()
    metrics.ratelimit_remaining.labels("default").set(87)
    scrape = parse_scrape(metrics.scrape())
    assert scrape.value("registry_mirror_upstream_ratelimit_remaining", upstream="default") == 87
    assert scrape.value("registry_mirror_upstream_ratelimit_remaining", upstream="x") is None


def test_csrf_double_submit_and_origin() -> None:
    token = s.new_csrf_token()
    ok = {"origin": None, "host": "127.0.0.1:5000", "fetch_site": None}
    assert s.csrf_problem(token, token, **ok) is None
    assert s.csrf_problem(None, token, **ok) is not None
    assert s.csrf_problem(token, "", **ok) is not None
    assert s.csrf_problem(token, s.new_csrf_token(), **ok) is not None
    assert s.csrf_problem("short", "short", **ok) is not None
    same = {**ok, "origin": "http://127.0.0.1:5000", "fetch_site": "same-origin"}
    assert s.csrf_problem(token, token, **same) is None
    assert s.csrf_problem(token, token, **{**same, "origin": "http://evil.example"}) is not None
    assert s.csrf_problem(token, token, **{**same, "origin": "null"}) is not None
    assert s.csrf_problem(token, token, **{**same, "fetch_site": "cross-site"}) is not None
    assert s.csrf_problem(token, token, **{**same, "fetch_site": "same-site"}) is not None


def test_signed_messages() -> None:
    token = s.new_csrf_token()
    assert s.sign(token, "pinned x") == s.sign(token, "pinned x")
    assert s.sign(token, "pinned x") != s.sign(token, "pinned y")
    assert s.sign(token, "pinned x") != s.sign(s.new_csrf_token(), "pinned x")


def test_numbers_for_people() -> None:
    assert s.human_bytes(512) == "512 B"
    assert s.human_bytes(3 * 2**30) == "3.0 GiB"
    assert s.human_bytes(12 * 2**20) == "12.0 MiB"  # "WAN traffic saved", not 0.01 GiB
    assert s.percent(1, 4) == "25.0 %" and s.percent(1, 0) == "-"
    assert s.ago(None) == "never"
    assert s.ago(1000.0, now=1030.0) == "30 s ago"
    assert s.ago(1000.0, now=1000.0 + 3 * 3600) == "3 h ago"


def test_chart_scales_every_series_into_the_box() -> None:
    chart = s.chart(
        [("hits", [(0.0, 0.0), (10.0, 4.0), (20.0, 2.0)]), ("misses", [(0.0, 1.0)] * 3)],
        width=200,
        height=100,
    )
    assert chart.peak == 4.0
    (css, hits, total), (_, misses, _) = chart.lines
    assert css == "hits" and total == 6.0
    assert hits.split() == ["0.0,98.0", "100.0,2.0", "200.0,50.0"]
    assert all(p.endswith(",74.0") for p in misses.split())
    empty = s.chart([("hits", [(0.0, 0.0), (10.0, 0.0)])], width=10, height=10)
    assert empty.lines[0][1] == "0.0,8.0 10.0,8.0"
