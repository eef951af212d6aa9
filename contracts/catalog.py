"""The device catalog: device types, their metrics, units and valid ranges, their commands, as data.

The catalog is the single description of what devices measure. The gateway
validates readings against it, ingest checks them again, the schema module
generates one wide hypertable per device type from it (a column per metric)
and the simulator draws its signals inside its ranges.

Where it comes from: the shipped catalog is TOML package data
(``contracts/data/catalog.toml``); operators' files (the ``catalog.paths``
setting: a file, or a directory whose ``*.toml`` files are read in name order)
add device types and metrics on top. ``load_catalog`` merges texts and is
pure; ``read_catalog`` reads the files. An operator's file may add a type, add
metrics to a type, add transports to a type and extend an enum's labels; it may
change a metric's description or valid range. It may not change a known
metric's kind or unit, reorder an enum's labels, declare transports or serial
protocols (they need gateway code) or use a key the catalog does not know:
each is a ``CatalogError`` naming the file, the type and the key. A catalog is
made only of msgspec structs, so it can be encoded and sent (to a gateway with
its config, for instance) and decoded as it was.

How a process uses it: ``DEVICE_TYPES`` is the process-wide catalog that every
module reads (``from contracts.catalog import DEVICE_TYPES``); it holds the
shipped types when this module is imported. ``contracts.settings.load_settings``
(the one start-up step of every ``__main__`` and of the ``cityhub`` command)
reads the files of ``catalog.paths`` and installs the result with
``use_catalog``, which updates ``DEVICE_TYPES`` in place, so that names imported
earlier see it. A process that receives its settings without loading them (a
spawned worker) calls ``use_catalog`` itself. Later, a running process may
learn types from elsewhere: ``merge_types`` merges received entries (a
gateway's config carries the entries of its devices' types; ``cityhub db
migrate`` records every entry in the database, where ingest reads them) onto
the installed catalog with an operator's file's checks, and the service
installs the result. Tables a module builds from ``DEVICE_TYPES`` at import
time keep the shipped types, unless it rebuilds them through ``follow_catalog``.
The module constants ``AIR_QUALITY``, ``KIOSK``, ``CAMERA_COUNTER``,
``CONFERENCE_ENDPOINT`` and ``PRINTER_STATUS_LABELS`` are the shipped
definitions, whatever an operator adds.

Commands (``DeviceType.commands``, operator -> device) are entries too: a
command's name, timeout and arguments (int, float, bool, enum, string, each
with its bounds, whether it is required and its default), and the serial
protocols whose frames carry it (none: devices on MQTT only). An operator's
file may add commands to a type and args with a default to a known command,
and restate a command's description, timeout or an arg's bounds; it may not
remove a known arg or change its kind, make an optional arg required, or say
which serial protocols carry a command (gateway code again), so that a request
that was valid stays valid. Checking a request against its entry and the
message sent to the device are ``contracts.commands``'; delivering it is not
this module's business.

Valid ranges are *physical* ranges: what the sensor can report at all
(datasheet limits), not what is plausible on a given day; plausibility is the
alert rules' business. A value outside its range is a reject, not an alert.
Migrating a database to a catalog (columns, tables) is ``contracts.schema``'s
and the ``cityhub db`` command's business, not this module's.
"""

from __future__ import annotations

import enum
import math
import re
import tomllib
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Final, Literal

import msgspec

from contracts.errors import (
    CatalogError,
    CommandRefusedError,
    NonFiniteValueError,
    OutOfRangeError,
    UnknownDeviceTypeError,
    UnknownMetricError,
)
from contracts.lorawanmodels import LorawanModel, parse_lorawan_model
from contracts.registermaps import ModbusModel, parse_modbus_model
from contracts.wording import count_noun


class MetricKind(enum.StrEnum):
    FLOAT = "float"
    INT = "int"
    BOOL = "bool"  # carried as 0 / 1 on the wire
    ENUM = "enum"  # small integer code; labels in Metric.labels


class Metric(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    unit: str
    kind: MetricKind
    min: float
    max: float
    description: str
    labels: tuple[str, ...] = ()  # ENUM only: labels[code]

    def check(self, value: float) -> float:
        """Return ``value`` if it is a finite number inside the valid range; raise otherwise."""
        if not math.isfinite(value):
            raise NonFiniteValueError(f"{self.name}: {value!r} is not a finite number")
        if not self.min <= value <= self.max:
            raise OutOfRangeError(
                f"{self.name}: {value!r} {self.unit} is outside [{self.min:g}, {self.max:g}]"
            )
        if self.kind is not MetricKind.FLOAT and value != int(value):
            raise OutOfRangeError(f"{self.name}: {value!r} is not a whole number")
        return value


class ArgKind(enum.StrEnum):
    """The kind of a command's argument (values travel as JSON: number, true/false, string)."""

    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    ENUM = "enum"  # one of CommandArg.labels, sent as the label
    STRING = "string"  # at most CommandArg.max_length printable characters


ArgValue = int | float | bool | str

# A command argument is a short setting (an interval, a mode, a message shown
# on a kiosk's screen), not a document: 200 characters hold two lines of a
# kiosk notice in Vietnamese, and keep a command's JSON small (commands.py).
ARG_STRING_MAX_CHARS: Final = 200
# The widest shipped command has 1 argument; 16 leaves room for operators'
# commands while bounding a command's size (contracts.commands.COMMAND_MAX_BYTES).
COMMAND_ARGS_MAX: Final = 16
# A device answers a command within its timeout or the command has failed: 30 s
# covers a setting (a firmware writes a flag and replies); rebooting or a test
# call say their own. An hour is the longest anything a device does may take.
DEFAULT_COMMAND_TIMEOUT_S: Final = 30.0
MAX_COMMAND_TIMEOUT_S: Final = 3600.0


def _quote(value: object) -> str:
    """A value quoted back in a refusal, cut short: a request may carry anything."""
    text = repr(value)
    return text if len(text) <= 66 else text[:60] + "...'"


def has_control_characters(text: str) -> bool:
    """Control, format (bidi overrides, zero-width) or unassigned characters."""
    return any(unicodedata.category(ch).startswith("C") for ch in text)


class CommandArg(msgspec.Struct, frozen=True, kw_only=True):
    """One argument of a command: its kind, the values it accepts, whether it may be left out."""

    name: str
    kind: ArgKind
    description: str
    # Left out of a request: an arg with a default takes it; one without, if
    # not required, is left out of the command (the device keeps its setting).
    required: bool = True
    default: ArgValue | None = None
    min: float | None = None  # INT and FLOAT only, both given
    max: float | None = None
    labels: tuple[str, ...] = ()  # ENUM only
    max_length: int = 0  # STRING only

    def check(self, value: object) -> ArgValue:
        """Return ``value`` (a float for a whole number given to a FLOAT arg) if the arg takes it.

        Raise CommandRefusedError naming the arg otherwise (wrong kind, out
        of range, a label not allowed, a string too long or with control
        characters). The caller fills in the type and the command.
        """
        # bool is an int subclass: true is not a number, 1 is not a bool.
        if self.kind is ArgKind.BOOL:
            if not isinstance(value, bool):
                raise self._refuse(f"expected true or false, got {_quote(value)}")
            return value
        if self.kind in {ArgKind.INT, ArgKind.FLOAT}:
            return self._check_number(value)
        if not isinstance(value, str):
            raise self._refuse(f"expected a string, got {_quote(value)}")
        if self.kind is ArgKind.ENUM:
            if value not in self.labels:
                raise self._refuse(f"{_quote(value)} is not one of {', '.join(self.labels)}")
            return value
        if len(value) > self.max_length:
            raise self._refuse(f"longer than {self.max_length} characters ({len(value)})")
        if has_control_characters(value):
            raise self._refuse("has control characters (line breaks, tabs, invisible marks)")
        return value

    def _refuse(self, problem: str) -> CommandRefusedError:
        return CommandRefusedError(None, None, self.name, problem)

    def _check_number(self, value: object) -> int | float:
        number: int | float
        if self.kind is ArgKind.INT:
            if isinstance(value, bool) or not isinstance(value, int):
                raise self._refuse(f"expected a whole number, got {_quote(value)}")
            number = value
        else:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise self._refuse(f"expected a number, got {_quote(value)}")
            number = float(value)
            if not math.isfinite(number):
                raise self._refuse(f"{value!r} is not a finite number")
        lo, hi = self.min, self.max
        if lo is not None and hi is not None and not lo <= number <= hi:
            raise self._refuse(f"{_quote(value)} is outside [{lo:g}, {hi:g}]")
        return number


class CommandSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A command a device type accepts (``contracts.commands`` checks requests against it)."""

    name: str
    description: str
    args: tuple[CommandArg, ...] = ()
    # How long a device may take to carry it out and answer.
    timeout_s: float = DEFAULT_COMMAND_TIMEOUT_S
    # The serial protocols whose frames can carry it (the gateway translates);
    # empty: only devices on MQTT accept it.
    protocols: tuple[str, ...] = ()

    def arg(self, name: str) -> CommandArg | None:
        for arg in self.args:
            if arg.name == name:
                return arg
        return None

    @property
    def arg_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.args)


# Devices report every 10-60 s; five minutes without a reading is several
# missed reports, not jitter, for a type that says nothing of its own.
DEFAULT_OFFLINE_AFTER_S: Final = 300.0
# A type may not wait longer than a day to call a device offline.
MAX_OFFLINE_AFTER_S: Final = 86_400.0


class DeviceType(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    description: str
    transports: tuple[str, ...]  # "serial", "mqtt"
    metrics: tuple[Metric, ...]
    # Appended: the frame protocols a serial device of this type may speak.
    serial_protocols: tuple[str, ...] = ()
    # An uplink naming a metric this type lacks (newer firmware, a vendor's
    # extra field): "report" stores the known metrics and reports each unknown
    # one (reason unknown_metric); "reject" refuses the whole reading.
    unknown_metrics: Literal["report", "reject"] = "report"
    # Appended: a device of this type that has sent nothing for this long is
    # offline. The one definition of "online" (boards, `cityhub status`, the
    # CLI lists, the no_data rules' default silence).
    offline_after_s: float = DEFAULT_OFFLINE_AFTER_S
    # Appended: the commands its devices accept (operator -> device).
    commands: tuple[CommandSpec, ...] = ()

    def metric(self, name: str) -> Metric:
        for metric in self.metrics:
            if metric.name == name:
                return metric
        raise UnknownMetricError(f"device type {self.name!r} has no metric {name!r}")

    @property
    def metric_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.metrics)

    def command(self, name: str) -> CommandSpec | None:
        for command in self.commands:
            if command.name == name:
                return command
        return None

    @property
    def command_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.commands)


class Transport(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    description: str


class SerialProtocol(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    description: str
    metrics: tuple[str, ...]  # what its frames carry


class Catalog(msgspec.Struct, frozen=True, kw_only=True):
    """A loaded catalog: what ``use_catalog`` installs and what may be sent to a gateway."""

    types: dict[str, DeviceType]
    transports: dict[str, Transport]
    serial_protocols: dict[str, SerialProtocol]
    # The files it was merged from, in order (the shipped one first).
    sources: tuple[str, ...] = ()
    # Appended: Modbus and LoRaWAN device models (contracts.registermaps,
    # contracts.lorawanmodels), by name: a device on those transports names one.
    modbus_models: dict[str, ModbusModel] = {}
    lorawan_models: dict[str, LorawanModel] = {}


SHIPPED_SOURCE: Final = "<shipped: contracts/data/catalog.toml>"

# Type names become table names (readings_{type}_1h, at most 63 bytes in
# PostgreSQL); metric names become columns (and {metric}_avg in rollups).
_TYPE_NAME_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,39}")
_METRIC_NAME_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,54}")
_LABEL_RE: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
# Columns every readings table and rollup already has.
RESERVED_METRIC_NAMES: Final = frozenset({"ts", "device_id", "seq", "recv_ts", "bucket", "n"})
# A unit is a short symbol ("ug/m3", "degC", "people").
_UNIT_MAX_CHARS: Final = 32

_FILE_KEYS: Final = frozenset(
    {"types", "transports", "serial_protocols", "modbus_models", "lorawan_models"}
)
_SHIPPED_ONLY_KEYS: Final = frozenset({"transports", "serial_protocols"})
_TYPE_KEYS: Final = frozenset(
    {
        "description",
        "transports",
        "serial_protocols",
        "metrics",
        "unknown_metrics",
        "offline_after_s",
        "commands",
    }
)
_UNKNOWN_METRICS_POLICIES: Final = ("report", "reject")
_METRIC_KEYS: Final = frozenset({"name", "unit", "kind", "min", "max", "description", "labels"})
_COMMAND_KEYS: Final = frozenset({"name", "description", "timeout_s", "args", "protocols"})
_ARG_KEYS: Final = frozenset(
    {"name", "kind", "description", "required", "default", "min", "max", "labels", "max_length"}
)
# Command and arg names are identifiers, like metric names.
_COMMAND_NAME_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,54}")


class _Where:
    """Where a problem is, for CatalogError: the file, the type, the key."""

    def __init__(self, source: str, type_name: str | None = None) -> None:
        self.source = source
        self.type_name = type_name

    def error(self, key: str | None, problem: str) -> CatalogError:
        return CatalogError(self.source, self.type_name, key, problem)


def _table(value: object, where: _Where, key: str | None) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise where.error(key, f"expected a table, got {type(value).__name__}")
    return value


def _text(table: Mapping[str, Any], key: str, where: _Where, prefix: str = "") -> str:
    value = table.get(key)
    if not isinstance(value, str) or (key != "unit" and not value.strip()):
        raise where.error(prefix + key, "expected a non-empty string")
    return value


def _names(value: object, where: _Where, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise where.error(key, "expected a non-empty list of strings")
    if len(set(value)) != len(value):
        raise where.error(key, "lists a name twice")
    return tuple(value)


def _refuse_unknown_keys(
    table: Mapping[str, Any], allowed: frozenset[str], where: _Where, prefix: str
) -> None:
    for key in table:
        if key not in allowed:
            raise where.error(
                f"{prefix}{key}", f"unknown key (known: {', '.join(sorted(allowed))})"
            )


def _number(table: Mapping[str, Any], key: str, where: _Where, prefix: str) -> float | None:
    if key not in table:
        return None
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise where.error(prefix + key, f"expected a finite number, got {value!r}")
    return value


def _labels(table: Mapping[str, Any], where: _Where, prefix: str) -> tuple[str, ...]:
    labels = _names(table.get("labels"), where, prefix + "labels")
    for label in labels:
        if _LABEL_RE.fullmatch(label) is None:
            raise where.error(prefix + "labels", f"label {label!r} must match {_LABEL_RE.pattern}")
    return labels


def _range(
    table: Mapping[str, Any], kind: MetricKind, labels: tuple[str, ...], where: _Where, prefix: str
) -> tuple[float, float]:
    """The valid range: given for float and int; implied (and checked if given) for bool, enum."""
    lo, hi = _number(table, "min", where, prefix), _number(table, "max", where, prefix)
    implied = {MetricKind.BOOL: (0, 1), MetricKind.ENUM: (0, len(labels) - 1)}.get(kind)
    if implied is not None:
        for key, given, value in (("min", lo, implied[0]), ("max", hi, implied[1])):
            if given is not None and given != value:
                raise where.error(
                    prefix + key, f"a {kind} metric's {key} is {value}, not {given!r}"
                )
        return implied
    if lo is None or hi is None:
        raise where.error(prefix + ("min" if lo is None else "max"), "missing (the valid range)")
    if not lo < hi:
        raise where.error(
            prefix + "max", f"the range [{lo!r}, {hi!r}] is empty: max must exceed min"
        )
    if kind is MetricKind.INT and (lo != int(lo) or hi != int(hi)):
        raise where.error(prefix + "min", f"an int metric's range [{lo!r}, {hi!r}] must be whole")
    return lo, hi


def _metric(raw: object, index: int, where: _Where) -> Metric:
    table = _table(raw, where, f"metrics[{index}]")
    name = table.get("name")
    if not isinstance(name, str) or _METRIC_NAME_RE.fullmatch(name) is None:
        raise where.error(
            f"metrics[{index}].name", f"{name!r} must match {_METRIC_NAME_RE.pattern}"
        )
    prefix = f"metrics.{name}."
    if name in RESERVED_METRIC_NAMES:
        raise where.error(prefix + "name", "is a column every readings table has already")
    _refuse_unknown_keys(table, _METRIC_KEYS, where, prefix)
    try:
        kind = MetricKind(str(table.get("kind")))
    except ValueError:
        known = ", ".join(k.value for k in MetricKind)
        raise where.error(prefix + "kind", f"{table.get('kind')!r} is not one of {known}") from None
    unit = _text(table, "unit", where, prefix)
    if len(unit) > _UNIT_MAX_CHARS:
        raise where.error(prefix + "unit", f"longer than {_UNIT_MAX_CHARS} characters")
    labels: tuple[str, ...] = ()
    if kind is MetricKind.ENUM:
        labels = _labels(table, where, prefix)
    elif "labels" in table:
        raise where.error(prefix + "labels", f"only an enum metric has labels, not a {kind} one")
    lo, hi = _range(table, kind, labels, where, prefix)
    return Metric(
        name=name,
        unit=unit,
        kind=kind,
        min=lo,
        max=hi,
        description=_text(table, "description", where, prefix),
        labels=labels,
    )


def _merge_metric(old: Metric, new: Metric, where: _Where) -> Metric:
    """An operator's entry for a known metric: same kind and unit, labels only appended."""
    prefix = f"metrics.{old.name}."
    if new.kind is not old.kind:
        raise where.error(
            prefix + "kind", f"is {old.kind!r}; a metric's kind cannot change (got {new.kind!r})"
        )
    if new.unit != old.unit:
        raise where.error(
            prefix + "unit", f"is {old.unit!r}; a metric's unit cannot change (got {new.unit!r})"
        )
    if new.labels[: len(old.labels)] != old.labels:
        raise where.error(
            prefix + "labels",
            f"must start with the known labels {list(old.labels)} (codes keep their meaning)",
        )
    return new


def _extend_names(
    given: object, have: tuple[str, ...], known: Mapping[str, object], where: _Where, key: str
) -> list[str]:
    """A type's transports or serial protocols: the known ones plus those given, each declared."""
    names = list(have)
    for name in _names(given, where, key) if given is not None else ():
        if name not in known:
            what = key.rstrip("s").replace("_", " ")
            raise where.error(key, f"{name!r} is not a {what} ({', '.join(known)})")
        if name not in names:
            names.append(name)
    return names


def _merge_metrics(raw: object, old: DeviceType | None, where: _Where) -> dict[str, Metric]:
    """A type's metrics: the known ones in order (restated ones merged), then the new ones."""
    metrics = {m.name: m for m in old.metrics} if old else {}
    if not isinstance(raw, list) or (old is None and not raw):
        raise where.error("metrics", "expected a non-empty list of metric tables")
    seen: set[str] = set()
    for index, raw_metric in enumerate(raw):
        metric = _metric(raw_metric, index, where)
        if metric.name in seen:
            raise where.error(f"metrics.{metric.name}", "duplicate: the file defines it twice")
        seen.add(metric.name)
        previous = metrics.get(metric.name)
        metrics[metric.name] = (
            metric if previous is None else _merge_metric(previous, metric, where)
        )
    return metrics


def _arg_range(
    table: Mapping[str, Any], kind: ArgKind, where: _Where, prefix: str
) -> tuple[float | None, float | None]:
    """An int or float arg's range (both bounds required); no range for the other kinds."""
    lo, hi = _number(table, "min", where, prefix), _number(table, "max", where, prefix)
    if kind not in {ArgKind.INT, ArgKind.FLOAT}:
        if lo is not None or hi is not None:
            key = "min" if lo is not None else "max"
            raise where.error(prefix + key, f"only int and float args have a range, not a {kind}")
        return None, None
    if lo is None or hi is None:
        raise where.error(prefix + ("min" if lo is None else "max"), "missing (the valid range)")
    if not lo < hi:
        raise where.error(
            prefix + "max", f"the range [{lo!r}, {hi!r}] is empty: max must exceed min"
        )
    if kind is ArgKind.INT and (lo != int(lo) or hi != int(hi)):
        raise where.error(prefix + "min", f"an int arg's range [{lo!r}, {hi!r}] must be whole")
    return lo, hi


def _arg(raw: object, index: int, command: str, where: _Where) -> CommandArg:
    base = f"commands.{command}.args"
    table = _table(raw, where, f"{base}[{index}]")
    name = table.get("name")
    if not isinstance(name, str) or _COMMAND_NAME_RE.fullmatch(name) is None:
        raise where.error(
            f"{base}[{index}].name", f"{name!r} must match {_COMMAND_NAME_RE.pattern}"
        )
    prefix = f"{base}.{name}."
    _refuse_unknown_keys(table, _ARG_KEYS, where, prefix)
    try:
        kind = ArgKind(str(table.get("kind")))
    except ValueError:
        known = ", ".join(k.value for k in ArgKind)
        raise where.error(prefix + "kind", f"{table.get('kind')!r} is not one of {known}") from None
    description = _text(table, "description", where, prefix)
    lo, hi = _arg_range(table, kind, where, prefix)
    labels: tuple[str, ...] = ()
    if kind is ArgKind.ENUM:
        labels = _labels(table, where, prefix)
    elif "labels" in table:
        raise where.error(prefix + "labels", f"only an enum arg has labels, not a {kind} one")
    max_length = table.get("max_length", 0)
    if kind is ArgKind.STRING:
        if (
            isinstance(max_length, bool)
            or not isinstance(max_length, int)
            or not 1 <= max_length <= ARG_STRING_MAX_CHARS
        ):
            raise where.error(
                prefix + "max_length",
                f"{max_length!r}: a string arg needs a max_length in [1, {ARG_STRING_MAX_CHARS}]",
            )
    elif "max_length" in table:
        raise where.error(prefix + "max_length", f"only a string arg has one, not a {kind} one")
    arg = CommandArg(
        name=name, kind=kind, description=description, min=lo, max=hi, labels=labels,
        max_length=max_length,
    )  # fmt: skip
    default = table.get("default")
    if default is not None:
        try:
            default = arg.check(default)
        except CommandRefusedError as exc:
            raise where.error(prefix + "default", exc.problem) from None
    required = table.get("required", default is None)
    if not isinstance(required, bool):
        raise where.error(prefix + "required", f"expected true or false, got {required!r}")
    if required and default is not None:
        raise where.error(prefix + "required", "an arg with a default is not required")
    return msgspec.structs.replace(arg, required=required, default=default)


def _merge_args(old: CommandSpec, new: tuple[CommandArg, ...], where: _Where) -> list[CommandArg]:
    """A known command's args restated: every known one again, same kind; new ones with a default.

    A request that was valid stays valid: an arg cannot disappear, change
    kind, or be added without a value to take when a request leaves it out.
    """
    prefix = f"commands.{old.name}.args."
    given = {arg.name: arg for arg in new}
    for arg in old.args:
        restated = given.get(arg.name)
        if restated is None:
            raise where.error(
                prefix + arg.name, "a command's arg cannot be removed (list it again)"
            )
        if restated.kind is not arg.kind:
            raise where.error(
                prefix + arg.name + ".kind",
                f"is {arg.kind.value!r}; an arg's kind cannot change (got {restated.kind.value!r})",
            )
        if restated.required and not arg.required:
            raise where.error(
                prefix + arg.name + ".required", "an optional arg cannot become required"
            )
    known = old.arg_names
    for arg in new:
        if arg.name not in known and arg.default is None:
            raise where.error(
                prefix + arg.name + ".default",
                "an arg added to a known command needs a default (requests without it stay valid)",
            )
    return [given[name] for name in known] + [a for a in new if a.name not in known]


def _command(  # noqa: PLR0917 - one command table and what it is checked against
    raw: object,
    index: int,
    old: CommandSpec | None,
    type_protocols: Sequence[str],
    where: _Where,
    shipped: bool,
) -> CommandSpec:
    table = _table(raw, where, f"commands[{index}]")
    name = table.get("name")
    if not isinstance(name, str) or _COMMAND_NAME_RE.fullmatch(name) is None:
        raise where.error(
            f"commands[{index}].name", f"{name!r} must match {_COMMAND_NAME_RE.pattern}"
        )
    prefix = f"commands.{name}."
    _refuse_unknown_keys(table, _COMMAND_KEYS, where, prefix)
    if old is None or "description" in table:
        description = _text(table, "description", where, prefix)
    else:
        description = old.description
    timeout_s = table.get("timeout_s", old.timeout_s if old else DEFAULT_COMMAND_TIMEOUT_S)
    if (
        isinstance(timeout_s, bool)
        or not isinstance(timeout_s, int | float)
        or not 0 < timeout_s <= MAX_COMMAND_TIMEOUT_S
    ):
        raise where.error(
            prefix + "timeout_s",
            f"{timeout_s!r} is not a number of seconds in (0, {MAX_COMMAND_TIMEOUT_S:.0f}]",
        )
    raw_args = table.get("args", [])
    if not isinstance(raw_args, list):
        raise where.error(prefix + "args", "expected a list of arg tables")
    if len(raw_args) > COMMAND_ARGS_MAX:
        raise where.error(prefix + "args", f"{len(raw_args)} args, at most {COMMAND_ARGS_MAX}")
    args: list[CommandArg] = []
    for arg_index, raw_arg in enumerate(raw_args):
        arg = _arg(raw_arg, arg_index, name, where)
        if arg.name in {a.name for a in args}:
            raise where.error(f"{prefix}args.{arg.name}", "duplicate: the command lists it twice")
        args.append(arg)
    if old is not None:
        args = _merge_args(old, tuple(args), where) if "args" in table else list(old.args)
    have = old.protocols if old else ()
    protocols = (
        _names(table["protocols"], where, prefix + "protocols") if "protocols" in table else have
    )
    if not shipped and protocols != have:
        raise where.error(
            prefix + "protocols",
            "only the shipped catalog says which serial protocols carry a command"
            " (it needs gateway code)",
        )
    for protocol in protocols:
        if protocol not in type_protocols:
            raise where.error(
                prefix + "protocols",
                f"{protocol!r} is not one of the type's serial protocols"
                f" ({', '.join(type_protocols) or 'none'})",
            )
    return CommandSpec(
        name=name, description=description, args=tuple(args), timeout_s=float(timeout_s),
        protocols=tuple(protocols),
    )  # fmt: skip


def _merge_commands(
    raw: object, old: DeviceType | None, protocols: Sequence[str], where: _Where, shipped: bool
) -> tuple[CommandSpec, ...]:
    """A type's commands: the known ones in order (restated ones merged), then the new ones."""
    commands = {c.name: c for c in old.commands} if old else {}
    if not isinstance(raw, list):
        raise where.error("commands", "expected a list of command tables")
    seen: set[str] = set()
    for index, raw_command in enumerate(raw):
        name = raw_command.get("name") if isinstance(raw_command, dict) else None
        previous = commands.get(name) if isinstance(name, str) else None
        command = _command(raw_command, index, previous, protocols, where, shipped)
        if command.name in seen:
            raise where.error(f"commands.{command.name}", "duplicate: the file defines it twice")
        seen.add(command.name)
        commands[command.name] = command
    return tuple(commands.values())


def _merge_type(
    name: str, raw: object, catalog: Catalog, where: _Where, *, shipped: bool = False
) -> DeviceType:
    table = _table(raw, where, None)
    _refuse_unknown_keys(table, _TYPE_KEYS, where, "")
    old = catalog.types.get(name)
    if old is None:
        for key in ("description", "transports", "metrics"):
            if key not in table:
                raise where.error(key, "missing (a new device type needs it)")
    description = _text(table, "description", where) if "description" in table else ""
    transports = _extend_names(
        table.get("transports"), old.transports if old else (), catalog.transports, where,
        "transports",
    )  # fmt: skip
    protocols = _extend_names(
        table.get("serial_protocols"), old.serial_protocols if old else (),
        catalog.serial_protocols, where, "serial_protocols",
    )  # fmt: skip
    if ("serial" in transports) != bool(protocols):
        raise where.error(
            "serial_protocols",
            "a type has serial protocols if and only if it has the serial transport",
        )
    metrics = _merge_metrics(table.get("metrics", []), old, where)
    for protocol in protocols:
        missing = [m for m in catalog.serial_protocols[protocol].metrics if m not in metrics]
        if missing:
            raise where.error(
                "serial_protocols",
                f"{protocol} frames carry {', '.join(missing)}, which the type lacks",
            )
    unknown_metrics = table.get("unknown_metrics", old.unknown_metrics if old else "report")
    if unknown_metrics not in _UNKNOWN_METRICS_POLICIES:
        raise where.error("unknown_metrics", f"{unknown_metrics!r} is not one of: report, reject")
    offline_after_s = table.get(
        "offline_after_s", old.offline_after_s if old else DEFAULT_OFFLINE_AFTER_S
    )
    if (
        isinstance(offline_after_s, bool)
        or not isinstance(offline_after_s, int | float)
        or not 0 < offline_after_s <= MAX_OFFLINE_AFTER_S
    ):
        raise where.error(
            "offline_after_s",
            f"{offline_after_s!r} is not a number of seconds in (0, {MAX_OFFLINE_AFTER_S:.0f}]",
        )
    commands = _merge_commands(table.get("commands", []), old, protocols, where, shipped)
    return DeviceType(
        name=name,
        description=description or (old.description if old else ""),
        transports=tuple(transports),
        metrics=tuple(metrics.values()),
        serial_protocols=tuple(protocols),
        unknown_metrics=unknown_metrics,
        offline_after_s=float(offline_after_s),
        commands=commands,
    )


def _merge_shipped_only(document: Mapping[str, Any], catalog: Catalog, source: str) -> Catalog:
    """The transports and serial protocols tables, which only the shipped file declares."""
    transports = dict(catalog.transports)
    for name, raw in _table(document.get("transports", {}), _Where(source), "transports").items():
        where = _Where(source)
        table = _table(raw, where, f"transports.{name}")
        _refuse_unknown_keys(table, frozenset({"description"}), where, f"transports.{name}.")
        text = _text(table, "description", where, f"transports.{name}.")
        transports[name] = Transport(name=name, description=text)
    protocols = dict(catalog.serial_protocols)
    tables = _table(document.get("serial_protocols", {}), _Where(source), "serial_protocols")
    for name, raw in tables.items():
        where, prefix = _Where(source), f"serial_protocols.{name}."
        table = _table(raw, where, prefix.rstrip("."))
        _refuse_unknown_keys(table, frozenset({"description", "metrics"}), where, prefix)
        protocols[name] = SerialProtocol(
            name=name,
            description=_text(table, "description", where, prefix),
            metrics=_names(table.get("metrics"), where, prefix + "metrics"),
        )
    return msgspec.structs.replace(catalog, transports=transports, serial_protocols=protocols)


def _merge_file(catalog: Catalog, source: str, text: str, *, shipped: bool) -> Catalog:
    where = _Where(source)
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise where.error(None, f"not valid TOML: {exc}") from None
    for key in document:
        if key not in _FILE_KEYS:
            raise where.error(key, f"unknown key (known: {', '.join(sorted(_FILE_KEYS))})")
        if key in _SHIPPED_ONLY_KEYS and not shipped:
            raise where.error(
                key, f"only the shipped catalog declares {key} (they need gateway code)"
            )
    if shipped:
        catalog = _merge_shipped_only(document, catalog, source)
    types = dict(catalog.types)
    for name, raw in _table(document.get("types", {}), where, "types").items():
        if _TYPE_NAME_RE.fullmatch(name) is None:
            raise CatalogError(
                source, name, None, f"a type name must match {_TYPE_NAME_RE.pattern}"
            )
        types[name] = _merge_type(name, raw, catalog, _Where(source, name), shipped=shipped)
    catalog = msgspec.structs.replace(catalog, types=types, sources=(*catalog.sources, source))
    return _merge_models(catalog, document, source)


def _merge_models(catalog: Catalog, document: Mapping[str, Any], source: str) -> Catalog:
    """The file's Modbus and LoRaWAN models, checked against the types merged so far.

    A model of a name already known replaces it (a later file corrects an
    earlier one's register table).
    """
    modbus = document.get("modbus_models", {})
    lorawan = document.get("lorawan_models", {})
    if not modbus and not lorawan:
        return catalog
    where = _Where(source)
    models = dict(catalog.modbus_models)
    for name, raw in _table(modbus, where, "modbus_models").items():
        models[name] = parse_modbus_model(
            name, raw, source=source, metrics=_metrics_of(catalog, "modbus"),
            commands={
                t.name: {c.name: c.arg_names for c in t.commands}
                for t in catalog.types.values() if "modbus" in t.transports
            },
        )  # fmt: skip
    profiles = dict(catalog.lorawan_models)
    for name, raw in _table(lorawan, where, "lorawan_models").items():
        profiles[name] = parse_lorawan_model(
            name, raw, source=source, metrics=_metrics_of(catalog, "lorawan")
        )
    return msgspec.structs.replace(catalog, modbus_models=models, lorawan_models=profiles)


def _metrics_of(catalog: Catalog, transport: str) -> dict[str, tuple[str, ...]]:
    return {t.name: t.metric_names for t in catalog.types.values() if transport in t.transports}


_EMPTY: Final = Catalog(types={}, transports={}, serial_protocols={})


def _load_shipped() -> Catalog:
    text = resources.files("contracts").joinpath("data/catalog.toml").read_text(encoding="utf-8")
    return _merge_file(_EMPTY, SHIPPED_SOURCE, text, shipped=True)


SHIPPED_CATALOG: Final = _load_shipped()


def load_catalog(sources: Iterable[tuple[str, str]], *, base: Catalog = SHIPPED_CATALOG) -> Catalog:
    """Merge operators' catalog texts, ``(file name, TOML text)`` in order, onto ``base``.

    Pure. Raises CatalogError naming the file, the type and the key of the
    first problem.
    """
    catalog = base
    for source, text in sources:
        catalog = _merge_file(catalog, source, text, shipped=False)
    return catalog


def find_catalog_files(paths: Sequence[str | Path]) -> list[Path]:
    """The files ``paths`` names: each a TOML file, or a directory's ``*.toml`` in name order."""
    files: list[Path] = []
    for entry in paths:
        path = Path(entry).expanduser()
        if path.is_dir():
            files.extend(sorted(path.glob("*.toml")))
        elif path.exists():
            files.append(path)
        else:
            raise CatalogError(str(path), None, None, "no such file or directory")
    return files


def read_catalog(paths: Sequence[str | Path], *, base: Catalog = SHIPPED_CATALOG) -> Catalog:
    """Read the catalog files that ``paths`` names and merge them onto ``base``."""
    sources = []
    for file in find_catalog_files(paths):
        try:
            sources.append((str(file), file.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            raise CatalogError(str(file), None, None, f"cannot be read: {exc}") from None
    return load_catalog(sources, base=base)


def describe_changes(base: Catalog, catalog: Catalog) -> list[str]:
    """What ``catalog`` adds to or changes in ``base``, one line each (for people)."""
    lines = []
    for name, dtype in catalog.types.items():
        old = base.types.get(name)
        if old is None:
            lines.append(f"new type {name}: {count_noun(len(dtype.metrics), 'metric', 'metrics')}")
            lines.extend(_describe_commands(name, (), dtype.commands))
            continue
        lines.extend(
            f"{name}: new transport {transport}"
            for transport in dtype.transports
            if transport not in old.transports
        )
        for metric in dtype.metrics:
            if metric.name not in old.metric_names:
                lines.append(f"{name}: new metric {metric.name} ({metric.kind}, {metric.unit!r})")
            elif metric != old.metric(metric.name):
                lines.append(f"{name}: metric {metric.name} changed (range, description or labels)")
        if dtype.description != old.description:
            lines.append(f"{name}: description changed")
        if dtype.offline_after_s != old.offline_after_s:
            lines.append(
                f"{name}: offline after {dtype.offline_after_s:g} s (was {old.offline_after_s:g} s)"
            )
        lines.extend(_describe_commands(name, old.commands, dtype.commands))
    for kind, new_models, old_models in (
        ("Modbus", catalog.modbus_models, base.modbus_models),
        ("LoRaWAN", catalog.lorawan_models, base.lorawan_models),
    ):
        for name, model in new_models.items():
            if name not in old_models:
                lines.append(f"new {kind} model {name} ({model.device_type})")
            elif model != old_models[name]:
                lines.append(f"{kind} model {name} replaced")
    return lines


def _describe_commands(
    type_name: str, old: tuple[CommandSpec, ...], new: tuple[CommandSpec, ...]
) -> list[str]:
    known = {c.name: c for c in old}
    lines = []
    for command in new:
        previous = known.get(command.name)
        if previous is None:
            args = ", ".join(command.arg_names) or "no args"
            lines.append(f"{type_name}: new command {command.name} ({args})")
            continue
        added = [a for a in command.args if a.name not in previous.arg_names]
        lines.extend(
            f"{type_name}: command {command.name}: new arg {a.name}"
            f" ({a.kind}, default {a.default!r})"
            for a in added
        )
        if not added and command != previous:
            lines.append(
                f"{type_name}: command {command.name} changed (timeout, description or args)"
            )
    return lines


# --- catalog entries received from elsewhere --------------------------------------

_TYPE_DECODER: Final = msgspec.json.Decoder(DeviceType)
_TYPE_ENCODER: Final = msgspec.json.Encoder()


def encode_device_type(dtype: DeviceType) -> bytes:
    """A type's catalog entry as JSON (what ``cityhub db migrate`` records in device_types)."""
    return _TYPE_ENCODER.encode(dtype)


def decode_device_type(text: bytes | str, source: str) -> DeviceType:
    """A catalog entry that ``encode_device_type`` wrote; CatalogError naming ``source`` if not."""
    try:
        return _TYPE_DECODER.decode(text)
    except msgspec.DecodeError as exc:
        raise CatalogError(source, None, None, f"not a device type entry: {exc}") from None


def _entry_table(dtype: DeviceType) -> dict[str, Any]:
    """A type as the table an operator's file would hold, so the file checks apply to it."""
    metrics = []
    for m in dtype.metrics:
        table: dict[str, Any] = {
            "name": m.name, "unit": m.unit, "kind": m.kind.value, "min": m.min, "max": m.max,
            "description": m.description,
        }  # fmt: skip
        if m.labels:
            table["labels"] = list(m.labels)
        metrics.append(table)
    entry: dict[str, Any] = {
        "description": dtype.description,
        "transports": list(dtype.transports),
        "metrics": metrics,
        "unknown_metrics": dtype.unknown_metrics,
        "offline_after_s": dtype.offline_after_s,
    }
    if dtype.serial_protocols:
        entry["serial_protocols"] = list(dtype.serial_protocols)
    if dtype.commands:
        entry["commands"] = [_command_table(c) for c in dtype.commands]
    return entry


def _command_table(command: CommandSpec) -> dict[str, Any]:
    args = []
    for a in command.args:
        table: dict[str, Any] = {
            "name": a.name, "kind": a.kind.value, "description": a.description,
            "required": a.required,
        }  # fmt: skip
        table |= {
            key: value
            for key, value in (("min", a.min), ("max", a.max), ("default", a.default))
            if value is not None
        }
        if a.labels:
            table["labels"] = list(a.labels)
        if a.kind is ArgKind.STRING:
            table["max_length"] = a.max_length
        args.append(table)
    entry: dict[str, Any] = {
        "name": command.name, "description": command.description,
        "timeout_s": command.timeout_s, "args": args,
    }  # fmt: skip
    if command.protocols:
        entry["protocols"] = list(command.protocols)
    return entry


def merge_types(
    base: Catalog, types: Iterable[DeviceType], *, source: str
) -> tuple[Catalog, dict[str, CatalogError]]:
    """Merge received type entries (a gateway's config, the database) onto ``base``.

    Pure. Each entry is checked as an operator's file would be and merged the
    same way: a type ``base`` lacks is added; a known type gains the entry's
    new metrics (its own metrics stay, so a shipped type keeps what it ships).
    An entry that contradicts ``base`` (a metric's kind or unit, an enum's
    labels, a transport or serial protocol ``base`` does not declare) or is
    malformed is left out: the result maps its name to the CatalogError. The
    catalog returned is ``base`` itself when nothing changed.
    """
    merged = dict(base.types)
    refused: dict[str, CatalogError] = {}
    for dtype in types:
        if _TYPE_NAME_RE.fullmatch(dtype.name) is None:
            refused[dtype.name] = CatalogError(
                source, dtype.name, None, f"a type name must match {_TYPE_NAME_RE.pattern}"
            )
            continue
        if merged.get(dtype.name) == dtype:
            continue
        try:
            merged[dtype.name] = _merge_type(
                dtype.name, _entry_table(dtype), base, _Where(source, dtype.name)
            )
        except CatalogError as exc:
            refused[dtype.name] = exc
    if merged == base.types:
        return base, refused
    return msgspec.structs.replace(base, types=merged, sources=(*base.sources, source)), refused


# --- the process-wide catalog ---------------------------------------------------

DEVICE_TYPES: dict[str, DeviceType] = dict(SHIPPED_CATALOG.types)
_installed: Catalog = SHIPPED_CATALOG


def use_catalog(catalog: Catalog) -> None:
    """Install ``catalog`` as the process-wide one: ``DEVICE_TYPES`` is updated in place."""
    global _installed  # noqa: PLW0603 - the one process-wide catalog, set at start-up
    # Types stay in place while others are added or removed: a thread reading
    # DEVICE_TYPES meanwhile never misses one that both catalogs have.
    for name in [name for name in DEVICE_TYPES if name not in catalog.types]:
        del DEVICE_TYPES[name]
    DEVICE_TYPES.update(catalog.types)
    if list(DEVICE_TYPES) != list(catalog.types):  # the order is the migrations' order
        DEVICE_TYPES.clear()
        DEVICE_TYPES.update(catalog.types)
    _installed = catalog
    for follower in _followers:
        follower(catalog)


_followers: list[Callable[[Catalog], None]] = []


def follow_catalog(follower: Callable[[Catalog], None]) -> None:
    """Call ``follower`` with the installed catalog now and after each ``use_catalog``.

    For tables built from the catalog that a hot path reads (a decoder's
    metric bounds): rebuilt once per installed catalog, not checked per message.
    """
    _followers.append(follower)
    follower(_installed)


def current_catalog() -> Catalog:
    """The catalog ``use_catalog`` installed last (the shipped one until then)."""
    return _installed


def merge_models(
    base: Catalog,
    modbus: Iterable[ModbusModel] = (),
    lorawan: Iterable[LorawanModel] = (),
    *,
    source: str,
) -> Catalog:
    """Install received models (a gateway's config) onto ``base``: the received ones win.

    Pure. The registry's models are the ones its devices were provisioned
    with; a gateway takes them as they come. The catalog returned is
    ``base`` itself when nothing changed.
    """
    models = dict(base.modbus_models) | {m.name: m for m in modbus}
    profiles = dict(base.lorawan_models) | {m.name: m for m in lorawan}
    if models == base.modbus_models and profiles == base.lorawan_models:
        return base
    return msgspec.structs.replace(
        base, modbus_models=models, lorawan_models=profiles, sources=(*base.sources, source)
    )


def modbus_model(name: str) -> ModbusModel:
    """A Modbus model of the installed catalog; UnknownDeviceTypeError naming the known ones."""
    try:
        return _installed.modbus_models[name]
    except KeyError:
        known = ", ".join(sorted(_installed.modbus_models)) or "none"
        raise UnknownDeviceTypeError(f"unknown Modbus model {name!r} (known: {known})") from None


def lorawan_model(name: str) -> LorawanModel:
    """A LoRaWAN model of the installed catalog; UnknownDeviceTypeError naming the known ones."""
    try:
        return _installed.lorawan_models[name]
    except KeyError:
        known = ", ".join(sorted(_installed.lorawan_models)) or "none"
        raise UnknownDeviceTypeError(f"unknown LoRaWAN model {name!r} (known: {known})") from None


def device_type(name: str) -> DeviceType:
    """Look a device type up by name; raise UnknownDeviceTypeError if the catalog lacks it."""
    try:
        return DEVICE_TYPES[name]
    except KeyError:
        known = ", ".join(sorted(DEVICE_TYPES))
        raise UnknownDeviceTypeError(f"unknown device type {name!r} (known: {known})") from None


# The shipped definitions, for the modules written for them (the simulator's
# models, the boards).
AIR_QUALITY: Final = SHIPPED_CATALOG.types["air_quality"]
KIOSK: Final = SHIPPED_CATALOG.types["kiosk"]
CAMERA_COUNTER: Final = SHIPPED_CATALOG.types["camera_counter"]
CONFERENCE_ENDPOINT: Final = SHIPPED_CATALOG.types["conference_endpoint"]
PRINTER_STATUS_LABELS: Final = KIOSK.metric("printer_status").labels
