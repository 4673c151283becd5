"""Client authentication: htpasswd (bcrypt) users, client certificates, and pull tokens.

Clients meet the mirror the way they meet Docker Hub: `/v2/` answers 401 with a Bearer
challenge naming our `/token` endpoint; the client asks it for a token with HTTP Basic (what
`docker login`, skopeo `--src-creds` and containerd send) or with no credentials at all, and
presents the token afterwards. That is the one flow every engine follows both with and without
credentials (a Basic challenge makes Docker fail outright when it has none). Basic credentials
on `/v2/` requests are accepted too, and a client certificate from the trusted CA names its
user by the subject's CN. Who may pull what is `mirror.access.Policy`, decided per repository.
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
from collections.abc import Callable
from pathlib import Path

import bcrypt
import structlog
from aiohttp import web
from cachetools import TTLCache

from mirror.access import ANONYMOUS, Principal
from mirror.config import AuthConfig
from mirror.errors import RegistryError

log = structlog.get_logger(__name__)

TOKEN_SECONDS = 900
RELOAD_CHECK_SECONDS = 2.0
VERIFIED_SECONDS = 300.0  # a password that passed bcrypt is trusted this long (bcrypt is slow)


class Htpasswd:
    """An htpasswd file of bcrypt hashes, re-read when it changes (no restart to add users)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._users: dict[str, bytes] = {}
        self._mtime: float | None = None
        self._checked = 0.0
        self._verified: TTLCache[tuple[str, bytes], bool] = TTLCache(4096, VERIFIED_SECONDS)
        self._pepper = secrets.token_bytes(16)
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

    async def check(self, user: str, password: str) -> bool:
        self._maybe_reload()
        hashed = self._users.get(user)
        key = (user, hashlib.sha256(self._pepper + password.encode()).digest())
        if key in self._verified:
            return hashed is not None
        if hashed is None:
            # Spend the same time as a real check, so response times do not list the users.
            hashed = b"$2b$10$" + b"." * 53
        ok = await asyncio.to_thread(_bcrypt_ok, password.encode(), hashed)
        if ok and user in self._users:
            self._verified[key] = True
            return True
        return False


def _bcrypt_ok(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed.replace(b"$2y$", b"$2b$", 1))
    except ValueError:
        return False


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

    def issue(self, principal: Principal) -> str:
        claims = {"sub": principal.name, "via": principal.via,
                  "exp": int(self._clock()) + TOKEN_SECONDS}  # fmt: skip
        body = _b64(json.dumps(claims, separators=(",", ":")).encode())
        return f"{body}.{_b64(self._mac(body))}"

    def read(self, token: str) -> tuple[str | None, str] | None:
        """(user, via) if the token is ours and current, else None."""
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
        return claims.get("sub"), str(claims.get("via", "basic"))

    def _mac(self, body: str) -> bytes:
        return hmac.new(self._key, body.encode(), hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class ClientAuth:
    """Turns a request's credentials into a `Principal`, or refuses them."""

    def __init__(self, config: AuthConfig, signer: TokenSigner, *, client_certs: bool) -> None:
        self.config = config
        self.htpasswd = Htpasswd(config.htpasswd) if config.htpasswd else None
        self.signer = signer
        self.client_certs = client_certs
        self.admins = frozenset(config.admins)

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
            if claims is None:
                raise self.unauthorized(request, "the token is invalid or has expired")
            user, via = claims
            return ANONYMOUS if user is None else self.principal(user, via)
        return self._certificate(request) or ANONYMOUS

    async def _basic(self, request: web.BaseRequest, value: str) -> Principal:
        try:
            user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (ValueError, binascii.Error):
            raise self.unauthorized(request, "malformed Basic credentials") from None
        assert self.htpasswd is not None
        if not sep or not await self.htpasswd.check(user, password):
            log.info("client_auth_failed", user=user[:64], peer=request.remote)
            raise self.unauthorized(request, "wrong user name or password")
        return self.principal(user, "basic")

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
        token = self.signer.issue(principal)
        issued = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        body = {"token": token, "access_token": token, "expires_in": TOKEN_SECONDS}
        return web.json_response({**body, "issued_at": issued})
