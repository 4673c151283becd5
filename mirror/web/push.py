"""`/v2/` for hosted repositories: the whole OCI push API, pulls, deletes, tag lists, the
referrers API and `/v2/_catalog`.

`hosted_dispatch` runs before the mirror's routes: a hosted name never reaches the `Mirror`,
and a write to a mirrored name is refused here with `DENIED` naming the setting. Paths are
parsed from the raw target as routes.py does (nothing percent-decoded reaches the grammar).
Their metrics' `route` labels are `hosted_*`, so hosted requests never count as cache hits or
misses.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from mirror.cache.blobs import OpenBlob
from mirror.errors import RegistryError
from mirror.hosted.registry import HostedRegistry
from mirror.interfaces import Unavailable
from mirror.ranges import ByteRange, Unsatisfiable, parse_range
from mirror.reference import (
    Digest,
    Name,
    is_digest,
    parse_content_digest,
    parse_name,
    parse_tag,
)
from mirror.referrers_index import referrers_index
from mirror.tag_pages import tag_page
from mirror.web.keys import CACHE_RESULT, DEADLINE, NODE, PRINCIPAL, ROUTE
from mirror.web.responses import FileBody, send_blob

log = structlog.get_logger(__name__)
_HOSTED_RE = re.compile(
    r"/v2/(?P<name>.+)/(?:manifests/(?P<ref>[^/]+)|blobs/uploads/(?P<upload>[^/]*)"
    r"|blobs/(?P<digest>[^/]+)|tags/list|referrers/(?P<subject>[^/]+))"
)
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
READ_CHUNK = 256 * 1024
_CONTENT_RANGE_RE = re.compile(r"(?:bytes[ =])?([0-9]{1,15})-([0-9]{1,15})(?:/(?:[0-9]+|\*))?")
_RANGE_SPEC_RE = re.compile(r"\s*([0-9]+)-([0-9]+)\s*")
_COUNT_RE = re.compile(r"[0-9]{1,9}")
MAX_PAGE = 10_000  # as routes.py: the most tags or repositories one page lists


def _registry(request: web.Request) -> HostedRegistry:
    return request.app[NODE].hosted


async def hosted_dispatch(request: web.Request) -> web.StreamResponse | None:
    """The answer for a hosted name (or the catalog, or a refused write); None: not ours."""
    try:
        return await _dispatch(request)
    except Unavailable as exc:  # a cluster's Redis or shared store: nothing was changed
        log.warning("hosted_unavailable", path=request.path[:512], error=str(exc))
        raise RegistryError(
            "UNAVAILABLE",
            "the cluster's shared store or Redis cannot be reached: try again shortly",
            status=503,
            headers={"Retry-After": "5"},
        ) from None


async def _dispatch(request: web.Request) -> web.StreamResponse | None:
    path = request.raw_path.split("?", 1)[0]
    if not path.startswith("/v2/"):
        return None
    registry = _registry(request)
    if not registry.names and request.method not in WRITE_METHODS:
        return None  # nothing hosted: pulls go straight to the mirror's routes
    if path == "/v2/_catalog" and request.method in ("GET", "HEAD") and registry.names:
        request[ROUTE] = "hosted_catalog"
        return await catalog(request, registry)
    match = _HOSTED_RE.fullmatch(path)
    if match is None:
        return None
    name = match["name"]
    if not registry.names.is_hosted(name):
        return _refuse_write(request, path) if request.method in WRITE_METHODS else None
    hosted_name = parse_name(name)
    if request.method in ("GET", "HEAD") and registry.names.is_group(name):
        try:
            return await _hosted_route(request, registry, hosted_name, match)
        except RegistryError as exc:
            if exc.code not in ("MANIFEST_UNKNOWN", "BLOB_UNKNOWN", "NAME_UNKNOWN"):
                raise
            return None  # a group: what the hosted repository lacks comes from the upstream
    return await _hosted_route(request, registry, hosted_name, match)


async def _hosted_route(
    request: web.Request, registry: HostedRegistry, hosted_name: Name, match: re.Match[str]
) -> web.StreamResponse:
    if match["ref"] is not None:
        request[ROUTE] = "hosted_manifests"
        return await manifests(request, registry, hosted_name, match["ref"])
    if match["upload"] is not None:
        request[ROUTE] = "hosted_uploads"
        return await uploads(request, registry, hosted_name, match["upload"])
    if match["digest"] is not None:
        request[ROUTE] = "hosted_blobs"
        return await blobs(request, registry, hosted_name, match["digest"])
    if match["subject"] is not None:
        request[ROUTE] = "hosted_referrers"
        return await referrers(request, registry, hosted_name, match["subject"])
    request[ROUTE] = "hosted_tags"
    return await tags(request, registry, hosted_name)


def _refuse_write(request: web.Request, path: str) -> web.StreamResponse:
    raise RegistryError(
        "DENIED",
        "this name is mirrored, not hosted: pushes and deletes go only to names matching"
        " hosted.repositories",
        {"method": request.method, "path": path[:512]},
    )


def _method_not_allowed(request: web.Request) -> RegistryError:
    return RegistryError(
        "UNSUPPORTED",
        f"{request.method} is not supported here",
        {"method": request.method, "path": request.raw_path.split("?", 1)[0][:512]},
    )


def _digest_headers(digest: str) -> dict[str, str]:
    return {"Docker-Content-Digest": digest, "ETag": f'"{digest}"'}


def _no_deadline(request: web.Request) -> None:
    """A push's body takes as long as it takes: `limits.request_timeout` is for answers."""
    deadline = request.get(DEADLINE)
    if deadline is not None:
        deadline.reschedule(None)


async def _body(request: web.Request) -> AsyncIterator[bytes]:
    while data := await request.content.readany():
        yield data


async def _read_limited(request: web.Request, limit: int) -> bytes:
    """The whole body (a manifest), refused past `limit` bytes before reading it all."""
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for data in _body(request):
        size += len(data)
        if size > limit:
            raise _too_large(limit)
        chunks.append(data)
    return b"".join(chunks)


def _too_large(limit: int) -> RegistryError:
    return RegistryError(
        "SIZE_INVALID",
        f"manifests are limited to {limit} bytes (hosted.manifest_max_size)",
        {"limit": limit},
        status=413,
    )


# -- manifests -------------------------------------------------------------------------------


async def manifests(
    request: web.Request, registry: HostedRegistry, name: Name, ref: str
) -> web.StreamResponse:
    principal = request[PRINCIPAL]
    reference = parse_content_digest(ref) if is_digest(ref) else parse_tag(ref)
    if request.method in ("GET", "HEAD"):
        registry.require(principal, name, "pull")
        request[CACHE_RESULT] = "hosted"
        found = await registry.manifest(name, reference)
        if found is None:
            raise RegistryError(
                "MANIFEST_UNKNOWN", "manifest unknown", {"name": name, "reference": reference}
            )
        headers = {"Content-Type": found.media_type, **_digest_headers(found.digest)}
        inm = request.headers.get("If-None-Match")
        if inm is not None and f'"{found.digest}"' in inm:
            return web.Response(status=304, headers=headers)
        return web.Response(body=found.data, headers=headers)  # HEAD: aiohttp sends no body
    if request.method == "PUT":
        registry.require(principal, name, "push")
        tags = tuple(parse_tag(t) for t in request.query.getall("tag", []))
        if tags and not is_digest(ref):
            raise RegistryError("TAG_INVALID", "tag parameters go with a push by digest")
        data = await _read_limited(request, registry.config.manifest_max_size)
        pushed = await registry.put_manifest(
            name, reference, data, request.headers.get("Content-Type"), tags
        )
        headers = {"Location": f"/v2/{name}/manifests/{pushed.digest}"}
        headers.update(_digest_headers(pushed.digest))
        if pushed.subject is not None:
            headers["OCI-Subject"] = pushed.subject
        response = web.Response(status=201, headers=headers)
        if tags:
            response.headers["OCI-Tag"] = ", ".join(tags)
        return response
    if request.method == "DELETE":
        registry.require(principal, name, "delete")
        if not await registry.delete_manifest(name, reference):
            raise RegistryError(
                "MANIFEST_UNKNOWN", "manifest unknown", {"name": name, "reference": reference}
            )
        return web.Response(status=202)
    raise _method_not_allowed(request)


# -- blobs -----------------------------------------------------------------------------------


async def blobs(
    request: web.Request, registry: HostedRegistry, name: Name, ref: str
) -> web.StreamResponse:
    principal = request[PRINCIPAL]
    digest = parse_content_digest(ref)
    if request.method == "DELETE":
        registry.require(principal, name, "delete")
        if not await registry.delete_blob(name, digest):
            raise RegistryError("BLOB_UNKNOWN", "blob unknown", {"digest": digest})
        return web.Response(status=202)
    if request.method not in ("GET", "HEAD"):
        raise _method_not_allowed(request)
    registry.require(principal, name, "pull")
    request[CACHE_RESULT] = "hosted"
    headers = {
        "Content-Type": "application/octet-stream",
        "Accept-Ranges": "bytes",
        "Cache-Control": "max-age=31536000, immutable",
        **_digest_headers(digest),
    }
    head = request.method == "HEAD"
    size = await registry.blob_size(name, digest, fetch=not head)
    if head and size is not None:
        answer = web.StreamResponse(headers={**headers, "Content-Length": str(size)})
        await answer.prepare(request)
        await answer.write_eof()
        return answer
    blob = None if size is None else await asyncio.to_thread(_open, registry, digest)
    if blob is None:
        raise RegistryError("BLOB_UNKNOWN", "blob unknown", {"digest": digest})
    try:
        ranges = _ranges(request.headers.get("Range"), blob.size)
    except RegistryError:
        blob.close()
        raise
    if blob.size == 0:  # nothing to send (sendfile refuses a count of 0)
        blob.close()
        empty = web.StreamResponse(headers={**headers, "Content-Length": "0"})
        await empty.prepare(request)
        await empty.write_eof()
        return empty
    return await send_blob(request, FileBody(blob), blob.size, headers, ranges)


def _open(registry: HostedRegistry, digest: Digest) -> OpenBlob | None:
    try:
        f = open(registry.blob_path(digest), "rb")  # noqa: SIM115 - handed to the response
    except FileNotFoundError:
        return None
    return OpenBlob(f, os.fstat(f.fileno()).st_size)


def _ranges(header: str | None, size: int) -> list[ByteRange] | None:
    """The spec's reading of `Range`: a reversed range (`500-0`) is unsatisfiable (416), as
    is one past the end; other malformed headers mean the whole blob."""
    if header is None:
        return None
    unsatisfiable = RegistryError(
        "RANGE_INVALID",
        "requested range not satisfiable",
        {"range": header[:128], "size": size},
        headers={"Content-Range": f"bytes */{size}"},
    )
    unit, _, specs = header.partition("=")
    if unit.strip().lower() == "bytes":
        for spec in specs.split(","):
            m = _RANGE_SPEC_RE.fullmatch(spec)
            if m is not None and int(m[2]) < int(m[1]):
                raise unsatisfiable
    if size == 0:
        return None
    try:
        return list(parse_range(header, size) or []) or None
    except Unsatisfiable:
        raise unsatisfiable from None


# -- uploads ---------------------------------------------------------------------------------


def _upload_headers(name: Name, upload_id: str, size: int) -> dict[str, str]:
    return {
        "Location": f"/v2/{name}/blobs/uploads/{upload_id}",
        "Range": f"0-{max(size - 1, 0)}",
        "Docker-Upload-UUID": upload_id,
    }


def _content_range(request: web.Request) -> tuple[int | None, int | None]:
    """(start, length) from `Content-Range` (`start-end`), else (None, Content-Length)."""
    header = request.headers.get("Content-Range")
    if header is None:
        return None, request.content_length
    m = _CONTENT_RANGE_RE.fullmatch(header.strip())
    if m is None or int(m[2]) < int(m[1]):
        raise RegistryError(
            "BLOB_UPLOAD_INVALID",
            "Content-Range must be start-end, the chunk's first and last byte",
            {"content_range": header[:64]},
            status=416,
        )
    start, end = int(m[1]), int(m[2])
    length = end - start + 1
    if request.content_length is not None and request.content_length != length:
        raise RegistryError(
            "SIZE_INVALID",
            "Content-Length and Content-Range disagree",
            {"content_length": request.content_length, "content_range": header[:64]},
        )
    return start, length


async def uploads(
    request: web.Request, registry: HostedRegistry, name: Name, upload_id: str
) -> web.StreamResponse:
    principal = request[PRINCIPAL]
    registry.require(principal, name, "push")
    method = request.method
    if upload_id == "":
        if method != "POST":
            raise _method_not_allowed(request)
        return await _start(request, registry, name)
    if method in ("GET", "HEAD"):
        state = await registry.upload_state(name, upload_id)
        return web.Response(status=204, headers=_upload_headers(name, upload_id, state.size))
    if method == "DELETE":
        await registry.cancel(name, upload_id)
        return web.Response(status=204)
    if method == "PATCH":
        _no_deadline(request)
        start, length = _content_range(request)
        try:
            state = await registry.append(
                name, upload_id, _body(request), start=start, length=length
            )
        except RegistryError as exc:
            if exc.status == 416:
                exc.headers.update(
                    {"Location": f"/v2/{name}/blobs/uploads/{upload_id}", **exc.headers}
                )
            raise
        return web.Response(status=202, headers=_upload_headers(name, upload_id, state.size))
    if method == "PUT":
        _no_deadline(request)
        digest = _digest_param(request)
        if request.content_length or request.headers.get("Transfer-Encoding"):
            start, length = _content_range(request)
            await registry.append(name, upload_id, _body(request), start=start, length=length)
        await registry.commit(name, upload_id, digest)
        return _created(name, digest)
    raise _method_not_allowed(request)


def _digest_param(request: web.Request) -> Digest:
    value = request.query.get("digest")
    if value is None:
        raise RegistryError("DIGEST_INVALID", "the digest query parameter is required")
    return parse_content_digest(value)


def _created(name: Name, digest: Digest) -> web.Response:
    headers = {"Location": f"/v2/{name}/blobs/{digest}", **_digest_headers(digest)}
    return web.Response(status=201, headers=headers)


async def _start(request: web.Request, registry: HostedRegistry, name: Name) -> web.Response:
    """POST: a mount, a monolithic upload (`?digest=` with the body), or a new session."""
    principal = request[PRINCIPAL]
    mount = request.query.get("mount")
    if mount is not None:
        digest = parse_content_digest(mount)
        source = request.query.get("from")
        if source is not None:
            source = parse_name(source)
        if await registry.mount(name, digest, source, principal):
            return _created(name, digest)
    digest_param = request.query.get("digest")
    upload_id = await registry.start_upload(name)
    if digest_param is not None and mount is None:
        digest = parse_content_digest(digest_param)
        _no_deadline(request)
        try:
            await registry.append(name, upload_id, _body(request), length=request.content_length)
            await registry.commit(name, upload_id, digest)
        except BaseException:
            await asyncio.shield(_forget(registry, name, upload_id))
            raise
        return _created(name, digest)
    return web.Response(status=202, headers=_upload_headers(name, upload_id, 0))


async def _forget(registry: HostedRegistry, name: Name, upload_id: str) -> None:
    with contextlib.suppress(RegistryError):  # already ended (a mismatch cancels it)
        await registry.cancel(name, upload_id)


# -- listings --------------------------------------------------------------------------------


def _page_params(request: web.Request) -> tuple[int | None, str | None]:
    n: int | None = None
    if "n" in request.query:
        text = request.query["n"]
        if not _COUNT_RE.fullmatch(text) or int(text) > MAX_PAGE:
            raise RegistryError(
                "PAGINATION_NUMBER_INVALID",
                f"n must be a whole number from 0 to {MAX_PAGE}",
                {"n": text[:32]},
            )
        n = int(text)
    return n, request.query.get("last")


async def tags(request: web.Request, registry: HostedRegistry, name: Name) -> web.Response:
    if request.method not in ("GET", "HEAD"):
        raise _method_not_allowed(request)
    registry.require(request[PRINCIPAL], name, "pull")
    request[CACHE_RESULT] = "hosted"
    found = await registry.tags(name)
    if found is None:
        raise RegistryError("NAME_UNKNOWN", "repository name not known", {"name": name})
    n, last = _page_params(request)
    page = tag_page(name, found, n, last)
    response = web.json_response({"name": name, "tags": page.tags})
    if page.link:
        response.headers["Link"] = page.link
    return response


async def catalog(request: web.Request, registry: HostedRegistry) -> web.Response:
    """Hosted repositories only (the mirrored ones are the upstreams'), and only those the
    client may pull."""
    names = await registry.repositories(request[PRINCIPAL])
    n, last = _page_params(request)
    page = tag_page("", names, n, last)
    response = web.json_response({"repositories": page.tags})
    if page.link:
        response.headers["Link"] = page.link.replace("/v2//tags/list", "/v2/_catalog")
    return response


async def referrers(
    request: web.Request, registry: HostedRegistry, name: Name, ref: str
) -> web.Response:
    if request.method not in ("GET", "HEAD"):
        raise _method_not_allowed(request)
    registry.require(request[PRINCIPAL], name, "pull")
    subject = parse_content_digest(ref)
    artifact_type = request.query.get("artifactType")
    answer = referrers_index(await registry.referrers(name, subject), artifact_type)
    headers = {"Content-Type": answer.content_type}
    if answer.filtered:
        headers["OCI-Filters-Applied"] = "artifactType"
    return web.Response(body=answer.body, headers=headers)
