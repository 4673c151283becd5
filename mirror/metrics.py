"""Prometheus metrics (prometheus-client), one set per application, passed to whoever records.

Names follow Prometheus conventions (`registry_mirror_*`, `_total`, `_seconds`, `_bytes`).
`registry_mirror_cache_served_bytes_total` against `registry_mirror_upstream_fetched_bytes_total`
is the WAN traffic the cache saves. The time a request spent waiting on upstreams is gathered in
a context variable so the access log can show it.
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

# Seconds spent waiting on upstream responses by the current request (None outside requests).
UPSTREAM_SECONDS: contextvars.ContextVar[list[float] | None] = contextvars.ContextVar(
    "upstream_seconds", default=None
)

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
)

# prometheus_client ships no annotations; typed here once: registers every worker's series.
_merge_workers: Callable[[CollectorRegistry], object] = multiprocess.MultiProcessCollector


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "registry_mirror_http_requests",
            "Requests answered",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "registry_mirror_http_request_duration_seconds",
            "Time to answer a request",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cache_hits = Counter(
            "registry_mirror_cache_hits", "Requests answered from the cache", ["kind"], registry=r
        )
        self.cache_misses = Counter(
            "registry_mirror_cache_misses",
            "Requests the cache could not answer alone",
            ["kind"],
            registry=r,
        )
        self.cache_served_bytes = Counter(
            "registry_mirror_cache_served_bytes",
            "Bytes sent to clients from the cache",
            registry=r,
        )
        self.upstream_fetched_bytes = Counter(
            "registry_mirror_upstream_fetched_bytes",
            "Bytes received from upstreams",
            ["upstream"],
            registry=r,
        )
        self.upstream_requests = Counter(
            "registry_mirror_upstream_requests",
            "Requests sent to upstreams",
            ["upstream", "method", "status"],
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "registry_mirror_upstream_request_duration_seconds",
            "Time until an upstream answered (headers)",
            ["upstream", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.token_fetches = Counter(
            "registry_mirror_upstream_token_fetches",
            "Bearer tokens fetched",
            ["upstream"],
            registry=r,
        )
        self.ratelimit_remaining = Gauge(
            "registry_mirror_upstream_ratelimit_remaining",
            "Pull budget left, from the upstream's ratelimit-remaining header",
            ["upstream"],
            registry=r,
        )
        # Per account (a pool's user name, or `anonymous`): Docker Hub's rate-limit headers.
        account = ["upstream", "account"]
        self.account_ratelimit_remaining = Gauge(
            "registry_mirror_upstream_account_ratelimit_remaining",
            "Pulls left for one account (ratelimit-remaining)",
            account,
            registry=r,
        )
        self.account_ratelimit_limit = Gauge(
            "registry_mirror_upstream_account_ratelimit_limit",
            "Pulls allowed per window for one account (ratelimit-limit)",
            account,
            registry=r,
        )
        self.account_ratelimit_window = Gauge(
            "registry_mirror_upstream_account_ratelimit_window_seconds",
            "The rate limit's window (the w= of ratelimit-limit)",
            account,
            registry=r,
        )
        self.account_ratelimit_source = Gauge(
            "registry_mirror_upstream_account_ratelimit_source",
            "What the upstream counts the pulls against (docker-ratelimit-source), as a label",
            [*account, "source"],
            registry=r,
        )
        self.budget_stale_answers = Counter(
            "registry_mirror_budget_stale_answers",
            "Expired tags answered from the cache because the pull budget was under the floor",
            ["upstream"],
            registry=r,
        )
        self.prefetches = Counter(
            "registry_mirror_prefetches",
            "Blobs prefetched after a manifest was served, by outcome",
            ["upstream", "outcome"],
            registry=r,
        )
        self.fills_in_flight = Gauge(
            "registry_mirror_fills_in_flight", "Blob fills streaming from upstreams", registry=r
        )
        self.stale_answers = Counter(
            "registry_mirror_stale_answers",
            "Tags answered stale because the upstream failed",
            registry=r,
        )
        self.signature_checks = Counter(
            "registry_mirror_signature_checks",
            "Signature policy checks of a manifest (verified, failed, unsigned)",
            ["result"],
            registry=r,
        )
        self.cache_bypassed = Counter(
            "registry_mirror_cache_bypassed",
            "Blobs passed through uncached because the cache could not take them (disk full)",
            registry=r,
        )
        self.evictions = Counter(
            "registry_mirror_evictions", "Cache entries evicted", ["reason"], registry=r
        )
        self.evicted_bytes = Counter(
            "registry_mirror_evicted_bytes", "Bytes evicted from the cache", registry=r
        )
        self.cache_size = Gauge(
            "registry_mirror_cache_size_bytes",
            "Bytes held by the cache",
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.cache_entries = Gauge(
            "registry_mirror_cache_entries",
            "Blobs and manifests held by the cache",
            registry=r,
            multiprocess_mode="mostrecent",
        )

        # Scale-out (several nodes on S3 and Redis)
        self.peer_fetched_bytes = Counter(
            "registry_mirror_cluster_peer_fetched_bytes",
            "Bytes received from other nodes filling a blob (instead of from an upstream)",
            registry=r,
        )
        self.shared_store_bytes = Counter(
            "registry_mirror_cluster_shared_store_bytes",
            "Bytes moved to (direction=up) and from (down) the shared object store",
            ["direction"],
            registry=r,
        )
        self.cluster_degraded = Gauge(
            "registry_mirror_cluster_degraded",
            "1 while a shared service (redis, s3) is unreachable and this node works alone",
            ["service"],
            registry=r,
            multiprocess_mode="max",
        )
        self.fill_takeovers = Counter(
            "registry_mirror_cluster_fill_takeovers",
            "Fills continued by this node after the node fetching them went away",
            registry=r,
        )

    def scrape(self) -> bytes:
        """The text exposition; with several workers, all of theirs merged."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            merged = CollectorRegistry()
            _merge_workers(merged)
            return generate_latest(merged)
        return generate_latest(self.registry)


def add_upstream_time(seconds: float) -> None:
    holder = UPSTREAM_SECONDS.get()
    if holder is not None:
        holder.append(seconds)
