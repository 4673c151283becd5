"""What hosted repositories hold, in one SQLite database (`<cache.dir>/hosted/hosted.db`).

    content   digest -> size, committed at       every hosted blob and manifest (the store's
                                                 files by digest; counted apart from the cache)
    links     (repo, digest)                     blobs a repository may serve (push, mount)
    manifests (repo, digest) -> media type, size, subject, referrer descriptor
    refs      (repo, manifest, child)            what a manifest references (gc's mark)
    tags      (repo, tag) -> digest
    uploads   id -> repo, started, touched, offset   uploads in progress (bytes: uploads/;
                                                 `offset` kept for shared uploads only)

Every change that must see a consistent picture (a manifest's references all linked; gc
removing only what nothing references) is one SQLite transaction, so a push and a sweep never
interleave halfway. WAL mode lets the node's workers (processes) share it.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mirror.cache import sqlite
from mirror.reference import Digest

_SCHEMA = """
CREATE TABLE IF NOT EXISTS content (digest TEXT PRIMARY KEY, size INTEGER NOT NULL,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS links (repo TEXT NOT NULL, digest TEXT NOT NULL,
    PRIMARY KEY (repo, digest));
CREATE INDEX IF NOT EXISTS links_digest ON links (digest);
CREATE TABLE IF NOT EXISTS manifests (repo TEXT NOT NULL, digest TEXT NOT NULL,
    media_type TEXT NOT NULL, size INTEGER NOT NULL, subject TEXT, descriptor TEXT,
    created REAL NOT NULL, PRIMARY KEY (repo, digest));
CREATE INDEX IF NOT EXISTS manifests_subject ON manifests (repo, subject);
CREATE INDEX IF NOT EXISTS manifests_digest ON manifests (digest);
CREATE TABLE IF NOT EXISTS refs (repo TEXT NOT NULL, manifest TEXT NOT NULL,
    child TEXT NOT NULL, PRIMARY KEY (repo, manifest, child));
CREATE INDEX IF NOT EXISTS refs_child ON refs (child);
CREATE TABLE IF NOT EXISTS tags (repo TEXT NOT NULL, tag TEXT NOT NULL, digest TEXT NOT NULL,
    PRIMARY KEY (repo, tag));
CREATE INDEX IF NOT EXISTS tags_digest ON tags (repo, digest);
CREATE TABLE IF NOT EXISTS uploads (id TEXT PRIMARY KEY, repo TEXT NOT NULL,
    started REAL NOT NULL, touched REAL NOT NULL, offset INTEGER NOT NULL DEFAULT 0);
"""


@dataclass(frozen=True)
class ManifestRecord:
    media_type: str
    size: int
    subject: str | None


@dataclass(frozen=True)
class UploadRecord:
    repo: str
    started: float
    touched: float
    offset: int = 0  # bytes received, as recorded (shared uploads; local ones ask the file)


@dataclass(frozen=True)
class NewManifest:
    """A manifest to record: `required` must all be linked in the repository (else nothing
    is recorded), `children` are what it references (required or not)."""

    repo: str
    digest: Digest
    media_type: str
    size: int
    subject: str | None
    descriptor: str | None  # its referrer descriptor (JSON), when it has a subject
    required: tuple[str, ...]
    children: tuple[str, ...]
    tags: tuple[str, ...]


class HostedMetadata:
    """The database above; every method blocks (call through `sqlite.run`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db().executescript(_SCHEMA)  # its own transaction

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken up front (IMMEDIATE) so readers of the same rows in
        another process wait for it rather than fail on upgrade."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # -- content and links --------------------------------------------------------------------

    @sqlite.blocking
    def content_size(self, digest: str) -> int | None:
        row = self._db().execute("SELECT size FROM content WHERE digest=?", (digest,)).fetchone()
        return None if row is None else int(row[0])

    @sqlite.blocking
    def add_blob(self, repo: str, digest: str, size: int, now: float) -> None:
        """A committed blob: hosted content, linked in `repo`; the upload row goes with it."""
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO content VALUES (?, ?, ?)", (digest, size, now))
            db.execute("INSERT OR IGNORE INTO links VALUES (?, ?)", (repo, digest))

    @sqlite.blocking
    def link(self, repo: str, digest: str) -> int | None:
        """Link hosted content into `repo` (a mount); its size, or None if not hosted."""
        with self._tx() as db:
            row = db.execute("SELECT size FROM content WHERE digest=?", (digest,)).fetchone()
            if row is None:
                return None
            db.execute("INSERT OR IGNORE INTO links VALUES (?, ?)", (repo, digest))
            return int(row[0])

    @sqlite.blocking
    def linked(self, repo: str, digest: str) -> int | None:
        """The size of `digest` if `repo` may serve it as a blob, else None."""
        row = (
            self._db()
            .execute(
                "SELECT c.size FROM links l JOIN content c ON c.digest=l.digest"
                " WHERE l.repo=? AND l.digest=?",
                (repo, digest),
            )
            .fetchone()
        )
        return None if row is None else int(row[0])

    @sqlite.blocking
    def repos_linking(self, digest: str) -> list[str]:
        rows = self._db().execute("SELECT repo FROM links WHERE digest=?", (digest,))
        return [r[0] for r in rows]

    @sqlite.blocking
    def unlink(self, repo: str, digest: str) -> bool:
        with self._tx() as db:
            cur = db.execute("DELETE FROM links WHERE repo=? AND digest=?", (repo, digest))
            return cur.rowcount > 0

    @sqlite.blocking
    def total_size(self) -> int:
        row = self._db().execute("SELECT COALESCE(SUM(size), 0) FROM content").fetchone()
        return int(row[0])

    @sqlite.blocking
    def all_content(self) -> set[Digest]:
        return {Digest(r[0]) for r in self._db().execute("SELECT digest FROM content")}

    # -- manifests and tags -------------------------------------------------------------------

    @sqlite.blocking
    def put_manifest(self, m: NewManifest, now: float) -> list[str]:
        """Record `m` with its tags; the required digests not linked (nothing recorded then)."""
        with self._tx() as db:
            missing = [
                d
                for d in dict.fromkeys(m.required)
                if db.execute(
                    "SELECT 1 FROM links WHERE repo=? AND digest=?", (m.repo, d)
                ).fetchone()
                is None
            ]
            if missing:
                return missing
            db.execute("INSERT OR IGNORE INTO content VALUES (?, ?, ?)", (m.digest, m.size, now))
            db.execute(
                "INSERT OR REPLACE INTO manifests VALUES (?, ?, ?, ?, ?, ?, ?)",
                (m.repo, m.digest, m.media_type, m.size, m.subject, m.descriptor, now),
            )
            db.executemany(
                "INSERT OR IGNORE INTO refs VALUES (?, ?, ?)",
                [(m.repo, m.digest, c) for c in m.children],
            )
            db.executemany(
                "INSERT OR REPLACE INTO tags VALUES (?, ?, ?)",
                [(m.repo, t, m.digest) for t in m.tags],
            )
        return []

    @sqlite.blocking
    def manifest(self, repo: str, digest: str) -> ManifestRecord | None:
        row = (
            self._db()
            .execute(
                "SELECT media_type, size, subject FROM manifests WHERE repo=? AND digest=?",
                (repo, digest),
            )
            .fetchone()
        )
        return None if row is None else ManifestRecord(row[0], int(row[1]), row[2])

    @sqlite.blocking
    def tag(self, repo: str, tag: str) -> Digest | None:
        row = (
            self._db()
            .execute("SELECT digest FROM tags WHERE repo=? AND tag=?", (repo, tag))
            .fetchone()
        )
        return None if row is None else Digest(row[0])

    @sqlite.blocking
    def delete_manifest(self, repo: str, digest: str) -> bool:
        """The manifest, its references and every tag naming it; whether it existed."""
        with self._tx() as db:
            cur = db.execute("DELETE FROM manifests WHERE repo=? AND digest=?", (repo, digest))
            db.execute("DELETE FROM refs WHERE repo=? AND manifest=?", (repo, digest))
            db.execute("DELETE FROM tags WHERE repo=? AND digest=?", (repo, digest))
            return cur.rowcount > 0

    @sqlite.blocking
    def delete_tag(self, repo: str, tag: str) -> bool:
        with self._tx() as db:
            cur = db.execute("DELETE FROM tags WHERE repo=? AND tag=?", (repo, tag))
            return cur.rowcount > 0

    @sqlite.blocking
    def tags(self, repo: str) -> list[str] | None:
        """The repository's tags; None if it holds nothing at all (unknown)."""
        db = self._db()
        found = [r[0] for r in db.execute("SELECT tag FROM tags WHERE repo=?", (repo,))]
        if found or self._exists(db, repo):
            return found
        return None

    @staticmethod
    def _exists(db: sqlite3.Connection, repo: str) -> bool:
        for table in ("manifests", "links"):
            if db.execute(f"SELECT 1 FROM {table} WHERE repo=? LIMIT 1", (repo,)).fetchone():
                return True
        return False

    @sqlite.blocking
    def repositories(self) -> list[str]:
        rows = self._db().execute(
            "SELECT repo FROM manifests UNION SELECT repo FROM links ORDER BY 1"
        )
        return [r[0] for r in rows]

    @sqlite.blocking
    def referrers(self, repo: str, subject: str) -> list[str]:
        """The referrer descriptors (JSON) of the manifests in `repo` whose subject it is."""
        rows = self._db().execute(
            "SELECT descriptor FROM manifests WHERE repo=? AND subject=? AND descriptor"
            " IS NOT NULL",
            (repo, subject),
        )
        return [r[0] for r in rows]

    @sqlite.blocking
    def summary(self) -> list[tuple[str, list[str], int]]:
        """(repository, its tags, how many manifests) of every hosted repository (the page)."""
        db = self._db()
        out = []
        for repo in self.repositories():
            tags = [
                r[0] for r in db.execute("SELECT tag FROM tags WHERE repo=? ORDER BY 1", (repo,))
            ]
            mans = db.execute("SELECT COUNT(*) FROM manifests WHERE repo=?", (repo,)).fetchone()
            out.append((repo, tags, int(mans[0])))
        return out

    # -- uploads ------------------------------------------------------------------------------

    @sqlite.blocking
    def new_upload(self, upload_id: str, repo: str, now: float) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO uploads VALUES (?, ?, ?, ?, 0)", (upload_id, repo, now, now))

    @sqlite.blocking
    def upload(self, upload_id: str) -> UploadRecord | None:
        row = (
            self._db()
            .execute("SELECT repo, started, touched, offset FROM uploads WHERE id=?", (upload_id,))
            .fetchone()
        )
        if row is None:
            return None
        return UploadRecord(row[0], float(row[1]), float(row[2]), int(row[3]))

    @sqlite.blocking
    def advance_upload(self, upload_id: str, expected: int, offset: int, now: float) -> bool:
        """Move the recorded offset from `expected` to `offset`; False if it was not there."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE uploads SET offset=?, touched=? WHERE id=? AND offset=?",
                (offset, now, upload_id, expected),
            )
            return cur.rowcount > 0

    @sqlite.blocking
    def touch_upload(self, upload_id: str, now: float) -> None:
        with self._tx() as db:
            db.execute("UPDATE uploads SET touched=? WHERE id=?", (now, upload_id))

    @sqlite.blocking
    def drop_upload(self, upload_id: str) -> bool:
        with self._tx() as db:
            return db.execute("DELETE FROM uploads WHERE id=?", (upload_id,)).rowcount > 0

    @sqlite.blocking
    def upload_ids(self) -> dict[str, float]:
        """Every upload's id -> when last touched."""
        return {r[0]: float(r[1]) for r in self._db().execute("SELECT id, touched FROM uploads")}

    # -- garbage collection -------------------------------------------------------------------

    @sqlite.blocking
    def untagged_manifests(self) -> list[tuple[str, str]]:
        """(repo, digest) of manifests no tag names, no tagged index (transitively) lists and
        whose subject is not itself kept: what `gc --delete-untagged` removes."""
        db = self._db()
        kept: set[tuple[str, str]] = {
            (r[0], r[1]) for r in db.execute("SELECT repo, digest FROM tags")
        }
        children: dict[tuple[str, str], list[str]] = {}
        for repo, manifest, child in db.execute("SELECT repo, manifest, child FROM refs"):
            children.setdefault((repo, manifest), []).append(child)
        subjects: dict[tuple[str, str], list[str]] = {}
        for repo, digest, subject in db.execute(
            "SELECT repo, digest, subject FROM manifests WHERE subject IS NOT NULL"
        ):
            subjects.setdefault((repo, subject), []).append(digest)
        todo = list(kept)
        while todo:
            key = todo.pop()
            for nxt in [*children.get(key, []), *subjects.get(key, [])]:
                if (key[0], nxt) not in kept:
                    kept.add((key[0], nxt))
                    todo.append((key[0], nxt))
        every = [(r[0], r[1]) for r in db.execute("SELECT repo, digest FROM manifests")]
        return [key for key in every if key not in kept]

    @sqlite.blocking
    def garbage(self, committed_before: float) -> list[tuple[Digest, int]]:
        """Content no manifest is and no manifest references, committed before the cut-off."""
        rows = self._db().execute(
            "SELECT digest, size FROM content c WHERE created < ?"
            " AND NOT EXISTS (SELECT 1 FROM manifests m WHERE m.digest=c.digest)"
            " AND NOT EXISTS (SELECT 1 FROM refs r WHERE r.child=c.digest)",
            (committed_before,),
        )
        return [(Digest(r[0]), int(r[1])) for r in rows]

    @sqlite.blocking
    def remove_garbage(self, digests: Iterable[str], committed_before: float) -> list[str]:
        """Forget those of `digests` still garbage (checked again inside the transaction, so a
        manifest pushed meanwhile keeps its blobs); the ones forgotten."""
        removed = []
        with self._tx() as db:
            for digest in digests:
                cur = db.execute(
                    "DELETE FROM content WHERE digest=? AND created < ?"
                    " AND NOT EXISTS (SELECT 1 FROM manifests m WHERE m.digest=content.digest)"
                    " AND NOT EXISTS (SELECT 1 FROM refs r WHERE r.child=content.digest)",
                    (digest, committed_before),
                )
                if cur.rowcount:
                    db.execute("DELETE FROM links WHERE digest=?", (digest,))
                    removed.append(digest)
        return removed
