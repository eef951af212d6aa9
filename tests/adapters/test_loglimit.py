"""The log limiter: its window rule table-driven and as properties; no fixtures."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.loglimit import DropTally, LogLimiter, admit, should_log_attempt


@pytest.mark.parametrize(
    ("window", "now", "expected"),
    [
        (None, 1000.0, ((1000.0, 1), True)),  # a new key opens a window
        ((1000.0, 4), 1500.0, ((1000.0, 5), True)),  # the fifth line passes
        ((1000.0, 5), 1500.0, ((1000.0, 6), False)),  # the sixth does not
        ((1000.0, 99), 60_999.0, ((1000.0, 100), False)),  # still inside the window
        ((1000.0, 99), 61_000.0, ((61_000.0, 1), True)),  # a new window opens at its end
        ((1000.0, 99), 500_000.0, ((500_000.0, 1), True)),
    ],
)
def test_admit(window, now, expected):
    assert admit(window, now, limit=5, span=60_000) == expected


def test_keys_have_their_own_windows():
    limiter = LogLimiter(limit=2, span=60.0)
    assert [limiter.allow("a", 0.0) for _ in range(3)] == [True, True, False]
    assert limiter.allow("b", 1.0)
    assert not limiter.allow("a", 59.9)
    assert limiter.allow("a", 60.0)


def test_bad_limits_raise():
    with pytest.raises(ValueError, match="span"):
        LogLimiter(limit=5, span=0)
    with pytest.raises(ValueError, match="limit"):
        LogLimiter(limit=-1, span=60)


@given(
    st.integers(0, 20),
    st.lists(st.floats(0, 10.0), max_size=200),
)
def test_never_more_than_the_limit_per_window(limit, gaps):
    """Over any sequence of times, each window lets through at most ``limit`` lines."""
    limiter = LogLimiter(limit=limit, span=60.0)
    now = 0.0
    passed_at: list[float] = []
    starts: list[float] = []
    for gap in gaps:
        now += gap
        if not starts or now - starts[-1] >= 60.0:
            starts.append(now)
        if limiter.allow("k", now):
            passed_at.append(now)
    for start in starts:
        assert sum(1 for t in passed_at if start <= t < start + 60.0) <= limit


@given(st.integers(1, 50), st.floats(0, 1e9))
def test_the_first_lines_of_a_window_pass(limit, now):
    window = None
    results = []
    for _ in range(limit + 3):
        window, allowed = admit(window, now, limit=limit, span=60.0)
        results.append(allowed)
    assert results == [True] * limit + [False] * 3


@pytest.mark.parametrize(
    ("attempt", "logged"),
    [(1, True), (2, False), (9, False), (10, True), (11, False), (20, True), (1000, True)],
)
def test_retry_lines(attempt, logged):
    assert should_log_attempt(attempt, every=10) is logged


def test_drop_tally_logs_a_key_at_once_then_once_a_span_with_every_drop_counted():
    tally = DropTally(span=60)
    tally.add({"flood": 3, "calm": 0}, now=0)
    assert tally.due(0) == [("flood", 3, 0)]  # the first drops: at once
    for t in range(1, 60):
        tally.add({"flood": 10}, now=t)
        assert tally.due(t) == []  # held back within the span
    tally.add({"other": 1}, now=30)
    assert tally.due(30) == [("other", 1, 30)]  # another key is not held back by this one
    assert tally.due(60) == [("flood", 590, 1)]  # everything since the last line
    assert tally.due(200) == []  # nothing dropped since
    tally.add({"flood": 2}, now=201)
    assert tally.due(201) == [("flood", 2, 201)]  # the span since its last line has passed


def test_drop_tally_flush_hands_out_everything_held():
    tally = DropTally(span=60)
    tally.add({"a": 1}, now=0)
    assert tally.due(0) == [("a", 1, 0)]
    tally.add({"a": 4, "b": 2}, now=5)
    assert sorted(tally.due(6)) == [("b", 2, 5)]
    assert tally.due(7, flush=True) == [("a", 4, 5)]
    assert tally.due(8, flush=True) == []


@given(st.lists(st.tuples(st.integers(0, 3), st.sampled_from("abc"), st.integers(0, 5))))
def test_drop_tally_loses_no_drop_and_keeps_each_key_to_a_line_a_span(steps):
    tally = DropTally(span=10)
    now, added, logged = 0, 0, 0
    last_line: dict[str, int] = {}
    for step, key, count in steps:
        now += step
        tally.add({key: count}, now)
        added += count
        for line_key, dropped, _since in tally.due(now):
            assert now - last_line.get(line_key, -10) >= 10
            last_line[line_key] = now
            logged += dropped
    logged += sum(dropped for _k, dropped, _s in tally.due(now, flush=True))
    assert logged == added
