"""dockerd, containerd and podman pull real images through the mirror, as users run them."""

from __future__ import annotations

import platform

import pytest

from tests.fixtures.engines import Containerd, Dockerd, Podman
from tests.fixtures.mirror_server import MirrorProcess
from tests.fixtures.real_upstream import Upstream
from tests.fixtures.synthetic_images import Image

ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def platform_image(image: Image) -> Image:
    """What an engine pulls: the image itself, or its index's entry for this machine."""
    if not image.children:
        return image
    return next(c for c in image.children if c.platform and c.platform["architecture"] == ARCH)


def blob_requests(mirror: MirrorProcess, digest: str) -> list[dict[str, object]]:
    return [
        e
        for e in mirror.log_events()
        if e.get("event") == "request"
        and e.get("method") == "GET"
        and f"/blobs/{digest}" in str(e.get("path"))
    ]


def assert_pulled_through(
    upstream: Upstream, mirror: MirrorProcess, image: Image, pull_again
) -> None:  # type: ignore[no-untyped-def]
    """The mirror served every blob of the pulled platform; a second pull is all cache hits."""
    pulled = platform_image(image)
    for blob in pulled.blobs:
        served = blob_requests(mirror, blob.digest)
        assert served and served[-1]["status"] == 200, f"mirror did not serve {blob.digest}"
    fetched = {b.digest: upstream.registry.blob_gets(b.digest) for b in pulled.blobs}
    pull_again()
    for blob in pulled.blobs:
        served = blob_requests(mirror, blob.digest)
        assert served[-1]["cache"] == "hit" and served[-1]["status"] == 200
        assert upstream.registry.blob_gets(blob.digest) == fetched[blob.digest]


@pytest.mark.parametrize("key", ["small", "multi"])
def test_dockerd_pulls_docker_hub_names_through_the_mirror(
    upstream: Upstream, mirror: MirrorProcess, key: str
) -> None:
    image = upstream.images[key]
    name = image.repo.removeprefix("library/")
    dockerd = Dockerd(mirror.url)
    dockerd.start()
    try:
        dockerd.pull(name)
        assert image.digest in dockerd.repo_digests(name)

        def pull_again() -> None:
            dockerd.remove(name)
            dockerd.pull(name)

        assert_pulled_through(upstream, mirror, image, pull_again)
    finally:
        dockerd.stop()


@pytest.mark.parametrize("key", ["ocismall", "multidocker"])
def test_containerd_pulls_through_a_hosts_toml_mirror(
    upstream: Upstream, mirror: MirrorProcess, key: str
) -> None:
    image = upstream.images[key]
    ref = f"docker.io/{image.ref}"
    first = Containerd(mirror.url)
    first.start()
    try:
        first.pull(ref)
        assert first.image_digest(ref) == image.digest
    finally:
        first.stop()
    assert any("ns=docker.io" in str(e.get("path")) for e in mirror.log_events())

    def pull_again() -> None:
        fresh = Containerd(mirror.url)
        fresh.start()
        try:
            fresh.pull(ref)
            assert fresh.image_digest(ref) == image.digest
        finally:
            fresh.stop()

    assert_pulled_through(upstream, mirror, image, pull_again)


@pytest.mark.parametrize("key", ["multi", "small"])
def test_podman_pulls_through_a_registries_conf_mirror(
    upstream: Upstream, mirror: MirrorProcess, key: str
) -> None:
    image = upstream.images[key]
    ref = f"docker.io/{image.ref}"
    first = Podman(mirror.address)
    try:
        first.pull(ref)
        assert first.image_digest(ref) == image.digest
    finally:
        first.close()

    def pull_again() -> None:
        fresh = Podman(mirror.address)
        try:
            fresh.pull(ref)
            assert fresh.image_digest(ref) == image.digest
        finally:
            fresh.close()

    assert_pulled_through(upstream, mirror, image, pull_again)
