"""The tables and columns of cityhub's schema, read from its migrations, for the boards' SQL.

``schema_columns()`` maps every table the migrations create (as the Apache
edition creates them: its rollups are tables, with the same columns as the
community edition's continuous aggregates) to its columns, including the
columns later migrations add. ``table(name)`` and ``column(table, name)``
return their argument after checking it against that map, and raise
``KeyError`` otherwise: the boards name their tables and columns through
them (and metric columns through the device catalog), so a table or column
renamed in ``contracts.schema`` fails the boards' import, not a panel.

This reads the SQL text ``contracts.schema`` generates; it does not check
queries (``tests/grafana/test_schema.py`` checks every board query's
qualified and unqualified column names against this map).
"""

from __future__ import annotations

import functools
import re
from typing import Final

from contracts.schema import Edition, migrations
from contracts.settings import StorageSettings

_CREATE: Final = re.compile(r"CREATE TABLE IF NOT EXISTS \w+\.(\w+) \(")
_ADD: Final = re.compile(r"ALTER TABLE \w+\.(\w+)\s+ADD COLUMN IF NOT EXISTS (\w+)")
# Table constraints, which share the column list's syntax but name no column.
_CONSTRAINTS: Final = frozenset({"PRIMARY", "UNIQUE", "CHECK", "CONSTRAINT", "FOREIGN", "EXCLUDE"})


def _column_list(sql: str, start: int) -> list[str]:
    """The comma-separated items of the parenthesised list opening at ``sql[start - 1]``."""
    items, depth, begin = [], 0, start
    for index in range(start, len(sql)):
        char = sql[index]
        if char == "(":
            depth += 1
        elif char == ")" and depth > 0:
            depth -= 1
        elif char == ")":
            items.append(sql[begin:index])
            return items
        elif char == "," and depth == 0:
            items.append(sql[begin:index])
            begin = index + 1
    raise ValueError(f"unbalanced column list: {sql[:80]!r}")


def _created_columns(sql: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for match in _CREATE.finditer(sql):
        names = (item.split()[0] for item in _column_list(sql, match.end()) if item.strip())
        found.setdefault(match.group(1), set()).update(
            name for name in names if name not in _CONSTRAINTS
        )
    return found


@functools.cache
def schema_columns() -> dict[str, frozenset[str]]:
    """Table name -> its column names, over every migration."""
    columns: dict[str, set[str]] = {}
    for migration in migrations("cityhub", Edition.APACHE, StorageSettings()):
        for statement in migration.statements:
            for name, created in _created_columns(statement).items():
                columns.setdefault(name, set()).update(created)
            for name, added in _ADD.findall(statement):
                columns[name].add(added)
    return {name: frozenset(names) for name, names in columns.items()}


def table(name: str) -> str:
    """``name``, if the schema has a table of that name."""
    if name not in schema_columns():
        raise KeyError(f"the schema has no table {name!r}")
    return name


def column(table_name: str, name: str) -> str:
    """``name``, if the schema's table ``table_name`` has a column of that name."""
    if name not in schema_columns()[table(table_name)]:
        raise KeyError(f"the schema's table {table_name!r} has no column {name!r}")
    return name
