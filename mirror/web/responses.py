"""Responses that send bytes: cached files by sendfile, fills as they stream, pass-through
streams; any of them whole, as one byte range, or as `multipart/byteranges` (`send_blob`).

Ranges before verification. A range that ends before the blob's last byte may be sent from a
fill (or a pass-through stream) whose digest has not been checked yet; a range that includes the
last byte is released only after the digest matched (`TailReader`, `verified`). This is safe:
- no client trusts a blob's bytes before it has all of them and has hashed them to the digest
  it asked for (docker, containerd, podman/skopeo verify the whole layer; containerd's parallel
  ranged chunks are assembled and verified as one); a lazy-pull client (stargz, zstd:chunked)
  checks each chunk against its TOC digest, itself covered by the manifest;
- if the upstream's bytes were wrong, the fill fails its digest check, so the range holding the
  last byte (which every whole fetch needs) is cut off: the client's verification fails and it
  asks again, and the mirror then fetches again;
- the mirror itself never commits, marks verified, or serves as cached any unverified byte,
  and such a response carries `Cache-Control: no-store`, so no shared HTTP cache on the way
  keeps it either.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Protocol

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from mirror.cache.blobs import OpenBlob
from mirror.cache.fill import TailReader
from mirror.interfaces import Chunk
from mirror.ranges import ByteRange, multipart
from mirror.web.sender import ThreadSender, plain_socket

FALLBACK_CHUNK = 1024 * 1024
THREAD_SEND_MIN = 256 * 1024  # smaller bodies: one sendfile call on the loop costs less than a hop


class StreamAborted(ConnectionResetError):
    """A streamed body was cut off on purpose: its bytes failed verification or never came."""


class SendfileResponse(web.StreamResponse):
    """Sends `count` bytes of an open file from `offset` with zero-copy sendfile.

    aiohttp's FileResponse would reopen the file by path and set its own mtime-based ETag; we
    already hold the file open (so eviction cannot pull it away) and our ETag is the digest.
    """

    def __init__(
        self, blob: OpenBlob, offset: int, count: int, *, status: int, headers: dict[str, str]
    ) -> None:
        super().__init__(status=status, headers=headers)
        self._blob = blob
        self._offset = offset
        self._count = count
        self.content_length = count

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:  # aiohttp prepares once more after the handler: nothing to resend
            return await super().prepare(request)
        try:
            writer = await super().prepare(request)
            if request.method == "HEAD" or self._count == 0 or writer is None:
                return writer
            transport = request.transport
            if transport is None:
                raise ConnectionResetError("client went away")
            loop = asyncio.get_running_loop()
            try:
                await loop.sendfile(transport, self._blob.file, self._offset, self._count)
            except NotImplementedError:
                await self._send_by_copy(writer)
            await super().write_eof()
            return writer
        finally:
            self._blob.close()

    async def _send_by_copy(self, writer: web.StreamResponse | object) -> None:
        fd = self._blob.file.fileno()
        pos, end = self._offset, self._offset + self._count
        while pos < end:
            data = await asyncio.to_thread(os.pread, fd, min(FALLBACK_CHUNK, end - pos), pos)
            if not data:
                raise OSError("cached blob shorter than its size")
            await super().write(data)
            pos += len(data)


def _streaming(size: int | None, headers: dict[str, str]) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers=headers)
    if size is not None:
        response.content_length = size
    else:
        response.enable_chunked_encoding()
    return response


@contextlib.contextmanager
def _abort_on_failure(request: web.Request) -> Iterator[None]:
    """A body that fails half-way cuts the connection: the client sees a broken transfer,
    never a complete-looking one."""
    try:
        yield
    except Exception as exc:
        if request.transport is not None:
            request.transport.abort()
        raise StreamAborted(str(exc)) from exc


async def stream_bytes(
    request: web.Request, chunks: AsyncIterator[bytes], size: int | None, headers: dict[str, str]
) -> web.StreamResponse:
    """Send bytes from an iterator (the disk-full pass-through)."""
    response = _streaming(size, headers)
    with _abort_on_failure(request):
        await response.prepare(request)
        async for chunk in chunks:
            await response.write(chunk)
    await response.write_eof()
    return response


async def stream_fill(
    request: web.Request,
    reader: TailReader,
    size: int | None,
    headers: dict[str, str],
    *,
    start: int = 0,
) -> web.StreamResponse:
    """Send a fill to the client as it arrives (from byte `start`); a failed fill (wrong
    digest, truncation) aborts the connection."""
    response = _streaming(None if size is None else size - start, headers)
    body = FillBody(reader)
    try:
        with _abort_on_failure(request):
            await response.prepare(request)
            await body.send(request, response, start, None)
    finally:
        await body.close()
    await response.write_eof()
    return response


# -- any body, whole or by ranges -------------------------------------------------------------


class BlobBody(Protocol):
    """Where a response's blob bytes come from; `send` writes `[start, stop)` (stop None: to
    the end), called with increasing, non-overlapping ranges."""

    async def send(
        self, request: web.Request, response: web.StreamResponse, start: int, stop: int | None
    ) -> None: ...

    async def close(self) -> None: ...


class FileBody:
    """A committed blob's open file."""

    def __init__(self, blob: OpenBlob) -> None:
        self.blob = blob

    async def send(
        self, request: web.Request, response: web.StreamResponse, start: int, stop: int | None
    ) -> None:
        end = self.blob.size if stop is None else stop
        transport = request.transport
        if transport is not None and not response.chunked:
            if end - start < THREAD_SEND_MIN:
                if start < end:
                    start += _sendfile_now(transport, self.blob.file.fileno(), start, end - start)
                if start == end:
                    return
            # Big bodies are copied by a thread: a multi-megabyte sendfile call on the event
            # loop would hold up every small request (manifests) behind it.
            sender = ThreadSender.open(transport) if end - start >= THREAD_SEND_MIN else None
            if sender is not None:
                try:
                    await sender.sendfile(self.blob.file.fileno(), start, end - start)
                finally:
                    sender.close()
                return
            with contextlib.suppress(NotImplementedError):
                loop = asyncio.get_running_loop()
                await loop.sendfile(transport, self.blob.file, start, end - start)
                return
        fd = self.blob.file.fileno()
        while start < end:
            data = await asyncio.to_thread(os.pread, fd, min(FALLBACK_CHUNK, end - start), start)
            if not data:
                raise OSError("cached blob shorter than its size")
            await response.write(data)
            start += len(data)

    async def close(self) -> None:
        self.blob.close()


def _sendfile_now(transport: asyncio.Transport, file_fd: int, offset: int, count: int) -> int:
    """Bytes one non-blocking sendfile on the loop puts in the socket now. A small body whose
    socket has room goes in this one call, without asyncio's sendfile set-up (pausing reads,
    a writer registered and removed: four epoll changes and two loop turns per response,
    measured as a third of the loop's time on small cached blobs). 0 when aiohttp still
    holds bytes that must go first, or the transport is not a plain open socket."""
    sock = plain_socket(transport)
    if sock is None or transport.get_write_buffer_size():
        return 0
    try:
        sent = os.sendfile(sock.fileno(), file_fd, offset, count)
    except (BlockingIOError, InterruptedError):
        return 0
    if sent == 0:
        raise OSError("cached blob shorter than its size")
    return sent


class FillBody:
    """A fill in flight, tailed: bytes near its head go from its in-memory window as they
    arrive, older ones from the temp file by sendfile (the last byte only once verified, see
    `TailReader`)."""

    def __init__(self, reader: TailReader) -> None:
        self.reader = reader

    async def send(
        self, request: web.Request, response: web.StreamResponse, start: int, stop: int | None
    ) -> None:
        pieces = self.reader.pieces(start, stop)
        sender = None if response.chunked else ThreadSender.open(request.transport)
        try:
            loop = asyncio.get_running_loop()
            sendfile = not response.chunked
            async for offset, count, data in pieces:
                if sender is not None:
                    if data:
                        await sender.write(data)
                    else:
                        await sender.sendfile(self.reader.file.fileno(), offset, count)
                    continue
                if data:
                    for view in data:
                        await response.write(view)
                    continue
                if sendfile and request.transport is not None:
                    try:
                        await loop.sendfile(request.transport, self.reader.file, offset, count)
                        continue
                    except NotImplementedError:
                        sendfile = False
                end = offset + count
                while offset < end:
                    chunk = await self.reader.read(offset, min(FALLBACK_CHUNK, end - offset))
                    await response.write(chunk)
                    offset += len(chunk)
        finally:
            await pieces.aclose()
            if sender is not None:
                sender.close()

    async def close(self) -> None:
        self.reader.close()


class StreamBody:
    """A forward-only byte stream (pass-through, or a cluster's shared store without a local
    tier): bytes before a range are read and dropped, reading stops at the last range."""

    def __init__(self, chunks: AsyncGenerator[Chunk, None]) -> None:
        self.chunks = chunks
        self.pos = 0
        self._left: Chunk = b""  # read past the previous range's end

    async def send(
        self, request: web.Request, response: web.StreamResponse, start: int, stop: int | None
    ) -> None:
        while stop is None or self.pos < stop:
            chunk, self._left = self._left, b""
            if not chunk:
                try:
                    chunk = await anext(self.chunks)
                except StopAsyncIteration:
                    if stop is None:
                        return
                    raise OSError("blob stream shorter than its size") from None
            begin, end = self.pos, self.pos + len(chunk)
            if stop is not None and end > stop:
                chunk, self._left = chunk[: stop - begin], chunk[stop - begin :]
                end = stop
            self.pos = end
            if end > start:
                await response.write(chunk[max(0, start - begin) :])

    async def close(self) -> None:
        await self.chunks.aclose()


async def send_blob(
    request: web.Request,
    body: BlobBody,
    size: int | None,
    headers: dict[str, str],
    ranges: list[ByteRange] | None = None,
) -> web.StreamResponse:
    """The blob whole (200; `ranges` None), one range (206 with `Content-Range`), or several
    as `multipart/byteranges` (206). A body that fails part-way aborts the connection."""
    parts: list[tuple[bytes, int, int | None]]
    tail = b""
    if ranges is None:
        response = _streaming(size, headers)
        parts = [(b"", 0, None)]
    else:
        assert size is not None and ranges
        response = web.StreamResponse(status=206, headers=headers)
        if len(ranges) == 1:
            (only,) = ranges
            response.headers["Content-Range"] = only.content_range(size)
            response.content_length = only.length
            parts = [(b"", only.start, only.stop)]
        else:
            content_type = headers.get("Content-Type", "application/octet-stream")
            framing = multipart(ranges, size, content_type, secrets.token_hex(16))
            response.headers["Content-Type"] = framing.content_type
            response.content_length = framing.content_length
            parts = [(h, r.start, r.stop) for h, r in zip(framing.heads, ranges, strict=True)]
            tail = framing.tail
    try:
        with _abort_on_failure(request):
            await response.prepare(request)
            if request.method != "HEAD":
                for head, start, stop in parts:
                    if head:
                        await response.write(head)
                    await body.send(request, response, start, stop)
                if tail:
                    await response.write(tail)
    finally:
        await body.close()
    await response.write_eof()
    return response
