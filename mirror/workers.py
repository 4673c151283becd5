"""Several worker processes on one port (SO_REUSEPORT), supervised by the first process.

Each worker is a full `registry-mirror serve` on the shared cache directory; the fill locks in
the cache make sure only one of them fetches any blob from the upstream, and the others follow
its temp file. The supervisor passes SIGTERM/SIGINT/SIGHUP on, restarts a worker that dies (a few
times a minute at most), and merges their Prometheus metrics through a shared directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import structlog
from prometheus_client import multiprocess

log = structlog.get_logger(__name__)
# prometheus_client leaves this one unannotated; its signature is (pid) -> None.
mark_process_dead: Callable[[int], None] = multiprocess.mark_process_dead

MAX_RESTARTS_PER_MINUTE = 5
WORKER_FLAG = "--reuse-port"  # how a worker knows it shares the port


def supervise(argv: list[str], count: int, cache_dir: Path, shutdown_timeout: float) -> int:
    """Run `count` workers until SIGTERM/SIGINT; 0 if they all stopped cleanly."""
    metrics_dir = cache_dir / "metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    env = {
        **os.environ,
        "REGISTRY_MIRROR_WORKERS": "1",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    cmd = [sys.executable, "-m", "mirror", *argv, WORKER_FLAG]
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for proc in workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def reload(signum: int, _frame: object) -> None:
        for proc in workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGHUP)  # each worker reloads its TLS certificate

    workers: list[subprocess.Popen[bytes]] = []
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)
    workers.extend(subprocess.Popen(cmd, env=env) for _ in range(count))
    log.info("workers_started", count=count, pids=[p.pid for p in workers])
    restarts: deque[float] = deque()
    while not stopping:
        time.sleep(0.2)
        for i, proc in enumerate(workers):
            code = proc.poll()
            if code is None or stopping:
                continue
            mark_process_dead(proc.pid)
            now = time.monotonic()
            while restarts and now - restarts[0] > 60:
                restarts.popleft()
            if len(restarts) >= MAX_RESTARTS_PER_MINUTE:
                log.error("workers_failing", exit_code=code)
                stop(signal.SIGTERM, None)
                break
            restarts.append(now)
            log.warning("worker_restarted", pid=proc.pid, exit_code=code)
            workers[i] = subprocess.Popen(cmd, env=env)
    deadline = time.monotonic() + shutdown_timeout + 10
    codes = []
    for proc in workers:
        try:
            codes.append(proc.wait(max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(proc.wait())
    log.info("workers_stopped", exit_codes=codes)
    return 0 if all(code == 0 for code in codes) and len(restarts) < MAX_RESTARTS_PER_MINUTE else 1
