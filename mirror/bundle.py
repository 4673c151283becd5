"""Carrying a cache across an air gap: OCI image layouts (a tar, or a directory) out and in.

`export` writes images from the cache as a standard OCI image layout, so skopeo and other tools
read it too; each image's tag is kept as `org.opencontainers.image.ref.name` (`repo:tag`) and its
upstream in our own annotation. Beside `index.json`, `registry-mirror.json` carries provenance
(a file skopeo ignores): for each digest, whether it came from a repository anyone may read and
from which private ones; for each tagged repository, whether it is private. A digest the source
knows nothing of is left out (unknown, never "public"), and a layout without the file (skopeo's)
carries no provenance at all: a guarded mirror offline then serves its digests only to clients
allowed everything private.

`import` checks the shape of every JSON document, that every file is a regular file, and every
blob's size and digest before anything is written: a malformed or corrupt bundle changes nothing.
Blobs then enter the store one verified atomic rename at a time, provenance next, tags last, so
an interrupted import leaves only verified, content-addressed blobs and no tag pointing at
missing content.

A bundle crosses an air gap: whoever made it may be hostile, so it is believed only this far.
- Provenance is taken only for digests whose bytes the bundle carries and that verified. Saying
  "public" lets anyone pull those bytes; naming a private repository lets that repository's
  readers pull them. Either way only bytes the bundle's author holds and could hand out anyway,
  so no claim opens content the author does not have. Origins only grow: a private repository
  named is one more place a digest may be served from, never a public one.
- A repository's privacy reaches beyond the bundle (its other tags in the cache), so it is taken
  only for repositories the bundle carries tags of. "Private" is always taken (it only narrows
  who may pull). "Public" is taken only where the cache knows nothing of the repository, with no
  privacy record and no tag before this import; it never turns a private record public.
- Imported privacy and tags are recorded as checked at time 0, i.e. long expired: an online
  mirror asks its upstream before relying on them (a bundle cannot override what the upstream
  says a tag is, or whether a repository is private), while an offline one, which ignores the
  TTLs, serves them.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from mirror.cache.metadata import MetadataStore, Origins, Privacy, RepoKey, TagRecord
from mirror.errors import DigestMismatch, RegistryError
from mirror.maintenance import CacheHandle
from mirror.mediatypes import ALL_MANIFESTS, sniff_media_type
from mirror.mirror import Manifest, Mirror
from mirror.progress import Progress
from mirror.reference import SHA256_RE, Digest, Name, is_digest, parse_image, parse_name, parse_tag
from mirror.referrers import record_tag
from mirror.upstream.routing import Target

REF_NAME = "org.opencontainers.image.ref.name"
UPSTREAM_ANNOTATION = "io.registry-mirror.upstream"
# On a referrer's entry: JSON {subject, repository, artifactType?, annotations?} (no tag).
REFERRER_ANNOTATION = "io.registry-mirror.referrer"
SCHEME_SUFFIXES = ("sig", "att", "sbom")  # cosign's tag scheme: sha256-<hex>.<suffix>
LAYOUT = json.dumps({"imageLayoutVersion": "1.0.0"}).encode()
SIDECAR = "registry-mirror.json"  # provenance, beside index.json
SIDECAR_VERSION = 1
CHUNK = 4 << 20
MANIFEST_LIMIT = 4 << 20
EXPIRED = 0.0  # `fetched_at`/`checked_at` of imported records: revalidated on first online use
READ_ERRORS = (OSError, tarfile.TarError, EOFError, zlib.error)


class BundleError(Exception):
    """A bundle that cannot be exported or imported; `str()` is the one line to show."""


# -- export ---------------------------------------------------------------------------------


async def export(handle: CacheHandle, images: list[str], out: Path, fmt: str) -> int:
    """Write `images` (all platforms) from the cache to `out`; returns the bytes written."""
    mirror = handle.mirror
    entries: list[dict[str, object]] = []
    blobs: dict[Digest, Path] = {}
    repos: set[RepoKey] = set()
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
        needed = await handle.policy.references(digest)
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
            repos.add((target.upstream.name, target.repository))
        entries.append(
            {
                "mediaType": manifest.media_type,
                "digest": digest,
                "size": len(manifest.data),
                "annotations": annotations,
            }
        )
        entries += await _referrers(handle, target, digest, blobs, repos)
    index = json.dumps({"schemaVersion": 2, "manifests": entries}, indent=2).encode()
    sidecar = await _provenance(handle.metadata, sorted(blobs), sorted(repos))
    return await asyncio.to_thread(_write_layout, out, fmt, index, sidecar, blobs)


async def _referrers(
    handle: CacheHandle,
    target: Target,
    subject: Digest,
    blobs: dict[Digest, Path],
    repos: set[RepoKey],
) -> list[dict[str, object]]:
    """Index entries for what the cache holds of `subject`'s referrers (signatures, SBOMs,
    attestations: `warm --with-referrers` fetches them), so an offline site can still list
    and verify them: each cached referrer whose content is all cached, and the tag scheme's
    tags (`sha256-<hex>.sig`, ...) as tags. Referrers not cached are left out."""
    mirror = handle.mirror
    entries: list[dict[str, object]] = []
    upstream = target.upstream.name
    prefix = "sha256-" + subject.removeprefix("sha256:")
    for tag in [prefix, *(f"{prefix}.{suffix}" for suffix in SCHEME_SUFFIXES)]:
        record = await mirror.metadata.get_tag((upstream, target.repository, tag))
        manifest = None if record is None else await _all_cached(handle, record.digest, blobs)
        if manifest is None:
            continue
        repos.add((upstream, target.repository))
        annotations = {UPSTREAM_ANNOTATION: upstream, REF_NAME: f"{target.repository}:{tag}"}
        entries.append(
            {
                "mediaType": manifest.media_type,
                "digest": manifest.digest,
                "size": len(manifest.data),
                "annotations": annotations,
            }
        )
    for desc in await mirror.referrers_service.cached_descriptors(target, subject):
        digest = Digest(desc["digest"])
        if await _all_cached(handle, digest, blobs) is None:
            continue
        about = {"subject": subject, "repository": target.repository}
        about |= {k: desc[k] for k in ("artifactType", "annotations") if k in desc}
        annotations = {UPSTREAM_ANNOTATION: upstream, REFERRER_ANNOTATION: json.dumps(about)}
        entries.append(
            {
                "mediaType": desc["mediaType"],
                "digest": digest,
                "size": desc["size"],
                "annotations": annotations,
            }
        )
    return entries


async def _all_cached(
    handle: CacheHandle, digest: Digest, blobs: dict[Digest, Path]
) -> Manifest | None:
    """The manifest if it and all it references are cached (they then join `blobs`)."""
    manifest = await handle.mirror.cached_manifest(digest)
    if manifest is None:
        return None
    needed = await handle.policy.references(digest)
    if any(not handle.store.path_for(d).exists() for d in needed):
        return None
    blobs.update({d: handle.store.path_for(d) for d in sorted(needed)})
    return manifest


async def _provenance(
    metadata: MetadataStore, digests: list[Digest], repos: list[RepoKey]
) -> bytes:
    """The sidecar: what the cache knows of each digest's origins and each repository's
    privacy. Unknown is left out, so it stays unknown on the other side."""
    origins: dict[str, object] = {}
    for digest in digests:
        known = await metadata.get_origins(digest)
        if known is not None and (known.public or known.repos):
            origins[digest] = {"public": known.public, "repos": sorted(known.repos)}
    privacy = []
    for upstream, repository in repos:
        status = await metadata.get_privacy((upstream, repository))
        if status is not None:
            privacy.append(
                {"upstream": upstream, "repository": repository, "private": status.private}
            )
    doc = {"version": SIDECAR_VERSION, "origins": origins, "privacy": privacy}
    return json.dumps(doc, indent=2).encode()


def _write_layout(
    out: Path, fmt: str, index: bytes, sidecar: bytes, blobs: dict[Digest, Path]
) -> int:
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    files = (("oci-layout", LAYOUT), ("index.json", index), (SIDECAR, sidecar))
    total = 0
    if fmt == "dir":
        (tmp / "blobs" / "sha256").mkdir(parents=True)
        for name, data in files:
            (tmp / name).write_bytes(data)
        for digest, path in blobs.items():
            shutil.copyfile(path, tmp / "blobs" / "sha256" / digest[7:])
            total += path.stat().st_size
        if out.exists():
            shutil.rmtree(out)
    else:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for arcname, data in files:
                info = tarfile.TarInfo(arcname)
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
            for digest, path in blobs.items():
                tar.add(path, arcname=f"blobs/sha256/{digest[7:]}", recursive=False)
                total += path.stat().st_size
    os.replace(tmp, out)
    return total


# -- reading a bundle -----------------------------------------------------------------------


class Layout:
    """Read access to an OCI layout in a directory or a tar file: regular files only (a
    symlink to /dev/zero or a device member would be read forever), no symlink followed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        if path.is_file():
            try:
                self._tar = tarfile.open(path, "r:*")  # noqa: SIM115 - closed by close()
                self._members = {m.name.removeprefix("./"): m for m in self._tar.getmembers()}
            except READ_ERRORS as exc:
                self.close()
                raise BundleError(f"{path} is not a readable tar file: {exc}") from None
        elif not path.is_dir():
            raise BundleError(f"{path} does not exist")

    def has(self, name: str) -> bool:
        if self._tar is not None:
            return name in self._members
        return os.path.lexists(self.path / name)

    @contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        if self._tar is None:
            with os.fdopen(self._open_regular(name), "rb") as f:
                yield f
            return
        member = self._members.get(name)
        if member is None:
            raise BundleError(f"the bundle lacks {name}")
        if not member.isreg():
            raise BundleError(f"the bundle's {name} is not a regular file")
        try:
            extracted = self._tar.extractfile(member)
        except READ_ERRORS as exc:
            raise BundleError(f"cannot read {name} from the bundle: {exc}") from None
        if extracted is None:
            raise BundleError(f"the bundle's {name} is not a regular file")
        with extracted:
            yield extracted

    def _open_regular(self, name: str) -> int:
        """A descriptor for `name` reached without following any symlink; O_NONBLOCK so that
        a FIFO cannot hang the open itself."""
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        parts = name.split("/")
        try:
            directory = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                for part in parts[:-1]:
                    inner = os.open(part, flags | os.O_DIRECTORY, dir_fd=directory)
                    os.close(directory)
                    directory = inner
                fd = os.open(parts[-1], flags, dir_fd=directory)
            finally:
                os.close(directory)
        except FileNotFoundError:
            raise BundleError(f"the bundle lacks {name}") from None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise BundleError(f"the bundle's {name} is not a regular file") from None
            raise BundleError(f"cannot read {name} from the bundle: {exc.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise BundleError(f"the bundle's {name} is not a regular file")
        return fd

    def read(self, name: str, limit: int) -> bytes:
        """The whole of `name`, refused if longer than `limit` (at most limit+1 bytes read)."""
        with self.open(name) as f:
            data = _read(f, limit + 1, name)
        if len(data) > limit:
            raise BundleError(f"the bundle's {name} is larger than {limit} bytes")
        return data

    def hash(self, name: str, size: int) -> str:
        """The digest of `name`, which must be exactly `size` bytes (at most size+1 are read)."""
        sha, seen = hashlib.sha256(), 0
        with self.open(name) as f:
            while seen <= size and (chunk := _read(f, min(CHUNK, size + 1 - seen), name)):
                sha.update(chunk)
                seen += len(chunk)
        _check_size(name, seen, size)
        return "sha256:" + sha.hexdigest()

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()


def _read(f: IO[bytes], n: int, name: str) -> bytes:
    try:
        return f.read(n)
    except READ_ERRORS as exc:
        raise BundleError(f"cannot read {name} from the bundle: {exc}") from None


def _check_size(name: str, actual: int, size: int) -> None:
    if actual > size:
        raise BundleError(
            f"the bundle's {name} is longer than the {size} bytes its descriptor says"
        )
    if actual < size:
        raise BundleError(f"the bundle's {name} is {actual} bytes, its descriptor says {size}")


# -- checking JSON shapes -------------------------------------------------------------------


def _json(data: bytes, what: str) -> object:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise BundleError(f"{what} is not valid JSON") from None


def _object(value: object, what: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise BundleError(f"{what} is not a JSON object")
    return value


def _array(value: object, what: str) -> list[object]:
    if not isinstance(value, list):
        raise BundleError(f"{what} is not a JSON array")
    return value


def _string(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise BundleError(f"{what} is not a string")
    return value


def _bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise BundleError(f"{what} is not true or false")
    return value


def _digest(value: object, what: str) -> Digest:
    if not isinstance(value, str) or not SHA256_RE.fullmatch(value):
        raise BundleError(f"{what} is not a sha256 digest")
    return Digest(value)


def _optional(doc: dict[str, object], key: str, what: str) -> list[object]:
    """An array member that may be absent (absent: empty)."""
    return _array(doc[key], f"{what} {key}") if key in doc else []


@dataclass(frozen=True)
class Descriptor:
    digest: Digest
    size: int
    media_type: str


def _descriptor(value: object, what: str) -> Descriptor:
    doc = _object(value, what)
    size = doc.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise BundleError(f"{what} has no valid size")
    media_type = _string(doc.get("mediaType", ""), f"{what} mediaType")
    return Descriptor(_digest(doc.get("digest"), f"{what} digest"), size, media_type)


def _blob_name(digest: Digest) -> str:
    return f"blobs/sha256/{digest[7:]}"


# -- import ---------------------------------------------------------------------------------


@dataclass
class Plan:
    """What a verified bundle holds, and what it says of where that came from."""

    blobs: dict[Digest, int] = field(default_factory=dict)  # digest -> size
    manifest_types: dict[Digest, str] = field(default_factory=dict)
    tags: list[tuple[str, Name, str, Digest, str]] = field(default_factory=list)
    origins: dict[Digest, Origins] = field(default_factory=dict)  # absent: unknown
    # Referrers lists to restore: (upstream, repository, subject) -> descriptors.
    referrers: dict[tuple[str, Name, Digest], list[dict[str, object]]] = field(default_factory=dict)
    privacy: dict[tuple[str, Name], bool] = field(default_factory=dict)  # (upstream, repo)
    # Filled by `import_bundle`: the blobs this import wrote (the rest were cached already).
    written: dict[Digest, int] = field(default_factory=dict)


def plan_import(layout: Layout, repository: str | None, progress: Progress) -> Plan:
    """Read and verify the whole bundle (blocking). Raises BundleError; writes nothing."""
    version = _object(_json(layout.read("oci-layout", 4096), "oci-layout"), "oci-layout")
    if version.get("imageLayoutVersion") != "1.0.0":
        raise BundleError(f"unsupported OCI layout version {version.get('imageLayoutVersion')!r}")
    index = _object(_json(layout.read("index.json", MANIFEST_LIMIT), "index.json"), "index.json")
    plan = Plan()
    sizes: dict[Digest, int] = {}
    manifests: list[Descriptor] = []
    for i, value in enumerate(_array(index.get("manifests"), "index.json manifests")):
        what = f"index.json manifests[{i}]"
        desc = _descriptor(value, what)
        manifests.append(desc)
        annotations = _object(_object(value, what).get("annotations", {}), f"{what} annotations")
        if REFERRER_ANNOTATION in annotations:
            upstream = _string(annotations.get(UPSTREAM_ANNOTATION, ""), f"{what} upstream")
            _read_referrer(plan, upstream, desc, annotations[REFERRER_ANNOTATION], what)
        if REF_NAME in annotations:
            ref = _string(annotations[REF_NAME], f"{what} {REF_NAME}")
            name, tag = _split_ref(ref, repository)
            upstream = _string(annotations.get(UPSTREAM_ANNOTATION, ""), f"{what} upstream")
            plan.tags.append((upstream, name, tag, desc.digest, desc.media_type))
    while manifests:
        desc = manifests.pop()
        _expect_size(sizes, desc)
        if desc.digest in plan.manifest_types:
            continue
        what = f"manifest {desc.digest}"
        if desc.size > MANIFEST_LIMIT:
            raise BundleError(f"{what} is larger than {MANIFEST_LIMIT} bytes")
        data = layout.read(_blob_name(desc.digest), desc.size)
        _check_size(_blob_name(desc.digest), len(data), desc.size)
        if "sha256:" + hashlib.sha256(data).hexdigest() != desc.digest:
            raise BundleError(f"{what} does not match its digest: bundle refused")
        doc = _object(_json(data, what), what)
        media_type = desc.media_type or sniff_media_type(data) or ""
        if media_type not in ALL_MANIFESTS:
            raise BundleError(f"{what} has media type {media_type[:100]!r}, not a manifest's")
        plan.manifest_types[desc.digest] = media_type
        plan.blobs[desc.digest] = desc.size
        for i, child in enumerate(_optional(doc, "manifests", what)):
            manifests.append(_descriptor(child, f"{what} manifests[{i}]"))
        blobs = [_descriptor(doc["config"], f"{what} config")] if "config" in doc else []
        for i, value in enumerate(_optional(doc, "layers", what)):
            blobs.append(_descriptor(value, f"{what} layers[{i}]"))
        for blob in blobs:
            _expect_size(sizes, blob)
            plan.blobs.setdefault(blob.digest, blob.size)
    if layout.has(SIDECAR):
        _read_provenance(layout.read(SIDECAR, 64 << 20), plan)
    for size in plan.blobs.values():
        progress.add(size)
    for digest, size in plan.blobs.items():
        if digest in plan.manifest_types:
            progress.finished(size, digest)
            continue
        if layout.hash(_blob_name(digest), size) != digest:
            raise BundleError(f"blob {digest} does not match its digest: bundle refused")
        progress.finished(size, f"verified {digest}")
    return plan


def _read_referrer(plan: Plan, upstream: str, desc: Descriptor, value: object, what: str) -> None:
    """A referrer entry: whose referrer it is, and the labels its descriptor carries. Only
    labels: the referrer's bytes are verified like every manifest, and a signature's payload
    still has to name the digest it is checked for."""
    what = f"{what} {REFERRER_ANNOTATION}"
    doc = _object(_json(_string(value, what).encode(), what), what)
    subject = _digest(doc.get("subject"), f"{what} subject")
    try:
        name = parse_name(_string(doc.get("repository"), f"{what} repository"))
    except RegistryError as exc:
        raise BundleError(f"{what}: {exc.message}") from None
    descriptor: dict[str, object] = {
        "mediaType": desc.media_type,
        "digest": desc.digest,
        "size": desc.size,
    }
    if "artifactType" in doc:
        descriptor["artifactType"] = _string(doc["artifactType"], f"{what} artifactType")
    if "annotations" in doc:
        labels = _object(doc["annotations"], f"{what} annotations")
        descriptor["annotations"] = {
            k: _string(v, f"{what} annotations[{k[:50]!r}]") for k, v in labels.items()
        }
    plan.referrers.setdefault((upstream, name, subject), []).append(descriptor)


def _expect_size(sizes: dict[Digest, int], desc: Descriptor) -> None:
    if sizes.setdefault(desc.digest, desc.size) != desc.size:
        raise BundleError(f"the bundle's descriptors of {desc.digest} disagree on its size")


def _read_provenance(data: bytes, plan: Plan) -> None:
    """Check the sidecar's shape, and that it speaks only of what the bundle holds."""
    doc = _object(_json(data, SIDECAR), SIDECAR)
    if doc.get("version") != SIDECAR_VERSION:
        raise BundleError(f"{SIDECAR} has unsupported version {doc.get('version')!r}")
    origins = _object(doc.get("origins", {}), f"{SIDECAR} origins")
    for key, value in origins.items():
        digest = _digest(key, f"{SIDECAR} origins key {key[:80]!r}")
        what = f"{SIDECAR} origins of {digest}"
        if digest not in plan.blobs:
            raise BundleError(f"{what}: the bundle does not contain {digest}")
        entry = _object(value, what)
        repos = [_repo_key(r, f"{what} repos") for r in _array(entry.get("repos", []), what)]
        plan.origins[digest] = Origins(
            _bool(entry.get("public"), f"{what} public"), frozenset(repos)
        )
    tagged = {(upstream, name) for upstream, name, _, _, _ in plan.tags}
    for i, value in enumerate(_array(doc.get("privacy", []), f"{SIDECAR} privacy")):
        what = f"{SIDECAR} privacy[{i}]"
        entry = _object(value, what)
        upstream = _string(entry.get("upstream"), f"{what} upstream")
        repository = _string(entry.get("repository"), f"{what} repository")
        if (upstream, repository) not in tagged:
            raise BundleError(f"{what}: the bundle has no tag of {repository[:200]!r}")
        plan.privacy[(upstream, Name(repository))] = _bool(entry.get("private"), f"{what} private")


def _repo_key(value: object, what: str) -> str:
    """`<upstream>/<repository>`, as provenance records name private repositories."""
    key = _string(value, what)
    upstream, _, repository = key.partition("/")
    try:
        parse_name(repository)
    except RegistryError:
        raise BundleError(f"{what}: {key[:200]!r} is not <upstream>/<repository>") from None
    if not upstream:
        raise BundleError(f"{what}: {key[:200]!r} is not <upstream>/<repository>")
    return key


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
        raise BundleError(f"the bundle's image {ref[:200]!r}: {exc.message}") from None


def _local_key(mirror: Mirror, upstream_name: str, name: Name) -> RepoKey:
    """Where a bundle's repository lives here: its upstream by name if configured, else
    wherever this mirror routes the name."""
    upstream = mirror.router.upstreams.get(upstream_name)
    if upstream is not None:
        return upstream.name, upstream.repository(name)
    try:
        target = mirror.router.route(name)
    except RegistryError as exc:
        raise BundleError(f"the bundle's repository {name}: {exc.message}") from None
    return target.upstream.name, target.repository


async def import_bundle(
    handle: CacheHandle, path: Path, repository: str | None, progress: Progress
) -> Plan:
    layout = await asyncio.to_thread(Layout, path)
    try:
        plan = await asyncio.to_thread(plan_import, layout, repository, progress)
        progress.close()
        mirror, metadata = handle.mirror, handle.metadata
        tags = [(_local_key(mirror, up, name), tag, d) for up, name, tag, d, _ in plan.tags]
        privacy = {_local_key(mirror, up, name): p for (up, name), p in plan.privacy.items()}
        tagged = await asyncio.to_thread(
            lambda: {(up, repo) for (up, repo, _), _ in metadata.iter_tags()}
        )
        plan.written = await _write_blobs(handle, layout, plan)
        for digest, media_type in plan.manifest_types.items():
            await metadata.put_media_type(digest, media_type)
        await _restore_origins(metadata, plan.origins)
        await _restore_privacy(metadata, privacy, tagged)
        for (upstream, repo), tag, digest in tags:
            record = TagRecord(digest, plan.manifest_types[digest], EXPIRED)
            await metadata.put_tag((upstream, repo, tag), record)
        for (up, name, subject), descriptors in plan.referrers.items():
            upstream, repo = _local_key(mirror, up, name)
            key = (upstream, repo, record_tag(subject))
            await mirror.referrers_service.restore(key, list(descriptors), EXPIRED)
        return plan
    finally:
        layout.close()


async def _write_blobs(handle: CacheHandle, layout: Layout, plan: Plan) -> dict[Digest, int]:
    """Store the blobs not cached yet; returns those written (digest -> size)."""
    store = handle.store
    written: dict[Digest, int] = {}
    for digest, size in plan.blobs.items():
        if await store.stat(digest) is not None:
            continue
        name = _blob_name(digest)
        writer = await store.begin_write(digest, size)
        try:
            with layout.open(name) as f:
                left = size
                while left:
                    chunk = await asyncio.to_thread(_read, f, min(CHUNK, left), name)
                    if not chunk:
                        raise BundleError(f"the bundle's {name} changed while it was imported")
                    await writer.write(chunk)
                    left -= len(chunk)
            await writer.commit()  # verifies once more: the bundle may have changed
        except DigestMismatch:
            await writer.abort()
            raise BundleError(f"the bundle's {name} changed while it was imported") from None
        except BaseException:
            await writer.abort()
            raise
        handle.index.add(digest, size, "manifest" if digest in plan.manifest_types else "blob")
        written[digest] = size
    return written


async def _restore_origins(metadata: MetadataStore, origins: dict[Digest, Origins]) -> None:
    """Add what the bundle says (only of digests it carries, checked by `plan_import`)."""
    if public := [d for d, o in origins.items() if o.public]:
        await metadata.add_origin(public, None)
    by_repo: dict[str, list[Digest]] = {}
    for digest, known in origins.items():
        for repo in known.repos:
            by_repo.setdefault(repo, []).append(digest)
    for repo, digests in sorted(by_repo.items()):
        await metadata.add_origin(digests, repo)


async def _restore_privacy(
    metadata: MetadataStore, privacy: dict[RepoKey, bool], tagged: set[RepoKey]
) -> None:
    """A private claim only narrows who may pull, so it is always taken; a public one only
    fills a gap (see the module's note on what a bundle may claim)."""
    for key, private in sorted(privacy.items()):
        known = await metadata.get_privacy(key)
        if private and (known is None or not known.private):
            await metadata.put_privacy(key, Privacy(True, EXPIRED))
        elif not private and known is None and key not in tagged:
            await metadata.put_privacy(key, Privacy(False, EXPIRED))
