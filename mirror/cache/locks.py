"""Fill locks across processes: one lock file per digest, held with `flock` while filling.

Several workers (or `registry-mirror` commands) share one cache directory; whoever holds a
digest's lock is the only one fetching it from the upstream, and the others tail its temp file.
`flock` dies with its process, so a crashed filler never blocks anyone. Later: a Redis lease
with the same shape for a cluster.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from mirror.reference import Digest


class FileLocks:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def setup(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, digest: Digest) -> Path:
        return self.directory / digest.split(":", 1)[1]

    def try_acquire(self, digest: Digest) -> int | None:
        """The lock's file descriptor if we now hold it, or None if someone else does."""
        path = self._path(digest)
        for _ in range(3):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)  # the previous holder unlinked it as we opened it: try the new file
        return None

    def release(self, digest: Digest, fd: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(digest))  # while still held: no one can lock a stale inode
        os.close(fd)

    def is_held(self, digest: Digest) -> bool:
        """Whether another process holds the lock right now."""
        fd = self.try_acquire(digest)
        if fd is None:
            return True
        self.release(digest, fd)
        return False
