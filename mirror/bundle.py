"""Carrying a cache across an air gap: OCI image layouts (a tar, or a directory) out and in.

`export` writes images from the cache as a standard OCI image layout, so skopeo and other tools
read it too; each image's tag is kept as `org.opencontainers.image.ref.name` (`repo:tag`) and its
upstream in our own annotation. `import` reads such a layout (ours or skopeo's) and verifies
every blob against its digest before anything is written: a corrupt bundle changes nothing.
Blobs then enter the store one verified atomic rename at a time, tags last, so an interrupted
import leaves only verified, content-addressed blobs and no tag pointing at missing content.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from mirror.cache.metadata import TagRecord
from mirror.errors import RegistryError
from mirror.maintenance import CacheHandle
from mirror.mediatypes import sniff_media_type
from mirror.progress import Progress
from mirror.reference import SHA256_RE, Digest, Name, is_digest, parse_image, parse_name, parse_tag

REF_NAME = "org.opencontainers.image.ref.name"
UPSTREAM_ANNOTATION = "io.registry-mirror.upstream"
LAYOUT = json.dumps({"imageLayoutVersion": "1.0.0"}).encode()
CHUNK = 4 << 20


class BundleError(Exception):
    """A bundle that cannot be exported or imported; `str()` is the one line to show."""


# -- export ---------------------------------------------------------------------------------


async def export(handle: CacheHandle, images: list[str], out: Path, fmt: str) -> int:
    """Write `images` (all platforms) from the cache to `out`; returns the bytes written."""
    mirror = handle.mirror
    entries: list[dict[str, object]] = []
    blobs: dict[Digest, Path] = {}
    for image in images:
        name, reference = parse_image(image)
        target = mirror.router.route(name)
        if is_digest(reference):
            digest = Digest(reference)
        else:
            key = (target.upstream.name, target.repository, reference)
            record = await mirror.metadata.get_tag(key)
            if record is None:
                raise BundleError(f"{image} is not in the cache (warm it first)")
            digest = record.digest
        manifest = await mirror.cached_manifest(digest)
        if manifest is None:
            raise BundleError(f"{image}: manifest {digest} is not in the cache (warm it first)")
        needed: set[Digest] = set()
        await mirror.collect_digests(digest, needed)
        missing = [d for d in sorted(needed) if not handle.store.path_for(d).exists()]
        if missing:
            raise BundleError(
                f"{image} is only partly cached ({len(missing)} blobs missing, e.g. {missing[0]});"
                " warm it first"
            )
        blobs.update({d: handle.store.path_for(d) for d in sorted(needed)})
        annotations = {UPSTREAM_ANNOTATION: target.upstream.name}
        if not is_digest(reference):
            annotations[REF_NAME] = f"{target.repository}:{reference}"
        entries.append(
            {
                "mediaType": manifest.media_type,
                "digest": digest,
                "size": len(manifest.data),
                "annotations": annotations,
            }
        )
    index = json.dumps({"schemaVersion": 2, "manifests": entries}, indent=2).encode()
    return await asyncio.to_thread(_write_layout, out, fmt, index, blobs)


def _write_layout(out: Path, fmt: str, index: bytes, blobs: dict[Digest, Path]) -> int:
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    total = 0
    if fmt == "dir":
        (tmp / "blobs" / "sha256").mkdir(parents=True)
        (tmp / "oci-layout").write_bytes(LAYOUT)
        (tmp / "index.json").write_bytes(index)
        for digest, path in blobs.items():
            shutil.copyfile(path, tmp / "blobs" / "sha256" / digest[7:])
            total += path.stat().st_size
        if out.exists():
            shutil.rmtree(out)
    else:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for arcname, data in (("oci-layout", LAYOUT), ("index.json", index)):
                info = tarfile.TarInfo(arcname)
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
            for digest, path in blobs.items():
                tar.add(path, arcname=f"blobs/sha256/{digest[7:]}", recursive=False)
                total += path.stat().st_size
    os.replace(tmp, out)
    return total


# -- import ---------------------------------------------------------------------------------


@dataclass
class Plan:
    """What a verified bundle holds."""

    blobs: dict[Digest, int] = field(default_factory=dict)  # digest -> size
    manifest_types: dict[Digest, str] = field(default_factory=dict)
    tags: list[tuple[str, Name, str, Digest, str]] = field(default_factory=list)


class Layout:
    """Read access to an OCI layout in a directory or a tar file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tar: tarfile.TarFile | None = None
        if path.is_file():
            try:
                self._tar = tarfile.open(path, "r:*")  # noqa: SIM115 - closed by close()
            except tarfile.TarError as exc:
                raise BundleError(f"{path} is not a tar file: {exc}") from None
        elif not path.is_dir():
            raise BundleError(f"{path} does not exist")

    @contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        if self._tar is None:
            try:
                with open(self.path / name, "rb") as f:
                    yield f
            except FileNotFoundError:
                raise BundleError(f"the bundle lacks {name}") from None
            return
        try:
            member = self._tar.extractfile(name)
        except KeyError:
            member = None
        if member is None:
            raise BundleError(f"the bundle lacks {name}")
        with member:
            yield member

    def read_small(self, name: str, limit: int = 4 << 20) -> bytes:
        with self.open(name) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise BundleError(f"{name} is too large")
        return data

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()


def _digest_of(f: IO[bytes]) -> tuple[str, int]:
    sha, size = hashlib.sha256(), 0
    while chunk := f.read(CHUNK):
        sha.update(chunk)
        size += len(chunk)
    return "sha256:" + sha.hexdigest(), size


def _blob_name(digest: str) -> str:
    if not SHA256_RE.fullmatch(digest):
        raise BundleError(f"unsupported or invalid digest {digest!r} in the bundle")
    return f"blobs/sha256/{digest[7:]}"


def plan_import(layout: Layout, repository: str | None, progress: Progress) -> Plan:
    """Read and verify the whole bundle (blocking). Raises BundleError; writes nothing."""
    try:
        version = json.loads(layout.read_small("oci-layout")).get("imageLayoutVersion")
        index = json.loads(layout.read_small("index.json"))
    except ValueError:
        raise BundleError("oci-layout or index.json is not JSON") from None
    if version != "1.0.0":
        raise BundleError(f"unsupported OCI layout version {version!r}")
    plan = Plan()
    manifests: list[tuple[Digest, str]] = []
    for entry in index.get("manifests") or []:
        digest = str(entry.get("digest"))
        _blob_name(digest)
        media_type = str(entry.get("mediaType") or "")
        manifests.append((Digest(digest), media_type))
        annotations = entry.get("annotations") or {}
        if ref := annotations.get(REF_NAME):
            name, tag = _split_ref(str(ref), repository)
            upstream = str(annotations.get(UPSTREAM_ANNOTATION) or "")
            plan.tags.append((upstream, name, tag, Digest(digest), media_type))
    seen: set[Digest] = set()
    while manifests:
        digest, media_type = manifests.pop()
        if digest in seen:
            continue
        seen.add(digest)
        data = layout.read_small(_blob_name(digest))
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise BundleError(f"manifest {digest} does not match its digest: bundle refused")
        media_type = media_type or sniff_media_type(data) or ""
        plan.manifest_types[digest] = media_type
        plan.blobs[digest] = len(data)
        doc = json.loads(data)
        for child in doc.get("manifests") or []:
            manifests.append((Digest(str(child.get("digest"))), str(child.get("mediaType") or "")))
            _blob_name(str(child.get("digest")))
        for desc in [doc.get("config"), *(doc.get("layers") or [])]:
            if isinstance(desc, dict):
                _blob_name(str(desc.get("digest")))
                plan.blobs.setdefault(Digest(str(desc["digest"])), int(desc.get("size") or 0))
    for size in plan.blobs.values():
        progress.add(size)
    for digest in list(plan.blobs):
        if digest in plan.manifest_types:
            progress.finished(plan.blobs[digest], digest)
            continue
        with layout.open(_blob_name(digest)) as f:
            actual, size = _digest_of(f)
        if actual != digest:
            raise BundleError(f"blob {digest} does not match its digest: bundle refused")
        plan.blobs[digest] = size
        progress.finished(size, f"verified {digest}")
    return plan


def _split_ref(ref: str, repository: str | None) -> tuple[Name, str]:
    """`repo:tag` (ours), or a bare tag (skopeo's) that needs `--repository`."""
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    try:
        if colon > slash:
            return parse_name(ref[:colon]), parse_tag(ref[colon + 1 :])
        if repository is None:
            raise BundleError(f"the bundle's image {ref!r} names no repository: pass --repository")
        return parse_name(repository), parse_tag(ref)
    except RegistryError as exc:
        raise BundleError(f"the bundle's image {ref!r}: {exc.message}") from None


async def import_bundle(
    handle: CacheHandle, path: Path, repository: str | None, progress: Progress
) -> Plan:
    layout = await asyncio.to_thread(Layout, path)
    try:
        plan = await asyncio.to_thread(plan_import, layout, repository, progress)
        progress.close()
        mirror, store = handle.mirror, handle.store
        for digest, size in plan.blobs.items():
            if await store.stat(digest) is not None:
                continue
            writer = await store.begin_write(digest, size)
            try:
                with layout.open(_blob_name(digest)) as f:
                    while chunk := await asyncio.to_thread(f.read, CHUNK):
                        await writer.write(chunk)
                await writer.commit()  # verifies once more: the bundle may have changed
            except BaseException:
                await writer.abort()
                raise
            kind = "manifest" if digest in plan.manifest_types else "blob"
            handle.index.add(digest, size, kind)
        for digest, media_type in plan.manifest_types.items():
            await handle.metadata.put_media_type(digest, media_type)
        now = mirror.clock()
        for upstream_name, name, tag, digest, media_type in plan.tags:
            upstream = mirror.router.upstreams.get(upstream_name)
            if upstream is not None:
                key = (upstream.name, upstream.repository(name), tag)
            else:
                target = mirror.router.route(name)
                key = (target.upstream.name, target.repository, tag)
            media_type = media_type or plan.manifest_types[digest]
            await handle.metadata.put_tag(key, TagRecord(digest, media_type, now))
        return plan
    finally:
        layout.close()
