"""Big plain-HTTP upstream bodies are read by a thread straight from the socket into reused
buffers (mirror/upstream/socket_body.py): exact bytes, a bounded wait on a stalled body, a
thread that stops on close, and buffers never refilled while a view of them is alive."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from mirror.upstream.socket_body import MIN_BODY, BufferPool, SocketBody

MiB = 1024 * 1024
BODY = os.urandom(6 * MiB + 123)


def _body_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "mirror-upstream-body"]


@pytest.fixture
async def server() -> AsyncIterator[str]:
    """/body: BODY; /small: 100 KiB; /stall: 2 MiB of BODY, then silence."""

    async def body(request: web.Request) -> web.StreamResponse:
        return web.Response(body=BODY)

    async def small(request: web.Request) -> web.StreamResponse:
        return web.Response(body=BODY[: 100 * 1024])

    async def stall(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = len(BODY)
        await resp.prepare(request)
        await resp.write(BODY[: 2 * MiB])
        await asyncio.sleep(30)
        return resp

    app = web.Application()
    app.router.add_get("/body", body)
    app.router.add_get("/small", small)
    app.router.add_get("/stall", stall)
    srv = TestServer(app, host="127.0.0.1")
    await srv.start_server()
    try:
        yield f"http://127.0.0.1:{srv.port}"
    finally:
        await srv.close()


async def test_a_big_plain_body_is_read_by_a_thread_into_views(server: str) -> None:
    async with aiohttp.ClientSession() as s:
        resp = await s.get(f"{server}/body")
        body = SocketBody.take(resp, read_timeout=10)
        assert body is not None
        sha, size, views, threads = hashlib.sha256(), 0, 0, 0
        async for chunk in body.chunks():
            sha.update(chunk)
            size += len(chunk)
            views += isinstance(chunk, memoryview)
            threads = max(threads, len(_body_threads()))
        await body.close()
        assert resp.connection is None  # closed, never handed back to the pool
    assert (size, sha.hexdigest()) == (len(BODY), hashlib.sha256(BODY).hexdigest())
    assert views >= 2 and threads == 1
    assert not _body_threads()


async def test_small_bodies_stay_with_aiohttp(server: str) -> None:
    async with aiohttp.ClientSession() as s, s.get(f"{server}/small") as resp:
        assert MIN_BODY > 100 * 1024
        assert SocketBody.take(resp, read_timeout=10) is None
        assert await resp.read() == BODY[: 100 * 1024]


async def test_a_stalled_body_fails_within_the_read_timeout(server: str) -> None:
    async with aiohttp.ClientSession() as s:
        resp = await s.get(f"{server}/stall")
        body = SocketBody.take(resp, read_timeout=0.3)
        assert body is not None
        got = 0
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            async for chunk in body.chunks():
                got += len(chunk)
        assert time.monotonic() - started < 5
        assert got == 2 * MiB
        await body.close()
    assert not _body_threads()


async def test_close_mid_body_stops_the_thread_at_once(server: str) -> None:
    async with aiohttp.ClientSession() as s:
        resp = await s.get(f"{server}/stall")
        body = SocketBody.take(resp, read_timeout=60)
        assert body is not None
        chunks = body.chunks()
        await anext(chunks)
        await anext(chunks)  # the thread is reading now, and then waits on the silent socket
        started = time.monotonic()
        await body.close()
        assert time.monotonic() - started < 2
        await chunks.aclose()
    assert not _body_threads()


def test_a_buffer_is_refilled_only_once_no_view_of_it_is_alive() -> None:
    pool = BufferPool(size=2, length=16)
    first = pool.take()
    view = first[:4].toreadonly()
    part = view[1:]  # a view of a view holds the buffer too
    del view, first
    second = pool.take()
    assert second.obj is not pool._buffers[0]
    del second
    assert pool.take().obj is pool._buffers[1]  # idle again
    del part
    assert pool.take().obj is pool._buffers[0]  # no view left
    extra = [pool.take() for _ in range(3)]  # all busy: new buffers, the pool stays at 2
    assert len(pool._buffers) == 2 and len({id(b.obj) for b in extra}) == 3


def test_the_pool_keeps_nothing_once_no_body_is_read() -> None:
    pool = BufferPool(size=4, length=16)
    pool.open()
    pool.open()
    held = [pool.take() for _ in range(3)]
    pool.close()
    assert len(pool._buffers) == 3, "another body is still read: the buffers stay for it"
    pool.close()
    assert pool._buffers == []
    assert all(len(v) == 16 for v in held), "views still alive keep their own buffers"


def test_threads_sharing_the_pool_never_get_a_buffer_in_use() -> None:
    """Every body thread of the process takes from one pool: a buffer handed to one thread is
    never handed to another while the first still holds a view of it."""
    pool = BufferPool(size=4, length=64)
    clashes: list[int] = []

    def worker(mark: int) -> None:
        for _ in range(3000):
            view = pool.take()
            view[:8] = mark.to_bytes(8, "little")
            time.sleep(0)  # let the other threads take meanwhile
            if bytes(view[:8]) != mark.to_bytes(8, "little"):
                clashes.append(mark)
            del view

    threads = [threading.Thread(target=worker, args=(m,)) for m in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not clashes
    assert len(pool._buffers) == 4


async def test_a_slow_upstreams_small_reads_share_buffers() -> None:
    """A body that trickles in small pieces is handed over as views that fill each buffer in
    turn: what a fill's window holds pins about as many buffers as its bytes need, not one
    whole buffer per read."""
    body = os.urandom(3 * MiB)

    async def trickle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = len(body)
        await resp.prepare(request)
        for at in range(0, len(body), 32 * 1024):
            await resp.write(body[at : at + 32 * 1024])
            await asyncio.sleep(0.001)
        return resp

    app = web.Application()
    app.router.add_get("/trickle", trickle)
    srv = TestServer(app, host="127.0.0.1")
    await srv.start_server()
    try:
        async with aiohttp.ClientSession() as s:
            resp = await s.get(f"http://127.0.0.1:{srv.port}/trickle")
            reader = SocketBody.take(resp, read_timeout=10)
            assert reader is not None
            chunks = [chunk async for chunk in reader.chunks()]  # every view kept alive
            await reader.close()
    finally:
        await srv.close()
    assert b"".join(chunks) == body
    views = [c for c in chunks if isinstance(c, memoryview)]
    buffers = {id(v.obj) for v in views}
    assert len(views) > 20, "the body came in many small reads"
    assert len(buffers) <= 4, f"{len(views)} reads held {len(buffers)} 1 MiB buffers"
