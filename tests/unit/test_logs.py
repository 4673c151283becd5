"""Logging set up by a command run in-process keeps working once that command's stderr is gone."""

from __future__ import annotations

import io
import sys

import pytest
import structlog

from mirror.logs import setup_logging


def test_lines_go_to_the_stderr_of_the_moment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    setup_logging("warning", "json")  # as `main([...])` does, under a caller's stderr
    first.close()
    monkeypatch.undo()
    try:
        structlog.get_logger("test").warning("after_the_command", n=1)
        assert '"event": "after_the_command"' in capsys.readouterr().err
    finally:
        structlog.reset_defaults()
