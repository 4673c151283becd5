"""Air-gapped operation with the real upstream: warm, serve offline, export and import."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mirror.cli import main
from tests.fixtures.mirror_server import MirrorProcess
from tests.fixtures.real_upstream import Upstream
from tests.integration.test_skopeo import assert_dir_matches, copy_through, skopeo

CLOSED = "http://127.0.0.1:9"  # no upstream at all


@pytest.fixture
def upstream_down(upstream: Upstream) -> Iterator[Upstream]:
    """Stop the real upstream for the test, and bring it back afterwards."""
    upstream.registry.stop()
    try:
        yield upstream
    finally:
        upstream.registry.start()


def offline_mirror(cache: Path, log: Path) -> MirrorProcess:
    mirror = MirrorProcess(cache, CLOSED, log_path=log, env={"REGISTRY_MIRROR_OFFLINE": "true"})
    mirror.start()
    return mirror


def warm(cache: Path, upstream: Upstream, *args: str) -> int:
    return main(["warm", "--cache-dir", str(cache), "--upstream", upstream.url, *args])


def test_warm_then_serve_offline_with_the_upstream_gone(
    upstream: Upstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    refs = [upstream.images[k].ref for k in ("small", "multi", "team")]
    listing = tmp_path / "images.txt"
    listing.write_text("# what the site needs\n" + "\n".join(refs[1:]) + "\n")
    assert warm(cache, upstream, refs[0], "-f", str(listing), "--pin") == 0
    out = capsys.readouterr().out
    assert "warmed 3 images" in out and "0 failures" in out and "pinned" in out
    assert warm(cache, upstream, *refs) == 0  # resumable: nothing left to fetch
    assert "fetched 0 blobs" in capsys.readouterr().out

    upstream.registry.stop()
    try:
        mirror = offline_mirror(cache, tmp_path / "mirror.log")
        try:
            for key in ("small", "multi", "team"):
                image = upstream.images[key]
                extra = ("--all",) if image.children else ()
                copy_through(mirror, image.ref, tmp_path / key, *extra)
                assert_dir_matches(tmp_path / key, image)
            r = httpx.get(f"{mirror.url}/v2/library/ocismall/manifests/latest")
            assert r.status_code == 404
            error = r.json()["errors"][0]
            assert error["code"] == "MANIFEST_UNKNOWN" and "offline" in error["message"]
            r = httpx.get(f"{mirror.url}/v2/library/multi/tags/list")
            assert r.json()["tags"] == ["latest"]
        finally:
            mirror.stop()
    finally:
        upstream.registry.start()


def test_warm_one_platform_only(upstream: Upstream, tmp_path: Path) -> None:
    image = upstream.images["multidocker"]
    cache = tmp_path / "cache"
    assert warm(cache, upstream, image.ref, "--platform", "linux/arm64") == 0
    arm = next(c for c in image.children if c.platform and c.platform["architecture"] == "arm64")
    amd = next(c for c in image.children if c is not arm)

    def has(digest: str) -> bool:
        return (cache / "blobs" / "sha256" / digest[7:9] / digest[7:]).exists()

    assert all(has(b.digest) for b in arm.blobs)
    assert not any(has(b.digest) for b in amd.blobs)


def test_export_import_into_a_mirror_with_no_upstream(
    upstream: Upstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    images = [upstream.images[k] for k in ("multi", "ocismall", "small")]
    assert warm(a, upstream, *(i.ref for i in images)) == 0
    bundle = tmp_path / "site.tar"
    assert main(["export", "--cache-dir", str(a), "-o", str(bundle), *(i.ref for i in images)]) == 0
    capsys.readouterr()

    # Standard tools read it: skopeo takes the OCI-typed images straight from the archive.
    oci = upstream.images["multi"]
    result = skopeo("copy", "--all", f"oci-archive:{bundle}:{oci.ref}", f"dir:{tmp_path / 'sk'}")
    assert result.returncode == 0, result.stderr
    assert_dir_matches(tmp_path / "sk", oci)

    assert main(["import", "--cache-dir", str(b), str(bundle)]) == 0
    assert main(["import", "--cache-dir", str(b), str(bundle)]) == 0  # idempotent
    mirror = offline_mirror(b, tmp_path / "mirror.log")
    try:
        for image in images:
            extra = ("--all",) if image.children else ()
            copy_through(mirror, image.ref, tmp_path / f"out-{image.repo[8:]}", *extra)
            assert_dir_matches(tmp_path / f"out-{image.repo[8:]}", image)
    finally:
        mirror.stop()


def test_a_corrupt_bundle_is_refused_whole(
    upstream: Upstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    image = upstream.images["multi"]
    assert warm(a, upstream, image.ref) == 0
    bundle = tmp_path / "layout"
    export = ["export", "--cache-dir", str(a), "--format", "dir", "-o", str(bundle), image.ref]
    assert main(export) == 0
    victim = image.children[1].blobs[-1]
    path = bundle / "blobs" / "sha256" / victim.digest[7:]
    data = path.read_bytes()
    path.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])
    capsys.readouterr()
    assert main(["import", "--cache-dir", str(b), str(bundle)]) == 1
    err = capsys.readouterr().err
    assert f"blob {victim.digest} does not match its digest" in err
    assert "nothing was imported" in err
    assert not any(p.is_file() for p in (b / "blobs").rglob("*"))
    assert main(["ls", "--cache-dir", str(b)]) == 0
    assert capsys.readouterr().out.count("\n") == 1  # the header only: no tags


def test_import_a_layout_made_by_skopeo(
    upstream: Upstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = upstream.images["ocismall"]
    layout = tmp_path / "layout"
    result = skopeo(
        "copy", "--src-tls-verify=false",
        f"docker://{upstream.url.removeprefix('http://')}/{image.ref}", f"oci:{layout}:latest",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    cache = tmp_path / "cache"
    assert main(["import", "--cache-dir", str(cache), str(layout)]) == 1
    assert "pass --repository" in capsys.readouterr().err
    args = ["import", "--cache-dir", str(cache), str(layout), "--repository", image.repo]
    assert main(args) == 0
    mirror = offline_mirror(cache, tmp_path / "mirror.log")
    try:
        copy_through(mirror, image.ref, tmp_path / "out")
        assert_dir_matches(tmp_path / "out", image)
    finally:
        mirror.stop()
    index = json.loads((layout / "index.json").read_text())
    assert index["manifests"][0]["digest"] == image.digest


def test_warm_into_the_cache_of_a_running_mirror(upstream: Upstream, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    image = upstream.images["ocismall"]
    mirror = MirrorProcess(cache, upstream.url, log_path=tmp_path / "mirror.log")
    mirror.start()
    try:
        assert warm(cache, upstream, image.ref) == 0
        gets = {b.digest: upstream.registry.blob_gets(b.digest) for b in image.blobs}
        copy_through(mirror, image.ref, tmp_path / "out")
        assert_dir_matches(tmp_path / "out", image)
        for blob in image.blobs:
            assert upstream.registry.blob_gets(blob.digest) == gets[blob.digest]
        served = [
            e["cache"]
            for e in mirror.log_events()
            if e.get("event") == "request" and "/blobs/" in str(e.get("path"))
        ]
        assert served and set(served) == {"hit"}
    finally:
        mirror.stop()


def test_warm_draws_a_progress_bar_on_a_terminal(upstream: Upstream, tmp_path: Path) -> None:
    image = upstream.images["team"]
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mirror", "warm", "--cache-dir", str(tmp_path / "c"),
         "--upstream", upstream.url, image.ref],
        stdout=follower, stderr=follower,
    )  # fmt: skip
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    assert proc.wait(60) == 0
    os.close(leader)
    text = output.decode()
    assert "\rwarm [" in text and "100%" in text and "3/3 blobs" in text
    assert "warmed 1 image:" in text


def test_an_interrupted_import_leaves_a_consistent_cache(
    upstream: Upstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    image = upstream.images["big"]
    assert warm(a, upstream, image.ref) == 0
    bundle = tmp_path / "big.tar"
    assert main(["export", "--cache-dir", str(a), "-o", str(bundle), image.ref]) == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "mirror", "import", "--cache-dir", str(b), str(bundle)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list((b / "tmp").glob("*.part")):
        time.sleep(0.01)  # wait until it is writing blobs, then cut it down
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    capsys.readouterr()
    assert main(["verify", "--cache-dir", str(b)]) == 0  # whatever is there is whole
    assert main(["ls", "--cache-dir", str(b)]) == 0
    assert capsys.readouterr().out.count("\n") == 2  # the verify line and the ls header: no tags
    assert list((b / "tmp").iterdir()) == []  # the dead writer's temp file was swept
    assert main(["import", "--cache-dir", str(b), str(bundle)]) == 0  # and it can be redone
