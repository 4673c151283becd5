from __future__ import annotations

import json

from mirror.mediatypes import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    accepts,
    sniff_media_type,
    split_accept,
)


def test_split_accept_reads_every_header() -> None:
    headers = [f"{OCI_INDEX}, {OCI_MANIFEST}", f"{DOCKER_MANIFEST}; q=0.5"]
    assert split_accept(headers) == [OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST]


def test_accepts() -> None:
    assert accepts([], OCI_INDEX)
    assert accepts(["*/*"], OCI_INDEX)
    assert accepts(["application/*"], OCI_INDEX)
    assert not accepts([DOCKER_MANIFEST], OCI_INDEX)


def test_sniff() -> None:
    assert sniff_media_type(json.dumps({"mediaType": DOCKER_MANIFEST}).encode()) == DOCKER_MANIFEST
    assert sniff_media_type(json.dumps({"schemaVersion": 2, "manifests": []}).encode()) == OCI_INDEX
    assert sniff_media_type(json.dumps({"schemaVersion": 2, "config": {}}).encode()) == OCI_MANIFEST
    assert sniff_media_type(b"not json") is None
