"""Client authentication: htpasswd (bcrypt) users, client certificates, and pull tokens.

Clients meet the mirror the way they meet Docker Hub: `/v2/` answers 401 with a Bearer
challenge naming our `/token` endpoint; the client asks it for a token with HTTP Basic (what
`docker login`, skopeo `--src-creds` and containerd send) or with no credentials at all, and
presents the token afterwards. That is the one flow every engine follows both with and without
credentials (a Basic challenge makes Docker fail outright when it has none). Basic credentials
on `/v2/` requests are accepted too, and a client certificate from the trusted CA names its
user by the subject's CN. Who may pull what is `mirror.access.Policy`, decided per repository.

Passwords are the door attackers try: an unknown user costs the same bcrypt check as a wrong
password (no user list by timing), failed logins are limited per address and per user, checks
run in a small pool of their own (a flood cannot take the threads cache hits use), and a token
names the password entry it was issued for, so removing a user ends their tokens too.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bcrypt
import structlog
from aiohttp import web
from cachetools import TTLCache

from mirror.access import ANONYMOUS, Principal
from mirror.config import AuthConfig
from mirror.errors import RegistryError
from mirror.web.limits import FailureLimiter

log = structlog.get_logger(__name__)

TOKEN_SECONDS = 900
RELOAD_CHECK_SECONDS = 2.0
VERIFIED_SECONDS = 300.0  # a password that passed bcrypt is trusted this long (bcrypt is slow)
DEFAULT_COST = 10  # bcrypt cost of the dummy hash while the file holds no hashes
# Failed logins (candidates for `auth.*` config options): per client address a burst of
# FAILED_PER_ADDRESS, then one per FAILED_WINDOW / FAILED_PER_ADDRESS seconds; per user name
# (from any address) the same with FAILED_PER_USER. A user who logged in recently with the same
# password is never refused by the per-user count, so guessing cannot lock a real user out.
FAILED_PER_ADDRESS = 10
FAILED_PER_USER = 30
FAILED_WINDOW = 60.0
# bcrypt runs in its own small pool, so password checks can never take the threads (and cores)
# cache hits need; at most CHECK_QUEUE checks run or wait, the next one is told to come back.
CHECK_THREADS = max(1, min(2, (os.cpu_count() or 2) - 1))
CHECK_QUEUE = 16
BUSY_RETRY_SECONDS = 1


class Htpasswd:
    """An htpasswd file of bcrypt hashes, re-read when it changes (no restart to add users)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._users: dict[str, bytes] = {}
        self._mtime: float | None = None
        self._checked = 0.0
        self._verified: TTLCache[tuple[str, bytes], bool] = TTLCache(4096, VERIFIED_SECONDS)
        self._pepper = secrets.token_bytes(16)
        self._dummy = _dummy_hash(DEFAULT_COST)
        self._pool: ThreadPoolExecutor | None = None  # made on first use (no idle threads)
        self._pending = 0  # checks running or waiting for the pool
        self.load()

    def load(self) -> None:
        stat = self.path.stat()
        users = {}
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            user, sep, hashed = line.partition(":")
            if not sep or not hashed.startswith(("$2y$", "$2b$", "$2a$")):
                log.warning("htpasswd_line_ignored", path=str(self.path), line=number,
                            reason="not user:bcrypt-hash")  # fmt: skip
                continue
            users[user] = hashed.encode()
        self._users, self._mtime = users, stat.st_mtime
        self._verified.clear()
        # An unknown user is checked against a hash of the file's own cost: the same time
        # as a wrong password, so response times do not tell which users exist.
        self._dummy = _dummy_hash(_usual_cost(users.values()))

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < RELOAD_CHECK_SECONDS:
            return
        self._checked = now
        try:
            if self.path.stat().st_mtime != self._mtime:
                self.load()
                log.info("htpasswd_reloaded", path=str(self.path), users=len(self._users))
        except OSError as exc:
            log.warning("htpasswd_unreadable", path=str(self.path), error=exc.strerror)

    def recently_verified(self, user: str, password: str) -> bool:
        """Whether this very password passed for `user` lately (no bcrypt needed)."""
        self._maybe_reload()
        return user in self._users and self._key(user, password) in self._verified

    def entry(self, user: str) -> bytes | None:
        """`user`'s current hash (None: no such user), from the file as it is now."""
        self._maybe_reload()
        return self._users.get(user)

    def _key(self, user: str, password: str) -> tuple[str, bytes]:
        return (user, hashlib.sha256(self._pepper + password.encode()).digest())

    async def check(self, user: str, password: str) -> bool:
        """Whether `password` is `user`'s; raises `Busy` when too many checks are pending."""
        self._maybe_reload()
        hashed = self._users.get(user)
        key = self._key(user, password)
        if hashed is not None and key in self._verified:
            return True
        if self._pending >= CHECK_QUEUE:
            raise Busy()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="mirror-bcrypt")
        self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            ok = await loop.run_in_executor(
                self._pool, _bcrypt_ok, password.encode(), hashed or self._dummy
            )
        finally:
            self._pending -= 1
        if ok and hashed is not None and self._users.get(user) == hashed:
            self._verified[key] = True
            return True
        return False

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


class Busy(Exception):
    """Too many password checks are running or waiting."""


def _bcrypt_ok(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed.replace(b"$2y$", b"$2b$", 1))
    except ValueError:
        return False


def _cost(hashed: bytes) -> int | None:
    """The cost of a `$2b$12$...` hash."""
    parts = hashed.split(b"$")
    if len(parts) < 4 or not parts[2].isdigit() or len(parts[2]) != 2:
        return None
    return int(parts[2])


def _usual_cost(hashes: Iterable[bytes]) -> int:
    """The cost most of the file's hashes have (ties: the higher)."""
    costs = Counter(c for c in map(_cost, hashes) if c is not None and 4 <= c <= 31)
    if not costs:
        return DEFAULT_COST
    return max(costs, key=lambda c: (costs[c], c))


def _dummy_hash(cost: int) -> bytes:
    """A well-formed hash no password matches; checking one costs what `cost` says."""
    return b"$2b$%02d$" % cost + b"." * 53


class TokenSigner:
    """HMAC-signed pull tokens: `<base64 claims>.<base64 mac>`; the key is shared by every
    worker through a file in the cache directory, so any worker accepts any worker's token."""

    def __init__(self, key: bytes, clock: Callable[[], float] = time.time) -> None:
        self._key = key
        self._clock = clock

    @classmethod
    def from_file(cls, path: Path) -> TokenSigner:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
        key = path.read_bytes()
        while len(key) < 32:  # another worker is writing it right now
            time.sleep(0.01)
            key = path.read_bytes()
        return cls(key)

    def issue(self, principal: Principal, stamp: str | None = None) -> str:
        """A token for `principal`; `stamp` (see `stamp`) ties it to the password entry."""
        claims = {"sub": principal.name, "via": principal.via,
                  "exp": int(self._clock()) + TOKEN_SECONDS}  # fmt: skip
        if stamp is not None:
            claims["pw"] = stamp
        body = _b64(json.dumps(claims, separators=(",", ":")).encode())
        return f"{body}.{_b64(self._mac(body))}"

    def stamp(self, entry: bytes) -> str:
        """A short keyed fingerprint of an htpasswd entry: the same in every worker (they share
        the key), unreadable to the client that holds the token, new with a new password."""
        return _b64(hmac.new(self._key, b"htpasswd-entry:" + entry, hashlib.sha256).digest()[:12])

    def read(self, token: str) -> tuple[str | None, str, str | None] | None:
        """(user, via, stamp) if the token is ours and current, else None."""
        body, sep, mac = token.partition(".")
        if not sep:
            return None
        try:
            if not hmac.compare_digest(_unb64(mac), self._mac(body)):
                return None
            claims = json.loads(_unb64(body))
        except (ValueError, binascii.Error):
            return None
        if not isinstance(claims, dict) or claims.get("exp", 0) < self._clock():
            return None
        stamp = claims.get("pw")
        return (
            claims.get("sub"),
            str(claims.get("via", "basic")),
            stamp if isinstance(stamp, str) else None,
        )

    def _mac(self, body: str) -> bytes:
        return hmac.new(self._key, body.encode(), hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class ClientAuth:
    """Turns a request's credentials into a `Principal`, or refuses them."""

    def __init__(
        self,
        config: AuthConfig,
        signer: TokenSigner,
        *,
        client_certs: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.htpasswd = Htpasswd(config.htpasswd) if config.htpasswd else None
        self.signer = signer
        self.client_certs = client_certs
        self.admins = frozenset(config.admins)
        self.failed_by_address = FailureLimiter(FAILED_PER_ADDRESS, FAILED_WINDOW, clock)
        self.failed_by_user = FailureLimiter(FAILED_PER_USER, FAILED_WINDOW, clock)

    def close(self) -> None:
        """Stop the password-check threads (for the app's cleanup)."""
        if self.htpasswd is not None:
            self.htpasswd.close()

    @property
    def enabled(self) -> bool:
        return self.htpasswd is not None or self.client_certs

    def principal(self, name: str, via: str) -> Principal:
        groups = frozenset(g for g, users in self.config.groups.items() if name in users)
        return Principal(name, groups, name in self.admins, via)

    def challenge(self, request: web.BaseRequest) -> dict[str, str]:
        realm = f"{request.scheme}://{request.host}/token"
        return {
            "WWW-Authenticate": f'Bearer realm="{realm}",service="{self.config.realm}"',
        }

    def unauthorized(self, request: web.BaseRequest, message: str) -> RegistryError:
        return RegistryError("UNAUTHORIZED", message, headers=self.challenge(request))

    async def identify(self, request: web.BaseRequest) -> Principal:
        """Who sent `request`: a 401 for credentials that are wrong, never a silent downgrade."""
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        scheme = scheme.lower()
        if scheme == "basic" and self.htpasswd is not None:
            return await self._basic(request, value.strip())
        if scheme == "bearer":
            claims = self.signer.read(value.strip())
            if claims is None or not self._still_valid(*claims):
                raise self.unauthorized(request, "the token is invalid or has expired")
            user, via, _ = claims
            return ANONYMOUS if user is None else self.principal(user, via)
        return self._certificate(request) or ANONYMOUS

    def _still_valid(self, user: str | None, via: str, stamp: str | None) -> bool:
        """A password user's token ends when the user leaves the htpasswd file or changes
        password (the file is re-read when it changes), not only when it expires."""
        if user is None or via != "basic":
            return True  # anonymous, or a certificate's user (the TLS layer checks those)
        entry = self.htpasswd.entry(user) if self.htpasswd is not None else None
        if entry is None:
            return False
        return stamp is None or hmac.compare_digest(stamp, self.signer.stamp(entry))

    async def _basic(self, request: web.BaseRequest, value: str) -> Principal:
        try:
            user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (ValueError, binascii.Error):
            raise self.unauthorized(request, "malformed Basic credentials") from None
        assert self.htpasswd is not None
        if not sep:
            raise self.unauthorized(request, "malformed Basic credentials")
        address = request.remote or ""
        if not self.htpasswd.recently_verified(user, password):
            self._refuse_if_limited(address, user)
            try:
                ok = await self.htpasswd.check(user, password)
            except Busy:
                raise RegistryError(
                    "UNAVAILABLE", "too many logins are being checked: try again shortly",
                    status=503, headers={"Retry-After": str(BUSY_RETRY_SECONDS)},
                ) from None  # fmt: skip
            if not ok:
                self.failed_by_address.failed(address)
                self.failed_by_user.failed(user)
                log.info("client_auth_failed", user=user[:64], peer=address)
                raise self.unauthorized(request, "wrong user name or password")
        return self.principal(user, "basic")

    def _refuse_if_limited(self, address: str, user: str) -> None:
        """429 (before any bcrypt) for an address or user name with too many failed logins."""
        wait = max(self.failed_by_address.wait(address), self.failed_by_user.wait(user))
        if wait <= 0:
            return
        log.warning("client_auth_limited", user=user[:64], peer=address)
        raise RegistryError(
            "TOOMANYREQUESTS",
            "too many failed logins: try again later",
            {"retry_after_seconds": round(wait, 2)},
            headers={"Retry-After": str(int(wait) + 1)},
        )

    def _certificate(self, request: web.BaseRequest) -> Principal | None:
        if not self.client_certs or request.transport is None:
            return None
        cert = request.transport.get_extra_info("peercert")
        if not cert:
            return None
        for rdn in cert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    return self.principal(str(value), "certificate")
        return None

    async def token(self, request: web.Request) -> web.Response:
        """`GET /token`: a pull token for whoever the credentials say (anonymous allowed)."""
        principal = await self.identify(request)
        if not principal.authenticated and not self.config.anonymous:
            raise self.unauthorized(request, "this mirror needs credentials")
        entry = None
        if principal.via == "basic" and principal.name and self.htpasswd is not None:
            entry = self.htpasswd.entry(principal.name)
        token = self.signer.issue(principal, None if entry is None else self.signer.stamp(entry))
        issued = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        body = {"token": token, "access_token": token, "expires_in": TOKEN_SECONDS}
        return web.json_response({**body, "issued_at": issued})
