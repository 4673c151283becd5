"""The OCI distribution-spec conformance suite, read-only, through the mirror.

The suite first pushes its own content (images, indexes, artifacts, referrers with `subject`)
into a real upstream (Debian's docker-registry 2.8, no auth), as a registry's users would; the
test then reads back what landed there (tags, manifests, blobs, subjects) and runs the suite
again against the mirror with push off and those as its read-only data. Every test it runs
must pass: pulls, the tag list (lexical, paged by the mirror) and the referrers API (built by
the mirror from the tag scheme, since distribution 2.8 has no referrers API)."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import httpx

from mirror.mediatypes import ALL_MANIFESTS, INDEX_TYPES
from tests.fixtures import conformance
from tests.fixtures.distribution import Registry
from tests.fixtures.mirror_server import mirror_config, running_app, sha256_digest

REPO = "conformance/repo1"
NO_DELETES = {
    "OCI_API_BLOBS_DELETE": "false",
    "OCI_API_MANIFESTS_DELETE": "false",
    "OCI_API_TAGS_DELETE": "false",
    "OCI_API_BLOBS_ATOMIC": "false",
    "OCI_API_MANIFESTS_ATOMIC": "false",
    "OCI_API_TAGS_ATOMIC": "false",
}


def pushed_content(url: str) -> dict[str, list[str]]:
    """What the suite left in REPO upstream: tags, manifests, blobs present, and subjects."""
    accept = {"Accept": ", ".join(ALL_MANIFESTS)}
    with httpx.Client(base_url=url, timeout=30) as client:
        tags = client.get(f"/v2/{REPO}/tags/list").raise_for_status().json()["tags"]
        manifests: dict[str, dict[str, object]] = {}
        todo = list(tags)
        while todo:
            ref = todo.pop()
            resp = client.get(f"/v2/{REPO}/manifests/{ref}", headers=accept)
            if resp.status_code != 200:
                continue
            digest = sha256_digest(resp.content)
            if digest in manifests:
                continue
            body = json.loads(resp.content)
            manifests[digest] = body
            if resp.headers.get("Content-Type") in INDEX_TYPES:
                todo += [d["digest"] for d in body.get("manifests", [])]
        blobs: set[str] = set()
        subjects: set[str] = set()
        for body in manifests.values():
            layers = body.get("layers")
            described = [body.get("config"), *(layers if isinstance(layers, list) else [])]
            for d in described:
                if not isinstance(d, dict) or not str(d.get("digest", "")).startswith("sha256:"):
                    continue
                if client.head(f"/v2/{REPO}/blobs/{d['digest']}").status_code == 200:
                    blobs.add(str(d["digest"]))
            subject = body.get("subject")
            if isinstance(subject, dict):
                subjects.add(str(subject["digest"]))
    return {
        "tags": sorted(tags),
        "manifests": sorted(manifests),
        "blobs": sorted(blobs),
        "referrers": sorted(subjects),
    }


async def test_conformance_read_only_through_the_mirror(tmp_path: Path) -> None:
    (tmp_path / "upstream").mkdir()
    registry = Registry(tmp_path / "upstream", None)
    registry.start()
    try:
        push = {**conformance.EVERYTHING, **NO_DELETES, "OCI_DATA_SHA512": "false"}
        await asyncio.to_thread(
            conformance.run, registry.url.removeprefix("http://"), tmp_path / "push", push
        )
        content = await asyncio.to_thread(pushed_content, registry.url)
        assert content["tags"] and content["manifests"] and content["blobs"]
        assert content["referrers"]  # the suite pushed artifacts with a subject
        read_only = {
            **NO_DELETES,
            "OCI_API_PUSH": "false",
            "OCI_RO_DATA_TAGS": " ".join(content["tags"]),
            "OCI_RO_DATA_MANIFESTS": " ".join(content["manifests"]),
            "OCI_RO_DATA_BLOBS": " ".join(content["blobs"]),
            "OCI_RO_DATA_REFERRERS": " ".join(content["referrers"]),
        }
        config = mirror_config(tmp_path / "cache", registry.url)
        async with running_app(config) as (base, _app):
            result = await asyncio.to_thread(
                conformance.run, base.removeprefix("http://"), tmp_path / "ro", read_only
            )
    finally:
        registry.stop()
    print(result.summary)
    assert result.failed == [], result.failed
    assert result.failures == 0 and result.passed >= 180, (result.tests, result.failures)
    for api in ("Tag listing", "Referrers", "Manifest get by digest", "Blob get"):
        assert re.search(rf"^  {api}\.+: +Pass$", result.summary, re.MULTILINE), api
