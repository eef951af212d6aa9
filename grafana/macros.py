"""Grafana's PostgreSQL query interpolation, reproduced: template variables, then macros.

A panel's SQL reaches PostgreSQL in two steps, and this module does both the
same way, so the boards' SQL can be run outside Grafana (tests, ``cityhub
grafana`` docs):

1. the dashboard (browser side) replaces template variables
   (``interpolate_variables``): ``$var``, ``${var}``, ``${var:format}``
   and the built-ins ``$__interval``, ``$__interval_ms``, ``$__range_s``,
   ``$__from``, ``$__to``. A variable that is multi-value or has "All"
   becomes a list of quoted SQL literals (``'a','b'``), so ``IN ($var)``
   works; a single-value one is inserted with quotes doubled but not
   quoted. Formats ``sqlstring``, ``singlequote``, ``doublequote``,
   ``csv``, ``pipe`` and ``raw`` override that. Unknown names are left as
   they are (Grafana does the same).
2. the datasource (server side) expands macros (``expand_macros``):
   ``$__time(c)`` -> ``c AS "time"``; ``$__timeEpoch(c)``;
   ``$__timeFilter(c)`` -> ``c BETWEEN '<from>' AND '<to>'`` (RFC 3339,
   UTC); ``$__timeFrom()`` / ``$__timeTo()`` -> the quoted bounds;
   ``$__timeGroup(c, '5m'[, fill])`` -> ``time_bucket('300.000s',c)`` with
   the datasource's TimescaleDB option on, else ``floor(extract(epoch from
   c)/300)*300``; ``$__timeGroupAlias`` adds ``AS "time"``;
   ``$__unixEpochFilter(c)``, ``$__unixEpochFrom()``, ``$__unixEpochTo()``,
   ``$__unixEpochGroup(c, '5m')`` and its alias for epoch-second columns.
   The fill argument only tells Grafana how to fill gaps in the result; it
   changes nothing in the SQL. Like Grafana, arguments are split on commas
   and may not contain parentheses.

``grafana_interval_s`` chooses ``$__interval`` from the time range and the
panel's maximum data points, rounded up to a step from a fixed list (Grafana
rounds to a similar table of "nice" steps), and never below the datasource's
minimum interval.

Sources: Grafana's PostgreSQL query editor documentation (macros) and its
variable syntax documentation (formats); the TimescaleDB form of
``$__timeGroup`` is what the datasource's macro engine emits with
``timescaledb: true``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Final

import msgspec

# Nice steps for $__interval, in seconds.
_INTERVAL_STEPS_S: Final = (
    0.01, 0.02, 0.05, 0.1, 0.2, 0.5,
    1, 2, 5, 10, 15, 20, 30,
    60, 120, 300, 600, 900, 1200, 1800,
    3600, 7200, 10800, 21600, 43200,
    86400, 7 * 86400, 30 * 86400, 365 * 86400,
)  # fmt: skip
_UNITS_S: Final = (("y", 365 * 86400), ("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60))
_INTERVAL_RE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w|y)\s*$")
_UNIT_SECONDS: Final = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_UNIT_SECONDS_Y: Final = {**_UNIT_SECONDS, "y": 365 * 86400}

# $name | ${name} | ${name:format} | [[name]] | [[name:format]]
_VARIABLE_RE: Final = re.compile(
    r"\$(?P<plain>\w+)|\$\{(?P<braced>\w+)(?::(?P<format>\w+))?\}"
    r"|\[\[(?P<old>\w+)(?::(?P<old_format>\w+))?\]\]"
)
# $__name(args): the datasource's macro syntax.
_MACRO_RE: Final = re.compile(r"\$(__\w+)\(([^)]*)\)")


class TimeRange(msgspec.Struct, frozen=True):
    """The dashboard's time range; both ends timezone-aware."""

    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise ValueError("TimeRange needs timezone-aware datetimes")
        if self.end < self.start:
            raise ValueError("TimeRange ends before it starts")

    @property
    def seconds(self) -> float:
        return (self.end - self.start).total_seconds()


class Variable(msgspec.Struct, frozen=True, kw_only=True):
    """A template variable's current value(s), as the dashboard holds them.

    ``values`` are the selected values; with "All" selected (and no custom
    all value) Grafana passes every option's value, and so does the caller.
    """

    name: str
    values: tuple[str, ...]
    multi: bool = False
    include_all: bool = False


def parse_interval(text: str) -> float:
    """Seconds in a Grafana interval like ``500ms``, ``30s``, ``5m``, ``1h``, ``1d``."""
    match = _INTERVAL_RE.match(text.strip("'\""))
    if match is None:
        raise ValueError(f"{text!r} is not an interval like 30s, 5m or 1h")
    return float(match.group(1)) * _UNIT_SECONDS_Y[match.group(2)]


def format_interval(seconds: float) -> str:
    """The short form Grafana writes for $__interval: ``500ms``, ``15s``, ``5m``, ``1h``."""
    if seconds <= 0 or not math.isfinite(seconds):
        raise ValueError(f"interval {seconds!r} must be a positive number of seconds")
    for unit, size in _UNITS_S:
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    if seconds >= 1 and seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


def grafana_interval_s(
    time_range: TimeRange, *, max_data_points: int = 1000, min_interval_s: float = 60.0
) -> float:
    """$__interval for a panel: range / data points, rounded up to a nice step, >= the minimum.

    The minimum is the datasource's "min time interval" (cityhub's provisioned
    datasource sets 1m: readings arrive every few seconds, but boards look at
    hours and days).
    """
    if max_data_points < 1:
        raise ValueError("max_data_points must be at least 1")
    raw = max(time_range.seconds / max_data_points, min_interval_s)
    for step in _INTERVAL_STEPS_S:
        if step >= raw:
            return float(step)
    return float(_INTERVAL_STEPS_S[-1])


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


_FORMATS: Final[dict[str, Callable[[str], str]]] = {
    "sqlstring": _quote_literal,
    "singlequote": lambda v: "'" + v.replace("'", "\\'") + "'",
    "doublequote": lambda v: '"' + v.replace('"', '\\"') + '"',
    "csv": lambda v: v,
    "raw": lambda v: v,
    "pipe": lambda v: v,
}


def _format(variable: Variable, fmt: str | None) -> str:
    values = variable.values
    if fmt is None:
        # The PostgreSQL datasource's own default.
        if variable.multi or variable.include_all:
            return ",".join(_quote_literal(v) for v in values)
        return ",".join(v.replace("'", "''") for v in values)
    if fmt not in _FORMATS:
        raise ValueError(f"variable format {fmt!r} is not supported here")
    return ("|" if fmt == "pipe" else ",").join(_FORMATS[fmt](v) for v in values)


def builtin_variables(time_range: TimeRange, interval_s: float) -> dict[str, str]:
    """The built-in variables a panel query sees."""
    start_ms = round(time_range.start.timestamp() * 1000)
    end_ms = round(time_range.end.timestamp() * 1000)
    return {
        "__interval": format_interval(interval_s),
        "__interval_ms": str(round(interval_s * 1000)),
        "__range_s": str(round(time_range.seconds)),
        "__range_ms": str(end_ms - start_ms),
        "__from": str(start_ms),
        "__to": str(end_ms),
    }


def interpolate_variables(
    sql: str, variables: Sequence[Variable], builtins: Mapping[str, str] | None = None
) -> str:
    """Step 1: template variables and built-ins replaced; unknown names left alone."""
    by_name = {v.name: v for v in variables}
    fixed = dict(builtins or {})

    def replace(match: re.Match[str]) -> str:
        name = match.group("plain") or match.group("braced") or match.group("old")
        fmt = match.group("format") or match.group("old_format")
        if name in fixed:
            return fixed[name]
        variable = by_name.get(name)
        if variable is None:
            return match.group(0)
        return _format(variable, fmt)

    return _VARIABLE_RE.sub(replace, sql)


def _rfc3339(moment: datetime) -> str:
    """UTC, RFC 3339 with the fraction only as long as needed (Go's RFC3339Nano)."""
    text = moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += f".{moment.microsecond:06d}".rstrip("0")
    return text + "Z"


def _seconds_text(seconds: float) -> str:
    """Seconds as Go's %v prints a float64: 300, 0.5."""
    return str(int(seconds)) if seconds == int(seconds) else repr(seconds)


def _group(args: list[str], *, epoch_column: bool, timescaledb: bool) -> str:
    if len(args) < 2 or not args[1]:
        raise ValueError("a group macro needs a column and an interval")
    column, seconds = args[0], parse_interval(args[1])
    n = _seconds_text(seconds)
    if epoch_column:
        return f"floor(({column})/{n})*{n}"
    if timescaledb:
        return f"time_bucket('{seconds:.3f}s',{column})"
    return f"floor(extract(epoch from {column})/{n})*{n}"


def _macro(name: str, args: list[str], time_range: TimeRange, *, timescaledb: bool) -> str:
    start, end = time_range.start, time_range.end
    c = args[0] if args else ""
    unix_from, unix_to = int(start.timestamp()), int(end.timestamp())
    without_column: dict[str, str] = {
        "__timeFrom": f"'{_rfc3339(start)}'",
        "__timeTo": f"'{_rfc3339(end)}'",
        "__unixEpochFrom": str(unix_from),
        "__unixEpochTo": str(unix_to),
    }
    if name in without_column:
        return without_column[name]
    if not c:
        raise ValueError(f"macro ${name} needs a column argument")
    with_column: dict[str, Callable[[], str]] = {
        "__time": lambda: f'{c} AS "time"',
        "__timeEpoch": lambda: f'extract(epoch from {c}) as "time"',
        "__timeFilter": lambda: f"{c} BETWEEN '{_rfc3339(start)}' AND '{_rfc3339(end)}'",
        "__unixEpochFilter": lambda: f"{c} >= {unix_from} AND {c} <= {unix_to}",
        "__timeGroup": lambda: _group(args, epoch_column=False, timescaledb=timescaledb),
        "__unixEpochGroup": lambda: _group(args, epoch_column=True, timescaledb=timescaledb),
    }
    base = name.removesuffix("Alias")
    if base not in with_column or (base != name and "Group" not in base):
        raise ValueError(f"unknown macro ${name}")
    return with_column[base]() + (' AS "time"' if base != name else "")


def expand_macros(sql: str, time_range: TimeRange, *, timescaledb: bool = True) -> str:
    """Step 2: the datasource's macros expanded; raises ValueError for an unknown one."""

    def replace(match: re.Match[str]) -> str:
        args = [a.strip() for a in match.group(2).split(",")]
        return _macro(match.group(1), args, time_range, timescaledb=timescaledb)

    return _MACRO_RE.sub(replace, sql)


def render_sql(
    sql: str,
    *,
    time_range: TimeRange,
    variables: Sequence[Variable] = (),
    interval_s: float | None = None,
    timescaledb: bool = True,
) -> str:
    """Both steps, in Grafana's order: the SQL the database receives for one panel query."""
    if interval_s is None:
        interval_s = grafana_interval_s(time_range)
    builtins = builtin_variables(time_range, interval_s)
    return expand_macros(
        interpolate_variables(sql, variables, builtins), time_range, timescaledb=timescaledb
    )
