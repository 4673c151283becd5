"""Shared fixtures: the real upstream registry lives in tests/fixtures/real_upstream.py."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import structlog

pytest_plugins = [
    "tests.fixtures.fake_upstream",
    "tests.fixtures.real_upstream",
    "tests.fixtures.redis_server",
    "tests.fixtures.seaweed",
]


@pytest.fixture(autouse=True)
def _isolated_logging() -> Iterator[None]:
    """CLI tests configure logging globally (as the command does): undo it after each test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)
