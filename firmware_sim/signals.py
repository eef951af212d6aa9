"""Realistic signals for the simulated Hanoi fleet: pure functions of time, parameters and an rng.

What this computes:

- Hanoi local time (UTC+7, no DST) from integer milliseconds UTC;
- outdoor air: PM1 / PM2.5 / PM10, CO2, NO2, O3, temperature and relative
  humidity, from monthly climatology, daily cycles (traffic peaks, the
  night-time inversion, the afternoon photochemical peak), slowly varying
  "weather" (an Ornstein-Uhlenbeck process, i.e. AR(1) for any time step),
  the optical sensors' humidity bias and sensor noise;
- service halls: opening hours (the ``opening_hours`` grammar of
  ``cityhub/data/hanoi_sites.toml``), citizen arrivals (a Poisson process
  with a morning peak, an early-afternoon bump, busier Mondays), a simple
  multi-counter queue, hall occupancy from a camera at the door;
- street cameras: vehicles in / out following the traffic peaks;
- conference endpoints: online state, meetings in office hours, packet loss
  and jitter with bursts and spikes, CPU load;
- street noise: LAeq / LAmax / LA90 following the traffic, horns;
- street flooding: rain events by month and the water depth they leave on a
  low-lying street, draining over hours;
- satisfaction terminals: the ratings of the citizens a counter serves.

Every function takes the time (``now_ms``), its parameters, the previous
state where there is one, and a ``numpy.random.Generator``; it returns new
values and new state and touches nothing else. Nothing here reads the clock,
logs, or knows about devices, seq numbers, catalog ranges or transports:
``firmware_sim.models`` holds the per-device state and clips into the
catalog's ranges, ``firmware_sim.faults`` breaks things on purpose.

Scalar code on purpose: ``step()`` runs once per device per reading (up to
2,000 devices a second per process), and numpy's per-call overhead on
scalars (~1 us a ufunc) would cost more than the arithmetic; random draws
are taken as one small vector per step instead of one call per number.

The numbers below are approximate, from general knowledge of Hanoi's climate
(Vietnamese national climate normals as summarised in public references) and
published air-quality monitoring summaries (the US Embassy Hanoi PM2.5
monitor, the city's automatic stations as reported by OpenAQ / WAQI, and
peer-reviewed studies of Hanoi's seasonal and diurnal PM2.5 cycle). They are
meant to make dashboards and alert rules look and behave plausibly, not to
reproduce any station's record.
"""

from __future__ import annotations

import calendar
import datetime
import functools
import math
import re
from typing import Final, NamedTuple

import msgspec
import numpy as np

from contracts.errors import SettingsError

# --- Hanoi local time -------------------------------------------------------------

# Asia/Ho_Chi_Minh has been UTC+7 without daylight saving since 1975.
HANOI_UTC_OFFSET_MS: Final = 7 * 3_600_000
MS_PER_HOUR: Final = 3_600_000
MS_PER_DAY: Final = 86_400_000
MINUTES_PER_DAY: Final = 1440
_EPOCH_ORDINAL: Final = datetime.date(1970, 1, 1).toordinal()
_DAYS_IN_MONTH: Final = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
WEEKDAYS: Final = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
SATURDAY: Final = 5
SUNDAY: Final = 6


class LocalTime(NamedTuple):
    """A moment in Hanoi local time, in the forms the signals use."""

    weekday: int  # 0 = Monday .. 6 = Sunday
    minute: int  # minute of the day, [0, 1440)
    hour: float  # fractional hour of the day, [0, 24)
    month: float  # fractional month, [0, 12): 0.0 = 1 January 00:00, 0.5 = mid-January


@functools.lru_cache(maxsize=64)
def _local_day(days: int) -> tuple[int, int, int, int]:
    """(weekday, month - 1, day - 1, days in the month) of local day ``days`` since 1970-01-01.

    Cached: every device asks about the same few days, and the date
    arithmetic is most of the cost of a conversion.
    """
    date = datetime.date.fromordinal(_EPOCH_ORDINAL + days)
    leap_day = date.month == 2 and calendar.isleap(date.year)
    return date.weekday(), date.month - 1, date.day - 1, _DAYS_IN_MONTH[date.month - 1] + leap_day


def hanoi_time(now_ms: int) -> LocalTime:
    """Hanoi local time (UTC+7) of ``now_ms`` (integer milliseconds UTC)."""
    days, ms_of_day = divmod(now_ms + HANOI_UTC_OFFSET_MS, MS_PER_DAY)
    weekday, month0, day0, days_in_month = _local_day(days)
    hour = ms_of_day / MS_PER_HOUR
    month = month0 + (day0 + hour / 24.0) / days_in_month
    return LocalTime(weekday=weekday, minute=ms_of_day // 60_000, hour=hour, month=month)


def _monthly(table: tuple[float, ...], month: float) -> float:
    """Periodic linear interpolation of 12 monthly means placed at mid-month."""
    x = month - 0.5
    i = math.floor(x)
    f = x - i
    return table[i % 12] * (1.0 - f) + table[(i + 1) % 12] * f


def _hourly(table: tuple[float, ...], hour: float) -> float:
    """Periodic linear interpolation of 24 values placed on the hour."""
    i = math.floor(hour)
    f = hour - i
    return table[i % 24] * (1.0 - f) + table[(i + 1) % 24] * f


def _gauss(x: float, centre: float, width: float) -> float:
    return math.exp(-0.5 * ((x - centre) / width) ** 2)


def switch_probability(rate_per_s: float, dt_s: float) -> float:
    """Probability that a Poisson event of ``rate_per_s`` happens within ``dt_s``.

    Exact for any step length, so a two-state process behaves the same at 1 s
    steps and under time acceleration.
    """
    if rate_per_s <= 0.0 or dt_s <= 0.0:
        return 0.0
    return -math.expm1(-rate_per_s * dt_s)


def _flip(state: bool, leave_rate_per_s: float, dt_s: float, u: float) -> bool:
    """Two-state Markov chain step: leave ``state`` with the given rate."""
    return (not state) if u < switch_probability(leave_rate_per_s, dt_s) else state


def ou_step(x: float, *, dt_s: float, tau_s: float, sigma: float, z: float) -> float:
    """One exact Ornstein-Uhlenbeck step (mean 0, stationary std ``sigma``) over ``dt_s``.

    ``z`` is a standard normal draw. For a fixed step this is the AR(1)
    ``x' = a x + sigma sqrt(1 - a^2) z`` with ``a = exp(-dt/tau)``; unlike a
    fixed-step AR(1) it stays right when steps are irregular or accelerated.
    """
    if dt_s <= 0.0:
        return x
    a = math.exp(-dt_s / tau_s)
    return a * x + sigma * math.sqrt(1.0 - a * a) * z


# --- outdoor climate ----------------------------------------------------------------
#
# Hanoi monthly means (approximate climate normals, 1991-2020 order of
# magnitude): a cool, drizzly late winter (January ~16-17 degC, RH in the
# 80s in February-April from the "mua phun" drizzle) and a hot, humid monsoon
# summer (June-July ~30 degC).
TEMPERATURE_MONTHLY_C: Final = (
    16.6,
    17.8,
    20.4,
    24.2,
    27.9,
    29.8,
    30.0,
    29.4,
    28.3,
    25.8,
    22.4,
    18.6,
)
# Mean daily range (max - min): smallest in the overcast drizzle months,
# largest in the dry, clear autumn.
TEMPERATURE_RANGE_MONTHLY_C: Final = (6.0, 5.2, 5.0, 6.0, 7.2, 7.0, 6.8, 6.6, 6.8, 7.2, 7.8, 7.4)
HUMIDITY_MONTHLY_PCT: Final = (
    78.0,
    82.0,
    85.0,
    85.0,
    80.0,
    79.0,
    80.0,
    83.0,
    80.0,
    77.0,
    75.0,
    75.0,
)
# Relative humidity swings opposite to temperature: about +-8 %RH around the
# mean (near-saturated at dawn, 65-75 % in the afternoon).
HUMIDITY_DAILY_AMPLITUDE_PCT: Final = 8.0


def temperature_shape(hour: float) -> float:
    """Daily temperature shape in [-1, 1]: minimum at 06:00 (dawn), maximum at 14:00.

    Eight hours of warming, sixteen of cooling, each a half cosine.
    """
    if 6.0 <= hour < 14.0:
        return -math.cos(math.pi * (hour - 6.0) / 8.0)
    return math.cos(math.pi * ((hour - 14.0) % 24.0) / 16.0)


def temperature_climate(lt: LocalTime) -> float:
    """Expected outdoor temperature (degC) without weather: season plus the daily swing."""
    mean = _monthly(TEMPERATURE_MONTHLY_C, lt.month)
    half_range = 0.5 * _monthly(TEMPERATURE_RANGE_MONTHLY_C, lt.month)
    return mean + half_range * temperature_shape(lt.hour)


def humidity_climate(lt: LocalTime) -> float:
    """Expected relative humidity (%) without weather: higher at night, lower mid-afternoon."""
    mean = _monthly(HUMIDITY_MONTHLY_PCT, lt.month)
    return mean - HUMIDITY_DAILY_AMPLITUDE_PCT * temperature_shape(lt.hour)


# --- traffic and the boundary layer --------------------------------------------------

# Relative road traffic on a weekday (1.0 = the rush-hour peak), hour by hour
# from 00:00: the motorbike commute peaks at 07:00-09:00 and 17:00-19:00,
# traffic stays heavy through the day and falls off after 22:00. Shape of
# published Hanoi traffic counts, approximate.
TRAFFIC_WEEKDAY: Final = (
    0.08, 0.05, 0.04, 0.04, 0.08, 0.25, 0.60, 0.95, 1.00, 0.80, 0.65, 0.65,
    0.55, 0.55, 0.60, 0.65, 0.80, 1.00, 0.95, 0.70, 0.50, 0.40, 0.28, 0.15,
)  # fmt: skip
# Weekend traffic: no commute, so lower (Saturday is a half working day for
# many offices and schools).
TRAFFIC_WEEKEND_FACTOR: Final = {SATURDAY: 0.85, SUNDAY: 0.70}


def traffic_index(lt: LocalTime) -> float:
    """Relative road traffic, 1.0 at a weekday rush hour."""
    return _hourly(TRAFFIC_WEEKDAY, lt.hour) * TRAFFIC_WEEKEND_FACTOR.get(lt.weekday, 1.0)


def inversion_index(lt: LocalTime) -> float:
    """Night-time boundary-layer trapping in [0, 1]: 1 at 02:00, 0 at 14:00.

    After sunset the surface cools, a shallow inversion forms and what is
    emitted stays near the ground; by early afternoon the mixed layer is
    deepest. A cosine is the simplest shape with those extremes.
    """
    return 0.5 + 0.5 * math.cos(2.0 * math.pi * (lt.hour - 2.0) / 24.0)


def photochemistry_index(lt: LocalTime) -> float:
    """Ozone production in [0, 1]: zero at night, peaking at 13:30 (sun and heat)."""
    x = (lt.hour - 7.5) / 12.0
    return math.sin(math.pi * x) ** 1.5 if 0.0 < x < 1.0 else 0.0


# --- air pollution ------------------------------------------------------------------

# Monthly mean PM2.5 (ug/m3) near a busy Hanoi road: the dry north-east
# monsoon winter with stagnant air, shallow inversions and regional burning
# gives 60-90 ug/m3 monthly means in December-February; the rainy south-west
# monsoon summer washes out to 20-30. Approximate, from the US Embassy
# monitor and city station summaries for 2016-2023.
PM25_MONTHLY_UGM3: Final = (82.0, 68.0, 60.0, 45.0, 34.0, 25.0, 22.0, 24.0, 32.0, 48.0, 64.0, 78.0)
# NO2 is traffic-driven all year; winter inversions raise it by about a
# quarter and summer rain and deeper mixing lower it (roadside annual means
# ~35-45 ug/m3; the daily shape below averages ~0.8 of this base).
NO2_BASE_UGM3: Final = 48.0
NO2_SEASONAL_AMPLITUDE: Final = 0.25
# O3 is highest in the sunny transition months (April-May, September-October)
# and lower in the cloudy drizzle months and at the height of the rains.
O3_SEASON_MONTHLY: Final = (0.80, 0.80, 0.90, 1.10, 1.20, 1.00, 0.90, 0.90, 1.10, 1.20, 1.00, 0.85)
# CO2: the global background (~420-425 ppm in 2024, NOAA) plus an urban
# enhancement of a few tens of ppm from traffic and the night-time inversion.
CO2_BACKGROUND_PPM: Final = 422.0
CO2_TRAFFIC_PPM: Final = 40.0
CO2_INVERSION_PPM: Final = 30.0

# Effective hygroscopic growth of the particle mass an optical counter sees:
# kappa-Koehler growth m_wet/m_dry = 1 + (rho_w/rho_p) kappa aw/(1 - aw) with
# kappa ~0.4 for urban aerosol and rho_p ~1.65 g/cm3 gives ~0.25 (Crilley et
# al. 2018 found this form for low-cost optical sensors). The bias is
# normalised at 80 %RH, about Hanoi's annual mean, so monthly means stay near
# the table above while humid hours read high and dry hours low. Above 95 %RH
# the formula explodes (fog); it is capped there.
HYGROSCOPIC_KAPPA_EFF: Final = 0.25
HUMIDITY_REFERENCE_PCT: Final = 80.0
HUMIDITY_GROWTH_CAP_PCT: Final = 95.0


def _growth(humidity_pct: float, kappa: float) -> float:
    aw = min(max(humidity_pct, 0.0), HUMIDITY_GROWTH_CAP_PCT) / 100.0
    return 1.0 + kappa * aw / (1.0 - aw)


def hygroscopic_growth(humidity_pct: float, kappa: float) -> float:
    """Factor by which humidity inflates an optical PM reading, relative to 80 %RH."""
    return _growth(humidity_pct, kappa) / _growth(HUMIDITY_REFERENCE_PCT, kappa)


def _pm_diurnal_raw(lt: LocalTime) -> float:
    # A floor (regional background) plus a traffic part and an inversion part;
    # weights chosen so that 08:00 reads ~1.4x 03:00 and 14:00 is the daily low.
    return 0.45 + 0.50 * traffic_index(lt) + 0.35 * inversion_index(lt)


# Mean of the raw weekday shape, so that the diurnal factor averages 1 over a
# weekday and the monthly table keeps its meaning.
_PM_DIURNAL_MEAN: Final = sum(
    _pm_diurnal_raw(LocalTime(weekday=2, minute=m, hour=m / 60.0, month=0.5))
    for m in range(0, MINUTES_PER_DAY, 15)
) / (MINUTES_PER_DAY / 15)


def pm_diurnal_factor(lt: LocalTime) -> float:
    """Daily PM2.5 cycle, averaging 1.0 over a weekday: rush hours and the night bump."""
    return _pm_diurnal_raw(lt) / _PM_DIURNAL_MEAN


class Weather(NamedTuple):
    """Slowly varying departures from climatology (Ornstein-Uhlenbeck states)."""

    pm_log: float = 0.0  # log of the PM multiplier: stagnant (+) or ventilated (-) days
    temperature_c: float = 0.0  # anomaly, degC
    humidity_pct: float = 0.0  # anomaly, %RH


# Synoptic weather: a stagnant spell or a cold surge lasts a few days. The PM
# spread (a factor of e^0.35 ~ 1.4 either way, one sigma) matches the day-to-
# day scatter of Hanoi's daily means within a month.
WEATHER_PM_SIGMA: Final = 0.35
WEATHER_PM_TAU_S: Final = 2.0 * 86_400
WEATHER_TEMPERATURE_SIGMA_C: Final = 1.5
WEATHER_TEMPERATURE_TAU_S: Final = 3.0 * 86_400
WEATHER_HUMIDITY_SIGMA_PCT: Final = 5.0
WEATHER_HUMIDITY_TAU_S: Final = 1.5 * 86_400


def start_weather(rng: np.random.Generator) -> Weather:
    """A weather state drawn from the stationary distribution."""
    z = rng.standard_normal(3).tolist()
    return Weather(
        pm_log=WEATHER_PM_SIGMA * z[0],
        temperature_c=WEATHER_TEMPERATURE_SIGMA_C * z[1],
        humidity_pct=WEATHER_HUMIDITY_SIGMA_PCT * z[2],
    )


def step_weather(weather: Weather, dt_s: float, rng: np.random.Generator) -> Weather:
    """Advance the weather by ``dt_s`` seconds (exact for any step)."""
    if dt_s <= 0.0:
        return weather
    z = rng.standard_normal(3).tolist()
    return Weather(
        pm_log=ou_step(
            weather.pm_log, dt_s=dt_s, tau_s=WEATHER_PM_TAU_S, sigma=WEATHER_PM_SIGMA, z=z[0]
        ),
        temperature_c=ou_step(
            weather.temperature_c,
            dt_s=dt_s,
            tau_s=WEATHER_TEMPERATURE_TAU_S,
            sigma=WEATHER_TEMPERATURE_SIGMA_C,
            z=z[1],
        ),
        humidity_pct=ou_step(
            weather.humidity_pct,
            dt_s=dt_s,
            tau_s=WEATHER_HUMIDITY_TAU_S,
            sigma=WEATHER_HUMIDITY_SIGMA_PCT,
            z=z[2],
        ),
    )


class AirQualityParams(msgspec.Struct, frozen=True, kw_only=True):
    """Per-monitor constants."""

    # PM level relative to a kerbside monitor on a busy road (1.0); a ward
    # office yard set back from the road sees less (~0.85).
    pm_scale: float = 1.0
    # Fine fractions: PM1 is ~0.6-0.75 of PM2.5 and PM10 ~1.3-1.8x PM2.5 in
    # Hanoi's combustion-dominated aerosol. None: the device model draws one
    # per monitor from those ranges; air_quality() then uses the midpoints.
    pm1_ratio: float | None = None
    pm10_ratio: float | None = None
    # Exposure to traffic emissions (NO2, CO2) relative to a kerbside monitor.
    traffic_scale: float = 1.0
    # Optical sensor humidity bias (0 for a dried, reference-grade inlet).
    humidity_kappa: float = HYGROSCOPIC_KAPPA_EFF


# Sensor noise. PMS5003 / SDS011: +-10 % or +-10 ug/m3 stated accuracy; the
# sample-to-sample scatter is smaller, ~1.5 ug/m3 plus 5 %. SHT3x-class
# temperature 0.1 degC, humidity 0.5 %RH; electrochemical gas cells a few
# ug/m3; NDIR CO2 ~5 ppm.
PM_NOISE_UGM3: Final = 1.5
PM1_RATIO_MID: Final = 0.68
PM10_RATIO_MID: Final = 1.55
PM_NOISE_RELATIVE: Final = 0.05


def air_quality(
    now_ms: int, weather: Weather, params: AirQualityParams, rng: np.random.Generator
) -> dict[str, float]:
    """One outdoor air reading at ``now_ms`` under ``weather``, keyed by catalog metric name.

    Values are physically sensible (non-negative concentrations, RH <= 100)
    but not clipped to the catalog: that is the device model's job.
    """
    z = rng.standard_normal(10).tolist()
    lt = hanoi_time(now_ms)
    traffic = traffic_index(lt)
    inversion = inversion_index(lt)

    temperature = temperature_climate(lt) + weather.temperature_c + 0.1 * z[0]
    humidity = humidity_climate(lt) + weather.humidity_pct + 0.5 * z[1]
    humidity = min(max(humidity, 20.0), 100.0)

    pm_true = (
        _monthly(PM25_MONTHLY_UGM3, lt.month)
        * pm_diurnal_factor(lt)
        * params.pm_scale
        # exp(x - sigma^2/2) has mean 1: weather does not shift the monthly mean.
        * math.exp(weather.pm_log - 0.5 * WEATHER_PM_SIGMA**2)
    )
    pm_optical = pm_true * hygroscopic_growth(humidity, params.humidity_kappa)
    pm25 = max(0.0, pm_optical * (1.0 + PM_NOISE_RELATIVE * z[2]) + PM_NOISE_UGM3 * z[3])
    pm1_ratio = PM1_RATIO_MID if params.pm1_ratio is None else params.pm1_ratio
    pm10_ratio = PM10_RATIO_MID if params.pm10_ratio is None else params.pm10_ratio
    pm1 = max(0.0, pm25 * (pm1_ratio + 0.02 * z[4]))
    pm10 = max(0.0, pm25 * (pm10_ratio + 0.05 * z[5]))

    # Traffic emits NO2 (and NO, which becomes NO2); the night-time inversion
    # keeps it near the ground; midday sunlight photolyses it and the deep
    # mixed layer dilutes it, so the afternoon is the daily low. Stagnant
    # weather traps it too, a little less than PM.
    season_no2 = 1.0 + NO2_SEASONAL_AMPLITUDE * math.cos(2.0 * math.pi * (lt.month - 0.5) / 12.0)
    no2 = (
        NO2_BASE_UGM3
        * season_no2
        * (0.35 + 0.90 * traffic * params.traffic_scale)
        * (0.50 + 0.90 * inversion)
        * (1.0 - 0.3 * photochemistry_index(lt))
        * math.exp(0.6 * weather.pm_log)
    )
    no2 = max(0.0, no2 + 2.0 * z[6])
    # Photochemical peak in the afternoon; fresh NO from traffic titrates O3
    # (NO + O3 -> NO2), so O3 is low where and when NO2 is high.
    o3 = _monthly(O3_SEASON_MONTHLY, lt.month) * (30.0 + 100.0 * photochemistry_index(lt))
    o3 = max(1.0, o3 - 0.5 * no2 + 3.0 * z[7])
    co2 = (
        CO2_BACKGROUND_PPM
        + CO2_TRAFFIC_PPM * traffic * params.traffic_scale
        + CO2_INVERSION_PPM * inversion
        + 5.0 * z[8]
    )
    return {
        "pm1": pm1,
        "pm25": pm25,
        "pm10": pm10,
        "co2": co2,
        "no2": no2,
        "o3": o3,
        "temperature": temperature,
        "humidity": humidity,
    }


# --- opening hours ------------------------------------------------------------------

_DAY = "Mon|Tue|Wed|Thu|Fri|Sat|Sun"
_RANGE = r"\d\d:\d\d-\d\d:\d\d"
_RULE_RE: Final = re.compile(
    rf"(?P<first>{_DAY})(?:-(?P<last>{_DAY}))? (?P<ranges>{_RANGE}(?:,{_RANGE})*)"
)


class OpeningHours(msgspec.Struct, frozen=True):
    """Open minute spans ``[start, end)`` of local time per weekday (0 = Monday)."""

    week: tuple[tuple[tuple[int, int], ...], ...]

    def is_open_at(self, lt: LocalTime) -> bool:
        return any(start <= lt.minute < end for start, end in self.week[lt.weekday])

    def is_open(self, now_ms: int) -> bool:
        return self.is_open_at(hanoi_time(now_ms))


ALWAYS_OPEN: Final = OpeningHours(week=tuple(((0, MINUTES_PER_DAY),) for _ in WEEKDAYS))


def _minute(text: str, spec: str) -> int:
    hours, minutes = int(text[:2]), int(text[3:])
    if minutes > 59 or hours > 24 or (hours == 24 and minutes):
        raise SettingsError("opening_hours", f"{text!r} in {spec!r} is not a time of day")
    return hours * 60 + minutes


def parse_opening_hours(text: str) -> OpeningHours:
    """Parse the seed file's opening hours: ``"24/7"`` or rules joined by ``"; "``.

    A rule is ``<day>[-<day>] HH:MM-HH:MM[,HH:MM-HH:MM...]`` with ascending,
    non-overlapping ranges; a day no rule names is closed. Example:
    ``"Mon-Fri 08:00-12:00,13:30-17:00; Sat 08:00-12:00"``. Raises
    SettingsError (key ``opening_hours``) on anything else.
    """
    if text == "24/7":
        return ALWAYS_OPEN
    week: list[tuple[tuple[int, int], ...] | None] = [None] * 7
    for rule in text.split("; "):
        match = _RULE_RE.fullmatch(rule)
        if match is None:
            raise SettingsError(
                "opening_hours", f"rule {rule!r} in {text!r} is not '<days> <ranges>'"
            )
        first = WEEKDAYS.index(match["first"])
        last = WEEKDAYS.index(match["last"]) if match["last"] else first
        if last < first:
            raise SettingsError("opening_hours", f"day span in {rule!r} runs backwards")
        spans: list[tuple[int, int]] = []
        for piece in match["ranges"].split(","):
            start, end = _minute(piece[:5], text), _minute(piece[6:], text)
            if end <= start or (spans and start < spans[-1][1]):
                raise SettingsError("opening_hours", f"range {piece!r} in {text!r} is out of order")
            spans.append((start, end))
        for day in range(first, last + 1):
            if week[day] is not None:
                raise SettingsError("opening_hours", f"{WEEKDAYS[day]} is named twice in {text!r}")
            week[day] = tuple(spans)
    return OpeningHours(week=tuple(day or () for day in week))


# --- service halls: arrivals, queue, occupancy ---------------------------------------


class HallParams(msgspec.Struct, frozen=True, kw_only=True):
    """One queue: the citizens one kiosk issues tickets to, and the counters that serve them."""

    # Citizens an hour at the 09:00-10:30 peak. A district one-stop shop
    # takes a few hundred dossiers a day over two kiosks: ~45/h a kiosk at
    # peak gives 150-250 tickets a weekday per kiosk (Mondays most) and ~65
    # on a Saturday morning with the profile below.
    peak_arrivals_per_h: float = 45.0
    # Counters serving this queue and the mean time a citizen spends at one
    # (a dossier check or hand-back takes 5-10 minutes). 4 x 10/h = 40/h is
    # a little under the peak, so a queue builds mid-morning and clears by noon.
    counters: int = 4
    service_time_s: float = 360.0
    # Counters keep serving the waiting queue this long after closing (or
    # into the lunch break); whoever still waits then is told to come back.
    overtime_s: float = 1800.0
    # People through the door per citizen with a ticket (relatives,
    # representatives, people asking at the information desk).
    people_per_citizen: float = 1.3
    # Mean time in the hall after entering while open; after closing people
    # leave within minutes.
    dwell_open_s: float = 2400.0
    dwell_closed_s: float = 300.0


# Busier Mondays (the weekend's backlog), a quieter Friday afternoon mood and
# a lighter Saturday-morning reception; relative to midweek.
HALL_WEEKDAY_FACTOR: Final = (1.3, 1.1, 1.0, 1.0, 0.9, 0.6, 1.0)


def hall_profile(hour: float) -> float:
    """Relative arrival rate over an open day, 1.0 at the 09:45 peak.

    A floor, the morning peak (09:00-10:30) and an early-afternoon bump after
    the lunch break (~14:00).
    """
    return 0.3 + 0.7 * _gauss(hour, 9.75, 0.8) + 0.3 * _gauss(hour, 14.0, 0.6)


def arrival_rate_per_h(lt: LocalTime, hours: OpeningHours, params: HallParams) -> float:
    """Expected citizens per hour at ``lt``: zero while the hall is closed."""
    if not hours.is_open_at(lt):
        return 0.0
    return params.peak_arrivals_per_h * hall_profile(lt.hour) * HALL_WEEKDAY_FACTOR[lt.weekday]


def poisson_count(rate_per_h: float, dt_s: float, rng: np.random.Generator) -> int:
    """Events of a Poisson process of ``rate_per_h`` within ``dt_s`` (no draw when zero)."""
    mean = rate_per_h * dt_s / 3600.0
    return int(rng.poisson(mean)) if mean > 0.0 else 0


class QueueState(NamedTuple):
    waiting: int = 0  # citizens holding a ticket and not yet done at a counter
    closed_s: float = 0.0  # seconds since the hall last closed (0 while open)


def step_queue(
    state: QueueState,
    *,
    arrivals: int,
    dt_s: float,
    is_open: bool,
    params: HallParams,
    rng: np.random.Generator,
) -> QueueState:
    """Arrivals join, counters serve; after ``overtime_s`` closed, the rest are sent home.

    A busy counter finishes a citizen at rate ``1 / service_time_s``; at most
    ``counters`` citizens are being served at once.
    """
    waiting = state.waiting + arrivals
    closed_s = 0.0 if is_open else state.closed_s + max(dt_s, 0.0)
    if not is_open and closed_s >= params.overtime_s:
        return QueueState(waiting=0, closed_s=closed_s)
    busy = min(waiting, params.counters)
    if busy and dt_s > 0.0:
        waiting -= min(waiting, int(rng.poisson(busy * dt_s / params.service_time_s)))
    return QueueState(waiting=waiting, closed_s=closed_s)


def step_occupancy(
    occupancy: int,
    *,
    entering: int,
    dt_s: float,
    is_open: bool,
    params: HallParams,
    rng: np.random.Generator,
) -> tuple[int, int]:
    """People inside after ``dt_s``: each leaves at rate 1/dwell. Returns (occupancy, left)."""
    dwell_s = params.dwell_open_s if is_open else params.dwell_closed_s
    p_leave = switch_probability(1.0 / dwell_s, dt_s)
    left = int(rng.binomial(occupancy, p_leave)) if occupancy and p_leave > 0.0 else 0
    return occupancy + entering - left, left


# --- street traffic -----------------------------------------------------------------


class StreetParams(msgspec.Struct, frozen=True, kw_only=True):
    # Vehicles an hour, both directions, at a weekday rush hour. A big Hanoi
    # road (Giai Phong, Nguyen Trai) carries several thousand vehicles an hour
    # at peak, ~85-90 % of them motorbikes.
    peak_vehicles_per_h: float = 8000.0
    # Share of the flow towards the centre ("in") at the morning peak; the
    # evening peak mirrors it.
    commute_share: float = 0.62


def vehicle_counts(
    now_ms: int, dt_s: float, params: StreetParams, rng: np.random.Generator
) -> tuple[int, int]:
    """Vehicles inbound and outbound within the ``dt_s`` before ``now_ms``."""
    if dt_s <= 0.0:
        return 0, 0
    lt = hanoi_time(now_ms)
    rate = params.peak_vehicles_per_h * traffic_index(lt)
    # +1 at the morning peak (inbound heavy), -1 at the evening peak.
    tilt = _gauss(lt.hour, 8.0, 1.2) - _gauss(lt.hour, 17.8, 1.2)
    share_in = 0.5 + (params.commute_share - 0.5) * tilt
    mean_in = rate * share_in * dt_s / 3600.0
    mean_out = rate * (1.0 - share_in) * dt_s / 3600.0
    counts = rng.poisson((mean_in, mean_out)).tolist()
    return int(counts[0]), int(counts[1])


# --- conference endpoints -----------------------------------------------------------


class ConferenceParams(msgspec.Struct, frozen=True, kw_only=True):
    # Registration outages (network, SIP registrar): one every few days,
    # back within ~15 minutes.
    mean_online_s: float = 3.0 * 86_400
    mean_offline_s: float = 900.0
    # Commune offices join city meetings a few times a day in office hours.
    meeting_starts_per_h: float = 0.5
    mean_meeting_s: float = 3000.0
    # Congestion bursts on the commune's uplink: one every couple of hours,
    # a minute long, 2-12 % loss and jitter of 60-200 ms.
    bursts_per_h: float = 0.5
    mean_burst_s: float = 60.0
    # Isolated jitter spikes (a big I-frame, a Wi-Fi retry storm).
    jitter_spike_probability: float = 0.01


class ConferenceState(NamedTuple):
    online: bool = True
    in_meeting: bool = False
    burst: bool = False


def step_conference(
    state: ConferenceState,
    now_ms: int,
    dt_s: float,
    *,
    office_hours: OpeningHours,
    params: ConferenceParams,
    rng: np.random.Generator,
) -> tuple[ConferenceState, dict[str, float]]:
    """Advance the endpoint by ``dt_s`` and give its reading (catalog metric names)."""
    u = rng.random(4).tolist()
    z = rng.standard_normal(3).tolist()
    office = office_hours.is_open(now_ms)
    online = _flip(
        state.online,
        1.0 / params.mean_online_s if state.online else 1.0 / params.mean_offline_s,
        dt_s,
        u[0],
    )
    if state.in_meeting:
        # Meetings that run past office hours are wound up within ~10 minutes.
        end_rate = 1.0 / params.mean_meeting_s if office else 1.0 / 600.0
        in_meeting = _flip(True, end_rate, dt_s, u[1]) and online
    else:
        start_rate = params.meeting_starts_per_h / 3600.0 if office and online else 0.0
        in_meeting = _flip(False, start_rate, dt_s, u[1])
    burst = _flip(
        state.burst,
        1.0 / params.mean_burst_s if state.burst else params.bursts_per_h / 3600.0,
        dt_s,
        u[2],
    )
    new_state = ConferenceState(online=online, in_meeting=in_meeting, burst=burst)

    if not online:
        # Not registered: no media flows; the box still reports its CPU.
        return new_state, {"online": 0, "packet_loss": 0.0, "jitter": 0.0, "cpu": 6.0 + z[2]}
    if burst:
        loss = 2.0 + 10.0 * u[3]
        jitter = 60.0 + 140.0 * u[3]
    else:
        # Log-normal: median 0.05 % idle / 0.1 % in a meeting, rarely above 1 %.
        loss = (0.1 if in_meeting else 0.05) * math.exp(0.9 * z[0])
        # Median 12 ms, mostly 5-30 ms; occasional 4-8x spikes.
        jitter = 12.0 * math.exp(0.35 * z[1])
        if u[3] < params.jitter_spike_probability:
            jitter *= 4.0 + 4.0 * u[3] / params.jitter_spike_probability
    # Video encoding dominates CPU in a meeting; idle is the UI and keepalives.
    cpu = 55.0 + 8.0 * z[2] if in_meeting else 10.0 + 3.0 * z[2]
    return new_state, {"online": 1, "packet_loss": loss, "jitter": jitter, "cpu": cpu}


# --- street noise -------------------------------------------------------------------


class NoiseParams(msgspec.Struct, frozen=True, kw_only=True):
    # LAeq beside a big Hanoi road at a weekday rush hour. Published Hanoi
    # surveys put daytime LAeq on main roads at ~72-80 dBA, mostly above the
    # 70 dBA of QCVN 26:2010/BTNMT.
    peak_laeq_dba: float = 77.0
    # Horns: Hanoi's motorbike traffic honks constantly; a horn close to the
    # meter sets LAmax to ~85-95 dBA. Events an hour at the rush-hour peak.
    horns_per_h: float = 120.0


# Road traffic noise grows as 10 log10 of the flow (each doubling of the
# vehicles adds ~3 dB); below this share of the peak flow the road's own
# noise stops falling (distant traffic, the city's hum). 0.04 of the peak
# puts the small hours ~14 dB under the rush hour: ~63 dBA LAeq, which is
# what a Hanoi kerbside sees at 03:00.
NOISE_TRAFFIC_FLOOR: Final = 0.04


def noise_levels(
    now_ms: int, dt_s: float, params: NoiseParams, rng: np.random.Generator
) -> dict[str, float]:
    """LAeq, LAmax and LA90 (dBA) of the interval ``dt_s`` before ``now_ms``, by catalog name.

    LAeq follows the traffic (``traffic_index``) on a log scale. The gap to
    LAmax and to LA90 widens as traffic thins: dense traffic is a steady
    roar, a night road is quiet between single passing vehicles.
    """
    z = rng.standard_normal(3).tolist()
    u = rng.random(2).tolist()
    traffic = traffic_index(hanoi_time(now_ms))
    sparse = 1.0 - min(traffic, 1.0)
    laeq = params.peak_laeq_dba + 10.0 * math.log10(max(traffic, NOISE_TRAFFIC_FLOOR)) + 1.0 * z[0]
    lamax = laeq + 6.0 + 6.0 * sparse + 1.5 * abs(z[1])
    if u[0] < switch_probability(params.horns_per_h * traffic / 3600.0, dt_s):
        lamax = max(lamax, 85.0 + 10.0 * u[1])
    la90 = laeq - 5.0 - 7.0 * sparse - 0.8 * abs(z[2])
    return {"laeq": laeq, "lamax": lamax, "la90": la90}


# --- street flooding ----------------------------------------------------------------

# Hanoi monthly rainfall (mm; approximate climate normals, Lang station):
# a dry winter and a rainy season from May to September with July-August
# above 280 mm.
RAIN_MONTHLY_MM: Final = (
    19.0, 26.0, 44.0, 90.0, 188.0, 240.0, 288.0, 318.0, 265.0, 130.0, 43.0, 23.0,
)  # fmt: skip
# Rain events a day: winter drizzle is frequent but light, summer storms
# come most afternoons. With the mean event length below, the mean
# intensity of an event follows from the monthly total (~1-2 mm/h in
# January, ~10-12 mm/h in July-August).
RAIN_EVENTS_PER_DAY: Final = (
    0.40,
    0.50,
    0.55,
    0.45,
    0.50,
    0.55,
    0.60,
    0.60,
    0.50,
    0.35,
    0.25,
    0.25,
)


class FloodParams(msgspec.Struct, frozen=True, kw_only=True):
    mean_rain_s: float = 5400.0
    # Rain beyond what the street's drains take runs off and collects: a
    # low-lying street (Nguyen Khuyen, Thuy Khue) gathers the run-off of
    # the blocks around it, ~1 cm of depth an hour per mm/h of excess.
    drain_capacity_mm_h: float = 20.0
    depth_cm_per_excess_mm: float = 1.0
    # Once the rain eases, the pumps and the drains take the water away over
    # hours: an exponential decay with this time constant.
    drain_tau_s: float = 2.0 * 3600.0


class FloodState(NamedTuple):
    raining: bool = False
    intensity_mm_h: float = 0.0  # of the current rain event
    depth_cm: float = 0.0


def step_flood(
    state: FloodState,
    now_ms: int,
    dt_s: float,
    *,
    params: FloodParams,
    rng: np.random.Generator,
) -> FloodState:
    """Advance rain and water depth by ``dt_s`` ending at ``now_ms``.

    Rain events start at the month's rate and last ``mean_rain_s`` on
    average, with an exponentially distributed intensity around the
    month's mean. The depth relaxes towards ``excess x gain x tau``
    (exactly, for any step): it rises while the rain exceeds the drains and
    drains away over hours after.
    """
    if dt_s <= 0.0:
        return state
    u = rng.random(3).tolist()
    month = hanoi_time(now_ms).month
    events_per_day = _monthly(RAIN_EVENTS_PER_DAY, month)
    raining = _flip(
        state.raining,
        1.0 / params.mean_rain_s if state.raining else events_per_day / 86_400.0,
        dt_s,
        u[0],
    )
    intensity = state.intensity_mm_h
    if raining and not state.raining:
        days = 30.4
        mean_mm_h = _monthly(RAIN_MONTHLY_MM, month) / (
            days * events_per_day * params.mean_rain_s / 3600.0
        )
        intensity = -mean_mm_h * math.log1p(-u[1])  # exponential, mean mean_mm_h
    elif not raining:
        intensity = 0.0
    excess = max(0.0, intensity - params.drain_capacity_mm_h)
    target = excess * params.depth_cm_per_excess_mm * params.drain_tau_s / 3600.0
    a = math.exp(-dt_s / params.drain_tau_s)
    depth = target + (state.depth_cm - target) * a
    return FloodState(raining=raining, intensity_mm_h=intensity, depth_cm=depth)


# --- satisfaction ratings -----------------------------------------------------------

# Shares of very satisfied / satisfied / not satisfied among the citizens
# who press a button. Hanoi's published satisfaction index for its
# one-stop shops is above 90 %; most ratings are "satisfied" or better.
RATING_SHARES: Final = (0.55, 0.38, 0.07)
# Not every citizen rates: about two in three press a button.
RATING_PARTICIPATION: Final = 0.65


def draw_rating(rate_per_h: float, dt_s: float, rng: np.random.Generator) -> int | None:
    """The rating (code into RATING_SHARES) of the last citizen who rated within ``dt_s``, or None.

    ``rate_per_h`` is the counter's service rate (citizens served an hour).
    """
    rated = poisson_count(rate_per_h * RATING_PARTICIPATION, dt_s, rng)
    if not rated:
        return None
    u = float(rng.random())
    if u < RATING_SHARES[0]:
        return 0
    return 1 if u < RATING_SHARES[0] + RATING_SHARES[1] else 2
