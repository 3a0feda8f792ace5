"""The OpenAI-compatible HTTP API, as an app factory.

`build_api(transcriber, settings)` is used both by the Ray Serve ingress (where the
transcriber forwards to model deployments) and by tests (where it can call an engine
directly), so the HTTP contract is tested once, without Ray.
"""


import asyncio
import json
import logging
import math
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Protocol

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from asrops.audio import decode_audio, decode_quick
from asrops.engines.types import DecodeOptions, Segment, Transcription
from asrops.errors import shown
from asrops.feedback import FeedbackIn, FeedbackRecord
from asrops.formats import WRITERS, server_timing, usage
from asrops.request_id import RULE, is_valid, new_request_id
from asrops.serve.auth import ClientKeys
from asrops.serve.errors import (
    INTERNAL,
    INVALID_REQUEST_ID,
    INVALID_VALUE,
    NOT_FOUND,
    RATE_LIMITED,
    TIMEOUT,
    UNAUTHORIZED,
    ApiError,
    error_body,
    error_response,
    install_error_handlers,
)
from asrops.serve.feedback import FeedbackRecorder
from asrops.serve.limits import BoundedBodies, ClientQuotas, bearer
from asrops.serve.telemetry import RequestTelemetry
from asrops.settings import Settings

log = logging.getLogger(__name__)

OPENAI_MODEL_ALIAS = "whisper-1"  # what OpenAI clients send by default; means `stable`
TEXT_MEDIA_TYPES = {"text": "text/plain", "srt": "text/plain", "vtt": "text/vtt"}
TRANSCRIPTIONS_PATH = "/v1/audio/transcriptions"


class TranscribeResult(BaseModel):
    transcription: Transcription
    version: str
    """The version that actually produced the text."""
    route: str = "stable"
    batch_size: int = 1
    engine_s: float = 0.0
    """The model's own time on this request (its batch on the engine, until its text was done)."""


class SegmentsDecoded(BaseModel):
    """A streamed request's new segments, sent as soon as their window is decoded."""

    segments: list[Segment]
    version: str
    route: str = "stable"


class Transcriber(Protocol):
    """What the API needs from the serving side."""

    def resolve(self, model: str) -> str:
        """Model name from the request (alias, version id) → version id; VersionNotFoundError if unknown."""

    def model_names(self) -> list[str]:
        """Versions and aliases that can be asked for."""

    def ready(self) -> bool:
        """Models loaded and warm."""

    async def transcribe(self, model: str, audio: np.ndarray, options: DecodeOptions, client: str,
                         request_id: str) -> TranscribeResult:
        """Transcribe with the version that `model` names (an alias or a version id); `client`
        is the identity that keeps one caller on one version during a canary rollout."""

    def transcribe_stream(self, model: str, audio: np.ndarray, options: DecodeOptions, client: str,
                          request_id: str) -> AsyncIterator[SegmentsDecoded | TranscribeResult]:
        """`transcribe`, with `SegmentsDecoded` as windows are decoded and the `TranscribeResult`
        last. Fails before its first event as `transcribe` does; after it, by raising."""


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "asrops"


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


STREAMED_FORMATS = ("json", "text")
"""Formats a streamed answer can stand for: its events carry text (as OpenAI's)."""


def _options(response_format: str, language: str | None, temperature: float, prompt: str | None,
             granularities: list[str] | None, stream: bool, settings: Settings) -> DecodeOptions:
    if prompt and len(prompt) > settings.serve.max_prompt_chars:
        raise ApiError(INVALID_VALUE, f"prompt is {len(prompt):,} characters; the limit is "
                       f"{settings.serve.max_prompt_chars:,} (Whisper reads at most 223 prompt tokens).", "prompt")
    if response_format not in WRITERS:
        raise ApiError(INVALID_VALUE, f"response_format must be one of {', '.join(WRITERS)}; "
                       f"got {shown(response_format)}.", "response_format")
    if language and language.lower() not in ("en", "english"):
        raise ApiError(INVALID_VALUE, f"This service transcribes English only; got language={shown(language)}. "
                       "Omit language or send 'en'.", "language")
    if stream and response_format not in STREAMED_FORMATS:
        raise ApiError(INVALID_VALUE, f"stream=true sends text events; response_format must be "
                       f"{' or '.join(STREAMED_FORMATS)} with it, got {shown(response_format)} (or send stream=false).",
                       "stream")
    if not 0.0 <= temperature <= 1.0:
        raise ApiError(INVALID_VALUE, f"temperature must be between 0 and 1; got {temperature}.", "temperature")
    for g in granularities or []:
        if g not in ("segment", "word"):
            raise ApiError(INVALID_VALUE, f"timestamp_granularities[] takes 'segment' and 'word'; got {shown(g)}.",
                           "timestamp_granularities[]")
    words = "word" in (granularities or [])
    if words and response_format != "verbose_json":
        raise ApiError(INVALID_VALUE, "Word timestamps come in verbose_json only: send response_format=verbose_json "
                       f"with timestamp_granularities[]=word (got {shown(response_format)}).",
                       "timestamp_granularities[]")
    return settings.engine.decode_options().model_copy(
        update={"temperature": temperature, "prompt": prompt or None, "word_timestamps": words})


FORM_FIELDS = frozenset({"file", "model", "language", "prompt", "response_format", "temperature",
                         "timestamp_granularities[]", "stream"})
"""The transcription form fields this service honours."""
NOT_HONOURED = {
    "include[]": "logprobs are for the gpt-4o transcription models; leave it out.",
    "chunking_strategy": "audio is cut into 30-s windows here; leave it out or send 'auto'.",
    "known_speaker_names[]": "speaker names are for diarization models; leave them out.",
    "known_speaker_references[]": "speaker references are for diarization models; leave them out.",
}
"""Fields OpenAI's transcription API defines that this service does not honour, with why; each is
refused with a 400 naming it, except for a value that asks for what is done anyway."""
HONOURED_ANYWAY = {"chunking_strategy": {"auto"}}


def _check_fields(fields: list[tuple[str, object]]) -> None:
    """Refuse what would otherwise be ignored: a client asking for streaming must not get one
    JSON body as if it had not asked, nor one sending two files or two models an answer for
    whichever came last. Only OpenAI's list fields (named `...[]`) may repeat."""
    times_sent = Counter(name for name, _ in fields)
    for name, times in times_sent.items():
        if times > 1 and not name.endswith("[]"):
            raise ApiError(INVALID_VALUE, f"{shown(name)} was sent {times} times; send it once.", name)
    values = {name: value for name, value in fields if isinstance(value, str)}
    for name in sorted(times_sent.keys() - FORM_FIELDS):
        if name in NOT_HONOURED:
            if values.get(name) in HONOURED_ANYWAY.get(name, set()):
                continue
            raise ApiError(INVALID_VALUE, f"{name} is not supported: {NOT_HONOURED[name]}", name)
        raise ApiError(INVALID_VALUE, f"{shown(name)} is not a field of the transcription API; the fields are "
                       f"{', '.join(sorted(FORM_FIELDS | set(NOT_HONOURED)))}.", name)


def _render(result: Transcription, response_format: str, headers: dict) -> Response:
    body = WRITERS[response_format](result)
    if isinstance(body, dict):
        return JSONResponse(body, headers=headers)
    return PlainTextResponse(body, media_type=TEXT_MEDIA_TYPES[response_format], headers=headers)


def _observe(telemetry: RequestTelemetry, request: Request, request_id: str, status: int) -> None:
    state = request.state
    telemetry.observe(request_id, status, time.perf_counter() - state.started,
                      getattr(state, "error_code", None) if status >= 400 else None,
                      getattr(state, "decoded", None), getattr(state, "result", None),
                      getattr(state, "version", None) if status >= 500 else None,
                      client=getattr(state, "quota_client", None))


def _timeout_message(settings: Settings) -> str:
    return f"Transcription took longer than {settings.serve.request_timeout_s:.0f} s. Retry, or send shorter audio."


async def _next_event(events: AsyncIterator, deadline: float, settings: Settings):
    try:
        return await asyncio.wait_for(anext(events), max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        raise ApiError(TIMEOUT, _timeout_message(settings)) from None


CLIENT_CLOSED = 499
"""The status a stream the client hung up on is counted with (nginx's convention)."""


def _sse_event(payload: dict) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


async def _sse(first, events: AsyncIterator, deadline: float, settings: Settings, request: Request,
               telemetry: RequestTelemetry | None):
    """OpenAI's transcription stream as server-sent events: `transcript.text.delta` per decoded
    segment (the deltas join into the text), then `transcript.text.done` with the text and usage.
    A failure after the first event ends the stream with an `error` event in the OpenAI error shape
    (the openai SDK raises it as an APIError); the request is observed (metrics, production log)
    when the stream ends, with the status it would have had."""
    sent, status, event = "", 200, first
    try:
        while isinstance(event, SegmentsDecoded):
            text = (sent + "".join(s.text for s in event.segments)).lstrip()
            if delta := text[len(sent):]:
                yield _sse_event({"type": "transcript.text.delta", "delta": delta})
            sent = text
            event = await _next_event(events, deadline, settings)
        request.state.result = event
        yield _sse_event({"type": "transcript.text.done", "text": event.transcription.text,
                          "usage": usage(event.transcription)})
    except Exception as exc:
        kind, message = (exc.kind, exc.message) if isinstance(exc, ApiError) else \
            (INTERNAL, f"The transcription failed part way; quote request id {request.state.request_id}.")
        if not isinstance(exc, ApiError):
            log.warning("request %s: stream failed after its first event (%s: %s)", request.state.request_id,
                        type(exc).__name__, exc)
        status, request.state.error_code = kind.status, kind.code
        yield _sse_event({"type": "error", **error_body(message, kind, None)})
    except GeneratorExit:  # the client hung up
        status = CLIENT_CLOSED
        raise
    finally:
        await events.aclose()
        if telemetry:
            _observe(telemetry, request, request.state.request_id, status)


class RequestIds:
    """ASGI middleware: every request gets an id (in `X-Request-Id` unless the server in front
    puts it there), a fault of ours still answers in the OpenAI shape, and every transcription
    is observed once answered. Plain ASGI rather than `@app.middleware("http")`, whose
    `call_next` runs the app in another task behind a memory stream and hands the body across."""

    def __init__(self, app: ASGIApp, request_id: Callable[[], str] | None, telemetry: RequestTelemetry | None):
        self.app, self.request_id, self.telemetry = app, request_id, telemetry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        rid = self.request_id() if self.request_id else new_request_id()
        request.state.request_id, request.state.started = rid, time.perf_counter()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if self.request_id is None:
                    MutableHeaders(scope=message).append("X-Request-Id", rid)
            await send(message)

        if not is_valid(rid):  # a client's X-Request-Id (Ray's proxy takes it): it would become a store key
            request.state.error_code = INVALID_REQUEST_ID.code
            refusal = error_response(f"X-Request-Id must be {RULE}; got {shown(rid)}. Send another or none.",
                                     INVALID_REQUEST_ID)
            rid = new_request_id()  # what this answer is logged under
            await refusal(scope, receive, send_with_id)
        else:
            try:
                await self.app(scope, receive, send_with_id)
            except Exception:  # a fault of ours: still the OpenAI shape, the request id, and telemetry
                log.exception("request %s failed", rid)
                if status:  # the answer had started: nothing else can be sent
                    raise
                request.state.error_code = INTERNAL.code
                await error_response(f"Internal error; quote request id {rid} when reporting it.",
                                     INTERNAL)(scope, receive, send_with_id)
        streaming = getattr(request.state, "streaming", False)  # a stream is observed when it ends
        if self.telemetry and scope["path"] == TRANSCRIPTIONS_PATH and scope["method"] == "POST" and not streaming:
            _observe(self.telemetry, request, rid, status)


def build_api(
    transcriber: Transcriber,
    settings: Settings,
    request_id: Callable[[], str] | None = None,
    admin: APIRouter | None = None,
    telemetry: RequestTelemetry | None = None,
    feedback: FeedbackRecorder | None = None,
) -> FastAPI:
    """`request_id`, when given, supplies the id of the current request and means the server
    in front (Ray Serve's proxy) already puts it in the `X-Request-Id` response header;
    `admin` is the admin API's router (see serve/admin.py), mounted as it is; `telemetry`
    sees every transcription request once it is answered (metrics, production log); `feedback`
    serves POST /v1/feedback."""
    app = FastAPI(title="asrops", version="1", docs_url="/docs", redoc_url=None)
    install_error_handlers(app, settings.serve.retry_after_s)
    if admin is not None:
        app.include_router(admin)
    keys = ClientKeys.from_plain(settings.serve.api_keys)
    # Inside the request-id middleware below, so its refusals get a request id and telemetry too.
    app.add_middleware(BoundedBodies, max_upload_bytes=settings.audio.max_upload_bytes, keys=keys)
    s = settings.serve
    quotas = ClientQuotas(s.rate_limit_per_s, s.rate_limit_burst, s.max_in_flight_per_client)

    app.add_middleware(RequestIds, request_id=request_id, telemetry=telemetry)

    async def client_key(request: Request) -> str:
        """The caller's identity for sticky routing: an `X-Client-Id` header, else its key's
        hash, else (an anonymous caller) the request id, so anonymous traffic splits per request.
        Async because it never blocks: FastAPI runs a plain-function dependency in a worker
        thread, which in a Serve replica meant starting a new thread for every request."""
        token = bearer(request.headers)
        if keys.enabled and not keys.check(token):
            raise ApiError(UNAUTHORIZED, "Missing or invalid API key. Send 'Authorization: Bearer <key>'.",
                           headers={"WWW-Authenticate": "Bearer"})
        # Quotas and metering go by key, never by a header a client can vary at will.
        request.state.quota_client = keys.client_id(token) if keys.enabled else "anonymous"
        if client_header := request.headers.get("x-client-id", "").strip():
            return "client:" + client_header[:200]
        return keys.client_id(token) if token else request.state.request_id

    @app.get("/healthz")
    async def healthz():
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz():
        if transcriber.ready():
            return {"status": "ready"}
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})

    def listed_models() -> list[str]:
        return [OPENAI_MODEL_ALIAS, *transcriber.model_names()]

    @app.get("/v1/models", response_model=ModelList)
    async def list_models(_: Annotated[str, Depends(client_key)]):
        return ModelList(data=[ModelCard(id=name) for name in listed_models()])

    @app.get("/v1/models/{model}", response_model=ModelCard)
    async def retrieve_model(model: str, _: Annotated[str, Depends(client_key)]):
        """The openai SDK's `models.retrieve`: a name `/v1/models` lists, or a version id."""
        if model not in listed_models():
            transcriber.resolve(model)  # unknown: 404; an alias named but not running yet: 503
        return ModelCard(id=model)

    @app.post("/v1/audio/translations", include_in_schema=False)
    async def translations():
        """Said plainly rather than a bare 404: clients of OpenAI's API try it."""
        raise ApiError(NOT_FOUND, "This service serves English-only Whisper models, which transcribe but do not "
                       f"translate. For English audio, POST it to {TRANSCRIPTIONS_PATH}.")

    @app.post(TRANSCRIPTIONS_PATH)
    async def transcriptions(
        request: Request,
        client: Annotated[str, Depends(client_key)],
        file: Annotated[UploadFile, File(description="The audio file.")],
        model: Annotated[str, Form()] = OPENAI_MODEL_ALIAS,
        language: Annotated[str | None, Form()] = None,
        prompt: Annotated[str | None, Form()] = None,
        response_format: Annotated[str, Form()] = "json",
        temperature: Annotated[float, Form()] = 0.0,
        timestamp_granularities: Annotated[list[str] | None, Form(alias="timestamp_granularities[]")] = None,
        stream: Annotated[bool, Form()] = False,
    ):
        form = await request.form()  # parsed once already, for the fields above
        _check_fields(form.multi_items())
        options = _options(response_format, language, temperature, prompt, timestamp_granularities, stream, settings)
        # An X-Model-Version header pins a version or alias, like `model` does (for testing).
        name = request.headers.get("x-model-version") or ("stable" if model == OPENAI_MODEL_ALIAS else model)
        # Unknown model → 404 before any decoding work; a request that fails with a 5xx later is
        # counted against the version its model names (error ratio, 5xx alerts).
        request.state.version = transcriber.resolve(name)
        quota_client = request.state.quota_client
        if (wait_s := quotas.admit(quota_client)) is not None:
            raise ApiError(RATE_LIMITED, "Too many transcriptions from this client at once or per second; retry "
                           "after the time in Retry-After.", headers={"Retry-After": str(max(1, math.ceil(wait_s)))})
        streamed = False
        try:
            data = await file.read()
            # a small plain WAV costs less to read here than a hand-off to a thread and back
            audio = decode_quick(data, settings.audio) or await asyncio.to_thread(decode_audio, data, settings.audio)
            request.state.decoded = audio
            if stream:
                events = transcriber.transcribe_stream(name, audio.samples, options, client, request.state.request_id)
                deadline = time.monotonic() + settings.serve.request_timeout_s
                first = await _next_event(events, deadline, settings)  # a failure here is still a plain error
                request.state.streaming = streamed = True
                body = _sse(first, events, deadline, settings, request, telemetry)
                # the client's slot is freed when the stream ends, or is dropped unstarted (a client
                # that hangs up before the first byte)
                weakref.finalize(body, quotas.release, quota_client)
                return StreamingResponse(
                    body, media_type="text/event-stream",
                    headers={"X-Model-Version": first.version, "X-Route": first.route, "Cache-Control": "no-cache"})
            result = await asyncio.wait_for(
                transcriber.transcribe(name, audio.samples, options, client, request.state.request_id),
                settings.serve.request_timeout_s,
            )
        except TimeoutError:
            raise ApiError(TIMEOUT, _timeout_message(settings)) from None
        finally:
            if not streamed:  # a stream releases its slot when it ends
                quotas.release(quota_client)
        request.state.result = result
        headers = {
            "X-Model-Version": result.version,
            "X-Route": result.route,
            "X-Batch-Size": str(result.batch_size),
            "Server-Timing": server_timing(result.engine_s),
        }
        return _render(result.transcription, response_format, headers)

    if feedback is not None:
        @app.post("/v1/feedback", response_model=FeedbackRecord)
        async def post_feedback(request: Request, body: FeedbackIn, _: Annotated[str, Depends(client_key)]):
            """A corrected transcript for a transcription this service answered (by its X-Request-Id),
            from the client (API key) that asked for it."""
            return await feedback.record(body, request.state.quota_client)

    return app
