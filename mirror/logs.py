"""structlog set-up: JSON lines for machines, readable lines on a terminal.

The mirror's own events (one access line per request among them) go through structlog's own
pipeline straight to stderr: no stdlib `LogRecord`, handler or formatter per line, which
profiling showed to be about a third of the CPU of a cached manifest hit. Other libraries'
stdlib loggers (aiohttp) are rendered the same way through a `ProcessorFormatter`.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO, cast

import structlog


class _Stderr:
    """Whatever `sys.stderr` is when a line is written, not when logging was set up: a
    command run in-process (tests, `main([...])`) may set up logging with a stream that is
    closed later, and every module's cached logger would then raise on its next line."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def setup_logging(level: str = "info", fmt: str = "auto") -> None:
    """Route structlog (and the stdlib loggers of aiohttp etc.) to stderr in one format."""
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer() if fmt == "console" else structlog.processors.JSONRenderer()
    )
    numeric = logging.getLevelName(level.upper())
    pid = os.getpid()

    def add_pid(
        _logger: object, _name: str, event: structlog.types.EventDict
    ) -> structlog.types.EventDict:
        """Which process wrote the line (several workers share one log)."""
        event["pid"] = pid
        return event

    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_pid,
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        logger_factory=structlog.WriteLoggerFactory(file=cast(TextIO, _Stderr())),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=shared,
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
