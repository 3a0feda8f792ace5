"""From per-window drift judgements to one verdict: drift when at least K of the last N judged
windows drifted. Plain logic (no Evidently), so it can be tested on hand-made histories.

States:
- `insufficient_data`: the latest window is thin (fewer than `min_samples` requests, or not
  judged at all) or fewer than K windows have been judged yet. No verdict on thin data: a
  quiet night is neither drift nor an all-clear.
- `drift`: at least K of the last N judged windows drifted.
- `no_drift`: otherwise.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel

from asrops.settings import DriftSettings


class VerdictState(StrEnum):
    DRIFT = "drift"
    NO_DRIFT = "no_drift"
    INSUFFICIENT_DATA = "insufficient_data"


class WindowJudgement(BaseModel):
    window_end: datetime
    samples: int
    """Successful requests in the window."""
    drift_share: float | None
    drifted: bool | None
    """None: not judged (thin data, or the drift report had no result)."""


class Verdict(BaseModel):
    state: VerdictState
    drifted_windows: int
    """Drifted windows among the last N judged ones."""
    judged_windows: int
    """Judged windows looked at (at most N)."""
    k: int
    n: int
    min_samples: int
    latest_samples: int | None
    """Samples in the latest window; None when there is no window yet."""
    reasons: str

    def log_message(self) -> str:
        """One line for the log, with everything the verdict was decided from."""
        latest = "none" if self.latest_samples is None else str(self.latest_samples)
        return (
            f"drift verdict={self.state.value}: {self.drifted_windows} of the last "
            f"{self.judged_windows} judged windows drifted (needs K={self.k} of N={self.n}); "
            f"latest window samples={latest} (min {self.min_samples}); {self.reasons}"
        )


class VerdictPolicy:
    def __init__(self, settings: DriftSettings):
        if settings.verdict_drifted > settings.verdict_windows:
            raise ValueError(
                f"verdict_drifted (K={settings.verdict_drifted}) exceeds verdict_windows "
                f"(N={settings.verdict_windows}): a drift verdict could never be reached"
            )
        self.k = settings.verdict_drifted
        self.n = settings.verdict_windows
        self.min_samples = settings.min_samples

    def judge(self, window_end: datetime, samples: int, drift_share: float | None,
              drifted: bool | None) -> WindowJudgement:
        """A window's judgement, with thin windows left unjudged whatever the report said."""
        if samples < self.min_samples:
            drift_share, drifted = None, None
        return WindowJudgement(window_end=window_end, samples=samples, drift_share=drift_share,
                               drifted=drifted)

    def is_judged(self, w: WindowJudgement) -> bool:
        return w.samples >= self.min_samples and w.drifted is not None

    def decide(self, history: list[WindowJudgement]) -> Verdict:
        windows = sorted(history, key=lambda w: w.window_end)
        judged = [w for w in windows if self.is_judged(w)]
        recent = judged[-self.n:]
        drifted = sum(bool(w.drifted) for w in recent)
        latest = windows[-1] if windows else None

        if latest is None:
            state, why = VerdictState.INSUFFICIENT_DATA, "no window yet"
        elif not self.is_judged(latest):
            state = VerdictState.INSUFFICIENT_DATA
            why = (f"latest window ({latest.window_end.isoformat()}) is thin: "
                   f"{latest.samples} < {self.min_samples} samples"
                   if latest.samples < self.min_samples
                   else f"latest window ({latest.window_end.isoformat()}) has no drift result")
        elif len(judged) < self.k:
            state = VerdictState.INSUFFICIENT_DATA
            why = f"only {len(judged)} judged window(s), fewer than K={self.k}"
        elif drifted >= self.k:
            state = VerdictState.DRIFT
            ends = ", ".join(w.window_end.isoformat() for w in recent if w.drifted)
            why = f"drifted windows ending {ends}"
        else:
            state, why = VerdictState.NO_DRIFT, f"{drifted} < K={self.k} drifted windows"

        return Verdict(
            state=state,
            drifted_windows=drifted,
            judged_windows=len(recent),
            k=self.k,
            n=self.n,
            min_samples=self.min_samples,
            latest_samples=latest.samples if latest else None,
            reasons=why,
        )
