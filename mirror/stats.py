"""In-memory time series for the operator page's charts: no new service, nothing on disk.

A `Sampler` reads the same counter totals that `/metrics` exposes (parsed from its text, so a
multi-worker mirror's merged figures are used too) and adds each interval's increase to ring
buffers of fixed-width buckets: 10 s buckets for the last hour, 5 min buckets for the last day.
History starts when the process starts; a counter that went backwards (a worker restarted) counts
from zero rather than as a negative rate.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

# Counter totals shown on the page and charted: name -> metric sample names summed over labels.
TOTALS: dict[str, tuple[str, ...]] = {
    "hits": ("registry_mirror_cache_hits_total",),
    "misses": ("registry_mirror_cache_misses_total",),
    "served_bytes": ("registry_mirror_cache_served_bytes_total",),
    "fetched_bytes": ("registry_mirror_upstream_fetched_bytes_total",),
}
HOUR = (10.0, 360)  # (bucket seconds, buckets): 1 h
DAY = (300.0, 288)  # 24 h


@dataclass(frozen=True)
class Scrape:
    """One reading of the `/metrics` text: summed totals and the labelled samples."""

    totals: dict[str, float]
    samples: dict[str, list[tuple[dict[str, str], float]]]

    def value(self, name: str, **labels: str) -> float | None:
        for sample_labels, value in self.samples.get(name, []):
            if all(sample_labels.get(k) == v for k, v in labels.items()):
                return value
        return None


def parse_scrape(text: str | bytes) -> Scrape:
    """The Prometheus text exposition as totals (see `TOTALS`) and samples by name."""
    if isinstance(text, bytes):
        text = text.decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    totals = {
        key: sum(v for name in names for _, v in samples.get(name, []))
        for key, names in TOTALS.items()
    }
    return Scrape(totals, samples)


class RingSeries:
    """Sums of values per fixed-width time bucket, the last `capacity` buckets kept."""

    def __init__(self, step: float, capacity: int) -> None:
        self.step = step
        self.capacity = capacity
        self._buckets: deque[tuple[int, float]] = deque(maxlen=capacity)  # (bucket no, sum)

    def add(self, now: float, value: float) -> None:
        bucket = math.floor(now / self.step)
        if self._buckets and self._buckets[-1][0] == bucket:
            self._buckets[-1] = (bucket, self._buckets[-1][1] + value)
        elif not self._buckets or self._buckets[-1][0] < bucket:
            self._buckets.append((bucket, value))
        # A clock that went back: add to the newest bucket rather than rewrite history.
        else:
            last, total = self._buckets[-1]
            self._buckets[-1] = (last, total + value)

    def points(self, now: float) -> list[tuple[float, float]]:
        """(bucket start time, sum) for every bucket of the window ending now, gaps as 0."""
        newest = math.floor(now / self.step)
        values = dict(self._buckets)
        first = newest - self.capacity + 1
        return [(b * self.step, values.get(b, 0.0)) for b in range(first, newest + 1)]


class Sampler:
    """Turns counter totals read now and then into per-bucket increases for each window."""

    def __init__(
        self,
        read: Callable[[], dict[str, float]] | None = None,
        *,
        keys: Iterable[str] = tuple(TOTALS),
        windows: dict[str, tuple[float, int]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._read = read
        self._clock = clock
        self.keys = tuple(keys)
        windows = windows or {"hour": HOUR, "day": DAY}
        self.series = {
            window: {key: RingSeries(step, n) for key in self.keys}
            for window, (step, n) in windows.items()
        }
        self._last: dict[str, float] | None = None
        self._taken = float("-inf")

    def sample(self, current: dict[str, float] | None = None, taken: float | None = None) -> None:
        """Record what each total grew by since the last reading (`current`, or read now).

        `taken` (monotonic, when `current` was read) lets readings from other threads arrive
        out of order: one older than the last recorded is dropped, not taken for a reset.
        """
        now = self._clock()
        if taken is not None:
            if taken < self._taken:
                return
            self._taken = taken
        if current is None:
            assert self._read is not None, "a Sampler without a reader is given its readings"
            current = self._read()
        previous = self._last or current  # the first reading is the baseline
        self._last = current
        for key in self.keys:
            value, before = current.get(key, 0.0), previous.get(key, 0.0)
            delta = value - before if value >= before else value
            for series in self.series.values():
                series[key].add(now, delta)

    def points(self, window: str, key: str) -> list[tuple[float, float]]:
        return self.series[window][key].points(self._clock())
