"""The drift monitor: once per window, an Evidently report of the last window of the production
log against the reference, a verdict over the last N windows, and the scores as metrics.

A long-running process (`asrops monitor`, started by `asrops serve`) or one window on demand
(`asrops drift report`). Reports (HTML and JSON) are stored beside the log, under
`drift-reports/`; every verdict is logged with its inputs.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from pydantic import BaseModel

from asrops.monitoring.drift import DriftResult, compute_drift, save_reports
from asrops.monitoring.reference import load_reference, successful
from asrops.monitoring.verdict import Verdict, VerdictPolicy, WindowJudgement
from asrops.prodlog import ProductionLogReader
from asrops.registry.store import ObjectStore
from asrops.settings import MonitoringSettings

log = logging.getLogger(__name__)

REPORTS = "drift-reports"
RETRAIN_STATES = ("pending", "running", "succeeded", "failed")
VERDICT_VALUE = {"drift": 1, "no_drift": 0, "insufficient_data": -1}


class MonitorMetrics:
    """The monitor's own metrics (prometheus-client; scraped as job `asrops-monitor`)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.share = Gauge("asrops_drift_share", "Share of drifted columns in the last window.", registry=r)
        self.score = Gauge("asrops_drift_feature_score", "Drift score of each feature in the last window "
                           "(p-value for tests, distance for distances: see method).", ["feature", "method"],
                           registry=r)
        self.drifted = Gauge("asrops_drift_feature_drifted", "1 when the feature drifted in the last window.",
                             ["feature"], registry=r)
        self.samples = Gauge("asrops_drift_window_samples", "Answered requests in the last window.", registry=r)
        self.verdict = Gauge("asrops_drift_verdict", "Current verdict: 1 drift, 0 no drift, -1 not enough data.",
                             registry=r)
        self.verdicts = Counter("asrops_drift_verdicts", "Verdicts by outcome.", ["verdict"], registry=r)
        self.runs = Counter("asrops_drift_runs", "Monitor runs by outcome.", ["outcome"], registry=r)
        self.retrain_jobs = Gauge("asrops_retrain_jobs", "Retrain jobs by state.", ["state"], registry=r)
        for state in RETRAIN_STATES:  # exported from the start, so dashboards show 0 rather than no data
            self.retrain_jobs.labels(state).set(0)
        for verdict in VERDICT_VALUE:
            self.verdicts.labels(verdict)
        for outcome in ("ok", "failed"):
            self.runs.labels(outcome)
        self.verdict.set(-1)

    def export(self, samples: int, result: DriftResult | None, verdict: Verdict) -> None:
        self.samples.set(samples)
        if result is not None:
            self.share.set(result.drift_share)
            for c in result.columns:
                if c.score is not None:
                    self.score.labels(c.column, c.method).set(c.score)
                self.drifted.labels(c.column).set(1 if c.drifted else 0)
        self.verdict.set(VERDICT_VALUE[verdict.state])
        self.verdicts.labels(verdict.state).inc()


class WindowOutcome(BaseModel):
    window_start: datetime
    window_end: datetime
    samples: int
    result: DriftResult | None
    """None when the window was too thin to judge."""
    verdict: Verdict
    report_html: str | None = None
    report_json: str | None = None


class DriftMonitor:
    def __init__(self, store: ObjectStore, settings: MonitoringSettings, metrics: MonitorMetrics | None = None,
                 reference: pd.DataFrame | None = None, on_verdict: Callable[[str, datetime], None] | None = None):
        """`on_verdict(state, window end)` runs after each window (the retrain trigger)."""
        self.store, self.settings = store, settings
        self.on_verdict = on_verdict
        self.reader = ProductionLogReader(store)
        self.metrics = metrics or MonitorMetrics()
        self.policy = VerdictPolicy(settings.drift)
        self.history: list[WindowJudgement] = []
        self._reference = reference

    def reference(self) -> pd.DataFrame:
        if self._reference is None:
            self._reference = load_reference(self.store)
            if self._reference is None:
                raise LookupError("no drift reference yet: run 'asrops drift reference --manifest FILE' "
                                  "or '--from START --to END' to pin one")
        return self._reference

    def run_window(self, end: datetime | None = None) -> WindowOutcome:
        """Judge the window that ends at `end` (now by default) and update the verdict."""
        end = end or datetime.now(UTC)
        start = end - timedelta(seconds=self.settings.drift.window_s)
        try:
            current = successful(self.reader.read(start, end))
            reference = self.reference()
            result, paths = None, (None, None)
            if len(current) >= self.settings.drift.min_samples:
                run = compute_drift(current, reference, self.settings.drift)
                result = run.result
                paths = self._store_reports(run, end)
        except Exception:
            self.metrics.runs.labels("failed").inc()
            raise
        self.metrics.runs.labels("ok").inc()
        self.history.append(WindowJudgement(window_end=end, samples=len(current),
                                            drift_share=result.drift_share if result else None,
                                            drifted=result.drifted if result else None))
        self.history = self.history[-max(self.settings.drift.verdict_windows, 1) * 4:]
        verdict = self.policy.decide(self.history)
        log.info("drift window %s..%s: %s", f"{start:%H:%M:%S}", f"{end:%H:%M:%S}", verdict.log_message())
        self.metrics.export(len(current), result, verdict)
        return WindowOutcome(window_start=start, window_end=end, samples=len(current), result=result,
                             verdict=verdict, report_html=paths[0], report_json=paths[1])

    def _store_reports(self, run, end: datetime) -> tuple[str, str]:
        """Saved beside the log (`drift-reports/`); returns where (a path, or a store key)."""
        stem = f"drift-{end:%Y%m%dT%H%M%SZ}"
        with tempfile.TemporaryDirectory() as tmp:
            saved = save_reports(run, Path(tmp), stem)
            keys = []
            for path in (saved.html, saved.json):
                key = f"{REPORTS}/{Path(path).name}"
                self.store.upload_file(key, Path(path))
                local = self.store.local_path(key)
                keys.append(str(local) if local else key)
        return keys[0], keys[1]

    def purge_audio(self) -> None:
        purged = self.reader.purge_audio(self.settings.production_log.audio_retention_days)
        if purged:
            log.info("purged sampled audio of %d hours older than %.1f days", purged,
                     self.settings.production_log.audio_retention_days)

    def run_forever(self, say: Callable[[str], None] = log.info) -> None:
        start_http_server(self.settings.monitor_port, addr=self.settings.metrics_host, registry=self.metrics.registry)
        say(f"drift monitor: metrics on {self.settings.metrics_host}:{self.settings.monitor_port}/metrics, "
            f"one window every {self.settings.drift.window_s:.0f} s")
        while True:
            time.sleep(self.settings.drift.window_s)
            try:
                outcome = self.run_window()
                if outcome.report_html:
                    say(f"drift report: {outcome.report_html}")
                self.purge_audio()
                if self.on_verdict:
                    self.on_verdict(outcome.verdict.state.value, outcome.window_end)
            except LookupError as exc:
                say(str(exc))
            except Exception:
                log.exception("drift window failed; trying again next window")
