"""The numpy suspect-row screen against contracts' pure-Python check of the same blocks.

``ingest.screen.screen_block`` picks the rows that ``contracts.messages.check_rows``
then checks one by one; together they must give exactly the report of
``check_sound_block_rows`` (which the gateway and other callers keep using),
on any block: NaN, infinities, None, bools, integers beyond int64 or float,
times outside the window, rows with no value.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from contracts.catalog import DEVICE_TYPES, DeviceType, Metric
from contracts.errors import InputError
from contracts.messages import SEQ_MAX, ReadingBlock, check_rows, check_sound_block_rows
from ingest.screen import screen_block

NOW_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
PAST_MS = 30 * 86_400_000
FUTURE_MS = 300_000
EARLIEST_MS = NOW_MS - PAST_MS
LATEST_MS = NOW_MS + FUTURE_MS


def edges(metric: Metric) -> list[float]:
    """Values at and just past a metric's bounds, and halves for integer kinds."""
    low, high = metric.min, metric.max
    return [
        low,
        high,
        math.nextafter(low, -math.inf),
        math.nextafter(high, math.inf),
        (low + high) / 2,
        low + 0.5,
        high - 0.5,
    ]


def value_strategy(metric: Metric) -> st.SearchStrategy[object]:
    return st.one_of(
        st.none(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.floats(metric.min, metric.max),
        st.sampled_from(edges(metric)),
        st.booleans(),
        st.integers(int(metric.min) - 2, int(metric.max) + 2),
        st.integers(-(2**70), 2**70),  # beyond int64, within a float
    )


def time_strategy() -> st.SearchStrategy[int]:
    return st.one_of(
        st.integers(EARLIEST_MS - 2, EARLIEST_MS + 2),
        st.integers(LATEST_MS - 2, LATEST_MS + 2),
        st.integers(EARLIEST_MS, LATEST_MS),
        st.integers(0, 10**11),  # seconds, or a clock never set
        st.integers(-(2**64), 2**64),
        st.booleans(),
    )


@st.composite
def blocks(draw: st.DrawFn) -> tuple[ReadingBlock, DeviceType]:
    dtype = DEVICE_TYPES[draw(st.sampled_from(sorted(DEVICE_TYPES)))]
    rows = draw(st.integers(0, 16))
    metrics = draw(st.sets(st.sampled_from(dtype.metric_names), max_size=4))
    # Most columns well behaved, so that the numpy path (not only the fallback) is tested.
    sane = draw(st.booleans())
    # Sane columns still reach the bounds exactly.
    seq = st.one_of(st.integers(0, 1000), st.sampled_from([0, SEQ_MAX]))
    times = st.one_of(
        st.integers(EARLIEST_MS, LATEST_MS), st.sampled_from([EARLIEST_MS, LATEST_MS])
    )
    if not sane:
        seq = st.one_of(seq, st.integers(-5, 5), st.integers(SEQ_MAX - 2, SEQ_MAX + 2))
        seq = st.one_of(seq, st.booleans())
        times = time_strategy()
    values: dict[str, list[float | None]] = {}
    for name in sorted(metrics):
        metric = dtype.metric(name)
        column = (
            st.one_of(st.none(), st.floats(metric.min, metric.max), st.sampled_from(edges(metric)))
            if sane
            else value_strategy(metric)
        )
        values[name] = draw(st.lists(column, min_size=rows, max_size=rows))  # type: ignore[arg-type]
    block = ReadingBlock(
        device_type=dtype.name,
        device_index=[0] * rows,
        seq=draw(st.lists(seq, min_size=rows, max_size=rows)),
        ts_ms=draw(st.lists(times, min_size=rows, max_size=rows)),
        recv_ms=draw(st.lists(times, min_size=rows, max_size=rows)),
        values=values,
    )
    return block, dtype


def may_be_bad(block: ReadingBlock, dtype: DeviceType, row: int) -> bool:
    """The screen's definition, row by row: what it must flag, and nothing more."""
    if not 0 <= block.seq[row] <= SEQ_MAX:
        return True
    if not all(EARLIEST_MS <= t[row] <= LATEST_MS for t in (block.ts_ms, block.recv_ms)):
        return True
    present = [(dtype.metric(n), v) for n, c in block.values.items() if (v := c[row]) is not None]
    return not present or any(
        not m.min <= v <= m.max or (m.kind != "float" and v != int(v)) for m, v in present
    )


def outcome(call: object) -> object:
    """A report as comparable tuples, or the type of what the call raised."""
    try:
        report = call()  # type: ignore[operator]
    except Exception as exc:  # noqa: BLE001 - both paths must fail alike
        return type(exc)
    return [(row, type(error), str(error), error.reason) for row, error in report]


def screened_report(block: ReadingBlock, dtype: DeviceType) -> list[tuple[int, InputError]]:
    suspects = screen_block(block, dtype, earliest_ms=EARLIEST_MS, latest_ms=LATEST_MS).suspects
    assert list(suspects) == sorted(set(suspects.tolist()))
    return check_rows(
        block,
        dtype,
        suspects.tolist(),
        now_ms=NOW_MS,
        max_past_ms=PAST_MS,
        max_future_ms=FUTURE_MS,
    )


@given(blocks())
def test_screen_and_check_rows_report_what_the_pure_python_check_reports(case):
    block, dtype = case
    expected = outcome(
        lambda: check_sound_block_rows(
            block, dtype, now_ms=NOW_MS, max_past_ms=PAST_MS, max_future_ms=FUTURE_MS
        )
    )
    assert outcome(lambda: screened_report(block, dtype)) == expected


@given(blocks())
def test_the_screen_flags_exactly_the_rows_that_may_be_bad(case):
    block, dtype = case
    suspects = screen_block(block, dtype, earliest_ms=EARLIEST_MS, latest_ms=LATEST_MS).suspects
    expected = [row for row in range(block.row_count) if may_be_bad(block, dtype, row)]
    assert suspects.tolist() == expected


@given(blocks())
def test_screened_columns_hold_the_block_exactly_or_are_left_to_python(case):
    block, dtype = case
    screened = screen_block(block, dtype, earliest_ms=EARLIEST_MS, latest_ms=LATEST_MS)
    for array, column in (
        (screened.seq, block.seq),
        (screened.ts_ms, block.ts_ms),
        (screened.recv_ms, block.recv_ms),
    ):
        fits = all(-(2**63) <= v < 2**63 for v in column)
        assert (array is not None) == fits
        if array is not None:
            assert array.dtype == np.int64
            assert array.tolist() == [int(v) for v in column]
    for name, column in block.values.items():
        values = screened.values[name]
        if values is None:
            continue
        assert values.dtype == np.float64
        expected = [math.nan if v is None else float(v) for v in column]
        np.testing.assert_array_equal(values, np.array(expected, dtype=np.float64))


def test_every_row_of_a_block_without_metric_columns_is_suspect():
    dtype = DEVICE_TYPES["air_quality"]
    block = ReadingBlock(
        device_type=dtype.name,
        device_index=[0, 0],
        seq=[1, 2],
        ts_ms=[NOW_MS, NOW_MS],
        recv_ms=[NOW_MS, NOW_MS],
        values={},
    )
    screened = screen_block(block, dtype, earliest_ms=EARLIEST_MS, latest_ms=LATEST_MS)
    assert screened.suspects.tolist() == [0, 1]
    report = check_rows(block, dtype, screened.suspects.tolist(), now_ms=NOW_MS)
    assert [(row, error.reason) for row, error in report] == [
        (0, "wrong_type"),
        (1, "wrong_type"),
    ]
