"""What went wrong talking to an upstream, in words: for logs, `/readyz` and error details.

Exception class names stay out of anything a client reads: `ClientConnectorSSLError` against
`ClientConnectorError` told a client which internal ports were open. Logs keep the host, port
and reason, worded the way an operator would say it.
"""

from __future__ import annotations

import errno

import aiohttp

_ERRNO_WORDS = {
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset",
    errno.ETIMEDOUT: "timed out",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
    errno.EPIPE: "connection closed",
}


def _where(exc: aiohttp.ClientConnectorError) -> str:
    return f"{exc.host}:{exc.port}"


def describe(exc: BaseException) -> str:
    """A short phrase for an upstream failure: what failed and, where known, host and port."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"TLS certificate rejected ({_where(exc)})"
    if isinstance(exc, aiohttp.ClientSSLError):
        return f"TLS handshake failed ({_where(exc)})"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return f"name not found ({exc.host})"
    if isinstance(exc, aiohttp.ClientConnectorError):
        words = _ERRNO_WORDS.get(exc.os_error.errno or 0, "could not connect")
        return f"{words} ({_where(exc)})"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "timed out connecting"
    if isinstance(exc, aiohttp.ServerTimeoutError | TimeoutError):
        return "timed out waiting for the answer"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the upstream closed the connection"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the response body broke off"
    if isinstance(exc, aiohttp.InvalidURL):
        return "unusable URL"
    if isinstance(exc, aiohttp.ClientResponseError):
        return "malformed response"
    if isinstance(exc, OSError) and exc.errno in _ERRNO_WORDS:
        return _ERRNO_WORDS[exc.errno]
    if isinstance(exc, aiohttp.ClientConnectionError | OSError):
        return "connection failed"
    return "request failed"
