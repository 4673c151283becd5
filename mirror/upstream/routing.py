"""Which upstream serves a request. Today one upstream; the seam for `?ns=` and prefixes.

containerd's mirror requests name the registry they are for (`?ns=ghcr.io`): one the mirror
does not stand for is refused, never answered with another registry's content.
"""

from __future__ import annotations

from mirror.errors import RegistryError
from mirror.reference import Name
from mirror.upstream.client import UpstreamClient


class Router:
    def __init__(self, default: UpstreamClient) -> None:
        self.default = default
        self.upstreams = {default.name: default}
        self._names = default.config.registry_names()

    def route(self, name: Name, namespace: str | None = None) -> UpstreamClient:
        """The upstream for a repository; `namespace` is containerd's `?ns=<registry host>`."""
        if namespace is not None and namespace not in self._names:
            raise RegistryError(
                "NAME_UNKNOWN",
                "this mirror does not mirror that registry",
                {"ns": namespace[:256], "mirrors": sorted(self._names)},
            )
        return self.default

    async def start(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.start()

    async def close(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.close()
