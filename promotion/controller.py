"""The promotion controller: a long-running process (`asrops controller`, started by `asrops
serve`) that takes any canary in the rollout through the analysis in `PromotionSettings`:
it sets the first step's weight (or the shadow phase), runs the checks against Prometheus
every interval, steps the weight up when all pass, counts failed checks, rolls back at the
threshold and promotes after the last step. Phases: promotion/state.py; the judgement: promotion/analysis.py.

It owns the canary's weight while a rollout is active; every change goes through
promotion/rollout.py (compare-and-swap plus audit entry), and its own state is one record in the
registry that operators pause, resume and abort through the admin API. A tick first claims its
decision by writing that record (compare-and-swap), then acts: an operator's pause or abort
that lands in between wins, and the controller re-reads on its next tick. Every decision is
logged with the query results behind it, exported as metrics and sent to the webhooks.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from datetime import UTC, datetime

import httpx

from asrops.errors import ConflictError, RolloutRefusedError
from asrops.promotion import rollout
from asrops.promotion.analysis import Query, QueryFailed, judge
from asrops.promotion.checks import LIVE_REQUESTS, SHADOW_REQUESTS, checks_of
from asrops.promotion.metrics import ControllerMetrics
from asrops.promotion.state import ANALYSIS_KEY, AnalysisState, Decision, Phase
from asrops.registry import ModelRegistry
from asrops.settings import AnalysisSpec, render_query

log = logging.getLogger(__name__)

ACTOR = "promotion-controller"


def describe(decision: Decision) -> str:
    checks = "; ".join(f"{c.name}: canary {c.canary} stable {c.stable} range {c.range} -> "
                       f"{'skip' if c.passed is None else 'pass' if c.passed else 'FAIL'}" for c in decision.checks)
    return f"{decision.action} at {decision.weight} % [{decision.phase}] ({decision.reason})" + (
        f"; checks: {checks}" if checks else "")


def _evidence(judgement) -> str:
    """What a passed interval rested on: how many requests, which checks ran and which waited."""
    ran = [c.name for c in judgement.checks if c.passed is not None]
    skipped = [c.name for c in judgement.checks if c.passed is None]
    return (f"all checks in range on {judgement.requests:.0f} requests ({', '.join(ran) or 'none'}"
            + (f"; not yet judged: {', '.join(skipped)}" if skipped else "") + ")")


class PromotionController:
    def __init__(self, registry: ModelRegistry, spec: AnalysisSpec, query: Query,
                 metrics: ControllerMetrics | None = None, clock: Callable[[], datetime] = lambda: datetime.now(UTC)):
        self.registry, self.spec, self.query = registry, spec, query
        self.metrics = metrics or ControllerMetrics()
        self.clock = clock
        self.weights = spec.weights()

    # --- the state record ----------------------------------------------------------------
    def _save(self, state: AnalysisState, token: str | None) -> str | None:
        """Write the state if nobody changed it since `token`; None (and no action) if they did."""
        try:
            return self.registry.store.write_if(ANALYSIS_KEY, state.model_dump_json(indent=2).encode(), token)
        except ConflictError:
            log.info("the rollout analysis changed under the controller (an operator?); re-reading next tick")
            return None

    def _decide(self, state: AnalysisState, action: str, reason: str, now: datetime) -> Decision:
        decision = Decision(at=now, action=action, phase=state.phase, weight=state.weight, reason=reason,
                            checks=state.last.checks if state.last and action != "start" else [])
        state.record(decision)
        log.info("rollout %s: %s", state.canary_version, describe(decision))
        self.metrics.decisions.labels(action).inc()
        return decision

    def _commit(self, state: AnalysisState, token: str | None, action: str, reason: str, now: datetime,
                then: Callable[[Decision], None] | None = None) -> Decision | None:
        """Record a decision, claim it by saving the state, and only then act (`then`): a lost
        compare-and-swap (an operator was first) means no decision and no action."""
        decision = self._decide(state, action, reason, now)
        if self._save(state, token) is None:
            return None
        if then is not None:
            then(decision)
        return decision

    # --- acting on the rollout -------------------------------------------------------------
    def _apply_traffic(self, state: AnalysisState, reason: str) -> None:
        rollout.set_traffic(self.registry, state.weight, state.shadow_share, ACTOR, reason, state.canary_version)

    def _rollback(self, state: AnalysisState, reason: str) -> None:
        try:
            rollout.rollback(self.registry, ACTOR, reason, expected_canary=state.canary_version)
        except RolloutRefusedError as exc:  # already gone (an operator was first)
            log.info("rollback not needed: %s", exc)

    # --- one tick ----------------------------------------------------------------------------
    def tick(self) -> Decision | None:
        """Look at the rollout once; act if something is due. Returns the decision taken, if any."""
        now = self.clock()
        view = rollout.current(self.registry)
        record = self.registry.read_record(ANALYSIS_KEY, AnalysisState)
        state, token = record.value, record.token
        canary = view.rollout.canary_version
        decision = None
        try:
            if canary is None:
                decision = self._canary_gone(state, token, view.aliases.stable, now)
            elif canary != state.canary_version or self._deployed_again(state, view):
                decision = self._start(canary, view.aliases.stable, token, now)
            elif state.phase == Phase.PROMOTING:
                decision = self._promote(state, token, now)
            elif state.phase == Phase.FAILED:
                self._rollback(state, f"the analysis of {canary} had failed; retrying the rollback")
            elif state.phase in (Phase.INITIALIZING, Phase.PROGRESSING):
                decision = self._progress(state, token, view, now)
        except RolloutRefusedError as exc:  # the rollout changed between our read and our write
            log.info("rollout changed under the controller: %s; re-reading next tick", exc)
        finally:
            self.metrics.export(self.registry.read_record(ANALYSIS_KEY, AnalysisState).value)
        if decision is not None:
            self._notify(state, decision)
        return decision

    @staticmethod
    def _deployed_again(state: AnalysisState, view: rollout.RolloutView) -> bool:
        """The same version made canary again after its analysis ended: someone else wrote the
        rollout since (a canary the controller failed to roll back was last written by it)."""
        return state.phase in (Phase.SUCCEEDED, Phase.FAILED) and view.rollout.updated_by != ACTOR

    def _canary_gone(self, state: AnalysisState, token: str | None, stable: str | None,
                     now: datetime) -> Decision | None:
        if state.phase == Phase.PROMOTING and stable == state.canary_version:
            state.phase = Phase.SUCCEEDED
            return self._commit(state, token, "promoted", f"{stable} is stable", now)
        if state.phase in (Phase.INITIALIZING, Phase.PROGRESSING, Phase.PAUSED, Phase.PROMOTING):
            state.phase = Phase.FAILED
            return self._commit(state, token, "ended", "the canary was removed outside the controller", now)
        return None

    def _start(self, canary: str, stable: str | None, token: str | None, now: datetime) -> Decision | None:
        state = AnalysisState(canary_version=canary, stable_version=stable, phase=Phase.INITIALIZING,
                              steps=self.weights, threshold=self.spec.threshold, started_at=now, last_check_at=now)
        if self.spec.shadow:
            state.weight, state.shadow_share = 0, self.spec.shadow.share
            where = f"shadow on {state.shadow_share:.0%} of stable traffic"
        else:
            state.step, state.weight = 0, self.weights[0]
            where = f"{state.weight} % of traffic"
        return self._commit(state, token, "start", f"new canary {canary} against stable {stable}: {where}; steps "
                            f"{self.weights}, every {self.spec.interval_s:g} s, threshold {self.spec.threshold}",
                            now, lambda _: self._apply_traffic(state, f"analysis starts: {where}"))

    def _due(self, state: AnalysisState, now: datetime) -> bool:
        return state.last_check_at is None or (now - state.last_check_at).total_seconds() >= self.spec.interval_s

    def _progress(self, state: AnalysisState, token: str | None, view: rollout.RolloutView,
                  now: datetime) -> Decision | None:
        if (view.rollout.canary_weight, view.rollout.shadow_share) != (state.weight, state.shadow_share):
            log.info("rollout %s: traffic is %s %% / shadow %s, the analysis says %s %% / %s; restoring",
                     state.canary_version, view.rollout.canary_weight, view.rollout.shadow_share,
                     state.weight, state.shadow_share)
            self._apply_traffic(state, "the controller owns the weight during a rollout")
        if not self._due(state, now):
            return None
        state.last_check_at = now
        shadow = state.step < 0
        if state.phase == Phase.INITIALIZING:
            return self._initialize(state, token, shadow, now)
        state.last = judge(self.query, self.spec, state.canary_version, state.stable_version, shadow, now)
        if state.last.inconclusive:
            state.inconclusive += 1
            why = f"inconclusive {state.inconclusive}/{self.spec.max_inconclusive} in a row: {state.last.reason}"
            if state.inconclusive >= self.spec.max_inconclusive:
                state.phase = Phase.FAILED
                return self._commit(state, token, "rollback", f"{why}; traffic too thin to judge the canary", now,
                                    lambda d: self._rollback(state, d.reason))
            return self._commit(state, token, "check-inconclusive", f"{why}; holding {state.weight} %", now)
        state.inconclusive = 0
        if not state.last.passed:
            state.failed_checks += 1
            why = f"failed checks {state.failed_checks}/{self.spec.threshold}: {state.last.reason}"
            if state.failed_checks >= self.spec.threshold:
                state.phase = Phase.FAILED
                return self._commit(state, token, "rollback", why, now, lambda d: self._rollback(state, d.reason))
            return self._commit(state, token, "check-failed", why, now)
        if shadow and state.shadow_passed + 1 < self.spec.shadow.intervals:
            state.shadow_passed += 1
            return self._commit(state, token, "check-passed", f"shadow interval {state.shadow_passed}/"
                                f"{self.spec.shadow.intervals} passed", now)
        if state.step + 1 < len(self.weights):
            state.step += 1
            state.weight, state.shadow_share = self.weights[state.step], 0.0
            return self._commit(state, token, "advance", f"{_evidence(state.last)}; step {state.step + 1}/"
                                f"{len(self.weights)}", now, lambda d: self._apply_traffic(state, d.reason))
        state.phase = Phase.PROMOTING
        decision = self._decide(state, "promote", f"the last step ({state.weight} %) passed: {_evidence(state.last)}",
                                now)
        token = self._save(state, token)
        if token is None:
            return None
        return self._promote(state, token, now) or decision

    def _initialize(self, state: AnalysisState, token: str | None, shadow: bool, now: datetime) -> Decision | None:
        """Wait for the canary's first requests: a version is routed to only once it is warm."""
        try:
            seen = self.query(render_query(SHADOW_REQUESTS if shadow else LIVE_REQUESTS, state.canary_version,
                                     f"{round(max(self.spec.interval_s, (now - state.started_at).total_seconds()))}s"))
        except QueryFailed as exc:
            seen, why = None, f"Prometheus cannot answer: {exc}"
        else:
            why = f"{seen} requests so far"
        if seen is not None and math.isfinite(seen) and seen > 0:
            state.phase = Phase.PROGRESSING
            return self._commit(state, token, "initialized", f"the canary is serving ({why})", now)
        if (now - state.started_at).total_seconds() > self.spec.init_timeout_s:
            state.phase = Phase.FAILED
            return self._commit(state, token, "rollback", f"no request reached the canary within "
                                f"{self.spec.init_timeout_s:g} s ({why})", now,
                                lambda d: self._rollback(state, d.reason))
        log.info("rollout %s: initializing, waiting for the canary's first requests (%s)", state.canary_version, why)
        self._save(state, token)
        return None

    def _promote(self, state: AnalysisState, token: str | None, now: datetime) -> Decision | None:
        try:
            rollout.promote(self.registry, ACTOR, f"analysis passed every step up to {state.weight} %",
                            expected_canary=state.canary_version)
        except RolloutRefusedError as exc:
            log.warning("promotion of %s refused: %s", state.canary_version, exc)
            return None
        state.phase = Phase.SUCCEEDED
        decision = self._decide(state, "promoted", f"{state.canary_version} is stable; {state.stable_version} "
                                "is the fallback", now)
        self._save(state, token)
        return decision

    # --- notifications -----------------------------------------------------------------------
    def _notify(self, state: AnalysisState, decision: Decision) -> None:
        event = {"canary": state.canary_version, "stable": state.stable_version,
                 "decision": decision.model_dump(mode="json")}
        for url in self.spec.webhooks:
            try:
                httpx.post(url, json=event, timeout=5).raise_for_status()
            except httpx.HTTPError as exc:
                log.warning("webhook %s failed: %s", url, exc)

    def run_forever(self, poll_s: float = 1.0, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        log.info("promotion controller: steps %s, every %g s, threshold %d, %d checks",
                 self.weights, self.spec.interval_s, self.spec.threshold, len(checks_of(self.spec)))
        while not stop.is_set():
            try:
                self.tick()
            except Exception:  # one bad tick (a store hiccup) must not end the controller
                log.exception("controller tick failed; retrying")
            stop.wait(poll_s)
