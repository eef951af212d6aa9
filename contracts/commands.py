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

The delivery's messages are here too (the second half of the module): the
states (``CommandState``, ``advances``), ``GatewayCommands`` (central ->
gateway), ``CommandReports`` (gateway -> central, acked by report id in
``contracts.messages.Ack.reports``) and ``DeviceAnswer`` (device -> gateway),
each with its size bound and its one check.

Pure: the command id, the clock and the ttl are the caller's; topics,
delivery, retries, answers and the registry are not this module's business.
Evolution as in ``contracts.messages``: append fields with defaults.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Final, TypeVar

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
from contracts.decoding import check_size, decode_payload
from contracts.errors import (
    CommandRefusedError,
    FieldTypeError,
    InconsistentBatchError,
    OutOfRangeError,
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
_M = TypeVar("_M")
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
    command = _decode_json(_DECODER, payload, "command", max_bytes)
    return check_command_message(command, catalog_type)


# --- delivery: states, the gateway's commands, its reports, a device's answers ---
#
# Central -> gateway: ``GatewayCommands`` on ``hub/v1/gw/{gw}/cmd`` (JSON, QoS 1),
# the commands to hold and the command ids to cancel. Gateway -> central:
# ``CommandReports`` on ``hub/v1/gw/{gw}/cmdreport`` (JSON, QoS 1), each state a
# command reached, kept in the gateway's store until ingest's ``Ack`` names
# its ``report_id`` (``contracts.messages.Ack.reports``). Gateway -> device: the
# ``Command`` itself on ``d/{id}/cmd`` with the MQTT v5 Response Topic
# ``d/{id}/res`` and the command id as Correlation Data; device -> gateway:
# ``DeviceAnswer`` on ``d/{id}/res``.


class CommandState:
    """The states of a command, in the order they are reached; the last four are final.

    - ``queued``: stored centrally, not yet held by the gateway;
    - ``sent``: the gateway holds it durably (its store);
    - ``delivered``: the device has it (it said so, or the serial frame was written);
    - ``succeeded`` / ``failed``: the device's answer (or no answer in time: failed);
    - ``expired``: its ttl passed before it reached the device;
    - ``cancelled``: an operator cancelled it before it reached the device.
    """

    QUEUED: Final = "queued"
    SENT: Final = "sent"
    DELIVERED: Final = "delivered"
    SUCCEEDED: Final = "succeeded"
    FAILED: Final = "failed"
    EXPIRED: Final = "expired"
    CANCELLED: Final = "cancelled"


COMMAND_STATES: Final = (
    "queued",
    "sent",
    "delivered",
    "succeeded",
    "failed",
    "expired",
    "cancelled",
)
FINAL_STATES: Final = frozenset({"succeeded", "failed", "expired", "cancelled"})
# A state may replace another of a lower rank only; a final state is never replaced.
STATE_RANK: Final = {
    "queued": 0,
    "sent": 1,
    "delivered": 2,
    "succeeded": 3,
    "failed": 3,
    "expired": 3,
    "cancelled": 3,
}
STATE_LABELS: Final = {
    "queued": ("đang chờ gửi", "queued"),
    "sent": ("đã gửi tới gateway", "sent to the gateway"),
    "delivered": ("thiết bị đã nhận", "delivered to the device"),
    "succeeded": ("thành công", "succeeded"),
    "failed": ("thất bại", "failed"),
    "expired": ("hết hạn", "expired"),
    "cancelled": ("đã huỷ", "cancelled"),
}
# The states a device may answer with (a gateway decides expired and cancelled).
ANSWER_STATES: Final = frozenset({"delivered", "succeeded", "failed"})


def advances(current: str, new: str) -> bool:
    """Whether ``current`` moves to ``new``: a higher rank, never out of a final state."""
    return current not in FINAL_STATES and STATE_RANK[new] > STATE_RANK[current]


# Per message: a gateway's commands, a gateway's reports. A gateway with a
# long queue gets it in several messages; 256 commands of at most 16 KiB
# would exceed the 1 MiB control bound, but real commands are ~200 bytes.
COMMANDS_PER_MESSAGE_MAX: Final = 256
REPORTS_PER_MESSAGE_MAX: Final = 256
GATEWAY_COMMANDS_MAX_BYTES: Final = 1024 * 1024
COMMAND_REPORTS_MAX_BYTES: Final = 1024 * 1024
# What a device or a gateway may say about a command: a short text and a few values.
DETAIL_MAX_CHARS: Final = 500
ANSWER_VALUES_MAX: Final = 16
DEVICE_ANSWER_MAX_BYTES: Final = 4096


class GatewayCommands(msgspec.Struct, frozen=True, kw_only=True):
    """Central -> gateway on ``hub/v1/gw/{gw}/cmd``: commands to hold, command ids to cancel.

    Sent again (the same commands, unchanged) until the gateway reports each
    one ``sent``; the gateway keeps a command once by its id.
    """

    gateway_id: str
    ts_ms: int
    commands: list[Command] = msgspec.field(default_factory=list)
    cancel: list[str] = msgspec.field(default_factory=list)


class CommandReport(msgspec.Struct, frozen=True, kw_only=True):
    """One state a command reached, as the gateway saw it.

    ``report_id`` is ``{command_id}.{state}``: a command reaches a state once,
    so a report sent twice is the same report, stored once.
    """

    report_id: str
    command_id: str
    device_id: str
    state: str
    ts_ms: int  # the gateway's clock, integer ms UTC
    detail: str = ""  # the device's words, or why the gateway decided so
    answer: dict[str, ArgValue] = msgspec.field(default_factory=dict)


class CommandReports(msgspec.Struct, frozen=True, kw_only=True):
    """Gateway -> central on ``hub/v1/gw/{gw}/cmdreport``; acked by report id."""

    gateway_id: str
    ts_ms: int
    reports: list[CommandReport]


class DeviceAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """Device -> gateway on ``d/{id}/res``: how a command went.

    ``{"command_id": "c-0a1b", "state": "succeeded", "detail": "queue opened"}``;
    ``delivered`` first (optional: "received, working on it"), then
    ``succeeded`` or ``failed``. A device that gets a command id again
    answers again with the outcome it had: it never executes it twice.
    """

    command_id: str
    state: str
    detail: str = ""
    answer: dict[str, ArgValue] = msgspec.field(default_factory=dict)


def report_id(command_id: str, state: str) -> str:
    return f"{command_id}.{state}"


def make_report(
    command: Command | str,
    device_id: str,
    state: str,
    ts_ms: int,
    *,
    detail: str = "",
    answer: Mapping[str, ArgValue] | None = None,
) -> CommandReport:
    """A report of ``state``, its detail cut to DETAIL_MAX_CHARS."""
    command_id = command if isinstance(command, str) else command.command_id
    return CommandReport(
        report_id=report_id(command_id, state),
        command_id=command_id,
        device_id=device_id,
        state=state,
        ts_ms=ts_ms,
        detail=detail[:DETAIL_MAX_CHARS],
        answer=dict(answer or {}),
    )


def _check_answer_values(values: Mapping[str, ArgValue], where: str) -> None:
    if len(values) > ANSWER_VALUES_MAX:
        raise FieldTypeError(f"{where}: {len(values)} values, at most {ANSWER_VALUES_MAX}")
    for key, value in values.items():
        if not _NAME_RE.fullmatch(key):
            raise FieldTypeError(f"{where}: {key[:_QUOTE_CHARS]!r} is not a name")
        if isinstance(value, float) and not math.isfinite(value):
            raise FieldTypeError(f"{where}.{key}: {value!r} is not a finite number")
        if isinstance(value, str) and (
            len(value) > ARG_STRING_MAX_CHARS or has_control_characters(value)
        ):
            raise FieldTypeError(
                f"{where}.{key}: more than {ARG_STRING_MAX_CHARS} characters, or control characters"
            )


def _check_detail(detail: str, where: str) -> None:
    if len(detail) > DETAIL_MAX_CHARS:
        raise FieldTypeError(f"{where}: more than {DETAIL_MAX_CHARS} characters")


def check_command_report(report: CommandReport) -> CommandReport:
    """Ids, state, report id, time, detail and answer of one report; raise an InputError."""
    check_id(report.command_id, "command_id")
    check_id(report.device_id, "device_id")
    if report.state not in STATE_RANK or report.state == CommandState.QUEUED:
        raise FieldTypeError(
            f"state {report.state[:_QUOTE_CHARS]!r}: not a state a gateway reports"
        )
    if report.report_id != report_id(report.command_id, report.state):
        raise FieldTypeError(
            f"report_id {report.report_id[: _QUOTE_CHARS * 2]!r} is not "
            f"{report_id(report.command_id, report.state)!r}"
        )
    if not 0 <= report.ts_ms <= _TS_MAX_MS:
        raise OutOfRangeError(f"ts_ms {report.ts_ms} is outside [0, {_TS_MAX_MS}]")
    _check_detail(report.detail, "detail")
    _check_answer_values(report.answer, "answer")
    return report


_GATEWAY_COMMANDS_DECODER: Final = msgspec.json.Decoder(GatewayCommands)
_REPORTS_DECODER: Final = msgspec.json.Decoder(CommandReports)
_ANSWER_DECODER: Final = msgspec.json.Decoder(DeviceAnswer)


def _decode_json(
    decoder: msgspec.json.Decoder[_M], payload: bytes, what: str, max_bytes: int
) -> _M:
    check_size(payload, max_bytes, what)
    return decode_payload(decoder, payload, what)


def _check_sender(claimed: str, gateway_id: str | None) -> None:
    check_id(claimed, "gateway_id")
    if gateway_id is not None and claimed != gateway_id:
        raise InconsistentBatchError(f"gateway_id {claimed!r} is not the topic's {gateway_id!r}")


def check_gateway_commands(
    message: GatewayCommands, *, gateway_id: str | None = None
) -> GatewayCommands:
    """Sender, counts and every command's form (``check_command_message``); raise an InputError.

    The args are checked against the device's catalog entry by the gateway,
    which knows the device's type.
    """
    _check_sender(message.gateway_id, gateway_id)
    if not 0 <= message.ts_ms <= _TS_MAX_MS:
        raise OutOfRangeError(f"ts_ms {message.ts_ms} is outside [0, {_TS_MAX_MS}]")
    if len(message.commands) + len(message.cancel) > COMMANDS_PER_MESSAGE_MAX:
        raise FieldTypeError(
            f"{len(message.commands)} commands and {len(message.cancel)} cancels, "
            f"at most {COMMANDS_PER_MESSAGE_MAX} in all"
        )
    for command in message.commands:
        check_command_message(command)
    for command_id in message.cancel:
        check_id(command_id, "cancel")
    return message


def encode_gateway_commands(message: GatewayCommands) -> bytes:
    return _ENCODER.encode(message)


def decode_gateway_commands(
    payload: bytes, *, gateway_id: str | None = None, max_bytes: int = GATEWAY_COMMANDS_MAX_BYTES
) -> GatewayCommands:
    """Size, syntax, types, then ``check_gateway_commands``; raise an InputError."""
    message = _decode_json(_GATEWAY_COMMANDS_DECODER, payload, "commands", max_bytes)
    return check_gateway_commands(message, gateway_id=gateway_id)


def check_command_reports(
    message: CommandReports, *, gateway_id: str | None = None
) -> CommandReports:
    """Sender (InconsistentBatchError if not the topic's), count, then each report."""
    check_reports_envelope(message, gateway_id=gateway_id)
    for report in message.reports:
        check_command_report(report)
    return message


def check_reports_envelope(
    message: CommandReports, *, gateway_id: str | None = None
) -> CommandReports:
    """Sender, time and count of a reports message, not the reports (each is checked alone)."""
    _check_sender(message.gateway_id, gateway_id)
    if not 0 <= message.ts_ms <= _TS_MAX_MS:
        raise OutOfRangeError(f"ts_ms {message.ts_ms} is outside [0, {_TS_MAX_MS}]")
    if not 1 <= len(message.reports) <= REPORTS_PER_MESSAGE_MAX:
        raise FieldTypeError(
            f"{len(message.reports)} reports, between 1 and {REPORTS_PER_MESSAGE_MAX} expected"
        )
    return message


def encode_command_reports(message: CommandReports) -> bytes:
    return _ENCODER.encode(message)


def decode_command_reports(
    payload: bytes,
    *,
    gateway_id: str | None = None,
    max_bytes: int = COMMAND_REPORTS_MAX_BYTES,
    each: bool = True,
) -> CommandReports:
    """Size, syntax, types, the envelope, and (``each``) every report; raise an InputError.

    A receiver that judges the reports one by one (ingest, which stores the
    good ones of a message and refuses the rest) passes ``each=False`` and
    calls ``check_command_report`` itself.
    """
    message = _decode_json(_REPORTS_DECODER, payload, "command reports", max_bytes)
    if each:
        return check_command_reports(message, gateway_id=gateway_id)
    return check_reports_envelope(message, gateway_id=gateway_id)


def check_device_answer(answer: DeviceAnswer) -> DeviceAnswer:
    check_id(answer.command_id, "command_id")
    if answer.state not in ANSWER_STATES:
        raise FieldTypeError(
            f"state {answer.state[:_QUOTE_CHARS]!r}: not one of {', '.join(sorted(ANSWER_STATES))}"
        )
    _check_detail(answer.detail, "detail")
    _check_answer_values(answer.answer, "answer")
    return answer


def encode_device_answer(answer: DeviceAnswer) -> bytes:
    return _ENCODER.encode(answer)


def decode_device_answer(
    payload: bytes, *, max_bytes: int = DEVICE_ANSWER_MAX_BYTES
) -> DeviceAnswer:
    """A device's answer: size, syntax, types, id, state, detail, values; raise an InputError."""
    return check_device_answer(_decode_json(_ANSWER_DECODER, payload, "answer", max_bytes))
