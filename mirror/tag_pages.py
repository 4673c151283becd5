"""One page of a repository's tag list, as the distribution spec wants it: lexical order,
`last` excluded, at most `n`, and a `Link` to the next page when more remain. The mirror
applies it itself (to hosted tags, cached tags and the upstream's whole list alike), so a
client sees the spec's paging whatever order or page size the upstream uses."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote


@dataclass(frozen=True)
class TagPage:
    tags: list[str]
    link: str | None  # `Link` header value for the next page, None on the last page


def tag_page(name: str, tags: Iterable[str], n: int | None, last: str | None) -> TagPage:
    """The page of `tags` (any order, duplicates allowed) after `last`, at most `n` long."""
    ordered = sorted(set(tags))
    if last is not None:
        ordered = [t for t in ordered if t > last]
    if n is None or len(ordered) <= n:
        return TagPage(ordered, None)
    page = ordered[:n]
    if not page:  # n=0: an empty page, and nothing to continue from
        return TagPage([], None)
    link = f'</v2/{name}/tags/list?n={n}&last={quote(page[-1], safe="")}>; rel="next"'
    return TagPage(page, link)
