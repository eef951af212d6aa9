"""Per-device token buckets: a flooding device cannot starve the others.

Pure: the caller passes the time. Each device gets ``rate_per_s`` tokens a
second up to ``burst``; a reading costs one token; a reading without a token
is dropped and counted by the caller.

``allow`` runs for every reading a gateway receives, so each bucket keeps
its device's rate (no second lookup) and a full bucket skips the refill
arithmetic (it would only compute ``burst`` again); the arithmetic that
runs is the same expression in the same order, so a device gets exactly the
tokens it got before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(slots=True)
class _Bucket:
    tokens: float
    last_ms: int
    rate_per_s: float


class TokenBuckets:
    def __init__(self, *, default_rate_per_s: float, burst: float) -> None:
        if default_rate_per_s <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.default_rate_per_s = default_rate_per_s
        self.burst = burst
        self._rates: dict[str, float] = {}
        self._buckets: dict[str, _Bucket] = {}

    def set_rate(self, device_id: str, rate_per_s: float) -> None:
        if rate_per_s <= 0:
            raise ValueError(f"rate for {device_id} must be > 0")
        self._rates[device_id] = rate_per_s
        bucket = self._buckets.get(device_id)
        if bucket is not None:
            bucket.rate_per_s = rate_per_s

    def forget(self, device_id: str) -> None:
        self._rates.pop(device_id, None)
        self._buckets.pop(device_id, None)

    def allow(self, device_id: str, now_ms: int) -> bool:
        """Take a token for ``device_id`` if one is available."""
        bucket = self._buckets.get(device_id)
        if bucket is None:
            rate = self._rates.get(device_id, self.default_rate_per_s)
            bucket = self._buckets[device_id] = _Bucket(self.burst, now_ms, rate)
        elif now_ms > bucket.last_ms:  # a clock step back refills nothing
            burst = self.burst
            if bucket.tokens < burst:
                elapsed_ms = now_ms - bucket.last_ms
                bucket.tokens = min(burst, bucket.tokens + elapsed_ms * bucket.rate_per_s / 1000.0)
            bucket.last_ms = now_ms
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return True
        return False

    def retry_after_ms(self, device_id: str, now_ms: int) -> int:
        """How long until ``device_id`` has a token again (0: it has one now)."""
        bucket = self._buckets.get(device_id)
        if bucket is None:
            return 0
        rate = bucket.rate_per_s
        tokens = bucket.tokens + max(0, now_ms - bucket.last_ms) * rate / 1000.0
        if tokens >= 1.0:
            return 0
        return math.ceil((1.0 - tokens) * 1000.0 / rate)
