"""`registry-mirror check-config --probe` against the real token-auth upstream and a closed port:
one line per check, ok or FAILED with the reason in words, exit 0 only when everything works."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from mirror.cli import main
from tests.fixtures.real_upstream import Upstream
from tests.fixtures.seaweed import SeaweedS3


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port nothing listens on (held bound, so nothing else takes it meanwhile)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def probe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], settings: dict[str, object]
) -> tuple[int, list[str]]:
    conf = tmp_path / "mirror.yaml"
    conf.write_text(yaml.safe_dump({"cache": {"dir": str(tmp_path / "cache")}, **settings}))
    code = main(["check-config", "--probe", "--config", str(conf)])
    return code, capsys.readouterr().out.splitlines()


def test_probe_all_working(
    upstream: Upstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "cache").mkdir()
    user, password = upstream.reader
    code, lines = probe(
        tmp_path,
        capsys,
        {"upstream": {"url": upstream.url, "username": user, "password": password}},
    )
    realm = upstream.tokens.realm
    assert lines[:2] == [
        f"upstream default ({upstream.url}): ok, /v2/ answered 401 asking for a token",
        f"upstream default login: ok, logged in as reader (a token from {realm}, accepted by /v2/)",
    ]
    assert lines[2].startswith(f"cache dir {tmp_path / 'cache'}: ok, writable, ")
    assert " free of " in lines[2]
    assert lines[3:] == ["all 3 checks passed"]
    assert code == 0
    assert list((tmp_path / "cache").iterdir()) == []  # the probe file is gone


def test_probe_anonymous_login(
    upstream: Upstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, lines = probe(tmp_path, capsys, {"upstream": {"url": upstream.url}})
    assert lines[1].startswith("upstream default login: ok, logged in anonymously (a token")
    assert lines[2] == (
        f"cache dir {tmp_path / 'cache'}: ok, does not exist yet (serve creates it); "
        + lines[2].split("; ", 1)[1]
    )
    assert not (tmp_path / "cache").exists()  # the probe changes nothing
    assert code == 0


def test_probe_failures_say_what_failed(
    upstream: Upstream, tmp_path: Path, capsys: pytest.CaptureFixture[str], closed_port: int
) -> None:
    closed = f"http://127.0.0.1:{closed_port}"
    (tmp_path / "cache").write_text("a file where the cache should be")
    code, lines = probe(
        tmp_path,
        capsys,
        {
            "upstream": {"url": upstream.url, "username": "reader", "password": "wrong"},
            "upstreams": {"vendor": {"url": closed}},
        },
    )
    assert lines == [
        f"upstream default ({upstream.url}): ok, /v2/ answered 401 asking for a token",
        "upstream default login: FAILED, token service refused the configured credentials"
        " (HTTP 401), logging in as reader",
        f"upstream vendor ({closed}): FAILED, connection refused (127.0.0.1:{closed_port})",
        f"cache dir {tmp_path / 'cache'}: FAILED, is a file, not a directory",
        "3 of 4 FAILED",
    ]
    assert code == 1


def test_plain_check_config_does_not_probe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], closed_port: int
) -> None:
    conf = tmp_path / "mirror.yaml"
    settings = {
        "cache": {"dir": str(tmp_path)},
        "upstream": {"url": f"http://127.0.0.1:{closed_port}"},
    }
    conf.write_text(yaml.safe_dump(settings))
    assert main(["check-config", "--config", str(conf)]) == 0
    assert capsys.readouterr().out == "configuration OK\n"


def test_probe_a_cluster_node(
    upstream: Upstream,
    seaweed: SeaweedS3,
    redis_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    s3 = seaweed.s3_config("probe/")
    store = {"endpoint": s3.endpoint, "access_key": s3.access_key, "secret_key": s3.secret_key}
    settings: dict[str, object] = {
        "upstream": {"url": upstream.url},
        "metadata": {"kind": "redis", "redis_url": redis_url},
        "cluster": {"secret": "probe-secret"},
        "storage": {"kind": "s3", "s3": {**store, "bucket": s3.bucket}},
    }
    code, lines = probe(tmp_path, capsys, settings)
    assert lines[-3:] == [
        f"redis {redis_url}: ok, PING answered",
        f"s3 bucket {s3.bucket} at {s3.endpoint}: ok, HeadBucket answered",
        "all 5 checks passed",
    ]
    assert code == 0
    settings["storage"] = {"kind": "s3", "s3": {**store, "bucket": "no-such-bucket"}}
    code, lines = probe(tmp_path, capsys, settings)
    assert lines[-2:] == [
        f"s3 bucket no-such-bucket at {s3.endpoint}: FAILED,"
        " no such bucket (serve would create it)",
        "1 of 5 FAILED",
    ]
    assert code == 1
