"""A command request checked against the catalog, and the Command message's codec."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts import catalog
from contracts.catalog import ARG_STRING_MAX_CHARS, COMMAND_ARGS_MAX, load_catalog
from contracts.commands import (
    COMMAND_MAX_BYTES,
    COMMAND_TTL_MAX_S,
    Command,
    CommandRequest,
    check_command,
    check_command_message,
    decode_command,
    encode_command,
    parse_command_request,
)
from contracts.errors import (
    CommandRefusedError,
    FieldTypeError,
    InputError,
    InvalidIdError,
    MalformedPayloadError,
    OutOfRangeError,
    PayloadTooLargeError,
)

NOW_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z

# A type with one command of every arg kind, on top of the shipped catalog.
PANEL = load_catalog([
    ("panel.toml", """
[types.panel]
description = "Street information panel"
transports = ["mqtt"]
metrics = [{ name = "lit", unit = "", kind = "bool", description = "Lit" }]

[[types.panel.commands]]
name = "show"
description = "Hiển thị (show)"

[[types.panel.commands.args]]
name = "text"
kind = "string"
max_length = 20
description = "Text"

[[types.panel.commands.args]]
name = "seconds"
kind = "int"
min = 1
max = 600
default = 60
description = "How long"

[[types.panel.commands.args]]
name = "brightness"
kind = "float"
min = 0
max = 1
required = false
description = "Brightness"

[[types.panel.commands.args]]
name = "colour"
kind = "enum"
labels = ["white", "amber"]
default = "white"
description = "Colour"

[[types.panel.commands.args]]
name = "blink"
kind = "bool"
default = false
description = "Blink"

[[types.panel.commands]]
name = "blank"
description = "Tắt (blank)"
"""),
]).types["panel"]  # fmt: skip


def _check(dtype, name, args, **extra):
    fields: dict[str, Any] = {
        "command_id": "c-1", "device_id": "dev-1", "ttl_s": 600, "now_ms": NOW_MS,
    } | extra  # fmt: skip
    return check_command(dtype, name, args, **fields)


def test_a_request_becomes_a_command_with_typed_values_and_defaults():
    command = _check(PANEL, "show", {"text": "Ngập: đi đường khác", "brightness": "0.5"})
    assert command == Command(
        command_id="c-1", device_id="dev-1", name="show", ttl_s=600, created_ms=NOW_MS,
        args={
            "text": "Ngập: đi đường khác", "seconds": 60, "brightness": 0.5, "colour": "white",
            "blink": False,
        },
    )  # fmt: skip
    assert command.expires_ms == NOW_MS + 600_000
    # An optional arg without a default is left out when not given.
    assert "brightness" not in _check(PANEL, "show", {"text": "x"}).args
    typed = _check(
        PANEL, "show", {"text": "x", "seconds": " 5 ", "blink": "TRUE", "colour": "amber"}
    )
    assert (typed.args["seconds"], typed.args["blink"], typed.args["colour"]) == (5, True, "amber")
    assert type(_check(PANEL, "show", {"text": "x", "brightness": "1"}).args["brightness"]) is float


def test_shipped_commands_check():
    interval = _check(catalog.AIR_QUALITY, "set_reporting_interval", {"interval_s": "60"})
    assert interval.args == {"interval_s": 60}
    period = _check(
        catalog.AIR_QUALITY, "set_working_period", {"minutes": "0"}, serial_protocol="sds011"
    )
    assert period.args == {"minutes": 0}
    assert _check(catalog.KIOSK, "reboot", {}).args == {}
    assert _check(catalog.CONFERENCE_ENDPOINT, "start_test_call", {}).args == {"duration_s": 30}


@pytest.mark.parametrize(
    ("dtype", "name", "args", "arg", "problem"),
    [
        (PANEL, "reboot", {}, None, "unknown command (the type's commands: show, blank)"),
        (catalog.SHIPPED_CATALOG.types["satisfaction_terminal"], "reboot", {}, None,
         "unknown command (the type's commands: none)"),
        (PANEL, "show", {"text": "x", "volume": "3"}, "volume",
         "unknown arg (the command's args: text, seconds, brightness, colour, blink)"),
        (PANEL, "blank", {"now": "1"}, "now", "unknown arg (the command's args: none)"),
        (PANEL, "show", {}, "text", "missing (it is required)"),
        (PANEL, "show", {"text": "x", "seconds": "ten"}, "seconds", "expected a whole number"),
        (PANEL, "show", {"text": "x", "seconds": "1.5"}, "seconds", "expected a whole number"),
        (PANEL, "show", {"text": "x", "brightness": "nan"}, "brightness", "expected a number"),
        (PANEL, "show", {"text": "x", "brightness": "inf"}, "brightness", "expected a number"),
        (PANEL, "show", {"text": "x", "blink": "yes"}, "blink", "expected true or false"),
        (PANEL, "show", {"text": "x", "seconds": "0"}, "seconds", "0 is outside [1, 600]"),
        (PANEL, "show", {"text": "x", "seconds": "601"}, "seconds", "outside [1, 600]"),
        (PANEL, "show", {"text": "x", "brightness": "1.01"}, "brightness", "outside [0, 1]"),
        (PANEL, "show", {"text": "x", "colour": "red"}, "colour", "'red' is not one of white, amb"),
        (PANEL, "show", {"text": "x" * 21}, "text", "longer than 20 characters (21)"),
        (PANEL, "show", {"text": "a\nb"}, "text", "control characters"),
        (PANEL, "show", {"text": "a\u202eb"}, "text", "control characters"),  # bidi override
        (catalog.AIR_QUALITY, "set_reporting_mode", {"mode": "passive"}, "mode",
         "not one of active, query"),
        (catalog.AIR_QUALITY, "set_working_period", {"minutes": "31"}, "minutes", "[0, 30]"),
        (catalog.KIOSK, "set_reporting_interval", {"interval_s": "1"}, "interval_s", "[5, 100]"),
    ],
)  # fmt: skip
def test_refusals_name_the_catalog_entry(dtype, name, args, arg, problem):
    with pytest.raises(CommandRefusedError) as info:
        _check(dtype, name, args)
    error = info.value
    assert (error.device_type, error.arg) == (dtype.name, arg)
    assert error.command == name
    assert problem in error.problem
    assert str(error).startswith(f"device type {dtype.name!r}: command {name!r}")
    assert error.reason == "command_refused"
    assert isinstance(error, InputError)


def test_a_serial_device_takes_only_what_its_protocol_carries():
    aq = catalog.AIR_QUALITY
    with pytest.raises(CommandRefusedError, match="a serial pms5003 device cannot take it"):
        _check(aq, "set_working_period", {"minutes": "5"}, serial_protocol="pms5003")
    with pytest.raises(CommandRefusedError, match="devices on MQTT only"):
        _check(aq, "set_reporting_interval", {"interval_s": "60"}, serial_protocol="sds011")
    assert _check(aq, "sleep", {}, serial_protocol="pms5003").name == "sleep"


def test_parse_command_request():
    request = parse_command_request("kiosk", "close_queue", ["message=Hết giờ = 17:00", "a="])
    assert request == CommandRequest(
        device_type="kiosk", name="close_queue", args={"message": "Hết giờ = 17:00", "a": ""}
    )
    with pytest.raises(CommandRefusedError) as info:
        parse_command_request("kiosk", "close_queue", ["message=a", "message=b"])
    assert (info.value.arg, info.value.command) == ("message", "close_queue")
    assert "given twice" in info.value.problem
    for bad in ("message", "=x"):
        with pytest.raises(CommandRefusedError, match="is not key=value"):
            parse_command_request("kiosk", "close_queue", [bad])


def test_the_message_fields_are_checked_too():
    with pytest.raises(InvalidIdError):
        _check(catalog.KIOSK, "reboot", {}, device_id="Kiosk 1")
    with pytest.raises(InvalidIdError):
        _check(catalog.KIOSK, "reboot", {}, command_id="")
    for ttl_s in (0, COMMAND_TTL_MAX_S + 1):
        with pytest.raises(OutOfRangeError, match="ttl_s"):
            _check(catalog.KIOSK, "reboot", {}, ttl_s=ttl_s)
    with pytest.raises(OutOfRangeError, match="created_ms"):
        _check(catalog.KIOSK, "reboot", {}, now_ms=-1)


# --- the wire ------------------------------------------------------------------


def test_encoding_is_the_documented_json():
    command = _check(catalog.AIR_QUALITY, "set_reporting_interval", {"interval_s": "60"})
    assert json.loads(encode_command(command)) == {
        "command_id": "c-1", "device_id": "dev-1", "name": "set_reporting_interval",
        "args": {"interval_s": 60}, "ttl_s": 600, "created_ms": NOW_MS,
    }  # fmt: skip
    assert decode_command(encode_command(command), catalog_type=catalog.AIR_QUALITY) == command


def _wire(**fields):
    body = {
        "command_id": "c-1", "device_id": "dev-1", "name": "show", "args": {"text": "x"},
        "ttl_s": 60, "created_ms": NOW_MS,
    } | fields  # fmt: skip
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("payload", "error", "match"),
    [
        (b"{", MalformedPayloadError, "command"),
        (b"\xff\xfe", MalformedPayloadError, "command"),
        (b"[]", FieldTypeError, "Expected `object`"),
        (_wire(ttl_s="60"), FieldTypeError, "ttl_s"),
        (_wire(args={"text": None}), FieldTypeError, "args"),
        (_wire(args={"text": [1]}), FieldTypeError, "args"),
        (_wire(args={"Text": "x"}), FieldTypeError, "not an arg name"),
        (_wire(args={"text": "\u0000"}), FieldTypeError, "control characters"),
        (_wire(args={f"a{i}": 1 for i in range(COMMAND_ARGS_MAX + 1)}), FieldTypeError, "at most"),
        (_wire(name="Show!"), FieldTypeError, "not a command name"),
        (_wire(device_id="DEV/1"), InvalidIdError, "device_id"),
        (_wire(ttl_s=0), OutOfRangeError, "ttl_s"),
        (_wire(created_ms=-5), OutOfRangeError, "created_ms"),
        (b" " * (COMMAND_MAX_BYTES + 1), PayloadTooLargeError, "exceeds the limit"),
    ],
)  # fmt: skip
def test_decode_refuses_malformed_and_oversized(payload, error, match):
    with pytest.raises(error, match=match):
        decode_command(payload)


def test_decode_with_the_catalog_checks_the_args_and_fills_defaults():
    # A sender whose catalog lacked an arg with a default: the receiver fills it in.
    decoded = decode_command(_wire(), catalog_type=PANEL)
    assert decoded.args == {"text": "x", "seconds": 60, "colour": "white", "blink": False}
    with pytest.raises(CommandRefusedError) as info:
        decode_command(_wire(args={"text": "x", "seconds": True}), catalog_type=PANEL)
    assert (info.value.arg, info.value.problem) == ("seconds", "expected a whole number, got True")
    with pytest.raises(CommandRefusedError, match="unknown command"):
        decode_command(_wire(name="reboot"), catalog_type=PANEL)
    # Without the catalog, only the form is checked.
    assert decode_command(_wire(name="reboot")).name == "reboot"


def test_the_largest_command_fits_the_size_bound():
    widest = Command(
        command_id="c" * 64,
        device_id="d" * 64,
        name="n" * 55,
        args={
            f"{i:02d}".join(["a", "z" * 52]): "ệ" * ARG_STRING_MAX_CHARS
            for i in range(COMMAND_ARGS_MAX)
        },
        ttl_s=COMMAND_TTL_MAX_S,
        created_ms=NOW_MS,
    )
    payload = encode_command(widest)
    assert len(payload) <= COMMAND_MAX_BYTES
    assert decode_command(payload) == widest


_IDS = st.from_regex(r"[a-z0-9][a-z0-9-]{0,63}", fullmatch=True)
_NAMES = st.from_regex(r"[a-z][a-z0-9_]{0,54}", fullmatch=True)
_TEXT = st.text(
    st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Co", "Cn")),
    max_size=ARG_STRING_MAX_CHARS,
)
_VALUES = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**53), max_value=2**53),
    st.floats(allow_nan=False, allow_infinity=False),
    _TEXT,
)


@settings(max_examples=300, deadline=None)
@given(
    command_id=_IDS,
    device_id=_IDS,
    name=_NAMES,
    args=st.dictionaries(_NAMES, _VALUES, max_size=COMMAND_ARGS_MAX),
    ttl_s=st.integers(min_value=1, max_value=COMMAND_TTL_MAX_S),
    created_ms=st.integers(min_value=0, max_value=253_402_300_799_999),
)
def test_round_trip(command_id, device_id, name, args, ttl_s, created_ms):
    command = Command(
        command_id=command_id, device_id=device_id, name=name, args=args, ttl_s=ttl_s,
        created_ms=created_ms,
    )  # fmt: skip
    decoded = decode_command(encode_command(command))
    assert decoded == command
    # The value's kind survives: true stays a bool, 1 an int, 1.0 a float.
    assert {k: type(v) for k, v in decoded.args.items()} == {k: type(v) for k, v in args.items()}
    assert check_command_message(decoded) == decoded


def test_command_struct_is_stable():
    # Append-only evolution: the fields a delivery will rely on, in order.
    assert Command.__struct_fields__ == (
        "command_id", "device_id", "name", "args", "ttl_s", "created_ms",
    )  # fmt: skip
    assert msgspec.json.decode(encode_command(_check(catalog.KIOSK, "reboot", {})))["args"] == {}
