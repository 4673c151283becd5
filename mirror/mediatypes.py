"""Manifest media types, and which of them a client's `Accept` headers allow."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST_V1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
DOCKER_MANIFEST_V1 = "application/vnd.docker.distribution.manifest.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"

# What the mirror asks for when a client sends no Accept header (everything it can store).
ALL_MANIFESTS = (OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST)
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})


def split_accept(headers: Iterable[str]) -> list[str]:
    """All media ranges from one or more `Accept` headers, parameters dropped, order kept."""
    seen: list[str] = []
    for header in headers:
        for part in header.split(","):
            media = part.split(";", 1)[0].strip().lower()
            if media and media not in seen:
                seen.append(media)
    return seen


def accepts(accept: list[str], media_type: str) -> bool:
    """Whether a stored manifest of `media_type` may answer a client that sent `accept`.

    No Accept header at all means the client takes what the registry has (as registries do).
    """
    if not accept or "*/*" in accept or media_type in accept:
        return True
    major = media_type.split("/", 1)[0]
    return f"{major}/*" in accept


def manifest_doc(data: bytes) -> dict[str, Any] | None:
    """A manifest's JSON object, or None if the bytes are not one."""
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def sniff_media_type(data: bytes) -> str | None:
    """The media type a manifest declares, or infers from its shape (OCI allows omitting it)."""
    doc = manifest_doc(data)
    if doc is None:
        return None
    declared = doc.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    if doc.get("schemaVersion") == 1:
        return DOCKER_MANIFEST_V1_SIGNED if "signatures" in doc else DOCKER_MANIFEST_V1
    if "manifests" in doc:
        return OCI_INDEX
    if "config" in doc:
        return OCI_MANIFEST
    return None


def platform_of(descriptor: dict[str, object], unknown: str = "unknown") -> str:
    """`os/architecture[/variant]` of an index entry (`unknown` when it names none)."""
    platform = descriptor.get("platform")
    if not isinstance(platform, dict):
        return unknown
    parts = [str(platform.get("os", "")), str(platform.get("architecture", ""))]
    if platform.get("variant"):
        parts.append(str(platform["variant"]))
    return "/".join(parts)
