"""The OCI distribution grammar for repository names, tags and digests.

Everything a client sends is checked here, at the edge; inside the mirror a `Name`, `Tag` or
`Digest` is trusted. Only sha256 digests are accepted for mirrored names (the cache's content
addresses); hosted repositories take sha512 too (`parse_content_digest`).
"""

from __future__ import annotations

import re
from typing import NewType

from mirror.errors import RegistryError

Name = NewType("Name", str)
Tag = NewType("Tag", str)
Digest = NewType("Digest", str)

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
DIGEST_RE = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
SHA256_RE = re.compile(r"sha256:[a-f0-9]{64}")
SHA512_RE = re.compile(r"sha512:[a-f0-9]{128}")
MAX_NAME_LENGTH = 255


def parse_name(value: str) -> Name:
    """A repository name such as `library/alpine` or `org/team/app`."""
    if len(value) > MAX_NAME_LENGTH or not NAME_RE.fullmatch(value):
        raise RegistryError(
            "NAME_INVALID", "invalid repository name", {"name": value[:MAX_NAME_LENGTH]}
        )
    return Name(value)


def parse_tag(value: str) -> Tag:
    if not TAG_RE.fullmatch(value):
        raise RegistryError("TAG_INVALID", "invalid tag", {"tag": value[:256]})
    return Tag(value)


def parse_digest(value: str) -> Digest:
    """A `sha256:<64 lowercase hex>` digest; other algorithms are refused, not guessed at."""
    if SHA256_RE.fullmatch(value):
        return Digest(value)
    if DIGEST_RE.fullmatch(value):
        raise RegistryError(
            "DIGEST_INVALID", "unsupported digest algorithm or length", {"digest": value[:256]}
        )
    raise RegistryError("DIGEST_INVALID", "invalid digest", {"digest": value[:256]})


def parse_content_digest(value: str) -> Digest:
    """A sha256 or sha512 digest: what hosted repositories accept (pushed content may use
    either); the cache's own fills stay sha256 (`parse_digest`)."""
    if SHA512_RE.fullmatch(value):
        return Digest(value)
    return parse_digest(value)


def is_digest(reference: str) -> bool:
    """Whether a manifest reference is a digest (contains `:`) rather than a tag."""
    return ":" in reference


def parse_reference(value: str) -> Tag | Digest:
    """A manifest reference: a digest if it has a colon, else a tag."""
    return parse_digest(value) if is_digest(value) else parse_tag(value)


def docker_hub_name(name: Name) -> Name:
    """Docker Hub's rule: a one-segment name is an official image under `library/`."""
    return name if "/" in name else Name(f"library/{name}")


def parse_image(value: str) -> tuple[Name, Tag | Digest]:
    """`repo:tag`, `repo@sha256:...` or `repo` (meaning `:latest`) -> (name, reference)."""
    name, at, digest = value.partition("@")
    if at:
        return parse_name(name), parse_digest(digest)
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return parse_name(name[:colon]), parse_tag(name[colon + 1 :])
    return parse_name(name), Tag("latest")
