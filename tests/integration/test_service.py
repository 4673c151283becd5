"""Running as a service: the systemd unit verifies, and SIGTERM is graceful."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import aiohttp

from tests.fixtures.mirror_server import MirrorProcess
from tests.fixtures.real_upstream import Upstream

REPO = Path(__file__).parents[2]
UNIT = REPO / "systemd" / "registry-mirror.service"


def install_commands(unit_text: str) -> list[str]:
    """The install commands in the unit's opening comment (`#   command` lines), minus
    `systemctl`, which acts on the running machine."""
    commands = []
    for line in unit_text.splitlines():
        if not line.startswith("#"):
            break
        if line.startswith("#   ") and not line[4:].startswith("systemctl"):
            commands.append(line[4:].strip())
    return commands


def os_root(root: Path) -> None:
    """What the OS brings to a root: its unit files (the targets every service depends on),
    /etc/systemd/system, and /bin/kill (ExecReload=), on a merged /usr as Debian has."""
    (root / "etc" / "systemd" / "system").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "usr/bin").mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")
    shutil.copy2(os.path.realpath("/bin/kill"), root / "usr/bin" / "kill")


def test_systemd_unit_verifies_as_shipped_after_the_documented_install(tmp_path: Path) -> None:
    """Run the unit's own install commands into a scratch root (the paths under /opt and /etc
    moved there, nothing else changed), then `systemd-analyze verify --root` the unit they
    installed: the file as shipped, its ExecStart= made by the documented install."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is not installed: run the suite with `bash tests/run`"
    root, src = tmp_path / "root", tmp_path / "src"
    os_root(root)
    # A clone's files the install reads (not the working tree: pip builds in its source).
    for name in ("mirror", "conf", "systemd"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    commands = install_commands(UNIT.read_text())
    assert any("/etc/systemd/system" in c for c in commands), commands
    for command in commands:
        moved = re.sub(r"(?<![\w./-])/(opt|etc)/", rf"{root}/\1/", command)
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", moved],
            cwd=src, capture_output=True, text=True, timeout=240, check=False,
        )  # fmt: skip
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}{result.stderr[-3000:]}"
    installed = root / "etc" / "systemd" / "system" / "registry-mirror.service"
    assert installed.read_text() == UNIT.read_text()
    result = subprocess.run(
        [analyze, "verify", "--man=no", f"--root={root}", str(installed)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
    # The command ExecStart= names is the installed program, and it runs.
    exec_start = re.search(r"^ExecStart=(\S+)", installed.read_text(), re.MULTILINE)
    assert exec_start, "no ExecStart="
    program = root / exec_start[1].lstrip("/")
    result = subprocess.run(
        [str(program), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0 and "serve" in result.stdout, result.stderr
    # Under ProtectHome= the service cannot see /root or /home: the program must not live there.
    assert not exec_start[1].startswith(("/root/", "/home/")), exec_start[1]
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
