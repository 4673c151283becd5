"""`UpstreamClient`: manifests, blobs (streamed) and tag lists from one upstream registry.

One pooled aiohttp session per upstream. Requests authenticate by challenge (see `auth`), retry
idempotent calls on connection errors and 502/503/504 with bounded exponential backoff, and
follow blob redirects by hand so the upstream's `Authorization` header never reaches another
host (Docker Hub's CDN, or object storage that refuses signed URLs carrying it).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import parse_qs, urljoin, urlsplit

import aiohttp
import structlog
from multidict import CIMultiDict

from mirror.config import UpstreamConfig
from mirror.errors import DigestMismatch, RegistryError, UpstreamError
from mirror.interfaces import Chunk
from mirror.mediatypes import ALL_MANIFESTS, OCI_INDEX, sniff_media_type
from mirror.metrics import Metrics, add_upstream_time
from mirror.reference import SHA256_RE, Digest, Name, docker_hub_name
from mirror.upstream.auth import (
    Authenticator,
    Challenge,
    CredentialsRefused,
    parse_www_authenticate,
)
from mirror.upstream.bandwidth import Bandwidth
from mirror.upstream.budget import Account, Budget, parse_ratelimit
from mirror.upstream.failures import describe
from mirror.upstream.guard import AddressGuard, GuardedResolver, UpstreamNetwork
from mirror.upstream.socket_body import SocketBody

log = structlog.get_logger(__name__)

RETRY_STATUSES = frozenset({502, 503, 504})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
READ_BUFFER = 1024 * 1024  # per-response buffer: fewer pause/resume round trips on big blobs
BACKOFF_BASE = 0.2  # seconds; doubled each attempt, with jitter
BACKOFF_MAX = 5.0
OUTAGE_BASE = 5.0  # after a failed request (retries spent): leave the upstream alone this long,
OUTAGE_MAX = 300.0  # doubling per consecutive failure up to this, unless Retry-After says


def retry_after_seconds(value: str | None) -> float | None:
    """`Retry-After` as seconds (it may be a number or an HTTP date)."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    with contextlib.suppress(TypeError, ValueError):
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    return None


@dataclass(frozen=True)
class FetchedManifest:
    data: bytes
    media_type: str
    digest: Digest


@dataclass(frozen=True)
class ManifestHead:
    digest: Digest | None
    media_type: str | None
    size: int | None


@dataclass(frozen=True)
class TagList:
    body: bytes
    content_type: str
    link: str | None


@dataclass(frozen=True)
class ReferrersPage:
    """One page of an upstream's referrers answer and the query of the next one (if any)."""

    body: bytes
    next_query: dict[str, str]


@dataclass(frozen=True)
class ProbeStep:
    """One check of `UpstreamClient.probe`: whether it worked, and what happened in words."""

    ok: bool
    words: str


@dataclass(frozen=True)
class UpstreamProbe:
    """Whether the upstream answers `/v2/`, and whether logging in (a token, or Basic
    credentials) works; `login` is None where there was nothing to try."""

    reached: ProbeStep
    login: ProbeStep | None


PROBE_REPOSITORY = Name("library/alpine")  # a token for pulling it reveals and changes nothing
MAX_TAG_PAGES = 100  # an upstream's tag list, followed page by page, at most this many pages
MAX_TAGS = 100_000  # and at most this many tags: beyond, the list is refused, never cut


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname, parts.port


class UpstreamClient:
    """Reads from one upstream registry on behalf of the mirror.

    `dynamic`: made on demand for a registry a client named (`allow_any_upstream`), not one
    the operator configured: it may reach public addresses only, and its metrics carry the
    label `dynamic` rather than a host a client chose.
    """

    def __init__(
        self,
        name: str,
        config: UpstreamConfig,
        *,
        metrics: Metrics | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        dynamic: bool = False,
        network: UpstreamNetwork | None = None,
        clock: Callable[[], float] = time.monotonic,
        bandwidth_share: int = 1,
    ) -> None:
        self.name = name
        self.config = config
        self.dynamic = dynamic
        self.metric_label = "dynamic" if dynamic else name  # bounded label values
        self.metrics = metrics or Metrics()
        self.network = network or UpstreamNetwork()
        self.guard = AddressGuard(
            name,
            None if dynamic else urlsplit(config.url).hostname,
            redirect_to_internal=config.redirect_to_internal,
            classify=self.network.classify,
        )
        self._clock = clock  # for idle time
        self.in_flight = 0  # requests (and blob streams) under way
        self.last_used = clock()
        self._retired = False  # close the session once the last request ends
        self.last_success: float | None = None  # wall time of the last answer below 500
        self.last_failure: str | None = None
        self.backoff_until = 0.0  # monotonic: no requests to this upstream before then
        self._outages = 0
        self.base_url = config.url.rstrip("/")
        self._library = config.uses_library_prefix()
        self._sleep = sleep
        self._session: aiohttp.ClientSession | None = None
        self._resolver: GuardedResolver | None = None
        self.auth: Authenticator | None = None  # the first account's
        self._authenticators: dict[str, Authenticator] = {}  # per account: tokens per scope
        self.anonymous_auth: Authenticator | None = None  # probes what anyone may read
        names = [user for user, _ in config.accounts()] or ["anonymous"]
        self.budget = Budget([Account(user) for user in names])
        # Every fill of this upstream draws from one bucket (this worker's share of the cap).
        self.bandwidth = Bandwidth(config.max_bandwidth / max(1, bandwidth_share))
        limit = config.max_concurrent_fetches
        self._slots = asyncio.Semaphore(limit) if limit else None

    def _ssl(self) -> ssl.SSLContext | bool:
        if self.config.insecure:
            return False
        if self.config.ca_file is not None:
            return ssl.create_default_context(cafile=str(self.config.ca_file))
        return True

    async def start(self) -> None:
        self.open()

    def open(self) -> None:
        """Create the pooled session (inside the running event loop)."""
        if self._session is not None:
            return
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=self.config.connect_timeout,
            sock_connect=self.config.connect_timeout,
            sock_read=self.config.read_timeout,
        )
        # Every address the session connects to passes the guard: names once resolved (the
        # resolver), IP literals before each request and redirect hop (the middleware).
        self._resolver = GuardedResolver(self.guard, self.network.resolver)
        connector = aiohttp.TCPConnector(
            limit=256, ttl_dns_cache=300, ssl=self._ssl(), resolver=self._resolver
        )
        self._session = aiohttp.ClientSession(
            timeout=timeout,
            auto_decompress=False,
            read_bufsize=READ_BUFFER,
            connector=connector,
            middlewares=(self.guard.middleware,),
            headers={"User-Agent": "registry-mirror", "Accept-Encoding": "identity"},
        )
        on_fetch = self.metrics.token_fetches.labels(self.metric_label).inc
        accounts: list[tuple[str | None, str | None]] = [*self.config.accounts()]
        accounts = accounts or [(None, None)]
        self._authenticators = {
            user or "anonymous": Authenticator(self._session, user, password, on_fetch=on_fetch)
            for user, password in accounts
        }
        self.auth = next(iter(self._authenticators.values()))
        if self.config.has_credentials:
            self.anonymous_auth = Authenticator(self._session, None, None)

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        if self._resolver is not None:
            await self._resolver.close()
            self._resolver = None

    async def retire(self) -> None:
        """Close now if idle, else when the last request under way ends (a caller routed
        here before the router let go may still use it: the session reopens meanwhile)."""
        self._retired = True
        if self.in_flight == 0:
            await self.close()

    @property
    def closed(self) -> bool:
        return self._session is None

    def touch(self) -> None:
        """Mark as used now (a request was just routed here)."""
        self.last_used = self._clock()

    def _enter(self) -> None:
        self.in_flight += 1
        self.touch()
        if self._session is None:
            self.open()

    async def _leave(self) -> None:
        self.in_flight -= 1
        self.touch()
        if self._retired and self.in_flight == 0:
            await self.close()

    def repository(self, name: Name) -> Name:
        """The name the upstream knows: Docker Hub puts one-segment names under `library/`."""
        return docker_hub_name(name) if self._library else name

    # -- requests -------------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        repo: Name,
        *,
        headers: Mapping[str, str] | CIMultiDict[str] | None = None,
        params: Mapping[str, str] | None = None,
        follow_redirects: bool = False,
        anonymous: bool = False,
        manifest: bool = False,
    ) -> aiohttp.ClientResponse:
        """Send with auth, retries and (optionally) safe redirects; the caller releases it.

        With several accounts, the one with the most budget left asks; its 401 (credentials
        refused) or, for a manifest, 429 passes the request on to the next. A manifest 429 rests
        that account only (blobs, which Docker Hub does not count, go on); another 429 or a
        failure backs off the whole upstream."""
        assert self._session is not None and self.auth is not None
        wait = self.backoff_until - time.monotonic()
        if wait > 0:
            raise UpstreamError(
                "upstream registry is failing; the mirror is leaving it alone for now",
                {"upstream": self.name, "retry_in_seconds": round(wait, 1)},
                status=503,
                headers={"Retry-After": str(int(wait) + 1)},
            )
        if anonymous:
            assert self.anonymous_auth is not None
            resp = await self._send(
                method, path, repo, self.anonymous_auth, None, headers, params, follow_redirects
            )
            return self._after(resp, manifest)
        spend = manifest and method == "GET"
        order = self.budget.order(manifest=manifest, spend=spend)
        if not order:
            raise self._rate_limited(None)
        for i, account in enumerate(order):
            last = i == len(order) - 1
            authenticator = self._authenticators[account.name]
            try:
                resp = await self._send(
                    method, path, repo, authenticator, account, headers, params, follow_redirects
                )
            except CredentialsRefused:
                account.rest(None)
                log.warning("upstream_account_refused", upstream=self.name, account=account.name)
                if last:
                    raise
                continue
            if resp.status == 429 and manifest:
                account.rest(retry_after_seconds(resp.headers.get("Retry-After")))
                log.warning("upstream_account_rate_limited", upstream=self.name,
                            account=account.name)  # fmt: skip
            elif resp.status not in (401, 403):
                return self._after(resp, manifest)
            if last:
                return self._after(resp, manifest)
            resp.release()
        raise AssertionError("unreachable")  # pragma: no cover

    def _rate_limited(self, retry_after: str | None) -> RegistryError:
        """TOOMANYREQUESTS with a Retry-After (the upstream's, or when an account regains
        a pull): never a 404 or an empty answer."""
        wait = retry_after or str(self.budget.retry_after())
        return RegistryError(
            "TOOMANYREQUESTS",
            "upstream registry rate limit: the mirror's pull budget is spent",
            {"upstream": self.name, "retry_in_seconds": wait},
            headers={"Retry-After": wait},
        )

    def _after(self, resp: aiohttp.ClientResponse, manifest: bool) -> aiohttp.ClientResponse:
        """Back off the whole upstream after a failure or a 429 that is not a manifest's."""
        if resp.status >= 500 or (resp.status == 429 and not manifest):
            self._outage(retry_after_seconds(resp.headers.get("Retry-After")))
        else:
            self._outages = 0
        return resp

    async def _send(
        self,
        method: str,
        path: str,
        repo: Name,
        authenticator: Authenticator,
        account: Account | None,
        headers: Mapping[str, str] | CIMultiDict[str] | None,
        params: Mapping[str, str] | None,
        follow_redirects: bool,
    ) -> aiohttp.ClientResponse:
        """One account's request, with its retries and one re-authentication."""
        assert self._session is not None
        scope = f"repository:{repo}:pull"
        url = self.base_url + path
        attempt = 0
        reauthed = False
        while True:
            auth = await authenticator.header(scope)
            hdrs = CIMultiDict(headers or {})
            if auth:
                hdrs["Authorization"] = auth
            started = time.perf_counter()
            try:
                resp = await self._session.request(
                    method, url, headers=hdrs, params=params, allow_redirects=False
                )
                if follow_redirects and resp.status in REDIRECT_STATUSES:
                    resp = await self._follow(method, url, resp, hdrs)
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                self._observe(method, "error", started)
                why = self.last_failure = describe(exc)
                if attempt < self.config.retries:
                    attempt += 1
                    await self._backoff(attempt, method, url, why)
                    continue
                log.warning("upstream_unreachable", upstream=self.name, url=url, why=why)
                self._outage(None)
                raise UpstreamError("upstream registry unreachable", self._detail(why)) from exc
            except aiohttp.ClientError as exc:  # a bad URL or a malformed answer: not retried
                self._observe(method, "error", started)
                why = self.last_failure = describe(exc)
                log.warning("upstream_request_failed", upstream=self.name, url=url, why=why)
                raise UpstreamError("upstream registry failed", self._detail(why)) from exc
            self._observe(method, str(resp.status), started)
            self._note_answer(resp, account)
            if resp.status == 401 and not reauthed:
                challenge = parse_www_authenticate(resp.headers.get("WWW-Authenticate"))
                resp.release()
                if challenge is None:
                    raise RegistryError(
                        "DENIED", "upstream registry refused access", {"upstream": self.name}
                    )
                reauthed = True
                authenticator.learn(challenge)
                authenticator.forget(scope, rejected=auth)
                continue
            if resp.status in RETRY_STATUSES and attempt < self.config.retries:
                resp.release()
                attempt += 1
                await self._backoff(attempt, method, url, str(resp.status))
                continue
            return resp

    async def _follow(
        self,
        method: str,
        url: str,
        resp: aiohttp.ClientResponse,
        hdrs: CIMultiDict[str],
    ) -> aiohttp.ClientResponse:
        assert self._session is not None
        origin = _origin(url)
        for _ in range(MAX_REDIRECTS):
            location = resp.headers.get("Location")
            resp.release()
            if not location:
                raise UpstreamError("upstream redirect without a Location", {"url": url})
            url = urljoin(url, location)
            if urlsplit(url).scheme not in ("http", "https"):
                raise UpstreamError("upstream redirected off HTTP", {"upstream": self.name})
            hdrs = CIMultiDict(hdrs)
            if _origin(url) != origin:
                hdrs.pop("Authorization", None)  # a signed URL carries its own authority
            resp = await self._session.request(method, url, headers=hdrs, allow_redirects=False)
            if resp.status not in REDIRECT_STATUSES:
                return resp
        resp.release()
        raise UpstreamError("upstream redirected too many times", {"upstream": self.name})

    def _detail(self, why: str) -> dict[str, str]:
        """Error detail for the client: the reason in words, except for a dynamic upstream,
        where a reason per host and port would let a client map what it can reach."""
        return {"upstream": self.name} if self.dynamic else {"upstream": self.name, "reason": why}

    def _outage(self, retry_after: float | None) -> None:
        """The upstream failed us (retries spent, or 429): back off instead of hammering it."""
        self._outages += 1
        delay = retry_after
        if delay is None:
            delay = min(OUTAGE_MAX, OUTAGE_BASE * 2 ** (self._outages - 1))
        self.backoff_until = time.monotonic() + delay
        log.warning("upstream_backoff", upstream=self.name, seconds=round(delay, 1))

    def _observe(self, method: str, status: str, started: float) -> None:
        elapsed = time.perf_counter() - started
        self.metrics.upstream_requests.labels(self.metric_label, method, status).inc()
        self.metrics.upstream_seconds.labels(self.metric_label, method).observe(elapsed)
        add_upstream_time(elapsed)

    def _note_answer(self, resp: aiohttp.ClientResponse, account: Account | None) -> None:
        if resp.status < 500:
            self.last_success = time.time()
        else:
            self.last_failure = f"HTTP {resp.status}"
        rate = parse_ratelimit(resp.headers)
        if rate is None or account is None or self.dynamic:
            return
        account.observe(rate)
        labels = (self.metric_label, account.name)
        m = self.metrics
        if account.remaining is not None:
            m.account_ratelimit_remaining.labels(*labels).set(account.remaining)
        if account.limit is not None:
            m.account_ratelimit_limit.labels(*labels).set(account.limit)
        if account.window is not None:
            m.account_ratelimit_window.labels(*labels).set(account.window)
        if account.source is not None:
            m.account_ratelimit_source.labels(*labels, account.source).set(1)
        if (best := self.budget.remaining) is not None:
            m.ratelimit_remaining.labels(self.metric_label).set(best)

    async def _backoff(self, attempt: int, method: str, url: str, why: str) -> None:
        delay = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (attempt - 1)) * (0.5 + random.random())
        log.warning(
            "upstream_retry", upstream=self.name, method=method, url=url, why=why, delay=delay
        )
        await self._sleep(delay)

    def _raise_for(self, resp: aiohttp.ClientResponse, unknown: str, repo: Name) -> None:
        """Turn a non-2xx upstream answer into the error the client should see."""
        status = resp.status
        detail = {"upstream": self.name, "repository": repo, "status": status}
        if status == 404:
            raise RegistryError(unknown, "not found upstream", detail)
        if status in (401, 403):
            raise RegistryError("DENIED", "upstream registry denied access", detail)
        if status == 429:
            raise self._rate_limited(resp.headers.get("Retry-After"))
        raise UpstreamError("upstream registry failed", detail)

    # -- manifests ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        """One of `max_concurrent_fetches` places (a blob stream keeps its own until closed),
        counted as in flight so that the router never releases this upstream under it."""
        self._enter()
        try:
            if self._slots is None:
                yield
                return
            async with self._slots:
                yield
        finally:
            await self._leave()

    async def get_manifest(self, repo: Name, reference: str, accept: list[str]) -> FetchedManifest:
        """GET a manifest whole (bounded by `manifest_max_size`), checked against its digest."""
        async with self._slot():
            return await self._get_manifest(repo, reference, accept)

    async def _get_manifest(self, repo: Name, reference: str, accept: list[str]) -> FetchedManifest:
        upstream_repo = self.repository(repo)
        resp = await self._request(
            "GET",
            f"/v2/{upstream_repo}/manifests/{reference}",
            upstream_repo,
            headers=_accept_headers(accept),
            manifest=True,
        )
        async with resp:
            if resp.status != 200:
                self._raise_for(resp, "MANIFEST_UNKNOWN", repo)
            limit = self.config.manifest_max_size
            if (resp.content_length or 0) > limit:
                raise UpstreamError("upstream manifest too large", {"limit": limit})
            received = bytearray()
            async for chunk in resp.content.iter_any():
                received += chunk
                if len(received) > limit:
                    raise UpstreamError("upstream manifest too large", {"limit": limit})
            if resp.content_length is not None and len(received) != resp.content_length:
                raise UpstreamError("upstream manifest truncated", {"repository": repo})
            content_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
            header_digest = resp.headers.get("Docker-Content-Digest")
        data = bytes(received)
        self.metrics.upstream_fetched_bytes.labels(self.metric_label).inc(len(data))
        digest = Digest("sha256:" + hashlib.sha256(data).hexdigest())
        expected = reference if ":" in reference else header_digest
        if expected and SHA256_RE.fullmatch(expected) and expected != digest:
            raise DigestMismatch(expected, digest)
        media_type = content_type if content_type in ALL_MANIFESTS else None
        media_type = media_type or sniff_media_type(data) or content_type
        if not media_type:
            raise UpstreamError("upstream manifest has no media type", {"repository": repo})
        return FetchedManifest(data, media_type, digest)

    async def head_manifest(self, repo: Name, reference: str, accept: list[str]) -> ManifestHead:
        """HEAD a manifest (Docker Hub does not count HEADs against its pull limit)."""
        upstream_repo = self.repository(repo)
        async with self._slot():
            resp = await self._request(
                "HEAD",
                f"/v2/{upstream_repo}/manifests/{reference}",
                upstream_repo,
                headers=_accept_headers(accept),
                manifest=True,
            )
        async with resp:
            if resp.status != 200:
                self._raise_for(resp, "MANIFEST_UNKNOWN", repo)
            digest = resp.headers.get("Docker-Content-Digest")
            content_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
            return ManifestHead(
                Digest(digest) if digest and SHA256_RE.fullmatch(digest) else None,
                content_type or None,
                resp.content_length,
            )

    # -- blobs ----------------------------------------------------------------------------

    async def open_blob(
        self, repo: Name, digest: Digest, offset: int = 0, if_range: str | None = None
    ) -> BlobStream:
        """Start a blob GET (following redirects from the registry's URL every time, so a
        resumed fetch gets a fresh signed URL); the body is streamed by the caller. From
        `offset` (a fill resumed or taken over part-way asks for the rest with `Range`, and
        `If-Range` with the earlier answer's ETag; an upstream that ignores them sends
        everything and the first bytes are dropped here)."""
        upstream_repo = self.repository(repo)
        headers = {"Range": f"bytes={offset}-"} if offset else None
        if headers is not None and if_range is not None:
            headers["If-Range"] = if_range
        self._enter()
        try:
            if self._slots is not None:
                await self._slots.acquire()
        except BaseException:
            await self._leave()
            raise
        try:
            resp = await self._request(
                "GET",
                f"/v2/{upstream_repo}/blobs/{digest}",
                upstream_repo,
                headers=headers,
                follow_redirects=True,
            )
            if resp.status != 200 and not (offset and resp.status == 206):
                async with resp:
                    self._raise_for(resp, "BLOB_UNKNOWN", repo)
            skip = offset if resp.status == 200 else 0
            if resp.status == 206 and not resp.headers.get("Content-Range", "").startswith(
                f"bytes {offset}-"
            ):
                resp.release()
                raise UpstreamError("upstream answered another range", {"offset": offset})
        except BaseException:
            if self._slots is not None:
                self._slots.release()
            await self._leave()
            raise
        count = self.metrics.upstream_fetched_bytes.labels(self.metric_label).inc
        return BlobStream(
            resp, count, self._slots, skip=skip, done=self._leave, bandwidth=self.bandwidth,
            read_timeout=self.config.read_timeout,
        )  # fmt: skip

    async def head_blob(self, repo: Name, digest: Digest) -> int | None:
        """The blob's size if the upstream has it (None if it does not say)."""
        upstream_repo = self.repository(repo)
        async with self._slot():
            resp = await self._request(
                "HEAD", f"/v2/{upstream_repo}/blobs/{digest}", upstream_repo, follow_redirects=True
            )
        async with resp:
            if resp.status != 200:
                self._raise_for(resp, "BLOB_UNKNOWN", repo)
            return resp.content_length

    # -- tags -----------------------------------------------------------------------------

    async def list_tags(self, repo: Name, params: Mapping[str, str]) -> TagList:
        upstream_repo = self.repository(repo)
        async with self._slot():
            resp = await self._request(
                "GET", f"/v2/{upstream_repo}/tags/list", upstream_repo, params=params
            )
        async with resp:
            if resp.status != 200:
                self._raise_for(resp, "NAME_UNKNOWN", repo)
            body = await _read_bounded(resp, self.config.manifest_max_size)
            if len(body) > self.config.manifest_max_size:
                raise UpstreamError("upstream tag list too large", {"repository": repo})
            return TagList(
                body,
                resp.headers.get("Content-Type", "application/json"),
                resp.headers.get("Link"),
            )

    async def all_tags(self, repo: Name) -> list[str]:
        """Every tag of `repo`, following the upstream's `Link` pages (only their query is
        used: the next page is always asked of this upstream and this repository). Bounded:
        more than `MAX_TAG_PAGES` pages or `MAX_TAGS` tags is refused, never cut short."""
        tags: list[str] = []
        params: dict[str, str] = {}
        for _ in range(MAX_TAG_PAGES):
            listing = await self.list_tags(repo, params)
            try:
                page = json.loads(listing.body).get("tags") or []
            except (ValueError, AttributeError):
                raise UpstreamError("upstream tag list is not JSON", {"repository": repo}) from None
            if not isinstance(page, list) or not all(isinstance(t, str) for t in page):
                raise UpstreamError("upstream tag list is malformed", {"repository": repo})
            tags += page
            if len(tags) > MAX_TAGS:
                raise too_many_tags(repo)
            params = next_page_query(listing.link)
            if not params:
                return tags
        raise too_many_tags(repo)

    async def get_referrers(
        self, repo: Name, digest: Digest, query: Mapping[str, str]
    ) -> ReferrersPage | None:
        """One page of the upstream's referrers API for `digest`; None when the upstream does
        not implement it (a 404: the spec says a registry that does answers 200, even empty).
        The body is bounded by `manifest_max_size`; the caller checks what it holds."""
        upstream_repo = self.repository(repo)
        async with self._slot():
            resp = await self._request(
                "GET",
                f"/v2/{upstream_repo}/referrers/{digest}",
                upstream_repo,
                headers={"Accept": OCI_INDEX},
                params=query,
            )
        async with resp:
            if resp.status in (404, 405, 400):
                return None
            if resp.status != 200:
                self._raise_for(resp, "MANIFEST_UNKNOWN", repo)
            limit = self.config.manifest_max_size
            body = await _read_bounded(resp, limit)
            if len(body) > limit:
                raise UpstreamError("upstream referrers list too large", {"limit": limit})
            self.metrics.upstream_fetched_bytes.labels(self.metric_label).inc(len(body))
            return ReferrersPage(body, next_page_query(resp.headers.get("Link")))

    async def probe(self, repository: Name = PROBE_REPOSITORY) -> UpstreamProbe:
        """Ask `/v2/` once (no retries, no back-off, no metrics) and, if it wants a login,
        log in as the mirror would (a token for pulling `repository` with the configured
        credentials, anonymously without; or Basic) and show that to `/v2/` again. For
        `registry-mirror check-config --probe`: every failure is a step, never an exception."""
        self.open()
        assert self._session is not None
        url = self.base_url + "/v2/"
        try:
            async with self._session.get(url, allow_redirects=False) as resp:
                status, header = resp.status, resp.headers.get("WWW-Authenticate")
        except (aiohttp.ClientError, TimeoutError) as exc:
            return UpstreamProbe(ProbeStep(False, describe(exc)), None)
        except RegistryError as exc:  # the address guard refused to connect
            return UpstreamProbe(ProbeStep(False, exc.message), None)
        if status == 200:
            login = ProbeStep(True, "none needed: /v2/ answers anyone")
            return UpstreamProbe(
                ProbeStep(True, "/v2/ answered 200"), login if self.config.has_credentials else None
            )
        challenge = parse_www_authenticate(header) if status == 401 else None
        if challenge is None:
            why = "without a challenge the mirror understands" if status == 401 else "not 200/401"
            return UpstreamProbe(ProbeStep(False, f"/v2/ answered HTTP {status}, {why}"), None)
        kind = "a token" if challenge.scheme == "bearer" else "a user and password"
        reached = ProbeStep(True, f"/v2/ answered 401 asking for {kind}")
        return UpstreamProbe(reached, await self._probe_login(url, challenge, repository))

    async def _probe_login(self, url: str, challenge: Challenge, repository: Name) -> ProbeStep:
        assert self._session is not None
        config = self.config
        first: list[tuple[str | None, str | None]] = [*config.accounts()]
        username, password = (first or [(None, None)])[0]
        who = f"as {username}" if username else "anonymously"
        if challenge.scheme == "basic" and not username:
            return ProbeStep(False, "the registry wants a user and password; none is configured")
        authenticator = Authenticator(self._session, username, password)
        authenticator.learn(challenge)
        try:
            auth = await authenticator.header(f"repository:{self.repository(repository)}:pull")
        except RegistryError as exc:
            detail = exc.detail if isinstance(exc.detail, dict) else {}
            why = detail.get("reason") or (f"HTTP {detail['status']}" if "status" in detail else "")
            words = exc.message.removeprefix("upstream ") + (f" ({why})" if why else "")
            return ProbeStep(False, f"{words}, logging in {who}")
        what = f"a token from {challenge.realm}" if challenge.scheme == "bearer" else "Basic auth"
        try:
            async with self._session.get(
                url, headers={"Authorization": auth} if auth else None, allow_redirects=False
            ) as resp:
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            return ProbeStep(False, describe(exc))
        except RegistryError as exc:
            return ProbeStep(False, exc.message)
        if status == 200:
            return ProbeStep(True, f"logged in {who} ({what}, accepted by /v2/)")
        return ProbeStep(False, f"/v2/ answered HTTP {status} to {what}, logging in {who}")

    async def anonymous_can_read(self, repo: Name) -> bool:
        """Whether anyone, with no credentials, may read `repo` upstream (a tag list GET
        without our credentials). Content of repositories that fail this is private."""
        if self.anonymous_auth is None:
            return True
        upstream_repo = self.repository(repo)
        async with self._slot():
            resp = await self._request(
                "GET", f"/v2/{upstream_repo}/tags/list", upstream_repo,
                params={"n": "1"}, anonymous=True,
            )  # fmt: skip
        async with resp:
            if resp.status >= 500 or resp.status == 429:
                self._raise_for(resp, "NAME_UNKNOWN", repo)
            return resp.status == 200


async def _read_bounded(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, or its first `limit + 1` bytes when it is longer (one `read(n)` may
    return less than there is)."""
    body = bytearray()
    async for chunk in resp.content.iter_any():
        body += chunk
        if len(body) > limit:
            break
    return bytes(body[: limit + 1])


def too_many_tags(repo: Name) -> UpstreamError:
    return UpstreamError(
        "upstream tag list too long for the mirror to order",
        {"repository": repo, "max_pages": MAX_TAG_PAGES, "max_tags": MAX_TAGS},
    )


def next_page_query(link: str | None) -> dict[str, str]:
    """The query of a `Link: <...>; rel="next"` header (empty: no next page). Only the
    query is kept, so a page link can never send the mirror to another host or path."""
    if not link or 'rel="next"' not in link.replace("'", '"'):
        return {}
    start, end = link.find("<"), link.find(">")
    if start < 0 or end < start:
        return {}
    query = urlsplit(link[start + 1 : end]).query
    return {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}


class BlobStream:
    """An upstream blob body: its declared size and its bytes as they arrive."""

    def __init__(
        self,
        resp: aiohttp.ClientResponse,
        count: Callable[[int], None],
        slots: asyncio.Semaphore | None = None,
        *,
        skip: int = 0,
        done: Callable[[], Awaitable[None]] | None = None,
        bandwidth: Bandwidth | None = None,
        read_timeout: float | None = None,
    ) -> None:
        self._bandwidth = bandwidth  # the upstream's cap, paid for each chunk received
        self._resp = resp
        self._read_timeout = read_timeout
        self._socket_body: SocketBody | None = None
        self._count = count
        self._slots = slots  # released on close
        self._done = done  # called once on close: the upstream's request has ended
        self._skip = skip  # leading bytes the caller did not ask for
        length = resp.content_length
        self.size = None if length is None else length - skip
        etag = resp.headers.get("ETag")
        # A strong validator only: If-Range must not match a weak one (RFC 9110 13.1.5).
        self.validator = etag if etag and not etag.startswith("W/") else None

    async def chunks(self) -> AsyncIterator[Chunk]:
        """The body's bytes; a big plain-HTTP body as views read off the loop (socket_body)."""
        received = 0
        skip = self._skip
        body = self._socket_body = SocketBody.take(self._resp, self._read_timeout)
        source: AsyncIterator[Chunk] = (
            self._resp.content.iter_any() if body is None else body.chunks()
        )
        try:
            async for chunk in source:
                self._count(len(chunk))
                if self._bandwidth is not None:
                    await self._bandwidth.take(len(chunk))
                if skip:
                    if len(chunk) <= skip:
                        skip -= len(chunk)
                        continue
                    chunk, skip = chunk[skip:], 0
                received += len(chunk)
                yield chunk
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            why = describe(exc)
            log.warning("upstream_blob_broke_off", received=received, why=why)
            raise UpstreamError(
                "upstream blob transfer broke off", {"received": received, "reason": why}
            ) from exc
        if self.size is not None and received != self.size:
            raise UpstreamError(
                "upstream blob body truncated", {"expected": self.size, "received": received}
            )

    async def close(self) -> None:
        if self._socket_body is not None:
            await self._socket_body.close()  # closes the connection: it cannot be reused
        self._resp.release()
        if self._slots is not None:
            self._slots.release()
            self._slots = None
        done, self._done = self._done, None
        if done is not None:
            await done()


def _accept_headers(accept: list[str]) -> CIMultiDict[str]:
    """Forward every media type the client accepts (one header each, as clients send them).

    A wildcard (or no Accept at all) means "anything": registries read `*/*` as the legacy
    Docker types only, so it is spelled out as every manifest type the mirror can store.
    """
    wanted = [t for t in accept if "*" not in t]
    if len(wanted) < len(accept) or not accept:
        wanted += [t for t in ALL_MANIFESTS if t not in wanted]
    headers: CIMultiDict[str] = CIMultiDict()
    for media_type in wanted:
        headers.add("Accept", media_type)
    return headers
