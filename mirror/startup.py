"""What an operator should hear when the mirror starts, from its configuration alone: the
supervisor logs it without importing the web or upstream stacks (it stays small)."""

from __future__ import annotations

from urllib.parse import urlsplit

from mirror.config import DOCKER_HUB_HOSTS, Config


def startup_warnings(config: Config) -> list[str]:
    """What an operator should hear at start-up (log each as a warning): a mirror open to the
    network, and a default upstream that containerd's `?ns=docker.io` cannot reach."""
    warnings = []
    host, port = config.listen_address()
    if host in ("", "0.0.0.0", "::") and config.auth.htpasswd is None and not config.tls.client_ca:
        warnings.append(
            f"listening on {config.listen} with no client authentication: anyone who can reach"
            f" port {port} can pull through this mirror (with its upstream credentials, if any);"
            " set auth.htpasswd or tls.client_ca, or listen on a private address"
        )
    named = set(config.upstream.registry_names())
    for upstream in config.upstreams.values():
        named |= upstream.registry_names()
    hub = (urlsplit(config.upstream.url).hostname or "") in DOCKER_HUB_HOSTS
    if not hub and "docker.io" not in named and not config.allow_any_upstream:
        warnings.append(
            f"the default upstream is {config.upstream.url} and no upstream stands for"
            " docker.io: containerd (hosts.toml) sends ?ns=docker.io with every request, gets"
            " NAME_UNKNOWN and pulls from the internet instead; if containerd pulls docker.io"
            " images through this mirror, add docker.io to upstream.names"
        )
    for name, upstream in [("upstream", config.upstream), *config.upstreams.items()]:
        if upstream.serve_private_to_anonymous:
            key = name if name == "upstream" else f"upstreams.{name}"
            warnings.append(
                f"{key}.serve_private_to_anonymous is on: anyone who can reach this mirror"
                f" pulls {upstream.url}'s private images with its credentials, without logging in"
            )
    return warnings
