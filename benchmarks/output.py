"""Where a benchmark's figures go, and the progress lines it prints on the way.

A run writes into an output directory (`benchmarks/out/` unless `--out DIR`; git ignores it),
so running a benchmark never dirties the repository. The figures the README shows live in
`benchmarks/results/`; `--publish` copies a run's files there, when that is what you want.
Progress lines are flushed as each step ends, so a run whose output goes to a file or a pipe
(CI, `| tee`) shows where it is.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
PUBLISHED = ROOT / "benchmarks" / "results"

_start = time.monotonic()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=OUT, help=f"where this run's files go (default: {OUT})"
    )
    parser.add_argument(
        "--publish",
        type=Path,
        nargs="?",
        const=PUBLISHED,
        default=None,
        metavar="DIR",
        help=f"also copy them into DIR (default: {PUBLISHED}, what the README shows)",
    )


def publish(out: Path, target: Path | None, names: list[str]) -> None:
    """Copy a run's files from `out` into `target` (nothing when `target` is None)."""
    if target is None:
        return
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (out / name).resolve() != (target / name).resolve():
            shutil.copy2(out / name, target / name)
    progress(f"published {', '.join(names)} into {target}")


def progress(message: str) -> None:
    """One line, with the seconds since the run began, flushed at once."""
    print(f"[{time.monotonic() - _start:6.1f}s] {message}", flush=True)
