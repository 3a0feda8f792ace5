"""Every error a client can see, in OpenAI's shape, mapped in this one place.

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from asrops import errors
from asrops.errors import SHOWN_CHARS, shown


@dataclass(frozen=True)
class ErrorKind:
    status: int
    type: str
    code: str
    param: str | None = None


class ApiError(Exception):
    """An error raised by the HTTP layer itself (auth, limits, timeouts, overload)."""

    def __init__(self, kind: ErrorKind, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.kind, self.message = kind, message
        self.param = param or kind.param
        self.headers = headers or {}


INVALID = "invalid_request_error"
UNAUTHORIZED = ErrorKind(401, "authentication_error", "invalid_api_key")
ADMIN_DISABLED = ErrorKind(403, "permission_error", "admin_disabled")
TIMEOUT = ErrorKind(504, "server_error", "timeout")
OVERLOADED = ErrorKind(503, "server_error", "overloaded")
UNAVAILABLE = ErrorKind(503, "server_error", "model_unavailable")
INTERNAL = ErrorKind(500, "server_error", "internal_error")
INVALID_VALUE = ErrorKind(400, INVALID, "invalid_value")
MISSING = ErrorKind(400, INVALID, "missing_required_parameter")
INVALID_REQUEST_ID = ErrorKind(400, INVALID, "invalid_request_id", "X-Request-Id")
NOT_FOUND = ErrorKind(404, INVALID, "not_found")
INVALID_BODY = ErrorKind(400, INVALID, "invalid_body")

FILE_TOO_LARGE = ErrorKind(413, INVALID, "file_too_large", "file")
RATE_LIMITED = ErrorKind(429, "requests", "rate_limit_exceeded")

# Most specific class first: the first isinstance match wins.
CORE_ERRORS: list[tuple[type[Exception], ErrorKind]] = [
    (errors.AudioTooLargeError, FILE_TOO_LARGE),
    (errors.AudioTooLongError, ErrorKind(413, INVALID, "audio_too_long", "file")),
    (errors.EmptyAudioError, ErrorKind(400, INVALID, "empty_file", "file")),
    (errors.UndecodableAudioError, ErrorKind(415, INVALID, "unsupported_media", "file")),
    (errors.InvalidAudioError, ErrorKind(400, INVALID, "invalid_audio", "file")),
    (errors.VersionNotFoundError, ErrorKind(404, INVALID, "model_not_found", "model")),
    (errors.ConflictError, ErrorKind(409, INVALID, "conflict")),
    (errors.RolloutRefusedError, ErrorKind(409, INVALID, "rollout_refused")),
    (errors.StoreUnavailableError, ErrorKind(503, "server_error", "store_unavailable")),
]


def error_body(message: str, kind: ErrorKind, param: str | None) -> dict:
    """`param` may be a name the client chose (a form field, a JSON key): cut like a quoted value."""
    param = param[:SHOWN_CHARS] if param else param
    return {"error": {"message": message, "type": kind.type, "param": param, "code": kind.code}}


def error_response(message: str, kind: ErrorKind, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param if param is not None else kind.param),
                        status_code=kind.status, headers=headers)


def classify(exc: BaseException) -> ErrorKind | None:
    """The client-facing kind of a core error, or None for a server fault."""
    for cls, kind in CORE_ERRORS:
        if isinstance(exc, cls):
            return kind
    return None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, ErrorKind]:
    first = exc.errors()[0] if exc.errors() else {}
    reason = first.get("msg", "invalid")
    if first.get("type") == "json_invalid":  # its loc is the character where the JSON broke
        return f"The body is not valid JSON ({first.get('ctx', {}).get('error', reason)}).", None, INVALID_BODY
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "header", "form")]
    if not loc:  # the body as a whole (a JSON array, a form where JSON is taken)
        return f"Invalid request body: {reason}. Send a JSON object with the endpoint's fields.", None, INVALID_BODY
    param = ".".join(loc)
    if first.get("type") == "missing":
        return f"Missing required parameter: {shown(param)}.", param, MISSING
    return f"Invalid value for {shown(param)}: {reason}.", param, INVALID_VALUE


FRAMEWORK_CODES = {400: INVALID_BODY.code, 404: NOT_FOUND.code, 405: "method_not_allowed"}
"""The codes of the framework's own refusals (`_http` below), by status."""


def _refusal(request: Request, message: str, kind: ErrorKind, param: str | None = None,
             headers: dict | None = None) -> JSONResponse:
    """`error_response`, with the error's code noted on the request for metrics and the production log."""
    request.state.error_code = kind.code
    return error_response(message, kind, param, headers)


def install_error_handlers(app: FastAPI, retry_after_s: int) -> None:
    """Every error as OpenAI's shape; a 503 says when to retry (`retry_after_s`)."""
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _refusal(request, exc.message, exc.kind, exc.param, exc.headers)

    @app.exception_handler(errors.AsropsError)
    async def _core_error(request: Request, exc: errors.AsropsError):
        kind = classify(exc) or INTERNAL
        retry = {"Retry-After": str(retry_after_s)} if kind.status == 503 else None
        return _refusal(request, str(exc), kind, headers=retry)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param, kind = _validation_message(exc)
        return _refusal(request, message, kind, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        """The framework's own refusals: an unknown path or method, and a body its parsers could not
        read (no multipart boundary, broken multipart, over 1,000 form fields, JSON nested too deep)."""
        kind = ErrorKind(exc.status_code, INVALID if exc.status_code < 500 else "server_error",
                         FRAMEWORK_CODES.get(exc.status_code, "http_error"))
        message = str(exc.detail)
        if exc.status_code == 400:
            message = (f"Could not read the request body: {message.rstrip('.')}. Send the fields as "
                       "multipart/form-data (as the openai SDK does), or JSON where the endpoint takes JSON.")
        return _refusal(request, message, kind, headers=getattr(exc, "headers", None))
