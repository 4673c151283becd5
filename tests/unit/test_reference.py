from __future__ import annotations

import pytest

from mirror.errors import RegistryError
from mirror.reference import docker_hub_name, parse_digest, parse_name, parse_reference, parse_tag


@pytest.mark.parametrize(
    "name", ["alpine", "library/alpine", "org/team/app", "a.b_c__d-e--f/x9", "a" * 255]
)
def test_valid_names(name: str) -> None:
    assert parse_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "Alpine", "../etc", "a/../b", "a//b", "/a", "a/", "a..b", "-a", "a_", "a%2fb", "a" * 256],
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(RegistryError) as err:
        parse_name(name)
    assert err.value.code == "NAME_INVALID" and err.value.status == 400


def test_tags() -> None:
    assert parse_tag("v1.2.3-rc_1") == "v1.2.3-rc_1"
    assert parse_tag("_x") == "_x"
    for bad in ["", ".x", "-x", "a" * 129, "a/b", "a:b"]:
        with pytest.raises(RegistryError) as err:
            parse_tag(bad)
        assert err.value.code == "TAG_INVALID"


def test_digests_are_sha256_only() -> None:
    good = "sha256:" + "0" * 64
    assert parse_digest(good) == good
    for bad in ["sha256:" + "0" * 63, "sha256:" + "A" * 64, "sha512:" + "0" * 128, "md5:x", "x"]:
        with pytest.raises(RegistryError) as err:
            parse_digest(bad)
        assert err.value.code == "DIGEST_INVALID"


def test_reference_is_digest_when_it_has_a_colon() -> None:
    assert parse_reference("latest") == "latest"
    with pytest.raises(RegistryError) as err:
        parse_reference("sha256:nothex")
    assert err.value.code == "DIGEST_INVALID"


def test_docker_hub_library_rule() -> None:
    assert docker_hub_name(parse_name("alpine")) == "library/alpine"
    assert docker_hub_name(parse_name("bitnami/redis")) == "bitnami/redis"
