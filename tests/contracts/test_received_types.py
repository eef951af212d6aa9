"""Catalog entries received at run time: merged with a file's checks, followed by the fast path."""

from __future__ import annotations

import msgspec
import pytest

from contracts import catalog
from contracts.catalog import (
    DEVICE_TYPES,
    SHIPPED_CATALOG,
    Metric,
    MetricKind,
    current_catalog,
    decode_device_type,
    encode_device_type,
    follow_catalog,
    load_catalog,
    merge_types,
    use_catalog,
)
from contracts.errors import CatalogError, UnknownDeviceTypeError
from contracts.messages import (
    CONTROL_MAX_BYTES,
    DeviceConfig,
    GatewayConfig,
    decode_device_uplink,
    decode_gateway_config,
    encode_gateway_config,
)

NOW_MS = 1_767_225_600_000

WATER_LEVEL_TOML = """
[types.river_gauge]
description = "Water level under a low-lying street"
transports = ["mqtt"]

[[types.river_gauge.metrics]]
name = "level_cm"
unit = "cm"
kind = "float"
min = 0
max = 500
description = "Water above the road surface"

[[types.river_gauge.metrics]]
name = "battery_pct"
unit = "%"
kind = "int"
min = 0
max = 100
description = "Battery charge"
"""

WATER_LEVEL = load_catalog([("water.toml", WATER_LEVEL_TOML)]).types["river_gauge"]


@pytest.fixture
def restore_catalog():
    yield
    use_catalog(SHIPPED_CATALOG)


def test_a_new_type_is_added_and_a_known_one_is_no_change():
    merged, refused = merge_types(
        SHIPPED_CATALOG, [WATER_LEVEL, SHIPPED_CATALOG.types["kiosk"]], source="config v3"
    )
    assert refused == {}
    assert merged.types["river_gauge"] == WATER_LEVEL
    assert list(merged.types) == [*SHIPPED_CATALOG.types, "river_gauge"]
    assert merged.sources[-1] == "config v3"
    # Only what is already known: the very same catalog comes back.
    again, refused = merge_types(merged, [WATER_LEVEL], source="config v4")
    assert again is merged
    assert refused == {}


def test_a_known_type_gains_the_new_metrics_and_keeps_its_own():
    extra = Metric(
        name="so2", unit="ug/m3", kind=MetricKind.FLOAT, min=0, max=1000, description="SO2"
    )
    shipped = SHIPPED_CATALOG.types["air_quality"]
    # An entry from a centre that knows SO2 but not the last shipped metric.
    received = msgspec.structs.replace(shipped, metrics=(*shipped.metrics[:-1], extra))
    merged, refused = merge_types(SHIPPED_CATALOG, [received], source="config v3")
    assert refused == {}
    assert merged.types["air_quality"].metric_names == (*shipped.metric_names, "so2")


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"unit": "mg/m3"}, "metrics.pm25.unit"),
        ({"kind": MetricKind.INT, "min": 0, "max": 1000}, "metrics.pm25.kind"),
    ],
)
def test_an_entry_contradicting_a_shipped_metric_is_refused(change, key):
    shipped = SHIPPED_CATALOG.types["air_quality"]
    metrics = tuple(
        msgspec.structs.replace(m, **change) if m.name == "pm25" else m for m in shipped.metrics
    )
    received = msgspec.structs.replace(shipped, metrics=metrics)
    merged, refused = merge_types(SHIPPED_CATALOG, [received, WATER_LEVEL], source="config v3")
    assert list(refused) == ["air_quality"]
    error = refused["air_quality"]
    assert (error.source, error.type_name, error.key) == ("config v3", "air_quality", key)
    # The shipped entry stays; the other received type is still taken.
    assert merged.types["air_quality"] is shipped
    assert "river_gauge" in merged.types


def test_a_serial_protocol_without_gateway_code_and_a_bad_name_are_refused():
    serial = msgspec.structs.replace(
        WATER_LEVEL, name="gauge", transports=("serial",), serial_protocols=("modbus",)
    )
    bad_name = msgspec.structs.replace(WATER_LEVEL, name="Water Level")
    empty_range = msgspec.structs.replace(
        WATER_LEVEL,
        name="broken",
        metrics=(msgspec.structs.replace(WATER_LEVEL.metrics[0], min=5, max=5),),
    )
    merged, refused = merge_types(
        SHIPPED_CATALOG, [serial, bad_name, empty_range], source="config v3"
    )
    assert merged is SHIPPED_CATALOG
    assert set(refused) == {"gauge", "Water Level", "broken"}
    assert refused["gauge"].key == "serial_protocols"
    assert refused["broken"].key == "metrics.level_cm.max"


def test_an_entry_round_trips_as_json_and_garbage_names_its_source():
    assert decode_device_type(encode_device_type(WATER_LEVEL), "x") == WATER_LEVEL
    with pytest.raises(CatalogError, match=r"device_types\.entry"):
        decode_device_type(b'{"name": 1}', "device_types.entry")


def test_a_config_carries_its_types_and_old_configs_still_decode():
    device = DeviceConfig(device_id="wl-001", device_type="river_gauge", transport="mqtt")
    config = GatewayConfig(
        gateway_id="gw-1", version=3, site_id="s-1", devices=[device], types=(WATER_LEVEL,)
    )
    payload = encode_gateway_config(config)
    # The shape decodes before the type is known; the full check needs the type.
    assert decode_gateway_config(payload, check=False) == config
    with pytest.raises(UnknownDeviceTypeError):
        decode_gateway_config(payload)
    old = b'{"gateway_id": "gw-1", "version": 1, "site_id": "s-1", "devices": []}'
    assert decode_gateway_config(old).types == ()
    # Without types a config is encoded as before the field existed.
    assert encode_gateway_config(
        msgspec.structs.replace(config, version=1, devices=[], types=())
    ) == old.replace(b" ", b"")
    # Every shipped type, with a thousand devices, stays far below the control bound.
    many = [
        DeviceConfig(device_id=f"dev-{i:04d}", device_type="kiosk", transport="mqtt")
        for i in range(1000)
    ]
    big = GatewayConfig(
        gateway_id="gw-1",
        version=1,
        site_id="s-1",
        devices=many,
        types=(*SHIPPED_CATALOG.types.values(), WATER_LEVEL),
    )
    assert len(encode_gateway_config(big)) < CONTROL_MAX_BYTES // 4


def test_the_uplink_fast_path_follows_the_installed_catalog(restore_catalog):
    from contracts import messages

    uplink = b'{"seq": 1, "ts": %d, "m": {"level_cm": 12.5, "battery_pct": 90}}' % NOW_MS
    with pytest.raises(UnknownDeviceTypeError):
        decode_device_uplink(uplink, device_type="river_gauge", now_ms=NOW_MS)
    merged, _ = merge_types(current_catalog(), [WATER_LEVEL], source="config v3")
    use_catalog(merged)
    assert "river_gauge" in DEVICE_TYPES
    assert messages._METRIC_BOUNDS["river_gauge"] == {
        "level_cm": (0, 500, False),
        "battery_pct": (0, 100, True),
    }
    # Accepted by the fast path itself, not only by the detailed one.
    fast = messages._accept_uplink(uplink, "river_gauge", NOW_MS, 4096, 10**9, 10**9)
    assert fast is not None
    assert fast.metrics == {"level_cm": 12.5, "battery_pct": 90}
    use_catalog(SHIPPED_CATALOG)
    assert "river_gauge" not in messages._METRIC_BOUNDS


def test_a_follower_sees_the_installed_catalog_now_and_after_each_install(restore_catalog):
    seen: list[tuple[str, ...]] = []
    follow_catalog(lambda installed: seen.append(tuple(installed.types)))
    try:
        use_catalog(merge_types(SHIPPED_CATALOG, [WATER_LEVEL], source="x")[0])
        assert seen == [tuple(SHIPPED_CATALOG.types), (*SHIPPED_CATALOG.types, "river_gauge")]
    finally:
        catalog._followers.pop()
