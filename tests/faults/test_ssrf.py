"""SSRF: a registry (any registry, with `allow_any_upstream`) must not be able to point the
mirror at internal addresses and read the answer back; refusals come before any connection.

Nothing here leaves loopback: `loopback_only` makes every name lookup numeric-only and every
connect to a non-loopback address fail (and records it, so that a test can show none was
tried). Test registries get names through `HostsResolver`, a seam of the app (`network`), and
the seam's classifier decides which of those names counts as public.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import re
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from mirror.config import Config
from mirror.upstream.guard import AddressClass, IPAddress, UpstreamNetwork, address_class
from tests.fixtures.fake_upstream import FakeUpstream, Fault, HostsResolver
from tests.fixtures.mirror_server import (
    free_port,
    mirror_config,
    running_app,
    running_mirror,
    sha256_digest,
)

CLASS_NAME_RE = re.compile(r"[A-Z][A-Za-z]*(?:Error|Exception)\b")
SECRET = "internal-secret-0123456789"


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, int]]]:
    """No DNS and no packet beyond loopback, whatever the code under test does; yields every
    address a socket tried to connect to."""
    attempts: list[tuple[str, int]] = []
    real_connect = socket.socket.connect
    real_getaddrinfo = socket.getaddrinfo

    def connect(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append((address[0], address[1]))
            if not ipaddress.ip_address(address[0].split("%")[0]).is_loopback:
                raise OSError(errno.ENETUNREACH, "test: loopback only")
        real_connect(sock, address)

    def getaddrinfo(
        host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
    ) -> Any:
        if host in (None, "localhost", b"localhost"):
            return real_getaddrinfo(host, port, family, type, proto, flags)
        try:
            return real_getaddrinfo(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)
        except socket.gaierror:
            raise socket.gaierror(socket.EAI_NONAME, "test: no DNS") from None

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield attempts


class Internal:
    """An internal service (the thing an SSRF reaches for): counts requests and connections."""

    def __init__(self) -> None:
        self.requests = 0
        self.connections = 0
        self.server: TestServer | None = None
        self._raw: asyncio.Server | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._answer)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()

    async def _answer(self, request: web.Request) -> web.Response:
        self.requests += 1
        return web.Response(text=SECRET * 4096)  # several chunks of secrets

    @property
    def port(self) -> int:
        assert self.server is not None and self.server.port is not None
        return self.server.port

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()


@pytest.fixture
async def internal() -> AsyncIterator[Internal]:
    service = Internal()
    await service.start()
    try:
        yield service
    finally:
        await service.close()


@pytest.fixture
async def listener() -> AsyncIterator[tuple[int, list[int]]]:
    """A bare TCP port on 127.0.0.1 that counts connections (TLS or not)."""
    accepted: list[int] = []

    def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], accepted
    finally:
        server.close()
        await server.wait_closed()


def named_network(
    hosts: dict[str, str],
    public: frozenset[str] = frozenset(),
    private: frozenset[str] = frozenset(),
) -> UpstreamNetwork:
    """How the mirror reaches upstreams here: test names (`hosts`), some of which count as
    public or private though they are on 127.0.0.1, and dynamic registries over plain HTTP."""

    def classify(host: str, ip: IPAddress) -> AddressClass:
        if host in public:
            return AddressClass.PUBLIC
        if host in private:
            return AddressClass.PRIVATE
        return address_class(ip)

    return UpstreamNetwork(HostsResolver(hosts), classify, dynamic_scheme="http")


@asynccontextmanager
async def serving(config: Config, network: UpstreamNetwork) -> AsyncIterator[str]:
    async with running_app(config, network=network) as (base, _app):
        yield base


async def fetch(base: str, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(base + path) as resp:
        return resp.status, await resp.text()


def assert_oci_error(status: int, body: str, code: str | None = None) -> None:
    assert 400 <= status < 600, (status, body[:300])
    assert body.startswith('{"errors"'), body[:300]
    if code is not None:
        assert f'"code": "{code}"' in body or f'"code":"{code}"' in body, body[:300]
    assert not CLASS_NAME_RE.search(body), body[:300]
    assert SECRET not in body


def port_of(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


# -- IP addresses spelled as names ---------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/v2/x/y/manifests/latest?ns=0x7f.1:{port}",
        "/v2/x/y/manifests/latest?ns=127.1:{port}",
        "/v2/x/y/manifests/latest?ns=127.1",
        "/v2/x/y/manifests/latest?ns=2130706433:{port}",
        "/v2/x/y/manifests/latest?ns=0xa9.0xfe.0xa9.0xfe",
        "/v2/0x7f.1/x/y/manifests/latest",  # a path prefix names a registry too
        "/v2/127.1/x/y/manifests/latest",
        "/v2/0xa9.0xfe.0xa9.0xfe/x/y/manifests/latest",
    ],
)
async def test_addresses_in_any_spelling_are_refused_before_any_connection(
    fake: FakeUpstream,
    tmp_path: Path,
    listener: tuple[int, list[int]],
    loopback_only: list[tuple[str, int]],
    path: str,
) -> None:
    port, accepted = listener
    config = mirror_config(tmp_path, fake.url, retries=0, settings={"allow_any_upstream": True})
    async with running_mirror(config) as base:
        status, body = await fetch(base, path.format(port=port))
        ours = (port_of(base), port_of(fake.url))
    assert status < 500, (status, body[:300])
    assert_oci_error(status, body, "NAME_UNKNOWN")
    assert accepted == []
    assert [a for a in loopback_only if a[1] not in ours] == []  # no connection tried at all


# -- where a dynamic registry may send the mirror --------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.1:{port}",
        "http://127.1:{port}",
        "http://0x7f.1:{port}",
        "http://2130706433:{port}",
        "http://[::ffff:127.0.0.1]:{port}",
        "http://intranet.test:{port}",  # a name that resolves to 127.0.0.1
        "http://localhost:{port}",
    ],
)
async def test_a_dynamic_registry_cannot_redirect_the_mirror_inside(
    fake: FakeUpstream,
    tmp_path: Path,
    internal: Internal,
    target: str,
) -> None:
    fake.require_token = False
    fake.redirect_base = target.format(port=internal.port)
    fake.add_image("lib/app", "v1", [b"layer"])
    digest = fake.add_blob(b"blob bytes " * 1000)
    fake.faults[digest] = Fault(redirect=True)
    hosts = {"evil.test": "127.0.0.1", "intranet.test": "127.0.0.1", "localhost": "127.0.0.1"}
    network = named_network(hosts, public=frozenset({"evil.test"}))
    ns = f"evil.test:{fake.server.port}"  # type: ignore[union-attr]  # the fixture has started it
    config = mirror_config(tmp_path, fake.url, retries=0, settings={"allow_any_upstream": True})
    async with serving(config, network) as base:
        status, _ = await fetch(base, f"/v2/lib/app/manifests/v1?ns={ns}")
        assert status == 200  # the dynamic registry itself is reachable
        status, body = await fetch(base, f"/v2/lib/app/blobs/{digest}?ns={ns}")
        assert_oci_error(status, body, "DENIED")
        assert status == 403
        _, metrics = await fetch(base, "/metrics")
    assert internal.requests == 0
    assert SECRET not in metrics and "evil.test" not in metrics
    assert 'upstream="dynamic"' in metrics


async def test_a_dynamic_registry_cannot_send_the_token_fetch_inside(
    fake: FakeUpstream, tmp_path: Path, internal: Internal
) -> None:
    fake.token_realm = f"http://127.0.0.1:{internal.port}/token"
    fake.add_image("lib/app", "v1", [b"layer"])
    network = named_network({"evil.test": "127.0.0.1"}, public=frozenset({"evil.test"}))
    ns = f"evil.test:{fake.server.port}"  # type: ignore[union-attr]  # the fixture has started it
    config = mirror_config(tmp_path, fake.url, retries=0, settings={"allow_any_upstream": True})
    async with serving(config, network) as base:
        status, body = await fetch(base, f"/v2/lib/app/manifests/v1?ns={ns}")
    assert_oci_error(status, body, "DENIED")
    assert internal.requests == 0


async def test_a_dynamic_registry_that_is_itself_internal_is_refused(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    fake.add_image("lib/app", "v1", [b"layer"])
    network = named_network({"intranet.test": "127.0.0.1"})
    ns = f"intranet.test:{fake.server.port}"  # type: ignore[union-attr]  # the fixture has started it
    config = mirror_config(tmp_path, fake.url, retries=0, settings={"allow_any_upstream": True})
    async with serving(config, network) as base:
        status, body = await fetch(base, f"/v2/lib/app/manifests/v1?ns={ns}")
    assert_oci_error(status, body, "DENIED")
    assert fake.count("GET", "/manifests/") == 0


# -- where a configured registry may send the mirror -----------------------------------------


@pytest.mark.parametrize(
    ("own", "internal_ok", "served"),
    [
        ("public", False, False),  # Docker Hub may not redirect to 127.0.0.1
        ("private", False, False),  # a private network's registry: not to loopback either
        ("public", True, True),  # unless its config says so
    ],
)
async def test_a_configured_registry_redirects_only_within_its_class(
    fake: FakeUpstream,
    tmp_path: Path,
    own: str,
    internal_ok: bool,
    served: bool,
) -> None:
    data = b"blob bytes " * 1000
    digest = fake.add_blob(data)
    fake.faults[digest] = Fault(redirect=True)  # to its CDN, at http://127.0.0.1:<port>
    network = named_network(
        {"registry.test": "127.0.0.1"},
        public=frozenset({"registry.test"} if own == "public" else ()),
        private=frozenset({"registry.test"} if own == "private" else ()),
    )
    url = f"http://registry.test:{fake.server.port}"  # type: ignore[union-attr]  # the fixture has started it
    config = mirror_config(tmp_path, url, retries=0, redirect_to_internal=internal_ok)
    async with serving(config, network) as base:
        status, body = await fetch(base, f"/v2/lib/app/blobs/{digest}")
    if served:
        assert status == 200 and sha256_digest(body.encode("latin-1")) == digest
        assert len(fake.cdn_requests) == 1
    else:
        assert_oci_error(status, body, "DENIED")
        assert fake.cdn_requests == []


async def test_a_registry_on_this_host_still_redirects_to_its_cdn(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """The test registries live on 127.0.0.1: loopback trusts loopback."""
    digest = fake.add_blob(b"cdn bytes" * 999)
    fake.faults[digest] = Fault(redirect=True)
    async with running_mirror(mirror_config(tmp_path, fake.url, retries=0)) as base:
        status, body = await fetch(base, f"/v2/lib/app/blobs/{digest}")
    assert status == 200 and sha256_digest(body.encode()) == digest


# -- errors in words ------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_connection_failures_are_told_in_words_not_class_names(
    fake: FakeUpstream, tmp_path: Path, scheme: str
) -> None:
    """Refused port vs. TLS failure used to show as two class names (a port-scan oracle)."""
    target = (
        f"{scheme}://127.0.0.1:{free_port()}"
        if scheme == "http"
        else (
            fake.url.replace("http://", "https://")  # plain HTTP spoken there: TLS fails
        )
    )
    async with running_mirror(mirror_config(tmp_path, target, retries=0)) as base:
        status, body = await fetch(base, "/v2/lib/app/manifests/v1")
    assert status == 502
    assert_oci_error(status, body)
    assert ("connection refused" if scheme == "http" else "TLS") in body


async def test_a_dynamic_registry_that_resolves_nowhere_says_nothing_of_why(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    config = mirror_config(tmp_path, fake.url, retries=0, settings={"allow_any_upstream": True})
    async with running_mirror(config) as base:
        status, body = await fetch(base, "/v2/lib/app/manifests/v1?ns=nowhere.test")
    assert status == 502
    assert_oci_error(status, body)
    assert "reason" not in body


# -- dynamic upstreams are bounded -----------------------------------------------------------


async def test_many_dynamic_registries_neither_fill_the_table_nor_the_metrics(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """100 registries that resolve nowhere (no DNS here): each answered, none refused with
    429, and /metrics names none of them."""
    config = mirror_config(tmp_path, fake.url, retries=0, settings={"allow_any_upstream": True})
    async with running_mirror(config) as base, aiohttp.ClientSession() as s:
        statuses = []
        for i in range(100):
            async with s.get(f"{base}/v2/lib/app/manifests/v1?ns=r{i}.nowhere.test") as resp:
                statuses.append(resp.status)
        async with s.get(f"{base}/metrics") as resp:
            metrics = await resp.text()
    assert 429 not in statuses and set(statuses) == {502}
    assert "nowhere.test" not in metrics
    assert 'upstream="dynamic"' in metrics
