"""Hosted repositories in the config: a name is hosted or mirrored, never both; rules with
push and delete actions; who may push."""

from __future__ import annotations

import pytest

from mirror.access import ANONYMOUS, Principal, build_policy
from mirror.config import ConfigError, load_config


def test_a_hosted_pattern_that_an_upstream_also_serves_is_refused() -> None:
    overrides = {
        "upstreams": {"ghcr": {"url": "https://ghcr.io", "aliases": ["ghcr"]}},
        "hosted.repositories": ["internal/*", "ghcr/*"],
    }
    with pytest.raises(ConfigError) as err:
        load_config(None, env={}, overrides=overrides)
    assert "hosted.repositories" in str(err.value)
    assert "upstreams.ghcr" in str(err.value)
    assert "never both" in str(err.value)
    with pytest.raises(ConfigError, match=r"docker\.io"):
        load_config(None, env={}, overrides={"hosted.repositories": ["docker.io/*"]})
    with pytest.raises(ConfigError, match="need both"):
        load_config(
            None,
            env={},
            overrides={
                "hosted.repositories": ["a/*"],
                "metadata.kind": "redis",
                "metadata.redis_url": "redis://127.0.0.1:1/0",
                "cluster.secret": "s",
            },
        )
    with pytest.raises(ConfigError, match=r"hosted\.group"):
        load_config(
            None, env={}, overrides={"hosted.repositories": ["a/*"], "hosted.group": ["b/*"]}
        )


def test_rules_take_push_and_delete_actions_and_pushing_needs_a_rule() -> None:
    rules = [
        {"who": ["alice"], "repositories": ["hosted/team/*"], "actions": ["push", "pull"]},
        {"who": ["*"], "repositories": ["hosted/team/*"], "action": "deny"},
    ]
    config = load_config(None, env={}, overrides={"access.rules": rules})
    assert config.access.rules[0].actions == ("pull", "push")
    assert config.access.rules[1].actions == ("pull",)
    policy = build_policy(config)
    alice, bob = Principal("alice"), Principal("bob")
    assert policy.allows(alice, "hosted", "team/app", action="push")
    assert not policy.allows(alice, "hosted", "team/app", action="delete")
    assert not policy.allows(bob, "hosted", "team/app", action="push")
    assert not policy.allows(bob, "hosted", "team/app")  # the deny rule, for pulls
    assert not policy.allows(ANONYMOUS, "hosted", "other/app", action="push")  # no rule
    assert policy.allows(ANONYMOUS, "hosted", "other/app")  # pulls: the default
    with pytest.raises(ConfigError, match="actions"):
        load_config(None, env={}, overrides={"access.rules": [{"actions": ["write"]}]})
