"""Referrers and tag lists through the mirror, against an in-process upstream that plays what
distribution 2.8 cannot: a referrers API (paged), tag lists in the wrong order and paged, and
broken answers (huge lists, cycles, endless pages): clear refusals, nothing wrong cached."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

from mirror.web.keys import MIRROR
from tests.fixtures.clock import Clock
from tests.fixtures.cosign import Key, payload_for
from tests.fixtures.fake_upstream import OCI_MANIFEST, FakeUpstream, digest_of
from tests.fixtures.mirror_server import mirror_config, running_app

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
SBOM = "application/spdx+json"
SIG = "application/vnd.dev.cosign.artifact.sig.v1+json"
SBOM_Q = quote(SBOM, safe="")  # a `+` in a query is a space


def add_referrer(
    fake: FakeUpstream, repo: str, subject: str, artifact_type: str, n: int
) -> dict[str, Any]:
    """An OCI 1.1 artifact whose `subject` is `subject`; returns its descriptor."""
    blob = fake.add_blob(f"payload {n}".encode())
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": {
                "mediaType": "application/vnd.oci.empty.v1+json",
                "digest": fake.add_blob(b"{}"),
                "size": 2,
            },
            "layers": [{"mediaType": "text/plain", "digest": blob, "size": len(f"payload {n}")}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": 1},
            "annotations": {"n": str(n)},
        }
    ).encode()
    digest = digest_of(manifest)
    fake.manifests[(repo, digest)] = (manifest, OCI_MANIFEST)
    return {
        "mediaType": OCI_MANIFEST,
        "digest": digest,
        "size": len(manifest),
        "artifactType": artifact_type,
        "annotations": {"n": str(n)},
    }


async def get_json(s: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any], Any]:
    async with s.get(url) as r:
        return r.status, dict(r.headers), await r.json(content_type=None)


async def test_tag_list_is_lexical_and_paged_by_the_mirror(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    for tag in ["b", "a", "c10", "c2", "latest", "1.0"]:
        fake.add_image("lib/app", tag, [b"x"])
    fake.tag_page_size = 2  # the upstream answers newest-first, two a page, Link to another host
    config = mirror_config(tmp_path, fake.url)
    async with running_app(config) as (base, _app), aiohttp.ClientSession() as s:
        status, _, body = await get_json(s, f"{base}/v2/lib/app/tags/list")
        assert status == 200 and body["tags"] == ["1.0", "a", "b", "c10", "c2", "latest"]
        got: list[str] = []
        url = f"{base}/v2/lib/app/tags/list?n=4"
        while True:
            status, headers, body = await get_json(s, url)
            assert status == 200
            got += body["tags"]
            if "Link" not in headers:
                break
            target = headers["Link"].split(";")[0].strip("<>")
            assert target.startswith("/v2/lib/app/tags/list?n=4&last=")
            url = base + target
        assert got == ["1.0", "a", "b", "c10", "c2", "latest"]
        status, headers, body = await get_json(s, f"{base}/v2/lib/app/tags/list?last=b&n=2")
        assert body["tags"] == ["c10", "c2"] and "last=c2" in headers["Link"]
        assert fake.count("GET", "elsewhere") == 0  # page links only lend their query


async def test_endless_upstream_tag_pages_are_refused(fake: FakeUpstream, tmp_path: Path) -> None:
    fake.add_image("lib/app", "v1", [b"x"])
    fake.tag_page_size = 1
    fake.tag_pages_forever = True
    async with (
        running_app(mirror_config(tmp_path, fake.url)) as (base, _app),
        aiohttp.ClientSession() as s,
    ):
        status, _, body = await get_json(s, f"{base}/v2/lib/app/tags/list")
        assert status == 502
        assert "too long" in body["errors"][0]["message"]
        assert fake.count("GET", "/tags/list") == 100


async def test_referrers_api_upstream_is_passed_through_paged(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    subject, _, _ = fake.add_image("lib/app", "v1", [b"x"])
    listed = [add_referrer(fake, "lib/app", subject, SBOM if n % 2 else SIG, n) for n in range(5)]
    fake.referrers = {subject: listed}
    fake.referrers_page_size = 2
    clock = Clock()
    config = mirror_config(tmp_path, fake.url, referrers_ttl="5m", retries=0)
    async with running_app(config, clock) as (base, app), aiohttp.ClientSession() as s:
        seen: list[dict[str, Any]] = []
        url = f"{base}/v2/lib/app/referrers/{subject}"
        pages = 0
        while url:
            status, headers, body = await get_json(s, url)
            assert status == 200 and headers["Content-Type"] == OCI_INDEX
            assert body["mediaType"] == OCI_INDEX and body["schemaVersion"] == 2
            seen += body["manifests"]
            pages += 1
            link = headers.get("Link")
            url = ""
            if link:
                target = link.split(";")[0].strip("<>")
                assert target.startswith(f"/v2/lib/app/referrers/{subject}?")
                url = base + target
        assert pages == 3
        assert sorted(seen, key=lambda d: d["digest"]) == sorted(listed, key=lambda d: d["digest"])
        # Each referrer is a manifest the client can fetch by digest, verified.
        async with s.get(f"{base}/v2/lib/app/manifests/{listed[0]['digest']}") as r:
            assert digest_of(await r.read()) == listed[0]["digest"]

        # The filter is the mirror's, and says so.
        status, headers, body = await get_json(
            s, f"{base}/v2/lib/app/referrers/{subject}?artifactType={SBOM_Q}"
        )
        assert headers["OCI-Filters-Applied"] == "artifactType"
        assert body["manifests"] and all(d["artifactType"] == SBOM for d in body["manifests"])
        assert "artifactType=" in headers["Link"]

        # Cached within its TTL; asked again after; stale while the upstream is gone.
        asked = fake.count("GET", "/referrers/")
        await get_json(s, f"{base}/v2/lib/app/referrers/{subject}")
        assert fake.count("GET", "/referrers/") == asked
        clock.now += 301
        await get_json(s, f"{base}/v2/lib/app/referrers/{subject}")
        assert fake.count("GET", "/referrers/") == asked + 1
        clock.now += 301
        await fake.close()
        status, headers, body = await get_json(s, f"{base}/v2/lib/app/referrers/{subject}")
        assert status == 200 and headers["Warning"].startswith("110 ")
        assert len(body["manifests"]) == 2
        assert (
            app[MIRROR].metrics.registry.get_sample_value("registry_mirror_stale_answers_total")
            == 1
        )


async def test_referrers_from_the_tag_scheme(fake: FakeUpstream, tmp_path: Path) -> None:
    """An upstream without the API: cosign's `.sig` tag and OCI 1.1's `sha256-<hex>` index."""
    subject, _, _ = fake.add_image("lib/app", "v1", [b"x"])
    other, _, _ = fake.add_image("lib/app", "v2", [b"y"])
    sbom = add_referrer(fake, "lib/app", subject, SBOM, 1)
    fallback = json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [sbom]}
    ).encode()
    hex_ = subject.removeprefix("sha256:")
    fake.manifests[("lib/app", f"sha256-{hex_}")] = (fallback, OCI_INDEX)
    sig_digest, _, _ = fake.add_image("lib/app", f"sha256-{hex_}.sig", [b"sig payload"])
    fake.add_image("lib/app", f"sha256-{other.removeprefix('sha256:')}.sig", [b"other"])
    config = mirror_config(tmp_path, fake.url)
    async with running_app(config) as (base, _app), aiohttp.ClientSession() as s:
        status, headers, body = await get_json(s, f"{base}/v2/lib/app/referrers/{subject}")
        assert status == 200 and "OCI-Filters-Applied" not in headers and "Link" not in headers
        by_digest = {d["digest"]: d for d in body["manifests"]}
        assert set(by_digest) == {sbom["digest"], sig_digest}
        assert by_digest[sbom["digest"]] == sbom
        assert by_digest[sig_digest]["artifactType"] == "application/vnd.oci.image.config.v1+json"
        status, _, body = await get_json(
            s, f"{base}/v2/lib/app/referrers/{other}?artifactType={SBOM_Q}"
        )
        assert status == 200 and body["manifests"] == []


async def test_huge_and_cyclic_referrers_lists_are_refused_and_not_cached(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    subject, _, _ = fake.add_image("lib/app", "v1", [b"x"])
    one = add_referrer(fake, "lib/app", subject, SBOM, 1)
    huge = [dict(one, digest=f"sha256:{i:064x}") for i in range(1001)]
    cycle = [one, dict(one, digest=subject)]
    config = mirror_config(tmp_path, fake.url, referrers_ttl="0s")
    async with running_app(config) as (base, _app), aiohttp.ClientSession() as s:
        url = f"{base}/v2/lib/app/referrers/{subject}"
        for listed, words in ((huge, "too long"), (cycle, "cycle")):
            fake.referrers = {subject: listed}
            status, _, body = await get_json(s, url)
            assert status == 502 and words in body["errors"][0]["message"], body
        fake.referrers = {subject: [one]}
        status, _, body = await get_json(s, url)
        assert status == 200 and body["manifests"] == [one]
        # Not cached wrong: a later broken answer leaves the last good one, served stale.
        fake.referrers = {subject: cycle}
        for _ in range(2):
            status, headers, body = await get_json(s, url)
            assert status == 200 and body["manifests"] == [one] and "Warning" in headers
        await fake.close()
        status, headers, body = await get_json(s, url)
        assert status == 200 and body["manifests"] == [one] and "Warning" in headers


async def test_offline_mirror_answers_referrers_and_tags_from_the_cache(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    subject, _, _ = fake.add_image("lib/app", "v1", [b"x"])
    fake.add_image("lib/app", "a", [b"y"])
    one = add_referrer(fake, "lib/app", subject, SBOM, 1)
    fake.referrers = {subject: [one]}
    async with (
        running_app(mirror_config(tmp_path, fake.url)) as (base, _app),
        aiohttp.ClientSession() as s,
    ):
        for tag in ("v1", "a"):
            async with s.get(f"{base}/v2/lib/app/manifests/{tag}") as r:
                assert r.status == 200
        assert (await get_json(s, f"{base}/v2/lib/app/referrers/{subject}"))[0] == 200
    offline = mirror_config(tmp_path, fake.url, settings={"offline": True})
    await fake.close()
    async with running_app(offline) as (base, _app), aiohttp.ClientSession() as s:
        status, _, body = await get_json(s, f"{base}/v2/lib/app/referrers/{subject}")
        assert status == 200 and body["manifests"] == [one]
        status, headers, body = await get_json(s, f"{base}/v2/lib/app/tags/list?n=1")
        assert body["tags"] == ["a"] and "last=a" in headers["Link"]  # no referrers record
        status, _, body = await get_json(s, f"{base}/v2/lib/app/tags/list")
        assert body["tags"] == ["a", "v1"]


async def test_a_refusal_is_not_kept_once_the_image_is_signed(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """Failures are kept only for `referrers_ttl`: a signature pushed after the image counts."""
    subject, _, _ = fake.add_image("acme/app", "v1", [b"x"])
    key = Key.ecdsa()
    rule = {"repositories": ["default/acme/*"], "keys": [key.public_pem], "mode": "enforce"}
    clock = Clock()
    config = mirror_config(
        tmp_path, fake.url, referrers_ttl="1m", tag_ttl="1h", settings={"verify": [rule]}
    )
    async with running_app(config, clock) as (base, _app), aiohttp.ClientSession() as s:
        url = f"{base}/v2/acme/app/manifests/v1"
        assert (await get_json(s, url))[0] == 403
        payload = payload_for(subject)
        layer = fake.add_blob(payload)
        sig = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": fake.add_blob(b"{}"),
                "size": 2,
            },
            "layers": [
                {
                    "mediaType": "application/vnd.dev.cosign.simplesigning.v1+json",
                    "digest": layer,
                    "size": len(payload),
                    "annotations": {"dev.cosignproject.cosign/signature": key.sign(payload)},
                }
            ],
        }
        data = json.dumps(sig).encode()
        fake.manifests[("acme/app", "sha256-" + subject.removeprefix("sha256:") + ".sig")] = (
            data,
            OCI_MANIFEST,
        )
        assert (await get_json(s, url))[0] == 403  # the result is kept a while
        clock.now += 61
        async with s.get(url) as r:
            assert r.status == 200 and digest_of(await r.read()) == subject
        clock.now += 3600  # verified stays verified (the tag revalidates to the same digest)
        async with s.get(url) as r:
            assert r.status == 200
