"""firmware_sim.signals: Hanoi time, climate and pollution shapes, halls, streets, conferences.

Shape checks use many samples and margins well outside the noise, so they
fail only when a shape is wrong (a peak at the wrong hour, a season
inverted), not by bad luck; each names its concrete numbers.
"""

from __future__ import annotations

import datetime as dt
import math
import tomllib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts.errors import SettingsError
from firmware_sim import signals
from firmware_sim.signals import (
    AirQualityParams,
    ConferenceParams,
    ConferenceState,
    HallParams,
    QueueState,
    StreetParams,
    Weather,
)

HANOI = dt.timezone(dt.timedelta(hours=7))
SITES_PATH = Path(__file__).parents[2] / "cityhub" / "data" / "hanoi_sites.toml"
HALL_HOURS = "Mon-Fri 08:00-12:00,13:30-17:00; Sat 08:00-12:00"
HOUR_MS = 3_600_000
DAY_MS = 86_400_000


def local_ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> int:
    """Milliseconds UTC of a Hanoi local time."""
    return int(dt.datetime(year, month, day, hour, minute, tzinfo=HANOI).timestamp() * 1000)


def days_of(year: int, month: int) -> list[dt.date]:
    first = dt.date(year, month, 1)
    return [
        first + dt.timedelta(days=i)
        for i in range(31)
        if (first + dt.timedelta(days=i)).month == month
    ]


# --- local time ------------------------------------------------------------------


def test_hanoi_time_is_utc_plus_7() -> None:
    # 2025-12-31 17:00 UTC is midnight of Thursday 1 January 2026 in Hanoi.
    now_ms = int(dt.datetime(2025, 12, 31, 17, tzinfo=dt.UTC).timestamp() * 1000)
    lt = signals.hanoi_time(now_ms)
    assert (lt.weekday, lt.minute, lt.hour, lt.month) == (3, 0, 0.0, 0.0)
    lt = signals.hanoi_time(now_ms - 1)
    assert (lt.weekday, lt.minute) == (2, 1439)
    assert 11.99 < lt.month < 12.0


def test_hanoi_time_fractional_month_covers_leap_february() -> None:
    mid = signals.hanoi_time(local_ms(2028, 2, 15, 12))  # 2028 is a leap year
    assert mid.month == pytest.approx(1.0 + 14.5 / 29)
    assert signals.hanoi_time(local_ms(2028, 2, 29, 23, 59)).month < 2.0


@given(st.integers(min_value=0, max_value=4_102_444_800_000))  # 1970 .. 2100
def test_hanoi_time_agrees_with_datetime(now_ms: int) -> None:
    expected = dt.datetime.fromtimestamp(now_ms / 1000, tz=HANOI)
    lt = signals.hanoi_time(now_ms)
    assert lt.weekday == expected.weekday()
    assert lt.minute == expected.hour * 60 + expected.minute
    assert int(lt.month) == expected.month - 1
    assert 0.0 <= lt.hour < 24.0


# --- small building blocks ----------------------------------------------------------


def test_switch_probability() -> None:
    assert signals.switch_probability(0.0, 10.0) == 0.0
    assert signals.switch_probability(1.0, 0.0) == 0.0
    assert signals.switch_probability(1 / 60, 60.0) == pytest.approx(1 - math.exp(-1))
    assert signals.switch_probability(1.0, 1e6) == 1.0


def test_ou_step_is_stationary_with_the_given_sigma() -> None:
    rng = np.random.default_rng(1)
    x, xs = 0.0, []
    for z in rng.standard_normal(20_000).tolist():
        x = signals.ou_step(x, dt_s=600.0, tau_s=6 * 3600.0, sigma=2.0, z=z)
        xs.append(x)
    assert float(np.std(xs)) == pytest.approx(2.0, rel=0.1)
    assert abs(float(np.mean(xs))) < 0.5
    # A zero-length step changes nothing.
    assert signals.ou_step(1.5, dt_s=0.0, tau_s=10.0, sigma=1.0, z=3.0) == 1.5


# --- climate ----------------------------------------------------------------------


def climate_mean(fn, month: int, hour: int) -> float:
    return float(
        np.mean(
            [
                fn(signals.hanoi_time(local_ms(2025, month, d.day, hour)))
                for d in days_of(2025, month)
            ]
        )
    )


def test_temperature_climate_follows_hanoi_seasons_and_daily_swing() -> None:
    def daily_mean(month: int) -> float:
        return float(
            np.mean([climate_mean(signals.temperature_climate, month, h) for h in range(24)])
        )

    assert 15.5 <= daily_mean(1) <= 18.5  # ~17 degC in January
    assert 28.5 <= daily_mean(7) <= 31.0  # ~30 degC in July
    for month in range(1, 13):
        swing = climate_mean(signals.temperature_climate, month, 14) - climate_mean(
            signals.temperature_climate, month, 6
        )
        assert 4.5 <= swing <= 8.5, month


def test_humidity_is_higher_at_night() -> None:
    for month in (1, 4, 7, 10):
        night = climate_mean(signals.humidity_climate, month, 3)
        afternoon = climate_mean(signals.humidity_climate, month, 14)
        assert night > afternoon + 10
        assert afternoon >= 68
        assert night <= 95


# --- air pollution ------------------------------------------------------------------


def air_at(
    times_ms: list[int], weather: Weather | None = None, seed: int = 0
) -> dict[str, np.ndarray]:
    weather = weather or Weather()
    rng = np.random.default_rng(seed)
    rows = [signals.air_quality(t, weather, AirQualityParams(), rng) for t in times_ms]
    return {name: np.array([row[name] for row in rows]) for name in rows[0]}


def weekday_times(hour: int, year: int = 2025) -> list[int]:
    start = dt.date(year, 1, 1)
    days = [start + dt.timedelta(days=i) for i in range(365)]
    return [local_ms(d.year, d.month, d.day, hour) for d in days if d.weekday() < 5]


def test_weekday_rush_hour_pm25_above_small_hours() -> None:
    # Same weather every day, so only the daily cycle differs: 08:00 should
    # read ~1.4x 03:00; 1.2x leaves room for the noise.
    morning = air_at(weekday_times(8))["pm25"].mean()
    small_hours = air_at(weekday_times(3))["pm25"].mean()
    assert morning > 1.2 * small_hours


def test_pm25_daily_low_in_the_afternoon_and_a_night_bump() -> None:
    at = {h: air_at(weekday_times(h))["pm25"].mean() for h in (3, 8, 14, 18, 22)}
    assert at[14] == min(at.values())
    assert at[22] > 1.1 * at[14]  # the night-time inversion bump
    assert at[18] > 1.1 * at[14]  # the evening rush


def test_pm_fractions() -> None:
    air = air_at(weekday_times(8)[:120])
    enough = air["pm25"] > 30  # ratios are meaningless in the sensor noise near 0
    assert enough.sum() > 100
    pm1 = air["pm1"][enough] / air["pm25"][enough]
    pm10 = air["pm10"][enough] / air["pm25"][enough]
    assert 0.6 <= float(np.median(pm1)) <= 0.75
    assert 1.3 <= float(np.median(pm10)) <= 1.8


def test_humidity_inflates_optical_pm() -> None:
    assert signals.hygroscopic_growth(80.0, 0.25) == 1.0
    assert signals.hygroscopic_growth(92.0, 0.25) > 1.5
    assert signals.hygroscopic_growth(55.0, 0.25) < 0.8
    assert signals.hygroscopic_growth(100.0, 0.25) == signals.hygroscopic_growth(95.0, 0.25)
    assert signals.hygroscopic_growth(92.0, 0.0) == 1.0  # a dried inlet has no bias


def test_no2_follows_traffic_and_o3_peaks_in_the_afternoon() -> None:
    air = {h: air_at(weekday_times(h)[:150]) for h in (3, 8, 14)}
    assert air[8]["no2"].mean() > 1.5 * air[3]["no2"].mean()
    assert air[14]["o3"].mean() > 3 * air[3]["o3"].mean()
    # O3 anti-correlated with NO2 over the day (titration, photochemistry).
    hours = [local_ms(2025, 6, 2 + d, h) for d in range(20) for h in range(24)]
    summer = air_at(hours)
    assert float(np.corrcoef(summer["no2"], summer["o3"])[0, 1]) < -0.3


def test_outdoor_co2_stays_near_background() -> None:
    hours = [local_ms(2025, 3, 3 + d, h) for d in range(14) for h in range(24)]
    co2 = air_at(hours)["co2"]
    assert co2.min() > 400
    assert co2.max() < 520
    assert 430 < co2.mean() < 490


def test_weather_shifts_pm_but_not_its_mean() -> None:
    rng = np.random.default_rng(3)
    weather = signals.start_weather(rng)
    factors = []
    for _ in range(5000):
        weather = signals.step_weather(weather, 3 * 3600.0, rng)
        factors.append(math.exp(weather.pm_log - 0.5 * signals.WEATHER_PM_SIGMA**2))
    assert float(np.mean(factors)) == pytest.approx(1.0, abs=0.1)
    assert max(factors) > 1.6  # stagnant days
    assert min(factors) < 0.6  # ventilated days


@settings(max_examples=200, deadline=None)
@given(
    now_ms=st.integers(min_value=local_ms(2024, 1, 1), max_value=local_ms(2027, 1, 1)),
    seed=st.integers(min_value=0, max_value=2**32),
    pm_log=st.floats(min_value=-1.5, max_value=1.5),
    temperature_c=st.floats(min_value=-6, max_value=6),
    humidity_pct=st.floats(min_value=-20, max_value=20),
)
def test_air_quality_is_physical_for_any_time_and_weather(
    now_ms: int, seed: int, pm_log: float, temperature_c: float, humidity_pct: float
) -> None:
    weather = Weather(pm_log=pm_log, temperature_c=temperature_c, humidity_pct=humidity_pct)
    values = signals.air_quality(now_ms, weather, AirQualityParams(), np.random.default_rng(seed))
    assert set(values) == {"pm1", "pm25", "pm10", "co2", "no2", "o3", "temperature", "humidity"}
    assert all(math.isfinite(v) for v in values.values())
    assert min(values["pm1"], values["pm25"], values["pm10"], values["no2"]) >= 0
    assert values["o3"] >= 1
    assert 350 < values["co2"] < 600
    assert 20 <= values["humidity"] <= 100
    assert 0 < values["temperature"] < 45


# --- opening hours ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24/7", dict.fromkeys(range(7), ((0, 1440),))),
        ("Sat 08:00-12:00", {5: ((480, 720),)}),
        (HALL_HOURS, {**dict.fromkeys(range(5), ((480, 720), (810, 1020))), 5: ((480, 720),)}),
        ("Mon 00:00-24:00", {0: ((0, 1440),)}),
        ("Mon-Wed 09:00-10:00; Fri-Sun 20:00-21:00", {0: ((540, 600),), 1: ((540, 600),),
         2: ((540, 600),), 4: ((1200, 1260),), 5: ((1200, 1260),), 6: ((1200, 1260),)}),
    ],
)  # fmt: skip
def test_parse_opening_hours_accepts(
    text: str, expected: dict[int, tuple[tuple[int, int], ...]]
) -> None:
    week = signals.parse_opening_hours(text).week
    assert len(week) == 7
    assert {day: spans for day, spans in enumerate(week) if spans} == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "24x7",
        "Mon-Fri",
        "mon-fri 08:00-12:00",
        "Mon-Fry 08:00-12:00",
        "Fri-Mon 08:00-12:00",
        "Mon-Fri 8:00-12:00",
        "Mon-Fri 08:00-12:60",
        "Mon-Fri 08:00-25:00",
        "Mon-Fri 12:00-08:00",
        "Mon-Fri 13:00-17:00,08:00-12:00",
        "Mon-Fri 08:00-12:00,11:00-17:00",
        "Mon-Fri 08:00-12:00 13:00-17:00",
        "Mon-Fri 08:00-12:00;Sat 08:00-12:00",
        "Mon-Fri 08:00-12:00; Fri 13:00-17:00",
    ],
)
def test_parse_opening_hours_rejects(text: str) -> None:
    with pytest.raises(SettingsError) as info:
        signals.parse_opening_hours(text)
    assert info.value.key == "opening_hours"


def test_every_seed_site_has_parseable_hours() -> None:
    sites = tomllib.loads(SITES_PATH.read_text("utf-8"))["site"]
    assert sites
    for site in sites:
        signals.parse_opening_hours(site["opening_hours"])


@pytest.mark.parametrize(
    ("when", "is_open"),
    [
        ((2025, 3, 3, 9, 0), True),  # Monday morning
        ((2025, 3, 3, 7, 59), False),
        ((2025, 3, 3, 12, 30), False),  # lunch break
        ((2025, 3, 3, 13, 30), True),
        ((2025, 3, 3, 16, 59), True),
        ((2025, 3, 3, 17, 0), False),
        ((2025, 3, 8, 11, 0), True),  # Saturday morning
        ((2025, 3, 8, 14, 0), False),  # Saturday afternoon
        ((2025, 3, 9, 10, 0), False),  # Sunday
        ((2025, 3, 4, 3, 0), False),  # night
    ],
)
def test_is_open(when: tuple[int, int, int, int, int], is_open: bool) -> None:
    hours = signals.parse_opening_hours(HALL_HOURS)
    assert hours.is_open(local_ms(*when)) is is_open
    assert signals.ALWAYS_OPEN.is_open(local_ms(*when))


# --- service halls ------------------------------------------------------------------


def rate(hours_text: str, *when: int) -> float:
    hours = signals.parse_opening_hours(hours_text)
    return signals.arrival_rate_per_h(signals.hanoi_time(local_ms(*when)), hours, HallParams())


def test_arrival_rate_shape() -> None:
    # Wednesday 5 March 2025.
    peak = rate(HALL_HOURS, 2025, 3, 5, 9, 45)
    assert peak == pytest.approx(HallParams().peak_arrivals_per_h, rel=0.05)
    assert rate(HALL_HOURS, 2025, 3, 5, 10, 30) > 0.6 * peak
    assert rate(HALL_HOURS, 2025, 3, 5, 8, 5) < 0.6 * peak
    assert rate(HALL_HOURS, 2025, 3, 5, 11, 45) < 0.5 * peak
    assert rate(HALL_HOURS, 2025, 3, 5, 14, 0) > 1.5 * rate(HALL_HOURS, 2025, 3, 5, 16, 0)
    # Monday busier than Wednesday; closed at night, at lunch, on Sunday.
    assert rate(HALL_HOURS, 2025, 3, 3, 9, 45) > 1.2 * peak
    for when in (
        (2025, 3, 5, 3, 0),
        (2025, 3, 5, 12, 45),
        (2025, 3, 9, 9, 45),
        (2025, 3, 8, 15, 0),
    ):
        assert rate(HALL_HOURS, *when) == 0.0


def test_no_arrivals_while_closed() -> None:
    rng = np.random.default_rng(0)
    hours = signals.parse_opening_hours(HALL_HOURS)
    sunday = local_ms(2025, 3, 9)
    for t in range(sunday, sunday + DAY_MS, 60_000):
        lt = signals.hanoi_time(t)
        assert (
            signals.poisson_count(signals.arrival_rate_per_h(lt, hours, HallParams()), 60.0, rng)
            == 0
        )


def test_queue_builds_at_peak_and_is_sent_home_after_closing() -> None:
    rng = np.random.default_rng(5)
    params = HallParams()
    hours = signals.parse_opening_hours(HALL_HOURS)
    state = QueueState()
    lengths = {}
    start = local_ms(2025, 3, 3, 7)  # a Monday
    for t in range(start, start + 11 * HOUR_MS, 60_000):
        lt = signals.hanoi_time(t)
        arrivals = signals.poisson_count(signals.arrival_rate_per_h(lt, hours, params), 60.0, rng)
        state = signals.step_queue(
            state,
            arrivals=arrivals,
            dt_s=60.0,
            is_open=hours.is_open_at(lt),
            params=params,
            rng=rng,
        )
        lengths[lt.minute] = state.waiting
    assert lengths[7 * 60 + 30] == 0
    assert max(lengths[m] for m in range(10 * 60, 11 * 60 + 30)) > 10
    assert lengths[12 * 60 + 40] == 0  # lunch: served or sent home after 30 min
    assert lengths[17 * 60 + 45] == 0


def test_occupancy_conserves_people() -> None:
    rng = np.random.default_rng(2)
    occupancy = total_in = total_out = 0
    for minute in range(600):
        entering = int(rng.poisson(3.0)) if minute < 400 else 0
        occupancy, left = signals.step_occupancy(
            occupancy,
            entering=entering,
            dt_s=60.0,
            is_open=minute < 450,
            params=HallParams(),
            rng=rng,
        )
        total_in += entering
        total_out += left
        assert occupancy == total_in - total_out >= 0
    assert occupancy == 0  # everyone leaves after closing


# --- streets ------------------------------------------------------------------------


def vehicles_in_hour(hour: int, day: int = 5) -> tuple[int, int]:
    rng = np.random.default_rng(hour)
    start = local_ms(2025, 3, day, hour)
    counts = [
        signals.vehicle_counts(t, 1.0, StreetParams(), rng)
        for t in range(start, start + HOUR_MS, 1000)
    ]
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


def test_street_traffic_thousands_an_hour_at_rush_hour() -> None:
    morning_in, morning_out = vehicles_in_hour(8)
    evening_in, evening_out = vehicles_in_hour(18)
    night_in, night_out = vehicles_in_hour(3)
    assert 5000 < morning_in + morning_out < 12000
    assert morning_in > 1.3 * morning_out  # towards the centre in the morning
    assert evening_out > 1.3 * evening_in  # and home in the evening
    assert night_in + night_out < 0.1 * (morning_in + morning_out)
    sunday = sum(vehicles_in_hour(8, day=9))
    assert sunday < 0.8 * (morning_in + morning_out)


# --- conference endpoints -------------------------------------------------------------


def run_conference(days: int, seed: int) -> list[tuple[int, ConferenceState, dict[str, float]]]:
    rng = np.random.default_rng(seed)
    office = signals.parse_opening_hours("Mon-Fri 08:00-12:00,13:00-17:00")
    state = ConferenceState()
    out = []
    start = local_ms(2025, 3, 3)
    for t in range(start, start + days * DAY_MS, 30_000):
        state, values = signals.step_conference(
            state, t, 30.0, office_hours=office, params=ConferenceParams(), rng=rng
        )
        out.append((t, state, values))
    return out


def test_conference_endpoint_behaviour() -> None:
    run = run_conference(days=14, seed=4)
    online = [v for _, s, v in run if s.online]
    assert len(online) > 0.9 * len(run)
    loss = np.array([v["packet_loss"] for v in online])
    jitter = np.array([v["jitter"] for v in online])
    assert (loss < 1.0).mean() > 0.95  # mostly clean
    assert loss.max() > 2.0  # with bursts
    assert 5 <= float(np.median(jitter)) <= 30
    assert jitter.max() > 50
    meeting_cpu = [v["cpu"] for _, s, v in run if s.in_meeting]
    night_cpu = [v["cpu"] for t, s, v in run if signals.hanoi_time(t).hour < 5 and s.online]
    assert meeting_cpu
    assert np.mean(meeting_cpu) > np.mean(night_cpu) + 30
    meetings_at_night = [t for t, s, _ in run if s.in_meeting and signals.hanoi_time(t).hour < 6]
    assert not meetings_at_night
    offline = [v for _, s, v in run if not s.online]
    assert all(v["online"] == 0 and v["packet_loss"] == 0 for v in offline)


# --- street noise ---------------------------------------------------------------------


def mean_laeq(hour: int, day: int = 5) -> float:
    """Energy mean of an hour's 1 s LAeq on 2025-03-{day} (the 5th is a Wednesday)."""
    rng = np.random.default_rng(4)
    start = local_ms(2025, 3, day, hour)
    levels = [
        signals.noise_levels(t, 1.0, signals.NoiseParams(), rng)["laeq"]
        for t in range(start, start + HOUR_MS, 10_000)
    ]
    return 10.0 * math.log10(sum(10.0 ** (x / 10.0) for x in levels) / len(levels))


def test_noise_follows_traffic_loud_rush_hours_and_quiet_nights() -> None:
    rush, midday, night = mean_laeq(8), mean_laeq(13), mean_laeq(3)
    assert 74.0 < rush < 80.0  # a busy Hanoi road, above QCVN 26's 70 dBA
    assert night < rush - 10.0
    assert 58.0 < night < 68.0
    assert night < midday < rush + 0.5
    assert mean_laeq(8, day=9) < rush  # Sunday morning


@settings(max_examples=100, deadline=None)
@given(
    now_ms=st.integers(min_value=1_600_000_000_000, max_value=1_900_000_000_000),
    dt_s=st.floats(min_value=0.0, max_value=3600.0),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_noise_levels_are_ordered(now_ms: int, dt_s: float, seed: int) -> None:
    levels = signals.noise_levels(now_ms, dt_s, signals.NoiseParams(), np.random.default_rng(seed))
    assert levels["la90"] < levels["laeq"] < levels["lamax"]


def test_horns_set_lamax_at_the_rush_hour() -> None:
    rng = np.random.default_rng(8)
    start = local_ms(2025, 3, 5, 8)
    lamax = [
        signals.noise_levels(t, 60.0, signals.NoiseParams(), rng)["lamax"]
        for t in range(start, start + HOUR_MS, 60_000)
    ]
    assert sum(x >= 85.0 for x in lamax) > 40  # most minutes have a horn


# --- street flooding ------------------------------------------------------------------


def run_flood(year: int, month: int, days: int, seed: int) -> list[signals.FloodState]:
    rng = np.random.default_rng(seed)
    state = signals.FloodState()
    out = []
    start = local_ms(year, month, 1)
    for t in range(start, start + days * DAY_MS, 60_000):
        state = signals.step_flood(state, t, 60.0, params=signals.FloodParams(), rng=rng)
        out.append(state)
    return out


def test_water_is_mostly_zero_with_floods_in_the_rainy_season() -> None:
    summer = [s.depth_cm for seed in range(4) for s in run_flood(2025, 7, 31, seed)]
    winter = [s.depth_cm for seed in range(4) for s in run_flood(2025, 1, 31, seed)]
    dry_share = sum(d < 0.5 for d in summer) / len(summer)
    assert dry_share > 0.85  # mostly a dry (or merely wet) road
    assert max(summer) > 20.0  # but storms flood the street
    assert max(summer) < 300.0
    assert max(winter) < 5.0  # winter drizzle does not beat the drains


def test_a_flood_rises_in_the_rain_and_drains_over_hours() -> None:
    rng = np.random.default_rng(0)
    params = signals.FloodParams(mean_rain_s=1e12)  # the storm does not stop by chance
    state = signals.FloodState(raining=True, intensity_mm_h=50.0)
    t = local_ms(2025, 7, 10, 15)
    for _ in range(60):  # an hour of 50 mm/h
        state = signals.step_flood(state, t, 60.0, params=params, rng=rng)
        t += 60_000
    # 30 mm/h beyond the drains for an hour: ~26 cm with draining meanwhile.
    assert 20.0 < state.depth_cm < 30.0
    peak = state.depth_cm
    state = state._replace(raining=False, intensity_mm_h=0.0)
    drained = signals.FloodParams()
    for _ in range(120):  # two hours after the rain
        state = signals.step_flood(state, t, 60.0, params=drained, rng=rng)
        t += 60_000
        if state.raining:  # a new storm by chance: start again from dry
            break
    else:
        assert 0.25 * peak < state.depth_cm < 0.5 * peak  # exp(-1) of it after one tau


def test_flood_step_is_exact_for_any_step_length() -> None:
    params = signals.FloodParams(mean_rain_s=1e12)
    t = local_ms(2025, 7, 10, 15)
    one = signals.FloodState(raining=True, intensity_mm_h=40.0)
    sixty = one
    rng = np.random.default_rng(1)
    one = signals.step_flood(one, t, 3600.0, params=params, rng=rng)
    for i in range(60):
        sixty = signals.step_flood(sixty, t + i * 60_000, 60.0, params=params, rng=rng)
    assert one.depth_cm == pytest.approx(sixty.depth_cm, rel=1e-9)


# --- satisfaction ratings -------------------------------------------------------------


def test_ratings_are_mostly_satisfied() -> None:
    rng = np.random.default_rng(5)
    # 360 citizens an hour, one-second steps: 0.1 served a step, of whom
    # about two in three rate (P(at least one) = 1 - exp(-0.065) = 0.063).
    ratings = [signals.draw_rating(360.0, 1.0, rng) for _ in range(20_000)]
    rated = [r for r in ratings if r is not None]
    assert 0.055 < len(rated) / len(ratings) < 0.071
    shares = [rated.count(code) / len(rated) for code in range(3)]
    assert shares[0] + shares[1] > 0.9
    assert 0.03 < shares[2] < 0.12


def test_no_ratings_without_citizens() -> None:
    rng = np.random.default_rng(5)
    assert {signals.draw_rating(0.0, 60.0, rng) for _ in range(100)} == {None}
