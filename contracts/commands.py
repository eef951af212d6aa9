"""Commands to devices: the one check of a request against the catalog, and the message sent.

An operator asks for a command with ``--arg key=value`` strings:
``parse_command_request`` makes a ``CommandRequest`` of them (refusing a
repeated or malformed arg), and ``check_command`` checks it against the
device type's catalog entry (``contracts.catalog.CommandSpec``): a command the
type accepts (and, for a serial device, one its protocol's frames carry),
known args only, every required arg given, each value of the arg's kind and
inside its bounds. It returns the ``Command`` to send, with typed values and
defaults filled in, or raises ``CommandRefusedError`` naming the type, the
command and the arg.

``Command`` is the message the delivery sends, as JSON (readable with
``mosquitto_sub``): ``decode_command`` checks its size first
(COMMAND_MAX_BYTES), then syntax and types (MalformedPayloadError,
FieldTypeError), then ``check_command_message``: ids, name, ttl and time, the
args' form and, when the receiver knows the device's type, the args again
against its catalog entry. ``encode_command`` trusts its argument.

Pure: the command id, the clock and the ttl are the caller's; topics,
delivery, retries, answers and the registry are not this module's business.
Evolution as in ``contracts.messages``: append fields with defaults.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Final

import msgspec

from contracts.catalog import (
    ARG_STRING_MAX_CHARS,
    COMMAND_ARGS_MAX,
    ArgKind,
    ArgValue,
    CommandArg,
    CommandSpec,
    DeviceType,
    has_control_characters,
)
from contracts.errors import (
    CommandRefusedError,
    FieldTypeError,
    MalformedPayloadError,
    OutOfRangeError,
    PayloadTooLargeError,
)
from contracts.ids import check_id

# A command waiting for its device (offline, asleep) is dropped after its
# ttl: a day at most, since a reboot or a reset asked for yesterday is no
# longer what the operator wants today.
COMMAND_TTL_MAX_S: Final = 86_400

# 9999-12-31T23:59:59.999Z, as contracts.messages.TS_MAX_MS.
_TS_MAX_MS: Final = 253_402_300_799_999

# The largest command: two ids (64 characters each), a name (55), and
# COMMAND_ARGS_MAX (16) args, each a name (55) and a string of
# ARG_STRING_MAX_CHARS (200) characters of up to 4 bytes in UTF-8: about
# 16 x 860 = 13.8 KB of JSON. 16 KiB bounds what a device must read, which a
# small controller (an ESP32's MQTT buffer) can hold.
COMMAND_MAX_BYTES: Final = 16 * 1024

# Command and arg names, as the catalog spells them.
_NAME_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,54}")
_FLOAT_RE: Final = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
# What a refusal quotes back of a name the request made up.
_QUOTE_CHARS: Final = 64


class CommandRequest(msgspec.Struct, frozen=True, kw_only=True):
    """An operator's request, as typed: the type, the command, each ``--arg key=value``."""

    device_type: str
    name: str
    args: dict[str, str]


class Command(msgspec.Struct, frozen=True, kw_only=True):
    """A checked command for one device, as sent on the wire (JSON).

    ``{"command_id": "c-0a1b", "device_id": "aq-hk-01", "name": "set_reporting_interval",
    "args": {"interval_s": 60}, "ttl_s": 600, "created_ms": 1767225600000}``
    """

    command_id: str  # allow-listed like every id (contracts.ids)
    device_id: str
    name: str
    # Typed values: int, float, true/false, or a string (an enum's label).
    args: dict[str, ArgValue]
    # Seconds after created_ms when an undelivered command is dropped.
    ttl_s: int
    created_ms: int  # integer milliseconds UTC, the hub's clock

    @property
    def expires_ms(self) -> int:
        return self.created_ms + self.ttl_s * 1000


_DECODER: Final = msgspec.json.Decoder(Command)
_ENCODER: Final = msgspec.json.Encoder()


def parse_command_request(
    device_type: str, name: str, arg_strings: Iterable[str]
) -> CommandRequest:
    """A request from ``key=value`` strings; CommandRefusedError for a repeated or bare key."""
    args: dict[str, str] = {}
    for text in arg_strings:
        key, sep, value = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CommandRefusedError(
                device_type, name, None, f"{text[:_QUOTE_CHARS]!r} is not key=value"
            )
        if key in args:
            raise CommandRefusedError(
                device_type, name, key[:_QUOTE_CHARS], "given twice (give each arg once)"
            )
        args[key] = value
    return CommandRequest(device_type=device_type, name=name, args=args)


def _parse_text(arg: CommandArg, text: str) -> object:
    """An arg's value from the text an operator typed, before the arg's own check."""
    kind = arg.kind
    word = text.strip()
    if kind is ArgKind.INT and re.fullmatch(r"[+-]?[0-9]{1,19}", word):
        return int(word)
    # Digits only: float() would take "nan", "inf" and "1_000".
    if kind is ArgKind.FLOAT and _FLOAT_RE.fullmatch(word):
        return float(word)
    if kind is ArgKind.BOOL and word.lower() in {"true", "false"}:
        return word.lower() == "true"
    # An enum's label, a string, or text of the wrong kind, which the arg's
    # check refuses saying what it expected.
    return text


def _spec(dtype: DeviceType, name: str, serial_protocol: str | None) -> CommandSpec:
    spec = dtype.command(name)
    if spec is None:
        known = ", ".join(dtype.command_names) or "none"
        raise CommandRefusedError(
            dtype.name, name[:_QUOTE_CHARS], None, f"unknown command (the type's commands: {known})"
        )
    if serial_protocol is not None and serial_protocol not in spec.protocols:
        carried = ", ".join(spec.protocols) or "none: devices on MQTT only"
        raise CommandRefusedError(
            dtype.name,
            name,
            None,
            f"a serial {serial_protocol} device cannot take it (protocols: {carried})",
        )
    return spec


def _check_values(
    dtype: DeviceType, spec: CommandSpec, values: Mapping[str, object]
) -> dict[str, ArgValue]:
    """The one check of a command's values against its catalog entry; defaults filled in."""
    for key in values:
        if spec.arg(key) is None:
            known = ", ".join(spec.arg_names) or "none"
            raise CommandRefusedError(
                dtype.name,
                spec.name,
                key[:_QUOTE_CHARS],
                f"unknown arg (the command's args: {known})",
            )
    checked: dict[str, ArgValue] = {}
    for arg in spec.args:
        if arg.name in values:
            try:
                checked[arg.name] = arg.check(values[arg.name])
            except CommandRefusedError as exc:
                raise CommandRefusedError(dtype.name, spec.name, arg.name, exc.problem) from None
        elif arg.default is not None:
            checked[arg.name] = arg.default
        elif arg.required:
            raise CommandRefusedError(dtype.name, spec.name, arg.name, "missing (it is required)")
    return checked


def check_command(
    catalog_type: DeviceType,
    name: str,
    raw_args: Mapping[str, str],
    *,
    command_id: str,
    device_id: str,
    ttl_s: int,
    now_ms: int,
    serial_protocol: str | None = None,
) -> Command:
    """Check a request against ``catalog_type``'s entry; return the Command to send.

    ``raw_args`` are the operator's strings (``parse_command_request``);
    ``serial_protocol`` is the device's, if it is a serial one. Raises
    CommandRefusedError (unknown command, a command the device's serial
    protocol cannot carry, unknown arg, missing required arg, wrong kind, out
    of range, a label not allowed, a string too long or with control
    characters), and InvalidIdError or OutOfRangeError for the ids, ttl and
    time as ``check_command_message`` does.
    """
    spec = _spec(catalog_type, name, serial_protocol)
    values = {}
    for key, text in raw_args.items():
        arg = spec.arg(key)
        values[key] = text if arg is None else _parse_text(arg, text)
    command = Command(
        command_id=command_id,
        device_id=device_id,
        name=name,
        args=_check_values(catalog_type, spec, values),
        ttl_s=ttl_s,
        created_ms=now_ms,
    )
    return check_command_message(command)


def check_command_message(command: Command, catalog_type: DeviceType | None = None) -> Command:
    """The one check of a command message; return it (args re-checked and filled) or raise.

    Ids allow-listed (InvalidIdError); ttl_s in [1, COMMAND_TTL_MAX_S] and
    created_ms a time up to the year 9999 (OutOfRangeError); the name and arg
    names identifiers, at most COMMAND_ARGS_MAX args, numbers finite, strings
    of at most ARG_STRING_MAX_CHARS characters (FieldTypeError). With
    ``catalog_type``, the args as ``check_command`` checks them
    (CommandRefusedError), defaults filled in for an arg the sender's catalog
    did not have yet.
    """
    check_id(command.command_id, "command_id")
    check_id(command.device_id, "device_id")
    if not _NAME_RE.fullmatch(command.name):
        raise FieldTypeError(f"name {command.name[:_QUOTE_CHARS]!r}: not a command name")
    if not 1 <= command.ttl_s <= COMMAND_TTL_MAX_S:
        raise OutOfRangeError(f"ttl_s {command.ttl_s} is outside [1, {COMMAND_TTL_MAX_S}]")
    if not 0 <= command.created_ms <= _TS_MAX_MS:
        raise OutOfRangeError(f"created_ms {command.created_ms} is outside [0, {_TS_MAX_MS}]")
    if len(command.args) > COMMAND_ARGS_MAX:
        raise FieldTypeError(f"args: {len(command.args)} of them, at most {COMMAND_ARGS_MAX}")
    for key, value in command.args.items():
        if not _NAME_RE.fullmatch(key):
            raise FieldTypeError(f"args: {key[:_QUOTE_CHARS]!r} is not an arg name")
        if isinstance(value, float) and not math.isfinite(value):
            raise FieldTypeError(f"args.{key}: {value!r} is not a finite number")
        if isinstance(value, str) and (
            len(value) > ARG_STRING_MAX_CHARS or has_control_characters(value)
        ):
            raise FieldTypeError(
                f"args.{key}: more than {ARG_STRING_MAX_CHARS} characters, or control characters"
            )
    if catalog_type is None:
        return command
    spec = _spec(catalog_type, command.name, None)
    return msgspec.structs.replace(command, args=_check_values(catalog_type, spec, command.args))


def encode_command(command: Command) -> bytes:
    return _ENCODER.encode(command)


def decode_command(
    payload: bytes,
    *,
    catalog_type: DeviceType | None = None,
    max_bytes: int = COMMAND_MAX_BYTES,
) -> Command:
    """Decode a command and run ``check_command_message``.

    Raises PayloadTooLargeError, MalformedPayloadError, FieldTypeError and
    whatever ``check_command_message`` raises.
    """
    if len(payload) > max_bytes:
        raise PayloadTooLargeError(
            f"command: {len(payload)} bytes exceeds the limit of {max_bytes}"
        )
    try:
        command = _DECODER.decode(payload)
    # ValidationError is a subclass of DecodeError: it must come first.
    except msgspec.ValidationError as exc:
        raise FieldTypeError(f"command: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise MalformedPayloadError(f"command: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise MalformedPayloadError(f"command: invalid UTF-8: {exc}") from exc
    return check_command_message(command, catalog_type)
