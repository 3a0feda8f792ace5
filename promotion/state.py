"""The controller's state of a rollout, one record in the registry beside the rollout record, so
the admin API, the CLI and the controller see one truth. Its phases (Flagger's names):

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

from enum import StrEnum

from pydantic import AwareDatetime, BaseModel

from asrops.promotion.analysis import CheckResult, Judgement

ANALYSIS_KEY = "rollout-analysis.json"
"""Where the controller's state lives in the registry's store."""
HISTORY_LIMIT = 50
"""Decisions kept in the record (the newest)."""


class Phase(StrEnum):
    INITIALIZING = "initializing"
    PROGRESSING = "progressing"
    PROMOTING = "promoting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    PAUSED = "paused"


class Decision(BaseModel):
    at: AwareDatetime
    action: str
    """start, check-failed, check-inconclusive, advance, promote, rollback, pause, resume, abort, ..."""
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
    inconclusive: int = 0
    """Inconclusive intervals in a row (too few requests)."""
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
