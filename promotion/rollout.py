"""Rollout operations: deploy a canary, set its weight and shadow share, promote, roll back.

Every change goes through the registry's compare-and-swap and leaves an audit entry (when,
who, what, before, after, why), written before the change (`pending`) and completed after it
(`applied` or `failed`), so that no change goes unaudited even if its process dies halfway. The
admin API, the CLI, the retrain job and the promotion controller all call these functions, so the
rules live in one place. A change may write two records (aliases and rollout state), so changes
take turns: each holds the rollout lease (a registry record taken by compare-and-swap) from its
first read to its audit entry, and the audit log is one serial history. The order of writes
within a change is chosen so that every intermediate state routes all traffic to a version that
is serving: see `promote` and `rollback`.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Literal

from pydantic import AwareDatetime, BaseModel

from asrops.errors import ConflictError, RolloutRefusedError
from asrops.promotion.state import ANALYSIS_KEY, AnalysisState, Decision, Phase
from asrops.registry import Aliases, ModelRegistry, RolloutState

log = logging.getLogger(__name__)

AUDIT_PREFIX = "audit/"
LEASE_KEY = "rollout-lease.json"
LEASE_S = 60.0
"""A change that died holding the lease blocks others at most this long."""
LEASE_WAIT_S = 15.0
"""How long a change waits for another to finish before it is refused."""
WRITE_RETRIES = 5
"""Re-reads on a lost compare-and-swap (only writers outside rollouts, e.g. a model import, race
a change that holds the lease)."""


class RolloutView(BaseModel):
    aliases: Aliases
    rollout: RolloutState


class AuditEntry(BaseModel):
    at: AwareDatetime
    actor: str
    action: str
    reason: str
    before: RolloutView
    after: RolloutView | None = None
    """None until the change is applied."""
    outcome: Literal["pending", "applied", "failed"] = "applied"
    """`pending` is written before the change; one left pending means its process died during it."""
    error: str | None = None


class RolloutLease(BaseModel):
    holder: str | None = None
    expires_at: AwareDatetime | None = None


class _LeaseHeld(Exception):
    pass


@contextmanager
def _exclusive(registry: ModelRegistry, actor: str) -> Iterator[None]:
    """One rollout change at a time, across every process that makes them (admin API replicas,
    the controller, retrain jobs, the CLI)."""
    me = f"{actor} [{uuid.uuid4().hex[:8]}]"

    def take(lease: RolloutLease) -> RolloutLease:
        now = datetime.now(UTC)
        if lease.holder is not None and lease.expires_at is not None and lease.expires_at > now:
            raise _LeaseHeld(lease.holder)
        return RolloutLease(holder=me, expires_at=now + timedelta(seconds=LEASE_S))

    deadline = time.monotonic() + LEASE_WAIT_S
    while True:
        try:
            registry.update_record(LEASE_KEY, RolloutLease, take)
            break
        except (_LeaseHeld, ConflictError) as exc:
            if time.monotonic() > deadline:
                raise RolloutRefusedError(f"Another rollout change is in progress ({exc}); retry shortly.") from None
            time.sleep(random.uniform(0.02, 0.1))
    try:
        yield
    finally:
        def release(lease: RolloutLease) -> RolloutLease:
            if lease.holder != me:
                raise _LeaseHeld(lease.holder)
            return RolloutLease()

        try:
            registry.update_record(LEASE_KEY, RolloutLease, release, retries=WRITE_RETRIES)
        except (_LeaseHeld, ConflictError) as exc:
            log.warning("rollout lease of %s had expired and was taken by %s", me, exc)


def current(registry: ModelRegistry) -> RolloutView:
    return RolloutView(aliases=registry.read_aliases().value, rollout=registry.read_rollout().value)


def _audited(registry: ModelRegistry, action: str, actor: str, reason: str, before: RolloutView,
             apply: Callable[[], None]) -> AuditEntry:
    """Write the entry (pending), apply the change, complete the entry (applied or failed)."""
    entry = AuditEntry(at=datetime.now(UTC), actor=actor, action=action, reason=reason, before=before,
                       outcome="pending")
    key = f"{AUDIT_PREFIX}{entry.at.strftime('%Y%m%dT%H%M%S.%fZ')}-{uuid.uuid4().hex[:8]}.json"
    registry.store.write_bytes(key, entry.model_dump_json(indent=2).encode())
    try:
        apply()
    except Exception as exc:
        entry.outcome, entry.error = "failed", f"{type(exc).__name__}: {exc}"
        registry.store.write_bytes(key, entry.model_dump_json(indent=2).encode())
        log.warning("rollout %s by %s (%s) failed: %s", action, actor, reason, entry.error)
        raise
    entry.after, entry.outcome = current(registry), "applied"
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
    with _exclusive(registry, actor):
        before = current(registry)
        version = registry.resolve(version)
        if version == before.aliases.stable:
            raise RolloutRefusedError(f"{version} is already stable; a canary must be another version.")

        def apply() -> None:
            registry.update_aliases(lambda a: a.model_copy(update={"canary": version}), retries=WRITE_RETRIES)
            registry.update_rollout(lambda r: r.model_copy(update={
                "canary_version": version, "canary_weight": weight, "shadow_share": shadow_share,
                "updated_by": actor}), retries=WRITE_RETRIES)
        return _audited(registry, "deploy_canary", actor, reason, before, apply)


def _check_canary(before: RolloutView, expected: str | None) -> None:
    """A caller acting on what it read earlier (the controller) names the canary it means, so a
    change in between (an operator's rollback, a new canary) makes the call fail, not misfire."""
    if expected is not None and expected not in (before.rollout.canary_version, before.aliases.canary):
        raise RolloutRefusedError(f"The canary is now {before.rollout.canary_version}, not {expected}.")


def set_traffic(registry: ModelRegistry, weight: int | None, shadow_share: float | None, actor: str,
                reason: str, expected_canary: str | None = None) -> AuditEntry:
    with _exclusive(registry, actor):
        before = current(registry)
        _check_canary(before, expected_canary)
        if before.rollout.canary_version is None:
            raise RolloutRefusedError("There is no canary; deploy one first.")
        update = {"updated_by": actor}
        if weight is not None:
            update["canary_weight"] = weight
        if shadow_share is not None:
            update["shadow_share"] = shadow_share
        return _audited(registry, "set_traffic", actor, reason, before,
                        lambda: registry.update_rollout(lambda r: r.model_copy(update=update),
                                                        retries=WRITE_RETRIES))


def promote(registry: ModelRegistry, actor: str, reason: str, expected_canary: str | None = None) -> AuditEntry:
    """Canary becomes stable, the old stable becomes fallback, the rollout is cleared.
    Aliases first: while the rollout still names the canary it equals stable, so it gets
    everything; then the rollout record is cleared."""
    with _exclusive(registry, actor):
        before = current(registry)
        _check_canary(before, expected_canary)
        canary = before.rollout.canary_version
        if canary is None:
            raise RolloutRefusedError("There is no canary to promote.")

        def apply() -> None:
            registry.update_aliases(lambda a: Aliases(stable=canary, canary=None, fallback=a.stable),
                                    retries=WRITE_RETRIES)
            registry.update_rollout(lambda r: RolloutState(updated_by=actor), retries=WRITE_RETRIES)
        return _audited(registry, "promote", actor, reason, before, apply)


def rollback(registry: ModelRegistry, actor: str, reason: str, expected_canary: str | None = None) -> AuditEntry:
    """With a canary: its weight and shadow go to 0 first (traffic back on stable at once),
    then the canary alias is dropped. Without one, right after a promotion: the aliases the
    promotion replaced are restored (the old stable answers again). With `expected_canary`,
    only that canary is rolled back (never a promotion)."""
    with _exclusive(registry, actor):
        before = current(registry)
        _check_canary(before, expected_canary)
        if before.rollout.canary_version is not None or before.aliases.canary is not None:
            def apply() -> None:
                registry.update_rollout(lambda r: RolloutState(updated_by=actor), retries=WRITE_RETRIES)
                registry.update_aliases(lambda a: a.model_copy(update={"canary": None}), retries=WRITE_RETRIES)
            return _audited(registry, "rollback", actor, reason, before, apply)
        promoted = next((e for e in reversed(read_audit(registry))
                         if e.action in ("promote", "rollback") and e.outcome == "applied"), None)
        if promoted is None or promoted.action != "promote" or promoted.after.aliases.stable != before.aliases.stable:
            raise RolloutRefusedError("There is no canary to roll back and no promotion to undo.")
        restored = promoted.before.aliases.model_copy(update={"canary": None})
        return _audited(registry, "rollback", actor, reason, before,
                        lambda: registry.update_aliases(lambda a: restored, retries=WRITE_RETRIES))


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
