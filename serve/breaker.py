"""A circuit breaker per model version: stop sending traffic to a version that keeps failing,
and let a few probes through after a while to see whether it has recovered.

Only server-side failures count (the version raised, hung past its timeout, or was
unreachable); a client's bad upload never reaches the model and never counts.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from enum import StrEnum

from asrops.settings import BreakerSettings


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(self, settings: BreakerSettings, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self._clock = clock
        self.state = BreakerState.CLOSED
        self._consecutive = 0
        self._outcomes: deque[tuple[float, bool]] = deque()  # (when, failed) inside the window
        self._opened_at = 0.0
        self._probes = 0  # in flight while half-open
        self._probe_at = 0.0

    def allow(self) -> bool:
        """May a request go to this version now? (Half-open lets `half_open_probes` through.)"""
        if self.state is BreakerState.OPEN and self._clock() - self._opened_at >= self.settings.open_s:
            self.state, self._probes = BreakerState.HALF_OPEN, 0
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.HALF_OPEN:
            if self._probes and self._clock() - self._probe_at >= self.settings.open_s:
                self._probes = 0  # a probe that never reported (its request was cancelled)
            if self._probes < self.settings.half_open_probes:
                self._probes += 1
                self._probe_at = self._clock()
                return True
        return False

    def record(self, failed: bool) -> None:
        now = self._clock()
        if self.state is BreakerState.HALF_OPEN:
            self._probes = max(0, self._probes - 1)
            if failed:
                self._open(now)
            else:
                self.state, self._consecutive = BreakerState.CLOSED, 0
                self._outcomes.clear()
            return
        self._consecutive = self._consecutive + 1 if failed else 0
        self._outcomes.append((now, failed))
        while self._outcomes and now - self._outcomes[0][0] > self.settings.window_s:
            self._outcomes.popleft()
        if self.state is BreakerState.CLOSED and self._should_open():
            self._open(now)

    def error_ratio(self) -> float:
        return sum(f for _, f in self._outcomes) / len(self._outcomes) if self._outcomes else 0.0

    def _should_open(self) -> bool:
        s = self.settings
        if self._consecutive >= s.consecutive_failures:
            return True
        return len(self._outcomes) >= s.min_requests and self.error_ratio() >= s.error_ratio

    def _open(self, now: float) -> None:
        self.state, self._opened_at, self._probes = BreakerState.OPEN, now, 0
