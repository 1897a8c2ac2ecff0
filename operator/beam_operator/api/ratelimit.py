"""Per-key token bucket, in memory: each replica enforces the limit on its own."""

from __future__ import annotations

import math
import threading
import time


class TokenBuckets:
    """`burst` requests at once, refilled at `rate` per second, per key."""

    def __init__(self, rate: float, burst: int, *, max_keys: int = 100000) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def peek(self, key: str) -> float:
        """What take() would answer, without taking a token."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def take(self, key: str) -> float:
        """0 if the request may go ahead, else the seconds until a token is available."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                if len(self._buckets) >= self.max_keys and key not in self._buckets:
                    # Full buckets carry no state worth keeping; dropping them bounds memory.
                    self._buckets = {k: v for k, v in self._buckets.items() if v[0] < self.burst}
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate


def retry_after_header(wait: float) -> str:
    return str(max(1, math.ceil(wait)))
