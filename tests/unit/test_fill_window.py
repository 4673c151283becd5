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
    from mirror.cache.fill import BATCH_SIZE, PENDING_MIN, PENDING_TOTAL

    budget = WindowBudget()
    budget.fills = 1
    assert budget.pending_limit() == 2 * BATCH_SIZE
    budget.fills = 64
    assert budget.pending_limit() * 64 <= max(PENDING_TOTAL, PENDING_MIN * 64)
    budget.fills = 10_000
    assert budget.pending_limit() == PENDING_MIN
