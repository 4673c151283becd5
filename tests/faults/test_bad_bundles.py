"""A malformed or hostile bundle is refused with one line, and changes nothing in the cache.

Every JSON document of a bundle is type-checked, every file must be a regular file (a symlink to
/dev/zero once made `import` hash forever), and every blob must be as long as its descriptor says.
The bundles here are built by hand; the cache already holds an import, which must stay as it was.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diskcache
import pytest

from mirror.cli import main
from tests.fixtures.mirror_server import cached_files

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
Files = dict[str, Any]  # layout path -> bytes, or ("symlink"|"hardlink"|"device"|"fifo", target)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_path(digest: str) -> str:
    return f"blobs/sha256/{digest[7:]}"


class Bundle:
    """An OCI layout of one image (config and one layer), as plain JSON to break."""

    def __init__(self, repo: str = "library/app", seed: bytes = b"app") -> None:
        self.layer = hashlib.sha256(seed).digest() * 64  # 2 KiB, distinct per seed
        self.config = json.dumps({"architecture": "amd64", "os": "linux", "seed": seed.hex()})
        self.manifest: Any = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": self.descriptor(
                self.config.encode(), "application/vnd.oci.image.config.v1+json"
            ),
            "layers": [self.descriptor(self.layer, "application/vnd.oci.image.layer.v1.tar")],
        }
        self.entry_annotations: Any = {
            "org.opencontainers.image.ref.name": f"{repo}:1",
            "io.registry-mirror.upstream": "default",
        }
        self.entry_media_type: Any = OCI_MANIFEST
        self.index: Any = None  # built from the manifest unless a test sets it
        self.sidecar: Any = None
        self.extra: Files = {}

    @staticmethod
    def descriptor(data: bytes, media_type: str) -> dict[str, Any]:
        return {"mediaType": media_type, "digest": digest_of(data), "size": len(data)}

    @property
    def layer_digest(self) -> str:
        return digest_of(self.layer)

    def manifest_bytes(self) -> bytes:
        return json.dumps(self.manifest).encode()

    def files(self) -> Files:
        manifest = self.manifest_bytes()
        entry = self.descriptor(manifest, self.entry_media_type) | {
            "annotations": self.entry_annotations
        }
        index = self.index if self.index is not None else {"schemaVersion": 2, "manifests": [entry]}
        files: Files = {
            "oci-layout": b'{"imageLayoutVersion": "1.0.0"}',
            "index.json": json.dumps(index).encode(),
            blob_path(digest_of(manifest)): manifest,
            blob_path(digest_of(self.config.encode())): self.config.encode(),
            blob_path(self.layer_digest): self.layer,
        }
        if self.sidecar is not None:
            files["registry-mirror.json"] = json.dumps(self.sidecar).encode()
        # New names first (a link's target precedes it), replaced ones in their place.
        return {k: v for k, v in self.extra.items() if k not in files} | files | self.extra

    def write(self, out: Path, fmt: str) -> Path:
        (write_dir if fmt == "dir" else write_tar)(out, self.files())
        return out


def write_dir(out: Path, files: Files) -> None:
    for name, content in files.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content[0] == "symlink":
            path.symlink_to(content[1])
        elif content[0] == "fifo":
            os.mkfifo(path)
        else:
            raise AssertionError(f"no {content[0]} in a directory bundle")


def write_tar(out: Path, files: Files) -> None:
    kinds = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "device": tarfile.CHRTYPE}
    with tarfile.open(out, "w") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            if isinstance(content, bytes):
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
            else:
                info.type, info.linkname = kinds[content[0]], content[1]
                if content[0] == "device":
                    info.devmajor, info.devminor = 1, 5  # /dev/zero
                tar.addfile(info)


def metadata_snapshot(cache: Path) -> dict[Any, Any]:
    with diskcache.Cache(str(cache / "meta")) as db:
        return {key: db[key] for key in db.iterkeys()}


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """A cache that already holds one imported image (with provenance)."""
    cache = tmp_path / "cache"
    base = Bundle("library/base", b"base")
    base.sidecar = {
        "version": 1,
        "origins": {base.layer_digest: {"public": True, "repos": []}},
        "privacy": [{"upstream": "default", "repository": "library/base", "private": False}],
    }
    assert (
        main(["import", "--cache-dir", str(cache), str(base.write(tmp_path / "base.tar", "tar"))])
        == 0
    )
    return cache


def one_line(stderr: str) -> str:
    """The error: one line, the last (progress lines may come before it), no traceback."""
    lines = [line for line in stderr.splitlines() if not line.startswith("import: ")]
    assert len(lines) == 1 and lines[0].startswith("registry-mirror: import: "), stderr
    assert lines[0].endswith("; nothing was imported")
    return lines[0]


def refused(cache: Path, bundle: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Import `bundle`: exit 1, one line on stderr, blobs and metadata as they were."""
    before = cached_files(cache), metadata_snapshot(cache)
    capsys.readouterr()
    assert main(["import", "--cache-dir", str(cache), str(bundle)]) == 1
    err = one_line(capsys.readouterr().err)
    assert (cached_files(cache), metadata_snapshot(cache)) == before
    return err


def _set(path: list[Any], value: Any) -> Callable[[Bundle], None]:
    """A mutation: set bundle.<path[0]>[path[1]]... to `value`."""

    def mutate(bundle: Bundle) -> None:
        obj: Any = bundle
        head, *rest = path
        if not rest:
            setattr(bundle, head, value)
            return
        obj = getattr(bundle, head)
        for key in rest[:-1]:
            obj = obj[key]
        obj[rest[-1]] = value

    return mutate


def _sidecar(doc: Any) -> Callable[[Bundle], None]:
    def mutate(bundle: Bundle) -> None:
        bundle.sidecar = doc(bundle) if callable(doc) else doc

    return mutate


def _layer_size(delta: int) -> Callable[[Bundle], None]:
    def mutate(bundle: Bundle) -> None:
        bundle.manifest["layers"][0]["size"] += delta

    return mutate


SHAPES: list[tuple[str, Callable[[Bundle], None], str]] = [
    ("manifest is a list", _set(["manifest"], [{"digest": "x"}]), "is not a JSON object"),
    ("manifest is a string", _set(["manifest"], "hello"), "is not a JSON object"),
    ("index.json is a list", _set(["index"], []), "index.json is not a JSON object"),
    ("manifests not a list", _set(["index"], {"manifests": {"a": 1}}), "is not a JSON array"),
    (
        "index entry a string",
        _set(["index"], {"manifests": ["sha256:" + "a" * 64]}),
        "manifests[0] is not a JSON object",
    ),
    ("annotations a list", _set(["entry_annotations"], ["x"]), "annotations is not a JSON object"),
    (
        "ref name a number",
        _set(["entry_annotations"], {"org.opencontainers.image.ref.name": 7}),
        "ref.name is not a string",
    ),
    (
        "layers an object",
        _set(["manifest", "layers"], {"digest": "sha256:" + "a" * 64}),
        "layers is not a JSON array",
    ),
    (
        "layer a string",
        _set(["manifest", "layers"], ["sha256:" + "a" * 64]),
        "layers[0] is not a JSON object",
    ),
    ("config null", _set(["manifest", "config"], None), "config is not a JSON object"),
    (
        "digest a number",
        _set(["manifest", "layers", 0, "digest"], 5),
        "digest is not a sha256 digest",
    ),
    ("size a string", _set(["manifest", "layers", 0, "size"], "2048"), "has no valid size"),
    ("size missing", _set(["manifest", "layers", 0, "size"], None), "has no valid size"),
    ("size negative", _set(["manifest", "layers", 0, "size"], -1), "has no valid size"),
    ("size too small", _layer_size(-1), "longer than the 2047 bytes its descriptor says"),
    ("size too large", _layer_size(+1), "is 2048 bytes, its descriptor says 2049"),
    ("media type html", _set(["entry_media_type"], "text/html"), "not a manifest's"),
    ("media type a number", _set(["entry_media_type"], 1), "mediaType is not a string"),
    ("sidecar a list", _sidecar([1]), "registry-mirror.json is not a JSON object"),
    ("sidecar no version", _sidecar({"origins": {}}), "unsupported version"),
    (
        "sidecar origins a list",
        _sidecar({"version": 1, "origins": []}),
        "origins is not a JSON object",
    ),
    (
        "sidecar public a string",
        _sidecar(lambda b: {"version": 1, "origins": {b.layer_digest: {"public": "yes"}}}),
        "public is not true or false",
    ),
    (
        "sidecar repos a string",
        _sidecar(
            lambda b: {
                "version": 1,
                "origins": {b.layer_digest: {"public": False, "repos": "default/x"}},
            }
        ),
        "is not a JSON array",
    ),
    (
        "sidecar repo key bad",
        _sidecar(
            lambda b: {
                "version": 1,
                "origins": {b.layer_digest: {"public": False, "repos": ["private"]}},
            }
        ),
        "is not <upstream>/<repository>",
    ),
    (
        "sidecar claims a digest it lacks",
        _sidecar({"version": 1, "origins": {"sha256:" + "b" * 64: {"public": True, "repos": []}}}),
        "the bundle does not contain sha256:" + "b" * 64,
    ),
    (
        "sidecar privacy of an untagged repository",
        _sidecar(
            {
                "version": 1,
                "privacy": [
                    {"upstream": "default", "repository": "private/secret", "private": False}
                ],
            }
        ),
        "has no tag of 'private/secret'",
    ),
    (
        "sidecar privacy a string",
        _sidecar(
            {
                "version": 1,
                "privacy": [{"upstream": "default", "repository": "library/app", "private": "no"}],
            }
        ),
        "private is not true or false",
    ),
]


@pytest.mark.parametrize("fmt", ["dir", "tar"])
@pytest.mark.parametrize(("case", "mutate", "message"), SHAPES, ids=[c[0] for c in SHAPES])
def test_badly_shaped_documents_are_refused_in_one_line(
    cache: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    fmt: str,
    case: str,
    mutate: Callable[[Bundle], None],
    message: str,
) -> None:
    bundle = Bundle()
    mutate(bundle)
    assert message in refused(cache, bundle.write(tmp_path / f"bad.{fmt}", fmt), capsys)


@pytest.mark.parametrize("fmt", ["dir", "tar"])
def test_an_oci_layout_file_that_is_a_list_is_refused(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    bundle = Bundle()
    bundle.extra["oci-layout"] = b"[]"
    err = refused(cache, bundle.write(tmp_path / f"bad.{fmt}", fmt), capsys)
    assert "oci-layout is not a JSON object" in err


def test_a_blob_that_links_to_an_identical_file_elsewhere_is_refused(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = Bundle()
    outside = tmp_path / "outside"
    outside.write_bytes(bundle.layer)  # the right bytes, but not a file of the bundle
    bundle.extra[blob_path(bundle.layer_digest)] = ("symlink", str(outside))
    err = refused(cache, bundle.write(tmp_path / "bad", "dir"), capsys)
    assert f"{blob_path(bundle.layer_digest)} is not a regular file" in err


def test_a_symlinked_blob_directory_is_refused(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = Bundle()
    real = bundle.write(tmp_path / "real", "dir")
    fake = tmp_path / "bad"
    fake.mkdir()
    for name in ("oci-layout", "index.json"):
        (fake / name).write_bytes((real / name).read_bytes())
    (fake / "blobs").symlink_to(real / "blobs")
    assert "is not a regular file" in refused(cache, fake, capsys)


@pytest.mark.parametrize("kind", ["symlink to /dev/zero", "fifo"])
def test_a_blob_that_never_ends_is_refused_at_once(cache: Path, tmp_path: Path, kind: str) -> None:
    """Run as a process with a deadline: hashing /dev/zero, or waiting on a FIFO, never ends."""
    bundle = Bundle()
    link = ("symlink", "/dev/zero") if kind.startswith("symlink") else ("fifo", "")
    bundle.extra[blob_path(bundle.layer_digest)] = link
    before = cached_files(cache), metadata_snapshot(cache)
    result = subprocess.run(
        [sys.executable, "-m", "mirror", "import", "--cache-dir", str(cache),
         str(bundle.write(tmp_path / "bad", "dir"))],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "is not a regular file" in one_line(result.stderr)
    assert (cached_files(cache), metadata_snapshot(cache)) == before


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "device"])
def test_a_tar_member_that_is_not_a_regular_file_is_refused(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    """Links point at a member holding the right bytes: only the member's type is wrong."""
    bundle = Bundle()
    bundle.extra["spare"] = bundle.layer
    target = "../../spare" if kind == "symlink" else "spare"  # symlinks are relative to the dir
    bundle.extra[blob_path(bundle.layer_digest)] = (kind, target)
    err = refused(cache, bundle.write(tmp_path / "bad.tar", "tar"), capsys)
    assert f"{blob_path(bundle.layer_digest)} is not a regular file" in err


def test_a_tar_member_longer_than_its_descriptor_is_refused(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = Bundle()
    bundle.extra[blob_path(bundle.layer_digest)] = bundle.layer + b"\0" * (1 << 20)
    err = refused(cache, bundle.write(tmp_path / "bad.tar", "tar"), capsys)
    assert "is longer than the 2048 bytes its descriptor says" in err


def test_the_good_bundle_these_break_imports(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The control: unbroken, the same bundle goes in (so each refusal above is its defect)."""
    for fmt in ("dir", "tar"):
        bundle = Bundle()
        bundle.sidecar = {
            "version": 1,
            "origins": {bundle.layer_digest: {"public": False, "repos": ["default/library/app"]}},
            "privacy": [{"upstream": "default", "repository": "library/app", "private": True}],
        }
        path = bundle.write(tmp_path / f"good.{fmt}", fmt)
        assert main(["import", "--cache-dir", str(cache), str(path)]) == 0
    assert bundle.layer_digest[7:] in cached_files(cache)["blobs"]
    assert main(["ls", "--cache-dir", str(cache)]) == 0
    assert "library/app" in capsys.readouterr().out


def _provenance(bundle: Bundle, *, public: bool, private: bool | None) -> None:
    """Claims for all of `bundle`'s blobs (`public`, else its own repository) and, unless
    `private` is None, its repository's privacy."""
    repo = bundle.entry_annotations["org.opencontainers.image.ref.name"].rsplit(":", 1)[0]
    claim = {"public": public, "repos": [] if public else [f"default/{repo}"]}
    digests = [digest_of(bundle.manifest_bytes()), digest_of(bundle.config.encode())]
    bundle.sidecar = {
        "version": 1,
        "origins": dict.fromkeys([*digests, bundle.layer_digest], claim),
        "privacy": []
        if private is None
        else [{"upstream": "default", "repository": repo, "private": private}],
    }


def test_a_bundle_cannot_make_a_private_repository_public(cache: Path, tmp_path: Path) -> None:
    """Privacy reaches content the bundle does not carry: "public" never overrides "private",
    nor a repository whose tags came from elsewhere; "private" (a restriction) always holds."""
    first = Bundle("library/app", b"one")
    _provenance(first, public=False, private=True)
    assert main(["import", "--cache-dir", str(cache), str(first.write(tmp_path / "1", "dir"))]) == 0
    second = Bundle("library/app", b"two")
    _provenance(second, public=True, private=False)
    assert (
        main(["import", "--cache-dir", str(cache), str(second.write(tmp_path / "2", "dir"))]) == 0
    )
    meta = metadata_snapshot(cache)
    assert meta[("privacy", "default", "library/app")] == (True, 0.0)
    # Its own bytes, though, the bundle may call public: its author holds them anyway.
    assert meta[("origin", second.layer_digest)] == (True, [])

    untold = Bundle("library/other", b"three")  # a skopeo-like layout: no provenance
    assert (
        main(["import", "--cache-dir", str(cache), str(untold.write(tmp_path / "3", "dir"))]) == 0
    )
    assert ("origin", untold.layer_digest) not in metadata_snapshot(cache)
    claims = Bundle("library/other", b"four")
    _provenance(claims, public=True, private=False)
    assert (
        main(["import", "--cache-dir", str(cache), str(claims.write(tmp_path / "4", "dir"))]) == 0
    )
    meta = metadata_snapshot(cache)
    assert ("privacy", "default", "library/other") not in meta  # its tag came from elsewhere
    assert ("origin", untold.layer_digest) not in meta  # never named, never vouched for

    fresh = Bundle("library/fresh", b"five")  # nothing known here: the claim fills the gap
    _provenance(fresh, public=True, private=False)
    assert main(["import", "--cache-dir", str(cache), str(fresh.write(tmp_path / "5", "dir"))]) == 0
    assert metadata_snapshot(cache)[("privacy", "default", "library/fresh")] == (False, 0.0)


def test_imported_tags_are_recorded_as_expired(cache: Path) -> None:
    """So an online mirror asks the upstream before it answers one (offline ignores ages)."""
    record = metadata_snapshot(cache)[("tag", "default", "library/base", "1")]
    assert record[1:] == (OCI_MANIFEST, 0.0)
