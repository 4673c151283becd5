"""Which upstream serves a request, and under which repository name.

Three ways to name a registry, as clients do: containerd's mirror requests carry `?ns=<host>`;
a path prefix (`/v2/ghcr.io/owner/app/...`, or a configured alias `/v2/ghcr/owner/app/...`)
names one in the repository path; anything else goes to the default upstream (Docker Hub), so
dockerd's `registry-mirrors` keeps working. A registry that no upstream stands for is refused
(`NAME_UNKNOWN`), never answered with another registry's content, unless the operator has set
`allow_any_upstream`, which makes the mirror pull from `https://<host>` anonymously.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

from mirror.config import DOCKER_HUB_HOSTS, DOCKER_HUB_URL, Config, UpstreamConfig
from mirror.errors import RegistryError
from mirror.metrics import Metrics
from mirror.reference import Name
from mirror.upstream.client import UpstreamClient

_HOST_RE = re.compile(
    r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)+"
    r"(?::[0-9]{1,5})?"
)
MAX_DYNAMIC_UPSTREAMS = 64


@dataclass(frozen=True)
class Target:
    """The upstream for a request and the repository name relative to it (prefix removed)."""

    upstream: UpstreamClient
    name: Name

    @property
    def repository(self) -> Name:
        """The name the upstream itself knows (Docker Hub's `library/` added)."""
        return self.upstream.repository(self.name)

    @property
    def key(self) -> str:
        """`<upstream>/<repository>`: what access rules and provenance records name."""
        return f"{self.upstream.name}/{self.repository}"


def looks_like_host(segment: str) -> bool:
    return "." in segment or segment == "localhost"


def _dynamic_host(host: str) -> bool:
    """A registry host `allow_any_upstream` may reach: a DNS name, never an IP literal."""
    if len(host) > 259 or not _HOST_RE.fullmatch(host):
        return False
    try:
        ipaddress.ip_address(host.rsplit(":", 1)[0])
    except ValueError:
        return True
    return False


class Router:
    def __init__(
        self,
        default: UpstreamClient,
        others: list[UpstreamClient] | None = None,
        *,
        allow_any: bool = False,
        make_client: Callable[[str, UpstreamConfig], UpstreamClient] | None = None,
    ) -> None:
        self.default = default
        self.upstreams = {default.name: default}
        self._by_ns: dict[str, UpstreamClient] = dict.fromkeys(
            default.config.registry_names(), default
        )
        self._by_prefix: dict[str, UpstreamClient] = {
            host: default for host in default.config.aliases
        }
        for upstream in others or []:
            self.upstreams[upstream.name] = upstream
            for host in upstream.config.registry_names():
                self._by_ns[host] = upstream
                self._by_prefix[host] = upstream
            for alias in upstream.config.aliases:
                self._by_prefix[alias] = upstream
        for host in default.config.registry_names():
            self._by_prefix.setdefault(host, default)
        self.allow_any = allow_any
        self._make_client = make_client
        self._dynamic_upstreams: dict[str, UpstreamClient] = {}

    def route(self, name: Name, namespace: str | None = None) -> Target:
        """The upstream for a repository; `namespace` is containerd's `?ns=<registry host>`."""
        if namespace is not None:
            upstream = self._by_ns.get(namespace) or self._dynamic(namespace)
            return Target(upstream, name)
        first, sep, rest = name.partition("/")
        if sep:
            upstream = self._by_prefix.get(first)
            if upstream is not None:
                return Target(upstream, Name(rest))
            if looks_like_host(first):
                return Target(self._dynamic(first), Name(rest))
        return Target(self.default, name)

    def _dynamic(self, host: str) -> UpstreamClient:
        known = self._dynamic_upstreams.get(host)
        if known is not None:
            return known
        if not self.allow_any or self._make_client is None or not _dynamic_host(host):
            raise RegistryError(
                "NAME_UNKNOWN",
                "this mirror does not mirror that registry",
                {"registry": host[:256], "mirrors": sorted(self._by_ns)},
            )
        if len(self._dynamic_upstreams) >= MAX_DYNAMIC_UPSTREAMS:
            raise RegistryError("TOOMANYREQUESTS", "too many registries mirrored at once")
        template = self.default.config
        hub = host in DOCKER_HUB_HOSTS
        config = UpstreamConfig(
            url=DOCKER_HUB_URL if hub else f"https://{host}",
            library_prefix="auto",
            tag_ttl=template.tag_ttl,
            connect_timeout=template.connect_timeout,
            read_timeout=template.read_timeout,
            retries=template.retries,
            manifest_max_size=template.manifest_max_size,
            max_concurrent_fetches=template.max_concurrent_fetches,
        )
        upstream = self._make_client(host, config)
        upstream.open()
        self._dynamic_upstreams[host] = self.upstreams[host] = upstream
        return upstream

    async def start(self) -> None:
        for upstream in self.upstreams.values():
            upstream.open()

    async def close(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.close()


def build_router(config: Config, metrics: Metrics | None = None) -> Router:
    """The default upstream, the named ones, and (if allowed) any other on demand."""

    def make(name: str, upstream: UpstreamConfig) -> UpstreamClient:
        return UpstreamClient(name, upstream, metrics=metrics)

    others = [make(name, upstream) for name, upstream in config.upstreams.items()]
    return Router(
        make("default", config.upstream),
        others,
        allow_any=config.allow_any_upstream,
        make_client=make,
    )
