"""Rule evaluation over numpy windows: each condition kind, hysteresis, trees, scope, defaults.

Rows are written as ``(seconds relative to now, value)`` pairs; ``window_of``
right-aligns them into the matrices the job builds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import pytest

from alerts.evaluate import Outcome, evaluate, evaluate_all
from alerts.reference import evaluate_reference
from alerts.rules import (
    NO_TS,
    VN_AQI_METRIC,
    AllOf,
    AnyOf,
    AqiBand,
    Condition,
    Escalation,
    Flatline,
    NoData,
    RateOfChange,
    Rule,
    Threshold,
    Window,
    ZScore,
    load_rules,
    render_message,
    render_texts,
    scope_mask,
)
from contracts.catalog import DEVICE_TYPES
from contracts.schema import SEVERITIES
from contracts.severity import SEVERITY_NAMES

NOW_MS = 1_764_000_000_000
NAN = math.nan
Row = Sequence[tuple[float, float]]


def window_of(
    rows: Sequence[Row],
    *,
    device_type: str = "conference_endpoint",
    metric: str = "packet_loss",
    width: int | None = None,
    last_seen_s: Sequence[float | None] | None = None,
    site_ids: Sequence[str] | None = None,
    districts: Sequence[str] | None = None,
    extra: dict[str, Sequence[Sequence[float]]] | None = None,
) -> Window:
    """A window with ``metric`` from ``rows``; other catalog metrics all NaN.

    ``extra`` gives further metrics, one list of values per row aligned with
    that row's samples. ``last_seen_s`` is relative to now (None: never seen).
    """
    n = len(rows)
    w = width or max([len(r) for r in rows] + [1])
    ts = np.full((n, w), NO_TS, dtype=np.int64)
    names = set(DEVICE_TYPES[device_type].metric_names) | set(extra or {})
    if device_type == "air_quality":
        names.add(VN_AQI_METRIC)
    values = {name: np.full((n, w), np.nan) for name in names}
    for i, row in enumerate(rows):
        for j, (t_s, x) in enumerate(row):
            col = w - len(row) + j
            ts[i, col] = NOW_MS + round(t_s * 1000)
            values[metric][i, col] = x
            for name, per_row in (extra or {}).items():
                values[name][i, col] = per_row[i][j]
    seen = last_seen_s if last_seen_s is not None else [None] * n
    return Window(
        device_type=device_type,
        device_ids=tuple(f"dev-{i}" for i in range(n)),
        site_ids=tuple(site_ids or ["site-a"] * n),
        districts=tuple(districts or ["Ba Đình"] * n),
        ts_ms=ts,
        values=values,
        last_seen_ms=np.array(
            [NO_TS if s is None else NOW_MS + round(s * 1000) for s in seen], dtype=np.int64
        ),
    )


def rule_of(
    condition: Condition,
    *,
    device_type: str = "conference_endpoint",
    severity: str = "minor",
    escalate: tuple[Escalation, ...] = (),
    **scope: tuple[str, ...],
) -> Rule:
    return Rule(
        rule_id="test-rule",
        name="test rule",
        device_type=device_type,
        severity=severity,
        condition=condition,
        escalate=escalate,
        **cast(dict[str, Any], scope),
    )


def run(
    rule: Rule, window: Window, was: bool | Sequence[bool] = False, now_ms: int = NOW_MS
) -> Outcome:
    """Evaluate, check the per-device reference agrees, return the vectorised outcome."""
    was_active = np.broadcast_to(np.asarray(was, dtype=np.bool_), (window.n_devices,)).copy()
    got = evaluate(rule, window, now_ms=now_ms, was_active=was_active)
    ref = evaluate_reference(rule, window, now_ms=now_ms, was_active=was_active)
    np.testing.assert_array_equal(got.active, ref.active)
    np.testing.assert_array_equal(got.severity, ref.severity)
    np.testing.assert_allclose(got.value, ref.value, rtol=1e-12, equal_nan=True)
    return got


def one(rule: Rule, row: Row, was: bool = False, **window_kw: object) -> tuple[bool, float, int]:
    out = run(rule, window_of([row], **window_kw), was)  # type: ignore[arg-type]
    return bool(out.active[0]), float(out.value[0]), int(out.severity[0])


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b)


# --- threshold -------------------------------------------------------------------------

HIGH_LOSS = rule_of(Threshold(metric="packet_loss", op=">", threshold=50, clear=40, for_s=300))


@pytest.mark.parametrize(
    ("row", "was", "active", "value"),
    [
        # Held above 50 from the anchor (-360 s) to now: fires with the lowest level held.
        ([(-360, 60), (-240, 70), (-120, 55), (0, 65)], False, True, 55),
        # The anchor (last sample at or before now - 300 s) was below: not yet 300 s above.
        ([(-360, 45), (-240, 70), (-120, 70), (0, 70)], False, False, 45),
        # A sample exactly at now - for_s is the anchor.
        ([(-300, 60), (0, 60)], False, True, 60),
        # Window boundary: 1 s before the start is the anchor, 1 s after is not.
        ([(-301, 60), (-299, 60)], False, True, 60),
        ([(-299, 60), (0, 60)], False, False, 60),
        # One sample: no anchor, so not held for 300 s yet.
        ([(0, 90)], False, False, 90),
        # Only an old sample: nothing in range, no alert (and no sample-and-hold to now).
        ([(-400, 90)], False, False, 90),
        # NaN gaps are skipped, not read as below the threshold.
        ([(-360, 60), (-240, NAN), (-120, NAN), (0, 70)], False, True, 60),
        # All NaN: no samples.
        ([(-360, NAN), (0, NAN)], False, False, NAN),
        ([], False, False, NAN),
        # A dip inside the span breaks it.
        ([(-360, 60), (-200, 49), (0, 60)], False, False, 49),
        # Equal to the threshold is not above it.
        ([(-360, 50), (0, 50)], False, False, 50),
        # A sample stamped after now is not read.
        ([(-360, 60), (0, 60), (60, 10)], False, True, 60),
        # Hysteresis: active, latest between clear (40) and threshold (50): holds.
        ([(-360, 45), (0, 45)], True, True, 45),
        ([(-360, 60), (0, 41)], True, True, 41),
        # At the clear level it no longer meets "> 40": clears.
        ([(-360, 60), (0, 40)], True, False, 40),
        ([(-360, 60), (-30, 20), (0, NAN)], True, False, 20),
        # Nothing in range decides nothing: an active alert stays active.
        ([(-400, 10)], True, True, 10),
        ([], True, True, NAN),
        # Raised again while active.
        ([(-360, 60), (0, 60)], True, True, 60),
    ],
)
def test_threshold(row, was, active, value):
    got_active, got_value, severity = one(HIGH_LOSS, row, was)
    assert got_active is active
    assert same(got_value, value)
    assert severity == (SEVERITIES.index("minor") if active else -1)


def test_threshold_below_with_hold_and_escalation():
    rule = rule_of(
        Threshold(metric="paper_level", op="<", threshold=10, clear=20, for_s=120),
        device_type="kiosk",
        severity="warning",
        escalate=(Escalation(severity="minor", threshold=3),),
    )
    kw: dict[str, Any] = {"device_type": "kiosk", "metric": "paper_level"}
    # For "<" the held level is the highest value in the span.
    assert one(rule, [(-200, 5), (-60, 9), (0, 8)], **kw) == (True, 9, SEVERITIES.index("warning"))
    assert one(rule, [(-200, 2), (0, 2.5)], **kw) == (True, 2.5, SEVERITIES.index("minor"))
    # Exactly at the escalation level is not below it.
    assert one(rule, [(-200, 3), (0, 3)], **kw)[2] == SEVERITIES.index("warning")
    # A new roll (100%) clears it; 15% holds it.
    assert one(rule, [(-200, 5), (0, 15)], was=True, **kw) == (True, 15, 3)
    assert one(rule, [(-200, 5), (0, 100)], was=True, **kw)[0] is False


def test_threshold_without_clear_clears_where_it_stops_meeting_the_threshold():
    rule = rule_of(Threshold(metric="packet_loss", op=">=", threshold=5, for_s=60))
    assert one(rule, [(-60, 5), (0, 5)])[0] is True
    assert one(rule, [(-60, 9), (0, 5)], was=True)[0] is True
    assert one(rule, [(-60, 9), (0, 4.9)], was=True)[0] is False


# --- rate of change --------------------------------------------------------------------

RISING = rule_of(
    RateOfChange(metric="cpu_temperature", op=">", threshold_per_min=1.0, window_s=600),
    device_type="kiosk",
)
KIOSK_CPU: dict[str, Any] = {"device_type": "kiosk", "metric": "cpu_temperature"}


@pytest.mark.parametrize(
    ("row", "was", "active", "value"),
    [
        ([(-600, 40), (0, 52)], False, True, 1.2),  # 12 degC in 10 min
        ([(-600, 40), (-300, 70), (0, 45)], False, False, 0.5),  # first to latest, not the peak
        # The sample 1 s before the window is out: 5 degC over 300 s is exactly 1.0.
        ([(-601, 0), (-300, 40), (0, 45)], False, False, 1.0),
        ([(0, 40)], False, False, NAN),  # one sample: no rate
        ([(0, 40)], True, True, NAN),  # ... and an active alert holds
        ([(0, 40), (0, 60)], False, False, NAN),  # two samples at the same time
        ([(-600, 40), (-300, NAN), (0, NAN)], False, False, NAN),
        ([(-600, 40), (-300, NAN), (0, 55)], False, True, 1.5),
        ([(-600, 40), (0, 41)], True, False, 0.1),  # computable and below: clears
        # First and latest only 10 s apart (under half the window): one step of
        # a noisy signal is not a slope, so nothing is decided either way.
        ([(-10, 40), (0, 44)], False, False, NAN),
        ([(-10, 40), (0, 40)], True, True, NAN),
        ([(-300, 40), (0, 52)], False, True, 2.4),  # exactly half the window: decided
    ],
)
def test_rate_of_change(row, was, active, value):
    got_active, got_value, _ = one(RISING, row, was, **KIOSK_CPU)
    assert got_active is active
    assert same(got_value, value)


def test_rate_of_change_falling():
    falling = rule_of(
        RateOfChange(metric="cpu_temperature", op="<", threshold_per_min=-1.0, window_s=600),
        device_type="kiosk",
    )
    assert one(falling, [(-300, 50), (0, 40)], **KIOSK_CPU)[:2] == (True, -2.0)
    assert one(falling, [(-300, 50), (0, 48)], **KIOSK_CPU)[0] is False


# --- flatline --------------------------------------------------------------------------

STUCK = rule_of(
    Flatline(metric="occupancy", window_s=600, min_samples=3), device_type="camera_counter"
)
CAMERA: dict[str, Any] = {"device_type": "camera_counter", "metric": "occupancy"}


@pytest.mark.parametrize(
    ("row", "was", "active", "value"),
    [
        ([(-500, 7), (-300, 7), (0, 7)], False, True, 0),  # all equal
        ([(-300, 7), (0, 7)], False, False, 0),  # fewer than min_samples
        ([(-300, 7), (0, 7)], True, True, 0),  # ... undecided: holds
        ([(-500, 7), (-300, 8), (0, 7)], False, False, 1),
        ([(-500, 7), (-300, 8), (0, 7)], True, False, 1),  # moved: clears
        ([(-500, 7), (-400, NAN), (-300, 7), (0, 7)], False, True, 0),  # gaps skipped
        ([(-700, 1), (-500, 7), (-300, 7), (0, 7)], False, True, 0),  # older one outside
        ([(-600, 1), (-500, 7), (-300, 7), (0, 7)], False, False, 6),  # boundary: inside
        ([(0, 7)], False, False, 0),  # one sample
        ([], False, False, NAN),
        ([], True, True, NAN),
    ],
)
def test_flatline(row, was, active, value):
    got_active, got_value, _ = one(STUCK, row, was, **CAMERA)
    assert got_active is active
    assert same(got_value, value)


def test_flatline_tolerance():
    rule = rule_of(
        Flatline(metric="occupancy", window_s=600, min_samples=3, tolerance=0.5),
        device_type="camera_counter",
    )
    assert one(rule, [(-500, 7), (-300, 7.4), (0, 7.1)], **CAMERA)[0] is True
    assert one(rule, [(-500, 7), (-300, 7.6), (0, 7.1)], **CAMERA)[0] is False


# --- no data ---------------------------------------------------------------------------

SILENT = rule_of(
    NoData(silence_s=600),
    escalate=(Escalation(severity="major", threshold=3600),),
)


@pytest.mark.parametrize(
    ("row", "last_seen_s", "was", "active", "value", "severity"),
    [
        ([], -600, False, False, 600, -1),  # exactly T: not longer than T
        ([], -600.001, False, True, 600.001, SEVERITIES.index("minor")),
        ([], -3601, False, True, 3601, SEVERITIES.index("major")),
        ([(-10, NAN)], -1000, False, False, 10, -1),  # a newer sample in the window counts
        ([(-700, 1)], None, False, True, 700, SEVERITIES.index("minor")),
        ([], None, False, False, NAN, -1),  # never seen: not offline
        ([], None, True, True, NAN, SEVERITIES.index("minor")),  # ... and decides nothing
        ([(30, 1)], None, False, False, NAN, -1),  # only a sample from the future
        ([], -5, True, False, 5, -1),  # back: clears
    ],
)
def test_no_data(row, last_seen_s, was, active, value, severity):
    got = one(SILENT, row, was, last_seen_s=[last_seen_s])
    assert got[0] is active
    assert same(got[1], value)
    assert got[2] == severity


# --- z-score ---------------------------------------------------------------------------

SPIKE = rule_of(
    ZScore(metric="pm25", op=">", threshold=3, window_s=3600, min_samples=5),
    device_type="air_quality",
)
AIR: dict[str, Any] = {"device_type": "air_quality", "metric": "pm25"}
BASELINE = [(-3000, 10), (-2400, 11), (-1800, 9), (-1200, 10), (-600, 10)]  # mean 10, s 0.707


@pytest.mark.parametrize(
    ("row", "was", "active", "value"),
    [
        ([*BASELINE, (0, 20)], False, True, 10 / math.sqrt(0.5)),
        ([*BASELINE, (0, 10)], False, False, 0.0),
        ([*BASELINE, (0, 12)], False, False, 2 / math.sqrt(0.5)),  # z 2.83 < 3
        ([*BASELINE, (0, 12.2)], False, True, 2.2 / math.sqrt(0.5)),
        ([*BASELINE[1:], (0, 20)], False, False, NAN),  # 4 baseline samples < 5
        ([*BASELINE[1:], (0, 20)], True, True, NAN),
        ([(-3700, 0), *BASELINE[1:], (0, 20)], False, False, NAN),  # one is outside the hour
        ([*BASELINE, (-300, NAN), (0, 20)], False, True, 10 / math.sqrt(0.5)),
        # A flat baseline has no spread: no z (see min_std below).
        ([(t, 10) for t, _ in BASELINE] + [(0, 20)], False, False, NAN),
        ([*BASELINE, (0, 11)], True, False, 1 / math.sqrt(0.5)),  # computable, below: clears
    ],
)
def test_zscore(row, was, active, value):
    got_active, got_value, _ = one(SPIKE, row, was, **AIR)
    assert got_active is active
    assert same(got_value, value)


def test_zscore_min_std_and_drops():
    floor = rule_of(
        ZScore(metric="pm25", op=">", threshold=3, window_s=3600, min_samples=5, min_std=2),
        device_type="air_quality",
    )
    flat = [(t, 10.0) for t, _ in BASELINE]
    assert one(floor, [*flat, (0, 20)], **AIR)[:2] == (True, 5.0)
    assert one(floor, [*flat, (0, 15)], **AIR)[:2] == (False, 2.5)
    drop = rule_of(
        ZScore(metric="pm25", op="<", threshold=-3, window_s=3600, min_samples=5),
        device_type="air_quality",
    )
    assert one(drop, [*BASELINE, (0, 5)], **AIR)[0] is True
    assert one(drop, [*BASELINE, (0, 20)], **AIR)[0] is False


# --- AQI band --------------------------------------------------------------------------

AQI_BAD = rule_of(
    AqiBand(band="bad", max_age_s=7200),
    device_type="air_quality",
    severity="warning",
    escalate=(
        Escalation(severity="major", band="very_bad"),
        Escalation(severity="critical", band="hazardous"),
    ),
)
AQI: dict[str, Any] = {"device_type": "air_quality", "metric": VN_AQI_METRIC}


@pytest.mark.parametrize(
    ("row", "was", "active", "value", "severity"),
    [
        ([(-60, 150)], False, False, 150, -1),  # top of "Kém"
        ([(-60, 151)], False, True, 151, "warning"),  # "Xấu"
        ([(-60, 200)], False, True, 200, "warning"),
        ([(-60, 201)], False, True, 201, "major"),  # "Rất xấu"
        ([(-60, 301)], False, True, 301, "critical"),  # "Nguy hại"
        ([(-3600, 301), (-60, 120)], False, False, 120, -1),  # the latest counts
        ([(-7200, 180)], False, True, 180, "warning"),  # at max_age: still in range
        ([(-7201, 180)], False, False, NAN, -1),  # older: stale
        ([(-7201, 180)], True, True, NAN, "warning"),  # stale decides nothing
        ([(-60, 140)], True, False, 140, -1),
    ],
)
def test_aqi_band(row, was, active, value, severity):
    got = one(AQI_BAD, row, was, **AQI)
    assert got[0] is active
    assert same(got[1], value)
    assert got[2] == (severity if severity == -1 else SEVERITIES.index(severity))


def test_aqi_band_without_aqi_in_the_window_never_fires():
    window = window_of([[(-60, 30)]], device_type="air_quality", metric="pm25")
    values = {k: v for k, v in window.values.items() if k != VN_AQI_METRIC}
    bare = Window(
        device_type=window.device_type,
        device_ids=window.device_ids,
        site_ids=window.site_ids,
        districts=window.districts,
        ts_ms=window.ts_ms,
        values=values,
        last_seen_ms=window.last_seen_ms,
    )
    assert not run(AQI_BAD, bare).active.any()


# --- any_of / all_of -------------------------------------------------------------------

ENDPOINT_DOWN = rule_of(
    AnyOf(
        conditions=(
            NoData(silence_s=600),
            Threshold(metric="online", op="<", threshold=1, for_s=300),
        )
    ),
    severity="major",
)


def test_any_of_takes_the_first_child_that_is_on():
    window = window_of(
        [
            [(-900, 1)],  # silent 900 s
            [(-400, 0), (-200, 0), (0, 0)],  # unregistered for 5 min
            [(-400, 1), (0, 1)],  # fine
            [(-400, 0), (0, 1)],  # registered again
        ],
        metric="online",
        last_seen_s=[-900, 0, 0, 0],
    )
    out = run(ENDPOINT_DOWN, window)
    assert out.active.tolist() == [True, True, False, False]
    # The silence (s) from no_data; the online flag from the threshold; when
    # none is on, the first child's value (the silence, 0 s).
    assert out.value.tolist() == [900.0, 0.0, 0.0, 0.0]
    assert out.severity.tolist() == [SEVERITIES.index("major")] * 2 + [-1, -1]


def test_any_of_holds_until_every_child_clears():
    rule = rule_of(
        AnyOf(
            conditions=(
                Threshold(metric="packet_loss", op=">", threshold=5, clear=2, for_s=60),
                Threshold(metric="jitter", op=">", threshold=100, clear=50, for_s=60),
            )
        )
    )
    rows = [[(-60, 3), (0, 3)], [(-60, 1), (0, 1)], [(-60, 1), (0, 1)]]
    jitter = [[10, 10], [70, 70], [10, 10]]
    window = window_of(rows, extra={"jitter": jitter})
    # Loss in its hold band; jitter in its hold band; both cleared.
    assert run(rule, window, was=True).active.tolist() == [True, True, False]
    assert run(rule, window, was=False).active.tolist() == [False, False, False]


CAMERA_STUCK = rule_of(
    AllOf(
        conditions=(
            Flatline(metric="occupancy", window_s=600, min_samples=3),
            Threshold(metric="occupancy", op=">", threshold=0, for_s=600),
        )
    ),
    device_type="camera_counter",
)


def test_all_of_needs_every_child_and_reports_the_one_that_blocks():
    window = window_of(
        [
            [(-700, 12), (-400, 12), (-200, 12), (0, 12)],  # stuck at 12
            [(-700, 0), (-400, 0), (-200, 0), (0, 0)],  # a closed hall: 0 is a real count
            [(-700, 12), (-400, 13), (-200, 12), (0, 12)],  # moving
        ],
        **CAMERA,
    )
    out = run(CAMERA_STUCK, window)
    assert out.active.tolist() == [True, False, False]
    # On: the first child's value (spread 0); off: the first child that is
    # off (the threshold's held level 0; the flatline's spread 1).
    assert out.value.tolist() == [0.0, 0.0, 1.0]


def test_all_of_clears_when_one_child_clears():
    window = window_of([[(-700, 12), (-400, 12), (-200, 12), (0, 13)]], **CAMERA)
    assert not run(CAMERA_STUCK, window, was=True).active[0]
    # Too few samples for the flatline and none below the threshold: holds.
    window = window_of([[(-700, 12), (0, 12)]], **CAMERA)
    assert run(CAMERA_STUCK, window, was=True).active[0]


# --- scope -----------------------------------------------------------------------------


def test_scope_limits_the_devices_and_blanks_the_rest():
    rows = [[(-360, 60), (0, 60)]] * 4
    window = window_of(
        rows,
        site_ids=["site-a", "site-b", "site-a", "site-c"],
        districts=["Ba Đình", "Ba Đình", "Cầu Giấy", "Cầu Giấy"],
    )
    cond = HIGH_LOSS.condition
    by_site = rule_of(cond, sites=("site-a",))
    by_district = rule_of(cond, districts=("Cầu Giấy",))
    by_both = rule_of(cond, sites=("site-a", "site-b"), districts=("Ba Đình",))
    by_device = rule_of(cond, device_ids=("dev-3",))
    assert scope_mask(by_site, window).tolist() == [True, False, True, False]
    assert scope_mask(by_district, window).tolist() == [False, False, True, True]
    assert scope_mask(by_both, window).tolist() == [True, True, False, False]
    assert scope_mask(by_device, window).tolist() == [False, False, False, True]
    out = run(by_site, window, was=[True, True, False, False])
    assert out.active.tolist() == [True, False, True, False]
    assert out.value.tolist()[0] == 60
    assert math.isnan(out.value[1])
    assert math.isnan(out.value[3])
    assert out.severity.tolist() == [2, -1, 2, -1]
    nobody = rule_of(cond, sites=("site-z",))
    assert not run(nobody, window).active.any()


def test_scope_mask_refuses_a_window_of_another_type():
    window = window_of([[(0, 1)]])
    with pytest.raises(ValueError, match="kiosk"):
        scope_mask(rule_of(NoData(silence_s=60), device_type="kiosk"), window)


def test_window_checks_shapes():
    window = window_of([[(0, 1)]])
    with pytest.raises(ValueError, match="ts_ms"):
        Window(
            device_type="conference_endpoint",
            device_ids=("a", "b"),
            site_ids=("s", "s"),
            districts=("d", "d"),
            ts_ms=window.ts_ms,
            values=window.values,
            last_seen_ms=np.array([NO_TS, NO_TS], dtype=np.int64),
        )
    with pytest.raises(ValueError, match="at least one column"):
        Window(
            device_type="conference_endpoint",
            device_ids=("a",),
            site_ids=("s",),
            districts=("d",),
            ts_ms=np.zeros((1, 0), dtype=np.int64),
            values={},
            last_seen_ms=np.array([NO_TS], dtype=np.int64),
        )
    with pytest.raises(ValueError, match="was_active"):
        evaluate(HIGH_LOSS, window, now_ms=NOW_MS, was_active=np.zeros(3, dtype=bool))


# --- evaluate_all and the shipped defaults ---------------------------------------------


def test_evaluate_all_matches_evaluate_rule_by_rule():
    rules = (
        HIGH_LOSS,
        Rule(
            rule_id="loss-site-b",
            name="b",
            device_type="conference_endpoint",
            severity="major",
            condition=HIGH_LOSS.condition,
            sites=("site-b",),
        ),
        rule_of(NoData(silence_s=60), device_type="kiosk"),  # no kiosk window: left out
    )
    window = window_of(
        [[(-360, 60), (0, 60)], [(-360, 45), (0, 45)]], site_ids=["site-a", "site-b"]
    )
    was = {"loss-site-b": np.array([False, True])}
    outcomes = evaluate_all(rules, {"conference_endpoint": window}, NOW_MS, was)
    assert set(outcomes) == {"test-rule", "loss-site-b"}
    assert outcomes["test-rule"].active.tolist() == [True, False]
    assert outcomes["loss-site-b"].active.tolist() == [False, True]
    assert outcomes["loss-site-b"].severity.tolist() == [-1, SEVERITIES.index("major")]


def defaults() -> dict[str, Rule]:
    return {rule.rule_id: rule for rule in load_rules()}


@pytest.mark.parametrize(
    ("rule_id", "metric", "row", "severity"),
    [
        # printer_status 3 = jam for two minutes: citizens get no ticket.
        ("kiosk-printer-fault", "printer_status", [(-120, 3), (-60, 3), (0, 3)], "major"),
        ("kiosk-printer-fault", "printer_status", [(-120, 1), (-60, 1), (0, 1)], None),
        ("kiosk-paper-low", "paper_level", [(-180, 8), (0, 7)], "warning"),
        ("kiosk-paper-low", "paper_level", [(-180, 2), (0, 1)], "minor"),
        ("kiosk-queue-long", "queue_length", [(-960, 45), (-400, 60), (0, 50)], "minor"),
        ("kiosk-queue-long", "queue_length", [(-960, 90), (0, 85)], "major"),
        ("kiosk-queue-long", "queue_length", [(-600, 90), (0, 85)], None),  # not 15 min yet
        ("aq-pm25-high", "pm25", [(-1900, 300), (-900, 280), (0, 260)], "critical"),
        ("aq-pm25-high", "pm25", [(-1900, 90), (-900, 160), (0, 95)], "warning"),
        ("aq-vn-aqi-band", VN_AQI_METRIC, [(-60, 220)], "major"),
        ("aq-vn-aqi-band", VN_AQI_METRIC, [(-60, 120)], None),
        ("conference-packet-loss", "packet_loss", [(-300, 20), (0, 16)], "major"),
        ("noise-laeq-high", "laeq", [(-1900, 82), (-900, 81), (0, 83)], "warning"),
        ("noise-laeq-high", "laeq", [(-1900, 88), (-900, 87), (0, 86)], "minor"),
        ("noise-laeq-high", "laeq", [(-1900, 82), (-900, 77), (0, 83)], None),  # rush hour dip
        ("water-street-flooded", "water_depth", [(-360, 25), (-120, 30), (0, 28)], "warning"),
        ("water-street-flooded", "water_depth", [(-360, 60), (0, 55)], "major"),
        ("water-street-flooded", "water_depth", [(-360, 95), (0, 90)], "critical"),
        ("water-street-flooded", "water_depth", [(-360, 0), (-60, 0), (0, 0)], None),
        ("water-street-flooded", "water_depth", [(-120, 40), (0, 45)], None),  # not 5 min yet
        ("rating-not-satisfied", "rating", [(-2000, 2), (-900, 2), (0, 2)], "warning"),
        ("rating-not-satisfied", "rating", [(-2000, 2), (-900, 1), (0, 2)], None),
    ],
)
def test_default_rules(rule_id, metric, row, severity):
    rule = defaults()[rule_id]
    out = run(rule, window_of([row], device_type=rule.device_type, metric=metric))
    assert bool(out.active[0]) is (severity is not None)
    assert int(out.severity[0]) == (-1 if severity is None else SEVERITIES.index(severity))


def test_default_rating_rule_skips_readings_without_a_rating():
    # A terminal reports its counter every period; only some readings carry
    # a rating. The rule looks at the ratings alone.
    rule = defaults()["rating-not-satisfied"]
    minutes = range(-40, 1, 5)
    ratings = [2.0 if m in {-40, -20, 0} else NAN for m in minutes]
    window = window_of(
        [[(m * 60, r) for m, r in zip(minutes, ratings, strict=True)]],
        device_type="satisfaction_terminal",
        metric="rating",
    )
    assert run(rule, window).active.tolist() == [True]
    ratings[4] = 0.0  # one "very satisfied" in between (minute -20)
    window = window_of(
        [[(m * 60, r) for m, r in zip(minutes, ratings, strict=True)]],
        device_type="satisfaction_terminal",
        metric="rating",
    )
    assert run(rule, window).active.tolist() == [False]


def test_default_water_rule_clears_only_below_10_cm():
    rule = defaults()["water-street-flooded"]
    row = [(-360, 25), (-120, 15), (0, 12)]
    window = window_of([row], device_type="water_level", metric="water_depth")
    assert run(rule, window).active.tolist() == [False]
    still = run(rule, window, was=True)
    assert still.active.tolist() == [True]


def test_default_camera_rule_ignores_an_empty_hall_but_not_a_stuck_street():
    rule = defaults()["camera-counter-stuck"]
    minutes = range(-60, 1, 2)
    hall_night = [(m * 60, 0.0) for m in minutes]
    street_stuck = [(m * 60, 37.0) for m in minutes]
    window = window_of(
        [hall_night, street_stuck, street_stuck],
        device_type="camera_counter",
        metric="occupancy",
        extra={"vehicles_in": [[NAN] * 31, [NAN] * 31, [37.0] * 31]},
    )
    # Row 1 has occupancy stuck at 37 for an hour; row 2 also its vehicles.
    assert run(rule, window).active.tolist() == [False, True, True]


SAMPLE_PLACE = {
    "device_id": "dev-01",
    "site_id": "hoan-kiem-hall",
    "district": "Quận Hoàn Kiếm",
    "site_name": "Trung tâm Phục vụ hành chính công Hoàn Kiếm",
    "ward": "Phường Hoàn Kiếm",
}
TEXT_FIELDS = ("summary_vi", "summary_en", "description_vi", "description_en")


def test_render_message_is_the_bilingual_summary():
    rule = defaults()["aq-pm25-high"]
    text = render_message(
        rule,
        device_id="aq-hk-01",
        site_id="hoan-kiem-ward",
        district="Hoàn Kiếm",
        value=162.4,
        severity="major",
    )
    # No site name known: the id stands in for it.
    assert text == (
        "Bụi mịn PM2.5 cao: 162 µg/m³ tại hoan-kiem-ward / PM2.5 high: 162 ug/m3 at hoan-kiem-ward"
    )


@pytest.mark.parametrize("rule_id", sorted(defaults()))
def test_every_shipped_rule_has_both_texts_and_they_render(rule_id):
    rule = defaults()[rule_id]
    for key in TEXT_FIELDS:
        assert getattr(rule, key), f"{rule_id} has no {key}"
    assert rule.message is None  # the shipped file uses the new keys only
    texts = render_texts(rule, value=47.25, severity="major", **SAMPLE_PLACE)
    for key in TEXT_FIELDS:
        rendered = getattr(texts, key)
        assert "{" not in rendered
        assert "}" not in rendered
    assert texts.summary == f"{texts.summary_vi} / {texts.summary_en}"
    assert texts.description == f"{texts.description_vi} / {texts.description_en}"
    # Vietnamese text is Vietnamese: it differs from the English and has diacritics.
    assert texts.summary_vi != texts.summary_en
    assert any(ord(c) > 127 for c in texts.summary_vi + texts.description_vi)
    # The description gives the context: where (site name and ward) and which device.
    for text in (texts.description_vi, texts.description_en):
        assert SAMPLE_PLACE["site_name"] in text
        assert SAMPLE_PLACE["ward"] in text
        assert SAMPLE_PLACE["device_id"] in text


def test_queue_rule_texts():
    texts = render_texts(
        defaults()["kiosk-queue-long"], value=52.0, severity="minor", **SAMPLE_PLACE
    )
    assert texts.summary_vi == (
        "Hàng chờ dài: 52 người đang chờ tại Trung tâm Phục vụ hành chính công Hoàn Kiếm"
    )
    assert texts.summary_en == (
        "Long queue: 52 citizens waiting at Trung tâm Phục vụ hành chính công Hoàn Kiếm"
    )


def test_a_rule_with_only_message_gets_a_generic_vietnamese_text(tmp_path):
    path = tmp_path / "old.toml"
    path.write_text(
        """
[[rule]]
rule_id = "old-loss"
name = "Loss"
device_type = "conference_endpoint"
severity = "minor"
message = "Loss {value:.1f}% on {device_id} ({district})"
condition = { kind = "threshold", metric = "packet_loss", op = ">", threshold = 5, for_s = 60 }
""",
        encoding="utf-8",
    )
    (rule,) = load_rules([path], include_defaults=False)
    texts = render_texts(rule, value=7.0, severity="major", **SAMPLE_PLACE)
    assert texts.summary_en == "Loss 7.0% on dev-01 (Quận Hoàn Kiếm)"
    # Generic Vietnamese from the severity (at raise or escalation) and the device type.
    assert texts.summary_vi == (
        "Cao: Loss (thiết bị hội nghị truyền hình dev-01 tại "
        "Trung tâm Phục vụ hành chính công Hoàn Kiếm)"
    )
    assert rendered_severity_words(texts.summary_vi) == {"Cao"}
    assert "Phường Hoàn Kiếm" in texts.description_vi
    assert "severity Major" in texts.description_en
    assert render_texts(rule, value=7.0, severity="minor", **SAMPLE_PLACE).summary_vi.startswith(
        "Trung bình: "
    )


def rendered_severity_words(text: str) -> set[str]:
    return {n.vi for n in SEVERITY_NAMES.values() if n.vi in text}


def test_unknown_site_name_and_ward_fall_back_to_the_id_and_former_district():
    rule = defaults()["water-street-flooded"]
    texts = render_texts(
        rule,
        device_id="wl-01",
        site_id="o-cho-dua",
        district="Đống Đa",
        value=31,
        severity="warning",
    )
    assert texts.summary_en == "Street flooded: 31 cm of water at o-cho-dua"
    assert "o-cho-dua (Đống Đa)" in texts.description_vi
