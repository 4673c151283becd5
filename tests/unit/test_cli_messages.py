"""What the commands say: plurals, ETAs, directories named, one-line errors, the right usage,
and the routing warnings an operator needs (containerd's ?ns=, an open listener)."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
import structlog
from structlog.testing import LogCapture
from structlog.typing import EventDict

from mirror.bundle import REF_NAME, UPSTREAM_ANNOTATION
from mirror.cli import main
from mirror.config import UpstreamConfig, load_config
from mirror.errors import RegistryError
from mirror.progress import Progress
from mirror.reference import Name
from mirror.startup import startup_warnings
from mirror.upstream import routing
from mirror.upstream.client import UpstreamClient
from mirror.upstream.routing import UNMIRRORED_WARNING_SECONDS, Router
from mirror.warm import WarmSummary

MiB = 1024 * 1024


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- warm, progress ---------------------------------------------------------------------------


def test_warm_summary_says_one_image_not_one_images() -> None:
    line = WarmSummary(images=1, fetched_blobs=1, fetched_bytes=2048, present_blobs=2).describe()
    assert line.startswith("warmed 1 image: fetched 1 blob (2.0 KiB), 2 already present")
    assert line.endswith("0 failures")
    two = WarmSummary(images=2, fetched_blobs=3, failures=["x"]).describe()
    assert two.startswith("warmed 2 images: fetched 3 blobs") and two.endswith("1 failure")


def test_no_eta_until_the_rate_means_something() -> None:
    clock = Clock()
    progress = Progress("warm", out=io.StringIO(), clock=clock)
    clock.now += 30  # manifests fetched before the blobs are known: not part of the rate
    progress.add(6 * MiB)
    clock.now += 0.5
    progress.partial_bytes = 4096  # a slow first half second would have said "ETA 1678s"
    assert "ETA" not in progress.status()
    clock.now += 2.0
    assert "ETA" not in progress.status()  # 2.5 s, but far less than 5 % done
    progress.partial_bytes = MiB
    assert progress.status().endswith("ETA 12s")  # 5 MiB left at 1 MiB / 2.5 s
    progress.add(599 * MiB)
    assert "ETA" not in progress.status()  # 1 MiB of 605 MiB: too little to tell
    clock.now += 97.5
    progress.partial_bytes = 50 * MiB
    assert progress.status().endswith("ETA 18m 30s")  # 555 MiB left at 0.5 MiB/s
    progress.partial_bytes = 0
    progress.finished(605 * MiB, "all")
    assert "ETA" not in progress.status()


# -- cache dir, ls, pin ---------------------------------------------------------------------


@pytest.mark.parametrize("command", ["ls", "gc", "verify", "check-config", "import"])
def test_cache_dir_that_is_a_file_is_one_clear_line(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    afile = tmp_path / "cache"
    afile.write_text("not a directory")
    extra = [str(tmp_path)] if command == "import" else []
    assert main([command, "--cache-dir", str(afile), *extra]) == 2
    err = capsys.readouterr().err
    assert err == f"registry-mirror: config error: cache.dir: {afile} is a file, not a directory\n"
    inner = afile / "sub"
    assert main([command, "--cache-dir", str(inner), *extra]) == 2
    err = capsys.readouterr().err
    assert f"{inner}: {afile} is a file, not a directory" in err and err.count("\n") == 1


def test_ls_names_the_directory_it_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere"
    assert main(["ls", "--cache-dir", str(missing)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and f"no cache at {missing}" in err
    assert not missing.exists()  # ls does not make a cache to list
    cache = tmp_path / "cache"
    cache.mkdir()
    assert main(["ls", "--cache-dir", str(cache)]) == 0
    assert capsys.readouterr().out == f"no images cached in {cache}\n"


def test_pin_of_an_image_not_cached_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["pin", "--cache-dir", str(tmp_path), "alpine:3.20"]) == 0
    out, err = capsys.readouterr()
    assert out == "alpine:3.20\n"  # pinned all the same: it will stay once pulled
    assert "alpine:3.20 is not in the cache" in err and err.count("\n") == 1
    assert main(["unpin", "--cache-dir", str(tmp_path), "alpine:3.20"]) == 0
    assert capsys.readouterr().err == ""


# -- import twice ---------------------------------------------------------------------------


def _layout(root: Path) -> None:
    """A minimal OCI layout: one image (config and one layer) tagged library/demo:1."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict[str, object]:
        hexdigest = hashlib.sha256(data).hexdigest()
        (blobs / hexdigest).write_bytes(data)
        return {"digest": f"sha256:{hexdigest}", "size": len(data)}

    config = {"mediaType": "application/vnd.oci.image.config.v1+json", **put(b"{}")}
    layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar", **put(b"layer" * 1000)}
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config,
        "layers": [layer],
    }
    entry = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        **put(json.dumps(manifest).encode()),
        "annotations": {REF_NAME: "library/demo:1", UPSTREAM_ANNOTATION: "default"},
    }
    (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))


def test_importing_a_bundle_again_imports_nothing_new(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _layout(tmp_path / "bundle")
    args = ["import", "--cache-dir", str(tmp_path / "cache"), str(tmp_path / "bundle")]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "imported 3 blobs" in first and ": 3 new (" in first and "0 already cached" in first
    assert main(args) == 0
    again = capsys.readouterr().out
    assert ": 0 new (0 B), 3 already cached; library/demo:1" in again


# -- argparse -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "usage"),
    [
        (["serve", "--listn", "127.0.0.1:1"], "usage: registry-mirror serve"),
        (["ls", "--cache-dri", "/tmp"], "usage: registry-mirror ls"),
        (["check-config", "--verbose"], "usage: registry-mirror check-config"),
    ],
)
def test_unknown_option_after_a_command_shows_that_commands_usage(
    argv: list[str], usage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage)
    assert f"error: unrecognized arguments: {argv[1]}" in err


# -- routing warnings -----------------------------------------------------------------------


def _router(clock: Clock, url: str = "http://10.0.0.5:5000") -> Router:
    return Router(UpstreamClient("default", UpstreamConfig(url=url)), clock=clock)


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> list[EventDict]:
    """The routing module's log events (its own logger: structlog's global configuration
    and cached loggers depend on which tests ran before)."""
    capture = LogCapture()
    logger = structlog.wrap_logger(
        None, processors=[capture], wrapper_class=structlog.make_filtering_bound_logger(0)
    )
    monkeypatch.setattr(routing, "log", logger)
    return capture.entries


def test_ns_for_a_registry_no_upstream_stands_for_warns_once_and_names_the_fix(
    logs: list[EventDict],
) -> None:
    clock = Clock()
    router = _router(clock)
    for _ in range(3):
        with pytest.raises(RegistryError) as refused:
            router.route(Name("library/alpine"), "docker.io")
        assert refused.value.code == "NAME_UNKNOWN"
    assert len(logs) == 1
    assert logs[0]["log_level"] == "warning" and logs[0]["registry"] == "docker.io"
    message = str(logs[0]["message"])
    assert "requests for docker.io arrive (containerd's ?ns=)" in message
    assert "add docker.io to upstream.names (or upstreams.<name>.names)" in message


def test_ns_warnings_cannot_flood_the_log(logs: list[EventDict]) -> None:
    clock = Clock()
    router = _router(clock)
    for i in range(1000):
        with pytest.raises(RegistryError):
            router.route(Name("x"), f"r{i}.example")
    assert len(logs) == 1
    clock.now += UNMIRRORED_WARNING_SECONDS
    with pytest.raises(RegistryError):
        router.route(Name("x"), "ghcr.io")
    with pytest.raises(RegistryError):
        router.route(Name("x"), "quay.io")  # within the interval: said later
    assert [e["registry"] for e in logs] == ["r0.example", "ghcr.io"]


def test_ns_for_a_mirrored_registry_says_nothing(logs: list[EventDict]) -> None:
    router = _router(Clock(), "https://registry-1.docker.io")
    assert router.route(Name("alpine"), "docker.io").upstream is router.default
    assert logs == []


def test_startup_warnings() -> None:
    def config(**overrides: object) -> list[str]:
        return startup_warnings(load_config(None, env={}, overrides=overrides))

    open_lab = config(listen="0.0.0.0:5000", **{"upstream.url": "http://10.0.0.5:5000"})
    assert len(open_lab) == 2
    assert "listening on 0.0.0.0:5000 with no client authentication" in open_lab[0]
    assert "set auth.htpasswd or tls.client_ca" in open_lab[0]
    assert "no upstream stands for docker.io" in open_lab[1]
    assert "add docker.io to upstream.names" in open_lab[1]
    assert config(listen="127.0.0.1:5000") == []  # Docker Hub, loopback only
    assert config(listen="[::]:5000", **{"upstream.url": "https://registry-1.docker.io"}) == [
        open_lab[0].replace("0.0.0.0:5000", "[::]:5000")
    ]
    named = {"upstream.url": "http://10.0.0.5:5000", "upstream.names": ["docker.io"]}
    assert config(listen="10.1.2.3:5000", **named) == []
