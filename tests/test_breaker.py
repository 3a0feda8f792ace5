"""Circuit breaker: opens on consecutive failures or an error ratio, probes when half-open."""

from asrops.serve.breaker import BreakerState, CircuitBreaker
from asrops.settings import BreakerSettings


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(**overrides) -> tuple[CircuitBreaker, Clock]:
    clock = Clock()
    settings = BreakerSettings(consecutive_failures=3, error_ratio=0.5, min_requests=6, window_s=30, open_s=10,
                               half_open_probes=1).model_copy(update=overrides)
    return CircuitBreaker(settings, clock), clock


def test_consecutive_failures_open_it_and_it_refuses_traffic():
    b, _ = breaker()
    for _ in range(2):
        b.record(failed=True)
    assert b.state is BreakerState.CLOSED and b.allow()
    b.record(failed=True)
    assert b.state is BreakerState.OPEN and not b.allow()


def test_a_success_resets_the_consecutive_count():
    b, _ = breaker(min_requests=100)
    for failed in (True, True, False, True, True, False):
        b.record(failed)
    assert b.state is BreakerState.CLOSED


def test_an_error_ratio_over_the_window_opens_it_once_enough_requests_were_seen():
    b, _ = breaker(consecutive_failures=100)
    for failed in (True, False, True, False, True):
        b.record(failed)
    assert b.state is BreakerState.CLOSED  # 5 requests: below min_requests
    b.record(failed=False)
    assert b.state is BreakerState.OPEN  # 3 of 6 failed


def test_old_outcomes_leave_the_window():
    b, clock = breaker(consecutive_failures=100)
    for _ in range(3):
        b.record(failed=True)
    clock.now += 31
    for _ in range(5):
        b.record(failed=False)
    assert b.state is BreakerState.CLOSED and b.error_ratio() == 0


def test_after_open_s_one_probe_goes_through_and_its_success_closes_it():
    b, clock = breaker()
    for _ in range(3):
        b.record(failed=True)
    clock.now += 9
    assert not b.allow()
    clock.now += 1
    assert b.allow() and b.state is BreakerState.HALF_OPEN
    assert not b.allow()  # only one probe at a time
    b.record(failed=False)
    assert b.state is BreakerState.CLOSED and b.allow()


def test_a_failed_probe_opens_it_again_for_another_open_s():
    b, clock = breaker()
    for _ in range(3):
        b.record(failed=True)
    clock.now += 10
    assert b.allow()
    b.record(failed=True)
    assert b.state is BreakerState.OPEN and not b.allow()
    clock.now += 10
    assert b.allow()


def test_a_probe_that_never_reports_does_not_wedge_it_half_open():
    b, clock = breaker()
    for _ in range(3):
        b.record(failed=True)
    clock.now += 10
    assert b.allow()  # the probe's request is cancelled and never recorded
    clock.now += 5
    assert not b.allow()
    clock.now += 5
    assert b.allow()  # another probe after open_s
