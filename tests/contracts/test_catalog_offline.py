"""A device type's offline_after_s: the catalog's one definition of "online"."""

from __future__ import annotations

import pytest

from contracts.catalog import (
    DEFAULT_OFFLINE_AFTER_S,
    SHIPPED_CATALOG,
    decode_device_type,
    describe_changes,
    encode_device_type,
    load_catalog,
)
from contracts.errors import CatalogError
from contracts.schema import online_sql

NEW_TYPE = """
[types.rain_gauge]
description = "Rain gauge"
transports = ["mqtt"]
metrics = [{ name = "rain", unit = "mm", kind = "float", min = 0, max = 200, description = "R" }]
"""


def test_every_shipped_type_says_when_its_devices_are_offline() -> None:
    values = {name: t.offline_after_s for name, t in SHIPPED_CATALOG.types.items()}
    assert values["kiosk"] == 300
    assert values["water_level"] == 900
    assert all(60 <= v <= 3600 for v in values.values()), values


def test_a_new_type_gets_the_default_and_may_set_its_own() -> None:
    catalog = load_catalog([("rain.toml", NEW_TYPE)])
    assert catalog.types["rain_gauge"].offline_after_s == DEFAULT_OFFLINE_AFTER_S
    own = load_catalog([("rain.toml", NEW_TYPE + "offline_after_s = 1200\n")])
    assert own.types["rain_gauge"].offline_after_s == 1200
    changed = load_catalog([("k.toml", "[types.kiosk]\noffline_after_s = 120\n")])
    assert changed.types["kiosk"].offline_after_s == 120
    assert "kiosk: offline after 120 s (was 300 s)" in describe_changes(SHIPPED_CATALOG, changed)


@pytest.mark.parametrize("value", ["0", "-5", "86401", "true", '"600"', "nan"])
def test_a_bad_offline_after_s_is_refused_naming_the_key(value: str) -> None:
    with pytest.raises(CatalogError, match=r"k\.toml: type 'kiosk'.*offline_after_s"):
        load_catalog([("k.toml", f"[types.kiosk]\noffline_after_s = {value}\n")])


def test_the_entry_sent_to_gateways_and_stored_by_migrate_keeps_it() -> None:
    own = load_catalog([("rain.toml", NEW_TYPE + "offline_after_s = 1200\n")])
    entry = encode_device_type(own.types["rain_gauge"])
    assert decode_device_type(entry, "db").offline_after_s == 1200


def test_online_sql_compares_last_seen_with_the_type_timeout() -> None:
    assert online_sql("ds.last_seen", "dt.offline_after_s") == (
        "(ds.last_seen > now() - make_interval(secs => dt.offline_after_s))"
    )
