"""Grafana's PostgreSQL interpolation, reproduced (grafana.macros): table-driven and properties."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from grafana.macros import (
    TimeRange,
    Variable,
    expand_macros,
    format_interval,
    grafana_interval_s,
    interpolate_variables,
    parse_interval,
    render_sql,
)

T0 = datetime(2025, 3, 1, 2, 0, tzinfo=UTC)
RANGE = TimeRange(T0, T0 + timedelta(hours=6))


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("$__timeFilter(ts)", "ts BETWEEN '2025-03-01T02:00:00Z' AND '2025-03-01T08:00:00Z'"),
        ("$__timeFrom()", "'2025-03-01T02:00:00Z'"),
        ("$__timeTo()", "'2025-03-01T08:00:00Z'"),
        ("$__time(r.ts)", 'r.ts AS "time"'),
        ("$__timeEpoch(ts)", 'extract(epoch from ts) as "time"'),
        ("$__timeGroup(ts, '5m')", "time_bucket('300.000s',ts)"),
        ("$__timeGroupAlias(ts, 1h)", "time_bucket('3600.000s',ts) AS \"time\""),
        ("$__timeGroupAlias(ts, '5m', 0)", "time_bucket('300.000s',ts) AS \"time\""),
        ("$__unixEpochFilter(t)", "t >= 1740794400 AND t <= 1740816000"),
        ("$__unixEpochGroupAlias(t, 1m)", 'floor((t)/60)*60 AS "time"'),
        ("x = 1", "x = 1"),
    ],
)
def test_macros(sql: str, expected: str) -> None:
    assert expand_macros(sql, RANGE) == expected


def test_time_group_without_timescaledb_uses_epoch_arithmetic() -> None:
    assert (
        expand_macros("$__timeGroup(ts, 30s)", RANGE, timescaledb=False)
        == "floor(extract(epoch from ts)/30)*30"
    )


def test_fractions_of_seconds_are_kept_as_go_prints_them() -> None:
    start = T0 + timedelta(microseconds=123400)
    assert expand_macros("$__timeFrom()", TimeRange(start, start)) == "'2025-03-01T02:00:00.1234Z'"


@pytest.mark.parametrize("sql", ["$__nope(x)", "$__timeFilter()", "$__timeGroup(ts)"])
def test_bad_macros_raise(sql: str) -> None:
    with pytest.raises(ValueError):
        expand_macros(sql, RANGE)


# The boards' location variable: unit codes, and the value of sites with no unit.
WARDS = Variable(name="ward", values=("00070", "none"), multi=True, include_all=True)
ONE = Variable(name="site", values=("hk-hall-quan",))
QUOTED = Variable(name="q", values=("O'Brien", "Đống Đa"), multi=True)


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("IN ($ward)", "IN ('00070','none')"),
        ("IN (${ward})", "IN ('00070','none')"),
        ("IN (${ward:sqlstring})", "IN ('00070','none')"),
        ("${ward:csv}", "00070,none"),
        ("${ward:pipe}", "00070|none"),
        ("${ward:singlequote}", "'00070','none'"),
        ("[[ward]]", "'00070','none'"),
        # A single-value variable is escaped but not quoted: the SQL quotes it.
        ("site_id = '$site'", "site_id = 'hk-hall-quan'"),
        ("${site:sqlstring}", "'hk-hall-quan'"),
        ("IN ($q)", "IN ('O''Brien','Đống Đa')"),
        ("${q:csv}", "O'Brien,Đống Đa"),
        ("$unknown stays", "$unknown stays"),
        ("$__timeFilter(ts)", "$__timeFilter(ts)"),
    ],
)
def test_template_variables(sql: str, expected: str) -> None:
    assert interpolate_variables(sql, [WARDS, ONE, QUOTED]) == expected


def test_builtins_then_macros_in_grafanas_order() -> None:
    sql = "SELECT $__timeGroupAlias(ts, $__interval), $__interval_ms FROM t WHERE $__timeFilter(ts)"
    assert render_sql(sql, time_range=RANGE, interval_s=300) == (
        "SELECT time_bucket('300.000s',ts) AS \"time\", 300000 FROM t "
        "WHERE ts BETWEEN '2025-03-01T02:00:00Z' AND '2025-03-01T08:00:00Z'"
    )


@pytest.mark.parametrize(
    ("hours", "points", "minimum", "expected"),
    [
        (6, 1000, 60, 60),  # 21.6 s raw, held at the datasource's 1 m minimum
        (6, 1000, 1, 30),
        (24 * 7, 1000, 60, 900),  # 604.8 s -> 15 m
        (24 * 30, 500, 60, 7200),
    ],
)
def test_interval_choice(hours: int, points: int, minimum: float, expected: float) -> None:
    tr = TimeRange(T0, T0 + timedelta(hours=hours))
    assert grafana_interval_s(tr, max_data_points=points, min_interval_s=minimum) == expected


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.5, "500ms"),
        (15, "15s"),
        (60, "1m"),
        (300, "5m"),
        (3600, "1h"),
        (86400, "1d"),
        (90, "90s"),
    ],
)
def test_interval_text_round_trips(seconds: float, text: str) -> None:
    assert format_interval(seconds) == text
    assert parse_interval(text) == seconds


@given(st.sampled_from([1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 86400]))
def test_every_nice_interval_round_trips(seconds: int) -> None:
    assert parse_interval(format_interval(seconds)) == seconds


@given(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=5))
def test_sqlstring_values_are_always_single_literals(values: list[str]) -> None:
    """Whatever the values hold, each becomes one quoted literal: no way out of the quotes."""
    text = interpolate_variables("${v:sqlstring}", [Variable(name="v", values=tuple(values))])
    literals = []
    i = 0
    while i < len(text):
        assert text[i] == "'"
        j = i + 1
        chunk = []
        while True:
            if text[j] == "'" and j + 1 < len(text) and text[j + 1] == "'":
                chunk.append("'")
                j += 2
            elif text[j] == "'":
                break
            else:
                chunk.append(text[j])
                j += 1
        literals.append("".join(chunk))
        i = j + 1
        if i < len(text):
            assert text[i] == ","
            i += 1
    assert literals == values
