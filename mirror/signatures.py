"""Cosign's keyed signatures, checked offline with `cryptography`.

Cosign signs an image by pushing a manifest (the `sha256-<hex>.sig` tag, or an OCI 1.1
referrer) whose layers are "simple signing" payloads: JSON that names the signed manifest's
digest in `critical.image.docker-manifest-digest`, with the base64 signature over the
payload's exact bytes in the layer annotation `dev.cosignproject.cosign/signature`. ECDSA
keys sign with SHA-256 (cosign's default P-256), Ed25519 keys sign the payload itself.

Pure: no I/O, so the policy (verify_policy.py) decides where bytes come from. Why a layer
fails is kept apart, because an operator acts differently on each: bad (not a signature at all
or not over this payload), another key, or a payload for another manifest.

(PyPI's `sigstore` was measured for this: its `Verifier` checks Sigstore bundles against a
trusted root (Fulcio certificates, Rekor entries) and has no keyed, offline check of cosign's
simple-signing layers, so the primitive checks are done here with `cryptography`, which
`sigstore` itself builds on.)
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, TypeAlias

# `cryptography` is loaded when a key is (a verify policy is configured): 8 MB a worker that
# a mirror without one does not carry.
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    PublicKey: TypeAlias = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
SIGNATURE_ARTIFACT = "application/vnd.dev.cosign.artifact.sig.v1+json"
MAX_PAYLOAD = 64 * 1024  # a simple-signing payload is a few hundred bytes


class Outcome(Enum):
    VERIFIED = "verified"
    UNSIGNED = "unsigned"  # no signature found at all
    BAD_SIGNATURE = "bad signature"  # not a signature, or not over this payload
    OTHER_KEY = "signed by another key"
    OTHER_DIGEST = "signature for another manifest"
    MALFORMED = "malformed signature payload"


@dataclass(frozen=True)
class Finding:
    outcome: Outcome
    why: str  # words for the client and the log


@dataclass(frozen=True)
class SignatureLayer:
    """One signed payload named by a signature manifest: its blob and the base64 signature."""

    digest: str
    size: int
    signature: str


def load_public_key(pem: bytes) -> PublicKey:
    """An ECDSA or Ed25519 public key from PEM; ValueError (with words) for anything else."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a PEM public key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise ValueError(f"a {type(key).__name__}: only ECDSA and Ed25519 keys are supported")
    return key


def signature_layers(manifest: bytes) -> list[SignatureLayer]:
    """The simple-signing layers of a signature manifest (none if it is not one)."""
    try:
        doc = json.loads(manifest)
    except ValueError:
        return []
    layers = doc.get("layers") if isinstance(doc, dict) else None
    found = []
    for layer in layers if isinstance(layers, list) else []:
        if not isinstance(layer, dict) or layer.get("mediaType") != SIMPLE_SIGNING:
            continue
        annotations = layer.get("annotations")
        signature = annotations.get(SIGNATURE_ANNOTATION) if isinstance(annotations, dict) else None
        digest, size = layer.get("digest"), layer.get("size")
        if isinstance(signature, str) and isinstance(digest, str) and isinstance(size, int):
            found.append(SignatureLayer(digest, size, signature))
    return found


def _signed_by(key: PublicKey, signature: bytes, payload: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
        else:
            key.verify(signature, payload)
    except InvalidSignature:
        return False
    return True


def _well_formed(signature: bytes) -> bool:
    """Whether the bytes are shaped like an ECDSA (DER) or Ed25519 (64 bytes) signature: a
    well-formed one no configured key accepts is "another key", anything else "bad"."""
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    if len(signature) == 64:
        return True
    try:
        decode_dss_signature(signature)
    except ValueError:
        return False
    return True


def signed_digest(payload: bytes) -> str | None:
    """The manifest digest a simple-signing payload names, or None if it is malformed."""
    try:
        doc: Any = json.loads(payload)
        digest = doc["critical"]["image"]["docker-manifest-digest"]
    except (ValueError, KeyError, TypeError):
        return None
    return digest if isinstance(digest, str) else None


def check(
    payload: bytes, signature_b64: str, keys: list[PublicKey], manifest_digest: str
) -> Finding:
    """Whether `payload` is signed by one of `keys` and names `manifest_digest`."""
    try:
        signature = base64.b64decode(signature_b64, validate=True)
    except (binascii.Error, ValueError):
        return Finding(Outcome.BAD_SIGNATURE, "the signature annotation is not base64")
    if not any(_signed_by(key, signature, payload) for key in keys):
        if _well_formed(signature):
            return Finding(Outcome.OTHER_KEY, "no configured key made this signature")
        return Finding(Outcome.BAD_SIGNATURE, "the signature is not an ECDSA or Ed25519 one")
    named = signed_digest(payload)
    if named is None:
        return Finding(Outcome.MALFORMED, "the signed payload names no manifest digest")
    if named != manifest_digest:
        return Finding(Outcome.OTHER_DIGEST, f"the signature is for {named}")
    return Finding(Outcome.VERIFIED, "signed by a configured key")


def best(findings: list[Finding]) -> Finding:
    """One verdict from every signature found: any verified wins; else the most telling."""
    if not findings:
        return Finding(Outcome.UNSIGNED, "no cosign signature found")
    order = [
        Outcome.VERIFIED,
        Outcome.OTHER_DIGEST,
        Outcome.MALFORMED,
        Outcome.OTHER_KEY,
        Outcome.BAD_SIGNATURE,
    ]
    return min(findings, key=lambda f: order.index(f.outcome) if f.outcome in order else 99)
