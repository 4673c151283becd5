import json

from mirror.referrers_index import referrer_descriptor, referrers_index, subject_of

SUBJECT = "sha256:" + "a" * 64
ARTIFACT = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.example.sbom",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": "x", "size": 2},
        "layers": [],
        "subject": {"mediaType": "m", "digest": SUBJECT, "size": 1},
        "annotations": {"org.example": "yes"},
    }
).encode()
IMAGE = json.dumps(
    {"schemaVersion": 2, "config": {"mediaType": "application/vnd.example.sig", "size": 1}}
).encode()


def test_descriptor_takes_artifact_type_and_annotations() -> None:
    d = referrer_descriptor(
        ARTIFACT, "sha256:" + "1" * 64, "application/vnd.oci.image.manifest.v1+json"
    )
    assert d == {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": "sha256:" + "1" * 64,
        "size": len(ARTIFACT),
        "artifactType": "application/vnd.example.sbom",
        "annotations": {"org.example": "yes"},
    }


def test_descriptor_falls_back_to_config_media_type() -> None:
    d = referrer_descriptor(IMAGE, "sha256:" + "2" * 64, "m")
    assert d is not None and d["artifactType"] == "application/vnd.example.sig"


def test_not_json_is_no_descriptor() -> None:
    assert referrer_descriptor(b"\xff", "d", "m") is None
    assert referrer_descriptor(b"[1]", "d", "m") is None


def test_subject_of() -> None:
    assert subject_of(ARTIFACT) == SUBJECT
    assert subject_of(IMAGE) is None
    assert subject_of(b"nope") is None


def test_index_filters_by_artifact_type_and_says_so() -> None:
    a = {"digest": "sha256:b", "artifactType": "x"}
    b = {"digest": "sha256:a", "artifactType": "y"}
    whole = referrers_index([a, b, a])
    assert not whole.filtered
    assert [m["digest"] for m in json.loads(whole.body)["manifests"]] == ["sha256:a", "sha256:b"]
    only_x = referrers_index([a, b], "x")
    assert only_x.filtered
    assert json.loads(only_x.body)["manifests"] == [a]
    assert json.loads(only_x.body)["mediaType"] == "application/vnd.oci.image.index.v1+json"
