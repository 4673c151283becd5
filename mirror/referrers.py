"""`Referrers`: the OCI 1.1 referrers API for mirrored names, whatever the upstream implements.

An upstream with the API is asked page by page (its `Link` rewritten to the client's name on
the mirror); one without it (Docker Hub, GHCR, distribution 2.8: a 404) is read through the tag
scheme: the `sha256-<hex>` tag (OCI 1.1's referrers tag schema: itself an index of referrers)
and cosign's `sha256-<hex>.sig` / `.att` / `.sbom` tags, each fetched as an ordinary (TTL'd,
mutable) tag and described as the spec describes a referrer.

Each answer is cached as the descriptors it listed, stored by digest like a manifest, with a
record under a tag-shaped key no real tag can spell (`referrers/<digest>[?page]`, see
`metadata.is_tag`), so the record lives wherever tags live (SQLite, Redis) and an offline or
air-gapped node answers from it. Records have their own short TTL (`referrers_ttl`: signatures
appear after the image) and are served stale while the upstream is in trouble. The answer is
cached unfiltered; `artifactType` is applied by the mirror (`OCI-Filters-Applied`).

Bounded: more than `MAX_REFERRERS` descriptors, more than `MAX_SCHEME_TAGS` tag-scheme tags, a
malformed list or one naming the subject itself (a cycle) is refused with words, and nothing is
cached. The record key holds the repository, so a cached answer is only ever given to clients
the access rules let read that repository (provenance as for tags).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlencode

import structlog

from mirror.access_guard import upstream_trouble
from mirror.cache.metadata import MetadataStore, TagKey, TagRecord
from mirror.errors import RegistryError, UpstreamError
from mirror.mediatypes import INDEX_TYPES
from mirror.reference import SHA256_RE, Digest, Name, Tag
from mirror.referrers_index import ReferrersAnswer, referrer_descriptor, referrers_index, subject_of
from mirror.singleflight import SingleFlight
from mirror.upstream.routing import Target

log = structlog.get_logger(__name__)

RECORD_PREFIX = "referrers/"  # a record key's "tag": `/` is in no real tag
RECORD_TYPE = "application/vnd.registry-mirror.referrers+json"
MAX_REFERRERS = 1000  # descriptors in one answer (page); more is refused
MAX_SCHEME_TAGS = 64  # `sha256-<hex>*` tags read for one subject; more is refused
MAX_QUERY = 512  # characters of an upstream page's query the mirror passes on


@dataclass(frozen=True)
class ReferrersResult:
    answer: ReferrersAnswer
    link: str | None  # `Link` to the next page on the mirror, None on the last
    cache: str  # "hit", "miss" or "stale" (as manifests)


@dataclass(frozen=True)
class Listing:
    """What one upstream page (or the tag scheme) listed: stored by digest, as JSON."""

    descriptors: list[dict[str, Any]]
    next_query: dict[str, str]

    def to_bytes(self) -> bytes:
        doc = {"manifests": self.descriptors, "next": self.next_query}
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @staticmethod
    def from_bytes(data: bytes) -> Listing | None:
        try:
            doc = json.loads(data)
            return Listing(list(doc["manifests"]), dict(doc["next"]))
        except (ValueError, KeyError, TypeError):
            return None


class ManifestSource(Protocol):
    """What the referrers service needs from the pull policy (`Mirror`)."""

    async def tag_manifest(
        self, target: Target, tag: Tag, private: bool
    ) -> tuple[bytes, str, Digest]:
        """A tag's manifest as any tag is pulled (cached, TTL'd): bytes, media type, digest."""

    async def keep_bytes(self, digest: Digest, data: bytes) -> None:
        """Store verified bytes by digest (locally, and in a cluster's shared store)."""

    async def manifest_bytes(self, digest: Digest) -> bytes | None:
        """Stored bytes by digest, or None."""


def record_tag(subject: Digest, query: dict[str, str] | None = None) -> str:
    """The tag-shaped key of a cached answer (`referrers/<digest>[?page]`)."""
    page = f"?{urlencode(sorted(query.items()))}" if query else ""
    return f"{RECORD_PREFIX}{subject}{page}"


def record_key(target: Target, subject: Digest, query: dict[str, str]) -> TagKey:
    return (target.upstream.name, target.repository, record_tag(subject, query))


def refused(message: str, subject: str, **detail: object) -> UpstreamError:
    return UpstreamError(message, {"subject": subject, **detail})


def checked_descriptors(raw: object, subject: str) -> list[dict[str, Any]]:
    """The `manifests` of a referrers index, each a descriptor with a sha256 digest, a media
    type and a size; refused whole if any is not, if too many, or if one is the subject."""
    if not isinstance(raw, list):
        raise refused("upstream referrers list is malformed", subject)
    if len(raw) > MAX_REFERRERS:
        raise refused("upstream referrers list is too long", subject, limit=MAX_REFERRERS)
    out: list[dict[str, Any]] = []
    for d in raw:
        ok = (
            isinstance(d, dict)
            and isinstance(d.get("digest"), str)
            and SHA256_RE.fullmatch(d["digest"]) is not None
            and isinstance(d.get("mediaType"), str)
            and isinstance(d.get("size"), int)
        )
        if not ok:
            raise refused("upstream referrers list holds a malformed descriptor", subject)
        assert isinstance(d, dict)
        if d["digest"] == subject:
            raise refused(
                "upstream referrers list is a cycle: the subject refers to itself", subject
            )
        out.append(d)
    return out


class Referrers:
    """The referrers API's answers for mirrored names (see the module docstring)."""

    def __init__(
        self,
        metadata: MetadataStore,
        source: ManifestSource,
        *,
        offline: bool,
        clock: Callable[[], float] = time.time,
        on_stale: Callable[[], None] = lambda: None,
    ) -> None:
        self.metadata = metadata
        self.source = source
        self.offline = offline
        self.clock = clock
        self._on_stale = on_stale
        self._flight: SingleFlight[TagKey, Listing] = SingleFlight()

    async def answer(
        self,
        target: Target,
        name: Name,
        subject: Digest,
        private: bool,
        artifact_type: str | None = None,
        query: dict[str, str] | None = None,
    ) -> ReferrersResult:
        """The referrers of `subject` in `target` (one page: `query` is an upstream page's,
        from a `Link` the mirror gave), filtered to `artifact_type` if asked."""
        query = query or {}
        key = record_key(target, subject, query)
        listing, cache = await self._listing(target, subject, private, key, query)
        link = None
        if listing.next_query:
            nxt = dict(listing.next_query)
            if artifact_type is not None:
                nxt["artifactType"] = artifact_type
            link = f'</v2/{name}/referrers/{subject}?{urlencode(nxt)}>; rel="next"'
        return ReferrersResult(referrers_index(listing.descriptors, artifact_type), link, cache)

    async def all_descriptors(
        self, target: Target, subject: Digest, private: bool
    ) -> list[dict[str, Any]]:
        """Every referrer of `subject`, every page followed (for warm and export); bounded."""
        out: list[dict[str, Any]] = []
        query: dict[str, str] = {}
        for _ in range(MAX_REFERRERS):
            key = record_key(target, subject, query)
            listing, _ = await self._listing(target, subject, private, key, query)
            out += listing.descriptors
            if len(out) > MAX_REFERRERS:
                raise refused("upstream referrers list is too long", subject, limit=MAX_REFERRERS)
            if not listing.next_query:
                return out
            query = listing.next_query
        raise refused("upstream referrers list is too long", subject, limit=MAX_REFERRERS)

    async def cached_descriptors(self, target: Target, subject: Digest) -> list[dict[str, Any]]:
        """What the cache holds of `subject`'s referrers, every cached page; no upstream
        (for export)."""
        out: list[dict[str, Any]] = []
        query: dict[str, str] = {}
        for _ in range(MAX_REFERRERS):
            listing = await self._cached(
                await self.metadata.get_tag(record_key(target, subject, query))
            )
            if listing is None:
                break
            out += listing.descriptors
            if not listing.next_query:
                break
            query = listing.next_query
        return out

    async def restore(self, key: TagKey, descriptors: list[dict[str, Any]], at: float) -> None:
        """Record `descriptors` as the referrers list under `key` (an import), fetched `at`."""
        data = Listing(descriptors, {}).to_bytes()
        digest = Digest("sha256:" + hashlib.sha256(data).hexdigest())
        await self.source.keep_bytes(digest, data)
        await self.metadata.put_tag(key, TagRecord(digest, RECORD_TYPE, at))

    async def _listing(
        self, target: Target, subject: Digest, private: bool, key: TagKey, query: dict[str, str]
    ) -> tuple[Listing, str]:
        record = await self.metadata.get_tag(key)
        cached = await self._cached(record)
        if cached is not None and record is not None:
            fresh = self.clock() - record.fetched_at < target.upstream.config.referrers_ttl
            if self.offline or fresh:
                return cached, "hit"
        if self.offline:
            raise RegistryError(
                "MANIFEST_UNKNOWN",
                "the mirror is offline and has no cached referrers list for this digest",
                {"subject": subject},
            )
        try:
            listing = await self._flight.do(
                key, lambda: self._fetch(target, subject, private, key, query)
            )
        except Exception as exc:
            if cached is None or not upstream_trouble(exc):
                raise
            self._on_stale()
            log.warning(
                "referrers_served_stale", upstream=key[0], repository=key[1], subject=subject
            )
            return cached, "stale"
        return listing, "miss"

    async def _cached(self, record: TagRecord | None) -> Listing | None:
        if record is None:
            return None
        data = await self.source.manifest_bytes(record.digest)
        return None if data is None else Listing.from_bytes(data)

    async def _fetch(
        self, target: Target, subject: Digest, private: bool, key: TagKey, query: dict[str, str]
    ) -> Listing:
        page = await target.upstream.get_referrers(target.name, subject, query)
        if page is not None:
            try:
                index = json.loads(page.body)
            except ValueError:
                raise refused("upstream referrers list is not JSON", subject) from None
            raw = index.get("manifests", []) if isinstance(index, dict) else None
            next_query = page.next_query
            if len(urlencode(next_query)) > MAX_QUERY:
                raise refused("upstream referrers page link is too long", subject)
            listing = Listing(checked_descriptors(raw, subject), next_query)
        elif query:
            raise RegistryError(
                "MANIFEST_UNKNOWN", "no such referrers page upstream", {"subject": subject}
            )
        else:
            listing = Listing(await self._from_tags(target, subject, private), {})
        data = listing.to_bytes()
        digest = Digest("sha256:" + hashlib.sha256(data).hexdigest())
        await self.source.keep_bytes(digest, data)
        await self.metadata.put_tag(key, TagRecord(digest, RECORD_TYPE, self.clock()))
        return listing

    async def _from_tags(
        self, target: Target, subject: Digest, private: bool
    ) -> list[dict[str, Any]]:
        """The referrers the tag scheme names: the `sha256-<hex>` tag's index (OCI 1.1's
        fallback) and every `sha256-<hex>.<suffix>` manifest (cosign's), described as the
        spec's referrers are. A manifest naming another subject is not a referrer of this."""
        prefix = "sha256-" + subject.removeprefix("sha256:")
        tags = [
            t
            for t in await target.upstream.all_tags(target.name)
            if t == prefix or t.startswith(prefix + ".")
        ]
        if len(tags) > MAX_SCHEME_TAGS:
            raise refused("too many signature/attestation tags", subject, limit=MAX_SCHEME_TAGS)
        descriptors: list[dict[str, Any]] = []
        for tag in sorted(tags):
            data, media_type, digest = await self.source.tag_manifest(target, Tag(tag), private)
            if tag == prefix and media_type in INDEX_TYPES:
                try:
                    raw = json.loads(data).get("manifests", [])
                except (ValueError, AttributeError):
                    raw = None
                descriptors += checked_descriptors(raw, subject)
                continue
            found = subject_of(data)
            if found is not None and found != subject:
                continue
            descriptor = referrer_descriptor(data, digest, media_type)
            if descriptor is None:
                raise refused("a signature tag's manifest is not JSON", subject, tag=tag)
            descriptors.append(descriptor)
        return checked_descriptors(descriptors, subject)
