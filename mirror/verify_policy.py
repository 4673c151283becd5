"""`SignaturePolicy`: "only signed images", the `verify` config, applied before a tag is served.

For a repository a policy names, the manifest a tag resolves to must carry a cosign signature
by one of the policy's keys whose payload names that very digest. The signature is looked for
where cosign puts it: the `sha256-<hex>.sig` tag (cosign's default, and what Docker Hub and GHCR
hold), then the referrers API (cosign's OCI 1.1 mode, `artifactType` of a cosign signature).
`enforce` refuses with 403 DENIED naming the repository and why; `warn` serves and logs.

What is verified: the digest the tag names. For a multi-arch image that is the index, which is
what `cosign sign` signs by default; its platform manifests, fetched by digest, are not checked
again (a pull by digest names exact content; the policy guards what tags resolve to). The
signature tags themselves (`sha256-<hex>.sig` / `.att` / ...) are not subject to the policy.

Results are kept per (manifest digest, policy): a verified digest stays verified; a failure is
asked again after the upstream's `referrers_ttl` (a signature may be pushed after the image).
Keyless signatures (Fulcio certificates, Rekor entries) need the internet and are out of scope.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from cachetools import LRUCache

from mirror.config import VerifyRule, read_key
from mirror.errors import RegistryError
from mirror.metrics import Metrics
from mirror.reference import Digest, Tag
from mirror.signatures import (
    MAX_PAYLOAD,
    SIGNATURE_ARTIFACT,
    Finding,
    Outcome,
    best,
    check,
    load_public_key,
    signature_layers,
)
from mirror.upstream.routing import Target

if TYPE_CHECKING:
    from mirror.signatures import PublicKey

log = structlog.get_logger(__name__)

SCHEME_TAG_RE = re.compile(r"sha256-[a-f0-9]{64}(\.[A-Za-z0-9_-]+)?")
NOT_FOUND = frozenset({"MANIFEST_UNKNOWN", "NAME_UNKNOWN", "BLOB_UNKNOWN"})
MAX_SIGNATURES = 16  # signature manifests read for one digest


class SignatureSource(Protocol):
    """What the policy needs from the pull policy (`Mirror`); each raises RegistryError."""

    async def tag_manifest(
        self, target: Target, tag: Tag, private: bool
    ) -> tuple[bytes, str, Digest]: ...

    async def manifest_by_digest(self, target: Target, digest: Digest, private: bool) -> bytes: ...

    async def small_blob(
        self, target: Target, digest: Digest, private: bool, limit: int
    ) -> bytes | None: ...

    async def referrer_descriptors(
        self, target: Target, subject: Digest, private: bool
    ) -> list[dict[str, Any]]: ...


@dataclass(frozen=True)
class Policy:
    """One `verify` entry, compiled: its globs, its keys, and an id for the results cache."""

    patterns: tuple[re.Pattern[str], ...]
    keys: list[PublicKey]
    enforce: bool
    id: str

    @staticmethod
    def build(rule: VerifyRule) -> Policy:
        pems = [read_key(k) for k in rule.keys]
        keys = [load_public_key(pem) for pem in pems]
        ident = hashlib.sha256(b"\0".join([rule.mode.encode(), *sorted(pems)])).hexdigest()[:16]
        patterns = tuple(re.compile(fnmatch.translate(p)) for p in rule.repositories)
        return Policy(patterns, keys, rule.mode == "enforce", ident)

    def covers(self, subject: str) -> bool:
        return any(p.fullmatch(subject) for p in self.patterns)


class SignaturePolicy:
    def __init__(
        self,
        rules: tuple[VerifyRule, ...],
        source: SignatureSource,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.policies = [Policy.build(rule) for rule in rules]
        self.source = source
        self.metrics = metrics
        self.clock = clock
        self._results: LRUCache[tuple[Digest, str], tuple[Finding, float]] = LRUCache(100_000)

    def policy_for(self, target: Target) -> Policy | None:
        subject = f"{target.upstream.name}/{target.repository}"
        return next((p for p in self.policies if p.covers(subject)), None)

    def outcome(self, digest: Digest) -> Outcome | None:
        """The last result for `digest` under any policy (for the page; no I/O)."""
        for (d, _), (finding, _) in list(self._results.items()):
            if d == digest:
                return finding.outcome
        return None

    def label(self, digest: str) -> str | None:
        """What the page shows beside an image: `signed`, or why not; None if not checked."""
        outcome = self.outcome(Digest(digest))
        if outcome is None:
            return None
        return "signed" if outcome is Outcome.VERIFIED else outcome.value

    async def check(self, target: Target, tag: Tag, digest: Digest, private: bool) -> None:
        """Raise 403 DENIED if a policy in `enforce` mode covers `target` and `digest` is not
        signed by one of its keys; log (and serve) in `warn` mode."""
        policy = self.policy_for(target)
        if policy is None or SCHEME_TAG_RE.fullmatch(tag):
            return
        key = (digest, policy.id)
        known = self._results.get(key)
        ttl = target.upstream.config.referrers_ttl
        if known is not None and (
            known[0].outcome is Outcome.VERIFIED or self.clock() - known[1] < ttl
        ):
            finding = known[0]
        else:
            finding = await self._find(target, digest, private, policy)
            self._results[key] = (finding, self.clock())
            self._count(finding)
        if finding.outcome is Outcome.VERIFIED:
            return
        repository = f"{target.upstream.name}/{target.repository}"
        log.warning(
            "signature_check_failed",
            repository=repository,
            tag=tag,
            digest=digest,
            outcome=finding.outcome.value,
            why=finding.why,
            mode="enforce" if policy.enforce else "warn",
        )
        if policy.enforce:
            raise RegistryError(
                "DENIED",
                f"{repository}:{tag} refused by the signature policy: "
                f"{finding.outcome.value} ({finding.why})",
                {"repository": repository, "digest": digest, "outcome": finding.outcome.value},
            )

    def _count(self, finding: Finding) -> None:
        if finding.outcome is Outcome.VERIFIED:
            result = "verified"
        elif finding.outcome is Outcome.UNSIGNED:
            result = "unsigned"
        else:
            result = "failed"
        self.metrics.signature_checks.labels(result).inc()

    async def _find(self, target: Target, digest: Digest, private: bool, policy: Policy) -> Finding:
        manifests = await self._signature_manifests(target, digest, private)
        findings: list[Finding] = []
        for data in manifests:
            for layer in signature_layers(data):
                if layer.size > MAX_PAYLOAD or not layer.digest.startswith("sha256:"):
                    findings.append(Finding(Outcome.MALFORMED, "signed payload too large"))
                    continue
                payload = await self._payload(target, Digest(layer.digest), private)
                if payload is None:
                    findings.append(Finding(Outcome.MALFORMED, "signed payload missing"))
                    continue
                findings.append(check(payload, layer.signature, policy.keys, digest))
        return best(findings)

    async def _payload(self, target: Target, digest: Digest, private: bool) -> bytes | None:
        try:
            return await self.source.small_blob(target, digest, private, MAX_PAYLOAD)
        except RegistryError as exc:
            if exc.code in NOT_FOUND:
                return None
            raise

    async def _signature_manifests(
        self, target: Target, digest: Digest, private: bool
    ) -> list[bytes]:
        """Cosign's `.sig` tag, then referrers that are cosign signatures (deduplicated)."""
        found: dict[str, bytes] = {}
        tag = Tag("sha256-" + digest.removeprefix("sha256:") + ".sig")
        try:
            data, _, sig_digest = await self.source.tag_manifest(target, tag, private)
            found[sig_digest] = data
        except RegistryError as exc:
            if exc.code not in NOT_FOUND:
                raise
        try:
            descriptors = await self.source.referrer_descriptors(target, digest, private)
        except RegistryError as exc:
            if exc.code not in NOT_FOUND:
                raise
            descriptors = []
        for d in descriptors:
            if len(found) >= MAX_SIGNATURES:
                break
            if d.get("artifactType") != SIGNATURE_ARTIFACT or d["digest"] in found:
                continue
            found[d["digest"]] = await self.source.manifest_by_digest(
                target, Digest(d["digest"]), private
            )
        return list(found.values())
