"""`AccessGuard`: may this client pull this repository, and is the repository private?

Privacy is asked of the upstream itself: a repository that the mirror's upstream credentials
read but anonymous access cannot is private, and only clients the rules name may pull it
(anonymous ones never). The answer is remembered for `PRIVACY_TTL`; offline, the last known
answer stands and an unknown repository counts as private. A probe's answer stays in memory
only until content actually comes from the repository (`remember`): requests for names that
do not exist upstream leave no durable record.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from cachetools import TTLCache

from mirror.access import Policy, Principal
from mirror.cache.metadata import MetadataStore, Privacy, RepoKey
from mirror.errors import RegistryError, UpstreamError
from mirror.singleflight import SingleFlight
from mirror.upstream.routing import Router, Target

PRIVACY_TTL = 3600.0  # how long a repository's private/public status is trusted
PROBED_REPOSITORIES = 10_000  # answers held in memory until content proves the repository


def upstream_trouble(exc: BaseException) -> bool:
    """Failures that say nothing about the content (unreachable, 5xx, rate limit), as opposed
    to real answers such as 404: a cached tag may be served stale through these."""
    return isinstance(exc, UpstreamError) or (
        isinstance(exc, RegistryError) and exc.code == "TOOMANYREQUESTS"
    )


class AccessGuard:
    def __init__(
        self,
        policy: Policy,
        metadata: MetadataStore,
        router: Router,
        *,
        offline: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.policy = policy
        self.metadata = metadata
        self.router = router
        self.offline = offline
        self.clock = clock
        self._flight: SingleFlight[RepoKey, bool] = SingleFlight()
        self._probed: TTLCache[RepoKey, Privacy] = TTLCache(
            PROBED_REPOSITORIES, PRIVACY_TTL, timer=clock
        )

    async def authorize(self, principal: Principal, target: Target) -> bool:
        """Refuse a client the policy does not let pull `target`; True if it is private."""
        private = await self.is_private(target)
        upstream, repository = target.upstream.name, target.repository
        # An upstream whose private images the operator opened to anonymous clients: the
        # rules see them as public; provenance still records them as private (`private`).
        shown = private and not target.upstream.config.serve_private_to_anonymous
        if self.policy.allows(principal, upstream, repository, private=shown):
            return private
        detail = {"repository": target.key}
        if principal.authenticated:
            raise RegistryError("DENIED", "you may not pull this repository", detail)
        raise RegistryError("UNAUTHORIZED", "authentication required to pull this", detail)

    def may_pull(self, principal: Principal, upstream: str, repository: str) -> bool:
        """Whether `principal` may pull `repository` (as `upstream` names it), as far as known
        without asking the upstream (for listings of what the cache holds)."""
        client = self.router.upstreams.get(upstream)
        private = True
        # No credentials: nothing private; private opened to anyone: the rules see it public.
        if (
            client is None
            or not client.config.has_credentials
            or client.config.serve_private_to_anonymous
        ):
            private = False
        else:
            known = self.metadata.cached_privacy((upstream, repository))
            private = True if known is None else known.private
        return self.policy.allows(principal, upstream, repository, private=private)

    async def is_private(self, target: Target) -> bool:
        """Whether anonymous upstream access cannot read `target`: asked of the upstream
        without credentials (once at a time per repository), remembered an hour."""
        upstream = target.upstream
        if not upstream.config.has_credentials:
            return False
        key: RepoKey = (upstream.name, target.repository)
        probed = self._probed.get(key)
        if probed is not None:
            return probed.private
        known = await self.metadata.get_privacy(key)
        if known is not None and (self.offline or self.clock() - known.checked_at < PRIVACY_TTL):
            return known.private
        if self.offline:
            return True

        async def probe() -> bool:
            public = await upstream.anonymous_can_read(target.name)
            # Recorded inside the flight, so a request arriving as it ends finds the answer.
            self._probed[key] = Privacy(not public, self.clock())
            return public

        try:
            public = await self._flight.do(key, probe)
        except Exception as exc:
            if not upstream_trouble(exc):
                raise
            return True if known is None else known.private
        return not public

    async def remember(self, target: Target) -> None:
        """Content came from `target`: it exists, so its privacy answer is kept durably."""
        key: RepoKey = (target.upstream.name, target.repository)
        probed = self._probed.pop(key, None)
        if probed is not None:
            await self.metadata.put_privacy(key, probed)
