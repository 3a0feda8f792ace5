"""Rollout operations: deploy a canary, set its weight and shadow share, promote, roll back.

Every change goes through the registry's compare-and-swap and leaves an audit entry (when,
who, what, before, after, why). The admin API, the CLI, the retrain job and the promotion
controller all call these functions, so the rules live in one place. Two records change in a promotion
(aliases and rollout state); the order of writes is chosen so that every intermediate state
routes all traffic to a version that is serving: see `promote` and `rollback`.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from pydantic import AwareDatetime, BaseModel

from asrops.errors import RolloutRefusedError
from asrops.promotion.state import ANALYSIS_KEY, AnalysisState, Decision, Phase
from asrops.registry import Aliases, ModelRegistry, RolloutState

log = logging.getLogger(__name__)

AUDIT_PREFIX = "audit/"


class RolloutView(BaseModel):
    aliases: Aliases
    rollout: RolloutState


class AuditEntry(BaseModel):
    at: AwareDatetime
    actor: str
    action: str
    reason: str
    before: RolloutView
    after: RolloutView


def current(registry: ModelRegistry) -> RolloutView:
    return RolloutView(aliases=registry.read_aliases().value, rollout=registry.read_rollout().value)


def _audit(registry: ModelRegistry, action: str, actor: str, reason: str, before: RolloutView) -> AuditEntry:
    entry = AuditEntry(at=datetime.now(UTC), actor=actor, action=action, reason=reason, before=before,
                       after=current(registry))
    key = f"{AUDIT_PREFIX}{entry.at.strftime('%Y%m%dT%H%M%S.%fZ')}-{uuid.uuid4().hex[:8]}.json"
    registry.store.write_bytes(key, entry.model_dump_json(indent=2).encode())
    log.info("rollout %s by %s (%s): %s -> %s", action, actor, reason, before.model_dump(mode="json"),
             entry.after.model_dump(mode="json"))
    return entry


def read_audit(registry: ModelRegistry, limit: int = 100) -> list[AuditEntry]:
    """The newest `limit` entries (at least one), oldest first."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    keys = sorted(registry.store.list_prefix(AUDIT_PREFIX))[-limit:]
    return [AuditEntry.model_validate_json(registry.store.read_bytes(k)[0]) for k in keys]


def deploy_canary(registry: ModelRegistry, version: str, weight: int, shadow_share: float, actor: str,
                  reason: str) -> AuditEntry:
    """Make `version` the canary. Its traffic starts once its model application is warm."""
    before = current(registry)
    version = registry.resolve(version)
    if version == before.aliases.stable:
        raise RolloutRefusedError(f"{version} is already stable; a canary must be another version.")
    registry.update_aliases(lambda a: a.model_copy(update={"canary": version}))
    registry.update_rollout(lambda r: r.model_copy(update={
        "canary_version": version, "canary_weight": weight, "shadow_share": shadow_share, "updated_by": actor}))
    return _audit(registry, "deploy_canary", actor, reason, before)


def _check_canary(before: RolloutView, expected: str | None) -> None:
    """A caller acting on what it read earlier (the controller) names the canary it means, so a
    change in between (an operator's rollback, a new canary) makes the call fail, not misfire."""
    if expected is not None and expected not in (before.rollout.canary_version, before.aliases.canary):
        raise RolloutRefusedError(f"The canary is now {before.rollout.canary_version}, not {expected}.")


def set_traffic(registry: ModelRegistry, weight: int | None, shadow_share: float | None, actor: str,
                reason: str, expected_canary: str | None = None) -> AuditEntry:
    before = current(registry)
    _check_canary(before, expected_canary)
    if before.rollout.canary_version is None:
        raise RolloutRefusedError("There is no canary; deploy one first.")
    update = {"updated_by": actor}
    if weight is not None:
        update["canary_weight"] = weight
    if shadow_share is not None:
        update["shadow_share"] = shadow_share
    registry.update_rollout(lambda r: r.model_copy(update=update))
    return _audit(registry, "set_traffic", actor, reason, before)


def promote(registry: ModelRegistry, actor: str, reason: str, expected_canary: str | None = None) -> AuditEntry:
    """Canary becomes stable, the old stable becomes fallback, the rollout is cleared.
    Aliases first: while the rollout still names the canary it equals stable, so it gets
    everything; then the rollout record is cleared."""
    before = current(registry)
    _check_canary(before, expected_canary)
    canary = before.rollout.canary_version
    if canary is None:
        raise RolloutRefusedError("There is no canary to promote.")
    registry.update_aliases(lambda a: Aliases(stable=canary, canary=None, fallback=a.stable))
    registry.update_rollout(lambda r: RolloutState(updated_by=actor))
    return _audit(registry, "promote", actor, reason, before)


def rollback(registry: ModelRegistry, actor: str, reason: str, expected_canary: str | None = None) -> AuditEntry:
    """With a canary: its weight and shadow go to 0 first (traffic back on stable at once),
    then the canary alias is dropped. Without one, right after a promotion: the aliases the
    promotion replaced are restored (the old stable answers again). With `expected_canary`,
    only that canary is rolled back (never a promotion)."""
    before = current(registry)
    _check_canary(before, expected_canary)
    if before.rollout.canary_version is not None or before.aliases.canary is not None:
        registry.update_rollout(lambda r: RolloutState(updated_by=actor))
        registry.update_aliases(lambda a: a.model_copy(update={"canary": None}))
        return _audit(registry, "rollback", actor, reason, before)
    promoted = next((e for e in reversed(read_audit(registry)) if e.action in ("promote", "rollback")), None)
    if promoted is None or promoted.action != "promote" or promoted.after.aliases.stable != before.aliases.stable:
        raise RolloutRefusedError("There is no canary to roll back and no promotion to undo.")
    registry.update_aliases(lambda a: promoted.before.aliases.model_copy(update={"canary": None}))
    return _audit(registry, "rollback", actor, reason, before)


# --- the promotion controller's analysis: operators pause, resume and abort it -------------
def read_analysis(registry: ModelRegistry) -> AnalysisState | None:
    """The controller's state of the current (or last) rollout; None before the first one."""
    state = registry.read_record(ANALYSIS_KEY, AnalysisState).value
    return state if state.phase is not None else None


def _change_analysis(registry: ModelRegistry, action: str, actor: str, reason: str, allowed: tuple[Phase, ...],
                     change: Callable[[AnalysisState], None]) -> AnalysisState:
    def fn(state: AnalysisState) -> AnalysisState:
        if state.phase not in allowed:
            raise RolloutRefusedError(f"Cannot {action}: the rollout is {state.phase or 'not started'} "
                                      f"(only {', '.join(p.value for p in allowed)} can be).")
        state = state.model_copy(deep=True)
        change(state)
        state.record(Decision(at=datetime.now(UTC), action=action, phase=state.phase, weight=state.weight,
                              reason=f"{actor}: {reason or 'no reason given'}"))
        return state

    state = registry.update_record(ANALYSIS_KEY, AnalysisState, fn, retries=5).value
    log.info("rollout %s: %s by %s (%s); phase now %s", state.canary_version, action, actor, reason, state.phase)
    return state


def pause(registry: ModelRegistry, actor: str, reason: str) -> AnalysisState:
    """The controller stops changing the rollout (the weight stays) until it is resumed."""
    def change(state: AnalysisState) -> None:
        state.paused_phase, state.phase = state.phase, Phase.PAUSED
    return _change_analysis(registry, "pause", actor, reason, (Phase.INITIALIZING, Phase.PROGRESSING), change)


def resume(registry: ModelRegistry, actor: str, reason: str) -> AnalysisState:
    """Back to the paused phase; the next check comes one full interval later."""
    def change(state: AnalysisState) -> None:
        state.phase, state.paused_phase = state.paused_phase or Phase.PROGRESSING, None
        state.last_check_at = datetime.now(UTC)
    return _change_analysis(registry, "resume", actor, reason, (Phase.PAUSED,), change)


def abort(registry: ModelRegistry, actor: str, reason: str) -> AnalysisState:
    """The analysis ends as failed first (so the controller does nothing more), then the canary
    is rolled back."""
    def change(state: AnalysisState) -> None:
        state.phase, state.paused_phase = Phase.FAILED, None
    state = _change_analysis(registry, "abort", actor, reason,
                             (Phase.INITIALIZING, Phase.PROGRESSING, Phase.PAUSED), change)
    try:
        rollback(registry, actor, f"abort: {reason}", expected_canary=state.canary_version)
    except RolloutRefusedError as exc:
        log.info("abort: nothing to roll back (%s)", exc)
    return state
