"""Content-addressed blob storage on the node's file system (a `BlobStore` and `FillTarget`
of mirror/interfaces.py, whose protocols are re-exported here).

Layout: `<root>/blobs/sha256/<first two hex>/<hex>`. A blob appears at its final path only by
an atomic rename after its bytes hashed to its digest and were fsynced, so whatever a crash
leaves behind is either complete and verified or a temp file under `<root>/tmp/` that is never
served. Temp files carry an exclusive `flock` while their writer lives; one whose lock can be
taken belongs to a dead process (abandoned).

A temp file's name says what it is part of: `<hex>.<declared size>.<source>.<random>.part`,
where `<source>` is a hash of the `<upstream>/<repository>` its bytes came from. An abandoned
one with a declared size is kept (within `partial_max_age` / `partial_max_size`, see
`sweep_partials`) for the next fill of the same digest from the same source, which claims it
(`resume_write`: flock, then rename, so no two processes can both claim it), re-hashes its
bytes and asks the upstream only for the rest. The claim proves nothing about the bytes: the
commit still requires the stitched whole to match the digest, so a wrong or truncated partial
is discarded there, never served as complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import os
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import structlog
from cachetools import TTLCache

from mirror.errors import DigestMismatch, UpstreamError
from mirror.interfaces import BlobStore as BlobStore  # re-exported
from mirror.interfaces import BlobStream, Chunk, Hasher
from mirror.interfaces import BlobWriter as BlobWriter  # re-exported
from mirror.reference import SHA256_RE, Digest

log = structlog.get_logger(__name__)

STREAM_CHUNK = 1024 * 1024  # bytes per read of `open_stream` and of a partial's re-hash


def source_tag(source: str | None) -> str:
    """The temp-file name part for where a fill's bytes come from ("-": not resumable)."""
    if source is None:
        return "-"
    return hashlib.sha256(source.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PartName:
    """What a temp file's name says (see the module docstring)."""

    digest: Digest
    declared: int | None
    source: str

    @classmethod
    def parse(cls, name: str) -> PartName | None:
        parts = name.split(".")
        if len(parts) != 5 or parts[4] != "part" or not SHA256_RE.fullmatch(f"sha256:{parts[0]}"):
            return None
        declared = int(parts[1]) if parts[1].isdigit() else None
        return cls(Digest(f"sha256:{parts[0]}"), declared, parts[2])


def _flock_soon(fd: int, tries: int = 10) -> None:
    """Take `fd`'s flock, waiting out the moment another process spends testing whether the
    file's writer lives (`_writer_alive`); a live writer's lock raises `BlockingIOError`."""
    for _ in range(tries - 1):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            time.sleep(0.005)
        else:
            return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _writer_alive(path: Path) -> bool:
    """Whether a live writer holds `path`'s flock (blocking); False if it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


@dataclass(frozen=True)
class OpenBlob:
    """A committed blob opened for serving; the open file keeps it readable even if evicted."""

    file: BinaryIO
    size: int

    def close(self) -> None:
        self.file.close()


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


WARM_SECONDS = 10.0  # a blob opened this recently is opened on the event loop
WARM_MAX = 4096  # digests remembered as recently opened


class FilesystemBlobStore:
    """Blobs as files on a local file system (see the module docstring for the guarantees)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blob_dir = root / "blobs" / "sha256"
        self.tmp_dir = root / "tmp"
        self._blob_prefix = f"{self.blob_dir}/"
        self._warm: TTLCache[str, None] = TTLCache(maxsize=WARM_MAX, ttl=WARM_SECONDS)

    def setup(self, max_age: float = 0.0, max_bytes: int = 0) -> None:
        """Create the layout and sweep temp files of writers that died (blocking; at start)."""
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.sweep_partials(max_age, max_bytes)

    def sweep_partials(self, max_age: float, max_bytes: int, now: float | None = None) -> int:
        """Delete abandoned temp files except resumable partials younger than `max_age`
        whose total, newest first, stays within `max_bytes` (either 0: keep none); the bytes
        freed (blocking). A live writer's file is never touched: its flock is held."""
        now = time.time() if now is None else now
        kept, freed = 0, 0
        entries = []
        for entry in self.tmp_dir.iterdir():
            with contextlib.suppress(FileNotFoundError):
                entries.append((entry.stat().st_mtime, entry))
        for mtime, entry in sorted(entries, reverse=True):  # newest first
            if entry.suffix == ".ok" and entry.with_suffix("").exists():
                continue  # its fill's marker: goes with the fill
            try:
                fd = os.open(entry, os.O_RDONLY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live writer holds it
            else:
                size = os.fstat(fd).st_size
                part = PartName.parse(entry.name)
                declared = -1 if part is None or part.source == "-" else part.declared or -1
                if now - mtime < max_age and kept + size <= max_bytes and size <= declared:
                    kept += size  # resumable, young, within the total
                    continue
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
                freed += size
                log.info("stale_temp_removed", file=entry.name, size=size)
            finally:
                os.close(fd)
        return freed

    def path_for(self, digest: Digest) -> Path:
        return Path(self._path_str(digest))

    def _path_str(self, digest: Digest) -> str:
        """The blob's path as a string: the one place for the layout, and no pathlib on the
        serving path (it was 4 % of a small hit's event-loop time)."""
        hexpart = digest.split(":", 1)[1]
        return f"{self._blob_prefix}{hexpart[:2]}/{hexpart}"

    async def stat(self, digest: Digest) -> int | None:
        try:
            st = await asyncio.to_thread(os.stat, self.path_for(digest))
        except FileNotFoundError:
            return None
        return st.st_size

    async def open_for_serving(self, digest: Digest) -> OpenBlob | None:
        """Opened in a thread, since a path the kernel has not looked up lately may wait for
        the disk; a blob opened within `WARM_SECONDS` is opened on the loop (its directory
        entries and inode are cached, so the open takes microseconds, where the thread's
        hop took a tenth of a small cached blob's request: measured)."""
        if digest in self._warm:
            return self._open(digest)
        blob = await asyncio.to_thread(self._open, digest)
        if blob is not None:
            self._warm[digest] = None
        return blob

    def _open(self, digest: Digest) -> OpenBlob | None:
        try:  # an unbuffered file: no isatty or seek probes
            fd = os.open(self._path_str(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        f = open(fd, "rb", buffering=0)  # noqa: SIM115 - handed to the response
        return OpenBlob(f, os.fstat(fd).st_size)

    async def open_stream(self, digest: Digest, offset: int = 0) -> BlobStream | None:
        """Its bytes from `offset` in ~1 MiB reads from a worker thread; None if absent. The
        open file keeps the bytes readable even if the blob is evicted meanwhile."""
        blob = await self.open_for_serving(digest)
        if blob is None:
            return None
        f = blob.file

        async def chunks() -> AsyncIterator[bytes]:
            await asyncio.to_thread(f.seek, offset)
            while data := await asyncio.to_thread(f.read, STREAM_CHUNK):
                yield data

        async def close() -> None:
            f.close()

        return BlobStream(max(0, blob.size - offset), chunks(), close)

    def find_partial(self, digest: Digest) -> tuple[Path, int | None] | None:
        """A live writer's temp file for `digest` and its declared size (blocking); abandoned
        partials kept for resuming are not fills in progress."""
        for path in self.tmp_dir.glob(f"{digest.split(':', 1)[1]}.*.part"):
            part = PartName.parse(path.name)
            if part is not None and _writer_alive(path):
                return path, part.declared
        return None

    async def read_bytes(self, digest: Digest, max_size: int) -> bytes | None:
        """A small blob (a manifest) whole, re-verified, or None if absent or too large."""
        return await asyncio.to_thread(self._read_bytes, digest, max_size)

    def _read_bytes(self, digest: Digest, max_size: int) -> bytes | None:
        try:
            with open(self.path_for(digest), "rb") as f:
                data = f.read(max_size + 1)
        except FileNotFoundError:
            return None
        if len(data) > max_size or "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            return None
        return data

    async def put_bytes(self, digest: Digest, data: bytes) -> None:
        writer = await self.begin_write(digest, len(data))
        try:
            await writer.write(data)
            await writer.commit()
        except BaseException:
            await writer.abort()
            raise

    async def begin_write(
        self, digest: Digest, size: int | None, source: str | None = None
    ) -> FileBlobWriter:
        return await asyncio.to_thread(FileBlobWriter, self, digest, size, source)

    async def resume_write(self, digest: Digest, source: str) -> FileBlobWriter | None:
        """A writer continuing an abandoned partial of `digest` from `source`, claimed for
        this process (None if there is none to claim). Its `written` bytes are re-hashed by
        `rehash`, which callers start at once (writes wait for it)."""
        return await asyncio.to_thread(self._claim_partial, digest, source)

    def _claim_partial(self, digest: Digest, source: str) -> FileBlobWriter | None:
        tag = source_tag(source)
        for path in self.tmp_dir.glob(f"{digest.split(':', 1)[1]}.*.{tag}.*.part"):
            part = PartName.parse(path.name)
            if part is None or part.declared is None:
                continue
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError:
                continue
            try:
                _flock_soon(fd)  # fails: a live writer's
                mine = self.tmp_dir / temp_name(digest, part.declared, source)
                os.rename(path, mine)  # fails: another process claimed it first
            except OSError:
                os.close(fd)
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(verified_marker(path))
            writer = FileBlobWriter(self, digest, part.declared, source, claim=(mine, fd))
            if writer.written > part.declared:
                log.warning("partial_discarded", digest=digest, reason="longer than the blob")
                writer._abort()
                continue
            return writer
        return None

    async def delete(self, digest: Digest) -> bool:
        try:
            await asyncio.to_thread(os.unlink, self.path_for(digest))
        except FileNotFoundError:
            return False
        return True

    def partials(self) -> list[tuple[Digest, int | None, int]]:
        """Fills in progress in any process on this cache: (digest, declared size, bytes so
        far) from the temp files' names and lengths (blocking)."""
        out = []
        for path in self.tmp_dir.glob("*.part"):
            part = PartName.parse(path.name)
            if part is None or not _writer_alive(path):
                continue  # abandoned: kept for resuming, not in progress
            try:
                written = path.stat().st_size
            except FileNotFoundError:
                continue  # committed or aborted meanwhile
            out.append((part.digest, part.declared, written))
        return out

    def iter_all(self) -> Iterator[Digest]:
        """Every committed blob, in digest order (blocking)."""
        for sub in sorted(self.blob_dir.iterdir()):
            for entry in sorted(sub.iterdir()):
                digest = f"sha256:{entry.name}"
                if SHA256_RE.fullmatch(digest) and entry.name.startswith(sub.name):
                    yield Digest(digest)

    async def scan(self) -> AsyncIterator[tuple[Digest, int]]:
        """Every committed blob with its size, one shard directory per worker-thread call."""
        shards = await asyncio.to_thread(
            lambda: sorted(p for p in self.blob_dir.iterdir() if p.is_dir())
        )
        for sub in shards:
            for found in await asyncio.to_thread(self._scan_shard, sub):
                yield found

    @staticmethod
    def _scan_shard(sub: Path) -> list[tuple[Digest, int]]:
        out = []
        for entry in sorted(os.scandir(sub), key=lambda e: e.name):
            digest = f"sha256:{entry.name}"
            if SHA256_RE.fullmatch(digest) and entry.name.startswith(sub.name):
                with contextlib.suppress(FileNotFoundError):  # evicted meanwhile
                    out.append((Digest(digest), entry.stat().st_size))
        return out


class FileBlobWriter:
    """Hashes and writes into a locked temp file; `commit` renames it into place if it verifies.

    `claim`: a claimed partial's (new) path and the descriptor holding its flock; appended to."""

    def __init__(
        self,
        store: FilesystemBlobStore,
        digest: Digest,
        size: int | None,
        source: str | None = None,
        *,
        claim: tuple[Path, int] | None = None,
    ) -> None:
        self.store = store
        self.digest = digest
        self.expected_size = size
        self.written = 0
        self._hash = hashlib.sha256()
        self._rehash: asyncio.Future[None] | None = None
        self._done = False
        self._verified = False
        if claim is None:
            self.tmp_path = store.tmp_dir / temp_name(digest, size, source)
            self._fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        else:  # ours now: flocked and renamed by the claim
            self.tmp_path, self._fd = claim
            self.written = os.lseek(self._fd, 0, os.SEEK_END)
        self.resumed_from = self.written  # bytes a claimed partial already held
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            if size:
                # Reserving the space up front makes ext4 writes several times faster here
                # and turns a full disk into an error before any byte is streamed.
                reserve(self._fd, size)
        except BaseException:
            self._abort()
            raise

    async def write(self, data: bytes) -> None:
        await self.write_chunks([data])

    def rehash(self) -> asyncio.Future[None]:
        """Hash a claimed partial's bytes already in the file, in a worker thread (started
        once; later writes and `verify` wait for it). Unreadable or short: it fails, and
        with it the fill, which then discards the partial."""
        if self._rehash is None:
            self._rehash = asyncio.ensure_future(asyncio.to_thread(self._hash_prefix))
        return self._rehash

    def _hash_prefix(self) -> None:
        offset = 0
        while offset < self.resumed_from:
            data = os.pread(self._fd, min(STREAM_CHUNK, self.resumed_from - offset), offset)
            if not data:
                raise OSError(errno.EIO, f"partial of {self.digest} shorter than claimed")
            self._hash.update(data)
            offset += len(data)

    async def write_chunks(self, chunks: list[Chunk]) -> None:
        if self._rehash is not None:
            await self._rehash
        # Hash and write in two worker threads at once: hashlib and os.writev both release the
        # GIL on large buffers, so they overlap each other and the event loop's network reads.
        await asyncio.gather(
            asyncio.to_thread(self._hash_all, chunks), asyncio.to_thread(self._write_all, chunks)
        )
        self.written += sum(map(len, chunks))

    async def hash_copy(self) -> Hasher:
        if self._rehash is not None:
            await self._rehash
        return self._hash.copy()

    def _hash_all(self, chunks: list[Chunk]) -> None:
        for chunk in chunks:
            self._hash.update(chunk)

    def _write_all(self, chunks: list[Chunk]) -> None:
        views = [memoryview(c) for c in chunks if c]
        first = 0
        while first < len(views):
            n = os.writev(self._fd, views[first : first + IOV_MAX])
            while n:
                if n >= len(views[first]):
                    n -= len(views[first])
                    first += 1
                else:
                    views[first] = views[first][n:]
                    n = 0

    def open_tail(self) -> int:
        return os.open(self.tmp_path, os.O_RDONLY)

    @property
    def verified_marker(self) -> Path:
        """Exists once the bytes verified: followers in other processes may send the last byte."""
        return verified_marker(self.tmp_path)

    async def verify(self) -> None:
        try:
            if self._rehash is not None:
                await self._rehash
            await asyncio.to_thread(self._verify, True)
        except BaseException:
            await self.abort()
            raise

    def _verify(self, mark: bool = False) -> None:
        if self._verified:
            return
        actual = "sha256:" + self._hash.hexdigest()
        if self.expected_size is not None and self.written != self.expected_size:
            raise UpstreamError(
                "upstream sent a body of the wrong length",
                {"digest": self.digest, "expected": self.expected_size, "got": self.written},
            )
        if actual != self.digest:
            raise DigestMismatch(self.digest, actual)
        self._verified = True
        if mark:
            with contextlib.suppress(OSError):  # followers then wait for the commit instead
                os.close(os.open(self.verified_marker, os.O_WRONLY | os.O_CREAT, 0o644))

    async def commit(self) -> None:
        try:
            if self._rehash is not None:
                await self._rehash
            await asyncio.to_thread(self._commit)
        except BaseException:
            await self.abort()
            raise

    def _commit(self) -> None:
        self._verify()
        os.fsync(self._fd)
        final = self.store.path_for(self.digest)
        final.parent.mkdir(exist_ok=True)
        os.replace(self.tmp_path, final)
        fsync_dir(final.parent)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.verified_marker)
        self._close()

    async def abort(self) -> None:
        if self._rehash is not None:  # its thread reads our descriptor: let it finish first
            await asyncio.wait([self._rehash])
            if not self._rehash.cancelled():
                self._rehash.exception()  # retrieved: the abort is the answer to it
        await asyncio.to_thread(self._abort)

    def _abort(self) -> None:
        if self._done:
            return
        for path in (self.tmp_path, self.verified_marker):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._close()

    def _close(self) -> None:
        if not self._done:
            self._done = True
            os.close(self._fd)


def temp_name(digest: Digest, size: int | None, source: str | None) -> str:
    """A fresh temp file name; the size in it lets other processes tail the file (see
    cache/fill.py), the source tag lets a later fill resume it (see the module docstring)."""
    declared = size if size is not None else "x"
    hexa = digest.split(":", 1)[1]
    return f"{hexa}.{declared}.{source_tag(source)}.{secrets.token_hex(6)}.part"


def verified_marker(tmp_path: Path) -> Path:
    return tmp_path.with_name(tmp_path.name + ".ok")


IOV_MAX = 1024
_FALLOC_FL_KEEP_SIZE = 1
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def reserve(fd: int, size: int) -> None:
    """Allocate `size` bytes of disk for `fd` without changing its length, so the length
    still tells readers in other processes how much has been written."""
    if _libc.fallocate(fd, _FALLOC_FL_KEEP_SIZE, ctypes.c_long(0), ctypes.c_long(size)) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(err, os.strerror(err))


def is_disk_full(exc: BaseException) -> bool:
    """The cache's file system cannot take more bytes (or cannot write them at all)."""
    if isinstance(exc, OSError):
        return exc.errno in {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS}
    return isinstance(exc, sqlite3.OperationalError) and "full" in str(exc)
