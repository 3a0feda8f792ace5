"""The controller's metrics (prometheus-client; Prometheus scrapes them as `asrops-controller`)."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Gauge

from asrops.promotion.state import AnalysisState, Phase


class ControllerMetrics:
    """The controller's metrics (prometheus-client; Prometheus scrapes them as `asrops-controller`)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = r = registry or CollectorRegistry()
        self.phase = Gauge("asrops_rollout_phase", "1 for the rollout's current phase, 0 for the others.",
                           ["phase"], registry=r)
        self.weight = Gauge("asrops_rollout_weight", "Canary weight (percent) the controller set.", registry=r)
        self.failed_checks = Gauge("asrops_rollout_failed_checks", "Failed checks of the current rollout.",
                                   registry=r)
        self.check_value = Gauge("asrops_rollout_check_value", "Last value of each check, for the canary and "
                                 "the stable.", ["check", "role"], registry=r)
        self.check_passed = Gauge("asrops_rollout_check_passed", "Last result of each check: 1 pass, 0 fail, "
                                  "-1 skipped.", ["check"], registry=r)
        self.decisions = Counter("asrops_rollout_decisions", "Controller decisions by action.", ["action"],
                                 registry=r)
        for phase in Phase:
            self.phase.labels(phase.value).set(0)

    def export(self, state: AnalysisState) -> None:
        for phase in Phase:
            self.phase.labels(phase.value).set(1 if state.phase == phase else 0)
        self.weight.set(state.weight)
        self.failed_checks.set(state.failed_checks)
        for check in state.last.checks if state.last else []:
            for role, value in (("canary", check.canary), ("stable", check.stable)):
                self.check_value.labels(check.name, role).set(value if value is not None else math.nan)
            self.check_passed.labels(check.name).set(-1 if check.passed is None else int(check.passed))
