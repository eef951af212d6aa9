"""The simulated ChirpStack integration: its events as the gateway reads them, its ledger exact."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contracts.catalog import current_catalog
from contracts.chirpstack import UplinkEvent, uplink_metrics
from contracts.messages import DeviceConfig
from firmware_sim.chirpstack import application_id, frame_payload, session_dev_addr
from firmware_sim.faults import FaultPlan
from firmware_sim.fleet import DeviceCounts, FleetDescription, SiteInfo, build_fleet
from firmware_sim.ledger import StoredRow, reconcile
from firmware_sim.service import Simulator
from tests.firmware_sim.test_transport import SimThread
from tests.plugins.gateway import (
    FakeIngest,
    broker_settings,
    client,
    gateway_in_thread,
    gateway_settings,
    publish_config,
    wait_for,
)


def test_application_ids_and_dev_addrs_are_derived_from_the_seed():
    app = application_id(7, "hk-street")
    assert uuid.UUID(app).version == 4
    assert app == application_id(7, "hk-street")
    assert app not in {application_id(8, "hk-street"), application_id(7, "bd-street")}
    addr = session_dev_addr(7, "aq-x-01", "00ff")
    assert len(addr) == 8
    assert addr != session_dev_addr(7, "aq-x-01", "0100")  # a new session, a new DevAddr


@given(
    pm25=st.floats(0, 1000),
    pm10=st.floats(0, 2000),
    temperature=st.floats(-40, 85),
    humidity=st.floats(0, 100),
)
def test_cayenne_frames_carry_the_model_values_to_their_resolution(
    pm25, pm10, temperature, humidity
):
    model = current_catalog().lorawan_models["lpp_air_quality"]
    metrics = {"pm25": pm25, "pm10": pm10, "temperature": temperature, "humidity": humidity}
    data, obj, clamped = frame_payload(model, metrics)
    assert (obj, clamped) == (None, 0)
    back = uplink_metrics(UplinkEvent(data=data), model)
    assert back.keys() == metrics.keys()
    # PM goes in tens of ug/m3 at 0.01 (the model's scale 10): 0.1 ug/m3 steps.
    for name, resolution in (("pm25", 0.1), ("pm10", 0.1), ("temperature", 0.1)):
        assert back[name] == pytest.approx(metrics[name], abs=resolution / 2 + 1e-9)
    assert back["humidity"] == pytest.approx(humidity, abs=0.25 + 1e-9)


def test_values_lpp_cannot_carry_go_at_its_limit():
    model = current_catalog().lorawan_models["lpp_air_quality"]
    # analog_input is a signed 16-bit count of 0.01, 327.67 at most: with the
    # model's scale 10, 3276.7 ug/m3, past the type's range (a sensor fault).
    data, _obj, clamped = frame_payload(model, {"pm25": 4120.0, "pm10": 20.0})
    assert clamped == 1
    assert uplink_metrics(UplinkEvent(data=data), model) == pytest.approx(
        {"pm25": 3276.7, "pm10": 20.0}
    )


def test_object_frames_carry_the_model_keys():
    model = current_catalog().lorawan_models["object_water_level"]
    metrics = {"water_depth": 12.5, "sensor_status": 1.0, "battery": 64.2}
    data, obj, _ = frame_payload(model, metrics)
    assert data == b""
    assert obj == {"depth_cm": 12.5, "status": 1.0, "battery": 64.2}
    assert uplink_metrics(UplinkEvent(object=obj), model) == metrics


LORAWAN_FAULTS = FaultPlan(
    lorawan_duplicate_probability=0.2,
    lorawan_out_of_order_probability=0.15,
    lorawan_undecodable_probability=0.15,
    lorawan_unknown_eui_probability=0.2,
    # About one in 6 ticks at 200 ms: a few re-joins per device in a run.
    lorawan_rejoin_per_h=3600.0,
)


def lorawan_fleet(tag: str):
    description = FleetDescription(
        seed=11,
        site=[SiteInfo(id=f"{tag}-street", kind="street_monitor")],
        devices={"street_monitor": DeviceCounts(air_quality=1, water_level=1)},
        transports={"street_monitor": {"air_quality": ["lorawan"], "water_level": ["lorawan"]}},
        faults=LORAWAN_FAULTS,
    )
    return build_fleet(description, [])


@pytest.mark.slow
def test_simulated_chirpstack_through_a_gateway_reconciles_exactly(mqtt_server, tmp_path):
    tag = f"s{uuid.uuid4().hex[:5]}"
    gateway_id = f"gw-{tag}"
    specs = lorawan_fleet(tag)
    assert {s.transport for s in specs} == {"lorawan"}
    sim = Simulator(
        devices=specs,
        site_broker=broker_settings(mqtt_server),
        topic_prefix=tag,
        seed=11,
        period_ms=200,
        record=True,
    )
    devices: list[DeviceConfig] = [s.device_config() for s in specs]
    pub = client(mqtt_server)
    publish_config(pub, gateway_id=gateway_id, prefix=tag, devices=devices, version=1)
    ingest = FakeIngest(mqtt_server, gateway_id=gateway_id, prefix=tag)
    ingest.acking = True
    broker = broker_settings(mqtt_server)
    with gateway_in_thread(
        settings=gateway_settings(gateway_id, tag),
        central=broker,
        site=broker,
        outbox=tmp_path / "o.sqlite3",
    ) as gw:
        wait_for(lambda: len(gw.devices) == len(specs), 10, "config applied")
        wait_for(gw.site_ready, 10, "ChirpStack subscriptions granted")
        runner = SimThread(sim)
        wait_for(
            lambda: sim.chirpstack is not None and sim.chirpstack.counters.uplinks >= 60,
            30,
            "sixty uplinks",
        )
        runner.close()
        assert sim.chirpstack is not None
        cs = sim.chirpstack.counters
        assert sim.ledger is not None
        keys = {e.key for e in sim.ledger.entries}
        wait_for(lambda: ingest.count() == len(keys), 20, "every handed-over reading stored")
        stored = [StoredRow(device_id=d, seq=s, ts_ms=t) for d, s, t in ingest.readings]
        result = reconcile(sim.ledger.entries, stored, [])
        assert result.ok, (result.lost, result.duplicates)
        assert result.foreign_rows == 0
        assert result.stored == result.acknowledged - (len(sim.ledger.entries) - len(keys))
        c = gw.counters
        # Every fault the simulator applied, the gateway counted.
        assert cs.duplicates > 0
        assert c.lorawan_repeats == cs.duplicates
        assert cs.undecodable > 0
        assert c.rejects["undecodable"] == cs.undecodable
        assert sum(c.rejects.values()) == cs.undecodable
        assert c.lorawan_joins == cs.joins
        assert cs.rejoins > 0
        assert cs.joins == len(specs) + cs.rejoins
        assert c.lorawan_status == cs.status > 0
        assert 0 < c.lorawan_out_of_order <= cs.out_of_order
        assert cs.unknown_eui > 0  # published, and never seen: the gateway subscribes per DevEUI
        assert ingest.deliveries == ingest.count()  # repeats dropped at the gateway
    pub.disconnect()
    ingest.close()
