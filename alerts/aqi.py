"""Air-quality indices: Vietnam's VN_AQI (Decision 1459/QD-TCMT, 2019) and the US EPA PM2.5 AQI.

Pure functions of concentrations (ug/m3, CO included) and hourly means; the
tables are the decision's and the EPA's:

- ``sub_index(pollutant, c)``: AQI_x by linear interpolation inside the
  breakpoint segment holding ``c``, rounded half up to an integer;
- ``nowcast(hourly)``: the decision's NowCast over the last 12 hourly means
  (newest first, None for a missing hour; at least 2 of the newest 3 needed);
- ``hourly_vn_aqi`` / ``daily_vn_aqi``: the station's AQI (the largest
  AQI_x), its dominant pollutant and its band;
- ``us_pm25_aqi``: the EPA 2024 PM2.5 index (concentration truncated to 0.1).

Concentrations above a table's last breakpoint are beyond the index: VN_AQI
reports 500 (the top of the scale) and the US index reports None. Fetching
hourly means from the database and storing results is the job's business.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Final, Literal

import msgspec

Pollutant = Literal["o3_1h", "o3_8h", "co", "so2", "no2", "pm10", "pm25"]

# I_i and BP_i for each pollutant (Decision 1459/QD-TCMT table; ug/m3).
# None: the 8-hour ozone column stops at 400 ug/m3 (AQI 300).
_INDEX: Final = (0, 50, 100, 150, 200, 300, 400, 500)
_VN_BREAKPOINTS: Final[dict[Pollutant, tuple[float | None, ...]]] = {
    "o3_1h": (0, 160, 200, 300, 400, 800, 1000, 1200),
    "o3_8h": (0, 100, 120, 170, 210, 400, None, None),
    "co": (0, 10000, 30000, 45000, 60000, 90000, 120000, 150000),
    "so2": (0, 125, 350, 550, 800, 1600, 2100, 2630),
    "no2": (0, 100, 200, 700, 1200, 2350, 3100, 3850),
    "pm10": (0, 50, 150, 250, 350, 420, 500, 600),
    "pm25": (0, 25, 50, 80, 150, 250, 350, 500),
}
VN_MAX: Final = 500


class Band(msgspec.Struct, frozen=True):
    low: int
    high: int
    name_vi: str
    name_en: str
    rgb: tuple[int, int, int]


VN_BANDS: Final = (
    Band(0, 50, "Tốt", "Good", (0, 228, 0)),
    Band(51, 100, "Trung bình", "Moderate", (255, 255, 0)),
    Band(101, 150, "Kém", "Poor", (255, 126, 0)),
    Band(151, 200, "Xấu", "Bad", (255, 0, 0)),
    Band(201, 300, "Rất xấu", "Very bad", (143, 63, 151)),
    Band(301, 500, "Nguy hại", "Hazardous", (126, 0, 35)),
)

# US EPA PM2.5 24-hour breakpoints, 2024 revision: (C_low, C_high, I_low, I_high, category).
_US_PM25: Final = (
    (0.0, 9.0, 0, 50, "Good"),
    (9.1, 35.4, 51, 100, "Moderate"),
    (35.5, 55.4, 101, 150, "Unhealthy for sensitive groups"),
    (55.5, 125.4, 151, 200, "Unhealthy"),
    (125.5, 225.4, 201, 300, "Very unhealthy"),
    (225.5, 325.4, 301, 500, "Hazardous"),
)


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def sub_index(pollutant: Pollutant, c: float) -> int | None:
    """AQI_x of concentration ``c`` (ug/m3); None if ``c`` is beyond the column (8-hour O3)."""
    if not math.isfinite(c) or c < 0:
        raise ValueError(f"{pollutant}: concentration {c!r} is not a non-negative number")
    bps = _VN_BREAKPOINTS[pollutant]
    for i in range(len(bps) - 1):
        lo, hi = bps[i], bps[i + 1]
        if hi is None or lo is None:
            return None  # past the last defined breakpoint of this column
        if c <= hi:
            return _round_half_up((_INDEX[i + 1] - _INDEX[i]) / (hi - lo) * (c - lo) + _INDEX[i])
    return VN_MAX


def _index(pollutant: Pollutant, c: float) -> int:
    """sub_index for a column defined up to AQI 500 (every column but 8-hour O3)."""
    value = sub_index(pollutant, c)
    if value is None:  # pragma: no cover - only the 8-hour O3 column has gaps
        raise ValueError(f"{pollutant} has no index for {c}")
    return value


def band(aqi: int) -> Band:
    for b in VN_BANDS:
        if aqi <= b.high:
            return b
    return VN_BANDS[-1]


def nowcast(hourly: Sequence[float | None]) -> float | None:
    """NowCast of the last 12 hourly means, newest first; None if 2 of the newest 3 are missing."""
    c = list(hourly[:12])
    if sum(v is not None for v in c[:3]) < 2:
        return None
    present = [v for v in c if v is not None]
    high = max(present)
    w_star = min(present) / high if high > 0 else 1.0
    w = max(0.5, w_star)
    num = den = 0.0
    for i, v in enumerate(c):
        if v is not None:
            weight = w**i
            num += weight * v
            den += weight
    return num / den


class AqiResult(msgspec.Struct, frozen=True):
    aqi: int
    dominant: str
    band: Band
    sub_indices: dict[str, int]


def _combine(sub_indices: dict[str, int]) -> AqiResult | None:
    if not sub_indices:
        return None
    dominant = max(sub_indices, key=lambda k: (sub_indices[k], k))
    value = sub_indices[dominant]
    return AqiResult(aqi=value, dominant=dominant, band=band(value), sub_indices=sub_indices)


def hourly_vn_aqi(
    *,
    pm25_hourly: Sequence[float | None] = (),
    pm10_hourly: Sequence[float | None] = (),
    o3_1h: float | None = None,
    no2_1h: float | None = None,
    so2_1h: float | None = None,
    co_1h: float | None = None,
) -> AqiResult | None:
    """The hourly VN_AQI of a station; PM from NowCast (12 hourly means, newest first).

    At least one of PM10 / PM2.5 is required; None when neither has a NowCast.
    """
    subs: dict[str, int] = {}
    pm: tuple[tuple[Pollutant, Sequence[float | None]], ...] = (
        ("pm25", pm25_hourly),
        ("pm10", pm10_hourly),
    )
    for name, hours in pm:
        value = nowcast(hours)
        if value is not None:
            subs[name] = _index(name, value)
    if not subs:
        return None
    gases: Mapping[str, tuple[Pollutant, float | None]] = {
        "o3": ("o3_1h", o3_1h),
        "no2": ("no2", no2_1h),
        "so2": ("so2", so2_1h),
        "co": ("co", co_1h),
    }
    for gas, (column, c) in gases.items():
        if c is not None:
            subs[gas] = _index(column, c)
    return _combine(subs)


def daily_vn_aqi(
    *,
    pm25_24h: float | None = None,
    pm10_24h: float | None = None,
    o3_max_1h: float | None = None,
    o3_max_8h: float | None = None,
    no2_max_1h: float | None = None,
    so2_max_1h: float | None = None,
    co_max_1h: float | None = None,
) -> AqiResult | None:
    """The daily VN_AQI: PM 24-hour means; O3 the larger of its 1-hour and 8-hour
    indices (the 8-hour column only up to 400 ug/m3); SO2, NO2, CO their maximum
    1-hour means."""
    subs: dict[str, int] = {}
    pm: tuple[tuple[Pollutant, float | None], ...] = (("pm25", pm25_24h), ("pm10", pm10_24h))
    for name, c in pm:
        if c is not None:
            subs[name] = _index(name, c)
    if not subs:
        return None
    o3 = [
        i
        for i in (
            sub_index("o3_1h", o3_max_1h) if o3_max_1h is not None else None,
            sub_index("o3_8h", o3_max_8h) if o3_max_8h is not None else None,
        )
        if i is not None
    ]
    if o3:
        subs["o3"] = max(o3)
    gases: tuple[tuple[Pollutant, float | None], ...] = (
        ("no2", no2_max_1h),
        ("so2", so2_max_1h),
        ("co", co_max_1h),
    )
    for name, c in gases:
        if c is not None:
            subs[name] = _index(name, c)
    return _combine(subs)


def us_pm25_aqi(c: float) -> tuple[int, str] | None:
    """US EPA AQI for a 24-hour PM2.5 concentration (2024); None beyond 325.4 ug/m3."""
    if not math.isfinite(c) or c < 0:
        raise ValueError(f"pm25: concentration {c!r} is not a non-negative number")
    truncated = math.floor(c * 10 + 1e-9) / 10
    for c_lo, c_hi, i_lo, i_hi, category in _US_PM25:
        if truncated <= c_hi:
            value = (i_hi - i_lo) / (c_hi - c_lo) * (truncated - c_lo) + i_lo
            return _round_half_up(value), category
    return None
