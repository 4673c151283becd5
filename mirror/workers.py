"""How `registry-mirror serve` holds its port: one process, or a supervisor and its workers.

The instance binds its port itself, so a second instance on the same port fails at start
("127.0.0.1:5000 is already in use") instead of quietly taking half of the connections. One
process binds without SO_REUSEPORT (exclusive). With several workers the supervisor first takes
the port's instance lock (an abstract Unix socket named after the port: one holder per network
namespace, released by the kernel when the process dies), then binds one SO_REUSEPORT socket
per worker and hands socket i to worker i (an inherited file descriptor): the kernel spreads new
connections over the workers by their addresses, as it did when each worker bound its own, and a
restarted worker gets its predecessor's socket (connections queued meanwhile wait for it). A
second instance finds the lock taken; any other program on the port makes the bind fail. Every
worker is a full `registry-mirror serve`. They share the cache directory:
its fill locks make sure only one worker fetches any blob from the upstream while the others
follow its temp file. The supervisor passes SIGTERM/SIGINT/SIGHUP on, restarts a worker that
dies (a few times a minute at most), and merges their Prometheus metrics through a shared
directory.

Exit codes of `serve`: 0 after a clean stop on SIGTERM or SIGINT; 1 when it could not start (the
address is in use or not allowed, a worker failed before serving, ...) or its workers kept dying;
2 for an invalid configuration (cli.py). A start failure is one line on stderr, not a traceback
(`--log-level debug` logs the traceback of an unexpected one).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from mirror.config import Config, ConfigError
from mirror.startup import startup_warnings
from mirror.upstream.bandwidth import WORKERS_VARIABLE

if TYPE_CHECKING:  # the supervisor never imports the web stack: it stays small (issue 20)
    from aiohttp import web

log = structlog.get_logger(__name__)


def mark_process_dead(pid: int, path: str) -> None:
    """Drop a dead worker's live gauges from the shared metrics directory. The path must be
    given: the supervisor's own environment has no PROMETHEUS_MULTIPROC_DIR."""
    from prometheus_client import multiprocess

    # prometheus_client leaves it unannotated; its signature is (pid, path) -> None.
    dead: Callable[[int, str], None] = multiprocess.mark_process_dead
    dead(pid, path)


MAX_RESTARTS_PER_MINUTE = 5
EXIT_START_FAILED = 1
LISTEN_FDS_FLAG = "--listen-fds"  # a worker serves on these inherited sockets...
STATUS_FD_FLAG = "--status-fd"  # ...and says "ready" (or why it could not start) on this pipe
BACKLOG = 128  # aiohttp's default
# How a worker may end when the supervisor stops it: cleanly, or killed by the signal before
# it had installed its handlers (while still importing: nothing was in flight).
CLEAN_EXITS = (0, -signal.SIGTERM, -signal.SIGINT)


class StartError(Exception):
    """The mirror could not start serving; `str()` is the one line the operator sees."""


class StopSignals:
    """SIGTERM and SIGINT ask for one clean stop; a repeat changes nothing. (A terminal's
    Ctrl-C reaches every process of the group, and the supervisor passes SIGTERM on too.)"""

    def __init__(self) -> None:
        self.requested = False
        self._listeners: list[Callable[[], None]] = []
        self.install()

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, _signum: int, _frame: object) -> None:
        self.request()

    def request(self) -> None:
        if self.requested:
            return
        self.requested = True
        for listener in self._listeners:
            listener()

    def on_request(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)
        if self.requested:
            listener()


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def instance_lock(host: str, port: int) -> socket.socket:
    """Hold the port for this instance: an abstract Unix socket named after the port (any
    host: SO_REUSEPORT would let 127.0.0.1:P join 0.0.0.0:P); taken already, another
    registry-mirror serves the port. Keep the socket open while serving."""
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        lock.bind(f"\0registry-mirror:tcp-port:{port}")
    except OSError as exc:
        lock.close()
        if exc.errno == errno.EADDRINUSE:
            raise StartError(f"{address(host, port)} is already in use") from None
        raise StartError(f"cannot lock {address(host, port)}: {exc.strerror or exc}") from None
    return lock


def bind_groups(host: str, port: int, count: int) -> list[list[socket.socket]]:
    """One group of listening sockets per worker, all on HOST:PORT with SO_REUSEPORT (take
    `instance_lock` first: this alone would let a second instance join)."""
    return [bind(host, port, reuse_port=True) for _ in range(count)]


def bind(host: str, port: int, *, reuse_port: bool = False) -> list[socket.socket]:
    """Listening sockets for HOST:PORT, one per address the host stands for (as asyncio would
    bind them); without `reuse_port` an address another process listens on fails here."""
    where = address(host, port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartError(f"cannot listen on {where}: {exc.strerror}") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, sockaddr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            # Binding over connections in TIME_WAIT (a restart) is fine; over a listener, not.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:  # "::" means IPv6 only, as asyncio binds it
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            sock.listen(BACKLOG)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise StartError(_bind_failure(where, exc)) from None
    return sockets


def _bind_failure(where: str, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"{where} is already in use"
    if exc.errno == errno.EACCES:
        return (
            f"cannot listen on {where}: permission denied"
            " (a port below 1024 needs root or CAP_NET_BIND_SERVICE)"
        )
    return f"cannot listen on {where}: {exc.strerror or exc}"


def inherited(fds: str) -> list[socket.socket]:
    """The listening sockets a worker got from its supervisor (`--listen-fds 3,4`)."""
    return [socket.socket(fileno=int(fd)) for fd in fds.split(",")]


def log_listening(config: Config, sockets: list[socket.socket], workers: int) -> None:
    """The one start line of an instance (not one per worker)."""
    host, _ = config.listen_address()
    port = int(sockets[0].getsockname()[1])
    url = f"{'https' if config.tls.enabled else 'http'}://{address(host, port)}"
    upstreams = {"default": config.upstream.url}
    upstreams |= {name: upstream.url for name, upstream in config.upstreams.items()}
    log.info(
        f"listening on {url}",
        url=url,
        offline=config.offline,
        cache_dir=str(config.cache.dir),
        upstreams=upstreams,
        workers=workers,
    )
    for warning in startup_warnings(config):
        log.warning("startup_warning", message=warning)


def describe(exc: BaseException) -> str:
    """One line for an unexpected start failure."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def run(
    runner: web.AppRunner,
    sockets: list[socket.socket],
    ssl_context: ssl.SSLContext | None,
    stop: StopSignals,
    on_ready: Callable[[], None],
) -> None:
    """Serve on `sockets` until SIGTERM/SIGINT, then shut down cleanly and return. What fails
    before serving (the app's start-up: cache, index, metrics listener) raises StartError."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(_serve(runner, sockets, ssl_context, stop, on_ready))
    finally:
        try:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()
            asyncio.set_event_loop(None)
            stop.install()  # closing the loop put the default handlers back


async def _serve(
    runner: web.AppRunner,
    sockets: list[socket.socket],
    ssl_context: ssl.SSLContext | None,
    stop: StopSignals,
    on_ready: Callable[[], None],
) -> None:
    from aiohttp import web

    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.request)  # wakes the loop, whichever thread
    stop.on_request(stopped.set)
    try:
        with starting():
            await runner.setup()
            for sock in sockets:
                await web.SockSite(runner, sock, ssl_context=ssl_context, backlog=BACKLOG).start()
    except BaseException:
        with contextlib.suppress(Exception):
            await runner.cleanup()
        raise
    on_ready()
    try:
        await stopped.wait()
    finally:
        await runner.cleanup()  # stop accepting, let responses finish (shutdown_timeout)


@contextlib.contextmanager
def starting() -> Iterator[None]:
    """What the block raises is a start failure: one line for the operator, not a traceback
    (the traceback is logged at debug level)."""
    try:
        yield
    except (StartError, ConfigError):
        raise
    except Exception as exc:
        log.debug("start_failed", exc_info=True)
        raise StartError(f"cannot start: {describe(exc)}") from None


def report(status_fd: int, kind: str, message: str = "") -> None:
    """A worker tells its supervisor `ready` or `failed` (one write: atomic on a pipe)."""
    line = f"{kind} {os.getpid()} {message}".encode()[:4000] + b"\n"
    with contextlib.suppress(OSError):
        os.write(status_fd, line)


class _StatusPipe:
    """What the workers report: who is serving, and why one could not start."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        self.ready: set[int] = set()
        self.failures: dict[int, str] = {}
        self._partial = b""

    def wait(self, timeout: float) -> None:
        select.select([self.read_fd], [], [], timeout)
        self.drain()

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self.read_fd, 65536):
                self._partial += chunk
        *lines, self._partial = self._partial.split(b"\n")
        for line in lines:
            kind, _, rest = line.decode(errors="replace").partition(" ")
            pid, _, message = rest.partition(" ")
            if not pid.isdigit():
                continue
            if kind == "ready":
                self.ready.add(int(pid))
            elif kind == "failed":
                self.failures[int(pid)] = message

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


def _ignore_sigint() -> None:
    """In a new worker, until it installs its own handlers: a Ctrl-C while it is still
    importing would be a KeyboardInterrupt traceback (its supervisor stops it with SIGTERM),
    and a reload passed on then would end it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def supervise(
    argv: list[str],
    count: int,
    groups: list[list[socket.socket]],
    cache_dir: Path,
    shutdown_timeout: float,
    stop: StopSignals,
    on_ready: Callable[[], None],
) -> int:
    """Run `count` workers, worker i on `groups[i]`, until SIGTERM/SIGINT; 0 if they all
    stopped cleanly. Raises StartError when a worker fails before any of them served."""
    metrics_dir = cache_dir / "metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    status = _StatusPipe()
    env = {
        **os.environ,
        "REGISTRY_MIRROR_WORKERS": "1",
        WORKERS_VARIABLE: str(count),  # each takes its share of an upstream's bandwidth cap
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    cmd = [sys.executable, "-m", "mirror", *argv]

    def spawn(i: int) -> subprocess.Popen[bytes]:
        fds = [sock.fileno() for sock in groups[i]]
        flags = [LISTEN_FDS_FLAG, ",".join(map(str, fds)), STATUS_FD_FLAG, str(status.write_fd)]
        return subprocess.Popen(
            cmd + flags, env=env, pass_fds=(*fds, status.write_fd), preexec_fn=_ignore_sigint
        )

    def stop_workers() -> None:
        for proc in workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def reload(_signum: int, _frame: object) -> None:
        for proc in workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGHUP)  # each worker reloads its TLS certificate

    workers: list[subprocess.Popen[bytes]] = []
    stop.on_request(stop_workers)
    signal.signal(signal.SIGHUP, reload)
    workers.extend(spawn(i) for i in range(count))
    restarts: deque[float] = deque()
    start_error: str | None = None
    failing = announced = False
    while not stop.requested:
        status.wait(0.2)
        if status.ready and not announced and not stop.requested:
            log.info("workers_started", count=count, pids=[p.pid for p in workers])
            on_ready()
            announced = True
        for i, proc in enumerate(workers):
            code = proc.poll()
            if code is None or stop.requested:
                continue
            mark_process_dead(proc.pid, str(metrics_dir))
            status.drain()  # what it said before it exited
            error = status.failures.get(proc.pid)
            if not status.ready:  # none is serving yet: the instance failed to start
                start_error = error or f"a worker exited with code {code} before serving"
                stop.request()
                break
            now = time.monotonic()
            while restarts and now - restarts[0] > 60:
                restarts.popleft()
            if len(restarts) >= MAX_RESTARTS_PER_MINUTE:
                log.error("workers_failing", exit_code=code, error=error)
                failing = True
                stop.request()
                break
            restarts.append(now)
            log.warning("worker_restarted", worker=proc.pid, exit_code=code, error=error)
            workers[i] = spawn(i)
    stop_workers()  # again: a worker spawned while the stop was asked for has not been told
    deadline = time.monotonic() + shutdown_timeout + 10
    codes = []
    for proc in workers:
        try:
            codes.append(proc.wait(max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(proc.wait())
    status.close()
    if start_error is not None:
        raise StartError(start_error)  # the one line, with no log lines around it
    log.info("workers_stopped", exit_codes=codes)
    return 0 if all(code in CLEAN_EXITS for code in codes) and not failing else 1
