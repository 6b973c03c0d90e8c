"""`APIError` and the OpenAI-shaped JSON error responses built from it."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from .protocol import ErrorInfo, ErrorResponse

__all__ = ["APIError", "error_body", "error_response"]

# OpenAI's error ``type`` per HTTP status.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error to answer with ``status`` and an OpenAI error body.

    Args:
        status: HTTP status code.
        message: human-readable explanation.
        param: the request field at fault, if any.
        code: a machine-readable code (``"model_not_found"``, ``"invalid_api_key"``...).
        headers: extra response headers (``Retry-After`` on a 429).
    """

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> ErrorResponse:
    """The `ErrorResponse` for ``status`` (its ``type`` derived from the status)."""
    err_type = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return ErrorResponse(error=ErrorInfo(message=message, type=err_type, param=param, code=code))


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """A JSON response carrying `error_body`."""
    return JSONResponse(error_body(status, message, param, code).model_dump(), status_code=status, headers=headers)
