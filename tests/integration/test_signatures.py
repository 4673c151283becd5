"""Signatures and SBOMs through the mirror, on the real upstream (Debian's docker-registry 2.8,
which has no referrers API: the mirror reads the tag scheme), and the `verify` policy.

Content is pushed as cosign pushes it, signed in the test with generated keys: `.sig` tags,
OCI 1.1 referrers with `subject` (beside the referrers tag schema index a client keeps for a
registry without the API), and broken signatures of every kind the policy must tell apart."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest

from mirror.cli import main
from mirror.config import ConfigError
from mirror.mediatypes import ALL_MANIFESTS
from mirror.web.keys import MIRROR
from tests.fixtures.cosign import Key, Plain, digest_of, payload_for
from tests.fixtures.distribution import Registry
from tests.fixtures.mirror_server import MirrorProcess, mirror_config, running_app
from tests.integration.test_skopeo import copy_through, sha256_file

CHECKS = "registry_mirror_signature_checks_total"


@dataclass
class Signed:
    registry: Registry
    key: Key  # the configured ECDSA key
    ed: Key  # a configured Ed25519 key
    other: Key  # a key nobody configured
    digests: dict[str, str] = field(default_factory=dict)  # repository -> image digest
    referrers: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Signed]:
    workdir = tmp_path_factory.mktemp("signed-upstream")
    registry = Registry(workdir, None)
    registry.start()
    push = Plain(registry.url)
    s = Signed(registry, Key.ecdsa(), Key.ed25519(), Key.ecdsa())
    try:
        for repo in ("signed", "edsigned", "referred", "unsigned", "otherkey", "otherdigest"):
            s.digests[repo] = push.image(f"acme/{repo}", "v1", repo)
        for repo in ("malformed", "badsig"):
            s.digests[repo] = push.image(f"acme/{repo}", "v1", repo)
        s.digests["open"] = push.image("open/app", "v1", "open")
        d = s.digests
        sig = push.signature(
            "acme/signed",
            d["signed"],
            s.key.sign(payload_for(d["signed"])),
            payload_for(d["signed"]),
        )
        s.referrers["signed"] = [{"digest": sig[0], "size": len(sig[1])}]
        push.signature(
            "acme/edsigned",
            d["edsigned"],
            s.ed.sign(payload_for(d["edsigned"])),
            payload_for(d["edsigned"]),
        )
        push.signature(
            "acme/otherkey",
            d["otherkey"],
            s.other.sign(payload_for(d["otherkey"])),
            payload_for(d["otherkey"]),
        )
        wrong = payload_for(d["signed"])  # a good signature, of another image
        push.signature("acme/otherdigest", d["otherdigest"], s.key.sign(wrong), wrong)
        push.signature("acme/malformed", d["malformed"], s.key.sign(b"not json"), b"not json")
        junk = base64.b64encode(b"\x01\x02not a signature").decode()
        push.signature("acme/badsig", d["badsig"], junk, payload_for(d["badsig"]))
        # OCI 1.1: a signature and an SBOM as referrers, with the fallback index beside them.
        p = payload_for(d["referred"])
        ref_sig = push.signature("acme/referred", d["referred"], s.key.sign(p), p, referrer=True)
        sbom = push.sbom("acme/referred", d["referred"])
        push.fallback_index("acme/referred", d["referred"], [ref_sig, sbom])
        s.referrers["referred"] = [
            {"digest": dig, "size": len(data), **_type_and_annotations(data)}
            for dig, data in (ref_sig, sbom)
        ]
        yield s
    finally:
        push.close()
        registry.stop()


def _type_and_annotations(data: bytes) -> dict[str, Any]:
    doc = json.loads(data)
    return {k: doc[k] for k in ("artifactType", "annotations") if k in doc}


def _policy(s: Signed, tmp_path: Path, mode: str = "enforce") -> dict[str, object]:
    key_file = tmp_path / "cosign.pub"
    key_file.write_text(s.key.public_pem)
    rule = {
        "repositories": ["default/acme/*"],
        "keys": [str(key_file), s.ed.public_pem],
        "mode": mode,
    }
    return {"verify": [rule]}


async def _get(s: aiohttp.ClientSession, url: str) -> tuple[int, bytes, dict[str, str]]:
    async with s.get(url, headers={"Accept": ", ".join(ALL_MANIFESTS)}) as r:
        return r.status, await r.read(), dict(r.headers)


async def test_referrers_through_the_mirror_equal_the_upstreams(
    signed: Signed, tmp_path: Path
) -> None:
    config = mirror_config(tmp_path, signed.registry.url)
    async with running_app(config) as (base, _app), aiohttp.ClientSession() as s:
        for repo in ("referred", "signed"):
            subject = signed.digests[repo]
            status, body, headers = await _get(s, f"{base}/v2/acme/{repo}/referrers/{subject}")
            assert (
                status == 200
                and headers["Content-Type"] == "application/vnd.oci.image.index.v1+json"
            )
            listed = json.loads(body)["manifests"]
            want = signed.referrers[repo]
            assert sorted(d["digest"] for d in listed) == sorted(w["digest"] for w in want)
            for d in listed:
                w = next(w for w in want if w["digest"] == d["digest"])
                assert d["size"] == w["size"]
                for k in ("artifactType", "annotations"):
                    if k in w:
                        assert d[k] == w[k]
                # Each referrer and its blobs come through the mirror, verified.
                status, manifest, _ = await _get(
                    s, f"{base}/v2/acme/{repo}/manifests/{d['digest']}"
                )
                assert status == 200 and digest_of(manifest) == d["digest"]
                for layer in json.loads(manifest)["layers"]:
                    async with s.get(f"{base}/v2/acme/{repo}/blobs/{layer['digest']}") as r:
                        assert r.status == 200 and digest_of(await r.read()) == layer["digest"]
        sbom = "application/spdx%2Bjson"
        subject = signed.digests["referred"]
        status, body, headers = await _get(
            s, f"{base}/v2/acme/referred/referrers/{subject}?artifactType={sbom}"
        )
        assert headers["OCI-Filters-Applied"] == "artifactType"
        assert [d["artifactType"] for d in json.loads(body)["manifests"]] == [
            "application/spdx+json"
        ]


async def test_enforce_serves_signed_and_refuses_the_rest_with_reasons(
    signed: Signed, tmp_path: Path
) -> None:
    config = mirror_config(tmp_path, signed.registry.url, settings=_policy(signed, tmp_path))
    async with running_app(config) as (base, app), aiohttp.ClientSession() as s:
        for repo in ("signed", "edsigned", "referred"):
            status, body, _ = await _get(s, f"{base}/v2/acme/{repo}/manifests/v1")
            assert status == 200 and digest_of(body) == signed.digests[repo], repo
        status, body, _ = await _get(s, f"{base}/v2/open/app/manifests/v1")  # no policy there
        assert status == 200
        elsewhere = signed.digests["signed"]
        refusals = {
            "unsigned": "no cosign signature found",
            "otherkey": "signed by another key",
            "otherdigest": f"signature for another manifest (the signature is for {elsewhere})",
            "malformed": "malformed signature payload",
            "badsig": "bad signature",
        }
        for repo, why in refusals.items():
            for _ in range(2):  # the second answer comes from the results cache
                status, body, _ = await _get(s, f"{base}/v2/acme/{repo}/manifests/v1")
                assert status == 403, repo
                error = json.loads(body)["errors"][0]
                assert error["code"] == "DENIED"
                assert f"default/acme/{repo}:v1" in error["message"] and why in error["message"], (
                    error
                )
        metrics = app[MIRROR].metrics.registry
        assert metrics.get_sample_value(CHECKS, {"result": "verified"}) == 3
        assert metrics.get_sample_value(CHECKS, {"result": "unsigned"}) == 1
        assert metrics.get_sample_value(CHECKS, {"result": "failed"}) == 4
        # The page shows each image's result beside it.
        for repo, label in (("signed", "signed"), ("otherkey", "signed by another key")):
            async with s.get(f"{base}/ui/image?u=default&r=acme/{repo}&t=v1") as r:
                assert r.status == 200
                assert f'data-signature="{label}"' in await r.text(), repo
        async with s.get(f"{base}/ui/image?u=default&r=open/app&t=v1") as r:
            assert "data-signature" not in await r.text()  # no policy there: nothing to show
        # The signature tags themselves are not held to the policy.
        sig_tag = "sha256-" + signed.digests["signed"].removeprefix("sha256:") + ".sig"
        assert (await _get(s, f"{base}/v2/acme/signed/manifests/{sig_tag}"))[0] == 200


async def test_warn_serves_and_logs(
    signed: Signed, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = mirror_config(
        tmp_path, signed.registry.url, settings=_policy(signed, tmp_path, "warn")
    )
    async with running_app(config) as (base, _app), aiohttp.ClientSession() as s:
        status, body, _ = await _get(s, f"{base}/v2/acme/otherkey/manifests/v1")
        assert status == 200 and digest_of(body) == signed.digests["otherkey"]
    out = capsys.readouterr().out
    assert "signature_check_failed" in out and "signed by another key" in out and "mode=warn" in out


async def test_each_key_counts_and_only_the_configured_ones(signed: Signed, tmp_path: Path) -> None:
    """`keys` takes effect: with only the other key configured, its image passes and ours fail."""
    rule = {
        "repositories": ["default/acme/other*"],
        "keys": [signed.other.public_pem],
        "mode": "enforce",
    }
    config = mirror_config(tmp_path, signed.registry.url, settings={"verify": [rule]})
    async with running_app(config) as (base, _app), aiohttp.ClientSession() as s:
        assert (await _get(s, f"{base}/v2/acme/otherkey/manifests/v1"))[0] == 200
        assert (await _get(s, f"{base}/v2/acme/otherdigest/manifests/v1"))[0] == 403
        assert (await _get(s, f"{base}/v2/acme/unsigned/manifests/v1"))[0] == 200  # not covered


def test_config_refuses_bad_keys_and_modes(tmp_path: Path) -> None:
    good = Key.ecdsa().public_pem
    cases = [
        (
            {"repositories": ["*"], "keys": [good], "mode": "block"},
            "verify[0].mode: expected enforce or warn, got 'block'",
        ),
        (
            {
                "repositories": ["*"],
                "keys": ["-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n"],
            },
            "verify[0].keys[0]: not a PEM public key",
        ),
        (
            {"repositories": ["*"], "keys": [str(tmp_path / "missing.pub")]},
            "verify[0].keys[0]: cannot read",
        ),
        (
            {"repositories": ["*"], "keys": []},
            "verify[0]: expected at least one repository and one key",
        ),
    ]
    for rule, words in cases:
        with pytest.raises(ConfigError) as caught:
            mirror_config(tmp_path, "http://127.0.0.1:1", settings={"verify": [rule]})
        assert words in str(caught.value), str(caught.value)


def test_referrers_cross_the_air_gap_and_still_verify(signed: Signed, tmp_path: Path) -> None:
    """warm --with-referrers -> export -> import -> an offline, enforcing mirror answers the
    referrers API from its cache, serves the signed images, refuses the unsigned one, and
    skopeo copies an image and its signature through it."""
    here, there, bundle = tmp_path / "here", tmp_path / "there", tmp_path / "bundle.tar"
    images = ["acme/signed:v1", "acme/referred:v1", "acme/unsigned:v1"]
    up = ["--cache-dir", str(here), "--upstream", signed.registry.url]
    assert main(["warm", *up, "--with-referrers", *images]) == 0
    assert main(["export", "--cache-dir", str(here), "-o", str(bundle), *images]) == 0
    assert main(["import", "--cache-dir", str(there), str(bundle)]) == 0
    policy = _policy(signed, tmp_path)
    mirror = MirrorProcess(
        there,
        "http://127.0.0.1:9",
        log_path=tmp_path / "mirror.log",
        env={
            "REGISTRY_MIRROR_OFFLINE": "true",
            "REGISTRY_MIRROR_VERIFY": json.dumps(policy["verify"]),
        },
    )
    mirror.start()
    try:
        accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
        for repo in ("signed", "referred"):
            subject = signed.digests[repo]
            r = httpx.get(f"{mirror.url}/v2/acme/{repo}/referrers/{subject}")
            assert r.status_code == 200, r.text
            listed = sorted(d["digest"] for d in r.json()["manifests"])
            assert listed == sorted(w["digest"] for w in signed.referrers[repo])
            for digest in listed:
                m = httpx.get(f"{mirror.url}/v2/acme/{repo}/manifests/{digest}", headers=accept)
                assert m.status_code == 200 and digest_of(m.content) == digest
            r = httpx.get(f"{mirror.url}/v2/acme/{repo}/manifests/v1", headers=accept)
            assert r.status_code == 200 and digest_of(r.content) == subject
        r = httpx.get(f"{mirror.url}/v2/acme/unsigned/manifests/v1", headers=accept)
        assert r.status_code == 403 and "no cosign signature found" in r.text
        sig_tag = "sha256-" + signed.digests["signed"].removeprefix("sha256:") + ".sig"
        for ref, dest in (("acme/signed:v1", "image"), (f"acme/signed:{sig_tag}", "sig")):
            copy_through(mirror, ref, tmp_path / dest)
        assert sha256_file(tmp_path / "image" / "manifest.json") == signed.digests["signed"]
        sig_manifest = tmp_path / "sig" / "manifest.json"
        assert sha256_file(sig_manifest) == signed.referrers["signed"][0]["digest"]
        for layer in json.loads(sig_manifest.read_text())["layers"]:
            path = tmp_path / "sig" / layer["digest"].removeprefix("sha256:")
            assert sha256_file(path) == layer["digest"]
    finally:
        mirror.stop()
