"""firmware_sim.fleet: descriptions from TOML, deterministic fleets from the seed sites, timing."""

from __future__ import annotations

import tomllib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from contracts.catalog import PRINTER_STATUS_LABELS
from contracts.errors import SettingsError
from contracts.ids import check_id
from contracts.messages import GatewayConfig, check_gateway_config
from firmware_sim import fleet, signals
from firmware_sim.faults import FaultPlan
from firmware_sim.fleet import FleetDescription, SiteInfo
from firmware_sim.models import (
    FIRST_STEP_S,
    CameraCounterModel,
    KioskModel,
    SatisfactionTerminalModel,
)

SITES_PATH = Path(__file__).parents[2] / "cityhub" / "data" / "hanoi_sites.toml"
SEED_SITES = fleet.parse_sites(tomllib.loads(SITES_PATH.read_text("utf-8")))
NOW_MS = 1_767_225_600_000

FLEET_TOML = """
seed = 42
time_acceleration = 60.0
sites = ["hk-hall-quan", "hk-aq-hang-dau"]

[devices.service_hall]
kiosk = 3
camera_counter = 1

[devices.street_monitor]
air_quality = 2

[[site]]
id = "test-ward-1"
kind = "ward_office"
opening_hours = "Mon-Fri 07:30-11:30,13:30-17:00"

[faults]
spike_probability = 0.01

[overrides.kiosk-hk-hall-quan-02]
malformed_probability = 0.5
malformed_kinds = ["nan_token"]
"""


def test_seed_sites_parse() -> None:
    kinds = Counter(site.kind for site in SEED_SITES)
    assert set(kinds) == {"service_hall", "ward_office", "street_monitor"}
    assert all(kinds[kind] >= 8 for kind in kinds)


def test_default_fleet_from_the_seed_sites() -> None:
    specs = fleet.build_fleet(FleetDescription(seed=7), SEED_SITES)
    ids = [spec.device_id for spec in specs]
    assert len(ids) == len(set(ids))
    for spec in specs:
        check_id(spec.device_id)
        prefix = fleet.ID_PREFIX[spec.device_type]
        assert spec.device_id.startswith(f"{prefix}-{spec.site_id}-")
        assert spec.model.device_id == spec.device_id
        assert spec.model.device_type.name == spec.device_type
        number = int(spec.device_id.rsplit("-", 1)[1])
        kind = next(s.kind for s in SEED_SITES if s.id == spec.site_id)
        expected = fleet.DEFAULT_TRANSPORTS.get(kind, {}).get(spec.device_type)
        if expected:
            assert spec.transport == expected[min(number, len(expected)) - 1]
        else:
            assert spec.transport == ("serial" if spec.device_type == "air_quality" else "mqtt")
        if spec.transport == "serial":
            assert spec.protocol in ("pms5003", "sds011")
        else:
            assert spec.protocol is None
        assert (spec.catalog_model is not None) == (spec.transport in ("modbus", "lorawan"))
        assert (spec.slave_id is not None) == (spec.transport == "modbus")
        assert (spec.dev_eui is not None) == (spec.transport == "lorawan")
        assert (spec.http_token is not None) == (spec.transport == "http")
        assert spec.faults == fleet.STANDARD_FAULTS
    assert {spec.protocol for spec in specs if spec.protocol} == {"pms5003", "sds011"}
    halls = [s for s in SEED_SITES if s.kind == "service_hall"]
    assert sum(spec.device_type == "kiosk" for spec in specs) >= 2 * len(halls)
    # Cameras count people at halls and offices, vehicles on streets.
    for spec in specs:
        if isinstance(spec.model, CameraCounterModel):
            street = spec.site_id in {s.id for s in SEED_SITES if s.kind == "street_monitor"}
            assert spec.model.params.mode == ("street" if street else "hall")


def test_fleet_is_deterministic() -> None:
    def readings(seed: int) -> list[object]:
        specs = fleet.build_fleet(FleetDescription(seed=seed), SEED_SITES)
        return [(s.device_id, s.protocol, s.model.make_uplink(NOW_MS)) for s in specs]

    assert readings(1) == readings(1)
    assert readings(1) != readings(2)


def test_devices_feed_a_valid_gateway_config() -> None:
    specs = fleet.build_fleet(FleetDescription(), SEED_SITES)
    # A serial sensor has a port of its own; a site's Modbus devices share its bus.
    ports = {
        spec.device_id: f"/dev/pts/{i}"
        if spec.transport == "serial"
        else f"/dev/rs485-{spec.site_id}"
        if spec.transport == "modbus"
        else None
        for i, spec in enumerate(specs)
    }
    devices = [spec.device_config(port=ports[spec.device_id]) for spec in specs]
    check_gateway_config(
        GatewayConfig(gateway_id="gw-test", version=1, site_id="hn", devices=devices)
    )
    transports = {d.transport for d in devices}
    assert transports == {"serial", "mqtt", "modbus", "lorawan", "http"}


def test_fleet_description_from_toml() -> None:
    description = fleet.parse_fleet_description(tomllib.loads(FLEET_TOML))
    specs = fleet.build_fleet(description, SEED_SITES)
    assert [s.device_id for s in specs] == [
        "kiosk-hk-hall-quan-01",
        "kiosk-hk-hall-quan-02",
        "kiosk-hk-hall-quan-03",
        "cam-hk-hall-quan-01",
        "aq-hk-aq-hang-dau-01",
        "aq-hk-aq-hang-dau-02",
    ]  # the ward office: no [devices.ward_office], so no devices
    by_id = {s.device_id: s for s in specs}
    assert by_id["kiosk-hk-hall-quan-01"].faults == FaultPlan(spike_probability=0.01)
    assert by_id["kiosk-hk-hall-quan-02"].faults == FaultPlan(
        spike_probability=0.01, malformed_probability=0.5, malformed_kinds=("nan_token",)
    )
    kiosk = by_id["kiosk-hk-hall-quan-01"].model
    assert isinstance(kiosk, KioskModel)
    # NOW_MS is Thursday 1 January 2026, 07:00 in Hanoi; the seed hall opens at 08:00.
    assert not kiosk.params.hours.is_open(NOW_MS)
    assert kiosk.params.hours.is_open(NOW_MS + 3 * 3600_000)
    injector = by_id["kiosk-hk-hall-quan-02"].injector(period_ms=description.period_ms)
    assert injector.plan.malformed_probability == 0.5


def test_explicit_sites_get_devices() -> None:
    description = fleet.parse_fleet_description(
        {
            "site": [
                {"id": "test-ward-1", "kind": "ward_office", "opening_hours": "Mon 08:00-09:00"}
            ],
            "devices": {"ward_office": {"conference_endpoint": 2}},
        }
    )
    specs = fleet.build_fleet(description, [])
    assert [s.device_id for s in specs] == ["conf-test-ward-1-01", "conf-test-ward-1-02"]


@pytest.mark.parametrize(
    ("document", "key"),
    [
        ({"seed": -1}, "fleet.seed"),
        ({"time_acceleration": 0}, "fleet.time_acceleration"),
        ({"colour": "red"}, "fleet"),
        ({"faults": {"spike_probability": 2}}, "fleet.faults.spike_probability"),
        ({"devices": {"airport": {"kiosk": 1}}}, "fleet.devices"),
        ({"devices": {"service_hall": {"kiosks": 1}}}, "fleet.devices"),
        (
            {"overrides": {"kiosk-x-01": {"flood_factor": 0}}},
            "fleet.overrides.kiosk-x-01.flood_factor",
        ),
        ({"overrides": {"Kiosk X": {}}}, "fleet.overrides.Kiosk X"),
        (
            {"site": [{"id": "x", "kind": "ward_office", "opening_hours": "9-5"}]},
            "fleet.site[0].opening_hours",
        ),
        ({"site": [{"id": "X!", "kind": "ward_office"}]}, "fleet.site[0].id"),
        ({"kiosks": {"kiosk-x-01": {"initial_paper_pct": 101}}}, "fleet.kiosks"),
        ({"kiosks": {"kiosk-x-01": {"paper": 1}}}, "fleet.kiosks"),
    ],
)  # fmt: skip
def test_bad_descriptions_name_the_key(document: dict[str, object], key: str) -> None:
    with pytest.raises(SettingsError) as info:
        fleet.parse_fleet_description(document)
    assert info.value.key.startswith(key), info.value


def test_build_refuses_unknown_sites_repeats_overrides_and_long_ids() -> None:
    with pytest.raises(SettingsError, match="no-such-site"):
        fleet.build_fleet(FleetDescription(sites=["no-such-site"]), SEED_SITES)
    with pytest.raises(SettingsError, match="named twice"):
        fleet.build_fleet(FleetDescription(site=[SEED_SITES[0]]), SEED_SITES)
    with pytest.raises(SettingsError, match="kiosk-typo-01"):
        fleet.build_fleet(FleetDescription(overrides={"kiosk-typo-01": {}}), SEED_SITES)
    with pytest.raises(SettingsError, match="kiosk-typo-01"):
        fleet.build_fleet(
            fleet.parse_fleet_description({"kiosks": {"kiosk-typo-01": {}}}), SEED_SITES
        )
    long_site = SiteInfo(id="x" * 60, kind="service_hall")
    with pytest.raises(SettingsError):
        fleet.build_fleet(FleetDescription(), [long_site])


# --- timing ---------------------------------------------------------------------------


def test_phases_spread_two_thousand_devices_over_the_period() -> None:
    ids = [f"dev-{i:04d}" for i in range(2000)]
    phases = fleet.send_phases_ms(ids, seed=3, period_ms=1000)
    assert phases.min() >= 0
    assert phases.max() < 1000
    per_ms = np.bincount(phases, minlength=1000)
    assert per_ms.max() <= 10  # ~2 a millisecond on average, never a stampede
    assert (per_ms > 0).sum() > 800
    assert np.array_equal(phases, fleet.send_phases_ms(ids, seed=3, period_ms=1000))
    assert not np.array_equal(phases, fleet.send_phases_ms(ids, seed=4, period_ms=1000))


@given(
    after_ms=st.integers(min_value=0, max_value=10**13),
    period_ms=st.integers(min_value=1, max_value=60_000),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_schedule_gives_the_next_grid_point(after_ms: int, period_ms: int, seed: int) -> None:
    phases = fleet.send_phases_ms([f"dev-{i}" for i in range(50)], seed=seed, period_ms=period_ms)
    times = fleet.schedule(phases, after_ms=after_ms, period_ms=period_ms)
    assert (times > after_ms).all()
    assert (times <= after_ms + period_ms).all()
    assert ((times - phases) % period_ms == 0).all()
    jittered = fleet.schedule(
        phases,
        after_ms=after_ms,
        period_ms=period_ms,
        jitter_ms=20,
        rng=np.random.default_rng(seed),
    )
    assert ((jittered - times >= 0) & (jittered - times <= 20)).all()


def test_schedule_jitter_needs_an_rng() -> None:
    with pytest.raises(ValueError):
        fleet.schedule(np.zeros(3, np.int64), after_ms=0, jitter_ms=5)


def test_time_acceleration_round_trip() -> None:
    def sim(wall_ms: int) -> int:
        return fleet.sim_time_ms(
            wall_ms, wall_start_ms=1_000, sim_start_ms=NOW_MS, time_acceleration=60.0
        )

    def wall(sim_ms: int) -> int:
        return fleet.wall_time_ms(
            sim_ms, wall_start_ms=1_000, sim_start_ms=NOW_MS, time_acceleration=60.0
        )

    assert sim(1_000) == NOW_MS
    assert sim(2_000) == NOW_MS + 60_000
    assert wall(NOW_MS + 60_000) == 2_000
    assert wall(sim(123_456)) == 123_456


def test_streets_get_noise_and_flood_sensors_and_halls_rating_terminals() -> None:
    specs = fleet.build_fleet(FleetDescription(seed=7), SEED_SITES)
    kinds = {site.id: site.kind for site in SEED_SITES}
    by_type: dict[str, set[str]] = {}
    for spec in specs:
        by_type.setdefault(spec.device_type, set()).add(kinds[spec.site_id])
    assert by_type["noise_meter"] == {"street_monitor"}
    assert by_type["water_level"] == {"street_monitor"}
    assert by_type["satisfaction_terminal"] == {"service_hall"}
    streets = [s for s in SEED_SITES if s.kind == "street_monitor"]
    # Each street station: a flood gauge on its Modbus bus beside the noise
    # meter, and a LoRaWAN flood sensor further along the street.
    water = [spec for spec in specs if spec.device_type == "water_level"]
    assert len(water) == 2 * len(streets)
    assert sorted(spec.transport for spec in water) == sorted(["modbus", "lorawan"] * len(streets))
    for street in streets:
        bus = [s for s in specs if s.site_id == street.id and s.transport == "modbus"]
        assert sorted(s.slave_id for s in bus) == [1, 2]
    # A terminal's counter is its number at the hall: rating-{site}-02 stands at counter 2.
    terminals = [s for s in specs if isinstance(s.model, SatisfactionTerminalModel)]
    assert terminals
    for spec in terminals:
        model = spec.model
        assert isinstance(model, SatisfactionTerminalModel)
        assert model.params.counter == int(spec.device_id.rsplit("-", 1)[1])
        hall = next(s for s in SEED_SITES if s.id == spec.site_id)
        assert model.params.hours == signals.parse_opening_hours(hall.opening_hours)


def test_a_kiosk_out_of_paper_from_the_start_gets_its_roll_at_the_fixed_delay() -> None:
    description = fleet.parse_fleet_description(
        {
            "sites": ["hk-aq-hang-dau"],  # open 24/7: staff on duty at any hour
            "devices": {"street_monitor": {"kiosk": 1}},
            "kiosks": {
                "kiosk-hk-aq-hang-dau-01": {"initial_paper_pct": 0, "refill_after_out_s": 30}
            },
        }
    )
    (spec,) = fleet.build_fleet(description, SEED_SITES)
    model = spec.model
    assert isinstance(model, KioskModel)
    statuses = [model.step(NOW_MS + i * 1000)["printer_status"] for i in range(40)]
    out = PRINTER_STATUS_LABELS.index("paper_out")
    # Out for 30 s (the first step counts as FIRST_STEP_S), then a full roll for good.
    refilled = next(i for i, status in enumerate(statuses) if status != out)
    assert 30 - FIRST_STEP_S <= refilled <= 30
    assert out not in statuses[refilled:]
    assert model.refills == 1


def test_a_fleet_file_cannot_give_a_type_a_transport_it_does_not_speak() -> None:
    description = fleet.parse_fleet_description(
        {"sites": ["hk-hall-quan"], "transports": {"service_hall": {"kiosk": ["modbus"]}}}
    )
    with pytest.raises(SettingsError, match=r"kiosk device does not speak modbus"):
        fleet.build_fleet(description, SEED_SITES)
