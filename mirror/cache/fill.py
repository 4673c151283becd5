"""Single-flight blob fills with tail readers.

One `Fill` per missing digest pulls the upstream body (an async byte iterator, so this module
never imports `upstream/`), writes it through a `BlobWriter` that hashes it, and lets any number
of readers follow it. A reader near the head is sent the fill's newest bytes from memory (its
`Window`) as they arrive, so delivery never waits for the disk write, and the fill reads no
faster than its most advanced reader takes them; a reader further behind reads the temp file.
A disk slower than such a reader is left behind (see `Fill`). A reader never receives the last
byte before the digest verified: until then it stays at least one byte behind what arrived, and
if the fill fails it raises, so the web layer aborts the client's connection short of a
complete-looking body. The fill runs in its own task: a reader that goes away cancels nothing.

Memory: fills share two budgets. Bytes waiting for the disk (or, past a disk left behind, for
the hash): a fill reads no more of its upstream once it holds its share of `PENDING_TOTAL` (at
least `PENDING_MIN`, at most `PENDING_MAX`); windows: each keeps at most its share of
`WINDOW_TOTAL` (at most `WINDOW_MAX`) of chunks, the newest always. So a process holds at most
32 MiB of blob bytes plus, per fill, `PENDING_MIN` and the buffer its upstream is being read
into (aiohttp's 1 MiB, or one of the reused 1 MiB buffers of mirror/upstream/socket_body.py,
which fill each buffer before the next, so the windows' and backlogs' chunks are views that
pin about as many buffers as their bytes need); fills are at most `max_concurrent_fetches` per
upstream, whatever the number of readers.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import BinaryIO

import structlog

from mirror.cache.blobs import FilesystemBlobStore, verified_marker
from mirror.cache.locks import FileLocks
from mirror.cache.stream_hash import StreamHasher
from mirror.errors import DigestMismatch, UpstreamError
from mirror.interfaces import BlobWriter, Chunk, FillTarget, Hasher
from mirror.reference import Digest

log = structlog.get_logger(__name__)

PENDING_MAX = 8 * 1024 * 1024  # one fill's bytes waiting for the disk: rides out its stalls
WINDOW_MAX = 4 * 1024 * 1024  # newest bytes of one fill kept in memory for readers near its head
WINDOW_TOTAL = 16 * 1024 * 1024  # the same, for every fill of the process together
PENDING_TOTAL = 16 * 1024 * 1024  # bytes waiting for the disk, for every fill together
PENDING_MIN = 256 * 1024  # a fill's share never drops below this (it would crawl)
DETACH_MIN = 16 * 1024 * 1024  # a fill leaves a lagging disk behind only with this much to come
PACE_STALL = 1.0  # seconds without progress after which a fill no longer waits for a reader
REST_AFTER = 2.0  # seconds after leaving the disk behind: fetch the file's rest meanwhile


class WindowBudget:
    """Shares `total` bytes of window among the process's fills in flight."""

    def __init__(self, total: int = WINDOW_TOTAL, per_fill: int = WINDOW_MAX) -> None:
        self.total = total
        self.per_fill = per_fill
        self.fills = 0

    def limit(self) -> int:
        return min(self.per_fill, self.total // max(1, self.fills))

    def pending_limit(self) -> int:
        """Bytes one fill may hold for the disk before reading more of its upstream."""
        return max(PENDING_MIN, min(PENDING_MAX, PENDING_TOTAL // max(1, self.fills)))


class Window:
    """The newest chunks a fill received, by offset: sent to readers near the head without
    waiting for the disk. Older chunks fall out past the budget's limit (readers behind them
    read the temp file)."""

    def __init__(self, budget: WindowBudget) -> None:
        self.budget = budget
        self._chunks: deque[tuple[int, Chunk]] = deque()
        self.start = 0  # offset of the oldest byte held
        self.end = 0  # offset after the newest byte held (= bytes received)
        self._held = 0
        # Readers sent from here: the next offset each needs, and when it last moved.
        self._readers: dict[object, tuple[int, float]] = {}
        self._moved = asyncio.Event()

    def track(self, reader: object, pos: int) -> None:
        """`reader` was sent everything before `pos` (stalled: not moved for a while though
        it had bytes to take)."""
        self._readers[reader] = (pos, time.monotonic())
        self._moved.set()

    def untrack(self, reader: object) -> None:
        self._readers.pop(reader, None)
        self._moved.set()

    def _head(self, disk: int, stall: float) -> int | None:
        """The offset the most advanced reader needs next, among readers still in the window,
        ahead of the disk (`disk`: bytes in the temp file; one behind it loses nothing by
        reading the file) and moving within `stall` seconds (None: no such reader)."""
        moving = time.monotonic() - stall
        return max(
            (
                p
                for p, at in self._readers.values()
                if p >= self.start and p > disk and at >= moving
            ),
            default=None,
        )

    def has_readers(self, disk: int, stall: float = PACE_STALL) -> bool:
        """A reader would have to wait for the disk if the window dropped it."""
        return self._head(disk, stall) is not None

    def _start_after(self, incoming: int) -> int:
        """Where the window would start after appending `incoming` bytes."""
        held, limit, start = self._held + incoming, self.budget.limit(), self.start
        for offset, chunk in self._chunks:
            if held <= limit:
                break
            held -= len(chunk)
            start = offset + len(chunk)
        return start

    async def room(self, incoming: int, disk: int, stall: float = PACE_STALL) -> None:
        """Wait until appending `incoming` bytes drops nothing the most advanced reader ahead of
        the disk still needs, so a client faster than the disk is sent everything from memory.
        A reader that stalls for `stall` seconds is not waited for (it reads the temp file)."""
        while True:
            head = self._head(disk, stall)
            if head is None or head >= self._start_after(incoming):
                return
            self._moved.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._moved.wait(), stall)

    def append(self, chunk: Chunk) -> None:
        if not chunk:
            return
        if self._readers:  # a reader that had all it could get is not stalled: it waited
            now, caught_up = time.monotonic(), self.end - 1
            for reader, (pos, _at) in self._readers.items():
                if pos >= caught_up:
                    self._readers[reader] = (pos, now)
        self._chunks.append((self.end, chunk))
        self.end += len(chunk)
        self._held += len(chunk)
        limit = self.budget.limit()
        while self._held > limit and len(self._chunks) > 1:
            _, old = self._chunks.popleft()
            self._held -= len(old)
            self.start = self._chunks[0][0]

    def views(self, pos: int, stop: int) -> list[memoryview]:
        """Bytes `[pos, stop)` as views of the held chunks, if the window still holds `pos`
        (else empty: read the file)."""
        if not self.start <= pos < self.end or pos >= stop:
            return []
        out: list[memoryview] = []
        for offset, chunk in reversed(self._chunks):  # readers are near the head
            if offset >= stop:
                continue
            end = min(stop, offset + len(chunk))
            out.append(memoryview(chunk)[max(0, pos - offset) : end - offset])
            if offset <= pos:
                break
        out.reverse()
        return out

    def start_at(self, offset: int) -> None:
        """The body's first chunk lands at `offset` (a resumed partial holds the bytes before)."""
        assert not self._chunks
        self.start = self.end = offset

    def clear(self) -> None:
        self._chunks.clear()
        self._held = 0
        self.start = self.end
        self._readers.clear()
        self._moved.set()


@dataclass
class UpstreamBody:
    """What a fill consumes: the upstream's declared size (if any) and its byte stream."""

    size: int | None
    chunks: AsyncIterator[Chunk]
    close: Callable[[], Awaitable[None]]


class FillState(enum.Enum):
    STARTING = "starting"
    STREAMING = "streaming"
    VERIFIED = "verified"  # every byte is in and matches: readers may finish; being made durable
    COMMITTED = "committed"
    FAILED = "failed"


class FillBase:
    """A blob on its way into the store, readable while it streams (see TailReader)."""

    def __init__(self, digest: Digest) -> None:
        self.digest = digest
        self.state = FillState.STARTING
        self.size: int | None = None
        self.written = 0
        self.fetched = False  # committed by this fill (not found already in the store)
        self.verified = False  # stays True once set, even if making it durable then fails
        self.error: BaseException | None = None
        self._tail_fd: int | None = None
        self._changed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    @property
    def received(self) -> int:
        """Bytes that arrived so far (a reader may have those in the window beyond `written`)."""
        return self.written

    def window_views(self, pos: int, stop: int) -> list[memoryview]:
        """Bytes `[pos, stop)` from memory, for a fill that keeps a window (else empty)."""
        return []

    def track(self, reader: object, pos: int) -> None:
        """A reader was sent everything before `pos` (a fill with a window paces by it)."""

    def untrack(self, reader: object) -> None:
        """The reader is gone."""

    def disk_wanted(self) -> None:
        """A reader waits for bytes that only the temp file will have (a fill that left its
        disk behind starts fetching the file's rest)."""

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _close_tail(self) -> None:
        if self._tail_fd is not None:
            os.close(self._tail_fd)
            self._tail_fd = None

    async def wait_started(self) -> None:
        """Wait until the upstream answered (raising its error) or the fill ended."""
        while self.state is FillState.STARTING:
            await self._changed.wait()
        if self.state is FillState.FAILED:
            assert self.error is not None
            raise self.error

    async def wait_done(self) -> None:
        """Wait until the blob is committed (raising the fill's error if it was not)."""
        while self.state in (FillState.STARTING, FillState.STREAMING, FillState.VERIFIED):
            await self._changed.wait()
        if self.state is FillState.FAILED:
            assert self.error is not None
            raise self.error

    def open_reader(self) -> TailReader | None:
        """A reader over the bytes so far, or None if the fill already ended (then read the store).

        Call after `wait_started`; it takes its own descriptor, so the fill may finish freely.
        """
        if self._tail_fd is None:
            if self.state is FillState.FAILED:
                assert self.error is not None
                raise self.error
            return None
        return TailReader(self, os.dup(self._tail_fd))


OpenBody = Callable[[int], Awaitable[UpstreamBody]]  # the upstream's bytes from an offset


async def _no_bytes() -> AsyncIterator[Chunk]:
    nothing: tuple[bytes, ...] = ()
    for chunk in nothing:
        yield chunk


async def _nothing() -> None:
    return None


class Fill(FillBase):
    """This process fetches the blob from the upstream into the store.

    With a `source` (the `<upstream>/<repository>` its bytes come from), an abandoned partial
    of the same digest from the same source is claimed and continued: its bytes are re-hashed
    in a thread while the upstream is asked only for the rest, and readers see them as soon
    as the upstream answered. The digest check at the end covers the stitched whole.

    Reading waits for the most advanced reader still ahead of the disk (`Window.room`), so such
    a client gets every byte from memory. With `outrun_disk` (`cache.outrun_disk`), the disk
    need not set the pace either: if it falls behind such a reader by the fill's share of
    `PENDING_TOTAL`, with `DETACH_MIN` or more still to come, the fill leaves it behind: from
    that offset on, the stream is only hashed (on a copy of the file's running hash) and sent,
    and the clients' last byte is released when that hash matches. The rest of the file is
    fetched again from that offset, written and verified on its own before the commit (see
    `_start_rest` for when). What this costs: the lagging part crosses the network twice (the
    reference registry fetches every cold blob twice), and it is hashed twice.
    """

    def __init__(
        self,
        digest: Digest,
        store: FillTarget,
        source: str | None = None,
        budget: WindowBudget | None = None,
        *,
        outrun_disk: bool = False,
    ) -> None:
        super().__init__(digest)
        self.store = store
        self.source = source
        self.outrun_disk = outrun_disk
        self._writer: BlobWriter | None = None
        self._budget = budget or WindowBudget()
        self._window = Window(self._budget)
        self._stream_hash: Hasher | None = None  # set once the disk was left behind
        self._leave_disk = False  # asked by the reading side, done by the drain
        self.detached_at: int | None = None  # the file's length when the disk was left behind
        self._open_body: OpenBody | None = None
        self._rest: asyncio.Task[None] | None = None
        self._rest_timer: asyncio.TimerHandle | None = None

    @property
    def received(self) -> int:
        return max(self.written, self._window.end)

    @property
    def storing(self) -> bool:
        """The file's rest is being fetched (see `_start_rest`)."""
        return self._rest is not None

    def window_views(self, pos: int, stop: int) -> list[memoryview]:
        return self._window.views(pos, stop)

    def track(self, reader: object, pos: int) -> None:
        self._window.track(reader, pos)

    def untrack(self, reader: object) -> None:
        self._window.untrack(reader)

    def disk_wanted(self) -> None:
        self._start_rest()

    async def run(self, open_body: OpenBody) -> None:
        body: UpstreamBody | None = None
        self._open_body = open_body
        self._budget.fills += 1
        try:
            if await self.store.stat(self.digest) is not None:
                # Committed by a fill that ended between our caller's miss and its join.
                self.state = FillState.COMMITTED
                return
            body, self._writer = await self._open(open_body)
            self.size = self._writer.expected_size
            self.written = self._writer.written
            self._window.start_at(self.written)
            self._tail_fd = self._writer.open_tail()
            self.state = FillState.STREAMING
            self._notify()
            await self._pump(body.chunks, self._writer)
            if self._stream_hash is not None:
                self._verify_stream(self._stream_hash)
                self._release()
                await body.close()
                body = None
                self._start_rest()
                assert self._rest is not None
                await self._rest
            else:
                # Verified bytes go to readers at once; fsync + rename (slow for big blobs on
                # slow disks) happen while the clients already have everything.
                await self._writer.verify()
                self._release()
            await self._writer.commit()
            self.size = self.written
            self.fetched = True
            self.state = FillState.COMMITTED
            log.info(
                "blob_fill_committed", digest=self.digest, size=self.written,
                detached_at=self.detached_at,
            )  # fmt: skip
        except BaseException as exc:
            await self._stop_rest()
            if self._writer is not None:
                await self._writer.abort()  # before anyone can see the failure
            self.error = exc
            self.state = FillState.FAILED
            resumed = 0 if self._writer is None else self._writer.resumed_from
            if isinstance(exc, DigestMismatch):
                log.warning(
                    "digest_mismatch", digest=self.digest, actual=exc.actual, resumed=resumed
                )
            elif not isinstance(exc, asyncio.CancelledError):
                log.warning("blob_fill_failed", digest=self.digest, error=str(exc))
            if not isinstance(exc, Exception):
                raise
        finally:
            self._budget.fills -= 1
            self._window.clear()
            self._close_tail()
            self._notify()
            if body is not None:
                await body.close()

    def _start_rest(self) -> None:
        """Once the disk was left behind: fetch the file's rest (at most once). Done when the
        stream ends, or before if a reader waits for the file (it fell behind the window, or
        a reader in another process: `REST_AFTER` after leaving the disk) so that it never
        waits for the stream's pace."""
        if self._rest is not None or self.detached_at is None:
            return
        assert self._writer is not None and self._open_body is not None
        if self._rest_timer is not None:
            self._rest_timer.cancel()
        self._rest = asyncio.ensure_future(self._store_rest(self._open_body, self._writer))

    async def _stop_rest(self) -> None:
        """The fill failed: the rest's fetch stops (its own failure, if it came first, is
        already logged with the fill's)."""
        if self._rest_timer is not None:
            self._rest_timer.cancel()
        if self._rest is not None:
            if not self._rest.done():
                self._rest.cancel()
            with contextlib.suppress(BaseException):
                await self._rest

    def _release(self) -> None:
        """Every byte is in and matched the digest: readers may have the last one."""
        self.verified = True
        self.state = FillState.VERIFIED
        self._notify()

    def _verify_stream(self, stream_hash: Hasher) -> None:
        """The stream, hashed past the disk, is the blob (else nothing is released)."""
        if self.size is not None and self._window.end != self.size:
            raise UpstreamError(
                "upstream sent a body of the wrong length",
                {"digest": self.digest, "expected": self.size, "got": self._window.end},
            )
        actual = "sha256:" + stream_hash.hexdigest()
        if actual != self.digest:
            raise DigestMismatch(self.digest, actual)

    async def _store_rest(self, open_body: OpenBody, writer: BlobWriter) -> None:
        """Fetch the rest of the file from where the disk was left behind, write and verify it
        (readers behind the window follow the file)."""
        log.info("blob_fill_storing_rest", digest=self.digest, offset=writer.written)
        rest = await open_body(writer.written)
        try:
            got = None if rest.size is None else writer.written + rest.size
            if got is not None and self.size is not None and got != self.size:
                raise UpstreamError(
                    "upstream blob changed length",
                    {"digest": self.digest, "expected": self.size, "got": got},
                )
            await self._pump(rest.chunks, writer, stream=False)
        finally:
            await rest.close()
        await writer.verify()

    def _may_leave_disk(self) -> bool:
        return (
            self.outrun_disk
            and self.size is not None
            and self.size - self._window.end >= DETACH_MIN
            and self._window.has_readers(self.written)
        )

    async def _open(self, open_body: OpenBody) -> tuple[UpstreamBody, BlobWriter]:
        """The upstream's body and the writer it goes to: a claimed partial's rest, or all."""
        writer = None
        if self.source is not None:
            writer = await self.store.resume_write(self.digest, self.source)
        if writer is not None:
            offset, size = writer.written, writer.expected_size
            writer.rehash()  # meanwhile the upstream is asked for the rest
            log.info("partial_resumed", digest=self.digest, offset=offset, size=size)
            try:
                if offset == size:  # killed after the last byte: nothing left to fetch
                    return UpstreamBody(0, _no_bytes(), _nothing), writer
                body = await open_body(offset)
            except BaseException:
                await writer.abort()
                raise
            if body.size is None or size is None or offset + body.size == size:
                return body, writer
            log.warning(
                "partial_discarded", digest=self.digest, reason="the upstream's size differs",
                partial=size, upstream=offset + body.size,
            )  # fmt: skip
            await writer.abort()
            await body.close()
        body = await open_body(0)
        try:
            return body, await self.store.begin_write(self.digest, body.size, self.source)
        except BaseException:
            await body.close()
            raise

    async def _pump(
        self, chunks: AsyncIterator[Chunk], writer: BlobWriter, *, stream: bool = True
    ) -> None:
        """Overlap network reads with hashing+writing in worker threads.

        A drain task hands the threads whatever has arrived whenever they are free, so slow
        bodies reach tail readers at once and fast ones go in large batches; past the fill's
        share of the bytes waiting (`WindowBudget.pending_limit`), reading waits for the
        drain, or (a `stream` with a reader ahead of the disk) leaves the disk behind: once
        the drain has hashed what it held, the stream's own hash thread (`StreamHasher`) takes
        each chunk as it comes. Memory stays flat either way. Not `stream`: the file's rest
        after that, written without a window.
        """
        pending: list[Chunk] = []  # the body's own chunks, never copied on the event loop
        pending_bytes = 0

        async def drain() -> None:
            nonlocal pending, pending_bytes
            while pending:
                batch, pending, pending_bytes = pending, [], 0
                if stream and self._leave_disk and self._stream_hash is None:
                    self._stream_hash = await writer.hash_copy()  # the file's bytes so far
                    self.detached_at = writer.written
                    loop = asyncio.get_running_loop()
                    self._rest_timer = loop.call_later(REST_AFTER, self._start_rest)
                    log.info("blob_fill_disk_left_behind", digest=self.digest, at=writer.written)
                if stream and self._stream_hash is not None:
                    await asyncio.to_thread(_hash_all, self._stream_hash, batch)
                else:
                    await writer.write_chunks(batch)
                    self.written = writer.written
                self._notify()

        worker: asyncio.Task[None] | None = None
        hashing: StreamHasher | None = None  # the stream's own hash thread, past the disk
        try:
            async for chunk in chunks:
                if stream:
                    await self._window.room(len(chunk), self.written)
                    if hashing is None and self._stream_hash is not None and not pending:
                        if worker is not None:
                            await worker  # the drain's last batch goes into the hash first
                        hashing = StreamHasher(self._stream_hash)
                    self._window.append(chunk)
                    self._notify()  # readers near the head send it from the window now
                if hashing is not None:
                    await hashing.feed(chunk, self._budget.pending_limit())
                    continue
                pending.append(chunk)
                pending_bytes += len(chunk)
                if worker is None or worker.done():
                    if worker is not None:
                        worker.result()
                    worker = asyncio.ensure_future(drain())
                elif pending_bytes >= self._budget.pending_limit():
                    if stream and not self._leave_disk and self._may_leave_disk():
                        self._leave_disk = True  # the drain's next batch is only hashed
                    await worker
            if worker is not None:
                await worker
            await drain()
            if hashing is not None:
                await hashing.finish()
        finally:
            if hashing is not None:
                hashing.close()
            if worker is not None and not worker.done():
                with contextlib.suppress(BaseException):
                    await worker


def _hash_all(hasher: Hasher, chunks: list[Chunk]) -> None:
    for chunk in chunks:
        hasher.update(chunk)


class RemoteFill(FillBase):
    """Another process holds the digest's fill lock: follow its temp file instead of fetching.

    Progress is the temp file's length (its space is reserved without changing the length);
    the fill is committed when the final file appears as the same inode we are reading, and has
    failed when the lock is free and no final file appeared.
    """

    POLL_SECONDS = 0.01

    def __init__(self, digest: Digest, store: FilesystemBlobStore, locks: FileLocks) -> None:
        super().__init__(digest)
        self.store = store
        self.locks = locks
        self._tail_path = store.tmp_dir

    async def run(self) -> None:
        try:
            while True:
                before = (self.state, self.written)
                ended = await asyncio.to_thread(self._step)
                if (self.state, self.written) != before:
                    self._notify()
                if ended:
                    return
                await asyncio.sleep(self.POLL_SECONDS)
        except BaseException as exc:
            self.error = exc
            self.state = FillState.FAILED
            if not isinstance(exc, Exception):
                raise
        finally:
            self._close_tail()
            self._notify()

    def _step(self) -> bool:
        """One look at the other process's progress (blocking); True once it ended."""
        final = self.store.path_for(self.digest)
        if self._tail_fd is None:
            found = self.store.find_partial(self.digest)
            if found is not None:
                with contextlib.suppress(FileNotFoundError):
                    self._tail_fd = os.open(found[0], os.O_RDONLY)
                    self._tail_path = found[0]
                    self.size = found[1]
                    self.state = FillState.STREAMING
        try:
            final_ino = os.stat(final).st_ino
        except FileNotFoundError:
            final_ino = None
        if final_ino is not None:
            if self._tail_fd is not None and os.fstat(self._tail_fd).st_ino != final_ino:
                raise UpstreamError("the fill this request followed was not the one committed")
            self.written = os.stat(final).st_size
            self.size = self.written
            self.state = FillState.COMMITTED
            return True
        if self._tail_fd is not None:
            self.written = os.fstat(self._tail_fd).st_size
            if not self.verified and verified_marker(self._tail_path).exists():
                self.written = os.fstat(self._tail_fd).st_size  # complete before the marker
                self.verified = True
                self.state = FillState.VERIFIED
        if not self.locks.is_held(self.digest) and not final.exists():
            raise UpstreamError("the worker fetching this blob gave up", {"digest": self.digest})
        return False


class TailReader:
    """Follows a fill's temp file, yielding byte ranges as they become safe to send.

    Ranges (not bytes) so the web layer can sendfile them: tailing clients cost no copies in
    Python. The last byte is held back until the digest verified; a failed fill raises.
    """

    def __init__(self, fill: FillBase, fd: int) -> None:
        self.fill = fill
        self.file: BinaryIO = open(fd, "rb", buffering=0, closefd=True)  # noqa: SIM115

    async def ranges(
        self, start: int = 0, stop: int | None = None
    ) -> AsyncGenerator[tuple[int, int], None]:
        """(offset, count) pieces of `[start, stop)` (stop None: to the end) as they land.

        Bytes already written go at once; only the blob's last byte waits for verification,
        so a range that ends earlier never waits for the digest (why that is safe:
        mirror/web/responses.py)."""
        fill = self.fill
        pos = start
        while True:
            changed = fill._changed
            released = fill.verified or fill.state is FillState.COMMITTED
            limit = fill.written if released else fill.written - 1
            end = fill.received if stop is None else min(stop, fill.received)
            if stop is not None:
                limit = min(limit, stop)
            if pos < limit:
                yield pos, limit - pos
                pos = limit
            elif (released and pos >= end) or (stop is not None and pos >= stop):
                return  # (a fill that left its disk behind is released before the file is whole)
            elif fill.state is FillState.FAILED:
                assert fill.error is not None
                raise fill.error
            else:
                if pos < fill.received:
                    fill.disk_wanted()  # the bytes came, the file lacks them
                await changed.wait()

    async def pieces(
        self, start: int = 0, stop: int | None = None
    ) -> AsyncGenerator[tuple[int, int, list[memoryview]], None]:
        """`(offset, count, data)` pieces of `[start, stop)` as they arrive: `data` from the
        fill's window when it still holds them (no wait for the disk), else empty: read
        `count` bytes at `offset` of the temp file. The same release rule as `ranges`."""
        fill = self.fill
        pos = start
        while True:
            changed = fill._changed
            released = fill.verified or fill.state is FillState.COMMITTED
            arrived = fill.received
            limit = arrived if released else arrived - 1
            if stop is not None:
                limit = min(limit, stop)
            if pos < limit:
                views = fill.window_views(pos, limit)
                if views:
                    count = sum(map(len, views))
                    # What this reader needs next: the views stay valid if the window drops
                    # their chunks, and the fill paces its reading by its head reader.
                    fill.track(self, pos + count)
                    yield pos, count, views
                    pos += count
                    continue
                on_disk = min(limit, fill.written)
                if pos < on_disk:
                    yield pos, on_disk - pos, views
                    pos = on_disk
                    continue
                fill.disk_wanted()  # behind the window, ahead of the file
            elif released or (stop is not None and pos >= stop):
                return
            if fill.state is FillState.FAILED:
                assert fill.error is not None
                raise fill.error
            await changed.wait()

    async def read(self, offset: int, count: int) -> bytes:
        """Copying fallback where sendfile is not available (callers bound `count`)."""
        data = await asyncio.to_thread(os.pread, self.file.fileno(), count, offset)
        if len(data) != count:
            raise OSError(f"temp file of {self.fill.digest} shorter than written")
        return data

    def close(self) -> None:
        self.fill.untrack(self)
        self.file.close()


class FillManager:
    """At most one fill per digest across every process sharing the cache directory.

    In this process, later callers join the running fill. Across processes, the digest's lock
    file decides who fetches; the others follow its temp file (`RemoteFill`).
    """

    def __init__(
        self,
        store: FilesystemBlobStore,
        locks: FileLocks,
        on_commit: Callable[[Digest, int], None] | None = None,
        *,
        outrun_disk: bool = False,
    ) -> None:
        self.store = store
        self.locks = locks
        self.on_commit = on_commit
        self.outrun_disk = outrun_disk  # fills may leave a lagging disk behind (see Fill)
        self._fills: dict[Digest, FillBase] = {}
        self.windows = WindowBudget()

    def __len__(self) -> int:
        return len(self._fills)

    def in_flight(self) -> list[FillBase]:
        return list(self._fills.values())

    def get(self, digest: Digest) -> FillBase | None:
        return self._fills.get(digest)

    def join(
        self, digest: Digest, open_body: OpenBody, source: str | None = None
    ) -> tuple[FillBase, bool]:
        """The running fill for `digest`, or a new one started with `open_body` (resuming an
        abandoned partial from `source` if there is one); and if new (False also when another
        process is fetching it and we follow)."""
        fill = self._fills.get(digest)
        if fill is not None:
            return fill, False
        lock = self.locks.try_acquire(digest)
        if lock is None:
            remote = RemoteFill(digest, self.store, self.locks)
            remote.task = asyncio.ensure_future(remote.run())
            fill = remote
        else:
            local = Fill(digest, self.store, source, self.windows, outrun_disk=self.outrun_disk)
            local.task = asyncio.ensure_future(self._run_locked(local, open_body, lock))
            fill = local
        self._fills[digest] = fill
        assert fill.task is not None
        fill.task.add_done_callback(lambda _t: self._finished(fill))
        return fill, lock is not None

    async def _run_locked(self, fill: Fill, open_body: OpenBody, lock: int) -> None:
        try:
            await fill.run(open_body)
        finally:
            self.locks.release(fill.digest, lock)

    def _finished(self, fill: FillBase) -> None:
        self._fills.pop(fill.digest, None)
        if fill.fetched and self.on_commit is not None:
            self.on_commit(fill.digest, fill.written)

    async def close(self, grace: float = 0.0) -> None:
        """Shutdown: fills already verified finish their commit (clients have their bytes;
        only the fsync and rename remain); those verified but still fetching the rest of a
        file they left behind get `grace` seconds to; the others are cancelled at once. A
        cancelled fill's temp file is discarded."""
        tasks = [f.task for f in self._fills.values() if f.task is not None]
        storing = []
        for fill in self._fills.values():
            if fill.task is None:
                continue
            if not fill.verified:
                fill.task.cancel()
            elif isinstance(fill, Fill) and fill.storing:
                storing.append(fill.task)
        if storing:
            _done, late = await asyncio.wait(storing, timeout=grace)
            for task in late:
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
