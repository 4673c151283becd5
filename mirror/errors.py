"""Errors in the OCI distribution format, raised anywhere and rendered once by the web layer."""

from __future__ import annotations

from typing import Any

# OCI distribution-spec error codes (plus distribution's UNAVAILABLE), with their HTTP status.
STATUS_BY_CODE: dict[str, int] = {
    "BLOB_UNKNOWN": 404,
    "BLOB_UPLOAD_INVALID": 400,
    "BLOB_UPLOAD_UNKNOWN": 404,
    "DIGEST_INVALID": 400,
    "MANIFEST_BLOB_UNKNOWN": 404,
    "MANIFEST_INVALID": 400,
    "MANIFEST_UNKNOWN": 404,
    "NAME_INVALID": 400,
    "NAME_UNKNOWN": 404,
    "SIZE_INVALID": 400,
    "TAG_INVALID": 400,
    "PAGINATION_NUMBER_INVALID": 400,
    "RANGE_INVALID": 416,
    "UNAUTHORIZED": 401,
    "DENIED": 403,
    "UNSUPPORTED": 405,
    "TOOMANYREQUESTS": 429,
    "UNAVAILABLE": 502,
}


class RegistryError(Exception):
    """A failure a registry client should see as `{"errors": [{code, message, detail}]}`."""

    def __init__(
        self,
        code: str,
        message: str,
        detail: Any = None,
        *,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.detail = detail
        self.status = status if status is not None else STATUS_BY_CODE.get(code, 500)
        self.headers = headers or {}

    def to_json(self) -> dict[str, Any]:
        """The OCI error body."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            error["detail"] = self.detail
        return {"errors": [error]}


class UpstreamError(RegistryError):
    """The upstream failed (unreachable, 5xx, bad bytes): a 502 unless a status is given."""

    def __init__(
        self,
        message: str,
        detail: Any = None,
        *,
        status: int = 502,
        code: str = "UNAVAILABLE",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(code, message, detail, status=status, headers=headers)


class DigestMismatch(UpstreamError):
    """Bytes from the upstream did not hash to the digest they were fetched for."""

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(
            "upstream sent content that does not match its digest",
            {"expected": expected, "actual": actual},
        )
        self.expected = expected
        self.actual = actual
