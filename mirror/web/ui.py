"""The operator page (`/ui/`): is it working, what is it saving, what is in it.

Server-rendered (aiohttp-jinja2) from the same state `/metrics` and the CLI read: the counters
come from the metrics scrape text, the contents from the index and tag records (see
`mirror.contents`). Every asset is in the package and a Content-Security-Policy of `'self'`
keeps the browser from asking any other host. Everyone the access policy lets in may read it,
seeing only the repositories they may pull; pin, unpin, warm and evict are POST forms for admin
clients only, guarded by a double-submit CSRF token and the browser's origin headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp_jinja2
import jinja2
import structlog
from aiohttp import web

from mirror.access import ANONYMOUS, Principal
from mirror.cache import sqlite
from mirror.config import Config
from mirror.contents import Catalog, Refs, select
from mirror.errors import RegistryError
from mirror.mirror import Mirror
from mirror.progress import Progress
from mirror.reference import Digest, parse_image, parse_name
from mirror.stats import Sampler, parse_scrape
from mirror.upstream.client import UpstreamClient
from mirror.warm import warm
from mirror.web import ui_support as s
from mirror.web.keys import CLIENT_AUTH, CONFIG, MIRROR, NODE, PRINCIPAL
from mirror.web.routes import is_count

log = structlog.get_logger(__name__)

SAMPLE_SECONDS = 10.0
PAGE_SIZE = 50
WARM_CONCURRENCY = 4
HERE = Path(__file__).parent
STATIC = "ui_static"  # route name of the packaged assets
SECURITY_HEADERS = {
    # Nothing but this origin, ever: the page must work (and leak nothing) on an air gap.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    # Not "no-referrer": with it, browsers send `Origin: null` on our own form posts.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@dataclass
class WarmJob:
    image: str
    by: str
    # Which repository it pulls (as routed): only viewers who may pull it see the job.
    upstream: str
    repository: str
    started: float = field(default_factory=time.time)
    state: str = "running"  # running / done / failed
    detail: str = ""


@dataclass
class UiState:
    root: str
    sampler: Sampler = field(default_factory=Sampler)
    warms: list[WarmJob] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _catalog: Catalog | None = None  # needs the mirror: made at start-up

    @property
    def catalog(self) -> Catalog:
        assert self._catalog is not None, "the operator page's lifecycle has not started"
        return self._catalog


UI = web.AppKey("ui", UiState)


def setup_ui(app: web.Application, config: Config) -> None:
    """Add the operator page's routes and lifecycle (nothing when `ui.enabled` is false).

    Call before the catch-all registry route so these paths match first.
    """
    if not config.ui.enabled:
        return
    root = config.ui.path
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=jinja2.select_autoescape(default=True),
        default_helpers=False,
        undefined=jinja2.StrictUndefined,
        filters=FILTERS,
    )
    app.cleanup_ctx.append(_lifecycle)
    r = app.router
    r.add_get(root.rstrip("/"), to_root)
    r.add_get(root, overview)
    r.add_get(root + "contents", contents)
    r.add_get(root + "repository", repository)
    r.add_get(root + "image", image)
    r.add_get(root + "login", login)
    r.add_post(root + "actions/{action:pin|unpin|warm|evict}", action)
    r.add_static(root + "static/", HERE / "static", name=STATIC, append_version=True)
    app[UI] = UiState(root)


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    mirror = app[MIRROR]
    state = app[UI]
    state._catalog = Catalog(app[NODE])

    async def sample_forever() -> None:
        while True:
            try:
                taken = time.monotonic()
                text = await asyncio.to_thread(mirror.metrics.scrape)
                state.sampler.sample(parse_scrape(text).totals, taken)
            except Exception:
                log.exception("ui_sample_failed")
            await asyncio.sleep(SAMPLE_SECONDS)

    sampler = asyncio.ensure_future(sample_forever())
    try:
        yield
    finally:
        sampler.cancel()
        for task in [sampler, *state.tasks]:
            task.cancel()
        await asyncio.gather(sampler, *state.tasks, return_exceptions=True)


# -- request helpers -------------------------------------------------------------------------


def short_digest(digest: object) -> str:
    """A digest's first 12 hex characters, as `docker images` shows them."""
    return str(digest).split(":", 1)[-1][:12]


FILTERS: dict[str, Callable[..., str]] = {  # each renders text
    "bytes": s.human_bytes,
    "ago": s.ago,
    "when": s.clock_time,
    "short": short_digest,
}


def principal_of(request: web.Request) -> Principal:
    principal: Principal = request.get(PRINCIPAL, ANONYMOUS)
    return principal


async def to_root(request: web.Request) -> web.Response:
    return _redirect(request.app[UI].root)


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _csrf_token(request: web.Request) -> tuple[str, bool]:
    token = request.cookies.get(s.CSRF_COOKIE)
    if s.valid_token_shape(token):
        return str(token), False
    return s.new_csrf_token(), True


def _render(
    request: web.Request, template: str, context: dict[str, Any], status: int = 200
) -> web.Response:
    state = request.app[UI]
    principal = principal_of(request)
    token, new = _csrf_token(request)
    context = {
        "root": state.root,
        "page": "",
        "principal": principal,
        "admin": principal.admin,
        "csrf": token,
        "csrf_field": s.CSRF_FIELD,
        "can_sign_in": _passwords(request),
        "msg": _flash(request, token),
        "static": lambda name: request.app.router[STATIC].url_for(filename=name),
        "now": time.time(),
        **context,
    }
    response = aiohttp_jinja2.render_template(template, request, context, status=status)
    response.headers.update(SECURITY_HEADERS)
    if new:
        response.set_cookie(
            s.CSRF_COOKIE,
            token,
            path=state.root,
            httponly=True,
            samesite="Strict",
            secure=request.secure,
        )
    return response


def _done(request: web.Request, location: str, message: str) -> web.Response:
    """Redirect after an action, with a message only this session's pages will show (signed
    with its CSRF token: a link from elsewhere cannot put words on the page)."""
    token = request.cookies.get(s.CSRF_COOKIE, "")
    query = urlencode({"msg": message, "sig": s.sign(token, message)})
    return _redirect(location + ("&" if "?" in location else "?") + query)


def _flash(request: web.Request, token: str) -> str:
    message = request.query.get("msg", "")
    if message and s.sign(token, message) == request.query.get("sig"):
        return message
    return ""


def _refuse(request: web.Request, status: int, message: str) -> web.Response:
    return _render(request, "error.html", {"status": status, "message": message}, status)


def _gate(request: web.Request) -> web.Response | None:
    """Anonymous viewers of a mirror that admits no anonymous pulls are asked to sign in."""
    principal = principal_of(request)
    if not principal.authenticated and not request.app[MIRROR].policy.anonymous:
        return _login_challenge(request)
    return None


def _login_challenge(request: web.Request) -> web.Response:
    realm = request.app[CONFIG].auth.realm.replace('"', "")
    return web.Response(
        status=401,
        text="sign in to see this mirror's operator page\n",
        headers={"WWW-Authenticate": f'Basic realm="{realm}", charset="UTF-8"'},
    )


def _visible(request: web.Request) -> Any:
    mirror, principal = request.app[MIRROR], principal_of(request)
    return lambda upstream, repo: mirror.may_pull(principal, upstream, repo)


# -- pages -----------------------------------------------------------------------------------


async def overview(request: web.Request) -> web.Response:
    if (refused := _gate(request)) is not None:
        return refused
    mirror: Mirror = request.app[MIRROR]
    state = request.app[UI]
    mirror.refresh_gauges()
    taken = time.monotonic()
    scrape = parse_scrape(await asyncio.to_thread(mirror.metrics.scrape))
    t = scrape.totals
    state.sampler.sample(t, taken)  # the charts' newest bucket is as current as the figures
    size = scrape.value("registry_mirror_cache_size_bytes") or 0.0
    budget = await asyncio.to_thread(request.app[NODE].evictor.budget)
    now_mono = time.monotonic()
    upstreams = []
    for name, up in mirror.router.upstreams.items():
        backoff = max(0.0, up.backoff_until - now_mono)
        if mirror.offline:
            health = "offline"
        elif backoff > 0:
            health = "backing off"
        elif up.last_success is not None:
            health = "ok"
        elif up.last_failure is not None:
            health = "failing"
        else:
            health = "not contacted yet"
        upstreams.append(
            {
                "name": name,
                "url": up.base_url,
                "health": health,
                "backoff": backoff,
                "last_success": up.last_success,
                "last_failure": up.last_failure,
                "ratelimit": scrape.value(
                    "registry_mirror_upstream_ratelimit_remaining", upstream=name
                ),
                "accounts": _accounts(up, principal_of(request).admin),
            }
        )
    principal = principal_of(request)
    fills = [dataclasses.asdict(f) for f in await mirror.fills_in_flight()]
    shown_fills = [f for f in fills if await _may_see_digest(mirror, principal, str(f["digest"]))]
    warms = [
        w
        for w in reversed(state.warms)
        if principal.admin or mirror.may_pull(principal, w.upstream, w.repository)
    ][:10]
    charts = {}
    for window in ("hour", "day"):
        charts[window] = {
            "requests": s.chart(
                [
                    ("hits", state.sampler.points(window, "hits")),
                    ("misses", state.sampler.points(window, "misses")),
                ]
            ),
            "bytes": s.chart(
                [
                    ("served", state.sampler.points(window, "served_bytes")),
                    ("fetched", state.sampler.points(window, "fetched_bytes")),
                ]
            ),
        }
    requests = t["hits"] + t["misses"]
    moved = t["served_bytes"] + t["fetched_bytes"]
    context = {
        "page": "overview",
        "t": t,
        "hit_ratio_requests": s.percent(t["hits"], requests),
        "hit_ratio_bytes": s.percent(t["served_bytes"], moved),
        "size": size,
        "entries": scrape.value("registry_mirror_cache_entries") or 0.0,
        "budget": budget,
        "budget_share": s.ratio(size, budget),
        "fills": shown_fills,
        "hidden_fills": len(fills) - len(shown_fills),
        "upstreams": upstreams,
        "charts": charts,
        "warms": warms,
        "offline": mirror.offline,
    }
    return _render(request, "overview.html", context)


async def _may_see_digest(mirror: Mirror, principal: Principal, digest: str) -> bool:
    """Whether the page may show `principal` a fill's digest: a fill has no repository, so go
    by where the digest is known to come from (a digest of private content tells what is
    being pulled). Admins see all; with no provenance kept, nothing cached is private."""
    if principal.admin or not mirror.guarded:
        return True
    origins = await mirror.metadata.get_origins(Digest(digest))
    if origins is None:
        return False  # not yet known to be public: it may be private
    return origins.public or any(
        mirror.may_pull(principal, *repo.split("/", 1)) for repo in origins.repos if "/" in repo
    )


def _int_param(request: web.Request, name: str, default: int) -> int:
    """A whole number from the query (ASCII digits only), else `default`."""
    text = request.query.get(name, "")
    return int(text) if is_count(text) else default


async def contents(request: web.Request) -> web.Response:
    if (refused := _gate(request)) is not None:
        return refused
    state = request.app[UI]
    query = request.query.get("q", "")[:255]
    sort = request.query.get("sort", "name")
    page_no = max(1, _int_param(request, "page", 1))
    started = time.perf_counter()
    snapshot = await state.catalog.snapshot()
    rows, total = select(
        snapshot,
        visible=_visible(request),
        query=query,
        sort=sort,
        offset=(page_no - 1) * PAGE_SIZE,
        limit=PAGE_SIZE,
    )
    context = {
        "page": "contents",
        "rows": rows,
        "total": total,
        "q": query,
        "sort": sort,
        "page_no": page_no,
        "pages": max(1, -(-total // PAGE_SIZE)),
        "page_size": PAGE_SIZE,
        "snapshot": snapshot,
        "select_ms": (time.perf_counter() - started) * 1000,
        **await _hosted(request),
        "link": lambda **kw: "?" + urlencode({"q": query, "sort": sort, **kw}),
    }
    return _render(request, "contents.html", context)


async def _hosted(request: web.Request) -> dict[str, Any]:
    """Hosted repositories the viewer may pull, listed apart from the cache's (issue 18)."""
    hosted = request.app[NODE].hosted
    if not hosted.names:
        return {"hosted": None}
    rows = await hosted.summary(principal_of(request))
    return {"hosted": rows, "hosted_bytes": await hosted.used_bytes()}


async def repository(request: web.Request) -> web.Response:
    if (refused := _gate(request)) is not None:
        return refused
    state = request.app[UI]
    upstream, repo = request.query.get("u", ""), request.query.get("r", "")
    if not _visible(request)(upstream, repo):
        return _refuse(request, 404, "no such repository in the cache")
    snapshot = await state.catalog.snapshot()
    row = snapshot.repo(upstream, repo)
    if row is None:
        return _refuse(request, 404, "no such repository in the cache")
    own_pins = await request.app[NODE].policy.own_pins()
    context = {
        "page": "contents",
        "repo": row,
        "own_pins": own_pins,
        "pin_ref": lambda u, r, t: pin_ref(request.app[MIRROR], u, r, t),
        "signature": request.app[MIRROR].signatures.label,
    }
    return _render(request, "repository.html", context)


def pin_ref(mirror: Mirror, upstream: str, repository: str, tag: str) -> str:
    """The image reference a pin is stored under, as `registry-mirror pin` takes it: the name
    a client pulls by, which routes back to this upstream and repository (a prefix for any
    upstream but the default)."""
    client = mirror.router.upstreams.get(upstream)
    names = [repository]
    if client is not None and client is not mirror.router.default:
        prefixes = [*client.config.aliases, *sorted(client.config.registry_names())]
        names = [f"{prefix}/{repository}" for prefix in prefixes] or names
    for name in names:
        with contextlib.suppress(RegistryError):
            target = mirror.router.route(parse_name(name))
            if (target.upstream.name, target.repository) == (upstream, repository):
                return f"{name}:{tag}"
    return f"{names[0]}:{tag}"


async def image(request: web.Request) -> web.Response:
    if (refused := _gate(request)) is not None:
        return refused
    mirror: Mirror = request.app[MIRROR]
    state = request.app[UI]
    upstream, repo, tag = (request.query.get(k, "") for k in ("u", "r", "t"))
    if not _visible(request)(upstream, repo):
        return _refuse(request, 404, "no such image in the cache")
    record = await mirror.metadata.get_tag((upstream, repo, tag))
    if record is None:
        return _refuse(request, 404, "no such image in the cache")
    snapshot = await state.catalog.snapshot()
    row = snapshot.repo(upstream, repo)
    tag_row = next((t for t in row.tags if t.tag == tag), None) if row else None
    platforms = await sqlite.run(_platforms, state.catalog, record.digest)
    own_pins = await request.app[NODE].policy.own_pins()
    context = {
        "page": "contents",
        "upstream": upstream,
        "repository": repo,
        "tag": tag,
        "record": record,
        "tag_row": tag_row,
        "platforms": platforms,
        "own_pin": pin_ref(mirror, upstream, repo, tag) in own_pins,
        "signature": mirror.signatures.label(record.digest),
    }
    return _render(request, "image.html", context)


def _platforms(catalog: Catalog, digest: Digest) -> list[dict[str, Any]]:
    """Each platform's manifest and layers, with sizes and whether each is cached (blocking)."""
    index = catalog.index
    top = catalog.refs(digest)
    if top is None:
        return [{"name": "unknown", "digest": digest, "cached": False, "blobs": []}]
    wanted: list[tuple[Digest, str, Refs | None]] = []
    if not top.children:
        wanted.append((digest, "single platform", top))
    for child, platform, _ in top.children:
        wanted.append((child, platform, catalog.refs(child)))
    out = []
    for manifest, name, refs in wanted:
        blobs = []
        for blob, media_type, size in refs.blobs if refs else ():
            entry = index.get(blob)
            kind = "config" if "config" in media_type else "layer"
            blobs.append(
                {
                    "digest": blob,
                    "kind": kind,
                    "media_type": media_type,
                    "size": size,
                    "cached": entry is not None,
                }
            )
        out.append({"name": name, "digest": manifest, "cached": refs is not None, "blobs": blobs})
    return out


async def login(request: web.Request) -> web.Response:
    """Makes the browser ask for credentials (HTTP Basic), then returns to the page."""
    if not _passwords(request):
        return _refuse(request, 404, "this mirror has no client passwords (auth.htpasswd)")
    if not principal_of(request).authenticated:
        return _login_challenge(request)
    return _redirect(request.app[UI].root)


def _passwords(request: web.Request) -> bool:
    auth = request.app.get(CLIENT_AUTH)
    return auth is not None and auth.htpasswd is not None


# -- actions ---------------------------------------------------------------------------------


async def action(request: web.Request) -> web.Response:
    state = request.app[UI]
    mirror: Mirror = request.app[MIRROR]
    principal = principal_of(request)
    if not principal.admin:
        return _refuse(request, 403, "only an admin client may change the cache")
    form = await request.post()
    problem = s.csrf_problem(
        request.cookies.get(s.CSRF_COOKIE),
        str(form.get(s.CSRF_FIELD, "")),
        origin=request.headers.get("Origin"),
        host=request.host,
        fetch_site=request.headers.get("Sec-Fetch-Site"),
    )
    if problem is not None:
        log.warning("ui_action_refused", reason=problem, user=principal.name)
        return _refuse(request, 403, problem)
    what = request.match_info["action"]
    if what == "warm":
        return await _warm(request, str(form.get("image", "")).strip())
    upstream, repo, tag = (str(form.get(k, "")) for k in ("u", "r", "t"))
    if not mirror.may_pull(principal, upstream, repo):
        return _refuse(request, 404, "no such image in the cache")
    record = await mirror.metadata.get_tag((upstream, repo, tag))
    if record is None:
        return _refuse(request, 404, "no such image in the cache")
    ref = pin_ref(mirror, upstream, repo, tag)
    back = f"{state.root}repository?" + urlencode({"u": upstream, "r": repo})
    if what in ("pin", "unpin"):
        # The same pins `registry-mirror pin` / `unpin` keep: this node's and cluster-wide.
        await request.app[NODE].policy.set_pins([ref], pin=what == "pin")
        await state.catalog.refresh()
        log.info("ui_" + what, image=ref, user=principal.name)
        return _done(request, back, f"{what}ned {ref}")
    # evict
    snapshot = await state.catalog.snapshot(fresh=True)
    row = snapshot.repo(upstream, repo)
    tag_row = next((t for t in row.tags if t.tag == tag), None) if row else None
    if tag_row is not None and tag_row.pinned:
        return _done(request, back, f"{ref} is pinned: unpin it first")
    policy = request.app[NODE].policy
    result = await policy.evict_image((upstream, repo, tag), snapshot.references)
    await state.catalog.refresh()
    msg = (
        f"evicted {ref}: removed {len(result.removed)} files ({s.human_bytes(result.freed)}), "
        f"kept {result.kept_shared} shared with other images, {result.kept_busy} being fetched"
    )
    log.info("ui_evict", image=ref, user=principal.name, freed=result.freed)
    return _done(request, f"{state.root}contents", msg)


async def _warm(request: web.Request, reference: str) -> web.Response:
    state = request.app[UI]
    mirror: Mirror = request.app[MIRROR]
    principal = principal_of(request)
    try:
        name, _ = parse_image(reference)
        target = mirror.router.route(name)
    except RegistryError as exc:
        return _done(request, state.root, f"cannot warm: {exc.message}")
    if not mirror.may_pull(principal, target.upstream.name, target.repository):
        return _refuse(request, 403, "you may not pull that repository")
    job = WarmJob(reference, principal.name or "?", target.upstream.name, target.repository)
    state.warms.append(job)
    del state.warms[:-50]

    async def run() -> None:
        try:
            summary = await warm(
                mirror,
                [reference],
                platforms=None,
                concurrency=WARM_CONCURRENCY,
                progress=Progress("warm", out=io.StringIO()),
            )
            job.state = "failed" if summary.failures else "done"
            job.detail = "; ".join(summary.failures) or (
                f"fetched {summary.fetched_blobs} blobs ({s.human_bytes(summary.fetched_bytes)}), "
                f"{summary.present_blobs} already cached"
            )
        except Exception as exc:
            job.state, job.detail = "failed", str(exc)
        with contextlib.suppress(Exception):
            await state.catalog.refresh()

    task = asyncio.ensure_future(run())
    state.tasks.add(task)
    task.add_done_callback(state.tasks.discard)
    log.info("ui_warm", image=reference, user=principal.name)
    return _done(request, state.root, f"warming {reference}")


def _accounts(up: UpstreamClient, admin: bool) -> list[dict[str, object]]:
    """Each account's pull budget as this worker last saw it (remaining of limit per window,
    what the upstream counts against); user names only for admins."""
    shown: list[dict[str, object]] = []
    for i, account in enumerate(up.budget.accounts):
        if account.remaining is None and not account.resting:
            continue
        shown.append(
            {
                "name": account.name if admin else f"account {i + 1}",
                "remaining": account.remaining,
                "limit": account.limit,
                "window": account.window,
                "source": account.source if admin else None,
                "resting": round(account.wait()),
            }
        )
    return shown
