"""HTTPS for the mirror: one SSL context whose certificate SIGHUP reloads in place.

New connections use the reloaded certificate; connections already open keep theirs and are
never dropped. With `tls.client_ca`, clients may present a certificate (optional, so that
password and anonymous clients still connect); `web/auth.py` reads the user from it.
"""

from __future__ import annotations

import asyncio
import signal
import ssl

import structlog

from mirror.config import TlsConfig

log = structlog.get_logger(__name__)


def make_context(tls: TlsConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    load(context, tls)
    if tls.client_ca is not None:
        context.load_verify_locations(cafile=str(tls.client_ca))
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def load(context: ssl.SSLContext, tls: TlsConfig) -> None:
    assert tls.cert is not None and tls.key is not None
    context.load_cert_chain(str(tls.cert), str(tls.key))


def reload_on_sighup(context: ssl.SSLContext | None, tls: TlsConfig) -> None:
    """Install the SIGHUP handler (call inside the serving event loop). Without TLS there is
    nothing to reload (the htpasswd file is re-read when it changes), but SIGHUP, as sent by
    `systemctl reload`, must still not end the process."""

    def reload() -> None:
        if context is None:
            log.info("reload_requested", reloaded=[])
            return
        try:
            load(context, tls)
        except (OSError, ssl.SSLError) as exc:
            log.error("tls_reload_failed", cert=str(tls.cert), error=str(exc))  # keeps the old
            return
        log.info("tls_reloaded", cert=str(tls.cert))

    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)
