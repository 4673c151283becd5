"""Operational details best shown with a controllable upstream: rate-limit budget, listeners."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import aiohttp

from tests.fixtures.fake_upstream import FakeUpstream
from tests.fixtures.mirror_server import free_port, mirror_config, running_mirror


async def test_docker_hub_pull_budget_and_a_separate_metrics_listener(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    fake.ratelimit_remaining = "87;w=21600"
    fake.add_image("lib/app", "v1", [b"layer"])
    port = free_port()
    config = mirror_config(tmp_path, fake.url, settings={"metrics.listen": f"127.0.0.1:{port}"})
    async with running_mirror(config) as base, aiohttp.ClientSession() as s:
        async with s.get(f"{base}/v2/lib/app/manifests/v1") as r:
            assert r.status == 200
        async with s.get(f"{base}/metrics") as r:
            assert r.status == 405  # not on the client-facing listener
        async with s.get(f"http://127.0.0.1:{port}/metrics") as r:
            text = await r.text()
    assert 'registry_mirror_upstream_ratelimit_remaining{upstream="default"} 87.0' in text


def test_serve_with_a_bad_config_exits_with_one_line(tmp_path: Path) -> None:
    conf = tmp_path / "mirror.yaml"
    conf.write_text("upstream:\n  tag_ttl: forever\n")
    result = subprocess.run(
        [sys.executable, "-m", "mirror", "serve", "--config", str(conf)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "upstream.tag_ttl" in result.stderr and "duration" in result.stderr
