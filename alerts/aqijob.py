"""The AQI job's state and arithmetic: incremental hourly means, hourly and daily VN_AQI rows.

``HourlyMeans`` keeps, per air-quality monitor, the sum and count of each
pollutant for the last ``SLOTS`` hours in a ring indexed by hour number
(whole hours since the Unix epoch). The job feeds it the same new samples
the rule windows get, so an hourly mean costs nothing extra per cycle; after
a restart the job fills it once from the database's hourly sums.

``hourly_rows`` and ``daily_rows`` turn (device, hour) and (device, day)
pairs into rows of ``aqi_hourly`` / ``aqi_daily`` with ``alerts.aqi``:

- hourly (ts = the hour's start): PM2.5 and PM10 by NowCast over the
  hour's and the 11 previous hourly means (a missing hour is left out; the
  NowCast needs 2 of the newest 3), O3 and NO2 by their 1-hour mean; the
  US EPA AQI from the PM2.5 NowCast. The hour in progress is computed from
  its samples so far and recomputed as it fills;
- daily (the local calendar day in Vietnam, UTC+7, no daylight saving):
  PM 24-hour means (the mean of the day's hourly means), O3 the larger of
  its maximum 1-hour mean and maximum 8-hour mean (8 consecutive hours, at
  least 6 of them with data), NO2 its maximum 1-hour mean; the US EPA AQI
  from the PM2.5 24-hour mean. The current day is provisional until it ends.

The catalog's monitors measure PM2.5, PM10, NO2 and O3 (no SO2 or CO).
Pure: no I/O; which pairs changed and storing rows are the job's business.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Final

import msgspec
import numpy as np

from alerts.aqi import daily_vn_aqi, hourly_vn_aqi, nowcast, us_pm25_aqi
from alerts.window import BoolArray, DeviceSet, FloatArray, IntArray, Samples

POLLUTANTS: Final = ("pm25", "pm10", "no2", "o3")
HOUR_MS: Final = 3_600_000
DAY_MS: Final = 24 * HOUR_MS
# Vietnam (Indochina Time) is UTC+7 all year.
LOCAL_OFFSET_MS: Final = 7 * HOUR_MS
# 24 hours of the current local day plus the 11 before its first hour that
# its first NowCast needs, and one spare: 36.
SLOTS: Final = 36
NOWCAST_HOURS: Final = 12
# An 8-hour ozone mean needs at least 6 of its hours (75 % coverage).
O3_8H_MIN_HOURS: Final = 6
# The rules' vn_aqi is the newest hourly AQI if its hour is at most this many
# hours before the evaluation's hour (a NowCast needs 2 of the newest 3).
VN_AQI_MAX_AGE_H: Final = 2
_UNIX_EPOCH_ORDINAL: Final = 719_163  # date(1970, 1, 1).toordinal()

_PM25, _PM10, _NO2, _O3 = range(4)


class HourlyRow(msgspec.Struct, frozen=True, kw_only=True):
    ts_ms: int
    device_id: str
    site_id: str
    vn_aqi: int
    dominant: str
    band: str
    aqi_pm25: int | None
    aqi_pm10: int | None
    aqi_no2: int | None
    aqi_o3: int | None
    nowcast_pm25: float | None
    nowcast_pm10: float | None
    us_aqi_pm25: int | None


class DailyRow(msgspec.Struct, frozen=True, kw_only=True):
    day_ordinal: int  # date.toordinal() of the local day
    device_id: str
    site_id: str
    vn_aqi: int
    dominant: str
    band: str
    aqi_pm25: int | None
    aqi_pm10: int | None
    aqi_no2: int | None
    aqi_o3: int | None
    us_aqi_pm25: int | None


def local_day_of_hour(hour: int) -> int:
    """Days since 1970-01-01 of the local (UTC+7) day holding ``hour``."""
    return (hour * HOUR_MS + LOCAL_OFFSET_MS) // DAY_MS


def first_hour_of_day(day: int) -> int:
    return (day * DAY_MS - LOCAL_OFFSET_MS) // HOUR_MS


class HourlyMeans:
    """Per device and pollutant, the sums and counts of the last SLOTS hours."""

    def __init__(self, devices: DeviceSet) -> None:
        self.devices = devices
        n, p = len(devices), len(POLLUTANTS)
        self.hours: IntArray = np.full((n, SLOTS), -1, np.int64)
        self.counts: FloatArray = np.zeros((n, SLOTS, p), np.float64)
        self.sums: FloatArray = np.zeros((n, SLOTS, p), np.float64)
        self.latest_hour: IntArray = np.full(n, -1, np.int64)
        self.latest_aqi: FloatArray = np.full(n, np.nan, np.float64)

    def reindex(self, devices: DeviceSet) -> None:
        old = {d: i for i, d in enumerate(self.devices.device_ids)}
        fresh = HourlyMeans(devices)
        pairs = [(i, old[d]) for i, d in enumerate(devices.device_ids) if d in old]
        if pairs:
            new_rows, old_rows = (np.array(x, np.int64) for x in zip(*pairs, strict=True))
            fresh.hours[new_rows] = self.hours[old_rows]
            fresh.counts[new_rows] = self.counts[old_rows]
            fresh.sums[new_rows] = self.sums[old_rows]
            fresh.latest_hour[new_rows] = self.latest_hour[old_rows]
            fresh.latest_aqi[new_rows] = self.latest_aqi[old_rows]
        self.__dict__.update(fresh.__dict__)

    def add(
        self, device_index: IntArray, hour: IntArray, counts: FloatArray, sums: FloatArray
    ) -> None:
        """Add per-row counts and sums (k, pollutants) into their (device, hour) slots.

        A slot holding an older hour is reset first; rows for an hour older
        than the one its slot holds now are past the ring and dropped.
        """
        if not len(hour):
            return
        flat_hours = self.hours.reshape(-1)
        key = device_index * SLOTS + hour % SLOTS
        newest = flat_hours.copy()
        np.maximum.at(newest, key, hour)
        reset = newest != flat_hours
        flat_counts = self.counts.reshape(-1, len(POLLUTANTS))
        flat_sums = self.sums.reshape(-1, len(POLLUTANTS))
        flat_counts[reset] = 0
        flat_sums[reset] = 0
        flat_hours[:] = newest
        fits = flat_hours[key] == hour
        np.add.at(flat_counts, key[fits], counts[fits])
        np.add.at(flat_sums, key[fits], sums[fits])

    def add_samples(self, samples: Samples) -> set[tuple[int, int]]:
        """Add raw samples (with every POLLUTANTS metric); returns the (device, hour) touched."""
        if not len(samples):
            return set()
        values = np.stack([samples.values[p] for p in POLLUTANTS], axis=1)
        present = ~np.isnan(values)
        hour = samples.ts_ms // HOUR_MS
        self.add(
            samples.device_index, hour, present.astype(np.float64), np.where(present, values, 0)
        )
        pairs = np.unique(np.stack([samples.device_index, hour], axis=1), axis=0)
        return {(int(d), int(h)) for d, h in pairs}

    def means(self, device: int, first_hour: int, hours: int) -> FloatArray:
        """(hours, pollutants) hourly means from ``first_hour`` on; NaN where none."""
        result: FloatArray = self.means_of(np.array([device]), np.array([first_hour]), hours)[0]
        return result

    def means_of(self, devices: IntArray, first_hours: IntArray, hours: int) -> FloatArray:
        """(k, hours, pollutants) hourly means of k devices, each from its first hour on."""
        wanted = first_hours[:, None] + np.arange(hours)[None, :]
        slots = wanted % SLOTS
        rows = devices[:, None]
        held = self.hours[rows, slots] == wanted
        counts = self.counts[rows, slots]
        with np.errstate(invalid="ignore", divide="ignore"):
            result: FloatArray = self.sums[rows, slots] / counts
        result[~held[:, :, None] | (counts == 0)] = np.nan
        return result

    def oldest_hour(self, device: int) -> int:
        """The oldest hour the ring still covers completely for ``device``."""
        return int(self.hours[device].max()) - SLOTS + 1

    def vn_aqi(self, at_hour: int) -> FloatArray:
        """(n,) the newest hourly VN_AQI, NaN if none within VN_AQI_MAX_AGE_H of ``at_hour``."""
        fresh: BoolArray = (self.latest_hour >= at_hour - VN_AQI_MAX_AGE_H) & (
            self.latest_hour <= at_hour
        )
        return np.where(fresh, self.latest_aqi, np.nan)


def _py(x: float) -> float | None:
    return None if math.isnan(x) else x


def hourly_rows(means: HourlyMeans, pairs: Iterable[tuple[int, int]]) -> list[HourlyRow]:
    """aqi_hourly rows for (device, hour) pairs; updates the newest AQI per device."""
    ordered = sorted(pairs)
    if not ordered:
        return []
    devices = np.array([d for d, _ in ordered], np.int64)
    hours = np.array([h for _, h in ordered], np.int64)
    # (k, 12, pollutants), newest hour first; to Python floats once for alerts.aqi.
    window = means.means_of(devices, hours - NOWCAST_HOURS + 1, NOWCAST_HOURS)[:, ::-1]
    pm25_all = window[:, :, _PM25].tolist()
    pm10_all = window[:, :, _PM10].tolist()
    o3_all = window[:, 0, _O3].tolist()
    no2_all = window[:, 0, _NO2].tolist()
    rows: list[HourlyRow] = []
    for k, (device, hour) in enumerate(ordered):
        pm25 = [_py(x) for x in pm25_all[k]]
        pm10 = [_py(x) for x in pm10_all[k]]
        result = hourly_vn_aqi(
            pm25_hourly=pm25, pm10_hourly=pm10, o3_1h=_py(o3_all[k]), no2_1h=_py(no2_all[k])
        )
        if result is None:
            continue
        nc25, nc10 = nowcast(pm25), nowcast(pm10)
        us = us_pm25_aqi(nc25) if nc25 is not None else None
        rows.append(
            HourlyRow(
                ts_ms=hour * HOUR_MS,
                device_id=means.devices.device_ids[device],
                site_id=means.devices.site_ids[device],
                vn_aqi=result.aqi,
                dominant=result.dominant,
                band=result.band.name_vi,
                aqi_pm25=result.sub_indices.get("pm25"),
                aqi_pm10=result.sub_indices.get("pm10"),
                aqi_no2=result.sub_indices.get("no2"),
                aqi_o3=result.sub_indices.get("o3"),
                nowcast_pm25=nc25,
                nowcast_pm10=nc10,
                us_aqi_pm25=None if us is None else us[0],
            )
        )
        if hour >= means.latest_hour[device]:
            means.latest_hour[device] = hour
            means.latest_aqi[device] = result.aqi
    return rows


def _daily_statistics(m: FloatArray) -> FloatArray:
    """(k, 5) from (k, 24, pollutants) hourly means: PM2.5 and PM10 means, O3 max 1 h,
    O3 max 8 h (windows with at least O3_8H_MIN_HOURS hours), NO2 max 1 h; NaN: none."""
    present = ~np.isnan(m)
    count = present.sum(axis=1)
    total = np.where(present, m, 0.0).sum(axis=1)
    highest = np.where(present, m, -np.inf).max(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / count, np.nan)
    highest = np.where(count > 0, highest, np.nan)
    o3 = m[:, :, _O3]
    o3_present = ~np.isnan(o3)
    zero = np.zeros((len(m), 1))
    csum = np.concatenate([zero, np.cumsum(np.where(o3_present, o3, 0.0), axis=1)], axis=1)
    ccount = np.concatenate([zero, np.cumsum(o3_present, axis=1)], axis=1)
    window_sum = csum[:, 8:] - csum[:, :-8]
    window_count = ccount[:, 8:] - ccount[:, :-8]
    enough = window_count >= O3_8H_MIN_HOURS
    with np.errstate(invalid="ignore", divide="ignore"):
        window_mean = np.where(enough, window_sum / window_count, -np.inf)
    o3_8h = np.where(enough.any(axis=1), window_mean.max(axis=1), np.nan)
    return np.stack(
        [mean[:, _PM25], mean[:, _PM10], highest[:, _O3], o3_8h, highest[:, _NO2]], axis=1
    )


def daily_rows(means: HourlyMeans, pairs: Iterable[tuple[int, int]]) -> list[DailyRow]:
    """aqi_daily rows for (device, local day) pairs whose hours the ring still holds."""
    ordered = [
        (d, day) for d, day in sorted(pairs) if first_hour_of_day(day) >= means.oldest_hour(d)
    ]
    if not ordered:
        return []
    devices = np.array([d for d, _ in ordered], np.int64)
    firsts = np.array([first_hour_of_day(day) for _, day in ordered], np.int64)
    stats = _daily_statistics(means.means_of(devices, firsts, 24)).tolist()
    rows: list[DailyRow] = []
    for (device, day), values in zip(ordered, stats, strict=True):
        pm25, pm10, o3_1h, o3_8h, no2 = (_py(x) for x in values)
        result = daily_vn_aqi(
            pm25_24h=pm25, pm10_24h=pm10, o3_max_1h=o3_1h, o3_max_8h=o3_8h, no2_max_1h=no2
        )
        if result is None:
            continue
        us = us_pm25_aqi(pm25) if pm25 is not None else None
        rows.append(
            DailyRow(
                day_ordinal=day + _UNIX_EPOCH_ORDINAL,
                device_id=means.devices.device_ids[device],
                site_id=means.devices.site_ids[device],
                vn_aqi=result.aqi,
                dominant=result.dominant,
                band=result.band.name_vi,
                aqi_pm25=result.sub_indices.get("pm25"),
                aqi_pm10=result.sub_indices.get("pm10"),
                aqi_no2=result.sub_indices.get("no2"),
                aqi_o3=result.sub_indices.get("o3"),
                us_aqi_pm25=None if us is None else us[0],
            )
        )
    return rows


def days_of(pairs: Sequence[tuple[int, int]]) -> set[tuple[int, int]]:
    """The (device, local day) pairs of (device, hour) pairs."""
    return {(d, local_day_of_hour(h)) for d, h in pairs}
