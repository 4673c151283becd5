"""Issue 22 end to end: real clients (skopeo, dockerd) through a mirror with prefetch and a
credential pool, in front of the real registry (token auth)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.engines import Dockerd
from tests.fixtures.mirror_server import MirrorProcess, wait_cached
from tests.fixtures.real_upstream import Upstream
from tests.fixtures.token_server import USERS
from tests.integration.test_skopeo import assert_dir_matches, copy_through, served, skopeo


@pytest.fixture
def pooled(upstream: Upstream, tmp_path: Path) -> Iterator[MirrorProcess]:
    """A mirror whose pool's first account is refused by the token service (so every request
    passes to `reader`), with prefetch on and the private images open to anonymous clients."""
    (tmp_path / "wrong").write_text("not-the-password\n")
    (tmp_path / "reader").write_text(USERS["reader"] + "\n")
    conf = tmp_path / "mirror.yaml"
    upstream_options = {
        "names": ["docker.io"],
        "credentials": [
            {"username": "pusher", "password_file": str(tmp_path / "wrong")},
            {"username": "reader", "password_file": str(tmp_path / "reader")},
        ],
        "serve_private_to_anonymous": True,
        "prefetch": True,
    }
    conf.write_text(json.dumps({"upstream": upstream_options}))
    mirror = MirrorProcess(
        tmp_path / "cache", upstream.url, "--config", str(conf), log_path=tmp_path / "mirror.log"
    )
    mirror.start()
    try:
        yield mirror
    finally:
        mirror.stop()


def test_skopeo_finds_the_whole_image_prefetched_and_private_images_through_the_pool(
    upstream: Upstream, pooled: MirrorProcess, tmp_path: Path
) -> None:
    image = upstream.images["ocismall"]
    before = {b.digest: upstream.registry.blob_gets(b.digest) for b in image.all_blobs()}
    result = skopeo(
        "inspect", "--tls-verify=false", "--raw", f"docker://{pooled.address}/{image.ref}"
    )
    assert result.returncode == 0, result.stderr  # the manifest only: no client asks for a blob
    for blob in image.all_blobs():
        wait_cached(pooled.cache_dir, blob.digest, timeout=30)

    def fetched(digest: str) -> int:  # by this mirror (the upstream serves the whole session)
        return upstream.registry.blob_gets(digest) - before[digest]

    assert all(fetched(b.digest) == 1 for b in image.all_blobs())
    copy_through(pooled, image.ref, tmp_path / "out")
    assert_dir_matches(tmp_path / "out", image)
    for blob in image.all_blobs():
        assert all(e["cache"] == "hit" for e in served(pooled, f"/blobs/{blob.digest}"))
        assert fetched(blob.digest) == 1

    private = upstream.images["private"]  # only `reader` may read it upstream
    copy_through(pooled, private.ref, tmp_path / "private")
    assert_dir_matches(tmp_path / "private", private)
    log = pooled.log_path.read_text()
    assert "upstream_account_refused" in log
    for secret in (USERS["reader"], "not-the-password"):
        assert secret not in log


def test_dockerd_pulls_through_a_pooled_prefetching_mirror(
    upstream: Upstream, pooled: MirrorProcess
) -> None:
    image = upstream.images["small"]
    before = {b.digest: upstream.registry.blob_gets(b.digest) for b in image.blobs}
    name = image.repo.removeprefix("library/")
    dockerd = Dockerd(pooled.url)
    dockerd.start()
    try:
        dockerd.pull(name)
        assert image.digest in dockerd.repo_digests(name)
    finally:
        dockerd.stop()
    for blob in image.blobs:
        requests = served(pooled, f"/blobs/{blob.digest}")
        assert requests and requests[-1]["status"] == 200, f"mirror did not serve {blob.digest}"
    # One upstream fetch per blob, whether the prefetch or dockerd started it.
    assert all(upstream.registry.blob_gets(b.digest) - before[b.digest] == 1 for b in image.blobs)
