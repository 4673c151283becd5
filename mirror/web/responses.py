"""Responses that send bytes: cached files by sendfile (with Range), fills as they stream."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from mirror.cache.blobs import OpenBlob
from mirror.cache.fill import TailReader

FALLBACK_CHUNK = 1024 * 1024


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
    """Send a fill to the client as it arrives (from byte `start`), each new range by
    sendfile; a failed fill (wrong digest, truncation) aborts the connection."""
    response = _streaming(None if size is None else size - start, headers)
    ranges = reader.ranges(start)
    try:
        with _abort_on_failure(request):
            await response.prepare(request)
            loop = asyncio.get_running_loop()
            sendfile = size is not None  # chunked framing needs the writer to see every byte
            async for offset, count in ranges:
                if sendfile and request.transport is not None:
                    try:
                        await loop.sendfile(request.transport, reader.file, offset, count)
                        continue
                    except NotImplementedError:
                        sendfile = False
                end = offset + count
                while offset < end:
                    data = await reader.read(offset, min(FALLBACK_CHUNK, end - offset))
                    await response.write(data)
                    offset += len(data)
    finally:
        await ranges.aclose()
        reader.close()
    await response.write_eof()
    return response
