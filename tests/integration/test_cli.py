"""The maintenance commands on a cache filled by real pulls: ls, gc, verify, pin."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from mirror.cli import main
from tests.fixtures.mirror_server import mirror_config, running_app
from tests.fixtures.real_upstream import Upstream
from tests.integration.test_cache_policy import cached, footprint, pull


def fill(upstream: Upstream, cache: Path, *keys: str) -> None:
    async def run() -> None:
        async with (
            running_app(mirror_config(cache, upstream.url)) as (base, _app),
            aiohttp.ClientSession() as s,
        ):
            for key in keys:
                await pull(s, base, upstream.images[key])

    asyncio.run(run())


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main([*args])
    return code, capsys.readouterr().out


def test_ls_gc_pin_and_verify(
    upstream: Upstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(upstream, tmp_path, "small", "multi")
    capsys.readouterr()  # the mirror's own log lines
    small, multi = upstream.images["small"], upstream.images["multi"]
    where = ("--cache-dir", str(tmp_path))

    code, out = cli(capsys, "ls", *where)
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(lines) == {"library/small", "library/multi"}
    assert "partial" not in out

    code, out = cli(capsys, "pin", *where, multi.ref)
    assert (code, out.split()) == (0, [multi.ref])
    rows = {line.split()[0]: line for line in cli(capsys, "ls", *where)[1].splitlines()[1:]}
    assert rows["library/multi"].endswith("pinned")
    assert not rows["library/small"].endswith("pinned")

    # A budget smaller than both images: dry run lists, then gc removes all but the pin.
    budget = str(footprint(multi) + 1000)
    env_budget = {"REGISTRY_MIRROR_CACHE_MAX_SIZE": budget}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env_budget.items():
            mp.setenv(key, value)
        code, out = cli(capsys, "gc", "--dry-run", *where)
        assert code == 0 and "would remove" in out
        assert cached(tmp_path, small)
        code, out = cli(capsys, "gc", *where)
        assert code == 0 and "removed" in out
    assert not cached(tmp_path, small)
    assert cached(tmp_path, multi)

    code, out = cli(capsys, "unpin", *where, multi.ref)
    assert (code, out) == (0, "")

    victim = multi.children[0].blobs[1]
    path = tmp_path / "blobs" / "sha256" / victim.digest[7:9] / victim.digest[7:]
    path.write_bytes(b"bit rot")
    code, out = cli(capsys, "verify", "--repair", *where)
    assert code == 1
    assert f"removed {victim.digest}" in out
    assert not path.exists()
    code, out = cli(capsys, "verify", *where)
    assert code == 0 and "0 bad" in out


def test_bad_pin_and_bad_config_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["pin", "--cache-dir", str(tmp_path), "Not/A/Name"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid repository name" in err
    conf = tmp_path / "bad.yaml"
    conf.write_text("cache:\n  max_size: lots\n")
    assert main(["check-config", "--config", str(conf)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cache.max_size" in err
