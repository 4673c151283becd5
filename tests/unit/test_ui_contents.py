"""The operator page's contents summary and image evict, on a real cache directory (no network)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mirror.access import Policy, Principal, Rule
from mirror.cache.metadata import TagKey, TagRecord
from mirror.cache_policy import CachePolicy, EvictResult
from mirror.config import load_config
from mirror.contents import Catalog, select
from mirror.mirror import Mirror
from mirror.node import Node, open_node
from mirror.reference import Digest
from mirror.web.ui import pin_ref

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def digest_of(data: bytes) -> Digest:
    return Digest("sha256:" + hashlib.sha256(data).hexdigest())


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    """The node a server or a command assembles (no upstream connections)."""
    config = load_config(None, env={}, overrides={"cache.dir": str(tmp_path)})
    async with open_node(config) as n:
        yield n


@pytest.fixture
def mirror(node: Node) -> Mirror:
    return node.mirror


@pytest.fixture
def policy(node: Node) -> CachePolicy:
    return node.policy


async def put(mirror: Mirror, data: bytes, kind: str = "blob") -> Digest:
    digest = digest_of(data)
    await mirror.store.put_bytes(digest, data)
    mirror.index.add(digest, len(data), kind)
    return digest


async def image(
    mirror: Mirror, repo: str, tag: str, layers: list[bytes], *, cache_layers: bool = True
) -> Digest:
    """A one-platform OCI image under `repo:tag` (its layers cached unless told otherwise)."""
    config = json.dumps({"repo": repo, "tag": tag}).encode()
    descriptors = []
    for layer in layers:
        d = await put(mirror, layer) if cache_layers else digest_of(layer)
        descriptors.append({"mediaType": "x/layer", "digest": d, "size": len(layer)})
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "x/config", "digest": await put(mirror, config), "size": 1},
            "layers": descriptors,
        }
    ).encode()
    digest = await put(mirror, manifest, "manifest")
    await mirror.metadata.put_media_type(digest, OCI_MANIFEST)
    await mirror.metadata.put_tag(("default", repo, tag), TagRecord(digest, OCI_MANIFEST, 1.0))
    return digest


async def test_summary_sizes_flags_search_sort_and_pages(mirror: Mirror, node: Node) -> None:
    shared = b"S" * 1000
    await image(mirror, "library/alpha", "1", [shared, b"a" * 500])
    await image(mirror, "library/alpha", "2", [shared, b"b" * 300])
    await image(mirror, "library/beta", "latest", [b"c" * 5000])
    await image(mirror, "org/gamma", "v1", [b"d" * 10], cache_layers=False)
    for n in range(120):
        await image(mirror, f"bulk/r{n:03d}", "t", [f"bulk{n}".encode()])
    await _pin(mirror, "library/beta:latest")
    catalog = Catalog(node)
    snap = await catalog.refresh()

    alpha = snap.repo("default", "library/alpha")
    assert alpha is not None and [t.tag for t in alpha.tags] == ["1", "2"]
    one = alpha.tags[0]
    assert f"{mirror.store.blob_dir}/{one.digest[7:9]}/{one.digest[7:]}" == str(
        mirror.store.path_for(one.digest)
    )  # the layout the summary stats files by
    assert one.complete and not one.pinned
    manifest_size = mirror.index.get(one.digest).size  # type: ignore[union-attr]
    config_size = one.size - manifest_size - 1500
    assert config_size > 0
    # The shared layer counts once for the repository.
    assert alpha.size == sum(t.size for t in alpha.tags) - 1000
    beta = snap.repo("default", "library/beta")
    assert beta is not None and beta.pinned and beta.tags[0].pinned
    gamma = snap.repo("default", "org/gamma")
    assert gamma is not None and not gamma.complete

    everyone = lambda _u, _r: True  # noqa: E731
    rows, total = select(snap, visible=everyone, query="LIBRARY/", sort="name")
    assert total == 2 and [r.repository for r in rows] == ["library/alpha", "library/beta"]
    rows, total = select(snap, visible=everyone, sort="size", limit=1)
    assert total == 123 and rows[0].repository == "library/beta"
    page3, total = select(snap, visible=everyone, query="bulk", offset=100, limit=50)
    assert total == 120 and [r.repository for r in page3][:2] == ["bulk/r100", "bulk/r101"]
    assert len(page3) == 20

    policy = Policy([Rule(("*",), ("default/org/*",), allow=False)])
    viewer = Principal("viewer")
    rows, total = select(
        snap, visible=lambda u, r: policy.allows(viewer, u, r), query="gamma", sort="name"
    )
    assert (rows, total) == ([], 0)


async def _pin(mirror: Mirror, ref: str) -> None:
    mirror.index.set_pins(mirror.index.pins() | {ref})


async def evict(policy: CachePolicy, catalog: Catalog, key: TagKey) -> EvictResult:
    """What the page's evict does: the policy removes, then the summary is rebuilt."""
    result = await policy.evict_image(key, (await catalog.refresh()).references)
    await catalog.refresh()
    return result


async def test_evict_keeps_what_other_images_and_pins_share(
    mirror: Mirror, node: Node, policy: CachePolicy
) -> None:
    shared = b"S" * 1000
    pinned_layer = b"P" * 700
    first = await image(mirror, "library/app", "1", [shared, b"only-one" * 10])
    await image(mirror, "library/app", "2", [shared])
    await image(mirror, "library/keep", "1", [pinned_layer])
    victim = await image(mirror, "library/victim", "1", [pinned_layer, b"v" * 99])
    await _pin(mirror, "library/keep:1")
    catalog = Catalog(node)
    await catalog.refresh()

    result = await evict(policy, catalog, ("default", "library/app", "1"))
    assert first in result.removed
    assert digest_of(b"only-one" * 10) in result.removed
    assert digest_of(shared) not in result.removed and result.kept_shared >= 1
    assert await mirror.store.stat(digest_of(shared)) == 1000
    assert await mirror.store.stat(first) is None
    assert mirror.index.get(first) is None
    assert await mirror.metadata.get_tag(("default", "library/app", "1")) is None
    assert await mirror.cached_manifest(first) is None  # not answered from memory either
    snap = await catalog.snapshot()
    app = snap.repo("default", "library/app")
    assert app is not None and [t.tag for t in app.tags] == ["2"] and app.complete

    result = await evict(policy, catalog, ("default", "library/victim", "1"))
    assert victim in result.removed
    assert await mirror.store.stat(digest_of(pinned_layer)) == 700  # a pinned image's layer
    assert await mirror.store.stat(digest_of(b"v" * 99)) is None
    assert (await catalog.snapshot()).repo("default", "library/victim") is None


async def test_index_of_platforms_is_listed_with_each_platform(mirror: Mirror, node: Node) -> None:
    amd = await image(mirror, "library/multi", "amd", [b"x" * 10])
    arm = await image(mirror, "library/multi", "arm", [b"y" * 20], cache_layers=False)
    amd64 = {"os": "linux", "architecture": "amd64"}
    arm64 = {"os": "linux", "architecture": "arm64", "variant": "v8"}
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": amd, "size": 1, "platform": amd64},
            {"mediaType": OCI_MANIFEST, "digest": arm, "size": 1, "platform": arm64},
        ],
    }
    top = await put(mirror, json.dumps(doc).encode(), "manifest")
    await mirror.metadata.put_tag(
        ("default", "library/multi", "latest"), TagRecord(top, OCI_INDEX, 1)
    )
    catalog = Catalog(node)
    refs = catalog.refs(top)
    assert refs is not None
    assert [p for _, p, _ in refs.children] == ["linux/amd64", "linux/arm64/v8"]
    digests, whole = catalog.references(top)
    assert whole and {top, amd, arm, digest_of(b"x" * 10), digest_of(b"y" * 20)} <= digests
    snap = await catalog.refresh()
    multi = snap.repo("default", "library/multi")
    assert multi is not None
    latest = next(t for t in multi.tags if t.tag == "latest")
    assert not latest.complete  # the arm64 layer is not cached


async def test_pin_refs_route_back_to_their_upstream(tmp_path: Path) -> None:
    conf = tmp_path / "mirror.yaml"
    conf.write_text(
        "upstreams:\n  ghcr:\n    url: https://ghcr.io\n    aliases: [gh]\n"
        "  quay:\n    url: https://quay.io\n"
    )
    config = load_config(conf, env={}, overrides={"cache.dir": str(tmp_path)})
    async with open_node(config) as node:
        m = node.mirror
        assert pin_ref(m, "default", "library/alpine", "3.19") == "library/alpine:3.19"
        assert pin_ref(m, "ghcr", "acme/app", "v1") == "gh/acme/app:v1"
        assert pin_ref(m, "quay", "org/tool", "2") == "quay.io/org/tool:2"
        layer = await put(m, b"quay layer")
        doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": [
            {"mediaType": "x/layer", "digest": layer, "size": 10}]}  # fmt: skip
        manifest = await put(m, json.dumps(doc).encode(), "manifest")
        await m.metadata.put_tag(("quay", "org/tool", "2"), TagRecord(manifest, OCI_MANIFEST, 1))
        # The CLI's and the eviction policy's reading of that pin finds the image.
        pins = [pin_ref(m, "quay", "org/tool", "2")]
        assert await node.policy.resolver.pinned_digests(pins) == {manifest, layer}
