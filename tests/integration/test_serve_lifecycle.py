"""`registry-mirror serve` as an operator starts and stops it: one instance per port (its workers
share it), a start failure is one line and an exit code, Ctrl-C is a clean stop with exit code
0, and one line says where it listens. Real processes; nothing is fetched from an upstream."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.certs import CertAuthority
from tests.fixtures.mirror_server import MirrorProcess, free_port, wait_for_workers

CLOSED = "http://127.0.0.1:9"  # no upstream at all


def serve_cmd(listen: str, cache_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "mirror", "serve",
        "--listen", listen, "--cache-dir", str(cache_dir), "--upstream", CLOSED,
    ]  # fmt: skip


def serve_env(workers: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_MIRROR_")}
    env |= {"REGISTRY_MIRROR_LOG_FORMAT": "json", "REGISTRY_MIRROR_WORKERS": str(workers)}
    return env | (extra or {})


def finish(proc: subprocess.Popen[str], timeout: float) -> tuple[int | None, str]:
    """Its exit code within `timeout` (None: it was still running, and is stopped now) and
    everything it wrote on stderr."""
    try:
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, err
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        return None, err


def start_failure(listen: str, cache_dir: Path, workers: int, extra: dict[str, str]) -> str:
    """Run a `serve` that must fail at start; the one line it printed (logs aside)."""
    proc = subprocess.Popen(
        serve_cmd(listen, cache_dir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=serve_env(workers, extra),
        text=True,
    )
    code, err = finish(proc, 20)
    assert code is not None, f"it kept running:\n{err[-3000:]}"
    assert code != 0
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if not line.startswith("{")]  # not JSON logs
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("registry-mirror: ")
    return lines[0]


def get(url: str, context: ssl.SSLContext | None = None) -> tuple[int, str]:
    """Status and X-Request-ID of a GET on a new connection."""
    request = urllib.request.Request(url, headers={"Connection": "close"})
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, response.headers.get("X-Request-ID", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("X-Request-ID", "")


def listening(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if str(e.get("event", "")).startswith("listening on ")]


def wait_listening(mirror: MirrorProcess, limit: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if lines := listening(mirror.log_events()):
            return lines[0]
        time.sleep(0.1)
    raise AssertionError(f"no 'listening on' line:\n{mirror.log_path.read_text()[-2000:]}")


def served_ids(mirror: MirrorProcess) -> dict[str, int]:
    """request_id -> pid of every request line in its log."""
    return {e["request_id"]: e["pid"] for e in mirror.log_events() if e.get("event") == "request"}


@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_instance_on_the_port_fails_and_the_first_keeps_every_request(
    tmp_path: Path, workers: int
) -> None:
    first = MirrorProcess(
        tmp_path / "first",
        CLOSED,
        log_path=tmp_path / "first.log",
        env={"REGISTRY_MIRROR_WORKERS": str(workers)},
    )
    first.start()
    try:
        wait_for_workers(first, workers)
        second = subprocess.Popen(
            serve_cmd(first.address, tmp_path / "second"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=serve_env(workers),
            text=True,
        )
        with contextlib.suppress(subprocess.TimeoutExpired):
            second.wait(10)  # if it runs on (split brain), ask anyway: what clients would see
        answers = [get(f"{first.url}/v2/") for _ in range(20)]
        code, err = finish(second, 0.1)
        assert code is not None, f"the second instance started on {first.address}:\n{err[-2000:]}"
        assert code == 1
        assert len(err.splitlines()) == 1, err[-3000:]
        assert f"{first.address} is already in use" in err
        assert [status for status, _ in answers] == [200] * 20
        by_first = served_ids(first)
        assert all(request_id in by_first for _, request_id in answers), "all from the first"
        assert first.proc is not None and first.proc.poll() is None
    finally:
        first.stop()


def test_two_workers_share_the_port_of_one_instance_which_says_where_it_listens(
    tmp_path: Path,
) -> None:
    mirror = MirrorProcess(
        tmp_path / "cache",
        CLOSED,
        log_path=tmp_path / "mirror.log",
        env={"REGISTRY_MIRROR_WORKERS": "2"},
    )
    mirror.start()
    assert mirror.proc is not None
    try:
        pids = wait_for_workers(mirror, 2)
        for _ in range(20):  # up to 200 new connections, until both workers have answered
            assert {get(f"{mirror.url}/v2/")[0] for _ in range(10)} == {200}
            if set(served_ids(mirror).values()) == pids:
                break
        assert set(served_ids(mirror).values()) == pids, "both workers accept on the one port"
        line = wait_listening(mirror)
        assert line["event"] == f"listening on http://{mirror.address}"
        assert line["pid"] == mirror.proc.pid  # the instance's line, not one per worker
        assert line["offline"] is False
        assert line["cache_dir"] == str(tmp_path / "cache")
        assert line["upstreams"] == {"default": CLOSED}
        assert len(listening(mirror.log_events())) == 1
    finally:
        mirror.stop()


@pytest.mark.parametrize(
    ("failure", "workers"),
    [("bad_tls_cert", 2), ("metrics_port_taken", 1), ("metrics_port_taken", 2)],
)
def test_a_start_failure_is_one_line_and_an_exit_code(
    tmp_path: Path, failure: str, workers: int
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        if failure == "bad_tls_cert":
            for name in ("cert.pem", "key.pem"):
                (tmp_path / name).write_text("not a certificate\n")
            extra = {
                "REGISTRY_MIRROR_TLS_CERT": str(tmp_path / "cert.pem"),
                "REGISTRY_MIRROR_TLS_KEY": str(tmp_path / "key.pem"),
            }
            expected = "certificate"
        else:  # fails inside the app's start-up, in each worker
            extra = {"REGISTRY_MIRROR_METRICS_LISTEN": f"127.0.0.1:{taken.getsockname()[1]}"}
            expected = "in use"
        line = start_failure(f"127.0.0.1:{free_port()}", tmp_path / "cache", workers, extra)
    assert expected in line


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_to_the_process_group_is_a_clean_stop_with_exit_code_0(
    tmp_path: Path, workers: int
) -> None:
    mirror = MirrorProcess(
        tmp_path / "cache",
        CLOSED,
        log_path=tmp_path / "mirror.log",
        env={"REGISTRY_MIRROR_WORKERS": str(workers)},
        new_session=True,
    )
    mirror.start()
    assert mirror.proc is not None
    try:
        wait_for_workers(mirror, workers)
        assert get(f"{mirror.url}/v2/")[0] == 200
        os.killpg(mirror.proc.pid, signal.SIGINT)  # what a terminal sends on Ctrl-C
        assert mirror.proc.wait(60) == 0, mirror.log_path.read_text()[-3000:]
        log = mirror.log_path.read_text()
        assert "Traceback" not in log and "KeyboardInterrupt" not in log
        lines = listening(mirror.log_events())
        assert [line["event"] for line in lines] == [f"listening on http://{mirror.address}"]
    finally:
        mirror.stop()


def test_ipv6_and_tls_with_two_workers(tmp_path: Path) -> None:
    ca = CertAuthority(tmp_path / "pki")
    cert, key, _ = ca.issue("localhost", "server", server=True)
    port = free_port()
    log_path = tmp_path / "mirror.log"
    extra = {"REGISTRY_MIRROR_TLS_CERT": str(cert), "REGISTRY_MIRROR_TLS_KEY": str(key)}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            serve_cmd(f"[::1]:{port}", tmp_path / "cache"),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=serve_env(2, extra),
        )
    mirror = MirrorProcess(tmp_path / "cache", CLOSED, log_path=log_path)  # to read its log
    try:
        line = wait_listening(mirror)
        assert line["event"] == f"listening on https://[::1]:{port}"
        context = ssl.create_default_context(cafile=str(ca.ca_path))
        context.check_hostname = False
        assert get(f"https://[::1]:{port}/v2/", context)[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # not SIGKILL: a supervisor stops its workers
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
