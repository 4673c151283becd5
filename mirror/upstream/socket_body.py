"""A big plain-HTTP blob body read off the event loop, into reused buffers.

aiohttp reads a body on the event loop, 256 KiB at a time into new `bytes`, copies it through
its parser and joins what queued. With the malloc settings that keep a worker's memory flat
(mirror/memory.py) each of those is a fresh mapping faulted in page by page: about 2 CPU s per
GB on the loop, which held a cold fill near 400 MB/s on a 2-core machine (issue 20, measured).

So once the headers are in, a plain (not TLS) body of declared length is read here instead: a
thread `recv_into`s reused 1 MiB buffers straight from the connection's socket and hands the
loop read-only views of them. A buffer is filled again only when nothing refers to it any more:
the fill's window, the disk writer and the client sends each hold a view while they use it.
The thread runs at most `AHEAD` buffers ahead of the consumer (then the socket's own buffer
fills and TCP slows the sender), and a read waits at most the upstream's `read_timeout`. The
connection is closed afterwards: aiohttp's parser never saw the body, so it cannot be reused.

TLS bodies stay on aiohttp: the TLS state lives in asyncio's transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import sys
import threading
from collections import deque
from collections.abc import AsyncIterator

import aiohttp

BUFFER = 1024 * 1024  # one read buffer; a chunk is at most this
MIN_BODY = 1024 * 1024  # smaller bodies keep aiohttp's path (and the pooled connection)
AHEAD = 4  # chunks the thread may have handed over that the consumer has not taken
POOL = 16  # buffers the process keeps for reuse (see BufferPool)
STOP_POLL = 0.5  # seconds: how often a thread waiting for room looks for close()


def _refs(buf: bytearray) -> int:
    return sys.getrefcount(buf)


class BufferPool:
    """The buffers the process's body threads read into, shared by its fills: at most `size`
    kept, each handed out again once no view of it is alive (a view, even a slice of one,
    holds a reference to its buffer); past that, ordinary allocations, freed when unused.

    Shared, so that one big fill may use them all: its window and backlog hold up to 12 MiB
    of views at once, and a pool of 8 per fill made a third of a cold 512 MiB fill's reads
    fresh mappings, faulted in page by page (measured: cold GET 644 -> 762 MB/s with 16).
    Memory stays bounded by `size` whatever the number of fills, and while no body is read
    the pool keeps nothing, so a past fill leaves no memory behind."""

    def __init__(self, size: int = POOL, length: int = BUFFER) -> None:
        self.size = size
        self.length = length
        self._buffers: list[bytearray] = []
        self._idle = self._calibrate()
        self._lock = threading.Lock()
        self._bodies = 0

    def open(self) -> None:
        """A body starts being read."""
        with self._lock:
            self._bodies += 1

    def close(self) -> None:
        """A body's thread ended: with none left, the kept buffers go (views still alive keep
        theirs until they are dropped)."""
        with self._lock:
            self._bodies -= 1
            if not self._bodies:
                self._buffers.clear()

    @staticmethod
    def _calibrate() -> int:
        """References an unused buffer shows in `take`'s loop (the list's, the loop's, the
        calls'): measured the same way, so it holds whatever the interpreter counts."""
        for buf in [bytearray(1)]:
            return _refs(buf)
        raise AssertionError("unreachable")

    def take(self) -> memoryview:
        """A whole buffer as a view; the view is made under the lock, so no other thread can
        see the buffer idle once it is handed out."""
        with self._lock:
            for buf in self._buffers:
                if _refs(buf) == self._idle:
                    return memoryview(buf)
            buf = bytearray(self.length)
            if len(self._buffers) < self.size:
                self._buffers.append(buf)
            return memoryview(buf)  # beyond the pool's size: freed once unused


_POOL = BufferPool()


_Item = memoryview | BaseException | None  # a chunk, the read's failure, or the end


class SocketBody:
    """The rest of one response's body, read by a thread from the connection's socket."""

    def __init__(
        self,
        resp: aiohttp.ClientResponse,
        sock: socket.socket,
        first: bytes,
        remaining: int,
        read_timeout: float | None,
    ) -> None:
        self._resp = resp
        self._sock = sock  # our own duplicate of the connection's socket
        self._first = first
        self._remaining = remaining
        self._timeout = read_timeout
        self._loop = asyncio.get_running_loop()
        self._items: deque[_Item] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._room = threading.Semaphore(AHEAD)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def take(cls, resp: aiohttp.ClientResponse, read_timeout: float | None) -> SocketBody | None:
        """Take the body over from aiohttp if it is plain HTTP of known length and at least
        `MIN_BODY` is still to come; None (aiohttp keeps it) otherwise."""
        conn = resp.connection
        length = resp.content_length
        if conn is None or conn.transport is None or conn.protocol is None or length is None:
            return None
        transport = conn.transport
        if transport.get_extra_info("sslcontext") is not None or transport.is_closing():
            return None
        if "Transfer-Encoding" in resp.headers or resp.content.exception() is not None:
            return None
        raw = transport.get_extra_info("socket")
        if raw is None or raw.type != socket.SOCK_STREAM:
            return None
        remaining = length - resp.content.total_bytes
        if remaining < MIN_BODY:
            return None
        first = resp.content.read_nowait()  # what aiohttp already parsed: the first chunk
        conn.protocol.pause_reading()  # the loop reads no more of it (and drops its timer)
        sock = socket.socket(fileno=os.dup(raw.fileno()))
        return cls(resp, sock, first, remaining, read_timeout)

    async def chunks(self) -> AsyncIterator[bytes | memoryview]:
        if self._first:
            yield self._first
            self._first = b""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="mirror-upstream-body", daemon=True
            )
            self._thread.start()
        while True:
            while not self._items:
                self._waiter = self._loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
            item = self._items.popleft()
            self._room.release()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _arrived(self, item: _Item) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _hand(self, item: _Item) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening
            self._loop.call_soon_threadsafe(self._arrived, item)

    def _run(self) -> None:
        """The thread: read until the declared length, the peer's EOF, a failure or close()."""
        _POOL.open()
        try:
            self._read_body()
        finally:
            _POOL.close()

    def _read_body(self) -> None:
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        timeout_ms = None if self._timeout is None else int(self._timeout * 1000)
        remaining = self._remaining
        free = memoryview(b"")  # the unfilled rest of the buffer being read into
        try:
            while remaining and not self._stop.is_set():
                while not self._room.acquire(timeout=STOP_POLL):
                    if self._stop.is_set():
                        return
                if not free:
                    # Only views hold a buffer (a name for it would keep it from reuse).
                    free = _POOL.take()
                view = free[:remaining]
                got = self._read(view, poller, timeout_ms)
                if self._stop.is_set():
                    return
                if not got:
                    break  # EOF: the consumer finds the body short of its length
                remaining -= got
                self._hand(view[:got].toreadonly())
                # The next read goes on in the same buffer: a slow upstream's small reads
                # share buffers instead of holding a whole one each.
                free = free[got:]
                del view
        except BaseException as exc:
            self._hand(exc)
            return
        self._hand(None)

    def _read(self, view: memoryview, poller: select.poll, timeout_ms: int | None) -> int:
        """Fill `view` with what the socket has, waiting only while it has nothing yet."""
        got = 0
        while got < len(view):
            try:
                n = self._sock.recv_into(view[got:])
            except BlockingIOError:
                if got:
                    return got
                if not poller.poll(timeout_ms):
                    raise TimeoutError("upstream blob read timed out") from None
                continue  # close() shuts the socket down: then recv_into reads the EOF
            if n == 0:
                return got
            got += n
        return got

    async def close(self) -> None:
        """Stop the thread (waking it from any wait) and close the connection."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._room.release()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self._sock.close()
        self._items.clear()
        self._resp.close()
