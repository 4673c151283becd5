"""Provenance: under which repository names a stored digest may be served.

Blobs and manifests are stored once by digest whatever repository they came from, so a digest
fetched from a private repository (with the mirror's upstream credentials) must not be served
under another name to a client that may not read the private one. The rules:

- A digest is *public* once a configured upstream served its verified bytes (or confirmed it)
  from a repository anyone may read there; then any client may have it under any name.
- Otherwise it is known per `<upstream>/<repository>` key, recorded only from evidence:
  verified bytes from that upstream and repository, or a confirmation (HEAD) by the very
  upstream that already holds it with the credentials it was fetched with.
- What an upstream *claims* proves nothing on its own: a manifest's references are never
  recorded (the manifest does not hold those blobs), and a dynamic upstream (`allow_any_upstream`,
  chosen by whoever sends the request) is never asked to confirm anything and never makes a
  digest public. It must prove it holds a digest by sending the bytes, verified against the
  digest (`Verdict.PROVE`): an upstream that can do that learns nothing it did not have.
- Offline, a digest with no record at all (cached before provenance was kept, or imported
  from a bundle that carried none) is served only to clients allowed everything private.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from mirror.access import Policy, Principal
from mirror.cache.metadata import MetadataStore
from mirror.errors import RegistryError
from mirror.mediatypes import ALL_MANIFESTS
from mirror.reference import Digest
from mirror.upstream.routing import Target


class Verdict(enum.Enum):
    SERVE = "serve"  # the cached copy (or any fill of it) may be served under this name
    PROVE = "prove"  # only bytes from the target's own upstream, verified, may be served


def upstream_of(key: str) -> str:
    """The upstream name of a `<upstream>/<repository>` key (upstream names hold no `/`)."""
    return key.split("/", 1)[0]


class Provenance:
    def __init__(self, metadata: MetadataStore, policy: Policy, *, guarded: bool, offline: bool):
        self.metadata = metadata
        self.policy = policy
        self.guarded = guarded  # False: nothing private can be cached, so nothing is checked
        self.offline = offline

    async def check(
        self,
        target: Target,
        digest: Digest,
        *,
        private: bool,
        principal: Principal,
        kind: str,
    ) -> Verdict:
        """May `digest` be served under `target` from the cache (or a fill in flight)?

        Raises `*_UNKNOWN` when the target's upstream says it does not hold it (or, offline,
        when nothing says it does), and the upstream's error when it cannot be asked.
        """
        if not self.guarded:
            return Verdict.SERVE
        origins = await self.metadata.get_origins(digest)
        if origins is not None and (origins.public or target.key in origins.repos):
            return Verdict.SERVE
        code = "BLOB_UNKNOWN" if kind == "blob" else "MANIFEST_UNKNOWN"
        unknown = RegistryError(code, f"{kind} unknown to this repository", {"digest": digest})
        if self.offline:
            if origins is None and self.policy.allows_all_private(principal):
                return Verdict.SERVE
            raise unknown
        upstream = target.upstream
        if upstream.dynamic:
            return Verdict.PROVE
        if origins is not None and upstream.name not in {upstream_of(r) for r in origins.repos}:
            # Held privately by another upstream: this one's word is not evidence of that.
            return Verdict.PROVE
        # The upstream that holds it (or, with no record at all, a configured one) confirms.
        try:
            if kind == "blob":
                await upstream.head_blob(target.name, digest)
            else:
                await upstream.head_manifest(target.name, digest, list(ALL_MANIFESTS))
        except RegistryError as exc:
            if exc.code in ("BLOB_UNKNOWN", "MANIFEST_UNKNOWN", "NAME_UNKNOWN", "DENIED"):
                raise unknown from None
            raise
        await self.record(target, [digest], private=private)
        return Verdict.SERVE

    async def record(self, target: Target, digests: Iterable[Digest], *, private: bool) -> None:
        """`target` holds `digests`, on evidence (verified bytes, or a confirmation by the
        upstream holding them). Public only from a configured upstream's public repository."""
        if not self.guarded:
            return
        public = not private and not target.upstream.dynamic
        await self.metadata.add_origin(list(digests), None if public else target.key)
