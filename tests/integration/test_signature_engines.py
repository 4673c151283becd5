"""dockerd and containerd pull through a mirror that enforces signatures: a signed image
arrives, an unsigned one and one signed by another key are refused, and the refusal (the
mirror's 403 DENIED with its reason) is what the engine reports and the mirror logs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures.cosign import Key, Plain, payload_for
from tests.fixtures.engines import Containerd, Dockerd
from tests.fixtures.mirror_server import MirrorProcess
from tests.fixtures.real_upstream import Upstream
from tests.fixtures.synthetic_images import Builder, Pusher


@dataclass
class Images:
    digests: dict[str, str]  # name (library/<name>) -> manifest digest
    key: Key


@pytest.fixture(scope="module")
def images(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Images]:
    """Three images on the real upstream: signed by our key, unsigned, signed by another."""
    builder = Builder(tmp_path_factory.mktemp("signed-images"))
    pusher = Pusher(upstream.url, upstream.tokens)
    plain = Plain(upstream.url, lambda repo: pusher._auth(repo))
    key, other = Key.ecdsa(), Key.ecdsa()
    digests = {}
    try:
        for name in ("signedimg", "unsignedimg", "strangerimg"):
            image = builder.image(f"library/{name}", "latest", [2048, 30_000], oci=True)
            pusher.push(image)
            digests[name] = image.digest
        for name, signer in (("signedimg", key), ("strangerimg", other)):
            payload = payload_for(digests[name], f"docker.io/library/{name}")
            plain.signature(f"library/{name}", digests[name], signer.sign(payload), payload)
        yield Images(digests, key)
    finally:
        plain.close()
        pusher.close()


@pytest.fixture
def enforcing(upstream: Upstream, images: Images, tmp_path: Path) -> Iterator[MirrorProcess]:
    key_file = tmp_path / "cosign.pub"
    key_file.write_text(images.key.public_pem)
    rule = {"repositories": ["default/library/*img"], "keys": [str(key_file)], "mode": "enforce"}
    proc = MirrorProcess(
        tmp_path / "cache",
        upstream.url,
        log_path=tmp_path / "mirror.log",
        env={
            "REGISTRY_MIRROR_UPSTREAM_NAMES": "docker.io",
            "REGISTRY_MIRROR_VERIFY": json.dumps([rule]),
        },
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def refusals(mirror: MirrorProcess, name: str) -> list[str]:
    return [
        str(e.get("outcome"))
        for e in mirror.log_events()
        if e.get("event") == "signature_check_failed"
        and f"library/{name}" in str(e.get("repository"))
    ]


def denied(mirror: MirrorProcess, name: str) -> list[dict[str, object]]:
    return [
        e
        for e in mirror.log_events()
        if e.get("event") == "request"
        and f"/library/{name}/manifests/" in str(e.get("path"))
        and e.get("status") == 403
    ]


def test_dockerd_pulls_signed_and_is_refused_the_rest(
    enforcing: MirrorProcess, images: Images
) -> None:
    dockerd = Dockerd(enforcing.url)
    dockerd.start()
    try:
        dockerd.pull("signedimg")
        assert images.digests["signedimg"] in dockerd.repo_digests("signedimg")
        for name, outcome in (
            ("unsignedimg", "unsigned"),
            ("strangerimg", "signed by another key"),
        ):
            with pytest.raises(AssertionError) as failed:
                dockerd.pull(name)
            # dockerd falls back to Docker Hub on any mirror error and reports the fallback's
            # failure (here the closed proxy), not the mirror's 403: the refusal is the mirror's.
            assert f"docker pull {name} failed" in str(failed.value)
            assert set(refusals(enforcing, name)) == {outcome}
            assert denied(enforcing, name), f"the mirror did not refuse {name}"
    finally:
        dockerd.stop()


def test_containerd_pulls_signed_and_is_refused_the_rest(
    enforcing: MirrorProcess, images: Images
) -> None:
    ctr = Containerd(enforcing.url)
    ctr.start()
    try:
        ctr.pull("docker.io/library/signedimg:latest")
        assert ctr.image_digest("docker.io/library/signedimg:latest") == images.digests["signedimg"]
        for name, outcome in (
            ("unsignedimg", "unsigned"),
            ("strangerimg", "signed by another key"),
        ):
            with pytest.raises(AssertionError) as failed:
                ctr.pull(f"docker.io/library/{name}:latest")
            assert f"{enforcing.address} failed with status code [manifests latest]: 403" in str(
                failed.value
            )
            assert set(refusals(enforcing, name)) == {outcome}
            assert denied(enforcing, name), f"the mirror did not refuse {name}"
    finally:
        ctr.stop()
