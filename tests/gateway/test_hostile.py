"""The gateway against hostile or unlucky input on the real broker.

Oversized messages on the site link and on the central topics it reads, and
devices added live (their first readings must not be published into a
subscription the broker has not confirmed yet).
"""

from __future__ import annotations

from typing import Any, cast

import pytest

from contracts.topics import ack_topic, config_topic, device_status_topic, device_uplink_topic
from gateway.configdiff import device_topics
from tests.plugins.gateway import (
    FakeIngest,
    broker_settings,
    client,
    gateway_in_thread,
    gateway_settings,
    kiosk_uplink,
    mqtt_devices,
    now_ms,
    publish_config,
    publish_readings,
    wait_for,
    watch_states,
)

pytestmark = pytest.mark.slow

EIGHT_MB = 8_000_000


def test_an_8_mb_device_message_is_counted_acked_and_the_others_flow_on(mqtt_server, tmp_path, ids):
    gateway_id, prefix = ids
    devices = mqtt_devices(prefix, 4)
    hostile, others = devices[0], devices[1:]
    ingest = FakeIngest(mqtt_server, gateway_id=gateway_id, prefix=prefix)
    ingest.acking = True
    pub = client(mqtt_server)
    watcher = client(mqtt_server)
    states = watch_states(watcher, gateway_id=gateway_id, prefix=prefix)
    publish_config(pub, gateway_id=gateway_id, prefix=prefix, devices=devices, version=1)
    broker = broker_settings(mqtt_server)
    with gateway_in_thread(
        settings=gateway_settings(gateway_id, prefix, state_interval_s=0.3),
        central=broker,
        site=broker,
        outbox=tmp_path / "o.sqlite3",
    ) as gw:
        generation = gw.site.generation
        big = pub.publish(device_uplink_topic(hostile.device_id, prefix), b"x" * EIGHT_MB, qos=1)
        # The other devices publish while the 8 MB message streams to the gateway.
        sent = publish_readings(pub, prefix=prefix, devices=others, per_device=20)
        big.wait_for_publish(30)
        wait_for(lambda: ingest.count() == len(sent), 20, "the other devices' readings")
        wait_for(lambda: gw.counters.rejects["too_large"] == 1, 10, "the reject counted")
        assert gw.counters.device_rejects[hostile.device_id, "too_large"] == 1
        # The hostile device's next normal reading arrives too: its stream goes on.
        ts = now_ms()
        pub.publish(
            device_uplink_topic(hostile.device_id, prefix), kiosk_uplink(1, ts), qos=1
        ).wait_for_publish(10)
        wait_for(lambda: (hostile.device_id, 1, ts) in ingest.readings, 10, "its next reading")
        assert ingest.readings == sent | {(hostile.device_id, 1, ts)}
        # Never a reconnect (which is how a refused packet used to come back forever).
        assert gw.site.generation == generation
        n_states = len(states)
        wait_for(lambda: len(states) > n_states, 10, "a state message after the reject")
        online = [s for s in states if s.status == "online" and s.received > 0]
        assert online
        assert all(s.site_ready for s in online)
    # While the gateway is away: another oversized message, on the status topic
    # this time, waits in its session with a normal reading behind it.
    late = pub.publish(device_status_topic(hostile.device_id, prefix), b"y" * EIGHT_MB, qos=1)
    late.wait_for_publish(30)
    ts_late = now_ms()
    pub.publish(
        device_uplink_topic(others[0].device_id, prefix), kiosk_uplink(99, ts_late), qos=1
    ).wait_for_publish(10)
    # The gateway resuming the same site session gets the late one (once) and
    # not the first, which it had acknowledged.
    with gateway_in_thread(
        settings=gateway_settings(gateway_id, prefix),
        central=broker,
        site=broker,
        outbox=tmp_path / "o.sqlite3",
    ) as again:
        ts2 = now_ms()
        pub.publish(
            device_uplink_topic(hostile.device_id, prefix), kiosk_uplink(2, ts2), qos=1
        ).wait_for_publish(10)
        wait_for(lambda: (hostile.device_id, 2, ts2) in ingest.readings, 10, "the sentinel")
        assert (others[0].device_id, 99, ts_late) in ingest.readings
        assert again.counters.rejects["too_large"] == 1
        assert again.counters.device_rejects[hostile.device_id, "too_large"] == 1
    watcher.disconnect()
    pub.disconnect()
    ingest.close()


def test_oversized_and_malformed_central_messages_neither_wedge_nor_crash(
    mqtt_server, tmp_path, ids, caplog
):
    gateway_id, prefix = ids
    devices = mqtt_devices(prefix, 2)
    ingest = FakeIngest(mqtt_server, gateway_id=gateway_id, prefix=prefix)
    ingest.acking = True
    pub = client(mqtt_server)
    publish_config(pub, gateway_id=gateway_id, prefix=prefix, devices=devices[:1], version=1)
    broker = broker_settings(mqtt_server)
    with gateway_in_thread(
        settings=gateway_settings(gateway_id, prefix),
        central=broker,
        site=broker,
        outbox=tmp_path / "o.sqlite3",
    ) as gw:
        connects = gw.central.connects
        for topic in (ack_topic(gateway_id, prefix), config_topic(gateway_id, prefix)):
            for payload in (b"x" * EIGHT_MB, b"\xc1\xff{", b"\x92\x01"):
                pub.publish(topic, payload, qos=1).wait_for_publish(30)
        # A new config after the junk is applied, and readings flow and are acked.
        publish_config(pub, gateway_id=gateway_id, prefix=prefix, devices=devices, version=2)
        wait_for(lambda: set(gw.served_devices()) == {d.device_id for d in devices}, 20, "v2")
        sent = publish_readings(pub, prefix=prefix, devices=devices, per_device=10)
        wait_for(lambda: ingest.count() == len(sent), 20, "delivery")
        wait_for(lambda: gw.outbox.depth().readings == 0, 20, "acks applied")
        assert gw.central.connects == connects
        # The broker dropped the 8 MB messages (the uplink's Maximum Packet
        # Size): they were never read into the gateway's memory to be refused.
        assert not [r for r in caplog.records if str(EIGHT_MB) in r.getMessage()]
        assert gw.central.callback_errors == 0
    pub.disconnect()
    ingest.close()


def test_a_device_added_live_is_served_only_once_its_subscription_is_granted(
    mqtt_server, tmp_path, ids
):
    """Publish the instant the gateway reports a new device served, many times over.

    Every such reading must arrive: "served" means the broker confirmed the
    subscription, so a reading published afterwards has a session to wait in.
    """
    gateway_id, prefix = ids
    rounds = 30
    devices = mqtt_devices(prefix, rounds)
    ingest = FakeIngest(mqtt_server, gateway_id=gateway_id, prefix=prefix)
    pub = client(mqtt_server)
    publish_config(pub, gateway_id=gateway_id, prefix=prefix, devices=[], version=1)
    broker = broker_settings(mqtt_server)
    sent = set()
    with gateway_in_thread(
        settings=gateway_settings(gateway_id, prefix),
        central=broker,
        site=broker,
        outbox=tmp_path / "o.sqlite3",
    ) as gw:
        wait_for(lambda: gw.config is not None, 10, "config v1")
        for n in range(1, rounds + 1):
            device = devices[n - 1]
            publish_config(
                pub, gateway_id=gateway_id, prefix=prefix, devices=devices[:n], version=n + 1
            )

            def served(device_id: str = device.device_id) -> bool:
                return device_id in gw.served_devices()

            wait_for(served, 10, "served")
            ts = now_ms()
            pub.publish(device_uplink_topic(device.device_id, prefix), kiosk_uplink(n, ts), qos=1)
            sent.add((device.device_id, n, ts))
        wait_for(lambda: ingest.count() == len(sent), 20, "every first reading")
        assert ingest.readings == sent
    pub.disconnect()
    ingest.close()


def test_refused_subscriptions_are_not_served_and_are_logged_by_device(tmp_path, caplog):
    """The SUBACK bookkeeping without a broker: packet id -> topics -> granted or refused."""
    from contracts.mqttcodec import Suback
    from contracts.settings import BrokerSettings
    from gateway.service import Gateway

    prefix = "tsub"
    a, b = mqtt_devices(prefix, 2)
    nowhere = BrokerSettings(host="127.0.0.1", port=1)
    gw = Gateway(
        settings=gateway_settings("gw-sub", prefix),
        central=nowhere,
        site=nowhere,
        outbox_path=tmp_path / "o.sqlite3",
    )
    try:
        from contracts.messages import GatewayConfig

        gw.apply_config(
            GatewayConfig(gateway_id="gw-sub", version=1, site_id="s", devices=[a, b]),
            persist=False,
        )
        gw.site.connected.set()  # as after a CONNACK; nothing is written without a transport
        topics = device_topics({a.device_id, b.device_id}, gw.prefix)
        gw.site._send_filters(topics, subscribe=True)
        assert gw.site.subscriptions_pending()
        assert gw.served_devices() == set()
        (pid,) = gw.site._pending
        # a's two topics granted, b's uplink refused (0x87: not authorized).
        gw.site.on_control(cast(Any, None), Suback(pid, (1, 1, 0x87, 1)))
        assert not gw.site.subscriptions_pending()
        assert gw.served_devices() == {a.device_id}
        refusals = [
            r.getMessage() for r in caplog.records if "refused the subscription" in r.getMessage()
        ]
        assert len(refusals) == 1
        assert b.device_id in refusals[0]
        assert "0x87" in refusals[0]
        # A SUBACK for a packet id never sent is logged and changes nothing.
        gw.site.on_control(cast(Any, None), Suback(4242, (1,)))
        assert gw.served_devices() == {a.device_id}
    finally:
        gw.site.connected.clear()
        gw.outbox.close()
