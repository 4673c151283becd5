"""The benchmark runner, at tiny sizes, so it cannot rot (figures are not judged here); and it
behaves: progress as it goes, its files in an output directory, the repository left clean."""

from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from benchmarks import runner

ROOT = Path(__file__).parents[2]
RUNNER = ROOT / "benchmarks" / "runner.py"
PROGRESS = re.compile(r"^\[ *\d+\.\ds\] (.+)$")


def git_status(path: Path) -> str:
    result = subprocess.run(
        ["git", "status", "--porcelain", "--", str(path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return result.stdout


class Run:
    """A benchmark script at tiny sizes, its output read into a pipe (not a terminal) line by
    line with the time each line arrived; it must succeed and leave the repository as it was."""

    def __init__(self, script: Path, *args: str) -> None:
        before = git_status(ROOT / "benchmarks")
        proc = subprocess.Popen(
            [sys.executable, str(script), "--smoke", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        assert proc.stdout is not None
        self.lines: list[tuple[float, str]] = []
        for line in proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))
        self.ended = time.monotonic()
        assert proc.wait(300) == 0, "\n".join(text for _, text in self.lines[-60:])
        self.stdout = "\n".join(text for _, text in self.lines)
        assert git_status(ROOT / "benchmarks") == before, "the run changed tracked files"
        self.progress = [(at, m[1]) for at, text in self.lines if (m := PROGRESS.match(text))]

    def shown_as_it_went(self) -> None:
        """Progress lines arrived while the run went on, not all at its end."""
        assert len(self.progress) >= 3, self.stdout[-3000:]
        first, last = self.progress[0][0], self.progress[-2][0]
        assert self.ended - first > 1.0 and last - first > 0.5, self.stdout[-3000:]


def test_benchmark_runner_smoke(tmp_path: Path) -> None:
    started = time.time()
    run = Run(RUNNER, "--publish", str(tmp_path / "published"))  # --out: its default
    out = ROOT / "benchmarks" / "out"
    assert (out / "results.json").stat().st_mtime >= started - 1, "written to benchmarks/out/"
    rows = json.loads((out / "results.json").read_text())
    for name in ("results.json", "results.png"):
        assert (tmp_path / "published" / name).read_bytes() == (out / name).read_bytes()
    scenarios = {row["scenario"].split(".")[0] for row in rows}
    assert scenarios == {"1", "2", "2b", "3", "4", "5", "6", "7", "8"}
    copies = next(r for r in rows if r["scenario"] == "3. 20 clients, cold blob: upstream copies")
    assert copies["mirror"] == 1, "single flight: one upstream copy for 20 clients"
    cold = {r["scenario"]: r for r in rows if r["scenario"].startswith("2. cold GET")}
    assert cold["2. cold GET: upstream copies"]["mirror"] == 1, "a cold blob crosses once"
    for name in (
        *("nginx proxy", "nginx proxy_cache", "relay, digest checked", "relay, unchecked"),
        *("CPU ceiling here", "page-cache writes here"),
    ):
        row = next(r for scenario, r in cold.items() if scenario.endswith(name))
        assert row["baseline"] > 0 and row["met"] is None, row  # shown for context, not judged
    # The soak (scenario 8): its rows for both caches, every pull verified, none failed.
    soak = {r["scenario"].split(": ", 1)[1]: r for r in rows if r["scenario"].startswith("8.")}
    names = ("pulls/s", "manifest p50, prober", "manifest p99, prober", "manifest p99 in the pulls")
    for name in (*names, "PSS peak", "open fds after", "service CPU"):
        assert soak[name]["mirror"] > 0 and soak[name]["reference"] > 0, soak[name]
    assert soak["errors"]["mirror"] == 0 and soak["errors"]["reference"] == 0, soak["errors"]
    details = json.loads((out / "soak.json").read_text())
    assert details["same_sequence"], "both caches saw the same request sequence"
    for result in details["results"].values():
        assert result["pulls"] > 0 and result["error_samples"] == [], result
        assert result["probes"] > 0, "the prober measured manifests from a process of its own"
        assert len(result["pss_samples"]) >= 3, "PSS sampled every 0.5 s"
    assert (out / "results.png").stat().st_size > 10_000
    assert "scenario" in run.stdout
    # One progress line per measurement, as it ended.
    run.shown_as_it_went()
    for row in rows:
        assert any(text.startswith(row["scenario"] + ": ") for _, text in run.progress), row


def test_cluster_benchmark_smoke(tmp_path: Path) -> None:
    run = Run(RUNNER.parent / "cluster.py", "--out", str(tmp_path))
    figures = json.loads((tmp_path / "cluster.json").read_text())
    assert figures["fan_upstream_copies"] == 1, "one upstream fetch for the whole cluster"
    assert figures["warm_1_node_MBps"] > 0 and figures["warm_3_node_MBps"] > 0
    assert "warm_ratio_3_vs_1" in run.stdout
    run.shown_as_it_went()
    assert any(text.startswith("warm hits on 3 nodes") for _, text in run.progress)


def test_followers_benchmark_smoke(tmp_path: Path) -> None:
    run = Run(RUNNER.parent / "followers.py", "--out", str(tmp_path))
    (result,) = json.loads((tmp_path / "followers.json").read_text())
    assert result["trials"], "at least one pair of clients on one cold blob"
    for trial in result["trials"]:
        assert trial["where"] in ("same worker", "other worker")
        assert trial["fill_MBps"] > 0 and trial["join_MBps"] > 0
    seen = {t["where"] for t in result["trials"]}
    for where, ratio in result["joiner_vs_filler"].items():
        assert (ratio is not None) == (where in seen), result
    assert "joiner vs filler (median)" in run.stdout
    run.shown_as_it_went()


class _Blobs(http.server.BaseHTTPRequestHandler):
    """An upstream that answers every blob GET with `body`, whatever its digest."""

    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


def test_the_relays_yardstick_checks_the_digest_as_the_mirror_does(tmp_path: Path) -> None:
    """Scenario 2's verifying relay is a fair yardstick only if it really verifies: a blob whose
    bytes match its digest arrives whole, one that does not never gets its last byte; the
    unchecked relay sends both whole."""
    body = os.urandom(3 * 1024 * 1024 + 7)  # several of the relay's 1 MiB reads
    right = "sha256:" + hashlib.sha256(body).hexdigest()
    wrong = "sha256:" + hashlib.sha256(b"other").hexdigest()
    _Blobs.body = body
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Blobs)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    relays: dict[bool, tuple[runner.Proc, int]] = {}
    try:
        for verify in (True, False):
            upstream_url = f"http://127.0.0.1:{upstream.server_port}"
            proc, url = runner.relay(tmp_path / str(verify), upstream_url, verify=verify)
            port = urlsplit(url).port
            assert port is not None, url
            relays[verify] = (proc, port)

        def get(port: int, digest: str) -> bytes:
            deadline = time.monotonic() + 30
            while True:
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                    conn.request("GET", f"/v2/library/x/blobs/{digest}")
                    break
                except ConnectionRefusedError:
                    assert time.monotonic() < deadline, "the relay did not start"
                    time.sleep(0.05)
            response = conn.getresponse()
            assert response.status == 200
            try:
                return response.read()
            except http.client.IncompleteRead as short:
                return short.partial
            finally:
                conn.close()

        checked, unchecked = relays[True][1], relays[False][1]
        got = get(checked, right)
        assert hashlib.sha256(got).hexdigest() == right.split(":")[1]
        cut = get(checked, wrong)
        assert len(cut) < len(body) and body.startswith(cut), "the last byte is held back"
        for digest in (right, wrong):
            assert get(unchecked, digest) == body, "sent as it came, checked by no one"
    finally:
        for proc, _ in relays.values():
            proc.stop()
        upstream.shutdown()
        upstream.server_close()
