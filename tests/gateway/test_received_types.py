"""A gateway serves a device type it learns from its config, without an upgrade or a restart."""

from __future__ import annotations

import logging

import msgspec
import pytest

from contracts.catalog import DEVICE_TYPES, SHIPPED_CATALOG, load_catalog, use_catalog
from contracts.messages import (
    DeviceConfig,
    DeviceUplink,
    GatewayConfig,
    encode_device_uplink,
    encode_gateway_config,
)
from contracts.topics import config_topic, device_uplink_topic
from gateway.service import CONFIG_DOCUMENT, Gateway
from tests.contracts.test_received_types import WATER_LEVEL_TOML
from tests.plugins.gateway import (
    FakeIngest,
    broker_settings,
    client,
    gateway_in_thread,
    gateway_settings,
    now_ms,
    wait_for,
)

pytestmark = pytest.mark.slow

WATER_LEVEL = load_catalog([("water.toml", WATER_LEVEL_TOML)]).types["river_gauge"]


@pytest.fixture
def restore_catalog():
    """The gateway runs in this process: put the shipped catalog back after it."""
    yield
    use_catalog(SHIPPED_CATALOG)


def _contradicting_air_quality():
    """An air_quality entry whose pm25 is in another unit than the shipped one."""
    shipped = SHIPPED_CATALOG.types["air_quality"]
    metrics = tuple(
        msgspec.structs.replace(m, unit="mg/m3") if m.name == "pm25" else m for m in shipped.metrics
    )
    return msgspec.structs.replace(shipped, metrics=metrics)


def test_a_type_received_with_the_config_is_served_live(
    mqtt_server, tmp_path, ids, restore_catalog, caplog
):
    gateway_id, prefix = ids
    level = DeviceConfig(device_id=f"{prefix}-wl-001", device_type="river_gauge", transport="mqtt")
    air = DeviceConfig(device_id=f"{prefix}-aq-001", device_type="air_quality", transport="mqtt")
    kiosk = DeviceConfig(device_id=f"{prefix}-k-001", device_type="kiosk", transport="mqtt")
    assert "river_gauge" not in DEVICE_TYPES
    config = GatewayConfig(
        gateway_id=gateway_id,
        version=5,
        site_id="hk-hall-ubnd",
        devices=[level, air, kiosk],
        types=(WATER_LEVEL, _contradicting_air_quality(), SHIPPED_CATALOG.types["kiosk"]),
    )
    ingest = FakeIngest(mqtt_server, gateway_id=gateway_id, prefix=prefix)
    pub = client(mqtt_server)
    pub.publish(
        config_topic(gateway_id, prefix), encode_gateway_config(config), qos=1, retain=True
    ).wait_for_publish(10)
    broker = broker_settings(mqtt_server)
    caplog.set_level(logging.INFO, logger="gateway.service")
    with gateway_in_thread(
        settings=gateway_settings(gateway_id, prefix),
        central=broker,
        site=broker,
        outbox=tmp_path / "o.sqlite3",
    ) as gw:
        wait_for(lambda: gw.config is not None and gw.config.version == 5, 10, "config v5")
        # The new type is installed; the contradicting entry is refused and
        # its device left out, the shipped air_quality kept as it was.
        assert DEVICE_TYPES["river_gauge"] == WATER_LEVEL
        assert DEVICE_TYPES["air_quality"] == SHIPPED_CATALOG.types["air_quality"]
        assert set(gw.devices) == {level.device_id, kiosk.device_id}
        assert "device type air_quality refused, its 1 devices left out" in caplog.text
        wait_for(lambda: level.device_id in gw.served_devices(), 10, "subscribed")
        base = now_ms()
        for seq in range(3):
            reading = DeviceUplink(
                seq=seq, ts_ms=base + seq, metrics={"level_cm": 10.5 + seq, "battery_pct": 80}
            )
            pub.publish(
                device_uplink_topic(level.device_id, prefix), encode_device_uplink(reading), qos=1
            ).wait_for_publish(10)
        wait_for(lambda: ingest.count() == 3, 10, "the water level readings")
        assert ingest.values[level.device_id] == [
            {"level_cm": 10.5 + seq, "battery_pct": 80} for seq in range(3)
        ]
        assert gw.counters.rejects.total() == 0
        saved = gw.outbox.load_document(CONFIG_DOCUMENT)
    pub.disconnect()
    ingest.close()
    # A restarted gateway serves the saved config's types before any broker.
    use_catalog(SHIPPED_CATALOG)
    restarted = Gateway(
        settings=gateway_settings(gateway_id, prefix),
        central=broker,
        site=broker,
        outbox_path=tmp_path / "o.sqlite3",
    )
    assert saved is not None
    assert set(restarted.devices) == {level.device_id, kiosk.device_id}
    assert DEVICE_TYPES["river_gauge"] == WATER_LEVEL
    restarted.outbox.close()
