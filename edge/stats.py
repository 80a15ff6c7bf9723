"""Rolling latency percentiles and frame rate, cheap enough to update on every frame."""

from __future__ import annotations

import time
from collections import deque

import numpy as np

STAGES = ("queue", "detect", "classify", "publish", "total")


class LatencyWindow:
    """The last ``size`` samples per stage, so p99 follows recent behaviour rather than all history."""

    def __init__(self, size: int = 1000, stages: tuple[str, ...] = STAGES) -> None:
        self._samples: dict[str, deque[float]] = {stage: deque(maxlen=size) for stage in stages}

    def add(self, timings_ms: dict[str, float]) -> None:
        for stage, value in timings_ms.items():
            self._samples[stage].append(value)

    def summary(self) -> dict[str, dict[str, float]]:
        result = {}
        for stage, samples in self._samples.items():
            if samples:
                p50, p99 = np.percentile(np.fromiter(samples, float), [50, 99])
                result[stage] = {"p50": round(float(p50), 3), "p99": round(float(p99), 3)}
            else:
                result[stage] = {"p50": 0.0, "p99": 0.0}
        return result


class RateMeter:
    """Events per second over a sliding time window."""

    def __init__(self, window_s: float = 5.0) -> None:
        self.window_s = window_s
        self._times: deque[float] = deque()

    def tick(self, now: float | None = None) -> None:
        self._times.append(time.monotonic() if now is None else now)

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()
        if len(self._times) < 2:
            return 0.0
        span = max(now - self._times[0], 1e-6)
        return round((len(self._times) - 1) / span, 2)
