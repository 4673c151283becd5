"""Whether a shared service (Redis, S3) is usable: up/down with a retry time, so a dead
service costs one time-out per probe interval, logged and counted once per episode."""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog

from mirror.metrics import Metrics

log = structlog.get_logger(__name__)

PROBE_SECONDS = 5.0  # a service found down is tried again this often


@dataclass
class ServiceHealth:
    """Up/down with a retry time, so a dead service costs one timeout per probe interval."""

    name: str
    metrics: Metrics
    down_since: float | None = None
    retry_at: float = 0.0

    @property
    def usable(self) -> bool:
        return self.down_since is None or time.monotonic() >= self.retry_at

    @property
    def degraded(self) -> bool:
        return self.down_since is not None

    def failed(self, exc: BaseException) -> None:
        if self.down_since is None:
            self.down_since = time.time()
            log.warning("cluster_service_down", service=self.name, error=str(exc)[:200])
        self.retry_at = time.monotonic() + PROBE_SECONDS
        self.metrics.cluster_degraded.labels(self.name).set(1)

    def ok(self) -> None:
        if self.down_since is not None:
            log.info("cluster_service_back", service=self.name)
            self.down_since = None
        self.metrics.cluster_degraded.labels(self.name).set(0)
