"""Body bytes written to the client's socket from worker threads.

A cold fill costs the event loop two copies per byte: the upstream's bytes in (recv) and out to
each client (send/sendfile). Done on one loop, that caps a fill at what one core can copy, below
the reference registry (Go spreads them over cores). Here the copy out runs in a thread
(`send`/`sendfile` release the GIL), so the loop only receives; the socket stays non-blocking
and the loop waits for it to drain, so a slow client holds no thread.

The thread writes to its own duplicate of the socket's descriptor: if the connection closes
meanwhile, the number cannot be reused for another client's socket under it.
"""

from __future__ import annotations

import asyncio
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Any

_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="mirror-send")
IOV_MAX = 1024
DRAIN_POLL = 0.001  # seconds between looks at aiohttp's own buffer (only after headers/frames)


def plain_socket(transport: asyncio.BaseTransport | None) -> Any | None:
    """The stream socket under an open, plain (not TLS) transport, which bytes may be written
    to directly (asyncio's TransportSocket wrapper); None otherwise (tests, TLS, closing)."""
    if not isinstance(transport, asyncio.Transport) or transport.is_closing():
        return None
    if transport.get_extra_info("sslcontext") is not None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None or sock.type != socket.SOCK_STREAM:
        return None
    return sock


class ThreadSender:
    """Copies pieces to one client connection from a thread; `None` from `open` when the
    transport has no real socket (tests, TLS): callers then write through aiohttp."""

    def __init__(self, transport: asyncio.Transport, fd: int) -> None:
        self.transport = transport
        self.fd = fd
        self.loop = asyncio.get_running_loop()

    @classmethod
    def open(cls, transport: asyncio.BaseTransport | None) -> ThreadSender | None:
        sock = plain_socket(transport)
        if sock is None:
            return None
        assert isinstance(transport, asyncio.Transport)
        return cls(transport, os.dup(sock.fileno()))

    async def _flushed(self) -> None:
        """What aiohttp queued (headers, multipart frames) goes first."""
        while self.transport.get_write_buffer_size():
            if self.transport.is_closing():
                raise ConnectionResetError("client went away")
            await asyncio.sleep(DRAIN_POLL)

    async def _writable(self) -> None:
        done: asyncio.Future[None] = self.loop.create_future()

        def ready() -> None:
            if not done.done():
                done.set_result(None)

        self.loop.add_writer(self.fd, ready)
        try:
            await done
        finally:
            self.loop.remove_writer(self.fd)

    async def write(self, views: list[memoryview]) -> None:
        """Send the views in order (the caller keeps them unchanged until this returns)."""
        await self._flushed()
        views = [v for v in views if v]
        while views:
            views = await self.loop.run_in_executor(_POOL, _send_some, self.fd, views)
            if views:
                await self._writable()

    async def sendfile(self, file_fd: int, offset: int, count: int) -> None:
        await self._flushed()
        while count:
            sent = await self.loop.run_in_executor(
                _POOL, _sendfile_some, self.fd, file_fd, offset, count
            )
            offset += sent
            count -= sent
            if count:
                await self._writable()

    def close(self) -> None:
        os.close(self.fd)


def _send_some(fd: int, views: list[memoryview]) -> list[memoryview]:
    """Send until done or the socket is full; what is left to send."""
    while views:
        try:
            sent = os.writev(fd, views[:IOV_MAX])
        except BlockingIOError:
            break
        while sent and views:
            if sent >= len(views[0]):
                sent -= len(views[0])
                views = views[1:]
            else:
                views[0] = views[0][sent:]
                sent = 0
    return views


def _sendfile_some(out_fd: int, in_fd: int, offset: int, count: int) -> int:
    total = 0
    while total < count:
        try:
            n = os.sendfile(out_fd, in_fd, offset + total, count - total)
        except BlockingIOError:
            break
        if n == 0:
            raise OSError("file shorter than its size")
        total += n
    return total
