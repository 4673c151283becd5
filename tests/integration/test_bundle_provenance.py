"""Air-gap bundles carry provenance, and an imported tag never outranks the upstream.

A guarded mirror (it holds upstream credentials) serves a digest only under repositories known to
hold it; a bundle that dropped that knowledge let a user the rules deny read private layers under
any public repository's name offline. And an imported tag, once recorded as fresh, was answered
instead of the upstream's until `tag_ttl` ran out.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import httpx
import yaml

from mirror.cli import main
from tests.fixtures.htpasswd import basic, write_htpasswd
from tests.fixtures.mirror_server import MirrorProcess, sha256_digest
from tests.fixtures.real_upstream import Upstream
from tests.fixtures.synthetic_images import Image
from tests.integration.test_front_door import ACCEPT, USERS, manifest_digest
from tests.integration.test_skopeo import skopeo

CLOSED = "http://127.0.0.1:9"  # no upstream at all


def guarded_config(tmp_path: Path, upstream: Upstream) -> Path:
    """Upstream credentials, alice and bob, and `private/*` for alice only."""
    settings: dict[str, Any] = {
        "upstream": {
            "url": upstream.url,
            "names": ["docker.io"],
            "username": upstream.reader[0],
            "password": upstream.reader[1],
        },
        "auth": {"htpasswd": str(write_htpasswd(tmp_path / "htpasswd", USERS))},
        "access": {
            "rules": [
                {"who": ["alice"], "repositories": ["default/private/*"], "action": "allow"},
                {"who": ["*"], "repositories": ["default/private/*"], "action": "deny"},
            ]
        },
    }
    path = tmp_path / "mirror.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def serve(cache: Path, url: str, config: Path, log: Path, *, offline: bool) -> MirrorProcess:
    env = {"REGISTRY_MIRROR_OFFLINE": "true"} if offline else {}
    mirror = MirrorProcess(cache, url, "--config", str(config), log_path=log, env=env)
    mirror.start()
    return mirror


def headers(user: str | None) -> list[tuple[str, str]]:
    return [*ACCEPT, *(basic(user, USERS[user]).items() if user else ())]


def pull(mirror: MirrorProcess, image: Image, user: str | None) -> None:
    """The image by tag and each of its blobs, every digest checked."""
    r = httpx.get(f"{mirror.url}/v2/{image.repo}/manifests/{image.tag}", headers=headers(user))
    assert manifest_digest(r) == image.digest
    for blob in image.blobs:
        r = httpx.get(f"{mirror.url}/v2/{image.repo}/blobs/{blob.digest}", headers=headers(user))
        assert r.status_code == 200, (user, blob.digest, r.text)
        assert sha256_digest(r.content) == blob.digest


def test_provenance_crosses_the_air_gap_and_private_layers_stay_private(
    upstream: Upstream, tmp_path: Path
) -> None:
    config = guarded_config(tmp_path, upstream)
    small, secret = upstream.images["small"], upstream.images["private"]
    a, b = tmp_path / "a", tmp_path / "b"
    online = serve(a, upstream.url, config, tmp_path / "online.log", offline=False)
    try:
        pull(online, small, None)
        pull(online, secret, "alice")
    finally:
        online.stop()
    bundle = tmp_path / "site.tar"
    export = ["export", "--config", str(config), "--cache-dir", str(a), "-o", str(bundle)]
    assert main([*export, small.ref, secret.ref]) == 0

    # What the bundle says: small's digests public, secret's only under its own repository.
    with tarfile.open(bundle) as tar:
        member = tar.extractfile("registry-mirror.json")
        assert member is not None
        sidecar = json.load(member)
    origins = sidecar["origins"]
    for blob in [*small.blobs, small]:
        assert origins[blob.digest] == {"public": True, "repos": []}
    for blob in [*secret.blobs, secret]:
        assert origins[blob.digest] == {"public": False, "repos": ["default/private/secret"]}
    assert sorted(sidecar["privacy"], key=lambda p: p["repository"]) == [
        {"upstream": "default", "repository": "library/small", "private": False},
        {"upstream": "default", "repository": "private/secret", "private": True},
    ]

    assert main(["import", "--config", str(config), "--cache-dir", str(b), str(bundle)]) == 0
    offline = serve(b, CLOSED, config, tmp_path / "offline.log", offline=True)
    try:
        base = offline.url
        layer = secret.layers()[0].digest
        r = httpx.get(f"{base}/v2/{secret.repo}/manifests/{secret.tag}", headers=headers("bob"))
        assert r.status_code == 403 and r.json()["errors"][0]["code"] == "DENIED"
        r = httpx.get(f"{base}/v2/{secret.repo}/manifests/{secret.tag}", headers=headers(None))
        assert r.status_code == 401
        # The private manifest and layer by digest, under names bob and anyone may use.
        for user in ("bob", None):
            for repo in ("library/small", "nosuch/repo"):
                for path in (f"manifests/{secret.digest}", f"blobs/{layer}"):
                    r = httpx.get(f"{base}/v2/{repo}/{path}", headers=headers(user))
                    assert r.status_code in (401, 403, 404), (user, repo, path, r.status_code)
                r = httpx.head(f"{base}/v2/{repo}/blobs/{layer}", headers=headers(user))
                assert r.status_code in (401, 403, 404), (user, repo, "HEAD", r.status_code)
        pull(offline, secret, "alice")
        for user in (None, "bob", "alice"):
            pull(offline, small, user)  # public: anyone, offline too
    finally:
        offline.stop()


def test_an_imported_tag_is_revalidated_with_the_upstream_on_first_use(
    upstream: Upstream, tmp_path: Path
) -> None:
    small, other = upstream.images["small"], upstream.images["ocismall"]
    a, b = tmp_path / "a", tmp_path / "b"
    warm = ["warm", "--cache-dir", str(a), "--upstream", upstream.url, other.ref]
    assert main(warm) == 0
    layout = tmp_path / "layout"
    assert (
        main(["export", "--cache-dir", str(a), "--format", "dir", "-o", str(layout), other.ref])
        == 0
    )
    # The bundle claims library/small:latest is ocismall's manifest.
    index = json.loads((layout / "index.json").read_text())
    index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] = small.ref
    (layout / "index.json").write_text(json.dumps(index))
    assert main(["import", "--cache-dir", str(b), str(layout)]) == 0

    url = f"/v2/{small.repo}/manifests/{small.tag}"
    offline = MirrorProcess(
        b, CLOSED, log_path=tmp_path / "offline.log", env={"REGISTRY_MIRROR_OFFLINE": "true"}
    )
    offline.start()
    try:  # offline, the bundle is all there is to go by
        assert manifest_digest(httpx.get(offline.url + url, headers=ACCEPT)) == other.digest
    finally:
        offline.stop()
    online = MirrorProcess(b, upstream.url, log_path=tmp_path / "online.log")
    online.start()
    try:  # online, the upstream says what the tag is, at once (tag_ttl is 10 minutes)
        assert manifest_digest(httpx.get(online.url + url, headers=ACCEPT)) == small.digest
        assert manifest_digest(httpx.get(online.url + url, headers=ACCEPT)) == small.digest
    finally:
        online.stop()


def test_a_bundle_without_provenance_is_held_back_offline(
    upstream: Upstream, tmp_path: Path
) -> None:
    """A skopeo layout says nothing of where its digests came from: offline, a guarded mirror
    serves them only to clients no rule limits (here: nobody), never under any name to bob."""
    config = guarded_config(tmp_path, upstream)
    secret = upstream.images["private"]
    layout = tmp_path / "layout"
    result = skopeo(
        "copy", "--src-tls-verify=false", "--src-creds", ":".join(upstream.reader),
        f"docker://{upstream.url.removeprefix('http://')}/{secret.ref}", f"oci:{layout}:1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    cache = tmp_path / "cache"
    args = ["import", "--config", str(config), "--cache-dir", str(cache), str(layout)]
    assert main([*args, "--repository", secret.repo]) == 0
    offline = serve(cache, CLOSED, config, tmp_path / "offline.log", offline=True)
    try:
        layer = secret.layers()[0].digest
        for user in ("bob", None):
            for repo in ("library/small", "nosuch/repo"):
                for path in (f"manifests/{secret.digest}", f"blobs/{layer}"):
                    r = httpx.get(f"{offline.url}/v2/{repo}/{path}", headers=headers(user))
                    assert r.status_code in (401, 403, 404), (user, repo, path, r.status_code)
    finally:
        offline.stop()
