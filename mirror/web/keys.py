"""Typed keys for state shared through the aiohttp application and request."""

from __future__ import annotations

from aiohttp import web

from mirror.access import Principal
from mirror.cache.eviction import Evictor
from mirror.config import Config
from mirror.mirror import Mirror

CONFIG = web.AppKey("config", Config)
MIRROR = web.AppKey("mirror", Mirror)
EVICTOR = web.AppKey("evictor", Evictor)
CACHE_RESULT = web.RequestKey("cache_result", str)  # hit / miss / revalidated / ...
REQUEST_ID = web.RequestKey("request_id", str)  # X-Request-ID, echoed and logged
ROUTE = web.RequestKey("route", str)  # base / manifests / blobs / tags, for metrics
PRINCIPAL = web.RequestKey("principal", Principal)  # who the client is (web/auth.py)
