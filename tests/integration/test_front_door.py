"""Many upstreams and a safe front door, with two real registries and real skopeo.

The default upstream is the test registry (public repositories and `private/*`); `vendor` is a
second registry that, like a vendor's private one, serves nothing without credentials. The
mirror holds credentials for both and authenticates its own clients from an htpasswd file.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.fixtures.certs import CertAuthority
from tests.fixtures.engines import Containerd, Dockerd
from tests.fixtures.htpasswd import basic, write_htpasswd
from tests.fixtures.mirror_server import MirrorProcess, sha256_digest
from tests.fixtures.real_upstream import Upstream
from tests.fixtures.synthetic_images import Image
from tests.integration.test_skopeo import assert_dir_matches, skopeo

ACCEPT = [
    ("Accept", "application/vnd.oci.image.index.v1+json"),
    ("Accept", "application/vnd.oci.image.manifest.v1+json"),
    ("Accept", "application/vnd.docker.distribution.manifest.v2+json"),
    ("Accept", "application/vnd.docker.distribution.manifest.list.v2+json"),
]
USERS = {"alice": "alice-pw", "bob": "bob-pw"}


def start_mirror(tmp_path: Path, settings: dict[str, Any], **kwargs: Any) -> MirrorProcess:
    config = tmp_path / "mirror.yaml"
    config.write_text(yaml.safe_dump(settings))
    mirror = MirrorProcess(
        tmp_path / "cache",
        settings["upstream"]["url"],
        "--config",
        str(config),
        log_path=tmp_path / "mirror.log",
        **kwargs,
    )
    mirror.start()
    return mirror


def two_upstreams(tmp_path: Path, upstream: Upstream, vendor: Upstream) -> dict[str, Any]:
    """Credentials three ways: inline, from a file and from the environment."""
    (tmp_path / "vendor-pw").write_text(vendor.reader[1] + "\n")
    return {
        "upstream": {
            "url": upstream.url,
            "names": ["docker.io"],
            "username": upstream.reader[0],
            "password_env": "DEFAULT_UPSTREAM_PW",
        },
        "upstreams": {
            "vendor": {
                "url": vendor.url,
                "names": ["vendor.example"],
                "aliases": ["vendor"],
                "username": vendor.reader[0],
                "password_file": str(tmp_path / "vendor-pw"),
            }
        },
        "auth": {
            "htpasswd": str(write_htpasswd(tmp_path / "htpasswd", USERS)),
            "groups": {"dev": ["alice"]},
        },
        "access": {
            "rules": [
                {"who": ["group:dev"], "repositories": ["vendor/*"], "action": "allow"},
                {"who": ["*"], "repositories": ["vendor/*"], "action": "deny"},
            ]
        },
    }


def copy(mirror: MirrorProcess, ref: str, dest: Path, *extra: str) -> Any:
    return skopeo(
        "copy", "--src-tls-verify=false", *extra,
        f"docker://{mirror.address}/{ref}", f"dir:{dest}",
    )  # fmt: skip


def creds(user: str) -> tuple[str, str]:
    return ("--src-creds", f"{user}:{USERS[user]}")


def manifest_digest(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    digest = sha256_digest(r.content)
    assert r.headers["Docker-Content-Digest"] == digest
    return digest


def test_two_upstreams_routed_by_prefix_and_ns_with_their_own_credentials(
    upstream: Upstream, vendor_upstream: Upstream, tmp_path: Path
) -> None:
    vendor = vendor_upstream
    settings = two_upstreams(tmp_path, upstream, vendor)
    shared = upstream.images["small"].layers()[0]
    gets_before = upstream.registry.blob_gets(shared.digest)
    mirror = start_mirror(tmp_path, settings, env={"DEFAULT_UPSTREAM_PW": upstream.reader[1]})
    try:
        # Default upstream, anonymous (public content): dockerd-style names.
        result = copy(mirror, "library/small:latest", tmp_path / "default-small")
        assert result.returncode == 0, result.stderr
        assert_dir_matches(tmp_path / "default-small", upstream.images["small"])

        # The vendor registry by alias and by host prefix, as alice (group dev).
        result = copy(mirror, "vendor/vendor/app:1", tmp_path / "app", *creds("alice"))
        assert result.returncode == 0, result.stderr
        assert_dir_matches(tmp_path / "app", vendor.images["app"])
        assert shared.digest == vendor.images["small"].layers()[0].digest
        ref = "vendor.example/library/small:latest"
        result = copy(mirror, ref, tmp_path / "vendor-small", *creds("alice"))
        assert result.returncode == 0, result.stderr
        assert_dir_matches(tmp_path / "vendor-small", vendor.images["small"])
        # Blobs are stored once by digest: the shared layer never crossed from the vendor.
        assert vendor.registry.blob_gets(shared.digest) == 0
        assert upstream.registry.blob_gets(shared.digest) == gets_before + 1

        # containerd's ?ns= picks the upstream; the same repo:tag on each stays apart.
        url = f"{mirror.url}/v2/library/small/manifests/latest"
        alice = basic("alice", USERS["alice"])
        by_ns = {
            ns: manifest_digest(
                httpx.get(url, params={"ns": ns}, headers=[*ACCEPT, *alice.items()])
            )
            for ns in ("docker.io", "vendor.example")
        }
        assert by_ns == {
            "docker.io": upstream.images["small"].digest,
            "vendor.example": vendor.images["small"].digest,
        }
        r = httpx.get(
            f"{mirror.url}/v2/vendor/app/manifests/1",
            params={"ns": "vendor.example"},
            headers=[*ACCEPT, *alice.items()],
        )
        assert manifest_digest(r) == vendor.images["app"].digest

        # bob is authenticated but not in dev; anonymous clients are told to log in.
        result = copy(mirror, "vendor/vendor/app:1", tmp_path / "bob", *creds("bob"))
        assert result.returncode != 0
        r = httpx.get(
            f"{mirror.url}/v2/vendor/vendor/app/manifests/1",
            headers=[*ACCEPT, *basic("bob", USERS["bob"]).items()],
        )
        assert r.status_code == 403 and r.json()["errors"][0]["code"] == "DENIED"
        r = httpx.get(f"{mirror.url}/v2/vendor/vendor/app/manifests/1", headers=ACCEPT)
        assert r.status_code == 401 and r.json()["errors"][0]["code"] == "UNAUTHORIZED"
        assert r.headers["WWW-Authenticate"].startswith('Bearer realm="http://127.0.0.1:')
        r = httpx.get(f"{mirror.url}/v2/vendor/vendor/app/manifests/1", headers=[
            *ACCEPT, ("Authorization", "Basic " + "YWxpY2U6d3Jvbmc=")  # alice:wrong
        ])  # fmt: skip
        assert r.status_code == 401
    finally:
        mirror.stop()
    log = (tmp_path / "mirror.log").read_text()
    for secret in (upstream.reader[1], vendor.reader[1], *USERS.values()):
        assert secret not in log
    served = [
        e
        for e in mirror.log_events()
        if e.get("event") == "request" and "/vendor/app/blobs/" in str(e.get("path"))
    ]
    assert served and {e["user"] for e in served if e["status"] == 200} == {"alice"}


def test_private_content_never_reaches_anonymous_clients(
    upstream: Upstream, tmp_path: Path
) -> None:
    users = write_htpasswd(tmp_path / "htpasswd", USERS)
    settings = {
        "upstream": {
            "url": upstream.url,
            "names": ["docker.io"],
            "username": upstream.reader[0],
            "password": upstream.reader[1],
        },
        "auth": {"htpasswd": str(users)},
    }
    private: Image = upstream.images["private"]
    mirror = start_mirror(tmp_path, settings)
    try:
        result = copy(mirror, private.ref, tmp_path / "alice", *creds("alice"))
        assert result.returncode == 0, result.stderr
        assert_dir_matches(tmp_path / "alice", private)
        result = copy(mirror, private.ref, tmp_path / "anon")
        assert result.returncode != 0
        assert not (tmp_path / "anon" / private.layers()[0].digest.split(":")[1]).exists()

        layer = private.layers()[0].digest
        base = mirror.url
        token = httpx.get(f"{base}/token").json()["token"]  # what engines fetch with no login
        head_before = upstream.registry.count("HEAD", re.escape(layer), (404,))
        for auth in ({}, {"Authorization": f"Bearer {token}"}):
            headers = [*ACCEPT, *auth.items()]
            for path in (
                f"/v2/{private.repo}/manifests/{private.tag}",
                f"/v2/{private.repo}/manifests/{private.digest}",
                f"/v2/{private.repo}/blobs/{layer}",
                f"/v2/docker.io/{private.repo}/blobs/{layer}",
            ):
                r = httpx.get(base + path, headers=headers)
                assert r.status_code == 401, path
                assert r.json()["errors"][0]["code"] == "UNAUTHORIZED"
            # Cached, but asked for under a public repository's name: not there, as upstream.
            for method, path, code in (
                ("GET", f"/v2/library/small/blobs/{layer}", "BLOB_UNKNOWN"),
                ("GET", f"/v2/library/small/manifests/{private.digest}", "MANIFEST_UNKNOWN"),
                ("GET", f"/v2/library/small/blobs/{layer}?ns=docker.io", "BLOB_UNKNOWN"),
            ):
                r = httpx.request(method, base + path, headers=headers)
                assert r.status_code == 404, path
                assert r.json()["errors"][0]["code"] == code
            r = httpx.head(f"{base}/v2/library/small/blobs/{layer}", headers=headers)
            assert r.status_code == 404
        # The mirror asked the upstream whether the public repository has it (it does not).
        assert upstream.registry.count("HEAD", re.escape(layer), (404,)) > head_before

        # Public content stays open to anyone; alice reads the private blob with a token too.
        small = upstream.images["small"]
        r = httpx.get(f"{base}/v2/{small.repo}/manifests/{small.tag}", headers=ACCEPT)
        assert manifest_digest(r) == small.digest
        token = httpx.get(f"{base}/token", auth=("alice", USERS["alice"])).json()["token"]
        r = httpx.get(
            f"{base}/v2/{private.repo}/blobs/{layer}", headers={"Authorization": f"Bearer {token}"}
        )
        assert r.status_code == 200 and sha256_digest(r.content) == layer
    finally:
        mirror.stop()


@pytest.mark.parametrize(
    ("path", "params", "status", "code"),
    [
        ("/v2/library/small/manifests/latest", {"ns": "evil.example.com"}, 404, "NAME_UNKNOWN"),
        ("/v2/library/small/manifests/latest", {"ns": "127.0.0.1:1"}, 404, "NAME_UNKNOWN"),
        ("/v2/library/small/manifests/latest", {"ns": "localhost"}, 404, "NAME_UNKNOWN"),
        ("/v2/library/small/manifests/latest", {"ns": ""}, 404, "NAME_UNKNOWN"),
        ("/v2/library/small/manifests/latest", {"ns": "docker.io/../x"}, 404, "NAME_UNKNOWN"),
        ("/v2/library/small/manifests/latest", {"ns": "docker.io\r\nX-A: b"}, 404, "NAME_UNKNOWN"),
        ("/v2/evil.example.com/x/manifests/latest", {}, 404, "NAME_UNKNOWN"),
        ("/v2/127.0.0.1/x/manifests/latest", {}, 404, "NAME_UNKNOWN"),
        ("/v2/localhost/x/blobs/sha256:" + "a" * 64, {}, 404, "NAME_UNKNOWN"),
        ("/v2/%2e%2e/library/small/manifests/latest", {}, 400, "NAME_INVALID"),
        ("/v2/docker.io/%2e%2e/x/manifests/latest", {}, 400, "NAME_INVALID"),
        ("/v2/evil.com@127.0.0.1/x/manifests/latest", {}, 400, "NAME_INVALID"),
        ("/v2/docker.io%2fevil.com/x/manifests/latest", {}, 400, "NAME_INVALID"),
    ],
)
def test_ns_and_path_injection_is_refused_before_any_upstream_request(
    upstream: Upstream,
    mirror: MirrorProcess,
    path: str,
    params: dict[str, str],
    status: int,
    code: str,
) -> None:
    before = (len(upstream.registry.requests()), upstream.tokens.total())
    with socket.create_connection(("127.0.0.1", mirror.port), timeout=10) as sock:
        query = "&".join(f"ns={_quote(v)}" for v in params.values())
        target = path + (f"?{query}" if query else "")
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == str(status).encode(), raw[:300]
    assert json.loads(body)["errors"][0]["code"] == code
    assert b"X-A:" not in head
    time.sleep(0.2)
    assert (len(upstream.registry.requests()), upstream.tokens.total()) == before


def _quote(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe="")


def test_tls_with_the_test_ca_client_certificates_and_reload_on_sighup(
    upstream: Upstream, tmp_path: Path
) -> None:
    ca = CertAuthority(tmp_path / "pki")
    cert, key, first_serial = ca.issue("127.0.0.1", "server", server=True)
    settings = {
        "upstream": {
            "url": upstream.url,
            "names": ["docker.io"],
            "username": upstream.reader[0],
            "password": upstream.reader[1],
        },
        "auth": {"htpasswd": str(write_htpasswd(tmp_path / "htpasswd", USERS))},
        "tls": {"cert": str(cert), "key": str(key), "client_ca": str(ca.ca_path)},
    }
    mirror = start_mirror(tmp_path, settings, scheme="https")
    try:
        # skopeo trusts the test CA (ca.crt in its cert dir) and verifies the mirror's cert.
        trust = tmp_path / "trust"
        trust.mkdir()
        (trust / "ca.crt").write_bytes(ca.ca_path.read_bytes())
        small = upstream.images["small"]
        result = skopeo(
            "copy", "--src-tls-verify=true", "--src-cert-dir", str(trust),
            f"docker://{mirror.address}/{small.ref}", f"dir:{tmp_path / 'small'}",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert_dir_matches(tmp_path / "small", small)
        # Without the CA, verification fails: the mirror is not serving plain or self-signed.
        result = skopeo(
            "inspect", "--raw", "--tls-verify=true", f"docker://{mirror.address}/{small.ref}"
        )
        assert result.returncode != 0 and "certificate" in result.stderr.lower()

        # A client certificate from the CA names the user: alice pulls private content.
        client = tmp_path / "client"
        client.mkdir()
        (client / "ca.crt").write_bytes(ca.ca_path.read_bytes())
        alice_cert, alice_key, _ = ca.issue("alice", "alice", server=False)
        os.replace(alice_cert, client / "alice.cert")
        os.replace(alice_key, client / "alice.key")
        private = upstream.images["private"]
        result = skopeo(
            "copy", "--src-tls-verify=true", "--src-cert-dir", str(client),
            f"docker://{mirror.address}/{private.ref}", f"dir:{tmp_path / 'private'}",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert_dir_matches(tmp_path / "private", private)
        result = skopeo(
            "copy", "--src-tls-verify=true", "--src-cert-dir", str(trust),
            f"docker://{mirror.address}/{private.ref}", f"dir:{tmp_path / 'anon'}",
        )  # fmt: skip
        assert result.returncode != 0

        # SIGHUP: a renewed certificate is served to new connections, without a restart,
        # and a connection opened before it keeps working.
        assert _served_serial(mirror, ca) == first_serial
        context = ssl.create_default_context(cafile=str(ca.ca_path))
        raw = socket.create_connection(("127.0.0.1", mirror.port), timeout=10)
        kept = context.wrap_socket(raw, server_hostname="127.0.0.1")
        assert _get_base(kept) == 401  # challenged: this mirror has logins
        new_cert, new_key, second_serial = ca.issue("127.0.0.1", "renewed", server=True)
        os.replace(new_key, key)
        os.replace(new_cert, cert)
        assert mirror.proc is not None
        pid = mirror.proc.pid
        os.kill(pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while _served_serial(mirror, ca) != second_serial and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _served_serial(mirror, ca) == second_serial
        assert mirror.proc.poll() is None and mirror.proc.pid == pid
        assert _get_base(kept) == 401  # the old connection, still open, still served
        kept.close()
    finally:
        mirror.stop()
    assert any(e.get("event") == "tls_reloaded" for e in mirror.log_events())


def _get_base(conn: ssl.SSLSocket) -> int:
    """GET /v2/ on an open keep-alive connection; the status code."""
    conn.sendall(b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += conn.recv(65536)
    return int(head.split(b" ")[1])


def _served_serial(mirror: MirrorProcess, ca: CertAuthority) -> int:
    from cryptography import x509

    context = ssl.create_default_context(cafile=str(ca.ca_path))
    with (
        socket.create_connection(("127.0.0.1", mirror.port), timeout=5) as sock,
        context.wrap_socket(sock, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_engines_through_a_front_door_dockerd_anonymous_containerd_logged_in_by_ns(
    upstream: Upstream, vendor_upstream: Upstream, tmp_path: Path
) -> None:
    """With client auth on, dockerd (no login) still pulls public images through the token
    flow, and containerd logged in as alice reaches the vendor registry by `?ns=`."""
    vendor = vendor_upstream
    settings = two_upstreams(tmp_path, upstream, vendor)
    mirror = start_mirror(tmp_path, settings, env={"DEFAULT_UPSTREAM_PW": upstream.reader[1]})
    try:
        small = upstream.images["small"]
        dockerd = Dockerd(mirror.url)
        dockerd.start()
        try:
            dockerd.pull("small")
            assert small.digest in dockerd.repo_digests("small")
        finally:
            dockerd.stop()
        app = vendor.images["app"]
        containerd = Containerd(mirror.url, registries=("docker.io", "vendor.example"))
        containerd.start()
        try:
            ref = f"vendor.example/{app.ref}"
            containerd.pull(ref, "--user", f"alice:{USERS['alice']}")
            assert containerd.image_digest(ref) == app.digest
            with pytest.raises(AssertionError):  # bob may not pull the vendor's images
                containerd.pull(ref.replace(":1", "@" + app.digest), "--user", "bob:bob-pw")
        finally:
            containerd.stop()
    finally:
        mirror.stop()
    requests = [e for e in mirror.log_events() if e.get("event") == "request"]
    assert any(e["user"] == "bob" and e["status"] == 403 for e in requests)
    for blob in small.blobs:
        assert any(
            f"/blobs/{blob.digest}" in e["path"] and e["status"] == 200 and e["user"] is None
            for e in requests
        )
    for blob in app.blobs:
        assert any(
            f"/blobs/{blob.digest}" in e["path"]
            and "ns=vendor.example" in e["path"]
            and e["status"] == 200
            and e["user"] == "alice"
            for e in requests
        )


def test_sighup_without_tls_keeps_serving(mirror: MirrorProcess) -> None:
    """`systemctl reload` sends SIGHUP whatever the config: it must never stop the mirror."""
    assert mirror.proc is not None
    os.kill(mirror.proc.pid, signal.SIGHUP)
    time.sleep(0.5)
    assert mirror.proc.poll() is None
    assert httpx.get(f"{mirror.url}/v2/").status_code == 200
    assert any(e.get("event") == "reload_requested" for e in mirror.log_events())
