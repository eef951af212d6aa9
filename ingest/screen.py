"""The suspect-row screen of a reading block, column by column in numpy.

``screen_block`` finds the rows of a block that *may* be bad, the same rows
``contracts.messages.check_sound_block_rows`` screens in pure Python: seq
outside [0, SEQ_MAX], ``ts_ms`` or ``recv_ms`` outside the time window, a
value outside its metric's range (NaN and infinities included), not whole
for an integer metric, or a row with no value at all. Only those rows then go
through ``contracts.messages.check_rows`` for the exact error, so both paths
give the same report. It also hands back the columns as numpy arrays (NaN for
a missing value) so that building the rows converts each column once.

A column numpy cannot hold exactly (an integer beyond int64 in ``seq`` or a
time column, a value too large for a float, anything but a number) is
screened row by row in Python instead, as contracts does; such a column then
comes back as None. ``contracts`` may not import numpy, hence this module.

Pure: the block, its device type and the window come in, arrays go out.
"""

from __future__ import annotations

import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray

from contracts.catalog import DeviceType, Metric, MetricKind
from contracts.messages import SEQ_MAX, ReadingBlock

# A float64 holds every integer up to 2**53 exactly: with metric bounds
# inside that, comparing a value's float64 with a bound gives the same answer
# as comparing the Python number (int or float) with it.
_EXACT_FLOAT_LIMIT: Final = 2.0**53


@dataclass(frozen=True, slots=True)
class Screened:
    """The suspect rows of a block (sorted) and its columns, where numpy holds them exactly."""

    suspects: NDArray[np.intp]
    seq: NDArray[np.int64] | None
    ts_ms: NDArray[np.int64] | None
    recv_ms: NDArray[np.int64] | None
    values: dict[str, NDArray[np.float64] | None]  # the block's metrics; NaN = no value


def _int_column(column: Sequence[int]) -> NDArray[np.int64] | None:
    """``column`` as int64, or None if some entry is not an integer that int64 holds."""
    try:
        # array's "q" refuses floats, where numpy would truncate them.
        packed = array.array("q", column)
    except (OverflowError, TypeError):
        return None
    return np.frombuffer(packed, dtype=np.int64) if packed else np.zeros(0, dtype=np.int64)


def _float_column(column: Sequence[float | None]) -> NDArray[np.float64] | None:
    """``column`` as float64 with None as NaN, or None if numpy cannot convert it."""
    try:
        array = np.asarray(column, dtype=np.float64)
    except (OverflowError, TypeError, ValueError):
        return None
    return array if array.ndim == 1 else None


def _outside(
    array: NDArray[np.int64] | None, column: Sequence[int], low: int, high: int
) -> NDArray[np.bool_]:
    if array is not None:
        return (array < low) | (array > high)
    return np.fromiter((not low <= v <= high for v in column), dtype=np.bool_, count=len(column))


def _exact_bounds(metric: Metric) -> bool:
    return abs(metric.min) < _EXACT_FLOAT_LIMIT and abs(metric.max) < _EXACT_FLOAT_LIMIT


def _bad_values(
    metric: Metric, array: NDArray[np.float64], column: Sequence[float | None]
) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """(rows whose value is out of range, NaN or not whole; rows with no value)."""
    nan = np.isnan(array)
    missing = np.zeros(len(array), dtype=np.bool_)
    if nan.any():
        # NaN in the array is a None or a NaN reading: only Python tells which.
        rows = np.flatnonzero(nan)
        missing[rows] = np.fromiter(
            (column[row] is None for row in rows.tolist()), dtype=np.bool_, count=len(rows)
        )
    # Comparisons with NaN are False without a warning: NaN lands in `bad`.
    bad = ~((array >= metric.min) & (array <= metric.max))
    if metric.kind is not MetricKind.FLOAT:
        bad |= array != np.trunc(array)
    bad &= ~missing
    return bad, missing


def _bad_values_python(
    metric: Metric, column: Sequence[float | None]
) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    low, high = metric.min, metric.max
    whole = metric.kind is not MetricKind.FLOAT
    count = len(column)
    bad = np.fromiter(
        (v is not None and (not low <= v <= high or (whole and v != int(v))) for v in column),
        dtype=np.bool_,
        count=count,
    )
    missing = np.fromiter((v is None for v in column), dtype=np.bool_, count=count)
    return bad, missing


def screen_block(
    block: ReadingBlock, dtype: DeviceType, *, earliest_ms: int, latest_ms: int
) -> Screened:
    """The rows of a sound block that may be bad, and its columns as arrays.

    The block's shape must have passed ``contracts.messages.check_batch``;
    ``earliest_ms`` and ``latest_ms`` bound ``ts_ms`` and ``recv_ms`` (both
    included). A superset of the bad rows: ``contracts.messages.check_rows``
    names each one's error, or finds none.
    """
    count = block.row_count
    seq = _int_column(block.seq)
    ts = _int_column(block.ts_ms)
    recv = _int_column(block.recv_ms)
    suspect = _outside(seq, block.seq, 0, SEQ_MAX)
    suspect |= _outside(ts, block.ts_ms, earliest_ms, latest_ms)
    suspect |= _outside(recv, block.recv_ms, earliest_ms, latest_ms)
    empty = np.ones(count, dtype=np.bool_)
    values: dict[str, NDArray[np.float64] | None] = {}
    for name, column in block.values.items():
        metric = dtype.metric(name)
        array = _float_column(column)
        if array is not None and _exact_bounds(metric):
            bad, missing = _bad_values(metric, array, column)
        else:
            bad, missing = _bad_values_python(metric, column)
        values[name] = array
        suspect |= bad
        empty &= missing
    suspect |= empty  # no value at all (every row, if the block has no metric column)
    return Screened(
        suspects=np.flatnonzero(suspect), seq=seq, ts_ms=ts, recv_ms=recv, values=values
    )
