"""The retrain trigger policy: one job at a time, by hand at once, automatic only after the
cooldown and with enough new labels from enough clients, then on drift, feedback WER or
schedule; one client's corrections, however many, never start one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pandas as pd

from asrops.feedback import by_client
from asrops.retrain.trigger import Cause, TriggerInputs, decide
from asrops.settings import TriggerSettings

NOW = datetime(2026, 11, 22, 12, tzinfo=UTC)
S = TriggerSettings(cooldown_s=3600, min_new_labels=50, feedback_wer_threshold=30.0, schedule_s=86_400)


def inputs(**kw) -> TriggerInputs:
    return TriggerInputs(**({"now": NOW, "new_labels": 100, "label_clients": 5, "feedback_wer_clients": 5,
                              "last_retrain_at": NOW - timedelta(days=2)} | kw))


def test_a_drift_verdict_starts_a_retrain_and_the_decision_carries_its_inputs():
    d = decide(inputs(drift_verdict="drift"), S)
    assert d.start and d.cause is Cause.DRIFT
    assert "drift_verdict=drift" in d.log_message() and "new_labels=100" in d.log_message()


def test_never_two_jobs_at_once_not_even_by_hand():
    assert not decide(inputs(drift_verdict="drift", job_running=True), S).start
    assert not decide(inputs(manual=True, job_running=True), S).start
    assert decide(inputs(manual=True, new_labels=0, last_retrain_at=NOW), S).cause is Cause.MANUAL


def test_cooldown_and_too_few_labels_hold_automatic_retrains_back():
    recent = decide(inputs(drift_verdict="drift", last_retrain_at=NOW - timedelta(minutes=10)), S)
    assert not recent.start and "cooldown" in recent.reason
    thin = decide(inputs(drift_verdict="drift", new_labels=49), S)
    assert not thin.start and "49 new labels" in thin.reason


def test_feedback_wer_above_the_threshold_and_the_schedule_trigger_too():
    assert decide(inputs(feedback_wer=31.0), S).cause is Cause.FEEDBACK_WER
    assert not decide(inputs(feedback_wer=29.0, last_retrain_at=NOW - timedelta(hours=2)), S).start
    assert decide(inputs(feedback_wer=29.0), S).cause is Cause.SCHEDULE  # last retrain 2 days ago
    assert not decide(inputs(drift_verdict="insufficient_data", last_retrain_at=NOW - timedelta(hours=2)), S).start


def test_one_client_cannot_start_a_retrain_however_many_labels_it_sends():
    alone = decide(inputs(drift_verdict="drift", new_labels=10_000, label_clients=1), S)
    assert not alone.start and "1 distinct clients, 3 needed" in alone.reason
    assert "label_clients=1" in alone.log_message()
    # A feedback WER needs as many distinct clients as labels do.
    assert not decide(inputs(feedback_wer=90.0, feedback_wer_clients=2,
                             last_retrain_at=NOW - timedelta(hours=2)), S).start


def corrections(*rows: tuple[str | None, int, int]) -> pd.DataFrame:
    return pd.DataFrame([{"client": c, "word_errors": e, "reference_words": w} for c, e, w in rows])


def test_the_feedback_wer_is_the_median_of_the_clients_wers_so_one_key_cannot_set_it():
    honest = [("a", 1, 10), ("b", 2, 10), ("c", 3, 10)]
    assert by_client(corrections(*honest)).median_wer == 20.0
    # One key sending a thousand junk corrections moves the median only to the next honest client.
    flood = corrections(*honest, *[("mallory", 50, 10)] * 1000)
    result = by_client(flood)
    assert result.clients == 4 and result.median_wer == 25.0
    # Old records without a client are one client, and clients without words have no WER.
    legacy = by_client(corrections((None, 5, 10), (None, 5, 10), ("d", 0, 0)))
    assert legacy.clients == 2 and legacy.median_wer == 50.0
    assert by_client(corrections()).median_wer is None
