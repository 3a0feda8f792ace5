"""What a client can make the ingress hold before it is known to be allowed: the key of a
request with a body is checked before a byte of the body is read (401 first), and the body is
counted as it arrives, chunked or not, and cut off with 413 past the limit. The rest of the API
then reads at most `limit` bytes of any upload."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from asrops.serve.auth import ClientKeys
from asrops.serve.errors import FILE_TOO_LARGE, UNAUTHORIZED, ErrorKind, error_response

CLIENT_PATHS = "/v1/"
"""Paths a client key guards (the admin API checks its own tokens)."""
FORM_OVERHEAD = 1024 * 1024
"""Room above the audio limit for multipart framing and the other form fields."""


class BodyTooLarge(Exception):
    pass


def bearer(headers: Headers) -> str:
    auth = headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else ""


class BoundedBodies:
    """ASGI middleware; `max_upload_bytes` is the audio limit, the body may hold a little more."""

    def __init__(self, app: ASGIApp, max_upload_bytes: int, keys: ClientKeys):
        self.app, self.audio_limit, self.keys = app, max_upload_bytes, keys
        self.limit = max_upload_bytes + FORM_OVERHEAD

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if self.keys.enabled and scope["path"].startswith(CLIENT_PATHS) and not self.keys.check(bearer(headers)):
            await self._refuse(scope, receive, send, UNAUTHORIZED, "Missing or invalid API key. Send "
                               "'Authorization: Bearer <key>'.", {"WWW-Authenticate": "Bearer"})
            return
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            await self._refuse(scope, receive, send, FILE_TOO_LARGE, self._too_large(f"{int(length) / 2**20:.1f} MiB"))
            return

        received, cut_off, answered = 0, False, False

        async def counted() -> Message:
            nonlocal received, cut_off
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    cut_off = True
                    raise BodyTooLarge()
            return message

        async def unless_cut_off(message: Message) -> None:
            nonlocal answered
            if cut_off and not answered:
                return  # the app's answer to a body cut short (a parse error) is replaced below
            answered = answered or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, unless_cut_off)
        except BodyTooLarge:
            pass
        if cut_off and not answered:
            over = f"over {self.limit / 2**20:.0f} MiB"
            await self._refuse(scope, receive, send, FILE_TOO_LARGE, self._too_large(over))

    def _too_large(self, size: str) -> str:
        return (f"The upload is {size}; the limit is {self.audio_limit / 2**20:.0f} MiB. "
                "Send a shorter or more compressed file.")

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, kind: ErrorKind, message: str,
                      headers: dict | None = None) -> None:
        scope.setdefault("state", {})["error_code"] = kind.code  # for metrics and the production log
        await error_response(message, kind, headers=headers)(scope, receive, send)
