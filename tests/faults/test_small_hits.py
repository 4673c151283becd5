"""Small cached blobs go out in one sendfile call on the event loop when the client's socket has
room (mirror/web/responses.py `_sendfile_now`); when it has not (responses queued up behind a
client that does not read yet), the rest goes by the usual path, from the right offset."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

import pytest

from mirror.web import responses
from tests.fixtures.fake_upstream import FakeUpstream
from tests.fixtures.mirror_server import mirror_config, running_app, sha256_digest, wait_cached

BLOB = os.urandom(200 * 1024)  # below THREAD_SEND_MIN: sent from the loop


def _get(port: int, path: str, requests: int = 1, pause: float = 0.0) -> list[bytes]:
    """`requests` GETs of `path` sent at once on one connection (blocking; run in a thread),
    read after `pause`: the responses queue up in the server's socket meanwhile."""
    with socket.socket() as s:
        s.connect(("127.0.0.1", port))
        get = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        s.sendall(get * (requests - 1) + get.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
        time.sleep(pause)
        data = bytearray()
        while chunk := s.recv(65536):
            data += chunk
    bodies = []
    rest = bytes(data)
    for _ in range(requests):
        head, _, rest = rest.partition(b"\r\n\r\n")
        assert head.split(b" ", 2)[1] == b"200", head[:200]
        length = next(
            int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )  # fmt: skip
        bodies.append(rest[:length])
        rest = rest[length:]
    assert rest == b""
    return bodies


@pytest.mark.parametrize("slow", [False, True], ids=["room", "slow-reader"])
async def test_a_small_cached_blob_arrives_whole(
    fake: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slow: bool
) -> None:
    digest = fake.add_blob(BLOB)
    calls: list[tuple[int, int]] = []  # (bytes sent at once, bytes asked)
    direct = responses._sendfile_now

    def recorded(transport: asyncio.Transport, fd: int, offset: int, count: int) -> int:
        sent = direct(transport, fd, offset, count)
        calls.append((sent, count))
        return sent

    monkeypatch.setattr(responses, "_sendfile_now", recorded)
    async with running_app(mirror_config(tmp_path, fake.url)) as (base, _app):
        port = int(base.rsplit(":", 1)[1])
        path = f"/v2/lib/app/blobs/{digest}"
        (first,) = await asyncio.to_thread(_get, port, path)  # the miss: fetched and cached
        assert sha256_digest(first) == digest
        wait_cached(tmp_path, digest)
        calls.clear()
        requests, pause = (40, 0.5) if slow else (1, 0.0)
        bodies = await asyncio.to_thread(_get, port, path, requests, pause)
    assert [sha256_digest(b) for b in bodies] == [digest] * requests
    assert len(calls) == requests and all(asked == len(BLOB) for _, asked in calls)
    if slow:
        assert any(sent < len(BLOB) for sent, _ in calls), "a full socket: the usual path"
    else:
        assert calls[0][0] == len(BLOB), "a socket with room takes the blob in one call"
    assert fake.count("GET", digest) == 1


async def test_an_empty_cached_blob_is_sent_empty(fake: FakeUpstream, tmp_path: Path) -> None:
    """Zero bytes: nothing for sendfile to send, which is not a file shorter than its size."""
    digest = fake.add_blob(b"")
    async with running_app(mirror_config(tmp_path, fake.url)) as (base, _app):
        port = int(base.rsplit(":", 1)[1])
        path = f"/v2/lib/app/blobs/{digest}"
        assert await asyncio.to_thread(_get, port, path) == [b""]  # the miss
        wait_cached(tmp_path, digest)
        # Two hits on one connection: the first must not cut it off as a failed send would.
        assert await asyncio.to_thread(_get, port, path, 2) == [b"", b""]
    assert fake.count("GET", digest) == 1
