"""Which upstream serves a request. Today one default upstream; the seam for `?ns=` and prefixes."""

from __future__ import annotations

from mirror.reference import Name
from mirror.upstream.client import UpstreamClient


class Router:
    def __init__(self, default: UpstreamClient) -> None:
        self.default = default
        self.upstreams = {default.name: default}

    def route(self, name: Name, namespace: str | None = None) -> UpstreamClient:
        """The upstream for a repository; `namespace` is containerd's `?ns=<registry host>`."""
        return self.default

    async def start(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.start()

    async def close(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.close()
