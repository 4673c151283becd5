"""`limits.max_header_size` and `limits.idle_timeout` reach aiohttp in a real `serve` process.

aiohttp silently falls back to its defaults when it cannot take the options the way they are
passed (it only logs "Failed to create request handler"), so these look at the behaviour on the
wire: a long header is refused and an idle keep-alive connection is closed on time.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.fixtures.fake_upstream import FakeUpstream
from tests.fixtures.mirror_server import MirrorProcess

IDLE_SECONDS = 1.0


@pytest.fixture
def limited(fake: FakeUpstream, tmp_path: Path) -> Iterator[MirrorProcess]:
    config = tmp_path / "mirror.yaml"
    config.write_text(yaml.safe_dump({"limits": {"max_header_size": "1KiB", "idle_timeout": "1s"}}))
    mirror = MirrorProcess(
        tmp_path / "cache", fake.url, "--config", str(config), log_path=tmp_path / "mirror.log"
    )
    mirror.start()
    try:
        yield mirror
    finally:
        mirror.stop()


def _request(sock: socket.socket, extra: str = "") -> bytes:
    """One keep-alive `GET /healthz`; the status line and headers of the answer."""
    sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(65536)
        if not chunk:
            break
        head += chunk
    return head


def _no_handler_fallback(mirror: MirrorProcess) -> None:
    text = mirror.log_path.read_text()
    assert "Failed to create request handler" not in text, text[-2000:]


def test_a_header_over_max_header_size_is_refused(limited: MirrorProcess) -> None:
    with socket.create_connection(("127.0.0.1", limited.port), timeout=5) as sock:
        head = _request(sock, "X-Padding: " + "a" * 4000 + "\r\n")
    status = int(head.split(b" ", 2)[1])
    assert status in (400, 431), head[:200]
    with socket.create_connection(("127.0.0.1", limited.port), timeout=5) as sock:
        head = _request(sock, "X-Padding: " + "a" * 500 + "\r\n")  # within the limit
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    _no_handler_fallback(limited)


def test_an_idle_keepalive_connection_is_closed_after_idle_timeout(
    limited: MirrorProcess,
) -> None:
    with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as sock:
        head = _request(sock)
        assert head.startswith(b"HTTP/1.1 200"), head[:200]
        body_length = int(
            next(
                line.split(b":", 1)[1]
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
        )
        rest = head.partition(b"\r\n\r\n")[2]
        while len(rest) < body_length:
            rest += sock.recv(65536)
        started = time.monotonic()
        time.sleep(IDLE_SECONDS + 1)
        sock.settimeout(2)
        try:
            closed = sock.recv(1) == b""
        except ConnectionResetError:
            closed = True
        except TimeoutError:
            closed = False
        assert closed, "the server kept an idle connection open past limits.idle_timeout"
        assert time.monotonic() - started < IDLE_SECONDS + 3
    _no_handler_fallback(limited)
