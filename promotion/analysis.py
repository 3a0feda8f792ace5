"""The judgement of one analysis interval: enough canary requests (else it is inconclusive), then
every check that applies to the phase, each against its range (absolute, or relative to the
stable's value of the same query). No data, NaN, infinity or a Prometheus that cannot answer
fail a check, never pass it.
The spec is configuration (`AnalysisSpec` in asrops/settings.py); the queries are in checks.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime

from pydantic import AwareDatetime, BaseModel

from asrops.promotion.checks import LIVE_REQUESTS, SHADOW_REQUESTS, checks_of
from asrops.settings import AnalysisSpec, MetricCheck, render_query


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
    inconclusive: bool = False
    """Too few requests to judge: not passed, and not a failed check either."""
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
            gate = query(render_query(check.only_when.query, version, window))
            if not _usable(gate) or gate < check.only_when.min:
                result.reason = f"skipped: {version} has {gate} < {check.only_when.min:g} for its gate"
                return result
    result.canary = query(render_query(check.query, canary, window))
    if check.relative and stable:
        result.stable = query(render_query(check.query, stable, window))
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
        requests = query(render_query(SHADOW_REQUESTS if shadow else LIVE_REQUESTS, canary, window))
        if not _usable(requests) or requests < spec.min_requests:
            what = "shadow copies" if shadow else "requests"
            return Judgement(at=now, requests=requests, passed=False, inconclusive=True,
                             reason=f"too few {what} for {canary} in {window} to judge it: {requests} < "
                                    f"{spec.min_requests:g}")
        results = [run_check(query, c, canary, stable, window) for c in checks_of(spec) if c.applies(shadow)]
    except QueryFailed as exc:
        return Judgement(at=now, requests=None, passed=False, reason=f"Prometheus cannot answer: {exc}")
    failed = [r for r in results if r.passed is False]
    reason = ("all checks in range" if not failed
              else "; ".join(f"{r.name}: {r.reason}" for r in failed))
    return Judgement(at=now, requests=requests, passed=not failed, reason=reason, checks=results)


