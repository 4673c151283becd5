"""Routing: ?ns=, path prefixes and aliases pick the upstream; unknown registries refused."""

from __future__ import annotations

import pytest

from mirror.config import UpstreamConfig, load_config
from mirror.errors import RegistryError
from mirror.reference import Name
from mirror.upstream.client import UpstreamClient
from mirror.upstream.routing import Router, build_router


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


def test_router_with_only_a_default() -> None:
    default = UpstreamClient("default", UpstreamConfig(url="http://127.0.0.1:1"))
    r = Router(default)
    assert r.route(Name("a/b"), "127.0.0.1:1").upstream is default
    with pytest.raises(RegistryError):
        r.route(Name("a/b"), "docker.io")
