"""`make_app(config)`: the aiohttp application, its lifecycle and its middlewares."""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import AsyncIterator, Callable

import structlog
from aiohttp import web

from mirror.cache.blobs import FilesystemBlobStore
from mirror.cache.eviction import EvictionPlan, Evictor
from mirror.cache.index import CacheIndex
from mirror.cache.metadata import LocalMetadataStore
from mirror.config import Config
from mirror.errors import RegistryError, UpstreamError
from mirror.mirror import Mirror
from mirror.upstream.client import UpstreamClient
from mirror.upstream.routing import Router
from mirror.web.keys import CACHE_RESULT, CONFIG, EVICTOR, MIRROR, REQUEST_ID
from mirror.web.responses import StreamAborted
from mirror.web.routes import API_VERSION_HEADERS, dispatch

log = structlog.get_logger("mirror.access")
FLUSH_INTERVAL = 1.0  # seconds between index flushes (and policy checks)


def _error_response(error: RegistryError) -> web.Response:
    return web.json_response(error.to_json(), status=error.status, headers=error.headers)


@web.middleware
async def access_and_errors(request: web.Request, handler) -> web.StreamResponse:  # type: ignore[no-untyped-def]
    """Render `RegistryError` as OCI JSON, and write one access line per request."""
    request_id = request.headers.get("X-Request-ID", "")[:128] or uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    started = time.perf_counter()
    status = 500
    response: web.StreamResponse | None = None
    try:
        try:
            response = await handler(request)
        except RegistryError as exc:
            if isinstance(exc, UpstreamError):
                log.warning(
                    "upstream_fetch_failed", path=request.path, error=exc.message, detail=exc.detail
                )
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
        log.info(
            "request",
            method=request.method,
            path=request.raw_path[:512],
            status=status,
            bytes=(response.content_length or 0) if response is not None else 0,
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
            cache=request.get(CACHE_RESULT),
            request_id=request_id,
        )


async def _add_common_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(API_VERSION_HEADERS)
    if REQUEST_ID in request:
        response.headers["X-Request-ID"] = request[REQUEST_ID]


def make_app(config: Config, *, clock: Callable[[], float] = time.time) -> web.Application:
    """The mirror as an aiohttp application; storage and upstream sessions open on start-up.

    `clock` (wall-clock seconds) drives the TTL policy; tests pass their own.
    """
    app = web.Application(middlewares=[access_and_errors], client_max_size=1024)
    app[CONFIG] = config
    app.cleanup_ctx.append(functools.partial(_lifecycle, clock=clock))
    app.on_response_prepare.append(_add_common_headers)
    app.router.add_route("*", "/{tail:.*}", dispatch)
    return app


async def _lifecycle(app: web.Application, *, clock: Callable[[], float]) -> AsyncIterator[None]:
    config = app[CONFIG]
    store = FilesystemBlobStore(config.cache.dir)
    await asyncio.to_thread(store.setup)
    metadata = await asyncio.to_thread(LocalMetadataStore, config.cache.dir / "meta")
    index = await asyncio.to_thread(CacheIndex, config.cache.dir / "index", clock)
    router = Router(UpstreamClient("default", config.upstream))
    await router.start()
    mirror = app[MIRROR] = Mirror(store, metadata, index, router, clock=clock)
    evictor = app[EVICTOR] = Evictor(store, index, config.cache, clock)
    housekeeping = asyncio.ensure_future(_housekeeping(mirror, evictor, config))
    log.info("mirror_started", cache_dir=str(config.cache.dir), upstream=config.upstream.url)
    try:
        yield
    finally:
        housekeeping.cancel()
        await asyncio.gather(housekeeping, return_exceptions=True)
        await mirror.fills.close()
        await router.close()
        await index.flush()
        index.close()
        metadata.close()


async def _housekeeping(mirror: Mirror, evictor: Evictor, config: Config) -> None:
    """Reconcile the index with the files at start, then flush it and apply the policy."""
    index = mirror.index
    added, dropped = await asyncio.to_thread(
        index.reconcile, mirror.store.blob_dir, mirror.metadata.is_manifest
    )
    if added or dropped:
        log.info("index_reconciled", added=added, dropped=dropped)
    last_pass = float("-inf")
    while True:
        await asyncio.sleep(FLUSH_INTERVAL)
        try:
            await index.flush()
            due = time.monotonic() - last_pass >= config.cache.gc_interval
            if due or await asyncio.to_thread(evictor.over_high_watermark):
                last_pass = time.monotonic()
                await run_policy(mirror, evictor, config)
        except Exception:
            log.exception("housekeeping_failed")


async def run_policy(
    mirror: Mirror, evictor: Evictor, config: Config, *, dry_run: bool = False
) -> EvictionPlan:
    """One eviction pass now, honouring pins from the config and from the CLI."""
    pins = [*config.cache.pins, *await asyncio.to_thread(mirror.index.pins)]
    return await evictor.run_once(await mirror.pinned_digests(pins), dry_run=dry_run)
