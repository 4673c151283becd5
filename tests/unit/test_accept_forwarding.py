from __future__ import annotations

from mirror.mediatypes import ALL_MANIFESTS, DOCKER_MANIFEST, OCI_INDEX
from mirror.upstream.client import _accept_headers


def test_specific_types_are_forwarded_as_sent() -> None:
    assert _accept_headers([OCI_INDEX, DOCKER_MANIFEST]).getall("Accept") == [
        OCI_INDEX,
        DOCKER_MANIFEST,
    ]


def test_wildcards_and_silence_mean_every_storable_type() -> None:
    assert set(_accept_headers([]).getall("Accept")) == set(ALL_MANIFESTS)
    forwarded = _accept_headers([DOCKER_MANIFEST, "*/*"]).getall("Accept")
    assert forwarded[0] == DOCKER_MANIFEST and set(forwarded) == set(ALL_MANIFESTS)
    assert "*/*" not in forwarded
