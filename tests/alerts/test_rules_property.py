"""Property: the vectorised evaluation equals the per-device reference on random inputs.

Random rules (every condition kind, trees up to four leaves, escalation,
scopes) over random air-quality windows: NaN gaps, empty rows, samples on
and either side of every window boundary, samples after now, devices never
seen. Values are small whole numbers so that sums are exact in any order
and both implementations see the same floating-point inputs.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from alerts.evaluate import evaluate, evaluate_all
from alerts.reference import evaluate_reference
from alerts.rules import (
    BAND_NAMES,
    NO_TS,
    UPPER_OPS,
    VN_AQI_METRIC,
    AllOf,
    AnyOf,
    AqiBand,
    BandName,
    Condition,
    Escalation,
    Flatline,
    NoData,
    Op,
    RateOfChange,
    Rule,
    Threshold,
    Window,
    ZScore,
)
from contracts.schema import SEVERITIES

NOW_MS = 1_764_000_000_000
METRICS = ("pm25", "pm10")
OPS: tuple[Op, ...] = (">", ">=", "<", "<=")
SECONDS = st.integers(1, 12).map(float)
LEVELS = st.integers(0, 6).map(float)


@st.composite
def thresholds(draw: st.DrawFn) -> Threshold:
    op = draw(st.sampled_from(OPS))
    level = draw(LEVELS)
    clear = draw(st.none() | st.integers(0, 4).map(float))
    if clear is not None:
        clear = level - clear if op in UPPER_OPS else level + clear
    return Threshold(
        metric=draw(st.sampled_from(METRICS)),
        op=op,
        threshold=level,
        for_s=draw(SECONDS),
        clear=clear,
    )


LEAVES: st.SearchStrategy[Condition] = st.one_of(
    thresholds(),
    st.builds(
        RateOfChange,
        metric=st.sampled_from(METRICS),
        op=st.sampled_from(OPS),
        threshold_per_min=st.integers(-600, 600).map(float),
        window_s=SECONDS,
        min_span_s=st.none() | st.sampled_from([1.0, 3.0, 6.0]),
    ).filter(lambda c: c.min_span_s is None or c.min_span_s <= c.window_s),
    st.builds(
        Flatline,
        metric=st.sampled_from(METRICS),
        window_s=SECONDS,
        min_samples=st.integers(2, 5),
        tolerance=st.sampled_from([0.0, 1.0, 2.5]),
    ),
    st.builds(NoData, silence_s=SECONDS),
    st.builds(
        ZScore,
        metric=st.sampled_from(METRICS),
        op=st.sampled_from(OPS),
        threshold=st.integers(-3, 3).map(float),
        window_s=SECONDS,
        min_samples=st.integers(2, 4),
        min_std=st.sampled_from([0.0, 1.0]),
    ),
    st.builds(AqiBand, band=st.sampled_from(BAND_NAMES), max_age_s=SECONDS),
)

CONDITIONS: st.SearchStrategy[Condition] = st.recursive(
    LEAVES,
    lambda children: st.one_of(
        st.lists(children, min_size=1, max_size=3).map(lambda c: AnyOf(conditions=tuple(c))),
        st.lists(children, min_size=1, max_size=3).map(lambda c: AllOf(conditions=tuple(c))),
    ),
    max_leaves=4,
)


def _direction_and_base(cond: Condition) -> tuple[bool, float] | None:
    match cond:
        case Threshold() | ZScore():
            return cond.op in UPPER_OPS, cond.threshold
        case RateOfChange():
            return cond.op in UPPER_OPS, cond.threshold_per_min
        case NoData():
            return True, cond.silence
        case _:
            return None


@st.composite
def rules(draw: st.DrawFn, conditions: st.SearchStrategy[Condition] = CONDITIONS) -> Rule:
    cond = draw(conditions)
    escalate: tuple[Escalation, ...] = ()
    if isinstance(cond, AqiBand) and draw(st.booleans()):
        later: list[BandName] = [
            b for b in BAND_NAMES if BAND_NAMES.index(b) > BAND_NAMES.index(cond.band)
        ]
        escalate = tuple(
            Escalation(severity=sev, band=band)
            for sev, band in zip(("major", "critical"), later[:2], strict=False)
        )
    shape = _direction_and_base(cond)
    if shape is not None and draw(st.booleans()):
        upper, base = shape
        steps = draw(st.lists(st.integers(1, 4), min_size=1, max_size=2))
        levels, level = [], base
        for step in steps:
            level = level + step if upper else level - step
            levels.append(level)
        escalate = tuple(
            Escalation(severity=sev, threshold=lv)
            for sev, lv in zip(("major", "critical"), levels, strict=False)
        )
    return Rule(
        rule_id="prop",
        name="prop",
        device_type="air_quality",
        severity=draw(st.sampled_from(("minor", "warning"))),
        condition=cond,
        escalate=escalate,
        sites=draw(st.sampled_from([(), ("s1",), ("s1", "s2")])),
        districts=draw(st.sampled_from([(), ("Đống Đa",)])),
    )


VALUES = st.one_of(st.just(np.nan), st.integers(0, 7).map(float))
AQI_VALUES = st.sampled_from([np.nan, 0.0, 50.0, 51.0, 100.0, 150.0, 151.0, 201.0, 300.0, 301.0])


@st.composite
def windows(draw: st.DrawFn) -> tuple[Window, np.ndarray]:
    n = draw(st.integers(1, 10))
    w = draw(st.integers(1, 8))
    ts = np.full((n, w), NO_TS, dtype=np.int64)
    values = {m: np.full((n, w), np.nan) for m in (*METRICS, VN_AQI_METRIC)}
    for i in range(n):
        k = draw(st.integers(0, w))
        # Whole and half seconds from 15 s ago to 2 s ahead, strictly increasing:
        # durations of 1-12 s put boundaries exactly on samples often.
        offsets = sorted(draw(st.sets(st.integers(-30, 4), min_size=k, max_size=k)))
        for j, half_s in enumerate(offsets):
            col = w - k + j
            ts[i, col] = NOW_MS + half_s * 500
            for metric in METRICS:
                values[metric][i, col] = draw(VALUES)
            values[VN_AQI_METRIC][i, col] = draw(AQI_VALUES)
    last_seen = np.array(
        [
            draw(st.one_of(st.just(NO_TS), st.integers(-30, 2).map(lambda h: NOW_MS + h * 500)))
            for _ in range(n)
        ],
        dtype=np.int64,
    )
    window = Window(
        device_type="air_quality",
        device_ids=tuple(f"d{i}" for i in range(n)),
        site_ids=tuple(draw(st.sampled_from(["s1", "s2", "s3"])) for _ in range(n)),
        districts=tuple(draw(st.sampled_from(["Đống Đa", "Tây Hồ"])) for _ in range(n)),
        ts_ms=ts,
        values=values,
        last_seen_ms=last_seen,
    )
    was = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=np.bool_)
    return window, was


@settings(max_examples=400, deadline=None)
@given(rule=rules(LEAVES), case=windows())
def test_single_conditions_equal_reference(rule, case):
    check_against_reference(rule, *case)


@settings(max_examples=300, deadline=None)
@given(rule=rules(), case=windows())
def test_condition_trees_equal_reference(rule, case):
    check_against_reference(rule, *case)


def check_against_reference(rule: Rule, window: Window, was: np.ndarray) -> None:
    got = evaluate(rule, window, now_ms=NOW_MS, was_active=was)
    ref = evaluate_reference(rule, window, now_ms=NOW_MS, was_active=was)
    np.testing.assert_array_equal(got.active, ref.active)
    np.testing.assert_array_equal(got.severity, ref.severity)
    np.testing.assert_allclose(got.value, ref.value, rtol=1e-9, atol=1e-12, equal_nan=True)
    assert got.active.dtype == np.bool_
    assert got.value.dtype == np.float64
    assert got.severity.dtype == np.int8
    # Invariants of the interface, whatever the rule.
    assert ((got.severity >= 0) == got.active).all()
    assert (got.severity < len(SEVERITIES)).all()
    assert (got.severity[got.active] <= SEVERITIES.index(rule.severity)).all()


@settings(max_examples=100, deadline=None)
@given(rule_set=st.lists(rules(), min_size=1, max_size=4), case=windows())
def test_evaluate_all_equals_evaluate_one_by_one(rule_set, case):
    window, was = case
    named = [
        Rule(**{f: getattr(r, f) for f in r.__struct_fields__ if f != "rule_id"}, rule_id=f"r{i}")
        for i, r in enumerate(rule_set)
    ]
    outcomes = evaluate_all(named, {"air_quality": window}, NOW_MS, {"r0": was})
    for i, rule in enumerate(named):
        alone = evaluate(
            rule, window, now_ms=NOW_MS, was_active=was if i == 0 else np.zeros_like(was)
        )
        np.testing.assert_array_equal(outcomes[rule.rule_id].active, alone.active)
        np.testing.assert_array_equal(outcomes[rule.rule_id].severity, alone.severity)
        np.testing.assert_array_equal(outcomes[rule.rule_id].value, alone.value)
