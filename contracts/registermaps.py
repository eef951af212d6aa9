"""Modbus device models as data: which registers a model has, and how they become metrics.

A *model* (``[modbus_models.NAME]`` in a catalog file) is one vendor's
product: the device type its readings feed, where its register table was
published (``source``: a citation, required), its serial line defaults, how
often the gateway polls it and how long it waits for an answer, its
``registers`` (one per metric: function code 3 or 4, zero-based PDU
address, data type, word and byte order, scale and offset) and its
``writes`` (the registers a catalog command writes, function 6 or 16).

Pure: ``parse_modbus_model`` checks a table as the catalog loader hands it
over and raises ``CatalogError`` naming the model and key;
``read_blocks`` groups a model's registers into as few read requests as
the Modbus limit allows; ``decode_registers`` turns the 16-bit words a
device answered into metric values (raw * scale + offset);
``encode_write`` turns a command's argument into the words to write;
``encode_register`` is ``decode_register``'s inverse (a metric's value as
the words a device holds: what a simulated slave answers). Polling, the bus
and its errors are the gateway's; serving registers is the simulator's.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Mapping
from typing import Any, Final, Literal

import msgspec

from contracts.errors import CatalogError, OutOfRangeError

RegisterType = Literal["int16", "uint16", "int32", "uint32", "float32"]
Order = Literal["big", "little"]
Parity = Literal["N", "E", "O"]

REGISTER_TYPES: Final[tuple[RegisterType, ...]] = ("int16", "uint16", "int32", "uint32", "float32")
# 16-bit words each type takes.
REGISTER_WORDS: Final[Mapping[str, int]] = {
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "float32": 2,
}
READ_FUNCTIONS: Final = (3, 4)  # read holding registers, read input registers
WRITE_FUNCTIONS: Final = (6, 16)  # write single register, write multiple registers
# Modbus over serial line (Modbus.org V1.02, 2.2): addresses 1-247; 0 is broadcast.
SLAVE_ID_MIN: Final = 1
SLAVE_ID_MAX: Final = 247
# Modbus Application Protocol V1.1b3, 6.3/6.4: at most 125 registers per read.
MAX_READ_REGISTERS: Final = 125
# Line speeds RS-485 devices offer.
BAUDRATES: Final = (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200)
# Poll no faster than 10 per second per device; a day is the slowest.
POLL_INTERVAL_MIN_S: Final = 0.1
POLL_INTERVAL_MAX_S: Final = 86_400.0
# An RTU answer comes within a few character times; 5 s covers a slow
# radio bridge, and a slower device holds the whole bus.
TIMEOUT_MAX_S: Final = 5.0

_MODEL_NAME_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")
_MODEL_KEYS: Final = frozenset(
    {
        "device_type",
        "description",
        "source",
        "baudrate",
        "parity",
        "stopbits",
        "poll_interval_s",
        "timeout_s",
        "registers",
        "writes",
    }
)
_REGISTER_KEYS: Final = frozenset(
    {"metric", "function", "address", "type", "word_order", "byte_order", "scale", "offset",
     "values"}
)  # fmt: skip
_WRITE_KEYS: Final = frozenset(
    {"command", "arg", "value", "function", "address", "type", "word_order", "byte_order",
     "scale", "offset"}
)  # fmt: skip


class Register(msgspec.Struct, frozen=True, kw_only=True):
    """A register (or register pair) that feeds one metric."""

    metric: str
    function: int  # 3 or 4
    address: int  # zero-based PDU address
    type: RegisterType = "uint16"
    word_order: Order = "big"  # of a 32-bit value: big = high word first
    byte_order: Order = "big"  # within each word: big = high byte first (Modbus' own)
    scale: float = 1.0
    offset: float = 0.0
    # Status codes: raw value -> the metric's value (an enum's code); a raw
    # value not listed is refused. Empty: raw * scale + offset.
    values: tuple[tuple[int, float], ...] = ()

    @property
    def words(self) -> int:
        return REGISTER_WORDS[self.type]


class RegisterWrite(msgspec.Struct, frozen=True, kw_only=True):
    """A register a command writes: its ``arg`` scaled, or a fixed ``value``."""

    command: str
    function: int  # 6 or 16
    address: int
    arg: str | None = None
    value: float | None = None
    type: RegisterType = "uint16"
    word_order: Order = "big"
    byte_order: Order = "big"
    scale: float = 1.0
    offset: float = 0.0


class ModbusModel(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    device_type: str
    description: str
    source: str  # where the register table was published
    registers: tuple[Register, ...]
    writes: tuple[RegisterWrite, ...] = ()
    baudrate: int = 9600
    parity: Parity = "N"
    stopbits: int = 1
    poll_interval_s: float = 10.0
    timeout_s: float = 1.0

    def writes_for(self, command: str) -> tuple[RegisterWrite, ...]:
        return tuple(w for w in self.writes if w.command == command)

    @property
    def commands(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(w.command for w in self.writes))

    @property
    def line(self) -> tuple[int, str, int]:
        """What devices sharing a bus must agree on: baud rate, parity, stop bits."""
        return (self.baudrate, self.parity, self.stopbits)


class ReadBlock(msgspec.Struct, frozen=True):
    """One read request: function, first address, count; the registers it serves."""

    function: int
    address: int
    count: int
    registers: tuple[Register, ...]


# --- parsing a catalog table -------------------------------------------------------


def _error(source: str, name: str, key: str | None, problem: str) -> CatalogError:
    return CatalogError(source, f"modbus_models.{name}", key, problem)


def _int(table: Mapping[str, Any], key: str, bounds: tuple[int, int], err: Any) -> int:
    lo, hi = bounds
    value = table.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise err(key, f"expected a whole number in [{lo}, {hi}], got {value!r}")
    return value


def _float(
    table: Mapping[str, Any],
    key: str,
    err: Any,
    default: float,
    bounds: tuple[float, float] | None = None,
) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise err(key, f"expected a finite number, got {value!r}")
    if bounds is not None and not bounds[0] <= value <= bounds[1]:
        raise err(key, f"{value!r} is outside [{bounds[0]:g}, {bounds[1]:g}]")
    return float(value)


def _choice(
    table: Mapping[str, Any], key: str, choices: tuple[Any, ...], err: Any, default: Any
) -> Any:
    value = table.get(key, default)
    if value not in choices:
        raise err(key, f"{value!r} is not one of {', '.join(map(str, choices))}")
    return value


def _text(table: Mapping[str, Any], key: str, err: Any) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value.strip():
        raise err(key, "expected a non-empty string")
    return value


def _refuse_unknown(
    table: Mapping[str, Any], allowed: frozenset[str], err: Any, prefix: str
) -> None:
    for key in table:
        if key not in allowed:
            raise err(prefix + key, f"unknown key (known: {', '.join(sorted(allowed))})")


def _encoding(table: Mapping[str, Any], err: Any, prefix: str) -> dict[str, Any]:
    def at(key: str, problem: str) -> CatalogError:
        error: CatalogError = err(prefix + key, problem)
        return error

    kind = _choice(table, "type", REGISTER_TYPES, at, "uint16")
    fields: dict[str, Any] = {
        "type": kind,
        "word_order": _choice(table, "word_order", ("big", "little"), at, "big"),
        "byte_order": _choice(table, "byte_order", ("big", "little"), at, "big"),
        "scale": _float(table, "scale", at, 1.0),
        "offset": _float(table, "offset", at, 0.0),
        "address": _int(table, "address", (0, 0xFFFF), at),
    }
    if fields["scale"] == 0:
        raise at("scale", "must not be 0")
    if fields["address"] + REGISTER_WORDS[kind] - 1 > 0xFFFF:
        raise at("address", f"a {kind} at {fields['address']} runs past 65535")
    return fields


def parse_modbus_model(
    name: str,
    raw: object,
    *,
    source: str,
    metrics: Mapping[str, tuple[str, ...]],
    commands: Mapping[str, Mapping[str, tuple[str, ...]]],
) -> ModbusModel:
    """Check one ``[modbus_models.NAME]`` table; CatalogError naming the key if it is wrong.

    ``metrics`` maps each known device type with the modbus transport to its
    metric names; ``commands`` maps it to its commands and their args.
    """

    def err(key: str | None, problem: str) -> CatalogError:
        return _error(source, name, key, problem)

    if _MODEL_NAME_RE.fullmatch(name) is None:
        raise err(None, f"a model name must match {_MODEL_NAME_RE.pattern}")
    if not isinstance(raw, dict):
        raise err(None, f"expected a table, got {type(raw).__name__}")
    table: Mapping[str, Any] = raw
    _refuse_unknown(table, _MODEL_KEYS, err, "")
    type_name = _text(table, "device_type", err)
    if type_name not in metrics:
        raise err(
            "device_type",
            f"{type_name!r} is not a device type with the modbus transport"
            f" (those are: {', '.join(sorted(metrics)) or 'none'})",
        )
    registers = _registers(table.get("registers"), metrics[type_name], err)
    writes = _writes(table.get("writes", []), commands[type_name], type_name, err)
    return ModbusModel(
        name=name,
        device_type=type_name,
        description=_text(table, "description", err),
        source=_text(table, "source", err),
        registers=registers,
        writes=writes,
        baudrate=_choice(table, "baudrate", BAUDRATES, err, 9600),
        parity=_choice(table, "parity", ("N", "E", "O"), err, "N"),
        stopbits=_choice(table, "stopbits", (1, 2), err, 1),
        poll_interval_s=_float(
            table, "poll_interval_s", err, 10.0, (POLL_INTERVAL_MIN_S, POLL_INTERVAL_MAX_S)
        ),
        timeout_s=_float(table, "timeout_s", err, 1.0, (0.01, TIMEOUT_MAX_S)),
    )


def _registers(raw: object, metric_names: tuple[str, ...], err: Any) -> tuple[Register, ...]:
    if not isinstance(raw, list) or not raw:
        raise err("registers", "expected a non-empty list of register tables")
    registers: list[Register] = []
    seen: set[str] = set()
    for index, entry in enumerate(raw):
        prefix = f"registers[{index}]."
        if not isinstance(entry, dict):
            raise err(prefix.rstrip("."), "expected a table")
        _refuse_unknown(entry, _REGISTER_KEYS, err, prefix)
        metric = _text(entry, "metric", lambda k, p, pre=prefix: err(pre + k, p))
        if metric not in metric_names:
            raise err(prefix + "metric", f"{metric!r} is not a metric of the model's device type")
        if metric in seen:
            raise err(prefix + "metric", f"{metric!r} is fed by two registers")
        seen.add(metric)
        function = _choice(
            entry, "function", READ_FUNCTIONS, lambda k, p, pre=prefix: err(pre + k, p), None
        )
        values = _value_map(entry.get("values", []), err, prefix + "values")
        fields = _encoding(entry, err, prefix)
        registers.append(Register(metric=metric, function=function, values=values, **fields))
    return tuple(registers)


def _value_map(raw: object, err: Any, key: str) -> tuple[tuple[int, float], ...]:
    """``values = [[raw, value], ...]``: whole raw codes, each once, finite values."""
    if not isinstance(raw, list):
        raise err(key, "expected a list of [raw, value] pairs")
    pairs: list[tuple[int, float]] = []
    for pair in raw:
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or isinstance(pair[0], bool)
            or not isinstance(pair[0], int)
            or isinstance(pair[1], bool)
            or not isinstance(pair[1], int | float)
            or not math.isfinite(pair[1])
        ):
            raise err(key, f"expected [whole raw code, number], got {pair!r}")
        if any(pair[0] == seen for seen, _v in pairs):
            raise err(key, f"raw code {pair[0]} is listed twice")
        pairs.append((pair[0], float(pair[1])))
    return tuple(pairs)


def _writes(
    raw: object, commands: Mapping[str, tuple[str, ...]], type_name: str, err: Any
) -> tuple[RegisterWrite, ...]:
    if not isinstance(raw, list):
        raise err("writes", "expected a list of write tables")
    writes: list[RegisterWrite] = []
    for index, entry in enumerate(raw):
        prefix = f"writes[{index}]."
        if not isinstance(entry, dict):
            raise err(prefix.rstrip("."), "expected a table")
        _refuse_unknown(entry, _WRITE_KEYS, err, prefix)
        command = _text(entry, "command", lambda k, p, pre=prefix: err(pre + k, p))
        if command not in commands:
            raise err(prefix + "command", f"{type_name} has no command {command!r}")
        function = _choice(
            entry, "function", WRITE_FUNCTIONS, lambda k, p, pre=prefix: err(pre + k, p), None
        )
        fields = _encoding(entry, err, prefix)
        if function == 6 and REGISTER_WORDS[fields["type"]] != 1:
            raise err(
                prefix + "function", "function 6 writes one register: use 16 for 32-bit types"
            )
        arg, value = entry.get("arg"), entry.get("value")
        if (arg is None) == (value is None):
            raise err(prefix + "arg", "a write takes either an arg of its command or a fixed value")
        if arg is not None and arg not in commands[command]:
            raise err(prefix + "arg", f"command {command} has no arg {arg!r}")
        if value is not None:
            value = _float(entry, "value", lambda k, p, pre=prefix: err(pre + k, p), 0.0)
        writes.append(
            RegisterWrite(command=command, function=function, arg=arg, value=value, **fields)
        )
    return tuple(writes)


# --- reading and writing --------------------------------------------------------------


def read_blocks(model: ModbusModel, *, max_gap: int = 8) -> tuple[ReadBlock, ...]:
    """The model's registers as read requests: neighbours of one function in one request.

    Registers at most ``max_gap`` words apart share a request (reading a few
    unused words costs less than another round trip on a 9,600 baud line),
    up to MAX_READ_REGISTERS words each.
    """
    blocks: list[ReadBlock] = []
    for function in READ_FUNCTIONS:
        todo = sorted(
            (r for r in model.registers if r.function == function), key=lambda r: r.address
        )
        group: list[Register] = []
        start = end = 0
        for reg in todo:
            reg_end = reg.address + reg.words
            if group and reg.address - end <= max_gap and reg_end - start <= MAX_READ_REGISTERS:
                group.append(reg)
                end = max(end, reg_end)
                continue
            if group:
                blocks.append(ReadBlock(function, start, end - start, tuple(group)))
            group, start, end = [reg], reg.address, reg_end
        if group:
            blocks.append(ReadBlock(function, start, end - start, tuple(group)))
    return tuple(blocks)


_FORMATS: Final[Mapping[str, str]] = {
    "int16": "h",
    "uint16": "H",
    "int32": "i",
    "uint32": "I",
    "float32": "f",
}


def _value_bytes(words: list[int], *, word_order: str, byte_order: str) -> bytes:
    """The value's bytes, most significant first, from words as the device sent them."""
    ordered = words if word_order == "big" else words[::-1]
    out = bytearray()
    for word in ordered:
        hi, lo = (word >> 8) & 0xFF, word & 0xFF
        out += bytes((hi, lo) if byte_order == "big" else (lo, hi))
    return bytes(out)


def decode_register(reg: Register, words: list[int]) -> float:
    """One register's value: its words (as read) as its type, times scale, plus offset."""
    raw = _value_bytes(words, word_order=reg.word_order, byte_order=reg.byte_order)
    (value,) = struct.unpack(">" + _FORMATS[reg.type], raw)
    if reg.values:
        for code, mapped in reg.values:
            if code == value:
                return mapped
        raise OutOfRangeError(
            f"{reg.metric}: register {reg.address} holds {value}, not one of the model's codes"
            f" ({', '.join(str(c) for c, _v in reg.values)})"
        )
    return float(value) * reg.scale + reg.offset


def decode_registers(block: ReadBlock, words: list[int]) -> dict[str, float]:
    """The metrics of one answered read request (``words``: block.count registers as read)."""
    if len(words) != block.count:
        raise OutOfRangeError(f"expected {block.count} registers, got {len(words)}")
    values: dict[str, float] = {}
    for reg in block.registers:
        at = reg.address - block.address
        values[reg.metric] = decode_register(reg, words[at : at + reg.words])
    return values


def _encode_raw(kind: str, raw: float, *, word_order: str, byte_order: str, what: str) -> list[int]:
    """A raw value as words in the given orders; OutOfRangeError if it does not fit the type."""
    if kind != "float32":
        whole = round(raw)
        bits = REGISTER_WORDS[kind] * 16
        lo, hi = (
            (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
            if kind.startswith("int")
            else (0, 2**bits - 1)
        )
        if not lo <= whole <= hi:
            raise OutOfRangeError(f"{raw!r} does not fit {what} ({kind})")
        packed = struct.pack(">" + _FORMATS[kind], whole)
    else:
        try:
            packed = struct.pack(">f", raw)
        except OverflowError:
            raise OutOfRangeError(f"{raw!r} does not fit {what} (float32)") from None
    words = [int.from_bytes(packed[i : i + 2], "big") for i in range(0, len(packed), 2)]
    if byte_order == "little":
        words = [((w & 0xFF) << 8) | (w >> 8) for w in words]
    return words if word_order == "big" else words[::-1]


def encode_write(write: RegisterWrite, value: float) -> list[int]:
    """The words that write ``value`` (an arg's, or the write's fixed one) to the register.

    OutOfRangeError if the scaled value does not fit the register's type.
    """
    return _encode_raw(
        write.type,
        (value - write.offset) / write.scale,
        word_order=write.word_order,
        byte_order=write.byte_order,
        what=f"register {write.address} (scale {write.scale:g})",
    )


def encode_register(reg: Register, value: float) -> list[int]:
    """The words a device holds for a metric's ``value``: ``decode_register``'s inverse.

    A status register takes the first raw code its ``values`` map to
    ``value``. OutOfRangeError if no code maps to it, or the scaled value
    does not fit the type. Whole types round to the nearest step, so
    decoding gives ``value`` back to within half a ``scale``.
    """
    if reg.values:
        for code, mapped in reg.values:
            if mapped == value:
                raw: float = code
                break
        else:
            raise OutOfRangeError(
                f"{reg.metric}: {value!r} is none of register {reg.address}'s codes"
            )
    else:
        raw = (value - reg.offset) / reg.scale
    return _encode_raw(
        reg.type,
        raw,
        word_order=reg.word_order,
        byte_order=reg.byte_order,
        what=f"register {reg.address} (scale {reg.scale:g})",
    )


# --- the line ---------------------------------------------------------------------------

# RTU request for a read or a single write: id, function, two 16-bit fields, CRC.
REQUEST_BYTES: Final = 8
# Modbus over serial line V1.02, 2.5.1.1: frames are separated by at least
# 3.5 character times of silence.
SILENT_CHARS: Final = 3.5


def char_bits(parity: str, stopbits: int) -> int:
    """Bits one RTU character takes on the wire: start, 8 data, parity if any, stop bits."""
    return 1 + 8 + (parity != "N") + stopbits


def read_answer_bytes(count: int) -> int:
    """An answer to a read of ``count`` registers: id, function, byte count, data, CRC."""
    return 5 + 2 * count


def transaction_s(baudrate: int, *, request_bytes: int, answer_bytes: int, bits: int = 10) -> float:
    """Line time of one request and its answer, each followed by the silent interval.

    The line's own limit: no slave answers faster, whatever it does inside.
    """
    chars = request_bytes + SILENT_CHARS + answer_bytes + SILENT_CHARS
    return chars * bits / baudrate
