"""When a retrain starts, and how: the trigger policy (plain rules over typed inputs) and the
submission of the retrain as a Ray job (the Ray Jobs API of the same cluster: the local one by
default, `RAY_ADDRESS` for a remote one).

Policy, in order: one job at a time, always; by hand, otherwise at once; automatically only
after the cooldown and once enough new labels from enough distinct clients exist, and then for a
drift verdict, a live feedback WER (the median of the clients' own WERs) above the threshold,
or the schedule. Every decision is logged with its inputs.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel

from asrops.settings import TriggerSettings

log = logging.getLogger(__name__)

JOB_METADATA = {"asrops": "retrain"}


class Cause(StrEnum):
    MANUAL = "manual"
    DRIFT = "drift"
    FEEDBACK_WER = "feedback_wer"
    SCHEDULE = "schedule"


class TriggerInputs(BaseModel):
    now: datetime
    manual: bool = False
    drift_verdict: str | None = None
    """The drift monitor's current verdict (drift, no_drift, insufficient_data)."""
    feedback_wer: float | None = None
    """Live WER of the stable version from feedback since the last retrain, in percent: the
    median over clients of each one's WER (asrops/feedback.by_client)."""
    feedback_wer_clients: int = 0
    """Distinct clients behind `feedback_wer`."""
    new_labels: int = 0
    """Corrections received since the last retrain."""
    label_clients: int = 0
    """Distinct clients that sent them (API keys; all anonymous callers are one)."""
    last_retrain_at: datetime | None = None
    job_running: bool = False


class TriggerDecision(BaseModel):
    start: bool
    cause: Cause | None
    reason: str
    inputs: TriggerInputs

    def log_message(self) -> str:
        i = self.inputs
        return (f"retrain trigger: {'START' if self.start else 'no'} ({self.reason}); inputs: manual={i.manual} "
                f"drift_verdict={i.drift_verdict} feedback_wer={i.feedback_wer} "
                f"feedback_wer_clients={i.feedback_wer_clients} new_labels={i.new_labels} "
                f"label_clients={i.label_clients} "
                f"last_retrain_at={i.last_retrain_at} job_running={i.job_running}")


def decide(inputs: TriggerInputs, s: TriggerSettings) -> TriggerDecision:
    def no(reason: str) -> TriggerDecision:
        return TriggerDecision(start=False, cause=None, reason=reason, inputs=inputs)

    def yes(cause: Cause, reason: str) -> TriggerDecision:
        return TriggerDecision(start=True, cause=cause, reason=reason, inputs=inputs)

    if inputs.job_running:
        return no("a retrain job is already running")
    if inputs.manual:
        return yes(Cause.MANUAL, "started by hand")
    since = (inputs.now - inputs.last_retrain_at).total_seconds() if inputs.last_retrain_at else None
    if since is not None and since < s.cooldown_s:
        return no(f"cooldown: last retrain {since:.0f} s ago, cooldown {s.cooldown_s:.0f} s")
    if inputs.new_labels < s.min_new_labels:
        return no(f"{inputs.new_labels} new labels, {s.min_new_labels} needed")
    if inputs.label_clients < s.min_label_clients:
        return no(f"new labels from {inputs.label_clients} distinct clients, {s.min_label_clients} needed")
    if s.on_drift and inputs.drift_verdict == "drift":
        return yes(Cause.DRIFT, "the drift monitor's verdict is drift")
    if s.feedback_wer_threshold is not None and inputs.feedback_wer is not None \
            and inputs.feedback_wer_clients >= s.min_label_clients \
            and inputs.feedback_wer > s.feedback_wer_threshold:
        return yes(Cause.FEEDBACK_WER, f"feedback WER {inputs.feedback_wer:.1f} % above "
                   f"{s.feedback_wer_threshold:.1f} %")
    if s.schedule_s is not None and (since is None or since >= s.schedule_s):
        return yes(Cause.SCHEDULE, f"scheduled every {s.schedule_s:.0f} s")
    return no("no drift verdict, feedback WER within bounds, no schedule due")


# --- Ray Jobs -------------------------------------------------------------------------------
class JobInfo(BaseModel):
    job_id: str
    status: str
    """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED (Ray's job states)."""
    cause: str | None = None
    start_time: float | None = None


def jobs_address(settings: TriggerSettings, given: str | None = None) -> str:
    """Where the Ray Jobs API is: the address given, else RAY_ADDRESS (as for Ray's own CLI),
    else the settings' (the local cluster's dashboard); `auto` and `local` mean the latter."""
    address = given or os.environ.get("RAY_ADDRESS") or settings.jobs_address
    return settings.jobs_address if address in ("auto", "local") else address


def jobs_client(address: str):
    """A Ray Jobs client that sends the cluster's token (a local cluster's Jobs API answers 401
    without it)."""
    from ray.job_submission import JobSubmissionClient

    from asrops.raycluster import use_cluster_token

    use_cluster_token()
    return JobSubmissionClient(address)


def submit_retrain(cause: Cause, reason: str, address: str, extra_env: dict | None = None) -> str:
    """Submit `asrops retrain run` as a Ray job; returns its id."""
    entrypoint = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "asrops.cli", "retrain", "run",
                                                   "--cause", cause.value, "--reason", reason])
    env = {k: v for k, v in os.environ.items() if k.startswith("ASROPS_")} | (extra_env or {})
    job_id = jobs_client(address).submit_job(entrypoint=entrypoint, metadata={**JOB_METADATA, "cause": cause.value},
                                         runtime_env={"env_vars": env})
    log.info("retrain job %s submitted (%s: %s)", job_id, cause.value, reason)
    return job_id


def retrain_jobs(address: str) -> list[JobInfo]:
    """Every retrain job the cluster knows, newest last."""
    jobs = [j for j in jobs_client(address).list_jobs() if (j.metadata or {}).get("asrops") == "retrain"]
    jobs.sort(key=lambda j: j.start_time or 0)
    return [JobInfo(job_id=j.submission_id or j.job_id, status=str(j.status.value if hasattr(j.status, "value")
                                                                    else j.status),
                    cause=(j.metadata or {}).get("cause"), start_time=(j.start_time or 0) / 1000 or None)
            for j in jobs]


class RetrainTrigger:
    """Run by the drift monitor after each window: gathers the policy's inputs (the verdict, live
    feedback WER and new labels since the last retrain, the cluster's retrain jobs), decides,
    logs the decision with its inputs, and submits the job. Job states are exported as metrics."""

    def __init__(self, settings, store, registry, job_states_gauge=None, address: str | None = None):
        self.settings, self.store, self.registry = settings, store, registry
        self.gauge, self.address = job_states_gauge, jobs_address(settings.retrain.trigger, address)

    def inputs(self, verdict: str | None, now: datetime) -> TriggerInputs:
        from datetime import UTC, timedelta

        from asrops.feedback import FeedbackStore, by_client

        jobs = retrain_jobs(self.address)
        if self.gauge is not None:
            for state, ray_states in (("pending", {"PENDING"}), ("running", {"RUNNING"}),
                                      ("succeeded", {"SUCCEEDED"}), ("failed", {"FAILED", "STOPPED"})):
                self.gauge.labels(state).set(sum(j.status in ray_states for j in jobs))
        last = max((j.start_time for j in jobs if j.start_time), default=None)
        last_at = datetime.fromtimestamp(last, UTC) if last else None
        since = last_at or now - timedelta(days=30)
        feedback = FeedbackStore(self.store).read(since, now)
        stable = self.registry.resolve("stable")
        stable_wer = by_client(feedback[feedback["model_version"] == stable] if len(feedback) else feedback)
        return TriggerInputs(now=now, drift_verdict=verdict, feedback_wer=stable_wer.median_wer,
                             feedback_wer_clients=stable_wer.clients, new_labels=len(feedback),
                             label_clients=by_client(feedback).clients, last_retrain_at=last_at,
                             job_running=any(j.status in ("PENDING", "RUNNING") for j in jobs))

    def step(self, verdict: str | None, now: datetime) -> TriggerDecision:
        decision = decide(self.inputs(verdict, now), self.settings.retrain.trigger)
        log.info(decision.log_message())
        if decision.start:
            submit_retrain(decision.cause, decision.reason, self.address)
        return decision
