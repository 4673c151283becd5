"""`ResumingSource`: an upstream blob body that survives breaks by asking for the rest.

When a body breaks part-way (connection reset, truncation, a stalled read), the bytes already
received are kept and the source is reopened at that offset (`Range: bytes=N-`, with `If-Range`
carrying the first answer's own strong validator, so a changed object comes back whole rather
than spliced), a bounded number of times with exponential backoff. Each reopen starts again
from the registry's URL, so an expired signed CDN URL is replaced by a fresh redirect. An
upstream that ignores `Range` and answers 200 has its leading bytes dropped by the opener
(`UpstreamClient.open_blob`), so the stream stays byte-exact. Nothing here trusts the stitched
bytes: the fill (or `verified`) hashes the whole and refuses a mismatch.

It is one implementation for every reader of the upstream: a node's fill, the disk-full
pass-through, the target-only proof, and a cluster's fill (whose `_ClusterBody` opens the
upstream through the same opener, and switches sources only between peers and the store).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

import structlog

from mirror.errors import UpstreamError
from mirror.interfaces import Chunk
from mirror.reference import Digest

log = structlog.get_logger(__name__)

BACKOFF_BASE = 0.2  # seconds before the first reopen; doubled each time
BACKOFF_MAX = 5.0


class ResumableSource(Protocol):
    """An upstream body opened at some offset (mirror/interfaces.py `ByteSource`, plus the
    validator an `If-Range` may quote when asking for the rest)."""

    size: int | None  # declared length from the offset it was opened at
    validator: str | None  # the answer's strong ETag, if it sent one

    def chunks(self) -> AsyncIterator[Chunk]: ...

    async def close(self) -> None: ...


Opener = Callable[[int, str | None], Awaitable[ResumableSource]]


class ResumingSource:
    """A `ByteSource` over `open(offset, if_range)` that reopens at the received offset when
    the body breaks, at most `attempts` times (0: never)."""

    def __init__(
        self,
        digest: Digest,
        opener: Opener,
        *,
        attempts: int,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.digest = digest
        self._open = opener
        self.attempts = attempts
        self._sleep = sleep
        self.size: int | None = None
        self.resumes = 0
        self._source: ResumableSource | None = None
        self._start = 0

    @classmethod
    async def open(
        cls,
        digest: Digest,
        opener: Opener,
        offset: int = 0,
        *,
        attempts: int,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> ResumingSource:
        """Open at `offset` (the first open's failures are the opener's to retry)."""
        self = cls(digest, opener, attempts=attempts, sleep=sleep)
        self._start = offset
        self._source = await opener(offset, None)
        self.size = self._source.size
        return self

    async def chunks(self) -> AsyncIterator[Chunk]:
        assert self._source is not None
        received = self._start
        total = None if self.size is None else self._start + self.size
        validator = self._source.validator
        while True:
            try:
                async for chunk in self._source.chunks():
                    received += len(chunk)
                    yield chunk
                return
            except UpstreamError as exc:
                if total is not None and received >= total:
                    raise  # every byte came: nothing to ask for
                self._source = await self._resume(received, total, validator, exc)

    async def _resume(
        self, offset: int, total: int | None, validator: str | None, cause: UpstreamError
    ) -> ResumableSource:
        """The rest from `offset`, within the attempts left, or the last failure."""
        assert self._source is not None
        source, self._source = self._source, None
        await source.close()
        while self.resumes < self.attempts:
            self.resumes += 1
            delay = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (self.resumes - 1))
            log.warning(
                "upstream_blob_resuming", digest=self.digest, offset=offset,
                attempt=self.resumes, error=str(cause)[:200], delay=delay,
            )  # fmt: skip
            await self._sleep(delay)
            try:
                source = await self._open(offset, validator)
            except UpstreamError as exc:
                cause = exc
                continue
            if source.size is not None and total is not None and offset + source.size != total:
                await source.close()
                raise UpstreamError(
                    "upstream blob changed length on resume",
                    {"digest": self.digest, "expected": total, "got": offset + source.size},
                )
            log.info("upstream_blob_resumed", digest=self.digest, offset=offset)
            return source
        raise cause

    async def close(self) -> None:
        if self._source is not None:
            await self._source.close()
