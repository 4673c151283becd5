"""The hash of a stream that left its disk behind, computed by one thread of its own.

Past a disk left behind (`cache.outrun_disk`), the SHA-256 of the client's stream is the cold
GET's critical path: on a 2-core machine it needs more CPU per byte than any other stage. The
fill used to hand it each batch with `asyncio.to_thread`, so between two batches the hash
waited for the event loop (busy, or waiting for a core itself) to hand over the next. Here the
event loop only appends chunks and the thread takes whatever is queued as soon as it is free:
cold GET 919 -> 970 MB/s median over 12 paired rounds (the reference: 937), faster in 9
(issue 20).

Memory: the chunks queued are the body's own (views, no copies), and `feed` waits once more
than `limit` bytes are unhashed until half of them are, so a fill still holds at most its share
of the bytes waiting (mirror/cache/fill.py) plus one chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque

from mirror.interfaces import Chunk, Hasher


class StreamHasher:
    """Feeds `hasher` in a thread; `finish` returns once every chunk fed is in it."""

    def __init__(self, hasher: Hasher) -> None:
        self._hasher = hasher
        self._queued: deque[Chunk] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.fed = 0  # bytes handed over (event loop)
        self.hashed = 0  # bytes in the hash (the thread)
        self._error: BaseException | None = None
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future[None] | None = None
        self._thread = threading.Thread(target=self._run, name="mirror-stream-hash", daemon=True)
        self._thread.start()

    async def feed(self, chunk: Chunk, limit: int) -> None:
        """Queue `chunk`; with more than `limit` bytes unhashed, wait until half are left."""
        with self._cond:
            self._queued.append(chunk)
            self.fed += len(chunk)
            self._cond.notify()
        if self.fed - self.hashed > limit:
            await self._behind_at_most(limit // 2)

    async def finish(self) -> None:
        await self._behind_at_most(0)

    def close(self) -> None:
        """Stop the thread (after the chunk it is hashing), dropping whatever is queued."""
        with self._cond:
            self._closed = True
            self._queued.clear()
            self._cond.notify()

    async def _behind_at_most(self, unhashed: int) -> None:
        # The waiter is set before the test, and the thread counts before it looks for a
        # waiter: a batch done between the two is seen either way.
        while True:
            self._waiter = self._loop.create_future()
            if self._error is not None:
                raise self._error
            if self.fed - self.hashed <= unhashed:
                self._waiter = None
                return
            await self._waiter

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._queued and not self._closed:
                        self._cond.wait()
                    if self._closed:
                        return
                    batch = list(self._queued)
                    self._queued.clear()
                for chunk in batch:
                    self._hasher.update(chunk)
                self.hashed += sum(map(len, batch))
                del batch
                self._wake()
        except BaseException as exc:  # handed to the waiting fill, which fails
            self._error = exc
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting
                self._loop.call_soon_threadsafe(_resolve, waiter)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
