"""The benchmark runner, at tiny sizes, so it cannot rot (figures are not judged here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

RUNNER = Path(__file__).parents[2] / "benchmarks" / "runner.py"


def run_smoke(script: Path, out: Path) -> subprocess.CompletedProcess[str]:
    """A benchmark script at tiny sizes; it must succeed."""
    result = subprocess.run(
        [sys.executable, str(script), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_benchmark_runner_smoke(tmp_path: Path) -> None:
    result = run_smoke(RUNNER, tmp_path)
    rows = json.loads((tmp_path / "results.json").read_text())
    scenarios = {row["scenario"].split(".")[0] for row in rows}
    assert scenarios == {"1", "2", "2b", "3", "4", "5", "6", "7"}
    copies = next(r for r in rows if r["scenario"] == "3. 20 clients, cold blob: upstream copies")
    assert copies["mirror"] == 1, "single flight: one upstream copy for 20 clients"
    cold = {r["scenario"]: r for r in rows if r["scenario"].startswith("2. cold GET")}
    assert cold["2. cold GET: upstream copies"]["mirror"] == 1, "a cold blob crosses once"
    for name in ("nginx proxy_cache", "nginx proxy", "CPU ceiling here", "page-cache writes here"):
        row = next(r for scenario, r in cold.items() if scenario.endswith(name))
        assert row["baseline"] > 0 and row["met"] is None, row  # shown for context, not judged
    assert (tmp_path / "results.png").stat().st_size > 10_000
    assert "scenario" in result.stdout


def test_cluster_benchmark_smoke(tmp_path: Path) -> None:
    result = run_smoke(RUNNER.parent / "cluster.py", tmp_path)
    figures = json.loads((tmp_path / "cluster.json").read_text())
    assert figures["fan_upstream_copies"] == 1, "one upstream fetch for the whole cluster"
    assert figures["warm_1_node_MBps"] > 0 and figures["warm_3_node_MBps"] > 0
    assert "warm_ratio_3_vs_1" in result.stdout
