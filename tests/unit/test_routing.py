"""Routing: ?ns=, path prefixes and aliases pick the upstream; unknown registries refused."""

from __future__ import annotations

import asyncio

import pytest

from mirror.config import UpstreamConfig, load_config
from mirror.errors import RegistryError
from mirror.reference import Name
from mirror.upstream.client import UpstreamClient
from mirror.upstream.routing import (
    DYNAMIC_IDLE_SECONDS,
    MAX_DYNAMIC_UPSTREAMS,
    Router,
    build_router,
)


def router(**kwargs: object) -> Router:
    config = load_config(
        None,
        env={},
        overrides={
            "upstream.url": "https://registry-1.docker.io",
            "upstreams": {
                "ghcr": {"url": "https://ghcr.io", "aliases": ["gh"]},
                "lab": {"url": "http://10.0.0.5:5000", "names": ["lab.example"]},
            },
            **kwargs,
        },
    )
    return build_router(config)


@pytest.mark.parametrize(
    ("name", "ns", "upstream", "repository"),
    [
        ("library/alpine", None, "default", "library/alpine"),
        ("alpine", None, "default", "library/alpine"),
        ("alpine", "docker.io", "default", "library/alpine"),
        ("docker.io/library/alpine", None, "default", "library/alpine"),
        ("owner/app", "ghcr.io", "ghcr", "owner/app"),
        ("ghcr.io/owner/app", None, "ghcr", "owner/app"),
        ("gh/owner/app", None, "ghcr", "owner/app"),
        ("team/app", "lab.example", "lab", "team/app"),
        ("lab.example/team/app", None, "lab", "team/app"),
    ],
)
def test_routes(name: str, ns: str | None, upstream: str, repository: str) -> None:
    target = router().route(Name(name), ns)
    assert (target.upstream.name, target.repository) == (upstream, repository)


@pytest.mark.parametrize(
    ("name", "ns"),
    [
        ("owner/app", "quay.io"),
        ("owner/app", "10.0.0.5:5000"),  # only the names the upstream stands for
        ("quay.io/owner/app", None),
        ("localhost/x", None),
        ("owner/app", ""),
    ],
)
def test_unknown_registries_are_refused(name: str, ns: str | None) -> None:
    with pytest.raises(RegistryError) as err:
        router().route(Name(name), ns)
    assert err.value.code == "NAME_UNKNOWN"


async def test_allow_any_upstream_makes_one_client_per_host_but_never_for_ip_literals() -> None:
    r = router(allow_any_upstream=True)
    try:
        await _dynamic_routes(r)
    finally:
        await r.close()


async def _dynamic_routes(r: Router) -> None:
    first = r.route(Name("owner/app"), "quay.io")
    assert first.upstream.base_url == "https://quay.io" and first.repository == "owner/app"
    assert r.route(Name("quay.io/other/app")).upstream is first.upstream
    hub = r.route(Name("alpine"), "index.docker.io")
    assert hub.upstream.name == "default"
    for host in ("127.0.0.1", "169.254.169.254:80", "[::1]", "localhost", "a_b.example"):
        with pytest.raises(RegistryError):
            r.route(Name("x/y"), host)
    assert first.upstream.dynamic and first.upstream.metric_label == "dynamic"
    assert not r.default.dynamic and r.default.metric_label == "default"


@pytest.mark.parametrize(
    "host",
    [
        "127.1",
        "127.1:5000",
        "0x7f.1",
        "0x7f.1:5000",
        "0x7f.0.0.1",
        "0xa9.0xfe.0xa9.0xfe",
        "2130706433",
        "017700000001",
        "10.0.0.1",
        "1.2.3.4.5",  # read as a number by URL parsers: never a DNS name
        "registry.0x1f",
        "registry.example:0",
        "registry.example:99999",
    ],
)
def test_dynamic_hosts_are_names_never_addresses_in_any_spelling(host: str) -> None:
    with pytest.raises(RegistryError) as err:
        router(allow_any_upstream=True).route(Name("x/y"), host)
    assert err.value.code == "NAME_UNKNOWN"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def dynamic_router(clock: Clock) -> Router:
    def make(name: str, config: UpstreamConfig) -> UpstreamClient:
        return UpstreamClient(name, config, dynamic=True, clock=clock)

    default = UpstreamClient("default", UpstreamConfig(), clock=clock)
    return Router(default, allow_any=True, make_client=make, clock=clock)


async def test_idle_dynamic_upstreams_are_closed_and_forgotten() -> None:
    clock = Clock()
    r = dynamic_router(clock)
    try:
        old = r.route(Name("a/b"), "old.example").upstream
        clock.now += DYNAMIC_IDLE_SECONDS - 1
        kept = r.route(Name("a/b"), "kept.example").upstream
        clock.now += 2
        r.route(Name("a/b"), "new.example")
        assert sorted(r.upstreams) == ["default", "kept.example", "new.example"]
        await asyncio.sleep(0)  # the release closes the session in a task
        assert old.closed and not kept.closed
    finally:
        await r.close()


async def test_a_full_table_lets_go_of_the_least_recently_used_idle_upstream() -> None:
    clock = Clock()
    r = dynamic_router(clock)
    try:
        clients = []
        for i in range(MAX_DYNAMIC_UPSTREAMS):
            clients.append(r.route(Name("a/b"), f"r{i}.example").upstream)
            clock.now += 1
        r.route(Name("a/b"), "r0.example")  # used again: now the most recent
        r.route(Name("a/b"), "one-more.example")
        assert "r1.example" not in r.upstreams and "r0.example" in r.upstreams
        assert len(r.upstreams) == MAX_DYNAMIC_UPSTREAMS + 1  # and the default
    finally:
        await r.close()


async def test_a_full_table_of_busy_upstreams_refuses_a_new_registry() -> None:
    clock = Clock()
    r = dynamic_router(clock)
    try:
        for i in range(MAX_DYNAMIC_UPSTREAMS):
            r.route(Name("a/b"), f"r{i}.example").upstream.in_flight = 1  # a request under way
        with pytest.raises(RegistryError) as err:
            r.route(Name("a/b"), "one-more.example")
        assert err.value.code == "TOOMANYREQUESTS"
        clock.now += DYNAMIC_IDLE_SECONDS * 2  # busy ones are never idle, however long
        with pytest.raises(RegistryError):
            r.route(Name("a/b"), "one-more.example")
        for upstream in r.upstreams.values():
            upstream.in_flight = 0
    finally:
        await r.close()


async def test_a_released_upstream_still_serves_a_request_routed_to_it_before() -> None:
    clock = Clock()
    r = dynamic_router(clock)
    try:
        held = r.route(Name("a/b"), "held.example").upstream
        clock.now += DYNAMIC_IDLE_SECONDS + 1
        r.route(Name("a/b"), "other.example")
        await asyncio.sleep(0)
        assert "held.example" not in r.upstreams
        states = [held.closed]
        held._enter()  # the late request: the session reopens for it...
        states.append(held.closed)
        await held._leave()  # ...and closes again when it ends
        states.append(held.closed)
        assert states == [True, False, True]
    finally:
        await r.close()


def test_router_with_only_a_default() -> None:
    default = UpstreamClient("default", UpstreamConfig(url="http://127.0.0.1:1"))
    r = Router(default)
    assert r.route(Name("a/b"), "127.0.0.1:1").upstream is default
    with pytest.raises(RegistryError):
        r.route(Name("a/b"), "docker.io")
