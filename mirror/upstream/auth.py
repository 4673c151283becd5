"""Upstream authentication: `WWW-Authenticate` challenges, Bearer tokens, Basic credentials.

Tokens are cached per (realm, service, scope) until shortly before they expire; the cache
belongs to one upstream and one set of credentials, so tokens never leak between them. One
token fetch serves every concurrent request that needs it. Tokens and passwords are never
logged.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import structlog
from cachetools import TLRUCache

from mirror.errors import UpstreamError
from mirror.singleflight import SingleFlight
from mirror.upstream.failures import describe

log = structlog.get_logger(__name__)

_PARAM_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')
EXPIRY_MARGIN = 30.0  # stop using a token this long before it ends (or a tenth of its life)
DEFAULT_TOKEN_LIFETIME = 60.0  # the distribution spec's default when `expires_in` is missing


class CredentialsRefused(UpstreamError):
    """The token service refused this account's credentials (another account may do)."""


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "bearer" or "basic", lower case
    params: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")

    @property
    def service(self) -> str | None:
        return self.params.get("service")


def parse_www_authenticate(header: str | None) -> Challenge | None:
    """`Bearer realm="...",service="...",scope="..."` or `Basic realm="..."` -> Challenge."""
    if not header:
        return None
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3)).replace(
            '\\"', '"'
        )
        for m in _PARAM_RE.finditer(rest)
    }
    scheme = scheme.lower()
    if scheme not in {"bearer", "basic"}:
        return None
    if scheme == "bearer" and not params.get("realm", "").startswith(("http://", "https://")):
        return None
    return Challenge(scheme, params)


def basic_authorization(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


@dataclass(frozen=True)
class Token:
    value: str
    use_until: float


class Authenticator:
    """Produces the `Authorization` header for a scope on one upstream."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        username: str | None,
        password: str | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        maxsize: int = 4096,
        on_fetch: Callable[[], None] = lambda: None,
    ) -> None:
        self._on_fetch = on_fetch
        self._session = session
        self._basic = (
            basic_authorization(username, password)
            if username is not None and password is not None
            else None
        )
        self._clock = clock
        self.challenge: Challenge | None = None
        self._tokens: TLRUCache[tuple[str, str | None, str], Token] = TLRUCache(
            maxsize, ttu=lambda _k, tok, _now: tok.use_until, timer=clock
        )
        self._flight: SingleFlight[tuple[str, str | None, str], Token] = SingleFlight()

    def learn(self, challenge: Challenge) -> None:
        """Remember how this upstream wants to be authenticated (from a 401)."""
        self.challenge = challenge

    def forget(self, scope: str, rejected: str | None) -> None:
        """Drop the token the upstream just refused (expired or revoked mid-pull) - only that
        one: a late 401 to a request sent before the token existed must not evict it."""
        if self.challenge is None or rejected is None:
            return
        key = self._key(self.challenge, scope)
        token = self._tokens.get(key)
        if token is not None and rejected == f"Bearer {token.value}":
            del self._tokens[key]

    @staticmethod
    def _key(challenge: Challenge, scope: str) -> tuple[str, str | None, str]:
        return (challenge.realm, challenge.service, scope)

    def cached(self, scope: str) -> bool:
        return self.challenge is not None and self._key(self.challenge, scope) in self._tokens

    async def header(self, scope: str) -> str | None:
        """The Authorization value for `scope`, fetching a token if needed; None if anonymous."""
        challenge = self.challenge
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            return self._basic
        key = self._key(challenge, scope)
        token = self._tokens.get(key)
        if token is None:

            async def fetch_and_keep() -> Token:
                # Cached inside the flight: between the flight ending and its waiters resuming,
                # another request must find the token, not start a second fetch.
                fetched = await self._fetch(challenge, scope)
                self._tokens[key] = fetched
                return fetched

            token = await self._flight.do(key, fetch_and_keep)
        return f"Bearer {token.value}"

    async def _fetch(self, challenge: Challenge, scope: str) -> Token:
        params = {"scope": scope}
        if challenge.service:
            params["service"] = challenge.service
        self._on_fetch()
        try:
            headers = {"Authorization": self._basic} if self._basic else {}
            async with self._session.get(
                challenge.realm, params=params, headers=headers, allow_redirects=True
            ) as resp:
                if resp.status in (401, 403):
                    raise CredentialsRefused(
                        "upstream token service refused the configured credentials",
                        {"realm": challenge.realm, "status": resp.status},
                        status=502,
                    )
                if resp.status != 200:
                    raise UpstreamError(
                        "upstream token service failed",
                        {"realm": challenge.realm, "status": resp.status},
                    )
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            why = "not JSON" if isinstance(exc, ValueError) else describe(exc)
            log.warning("upstream_token_fetch_failed", realm=challenge.realm, why=why)
            raise UpstreamError(
                "upstream token service unreachable or answered nonsense",
                {"realm": challenge.realm, "reason": why},
            ) from exc
        value = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(value, str) or not value:
            raise UpstreamError("upstream token service sent no token", {"realm": challenge.realm})
        try:
            lifetime = float(body.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
        except (TypeError, ValueError):
            lifetime = DEFAULT_TOKEN_LIFETIME
        log.debug("upstream_token_fetched", realm=challenge.realm, scope=scope, ttl=lifetime)
        return Token(value, self._clock() + lifetime - min(EXPIRY_MARGIN, lifetime / 10))
