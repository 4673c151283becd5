"""Progress for long commands (warm, import): a bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Progress:
    """Bytes and items done out of a total, with rate and ETA."""

    def __init__(self, what: str, out: TextIO | None = None, interval: float = 10.0) -> None:
        self.what = what
        self.out = out or sys.stderr
        self.tty = self.out.isatty()
        self.total_bytes = 0
        self.total_items = 0
        self.done_bytes = 0
        self.done_items = 0
        self.partial_bytes = 0  # of items in progress
        self.started = time.monotonic()
        self._interval = interval
        self._last_line = 0.0

    def add(self, size: int) -> None:
        self.total_bytes += size
        self.total_items += 1

    def finished(self, size: int, label: str) -> None:
        self.done_bytes += size
        self.done_items += 1
        if not self.tty:
            print(f"{self.what}: {label} {human(size)} ({self.status()})", file=self.out)

    def status(self) -> str:
        done = self.done_bytes + self.partial_bytes
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = done / elapsed
        eta = (self.total_bytes - done) / rate if rate > 0 else 0
        return (
            f"{human(done)}/{human(self.total_bytes)}, {self.done_items}/{self.total_items} blobs, "
            f"{human(rate)}/s, ETA {eta:.0f}s"
        )

    def tick(self) -> None:
        """Redraw the bar (terminal) or print a line now and then (logs)."""
        now = time.monotonic()
        if self.tty:
            done = self.done_bytes + self.partial_bytes
            share = done / self.total_bytes if self.total_bytes else 1.0
            bar = "#" * int(share * 30)
            self.out.write(f"\r{self.what} [{bar:<30}] {share:4.0%} {self.status()}   ")
            self.out.flush()
        elif now - self._last_line >= self._interval:
            self._last_line = now
            print(f"{self.what}: {self.status()}", file=self.out)

    def close(self) -> None:
        if self.tty:
            self.tick()
            self.out.write("\n")
            self.out.flush()
