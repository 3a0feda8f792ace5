"""What a client can make the ingress hold before it is known to be allowed: the key of a
request with a body is checked before a byte of the body is read (401 first), and the body is
counted as it arrives, chunked or not, and cut off with 413 past the limit. The rest of the API
then reads at most `limit` bytes of any upload."""

from __future__ import annotations

import time
from collections.abc import Callable

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


class ClientQuotas:
    """Per client (its key, or `anonymous`): a request rate (token bucket) and requests in
    flight, so that one client cannot starve the others. Held by each ingress replica, so with
    N ingress replicas a client gets up to N times the rate; `admit` says how long to wait."""

    def __init__(self, rate_per_s: float | None, burst: int, max_in_flight: int | None,
                 clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.max_in_flight, self.clock = rate_per_s, burst, max_in_flight, clock
        self._tokens: dict[str, tuple[float, float]] = {}  # client -> (tokens, at)
        self._in_flight: dict[str, int] = {}

    def admit(self, client: str) -> float | None:
        """None when the request may go on (then `release` it when answered), else the seconds
        until it may be retried."""
        if self.max_in_flight is not None and self._in_flight.get(client, 0) >= self.max_in_flight:
            return 1.0
        if self.rate is not None:
            now = self.clock()
            tokens, at = self._tokens.get(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate)
            if tokens < 1.0:
                self._tokens[client] = (tokens, now)
                return (1.0 - tokens) / self.rate
            self._tokens[client] = (tokens - 1.0, now)
        self._in_flight[client] = self._in_flight.get(client, 0) + 1
        return None

    def release(self, client: str) -> None:
        left = self._in_flight.get(client, 0) - 1
        if left > 0:
            self._in_flight[client] = left
        else:
            self._in_flight.pop(client, None)
