"""Integration fixtures: a real `registry-mirror serve` process in front of the real upstream."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.mirror_server import MirrorProcess
from tests.fixtures.real_upstream import Upstream


@pytest.fixture
def mirror(upstream: Upstream, tmp_path: Path) -> Iterator[MirrorProcess]:
    """A fresh mirror (empty cache) of the test upstream, anonymous; the upstream stands for
    Docker Hub, as the container engines' `?ns=docker.io` says."""
    proc = MirrorProcess(
        tmp_path / "cache",
        upstream.url,
        log_path=tmp_path / "mirror.log",
        env={"REGISTRY_MIRROR_UPSTREAM_NAMES": "docker.io"},
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
