"""The Grafana dashboard as code: rows of short panel specs, built into Grafana's JSON model.
`python -m monitoring.dashboards` writes monitoring/grafana/asrops.json, the file Grafana
imports; a test checks the committed file is what this module builds.

Plain Python rather than grafana-foundation-sdk: the dashboard needs a dozen fields per panel,
and a builder dependency (whose API follows Grafana's releases) would cost more than it saves."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from asrops.promotion.checks import net_feedback

DASHBOARD_FILE = Path(__file__).resolve().parent / "grafana" / "asrops.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"

PanelKind = Literal["timeseries", "stat", "state-timeline"]


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    queries: list[Query]
    unit: str = "short"
    """A Grafana unit id: reqps, s, percent (0-100), percentunit (0-1), short, ..."""
    kind: PanelKind = "timeseries"
    description: str = ""
    states: dict[int, tuple[str, str]] = field(default_factory=dict)
    """Value -> (text, colour), for gauges that encode a state."""
    width: int = 12


@dataclass(frozen=True)
class Row:
    title: str
    panels: list[Panel]


def _quantiles(metric: str, qs: tuple[float, ...] = (0.5, 0.95, 0.99)) -> list[Query]:
    """Quantiles of a Ray histogram per model version."""
    return [
        Query(
            f"histogram_quantile({q}, sum by (le, model_version) (rate({metric}_bucket[{RATE}])))",
            f"p{round(q * 100)} {{{{model_version}}}}",
        )
        for q in qs
    ]


def _mean(metric: str, by: str = "model_version") -> Query:
    """Mean of a Ray histogram's observations per `by`, from its _sum and _count."""
    return Query(
        f"sum by ({by}) (rate({metric}_sum[{RATE}])) / sum by ({by}) (rate({metric}_count[{RATE}]))",
        f"mean {{{{{by}}}}}",
    )


_5XX_RATIO = (
    f'(sum by (model_version) (rate(ray_asrops_requests_total{{status=~"5.."}}[{RATE}]))'
    f" or 0 * sum by (model_version) (rate(ray_asrops_requests_total[{RATE}])))"
    f" / sum by (model_version) (rate(ray_asrops_requests_total[{RATE}]))"
)
def _net_feedback(counter: str) -> str:
    return net_feedback(counter, "model_version", selector="", window=RATE)


_SLOW_RATIO = (
    "1 - (sum by (model_version) (rate("
    f'ray_asrops_request_duration_seconds_bucket{{le=~"10|10.0"}}[{RATE}]))'
    f" / sum by (model_version) (rate(ray_asrops_request_duration_seconds_count[{RATE}])))"
)

ROWS: list[Row] = [
    Row("Traffic and errors", [
        Panel("Requests/s by version and route", [Query(
            f"sum by (model_version, route) (rate(ray_asrops_requests_total[{RATE}]))",
            "{{model_version}} {{route}}")], unit="reqps", width=8),
        Panel("Requests/s by status", [Query(
            f"sum by (status) (rate(ray_asrops_requests_total[{RATE}]))", "{{status}}")],
            unit="reqps", width=8,
            description="HTTP status of every answer; 503 is back-pressure, 4xx the client's input."),
        Panel("Server error (5xx) ratio by version", [Query(_5XX_RATIO, "{{model_version}}")],
              unit="percentunit", width=8,
              description="A 5xx counts against the version its model name asked for."),
        Panel("Audio seconds/s by client", [Query(
            f"sum by (client) (rate(ray_asrops_client_audio_seconds_total[{RATE}]))", "{{client}}")],
            unit="short", width=8,
            description="Audio transcribed per client (an API key's id, or anonymous): who uses the "
                        "service, and who is near a quota (ASROPS_SERVE__RATE_LIMIT_PER_S)."),
    ]),
    Row("Latency", [
        Panel("Request latency p50 / p95 / p99 by version",
              _quantiles("ray_asrops_request_duration_seconds"), unit="s"),
        Panel("Share of requests slower than the 10 s SLO", [Query(_SLOW_RATIO, "{{model_version}}")],
              unit="percentunit", description="The SLO allows 1 %; alerts fire on its burn rate."),
        Panel("Real-time factor p50 / p95 by version",
              _quantiles("ray_asrops_real_time_factor", (0.5, 0.95)), unit="short",
              description="Processing seconds per second of audio; below 1 is faster than real time."),
        Panel("Audio duration p50 / p95 by version",
              _quantiles("ray_asrops_audio_duration_seconds", (0.5, 0.95)), unit="s"),
    ]),
    Row("Batching and queues", [
        Panel("Batch size by version", [
            _mean("ray_asrops_batch_size"),
            *_quantiles("ray_asrops_batch_size", (0.95,)),
        ]),
        Panel("Queue depth by version", [Query(
            "sum by (model_version) (ray_asrops_queue_depth)", "{{model_version}}")],
            description="Requests waiting for a free engine, summed over the version's replicas."),
    ]),
    Row("Failures and fallbacks", [
        Panel("Decode errors/s by kind", [Query(
            f"sum by (kind) (rate(ray_asrops_decode_errors_total[{RATE}]))", "{{kind}}")],
            unit="reqps", width=8),
        Panel("Fallbacks/s by failed version", [
            Query(f"sum by (model_version, route) (rate(ray_asrops_fallbacks_total[{RATE}]))",
                  "from {{model_version}} ({{route}})"),
            Query(f"sum by (model_version, route) (rate(ray_asrops_breaker_skips_total[{RATE}]))",
                  "skipped {{model_version}}: breaker open ({{route}})"),
        ], unit="reqps", width=8),
        Panel("Circuit breaker state", [Query(
            "max by (model_version) (ray_asrops_breaker_state)", "{{model_version}}")],
            kind="state-timeline", width=8,
            states={0: ("closed", "green"), 1: ("half-open", "yellow"), 2: ("open", "red")}),
    ]),
    Row("Canary and shadow", [
        Panel("Canary weight", [Query(
            "max by (model_version) (ray_asrops_canary_weight)", "{{model_version}}")],
            unit="percent", width=8),
        Panel("Shadow share", [Query(
            "max by (model_version) (ray_asrops_shadow_share)", "{{model_version}}")],
            unit="percentunit", width=8,
            description="Share of stable traffic copied to the canary; its answers are compared, not returned."),
        Panel("Shadow disagreement with stable (WER)", [
            _mean("ray_asrops_shadow_disagreement_ratio"),
            *_quantiles("ray_asrops_shadow_disagreement_ratio", (0.95,)),
        ], unit="percentunit", width=8),
    ]),
    Row("Promotion controller", [
        Panel("Rollout phase", [Query("max by (phase) (asrops_rollout_phase)", "{{phase}}")],
              kind="stat", width=8, description="1 for the current phase: initializing, progressing, promoting, "
                                                "succeeded, failed or paused (the README's Promotion section)."),
        Panel("Weight the controller set", [Query("max(asrops_rollout_weight)", "weight")],
              unit="percent", width=8),
        Panel("Failed checks of the current rollout", [Query("max(asrops_rollout_failed_checks)", "failed")],
              width=8, description="The rollout is rolled back when this reaches the analysis threshold."),
    ]),
    Row("Feedback", [
        Panel("Live WER from client corrections by version", [Query(
            f"{_net_feedback('word_errors')} / ({_net_feedback('reference_words')} > 0)",
            "{{model_version}}")], unit="percentunit", width=12,
              description="Word errors of the answered text against POST /v1/feedback corrections, per word; "
                          "a request corrected twice counts once, with its latest correction."),
        Panel("Corrections received/s by version", [Query(
            f"sum by (model_version) (rate(ray_asrops_feedback_total[{RATE}]))", "{{model_version}}")], width=12),
    ]),
    Row("Whisper quality signals", [
        Panel("Mean avg_logprob by version", [Query(
            "-(" + _mean("ray_asrops_segment_neg_avg_logprob").expr + ")", "mean {{model_version}}")], width=8,
              description="Per segment; falling means the model is less sure of its words. Recorded negated "
                          "(Ray histograms take positive buckets only) and negated back here."),
        Panel("Mean no_speech_prob by version", [_mean("ray_asrops_segment_no_speech_prob")],
              unit="percentunit", width=8),
        Panel("Mean compression_ratio by version", [_mean("ray_asrops_segment_compression_ratio")],
              width=8, description="Above about 2.4 Whisper is usually repeating itself."),
    ]),
    Row("Drift", [
        Panel("Drift share (drifted columns)", [Query("max(asrops_drift_share)", "drift share")],
              unit="percentunit", width=8),
        Panel("Current drift verdict", [Query("max(asrops_drift_verdict)", "verdict")],
              kind="state-timeline", width=8,
              states={-1: ("not enough data", "gray"), 0: ("no drift", "green"), 1: ("drift", "red")}),
        Panel("Drift monitor up", [Query('up{job="asrops-monitor"}', "{{instance}}")],
              kind="state-timeline", width=8, states={0: ("down", "red"), 1: ("up", "green")}),
        Panel("Per-feature drift score", [Query(
            "max by (feature, method) (asrops_drift_feature_score)", "{{feature}} ({{method}})")],
            description="The stat test's score per feature (p-value for tests, distance for distances)."),
        Panel("Drifted features", [Query(
            "max by (feature) (asrops_drift_feature_drifted)", "{{feature}}")],
            kind="state-timeline", states={0: ("ok", "green"), 1: ("drifted", "red")}),
        Panel("Drift verdicts in range", [Query(
            "sum by (verdict) (increase(asrops_drift_verdicts_total[$__range]))", "{{verdict}}")],
            kind="stat", width=8),
        Panel("Drift runs in range", [Query(
            "sum by (outcome) (increase(asrops_drift_runs_total[$__range]))", "{{outcome}}")],
            kind="stat", width=8),
        Panel("Samples in the drift window", [Query(
            "max(asrops_drift_window_samples)", "samples")], width=8),
    ]),
    Row("Production log and retraining", [
        Panel("Production log records/s by outcome", [Query(
            f"sum by (outcome) (rate(ray_asrops_production_log_records_total[{RATE}]))",
            "{{outcome}}")], width=8),
        Panel("Production log write failures/s", [Query(
            f"sum(rate(ray_asrops_production_log_write_failures_total[{RATE}]))", "failures")],
            width=8),
        Panel("Retrain jobs by state", [Query(
            "sum by (state) (asrops_retrain_jobs)", "{{state}}")], kind="stat", width=8),
    ]),
]


def _mappings(states: dict[int, tuple[str, str]]) -> list[dict]:
    if not states:
        return []
    options = {
        str(value): {"text": text, "color": colour, "index": i}
        for i, (value, (text, colour)) in enumerate(sorted(states.items()))
    }
    return [{"type": "value", "options": options}]


def _options(kind: PanelKind) -> dict:
    legend = {"displayMode": "list", "placement": "bottom", "showLegend": True}
    if kind == "timeseries":
        return {"legend": legend, "tooltip": {"mode": "multi", "sort": "desc"}}
    if kind == "state-timeline":
        return {"legend": legend, "mergeValues": True, "showValue": "auto",
                "rowHeight": 0.9, "tooltip": {"mode": "single", "sort": "none"}}
    return {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value", "graphMode": "none", "textMode": "value_and_name",
            "orientation": "auto", "justifyMode": "auto"}


def _panel(panel: Panel, panel_id: int, x: int, y: int) -> dict:
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {
            "defaults": {"unit": panel.unit, "mappings": _mappings(panel.states)},
            "overrides": [],
        },
        "options": _options(panel.kind),
        "targets": [
            {"expr": q.expr, "legendFormat": q.legend, "refId": chr(ord("A") + i)}
            for i, q in enumerate(panel.queries)
        ],
    }


def build_dashboard(rows: list[Row] = ROWS) -> dict:
    """Grafana's JSON model of the asrops dashboard: one collapsible row per section,
    panels laid out left to right, wrapping at Grafana's 24-column width."""
    panels: list[dict] = []
    panel_id, y = 1, 0
    for row in rows:
        panels.append({"id": panel_id, "type": "row", "title": row.title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        panel_id, y, x = panel_id + 1, y + 1, 0
        for panel in row.panels:
            if x + panel.width > 24:
                x, y = 0, y + 8
            panels.append(_panel(panel, panel_id, x, y))
            panel_id, x = panel_id + 1, x + panel.width
        y += 8
    return {
        "uid": "asrops-overview",
        "title": "asrops: serving, quality and drift",
        "description": "Generated by monitoring/dashboards.py; edit that, not this JSON.",
        "tags": ["asrops"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "browser",
        "graphTooltip": 1,
        "templating": {"list": [{
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
            "hide": 0,
            "refresh": 1,
            "regex": "",
            "options": [],
        }]},
        "annotations": {"list": []},
        "panels": panels,
    }


def write_dashboard(path: Path = DASHBOARD_FILE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(build_dashboard(), indent=2) + "\n")
    return path


if __name__ == "__main__":
    print(f"wrote {write_dashboard()}")
