"""Commands in the device catalog: shipped ones, operators' additions, refusals, transport."""

from __future__ import annotations

import json

import msgspec
import pytest

from contracts import catalog
from contracts.catalog import (
    SHIPPED_CATALOG,
    ArgKind,
    Catalog,
    CommandArg,
    decode_device_type,
    describe_changes,
    encode_device_type,
    load_catalog,
    merge_types,
)
from contracts.errors import CatalogError
from contracts.messages import GatewayConfig, decode_gateway_config, encode_gateway_config

OPS = "/etc/cityhub/catalog.d/ops.toml"


def _commands(dtype):
    return {c.name: c for c in dtype.commands}


# --- shipped -------------------------------------------------------------------


def test_shipped_commands_per_type():
    names = {name: t.command_names for name, t in SHIPPED_CATALOG.types.items()}
    assert names == {
        "air_quality": (
            "sleep", "wake", "set_working_period", "set_reporting_mode", "set_reporting_interval",
        ),
        "kiosk": (
            "reboot", "print_test_page", "open_queue", "close_queue", "set_reporting_interval",
        ),
        "camera_counter": ("reset_count", "set_reporting_interval"),
        "conference_endpoint": ("start_test_call", "set_reporting_interval"),
        "noise_meter": ("set_reporting_interval", "calibrate_offset"),
        "water_level": ("set_reporting_interval", "set_response_delay"),
        "satisfaction_terminal": (),  # one reading per rating: no interval to set
    }  # fmt: skip


def test_shipped_air_quality_commands_say_which_serial_protocols_carry_them():
    aq = _commands(catalog.AIR_QUALITY)
    assert aq["sleep"].protocols == ("pms5003", "sds011")
    assert aq["set_reporting_mode"].protocols == ("pms5003", "sds011")
    assert aq["set_working_period"].protocols == ("sds011",)
    # A serial PMS5003 streams ~1 reading/s: the interval is for MQTT monitors only.
    assert aq["set_reporting_interval"].protocols == ()
    minutes = aq["set_working_period"].arg("minutes")
    assert minutes == CommandArg(
        name="minutes", kind=ArgKind.INT, min=0, max=30,
        description="Minutes between readings; 0 = continuous (about one a second)",
    )  # fmt: skip
    assert aq["set_reporting_mode"].arg("mode").labels == ("active", "query")


def test_shipped_reporting_intervals_stay_under_a_third_of_offline_after():
    # Two reports lost in a row never mark a device offline.
    for dtype in SHIPPED_CATALOG.types.values():
        command = dtype.command("set_reporting_interval")
        if command is None:
            continue
        interval = command.arg("interval_s")
        assert interval is not None
        assert interval.min is not None
        assert interval.max is not None
        assert interval.kind is ArgKind.INT
        assert interval.max * 3 <= dtype.offline_after_s, dtype.name
        assert interval.min >= 5, dtype.name


def test_shipped_defaults_and_optional_args():
    kiosk = _commands(catalog.KIOSK)
    assert kiosk["reboot"].args == ()
    assert kiosk["reboot"].timeout_s == 180
    message = kiosk["close_queue"].arg("message")
    assert (message.kind, message.max_length, message.required, message.default) == (
        ArgKind.STRING, 120, False, None,
    )  # fmt: skip
    duration = catalog.CONFERENCE_ENDPOINT.command("start_test_call").arg("duration_s")
    assert (duration.default, duration.required, duration.min, duration.max) == (30, False, 10, 300)
    assert catalog.CAMERA_COUNTER.command("reset_count").arg("occupancy").default == 0


# --- operators' files ----------------------------------------------------------

ADDS = """
[types.kiosk]
commands = [
    { name = "show_notice", description = "Thông báo (notice)", args = [
        { name = "text", kind = "string", max_length = 80, description = "Notice" },
        { name = "beep", kind = "bool", required = false, description = "Beep" },
    ] },
    { name = "reboot", timeout_s = 240, args = [
        { name = "delay_s", kind = "int", min = 0, max = 600, default = 0, description = "Wait" },
    ] },
]

[types.siren]
description = "Flood siren"
transports = ["mqtt"]
metrics = [{ name = "armed", unit = "", kind = "bool", description = "Armed" }]
commands = [
    { name = "sound", description = "Sound it", args = [
        { name = "level", kind = "enum", labels = ["low", "high"], description = "Level" },
        { name = "volume", kind = "float", min = 0, max = 1, default = 1, description = "Volume" },
    ] },
]
"""


def test_operator_file_adds_commands_and_args_with_defaults():
    merged = load_catalog([(OPS, ADDS)])
    kiosk = merged.types["kiosk"]
    assert kiosk.command_names == (*catalog.KIOSK.command_names, "show_notice")
    reboot = kiosk.command("reboot")
    assert reboot.timeout_s == 240
    assert reboot.description == catalog.KIOSK.command("reboot").description
    assert reboot.arg_names == ("delay_s",)
    assert kiosk.command("show_notice").arg("beep").required is False
    volume = merged.types["siren"].command("sound").arg("volume")
    assert volume.default == 1.0
    assert type(volume.default) is float  # a FLOAT arg's default is a float, even written 1
    assert describe_changes(SHIPPED_CATALOG, merged) == [
        "kiosk: command reboot: new arg delay_s (int, default 0)",
        "kiosk: new command show_notice (text, beep)",
        "new type siren: 1 metric",
        "siren: new command sound (level, volume)",
    ]


def test_restating_a_command_without_args_keeps_them():
    text = '[types.air_quality]\ncommands = [{ name = "set_working_period", timeout_s = 45 }]\n'
    merged = load_catalog([(OPS, text)]).types["air_quality"]
    command = merged.command("set_working_period")
    assert command.timeout_s == 45
    assert command.args == catalog.AIR_QUALITY.command("set_working_period").args
    assert command.protocols == ("sds011",)


def _refusal(text):
    with pytest.raises(CatalogError) as info:
        load_catalog([(OPS, text)])
    return info.value


def _kiosk_command(body):
    return f"[types.kiosk]\ncommands = [{body}]\n"


DELAY = '{ name = "delay_s", kind = "int", min = 0, max = 600, default = 0, description = "d" }'
AQ_MODE_AS_STRING = (
    '[types.air_quality]\ncommands = [{ name = "set_reporting_mode", args = [{ name = "mode", '
    'kind = "string", max_length = 6, description = "m" }] }]\n'
)


@pytest.mark.parametrize(
    ("text", "type_name", "key", "problem"),
    [
        # An arg's kind cannot change.
        (
            AQ_MODE_AS_STRING,
            "air_quality",
            "commands.set_reporting_mode.args.mode.kind",
            "kind cannot change",
        ),
        # A known arg cannot be removed by restating the command without it.
        (
            '[types.air_quality]\ncommands = [{ name = "set_working_period", args = [] }]\n',
            "air_quality",
            "commands.set_working_period.args.minutes",
            "cannot be removed",
        ),
        # An arg added to a known command needs a default.
        (
            _kiosk_command(
                '{ name = "reboot", args = [{ name = "delay_s", kind = "int", min = 0, '
                'max = 600, description = "d" }] }'
            ),
            "kiosk",
            "commands.reboot.args.delay_s.default",
            "needs a default",
        ),
        # An optional arg cannot become required.
        (
            _kiosk_command(
                '{ name = "close_queue", args = [{ name = "message", kind = "string", '
                'max_length = 120, required = true, description = "m" }] }'
            ),
            "kiosk",
            "commands.close_queue.args.message.required",
            "cannot become required",
        ),
        # Only the shipped catalog says which serial protocols carry a command.
        (
            (
                '[types.air_quality]\ncommands = [{ name = "set_reporting_interval", '
                'protocols = ["pms5003"] }]\n'
            ),
            "air_quality",
            "commands.set_reporting_interval.protocols",
            "only the shipped catalog",
        ),
        (
            _kiosk_command('{ name = "beep", description = "b", protocols = ["sds011"] }'),
            "kiosk",
            "commands.beep.protocols",
            "only the shipped catalog",
        ),
        # Form of a command and its args.
        (
            _kiosk_command('{ name = "beep", description = "b", retries = 3 }'),
            "kiosk",
            "commands.beep.retries",
            "unknown key",
        ),
        (
            _kiosk_command('{ name = "Beep!", description = "b" }'),
            "kiosk",
            "commands[0].name",
            "must match",
        ),
        (
            _kiosk_command('{ name = "beep" }'),
            "kiosk",
            "commands.beep.description",
            "non-empty string",
        ),
        (
            _kiosk_command('{ name = "beep", description = "b", timeout_s = 0 }'),
            "kiosk",
            "commands.beep.timeout_s",
            "not a number of seconds",
        ),
        (
            _kiosk_command('{ name = "beep", description = "b", timeout_s = 7200 }'),
            "kiosk",
            "commands.beep.timeout_s",
            "not a number of seconds",
        ),
        (
            _kiosk_command(
                '{ name = "beep", description = "b" }, { name = "beep", description = "c" }'
            ),
            "kiosk",
            "commands.beep",
            "defines it twice",
        ),
        (
            _kiosk_command(
                '{ name = "beep", description = "b", args = [{ name = "n", kind = "int", '
                'min = 0, max = 9, description = "n" }, { name = "n", kind = "int", '
                'min = 0, max = 9, description = "n" }] }'
            ),
            "kiosk",
            "commands.beep.args.n",
            "lists it twice",
        ),
        (
            _kiosk_command(
                '{ name = "beep", description = "b", args = [{ name = "n", kind = "long", '
                'description = "n" }] }'
            ),
            "kiosk",
            "commands.beep.args.n.kind",
            "is not one of",
        ),
        (
            _kiosk_command(
                '{ name = "beep", description = "b", args = [{ name = "n", kind = "int", '
                'min = 0, description = "n" }] }'
            ),
            "kiosk",
            "commands.beep.args.n.max",
            "missing",
        ),
        (
            _kiosk_command(
                '{ name = "beep", description = "b", args = [{ name = "n", kind = "int", '
                'min = 0, max = 9.5, description = "n" }] }'
            ),
            "kiosk",
            "commands.beep.args.n.min",
            "must be whole",
        ),
        (
            _kiosk_command(
                '{ name = "beep", description = "b", args = [{ name = "n", kind = "bool", '
                'max = 1, description = "n" }] }'
            ),
            "kiosk",
            "commands.beep.args.n.max",
            "only int and float args have a range",
        ),
        (
            _kiosk_command(
                '{ name = "beep", description = "b", args = [{ name = "n", kind = "string", '
                'description = "n" }] }'
            ),
            "kiosk",
            "commands.beep.args.n.max_length",
            "needs a max_length",
        ),
        (
            _kiosk_command(
                '{ name = "beep", description = "b", args = [{ name = "n", kind = "string", '
                'max_length = 5000, description = "n" }] }'
            ),
            "kiosk",
            "commands.beep.args.n.max_length",
            "needs a max_length",
        ),
        (
            _kiosk_command(
                '{ name = "beep", description = "b", args = [{ name = "n", kind = "enum", '
                'description = "n" }] }'
            ),
            "kiosk",
            "commands.beep.args.n.labels",
            "non-empty list",
        ),
        (
            _kiosk_command(
                '{ name = "beep", description = "b", args = [{ name = "n", kind = "int", '
                'min = 0, max = 9, default = 12, description = "n" }] }'
            ),
            "kiosk",
            "commands.beep.args.n.default",
            "outside [0, 9]",
        ),
        (
            _kiosk_command(
                '{ name = "beep", description = "b", args = [{ name = "n", kind = "enum", '
                'labels = ["a"], default = "b", description = "n" }] }'
            ),
            "kiosk",
            "commands.beep.args.n.default",
            "not one of a",
        ),
        (
            _kiosk_command(
                '{ name = "beep", description = "b", args = [{ name = "n", kind = "int", '
                'min = 0, max = 9, default = 1, required = true, description = "n" }] }'
            ),
            "kiosk",
            "commands.beep.args.n.required",
            "with a default is not required",
        ),
        ("[types.kiosk]\ncommands = { reboot = {} }\n", "kiosk", "commands", "list of command"),
    ],
)
def test_refusals_name_file_type_and_key(text, type_name, key, problem):
    error = _refusal(text)
    assert error.source == OPS
    assert (error.type_name, error.key) == (type_name, key)
    assert problem in error.problem
    assert OPS in str(error)


def test_a_later_file_may_not_change_the_kind_of_an_arg_an_earlier_one_added():
    text = f'[types.kiosk]\ncommands = [{{ name = "reboot", args = [{DELAY}] }}]\n'
    merged = load_catalog([(OPS, text)])
    assert merged.types["kiosk"].command("reboot").arg_names == ("delay_s",)
    error = _refusal_on(merged, text.replace('kind = "int"', 'kind = "float"'))
    assert (error.type_name, error.key) == ("kiosk", "commands.reboot.args.delay_s.kind")
    assert "kind cannot change" in str(error)


def _refusal_on(base, text):
    with pytest.raises(CatalogError) as info:
        load_catalog([("later.toml", text)], base=base)
    assert info.value.source == "later.toml"
    return info.value


def test_too_many_args_refused():
    args = ", ".join(
        f'{{ name = "a{i}", kind = "bool", description = "a" }}'
        for i in range(catalog.COMMAND_ARGS_MAX + 1)
    )
    error = _refusal(_kiosk_command(f'{{ name = "many", description = "m", args = [{args}] }}'))
    assert (error.key, error.type_name) == ("commands.many.args", "kiosk")


# --- entries carried to gateways and the database ------------------------------


def test_entries_keep_commands_through_encode_and_decode():
    merged = load_catalog([(OPS, ADDS)])
    for dtype in merged.types.values():
        assert decode_device_type(encode_device_type(dtype), "db") == dtype
    entry = json.loads(encode_device_type(merged.types["siren"]))
    assert entry["commands"][0]["args"][1] == {
        "name": "volume", "kind": "float", "description": "Volume", "required": False,
        "default": 1.0, "min": 0, "max": 1, "labels": [], "max_length": 0,
    }  # fmt: skip
    # The whole catalog too (what may be sent to a gateway with its config).
    for codec in (msgspec.msgpack, msgspec.json):
        assert codec.decode(codec.encode(merged), type=Catalog) == merged


def test_an_entry_from_before_commands_decodes_without_them():
    old = json.loads(encode_device_type(catalog.KIOSK))
    del old["commands"]
    decoded = decode_device_type(json.dumps(old), "device_types.entry of kiosk")
    assert decoded.commands == ()
    # Merged onto a catalog that has them, the type keeps its own.
    merged, refused = merge_types(SHIPPED_CATALOG, [decoded], source="db")
    assert refused == {}
    assert merged.types["kiosk"] == catalog.KIOSK


def test_merge_types_carries_new_commands_and_refuses_contradictions():
    ops = load_catalog([(OPS, ADDS)])
    merged, refused = merge_types(
        SHIPPED_CATALOG, [ops.types["kiosk"], ops.types["siren"]], source="config v7"
    )
    assert refused == {}
    assert merged.types["kiosk"] == ops.types["kiosk"]
    assert merged.types["siren"].command("sound") == ops.types["siren"].command("sound")
    # An entry whose known arg changed kind is left out, naming the key.
    reboot = ops.types["kiosk"].command("reboot")
    changed_arg = msgspec.structs.replace(
        reboot.args[0], kind=ArgKind.FLOAT, min=0.0, max=600.0, default=0.0
    )
    bad_kiosk = msgspec.structs.replace(
        ops.types["kiosk"],
        commands=tuple(
            msgspec.structs.replace(c, args=(changed_arg,)) if c.name == "reboot" else c
            for c in ops.types["kiosk"].commands
        ),
    )
    again, refused = merge_types(merged, [bad_kiosk], source="config v8")
    assert again is merged
    assert refused["kiosk"].key == "commands.reboot.args.delay_s.kind"
    assert refused["kiosk"].source == "config v8"


def test_gateway_config_carries_commands():
    ops = load_catalog([(OPS, ADDS)])
    config = GatewayConfig(
        gateway_id="gw-hk-01", version=3, site_id="hk-01", devices=[], types=(ops.types["siren"],)
    )
    decoded = decode_gateway_config(encode_gateway_config(config))
    assert decoded.types[0].commands == ops.types["siren"].commands
