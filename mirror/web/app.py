"""`make_app(config)`: the aiohttp application, its lifecycle and its middlewares."""

from __future__ import annotations

import asyncio
import functools
import itertools
import secrets
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypedDict

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from mirror.access import ANONYMOUS, Principal
from mirror.cache import sqlite
from mirror.config import Config, split_host_port
from mirror.errors import RegistryError, UpstreamError
from mirror.metrics import UPSTREAM_SECONDS, Metrics
from mirror.node import Node, open_node
from mirror.upstream.guard import UpstreamNetwork
from mirror.web import cluster as cluster_routes
from mirror.web import ops
from mirror.web.auth import ClientAuth, TokenSigner
from mirror.web.keys import (
    CACHE_RESULT,
    CLIENT_AUTH,
    CONFIG,
    DEADLINE,
    MIRROR,
    NODE,
    PRINCIPAL,
    RATE_LIMITER,
    REQUEST_ID,
    ROUTE,
)
from mirror.web.limits import RateLimiter
from mirror.web.responses import StreamAborted
from mirror.web.routes import API_VERSION_HEADERS, dispatch
from mirror.web.ui import setup_ui

log = structlog.get_logger("mirror.access")
FLUSH_INTERVAL = 1.0  # seconds between index flushes (and policy checks)
IO_THREADS = 64


_ID_PREFIX = secrets.token_hex(6)  # unique per process; a counter after it (no syscall per id)
_ID_COUNTER = itertools.count(1)


def _new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):010x}"


def _error_response(error: RegistryError) -> web.Response:
    return web.json_response(error.to_json(), status=error.status, headers=error.headers)


@web.middleware
async def access_and_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render `RegistryError` as OCI JSON; count and log one access line per request."""
    request_id = request.headers.get("X-Request-ID", "")[:128] or _new_request_id()
    request[REQUEST_ID] = request_id
    upstream_time: list[float] = []
    UPSTREAM_SECONDS.set(upstream_time)
    started = time.perf_counter()
    status = 500
    response: web.StreamResponse | None = None
    principal = ANONYMOUS
    try:
        try:
            request[PRINCIPAL] = principal = await _identify(request)
            _rate_limit(request, principal)
            # Until the response starts (then streaming has its own idle time-outs).
            async with asyncio.timeout(request.app[CONFIG].limits.request_timeout) as deadline:
                request[DEADLINE] = deadline
                try:
                    response = await handler(request)
                finally:
                    request.pop(DEADLINE, None)
        except TimeoutError:
            response = _error_response(
                RegistryError("UNAVAILABLE", "the request took too long", status=504)
            )
        except RegistryError as exc:
            if isinstance(exc, UpstreamError):
                log.warning(
                    "upstream_fetch_failed", path=request.path, error=exc.message, detail=exc.detail
                )
            auth = request.app.get(CLIENT_AUTH)
            if exc.status == 401 and auth is not None and "WWW-Authenticate" not in exc.headers:
                exc.headers.update(auth.challenge(request))
            response = _error_response(exc)
        except StreamAborted as exc:
            status = 502
            log.warning("blob_stream_aborted", path=request.path, error=str(exc.__cause__))
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            status = 499
            raise
        except Exception:
            log.exception("request_failed", method=request.method, path=request.path)
            response = _error_response(RegistryError("UNKNOWN", "internal error", status=500))
        status = response.status
        return response
    finally:
        elapsed = time.perf_counter() - started
        size = (response.content_length or 0) if response is not None else 0
        cache = request.get(CACHE_RESULT)
        route = request.get(ROUTE, "other")
        _count(request.app[MIRROR].metrics, route, request.method, status, elapsed, cache, size)
        log.info(
            "request",
            method=request.method,
            path=request.raw_path[:512],
            status=status,
            bytes=size,
            duration_ms=round(elapsed * 1000, 2),
            upstream_ms=round(sum(upstream_time) * 1000, 2),
            cache=cache,
            request_id=request_id,
            user=principal.name,
        )


async def _identify(request: web.Request) -> Principal:
    """Who the client is. With client auth on, `/v2/` challenges clients that sent nothing,
    so engines holding credentials fetch a token with them (and the others an anonymous one)."""
    auth = request.app.get(CLIENT_AUTH)
    if auth is None:
        return ANONYMOUS
    principal = await auth.identify(request)
    if principal.authenticated or not request.path.startswith("/v2"):
        return principal
    if request.path in ("/v2", "/v2/") and "Authorization" not in request.headers:
        raise auth.unauthorized(request, "authenticate (or fetch an anonymous token) first")
    if not auth.config.anonymous:
        raise auth.unauthorized(request, "this mirror needs credentials")
    return principal


def _rate_limit(request: web.Request, principal: Principal) -> None:
    limiter = request.app.get(RATE_LIMITER)
    if limiter is None or not request.path.startswith("/v2"):
        return
    wait = limiter.take(principal.name or request.remote or "")
    if wait > 0:
        raise RegistryError(
            "TOOMANYREQUESTS",
            "too many requests from this client",
            {"retry_after_seconds": round(wait, 2)},
            headers={"Retry-After": str(int(wait) + 1)},
        )


def _count(
    metrics: Metrics,
    route: str,
    method: str,
    status: int,
    elapsed: float,
    cache: str | None,
    size: int,
) -> None:
    metrics.requests.labels(route, method, str(status)).inc()
    metrics.request_seconds.labels(route).observe(elapsed)
    if cache is None or route not in ("manifests", "blobs"):
        return
    kind = route[:-1]  # manifest / blob
    if cache in ("hit", "revalidated"):
        metrics.cache_hits.labels(kind).inc()
        if method == "GET" and status in (200, 206):
            metrics.cache_served_bytes.inc(size)
    else:
        metrics.cache_misses.labels(kind).inc()


async def _add_common_headers(request: web.Request, response: web.StreamResponse) -> None:
    deadline = request.get(DEADLINE)
    if deadline is not None:
        deadline.reschedule(None)  # the response has started: the request time-out is over
    response.headers.update(API_VERSION_HEADERS)
    if REQUEST_ID in request:
        response.headers["X-Request-ID"] = request[REQUEST_ID]


class HandlerOptions(TypedDict):
    """What `handler_options` returns, typed so `**` into `run_app` stays checked."""

    max_line_size: int
    max_field_size: int
    keepalive_timeout: float


def handler_options(config: Config) -> HandlerOptions:
    """Connection-level limits for aiohttp's request handler: header sizes and idle keep-alive.

    The one source for `serve` and the test server. They go to `AppRunner`/`run_app` as plain
    keyword arguments, which aiohttp hands on to each `RequestHandler`; nested under
    `handler_args` (older aiohttp's way), aiohttp 3.14 fails to make the handler, drops every
    option and logs "Failed to create request handler" on each connection.
    """
    limit = config.limits.max_header_size
    return {
        "max_line_size": limit,
        "max_field_size": limit,
        "keepalive_timeout": config.limits.idle_timeout,
    }


def make_app(
    config: Config,
    *,
    clock: Callable[[], float] = time.time,
    network: UpstreamNetwork | None = None,
) -> web.Application:
    """The mirror as an aiohttp application; storage and upstream sessions open on start-up.

    `clock` (wall-clock seconds) drives the TTL policy and `network` how upstreams are reached;
    tests pass their own.
    """
    app = web.Application(middlewares=[access_and_errors], client_max_size=1024)
    app[CONFIG] = config
    if config.limits.client_rate:
        app[RATE_LIMITER] = RateLimiter(config.limits.client_rate, config.limits.client_burst)
    if config.auth.htpasswd is not None or config.tls.client_ca is not None:
        signer = TokenSigner.from_file(config.cache.dir / "token.key")
        client_auth = ClientAuth(config.auth, signer, client_certs=config.tls.client_ca is not None)
        app[CLIENT_AUTH] = client_auth

        async def _stop_password_checks(_app: web.Application) -> None:
            client_auth.close()

        app.on_cleanup.append(_stop_password_checks)
        app.router.add_get("/token", client_auth.token)
    app.cleanup_ctx.append(functools.partial(_lifecycle, clock=clock, network=network))
    app.cleanup_ctx.append(_metrics_listener)
    app.on_response_prepare.append(_add_common_headers)
    ops.add_routes(app.router, with_metrics=not config.metrics.listen)
    if config.clustered:
        cluster_routes.add_routes(app.router)
    setup_ui(app, config)  # before the catch-all, so its paths match first
    app.router.add_route("*", "/{tail:.*}", dispatch)
    return app


async def _metrics_listener(app: web.Application) -> AsyncIterator[None]:
    """`/metrics` on its own address when `metrics.listen` is set (e.g. not on the WAN side)."""
    listen = app[CONFIG].metrics.listen
    if not listen:
        yield
        return
    metrics_app = web.Application()
    metrics_app[MIRROR] = app[MIRROR]
    metrics_app.router.add_get("/metrics", ops.metrics)
    runner = web.AppRunner(metrics_app, access_log=None)
    await runner.setup()
    host, port = split_host_port(listen, "metrics.listen")
    await web.TCPSite(runner, host, port).start()
    try:
        yield
    finally:
        await runner.cleanup()


async def _lifecycle(
    app: web.Application, *, clock: Callable[[], float], network: UpstreamNetwork | None
) -> AsyncIterator[None]:
    config = app[CONFIG]
    # Disk and hashing work runs in threads; asyncio's default pool (cores + 4) would queue
    # cache hits behind a few large fills. (SQLite has its own 4 threads: cache/sqlite.py.)
    executor = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="mirror-io")
    asyncio.get_running_loop().set_default_executor(executor)
    try:
        async with open_node(config, clock=clock, network=network, connect=True) as node:
            app[NODE] = node
            app[MIRROR] = node.mirror
            housekeeping = asyncio.ensure_future(_housekeeping(node))
            log.info(
                "mirror_started",
                cache_dir=str(config.cache.dir),
                upstream=config.upstream.url,
                upstreams={name: u.base_url for name, u in node.router.upstreams.items()},
                client_auth=CLIENT_AUTH in app,
            )
            try:
                yield
            finally:
                housekeeping.cancel()
                await asyncio.gather(housekeeping, return_exceptions=True)
    finally:
        executor.shutdown(wait=False)


async def _housekeeping(node: Node) -> None:
    """Reconcile the index with the files at start, then flush it and apply the policy."""
    index, mirror = node.index, node.mirror
    try:
        added, dropped = await sqlite.run(
            index.reconcile, node.store.blob_dir, node.metadata.is_manifest
        )
        if added or dropped:
            log.info("index_reconciled", added=added, dropped=dropped)
        # Hosted content is counted apart (and never evicted): not the cache's entries.
        await sqlite.run(index.remove, sorted(await node.hosted.protected()))
    except Exception:
        log.exception("index_reconcile_failed")  # serving never depended on the index
    last_pass = float("-inf")
    while True:
        await asyncio.sleep(FLUSH_INTERVAL)
        try:
            await index.flush()
            mirror.refresh_gauges()
            due = time.monotonic() - last_pass >= node.config.cache.gc_interval
            if due or await asyncio.to_thread(node.evictor.over_high_watermark):
                last_pass = time.monotonic()
                await node.policy.run_pass()
        except Exception:
            log.exception("housekeeping_failed")
