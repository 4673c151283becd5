"""Real clients push to hosted repositories and pull back out through another client:
`docker push` (dockerd with the mirror as an insecure registry), `podman push`, `skopeo copy`;
digests compared, every blob hashed. A user without the push rule is refused; kill -9 during
an upload leaves nothing visible and the upload can be redone."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fixtures.engines import Dockerd, Podman
from tests.fixtures.htpasswd import write_htpasswd
from tests.fixtures.mirror_server import MirrorProcess
from tests.integration.test_skopeo import sha256_file, skopeo

NOWHERE = "http://127.0.0.1:9"
ALICE, BOB = "alice:alice-pw", "bob:bob-pw"


@pytest.fixture
def hosted_mirror(tmp_path: Path) -> Iterator[MirrorProcess]:
    """A mirror hosting `internal/*`: alice may push and pull there, bob only pull."""
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {"alice": "alice-pw", "bob": "bob-pw"})
    config = tmp_path / "mirror.yaml"
    config.write_text(
        json.dumps(
            {
                "auth": {"htpasswd": str(htpasswd)},
                "hosted": {"repositories": ["internal/*"]},
                "access": {
                    "rules": [
                        {
                            "who": ["alice"],
                            "repositories": ["hosted/internal/*"],
                            "actions": ["pull", "push", "delete"],
                        }
                    ]
                },
            }
        )
    )
    proc = MirrorProcess(
        tmp_path / "cache", NOWHERE, "--config", str(config), log_path=tmp_path / "mirror.log"
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def requests_to(mirror: MirrorProcess, method: str, part: str) -> list[dict[str, object]]:
    return [
        e
        for e in mirror.log_events()
        if e.get("event") == "request" and e.get("method") == method and part in str(e["path"])
    ]


def assert_dir_is(dest: Path, digest: str) -> None:
    """skopeo's `dir:` copy: the manifest has `digest`, and every blob it names hashes right."""
    assert sha256_file(dest / "manifest.json") == digest
    manifest = json.loads((dest / "manifest.json").read_bytes())
    for descriptor in [manifest["config"], *manifest["layers"]]:
        assert sha256_file(dest / descriptor["digest"].split(":")[1]) == descriptor["digest"]


def root_tar(seed: str) -> bytes:
    """A small root file system for `docker import`."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for n in range(3):
            data = hashlib.sha256(f"{seed}{n}".encode()).digest() * 2000
            info = tarfile.TarInfo(f"data/file{n}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.timeout(600)
def test_docker_push_then_skopeo_and_podman_pull(
    hosted_mirror: MirrorProcess, tmp_path: Path
) -> None:
    address = hosted_mirror.address
    ref = f"{address}/internal/app:1"
    (tmp_path / "root.tar").write_bytes(root_tar("docker"))
    dockerd = Dockerd(hosted_mirror.url, insecure_registry=address)
    dockerd.start()
    try:
        assert dockerd.docker("import", str(tmp_path / "root.tar"), ref).returncode == 0
        login = dockerd.docker(
            "login", address, "-u", "alice", "--password-stdin", stdin="alice-pw"
        )
        assert login.returncode == 0, login.stderr
        pushed = dockerd.docker("push", ref)
        assert pushed.returncode == 0, pushed.stderr + pushed.stdout
    finally:
        dockerd.stop()
    found = re.search(r"digest: (sha256:[0-9a-f]{64})", pushed.stdout)
    assert found, pushed.stdout
    digest = found[1]
    assert [e["status"] for e in requests_to(hosted_mirror, "PUT", "/manifests/1")] == [201]
    # Out through skopeo, as alice (pull allowed by default, anonymous too).
    out = tmp_path / "skopeo-out"
    result = skopeo(
        "copy", "--src-tls-verify=false", "--src-creds", ALICE, f"docker://{ref}", f"dir:{out}"
    )
    assert result.returncode == 0, result.stderr
    assert_dir_is(out, digest)
    # And through podman.
    podman = Podman(address)
    try:
        podman.pull(ref, "--tls-verify=false", "--creds", ALICE)
        assert podman.image_digest(ref) == digest
    finally:
        podman.close()


@pytest.mark.timeout(600)
def test_skopeo_and_podman_push_and_a_user_without_the_rule_is_refused(
    hosted_mirror: MirrorProcess, tmp_path: Path
) -> None:
    address = hosted_mirror.address
    source = tmp_path / "oci"
    _oci_layout(source)
    pushed = skopeo(
        "copy", "--dest-tls-verify=false", "--dest-creds", ALICE,
        f"oci:{source}:v1", f"docker://{address}/internal/skopeo:v1",
    )  # fmt: skip
    assert pushed.returncode == 0, pushed.stderr
    refused = skopeo(
        "copy", "--dest-tls-verify=false", "--dest-creds", BOB,
        f"oci:{source}:v1", f"docker://{address}/internal/bob:v1",
    )  # fmt: skip
    assert refused.returncode != 0
    assert "denied" in refused.stderr.lower(), refused.stderr
    assert {e["status"] for e in requests_to(hosted_mirror, "POST", "/internal/bob/")} == {403}
    inspect = skopeo(
        "inspect", "--tls-verify=false", "--raw", f"docker://{address}/internal/bob:v1"
    )
    assert inspect.returncode != 0  # nothing of bob's push is visible
    # podman: pull what skopeo pushed, push it on under another name, copy that out.
    podman = Podman(address)
    try:
        podman.pull(f"{address}/internal/skopeo:v1", "--tls-verify=false", "--creds", ALICE)
        digest_file = tmp_path / "podman.digest"
        result = podman.podman(
            "push", "--tls-verify=false", "--creds", ALICE, "--digestfile", str(digest_file),
            f"{address}/internal/skopeo:v1", f"{address}/internal/podman:v1",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        refused_podman = podman.podman(
            "push", "--tls-verify=false", "--creds", BOB,
            f"{address}/internal/skopeo:v1", f"{address}/internal/bob:v2",
        )  # fmt: skip
        assert refused_podman.returncode != 0
    finally:
        podman.close()
    out = tmp_path / "out"
    result = skopeo(
        "copy", "--src-tls-verify=false", f"docker://{address}/internal/podman:v1", f"dir:{out}"
    )
    assert result.returncode == 0, result.stderr
    assert_dir_is(out, digest_file.read_text().strip())


def _oci_layout(dest: Path) -> None:
    """A one-layer OCI image layout tagged v1 (no network: written by hand)."""
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    layer = put(root_tar("skopeo"))
    config = put(
        json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]},
            }
        ).encode()
    )
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **layer}],
        }
    ).encode()
    entry = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        **put(manifest),
        "annotations": {"org.opencontainers.image.ref.name": "v1"},
    }
    (dest / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    (dest / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


def test_kill_9_during_an_upload_leaves_nothing_visible(tmp_path: Path) -> None:
    config = tmp_path / "mirror.yaml"
    config.write_text(
        json.dumps(
            {
                "hosted": {"repositories": ["internal/*"]},
                "access": {
                    "rules": [
                        {
                            "who": ["*"],
                            "repositories": ["hosted/*"],
                            "actions": ["pull", "push"],
                        }
                    ]
                },
            }
        )
    )
    mirror = MirrorProcess(
        tmp_path / "cache", NOWHERE, "--config", str(config), log_path=tmp_path / "mirror.log"
    )
    data = hashlib.sha256(b"seed").digest() * (4 * 1024 * 1024 // 32)  # 4 MiB
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blob_url = f"{mirror.url}/v2/internal/app/blobs/{digest}"
    mirror.start()
    try:
        r = httpx.post(f"{mirror.url}/v2/internal/app/blobs/uploads/", timeout=10)
        location = mirror.url + r.headers["Location"]
        sent = threading.Event()

        def slow_body() -> Iterator[bytes]:
            for n in range(0, len(data), 256 * 1024):
                if n >= len(data) // 2:
                    sent.set()
                    time.sleep(0.5)
                yield data[n : n + 256 * 1024]

        def upload() -> None:
            with contextlib.suppress(httpx.HTTPError):  # the mirror dies under it
                httpx.put(location, params={"digest": digest}, content=slow_body(), timeout=30)

        uploader = threading.Thread(target=upload)
        uploader.start()
        assert sent.wait(10)
        time.sleep(0.3)
        mirror.kill()
        uploader.join(30)
        mirror.start()
        assert httpx.head(blob_url, timeout=10).status_code == 404
        hosted_files = [p for p in (tmp_path / "cache" / "blobs").rglob("*") if p.is_file()]
        assert hosted_files == []
        # Redone from scratch: committed, and the bytes that come back are the right ones.
        r = httpx.post(
            f"{mirror.url}/v2/internal/app/blobs/uploads/",
            params={"digest": digest},
            content=data,
            timeout=30,
        )
        assert r.status_code == 201, r.text
        got = httpx.get(blob_url, timeout=30)
        assert got.status_code == 200
        assert "sha256:" + hashlib.sha256(got.content).hexdigest() == digest
    finally:
        mirror.stop()
