"""firmware_sim.models: catalog ranges always, determinism, seq and boot ids, kiosk paper and queue.

Every reading is also checked the way the gateway will: encoded with the
contracts codec and decoded with ``decode_device_uplink``.
"""

from __future__ import annotations

import datetime as dt
import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts.catalog import DEVICE_TYPES, PRINTER_STATUS_LABELS, MetricKind
from contracts.ids import check_id
from contracts.messages import DeviceUplink, decode_device_uplink, encode_device_uplink
from firmware_sim import models, signals
from firmware_sim.models import (
    AirQualityModel,
    CameraCounterModel,
    CameraMode,
    CameraParams,
    ConferenceEndpointModel,
    DeviceModel,
    KioskModel,
    KioskParams,
    NoiseMeterModel,
    SatisfactionParams,
    SatisfactionTerminalModel,
    WaterLevelModel,
)
from firmware_sim.signals import HallParams

HANOI = dt.timezone(dt.timedelta(hours=7))
HALL_HOURS = signals.parse_opening_hours("Mon-Fri 08:00-12:00,13:00-17:00; Sat 08:00-12:00")
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
PAPER_OUT = PRINTER_STATUS_LABELS.index("paper_out")
PAPER_LOW = PRINTER_STATUS_LABELS.index("paper_low")
JAM = PRINTER_STATUS_LABELS.index("jam")
OK = PRINTER_STATUS_LABELS.index("ok")


def local_ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> int:
    return int(dt.datetime(year, month, day, hour, minute, tzinfo=HANOI).timestamp() * 1000)


def make(device_type: str, seed: int, device_id: str = "dev-test-01") -> DeviceModel:
    if device_type == "air_quality":
        return AirQualityModel(device_id=device_id, seed=seed)
    if device_type == "kiosk":
        return KioskModel(device_id=device_id, seed=seed, params=KioskParams(hours=HALL_HOURS))
    if device_type == "camera_counter":
        # Alternate hall and street cameras by seed so both modes get covered.
        mode: CameraMode = "hall" if seed % 2 else "street"
        return CameraCounterModel(
            device_id=device_id, seed=seed, params=CameraParams(mode=mode, hours=HALL_HOURS)
        )
    if device_type in {"noise_meter", "water_level"}:
        return models.MODEL_CLASSES[device_type](device_id=device_id, seed=seed)
    if device_type == "satisfaction_terminal":
        params = SatisfactionParams(hours=HALL_HOURS, counter=3)
        return SatisfactionTerminalModel(device_id=device_id, seed=seed, params=params)
    return ConferenceEndpointModel(device_id=device_id, seed=seed)


def assert_in_catalog(device_type: str, values: dict[str, float]) -> None:
    dtype = DEVICE_TYPES[device_type]
    assert values
    for name, value in values.items():
        metric = dtype.metric(name)  # raises for a name the catalog lacks
        assert math.isfinite(value)
        assert metric.min <= value <= metric.max, (name, value)
        if metric.kind is not MetricKind.FLOAT:
            assert isinstance(value, int), (name, value)


# --- ranges ---------------------------------------------------------------------------

YEAR_START = local_ms(2025, 1, 1)


@settings(max_examples=60, deadline=None)
@given(
    device_type=st.sampled_from(sorted(DEVICE_TYPES)),
    seed=st.integers(min_value=0, max_value=2**63),
    start_ms=st.integers(min_value=YEAR_START, max_value=YEAR_START + 365 * DAY_MS),
    steps_ms=st.lists(st.integers(min_value=0, max_value=2 * DAY_MS), min_size=1, max_size=25),
)
def test_readings_stay_inside_catalog_ranges(
    device_type: str, seed: int, start_ms: int, steps_ms: list[int]
) -> None:
    model = make(device_type, seed)
    now_ms = start_ms
    for step_ms in steps_ms:
        now_ms += step_ms
        uplink = model.make_uplink(now_ms)
        assert_in_catalog(device_type, uplink.metrics)
        decoded = decode_device_uplink(
            encode_device_uplink(uplink), device_type=device_type, now_ms=now_ms
        )
        assert decoded == uplink


@pytest.mark.parametrize("device_type", sorted(DEVICE_TYPES))
def test_a_year_of_hourly_readings_stays_in_range(device_type: str) -> None:
    model = make(device_type, seed=11)
    for now_ms in range(YEAR_START, YEAR_START + 365 * DAY_MS, HOUR_MS):
        assert_in_catalog(device_type, model.step(now_ms))


def test_clip_handles_out_of_range_and_nan() -> None:
    model = AirQualityModel(device_id="aq-test-01", seed=1)
    clipped = model._clip({"pm25": 5000.0, "humidity": -3.0, "temperature": math.nan, "co2": 421.4})
    assert clipped == {"pm25": 1000.0, "humidity": 0.0, "temperature": -40.0, "co2": 421.0}


def test_model_classes_cover_the_catalog() -> None:
    assert set(models.MODEL_CLASSES) == set(DEVICE_TYPES)


# --- determinism ----------------------------------------------------------------------


def sequence(
    device_type: str, seed: int, device_id: str = "dev-test-01", n: int = 200
) -> list[DeviceUplink]:
    model = make(device_type, seed, device_id)
    start = local_ms(2025, 3, 3, 9)
    return [model.make_uplink(start + i * 7_000) for i in range(n)]


@pytest.mark.parametrize("device_type", sorted(DEVICE_TYPES))
def test_same_seed_same_sequence_different_seed_different(device_type: str) -> None:
    assert sequence(device_type, 3) == sequence(device_type, 3)
    assert sequence(device_type, 3) != sequence(device_type, 4)
    assert sequence(device_type, 3) != sequence(device_type, 3, device_id="dev-test-02")


def test_device_rng_streams_are_stable_and_independent() -> None:
    a = models.device_rng(1, "aq-x-01", "signal").random(4).tolist()
    assert a == models.device_rng(1, "aq-x-01", "signal").random(4).tolist()
    assert a != models.device_rng(1, "aq-x-01", "boot").random(4).tolist()
    assert a != models.device_rng(2, "aq-x-01", "signal").random(4).tolist()
    assert a != models.device_rng(1, "aq-x-02", "signal").random(4).tolist()
    # A fixed value: the derivation (BLAKE2 of the id, PCG64) never changes
    # silently between runs, machines or Python versions.
    assert models.device_rng(0, "aq-x-01", "signal").integers(0, 10**9) == 262603480


# --- seq, boot id, uptime --------------------------------------------------------------


def test_seq_increments_and_reboot_resets_it_with_a_new_boot_id() -> None:
    model = make("kiosk", seed=5)
    start = local_ms(2025, 3, 3, 9)
    first = [model.make_uplink(start + i * 1000) for i in range(5)]
    assert [u.seq for u in first] == [0, 1, 2, 3, 4]
    assert len({u.boot for u in first}) == 1
    boot = first[0].boot
    assert boot is not None
    check_id(boot)
    uptime_before = first[-1].metrics["uptime"]
    assert uptime_before > 0  # devices have been running before the simulation starts

    model.reboot(start + 10_000)
    after = [model.make_uplink(start + 10_000 + i * 1000) for i in range(3)]
    assert [u.seq for u in after] == [0, 1, 2]
    assert after[0].boot != boot
    assert after[0].boot is not None
    check_id(after[0].boot)
    assert [u.metrics["uptime"] for u in after] == [0, 1, 2]
    assert model.reboots == 1


def test_reboot_does_not_change_the_signal() -> None:
    start = local_ms(2025, 1, 10, 8)
    plain = make("air_quality", seed=2)
    rebooted = make("air_quality", seed=2)
    a = [plain.step(start + i * 1000) for i in range(50)]
    b = []
    for i in range(50):
        if i == 20:
            rebooted.reboot(start + i * 1000)
        b.append(rebooted.step(start + i * 1000))
    assert a == b


def test_time_going_backwards_advances_nothing() -> None:
    model = make("kiosk", seed=1)
    start = local_ms(2025, 3, 3, 10)
    model.step(start)
    assert model.step(start - 60_000)["tickets_issued"] == 0


# --- air quality ----------------------------------------------------------------------


def monthly_pm25(month: int, seed: int) -> float:
    model = AirQualityModel(device_id="aq-street-01", seed=seed)
    start = local_ms(2025, month, 1)
    values = [model.step(t)["pm25"] for t in range(start, start + 31 * DAY_MS, 30 * 60_000)]
    return sum(values) / len(values)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_january_pm25_at_least_twice_july(seed: int) -> None:
    january, july = monthly_pm25(1, seed), monthly_pm25(7, seed)
    assert january >= 2 * july
    assert 45 <= january <= 130  # ~60-90 monthly means, plus weather and humidity bias
    assert 12 <= july <= 45  # ~20-30


def test_each_monitor_has_its_own_fine_fractions() -> None:
    ratios = {
        AirQualityModel(device_id=f"aq-x-{i:02d}", seed=0).params.pm1_ratio for i in range(10)
    }
    assert len(ratios) == 10
    assert all(r is not None and 0.6 <= r <= 0.75 for r in ratios)


# --- kiosk ----------------------------------------------------------------------------


def run_kiosk(
    model: DeviceModel, start_ms: int, hours: float, step_ms: int = 60_000
) -> list[dict[str, float]]:
    return [model.step(t) for t in range(start_ms, start_ms + int(hours * HOUR_MS), step_ms)]


def no_staff(initial_paper_pct: float) -> KioskParams:
    return KioskParams(
        hours=HALL_HOURS,
        initial_paper_pct=initial_paper_pct,
        refill_after_out_mean_s=math.inf,
        refill_after_low_mean_s=math.inf,
        jam_probability_per_ticket=0.0,
    )


def test_paper_decreases_with_tickets_and_runs_out() -> None:
    model = KioskModel(device_id="kiosk-test-01", seed=7, params=no_staff(initial_paper_pct=6.0))
    readings = run_kiosk(model, local_ms(2025, 3, 3, 8), hours=4)  # a Monday morning
    assert readings[0]["paper_level"] <= 6.0
    levels = [r["paper_level"] for r in readings]
    assert all(b <= a for a, b in itertools.pairwise(levels))
    # Each ticket takes 1/1000 of the roll.
    for before, after in itertools.pairwise(readings):
        if before["paper_level"] > 0:
            assert after["paper_level"] == pytest.approx(
                before["paper_level"] - after["tickets_issued"] / 10, abs=1e-9
            )
    statuses = [r["printer_status"] for r in readings]
    assert PAPER_LOW in statuses
    assert statuses[-1] == PAPER_OUT
    empty_at = levels.index(0.0)
    # The reading that used the last ticket still issued some; none after it.
    assert readings[empty_at]["tickets_issued"] > 0
    rest = readings[empty_at + 1 :]
    assert len(rest) > 10
    assert all(r["printer_status"] == PAPER_OUT for r in readings[empty_at:])
    assert all(r["tickets_issued"] == 0 for r in rest)
    assert model.tickets_total == 60


def test_staff_refill_an_empty_roll_during_opening_hours() -> None:
    params = KioskParams(
        hours=HALL_HOURS,
        initial_paper_pct=1.0,
        refill_after_out_mean_s=600.0,
        jam_probability_per_ticket=0.0,
    )
    model = KioskModel(device_id="kiosk-test-01", seed=3, params=params)
    readings = run_kiosk(model, local_ms(2025, 3, 3, 8), hours=4)
    statuses = [r["printer_status"] for r in readings]
    first_out = statuses.index(PAPER_OUT)
    assert OK in statuses[first_out:]
    assert model.refills >= 1
    assert max(r["paper_level"] for r in readings[first_out:]) > 95


def test_nobody_refills_a_closed_hall() -> None:
    params = KioskParams(hours=HALL_HOURS, initial_paper_pct=0.0, refill_after_out_mean_s=60.0)
    model = KioskModel(device_id="kiosk-test-01", seed=3, params=params)
    readings = run_kiosk(model, local_ms(2025, 3, 9, 0), hours=24)  # Sunday
    assert {r["printer_status"] for r in readings} == {PAPER_OUT}


def test_a_jam_stops_tickets_until_cleared() -> None:
    model = KioskModel(
        device_id="kiosk-test-01",
        seed=3,
        params=KioskParams(
            hours=HALL_HOURS, jam_probability_per_ticket=1.0, jam_clear_mean_s=math.inf
        ),
    )
    readings = run_kiosk(model, local_ms(2025, 3, 3, 9), hours=2)
    jammed = [i for i, r in enumerate(readings) if r["printer_status"] == JAM]
    assert jammed
    assert all(r["tickets_issued"] == 0 for r in readings[jammed[0] + 1 :])
    assert model.jams == 1


def test_kiosk_closed_at_night_and_sunday() -> None:
    model = make("kiosk", seed=9)
    assert isinstance(model, KioskModel)
    night = run_kiosk(model, local_ms(2025, 3, 4, 18), hours=13)  # Tue 18:00 .. Wed 07:00
    sunday = run_kiosk(model, local_ms(2025, 3, 9), hours=24)
    for r in night[40:] + sunday:
        assert r["tickets_issued"] == 0
        assert r["queue_length"] == 0


def test_queue_builds_in_the_morning() -> None:
    peaks = []
    for seed in range(5):
        model = make("kiosk", seed=seed)
        readings = run_kiosk(model, local_ms(2025, 3, 3, 7), hours=5)  # Monday 07:00-12:00
        early = readings[60 + 5]["queue_length"]  # 08:05
        peaks.append(max(r["queue_length"] for r in readings[3 * 60 : 4 * 60 + 30]))  # 10:00-11:30
        assert early <= 3
    assert min(peaks) >= 5
    assert sum(peaks) / len(peaks) >= 10


def test_tickets_a_day_are_a_district_halls_worth() -> None:
    model = make("kiosk", seed=1)
    readings = run_kiosk(model, local_ms(2025, 3, 5), hours=24)  # Wednesday
    assert 100 <= sum(r["tickets_issued"] for r in readings) <= 400


# --- camera counters --------------------------------------------------------------------


def test_hall_camera_occupancy_is_in_minus_out() -> None:
    model = CameraCounterModel(
        device_id="cam-test-01", seed=4, params=CameraParams(mode="hall", hours=HALL_HOURS)
    )
    start = local_ms(2025, 3, 3, 6)
    occupancy = peak = 0.0
    for t in range(start, start + 14 * HOUR_MS, 60_000):
        r = model.step(t)
        assert set(r) == {"people_in", "people_out", "occupancy"}
        occupancy += r["people_in"] - r["people_out"]
        assert r["occupancy"] == occupancy
        peak = max(peak, occupancy)
    assert peak >= 20
    assert occupancy == 0  # 20:00: everyone has left


def test_street_camera_counts_vehicles() -> None:
    model = CameraCounterModel(device_id="cam-test-01", seed=4, params=CameraParams(mode="street"))
    start = local_ms(2025, 3, 5, 8)
    readings = [model.step(t) for t in range(start, start + HOUR_MS, 1000)]
    assert set(readings[0]) == {"vehicles_in", "vehicles_out"}
    assert sum(r["vehicles_in"] + r["vehicles_out"] for r in readings) > 4000


def test_hall_params_are_used() -> None:
    quiet = HallParams(peak_arrivals_per_h=0.0)
    model = KioskModel(
        device_id="kiosk-test-01", seed=1, params=KioskParams(hours=HALL_HOURS, hall=quiet)
    )
    assert all(r["tickets_issued"] == 0 for r in run_kiosk(model, local_ms(2025, 3, 3, 8), hours=9))


# --- the types defined as catalog data only -------------------------------------------


def test_noise_meter_reads_loud_rush_hours_and_quiet_nights() -> None:
    model = NoiseMeterModel(device_id="noise-test-01", seed=3)
    rush = [
        model.step(t)["laeq"]
        for t in range(local_ms(2025, 3, 5, 8), local_ms(2025, 3, 5, 9), 60_000)
    ]
    night = [
        model.step(t)["laeq"]
        for t in range(local_ms(2025, 3, 6, 3), local_ms(2025, 3, 6, 4), 60_000)
    ]
    assert sum(night) / len(night) < sum(rush) / len(rush) - 10.0
    assert all(round(x, 1) == x for x in rush)  # 0.1 dB resolution


def test_water_level_reads_zero_on_a_dry_day_and_the_flood_in_a_storm() -> None:
    model = WaterLevelModel(device_id="water-test-01", seed=2)
    t = local_ms(2025, 7, 10, 14)
    model.step(t)
    model.flood = signals.FloodState(raining=True, intensity_mm_h=35.0, depth_cm=0.0)
    model.params = models.WaterLevelParams(
        flood=signals.FloodParams(mean_rain_s=1e12), no_echo_share=0.0
    )
    first = model.step(t + 1000)
    first_battery_pct = model.battery_pct
    assert first["water_depth"] == 0.0
    readings = [model.step(t + i * 60_000) for i in range(1, 91)]
    assert readings[-1]["water_depth"] > 15.0
    assert all(r["sensor_status"] == models.SENSOR_OK for r in readings)
    assert model.battery_pct < first_battery_pct  # 0.14 % a day, below the 0.1 % shown


def test_water_level_without_an_echo_leaves_the_depth_out() -> None:
    params = models.WaterLevelParams(flood=signals.FloodParams(mean_rain_s=1e12), no_echo_share=1.0)
    model = WaterLevelModel(device_id="water-test-02", seed=2, params=params)
    model.flood = signals.FloodState(raining=True, intensity_mm_h=60.0, depth_cm=30.0)
    reading = model.step(local_ms(2025, 7, 10, 14))
    assert reading["sensor_status"] == models.SENSOR_NO_ECHO
    assert "water_depth" not in reading


def test_satisfaction_terminal_rates_in_opening_hours_only() -> None:
    params = SatisfactionParams(hours=HALL_HOURS, counter=4)
    model = SatisfactionTerminalModel(device_id="rating-test-01", seed=6, params=params)
    week = range(local_ms(2025, 3, 3), local_ms(2025, 3, 10), 5_000)
    rated = []
    for t in week:
        reading = model.step(t)
        assert reading["counter"] == 4  # every reading names its counter
        if "rating" in reading:
            rated.append((t, reading["rating"]))
    assert all(HALL_HOURS.is_open(t) for t, _ in rated)
    # ~10 citizens an hour at a counter around the peak, two in three rate.
    assert 100 < len(rated) < 400
    codes = [code for _, code in rated]
    assert codes.count(2) < 0.15 * len(codes)
    assert model.ratings == [codes.count(c) for c in range(3)]
