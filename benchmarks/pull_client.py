"""A lean HTTP/1.1 GET client for the soak's load: every blob verified, at little more than
the cost of its hash.

aiohttp's client parses each body through its parser into new `bytes`, queues them and joins
them for `iter_any`: about 0.9 CPU s per GB before the hash on the 2-core VM the soak was
measured on, so the 32 verifying clients took 1.3 of its 2 cores and set the pace for any cache
past ~130 pulls/s (issue 20). Here a response is read with `asyncio.BufferedProtocol` straight
into one reused buffer per connection and hashed in place: what is left per byte is the
socket's copy and the SHA-256.

Only what the soak needs: GET, keep-alive, bodies of declared length (anything else is an
error, never a guess), a bounded wait per request.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass

BUFFER = 1024 * 1024  # one connection's read buffer
HEAD_MAX = 64 * 1024  # a response head larger than this is an error


class HTTPError(Exception):
    """The response broke HTTP/1.1 as this client reads it, or the connection failed."""


class _ClosedBeforeResponse(HTTPError):
    """The server closed a kept-alive connection before answering: safe to ask again."""


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # names lower-cased
    length: int  # body bytes received
    digest: str  # "sha256:<hex>" of the body
    body: bytes  # the body itself only when asked for (manifests); else b""


class _Connection(asyncio.BufferedProtocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self) -> None:
        self._buf = bytearray(BUFFER)
        self._view = memoryview(self._buf)
        self._filled = 0
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[Response] | None = None
        self._head: tuple[int, dict[str, str]] | None = None
        self._remaining = 0
        self._received = 0
        self._hash = hashlib.sha256()
        self._keep: bytearray | None = None
        self.open = False
        self.reusable = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self.open = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        self._fail(
            _ClosedBeforeResponse("closed before the response")
            if self._head is None and self._filled == 0
            else HTTPError(f"connection lost after {self._received} body bytes: {exc}")
        )

    def eof_received(self) -> bool:
        return False  # close; connection_lost fails a response still being read

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        self._filled += nbytes
        try:
            self._consume()
        except HTTPError as exc:
            self._fail(exc)
            self.close()

    def send(
        self, target: str, host: str, headers: dict[str, str], keep_body: bool
    ) -> asyncio.Future[Response]:
        assert self._transport is not None and self._waiter is None
        lines = [f"GET {target} HTTP/1.1", f"Host: {host}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        self._head, self._filled, self._received = None, 0, 0
        self._hash = hashlib.sha256()
        self._keep = bytearray() if keep_body else None
        self.reusable = False
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        return self._waiter

    def close(self) -> None:
        self.open = False
        if self._transport is not None:
            self._transport.close()

    def _consume(self) -> None:
        if self._waiter is None:
            raise HTTPError("bytes arrived with no request outstanding")
        start = 0
        if self._head is None:
            end = self._buf.find(b"\r\n\r\n", 0, self._filled)
            if end < 0:
                if self._filled >= HEAD_MAX:
                    raise HTTPError(f"response head larger than {HEAD_MAX} bytes")
                return  # the rest of the head is still to come
            self._head = _parse_head(bytes(self._view[:end]))
            length = self._head[1].get("content-length")
            if length is None or not length.isdigit():
                raise HTTPError(f"response without a Content-Length: {self._head[1]}")
            self._remaining = int(length)
            start = end + 4
        body = self._view[start : self._filled]
        if len(body) > self._remaining:
            raise HTTPError(f"{len(body) - self._remaining} bytes past the declared length")
        if body:
            self._hash.update(body)
            if self._keep is not None:
                self._keep += body
            self._remaining -= len(body)
            self._received += len(body)
        del body
        self._filled = 0  # the buffer is read from its start again
        if self._remaining == 0:
            self._finish()

    def _finish(self) -> None:
        assert self._head is not None and self._waiter is not None
        status, headers = self._head
        self.reusable = headers.get("connection", "").lower() != "close"
        waiter, self._waiter, self._head = self._waiter, None, None
        if not waiter.done():
            digest = "sha256:" + self._hash.hexdigest()
            body = bytes(self._keep or b"")
            waiter.set_result(Response(status, headers, self._received, digest, body))

    def _fail(self, exc: HTTPError) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise HTTPError(f"not an HTTP/1.x status line: {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise HTTPError(f"malformed header line: {line!r}")
        key = name.strip().lower()
        if key == "transfer-encoding":
            raise HTTPError(f"Transfer-Encoding {value.strip()} is not read by this client")
        headers[key] = value.strip()
    return int(parts[1]), headers


class Client:
    """Kept-alive connections to one `host:port`, as many as requests run at once."""

    def __init__(self, host: str, port: int, timeout: float = 60.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._idle: list[_Connection] = []

    async def get(
        self, target: str, headers: dict[str, str] | None = None, *, keep_body: bool = False
    ) -> Response:
        """GET `target`; the whole body is read (and hashed) before this returns. A request
        on a kept-alive connection the server had closed is sent again on a new one."""
        async with asyncio.timeout(self.timeout):
            while self._idle:
                conn = self._idle.pop()
                if not conn.open:
                    continue
                try:
                    return await self._exchange(conn, target, headers or {}, keep_body)
                except _ClosedBeforeResponse:
                    continue
            return await self._exchange(await self._connect(), target, headers or {}, keep_body)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(_Connection, self.host, self.port)
        return conn

    async def _exchange(
        self, conn: _Connection, target: str, headers: dict[str, str], keep_body: bool
    ) -> Response:
        try:
            response = await conn.send(target, f"{self.host}:{self.port}", headers, keep_body)
        except BaseException:
            conn.close()
            raise
        if conn.reusable and conn.open:
            self._idle.append(conn)
        else:
            conn.close()
        return response

    async def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()
