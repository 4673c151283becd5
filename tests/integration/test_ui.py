"""The operator page in a real browser (headless chromium), after real pulls through a real mirror.

What an operator sees must be what `/metrics` and the CLI say, the page must ask no host but the
mirror (checked in the browser's performance log), and only admins may change the cache. A
screenshot of each page is saved under tests/artifacts/ (UI_ARTIFACTS to move it).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from mirror.cli import main
from mirror.web.ui_support import human_bytes
from tests.fixtures.browser import Browser
from tests.fixtures.htpasswd import write_htpasswd
from tests.fixtures.mirror_server import MirrorProcess, sha256_digest
from tests.fixtures.real_upstream import Upstream
from tests.fixtures.synthetic_images import Image
from tests.integration.test_cache_policy import footprint
from tests.integration.test_manifests import ACCEPT_ALL


def pull(base: str, image: Image, auth: tuple[str, str] | None = None) -> None:
    """What a client does: the manifest by tag, then every blob, each checked."""
    with httpx.Client(base_url=base, auth=auth, timeout=30) as c:
        r = c.get(f"/v2/{image.repo}/manifests/{image.tag}", headers=ACCEPT_ALL)
        assert r.status_code == 200 and sha256_digest(r.content) == image.digest
        for child in image.children:
            r = c.get(f"/v2/{image.repo}/manifests/{child.digest}", headers=ACCEPT_ALL)
            assert sha256_digest(r.content) == child.digest
        for blob in image.all_blobs():
            r = c.get(f"/v2/{image.repo}/blobs/{blob.digest}")
            assert r.status_code == 200 and sha256_digest(r.content) == blob.digest


def metrics(base: str, auth: tuple[str, str] | None = None) -> dict[str, float]:
    """`/metrics` summed over labels, by sample name."""
    text = httpx.get(f"{base}/metrics", auth=auth).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def settled_metrics(base: str, entries: int, auth: tuple[str, str] | None = None) -> None:
    """Wait until the index holds `entries` (it is flushed once a second)."""
    deadline = time.monotonic() + 10
    while metrics(base, auth).get("registry_mirror_cache_entries") != entries:
        assert time.monotonic() < deadline, "the cache index did not settle"
        time.sleep(0.2)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    b = Browser(tmp_path / "chromium-profile")
    try:
        yield b
    finally:
        b.quit()


def entry_count(*images: Image) -> int:
    return sum(1 + len(i.children) + len({b.digest for b in i.all_blobs()}) for i in images)


def test_overview_and_contents_agree_with_metrics(
    upstream: Upstream, tmp_path: Path, browser: Browser
) -> None:
    small, multi, team = (upstream.images[k] for k in ("small", "multi", "team"))
    # Without prefetch, so that the first pulls are all misses and the second all hits.
    mirror = MirrorProcess(
        tmp_path / "cache", upstream.url, log_path=tmp_path / "mirror.log",
        env={"REGISTRY_MIRROR_UPSTREAM_PREFETCH": "false"},
    )  # fmt: skip
    mirror.start()
    try:
        for image in (small, multi, team):
            pull(mirror.url, image)  # misses: fetched upstream
        pull(mirror.url, small)  # hits: from the cache
        settled_metrics(mirror.url, entry_count(small, multi, team))

        browser.get(f"{mirror.url}/ui/")
        shown = {
            key: float(browser.find(f"#{key}").get_attribute("data-value") or "nan")
            for key in ("hits", "misses", "served-bytes", "fetched-bytes", "cache-size")
        }
        ratio_requests = browser.find("#hit-ratio-requests").text
        ratio_bytes = browser.find("#hit-ratio-bytes").text
        saved_gib = browser.find("#saved-gib").text
        m = metrics(mirror.url)
        hits, misses = (
            m["registry_mirror_cache_hits_total"],
            m["registry_mirror_cache_misses_total"],
        )
        served = m["registry_mirror_cache_served_bytes_total"]
        fetched = m["registry_mirror_upstream_fetched_bytes_total"]
        assert shown == {
            "hits": hits,
            "misses": misses,
            "served-bytes": served,
            "fetched-bytes": fetched,
            "cache-size": m["registry_mirror_cache_size_bytes"],
        }
        # And those are the truth: the second pull of `small` came wholly from the cache.
        assert served == footprint(small)
        assert hits == 1 + len(small.all_blobs()) and misses == entry_count(small, multi, team)
        assert ratio_requests == f"{100 * hits / (hits + misses):.1f} %"
        assert ratio_bytes == f"{100 * served / (served + fetched):.1f} %"
        assert saved_gib == human_bytes(served)  # in human units: 12.0 MiB, not 0.01 GiB
        assert browser.find("tr[data-upstream=default] .health").text == "ok"
        assert len(browser.find_all("svg polyline")) == 8  # 2 windows x 2 charts x 2 lines
        day = browser.find(".charts[data-window=day]")
        assert not day.is_displayed()
        browser.find("button[data-window=day]").click()
        assert day.is_displayed()  # the page's own script ran
        browser.find("button[data-window=hour]").click()
        browser.screenshot("ui-overview")

        browser.get(f"{mirror.url}/ui/contents")
        listed = {e.get_attribute("data-repository") for e in browser.find_all("tr.repo")}
        assert listed == {small.repo, multi.repo, team.repo}
        assert not browser.find_all("button[data-action]")  # anonymous: read-only
        browser.screenshot("ui-contents")
        search = browser.find("#search")
        browser.navigate_by(lambda: search.send_keys("team", Keys.ENTER))
        listed = {e.get_attribute("data-repository") for e in browser.find_all("tr.repo")}
        assert listed == {team.repo}

        browser.get(f"{mirror.url}/ui/contents?q=multi")
        browser.click_and_wait(f"tr.repo[data-repository='{multi.repo}'] a.tag")
        platforms = [e.get_attribute("data-platform") for e in browser.find_all("section.platform")]
        assert platforms == [f"linux/{c.platform['architecture']}" for c in multi.children]  # type: ignore[index]
        layers = browser.find_all("tr[data-digest]")
        assert {e.get_attribute("data-digest") for e in layers} == {
            b.digest for b in multi.all_blobs()
        }
        assert all(e.get_attribute("data-cached") == "true" for e in layers)
        browser.screenshot("ui-image")
        browser.navigate_by(browser.driver.find_element(By.LINK_TEXT, multi.repo).click)
        assert [e.get_attribute("data-tag") for e in browser.find_all("tr[data-tag]")] == [
            multi.tag
        ]
        browser.screenshot("ui-repository")

        assert browser.foreign_requests(mirror.url) == []
        assert all(u.startswith(("chrome:", "data:", "about:")) for u in browser.startup)
        assert any("/ui/static/ui.js" in u for u in browser.requested)  # the log is real
    finally:
        mirror.stop()


USERS = {"admin": "admin-secret", "viewer": "viewer-secret"}


def test_admin_pins_in_the_browser_and_a_viewer_cannot(
    upstream: Upstream, tmp_path: Path, browser: Browser, capsys: pytest.CaptureFixture[str]
) -> None:
    small, multi = upstream.images["small"], upstream.images["multi"]
    users = write_htpasswd(tmp_path / "htpasswd", USERS)
    conf = tmp_path / "mirror.yaml"
    hidden = {"who": ["viewer"], "repositories": [f"default/{multi.repo}"], "action": "deny"}
    conf.write_text(
        yaml.safe_dump(
            {
                "auth": {"htpasswd": str(users), "admins": ["admin"]},
                "access": {"rules": [hidden]},  # the viewer may not pull library/multi
            }
        )
    )
    cache = tmp_path / "cache"
    mirror = MirrorProcess(
        cache, upstream.url, "--config", str(conf), log_path=tmp_path / "mirror.log"
    )
    mirror.start()
    viewer, admin = ("viewer", USERS["viewer"]), ("admin", USERS["admin"])
    try:
        pull(mirror.url, small, auth=viewer)
        pull(mirror.url, multi, auth=admin)
        settled_metrics(mirror.url, entry_count(small, multi))
        assert httpx.get(f"{mirror.url}/ui/", auth=("admin", "wrong")).status_code == 401
        r = httpx.get(f"{mirror.url}/ui/login")  # what the page's "sign in" link does
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Basic ")
        r = httpx.get(f"{mirror.url}/ui/login", auth=viewer)
        assert r.status_code == 303 and r.headers["Location"] == "/ui/"
        repo_page = f"{mirror.url}/ui/repository?u=default&r={small.repo}"
        form = {"u": "default", "r": small.repo, "t": small.tag}

        # A viewer sees only what it may pull; the admin sees everything.
        browser.authenticate(*viewer)
        browser.get(f"{mirror.url}/ui/contents")
        listed = {e.get_attribute("data-repository") for e in browser.find_all("tr.repo")}
        assert listed == {small.repo}
        browser.get(f"{mirror.url}/ui/image?u=default&r={multi.repo}&t={multi.tag}")
        assert browser.find("#error-message").text == "no such image in the cache"
        browser.authenticate(*admin)
        browser.get(f"{mirror.url}/ui/contents")
        listed = {e.get_attribute("data-repository") for e in browser.find_all("tr.repo")}
        assert listed == {small.repo, multi.repo}

        # A viewer: read-only page, and a POST is refused even with its own valid CSRF token.
        browser.authenticate(*viewer)
        browser.get(repo_page)
        assert "viewer" in browser.find("#who").text and "read-only" in browser.find("#who").text
        assert browser.find(f"tr[data-tag='{small.tag}']").get_attribute("data-pinned") == "false"
        assert not browser.find_all("button[data-action]") and not browser.find_all("form")
        forged = browser.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "fetch(arguments[0], {method: 'POST', body: new URLSearchParams(arguments[1])})"
            ".then(r => done(r.status));",
            f"{mirror.url}/ui/actions/pin",
            {**form, "csrf": "x" * 43},
        )
        assert forged == 403
        with httpx.Client(base_url=mirror.url, auth=viewer) as c:
            c.get("/ui/contents")
            token = c.cookies["registry_mirror_csrf"]
            r = c.post(
                "/ui/actions/pin", data={**form, "csrf": token}, headers={"Origin": mirror.url}
            )
            assert r.status_code == 403
        browser.screenshot("ui-repository-viewer")

        # The admin: the buttons are there, and a click pins the image.
        browser.authenticate(*admin)
        browser.get(repo_page)
        assert "admin" in browser.find("#who").text
        browser.click_and_wait(f"tr[data-tag='{small.tag}'] button[data-action=pin]")
        assert "pinned " + small.ref in browser.find("#flash").text
        row = browser.find(f"tr[data-tag='{small.tag}']")
        assert row.get_attribute("data-pinned") == "true"
        assert row.find_elements(By.CSS_SELECTOR, "button[data-action=unpin]")
        browser.screenshot("ui-repository-admin")
        assert browser.foreign_requests(mirror.url) == []
    finally:
        mirror.stop()

    # The CLI reads the same pins.
    capsys.readouterr()
    assert main(["ls", "--cache-dir", str(cache)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows[small.repo].endswith("pinned") and not rows[multi.repo].endswith("pinned")
