"""The HTTP contract of `serve.api.build_api`, without Ray or a model: a fake transcriber
stands in for the model applications (the real ones are exercised in test_service.py)."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from asrops.audio import audio_to_wav_bytes
from asrops.engines.types import Segment, Transcription
from asrops.errors import VersionNotFoundError
from asrops.serve.api import SegmentsDecoded, TranscribeResult, build_api
from asrops.serve.auth import ClientKeys
from asrops.settings import Settings

WAV = audio_to_wav_bytes((np.sin(np.linspace(0, 800 * np.pi, 16_000)) * 0.3).astype(np.float32))


class FakeTranscriber:
    def __init__(self, delay_s: float = 0.0, ready: bool = True, fail_at: int | None = None):
        self.delay_s, self._ready, self.calls, self.fail_at = delay_s, ready, [], fail_at

    def resolve(self, model: str) -> str:
        if model not in ("stable", "v1"):
            raise VersionNotFoundError(f"Model {model!r} is not served here.")
        return "v1"

    def model_names(self) -> list[str]:
        return ["stable", "v1"]

    def ready(self) -> bool:
        return self._ready

    async def transcribe(self, model, audio, options, client, request_id) -> TranscribeResult:
        self.calls.append((model, len(audio), options, client))
        await asyncio.sleep(self.delay_s)
        segments = [_segment(0, " Hello there.")]
        return TranscribeResult(transcription=Transcription(text="Hello there.", segments=segments, duration_s=1.0),
                                version="v1", route="stable")

    async def transcribe_stream(self, model, audio, options, client, request_id):
        """Two windows of segments, then the answer; `fail_at` makes it raise there instead."""
        self.calls.append((model, len(audio), options, client))
        windows = [[_segment(0, " Hello there."), _segment(1, " General")], [_segment(2, " Kenobi.")]]
        for i, window in enumerate(windows):
            if self.fail_at == i:
                raise RuntimeError("the model's replica died")
            await asyncio.sleep(self.delay_s)
            yield SegmentsDecoded(segments=window, version="v1", route="canary")
        if self.fail_at == len(windows):
            raise RuntimeError("the model's replica died")
        segments = [s for w in windows for s in w]
        yield TranscribeResult(transcription=Transcription(text="Hello there. General Kenobi.", segments=segments,
                                                           duration_s=2.0), version="v1", route="canary")


def _segment(i: int, text: str) -> Segment:
    return Segment(id=i, start=float(i), end=i + 1.0, text=text, tokens=[1], avg_logprob=-0.2, no_speech_prob=0.01,
                   compression_ratio=1.1)


def _client(transcriber=None, **serve) -> tuple[TestClient, FakeTranscriber]:
    settings = Settings(data_dir="/nonexistent")
    for key, value in serve.items():
        setattr(settings.serve, key, value)
    transcriber = transcriber or FakeTranscriber()
    return TestClient(build_api(transcriber, settings)), transcriber


def _post(client, headers=None, **data):
    return client.post("/v1/audio/transcriptions", files={"file": ("a.wav", WAV, "audio/wav")}, data=data,
                       headers=headers or {})


def test_keys_are_required_when_configured_and_compared_by_hash():
    client, fake = _client(api_keys=["sk-right"])
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "sk-right"}):
        r = _post(client, headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer" and r.headers["x-request-id"]
    assert client.get("/v1/models").status_code == 401
    assert fake.calls == []  # nothing reached the model
    ok = _post(client, {"Authorization": "Bearer sk-right"})
    assert ok.status_code == 200 and ok.json() == {"text": "Hello there.", "usage": {"type": "duration", "seconds": 1}}
    assert fake.calls[0][3] == ClientKeys.client_id("sk-right") != "sk-right"
    keys = ClientKeys.from_plain(["sk-right"])
    assert b"sk-right" not in b"".join(keys.digests) and keys.check("sk-right") and not keys.check("sk-righ")


def test_openai_fields_not_honoured_are_refused_by_name_never_ignored():
    """A client that asks for what is not done (logprobs, server-side VAD, diarization) must not get
    an answer as if it had not asked; what is done anyway (chunking_strategy=auto) is accepted."""
    client, fake = _client()
    for field, value in (("include[]", "logprobs"), ("chunking_strategy", '{"type": "server_vad"}'),
                         ("known_speaker_names[]", "ann"), ("speaker", "x")):
        r = _post(client, **{field: value})
        assert r.status_code == 400, (field, r.text)
        error = r.json()["error"]
        assert error["param"] == field and error["type"] == "invalid_request_error", error
        assert field.removesuffix("[]") in error["message"] or "not a field" in error["message"], error
    assert fake.calls == []  # refused before any decoding
    for field, value in (("stream", "false"), ("chunking_strategy", "auto")):
        assert _post(client, **{field: value}).status_code == 200, field
    verbose = _post(client, response_format="verbose_json").json()
    assert verbose["usage"] == {"type": "duration", "seconds": 1} and verbose["duration"] == 1.0


def test_a_field_sent_twice_is_refused_by_name_and_list_fields_may_repeat():
    """Two files or two models would otherwise be answered for whichever came last."""
    client, fake = _client()
    url = "/v1/audio/transcriptions"
    twice = {"file": [("file", ("a.wav", WAV, "audio/wav")), ("file", ("b.wav", WAV, "audio/wav"))],
             "model": [("file", ("a.wav", WAV, "audio/wav")), ("model", (None, "stable")), ("model", (None, "v1"))]}
    for field, parts in twice.items():
        r = client.post(url, files=parts)
        assert r.status_code == 400, (field, r.text)
        assert r.json()["error"] | {"message": ""} == {"message": "", "type": "invalid_request_error",
                                                      "param": field, "code": "invalid_value"}, r.text
        assert "2 times" in r.json()["error"]["message"]
    assert fake.calls == []
    listed = client.post(url, files=[("file", ("a.wav", WAV, "audio/wav")), ("response_format", (None, "verbose_json")),
                                     ("timestamp_granularities[]", (None, "segment")),
                                     ("timestamp_granularities[]", (None, "word"))])
    assert listed.status_code == 200 and fake.calls[0][2].word_timestamps


def test_models_are_retrieved_by_any_name_a_request_may_use_and_an_unknown_one_is_a_404():
    client, _ = _client()
    for name in ("whisper-1", "stable", "v1"):
        r = client.get(f"/v1/models/{name}")
        assert r.status_code == 200 and r.json() == {"id": name, "object": "model", "created": 0, "owned_by": "asrops"}
    r = client.get("/v1/models/whisper-large")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    keyed, _ = _client(api_keys=["sk-right"])
    assert keyed.get("/v1/models/stable").status_code == 401
    assert keyed.get("/v1/models/stable", headers={"Authorization": "Bearer sk-right"}).status_code == 200


def test_translations_and_bodies_the_form_parser_cannot_read_are_explained():
    client, fake = _client()
    r = client.post("/v1/audio/translations", files={"file": ("a.wav", WAV, "audio/wav")}, data={"model": "whisper-1"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert "/v1/audio/transcriptions" in r.json()["error"]["message"]
    unreadable = {"no boundary": ({"content-type": "multipart/form-data"}, b"xx"),
                  "broken": ({"content-type": "multipart/form-data; boundary=b"}, b"--b\r\nno header end\r\n\r\n")}
    for what, (headers, body) in unreadable.items():
        r = client.post("/v1/audio/transcriptions", headers=headers, content=body)
        assert r.status_code == 400, (what, r.text)
        assert r.json()["error"]["code"] == "invalid_body" and "multipart/form-data" in r.json()["error"]["message"]
    many = [("file", ("a.wav", WAV, "audio/wav"))] + [(f"x{i}", (None, "1")) for i in range(1001)]
    r = client.post("/v1/audio/transcriptions", files=many)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_body", r.text
    assert fake.calls == []


def _events(response) -> list[dict]:
    import json

    assert response.headers["content-type"].startswith("text/event-stream")
    return [json.loads(line.removeprefix("data: ")) for line in response.text.splitlines() if line.startswith("data: ")]


def test_a_stream_sends_each_decoded_window_as_deltas_then_the_text_and_usage():
    telemetry = RecordingTelemetry()
    client = TestClient(build_api(FakeTranscriber(), Settings(data_dir="/nonexistent"), telemetry=telemetry))
    r = _post(client, stream="true")
    assert r.status_code == 200 and r.headers["x-model-version"] == "v1" and r.headers["x-route"] == "canary"
    events = _events(r)
    assert [e["type"] for e in events] == ["transcript.text.delta"] * 2 + ["transcript.text.done"]
    assert [e["delta"] for e in events[:2]] == ["Hello there. General", " Kenobi."]
    assert "".join(e["delta"] for e in events[:2]) == events[-1]["text"] == "Hello there. General Kenobi."
    assert events[-1]["usage"] == {"type": "duration", "seconds": 2}
    assert telemetry.seen == [(200, None, True, "v1")]  # observed once, when the stream ended
    assert _post(client, stream="false").json()["text"] == "Hello there."


def test_a_stream_that_fails_before_its_first_event_is_a_plain_error_and_after_it_an_error_event():
    telemetry = RecordingTelemetry()
    settings = Settings(data_dir="/nonexistent")
    before = TestClient(build_api(FakeTranscriber(fail_at=0), settings, telemetry=telemetry),
                        raise_server_exceptions=False)
    r = _post(before, stream="true")
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    after = TestClient(build_api(FakeTranscriber(fail_at=1), settings, telemetry=telemetry))
    events = _events(_post(after, stream="true"))
    assert [e["type"] for e in events] == ["transcript.text.delta", "error"]
    assert events[-1]["error"]["type"] == "server_error" and "request id" in events[-1]["error"]["message"]
    assert [seen[:2] for seen in telemetry.seen] == [(500, "internal_error"), (500, "internal_error")]


def test_a_stream_is_refused_for_formats_that_are_not_text():
    client, fake = _client()
    for fmt in ("verbose_json", "srt", "vtt"):
        r = _post(client, stream="true", response_format=fmt)
        assert r.status_code == 400 and r.json()["error"]["param"] == "stream", r.text
    assert _post(client, stream="maybe").status_code == 400
    assert fake.calls == []
    assert _events(_post(client, stream="true", response_format="text"))[-1]["type"] == "transcript.text.done"


def test_word_timestamps_are_asked_of_the_model_in_verbose_json_only():
    client, fake = _client()
    r = _post(client, response_format="json", **{"timestamp_granularities[]": "word"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "timestamp_granularities[]"
    assert "verbose_json" in r.json()["error"]["message"] and fake.calls == []
    assert _post(client, response_format="verbose_json", **{"timestamp_granularities[]": "word"}).status_code == 200
    assert fake.calls[-1][2].word_timestamps
    assert _post(client, response_format="verbose_json").status_code == 200
    assert not fake.calls[-1][2].word_timestamps


def test_a_stream_frees_its_clients_slot_when_it_ends():
    """With one request in flight per client, a client can stream again once its stream ended."""
    client, _ = _client(max_in_flight_per_client=1)
    for _ in range(3):
        assert _events(_post(client, stream="true"))[-1]["type"] == "transcript.text.done"


def test_no_keys_means_open_and_anonymous_callers_are_routed_per_request():
    client, fake = _client()
    r = _post(client)
    assert r.status_code == 200
    assert fake.calls[0][3] == r.headers["x-request-id"]


def test_a_client_header_keeps_a_caller_sticky_and_a_version_header_pins_the_model():
    client, fake = _client(api_keys=["sk-right"])
    auth = {"Authorization": "Bearer sk-right"}
    assert _post(client, {**auth, "X-Client-Id": "tenant-7"}).status_code == 200
    assert fake.calls[-1][3] == "client:tenant-7"
    assert _post(client, {**auth, "X-Model-Version": "v1"}, model="whisper-1").status_code == 200
    assert fake.calls[-1][0] == "v1"
    r = _post(client, {**auth, "X-Model-Version": "v9"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_slow_transcription_gets_504_in_openai_shape():
    client, _ = _client(FakeTranscriber(delay_s=2.0), request_timeout_s=0.2)
    r = _post(client)
    assert r.status_code == 504
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert r.json()["error"]["code"] == "timeout"


def test_readiness_follows_the_transcriber():
    client, _ = _client(FakeTranscriber(ready=False))
    r = client.get("/readyz")
    assert r.status_code == 503 and r.headers["retry-after"]
    assert client.get("/healthz").status_code == 200


def test_formats_headers_and_options_reach_the_model():
    client, fake = _client()
    r = _post(client, model="whisper-1", response_format="vtt", prompt="Hello", temperature="0.2")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/vtt")
    assert r.text.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.000\nHello there.")
    assert r.headers["x-model-version"] == "v1" and r.headers["x-route"] == "stable"
    model, samples, options, _ = fake.calls[0]
    assert model == "stable" and samples == 16_000
    assert options.prompt == "Hello" and options.temperature == pytest.approx(0.2)
    srt = _post(client, response_format="srt")
    assert srt.text == "1\n00:00:00,000 --> 00:00:01,000\nHello there.\n"
    verbose = _post(client, response_format="verbose_json").json()
    assert verbose["segments"][0]["avg_logprob"] == -0.2 and verbose["duration"] == 1.0


def test_unknown_model_is_404_before_any_decoding():
    client, fake = _client()
    r = client.post("/v1/audio/transcriptions", files={"file": ("a.wav", b"not audio")}, data={"model": "x"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert fake.calls == []


def test_an_error_quotes_at_most_the_start_of_what_a_client_sent():
    """A 100-KB field name, format or language is not echoed back whole in the error (a model
    name: tests/test_routing.py)."""
    client, _ = _client()
    long = "x" * 100_000
    for field, value in (("response_format", long), ("language", long), (long[:2_000], "1")):
        r = _post(client, **{field: value})
        assert r.status_code in (400, 404) and len(r.text) < 1_000, (field[:10], r.status_code, len(r.text))
        assert "'xxxxxxxx" in r.json()["error"]["message"]


class RecordingTelemetry:
    """Keeps what each observed request was: status, error code, decoded or not, its version."""

    def __init__(self):
        self.seen, self.request_ids, self.clients = [], [], []

    def observe(self, request_id, status, latency_s, error_code, decoded, result, asked_version=None, client=None):
        self.request_ids.append(request_id)
        self.clients.append(client)
        self.seen.append((status, error_code, decoded is not None, result.version if result else asked_version))


def test_every_transcription_request_is_observed_once_with_its_outcome():
    telemetry = RecordingTelemetry()
    client = TestClient(build_api(FakeTranscriber(), Settings(data_dir="/nonexistent"), telemetry=telemetry))
    assert _post(client).status_code == 200
    assert client.post("/v1/audio/transcriptions", files={"file": ("a.png", b"\x89PNG\r\n\x1a\n" + b"0" * 64)}
                       ).status_code == 415
    assert client.post("/v1/audio/transcriptions", data={"model": "stable"}).status_code in (400, 422)
    assert _post(client, model="nope").status_code == 404
    assert client.get("/v1/models").status_code == 200  # not a transcription: not observed
    assert telemetry.seen == [
        (200, None, True, "v1"),
        (415, "unsupported_media", False, None),
        (400, "missing_required_parameter", False, None),
        (404, "model_not_found", False, None),
    ]


def _feedback_client(tmp_path, **serve):
    from asrops.feedback import RecentRequests
    from asrops.registry.store import LocalStore
    from asrops.serve.feedback import FeedbackRecorder
    from asrops.serve.telemetry import RequestTelemetry

    settings = Settings(data_dir=tmp_path)
    for key, value in serve.items():
        setattr(settings.serve, key, value)
    store, recent = LocalStore(tmp_path / "log"), RecentRequests()
    app = build_api(FakeTranscriber(), settings, telemetry=RequestTelemetry(None, None, recent),
                    feedback=FeedbackRecorder(lambda: store, recent))
    return TestClient(app), store


def test_feedback_is_joined_to_the_answer_and_keeps_the_audio(tmp_path):
    from asrops.feedback import FeedbackStore

    client, store = _feedback_client(tmp_path)
    rid = _post(client).headers["x-request-id"]
    r = client.post("/v1/feedback", json={"request_id": rid, "text": "Hello their friend", "tags": {"accent": "x"}})
    assert r.status_code == 200, r.text
    body = r.json()
    # "hello there" answered, "hello their friend" right: 1 substitution + 1 deletion in 3 words.
    assert body["model_version"] == "v1" and body["word_errors"] == 2 and body["reference_words"] == 3
    assert store.exists(body["audio_key"])
    stored = FeedbackStore(store).read(datetime.now(UTC) - timedelta(minutes=1), datetime.now(UTC))
    assert stored["request_id"].tolist() == [rid] and stored["tags"][0] == {"accent": "x"}


def test_feedback_errors_are_in_the_openai_shape(tmp_path):
    client, _ = _feedback_client(tmp_path, api_keys=["sk-1"])
    r = client.post("/v1/feedback", json={"request_id": "nope", "text": "x"})
    assert r.status_code == 401
    auth = {"Authorization": "Bearer sk-1"}
    r = client.post("/v1/feedback", json={"request_id": "nope", "text": "x"}, headers=auth)
    assert r.status_code == 404 and r.json()["error"]["code"] == "request_not_found"
    assert "X-Request-Id" in r.json()["error"]["message"]
    r = client.post("/v1/feedback", json={"request_id": "nope"}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "text"
    # Oversized tags (a 1 MB value, a long name, too many) are refused before anything is stored.
    for tags in ({"accent": "x" * 1_000_000}, {"k" * 65: "v"}, {f"t{i}": "v" for i in range(21)}):
        r = client.post("/v1/feedback", json={"request_id": "nope", "text": "x", "tags": tags}, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("tags"), r.text
        assert len(r.text) < 1_000  # the client's 1-MB value or 65-char key is not echoed back whole
    # A body that is no JSON object is said to be one, not blamed on a parameter named 'None' or '1'.
    for body in (b"{", b"[]", b"request_id=x&text=y"):
        r = client.post("/v1/feedback", content=body, headers={**auth, "content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_body", (body, r.text)
        assert r.json()["error"]["param"] is None and "JSON" in r.json()["error"]["message"], r.text


def test_feedback_on_a_request_this_ingress_forgot_is_joined_from_the_production_log(tmp_path):
    from asrops.prodlog import FinishedRequest, ProductionLogWriter
    from asrops.settings import ProductionLogSettings

    client, store = _feedback_client(tmp_path)
    writer = ProductionLogWriter(lambda: store, ProductionLogSettings(audio_sample_share=1.0))
    writer.submit(FinishedRequest(request_id="old-1", time=datetime.now(UTC), model_version="v0", route="canary",
                                  status=200, latency_s=0.1, samples=np.zeros(16_000, np.float32),
                                  transcription=Transcription(text="turn it off", segments=[], duration_s=1.0)))
    assert writer.flush()
    body = client.post("/v1/feedback", json={"request_id": "old-1", "text": "turn it off"}).json()
    assert (body["model_version"], body["route"], body["word_errors"]) == ("v0", "canary", 0)
    assert body["audio_key"] and store.exists(body["audio_key"])


# --- limits and faults (issue 16, first part) ---------------------------------------------
def test_a_blank_client_key_or_admin_token_is_refused_at_start():
    from pydantic import ValidationError

    for field in ("api_keys", "admin_tokens"):
        with pytest.raises(ValidationError, match="blank key"):
            Settings(data_dir="/nonexistent", serve={field: ["sk-1", " "]})
    assert Settings(data_dir="/nonexistent", serve={"api_keys": []}).serve.api_keys == []  # no auth, said so


def test_an_overlong_prompt_is_a_400_naming_the_field_before_any_decoding():
    client, fake = _client(max_prompt_chars=1000)
    r = _post(client, prompt="word " * 200_000)  # 1 MB
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "prompt" and error["code"] == "invalid_value" and "1,000" in error["message"]
    assert fake.calls == []
    assert _post(client, prompt="patient names: Ola, Ines").status_code == 200


class _Raising(FakeTranscriber):
    async def transcribe(self, model, audio, options, client, request_id) -> TranscribeResult:
        raise KeyError("a bug of ours")


def test_a_fault_of_ours_is_a_500_in_the_openai_shape_with_its_request_id_counted_against_its_version():
    telemetry = RecordingTelemetry()
    app = build_api(_Raising(), Settings(data_dir="/nonexistent"), telemetry=telemetry)
    r = _post(TestClient(app, raise_server_exceptions=False))
    assert r.status_code == 500, r.text
    rid = r.headers["x-request-id"]
    assert r.json()["error"]["code"] == "internal_error" and rid in r.json()["error"]["message"]
    assert telemetry.request_ids == [rid]
    assert telemetry.seen == [(500, "internal_error", True, "v1")]  # counted against v1, not model_version=""
    client, _ = _client()
    assert _post(client).status_code == 200  # and a good request after it is answered


def test_a_client_error_is_not_counted_against_a_version():
    telemetry = RecordingTelemetry()
    r = TestClient(build_api(FakeTranscriber(), Settings(data_dir="/nonexistent"), telemetry=telemetry)).post(
        "/v1/audio/transcriptions", files={"file": ("a.wav", b"RIFF....WAVEfmt garbage")})
    assert r.status_code == 415 and telemetry.seen == [(415, "unsupported_media", False, None)]


def test_a_request_id_that_could_not_be_a_store_key_is_a_400_logged_under_an_id_of_ours():
    telemetry = RecordingTelemetry()
    ids = iter(["../x", "a" * 300, "ok-123"])
    app = build_api(FakeTranscriber(), Settings(data_dir="/nonexistent"), request_id=lambda: next(ids),
                    telemetry=telemetry)
    client = TestClient(app)
    for _ in range(2):
        r = _post(client)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request_id", r.text
        assert r.json()["error"]["param"] == "X-Request-Id"
    assert _post(client).status_code == 200
    assert [s[0] for s in telemetry.seen] == [400, 400, 200]
    assert all(len(rid) == 32 for rid in telemetry.request_ids[:2]) and telemetry.request_ids[2] == "ok-123"


def test_a_reused_request_id_is_counted_once_in_the_recent_requests_memory():
    from asrops.feedback import AnsweredRequest, RecentRequests

    recent = RecentRequests(max_requests=10, max_audio_s=5.0)
    answered = AnsweredRequest(model_version="v1", route="stable", text="x", time=datetime.now(UTC),
                               samples=np.zeros(16_000 * 2, np.float32))
    recent.add("other", answered)
    for _ in range(5):
        recent.add("same", answered)  # 2 s each time; before, every add counted again and evicted "other"
    assert recent.get("other") is not None and recent.get("same") is not None


class _Counting:
    """Test instrumentation around an ASGI app: the request body bytes the app pulled."""

    def __init__(self, app):
        self.app, self.pulled = app, 0

    async def __call__(self, scope, receive, send):
        async def counted():
            message = await receive()
            self.pulled += len(message.get("body", b""))
            return message
        await self.app(scope, counted, send)


def _chunked_upload(port: int, total_bytes: int, headers: dict[str, str], chunk: int = 1 << 20) -> tuple[int, int]:
    """A multipart upload with chunked transfer encoding (no Content-Length) over a raw socket,
    stopping when the server answers or hangs up; returns (status, bytes sent)."""
    import select
    import socket

    boundary = "bound4ry"
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall((f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}"
                  f"Content-Type: multipart/form-data; boundary={boundary}\r\nTransfer-Encoding: chunked\r\n\r\n"
                  ).encode())
    preamble = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
                "Content-Type: audio/wav\r\n\r\n").encode()
    sent, first = 0, True
    try:
        while sent < total_bytes and not select.select([sock], [], [], 0)[0]:
            data = (preamble if first else b"") + b"\0" * chunk
            first = False
            sock.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            sent += len(data)
    except OSError:  # the server answered and closed while we were still sending
        pass
    response = b""
    try:
        while b"\r\n" not in response and (part := sock.recv(4096)):
            response += part
    except OSError:
        pass
    sock.close()
    return int(response.split(b" ")[1]) if response else 0, sent


def test_a_chunked_upload_past_the_limit_is_cut_off_with_413_and_an_unkeyed_one_gets_401_unread():
    """On a real HTTP server (uvicorn on loopback): the key is checked before the body is read,
    and a chunked body is cut off at the limit, not read to its end."""
    settings = Settings(data_dir="/nonexistent")
    settings.serve.api_keys = ["sk-1"]
    counting = _Counting(build_api(FakeTranscriber(), settings))
    with _uvicorn(counting) as port:
        status, _ = _chunked_upload(port, 200 << 20, {})
        assert status == 401 and counting.pulled == 0
        status, sent = _chunked_upload(port, 200 << 20, {"Authorization": "Bearer sk-1"})
        assert status == 413
        limit = settings.audio.max_upload_bytes
        assert counting.pulled <= limit + (3 << 20), f"{counting.pulled >> 20} MiB pulled"
        assert sent < 200 << 20  # the server answered before the client had sent it all


@contextlib.contextmanager
def _uvicorn(app):
    """`app` on a real HTTP server (uvicorn, one event loop, as in a replica) on loopback; yields its port."""
    import threading
    import time

    import uvicorn

    from tests.conftest import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def test_feedback_with_its_store_unreachable_is_a_503_with_retry_after(tmp_path):
    """S3 down (nothing listens on the endpoint): the store's failure is ours to retry, not a bare 500."""
    from asrops.feedback import RecentRequests
    from asrops.registry.store import S3Store
    from asrops.serve.feedback import FeedbackRecorder
    from asrops.serve.telemetry import RequestTelemetry
    from tests.conftest import free_port

    dead = S3Store("asrops-feedback", endpoint_url=f"http://127.0.0.1:{free_port()}")
    dead.client.meta.config.retries = {"max_attempts": 1}
    recent = RecentRequests()
    app = build_api(FakeTranscriber(), Settings(data_dir=tmp_path), telemetry=RequestTelemetry(None, None, recent),
                    feedback=FeedbackRecorder(lambda: dead, recent))
    client = TestClient(app)
    rid = _post(client).headers["x-request-id"]
    r = client.post("/v1/feedback", json={"request_id": rid, "text": "hello there"})
    assert r.status_code == 503 and r.headers["retry-after"], r.text
    assert r.json()["error"]["type"] == "server_error" and "x-request-id" in r.headers


def test_feedback_on_a_hung_store_gets_503_within_its_deadline_and_transcriptions_go_on(tmp_path, monkeypatch):
    """A store that accepts connections and never answers (an S3 server stopped, not gone) must
    not hold a client for the S3 client's own timeouts and retries (minutes), and the calls left
    waiting on it must not take the threads that decode every transcription's audio."""
    import socket
    import time
    from concurrent.futures import ThreadPoolExecutor

    from asrops.feedback import RecentRequests
    from asrops.registry.store import S3Store
    from asrops.serve.feedback import FeedbackRecorder
    from asrops.serve.telemetry import RequestTelemetry
    from loadtests.local_s3 import LOCAL_S3_CREDENTIALS

    for name, value in LOCAL_S3_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    with socket.create_server(("127.0.0.1", 0), backlog=64) as hung:  # the kernel accepts; nobody reads
        hung_store = S3Store("asrops-feedback", endpoint_url=f"http://127.0.0.1:{hung.getsockname()[1]}")
        recent = RecentRequests()
        app = build_api(FakeTranscriber(), Settings(data_dir=tmp_path), telemetry=RequestTelemetry(None, None, recent),
                        feedback=FeedbackRecorder(lambda: hung_store, recent, timeout_s=1.0))
        with _uvicorn(app) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            def transcribe(audio: bytes = WAV) -> httpx.Response:
                return http.post("/v1/audio/transcriptions", files={"file": ("a.wav", audio, "audio/wav")})

            rid = transcribe().headers["x-request-id"]

            def correct(_) -> tuple[int, float, str]:
                started = time.monotonic()
                r = http.post("/v1/feedback", json={"request_id": rid, "text": "hello there"})
                return r.status_code, time.monotonic() - started, r.headers.get("retry-after", "")

            with ThreadPoolExecutor(12) as pool:  # more than the event loop's default thread pool
                answers = list(pool.map(correct, range(12)))
            assert all(status == 503 and retry for status, _, retry in answers), answers
            assert max(seconds for _, seconds, _ in answers) < 5, answers
            started = time.monotonic()
            # 44.1 kHz: resampled in a worker thread (a small 16-kHz WAV is decoded on the event loop)
            assert transcribe(audio_to_wav_bytes(np.zeros(44_100, np.float32), 44_100)).status_code == 200
            assert time.monotonic() - started < 5  # decoding was not queued behind the hung store calls


def test_a_corrected_requests_audio_outlives_the_sampled_audio_purge(tmp_path):
    """Sampled audio is purged after days; a retrain looks a month back over corrections, so a
    correction's audio is kept apart from it."""
    from asrops.prodlog import ProductionLogReader

    client, store = _feedback_client(tmp_path)
    rid = _post(client).headers["x-request-id"]
    body = client.post("/v1/feedback", json={"request_id": rid, "text": "hello there"}).json()
    assert body["audio_key"].startswith("labelled-audio/")
    far_future = datetime.now(UTC) + timedelta(days=365)
    ProductionLogReader(store).purge_audio(retention_days=7, now=far_future)
    assert store.exists(body["audio_key"])


def test_client_quotas_rate_and_in_flight():
    from asrops.serve.limits import ClientQuotas

    now = [0.0]
    quotas = ClientQuotas(rate_per_s=2.0, burst=2, max_in_flight=None, clock=lambda: now[0])
    assert quotas.admit("a") is None and quotas.admit("a") is None
    assert quotas.admit("a") == pytest.approx(0.5)  # the bucket is empty: half a second to the next token
    assert quotas.admit("b") is None  # another client is not held back
    now[0] = 0.5
    assert quotas.admit("a") is None
    flights = ClientQuotas(rate_per_s=None, burst=1, max_in_flight=1)
    assert flights.admit("a") is None and flights.admit("a") == 1.0
    flights.release("a")
    assert flights.admit("a") is None


def test_a_client_over_its_rate_gets_429_with_retry_after_and_others_are_served_and_metered():
    telemetry = RecordingTelemetry()
    settings = Settings(data_dir="/nonexistent", serve={"api_keys": ["sk-a", "sk-b"], "rate_limit_per_s": 0.01,
                                                        "rate_limit_burst": 1})
    client = TestClient(build_api(FakeTranscriber(), settings, telemetry=telemetry))
    a, b = {"Authorization": "Bearer sk-a"}, {"Authorization": "Bearer sk-b"}
    assert _post(client, headers=a).status_code == 200
    r = _post(client, headers={**a, "X-Client-Id": "someone-else"})  # a header does not buy a new quota
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, r.text
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert _post(client, headers=b).status_code == 200
    assert telemetry.clients == [ClientKeys.client_id("sk-a")] * 2 + [ClientKeys.client_id("sk-b")]


def test_only_the_client_that_made_a_request_may_correct_it(tmp_path):
    """Another key is told the id is unknown (404): it can neither move a version's live WER
    with someone else's requests nor learn which ids exist."""
    from asrops.prodlog import FinishedRequest, ProductionLogWriter
    from asrops.settings import ProductionLogSettings

    client, store = _feedback_client(tmp_path, api_keys=["sk-a", "sk-b"])
    a, b = {"Authorization": "Bearer sk-a"}, {"Authorization": "Bearer sk-b"}
    rid = _post(client, headers=a).headers["x-request-id"]
    r = client.post("/v1/feedback", json={"request_id": rid, "text": "hello there"}, headers=b)
    assert r.status_code == 404 and r.json()["error"]["code"] == "request_not_found", r.text
    assert client.post("/v1/feedback", json={"request_id": rid, "text": "hello there"}, headers=a).status_code == 200

    # The same rule for a request this ingress no longer remembers (joined from the production log).
    writer = ProductionLogWriter(lambda: store, ProductionLogSettings())
    writer.submit(FinishedRequest(request_id="old-a", time=datetime.now(UTC), model_version="v0", route="stable",
                                  status=200, latency_s=0.1, client=ClientKeys.client_id("sk-a"),
                                  transcription=Transcription(text="turn it off", segments=[], duration_s=1.0)))
    assert writer.flush()
    assert client.post("/v1/feedback", json={"request_id": "old-a", "text": "x"}, headers=b).status_code == 404
    assert client.post("/v1/feedback", json={"request_id": "old-a", "text": "x"}, headers=a).status_code == 200


class CountingCounter:
    def __init__(self):
        self.total: dict[str, float] = {}

    def inc(self, value=1, tags=None):
        key = tags["client"]
        self.total[key] = self.total.get(key, 0) + value


class FeedbackCounters:
    """The feedback counters of IngressMetrics, kept in a dict per client."""

    def __init__(self):
        self.feedback, self.feedback_word_errors, self.feedback_reference_words = (CountingCounter()
                                                                                   for _ in range(3))
        self.feedback_retracted_word_errors, self.feedback_retracted_reference_words = (CountingCounter()
                                                                                        for _ in range(2))

    def net(self, what: str, client: str) -> float:
        added, retracted = getattr(self, f"feedback_{what}"), getattr(self, f"feedback_retracted_{what}")
        return added.total.get(client, 0) - retracted.total.get(client, 0)


def test_a_second_correction_replaces_the_first_and_the_counters_move_by_the_difference(tmp_path):
    """One correction per request: resubmitting cannot pile word errors onto a version."""
    from asrops.feedback import FeedbackStore, RecentRequests
    from asrops.registry.store import LocalStore
    from asrops.serve.feedback import FeedbackRecorder
    from asrops.serve.telemetry import RequestTelemetry

    store, recent, counters = LocalStore(tmp_path / "log"), RecentRequests(), FeedbackCounters()
    client = TestClient(build_api(FakeTranscriber(), Settings(data_dir=tmp_path, serve={"api_keys": ["sk-a"]}),
                                  telemetry=RequestTelemetry(None, None, recent),
                                  feedback=FeedbackRecorder(lambda: store, recent, counters)))
    a, who = {"Authorization": "Bearer sk-a"}, ClientKeys.client_id("sk-a")
    rid = _post(client, headers=a).headers["x-request-id"]  # answered "hello there"
    for text in ["hello their friend", "totally different words here", "hello there friend"] * 5:
        assert client.post("/v1/feedback", json={"request_id": rid, "text": text}, headers=a).status_code == 200
    # Only the last correction counts: "hello there friend" is 1 deletion in 3 words.
    assert counters.feedback.total == {who: 1}
    assert (counters.net("word_errors", who), counters.net("reference_words", who)) == (1, 3)
    stored = FeedbackStore(store).read(datetime.now(UTC) - timedelta(minutes=1), datetime.now(UTC))
    assert stored["reference"].tolist() == ["hello there friend"] and stored["client"].tolist() == [who]


class ListingCounter:
    """An object store that counts its listings (a scan) and reads."""

    def __init__(self, store):
        self.store, self.listings, self.reads = store, 0, 0

    def __getattr__(self, name):
        return getattr(self.store, name)

    def list_prefix(self, prefix):
        self.listings += 1
        return self.store.list_prefix(prefix)

    def read_bytes(self, key):
        self.reads += 1
        return self.store.read_bytes(key)


def test_an_unknown_request_id_is_answered_from_the_index_without_a_scan(tmp_path):
    """A flood of made-up ids costs two reads each, not a day of parquet."""
    from asrops.feedback import FeedbackIn, RecentRequests
    from asrops.prodlog import FinishedRequest, ProductionLogWriter
    from asrops.registry.store import LocalStore
    from asrops.serve.errors import ApiError
    from asrops.serve.feedback import FeedbackRecorder
    from asrops.settings import ProductionLogSettings

    store = LocalStore(tmp_path / "log")
    writer = ProductionLogWriter(lambda: store, ProductionLogSettings())
    for i in range(200):  # a day's log with many records
        writer.submit(FinishedRequest(request_id=f"r-{i}", time=datetime.now(UTC), model_version="v0",
                                      route="stable", status=200, latency_s=0.1,
                                      transcription=Transcription(text="a b", segments=[], duration_s=1.0)))
    assert writer.flush()
    counting = ListingCounter(store)
    recorder = FeedbackRecorder(lambda: counting, RecentRequests())
    with pytest.raises(ApiError) as unknown:
        asyncio.run(recorder.record(FeedbackIn(request_id="never-seen", text="x"), "anonymous"))
    assert unknown.value.kind.status == 404
    assert counting.listings == 0 and counting.reads <= 2  # today's and yesterday's index entry
    known = asyncio.run(recorder.record(FeedbackIn(request_id="r-7", text="a b"), "anonymous"))
    assert (known.model_version, known.word_errors) == ("v0", 0) and counting.listings == 0


def test_corrections_of_one_request_at_once_still_count_once(tmp_path):
    """Saves race on the same key: each sees the one it replaces (compare-and-swap), so the
    counters' added minus retracted is always what is stored."""
    import threading

    from asrops.feedback import FeedbackRecord, FeedbackStore
    from asrops.registry.store import LocalStore

    store, now = FeedbackStore(LocalStore(tmp_path / "log")), datetime.now(UTC)
    added, retracted, lock = [0], [0], threading.Lock()

    def correct(errors: int) -> None:
        record = FeedbackRecord(request_id="r-1", received_at=now, model_version="v1", route="stable",
                                hypothesis="a", reference="b", tags={}, audio_key=None, word_errors=errors,
                                reference_words=10, requested_at=now)
        replaced = store.save(record)
        with lock:
            added[0] += errors
            retracted[0] += replaced.word_errors if replaced else 0

    threads = [threading.Thread(target=correct, args=(e,)) for e in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stored = store.read(now - timedelta(minutes=1), now + timedelta(minutes=1))
    assert len(stored) == 1 and added[0] - retracted[0] == stored["word_errors"][0]
