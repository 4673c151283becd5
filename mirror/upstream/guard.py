"""Which network addresses an upstream's session may connect to (the SSRF guard).

A registry answers with URLs of its own choosing: blob redirects and token realms. Followed
blindly, they let whoever controls a registry (any registry at all, with `allow_any_upstream`)
make the mirror fetch `http://127.0.0.1:<port>/...` or the cloud metadata service and hand the
answer back. So every address is checked where it is about to be used, after DNS resolution
(a name's check cannot be outrun by a second, different answer: the connection goes to exactly
the addresses checked):

- names: `GuardedResolver` resolves with the default resolver, then drops what is not allowed;
- IP literals, which aiohttp connects to without asking the resolver: `AddressGuard.middleware`
  checks the host of every request the session sends, redirects and token fetches included,
  reading it the way the C library would (`127.1`, `0x7f.1`, `2130706433` are all 127.0.0.1).

The rule, by the class of an address:
- a dynamic upstream (`allow_any_upstream`) and its redirects: public addresses only;
- a configured upstream itself: whatever its operator wrote;
- where a configured upstream sends us: public addresses, and its own class (a registry on a
  private network may use storage on that network; Docker Hub may not send us to 127.0.0.1),
  with loopback trusted like a private network (a registry on this host is the operator's);
  `redirect_to_internal: true` allows every class but the unusable ones (unspecified,
  multicast, reserved).
"""

from __future__ import annotations

import enum
import ipaddress
import re
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import aiohttp
import structlog
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.client_middlewares import ClientHandlerType
from yarl import URL

from mirror.errors import RegistryError

log = structlog.get_logger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# What inet_aton reads as IPv4 (decimal, octal, hex parts, one to four of them).
_LEGACY_IPV4_RE = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)(?:\.(?:0x[0-9a-f]*|[0-9]+)){0,3}")
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")  # connecting to 0.x reaches this host
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class AddressClass(enum.Enum):
    """Where an address leads, from the most to the least exposed."""

    PUBLIC = "public"
    PRIVATE = "private"  # RFC 1918, CGNAT 100.64/10, IPv6 ULA and site-local, other non-global
    LOOPBACK = "loopback"
    LINK_LOCAL = "link-local"  # 169.254/16 (cloud metadata), fe80::/10
    UNUSABLE = "unusable"  # unspecified, multicast, reserved, 0.0.0.0/8: never a registry


# Beyond public addresses, where a configured upstream of each class may send us.
_ALSO_ALLOWED = {
    AddressClass.PUBLIC: frozenset[AddressClass](),
    AddressClass.PRIVATE: frozenset({AddressClass.PRIVATE}),
    AddressClass.LOOPBACK: frozenset({AddressClass.PRIVATE, AddressClass.LOOPBACK}),
    AddressClass.LINK_LOCAL: frozenset({AddressClass.LINK_LOCAL}),
    AddressClass.UNUSABLE: frozenset[AddressClass](),
}
INTERNAL = frozenset(
    {AddressClass.PRIVATE, AddressClass.LOOPBACK, AddressClass.LINK_LOCAL}
)  # what `redirect_to_internal: true` adds


def address_class(ip: IPAddress) -> AddressClass:
    """The class of an address; an IPv6 address that embeds an IPv4 one (mapped, NAT64,
    6to4) is judged by the IPv4 address, since that is where it may lead."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return address_class(embedded)
    if ip.is_unspecified or ip in _THIS_NETWORK:
        return AddressClass.UNUSABLE
    if ip.is_loopback:  # before is_reserved, which ::/8 (and so ::1) also is
        return AddressClass.LOOPBACK
    if ip.is_link_local:
        return AddressClass.LINK_LOCAL
    if ip.is_multicast or ip.is_reserved:
        return AddressClass.UNUSABLE
    if ip.is_global:
        return AddressClass.PUBLIC
    return AddressClass.PRIVATE


def classify(host: str, ip: IPAddress) -> AddressClass:
    """The default classifier: by the address alone (tests may judge a name otherwise)."""
    return address_class(ip)


Classifier = Callable[[str, IPAddress], AddressClass]


def ip_literal(host: str) -> IPAddress | None:
    """The address `host` denotes by itself, in any form the C library would accept
    (`[::1]`, `127.1`, `0x7f.1`, `017700000001`, `2130706433`), or None for a name."""
    host = host.strip().lower().removesuffix(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _LEGACY_IPV4_RE.fullmatch(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def looks_numeric(host: str) -> bool:
    """Whether a URL parser would try to read `host` as an IPv4 address (its last label is a
    number, as the WHATWG URL standard has it): never a registry's DNS name."""
    last = host.lower().removesuffix(".").rsplit(".", 1)[-1]
    return bool(last) and bool(re.fullmatch(r"[0-9]+|0x[0-9a-f]*", last))


def _normal(host: str) -> str:
    return host.strip().lower().removesuffix(".").removeprefix("[").removesuffix("]")


class AddressRefused(RegistryError):
    """The mirror will not connect there: a 403 before any socket is opened."""

    def __init__(self, upstream: str, host: str) -> None:
        super().__init__(
            "DENIED", "the upstream's address is not allowed", {"upstream": upstream, "host": host}
        )


@dataclass(frozen=True)
class UpstreamNetwork:
    """How upstreams are reached; the defaults are production's, tests substitute them (a
    resolver that never touches DNS, a classifier that calls a loopback fake 'public')."""

    resolver: AbstractResolver | None = None  # None: aiohttp's default, one per session
    classify: Classifier = classify
    dynamic_scheme: str = "https"  # what `allow_any_upstream` registries are spoken to with


@dataclass
class AddressGuard:
    """The rule for one upstream's session. `own_host` is a configured upstream's host (None:
    a dynamic upstream, which may only reach public addresses, itself included)."""

    upstream: str
    own_host: str | None
    redirect_to_internal: bool = False
    classify: Classifier = classify
    _own_classes: set[AddressClass] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.own_host is not None:
            self.own_host = _normal(self.own_host)

    def allowed(self, host: str) -> frozenset[AddressClass] | None:
        """The classes `host` may resolve to (None: any, for a configured upstream itself)."""
        if self.own_host is None:
            return frozenset({AddressClass.PUBLIC})
        if _normal(host) == self.own_host:
            return None
        allowed = {AddressClass.PUBLIC}
        for own in self._own_classes:
            allowed |= _ALSO_ALLOWED[own]
        if self.redirect_to_internal:
            allowed |= INTERNAL
        return frozenset(allowed)

    def permits(self, host: str, ip: IPAddress) -> bool:
        """Whether connecting to `ip` (what `host` resolved to) is allowed; a configured
        upstream's own addresses teach the guard its class."""
        kind = self.classify(host, ip)
        allowed = self.allowed(host)
        if allowed is None:
            self._own_classes.add(kind)
            return True
        if kind in allowed:
            return True
        log.warning(
            "upstream_address_refused",
            upstream=self.upstream,
            host=host,
            address=str(ip),
            address_class=kind.value,
        )
        return False

    def check_url(self, url: URL) -> None:
        """Refuse a URL whose scheme is not HTTP(S) or whose host is a forbidden IP literal
        (names are checked by `GuardedResolver` once resolved)."""
        host = url.raw_host or ""
        if url.scheme not in ("http", "https"):
            raise AddressRefused(self.upstream, host)
        ip = ip_literal(host)
        if ip is not None and not self.permits(host, ip):
            raise AddressRefused(self.upstream, host)

    def filter(self, host: str, results: Iterable[ResolveResult]) -> list[ResolveResult]:
        """The resolved addresses that may be used; refused if none may."""
        kept = []
        for result in results:
            ip = ip_literal(result["host"].split("%", 1)[0])
            if ip is not None and self.permits(host, ip):
                kept.append(result)
        if not kept:
            raise AddressRefused(self.upstream, host)
        return kept

    async def middleware(
        self, request: aiohttp.ClientRequest, handler: ClientHandlerType
    ) -> aiohttp.ClientResponse:
        """A client middleware: runs for every request and every redirect hop it follows."""
        self.check_url(request.url)
        return await handler(request)


class GuardedResolver(AbstractResolver):
    """Resolves with `base` (aiohttp's default if None), then keeps only allowed addresses."""

    def __init__(self, guard: AddressGuard, base: AbstractResolver | None = None) -> None:
        self._guard = guard
        self._owns_base = base is None
        self._base = base if base is not None else aiohttp.DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return self._guard.filter(host, await self._base.resolve(host, port, family))

    async def close(self) -> None:
        if self._owns_base:
            await self._base.close()
