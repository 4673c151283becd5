"""Typed keys for state shared through the aiohttp application and request."""

from __future__ import annotations

import asyncio

from aiohttp import web

from mirror.access import Principal
from mirror.config import Config
from mirror.mirror import Mirror
from mirror.node import Node
from mirror.web.auth import ClientAuth
from mirror.web.limits import RateLimiter

CONFIG = web.AppKey("config", Config)
MIRROR = web.AppKey("mirror", Mirror)
NODE = web.AppKey("node", Node)  # the assembled services (mirror/node.py)
CLIENT_AUTH = web.AppKey("client_auth", ClientAuth)  # only when client auth is configured
RATE_LIMITER = web.AppKey("rate_limiter", RateLimiter)  # only when limits.client_rate is set
CACHE_RESULT = web.RequestKey("cache_result", str)  # hit / miss / revalidated / ...
REQUEST_ID = web.RequestKey("request_id", str)  # X-Request-ID, echoed and logged
ROUTE = web.RequestKey("route", str)  # base / manifests / blobs / tags, for metrics
PRINCIPAL = web.RequestKey("principal", Principal)  # who the client is (web/auth.py)
DEADLINE = web.RequestKey("deadline", asyncio.Timeout)  # limits.request_timeout, until prepared
