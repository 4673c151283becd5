"""Who may pull what: the client principal and the repository access policy.

A leaf module, so that both the web layer (which authenticates clients) and `Mirror` (which must
not hand private content to the wrong client, by tag or by digest) can ask the same question.
Repositories are named `<upstream>/<repository>` as the upstream knows them, e.g.
`default/library/alpine` or `ghcr/acme/app`; rules are globs over that (`*` spans `/`).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from mirror.config import Config


@dataclass(frozen=True)
class Principal:
    """A client as authenticated by the web layer; `name` None is anonymous."""

    name: str | None = None
    groups: frozenset[str] = frozenset()
    admin: bool = False
    via: str = "anonymous"  # anonymous / basic / certificate

    @property
    def authenticated(self) -> bool:
        return self.name is not None


ANONYMOUS = Principal()
# The mirror's own commands (warm): not a client, so not subject to the pull policy.
OPERATOR = Principal("registry-mirror", admin=True, via="operator")


@dataclass(frozen=True)
class Rule:
    """`who`: user names, `group:NAME`, `anonymous`, `authenticated` or `*`;
    `repositories`: globs over `<upstream>/<repository>`; first matching rule decides."""

    who: tuple[str, ...]
    repositories: tuple[str, ...]
    allow: bool
    actions: tuple[str, ...] = ("pull",)  # pull / push / delete: what the rule decides
    _patterns: tuple[re.Pattern[str], ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        compiled = tuple(re.compile(fnmatch.translate(p)) for p in self.repositories)
        object.__setattr__(self, "_patterns", compiled)

    def applies_to(self, principal: Principal) -> bool:
        for who in self.who:
            if who == "*":
                return True
            if who == "anonymous" and not principal.authenticated:
                return True
            if who == "authenticated" and principal.authenticated:
                return True
            if who.startswith("group:") and who[6:] in principal.groups:
                return True
            if principal.name is not None and who == principal.name:
                return True
        return False

    def covers(self, repository: str) -> bool:
        return any(p.fullmatch(repository) for p in self._patterns)


class Policy:
    """Pull permissions. With no rules (and `default` allow), everyone may pull everything
    public, and authenticated clients may pull private repositories too. Anonymous clients
    never read private content (fetched with the mirror's upstream credentials), whatever
    the rules say."""

    def __init__(
        self, rules: list[Rule] | None = None, *, anonymous: bool = True, default: bool = True
    ) -> None:
        self.rules = list(rules or [])
        self.anonymous = anonymous  # False: every request must authenticate
        self.default = default  # when no rule matches

    def allows(
        self,
        principal: Principal,
        upstream: str,
        repository: str,
        *,
        private: bool = False,
        action: str = "pull",
    ) -> bool:
        """`action` pull follows the default when no rule matches; push and delete (hosted
        repositories only) need a rule that allows them, for anyone, anonymous or not."""
        if principal is OPERATOR:
            return True
        if not principal.authenticated and (private or not self.anonymous):
            return False
        subject = f"{upstream}/{repository}"
        for rule in self.rules:
            if action in rule.actions and rule.applies_to(principal) and rule.covers(subject):
                return rule.allow
        return self.default if action == "pull" else False

    def allows_all_private(self, principal: Principal) -> bool:
        """Whether no rule can refuse `principal` anything (admins, the operator, and users
        no deny rule names when the default allows): who may have content of unknown origin."""
        if principal is OPERATOR or principal.admin:
            return True
        if not principal.authenticated or not self.default:
            return False
        return not any(
            "pull" in r.actions and r.applies_to(principal) and not r.allow for r in self.rules
        )


def build_policy(config: Config) -> Policy:
    rules = [
        Rule(rule.who, rule.repositories, rule.action == "allow", rule.actions)
        for rule in config.access.rules
    ]
    return Policy(rules, anonymous=config.auth.anonymous, default=config.access.default == "allow")
