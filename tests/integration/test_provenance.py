"""Provenance: private content never leaks under another name, whoever vouches for it.

The victim is the real token-authenticated registry (public `library/*`, private `private/*`)
with the mirror holding a reader's credentials. Anonymous requests for names that do not exist
leave no durable record.
"""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from mirror.cache.metadata import LocalMetadataStore
from mirror.config import load_config
from mirror.mediatypes import ALL_MANIFESTS
from mirror.upstream.guard import AddressClass, UpstreamNetwork, address_class
from mirror.web.keys import MIRROR
from tests.fixtures.fake_upstream import OCI_MANIFEST, FakeUpstream
from tests.fixtures.htpasswd import basic, write_htpasswd
from tests.fixtures.mirror_server import mirror_config, running_app
from tests.fixtures.real_upstream import Upstream
from tests.fixtures.synthetic_images import Image

ACCEPT = [("Accept", t) for t in ALL_MANIFESTS]
ALICE = ("alice", "alice-pw")
ATTACKER = "registry.attacker.test"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def privacy_rows(meta: Path) -> list[tuple[str, ...]]:
    """Every durable privacy record in a cache's metadata directory."""
    store = LocalMetadataStore(meta)
    try:
        return [k for k in store._db.iterkeys() if isinstance(k, tuple) and k[0] == "privacy"]
    finally:
        store.close()


async def test_requests_for_missing_repositories_leave_no_durable_record(
    upstream: Upstream, tmp_path: Path
) -> None:
    user, password = upstream.reader
    config = mirror_config(tmp_path / "cache", upstream.url, username=user, password=password)
    async with running_app(config) as (url, app), httpx.AsyncClient(base_url=url) as client:
        for i in range(40):
            r = await client.get(f"/v2/nosuch/repo{i}/manifests/latest", headers=ACCEPT)
            assert r.status_code in (401, 404), r.text
        small = upstream.images["small"]
        r = await client.get(f"/v2/{small.repo}/manifests/latest", headers=ACCEPT)
        assert r.status_code == 200
        assert r.headers["Docker-Content-Digest"] == small.digest
        mirror = app[MIRROR]
        assert await mirror.metadata.get_privacy(("default", "nosuch/repo0")) is None
        known = await mirror.metadata.get_privacy(("default", small.repo))
        assert known is not None and not known.private
    rows = privacy_rows(tmp_path / "cache" / "meta")
    assert rows == [("privacy", "default", small.repo)]


# -- an attacker's registry vouching for private digests ------------------------------------


class MappedResolver(AbstractResolver):
    """Names from a table, never DNS (no packet leaves loopback)."""

    def __init__(self, table: dict[str, str]) -> None:
        self.table = table

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host not in self.table:
            raise OSError(f"{host}: name not found (test resolver)")
        return [
            ResolveResult(
                hostname=host, host=self.table[host], port=port, family=socket.AF_INET,
                proto=0, flags=socket.AI_NUMERICHOST,
            )
        ]  # fmt: skip

    async def close(self) -> None:
        return None


@dataclass
class Scene:
    client: httpx.AsyncClient
    app: web.Application
    attacker: FakeUpstream
    ns: str  # how clients name the attacker's registry (`?ns=`)
    secret: Image


@asynccontextmanager
async def attacked_mirror(upstream: Upstream, tmp_path: Path) -> AsyncIterator[Scene]:
    """A mirror holding the real upstream's reader credentials, with client logins (alice may
    pull `private/*`), `allow_any_upstream`, and an attacker's registry reachable by a DNS
    name (the test network maps it to loopback and calls it public, as a real one would be)."""
    attacker = FakeUpstream(require_token=False)
    await attacker.start()
    port = int(attacker.url.rsplit(":", 1)[1])
    network = UpstreamNetwork(
        resolver=MappedResolver({ATTACKER: "127.0.0.1"}),
        classify=lambda host, ip: AddressClass.PUBLIC if host == ATTACKER else address_class(ip),
        dynamic_scheme="http",
    )
    user, password = upstream.reader
    settings = {
        "allow_any_upstream": True,
        "auth": {"htpasswd": str(write_htpasswd(tmp_path / "htpasswd", {ALICE[0]: ALICE[1]}))},
        "access": {
            "rules": [{"who": ["alice"], "repositories": ["default/private/*"], "action": "allow"}]
        },
    }
    (tmp_path / "cache").mkdir()
    (tmp_path / "mirror.yaml").write_text(yaml.safe_dump(settings))
    config = load_config(
        tmp_path / "mirror.yaml",
        env={},
        overrides={
            "cache.dir": str(tmp_path / "cache"),
            "upstream.url": upstream.url,
            "upstream.username": user,
            "upstream.password": password,
        },
    )
    try:
        async with (
            running_app(config, network=network) as (url, app),
            httpx.AsyncClient(base_url=url, timeout=30) as client,
        ):
            yield Scene(client, app, attacker, f"{ATTACKER}:{port}", upstream.images["private"])
    finally:
        await attacker.close()


async def pull_as_alice(client: httpx.AsyncClient, secret: Image) -> None:
    """An authorized user pulls the private image whole: now it is in the cache."""
    alice = basic(*ALICE)
    r = await client.get(
        f"/v2/{secret.repo}/manifests/{secret.tag}", headers=[*ACCEPT, *alice.items()]
    )
    assert r.status_code == 200 and sha(r.content) == secret.digest
    for blob in secret.all_blobs():
        r = await client.get(f"/v2/{secret.repo}/blobs/{blob.digest}", headers=alice)
        assert r.status_code == 200 and sha(r.content) == blob.digest


async def not_served(client: httpx.AsyncClient, path: str, digest: str, **params: str) -> None:
    """Whatever the answer, the private bytes are not in it."""
    try:
        r = await client.get(path, params=params)
    except httpx.RemoteProtocolError:
        return  # cut off short: the bytes it had were the attacker's own
    assert r.status_code != 200 or sha(r.content) != digest, r.status_code


async def test_another_registry_cannot_vouch_for_a_private_blob(
    upstream: Upstream, tmp_path: Path
) -> None:
    async with attacked_mirror(upstream, tmp_path) as scene:
        client = scene.client
        await pull_as_alice(client, scene.secret)
        layer = scene.secret.layers()[0]
        # The attacker's registry answers HEAD 200 for the digest (it holds other bytes).
        scene.attacker.blobs[layer.digest] = b"\0" * layer.size
        await not_served(client, f"/v2/x/blobs/{layer.digest}", layer.digest, ns=scene.ns)
        assert scene.attacker.count("GET", layer.digest) == 1  # it had to send bytes
        # ... and vouching made nothing public: not under a public name, not under its own.
        r = await client.get(f"/v2/library/small/blobs/{layer.digest}")
        assert r.status_code == 404 and r.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
        await not_served(client, f"/v2/x/blobs/{layer.digest}", layer.digest, ns=scene.ns)
        r = await client.head(f"/v2/library/small/blobs/{layer.digest}")
        assert r.status_code == 404


async def test_a_manifest_listing_private_digests_proves_nothing(
    upstream: Upstream, tmp_path: Path
) -> None:
    async with attacked_mirror(upstream, tmp_path) as scene:
        client = scene.client
        await pull_as_alice(client, scene.secret)
        secret = scene.secret
        listing = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": secret.all_blobs()[0].descriptor(),
                "layers": [b.descriptor() for b in secret.layers()],
            }
        ).encode()
        scene.attacker.manifests[("x", "latest")] = (listing, OCI_MANIFEST)
        r = await client.get("/v2/x/manifests/latest", params={"ns": scene.ns}, headers=ACCEPT)
        assert r.status_code == 200 and sha(r.content) == sha(listing)
        for blob in secret.all_blobs():
            for path, params in (
                (f"/v2/library/small/blobs/{blob.digest}", {}),
                (f"/v2/nosuch/repo/blobs/{blob.digest}", {}),
                (f"/v2/x/blobs/{blob.digest}", {"ns": scene.ns}),
            ):
                await not_served(client, path, blob.digest, **params)
        # The private manifest itself, by digest, under the attacker's name: not served.
        await not_served(client, f"/v2/x/manifests/{secret.digest}", secret.digest, ns=scene.ns)
        # Alice still pulls her image.
        await pull_as_alice(client, secret)
