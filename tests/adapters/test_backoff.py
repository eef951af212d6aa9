"""The one retry backoff: table-driven over every loop's numbers, and properties.

No fixtures: ``adapters.backoff`` is pure (attempt and draw passed in).
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.backoff import backoff_delay_s
from contracts.settings import AlertsSettings, IngestSettings
from firmware_sim.service import RECONNECT_MAX_S as SIM_MAX_S
from firmware_sim.service import RECONNECT_MIN_S as SIM_MIN_S
from gateway.serialport import REOPEN_MAX_S, REOPEN_MIN_S
from gateway.sitelink import RECONNECT_MAX_S as SITE_MAX_S
from gateway.sitelink import RECONNECT_MIN_S as SITE_MIN_S
from ingest.workers import RESTART_MAX_S, RESTART_MIN_S

INGEST = IngestSettings()
ALERTS = AlertsSettings()

# Each retry loop's numbers (ingest's and alerts' come from settings: their defaults).
LOOPS = [
    ("serial reopen", REOPEN_MIN_S, REOPEN_MAX_S),
    ("site link", SITE_MIN_S, SITE_MAX_S),
    ("simulated device", SIM_MIN_S, SIM_MAX_S),
    ("worker restart", RESTART_MIN_S, RESTART_MAX_S),
    ("ingest database", INGEST.retry_min_s, INGEST.retry_max_s),
    ("alerts database", ALERTS.retry_min_s, ALERTS.retry_max_s),
]

# Near-1 draws give the ceiling: doubling from the minimum up to the cap.
TOP = math.nextafter(1.0, 0.0)


@pytest.mark.parametrize(("loop", "min_s", "max_s"), LOOPS)
def test_each_loop_keeps_its_minimum_and_maximum(loop, min_s, max_s):
    assert backoff_delay_s(1, min_s=min_s, max_s=max_s, draw=0.0) == min_s / 2
    assert backoff_delay_s(1, min_s=min_s, max_s=max_s, draw=TOP) == pytest.approx(min_s)
    assert backoff_delay_s(100, min_s=min_s, max_s=max_s, draw=TOP) == pytest.approx(max_s)


@pytest.mark.parametrize(
    ("attempt", "draw", "expected"),
    [
        (1, 0.0, 0.25),
        (1, 0.5, 0.375),
        (2, 0.0, 0.25),
        (2, 0.5, 0.625),
        (3, 0.5, 1.125),
        (6, 0.5, 7.625),
        (7, 0.5, 7.625),  # capped at 15: halfway between 0.25 and 15
        (10_000, 0.5, 7.625),
    ],
)
def test_table(attempt, draw, expected):
    assert backoff_delay_s(attempt, min_s=0.5, max_s=15.0, draw=draw) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("attempt", "min_s", "max_s", "draw", "match"),
    [
        (0, 0.5, 1.0, 0.1, "attempt"),
        (1, 0.0, 1.0, 0.1, "min_s"),
        (1, 2.0, 1.0, 0.1, "min_s"),
        (1, 0.5, 1.0, 1.0, "draw"),
        (1, 0.5, 1.0, -0.1, "draw"),
    ],
)
def test_bad_arguments_raise(attempt, min_s, max_s, draw, match):
    with pytest.raises(ValueError, match=match):
        backoff_delay_s(attempt, min_s=min_s, max_s=max_s, draw=draw)


@given(
    st.integers(1, 10_000),
    st.floats(0.01, 10.0),
    st.floats(1.0, 100.0),
    st.floats(0, 1, exclude_max=True),
)
def test_delay_between_half_the_minimum_and_the_cap(attempt, min_s, span, draw):
    max_s = min_s * span
    delay = backoff_delay_s(attempt, min_s=min_s, max_s=max_s, draw=draw)
    assert min_s / 2 <= delay <= max_s * (1 + 1e-12)


@given(st.integers(1, 200), st.floats(0, 1, exclude_max=True))
def test_never_shrinks_with_more_attempts_for_one_draw(attempt, draw):
    now = backoff_delay_s(attempt, min_s=0.5, max_s=30.0, draw=draw)
    assert backoff_delay_s(attempt + 1, min_s=0.5, max_s=30.0, draw=draw) >= now


@given(st.integers(1, 200), st.floats(0, 0.999), st.floats(0, 0.999))
def test_a_larger_draw_never_waits_less(attempt, a, b):
    low, high = sorted((a, b))
    assert backoff_delay_s(attempt, min_s=1.0, max_s=30.0, draw=low) <= backoff_delay_s(
        attempt, min_s=1.0, max_s=30.0, draw=high
    )
