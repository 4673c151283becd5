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
