"""The test upstream behaves like Docker Hub: token challenge, anonymous pulls, a private repo."""

from __future__ import annotations

import hashlib

import httpx

from tests.fixtures.real_upstream import Upstream
from tests.fixtures.token_server import SERVICE


def _token(upstream: Upstream, repo: str, auth: tuple[str, str] | None = None) -> str:
    resp = httpx.get(
        upstream.tokens.realm,
        params={"service": SERVICE, "scope": f"repository:{repo}:pull"},
        auth=auth,
    )
    resp.raise_for_status()
    return str(resp.json()["token"])


def test_anonymous_pull_by_token_challenge(upstream: Upstream) -> None:
    image = upstream.images["small"]
    url = f"{upstream.url}/v2/{image.repo}/manifests/{image.tag}"
    challenge = httpx.get(url)
    assert challenge.status_code == 401
    assert challenge.headers["WWW-Authenticate"].startswith("Bearer realm=")
    headers = {
        "Authorization": f"Bearer {_token(upstream, image.repo)}",
        "Accept": image.media_type,
    }
    resp = httpx.get(url, headers=headers)
    assert resp.status_code == 200
    assert "sha256:" + hashlib.sha256(resp.content).hexdigest() == image.digest
    blob = image.blobs[1]
    before = upstream.registry.blob_gets(blob.digest)
    data = httpx.get(f"{upstream.url}/v2/{image.repo}/blobs/{blob.digest}", headers=headers)
    assert "sha256:" + hashlib.sha256(data.content).hexdigest() == blob.digest
    assert upstream.registry.blob_gets(blob.digest) == before + 1


def test_private_repository_needs_credentials(upstream: Upstream) -> None:
    image = upstream.images["private"]
    url = f"{upstream.url}/v2/{image.repo}/manifests/{image.tag}"
    anonymous = httpx.get(url, headers={"Authorization": f"Bearer {_token(upstream, image.repo)}"})
    assert anonymous.status_code == 401
    token = _token(upstream, image.repo, upstream.reader)
    reader = httpx.get(
        url, headers={"Authorization": f"Bearer {token}", "Accept": image.media_type}
    )
    assert reader.status_code == 200
    assert "sha256:" + hashlib.sha256(reader.content).hexdigest() == image.digest
