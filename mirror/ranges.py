"""HTTP byte ranges (RFC 9110 §14) of a blob of known size: what a `Range` header asks for.

Pure and small so every path that sends blob bytes (a cached file, a fill in flight, a
pass-through stream) answers ranges the same way:

- no `Range`, an `If-Range` that is not the blob's strong ETag (`"<digest>"`), a header that is
  not valid `bytes=` syntax, an empty blob, or more than `MAX_PARTS` parts once coalesced: the
  whole blob with 200 (the RFC lets a server ignore `Range`; a client that asked gets every byte,
  never a wrong one);
- a valid header none of whose ranges fits the blob: 416 with `Content-Range: bytes */size`;
- otherwise the satisfiable ranges, sorted and with overlapping or adjacent ones merged: one
  range is a plain 206, several a `multipart/byteranges` 206.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_PARTS = 16  # beyond this many (coalesced) parts, the whole blob is cheaper for everyone
MAX_SPECS = 256  # a header with more specs than this is not worth parsing: send the whole blob
_SPEC_RE = re.compile(r"([0-9]*)-([0-9]*)")


@dataclass(frozen=True)
class ByteRange:
    """Bytes `start` to `stop - 1` of a blob."""

    start: int
    stop: int

    @property
    def length(self) -> int:
        return self.stop - self.start

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.stop - 1}/{size}"


class Unsatisfiable(ValueError):
    """A valid `Range` none of whose ranges overlaps the blob (answer 416)."""

    def __init__(self, size: int) -> None:
        super().__init__(f"no requested range overlaps a blob of {size} bytes")
        self.size = size


def if_range_holds(if_range: str | None, digest: str) -> bool:
    """Whether `If-Range` lets the range stand: absent, or the blob's own strong ETag. A date
    or any other tag cannot be matched to immutable content by strong comparison, so the
    client gets the whole blob (which is what it would want for a changed representation)."""
    return if_range is None or if_range.strip() == f'"{digest}"'


def parse_range(header: str | None, size: int) -> list[ByteRange] | None:
    """The ranges to send, coalesced and in order; None for the whole blob (200).

    Raises `Unsatisfiable` (416) for a valid header that selects nothing of the blob."""
    if header is None or size <= 0:
        return None
    unit, sep, spec_text = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    specs = spec_text.split(",")
    if len(specs) > MAX_SPECS:
        return None
    wanted: list[ByteRange] = []
    for raw in specs:
        spec = raw.strip()
        if not spec:
            continue  # RFC 9110's list syntax tolerates empty elements
        match = _SPEC_RE.fullmatch(spec)
        if match is None or not (match[1] or match[2]):
            return None
        first, last = match[1], match[2]
        if not first:  # suffix: the last N bytes
            suffix = int(last)
            if suffix > 0:
                wanted.append(ByteRange(max(0, size - suffix), size))
            continue
        start = int(first)
        if last and int(last) < start:
            return None  # invalid syntax: the whole header is ignored
        stop = size if not last else min(int(last) + 1, size)
        if start < size:
            wanted.append(ByteRange(start, stop))
    if not wanted:
        raise Unsatisfiable(size)
    merged = coalesce(wanted)
    return None if len(merged) > MAX_PARTS else merged


def coalesce(ranges: list[ByteRange]) -> list[ByteRange]:
    """Sorted, with overlapping and adjacent ranges merged (fewer, larger parts; one pass)."""
    out: list[ByteRange] = []
    for r in sorted(ranges, key=lambda r: r.start):
        if out and r.start <= out[-1].stop:
            if r.stop > out[-1].stop:
                out[-1] = ByteRange(out[-1].start, r.stop)
        else:
            out.append(r)
    return out


@dataclass(frozen=True)
class Multipart:
    """The framing of a `multipart/byteranges` body: each part's head, and the closing line."""

    boundary: str
    heads: list[bytes]
    tail: bytes
    content_length: int

    @property
    def content_type(self) -> str:
        return f"multipart/byteranges; boundary={self.boundary}"


def multipart(ranges: list[ByteRange], size: int, content_type: str, boundary: str) -> Multipart:
    """Part heads and total length for `ranges`, so Content-Length is known before any byte."""
    heads = [
        (
            f"\r\n--{boundary}\r\nContent-Type: {content_type}\r\n"
            f"Content-Range: {r.content_range(size)}\r\n\r\n"
        ).encode()
        for r in ranges
    ]
    tail = f"\r\n--{boundary}--\r\n".encode()
    length = sum(map(len, heads)) + sum(r.length for r in ranges) + len(tail)
    return Multipart(boundary, heads, tail, length)
