"""The PromQL the promotion controller asks: how many requests a version had, and the
built-in checks. Every query here reads metrics the service exports (serve/metrics.py); the
monitoring tests check each against the exported names and against a real Prometheus.

A check is a template: `$version` is the version judged, `$window` the analysis window.
"""

from __future__ import annotations

from asrops.settings import AnalysisSpec, Bound, Gate, MetricCheck

JUDGED = 'model_version="$version",route!="explicit"'
"""The requests a version is judged on: those routed to it, not those that pinned it by name
(`model=<version>`, `X-Model-Version`), which a single client could send to sway the analysis."""


def _increase(metric: str, version_filter: str = JUDGED) -> str:
    return f"(sum(increase({metric}{{{version_filter}}}[$window])) or vector(0))"


FAILED = f"{_increase('ray_asrops_fallbacks_total')} + {_increase('ray_asrops_breaker_skips_total')}"
"""Requests meant for a version that another version answered: it failed them, or its open
breaker skipped it (so a canary whose breaker opened keeps counting as failing)."""
LIVE_REQUESTS = f"{_increase('ray_asrops_requests_total')} + {FAILED}"
"""Requests meant for a version: those it answered, and those it failed."""
SERVER_ERRORS = _increase("ray_asrops_requests_total", JUDGED + ',status=~"5.."')
"""Requests a version answered with a 5xx."""
FEEDBACK_CLIENTS = 3
"""Distinct clients whose corrections a feedback WER needs: with three or more, the median of
their WERs is one no single client (API key) can set."""
FEEDBACK_WORDS_PER_CLIENT = 50
"""Corrected words a client needs in the window to count towards FEEDBACK_CLIENTS."""


def net_feedback(counter: str, by: str, selector: str = JUDGED, window: str = "$window") -> str:
    """A feedback counter summed `by` a label, net of retractions (a second correction of a
    request retracts what the first added; serve/feedback.py), 0 where nothing was retracted.
    Also what the dashboard's live-WER panel shows (monitoring/dashboards.py)."""
    labels = f"{{{selector}}}" if selector else ""

    def summed(name: str) -> str:
        return f"sum by ({by}) (increase(ray_asrops_feedback_{name}_total{labels}[{window}]))"

    zero = f"{summed('reference_words')} * 0"
    return f"(({summed(counter)} or {zero}) - ({summed('retracted_' + counter)} or {zero}))"


CLIENT_WORDS = net_feedback("reference_words", "client")
"""Corrected words per client."""
CLIENT_WER = f"{net_feedback('word_errors', 'client')} / ({CLIENT_WORDS} > 0)"
"""Each client's WER over its own corrections."""
SHADOW_REQUESTS = ('sum(increase(ray_asrops_shadow_disagreement_ratio_count{model_version="$version"}[$window]))'
                   " or vector(0)")
"""Stable requests copied to a version in shadow (each one compared)."""

DEFAULT_CHECKS = [
    MetricCheck(
        name="error-ratio",
        query=f"({SERVER_ERRORS} + {FAILED}) / ({LIVE_REQUESTS})",
        max=Bound(value=0.005, relative_to_stable="plus"),
    ),
    MetricCheck(
        name="latency-p95",
        query=('histogram_quantile(0.95, sum by (le) (rate('
               f'ray_asrops_request_duration_seconds_bucket{{{JUDGED}}}[$window])))'),
        max=Bound(value=1.2, relative_to_stable="times"),
    ),
    MetricCheck(
        name="avg-logprob",
        query=(f'-(sum(rate(ray_asrops_segment_neg_avg_logprob_sum{{{JUDGED}}}[$window])) / '
               f'sum(rate(ray_asrops_segment_neg_avg_logprob_count{{{JUDGED}}}[$window])))'),
        min=Bound(value=-0.1, relative_to_stable="plus"),
    ),
    MetricCheck(
        name="shadow-disagreement",
        query=('sum(rate(ray_asrops_shadow_disagreement_ratio_sum{model_version="$version"}[$window])) / '
               'sum(rate(ray_asrops_shadow_disagreement_ratio_count{model_version="$version"}[$window]))'),
        max=Bound(value=0.3),
        during="shadow",
    ),
    MetricCheck(
        name="feedback-wer",
        query=f"quantile(0.5, {CLIENT_WER})",
        max=Bound(value=1.02, relative_to_stable="times"),
        only_when=Gate(query=f"count({CLIENT_WORDS} >= {FEEDBACK_WORDS_PER_CLIENT}) or vector(0)",
                       min=FEEDBACK_CLIENTS),
    ),
]


def checks_of(spec: AnalysisSpec) -> list[MetricCheck]:
    """The spec's checks; the built-in ones when it names none."""
    return DEFAULT_CHECKS if spec.checks is None else spec.checks


def every_query() -> dict[str, str]:
    """Every template the controller runs with the built-in checks, by name: the request counts,
    each check and each check's gate (what monitoring/promql.py checks against real metrics)."""
    queries = {"live-requests": LIVE_REQUESTS, "shadow-requests": SHADOW_REQUESTS}
    for check in DEFAULT_CHECKS:
        queries[check.name] = check.query
        if check.only_when is not None:
            queries[f"{check.name} (gate)"] = check.only_when.query
    return queries
