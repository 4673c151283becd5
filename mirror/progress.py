"""Progress for long commands (warm, import): a bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

# No ETA until this much time has passed and this share of the bytes is done: the first
# seconds (manifests, connection set-up, a slow start) say little about the rate to come.
ETA_MIN_SECONDS = 2.0
ETA_MIN_SHARE = 0.05


def plural(n: int, word: str) -> str:
    """`1 image`, `2 images`."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def duration(seconds: float) -> str:
    """`45s`, `3m 12s`, `2h 05m`."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Progress:
    """Bytes and items done out of a total, with rate and ETA."""

    def __init__(
        self,
        what: str,
        out: TextIO | None = None,
        interval: float = 10.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what = what
        self._clock = clock
        self.out = out or sys.stderr
        self.tty = self.out.isatty()
        self.total_bytes = 0
        self.total_items = 0
        self.done_bytes = 0
        self.done_items = 0
        self.partial_bytes = 0  # of items in progress
        self.started = clock()
        self._interval = interval
        self._last_line = 0.0

    def add(self, size: int) -> None:
        if not self.total_items:  # the rate counts from the first work known, not from the
            self.started = self._clock()  # manifests fetched (or a bundle read) before it
        self.total_bytes += size
        self.total_items += 1

    def finished(self, size: int, label: str) -> None:
        self.done_bytes += size
        self.done_items += 1
        if not self.tty:
            print(f"{self.what}: {label} {human(size)} ({self.status()})", file=self.out)

    def status(self) -> str:
        done = self.done_bytes + self.partial_bytes
        elapsed = max(self._clock() - self.started, 1e-6)
        rate = done / elapsed
        line = (
            f"{human(done)}/{human(self.total_bytes)}, {self.done_items}/{self.total_items} blobs, "
            f"{human(rate)}/s"
        )
        if self.total_bytes and done >= self.total_bytes:
            return line
        settled = elapsed >= ETA_MIN_SECONDS and done >= ETA_MIN_SHARE * self.total_bytes
        if rate > 0 and settled:
            line += f", ETA {duration((self.total_bytes - done) / rate)}"
        return line

    def tick(self) -> None:
        """Redraw the bar (terminal) or print a line now and then (logs)."""
        now = self._clock()
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
