"""The soak's lean HTTP client (benchmarks/pull_client.py) verifies what it was sent: the
digest is of the bytes received, a short or unframed body is an error, and a kept-alive
connection the server closed is replaced, not failed on."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from benchmarks.pull_client import Client, HTTPError

BODY = os.urandom(3 * 1024 * 1024 + 17)
KEEPALIVE = 0.3  # seconds the server keeps an idle connection


@pytest.fixture
async def server() -> AsyncIterator[tuple[TestServer, list[str]]]:
    """/body: BODY; /short: half of it, then the connection closes; /chunked: no length;
    /close: BODY with `Connection: close`. Yields the server and the peers it saw."""
    peers: list[str] = []

    async def body(request: web.Request) -> web.StreamResponse:
        peers.append(str(request.transport.get_extra_info("peername")))  # type: ignore[union-attr]  # a live request has its transport
        return web.Response(body=BODY, headers={"X-Seen": request.headers.get("Accept", "")})

    async def short(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = len(BODY)
        await resp.prepare(request)
        await resp.write(BODY[: len(BODY) // 2])
        assert request.transport is not None
        request.transport.close()
        return resp

    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"x" * 100)
        return resp

    async def close(request: web.Request) -> web.StreamResponse:
        return web.Response(body=BODY, headers={"Connection": "close"})

    app = web.Application()
    for path, handler in (
        ("/body", body),
        ("/short", short),
        ("/chunked", chunked),
        ("/close", close),
    ):
        app.router.add_get(path, handler)
    srv = TestServer(app, host="127.0.0.1")
    await srv.start_server(keepalive_timeout=KEEPALIVE)
    try:
        yield srv, peers
    finally:
        await srv.close()


async def test_the_digest_is_of_the_bytes_received(server: tuple[TestServer, list[str]]) -> None:
    srv, peers = server
    client = Client("127.0.0.1", srv.port or 0)
    try:
        r = await client.get("/body", {"Accept": "x/y"}, keep_body=True)
        again = await client.get("/body")
    finally:
        await client.close()
    assert r.status == 200 and r.headers["x-seen"] == "x/y"
    assert (r.length, r.digest, r.body) == (
        len(BODY),
        "sha256:" + hashlib.sha256(BODY).hexdigest(),
        BODY,
    )
    assert again.digest == r.digest and again.body == b"", "blobs are hashed, not kept"
    assert len(set(peers)) == 1, "the connection was kept alive"


@pytest.mark.parametrize("path", ["/short", "/chunked"])
async def test_a_short_or_unframed_body_is_an_error(
    server: tuple[TestServer, list[str]], path: str
) -> None:
    srv, _ = server
    client = Client("127.0.0.1", srv.port or 0, timeout=10)
    try:
        with pytest.raises(HTTPError):
            await client.get(path)
    finally:
        await client.close()


async def test_a_connection_the_server_closed_is_replaced(
    server: tuple[TestServer, list[str]],
) -> None:
    srv, peers = server
    client = Client("127.0.0.1", srv.port or 0)
    try:
        assert (await client.get("/close")).length == len(BODY)  # not kept
        await client.get("/body")
        await asyncio.sleep(KEEPALIVE * 3)  # the server closes the idle kept-alive connection
        assert (await client.get("/body")).length == len(BODY)
    finally:
        await client.close()
    assert len(set(peers)) == 2
