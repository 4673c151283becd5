"""The pull policy: rules by user, group, anonymous; private repositories never anonymous."""

from __future__ import annotations

from pathlib import Path

from mirror.access import ANONYMOUS, OPERATOR, Policy, Principal, Rule, build_policy
from mirror.config import load_config

ALICE = Principal("alice", frozenset({"dev"}))
BOB = Principal("bob")


def test_no_rules_lets_everyone_pull_public_and_only_the_authenticated_private() -> None:
    policy = Policy()
    assert policy.allows(ANONYMOUS, "default", "library/alpine")
    assert not policy.allows(ANONYMOUS, "default", "private/x", private=True)
    assert policy.allows(BOB, "default", "private/x", private=True)


def test_first_matching_rule_decides_and_globs_span_slashes() -> None:
    policy = Policy(
        [
            Rule(("group:dev",), ("vendor/*",), True),
            Rule(("*",), ("vendor/*",), False),
            Rule(("anonymous",), ("default/secret-*",), False),
        ]
    )
    assert policy.allows(ALICE, "vendor", "team/deep/app")
    assert not policy.allows(BOB, "vendor", "team/app")
    assert not policy.allows(ANONYMOUS, "vendor", "app")
    assert not policy.allows(ANONYMOUS, "default", "secret-stuff")
    assert policy.allows(BOB, "default", "secret-stuff")


def test_anonymous_never_reads_private_content_even_if_a_rule_allows_it() -> None:
    policy = Policy([Rule(("*",), ("*",), True)])
    assert not policy.allows(ANONYMOUS, "default", "private/x", private=True)
    assert policy.allows(OPERATOR, "default", "private/x", private=True)


def test_anonymous_off_and_default_deny() -> None:
    assert not Policy(anonymous=False).allows(ANONYMOUS, "default", "library/alpine")
    policy = Policy([Rule(("bob",), ("default/library/*",), True)], default=False)
    assert policy.allows(BOB, "default", "library/alpine")
    assert not policy.allows(ALICE, "default", "library/alpine")


def test_policy_from_config(tmp_path: Path) -> None:
    conf = tmp_path / "mirror.yaml"
    conf.write_text(
        "access:\n  default: deny\n  rules:\n"
        "    - {who: [authenticated], repositories: ['default/*'], action: allow}\n"
    )
    policy = build_policy(load_config(conf, env={}))
    assert policy.allows(BOB, "default", "library/alpine")
    assert not policy.allows(ANONYMOUS, "default", "library/alpine")
