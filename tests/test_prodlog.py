"""The production log: features computed off the request path, parquet round trip, sampled
audio with retention, and a failing store that neither blocks nor loses the caller."""

from __future__ import annotations

import os
import threading
import time
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from asrops.engines.types import Segment, Transcription
from asrops.features import audio_features, transcript_features, vocabulary_of
from asrops.prodlog import FinishedRequest, ProductionLogReader, ProductionLogWriter, store_for
from asrops.registry.store import LocalStore
from asrops.settings import ProductionLogSettings, Settings
from tests.conftest import new_moto_bucket

RNG = np.random.default_rng(0)


def tone(seconds: float = 2.0, noise: float = 0.0) -> np.ndarray:
    t = np.arange(int(16_000 * seconds)) / 16_000
    speechy = 0.3 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 2 * t) > 0)  # bursts and pauses
    return (speechy + noise * RNG.standard_normal(len(t))).astype(np.float32)


def transcription(text: str = "turn the lights off in the kitchen") -> Transcription:
    seg = Segment(id=0, start=0, end=2, text=text, tokens=[1, 2], avg_logprob=-0.3, no_speech_prob=0.01,
                  compression_ratio=1.2)
    return Transcription(text=text, segments=[seg], duration_s=2.0)


def finished(i: int, when: datetime, status: int = 200, noise: float = 0.0) -> FinishedRequest:
    ok = status == 200
    return FinishedRequest(request_id=f"r{i}", time=when, model_version="v1", route="stable", status=status,
                           latency_s=0.2, error_code=None if ok else "unsupported_media",
                           samples=tone(noise=noise) if ok else None, original_sample_rate=44_100,
                           original_channels=2, transcription=transcription() if ok else None)


def test_noise_lowers_the_estimated_snr_and_raises_the_centroid():
    clean, noisy = audio_features(tone(), 16_000, 1), audio_features(tone(noise=0.1), 16_000, 1)
    assert clean.snr_db > noisy.snr_db + 10
    assert noisy.spectral_centroid_hz > clean.spectral_centroid_hz
    assert clean.silence_ratio > 0.3 > noisy.silence_ratio  # the pauses are silent only when clean
    assert audio_features(np.clip(tone() * 10, -1, 1), 16_000, 1).clipping_ratio > 0.1


def test_words_outside_the_reference_vocabulary_are_counted():
    vocab = vocabulary_of(["Turn the lights off.", "In the kitchen, please"])
    assert transcript_features(transcription(), vocab).oov_share == 0
    f = transcript_features(transcription("turn the flux capacitor off"), vocab)
    assert f.oov_share == pytest.approx(2 / 5) and f.words == 5 and f.words_per_s == 2.5
    assert transcript_features(transcription(), None).oov_share is None


def test_the_share_of_low_confidence_words_is_a_feature():
    t = transcription("turn the lights off")
    assert transcript_features(t).low_confidence_word_share is None  # no probabilities: no figure
    t.segments[0].word_probs = [0.9, 0.95, 0.3, 0.45]
    assert transcript_features(t).low_confidence_word_share == pytest.approx(0.5)
    assert "low_confidence_word_share" in Settings().monitoring.drift.numeric_features


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, monkeypatch):
    """The log store as the service opens it from settings: a directory, or S3 (moto over HTTP)."""
    monkeypatch.setenv("ASROPS_DATA_DIR", str(tmp_path / "data"))
    if request.param == "s3":
        endpoint, bucket = new_moto_bucket(request)
        monkeypatch.setenv("ASROPS_MONITORING__PRODUCTION_LOG__URI", f"s3://{bucket}/prodlog")
        monkeypatch.setenv("ASROPS_MONITORING__PRODUCTION_LOG__S3_ENDPOINT_URL", endpoint)
    return store_for(Settings())


def test_records_round_trip_through_parquet_with_sampled_audio(store):
    events: list[tuple[str, int]] = []
    writer = ProductionLogWriter(lambda: store, ProductionLogSettings(audio_sample_share=1.0, flush_interval_s=0.2),
                                 on_event=lambda name, n: events.append((name, n)))
    now = datetime.now(UTC)
    for i in range(5):
        writer.submit(finished(i, now + timedelta(seconds=i)))
    writer.submit(finished(9, now, status=415))
    assert writer.flush()
    writer.close()
    frame = ProductionLogReader(store).read(now - timedelta(seconds=1), now + timedelta(minutes=1))
    assert len(frame) == 6 and sorted(frame["status"].tolist()) == [200] * 5 + [415]
    ok = frame[frame.status == 200]
    assert ok["snr_db"].notna().all() and (ok["words"] == 7).all() and (ok["original_channels"] == 2).all()
    assert ok["audio_key"].notna().all() and frame[frame.status == 415]["audio_key"].isna().all()
    assert store.exists(ok["audio_key"].iloc[0])
    # A window that excludes the first two records.
    assert len(ProductionLogReader(store).read(now + timedelta(seconds=2), now + timedelta(minutes=1))) == 3
    assert ("written", 6) in events


def test_the_writer_computes_features_at_background_priority_and_the_request_path_keeps_its_own(store):
    writer = ProductionLogWriter(lambda: store, ProductionLogSettings(flush_interval_s=0.1), niceness=7)
    try:
        deadline = time.monotonic() + 10
        while os.getpriority(os.PRIO_PROCESS, writer._thread.native_id) != 7:
            assert time.monotonic() < deadline, "the writer's thread never lowered its priority"
            time.sleep(0.05)
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) < 7  # the submitting thread's
        writer.submit(finished(1, datetime.now(UTC)))
        assert writer.flush()
    finally:
        writer.close()


def test_keep_audio_off_keeps_none_and_old_audio_is_purged(store):
    writer = ProductionLogWriter(lambda: store, ProductionLogSettings(keep_audio=False, audio_sample_share=1.0))
    writer.submit(finished(1, datetime.now(UTC)))
    assert writer.flush()
    assert store.list_prefix("audio/") == []
    old = datetime.now(UTC) - timedelta(days=10)
    writer2 = ProductionLogWriter(lambda: store, ProductionLogSettings(audio_sample_share=1.0))
    writer2.submit(finished(2, old))
    writer2.submit(finished(3, datetime.now(UTC)))
    assert writer2.flush()
    assert len(store.list_prefix("audio/")) == 2
    assert len(store.list_prefix("requests/")) == 3  # the index holds every answered request
    assert ProductionLogReader(store).purge_audio(retention_days=7) == 1
    assert [k.rsplit("/", 1)[1] for k in store.list_prefix("audio/")] == ["r3.flac"]
    # The index keeps what can still be corrected (and its next day), not the 10-day-old entry.
    assert [k.rsplit("/", 1)[1] for k in store.list_prefix("requests/")] == ["r1.json", "r3.json"]


def test_an_unwritable_store_neither_blocks_nor_raises_and_recovers(tmp_path):
    """Root ignores directory permissions, so the store is made unwritable by failing its writes."""
    store = LocalStore(tmp_path / "log")
    broken = {"on": True}
    real_write = store.write_bytes

    def write_bytes(key, data):
        if broken["on"]:
            time.sleep(0.5)  # a slow, failing store
            raise OSError(30, "Read-only file system")
        return real_write(key, data)

    store.write_bytes = write_bytes
    events: list[str] = []
    writer = ProductionLogWriter(lambda: store, ProductionLogSettings(flush_interval_s=0.1, max_buffered_records=50),
                                 on_event=lambda name, n: events.append(name))
    requests = [finished(i, datetime.now(UTC)) for i in range(80)]
    start = time.monotonic()
    for done in requests:
        writer.submit(done)
    assert time.monotonic() - start < 0.25  # submitting never waited on the store (each write takes 0.5 s)
    assert not writer.flush(timeout_s=1.5)
    assert "write_failure" in events and "dropped" in events
    broken["on"] = False
    assert writer.flush(timeout_s=10)
    frame = ProductionLogReader(store).read(datetime.now(UTC) - timedelta(minutes=5), datetime.now(UTC))
    assert len(frame) == 50  # the newest 50 kept while the store failed, written once it recovered


def test_the_buffer_is_bounded_by_the_audio_it_holds_and_every_record_is_written_or_counted_dropped(tmp_path):
    """A failing store with long audio: the buffer stays under max_buffered_mb whatever the
    record count allows, and written + dropped = submitted once the store is back."""
    store = LocalStore(tmp_path / "log")
    broken = {"on": True}
    real_write = store.write_bytes

    def write_bytes(key, data):
        if broken["on"]:
            raise OSError(30, "Read-only file system")
        return real_write(key, data)

    store.write_bytes = write_bytes
    counts: dict[str, int] = {}
    settings = ProductionLogSettings(flush_interval_s=0.05, max_buffered_records=10_000, max_buffered_mb=1.0,
                                     audio_sample_share=1.0)
    writer = ProductionLogWriter(lambda: store, settings,
                                 on_event=lambda name, n: counts.__setitem__(name, counts.get(name, 0) + n))
    submitted = 60  # each holds 2 s of float32 audio (128 KB) until its record is built
    for i in range(submitted):
        writer.submit(finished(i, datetime.now(UTC)))
        assert writer._held_bytes <= 2**20
    assert not writer.flush(timeout_s=1.0)
    broken["on"] = False
    assert writer.flush(timeout_s=10)
    assert counts.get("dropped", 0) > 0
    assert counts["written"] + counts["dropped"] == submitted, counts
    frame = ProductionLogReader(store).read(datetime.now(UTC) - timedelta(minutes=5), datetime.now(UTC))
    assert len(frame) == counts["written"]
