"""VN_AQI (Decision 1459/QD-TCMT) and US EPA PM2.5 AQI against the reference tables."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from alerts.aqi import (
    band,
    daily_vn_aqi,
    hourly_vn_aqi,
    nowcast,
    sub_index,
    us_pm25_aqi,
)

# Every breakpoint of every column maps to its index value (reference/aqi.md).
BREAKPOINTS = {
    "o3_1h": (0, 160, 200, 300, 400, 800, 1000, 1200),
    "o3_8h": (0, 100, 120, 170, 210, 400),
    "co": (0, 10000, 30000, 45000, 60000, 90000, 120000, 150000),
    "so2": (0, 125, 350, 550, 800, 1600, 2100, 2630),
    "no2": (0, 100, 200, 700, 1200, 2350, 3100, 3850),
    "pm10": (0, 50, 150, 250, 350, 420, 500, 600),
    "pm25": (0, 25, 50, 80, 150, 250, 350, 500),
}
INDEX = (0, 50, 100, 150, 200, 300, 400, 500)


@pytest.mark.parametrize(
    ("pollutant", "c", "expected"),
    [(p, bp, INDEX[i]) for p, bps in BREAKPOINTS.items() for i, bp in enumerate(bps)],
)
def test_each_breakpoint_gives_its_index(pollutant, c, expected):
    assert sub_index(pollutant, c) == expected


@pytest.mark.parametrize(
    ("pollutant", "c", "expected"),
    [
        ("pm25", 20.3, 41),  # the reference's own check: 40.6 -> 41
        ("pm25", 24.9, 50),  # 49.8 rounds up
        ("pm25", 25.1, 50),  # just above a breakpoint: 50.2
        ("pm25", 25.5, 51),  # 51.0
        ("pm25", 49.9, 100),  # 99.8
        ("pm25", 50.5, 101),  # (150-100)/(80-50)*0.5 + 100 = 100.83
        ("pm25", 0.0, 0),
        ("pm10", 151, 101),  # 100.5 rounds half up
        ("o3_1h", 161, 51),  # 50 + 50/40 = 51.25
        ("pm25", 600, 500),  # beyond the table: the top of the scale
        ("o3_8h", 401, None),  # the 8-hour column stops at 400
    ],
)
def test_values_around_breakpoints(pollutant, c, expected):
    assert sub_index(pollutant, c) == expected


@pytest.mark.parametrize(
    ("aqi", "name_vi", "rgb"),
    [
        (0, "Tốt", (0, 228, 0)),
        (50, "Tốt", (0, 228, 0)),
        (51, "Trung bình", (255, 255, 0)),
        (100, "Trung bình", (255, 255, 0)),
        (101, "Kém", (255, 126, 0)),
        (151, "Xấu", (255, 0, 0)),
        (201, "Rất xấu", (143, 63, 151)),
        (300, "Rất xấu", (143, 63, 151)),
        (301, "Nguy hại", (126, 0, 35)),
        (500, "Nguy hại", (126, 0, 35)),
    ],
)
def test_bands_names_and_colours(aqi, name_vi, rgb):
    assert band(aqi).name_vi == name_vi
    assert band(aqi).rgb == rgb


def test_nowcast_with_steady_and_changing_hours():
    assert nowcast([30.0] * 12) == pytest.approx(30.0)
    # min/max = 0.25 <= 1/2: w = 1/2, weights 1, 1/2, 1/4, ...
    hours = [80.0, 40.0, 20.0] + [20.0] * 9
    weights = [0.5**i for i in range(12)]
    expected = sum(w * c for w, c in zip(weights, hours, strict=True)) / sum(weights)
    assert nowcast(hours) == pytest.approx(expected)
    # min/max = 0.8 > 1/2: w = 0.8
    hours = [50.0, 40.0] + [40.0] * 10
    weights = [0.8**i for i in range(12)]
    expected = sum(w * c for w, c in zip(weights, hours, strict=True)) / sum(weights)
    assert nowcast(hours) == pytest.approx(expected)


def test_nowcast_missing_hours_are_left_out_of_both_sums():
    hours = [40.0, None, 20.0] + [None] * 9  # w = 1/2: hours 1 and 3 weigh 1 and 1/4
    assert nowcast(hours) == pytest.approx((40 * 1 + 20 * 0.25) / (1 + 0.25))
    assert nowcast([40.0, None, None, 30.0]) is None  # only 1 of the newest 3
    assert nowcast([None, 40.0, 30.0]) == pytest.approx(
        (40 * 0.75**1 + 30 * 0.75**2) / (0.75 + 0.5625)
    )
    assert nowcast([]) is None


@given(st.lists(st.floats(min_value=0, max_value=1000), min_size=3, max_size=12))
def test_nowcast_lies_between_the_extremes(hours):
    value = nowcast(hours)
    assert value is not None
    assert min(hours) - 1e-9 <= value <= max(hours) + 1e-9


def test_hourly_station_aqi_takes_the_largest_sub_index():
    result = hourly_vn_aqi(pm25_hourly=[20.3] * 12, pm10_hourly=[30.0] * 12, no2_1h=250)
    assert result is not None
    assert result.sub_indices == {"pm25": 41, "pm10": 30, "no2": 105}
    assert (result.aqi, result.dominant, result.band.name_vi) == (105, "no2", "Kém")
    # PM is required: gases alone give no AQI.
    assert hourly_vn_aqi(no2_1h=250) is None


def test_daily_ozone_uses_the_larger_of_1h_and_8h_and_the_8h_column_stops_at_400():
    # 8-hour 130 ug/m3 -> 110; 1-hour 170 -> 62.5 -> 63: the 8-hour index wins.
    result = daily_vn_aqi(pm25_24h=10, o3_max_1h=170, o3_max_8h=130)
    assert result is not None
    assert result.sub_indices["o3"] == 110
    # Above 400 ug/m3 the 8-hour column is not used: the 1-hour index alone.
    result = daily_vn_aqi(pm25_24h=10, o3_max_1h=450, o3_max_8h=420)
    assert result is not None
    assert result.sub_indices["o3"] == sub_index("o3_1h", 450) == 213  # 212.5 half up
    assert daily_vn_aqi(o3_max_1h=450) is None


@pytest.mark.parametrize(
    ("c", "expected"),
    [
        (0.0, (0, "Good")),
        (9.0, (50, "Good")),
        (9.04, (50, "Good")),  # truncated to 9.0
        (9.1, (51, "Moderate")),
        (35.4, (100, "Moderate")),
        (35.5, (101, "Unhealthy for sensitive groups")),
        (55.5, (151, "Unhealthy")),
        (125.4, (200, "Unhealthy")),
        (125.5, (201, "Very unhealthy")),
        (225.5, (301, "Hazardous")),
        (325.4, (500, "Hazardous")),
        (20.0, (71, "Moderate")),  # (100-51)/(35.4-9.1) * (20.0-9.1) + 51 = 71.31
    ],
)
def test_us_pm25_2024_breakpoints(c, expected):
    assert us_pm25_aqi(c) == expected


def test_us_pm25_beyond_the_index():
    assert us_pm25_aqi(325.5) is None
    with pytest.raises(ValueError, match="not a non-negative"):
        us_pm25_aqi(float("nan"))
