"""TokenBuckets against a plain model of the token bucket it implements.

The model is the arithmetic written out once per call (refill at the rate
since the last call, capped at burst; a clock step back refills nothing;
a reading costs one token), so any shortcut in ``allow`` (a full bucket
skipping the refill, the rate kept in the bucket) must give the same
answers and the same retry times on any sequence of calls.
"""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.ratelimit import TokenBuckets


class _Model:
    def __init__(self, rate_per_s: float, burst: float) -> None:
        self.default = rate_per_s
        self.burst = burst
        self.rates: dict[str, float] = {}
        self.state: dict[str, tuple[float, int]] = {}

    def allow(self, device: str, now_ms: int) -> bool:
        rate = self.rates.get(device, self.default)
        tokens, last_ms = self.state.get(device, (self.burst, now_ms))
        if now_ms - last_ms > 0:
            tokens = min(self.burst, tokens + (now_ms - last_ms) * rate / 1000.0)
            last_ms = now_ms
        allowed = tokens >= 1.0
        self.state[device] = (tokens - 1.0 if allowed else tokens, last_ms)
        return allowed

    def retry_after_ms(self, device: str, now_ms: int) -> int:
        if device not in self.state:
            return 0
        rate = self.rates.get(device, self.default)
        tokens, last_ms = self.state[device]
        tokens += max(0, now_ms - last_ms) * rate / 1000.0
        return 0 if tokens >= 1.0 else math.ceil((1.0 - tokens) * 1000.0 / rate)


DEVICES = ("a", "b", "c")
calls = st.lists(
    st.one_of(
        # allow: device, time step in ms (negative: the clock stepped back)
        st.tuples(st.just("allow"), st.sampled_from(DEVICES), st.integers(-50, 3000)),
        st.tuples(st.just("rate"), st.sampled_from(DEVICES), st.floats(0.01, 1e6)),
        st.tuples(st.just("forget"), st.sampled_from(DEVICES), st.just(0)),
        st.tuples(st.just("retry"), st.sampled_from(DEVICES), st.integers(0, 3000)),
        # drain: allow at one instant until refused (shows the whole tokens left)
        st.tuples(st.just("drain"), st.sampled_from(DEVICES), st.integers(0, 3000)),
    ),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(st.floats(0.01, 1e6), st.sampled_from([1.0, 1.5, 3.0, 10.0, 1e9]), calls)
def test_buckets_answer_as_the_model(rate: float, burst: float, script: list) -> None:
    buckets = TokenBuckets(default_rate_per_s=rate, burst=burst)
    model = _Model(rate, burst)
    now = 1_790_000_000_000
    for op, device, arg in script:
        if op == "allow":
            now += arg
            assert buckets.allow(device, now) == model.allow(device, now)
        elif op == "rate":
            buckets.set_rate(device, arg)
            model.rates[device] = arg
        elif op == "forget":
            buckets.forget(device)
            model.rates.pop(device, None)
            model.state.pop(device, None)
        elif op == "drain":
            now += arg
            for _ in range(12):  # burst 1e9 never drains: 12 tokens show enough
                allowed = model.allow(device, now)
                assert buckets.allow(device, now) == allowed
                if not allowed:
                    break
        else:
            at = now + int(arg)
            assert buckets.retry_after_ms(device, at) == model.retry_after_ms(device, at)


def test_a_full_bucket_stays_full_and_a_drained_one_refills_at_its_rate() -> None:
    buckets = TokenBuckets(default_rate_per_s=2.0, burst=2.0)
    now = 1_790_000_000_000
    assert buckets.allow("a", now)
    assert buckets.allow("a", now)
    assert not buckets.allow("a", now)
    assert buckets.retry_after_ms("a", now) == 500
    buckets.set_rate("a", 4.0)  # a new rate applies to the bucket that exists
    assert buckets.retry_after_ms("a", now) == 250
    assert buckets.allow("a", now + 250)
    # An hour idle fills it to burst, not beyond.
    assert [buckets.allow("a", now + 3_600_000) for _ in range(3)] == [True, True, False]
