"""The referrers API's answer (OCI distribution spec 1.1): an image index whose manifests are
the descriptors of every manifest whose `subject` is the asked-for digest.

Pure and shared: hosted repositories build it from pushed manifests, the mirror from an
upstream's answer or from the `sha256-<hex>` tag scheme; both describe a referrer the same way
and apply the `artifactType` filter the same way."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from mirror.mediatypes import OCI_INDEX

EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"


def referrer_descriptor(body: bytes, digest: str, media_type: str) -> dict[str, Any] | None:
    """A referrer's descriptor from its manifest bytes: `artifactType` is the manifest's own,
    else its config's media type (the spec's rule for images); annotations are copied.
    None when the bytes are not a JSON object."""
    try:
        manifest = json.loads(body)
    except ValueError:
        return None
    if not isinstance(manifest, dict):
        return None
    descriptor: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": len(body)}
    artifact_type = manifest.get("artifactType")
    if not isinstance(artifact_type, str):
        config = manifest.get("config")
        config_type = config.get("mediaType") if isinstance(config, dict) else None
        artifact_type = config_type if isinstance(config_type, str) else None
    if artifact_type:
        descriptor["artifactType"] = artifact_type
    annotations = manifest.get("annotations")
    if isinstance(annotations, dict) and annotations:
        descriptor["annotations"] = annotations
    return descriptor


def subject_of(body: bytes) -> str | None:
    """The digest a manifest's `subject` names, if any."""
    try:
        manifest = json.loads(body)
    except ValueError:
        return None
    subject = manifest.get("subject") if isinstance(manifest, dict) else None
    digest = subject.get("digest") if isinstance(subject, dict) else None
    return digest if isinstance(digest, str) else None


@dataclass(frozen=True)
class ReferrersAnswer:
    body: bytes
    filtered: bool  # answer with `OCI-Filters-Applied: artifactType`

    content_type: str = OCI_INDEX


def referrers_index(
    descriptors: Iterable[dict[str, Any]], artifact_type: str | None = None
) -> ReferrersAnswer:
    """The index listing `descriptors` (deduplicated by digest, in digest order so the answer
    is stable), only those of `artifact_type` when one is asked for."""
    by_digest = {d["digest"]: d for d in descriptors}
    chosen = [by_digest[k] for k in sorted(by_digest)]
    if artifact_type is not None:
        chosen = [d for d in chosen if d.get("artifactType") == artifact_type]
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": chosen}
    return ReferrersAnswer(json.dumps(index).encode(), artifact_type is not None)
