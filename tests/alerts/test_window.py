"""Pure parts of the alerts job: the sample buffers, the evaluation clock, the AQI ring."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alerts.aqijob import SLOTS, HourlyMeans, daily_rows, hourly_rows
from alerts.store import parse_samples
from alerts.window import NO_TS, DeviceSet, SampleBuffer, Samples, evaluation_times
from contracts.errors import SchemaError

DEVICES = DeviceSet(("a", "b", "c"), ("s1", "s1", "s2"), ("Ba Đình", "Ba Đình", "Đống Đa"))


def samples(rows: list[tuple[int, int, float]]) -> Samples:
    return Samples(
        device_index=np.array([r[0] for r in rows], np.int64),
        ts_ms=np.array([r[1] for r in rows], np.int64),
        values={"x": np.array([r[2] for r in rows], np.float64)},
    )


def buffer(width: int = 4) -> SampleBuffer:
    b = SampleBuffer(device_type="kiosk", metrics=("x",), width=width)
    b.reindex(DEVICES)
    return b


def test_append_right_aligns_in_time_order_and_drops_old_rows():
    b = buffer()
    changed = b.append(samples([(0, 30, 3.0), (0, 10, 1.0), (1, 5, 9.0), (0, 20, 2.0)]))
    assert changed.tolist() == [0, 1]
    assert b.ts_ms.tolist() == [
        [NO_TS, 10, 20, 30],
        [NO_TS, NO_TS, NO_TS, 5],
        [NO_TS] * 4,
    ]
    # Three more for device 0: the oldest two fall off; a row not newer is dropped.
    b.append(samples([(0, 60, 6.0), (0, 40, 4.0), (0, 50, 5.0), (1, 5, 0.0)]))
    assert b.ts_ms[0].tolist() == [30, 40, 50, 60]
    assert b.values["x"][0].tolist() == [3.0, 4.0, 5.0, 6.0]
    assert b.values["x"][1, -1] == 9.0
    assert np.isnan(b.values["x"][2]).all()
    assert b.cursors.tolist() == [60, 5, NO_TS]


def test_more_new_rows_than_the_width_keeps_the_newest():
    b = buffer(width=2)
    b.append(samples([(2, t, float(t)) for t in range(1, 8)]))
    assert b.ts_ms[2].tolist() == [6, 7]
    assert b.values["x"][2].tolist() == [6.0, 7.0]


def test_reindex_keeps_rows_of_known_devices():
    b = buffer()
    b.append(samples([(0, 1, 1.0), (2, 2, 2.0)]))
    b.loaded[:] = True
    b.reindex(DeviceSet(("c", "new", "a"), ("s2", "s3", "s1"), ("x", "y", "z")))
    assert b.ts_ms[:, -1].tolist() == [2, NO_TS, 1]
    assert b.loaded.tolist() == [True, False, True]


@settings(max_examples=60, deadline=None)
@given(
    width=st.integers(1, 6),
    batches=st.lists(
        st.lists(st.tuples(st.integers(0, 2), st.integers(0, 40)), max_size=25), max_size=5
    ),
)
def test_append_matches_a_per_device_reference(width, batches):
    b = buffer(width)
    history: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for batch in batches:
        rows = [(d, t, float(t * 10 + d)) for d, t in batch]
        b.append(samples(rows) if rows else samples([]))
        newest = {d: (h[-1] if h else None) for d, h in history.items()}
        for d, t in sorted(batch, key=lambda r: (r[0], r[1])):
            if newest[d] is None or t > newest[d]:
                history[d].append(t)
        for d, h in history.items():
            expected = [NO_TS] * max(0, width - len(h)) + h[-width:]
            assert b.ts_ms[d].tolist() == expected
            got = b.values["x"][d]
            assert got[~np.isnan(got)].tolist() == [float(t * 10 + d) for t in h[-width:]]


@pytest.mark.parametrize(
    ("last", "now", "kwargs", "expected"),
    [
        # first run: only the newest aligned time, at least `delay` old
        (None, 10_500, {}, [10_000]),
        (None, 10_500, {"delay_ms": 1000}, [0]),
        # up to date: nothing
        (10_000, 10_500, {}, []),
        # one interval later: one time
        (10_000, 20_000, {}, [20_000]),
        # after downtime: every missed time, max_steps at a time
        (10_000, 60_000, {"max_steps": 3}, [20_000, 30_000, 40_000]),
        # but no further back than max_catchup
        (10_000, 1_000_000, {"max_catchup_ms": 20_000}, [980_000, 990_000, 1_000_000]),
        # a stored time off the grid resumes on the grid
        (12_345, 40_000, {}, [20_000, 30_000, 40_000]),
    ],
)
def test_evaluation_times(last, now, kwargs, expected):
    options = {"interval_ms": 10_000, "delay_ms": 0, "max_catchup_ms": 10**9, "max_steps": 100}
    assert evaluation_times(last, now, **(options | kwargs)) == expected


def test_parse_packed_sample_records():
    def record(i: int, us: int, *values: float) -> bytes:
        out = i.to_bytes(4, "big") + us.to_bytes(8, "big", signed=True)
        return out + b"".join(np.array(v, ">f8").tobytes() for v in values)

    data = record(3, 1_000, 1.5, float("nan")) + record(0, -2_000, 2.0, 3.0)
    parsed = parse_samples(data, ["a", "b"])
    assert parsed.device_index.tolist() == [3, 0]
    assert parsed.ts_ms.tolist() == [946_684_800_001, 946_684_799_998]
    assert parsed.values["a"].tolist() == [1.5, 2.0]
    assert np.isnan(parsed.values["b"][0])
    assert len(parse_samples(b"", ["a"])) == 0
    with pytest.raises(SchemaError, match="unexpected sample records"):
        parse_samples(data[:-1], ["a", "b"])


def test_hourly_ring_resets_slots_and_skips_hours_out_of_reach():
    means = HourlyMeans(DEVICES)
    hour = 500_000
    ones = np.ones((1, 4))
    means.add(np.array([0]), np.array([hour]), ones, ones * 10)
    means.add(np.array([0, 0]), np.array([hour, hour]), ones.repeat(2, 0), ones.repeat(2, 0) * 40)
    assert means.means(0, hour, 1)[0].tolist() == [30.0] * 4
    # An hour SLOTS later lands on the same slot: it replaces the old one.
    means.add(np.array([0]), np.array([hour + SLOTS]), ones, ones * 7)
    assert means.means(0, hour + SLOTS, 1)[0].tolist() == [7.0] * 4
    assert np.isnan(means.means(0, hour, 1)).all()
    # ... and an hour older than what its slot holds is past the ring.
    means.add(np.array([0]), np.array([hour]), ones, ones)
    assert means.means(0, hour + SLOTS, 1)[0].tolist() == [7.0] * 4


def test_hourly_rows_need_two_of_the_newest_three_hours():
    means = HourlyMeans(DEVICES)
    hour = 500_000
    ones = np.ones((1, 4))
    means.add(np.array([1]), np.array([hour]), ones, ones * 20.3)
    assert hourly_rows(means, [(1, hour)]) == []
    assert daily_rows(means, []) == []
    means.add(np.array([1]), np.array([hour - 2]), ones, ones * 20.3)
    (row,) = hourly_rows(means, [(1, hour)])
    assert row.device_id == "b"
    assert row.site_id == "s1"
    assert row.aqi_pm25 == 41  # reference/aqi.md: a NowCast of 20.3 ug/m3 is AQI 41
    assert means.vn_aqi(hour).tolist()[1] == row.vn_aqi
    assert np.isnan(means.vn_aqi(hour + 3)[1])


def test_daily_statistics_of_hourly_means():
    from alerts.aqijob import _daily_statistics

    m = np.full((2, 24, 4), np.nan)
    m[0, :, 0] = np.arange(24)  # pm25: mean 11.5
    m[0, 3, 2] = 40.0  # no2: one hour
    m[0, 0:6, 3] = 100.0  # o3: six hours of 100 -> one 8 h window qualifies
    m[0, 6, 3] = 160.0
    m[1, 0:5, 3] = 100.0  # five hours only: no 8 h mean
    pm25, pm10, o3_1h, o3_8h, no2 = _daily_statistics(m)[0].tolist()
    assert pm25 == 11.5
    assert np.isnan(pm10)
    assert o3_1h == 160.0
    assert o3_8h == pytest.approx((5 * 100 + 160) / 6)  # hours 1-8: six with data
    assert no2 == 40.0
    assert np.isnan(_daily_statistics(m)[1, 3])
