"""Hosted bytes on disk: uploads in progress, and committing them into the cache's store.

    <cache.dir>/
    ├── blobs/sha256/<2 hex>/<hex>    the cache's store: a pushed layer and a pulled one are
    │                                 the same file                       [cache/blobs.py]
    ├── blobs/sha512/<2 hex>/<hex>    sha512 content (only ever pushed)
    └── hosted/
        ├── hosted.db                 what is hosted where                      [metadata.py]
        ├── uploads/<id>              an upload's bytes so far (flocked while written)
        └── locks/<hex>               a flock per digest: commit and gc's sweep take turns

An upload's bytes become visible only by an atomic rename after they hashed to the digest the
client named and were fsynced; a crash leaves at most a file under `uploads/` (removed with its
abandoned upload) or a verified file in the store no hosted record names (the cache's, then).
All of it runs in threads: nothing here may block the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from mirror.cache.blobs import FilesystemBlobStore, fsync_dir
from mirror.reference import Digest

HASH_CHUNK = 1024 * 1024


def new_hasher(algorithm: str) -> Any:
    """A hashlib object for a digest algorithm the hosted API accepts (sha256, sha512)."""
    return hashlib.sha512() if algorithm == "sha512" else hashlib.sha256()


class Busy(Exception):
    """Another request is writing this upload right now."""


class HostedContent:
    """Paths and blocking file operations (callers run them in threads)."""

    def __init__(self, store: FilesystemBlobStore, root: Path) -> None:
        self.store = store
        self.root = root  # <cache.dir>/hosted
        self.uploads = root / "uploads"
        self.locks = root / "locks"

    def setup(self) -> None:
        self.uploads.mkdir(parents=True, exist_ok=True)
        self.locks.mkdir(parents=True, exist_ok=True)

    def path_for(self, digest: Digest) -> Path:
        algorithm, hexpart = digest.split(":", 1)
        if algorithm == "sha256":
            return self.store.path_for(digest)
        return self.store.root / "blobs" / algorithm / hexpart[:2] / hexpart

    def upload_path(self, upload_id: str) -> Path:
        return self.uploads / upload_id

    def exists(self, digest: Digest) -> bool:
        return self.path_for(digest).exists()

    # -- uploads ------------------------------------------------------------------------------

    def create_upload(self, upload_id: str) -> None:
        fd = os.open(self.upload_path(upload_id), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.close(fd)

    def upload_size(self, upload_id: str) -> int | None:
        try:
            return self.upload_path(upload_id).stat().st_size
        except FileNotFoundError:
            return None

    @contextlib.contextmanager
    def writing(self, upload_id: str) -> Iterator[int]:
        """The upload's file open for appending, flocked (`Busy` if another writer holds it)."""
        try:
            fd = os.open(self.upload_path(upload_id), os.O_WRONLY | os.O_APPEND)
        except FileNotFoundError:
            raise KeyError(upload_id) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise Busy(upload_id) from None
            yield fd
        finally:
            os.close(fd)

    def is_busy(self, upload_id: str) -> bool:
        try:
            with self.writing(upload_id):
                return False
        except Busy:
            return True
        except KeyError:
            return False

    def remove_upload(self, upload_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.upload_path(upload_id).unlink()

    def hash_file(self, upload_id: str, algorithm: str) -> str:
        hasher = new_hasher(algorithm)
        with open(self.upload_path(upload_id), "rb") as f:
            while data := f.read(HASH_CHUNK):
                hasher.update(data)
        return f"{algorithm}:{hasher.hexdigest()}"

    # -- commit and removal -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def locked(self, digest: Digest) -> AsyncIterator[None]:
        """A flock per digest, taken in a thread: placing a file and recording it happen
        under it, and so do gc's forgetting and unlinking it, so neither sees the other
        halfway (among this node's processes; a cluster adds a Redis lease: shared.py)."""
        fd = await asyncio.to_thread(self._lock, digest)
        try:
            yield
        finally:
            await asyncio.to_thread(os.close, fd)

    def _lock(self, digest: Digest) -> int:
        fd = os.open(self.locks / digest.replace(":", "-"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def place_upload(self, upload_id: str, digest: Digest) -> None:
        """Move a verified upload to its digest's path (fsynced first); if the store already
        has those bytes (pulled, or pushed before), the upload is simply dropped."""
        source = self.upload_path(upload_id)
        if not self.place_file(source, digest):
            source.unlink()

    def place_file(self, source: Path, digest: Digest) -> bool:
        """A verified file (an upload, or fetched from the shared store) to its digest's path:
        fsync, rename, fsync the directory. False (nothing moved) if the digest is there."""
        target = self.path_for(digest)
        if target.exists():
            return False
        with open(source, "rb") as f:
            os.fsync(f.fileno())
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(source, target)
        fsync_dir(target.parent)
        return True

    def place_bytes(self, digest: Digest, data: bytes) -> None:
        """Write verified bytes (a manifest) to their digest's path: temp file, fsync, rename."""
        target = self.path_for(digest)
        if target.exists():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.uploads / f".{digest.split(':', 1)[1][:32]}.{os.getpid()}.{id(data)}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, target)
        fsync_dir(target.parent)

    def read_bytes(self, digest: Digest) -> bytes | None:
        try:
            return self.path_for(digest).read_bytes()
        except FileNotFoundError:
            return None

    def unlink(self, digest: Digest) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path_for(digest).unlink()
