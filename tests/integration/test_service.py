"""Running as a service: the systemd unit verifies, and SIGTERM is graceful."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import aiohttp

from tests.fixtures.mirror_server import MirrorProcess
from tests.fixtures.real_upstream import Upstream

UNIT = Path(__file__).parents[2] / "systemd" / "registry-mirror.service"


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    command = shutil.which("registry-mirror")
    assert analyze, "systemd-analyze is not installed: run the suite with `bash tests/run`"
    assert command, "the package is not installed: run the suite with `bash tests/run`"
    unit = tmp_path / "registry-mirror.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/registry-mirror", command))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
    text = UNIT.read_text()
    for hardening in ("DynamicUser=yes", "ProtectSystem=strict", "NoNewPrivileges=yes"):
        assert hardening in text
    assert "Restart=on-failure" in text and "CacheDirectory=registry-mirror" in text


def big_blob(upstream: Upstream):  # type: ignore[no-untyped-def]
    return max(upstream.images["big"].blobs, key=lambda b: b.size)


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


async def test_sigterm_lets_a_download_in_flight_finish(upstream: Upstream, tmp_path: Path) -> None:
    blob = big_blob(upstream)
    mirror = MirrorProcess(tmp_path / "cache", upstream.url, log_path=tmp_path / "mirror.log")
    await asyncio.to_thread(mirror.start)
    assert mirror.proc is not None
    sha = hashlib.sha256()
    try:
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"{mirror.url}/v2/big/app/blobs/{blob.digest}") as r,
        ):
            assert r.status == 200
            sha.update(await r.content.readexactly(1 << 20))
            os.kill(mirror.proc.pid, signal.SIGTERM)  # mid-download (the fill is in flight too)
            await asyncio.sleep(0.5)
            assert refuses_connections(mirror.port), "no new connections once stopping"
            while chunk := await r.content.read(1 << 20):
                sha.update(chunk)
        assert "sha256:" + sha.hexdigest() == blob.digest
        assert await asyncio.to_thread(mirror.proc.wait, 30) == 0
        final = tmp_path / "cache" / "blobs" / "sha256" / blob.digest[7:9] / blob.digest[7:]
        assert final.exists(), "the completed fill was committed"
    finally:
        await asyncio.to_thread(mirror.stop)


async def test_sigterm_past_the_grace_period_leaves_nothing_partial(
    upstream: Upstream, tmp_path: Path
) -> None:
    blob = big_blob(upstream)
    cache = tmp_path / "cache"
    mirror = MirrorProcess(
        cache,
        upstream.url,
        log_path=tmp_path / "mirror.log",
        env={"REGISTRY_MIRROR_SHUTDOWN_TIMEOUT": "300ms"},
    )
    await asyncio.to_thread(mirror.start)
    assert mirror.proc is not None
    try:
        conn = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=conn, read_bufsize=2**16) as s:
            r = await s.get(f"{mirror.url}/v2/big/app/blobs/{blob.digest}")
            await r.content.readexactly(1 << 16)  # then stall: the response cannot finish
            os.kill(mirror.proc.pid, signal.SIGTERM)
            assert await asyncio.to_thread(mirror.proc.wait, 30) == 0
            r.close()
        # The stalled response was cut. The fill either finished and verified before the end
        # (then it is committed whole) or was discarded: never a partial file.
        for path in (p for p in (cache / "blobs").rglob("*") if p.is_file()):
            assert "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest() == blob.digest
        assert list((cache / "tmp").iterdir()) == []
    finally:
        await asyncio.to_thread(mirror.stop)
