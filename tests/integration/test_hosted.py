"""Hosted repositories over the OCI API: push and pull back, bad pushes change nothing, writes
to mirrored names refused, who may push, the catalog, never evicted, the quota, and gc."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp

from mirror.hosted import gc as hosted_gc
from mirror.web.keys import NODE
from tests.fixtures.fake_upstream import FakeUpstream
from tests.fixtures.hosted_push import (
    OCI_MANIFEST,
    digest_of,
    error_code,
    make_image,
    pull_image,
    push_blob,
    push_image,
)
from tests.fixtures.htpasswd import basic, write_htpasswd
from tests.fixtures.mirror_server import mirror_config, running_app

NOWHERE = "http://127.0.0.1:9"  # no upstream: hosted names never reach one
ANYONE_PUSHES = {
    "who": ["*"],
    "repositories": ["hosted/internal/*"],
    "actions": ["pull", "push", "delete"],
}


def settings(**more: Any) -> dict[str, object]:
    return {
        "hosted.repositories": ["internal/*", "secret/*"],
        "access.rules": [ANYONE_PUSHES],
        **more,
    }


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


async def test_push_and_pull_back_every_way(tmp_path: Path) -> None:
    """Monolithic, two-step, chunked and streamed uploads, a manifest by tag and by digest
    with tag parameters, then everything pulled back and checked against its digest."""
    image = make_image("one", b"a" * 3000, b"b" * 5000, b"c" * 70000)
    config, mono, chunked, streamed = image.config, *image.layers
    async with (
        running_app(mirror_config(tmp_path, NOWHERE, settings=settings())) as (base, _),
        aiohttp.ClientSession() as s,
    ):
        name = "internal/app"
        await push_blob(s, base, name, config)
        async with s.post(
            f"{base}/v2/{name}/blobs/uploads/", params={"digest": digest_of(mono)}, data=mono
        ) as r:
            assert r.status == 201
            assert r.headers["Location"] == f"/v2/{name}/blobs/{digest_of(mono)}"
        async with s.post(f"{base}/v2/{name}/blobs/uploads/") as r:
            location = base + r.headers["Location"]
        for start in range(0, len(chunked), 2000):
            part = chunked[start : start + 2000]
            headers = {"Content-Range": f"{start}-{start + len(part) - 1}"}
            async with s.patch(location, data=part, headers=headers) as r:
                assert r.status == 202, await r.text()
                assert r.headers["Range"] == f"0-{start + len(part) - 1}"
                location = base + r.headers["Location"]
        async with s.head(location) as r:
            assert (r.status, r.headers["Range"]) == (204, f"0-{len(chunked) - 1}")
        async with s.put(location, params={"digest": digest_of(chunked)}) as r:
            assert r.status == 201
        async with s.post(f"{base}/v2/{name}/blobs/uploads/") as r:
            location = base + r.headers["Location"]

        async def stream() -> Any:
            for n in range(0, len(streamed), 7000):
                yield streamed[n : n + 7000]

        async with s.patch(location, data=stream()) as r:
            assert r.status == 202
            location = base + r.headers["Location"]
        async with s.put(location, params={"digest": digest_of(streamed)}) as r:
            assert r.status == 201
        async with s.put(
            f"{base}/v2/{name}/manifests/{image.digest}",
            params=[("tag", "v1"), ("tag", "latest")],
            data=image.manifest,
            headers={"Content-Type": OCI_MANIFEST},
        ) as r:
            assert r.status == 201, await r.text()
            assert r.headers["OCI-Tag"] == "v1, latest"
        for reference in ("v1", "latest", image.digest):
            manifest, blobs = await pull_image(s, base, name, reference)
            assert manifest == image.manifest
            assert blobs == image.blobs
        async with s.get(f"{base}/v2/{name}/tags/list", params={"n": "1"}) as r:
            assert await r.json() == {"name": name, "tags": ["latest"]}
            assert r.headers["Link"] == f'</v2/{name}/tags/list?n=1&last=latest>; rel="next"'
        async with s.get(f"{base}/v2/_catalog") as r:
            assert await r.json() == {"repositories": [name]}
        # A blob pushed once is one file, whatever the repository (mount without `from`).
        async with s.post(
            f"{base}/v2/internal/other/blobs/uploads/", params={"mount": digest_of(mono)}
        ) as r:
            assert r.status == 201
    blob_files = [f for f in files_under(tmp_path / "blobs")]
    assert len(blob_files) == len(image.blobs) + 1  # + the manifest


async def test_bad_pushes_are_refused_and_change_nothing(tmp_path: Path) -> None:
    layer = b"x" * 10000
    async with (
        running_app(mirror_config(tmp_path, NOWHERE, settings=settings())) as (base, _),
        aiohttp.ClientSession() as s,
    ):
        name = "internal/app"
        before = files_under(tmp_path / "blobs")
        # The bytes do not match the digest: refused, nothing kept, the upload is over.
        async with s.post(f"{base}/v2/{name}/blobs/uploads/") as r:
            location = base + r.headers["Location"]
        async with s.put(location, params={"digest": digest_of(b"other")}, data=layer) as r:
            assert (r.status, await error_code(r)) == (400, "DIGEST_INVALID")
        async with s.get(location) as r:
            assert (r.status, await error_code(r)) == (404, "BLOB_UPLOAD_UNKNOWN")
        async with s.head(f"{base}/v2/{name}/blobs/{digest_of(layer)}") as r:
            assert r.status == 404
        # A chunk out of order: 416, the upload stays where it was.
        async with s.post(f"{base}/v2/{name}/blobs/uploads/") as r:
            location = base + r.headers["Location"]
        async with s.patch(location, data=layer[:100], headers={"Content-Range": "0-99"}) as r:
            assert r.status == 202
        async with s.patch(
            location, data=layer[200:300], headers={"Content-Range": "200-299"}
        ) as r:
            assert (r.status, r.headers["Range"]) == (416, "0-99")
        async with s.get(location) as r:
            assert (r.status, r.headers["Range"]) == (204, "0-99")
        async with s.delete(location) as r:
            assert r.status == 204
        # Bad digests and names in the API.
        for url in (
            f"{base}/v2/{name}/blobs/sha256:nothex",
            f"{base}/v2/{name}/blobs/md5:" + "a" * 32,
        ):
            async with s.get(url) as r:
                assert (r.status, await error_code(r)) == (400, "DIGEST_INVALID")
        # Manifests: a missing blob, not JSON, a wrong digest, too large.
        image = make_image("bad")
        for data in image.blobs.values():
            if data != image.layers[0]:
                await push_blob(s, base, name, data)
        manifest_url = f"{base}/v2/{name}/manifests/v1"
        headers = {"Content-Type": OCI_MANIFEST}
        async with s.put(manifest_url, data=image.manifest, headers=headers) as r:
            assert (r.status, await error_code(r)) == (404, "MANIFEST_BLOB_UNKNOWN")
            assert digest_of(image.layers[0]) in json.dumps(await r.json())
        async with s.put(manifest_url, data=b"{not json", headers=headers) as r:
            assert (r.status, await error_code(r)) == (400, "MANIFEST_INVALID")
        async with s.put(
            f"{base}/v2/{name}/manifests/{digest_of(b'x')}", data=image.manifest, headers=headers
        ) as r:
            assert (r.status, await error_code(r)) == (400, "DIGEST_INVALID")
        async with s.put(manifest_url, data=b" " * (5 * 1024 * 1024), headers=headers) as r:
            assert (r.status, await error_code(r)) == (413, "SIZE_INVALID")
        async with s.get(manifest_url) as r:
            assert (r.status, await error_code(r)) == (404, "MANIFEST_UNKNOWN")
        async with s.get(f"{base}/v2/{name}/tags/list") as r:
            assert (await r.json())["tags"] == []
    after = files_under(tmp_path / "blobs")
    assert len(after) == len(before) + 1  # only the config, pushed on purpose
    assert list((tmp_path / "hosted" / "uploads").iterdir()) == []


async def test_writes_to_mirrored_names_are_denied_naming_the_setting(tmp_path: Path) -> None:
    async with (
        running_app(mirror_config(tmp_path, NOWHERE, settings=settings())) as (base, _),
        aiohttp.ClientSession() as s,
    ):
        for method, path in [
            ("POST", "/v2/library/alpine/blobs/uploads/"),
            ("PUT", "/v2/library/alpine/manifests/v1"),
            ("DELETE", "/v2/internalx/app/manifests/v1"),
        ]:
            async with s.request(method, base + path, data=b"{}") as r:
                assert r.status == 403
                body = await r.json()
                assert body["errors"][0]["code"] == "DENIED"
                assert "hosted.repositories" in body["errors"][0]["message"]


async def test_push_and_delete_need_a_rule(tmp_path: Path) -> None:
    """Anonymous never pushes without a rule; logged-in users only as rules allow."""
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {"alice": "a-pw", "bob": "b-pw"})
    (tmp_path / "c").mkdir()
    rules = [
        {"who": ["alice"], "repositories": ["hosted/internal/*"], "actions": ["pull", "push"]},
    ]
    config = mirror_config(
        tmp_path / "c", NOWHERE,
        settings=settings(**{"access.rules": rules, "auth.htpasswd": str(htpasswd)}),
    )  # fmt: skip
    image = make_image("rules")
    async with running_app(config) as (base, _), aiohttp.ClientSession() as s:
        uploads = f"{base}/v2/internal/app/blobs/uploads/"
        async with s.post(uploads) as r:
            assert (r.status, await error_code(r)) == (401, "UNAUTHORIZED")
            assert r.headers["WWW-Authenticate"].startswith("Bearer ")
        async with s.post(uploads, headers=basic("bob", "b-pw")) as r:
            assert (r.status, await error_code(r)) == (403, "DENIED")
            assert "access.rules" in (await r.json())["errors"][0]["message"]
        await push_image(s, base, "internal/app", "v1", image, basic("alice", "a-pw"))
        async with s.delete(
            f"{base}/v2/internal/app/manifests/v1", headers=basic("alice", "a-pw")
        ) as r:
            assert (r.status, await error_code(r)) == (403, "DENIED")  # no delete rule
        # Pulls follow the default (allow), anonymous included.
        await pull_image(s, base, "internal/app", "v1")
    config = mirror_config(tmp_path / "d", NOWHERE, settings=settings(**{"access.rules": []}))
    async with (
        running_app(config) as (base, _),
        aiohttp.ClientSession() as s,
        s.post(f"{base}/v2/internal/app/blobs/uploads/") as r,
    ):
        assert (r.status, await error_code(r)) == (403, "DENIED")  # no logins: no 401


async def test_catalog_lists_only_what_the_client_may_pull(tmp_path: Path) -> None:
    rules = [
        {"who": ["anonymous"], "repositories": ["hosted/secret/*"], "action": "deny"},
        {"who": ["*"], "repositories": ["hosted/*"], "actions": ["pull", "push"]},
    ]
    config = mirror_config(tmp_path, NOWHERE, settings=settings(**{"access.rules": rules}))
    async with running_app(config) as (base, _), aiohttp.ClientSession() as s:
        await push_blob(s, base, "internal/a", b"one")
        await push_blob(s, base, "secret/b", b"two")
        async with s.get(f"{base}/v2/_catalog") as r:
            assert await r.json() == {"repositories": ["internal/a"]}
        async with s.get(f"{base}/v2/secret/b/blobs/{digest_of(b'two')}") as r:
            assert r.status == 403


async def test_hosted_content_is_never_evicted_and_counted_apart(tmp_path: Path) -> None:
    more = {"cache.max_size": "1", "cache.blob_ttl": "1s"}  # evict everything the cache holds
    config = mirror_config(tmp_path, NOWHERE, settings=settings(**more))
    image = make_image("kept", b"k" * 50000)
    async with running_app(config) as (base, app), aiohttp.ClientSession() as s:
        await push_image(s, base, "internal/app", "v1", image)
        node = app[NODE]
        await node.index.flush()
        assert node.index.totals() == (0, 0)  # hosted bytes are not the cache's
        plan = await node.policy.gc(dry_run=False)  # reconciles the index with the files first
        assert plan[0].victims == []
        assert node.index.totals() == (0, 0)
        await pull_image(s, base, "internal/app", "v1")


async def test_quota_refuses_pushes_with_a_clear_error(tmp_path: Path) -> None:
    config = mirror_config(tmp_path, NOWHERE, settings=settings(**{"hosted.quota": "10000"}))
    async with running_app(config) as (base, _), aiohttp.ClientSession() as s:
        await push_blob(s, base, "internal/app", b"1" * 6000)
        async with s.post(
            f"{base}/v2/internal/app/blobs/uploads/",
            params={"digest": digest_of(b"2" * 6000)},
            data=b"2" * 6000,
        ) as r:
            assert (r.status, await error_code(r)) == (403, "DENIED")
            assert "hosted.quota" in (await r.json())["errors"][0]["message"]
        async with s.head(f"{base}/v2/internal/app/blobs/{digest_of(b'2' * 6000)}") as r:
            assert r.status == 404
        await push_blob(s, base, "internal/app", b"1" * 6000)  # already held: no new bytes


async def test_gc_after_deleting_a_tag_removes_exactly_the_unreferenced(tmp_path: Path) -> None:
    shared = b"shared layer" * 1000
    keep = make_image("keep", shared, b"only in keep" * 100)
    drop = make_image("drop", shared, b"only in drop" * 100)
    config = mirror_config(tmp_path, NOWHERE, settings=settings(**{"hosted.gc_grace": "0s"}))
    async with running_app(config) as (base, app), aiohttp.ClientSession() as s:
        await push_image(s, base, "internal/app", "keep", keep)
        await push_image(s, base, "internal/app", "drop", drop)
        async with s.post(f"{base}/v2/internal/app/blobs/uploads/") as r:  # in progress
            in_progress = base + r.headers["Location"]
        async with s.patch(in_progress, data=b"partial") as r:
            assert r.status == 202
        async with s.delete(f"{base}/v2/internal/app/manifests/drop") as r:
            assert r.status == 202
        registry = app[NODE].hosted
        gone = {drop.digest, digest_of(drop.config), digest_of(drop.layers[1])}
        dry = await hosted_gc.collect(registry, dry_run=True, delete_untagged=True)
        assert {d for _, d in dry.manifests} == {drop.digest}
        assert dry.uploads == []
        done = await hosted_gc.collect(registry, dry_run=False, delete_untagged=True)
        assert {d for d, _ in done.blobs} == gone
        for digest in gone:
            assert not registry.content.path_for(digest).exists()  # type: ignore[arg-type]  # a str digest
        await pull_image(s, base, "internal/app", "keep")  # everything it needs is there
        async with s.get(f"{base}/v2/internal/app/blobs/{digest_of(drop.layers[1])}") as r:
            assert r.status == 404
        async with s.patch(in_progress, data=b" and more") as r:
            assert r.status == 202  # the upload in progress was left alone
        again = await hosted_gc.collect(registry, dry_run=False, delete_untagged=True)
        assert (again.blobs, again.manifests) == ([], [])


async def test_manifest_size_and_upload_age_settings_take_effect(tmp_path: Path) -> None:
    """`hosted.manifest_max_size` refuses a bigger manifest (the 4 MiB default takes it);
    `hosted.upload_max_age` lets gc remove an upload untouched that long (the 24 h default
    keeps it: see the gc test above)."""
    more = {"hosted.manifest_max_size": "1KiB", "hosted.upload_max_age": "0s"}
    config = mirror_config(tmp_path, NOWHERE, settings=settings(**more))
    small = make_image("small")
    big = replace(make_image("big"), extra={"annotations": {"pad": "x" * 2048}})
    assert len(small.manifest) < 1024 < len(big.manifest)
    async with running_app(config) as (base, app), aiohttp.ClientSession() as s:
        await push_image(s, base, "internal/app", "small", small)
        for data in big.blobs.values():
            await push_blob(s, base, "internal/app", data)
        async with s.put(
            f"{base}/v2/internal/app/manifests/big",
            data=big.manifest,
            headers={"Content-Type": OCI_MANIFEST},
        ) as r:
            assert r.status == 413 and await error_code(r) == "SIZE_INVALID"
        async with s.get(f"{base}/v2/internal/app/manifests/big") as r:
            assert r.status == 404
        async with s.post(f"{base}/v2/internal/app/blobs/uploads/") as r:
            upload = base + r.headers["Location"]
            upload_id = upload.rsplit("/", 1)[1].split("?", 1)[0]
        async with s.patch(upload, data=b"abandoned") as r:
            assert r.status == 202
        await asyncio.sleep(0.01)
        done = await hosted_gc.collect(app[NODE].hosted, dry_run=False)
        assert done.uploads == [upload_id]
        async with s.patch(upload, data=b" and more") as r:
            assert r.status == 404 and await error_code(r) == "BLOB_UPLOAD_UNKNOWN"


def test_gc_command_dry_run_lists_and_removes_nothing(tmp_path: Path) -> None:
    """`registry-mirror gc --dry-run` on a cache with an unreferenced hosted blob."""
    config_file = tmp_path / "mirror.yaml"
    config_file.write_text(
        json.dumps(
            {
                "cache": {"dir": str(tmp_path / "cache")},
                "upstream": {"url": NOWHERE},
                "hosted": {"repositories": ["internal/*"], "gc_grace": "0s"},
                "access": {"rules": [ANYONE_PUSHES]},
            }
        )
    )
    cfg = mirror_config(tmp_path / "cache", NOWHERE, settings=settings(**{"hosted.gc_grace": "0s"}))

    async def push() -> None:
        async with running_app(cfg) as (base, _), aiohttp.ClientSession() as s:
            await push_blob(s, base, "internal/app", b"orphan")

    asyncio.run(push())
    digest = "sha256:" + hashlib.sha256(b"orphan").hexdigest()
    command = [sys.executable, "-m", "mirror", "gc", "--config", str(config_file)]
    dry = subprocess.run([*command, "--dry-run"], capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert f"would remove hosted {digest}" in dry.stdout
    blob = tmp_path / "cache" / "blobs" / "sha256" / digest[7:9] / digest[7:]
    assert blob.exists()
    real = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert real.returncode == 0, real.stderr
    assert f"removed hosted {digest}" in real.stdout
    assert not blob.exists()


async def test_a_blob_the_client_may_not_pull_cannot_be_mounted(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """Mounting is reading: a client that may push to internal/* but not pull secret/*
    cannot link a secret blob into its repository, naming the source or not; nor a blob the
    cache holds from an upstream (only hosted repositories are mount sources)."""
    rules = [
        {"who": ["anonymous"], "repositories": ["hosted/secret/*"], "action": "deny"},
        ANYONE_PUSHES,
        {"who": ["*"], "repositories": ["hosted/secret/*"], "actions": ["push"]},
    ]
    cached = b"a layer pulled through the mirror"
    cached_digest = fake.add_blob(cached)
    config = mirror_config(tmp_path, fake.url, settings=settings(**{"access.rules": rules}))
    secret = b"not for anonymous eyes" * 100
    async with running_app(config) as (base, _), aiohttp.ClientSession() as s:
        await push_blob(s, base, "secret/x", secret)
        async with s.get(f"{base}/v2/lib/app/blobs/{cached_digest}") as r:
            assert r.status == 200 and digest_of(await r.read()) == cached_digest
        for digest, params in [
            (digest_of(secret), {"from": "secret/x"}),
            (digest_of(secret), {}),
            (cached_digest, {}),
            (cached_digest, {"from": "lib/app"}),
        ]:
            async with s.post(
                f"{base}/v2/internal/app/blobs/uploads/", params={"mount": digest, **params}
            ) as r:
                assert r.status == 202, (digest, params)  # an upload instead, nothing linked
            async with s.head(f"{base}/v2/internal/app/blobs/{digest}") as r:
                assert r.status == 404, (digest, params)


async def test_the_page_lists_hosted_repositories_marked_as_such(tmp_path: Path) -> None:
    rules = [
        {"who": ["anonymous"], "repositories": ["hosted/secret/*"], "action": "deny"},
        ANYONE_PUSHES,
        {"who": ["*"], "repositories": ["hosted/secret/*"], "actions": ["push"]},
    ]
    config = mirror_config(tmp_path, NOWHERE, settings=settings(**{"access.rules": rules}))
    async with running_app(config) as (base, _), aiohttp.ClientSession() as s:
        await push_image(s, base, "internal/web", "v2", make_image("page"))
        await push_blob(s, base, "secret/x", b"hidden")
        async with s.get(f"{base}/ui/contents") as r:
            assert r.status == 200
            page = await r.text()
    assert 'id="hosted-heading"' in page
    assert page.count('id="hosted-heading"') == 1  # listed once, in the page's body
    assert "<title>Contents · registry-mirror</title>" in page
    row = page[page.index('data-repository="internal/web"') :]
    row = row[: row.index("</tr>")]
    assert '<span class="tag">v2</span>' in row
    assert '<span class="badge hosted">hosted</span>' in row
    assert "secret/x" not in page  # anonymous may not pull it: not listed


async def test_a_group_pulls_hosted_first_then_the_upstream(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    fake.add_image("lib/app", "v1", [b"from the upstream"])
    more = {
        "hosted.repositories": ["lib/*"],
        "hosted.group": ["lib/*"],
        "access.rules": [{**ANYONE_PUSHES, "repositories": ["hosted/lib/*"]}],
    }
    config = mirror_config(tmp_path, fake.url, settings=more)
    image = make_image("group")
    async with running_app(config) as (base, _), aiohttp.ClientSession() as s:
        await push_image(s, base, "lib/own", "v1", image)
        manifest, _ = await pull_image(s, base, "lib/own", "v1")  # hosted
        assert manifest == image.manifest
        async with s.get(f"{base}/v2/lib/app/manifests/v1") as r:  # not hosted: upstream
            assert r.status == 200
    assert fake.count("GET", "/lib/app/manifests/v1") == 1
    assert fake.count("GET", "/lib/own/") == 0
