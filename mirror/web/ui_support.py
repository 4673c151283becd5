"""Pure helpers of the operator page: CSRF checks, number formatting and chart geometry.

Kept apart from the handlers so they can be tested without a server.
"""

from __future__ import annotations

import hmac
import math
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

CSRF_COOKIE = "registry_mirror_csrf"
CSRF_FIELD = "csrf"
_TOKEN_BYTES = 32


def new_csrf_token() -> str:
    return secrets.token_urlsafe(_TOKEN_BYTES)


def valid_token_shape(token: str | None) -> bool:
    return bool(token) and 40 <= len(token or "") <= 64 and (token or "").isascii()


def csrf_problem(
    cookie: str | None,
    sent: str | None,
    *,
    origin: str | None,
    host: str,
    fetch_site: str | None,
) -> str | None:
    """Why a state-changing POST must be refused, or None when it may go ahead.

    Double-submit: the form must echo the random token of the viewer's own cookie (another
    site can make the browser send the cookie, but cannot read it to put it in the form). Where
    the browser tells where the request came from (`Origin`, `Sec-Fetch-Site`), that must be
    this very site too.
    """
    if not valid_token_shape(cookie) or not sent:
        return "missing CSRF token (reload the page and try again)"
    if not hmac.compare_digest(str(cookie).encode(), sent.encode()):
        return "CSRF token does not match (reload the page and try again)"
    if origin is not None and origin != "null" and urlsplit(origin).netloc != host:
        return "request from another origin"
    if origin == "null":
        return "request from an opaque origin"
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return "request from another site"
    return None


def sign(key: str, message: str) -> str:
    """A short MAC of `message` under a session's token (for messages carried in a URL)."""
    mac = hmac.new(key.encode(), message.encode(), "sha256").hexdigest()
    return mac[:32]


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def percent(part: float, whole: float) -> str:
    return "-" if whole <= 0 else f"{100 * part / whole:.1f} %"


def ratio(part: float, whole: float) -> float | None:
    return None if whole <= 0 else part / whole


def ago(ts: float | None, now: float | None = None) -> str:
    """`12 s ago`, `3 min ago`, `5 h ago`, `2 d ago`; `never` for no time."""
    if not ts:
        return "never"
    seconds = max(0.0, (time.time() if now is None else now) - ts)
    for limit, div, unit in ((120, 1, "s"), (7200, 60, "min"), (172800, 3600, "h")):
        if seconds < limit:
            return f"{seconds / div:.0f} {unit} ago"
    return f"{seconds / 86400:.0f} d ago"


def clock_time(ts: float | None) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


@dataclass(frozen=True)
class Chart:
    """An SVG line chart's geometry: one polyline per series, scaled to a common maximum."""

    width: int
    height: int
    lines: list[tuple[str, str, float]]  # (css class, "x,y x,y ...", series total)
    peak: float
    start: float
    end: float


def chart(
    series: Sequence[tuple[str, Sequence[tuple[float, float]]]],
    *,
    width: int = 600,
    height: int = 120,
) -> Chart:
    """Scale each `(css class, [(time, value), ...])` into the same box (value 0 at the bottom)."""
    peak = max((v for _, pts in series for _, v in pts), default=0.0)
    scale = (height - 4) / peak if peak > 0 else 0.0
    lines = []
    start = end = 0.0
    for css, pts in series:
        if not pts:
            lines.append((css, "", 0.0))
            continue
        start, end = pts[0][0], pts[-1][0]
        step = width / max(len(pts) - 1, 1)
        coords = " ".join(
            f"{i * step:.1f},{height - 2 - v * scale:.1f}" for i, (_, v) in enumerate(pts)
        )
        lines.append((css, coords, math.fsum(v for _, v in pts)))
    return Chart(width, height, lines, peak, start, end)
