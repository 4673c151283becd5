"""The address guard: which addresses an upstream's session may reach, in every spelling."""

from __future__ import annotations

import ipaddress

import pytest
from yarl import URL

from mirror.errors import RegistryError
from mirror.upstream.failures import describe
from mirror.upstream.guard import (
    AddressClass,
    AddressGuard,
    AddressRefused,
    GuardedResolver,
    address_class,
    ip_literal,
)
from tests.fixtures.fake_upstream import HostsResolver

PUBLIC, PRIVATE, LOOPBACK = AddressClass.PUBLIC, AddressClass.PRIVATE, AddressClass.LOOPBACK
LINK_LOCAL, UNUSABLE = AddressClass.LINK_LOCAL, AddressClass.UNUSABLE


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("8.8.8.8", PUBLIC),
        ("2606:4700:4700::1111", PUBLIC),
        ("127.0.0.1", LOOPBACK),
        ("127.255.0.9", LOOPBACK),
        ("::1", LOOPBACK),
        ("::ffff:127.0.0.1", LOOPBACK),  # IPv4-mapped
        ("64:ff9b::7f00:1", LOOPBACK),  # NAT64
        ("2002:7f00:1::", LOOPBACK),  # 6to4
        ("10.1.2.3", PRIVATE),
        ("172.16.0.1", PRIVATE),
        ("192.168.1.1", PRIVATE),
        ("100.64.0.1", PRIVATE),  # CGNAT
        ("fd00::1", PRIVATE),
        ("169.254.169.254", LINK_LOCAL),  # cloud metadata
        ("::ffff:169.254.169.254", LINK_LOCAL),
        ("fe80::1", LINK_LOCAL),
        ("0.0.0.0", UNUSABLE),
        ("0.1.2.3", UNUSABLE),
        ("::", UNUSABLE),
        ("224.0.0.1", UNUSABLE),
        ("ff02::1", UNUSABLE),
        ("240.0.0.1", UNUSABLE),
        ("255.255.255.255", UNUSABLE),
    ],
)
def test_address_classes(address: str, kind: AddressClass) -> None:
    assert address_class(ipaddress.ip_address(address)) is kind


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0X7F.0.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254"),
        ("127.0.0.1.", "127.0.0.1"),
        ("[::1]", "::1"),
        ("::ffff:7f00:1", "::ffff:127.0.0.1"),
    ],
)
def test_ip_literals_are_read_as_the_c_library_reads_them(host: str, address: str) -> None:
    assert ip_literal(host) == ipaddress.ip_address(address)


@pytest.mark.parametrize("host", ["registry.example", "evil.test", "0x7f.example", "localhost"])
def test_names_are_not_literals(host: str) -> None:
    assert ip_literal(host) is None


def configured(own: str, kind: AddressClass, *, internal: bool = False) -> AddressGuard:
    """A configured upstream at `own`, whose own name the test calls `kind`."""

    def classify(host: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> AddressClass:
        return kind if host == own else address_class(ip)

    guard = AddressGuard("up", own, redirect_to_internal=internal, classify=classify)
    assert guard.permits(own, ipaddress.ip_address("127.0.0.1"))  # its own address: learned
    return guard


@pytest.mark.parametrize(
    ("own", "target", "allowed"),
    [
        (PUBLIC, "8.8.8.8", True),
        (PUBLIC, "127.0.0.1", False),  # Docker Hub may not send us to 127.0.0.1
        (PUBLIC, "10.0.0.1", False),
        (PUBLIC, "169.254.169.254", False),
        (PRIVATE, "10.0.0.1", True),  # its storage on its own network
        (PRIVATE, "8.8.8.8", True),
        (PRIVATE, "127.0.0.1", False),
        (PRIVATE, "169.254.169.254", False),
        (LOOPBACK, "127.0.0.1", True),  # the test registries and their CDN
        (LOOPBACK, "10.0.0.1", True),
        (LOOPBACK, "169.254.169.254", False),
        (LOOPBACK, "0.0.0.0", False),
    ],
)
def test_configured_upstreams_redirect_within_their_own_class(
    own: AddressClass, target: str, allowed: bool
) -> None:
    guard = configured("registry.test", own)
    assert guard.permits("cdn.test", ipaddress.ip_address(target)) is allowed


@pytest.mark.parametrize(
    ("target", "allowed"),
    [("127.0.0.1", True), ("10.0.0.1", True), ("169.254.169.254", True), ("0.0.0.0", False)],
)
def test_redirect_to_internal_allows_internal_addresses_but_never_unusable_ones(
    target: str, allowed: bool
) -> None:
    guard = configured("registry.test", PUBLIC, internal=True)
    assert guard.permits("cdn.test", ipaddress.ip_address(target)) is allowed


def test_a_configured_upstream_itself_may_be_anywhere() -> None:
    guard = AddressGuard("up", "127.0.0.1")
    guard.check_url(URL("http://127.0.0.1:5000/v2/"))
    guard.check_url(URL("http://127.1:5000/v2/"))  # other spelling, other host: same class


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/x",
        "https://127.1/x",
        "https://0x7f.1:5000/x",
        "https://2130706433/x",
        "http://[::1]:80/x",
        "http://[::ffff:127.0.0.1]/x",
        "http://0xa9.0xfe.0xa9.0xfe/latest/meta-data/",
        "http://10.0.0.1/x",
        "http://0.0.0.0:5000/x",
        "ftp://registry.example/x",
    ],
)
def test_a_dynamic_upstream_refuses_every_internal_literal(url: str) -> None:
    guard = AddressGuard("evil.example", None)
    with pytest.raises(AddressRefused) as err:
        guard.check_url(URL(url))
    assert err.value.code == "DENIED" and err.value.status == 403


def test_a_dynamic_upstream_reaches_public_literals_and_names() -> None:
    guard = AddressGuard("registry.example", None)
    guard.check_url(URL("https://8.8.8.8/v2/"))
    guard.check_url(URL("https://registry.example/v2/"))  # a name: the resolver's to judge


async def test_the_resolver_keeps_only_allowed_addresses_and_refuses_when_none_are() -> None:
    hosts = HostsResolver(
        {"evil.test": "127.0.0.1", "meta.test": "169.254.169.254", "ok.test": "93.184.215.14"}
    )
    resolver = GuardedResolver(AddressGuard("dyn", None), hosts)
    assert [r["host"] for r in await resolver.resolve("ok.test", 443)] == ["93.184.215.14"]
    for name in ("evil.test", "meta.test"):
        with pytest.raises(AddressRefused):
            await resolver.resolve(name, 443)
    with pytest.raises(OSError):  # not found stays "not found"
        await resolver.resolve("nowhere.test", 443)
    await resolver.close()


async def test_a_refusal_is_a_registry_error_not_a_connection_error() -> None:
    """Not an OSError: aiohttp must not wrap it into a retried connection failure."""
    resolver = GuardedResolver(AddressGuard("dyn", None), HostsResolver({"x.test": "::1"}))
    with pytest.raises(RegistryError) as err:
        await resolver.resolve("x.test", 443)
    assert not isinstance(err.value, OSError)
    assert err.value.to_json()["errors"][0]["message"] == "the upstream's address is not allowed"


def test_describe_names_no_exception_class() -> None:
    import aiohttp
    from aiohttp.client_reqrep import ConnectionKey

    key = ConnectionKey("registry.test", 5000, False, True, None, None, None)
    refused = aiohttp.ClientConnectorError(key, ConnectionRefusedError(111, "refused"))
    assert describe(refused) == "connection refused (registry.test:5000)"
    assert describe(aiohttp.ClientConnectorDNSError(key, OSError(-2, "x"))) == (
        "name not found (registry.test)"
    )
    assert describe(TimeoutError()) == "timed out waiting for the answer"
