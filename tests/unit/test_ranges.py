"""Parsing `Range` against a blob's size: the forms, coalescing, the cap, If-Range, 416."""

from __future__ import annotations

import email
import email.message

import pytest

from mirror.ranges import (
    MAX_PARTS,
    ByteRange,
    Unsatisfiable,
    coalesce,
    if_range_holds,
    multipart,
    parse_range,
)

SIZE = 1000


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-99", [(0, 100)]),
        ("bytes=900-", [(900, 1000)]),
        ("bytes=-100", [(900, 1000)]),
        ("bytes=-5000", [(0, 1000)]),
        ("bytes=990-5000", [(990, 1000)]),
        ("BYTES = 1-1", [(1, 2)]),
        ("bytes=0-9, 20-29", [(0, 10), (20, 30)]),
        ("bytes=20-29,0-9", [(0, 10), (20, 30)]),  # sorted
        ("bytes=0-9,5-19,20-29", [(0, 30)]),  # overlapping and adjacent merged
        ("bytes=0-9,2000-3000", [(0, 10)]),  # the unsatisfiable one dropped
        ("bytes=0-9,,20-29", [(0, 10), (20, 30)]),  # empty list elements tolerated
    ],
)
def test_satisfiable_ranges(header: str, expected: list[tuple[int, int]]) -> None:
    assert parse_range(header, SIZE) == [ByteRange(a, b) for a, b in expected]


@pytest.mark.parametrize(
    "header",
    [
        None,
        "items=0-9",  # another unit
        "bytes=9-0",  # last before first: invalid, so ignored
        "bytes=abc",
        "bytes=-",
        "bytes=0x1-2",
        "bytes=²-3",  # not an ASCII digit
        "bytes=" + ",".join(f"{i * 10}-{i * 10}" for i in range(MAX_PARTS + 1)),  # over the cap
        "bytes=" + ",".join(["0-1"] * 1000),  # too many specs to bother with
    ],
)
def test_whole_blob(header: str | None) -> None:
    assert parse_range(header, SIZE) is None


def test_many_overlapping_ranges_coalesce_under_the_cap() -> None:
    header = "bytes=" + ",".join(f"{i}-{i + 5}" for i in range(100))
    assert parse_range(header, SIZE) == [ByteRange(0, 105)]


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=5000-6000", "bytes=-0", "bytes=1000-,-0"])
def test_unsatisfiable(header: str) -> None:
    with pytest.raises(Unsatisfiable) as caught:
        parse_range(header, SIZE)
    assert caught.value.size == SIZE


def test_an_empty_blob_is_always_sent_whole() -> None:
    assert parse_range("bytes=0-", 0) is None


def test_if_range() -> None:
    digest = "sha256:" + "a" * 64
    assert if_range_holds(None, digest)
    assert if_range_holds(f'"{digest}"', digest)
    assert not if_range_holds(f'W/"{digest}"', digest)  # weak never matches
    assert not if_range_holds("Wed, 21 Oct 2015 07:28:00 GMT", digest)
    assert not if_range_holds('"other"', digest)


def test_coalesce_keeps_disjoint_ranges() -> None:
    assert coalesce([ByteRange(5, 6), ByteRange(0, 2)]) == [ByteRange(0, 2), ByteRange(5, 6)]


def test_multipart_framing_parses_back_with_the_declared_length() -> None:
    data = bytes(range(256)) * 4
    ranges = [ByteRange(0, 10), ByteRange(500, 600)]
    framing = multipart(ranges, len(data), "application/octet-stream", "BOUNDARY")
    body = b"".join(
        head + data[r.start : r.stop] for head, r in zip(framing.heads, ranges, strict=True)
    )
    body += framing.tail
    assert len(body) == framing.content_length
    message = email.message_from_bytes(
        f"Content-Type: {framing.content_type}\r\n\r\n".encode() + body
    )
    parts = message.get_payload()
    assert isinstance(parts, list)
    assert [p["Content-Range"] for p in parts] == ["bytes 0-9/1024", "bytes 500-599/1024"]
    assert [p.get_payload(decode=True) for p in parts] == [data[0:10], data[500:600]]
    assert all(isinstance(p, email.message.Message) for p in parts)
