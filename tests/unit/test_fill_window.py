"""The fill's in-memory window: what a reader near the head gets without the disk."""

from mirror.cache.fill import Window, WindowBudget


def joined(views: list[memoryview]) -> bytes:
    return b"".join(bytes(v) for v in views)


def test_views_span_chunks_from_any_offset_inside() -> None:
    window = Window(WindowBudget(total=1 << 20, per_fill=1 << 20))
    for chunk in (b"abcd", b"efgh", b"ijkl"):
        window.append(chunk)
    assert window.end == 12
    assert joined(window.views(0, 12)) == b"abcdefghijkl"
    assert joined(window.views(5, 10)) == b"fghij"
    assert joined(window.views(11, 12)) == b"l"
    assert window.views(12, 20) == []  # not arrived yet
    assert window.views(3, 3) == []


def test_old_chunks_fall_out_past_the_limit_but_never_the_newest() -> None:
    window = Window(WindowBudget(total=10, per_fill=10))
    for chunk in (b"0123", b"4567", b"89ab", b"cdefghijklmnop"):
        window.append(chunk)
    assert window.start == 12  # only the newest (bigger than the limit itself) is held
    assert window.views(4, 12) == []  # a reader there reads the file
    assert joined(window.views(12, 26)) == b"cdefghijklmnop"


def test_fills_in_flight_share_the_total() -> None:
    budget = WindowBudget(total=100, per_fill=60)
    assert budget.limit() == 60
    budget.fills = 4
    assert budget.limit() == 25
    windows = [Window(budget) for _ in range(4)]
    for window in windows:
        for _ in range(10):
            window.append(b"x" * 10)
    assert sum(w.end - w.start for w in windows) <= budget.total


def test_clear_frees_every_chunk() -> None:
    window = Window(WindowBudget())
    window.append(b"abc")
    window.clear()
    assert window.views(0, 3) == [] and window.start == window.end == 3


def test_bytes_waiting_for_the_disk_share_one_budget() -> None:
    from mirror.cache.fill import PENDING_MAX, PENDING_MIN, PENDING_TOTAL

    budget = WindowBudget()
    budget.fills = 1
    assert budget.pending_limit() == PENDING_MAX
    budget.fills = 64
    assert budget.pending_limit() * 64 <= max(PENDING_TOTAL, PENDING_MIN * 64)
    budget.fills = 10_000
    assert budget.pending_limit() == PENDING_MIN


async def _blocked(window: Window, incoming: int, disk: int, stall: float = 1.0) -> bool:
    """Whether `room` still waits after 50 ms."""
    import asyncio

    try:
        await asyncio.wait_for(window.room(incoming, disk, stall), 0.05)
    except TimeoutError:
        return True
    return False


async def test_reading_waits_for_the_head_reader_ahead_of_the_disk() -> None:
    window = Window(WindowBudget(total=8, per_fill=8))
    for chunk in (b"0123", b"4567"):
        window.append(chunk)
    window.track("client", 2)  # needs byte 2 next: the next chunk would drop it
    assert await _blocked(window, 4, disk=0)
    window.track("client", 4)  # it took the first chunk
    assert not await _blocked(window, 4, disk=0)


async def test_reading_does_not_wait_for_readers_the_disk_serves_or_that_stalled() -> None:
    window = Window(WindowBudget(total=8, per_fill=8))
    for chunk in (b"0123", b"4567"):
        window.append(chunk)
    window.track("slow", 2)
    assert not await _blocked(window, 4, disk=3)  # the file has what it needs next
    assert not await _blocked(window, 4, disk=0, stall=0.0)  # it has not moved: not waited for
    window.untrack("slow")
    assert not await _blocked(window, 4, disk=0)


async def test_a_reader_that_had_everything_is_not_stalled_by_waiting() -> None:
    import asyncio

    window = Window(WindowBudget(total=8, per_fill=8))
    window.append(b"0123")
    window.track("client", 3)  # all but the held-back last byte
    await asyncio.sleep(0.3)  # then nothing arrives for longer than `stall`
    window.append(b"4567")  # its clock starts again: it had nothing to take
    assert await _blocked(window, 4, disk=0, stall=0.2)
