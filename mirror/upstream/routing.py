"""Which upstream serves a request, and under which repository name.

Three ways to name a registry, as clients do: containerd's mirror requests carry `?ns=<host>`;
a path prefix (`/v2/ghcr.io/owner/app/...`, or a configured alias `/v2/ghcr/owner/app/...`)
names one in the repository path; anything else goes to the default upstream (Docker Hub), so
dockerd's `registry-mirrors` keeps working. A registry that no upstream stands for is refused
(`NAME_UNKNOWN`), never answered with another registry's content, unless the operator has set
`allow_any_upstream`, which makes the mirror pull from `https://<host>` anonymously.

Such dynamic upstreams are named by clients, so nothing about them may grow with what clients
ask: at most `MAX_DYNAMIC_UPSTREAMS` at once, each let go after `DYNAMIC_IDLE_SECONDS` unused
(or sooner, the least recently used idle one, when a new one needs its place: only when all
are busy is a new registry refused), and their metrics share the one label value `dynamic`.
Where they may connect is the address guard's business (`guard.py`): public addresses only.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from mirror.config import DOCKER_HUB_HOSTS, DOCKER_HUB_URL, Config, UpstreamConfig
from mirror.errors import RegistryError
from mirror.metrics import Metrics
from mirror.reference import Name
from mirror.upstream.client import UpstreamClient
from mirror.upstream.guard import UpstreamNetwork, ip_literal, looks_numeric

_HOST_RE = re.compile(
    r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)+"
    r"(?::[0-9]{1,5})?"
)
MAX_DYNAMIC_UPSTREAMS = 64
DYNAMIC_IDLE_SECONDS = 600.0  # a dynamic upstream unused this long is closed and forgotten
SWEEP_SECONDS = 60.0  # how often idle dynamic upstreams are looked for
# `?ns=` naming a registry no upstream stands for: a warning once per host, at most one per
# interval (clients choose the hosts, so they must not be able to flood the log), and at most
# this many hosts remembered (past that, the interval alone bounds the lines).
UNMIRRORED_WARNING_SECONDS = 10.0
UNMIRRORED_HOSTS_REMEMBERED = 256

log = structlog.get_logger(__name__)


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
    """A registry host `allow_any_upstream` may reach: a DNS name, never an IP address in
    any spelling (`127.1`, `0x7f.1` and `2130706433` are 127.0.0.1 to the C library)."""
    if len(host) > 259 or not _HOST_RE.fullmatch(host):
        return False
    name, _, port = host.partition(":")
    if port and not 0 < int(port) < 65536:
        return False
    return ip_literal(name) is None and not looks_numeric(name)


class Router:
    def __init__(
        self,
        default: UpstreamClient,
        others: list[UpstreamClient] | None = None,
        *,
        allow_any: bool = False,
        make_client: Callable[[str, UpstreamConfig], UpstreamClient] | None = None,
        clock: Callable[[], float] = time.monotonic,
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
        self._clock = clock  # the clients' clock too: idle time is `clock() - last_used`
        self._dynamic_upstreams: dict[str, UpstreamClient] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._warned_hosts: set[str] = set()
        self._last_warning = float("-inf")

    def route(self, name: Name, namespace: str | None = None) -> Target:
        """The upstream for a repository; `namespace` is containerd's `?ns=<registry host>`."""
        if namespace is not None:
            upstream = self._by_ns.get(namespace)
            if upstream is None:
                if not self.allow_any:
                    self._warn_unmirrored(namespace)
                upstream = self._dynamic(namespace)
            return Target(upstream, name)
        first, sep, rest = name.partition("/")
        if sep:
            prefixed = self._by_prefix.get(first)
            if prefixed is not None:
                return Target(prefixed, Name(rest))
            if looks_like_host(first):
                return Target(self._dynamic(first), Name(rest))
        return Target(self.default, name)

    def _warn_unmirrored(self, host: str) -> None:
        """Say, once per host, that containerd asks for a registry no upstream stands for: it
        gets NAME_UNKNOWN and quietly pulls from the internet instead, so nothing else shows."""
        if host in self._warned_hosts or not _HOST_RE.fullmatch(host) or len(host) > 259:
            return
        now = self._clock()
        if now - self._last_warning < UNMIRRORED_WARNING_SECONDS:
            return  # a later request for this host will say it
        self._last_warning = now
        if len(self._warned_hosts) < UNMIRRORED_HOSTS_REMEMBERED:
            self._warned_hosts.add(host)
        log.warning(
            "registry_not_mirrored",
            registry=host,
            message=f"requests for {host} arrive (containerd's ?ns=) but no upstream stands for"
            f" it: add {host} to upstream.names (or upstreams.<name>.names) of the upstream that"
            " mirrors it; until then containerd falls back to pulling from the registry itself",
        )

    def _dynamic(self, host: str) -> UpstreamClient:
        known = self._dynamic_upstreams.get(host)
        if known is not None:
            known.touch()
            return known
        if not self.allow_any or self._make_client is None or not _dynamic_host(host):
            raise RegistryError(
                "NAME_UNKNOWN",
                "this mirror does not mirror that registry",
                {"registry": host[:256], "mirrors": sorted(self._by_ns)},
            )
        self.release_idle()
        if len(self._dynamic_upstreams) >= MAX_DYNAMIC_UPSTREAMS:
            idle = [u for u in self._dynamic_upstreams.values() if u.in_flight == 0]
            if not idle:
                raise RegistryError("TOOMANYREQUESTS", "too many registries mirrored at once")
            self._release(min(idle, key=lambda u: u.last_used))
        template = self.default.config
        hub = host in DOCKER_HUB_HOSTS
        scheme = self.default.network.dynamic_scheme
        config = UpstreamConfig(
            url=DOCKER_HUB_URL if hub else f"{scheme}://{host}",
            library_prefix="auto",
            tag_ttl=template.tag_ttl,
            connect_timeout=template.connect_timeout,
            read_timeout=template.read_timeout,
            retries=template.retries,
            manifest_max_size=template.manifest_max_size,
            max_concurrent_fetches=template.max_concurrent_fetches,
        )
        upstream = self._make_client(host, config)
        if not upstream.dynamic:  # its guard would trust a host a client chose
            raise RuntimeError("make_client must make dynamic upstreams")
        upstream.open()
        self._dynamic_upstreams[host] = self.upstreams[host] = upstream
        return upstream

    def release_idle(self) -> None:
        """Let go of the dynamic upstreams unused for `DYNAMIC_IDLE_SECONDS`."""
        now = self._clock()
        for upstream in list(self._dynamic_upstreams.values()):
            if upstream.in_flight == 0 and now - upstream.last_used >= DYNAMIC_IDLE_SECONDS:
                self._release(upstream)

    def _release(self, upstream: UpstreamClient) -> None:
        """Forget a dynamic upstream and close its session (once its requests end)."""
        del self._dynamic_upstreams[upstream.name]
        del self.upstreams[upstream.name]
        task = asyncio.get_running_loop().create_task(upstream.retire())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            self.release_idle()

    async def start(self) -> None:
        for upstream in self.upstreams.values():
            upstream.open()
        if self.allow_any and self._sweeper is None:
            self._sweeper = asyncio.ensure_future(self._sweep())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for upstream in self.upstreams.values():
            await upstream.close()
        await asyncio.gather(*self._closing, return_exceptions=True)


def build_router(
    config: Config,
    metrics: Metrics | None = None,
    *,
    network: UpstreamNetwork | None = None,
    bandwidth_share: int = 1,
) -> Router:
    """The default upstream, the named ones, and (if allowed) any other on demand; `network`
    is how they are reached (tests substitute a resolver that never touches DNS)."""
    network = network or UpstreamNetwork()

    def make(name: str, upstream: UpstreamConfig, *, dynamic: bool = False) -> UpstreamClient:
        return UpstreamClient(
            name,
            upstream,
            metrics=metrics,
            dynamic=dynamic,
            network=network,
            bandwidth_share=bandwidth_share,
        )

    others = [make(name, upstream) for name, upstream in config.upstreams.items()]
    return Router(
        make("default", config.upstream),
        others,
        allow_any=config.allow_any_upstream,
        make_client=lambda name, upstream: make(name, upstream, dynamic=True),
    )
