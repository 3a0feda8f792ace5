"""Progressive canary analysis as data, and the judgement of one interval.

The spec (`AnalysisSpec`, in settings or a YAML file) says how a canary is stepped up: the check
interval, the traffic steps, how many failed checks roll it back, an optional shadow phase, and
the metric checks. A check is a PromQL template (`$version` and `$window` are filled in) with a
range, absolute or relative to the stable's value of the same query. `judge` runs one interval's
checks against Prometheus; no data, NaN, infinity or an unreachable Prometheus fail a check,
never pass it.

The controller's state (`AnalysisState`) lives in the registry beside the rollout record, so the
admin API, the CLI and the controller see one truth. Its phases (Flagger's names):

- initializing: a new canary was seen; its weight is set to the first step (or it is put in
  shadow), and the controller waits for its first requests (a version is only routed to once warm).
- progressing: every interval the checks run; all pass -> next step, else one more failed check.
- promoting: the last step passed; the canary is being made stable.
- succeeded: promoted; the old stable is now the fallback.
- failed: rolled back (failed checks reached the threshold, no traffic by the init timeout, an
  operator's abort, or the canary was removed outside the controller).
- paused: an operator paused the rollout; nothing changes until it is resumed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from string import Template
from typing import Literal

import yaml
from pydantic import AwareDatetime, BaseModel, Field, model_validator

ANALYSIS_KEY = "rollout-analysis.json"
"""Where the controller's state lives in the registry's store."""
HISTORY_LIMIT = 50


class Phase(StrEnum):
    INITIALIZING = "initializing"
    PROGRESSING = "progressing"
    PROMOTING = "promoting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    PAUSED = "paused"


ACTIVE_PHASES = (Phase.INITIALIZING, Phase.PROGRESSING, Phase.PROMOTING, Phase.PAUSED)


# --- the spec ------------------------------------------------------------------------------
def render(template: str, version: str, window: str) -> str:
    return Template(template).substitute(version=version, window=window)


class Bound(BaseModel):
    """One end of a check's range: `value` itself, or the stable's value plus or times it."""

    value: float
    relative_to_stable: Literal["absolute", "plus", "times"] = "absolute"

    def limit(self, stable: float | None) -> float | None:
        """The limit for this interval; None when it is relative and the stable has no value."""
        if self.relative_to_stable == "absolute":
            return self.value
        if stable is None or not math.isfinite(stable):
            return None
        return stable + self.value if self.relative_to_stable == "plus" else stable * self.value

    def describe(self) -> str:
        if self.relative_to_stable == "absolute":
            return f"{self.value:g}"
        return f"stable {'+' if self.relative_to_stable == 'plus' else 'x'} {self.value:g}"


class Gate(BaseModel):
    """A check runs only once `query` (a template) reaches `min` for both versions, e.g. enough
    corrected words for a feedback WER; until then it is skipped, neither passed nor failed."""

    query: str
    min: float


class MetricCheck(BaseModel):
    name: str = Field(pattern=r"^[a-z0-9_-]{1,40}$")
    query: str
    """PromQL returning one number; `$version` is the version judged, `$window` the window."""
    min: Bound | None = None
    max: Bound | None = None
    during: Literal["live", "shadow", "both"] = "live"
    """Live steps (canary weight > 0), the shadow phase, or both."""
    only_when: Gate | None = None

    @model_validator(mode="after")
    def _valid(self) -> MetricCheck:
        if self.min is None and self.max is None:
            raise ValueError(f"check {self.name!r} needs a min or a max")
        for template in (self.query, *([self.only_when.query] if self.only_when else [])):
            if "$version" not in template:
                raise ValueError(f"check {self.name!r}: its query must use $version")
            render(template, "v", "1m")  # raises on a bad placeholder
        return self

    @property
    def relative(self) -> bool:
        return any(b is not None and b.relative_to_stable != "absolute" for b in (self.min, self.max))

    def applies(self, shadow: bool) -> bool:
        return self.during == "both" or self.during == ("shadow" if shadow else "live")


class ShadowPhase(BaseModel):
    share: float = Field(default=0.5, gt=0, le=1)
    """Share of stable requests copied to the canary, whose answers go nowhere."""
    intervals: int = Field(default=2, ge=1)
    """Passing intervals in shadow before live traffic starts."""


def _increase(metric: str, version_filter: str = 'model_version="$version"') -> str:
    return f"(sum(increase({metric}{{{version_filter}}}[$window])) or vector(0))"


FAILED = f"{_increase('ray_asrops_fallbacks_total')} + {_increase('ray_asrops_breaker_skips_total')}"
"""Requests meant for a version that another version answered: it failed them, or its open
breaker skipped it (so a canary whose breaker opened keeps counting as failing)."""
LIVE_REQUESTS = f"{_increase('ray_asrops_requests_total')} + {FAILED}"
SERVER_ERRORS = _increase("ray_asrops_requests_total", 'model_version="$version",status=~"5.."')
"""Requests meant for a version: those it answered, and those it failed."""
SHADOW_REQUESTS = 'sum(increase(ray_asrops_shadow_disagreement_ratio_count{model_version="$version"}[$window])) or vector(0)'

DEFAULT_CHECKS = [
    MetricCheck(
        name="error-ratio",
        query=f"({SERVER_ERRORS} + {FAILED}) / ({LIVE_REQUESTS})",
        max=Bound(value=0.005, relative_to_stable="plus"),
    ),
    MetricCheck(
        name="latency-p95",
        query=('histogram_quantile(0.95, sum by (le) (rate('
               'ray_asrops_request_duration_seconds_bucket{model_version="$version"}[$window])))'),
        max=Bound(value=1.2, relative_to_stable="times"),
    ),
    MetricCheck(
        name="avg-logprob",
        query=('-(sum(rate(ray_asrops_segment_neg_avg_logprob_sum{model_version="$version"}[$window])) / '
               'sum(rate(ray_asrops_segment_neg_avg_logprob_count{model_version="$version"}[$window])))'),
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
        query=('sum(increase(ray_asrops_feedback_word_errors_total{model_version="$version"}[$window])) / '
               'sum(increase(ray_asrops_feedback_reference_words_total{model_version="$version"}[$window]))'),
        max=Bound(value=1.02, relative_to_stable="times"),
        only_when=Gate(query='sum(increase(ray_asrops_feedback_reference_words_total{model_version="$version"}'
                             '[$window])) or vector(0)', min=200),
    ),
]


class AnalysisSpec(BaseModel):
    """How a canary is judged and stepped up. Give `step_weights`, or `step_weight` and
    `max_weight` (5 and 50 mean 5, 10, ..., 50)."""

    interval_s: float = Field(default=60.0, ge=1)
    """How often the checks run (and the least time spent at each step)."""
    window_s: float | None = Field(default=None, ge=1)
    """The `$window` of the queries; None means interval_s."""
    step_weights: list[int] | None = [5, 10, 25, 50]
    step_weight: int | None = Field(default=None, ge=1, le=100)
    max_weight: int | None = Field(default=None, ge=1, le=100)
    threshold: int = Field(default=3, ge=1)
    """Failed checks (intervals with a failing check) that roll the canary back."""
    min_requests: float = Field(default=20, ge=0)
    """Requests the canary must have had in the window (shadow copies, in the shadow phase);
    fewer is a failed check: a canary is never promoted on no evidence."""
    shadow: ShadowPhase | None = None
    init_timeout_s: float = Field(default=600.0, gt=0)
    """A canary that has had no request this long after its rollout began is rolled back."""
    checks: list[MetricCheck] = DEFAULT_CHECKS
    webhooks: list[str] = []
    """URLs POSTed a JSON event on every rollout decision (failures are logged, never fatal)."""

    @model_validator(mode="after")
    def _one_step_form(self) -> AnalysisSpec:
        if self.step_weight is not None or self.max_weight is not None:
            if self.step_weight is None or self.max_weight is None:
                raise ValueError("give both step_weight and max_weight, or step_weights")
            if self.max_weight < self.step_weight:
                raise ValueError("max_weight must be at least step_weight")
            self.step_weights = None
        elif not self.step_weights:
            raise ValueError("give step_weights (e.g. [5, 10, 25, 50]), or step_weight and max_weight")
        weights = self.weights()
        if any(not 0 < w <= 100 for w in weights) or weights != sorted(set(weights)):
            raise ValueError(f"step weights must rise strictly within 1..100, got {weights}")
        names = [c.name for c in self.checks]
        if len(names) != len(set(names)):
            raise ValueError(f"check names must be unique, got {names}")
        return self

    def weights(self) -> list[int]:
        if self.step_weights:
            return list(self.step_weights)
        return list(range(self.step_weight, self.max_weight + 1, self.step_weight))  # type: ignore[arg-type]

    @property
    def window(self) -> str:
        return f"{round(self.window_s or self.interval_s)}s"

    @classmethod
    def from_yaml(cls, path: Path) -> AnalysisSpec:
        return cls.model_validate(yaml.safe_load(Path(path).read_text()) or {})


# --- one interval's judgement --------------------------------------------------------------
class CheckResult(BaseModel):
    name: str
    canary: float | None = None
    stable: float | None = None
    low: float | None = None
    high: float | None = None
    range: str = ""
    """The range as configured, e.g. `<= stable x 1.2`."""
    passed: bool | None = None
    """None: skipped (its `only_when` is not met yet)."""
    reason: str = ""


class Judgement(BaseModel):
    at: AwareDatetime
    requests: float | None
    passed: bool
    reason: str
    checks: list[CheckResult] = []


Query = Callable[[str], "float | None"]
"""What `judge` asks: PromQL -> its one number, None for no data; raises `QueryFailed` when
Prometheus cannot answer (the controller wraps monitoring/prometheus.py's client)."""


class QueryFailed(Exception):
    pass


def _usable(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _range_text(check: MetricCheck) -> str:
    parts = []
    if check.min is not None:
        parts.append(f">= {check.min.describe()}")
    if check.max is not None:
        parts.append(f"<= {check.max.describe()}")
    return " and ".join(parts)


def run_check(query: Query, check: MetricCheck, canary: str, stable: str | None, window: str) -> CheckResult:
    result = CheckResult(name=check.name, range=_range_text(check))
    if check.only_when is not None:
        for version in filter(None, (canary, stable if check.relative else None)):
            gate = query(render(check.only_when.query, version, window))
            if not _usable(gate) or gate < check.only_when.min:
                result.reason = f"skipped: {version} has {gate} < {check.only_when.min:g} for its gate"
                return result
    result.canary = query(render(check.query, canary, window))
    if check.relative and stable:
        result.stable = query(render(check.query, stable, window))
    result.low = check.min.limit(result.stable) if check.min else -math.inf
    result.high = check.max.limit(result.stable) if check.max else math.inf
    if not _usable(result.canary):
        result.passed, result.reason = False, f"no usable value for the canary ({result.canary})"
    elif result.low is None or result.high is None:
        result.passed, result.reason = False, f"no usable value for the stable ({result.stable}) to compare with"
    else:
        result.passed = result.low <= result.canary <= result.high
        result.reason = "in range" if result.passed else f"{result.canary:.4g} outside {result.range}"
    # JSON has no infinities: an open end is stored as None.
    result.low = result.low if result.low is not None and math.isfinite(result.low) else None
    result.high = result.high if result.high is not None and math.isfinite(result.high) else None
    return result


def judge(query: Query, spec: AnalysisSpec, canary: str, stable: str | None, shadow: bool,
          now: datetime) -> Judgement:
    """One interval: enough requests, then every check that applies to the phase."""
    window = spec.window
    try:
        requests = query(render(SHADOW_REQUESTS if shadow else LIVE_REQUESTS, canary, window))
        if not _usable(requests) or requests < spec.min_requests:
            what = "shadow copies" if shadow else "requests"
            return Judgement(at=now, requests=requests, passed=False,
                             reason=f"too few {what} for {canary} in {window}: {requests} < {spec.min_requests:g}")
        results = [run_check(query, c, canary, stable, window) for c in spec.checks if c.applies(shadow)]
    except QueryFailed as exc:
        return Judgement(at=now, requests=None, passed=False, reason=f"Prometheus cannot answer: {exc}")
    failed = [r for r in results if r.passed is False]
    reason = ("all checks in range" if not failed
              else "; ".join(f"{r.name}: {r.reason}" for r in failed))
    return Judgement(at=now, requests=requests, passed=not failed, reason=reason, checks=results)


# --- the controller's state ----------------------------------------------------------------
class Decision(BaseModel):
    at: AwareDatetime
    action: str
    """start, check-failed, advance, promote, rollback, pause, resume, abort, ..."""
    phase: Phase
    weight: int
    reason: str
    checks: list[CheckResult] = []


class AnalysisState(BaseModel):
    canary_version: str | None = None
    stable_version: str | None = None
    phase: Phase | None = None
    """None: no rollout has been analysed yet."""
    paused_phase: Phase | None = None
    """The phase a pause interrupted, resumed into."""
    steps: list[int] = []
    """The weights this rollout steps through (from the spec when it started)."""
    threshold: int = 0
    step: int = -1
    """Index into `steps`; -1 while in shadow or before the first step."""
    weight: int = 0
    shadow_share: float = 0.0
    shadow_passed: int = 0
    failed_checks: int = 0
    started_at: AwareDatetime | None = None
    last_check_at: AwareDatetime | None = None
    last: Judgement | None = None
    history: list[Decision] = []

    def record(self, decision: Decision) -> None:
        self.history = [*self.history, decision][-HISTORY_LIMIT:]


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def status_lines(state: AnalysisState) -> list[str]:
    """A person's view of the analysis: phase, weight, failed checks, and the last value of
    every check against its range (`asrops rollout status`)."""
    lines = [f"canary {state.canary_version} against stable {state.stable_version}: phase {state.phase}"
             + (f" (paused while {state.paused_phase})" if state.paused_phase else ""),
             f"weight {state.weight} %" + (f", shadow {state.shadow_share:.0%}" if state.shadow_share else "")
             + f" (steps {state.steps})" + f", failed checks {state.failed_checks}/{state.threshold}"]
    if state.last:
        lines.append(f"last check {state.last.at:%Y-%m-%d %H:%M:%S} UTC: {'passed' if state.last.passed else 'FAILED'}"
                     f" ({state.last.reason}; {_num(state.last.requests)} canary requests in the window)")
        rows = [("check", "canary", "stable", "range", "result")] + [
            (c.name, _num(c.canary), _num(c.stable), c.range,
             "skipped" if c.passed is None else "pass" if c.passed else "FAIL") for c in state.last.checks]
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    if state.history:
        lines.append("decisions:")
        lines += [f"  {d.at:%H:%M:%S} {d.action} at {d.weight} %: {d.reason}" for d in state.history[-10:]]
    return lines
