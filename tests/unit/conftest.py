"""Fixtures shared by the unit tests of the cache's files."""

from __future__ import annotations

from pathlib import Path

import pytest

from mirror.cache.blobs import FilesystemBlobStore
from mirror.cache.locks import FileLocks


@pytest.fixture
def store(tmp_path: Path) -> FilesystemBlobStore:
    """An empty blob store with its fill locks, in the test's own directory."""
    s = FilesystemBlobStore(tmp_path)
    s.setup()
    FileLocks(tmp_path / "locks").setup()
    return s
