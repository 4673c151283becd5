"""skopeo and podman pull through a mirror that is killed (kill -9, by its PID) mid-pull and
restarted on the same port: the pull completes (resumed by the client or retried), every blob
matches its digest, and the restarted mirror resumed the dead fill's partial from its end, so
the upstream sent the big layer once, plus only what was in flight when the mirror died.

The real registry is the upstream, behind a throttle (a slow link) so that the kill lands in
the middle of the 256 MiB layer."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.fixtures.distribution import LoggedRequest
from tests.fixtures.engines import PROXY_ENV, Podman
from tests.fixtures.mirror_server import MirrorProcess
from tests.fixtures.real_upstream import Upstream
from tests.fixtures.synthetic_images import Image
from tests.fixtures.throttle import Throttle
from tests.integration.test_skopeo import assert_dir_matches, sha256_file

pytestmark = pytest.mark.timeout(300)

MiB = 1024 * 1024
RATE = 48 * MiB  # the link: ~7 s for the image, the 256 MiB layer last to finish
KILL_AT = 80 * MiB  # the big layer's partial when the mirror is killed
OVERLAP_MAX = 16 * MiB  # in flight through the link and the sockets when the mirror died
PULL_TIMEOUT = 180.0


@dataclass
class Restarted:
    """What one pull through a killed and restarted mirror left to check."""

    mirror: MirrorProcess
    layer: str  # the big layer's digest
    kept: int  # its partial's length when the mirror died
    retried: bool  # the client failed and was run again (else it resumed by itself)
    upstream_gets: list[LoggedRequest]  # the registry's GETs of the layer during the test


def big_layer(image: Image) -> tuple[str, int]:
    blob = max(image.blobs, key=lambda b: b.size)
    return blob.digest, blob.size


def registry_port(upstream: Upstream) -> int:
    port = urlsplit(upstream.url).port
    assert port is not None
    return port


def partial_of(cache: Path, digest: str) -> Path | None:
    found = list((cache / "tmp").glob(f"{digest.split(':', 1)[1]}.*.part"))
    return found[0] if found else None


async def wait_partial(
    cache: Path, digest: str, at_least: int, client: subprocess.Popen[bytes]
) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        path = partial_of(cache, digest)
        if path is not None and path.exists() and path.stat().st_size >= at_least:
            return
        assert client.poll() is None, "the pull ended before the mirror could be killed"
        await asyncio.sleep(0.05)
    raise AssertionError(f"no partial of {digest} reached {at_least} bytes")


def spawn(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=out)


def ended(proc: subprocess.Popen[bytes]) -> int:
    """The client's exit status; killed by its PID if it outlives the time-out."""
    try:
        return proc.wait(PULL_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise


def link_and_mirror(upstream: Upstream, tmp_path: Path) -> tuple[Throttle, MirrorProcess]:
    """A slow link to the registry, and a mirror (not started yet) pulling through it."""
    proxy = Throttle(registry_port(upstream), rate=RATE)
    mirror = MirrorProcess(
        tmp_path / "cache", f"http://127.0.0.1:{proxy.port}", log_path=tmp_path / "mirror.log",
        env={"REGISTRY_MIRROR_UPSTREAM_NAMES": "docker.io"},
    )  # fmt: skip
    return proxy, mirror


async def pull_through_restart(
    upstream: Upstream,
    proxy: Throttle,
    mirror: MirrorProcess,
    image: Image,
    command: list[str],
    env: dict[str, str],
    retry: list[str],
) -> Restarted:
    """Run `command` (a pull through `mirror`), kill -9 the mirror once the big layer's
    partial passes KILL_AT, restart it on the same port; run `retry` if the pull failed."""
    layer, _ = big_layer(image)
    before = len(upstream.registry.requests())
    async with proxy.running():
        await asyncio.to_thread(mirror.start)
        client = None
        try:
            client = await asyncio.to_thread(
                spawn, command, env, mirror.log_path.with_name("client.log")
            )
            await wait_partial(mirror.cache_dir, layer, KILL_AT, client)
            await asyncio.to_thread(mirror.kill)
            partial = partial_of(mirror.cache_dir, layer)
            assert partial is not None
            kept = partial.stat().st_size
            await asyncio.to_thread(mirror.start)  # the same port
            status = await asyncio.to_thread(ended, client)
            if status != 0:
                again = await asyncio.to_thread(
                    subprocess.run, retry, env=env, capture_output=True, timeout=PULL_TIMEOUT
                )
                assert again.returncode == 0, again.stderr.decode()[-2000:]
        finally:
            if client is not None and client.poll() is None:
                client.kill()
                client.wait(10)
            await asyncio.to_thread(mirror.stop)
    gets = [
        r
        for r in upstream.registry.requests()[before:]
        if r.method == "GET" and r.uri.endswith(f"/blobs/{layer}")
    ]
    return Restarted(mirror, layer, kept, status != 0, gets)


def assert_resumed_once(restarted: Restarted, image: Image, client: str) -> None:
    """The restarted mirror served the pull and resumed the layer's partial from its end;
    the upstream sent the layer once, plus what the dead mirror had in flight."""
    mirror, layer = restarted.mirror, restarted.layer
    _, size = big_layer(image)
    events = mirror.log_events()
    starts = [i for i, e in enumerate(events) if e.get("event") == "mirror_started"]
    assert len(starts) == 2, "one start, one restart"
    after = events[starts[-1] :]
    resumed = [e for e in after if e.get("event") == "partial_resumed" and e["digest"] == layer]
    assert [e["offset"] for e in resumed] == [restarted.kept]
    served = [
        e
        for e in after
        if e.get("event") == "request" and str(e.get("path", "")).endswith(f"/blobs/{layer}")
    ]
    assert served and served[-1]["status"] in (200, 206), "the restarted mirror served it"
    for blob in image.blobs:  # what the mirror committed is what the digests say
        hexa = blob.digest.split(":", 1)[1]
        assert sha256_file(mirror.cache_dir / "blobs" / "sha256" / hexa[:2] / hexa) == blob.digest
    gets = restarted.upstream_gets
    assert [g.status for g in gets][-1] == 206
    assert len(gets) == 2, [(g.status, g.written) for g in gets]  # the first, and the rest
    first, rest = gets
    assert rest.written == size - restarted.kept, "only the bytes the partial lacked"
    total = first.written + rest.written
    assert restarted.kept <= first.written and total <= size + OVERLAP_MAX
    print(
        f"\n{client}: {size} B layer, upstream sent {first.written} B before the kill "
        f"({restarted.kept} B kept), {rest.written} B after the restart: {total} B in all "
        f"(+{total - size} B in flight when it died); client "
        f"{'retried' if restarted.retried else 'resumed by itself'}"
    )


async def test_skopeo_copy_through_a_mirror_killed_and_restarted_mid_pull(
    upstream: Upstream, tmp_path: Path
) -> None:
    image = upstream.images["big"]
    proxy, mirror = link_and_mirror(upstream, tmp_path)
    binary = shutil.which("skopeo")
    assert binary, "skopeo is not installed: run the suite with `bash tests/run`"

    def copy(dest: Path) -> list[str]:
        return [
            binary, "copy", "--src-tls-verify=false",
            f"docker://{mirror.address}/{image.ref}", f"dir:{dest}",
        ]  # fmt: skip

    env = {**os.environ, **PROXY_ENV}
    out, again = tmp_path / "out", tmp_path / "again"
    restarted = await pull_through_restart(
        upstream, proxy, mirror, image, copy(out), env, copy(again)
    )
    assert_dir_matches(again if restarted.retried else out, image)  # every blob's digest
    assert_resumed_once(restarted, image, "skopeo")


async def test_podman_pull_through_a_mirror_killed_and_restarted_mid_pull(
    upstream: Upstream, tmp_path: Path
) -> None:
    image = upstream.images["big"]
    ref = f"docker.io/{image.ref}"
    proxy, mirror = link_and_mirror(upstream, tmp_path)
    podman = Podman(mirror.address)  # its environment sends any proxy use to a closed port
    try:
        pull = [*podman.base, "pull", ref]
        restarted = await pull_through_restart(
            upstream, proxy, mirror, image, pull, podman.env, pull
        )
        # podman checks every blob against its digest as it pulls; the image is the one asked.
        assert await asyncio.to_thread(podman.image_digest, ref) == image.digest
        assert_resumed_once(restarted, image, "podman")
    finally:
        podman.close()
