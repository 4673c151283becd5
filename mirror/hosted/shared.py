"""Committed hosted content beyond this node: `SharedContent`, with two implementations.

- `NoSharedContent` (one node): the node's store is the only copy; the digest lock is a flock;
- `S3SharedContent` (a cluster): a commit also puts the blob in the shared store (for sha256,
  the very object the cache's shared tier uses: one copy whether pushed or pulled); a node
  asked for a blob it lacks fetches it from there (verified) before serving; gc removes it
  there too; the digest lock is a Redis lease held with the node's flock.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any, Protocol

from mirror.hosted.content import HostedContent, new_hasher
from mirror.hosted.uploads import WRITE_BATCH, put_file, shared_io
from mirror.reference import Digest

LOCK_LEASE = 60.0  # seconds a node may hold a digest's lock (a commit or a sweep)
LOCK_WAIT = 30.0  # how long to wait for it before giving up


class SharedContent(Protocol):
    async def publish(self, digest: Digest) -> None:
        """Make the committed local file of `digest` available to every node."""

    async def fetch(self, digest: Digest) -> bool:
        """Bring `digest` into this node's store from the shared one (verified); whether it
        is now local."""

    async def delete(self, digest: Digest) -> None:
        """Remove `digest` from the shared store (a no-op if absent)."""

    def locked(self, digest: Digest) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold the digest's lock: placing and recording a commit happen under it, and so
        does gc's forgetting and removing, on every node."""


class NoSharedContent:
    def __init__(self, content: HostedContent) -> None:
        self.content = content

    async def publish(self, digest: Digest) -> None:
        return None

    async def fetch(self, digest: Digest) -> bool:
        return await asyncio.to_thread(self.content.exists, digest)

    async def delete(self, digest: Digest) -> None:
        return None

    def locked(self, digest: Digest) -> contextlib.AbstractAsyncContextManager[None]:
        return self.content.locked(digest)


class S3SharedContent:
    def __init__(self, content: HostedContent, s3: Any, locks: Any, owner: str) -> None:
        self.content = content
        self.s3 = s3  # mirror.cache.s3.S3BlobStore (the cluster extra: not imported here)
        self.locks = locks  # mirror.cache.redis_store.RedisStore
        self.owner = owner

    def key(self, digest: Digest) -> str:
        algorithm, hexpart = digest.split(":", 1)
        if algorithm == "sha256":
            return str(self.s3.key(digest))
        return f"{self.s3.config.prefix}blobs/{algorithm}/{hexpart[:2]}/{hexpart}"

    async def _exists(self, digest: Digest) -> bool:
        try:
            await self.s3.client.head_object(Bucket=self.s3.bucket, Key=self.key(digest))
        except Exception as exc:
            if "404" in str(exc) or "NoSuchKey" in str(exc) or "Not Found" in str(exc):
                return False
            raise
        return True

    async def publish(self, digest: Digest) -> None:
        with shared_io("publish"):
            if not await self._exists(digest):
                await put_file(self.s3, self.key(digest), self.content.path_for(digest))

    async def fetch(self, digest: Digest) -> bool:
        if await asyncio.to_thread(self.content.exists, digest):
            return True
        with shared_io("fetch"):
            return await self._fetch(digest)

    async def _fetch(self, digest: Digest) -> bool:
        if not await self._exists(digest):
            return False
        tmp = self.content.uploads / f".fetch-{digest.split(':', 1)[1][:32]}-{os.getpid()}"
        hasher = new_hasher(digest.split(":", 1)[0])
        response = await self.s3.client.get_object(Bucket=self.s3.bucket, Key=self.key(digest))
        try:
            f = await asyncio.to_thread(open, tmp, "wb")
            with f:
                async with response["Body"] as stream:
                    while data := await stream.read(WRITE_BATCH):
                        await asyncio.to_thread(_hash_and_write, f, hasher, data)
            if f"{digest.split(':', 1)[0]}:{hasher.hexdigest()}" != digest:
                return False  # the shared copy is wrong: never served
            await asyncio.to_thread(self.content.place_file, tmp, digest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(tmp.unlink)
        return True

    async def delete(self, digest: Digest) -> None:
        with contextlib.suppress(Exception):
            await self.s3.client.delete_object(Bucket=self.s3.bucket, Key=self.key(digest))

    @contextlib.asynccontextmanager
    async def locked(self, digest: Digest) -> AsyncIterator[None]:
        name = f"hosted-{digest}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LOCK_WAIT
        while not await self.locks.acquire_fill(name, self.owner, LOCK_LEASE):
            if loop.time() > deadline:
                raise TimeoutError(f"the lock of {digest} stayed taken")
            await asyncio.sleep(0.05)
        try:
            async with self.content.locked(digest):
                yield
        finally:
            await self.locks.release_fill(name, self.owner)


def _hash_and_write(f: Any, hasher: Any, data: bytes) -> None:
    hasher.update(data)
    f.write(data)
