"""The OCI distribution-spec conformance suite against a hosted repository, with every API and
kind of data it knows switched on: every test passes and none is skipped."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.fixtures import conformance
from tests.fixtures.mirror_server import mirror_config, running_mirror

HOSTED = {
    "hosted.repositories": ["conformance/*"],
    "hosted.sparse": True,  # the suite's "sparse" data: manifests naming layers not pushed
    "access.rules": [
        {
            "who": ["anonymous"],
            "repositories": ["hosted/conformance/*"],
            "actions": ["pull", "push", "delete"],
        }
    ],
}


@pytest.mark.timeout(1200)  # the suite's first build takes about a minute
async def test_conformance_suite_passes_everything(tmp_path: Path) -> None:
    await asyncio.to_thread(conformance.build)
    config = mirror_config(tmp_path / "cache", "http://127.0.0.1:9", settings=HOSTED)
    async with running_mirror(config) as base:
        registry = base.removeprefix("http://")
        result = await asyncio.to_thread(
            conformance.run, registry, tmp_path / "results", conformance.EVERYTHING
        )
    report = "\n".join(result.failed) + "\n" + result.summary
    assert result.failures == 0, report
    assert result.skipped == 0, report  # nothing EVERYTHING enables may be skipped
    assert result.passed == result.tests > 800, report
    print(result.summary)
