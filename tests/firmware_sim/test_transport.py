"""The simulator on real transports: MQTT devices on a real broker, serial devices on ptys,
read by a real gateway; the simulator's ledger equals what reaches the hub."""

from __future__ import annotations

import contextlib
import uuid
from collections import defaultdict

import pytest

from contracts.messages import GatewayConfig
from firmware_sim.fleet import DeviceCounts, FleetDescription, SiteInfo, build_fleet
from firmware_sim.service import Simulator
from tests.plugins.gateway import (
    FakeIngest,
    broker_settings,
    client,
    gateway_in_thread,
    gateway_settings,
    publish_config,
    service_in_thread,
    wait_for,
)

pytestmark = pytest.mark.slow


class SimThread:
    """Run a Simulator in its own thread until ``close``, then close its ptys."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(service_in_thread(sim.run, name="sim"))

    def close(self) -> None:
        self._stack.close()
        self.sim.close()


def small_fleet(tag: str, *, air: int = 0, kiosks: int = 2, cams: int = 1):
    description = FleetDescription(
        seed=7,
        site=[
            SiteInfo(id=f"{tag}-hall", kind="service_hall", opening_hours="24/7"),
            SiteInfo(id=f"{tag}-street", kind="street_monitor"),
        ],
        devices={
            "service_hall": DeviceCounts(kiosk=kiosks, camera_counter=cams),
            "street_monitor": DeviceCounts(air_quality=air, camera_counter=cams),
        },
    )
    return build_fleet(description, [])


def test_mqtt_devices_publish_at_their_rate_with_status(mqtt_server):
    tag = f"s{uuid.uuid4().hex[:5]}"
    specs = small_fleet(tag)
    counts: dict[str, int] = defaultdict(int)
    statuses: dict[str, bytes] = {}
    watcher = client(mqtt_server)

    def on_message(_c, _u, message):
        kind = message.topic.rsplit("/", 1)[-1]
        device = message.topic.split("/")[-2]
        if kind == "up":
            counts[device] += 1
        else:
            statuses[device] = message.payload

    watcher.on_message = on_message
    watcher.subscribe(f"{tag}/d/+/+", qos=1)
    sim = Simulator(
        devices=specs, site_broker=broker_settings(mqtt_server), topic_prefix=tag, seed=7
    )
    runner = SimThread(sim)
    wait_for(lambda: sim.stats.total() >= 3 * len(specs), 15, "three rounds of messages")
    wait_for(lambda: len(statuses) == len(specs), 5, "online statuses")
    assert set(statuses.values()) == {b"online"}
    runner.close()
    wait_for(lambda: set(statuses.values()) == {b"offline"}, 5, "offline statuses")
    # About one message a second each: nobody floods, nobody is silent.
    assert min(counts.values()) >= 2
    assert max(counts.values()) - min(counts.values()) <= 2
    watcher.disconnect()


def test_simulated_fleet_through_a_gateway_arrives_exactly(mqtt_server, tmp_path):
    tag = f"s{uuid.uuid4().hex[:5]}"
    gateway_id = f"gw-{tag}"
    specs = small_fleet(tag, air=2)
    sim = Simulator(
        devices=specs,
        site_broker=broker_settings(mqtt_server),
        topic_prefix=tag,
        seed=7,
        record=True,
    )
    config = GatewayConfig(
        gateway_id=gateway_id,
        version=1,
        site_id=f"{tag}-hall",
        devices=[s.device_config(port=sim.ports.get(s.device_id)) for s in specs],
    )
    pub = client(mqtt_server)
    publish_config(
        pub, gateway_id=gateway_id, prefix=tag, devices=config.devices, version=config.version
    )
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
        runner = SimThread(sim)
        wait_for(lambda: sim.stats.total() >= 4 * len(specs), 20, "four rounds")
        runner.close()
        assert sim.sent is not None
        transport = {s.device_id: s.transport for s in specs}
        # MQTT and LoRaWAN devices: (device, seq, time) as the hub stores them
        # (a LoRaWAN reading's seq is its fCnt, its time ChirpStack's).
        keyed = {
            kind: {
                (device, up.seq, up.ts_ms) for device, up in sim.sent if transport[device] == kind
            }
            for kind in ("mqtt", "lorawan")
        }
        assert keyed["lorawan"]  # a street station's second air monitor
        # What the frame can carry: PMS5003 whole ug/m3, SDS011 tenths.
        digits = {s.device_id: 0 if s.protocol == "pms5003" else 1 for s in specs}
        serial_sent = [
            (device, round(up.metrics["pm25"], digits[device]))
            for device, up in sim.sent
            if transport[device] == "serial"
        ]
        wait_for(
            lambda: ingest.count() == len(keyed["mqtt"]) + len(keyed["lorawan"]) + len(serial_sent),
            20,
            "every simulated reading at the hub",
        )
        for kind, sent in keyed.items():
            assert {r for r in ingest.readings if transport[r[0]] == kind} == sent
        # Serial sensors carry no seq or time: the same values, in order, per device.
        for device in {d for d, _ in serial_sent}:
            sent_values = [v for d, v in serial_sent if d == device]
            got_values = [row["pm25"] for row in ingest.values[device]]
            assert got_values == sent_values
        assert gw.counters.serial_checksum_errors == 0
        assert sum(gw.counters.rejects.values()) == 0
    pub.disconnect()
    ingest.close()
