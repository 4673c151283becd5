"""The upstream's pull budget, per account: Docker Hub's rate-limit headers, and which account
to spend next.

Docker Hub answers with `ratelimit-limit: 100;w=21600`, `ratelimit-remaining: 76;w=21600` and
`docker-ratelimit-source` (the address or account counted). A manifest GET spends one pull; a
HEAD is free and carries the same headers, so revalidations keep the figures current. Each
account of a pool (and the anonymous one) has its own budget: a request goes to the account
with the most left, an account that got a 429 (or whose credentials were refused) rests until
its `Retry-After`, and the window is sliding, so a spent account regains one pull about every
`window / limit` seconds.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

_FIGURE_RE = re.compile(r"\s*(\d+)\s*(?:;\s*w\s*=\s*(\d+))?")
DEFAULT_REST = 60.0  # an account refused without a Retry-After rests this long


@dataclass(frozen=True)
class RateLimit:
    """One answer's rate-limit headers (each None when absent)."""

    limit: int | None
    remaining: int | None
    window: float | None  # seconds
    source: str | None


def _figure(value: str | None) -> tuple[int | None, float | None]:
    match = _FIGURE_RE.match(value or "")
    if not match:
        return None, None
    window = match.group(2)
    return int(match.group(1)), None if window is None else float(window)


def parse_ratelimit(headers: Mapping[str, str]) -> RateLimit | None:
    """The rate-limit headers of an answer, or None if it has none."""
    limit, window = _figure(headers.get("ratelimit-limit"))
    remaining, rwindow = _figure(headers.get("ratelimit-remaining"))
    source = headers.get("docker-ratelimit-source")
    if limit is None and remaining is None:
        return None
    return RateLimit(limit, remaining, window or rwindow, source)


class Account:
    """One account's budget as last seen; `name` is its user name (or `anonymous`)."""

    def __init__(self, name: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._clock = clock
        self.limit: int | None = None
        self.remaining: int | None = None
        self.window: float | None = None
        self.source: str | None = None
        self.seen_at = 0.0
        self.resting_until = 0.0  # after a 429 or refused credentials: not asked before then

    def observe(self, rate: RateLimit) -> None:
        self.limit = rate.limit if rate.limit is not None else self.limit
        self.remaining = rate.remaining if rate.remaining is not None else self.remaining
        self.window = rate.window if rate.window is not None else self.window
        self.source = rate.source or self.source
        self.seen_at = self._clock()

    def rest(self, seconds: float | None) -> None:
        """Refused (429, or a 401 on its credentials): leave it alone for a while."""
        delay = DEFAULT_REST if seconds is None else seconds
        if delay <= 0 and self.remaining == 0:
            delay = self.regain_seconds()  # a 429 now, with no Retry-After: one pull's worth
        self.resting_until = max(self.resting_until, self._clock() + max(delay, 1.0))

    def regain_seconds(self) -> float:
        """How long a spent account waits for one pull back (the window is sliding)."""
        if self.window and self.limit:
            return self.window / self.limit
        return DEFAULT_REST

    def wait(self) -> float:
        """Seconds until this account may pull again (0: now)."""
        now = self._clock()
        wait = self.resting_until - now
        if self.remaining == 0:
            wait = max(wait, self.seen_at + self.regain_seconds() - now)
        return max(0.0, wait)

    @property
    def resting(self) -> bool:
        return self.resting_until > self._clock()

    @property
    def left(self) -> float:
        """Pulls left as far as known (unknown: as many as anyone's)."""
        return math.inf if self.remaining is None else self.remaining


class Budget:
    """The accounts of one upstream (at least one: the anonymous account without credentials)."""

    def __init__(self, accounts: list[Account]) -> None:
        assert accounts
        self.accounts = accounts

    def order(self, *, manifest: bool, spend: bool) -> list[Account]:
        """Accounts to try in turn, the most budget left first. A manifest GET (`spend`) only
        from accounts with pulls left, a manifest HEAD from those not resting after a 429;
        anything else (blobs, which Docker Hub does not count) from any, resting ones last."""
        if spend:
            ready = [a for a in self.accounts if a.wait() == 0]
        elif manifest:
            ready = [a for a in self.accounts if not a.resting]
        else:
            ready = self.accounts
        return sorted(ready, key=lambda a: (a.resting, -a.left))

    def low(self, floor: int) -> bool:
        """Whether the best account has fewer than `floor` pulls left (unknown: not low)."""
        best = max((a.left for a in self.accounts if a.wait() == 0), default=0.0)
        return best < floor

    def retry_after(self) -> int:
        """Whole seconds until some account may pull again (for a 429's Retry-After)."""
        return max(1, math.ceil(min(a.wait() for a in self.accounts)))

    @property
    def remaining(self) -> int | None:
        """The most any account has left, if any account's is known."""
        known = [a.remaining for a in self.accounts if a.remaining is not None]
        return max(known) if known else None
