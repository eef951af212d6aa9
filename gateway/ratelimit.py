"""Per-device token buckets: a flooding device cannot starve the others, a backlog is not a flood.

Pure: the caller passes the arrival time and the reading's own timestamp.
Each device gets ``rate_per_s`` tokens a second up to ``burst``; a reading
costs one token; a reading without a token is dropped and counted by the
caller. Each device has two buckets, told apart by how old the reading is:

- a *live* reading (its timestamp within ``LIVE_LAG_MS`` of its arrival, or
  none: a serial frame is stamped on arrival) takes from a bucket that
  refills with arrival time: a device sending a thousand readings a second
  with current timestamps gets ``burst`` and then ``rate_per_s``;
- a *backlog* reading (older: buffered through an outage and sent once the
  device is back) takes from a second bucket that refills with the advance
  of the readings' own timestamps as well as with arrival time, whichever
  is more. Ten minutes of readings spaced at the device's reporting pace,
  sent at once, advance their timestamps by ten minutes and pass whole;
  the same readings sent again, or sent with timestamps closer together
  than the rate, refill nothing and are limited like a flood.

The backlog bucket's timestamp clock only moves forward and starts no
earlier than ``backlog_max_ms`` before arrival, so a device cannot pass more
than ``rate_per_s`` readings per second of reading time, and not more than
``backlog_max_ms`` of reading time ahead of the clock: a device that makes
up old timestamps can add at most that window's readings once, and then
``rate_per_s`` (on top of its live rate). A backlog older than the window
is limited like a flood; one sent newest first as well (its timestamps go
back). Live and backlog readings do not take from each other, so a device
that resumes its live readings while it sends its backlog loses neither.

``allow`` runs for every reading a gateway receives, so each bucket keeps
its device's rate (no second lookup) and a full live bucket skips the
refill arithmetic (it would only compute ``burst`` again).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

# A reading this much older than its arrival is a backlog reading. A live
# reading crosses the site broker in milliseconds; 10 s leaves room for a
# device whose clock is a few seconds slow and for a short reconnect, whose
# few buffered readings the live burst covers. A device whose clock runs
# further behind is still limited correctly: its readings' timestamps
# advance at its reporting pace, which is what the backlog bucket follows.
LIVE_LAG_MS: Final = 10_000


@dataclass(slots=True)
class _Bucket:
    tokens: float
    last_ms: int
    rate_per_s: float
    # The backlog bucket: its tokens, the arrival time of its last reading and
    # the highest timestamp it has reached (its reading-time clock).
    backlog_tokens: float
    backlog_last_ms: int
    backlog_ts_ms: int


class TokenBuckets:
    def __init__(
        self, *, default_rate_per_s: float, burst: float, backlog_max_ms: int = 86_400_000
    ) -> None:
        if default_rate_per_s <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        if backlog_max_ms < 0:
            raise ValueError("backlog_max_ms must be >= 0")
        self.default_rate_per_s = default_rate_per_s
        self.burst = burst
        self.backlog_max_ms = backlog_max_ms
        self._rates: dict[str, float] = {}
        self._buckets: dict[str, _Bucket] = {}

    def set_rate(self, device_id: str, rate_per_s: float) -> None:
        if rate_per_s <= 0:
            raise ValueError(f"rate for {device_id} must be > 0")
        self._rates[device_id] = rate_per_s
        bucket = self._buckets.get(device_id)
        if bucket is not None:
            bucket.rate_per_s = rate_per_s

    def rate_of(self, device_id: str) -> float:
        return self._rates.get(device_id, self.default_rate_per_s)

    def forget(self, device_id: str) -> None:
        self._rates.pop(device_id, None)
        self._buckets.pop(device_id, None)

    def _bucket(self, device_id: str, now_ms: int) -> _Bucket:
        bucket = self._buckets.get(device_id)
        if bucket is None:
            rate = self._rates.get(device_id, self.default_rate_per_s)
            burst = self.burst
            floor_ms = now_ms - self.backlog_max_ms
            bucket = _Bucket(burst, now_ms, rate, burst, now_ms, floor_ms)
            self._buckets[device_id] = bucket
        return bucket

    def allow(self, device_id: str, now_ms: int, ts_ms: int | None = None) -> bool:
        """Take a token for ``device_id``'s reading stamped ``ts_ms`` (None: ``now_ms``)."""
        bucket = self._buckets.get(device_id)
        if bucket is None:
            bucket = self._bucket(device_id, now_ms)
        if ts_ms is not None and ts_ms < now_ms - LIVE_LAG_MS:
            return self._allow_backlog(bucket, now_ms, ts_ms)
        if now_ms > bucket.last_ms:  # a clock step back refills nothing
            burst = self.burst
            if bucket.tokens < burst:
                elapsed_ms = now_ms - bucket.last_ms
                bucket.tokens = min(burst, bucket.tokens + elapsed_ms * bucket.rate_per_s / 1000.0)
            bucket.last_ms = now_ms
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return True
        return False

    def _backlog_refill(self, bucket: _Bucket, now_ms: int, ts_ms: int) -> tuple[float, int]:
        """The backlog bucket's tokens for a reading stamped ``ts_ms`` at ``now_ms``; its clock."""
        clock_ms = max(bucket.backlog_ts_ms, now_ms - self.backlog_max_ms)
        credit_ms = max(now_ms - bucket.backlog_last_ms, ts_ms - clock_ms, 0)
        tokens = min(self.burst, bucket.backlog_tokens + credit_ms * bucket.rate_per_s / 1000.0)
        return tokens, max(clock_ms, ts_ms)

    def _allow_backlog(self, bucket: _Bucket, now_ms: int, ts_ms: int) -> bool:
        tokens, bucket.backlog_ts_ms = self._backlog_refill(bucket, now_ms, ts_ms)
        bucket.backlog_last_ms = max(bucket.backlog_last_ms, now_ms)
        allowed = tokens >= 1.0
        bucket.backlog_tokens = tokens - 1.0 if allowed else tokens
        return allowed

    def retry_after_ms(self, device_id: str, now_ms: int, ts_ms: int | None = None) -> int:
        """How long until ``device_id`` has a token for a reading stamped ``ts_ms`` (0: now)."""
        bucket = self._buckets.get(device_id)
        if bucket is None:
            return 0
        rate = bucket.rate_per_s
        if ts_ms is not None and ts_ms < now_ms - LIVE_LAG_MS:
            tokens, _clock = self._backlog_refill(bucket, now_ms, ts_ms)
        else:
            tokens = bucket.tokens + max(0, now_ms - bucket.last_ms) * rate / 1000.0
        if tokens >= 1.0:
            return 0
        return math.ceil((1.0 - tokens) * 1000.0 / rate)
