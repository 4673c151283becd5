"""The least a cache can do on a cold blob GET, as a yardstick for scenario 2 (issue 20).

Usage: python benchmarks/relay.py --port PORT --upstream http://HOST:PORT --dir DIR [--no-verify]

Per request, one thread reads the upstream's body into one reused 1 MiB buffer, writes it to a
file in DIR and sends it on: the copies every storing cache makes, with no framework, no
window, no index. With verification (the default) a second thread hashes the file as it grows
and the last byte goes out only once the SHA-256 matched the digest in the path, as the mirror
does; --no-verify sends everything at once, as the reference proxy does. The same run then
shows what the digest check itself costs on this machine, apart from how either cache is built.
Anything that is not a blob of known length is passed through as it is. Each blob's file is
kept, as a cache keeps it (the runner removes DIR). Benchmarks only: it trusts its upstream and
its clients.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import socket
import socketserver
import tempfile
import threading
from urllib.parse import urlsplit

CHUNK = 1024 * 1024
BLOB = re.compile(rb"^GET (/v2/\S+/blobs/sha256:([0-9a-f]{64})) HTTP/1\.[01]$")


def read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """An HTTP head (up to its blank line) and whatever body bytes came with it."""
    data = b""
    while b"\r\n\r\n" not in data:
        got = sock.recv(65536)
        if not got:
            raise ConnectionError("connection closed inside the head")
        data += got
    head, rest = data.split(b"\r\n\r\n", 1)
    return head, rest


def content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return None


class FileHasher(threading.Thread):
    """Hashes a file as it is written (`written` says how far), from the page cache."""

    def __init__(self, fd: int, length: int) -> None:
        super().__init__(daemon=True)
        self.fd, self.length = fd, length
        self.digest = hashlib.sha256()
        self._written = 0
        self._stopped = False
        self._cond = threading.Condition()

    def written(self, upto: int) -> None:
        with self._cond:
            self._written = upto
            self._cond.notify()

    def stop(self) -> None:
        """The body ended early: what was not written will never be."""
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def run(self) -> None:
        view, pos = memoryview(bytearray(CHUNK)), 0
        while pos < self.length:
            with self._cond:
                while self._written <= pos and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                upto = self._written
            while pos < upto:
                got = os.preadv(self.fd, [view[: min(CHUNK, upto - pos)]], pos)
                self.digest.update(view[:got])
                pos += got


class Handler(socketserver.BaseRequestHandler):
    server: Relay

    def handle(self) -> None:
        client: socket.socket = self.request
        head, _ = read_head(client)
        request = head.split(b"\r\n", 1)[0]
        upstream = socket.create_connection(self.server.upstream)
        with upstream:
            path = request.split(b" ")[1]
            upstream.sendall(
                b"GET " + path + b" HTTP/1.1\r\nHost: " + self.server.host + b"\r\n"
                b"Connection: close\r\n\r\n"
            )
            up_head, rest = read_head(upstream)
            length = content_length(up_head)
            blob = BLOB.match(request)
            if blob is None or length is None or b" 200 " not in up_head.split(b"\r\n")[0]:
                client.sendall(up_head + b"\r\n\r\n" + rest)
                while got := upstream.recv(CHUNK):
                    client.sendall(got)
                return
            client.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n" % length
            )
            self.relay(upstream, client, rest, length, blob.group(2).decode())

    def relay(
        self, upstream: socket.socket, client: socket.socket, rest: bytes, length: int, hex_: str
    ) -> None:
        fd, _ = tempfile.mkstemp(dir=self.server.dir, prefix=hex_)
        hasher = FileHasher(fd, length) if self.server.verify else None
        if hasher is not None:
            hasher.start()
        buf = memoryview(bytearray(CHUNK))
        buf[: len(rest)] = rest
        have, done = len(rest), 0
        try:
            while done < length:
                if not have:
                    have = upstream.recv_into(buf[: min(CHUNK, length - done)])
                    if not have:
                        raise ConnectionError("upstream body ended early")
                os.pwrite(fd, buf[:have], done)
                if hasher is None:
                    client.sendall(buf[:have])
                    done, have = done + have, 0
                    continue
                hasher.written(done + have)
                send = min(have, length - 1 - done)  # the last byte waits for the digest
                client.sendall(buf[:send])
                if send < have:
                    hasher.join()
                    if hasher.digest.hexdigest() != hex_:
                        return  # the client sees a short body: an error, not a blob
                    client.sendall(buf[send:have])
                done, have = done + have, 0
        finally:
            if hasher is not None:
                hasher.stop()
                hasher.join()
            os.close(fd)


class Relay(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, upstream: str, directory: str, verify: bool) -> None:
        url = urlsplit(upstream)
        assert url.hostname is not None and url.port is not None, upstream
        self.upstream = (url.hostname, url.port)
        self.host = url.netloc.encode()
        self.dir = directory
        self.verify = verify
        super().__init__(("127.0.0.1", port), Handler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--no-verify", dest="verify", action="store_false")
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    with Relay(args.port, args.upstream, args.dir, args.verify) as server:
        server.serve_forever()


if __name__ == "__main__":
    main()
