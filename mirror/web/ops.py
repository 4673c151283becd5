"""Operator endpoints: `/metrics` (Prometheus), `/healthz` (alive), `/readyz` (can serve).

Readiness is about this node's cache (writable, index open); upstream reachability is reported
in the body but never fails readiness, because a cache keeps serving while its upstream is down.

With `auth.anonymous: false`, `/metrics` and `/readyz` want a login like `/v2/` does: they name
upstream URLs, failures and traffic. `/metrics` on its own `metrics.listen` address stays open
(that address is the operator's choice of who may reach it), and `/healthz` says only "ok".
"""

from __future__ import annotations

import asyncio
import os
import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from mirror.access import ANONYMOUS
from mirror.errors import RegistryError
from mirror.web.keys import CLIENT_AUTH, CONFIG, MIRROR, NODE, PRINCIPAL


def _require_login(request: web.Request) -> None:
    """Refuse anonymous callers when the mirror admits no anonymous clients (the middleware has
    already identified the caller, and refused wrong credentials)."""
    config = request.app.get(CONFIG)
    if config is None or config.auth.anonymous:
        return  # the `metrics.listen` app has no config: its address is the guard
    if request.get(PRINCIPAL, ANONYMOUS).authenticated:
        return
    auth = request.app.get(CLIENT_AUTH)
    if auth is not None:
        raise auth.unauthorized(request, "this mirror needs credentials")
    raise RegistryError("UNAUTHORIZED", "this mirror needs credentials")


async def metrics(request: web.Request) -> web.Response:
    _require_login(request)
    mirror = request.app[MIRROR]
    mirror.refresh_gauges()
    body = await asyncio.to_thread(mirror.metrics.scrape)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    """Liveness for anyone: it tells nothing but that the process answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    _require_login(request)
    node = request.app[NODE]
    mirror = node.mirror
    checks: dict[str, object] = {
        "cache_writable": await asyncio.to_thread(os.access, node.store.tmp_dir, os.W_OK),
        "index_open": await asyncio.to_thread(node.index.is_open),
    }
    upstreams = {}
    for name, upstream in mirror.router.upstreams.items():
        age = None if upstream.last_success is None else round(time.time() - upstream.last_success)
        upstreams[name] = {
            "url": upstream.base_url,
            "seconds_since_success": age,
            "last_failure": upstream.last_failure,
        }
    ready = all(checks.values())
    status = "ready" if ready else "not ready"
    body: dict[str, object] = {"status": status, "checks": checks, "upstreams": upstreams}
    cluster = node.shared.status()  # empty on one node
    if cluster:
        # A node working without Redis or S3 still serves: ready, but says it is degraded.
        body["cluster"] = cluster
        if ready and "degraded" in cluster.values():
            body["status"] = "degraded"
    return web.json_response(body, status=200 if ready else 503)


def add_routes(router: web.UrlDispatcher, *, with_metrics: bool) -> None:
    router.add_get("/healthz", healthz)
    router.add_get("/readyz", readyz)
    if with_metrics:
        router.add_get("/metrics", metrics)
