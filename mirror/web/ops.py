"""Operator endpoints: `/metrics` (Prometheus), `/healthz` (alive), `/readyz` (can serve).

Readiness is about this node's cache (writable, index open); upstream reachability is reported
in the body but never fails readiness, because a cache keeps serving while its upstream is down.
"""

from __future__ import annotations

import asyncio
import os
import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from mirror.web.keys import MIRROR


async def metrics(request: web.Request) -> web.Response:
    mirror = request.app[MIRROR]
    mirror.refresh_gauges()
    body = await asyncio.to_thread(mirror.metrics.scrape)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    mirror = request.app[MIRROR]
    tmp_dir = mirror.store.tmp_dir
    checks: dict[str, object] = {
        "cache_writable": await asyncio.to_thread(os.access, tmp_dir, os.W_OK),
        "index_open": await asyncio.to_thread(mirror.index.is_open),
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
    if mirror.cluster is not None:
        # A node working without Redis or S3 still serves: ready, but says it is degraded.
        cluster = body["cluster"] = mirror.cluster.status()
        if ready and "degraded" in cluster.values():
            body["status"] = "degraded"
    return web.json_response(body, status=200 if ready else 503)


def add_routes(router: web.UrlDispatcher, *, with_metrics: bool) -> None:
    router.add_get("/healthz", healthz)
    router.add_get("/readyz", readyz)
    if with_metrics:
        router.add_get("/metrics", metrics)
