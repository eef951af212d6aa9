"""The gateway against a real Mosquitto: delivery with acks, rate limits, live config, rejects."""

from __future__ import annotations

import urllib.request
from typing import cast

import pytest

from cityhub.localstack.procs import free_port
from contracts.messages import DeviceUplink, encode_device_uplink
from contracts.topics import device_uplink_topic
from tests.plugins.gateway import (
    FakeIngest,
    broker_settings,
    client,
    gateway_in_thread,
    gateway_settings,
    mqtt_devices,
    now_ms,
    publish_config,
    publish_readings,
    wait_for,
)

pytestmark = pytest.mark.slow


def test_readings_reach_ingest_and_leave_the_outbox_on_ack(
    mqtt_server, tmp_path, ids, other_address
):
    gateway_id, prefix = ids
    devices = mqtt_devices(prefix, 10)
    ingest = FakeIngest(mqtt_server, gateway_id=gateway_id, prefix=prefix)
    ingest.acking = True
    pub = client(mqtt_server)
    publish_config(pub, gateway_id=gateway_id, prefix=prefix, devices=devices, version=1)
    broker = broker_settings(mqtt_server)
    with gateway_in_thread(
        # /metrics on gateway.metrics_host: an address of this machine, not 127.0.0.1.
        settings=gateway_settings(
            gateway_id, prefix, metrics_host=other_address, metrics_port=free_port()
        ),
        central=broker,
        site=broker,
        outbox=tmp_path / "outbox.sqlite3",
    ) as gw:
        wait_for(lambda: len(gw.devices) == 10, 10, "config applied")
        sent = publish_readings(pub, prefix=prefix, devices=devices, per_device=50)
        wait_for(lambda: ingest.count() == len(sent), 20, "all readings at ingest")
        wait_for(lambda: gw.outbox.depth().readings == 0, 20, "outbox drained by acks")
        assert ingest.readings == sent
        assert gw.counters.accepted == len(sent)
        assert gw.counters.readings_acked == len(sent)
        # Values arrive as sent, columnar and per metric.
        first = ingest.values[devices[0].device_id][0]
        assert first["queue_length"] == 0.0
        metrics = (
            urllib.request.urlopen(
                f"http://{other_address}:{gw.settings.metrics_port}/metrics", timeout=5
            )
            .read()
            .decode()
        )
        assert f'cityhub_gateway_readings_acked_total{{gateway="{gateway_id}"}} 500.0' in metrics
        assert f'cityhub_gateway_outbox_readings{{gateway="{gateway_id}"}} 0.0' in metrics
    pub.disconnect()
    ingest.close()


def test_a_flooding_device_is_throttled_while_others_keep_their_rate(mqtt_server, tmp_path, ids):
    gateway_id, prefix = ids
    devices = mqtt_devices(prefix, 4)
    flooder, calm = devices[0], devices[1:]
    ingest = FakeIngest(mqtt_server, gateway_id=gateway_id, prefix=prefix)
    pub = client(mqtt_server)
    publish_config(pub, gateway_id=gateway_id, prefix=prefix, devices=devices, version=1)
    broker = broker_settings(mqtt_server)
    settings = gateway_settings(gateway_id, prefix, device_rate_per_s=5.0, device_burst=10.0)
    with gateway_in_thread(
        settings=settings, central=broker, site=broker, outbox=tmp_path / "o.sqlite3"
    ) as gw:
        wait_for(lambda: len(gw.devices) == 4, 10, "config applied")
        # 2,000 messages from the flooder as fast as the broker takes them,
        # while the calm devices send 5 each (within their burst).
        flood = publish_readings(pub, prefix=prefix, devices=[flooder], per_device=2000)
        normal = publish_readings(pub, prefix=prefix, devices=calm, per_device=5, start_seq=0)
        wait_for(lambda: gw.counters.received >= len(flood) + len(normal), 20, "all received")
        wait_for(lambda: ingest.count() >= len(normal) + 10, 20, "delivery")
        wait_for(lambda: gw.builder.rows == 0, 5, "builder flushed")
        delivered = ingest.readings
        assert normal <= delivered  # every calm reading arrives
        flooded = [r for r in delivered if r[0] == flooder.device_id]
        elapsed_s = 30  # generous upper bound on the flood's duration
        assert 10 <= len(flooded) <= 10 + 5 * elapsed_s
        assert gw.counters.rate_limited == len(flood) - len(flooded)
    pub.disconnect()
    ingest.close()


def test_a_config_change_is_applied_live(mqtt_server, tmp_path, ids):
    gateway_id, prefix = ids
    a, b = mqtt_devices(prefix, 2)
    ingest = FakeIngest(mqtt_server, gateway_id=gateway_id, prefix=prefix)
    pub = client(mqtt_server)
    publish_config(pub, gateway_id=gateway_id, prefix=prefix, devices=[a], version=1)
    broker = broker_settings(mqtt_server)
    with gateway_in_thread(
        settings=gateway_settings(gateway_id, prefix),
        central=broker,
        site=broker,
        outbox=tmp_path / "o.sqlite3",
    ) as gw:
        wait_for(lambda: gw.config is not None and gw.config.version == 1, 10, "config v1")
        before = publish_readings(pub, prefix=prefix, devices=[a, b], per_device=3)
        wait_for(lambda: ingest.count() == 3, 10, "a's readings")
        # The gateway subscribes to its configured devices only: b is not even seen.
        assert gw.counters.received == 3
        publish_config(pub, gateway_id=gateway_id, prefix=prefix, devices=[a, b], version=2)
        wait_for(lambda: gw.config.version == 2, 10, "config v2 applied without restart")
        wait_for(lambda: b.device_id in gw.served_devices(), 10, "b subscribed")
        after = publish_readings(pub, prefix=prefix, devices=[b], per_device=3, start_seq=10)
        expected = {r for r in before if r[0] == a.device_id} | after
        wait_for(lambda: ingest.count() == len(expected), 10, "delivery")
        assert ingest.readings == expected
        # An older version is ignored.
        publish_config(pub, gateway_id=gateway_id, prefix=prefix, devices=[], version=1)
        wait_for(lambda: gw.counters.configs_applied == 2, 2, "no third config")
        assert len(gw.devices) == 2
    pub.disconnect()
    ingest.close()


MALFORMED = {
    b"{not json": "malformed",
    b'{"seq": "x", "ts": 1, "m": {"uptime": 1}}': "wrong_type",
    b'{"seq": 1, "ts": TS, "m": {"uptime": NaN}}': "malformed",
    b'{"seq": 1, "ts": TS, "m": {"uptime": 1e999}}': "non_finite",
    b'{"seq": 1, "ts": TS, "m": {"paper_level": 150}}': "out_of_range",
    b'{"seq": 1, "ts": TS, "m": {"pm25": 3}}': "unknown_metric",
    b'{"seq": 1, "ts": 1000, "m": {"uptime": 1}}': "ts_window",
    b'{"seq": 1, "ts": TS, "m": {"uptime": 1}, "pad": "' + b"x" * 5000 + b'"}': "too_large",
}


def test_malformed_device_payloads_are_counted_rejects_and_never_crash(mqtt_server, tmp_path, ids):
    gateway_id, prefix = ids
    (device,) = mqtt_devices(prefix, 1)
    ingest = FakeIngest(mqtt_server, gateway_id=gateway_id, prefix=prefix)
    pub = client(mqtt_server)
    publish_config(pub, gateway_id=gateway_id, prefix=prefix, devices=[device], version=1)
    broker = broker_settings(mqtt_server)
    with gateway_in_thread(
        settings=gateway_settings(gateway_id, prefix),
        central=broker,
        site=broker,
        outbox=tmp_path / "o.sqlite3",
    ) as gw:
        wait_for(lambda: len(gw.devices) == 1, 10, "config applied")
        topic = device_uplink_topic(device.device_id, prefix)
        for payload in MALFORMED:
            pub.publish(topic, payload.replace(b"TS", str(now_ms()).encode()), qos=1)
        good = encode_device_uplink(DeviceUplink(seq=7, ts_ms=now_ms(), metrics={"uptime": 5}))
        pub.publish(topic, good, qos=1).wait_for_publish(10)
        wait_for(lambda: ingest.count() == 1, 10, "the good reading")
        expected: dict[str, int] = {}
        for reason in MALFORMED.values():
            expected[reason] = expected.get(reason, 0) + 1
        assert dict(gw.counters.rejects) == expected
        assert gw.counters.accepted == 1
    pub.disconnect()
    ingest.close()


def test_serial_pms5003_sensor_over_a_real_pty(mqtt_server, tmp_path, ids):
    import os

    from contracts.frames import Pms5003Frame, encode_pms5003
    from contracts.messages import DeviceConfig

    gateway_id, prefix = ids
    master, slave = os.openpty()
    device = DeviceConfig(
        device_id=f"{prefix}-aq-01",
        device_type="air_quality",
        transport="serial",
        port=os.ttyname(slave),
        protocol="pms5003",
    )
    ingest = FakeIngest(mqtt_server, gateway_id=gateway_id, prefix=prefix)
    pub = client(mqtt_server)
    publish_config(pub, gateway_id=gateway_id, prefix=prefix, devices=[device], version=1)
    broker = broker_settings(mqtt_server)
    try:
        with gateway_in_thread(
            settings=gateway_settings(gateway_id, prefix),
            central=broker,
            site=broker,
            outbox=tmp_path / "o.sqlite3",
        ) as gw:
            wait_for(lambda: len(gw.devices) == 1, 10, "config applied")
            frames = [
                encode_pms5003(
                    Pms5003Frame(
                        pm1_cf1=i,
                        pm25_cf1=i,
                        pm10_cf1=i,
                        pm1_atm=i,
                        pm25_atm=10 + i,
                        pm10_atm=20 + i,
                        n0_3=0,
                        n0_5=0,
                        n1_0=0,
                        n2_5=0,
                        n5_0=0,
                        n10=0,
                    )
                )
                for i in range(20)
            ]
            corrupted = bytearray(frames[5])
            corrupted[10] ^= 0xFF
            frames[5] = bytes(corrupted)
            # Garbage between frames and frames split across writes, as a real line delivers.
            stream = b"".join(b"\x00\x13\x37" + f for f in frames)
            wait_for(
                lambda: gw.counters.serial_reconnects == 0 and gw.site.connected.is_set(),
                5,
                "ready",
            )
            for start in range(0, len(stream), 7):
                os.write(master, stream[start : start + 7])
            wait_for(lambda: ingest.count() == 19, 15, "19 good frames delivered")
            assert gw.counters.serial_checksum_errors == 1
            assert gw.counters.serial_frames == 19
            pm25 = sorted(cast(float, v["pm25"]) for v in ingest.values[device.device_id])
            assert pm25 == [10.0 + i for i in range(20) if i != 5]
    finally:
        os.close(master)
        os.close(slave)
        pub.disconnect()
        ingest.close()


def test_state_message_reports_health_and_death(mqtt_server, tmp_path, ids):
    import threading

    from contracts.messages import decode_gateway_state
    from contracts.topics import state_topic

    gateway_id, prefix = ids
    devices = mqtt_devices(prefix, 3)
    ingest = FakeIngest(mqtt_server, gateway_id=gateway_id, prefix=prefix)
    ingest.acking = True
    pub = client(mqtt_server)
    publish_config(pub, gateway_id=gateway_id, prefix=prefix, devices=devices, version=1)
    states = []
    got = threading.Event()
    watcher = client(mqtt_server)

    def on_message(_c, _u, message):
        states.append(decode_gateway_state(message.payload))
        got.set()

    watcher.on_message = on_message
    watcher.subscribe(state_topic(gateway_id, prefix), qos=1)
    broker = broker_settings(mqtt_server)
    with gateway_in_thread(
        settings=gateway_settings(gateway_id, prefix, state_interval_s=0.3),
        central=broker,
        site=broker,
        outbox=tmp_path / "o.sqlite3",
    ) as gw:
        wait_for(lambda: len(gw.devices) == 3, 10, "config applied")
        sent = publish_readings(pub, prefix=prefix, devices=devices, per_device=10)
        pub.publish(device_uplink_topic(devices[0].device_id, prefix), b"{junk", qos=1)
        wait_for(lambda: ingest.count() == len(sent), 10, "delivery")
        wait_for(
            lambda: any(s.accepted == len(sent) and s.rejected == 1 for s in states),
            10,
            "a state message with the counts",
        )
        live = next(s for s in states if s.accepted == len(sent))
        assert live.status == "online"
        assert live.received == len(sent) + 1
        assert live.devices_online == 3
        birth = live.birth
    wait_for(lambda: states[-1].status == "offline", 10, "death message")
    assert states[-1].birth == birth
    watcher.disconnect()
    pub.disconnect()
    ingest.close()
