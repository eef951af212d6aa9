"""Modbus and LoRaWAN models as catalog data: what a file may say, and what it is refused for."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from contracts.catalog import SHIPPED_CATALOG, describe_changes, load_catalog
from contracts.errors import CatalogError
from contracts.registermaps import decode_registers, read_blocks

DOCS = Path(__file__).resolve().parents[2] / "docs" / "devices.md"

GOOD_MODBUS = """
[modbus_models.gauge]
device_type = "water_level"
description = "A gauge"
source = "vendor table rev. 3"
registers = [
    { metric = "water_depth", function = 3, address = 10, type = "int32", word_order = "little" },
]
"""


def _load(text: str):
    return load_catalog([("ops.toml", text)])


def test_the_shipped_models_cite_their_sources_and_feed_their_types() -> None:
    for model in SHIPPED_CATALOG.modbus_models.values():
        assert model.source.strip()
        dtype = SHIPPED_CATALOG.types[model.device_type]
        assert "modbus" in dtype.transports
        assert {r.metric for r in model.registers} <= set(dtype.metric_names)
        assert set(model.commands) <= set(dtype.command_names)
    for profile in SHIPPED_CATALOG.lorawan_models.values():
        assert "lorawan" in SHIPPED_CATALOG.types[profile.device_type].transports


def test_an_operators_model_is_added_and_described() -> None:
    catalog = _load(GOOD_MODBUS)
    model = catalog.modbus_models["gauge"]
    assert (model.baudrate, model.parity, model.stopbits) == (9600, "N", 1)
    assert describe_changes(SHIPPED_CATALOG, catalog) == ["new Modbus model gauge (water_level)"]
    # int32, low word first: words (0x0001, 0x0000) are 1.
    (block,) = read_blocks(model)
    assert decode_registers(block, [1, 0]) == {"water_depth": 1.0}


@pytest.mark.parametrize(
    ("old", "new", "key", "problem"),
    [
        ('"water_level"', '"kiosk"', "device_type", "not a device type with the modbus transport"),
        ("function = 3", "function = 5", "registers[0].function", "not one of 3, 4"),
        ("address = 10", "address = 10, scale = 0", "registers[0].scale", "must not be 0"),
        ('"int32"', '"float64"', "registers[0].type", "not one of"),
        ("address = 10", "address = 65535", "registers[0].address", "runs past 65535"),
        ("address = 10", "address = 10, colour = 1", "registers[0].colour", "unknown key"),
        ('"water_depth"', '"humidity"', "registers[0].metric", "not a metric"),
        ("address = 10", "address = 10, values = [[0, 0], [0, 1]]", "registers[0].values", "twice"),
        ('source = "vendor table rev. 3"\n', "", "source", "non-empty string"),
        ("registers = [", "baudrate = 1000\nregisters = [", "baudrate", "not one of"),
        ("registers = [", "poll_interval_s = 0.01\nregisters = [", "poll_interval_s", "outside"),
    ],
)
def test_a_bad_modbus_model_is_refused_naming_the_key(
    old: str, new: str, key: str, problem: str
) -> None:
    assert old in GOOD_MODBUS
    with pytest.raises(CatalogError) as info:
        _load(GOOD_MODBUS.replace(old, new, 1))
    assert key in str(info.value), str(info.value)
    assert problem in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("write", "problem"),
    [
        ('{ command = "reboot", arg = "x", function = 6, address = 1 }', "has no command"),
        ('{ command = "set_response_delay", function = 6, address = 1 }', "either an arg"),
        (
            (
                '{ command = "set_response_delay", arg = "delay_ms", value = 3, function = 6,'
                " address = 1 }"
            ),
            "either an arg",
        ),
        ('{ command = "set_response_delay", arg = "nope", function = 6, address = 1 }', "no arg"),
        (
            (
                '{ command = "set_response_delay", arg = "delay_ms", function = 6, address = 1,'
                ' type = "uint32" }'
            ),
            "use 16",
        ),
        (
            '{ command = "set_response_delay", arg = "delay_ms", function = 3, address = 1 }',
            "not one of 6, 16",
        ),
    ],
)
def test_a_bad_write_is_refused(write: str, problem: str) -> None:
    with pytest.raises(CatalogError, match=problem):
        _load(GOOD_MODBUS + f"writes = [{write}]\n")


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ('[{ metric = "water_depth", channel = 1, lpp_type = "sonar" }]', "not one of"),
        ('[{ metric = "water_depth", channel = 300, lpp_type = "analog_input" }]', "channel 0-255"),
        (
            '[{ metric = "water_depth", channel = 1, lpp_type = "analog_input", key = "d" }]',
            "names a channel, not a key",
        ),
        (
            (
                '[{ metric = "water_depth", channel = 1, lpp_type = "analog_input" },'
                ' { metric = "battery", channel = 1, lpp_type = "analog_input" }]'
            ),
            "read by two fields",
        ),
        ('[{ metric = "rain", channel = 1, lpp_type = "analog_input" }]', "not a metric"),
    ],
)
def test_a_bad_lorawan_model_is_refused(fields: str, problem: str) -> None:
    text = (
        '[lorawan_models.node]\ndevice_type = "water_level"\ndescription = "a node"\n'
        f'codec = "cayenne_lpp"\nfields = {fields}\n'
    )
    with pytest.raises(CatalogError, match=problem):
        _load(text)


def test_the_documented_model_file_loads() -> None:
    text = DOCS.read_text(encoding="utf-8")
    match = re.search(r"```toml\n(# /etc/cityhub/catalog.d/meters.toml\n.*?)```", text, re.DOTALL)
    assert match is not None, "docs/devices.md lost its model example"
    catalog = _load(match.group(1))
    assert describe_changes(SHIPPED_CATALOG, catalog) == [
        "new Modbus model vegapuls_c21_6m (water_level)",
        "new LoRaWAN model my_flood_node (water_level)",
    ]
