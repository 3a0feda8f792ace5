"""The retrain trigger policy: one job at a time, by hand at once, automatic only after the
cooldown and with enough new labels, then on drift, feedback WER or schedule."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from asrops.retrain.trigger import Cause, TriggerInputs, decide
from asrops.settings import TriggerSettings

NOW = datetime(2026, 11, 22, 12, tzinfo=UTC)
S = TriggerSettings(cooldown_s=3600, min_new_labels=50, feedback_wer_threshold=30.0, schedule_s=86_400)


def inputs(**kw) -> TriggerInputs:
    return TriggerInputs(**({"now": NOW, "new_labels": 100, "last_retrain_at": NOW - timedelta(days=2)} | kw))


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
