"""The durable index of what the cache holds, in least-recently-served order (diskcache).

Per digest: size, kind (blob or manifest), when it was stored and last served. The SQLite-backed
`diskcache.Index` keeps insertion order, so moving an entry to the end on each serve makes its
iteration order the LRU order, with no sort at eviction time. Serving only notes the time in
memory (`touch`, O(1), no I/O); `flush` writes the batch in one transaction on a SQLite thread
(mirror/cache/sqlite.py: every SQLite call of the index runs there, whoever calls), so the event
loop never waits on SQLite. Totals are kept in the `meta` store in the same transactions, which
every process sharing the cache (the workers, the commands) updates; each `flush` reads them back,
so `totals()` is the whole cache's, not only what this process wrote. The files are the truth:
`reconcile` brings the index back in step with them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import diskcache

from mirror.cache import sqlite
from mirror.reference import SHA256_RE, Digest

TOTALS_KEY = "totals"
PINS_KEY = "pins"
WRITE_CHUNK = 200  # index updates per SQLite transaction


@dataclass(frozen=True)
class Entry:
    size: int
    kind: str  # "blob" or "manifest"
    stored_at: float
    last_served: float


class CacheIndex:
    def __init__(self, directory: Path, clock: Callable[[], float]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._entries, self._meta = sqlite.call(self._open, directory)
        self._clock = clock
        self._pending: dict[Digest, tuple[float, Entry | None]] = {}
        self._lock = threading.Lock()  # one writer at a time across this process's threads
        self._flushing = asyncio.Lock()  # batches reach SQLite in the order they were taken
        self._totals: tuple[int, int] = sqlite.call(self._read_totals)

    @staticmethod
    def _open(directory: Path) -> tuple[diskcache.Index, diskcache.Cache]:
        entries = diskcache.Index(str(directory / "entries"))
        return entries, diskcache.Cache(str(directory / "meta"), eviction_policy="none")

    # -- in-memory notes (event loop, no I/O) ----------------------------------------------

    def touch(self, digest: Digest) -> None:
        """Note that `digest` was just served (written by the next flush)."""
        _, entry = self._pending.pop(digest, (0.0, None))
        self._pending[digest] = (self._clock(), entry)  # re-inserted: last served goes last

    def add(self, digest: Digest, size: int, kind: str) -> None:
        now = self._clock()
        self._pending[digest] = (now, Entry(size, kind, now, now))

    # -- durable work (a SQLite thread) ----------------------------------------------------

    async def flush(self) -> None:
        """Write the notes taken since the last flush, then read back the totals that every
        process sharing the cache keeps up to date (so `totals()` counts their writes too)."""
        async with self._flushing:
            batch, self._pending = self._pending, {}
            await sqlite.run(self._write, batch)

    @sqlite.blocking
    def _write(self, batch: dict[Digest, tuple[float, Entry | None]]) -> None:
        items = sorted(batch.items(), key=lambda item: item[1][0])
        # Short transactions: the event loop's GIL and SQLite's write lock are never held long.
        for start in range(0, len(items), WRITE_CHUNK):
            time.sleep(0)  # hand the GIL to the event loop between transactions
            with self._transaction():
                size, count = self._meta.get(TOTALS_KEY, (0, 0))
                for digest, (when, new) in items[start : start + WRITE_CHUNK]:
                    old = self._entries.pop(digest, None)
                    if new is None and old is None:
                        continue  # served but not indexed (reconcile will add it)
                    if old is not None:
                        size, count = size - old.size, count - 1
                    entry = new if new is not None else old
                    assert entry is not None
                    entry = Entry(entry.size, entry.kind, entry.stored_at, when)
                    self._entries[digest] = entry
                    size, count = size + entry.size, count + 1
                self._set_totals(size, count)
        self._totals = self._read_totals()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """Entries and totals change together: both stores' write locks, always in this order,
        so two processes cannot both add to the same old totals (a lost update)."""
        with self._lock, self._entries.transact(), self._meta.transact():
            yield

    def totals(self) -> tuple[int, int]:
        """(bytes, entries) of the whole cache as of the last flush, whichever process wrote
        them (no I/O: safe on the loop)."""
        return self._totals

    def _read_totals(self) -> tuple[int, int]:
        size, count = self._meta.get(TOTALS_KEY, (0, 0))
        return int(size), int(count)

    def _set_totals(self, size: int, count: int) -> None:
        self._meta.set(TOTALS_KEY, (size, count))
        self._totals = (int(size), int(count))

    def lru(self) -> Iterator[tuple[Digest, Entry]]:
        """Entries from least to most recently served (blocking; walked lazily on a SQLite
        thread, e.g. inside `sqlite.run`; elsewhere read whole on one first)."""
        if not sqlite.on_sqlite_thread():
            yield from sqlite.call(lambda: list(self.lru()))
            return
        for digest in self._entries:
            entry = self._entries.get(digest)
            if entry is not None:
                yield digest, entry

    @sqlite.blocking
    def get(self, digest: Digest) -> Entry | None:
        """The durable entry (blocking; serves not yet flushed are not in it); None if absent."""
        entry: Entry | None = self._entries.get(digest)
        return entry

    @sqlite.blocking
    def remove(self, digests: list[Digest]) -> int:
        """Drop entries (blocking); absent ones are skipped. Returns how many were indexed."""
        removed = 0
        for start in range(0, len(digests), WRITE_CHUNK):
            time.sleep(0)  # hand the GIL to the event loop between transactions
            with self._transaction():
                size, count = self._meta.get(TOTALS_KEY, (0, 0))
                for digest in digests[start : start + WRITE_CHUNK]:
                    old = self._entries.pop(digest, None)
                    if old is not None:
                        size, count, removed = size - old.size, count - 1, removed + 1
                self._set_totals(size, count)
        return removed

    @sqlite.blocking
    def reconcile(self, blob_dir: Path, is_manifest: Callable[[Digest], bool]) -> tuple[int, int]:
        """Bring the index in step with the files: add files it lacks (dated by mtime, of kind
        "manifest" where `is_manifest` says so, else "blob", so the per-kind TTLs apply to
        them), drop entries whose files are gone. Returns (added, dropped)."""
        on_disk: dict[Digest, os.stat_result] = {}
        for sub in os.scandir(blob_dir):
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub.path):
                digest = f"sha256:{entry.name}"
                if SHA256_RE.fullmatch(digest) and entry.name.startswith(sub.name):
                    on_disk[Digest(digest)] = entry.stat()
        gone = [d for d in self._entries if d not in on_disk]
        self.remove(gone)
        missing = [d for d in on_disk if d not in self._entries]
        with self._transaction():
            size, count = self._meta.get(TOTALS_KEY, (0, 0))
            for digest in sorted(missing, key=lambda d: on_disk[d].st_mtime):
                if digest in self._entries:
                    continue  # another process added it meanwhile
                st = on_disk[digest]
                kind = "manifest" if is_manifest(digest) else "blob"
                self._entries[digest] = Entry(st.st_size, kind, st.st_mtime, st.st_mtime)
                size, count = size + st.st_size, count + 1
            self._set_totals(size, count)
        return len(missing), len(gone)

    # -- the `Index` protocol (mirror/interfaces.py): durable at once, for the contract -------

    async def note_stored(self, digest: Digest, size: int, kind: str, now: float) -> None:
        """`add` with an explicit time, written at once; an indexed digest is only touched."""
        entry = await self.entry(digest)
        if entry is None:
            self._pending[digest] = (now, Entry(size, kind, now, now))
        elif now > entry.last_served:
            self._note(digest, now)
        await self.flush()

    def _note(self, digest: Digest, when: float) -> None:
        """A serve at `when`, keeping an entry a concurrent `add` left pending."""
        pending_when, pending_entry = self._pending.pop(digest, (when, None))
        self._pending[digest] = (max(when, pending_when), pending_entry)

    async def note_served(self, served: Mapping[Digest, float]) -> None:
        """`touch` with explicit times, written at once; never moves a time backwards."""
        await self.flush()
        known = await sqlite.run(lambda: {d: self.get(d) for d in served})
        for digest, when in served.items():
            entry = known[digest]
            if entry is not None and when > entry.last_served:
                self._note(digest, when)
        await self.flush()

    async def entry(self, digest: Digest) -> Entry | None:
        await self.flush()
        return await sqlite.run(self.get, digest)

    async def usage(self) -> tuple[int, int]:
        """What SQLite holds, so other processes' writes count too."""
        await self.flush()
        return self._totals

    async def drop(self, digest: Digest) -> bool:
        await self.flush()
        return await sqlite.run(self.remove, [digest]) == 1

    async def least_recent(
        self, limit: int, before: float | None = None
    ) -> list[tuple[str, int, str, float]]:
        """As `RedisIndex.least_recent` (walks the index on a SQLite thread)."""
        await self.flush()

        def walk() -> list[tuple[str, int, str, float]]:
            out: list[tuple[str, int, str, float]] = []
            for digest, entry in self.lru():
                if len(out) >= limit:
                    break
                if before is None or entry.last_served < before:
                    out.append((digest, entry.size, entry.kind, entry.last_served))
            return out

        return await sqlite.run(walk)

    @sqlite.blocking
    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._set_totals(0, 0)

    # -- pins ------------------------------------------------------------------------------

    @sqlite.blocking
    def pins(self) -> set[str]:
        return set(self._meta.get(PINS_KEY, ()))

    @sqlite.blocking
    def set_pins(self, pins: set[str]) -> None:
        self._meta.set(PINS_KEY, sorted(pins))

    @sqlite.blocking
    def is_open(self) -> bool:
        try:
            self._meta.get(TOTALS_KEY)
        except Exception:
            return False
        return True

    @sqlite.blocking
    def close(self) -> None:
        """Close (the connections of the SQLite threads go with this object)."""
        self._entries.cache.close()
        self._meta.close()
