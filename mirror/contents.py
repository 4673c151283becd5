"""What the cache holds, by repository and tag: the operator page's contents, images and evict.

Listing must stay fast with 100,000 cached blobs, so no request walks the index: a `Catalog`
keeps a summary in memory, rebuilt in a worker thread when a viewer asks and it is older than
`max_age` (the viewer gets the previous one meanwhile), or at once after an action. Manifests are
immutable, so what each one references is parsed once and remembered. Sizes and the pinned
flag are computed as `registry-mirror ls` computes them (what a tag references that is cached),
so the two agree.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from mirror.cache import sqlite
from mirror.cache.metadata import TagKey, TagRecord
from mirror.mediatypes import manifest_doc, platform_of, sniff_media_type
from mirror.node import Node
from mirror.reference import SHA256_RE, Digest

log = structlog.get_logger(__name__)
YIELD_EVERY = 50  # tags walked between GIL hand-overs to the event loop

if TYPE_CHECKING:
    from _typeshed import SupportsRichComparison


@dataclass(frozen=True)
class TagRow:
    upstream: str
    repository: str
    tag: str
    digest: Digest
    size: int  # bytes of everything it references that is cached
    last_used: float  # latest `last_served` of those entries
    complete: bool  # every referenced manifest and blob is cached
    pinned: bool


@dataclass(frozen=True)
class RepoRow:
    upstream: str
    repository: str
    tags: tuple[TagRow, ...]
    size: int  # distinct cached bytes across its tags
    last_used: float

    @property
    def pinned(self) -> bool:
        return any(t.pinned for t in self.tags)

    @property
    def complete(self) -> bool:
        return all(t.complete for t in self.tags)


SORTS: dict[str, tuple[Callable[[RepoRow], SupportsRichComparison], bool]] = {
    "name": (lambda r: (r.repository, r.upstream), False),
    "size": (lambda r: r.size, True),
    "last_used": (lambda r: r.last_used, True),
    "tags": (lambda r: len(r.tags), True),
}


@dataclass
class Snapshot:
    """One consistent picture of the cache's contents (read-only once built)."""

    repos: list[RepoRow]  # by name
    references: dict[TagKey, frozenset[Digest]]  # what each tag references (cached or not)
    built_at: float = field(default_factory=time.time)
    build_seconds: float = 0.0
    _by_key: dict[tuple[str, str], RepoRow] = field(default_factory=dict)
    _orders: dict[str, list[RepoRow]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._by_key = {(r.upstream, r.repository): r for r in self.repos}

    def repo(self, upstream: str, repository: str) -> RepoRow | None:
        return self._by_key.get((upstream, repository))

    def ordered(self, sort: str) -> list[RepoRow]:
        """The repositories in `sort` order (computed once per snapshot and sort key)."""
        rows = self._orders.get(sort)
        if rows is None:
            key, reverse = SORTS.get(sort, SORTS["name"])
            rows = sorted(self.repos, key=key, reverse=reverse)
            self._orders[sort] = rows
        return rows


def select(
    snapshot: Snapshot,
    *,
    visible: Callable[[str, str], bool],
    query: str = "",
    sort: str = "name",
    offset: int = 0,
    limit: int = 50,
) -> tuple[list[RepoRow], int]:
    """One page of the repositories a viewer may see that match `query`, and how many match."""
    needle = query.strip().lower()
    matched = 0
    page: list[RepoRow] = []
    for row in snapshot.ordered(sort):
        if needle and needle not in row.repository.lower():
            continue
        if not visible(row.upstream, row.repository):
            continue
        if offset <= matched < offset + limit:
            page.append(row)
        matched += 1
    return page, matched


@dataclass(frozen=True)
class Refs:
    """What a manifest references: child manifests (of an index) and blobs (config, layers)."""

    children: tuple[tuple[Digest, str, int], ...]  # (digest, platform, size)
    blobs: tuple[tuple[Digest, str, int], ...]  # (digest, media type, size)
    media_type: str


def parse_refs(data: bytes) -> Refs | None:
    doc = manifest_doc(data)
    if doc is None:
        return None

    def descriptors(items: Iterable[object]) -> list[dict[str, object]]:
        return [
            d for d in items if isinstance(d, dict) and SHA256_RE.fullmatch(str(d.get("digest")))
        ]

    children = tuple(
        (Digest(str(d["digest"])), platform_of(d), int(str(d.get("size") or 0)))
        for d in descriptors(doc.get("manifests") or [])
    )
    blobs = tuple(
        (Digest(str(d["digest"])), str(d.get("mediaType", "")), int(str(d.get("size") or 0)))
        for d in descriptors([doc.get("config"), *(doc.get("layers") or [])])
    )
    return Refs(children, blobs, sniff_media_type(data) or str(doc.get("mediaType", "")))


class Catalog:
    """The contents summary for the operator page; see the module docstring."""

    def __init__(
        self,
        node: Node,
        *,
        max_age: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.mirror = node.mirror
        self.store, self.index, self.metadata = node.store, node.index, node.metadata
        self.policy = node.policy  # every pin: the config's, this node's, the cluster's
        self.max_age = max_age
        self._clock = clock
        self._refs: dict[Digest, Refs] = {}  # manifests are immutable: parsed once
        self._snapshot: Snapshot | None = None
        self._taken = float("-inf")
        self._building: asyncio.Task[Snapshot] | None = None

    async def pins(self) -> list[str]:
        return await self.policy.pins()

    async def snapshot(self, *, fresh: bool = False) -> Snapshot:
        """The summary; rebuilt first if `fresh` or none exists, in the background if stale."""
        if fresh or self._snapshot is None:
            return await self.refresh()
        if self._clock() - self._taken > self.max_age and self._building is None:
            self._start_build()
        return self._snapshot

    async def refresh(self) -> Snapshot:
        if self._building is not None:
            await asyncio.shield(self._building)  # one that started before this call's change
        return await asyncio.shield(self._start_build())

    def _start_build(self) -> asyncio.Task[Snapshot]:
        task = asyncio.ensure_future(self._build())
        self._building = task

        def done(t: asyncio.Task[Snapshot]) -> None:
            if self._building is t:
                self._building = None
            if not t.cancelled() and t.exception() is not None:
                log.warning("catalog_build_failed", error=str(t.exception()))

        task.add_done_callback(done)
        return task

    async def _build(self) -> Snapshot:
        started = self._clock()
        await self.index.flush()  # sizes and last use as of now
        pinned = await self.policy.pinned()
        snapshot = await sqlite.run(self._build_blocking, pinned)
        snapshot.build_seconds = self._clock() - started
        self._snapshot, self._taken = snapshot, started
        return snapshot

    # -- blocking (worker thread) ----------------------------------------------------------

    def refs(self, digest: Digest) -> Refs | None:
        """What a cached manifest references (None: not cached, or not a manifest)."""
        known = self._refs.get(digest)
        if known is not None:
            return known
        limit = self.mirror.router.default.config.manifest_max_size
        try:
            with open(self.store.path_for(digest), "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            return None
        if len(data) > limit:
            return None
        refs = parse_refs(data)
        if refs is not None:
            self._refs[digest] = refs
        return refs

    def references(self, digest: Digest) -> tuple[set[Digest], bool]:
        """Every digest an image references (itself included), and whether all its manifests
        were cached (if not, the blobs of the missing ones are unknown)."""
        out = {digest}
        todo = [digest]
        whole = True
        while todo:
            refs = self.refs(todo.pop())
            if refs is None:
                whole = False
                continue
            for child, _, _ in refs.children:
                if child not in out:
                    out.add(child)
                    todo.append(child)
            out.update(d for d, _, _ in refs.blobs)
        return out, whole

    def _build_blocking(self, pinned: set[Digest]) -> Snapshot:
        """Files are the truth for what is cached and its size (a stat, no index read per
        blob: 100,000 index reads take seconds); "last pulled" is when the tag's manifest was
        last served, which every pull of the tag does."""
        index, blob_dir = self.index, str(self.store.blob_dir)
        records: list[tuple[TagKey, TagRecord]] = list(self.metadata.iter_tags())
        by_repo: dict[tuple[str, str], list[TagRow]] = {}
        repo_digests: dict[tuple[str, str], set[Digest]] = {}
        references: dict[TagKey, frozenset[Digest]] = {}
        sizes: dict[Digest, int | None] = {}
        for n, ((upstream, repo, tag), record) in enumerate(records):
            if n % YIELD_EVERY == 0:
                time.sleep(0)
            digests, _ = self.references(record.digest)
            references[(upstream, repo, tag)] = frozenset(digests)
            size, present = 0, 0
            for d in digests:
                if d not in sizes:
                    try:  # store.path_for(d), spelled out: pathlib costs 1 s per 100,000
                        sizes[d] = os.stat(f"{blob_dir}/{d[7:9]}/{d[7:]}").st_size
                    except FileNotFoundError:
                        sizes[d] = None
                got = sizes[d]
                if got is not None:
                    present += 1
                    size += got
            entry = index.get(record.digest)
            row = TagRow(
                upstream,
                repo,
                tag,
                record.digest,
                size,
                entry.last_served if entry is not None else 0.0,
                present == len(digests),
                record.digest in pinned,
            )
            by_repo.setdefault((upstream, repo), []).append(row)
            repo_digests.setdefault((upstream, repo), set()).update(digests)
        repos = []
        for key in sorted(by_repo, key=lambda k: (k[1], k[0])):
            tags = tuple(sorted(by_repo[key], key=lambda t: t.tag))
            repos.append(
                RepoRow(
                    key[0],
                    key[1],
                    tags,
                    sum(sizes.get(d) or 0 for d in repo_digests[key]),
                    max((t.last_used for t in tags), default=0.0),
                )
            )
        return Snapshot(repos, references)
