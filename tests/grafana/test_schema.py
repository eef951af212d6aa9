"""Every table and column a board's SQL names exists in the schema the migrations create.

The queries are read from the generated board files (panel targets and
template variables), so this checks what Grafana runs. Names are found the
way the queries are written (``grafana.boards``): tables after FROM / JOIN
with an optional alias, columns qualified by an alias (``s.district``) or,
in single-table queries, bare (``sum(readings)``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest

from contracts.catalog import DEVICE_TYPES
from contracts.schema import readings_table, rollup_table
from grafana.render import board_files
from grafana.tables import column, schema_columns, table

# Words of the boards' SQL that are neither tables nor columns.
KEYWORDS = frozenset({
    "select", "distinct", "on", "as", "from", "join", "left", "full", "cross", "inner", "outer",
    "where", "and", "or", "not", "in", "is", "null", "group", "by", "order", "asc", "desc",
    "nulls", "first", "last", "limit", "case", "when", "then", "else", "end", "filter",
    "between", "interval", "epoch", "array", "text", "real", "int", "integer", "bigint", "date",
    "timestamptz", "timestamp", "time", "zone", "at", "values", "all", "any", "true", "false",
})  # fmt: skip

# A table after FROM / JOIN (or JOIN's parenthesis), not a function or a qualified column.
_TABLE = re.compile(
    r"\b(?:FROM|JOIN)\s+\(?\s*(\w+)(?![\w.]|\s*\()(?:\s+(?:AS\s+)?(\w+))?", re.IGNORECASE
)
# A subquery's or function's alias: ") a ON", "AS sev (severity, rank)".
_DERIVED = re.compile(r"\)\s+(?:AS\s+)?(\w+)(?=\s*(?:\(|ON\b))", re.IGNORECASE)
_OUTPUT = re.compile(r"\bAS\s+(\w+)", re.IGNORECASE)
_QUALIFIED = re.compile(r"(?<![\w.])([a-z_]\w*)\.(\w+)")
_BARE = re.compile(r"(?<![\w.:$])([a-z_][a-z0-9_]*)\b(?![.(\w])")


def _strip(sql: str) -> str:
    """The SQL without string literals, quoted names, Grafana macros and variables, casts."""
    sql = re.sub(r"'[^']*'", "''", sql)
    sql = re.sub(r'"[^"]*"', '""', sql)
    sql = re.sub(r"\$\{[^}]*\}", "''", sql)
    sql = re.sub(r"\$__\w+", "", sql)
    return re.sub(r"::\w+(\[\])?", "", sql)


def problems(sql: str) -> list[str]:
    """What in ``sql`` names no table or column of the schema."""
    columns = schema_columns()
    sql = _strip(sql)
    found: list[str] = []
    aliases: dict[str, set[str]] = {}
    tables: set[str] = set()
    for name, alias in _TABLE.findall(sql):
        if name.lower() in KEYWORDS:  # a subquery: "JOIN (SELECT ..."
            continue
        if name not in columns:
            found.append(f"table {name}")
            continue
        tables.add(name)
        aliases.setdefault(name, set()).add(name)
        if alias and alias.lower() not in KEYWORDS:
            aliases.setdefault(alias, set()).add(name)
    derived = set(_DERIVED.findall(sql))
    for qualifier, name in _QUALIFIED.findall(sql):
        if qualifier in aliases:
            if not any(name in columns[t] for t in aliases[qualifier]):
                found.append(f"column {qualifier}.{name}")
        elif qualifier not in derived:
            found.append(f"alias {qualifier}")
    if len(tables) == 1 and not derived:
        (only,) = tables
        named = set(aliases) | set(_OUTPUT.findall(sql))
        found += [
            f"column {word}"
            for word in _BARE.findall(_QUALIFIED.sub("", sql))
            if word not in KEYWORDS and word not in named and word not in columns[only]
        ]
    return found


def _queries() -> Iterator[tuple[str, str]]:
    for name, text in board_files().items():
        document = json.loads(text)
        for variable in document.get("templating", {}).get("list", []):
            yield f"{name} variable {variable['name']}", variable["query"]
        for panel in document.get("panels", []):
            for target in panel.get("targets", []):
                yield f"{name} #{panel['id']} {target['refId']}", target["rawSql"]


QUERIES = dict(_queries())


def test_the_boards_have_queries() -> None:
    assert len(QUERIES) > 40


@pytest.mark.parametrize("where", sorted(QUERIES))
def test_board_sql_names_only_schema_tables_and_columns(where: str) -> None:
    assert problems(QUERIES[where]) == []


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT s.distrikt FROM sites s", ["column s.distrikt"]),
        ("SELECT s.name FROM sitez s", ["table sitez", "alias s"]),
        ("SELECT avg(r.pm2_5) AS v FROM readings_air_quality r", ["column r.pm2_5"]),
        ("SELECT sum(reading) AS n FROM ingest_stats WHERE $__timeFilter(ts)", ["column reading"]),
        ("SELECT x.name FROM sites s", ["alias x"]),
        ("SELECT DISTINCT district FROM sites", []),
        ("SELECT s.name FROM (VALUES (1)) AS v (k) JOIN sites s ON true WHERE v.k = 1", []),
    ],
)
def test_the_check_finds_unknown_names(sql: str, expected: list[str]) -> None:
    assert problems(sql) == expected


def test_every_catalog_device_type_has_its_tables_and_metric_columns() -> None:
    for dtype in DEVICE_TYPES.values():
        for metric in dtype.metrics:
            assert column(readings_table(dtype.name), metric.name) == metric.name
            assert column(rollup_table(dtype.name), f"{metric.name}_max") == f"{metric.name}_max"


def test_unknown_tables_and_columns_raise() -> None:
    assert table("sites") == "sites"
    with pytest.raises(KeyError, match="no table 'site'"):
        table("site")
    with pytest.raises(KeyError, match="no column 'distrikt'"):
        column("sites", "distrikt")
