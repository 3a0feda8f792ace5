"""The analysis spec and one interval's judgement (asrops/settings.py, promotion/analysis.py): ranges absolute and
relative to the stable, and no data, NaN or an unreachable Prometheus failing a check. The
query function here answers from a table; tests/test_promotion.py runs the same code against
a real Prometheus."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from asrops.promotion.analysis import QueryFailed, judge
from asrops.promotion.checks import LIVE_REQUESTS
from asrops.settings import AnalysisSpec, Bound, MetricCheck, render_query

NOW = datetime(2026, 11, 23, tzinfo=UTC)
WINDOW = "60s"
ERRORS = MetricCheck(name="errors", query='err{v="$version"}[$window]',
                     max=Bound(value=0.005, relative_to_stable="plus"))
LATENCY = MetricCheck(name="p95", query='p95{v="$version"}', max=Bound(value=1.2, relative_to_stable="times"))
LOGPROB = MetricCheck(name="logprob", query='lp{v="$version"}', min=Bound(value=-0.1, relative_to_stable="plus"))
SPEC = AnalysisSpec(interval_s=60, min_requests=10, checks=[ERRORS, LATENCY, LOGPROB])


def table(values: dict[str, float | None], requests: float | None = 50.0):
    """A query function: each check's value per version, and the canary's request count."""
    def query(promql: str) -> float | None:
        if promql == render_query(LIVE_REQUESTS, "canary", WINDOW):
            return requests
        for key, value in values.items():
            if promql.startswith(key.split(":")[0]) and f'v="{key.split(":")[1]}"' in promql:
                return value
        return None
    return query


GOOD = {"err:canary": 0.0, "err:stable": 0.001, "p95:canary": 1.1, "p95:stable": 1.0,
        "lp:canary": -0.35, "lp:stable": -0.3}


def test_in_range_on_every_check_passes_and_records_values_and_limits():
    j = judge(table(GOOD), SPEC, "canary", "stable", shadow=False, now=NOW)
    assert j.passed, j.reason
    by_name = {c.name: c for c in j.checks}
    assert by_name["errors"].high == pytest.approx(0.006) and by_name["errors"].low is None
    assert by_name["p95"].high == pytest.approx(1.2) and by_name["p95"].stable == 1.0
    assert by_name["logprob"].low == pytest.approx(-0.4)
    assert by_name["p95"].range == "<= stable x 1.2"


@pytest.mark.parametrize("key,value,why", [
    ("err:canary", 0.02, "outside"),
    ("p95:canary", 1.3, "outside"),
    ("lp:canary", -0.5, "outside"),
    ("p95:canary", None, "no usable value for the canary"),
    ("p95:canary", math.nan, "no usable value for the canary"),
    ("p95:canary", math.inf, "no usable value for the canary"),
    ("p95:stable", None, "no usable value for the stable"),
    ("lp:stable", math.nan, "no usable value for the stable"),
])
def test_out_of_range_no_data_nan_and_infinity_each_fail(key, value, why):
    j = judge(table({**GOOD, key: value}), SPEC, "canary", "stable", shadow=False, now=NOW)
    assert not j.passed
    failed = [c for c in j.checks if c.passed is False]
    assert [c.name for c in failed] == [{"err": "errors", "p95": "p95", "lp": "logprob"}[key.split(":")[0]]]
    assert why in failed[0].reason


@pytest.mark.parametrize("requests", [None, 3.0, math.nan])
def test_too_few_requests_is_inconclusive_before_any_check(requests):
    j = judge(table(GOOD, requests=requests), SPEC, "canary", "stable", shadow=False, now=NOW)
    assert not j.passed and j.inconclusive and "too few requests" in j.reason and j.checks == []


def test_an_unreachable_prometheus_fails_the_interval():
    def down(promql: str) -> float | None:
        raise QueryFailed("connection refused")
    j = judge(down, SPEC, "canary", "stable", shadow=False, now=NOW)
    assert not j.passed and "Prometheus cannot answer" in j.reason


def test_a_gated_check_is_skipped_until_enough_labels_then_judged():
    wer = MetricCheck(name="wer", query='wer{v="$version"}', max=Bound(value=1.02, relative_to_stable="times"),
                      only_when={"query": 'words{v="$version"}', "min": 200})
    spec = SPEC.model_copy(update={"checks": [wer]})
    few = {"wer:canary": 0.5, "wer:stable": 0.1, "words:canary": 50.0, "words:stable": 500.0}
    j = judge(table(few), spec, "canary", "stable", shadow=False, now=NOW)
    assert j.passed and j.checks[0].passed is None and "skipped" in j.checks[0].reason
    enough = {**few, "words:canary": 300.0}
    j = judge(table(enough), spec, "canary", "stable", shadow=False, now=NOW)
    assert not j.passed and j.checks[0].passed is False


def test_shadow_checks_run_only_in_the_shadow_phase():
    shadow_only = MetricCheck(name="disagree", query='dis{v="$version"}', max=Bound(value=0.3), during="shadow")
    spec = SPEC.model_copy(update={"checks": [ERRORS, shadow_only]})
    live = judge(table({**GOOD, "dis:canary": 0.9}), spec, "canary", "stable", shadow=False, now=NOW)
    assert [c.name for c in live.checks] == ["errors"]


def test_spec_forms_and_refusals(tmp_path):
    assert AnalysisSpec(step_weight=10, max_weight=40).weights() == [10, 20, 30, 40]
    assert AnalysisSpec().weights() == [5, 10, 25, 50]
    for bad in ({"step_weights": [10, 5]}, {"step_weights": [0, 50]}, {"step_weight": 10},
                {"checks": [ERRORS, ERRORS]}, {"step_weights": []}):
        with pytest.raises(ValidationError):
            AnalysisSpec(**bad)
    with pytest.raises(ValidationError, match="needs a min or a max"):
        MetricCheck(name="x", query='q{v="$version"}')
    with pytest.raises(ValidationError, match="must use \\$version"):
        MetricCheck(name="x", query="q", max=Bound(value=1))
    path = tmp_path / "analysis.yaml"
    path.write_text("interval_s: 30\nstep_weights: [10, 100]\nthreshold: 2\nchecks:\n"
                    "  - name: errors\n    query: 'err{v=\"$version\"}'\n"
                    "    max: {value: 0.01, relative_to_stable: plus}\n")
    spec = AnalysisSpec.from_yaml(path)
    assert spec.weights() == [10, 100] and spec.checks[0].max.limit(0.002) == pytest.approx(0.012)


# --- the controller's state machine, on a local registry, with a clock and a query table ----
class Clock:
    """Starts now (operators' pauses and resumes are stamped with the wall clock) and moves on demand."""

    def __init__(self):
        self.now = datetime.now(UTC)

    def __call__(self):
        return self.now

    def advance(self, seconds: float) -> None:
        from datetime import timedelta

        self.now += timedelta(seconds=seconds)


@pytest.fixture
def rollout_registry(tmp_path):
    from asrops.registry import LocalStore, ModelRegistry
    from tests.fakes import publish_dummy

    registry = ModelRegistry(LocalStore(tmp_path / "registry"), tmp_path / "cache")
    for version in ("stable", "canary"):
        publish_dummy(registry, f"v-{version}", tmp_path)
    registry.update_aliases(lambda a: a.model_copy(update={"stable": "v-stable"}))
    return registry


def _controller(registry, values: dict, max_inconclusive: int = 10):
    from asrops.promotion.controller import PromotionController

    spec = AnalysisSpec(interval_s=10, window_s=60, step_weights=[10, 50], threshold=2, min_requests=10,
                        checks=[ERRORS], max_inconclusive=max_inconclusive)

    def query(promql: str) -> float | None:
        if "requests_total" in promql and "5.." not in promql and "/" not in promql:
            return values["requests"]
        return values.get("err:canary" if 'v="v-canary"' in promql else "err:stable")

    clock = Clock()
    return PromotionController(registry, spec, query, clock=clock), clock


def _run(controller, clock, ticks: int) -> list[str]:
    actions = []
    for _ in range(ticks):
        clock.advance(10)
        if decision := controller.tick():
            actions.append(f"{decision.action}@{decision.weight}")
    return actions


def test_the_controller_steps_through_every_weight_then_promotes(rollout_registry):
    from asrops.promotion import rollout

    controller, clock = _controller(rollout_registry, {"requests": 50.0, "err:canary": 0.0, "err:stable": 0.0})
    rollout.deploy_canary(rollout_registry, "v-canary", 0, 0.0, "tests", "test")
    actions = _run(controller, clock, 5)
    assert actions == ["start@10", "initialized@10", "advance@50", "promoted@50"], actions
    advance = next(d for d in rollout.read_analysis(rollout_registry).history if d.action == "advance")
    assert "all checks in range on 50 requests (errors)" in advance.reason  # what the step rested on
    aliases = rollout_registry.read_aliases().value
    assert (aliases.stable, aliases.fallback, aliases.canary) == ("v-canary", "v-stable", None)


def test_the_controller_rolls_back_at_the_threshold_and_a_pause_holds_it(rollout_registry):
    from asrops.promotion import rollout

    values = {"requests": 50.0, "err:canary": 0.2, "err:stable": 0.0}
    controller, clock = _controller(rollout_registry, values)
    rollout.deploy_canary(rollout_registry, "v-canary", 0, 0.0, "tests", "test")
    assert _run(controller, clock, 2) == ["start@10", "initialized@10"]
    rollout.pause(rollout_registry, "ops", "a look first")
    assert _run(controller, clock, 3) == []  # paused: no check, no change
    rollout.resume(rollout_registry, "ops", "go on")
    assert _run(controller, clock, 3) == ["check-failed@10", "rollback@10"]
    view = rollout.current(rollout_registry)
    assert view.aliases.stable == "v-stable" and view.rollout.canary_version is None
    assert rollout.read_analysis(rollout_registry).phase == "failed"


def test_a_canary_removed_by_hand_ends_the_analysis_and_the_same_version_can_be_tried_again(rollout_registry):
    from asrops.promotion import rollout

    controller, clock = _controller(rollout_registry, {"requests": 50.0, "err:canary": 0.0, "err:stable": 0.0})
    rollout.deploy_canary(rollout_registry, "v-canary", 0, 0.0, "tests", "test")
    _run(controller, clock, 2)
    rollout.rollback(rollout_registry, "ops", "not today")
    assert _run(controller, clock, 1) == ["ended@10"]
    rollout.deploy_canary(rollout_registry, "v-canary", 0, 0.0, "ops", "again")
    assert _run(controller, clock, 1) == ["start@10"]


def test_thin_traffic_holds_the_canary_neither_promoting_nor_failing_it_then_rolls_it_back(rollout_registry):
    """Too few requests in a window say nothing about the canary: it holds its weight. Enough
    requests again and it goes on; too many thin intervals in a row and it is rolled back."""
    from asrops.promotion import rollout

    values = {"requests": 50.0, "err:canary": 0.0, "err:stable": 0.0}
    controller, clock = _controller(rollout_registry, values, max_inconclusive=3)
    rollout.deploy_canary(rollout_registry, "v-canary", 0, 0.0, "tests", "test")
    assert _run(controller, clock, 2) == ["start@10", "initialized@10"]
    values["requests"] = 4.0  # below min_requests: the error ratio of 4 requests proves nothing
    assert _run(controller, clock, 2) == ["check-inconclusive@10", "check-inconclusive@10"]
    state = rollout.read_analysis(rollout_registry)
    assert state.failed_checks == 0 and state.weight == 10 and state.inconclusive == 2
    assert rollout.current(rollout_registry).rollout.canary_weight == 10
    values["requests"] = 50.0
    assert _run(controller, clock, 1) == ["advance@50"]
    assert rollout.read_analysis(rollout_registry).inconclusive == 0  # counted in a row
    values["requests"] = 0.0
    assert _run(controller, clock, 3) == ["check-inconclusive@50", "check-inconclusive@50", "rollback@50"]
    state = rollout.read_analysis(rollout_registry)
    assert state.phase == "failed" and "too thin" in state.history[-1].reason
    assert rollout.current(rollout_registry).aliases.stable == "v-stable"
