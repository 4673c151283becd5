from mirror.tag_pages import tag_page


def test_sorted_lexically_without_duplicates() -> None:
    page = tag_page("a/b", ["v2", "latest", "v10", "v2"], None, None)
    assert page.tags == ["latest", "v10", "v2"]
    assert page.link is None


def test_n_and_last_walk_every_tag_once() -> None:
    tags = [f"t{i:03d}" for i in range(25)][::-1]
    seen: list[str] = []
    last = None
    while True:
        page = tag_page("org/app", tags, 10, last)
        seen += page.tags
        if page.link is None:
            break
        assert page.link == f'</v2/org/app/tags/list?n=10&last={page.tags[-1]}>; rel="next"'
        last = page.tags[-1]
    assert seen == sorted(tags)


def test_last_excludes_itself_and_may_name_an_absent_tag() -> None:
    assert tag_page("a", ["a", "b", "c"], None, "a").tags == ["b", "c"]
    assert tag_page("a", ["a", "c"], None, "b").tags == ["c"]


def test_n_zero_is_an_empty_last_page() -> None:
    page = tag_page("a", ["a", "b"], 0, None)
    assert page.tags == [] and page.link is None


def test_exact_fit_has_no_next_link() -> None:
    assert tag_page("a", ["a", "b"], 2, None).link is None
