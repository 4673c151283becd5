"""A real client (skopeo) copies images through the mirror from the real upstream."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.fixtures.mirror_server import MirrorProcess
from tests.fixtures.real_upstream import Upstream
from tests.fixtures.synthetic_images import Image


def skopeo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("skopeo")
    assert binary, "skopeo is not installed: run the suite with `bash tests/run`"
    return subprocess.run(
        [binary, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def copy_through(mirror: MirrorProcess, ref: str, dest: Path, *extra: str) -> None:
    result = skopeo(
        "copy", "--src-tls-verify=false", *extra,
        f"docker://{mirror.address}/{ref}", f"dir:{dest}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def assert_dir_matches(dest: Path, image: Image) -> None:
    """The copied manifest is the upstream's, byte for byte, and every blob hashes right."""
    assert sha256_file(dest / "manifest.json") == image.digest
    for child in image.children:
        child_manifest = dest / f"{child.digest.split(':')[1]}.manifest.json"
        assert sha256_file(child_manifest) == child.digest
    for blob in image.all_blobs():
        path = dest / blob.digest.split(":")[1]
        assert path.exists(), f"{blob.digest} not copied"
        assert sha256_file(path) == blob.digest


def served(mirror: MirrorProcess, path_part: str) -> list[dict[str, object]]:
    return [
        e
        for e in mirror.log_events()
        if e.get("event") == "request" and path_part in str(e.get("path"))
    ]


@pytest.mark.parametrize("key", ["small", "ocismall", "team", "big"])
def test_skopeo_copies_single_arch_images(
    upstream: Upstream, mirror: MirrorProcess, tmp_path: Path, key: str
) -> None:
    image = upstream.images[key]
    copy_through(mirror, image.ref, tmp_path / "out")
    assert_dir_matches(tmp_path / "out", image)
    for blob in image.all_blobs():
        assert any(e["status"] == 200 for e in served(mirror, f"/blobs/{blob.digest}"))


@pytest.mark.parametrize("key", ["multi", "multidocker"])
def test_skopeo_copies_every_platform_of_an_index(
    upstream: Upstream, mirror: MirrorProcess, tmp_path: Path, key: str
) -> None:
    image = upstream.images[key]
    copy_through(mirror, image.ref, tmp_path / "out", "--all")
    assert_dir_matches(tmp_path / "out", image)
    index = json.loads((tmp_path / "out" / "manifest.json").read_bytes())
    assert index["mediaType"] == image.media_type


def test_second_copy_is_served_from_cache(
    upstream: Upstream, mirror: MirrorProcess, tmp_path: Path
) -> None:
    image = upstream.images["ocismall"]
    copy_through(mirror, image.ref, tmp_path / "first")
    gets_before = {b.digest: upstream.registry.blob_gets(b.digest) for b in image.all_blobs()}
    copy_through(mirror, image.ref, tmp_path / "second")
    assert_dir_matches(tmp_path / "second", image)
    for blob in image.all_blobs():
        assert upstream.registry.blob_gets(blob.digest) == gets_before[blob.digest]
        caches = [e["cache"] for e in served(mirror, f"/blobs/{blob.digest}")]
        assert caches[-1] == "hit"


def test_one_segment_names_mean_library_on_docker_hub_upstreams(
    upstream: Upstream, tmp_path: Path
) -> None:
    """With the Docker Hub rule on, `small` is `library/small`, as docker.io treats it."""
    mirror = MirrorProcess(
        tmp_path / "cache",
        upstream.url,
        log_path=tmp_path / "mirror.log",
        env={"REGISTRY_MIRROR_UPSTREAM_LIBRARY_PREFIX": "true"},
    )
    mirror.start()
    try:
        image = upstream.images["small"]
        copy_through(mirror, "small:latest", tmp_path / "out")
        assert_dir_matches(tmp_path / "out", image)
    finally:
        mirror.stop()


def test_private_repository_needs_upstream_credentials(upstream: Upstream, tmp_path: Path) -> None:
    image = upstream.images["private"]
    anonymous = MirrorProcess(tmp_path / "c1", upstream.url, log_path=tmp_path / "m1.log")
    anonymous.start()
    try:
        result = skopeo(
            "inspect", "--tls-verify=false", "--raw", f"docker://{anonymous.address}/{image.ref}"
        )
        assert result.returncode != 0
        assert "denied" in result.stderr.lower()
    finally:
        anonymous.stop()
