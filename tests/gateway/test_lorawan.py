"""The gateway's LoRaWAN bridge against a real Mosquitto, fed ChirpStack's own event format.

Events are built with chirpstack-api's protobuf messages and marshalled with
protobuf's ``json_format``, as ChirpStack's MQTT integration (JSON
marshaling) publishes them. ChirpStack's topics carry no prefix: each test
draws DevEUIs of its own.
"""

from __future__ import annotations

import datetime
import secrets
import uuid
from collections.abc import Mapping

import pytest
from chirpstack_api import integration
from google.protobuf.json_format import MessageToJson

from contracts.chirpstack import encode_lpp
from contracts.messages import DeviceConfig
from contracts.topics import chirpstack_event_topic
from tests.plugins.gateway import (
    FakeIngest,
    broker_settings,
    client,
    gateway_in_thread,
    gateway_settings,
    now_ms,
    publish_config,
    wait_for,
)

pytestmark = pytest.mark.slow

APP = str(uuid.uuid4())


def eui() -> str:
    return secrets.token_hex(8)


def lorawan_device(device_id: str, device_type: str, model: str, dev_eui: str) -> DeviceConfig:
    return DeviceConfig(
        device_id=device_id,
        device_type=device_type,
        transport="lorawan",
        model=model,
        dev_eui=dev_eui,
    )


def _time(ts_ms: int) -> datetime.datetime:
    # Exact milliseconds (a float division could land a microsecond short).
    return datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(
        milliseconds=ts_ms
    )


def uplink(
    dev_eui: str,
    *,
    f_cnt: int,
    ts_ms: int,
    dev_addr: str = "01020304",
    data: bytes = b"",
    obj: Mapping[str, object] | None = None,
    dedup: str | None = None,
) -> bytes:
    event = integration.UplinkEvent(
        deduplication_id=dedup or str(uuid.uuid4()),
        device_info=integration.DeviceInfo(application_id=APP, dev_eui=dev_eui, device_name="node"),
        dev_addr=dev_addr,
        f_cnt=f_cnt,
        f_port=1,
        dr=5,
        data=data,
    )
    event.time.FromDatetime(_time(ts_ms))
    if obj is not None:
        event.object.update(obj)
    return MessageToJson(event).encode()


def join(dev_eui: str, dev_addr: str, ts_ms: int) -> bytes:
    event = integration.JoinEvent(
        deduplication_id=str(uuid.uuid4()),
        device_info=integration.DeviceInfo(application_id=APP, dev_eui=dev_eui),
        dev_addr=dev_addr,
    )
    event.time.FromDatetime(_time(ts_ms))
    return MessageToJson(event).encode()


def status(dev_eui: str, ts_ms: int, battery: float | None) -> bytes:
    event = integration.StatusEvent(
        deduplication_id=str(uuid.uuid4()),
        device_info=integration.DeviceInfo(application_id=APP, dev_eui=dev_eui),
        margin=9,
    )
    if battery is None:
        event.battery_level_unavailable = True
    else:
        event.battery_level = battery
    event.time.FromDatetime(_time(ts_ms))
    return MessageToJson(event).encode()


def air(f_cnt: int) -> bytes:
    return encode_lpp(
        [
            (1, "analog_input", 10.0 + f_cnt),
            (2, "analog_input", 20.0 + f_cnt),
            (3, "temperature", 27.2),
            (4, "humidity", 60.5),
        ]
    )


Event = tuple[str, str, bytes]  # DevEUI, event kind, JSON


def air_node_events(dev_eui: str, device_id: str, base: int) -> tuple[list[Event], set]:
    """An air node's events with every fault, and the readings that must be stored."""
    events: list[Event] = [(dev_eui, "join", join(dev_eui, "01020304", base))]
    expected = set()

    def up(f_cnt: int, ts: int, **kw) -> None:
        events.append((dev_eui, "up", uplink(dev_eui, f_cnt=f_cnt, ts_ms=ts, **kw)))

    for f_cnt in range(5):
        up(f_cnt, base + 1000 * f_cnt, data=air(f_cnt))
        expected.add((device_id, f_cnt, base + 1000 * f_cnt))
    # ChirpStack publishes an event again (same deduplicationId), and a
    # frame comes again under another one (same DevAddr and fCnt).
    again = uplink(dev_eui, f_cnt=5, ts_ms=base + 5000, data=air(5), dedup="d-5")
    events += [(dev_eui, "up", again), (dev_eui, "up", again)]
    up(5, base + 5000, data=air(5))
    expected.add((device_id, 5, base + 5000))
    # fCnt 7 before 6: both stored, 6 counted out of order.
    for f_cnt in (7, 6):
        up(f_cnt, base + 1000 * f_cnt, data=air(f_cnt))
        expected.add((device_id, f_cnt, base + 1000 * f_cnt))
    # A re-join: a new DevAddr and fCnt from 0 again, a reboot, not a gap.
    events.append((dev_eui, "join", join(dev_eui, "0a0b0c0d", base + 10_000)))
    for f_cnt in range(2):
        up(f_cnt, base + 11_000 + 1000 * f_cnt, dev_addr="0a0b0c0d", data=air(f_cnt))
        expected.add((device_id, f_cnt, base + 11_000 + 1000 * f_cnt))
    # Refused: a payload cut short, a channel of another type than the
    # model's, a value beyond the catalog's range.
    up(20, base + 20_000, data=air(1)[:-1])
    up(21, base + 21_000, data=encode_lpp([(3, "humidity", 50.0)]))
    up(22, base + 22_000, data=encode_lpp([(3, "temperature", 99.0)]))
    # Refused too: an event on this device's topic naming another DevEUI
    # (spoofed or misrouted: bad_id), a frame 40 days old (ts_window), and an
    # event over ChirpStack's 32 KiB bound, short of the site link's 64 KiB
    # (too_large). Each once, whatever else it carries.
    spoofed = uplink(dev_eui, f_cnt=23, ts_ms=base + 23_000, data=air(3))
    events.append((dev_eui, "up", spoofed.replace(dev_eui.encode(), b"70b3d57ed0000000")))
    up(24, base - 40 * 86_400_000, data=air(4))
    up(25, base + 25_000, obj={"pad": "x" * 33_000})
    # An air node reports no battery metric: a status only says it is alive.
    events.append((dev_eui, "status", status(dev_eui, base + 30_000, None)))
    return events, expected


def test_uplinks_are_stored_once_and_every_fault_is_counted(mqtt_server, tmp_path, ids):
    gateway_id, prefix = ids
    air_eui, water_eui = eui(), eui()
    aq = lorawan_device("aq-lora-01", "air_quality", "lpp_air_quality", air_eui)
    water = lorawan_device("water-lora-01", "water_level", "object_water_level", water_eui)
    ingest = FakeIngest(mqtt_server, gateway_id=gateway_id, prefix=prefix)
    ingest.acking = True
    pub = client(mqtt_server)
    publish_config(pub, gateway_id=gateway_id, prefix=prefix, devices=[aq, water], version=1)
    broker = broker_settings(mqtt_server)
    base = now_ms() - 60_000
    events, expected = air_node_events(air_eui, aq.device_id, base)
    # The flood sensor: its object decoded by ChirpStack; a status with its battery.
    for f_cnt in range(3):
        ts = base + 500 + 1000 * f_cnt
        obj = {"depth_cm": 12.5 + f_cnt, "status": "ok", "battery": 88}
        events.append((water_eui, "up", uplink(water_eui, f_cnt=f_cnt, ts_ms=ts, obj=obj)))
        expected.add((water.device_id, f_cnt, ts))
    events.append((water_eui, "status", status(water_eui, base + 4500, 76.5)))
    expected.add((water.device_id, 0, base + 4500))
    with gateway_in_thread(
        settings=gateway_settings(gateway_id, prefix),
        central=broker,
        site=broker,
        outbox=tmp_path / "outbox.sqlite3",
    ) as gw:
        wait_for(lambda: len(gw.devices) == 2, 10, "config applied")
        wait_for(gw.site_ready, 10, "ChirpStack subscriptions granted")
        for dev_eui, kind, payload in events:
            topic = chirpstack_event_topic(APP, dev_eui, kind)
            pub.publish(topic, payload, qos=1).wait_for_publish(10)
        wait_for(lambda: gw.counters.received >= len(events), 10, "every event received")
        wait_for(lambda: ingest.count() == len(expected), 10, "readings at ingest")
        wait_for(lambda: gw.outbox.depth().readings == 0, 10, "outbox drained by acks")
        c = gw.counters
        assert ingest.readings == expected
        assert ingest.deliveries == len(expected)  # the repeats were dropped at the gateway
        assert c.lorawan_repeats == 2
        assert c.lorawan_out_of_order == 1
        assert c.lorawan_joins == 2
        assert c.lorawan_status == 2
        assert c.reboots == 1  # the re-join
        assert c.seq_gaps == 1  # 7 after 5
        refused = ("undecodable", "model_mismatch", "out_of_range", "bad_id", "ts_window")
        assert {r: c.rejects[r] for r in (*refused, "too_large")} == dict.fromkeys(
            (*refused, "too_large"), 1
        )
        assert gw.tracker.devices[aq.device_id].online
        assert gw.tracker.devices[water.device_id].online
        first = ingest.values[aq.device_id][0]
        assert first["temperature"] == pytest.approx(27.2)
        assert first["humidity"] == pytest.approx(60.5)
        water_rows = ingest.values[water.device_id]
        assert {row["battery"] for row in water_rows} == {88.0, 76.5}
        depths = sorted(d for row in water_rows if (d := row.get("water_depth")) is not None)
        assert depths == [12.5, 13.5, 14.5]
    pub.disconnect()
    ingest.close()


def test_an_event_of_a_device_no_longer_configured_is_refused(mqtt_server, tmp_path, ids):
    """The gateway subscribes per DevEUI: an unknown one reaches it through its session.

    A device removed from the config while the gateway was away still has its
    subscription in the gateway's persistent session at the site broker, and
    its events wait there; the gateway, back with the new config, refuses them.
    """
    gateway_id, prefix = ids
    kept_eui, gone_eui = eui(), eui()
    kept = lorawan_device("water-lora-03", "water_level", "object_water_level", kept_eui)
    gone = lorawan_device("water-lora-04", "water_level", "object_water_level", gone_eui)
    pub = client(mqtt_server)
    publish_config(pub, gateway_id=gateway_id, prefix=prefix, devices=[kept, gone], version=1)
    broker = broker_settings(mqtt_server)
    settings = gateway_settings(gateway_id, prefix)
    with gateway_in_thread(
        settings=settings, central=broker, site=broker, outbox=tmp_path / "first.sqlite3"
    ) as gw:
        wait_for(gw.site_ready, 10, "ChirpStack subscriptions granted")
    publish_config(pub, gateway_id=gateway_id, prefix=prefix, devices=[kept], version=2)
    obj = {"depth_cm": 3.0}
    pub.publish(
        chirpstack_event_topic(APP, gone_eui, "up"),
        uplink(gone_eui, f_cnt=1, ts_ms=now_ms(), obj=obj),
        qos=1,
    ).wait_for_publish(10)
    # A new outbox file: the gateway has only the central broker's config, v2.
    with gateway_in_thread(
        settings=settings, central=broker, site=broker, outbox=tmp_path / "second.sqlite3"
    ) as gw:
        wait_for(lambda: gw.counters.rejects["unknown_device"] == 1, 10, "the event refused")
        assert gw.counters.device_rejects["other", "unknown_device"] == 1
        assert gw.counters.accepted == 0
        assert gw.config.version == 2
    pub.disconnect()


def test_a_status_event_brings_a_silent_device_back_online(mqtt_server, tmp_path, ids):
    gateway_id, prefix = ids
    water_eui = eui()
    water = lorawan_device("water-lora-02", "water_level", "object_water_level", water_eui)
    pub = client(mqtt_server)
    publish_config(pub, gateway_id=gateway_id, prefix=prefix, devices=[water], version=1)
    broker = broker_settings(mqtt_server)
    with gateway_in_thread(
        settings=gateway_settings(gateway_id, prefix),
        central=broker,
        site=broker,
        outbox=tmp_path / "outbox.sqlite3",
    ) as gw:
        wait_for(gw.site_ready, 10, "ChirpStack subscriptions granted")
        assert water.device_id not in gw.tracker.devices
        pub.publish(
            chirpstack_event_topic(APP, water_eui, "status"),
            status(water_eui, now_ms(), None),
            qos=1,
        ).wait_for_publish(10)
        wait_for(lambda: gw._online(water.device_id), 10, "online from a status event")
        assert gw.counters.lorawan_status == 1
        assert gw.counters.accepted == 0  # no battery level: no reading
    pub.disconnect()
