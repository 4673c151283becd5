from __future__ import annotations

from mirror.upstream.auth import parse_www_authenticate


def test_docker_hub_bearer_challenge() -> None:
    c = parse_www_authenticate(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/alpine:pull"'
    )
    assert c is not None and c.scheme == "bearer"
    assert c.realm == "https://auth.docker.io/token"
    assert c.service == "registry.docker.io"
    assert c.params["scope"] == "repository:library/alpine:pull"


def test_basic_and_junk() -> None:
    basic = parse_www_authenticate('Basic realm="Registry Realm"')
    assert basic is not None and basic.scheme == "basic"
    assert parse_www_authenticate(None) is None
    assert parse_www_authenticate("Negotiate abc") is None
    # A realm that is not an http(s) URL would make us send credentials anywhere: refuse it.
    assert parse_www_authenticate('Bearer realm="file:///etc/passwd"') is None


async def test_a_token_is_fetched_once_even_for_requests_arriving_as_its_fetch_ends() -> None:
    """The token is cached before the fetch's waiters resume: a request that runs in between
    (the flight already over, the waiters not yet back) must find it, not fetch again."""
    import asyncio

    from mirror.upstream.auth import Authenticator, Challenge, Token

    auth = Authenticator(None, None, None)  # type: ignore[arg-type]
    auth.learn(Challenge("bearer", {"realm": "http://127.0.0.1:1/token", "service": "s"}))
    fetches = 0

    async def fetch(challenge: Challenge, scope: str) -> Token:
        nonlocal fetches
        fetches += 1
        await asyncio.sleep(0.01)
        return Token("t", float("inf"))

    auth._fetch = fetch  # type: ignore[method-assign]

    scope = "repository:a/b:pull"

    async def arrives_as_the_fetch_ends() -> None:
        # Polled once per turn of the event loop on purpose: the window is one turn wide.
        while not (fetches and not len(auth._flight)):  # noqa: ASYNC110
            await asyncio.sleep(0)
        assert await auth.header(scope) == "Bearer t"

    late = asyncio.ensure_future(arrives_as_the_fetch_ends())
    assert await asyncio.gather(*(auth.header(scope) for _ in range(5))) == ["Bearer t"] * 5
    await late
    assert fetches == 1
