"""A provisioned gateway and device working together on the real broker with their own accounts.

The gateway runs with the accounts of its bundle (not the admin's), receives
its device list as its retained config and applies it live; the device
publishes with the account of its bundle; the gateway batches the reading to
the central broker. Revoking the device takes it out of the gateway's config.
"""

from __future__ import annotations

import time
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from contracts.settings import BrokerSettings
from devices.bundle import decode_bundle
from tests.plugins.gateway import (
    FakeIngest,
    gateway_in_thread,
    gateway_settings,
    kiosk_uplink,
    wait_for,
)


def _broker(access) -> BrokerSettings:
    return BrokerSettings(
        host=access.host, port=access.port, username=access.username, password=access.password
    )


def test_gateway_applies_provisioned_devices_live(provisioner, mqtt_server, topic_prefix, tmp_path):
    site = "hk-hall-quan"
    gateway_id = f"gw-{uuid.uuid4().hex[:8]}"
    gw = decode_bundle(provisioner.add_gateway(gateway_id, site_id=site).files.json.read_bytes())
    settings = gateway_settings(gateway_id, topic_prefix, site_id=site)
    ingest = FakeIngest(mqtt_server, gateway_id=gateway_id, prefix=topic_prefix)
    try:
        with gateway_in_thread(
            settings=settings,
            central=_broker(gw.central),
            site=_broker(gw.site),
            outbox=tmp_path / "outbox.sqlite3",
        ) as gateway:
            assert gateway.config is not None
            assert gateway.config.devices == []
            device_id = f"kiosk-{uuid.uuid4().hex[:8]}"
            outcome = provisioner.add_device(
                device_id,
                device_type="kiosk",
                site_id=site,
                gateway_id=gateway_id,
                transport="mqtt",
            )
            # Served: the site broker has granted the device's subscriptions, so
            # its first reading has a session to wait in (no timing involved).
            wait_for(lambda: device_id in gateway.served_devices(), 10, "the new device served")
            bundle = decode_bundle(outcome.files.json.read_bytes())
            device = mqtt.Client(
                CallbackAPIVersion.VERSION2, client_id=bundle.broker.client_id, protocol=mqtt.MQTTv5
            )
            device.username_pw_set(bundle.broker.username, bundle.broker.password)
            device.connect(bundle.broker.host, bundle.broker.port)
            device.loop_start()
            try:
                ts_ms = time.time_ns() // 1_000_000
                info = device.publish(bundle.topics["uplink"], kiosk_uplink(1, ts_ms), qos=1)
                info.wait_for_publish(10)
                wait_for(lambda: ingest.count() >= 1, 15, "the reading batched to the hub")
            finally:
                device.disconnect()
                device.loop_stop()
            assert {r[0] for r in ingest.readings} == {device_id}

            provisioner.revoke_device(device_id)
            wait_for(lambda: device_id not in gateway.devices, 10, "the device removed live")
    finally:
        ingest.close()
