"""`/v2/` handlers: parse and validate, call `Mirror`, translate the answer to HTTP.

Paths are parsed from the raw request target, before any decoding, so a percent-encoded dot or
slash can never reach the grammar as a path separator: anything that is not the plain OCI
grammar is refused. Only GET and HEAD exist for mirrored names; hosted names (and refused
writes to mirrored ones) are answered by push.py before these routes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from aiohttp import web

from mirror.errors import RegistryError
from mirror.mediatypes import split_accept
from mirror.mirror import BlobAnswer
from mirror.ranges import ByteRange, Unsatisfiable, if_range_holds, parse_range
from mirror.reference import Name, parse_digest, parse_name, parse_reference, parse_tag
from mirror.web.keys import CACHE_RESULT, MIRROR, PRINCIPAL, ROUTE
from mirror.web.push import hosted_dispatch
from mirror.web.responses import BlobBody, FileBody, FillBody, StreamBody, send_blob

API_VERSION_HEADERS = {"Docker-Distribution-API-Version": "registry/2.0"}
_ROUTE_RE = re.compile(
    r"/v2/(?P<name>.+)/(?:(?P<kind>manifests|blobs|referrers)/(?P<ref>[^/]+)|tags/list)"
)
READ_METHODS = frozenset({"GET", "HEAD"})
MAX_PAGE = 10_000
_COUNT_RE = re.compile(r"[0-9]{1,9}")
_MEDIA_TYPE_RE = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
)


@dataclass(frozen=True)
class Route:
    kind: str  # "base", "manifests", "blobs", "referrers" or "tags"
    name: Name | None = None
    reference: str | None = None


def is_count(text: str) -> bool:
    """ASCII digits only: `str.isdigit()` also takes `²` and other digits `int()` refuses."""
    return _COUNT_RE.fullmatch(text) is not None


def unsupported(request: web.BaseRequest) -> RegistryError:
    return RegistryError(
        "UNSUPPORTED",
        "this registry mirror is read-only: only GET and HEAD of manifests, blobs and tags",
        {"method": request.method, "path": request.raw_path.split("?", 1)[0][:512]},
    )


def parse_route(request: web.BaseRequest) -> Route:
    """Which read endpoint a request names; raises the OCI error a client should see."""
    path = request.raw_path.split("?", 1)[0]
    if request.method not in READ_METHODS:
        raise unsupported(request)
    if path in ("/v2", "/v2/"):
        return Route("base")
    match = _ROUTE_RE.fullmatch(path)
    if match is None:
        if path.startswith("/v2/") and ("%" in path or "/../" in path or "/./" in path):
            raise RegistryError("NAME_INVALID", "invalid repository name", {"path": path[:512]})
        raise unsupported(request)
    name = parse_name(match["name"])
    kind = match["kind"] or "tags"
    return Route(kind, name, match["ref"])


def _namespace(request: web.Request) -> str | None:
    return request.query.get("ns")


def _digest_headers(digest: str) -> dict[str, str]:
    return {"Docker-Content-Digest": digest, "ETag": f'"{digest}"'}


def _not_modified(request: web.Request, digest: str) -> bool:
    inm = request.headers.get("If-None-Match")
    return inm is not None and any(
        tag.strip() in (f'"{digest}"', digest, "*") for tag in inm.split(",")
    )


async def base(request: web.Request) -> web.Response:
    return web.json_response({})


async def manifest(request: web.Request, route: Route) -> web.StreamResponse:
    assert route.name is not None and route.reference is not None
    reference = parse_reference(route.reference)
    accept = split_accept(request.headers.getall("Accept", []))
    answer = await request.app[MIRROR].manifest(
        route.name, reference, accept, _namespace(request), request[PRINCIPAL]
    )
    request[CACHE_RESULT] = answer.cache
    m = answer.manifest
    headers = {"Content-Type": m.media_type, **_digest_headers(m.digest)}
    if answer.cache == "stale":
        headers["Warning"] = '110 registry-mirror "Response is Stale"'
    if _not_modified(request, m.digest):
        return web.Response(status=304, headers=headers)
    return web.Response(body=m.data, headers=headers)


async def blob(request: web.Request, route: Route) -> web.StreamResponse:
    assert route.name is not None and route.reference is not None
    digest = parse_digest(route.reference)
    mirror = request.app[MIRROR]
    headers = {
        "Content-Type": "application/octet-stream",
        "Accept-Ranges": "bytes",
        "Cache-Control": "max-age=31536000, immutable",
        **_digest_headers(digest),
    }
    namespace, principal = _namespace(request), request[PRINCIPAL]
    if request.method == "HEAD":
        size, result = await mirror.blob_size(route.name, digest, namespace, principal)
        request[CACHE_RESULT] = result
        head = web.StreamResponse(headers=headers)
        if size is not None:
            head.content_length = size
        await head.prepare(request)
        return head
    if _not_modified(request, digest) and await mirror.is_cached(digest):
        _, result = await mirror.blob_size(route.name, digest, namespace, principal)  # access
        request[CACHE_RESULT] = result
        return web.Response(status=304, headers=headers)
    wanted = request.headers.get("Range")
    if not if_range_holds(request.headers.get("If-Range"), digest):
        wanted = None  # another representation's validator: the whole blob
    answer = await mirror.blob(
        route.name, digest, ranged=wanted is not None, namespace=namespace, principal=principal
    )
    request[CACHE_RESULT] = answer.cache
    if answer.redirect is not None:  # the shared store serves it, ranges too (presigned)
        return web.Response(status=307, headers={**headers, "Location": answer.redirect})
    ranges = await _ranges(answer, wanted)
    body: BlobBody
    if answer.file is not None:
        body = FileBody(answer.file)
    else:
        if ranges is not None:  # maybe unverified bytes: no shared cache may keep them
            headers["Cache-Control"] = "no-store"
        if answer.reader is not None:
            body = FillBody(answer.reader)
        else:
            assert answer.stream is not None
            body = StreamBody(answer.stream)
    return await send_blob(request, body, answer.size, headers, ranges)


async def _ranges(answer: BlobAnswer, wanted: str | None) -> list[ByteRange] | None:
    """The ranges to send (None: the whole blob); a 416 for ranges that miss the blob. A
    blob of unknown size (a pass-through whose upstream did not say) is sent whole."""
    if wanted is None or answer.size is None:
        return None
    try:
        return parse_range(wanted, answer.size)
    except Unsatisfiable:
        await answer.release()
        raise RegistryError(
            "RANGE_INVALID",
            "requested range not satisfiable",
            {"range": wanted[:128], "size": answer.size},
            headers={"Content-Range": f"bytes */{answer.size}"},
        ) from None


async def tags(request: web.Request, route: Route) -> web.Response:
    assert route.name is not None
    params: dict[str, str] = {}
    if "n" in request.query:
        n = request.query["n"]
        if not is_count(n) or int(n) > MAX_PAGE:
            raise RegistryError(
                "PAGINATION_NUMBER_INVALID",
                f"n must be a whole number from 0 to {MAX_PAGE}",
                {"n": n[:32]},
            )
        params["n"] = n
    if "last" in request.query:
        params["last"] = parse_tag(request.query["last"])
    listing = await request.app[MIRROR].tags(
        route.name, params, _namespace(request), request[PRINCIPAL]
    )
    request[CACHE_RESULT] = "bypass"
    headers = {"Content-Type": listing.content_type}
    if listing.link:
        headers["Link"] = listing.link
    return web.Response(body=listing.body, headers=headers)


async def referrers(request: web.Request, route: Route) -> web.Response:
    """OCI 1.1 referrers; `artifactType` filters, any other query is a page from our `Link`."""
    assert route.name is not None and route.reference is not None
    subject = parse_digest(route.reference)
    artifact_type = request.query.get("artifactType")
    if artifact_type is not None and not _MEDIA_TYPE_RE.fullmatch(artifact_type):
        raise RegistryError("UNSUPPORTED", "artifactType is not a media type")
    query = {k: v for k, v in request.query.items() if k not in ("artifactType", "ns")}
    if len(str(query)) > 1024:
        raise RegistryError("UNSUPPORTED", "referrers page query too long")
    result = await request.app[MIRROR].referrers(
        route.name, subject, artifact_type, query, _namespace(request), request[PRINCIPAL]
    )
    request[CACHE_RESULT] = result.cache
    headers = {"Content-Type": result.answer.content_type}
    if result.answer.filtered:
        headers["OCI-Filters-Applied"] = "artifactType"
    if result.link:
        headers["Link"] = result.link
    if result.cache == "stale":
        headers["Warning"] = '110 registry-mirror "Response is Stale"'
    return web.Response(body=result.answer.body, headers=headers)


async def dispatch(request: web.Request) -> web.StreamResponse:
    hosted = await hosted_dispatch(request)  # hosted names never reach the Mirror
    if hosted is not None:
        return hosted
    route = parse_route(request)
    request[ROUTE] = route.kind
    if route.kind == "base":
        return await base(request)
    if route.kind == "manifests":
        return await manifest(request, route)
    if route.kind == "blobs":
        return await blob(request, route)
    if route.kind == "referrers":
        return await referrers(request, route)
    return await tags(request, route)
