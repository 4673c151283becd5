"""Client credentials: bcrypt htpasswd (re-read on change) and the mirror's pull tokens."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from mirror.access import Principal
from mirror.web import auth
from mirror.web.auth import Htpasswd, TokenSigner
from tests.fixtures.htpasswd import write_htpasswd


async def test_htpasswd_checks_bcrypt_and_rereads_the_file_when_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "RELOAD_CHECK_SECONDS", 0.0)
    path = write_htpasswd(tmp_path / "htpasswd", {"alice": "pw1"})
    users = Htpasswd(path)
    assert await users.check("alice", "pw1")
    assert not await users.check("alice", "wrong")
    assert not await users.check("nobody", "pw1")
    write_htpasswd(path, {"alice": "pw2", "bob": "pw3"})
    os.utime(path, (time.time() + 5, time.time() + 5))
    assert not await users.check("alice", "pw1")  # the old password stops working
    assert await users.check("alice", "pw2") and await users.check("bob", "pw3")


def test_htpasswd_ignores_lines_that_are_not_bcrypt(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    path.write_text("# comment\nmd5user:$apr1$abc$def\nplain:secret\n\n")
    assert Htpasswd(path)._users == {}


def test_tokens_carry_the_user_and_refuse_tampering_and_expiry(tmp_path: Path) -> None:
    now = [1000.0]
    signer = TokenSigner.from_file(tmp_path / "token.key")
    signer = TokenSigner((tmp_path / "token.key").read_bytes(), clock=lambda: now[0])
    token = signer.issue(Principal("alice", via="basic"))
    assert signer.read(token) == ("alice", "basic", None)
    stamped = signer.issue(Principal("alice", via="basic"), stamp="s1")
    assert signer.read(stamped) == ("alice", "basic", "s1")
    body, mac = token.split(".")
    forged = TokenSigner(b"x" * 32, clock=lambda: now[0]).issue(Principal("admin"))
    assert signer.read(forged) is None
    assert signer.read(body + "." + mac[::-1]) is None
    assert signer.read("garbage") is None
    now[0] += auth.TOKEN_SECONDS + 1
    assert signer.read(token) is None


def test_every_worker_shares_one_token_key(tmp_path: Path) -> None:
    a = TokenSigner.from_file(tmp_path / "token.key")
    b = TokenSigner.from_file(tmp_path / "token.key")
    assert b.read(a.issue(Principal("bob", via="basic"))) == ("bob", "basic", None)
    assert (tmp_path / "token.key").stat().st_mode & 0o777 == 0o600
