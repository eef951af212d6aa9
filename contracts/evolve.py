"""Schema evolution: the steps that bring a migrated database to the catalog and settings.

The numbered migrations (``contracts.schema.migrations``) run once each; a
device type or metric added to the catalog later, or a storage setting
changed later, is not in the ones already applied. ``plan(current, catalog,
storage)`` compares a description of the database as it is (``SchemaState``,
read by ``cityhub.database.inspect_schema``) with what the catalog and the
settings ask for, and returns the steps that close the gap:

- a new device type: its wide hypertable and its hourly rollup with its
  policies, as the edition allows (``contracts.schema.rollup_statements``);
  in a schema that stores readings by device key (migration 22), the data
  hypertable and the view (``keyed_readings_statements``), and a new
  metric goes to the data table and is appended to the view. Policies are
  set on the hypertable that stores a type (``raw_hypertable``);
- a new metric: its column in the raw table (``ADD COLUMN IF NOT EXISTS``),
  and in the project's own rollup table on the Apache edition. A continuous
  aggregate (community edition) cannot be altered: the metric is stored
  raw only and ``notes`` says so; recreating the aggregate would drop the
  hours already rolled up past raw retention, so it is left to an operator;
- a removed metric or type: nothing; its columns and tables stay (a catalog
  edit never drops data);
- policies from ``StorageSettings``: the chunk interval of new chunks of
  each readings hypertable (``set_chunk_time_interval``, both editions);
  retention of raw readings, rollups and the auxiliary hypertables (server
  policies on the community edition, the ``apply_retention`` function on
  the Apache edition); compression after N days (community edition).

Each step is idempotent (IF NOT EXISTS, CREATE OR REPLACE, remove then add a
policy), so a plan interrupted half-way is planned again from what is left;
a database already at the catalog and settings plans nothing. ``notes`` are
what the settings or catalog ask for that this server cannot do: they are
shown on every migrate and by ``cityhub db status``, never silently dropped.
``policies`` lists the policies in force beside the settings for ``db
status``. Reading the database and running the steps is
``cityhub.database``'s business.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from contracts.catalog import DeviceType
from contracts.schema import (
    DEVICE_KEYS,
    SQL_TYPES,
    Edition,
    add_metric_statements,
    keyed_readings_statements,
    readings_data_table,
    readings_statements,
    readings_table,
    refresh_rollups_body,
    refresh_rollups_function,
    retention_days,
    retention_function,
    rollup_statements,
    rollup_table,
)
from contracts.settings import StorageSettings
from contracts.wording import count_noun

ROLLUP_AGGREGATES = ("avg", "min", "max")


class SchemaState(msgspec.Struct, frozen=True, kw_only=True):
    """What the reconcile step needs to know of a migrated schema.

    ``columns``: every table and view of the schema with its column names
    (a continuous aggregate is a view). ``chunk_hours``: the interval of new
    chunks of each hypertable, in hours. ``retention_days``: the days kept of
    each table under retention (server policies, or ``apply_retention``'s
    rows). ``compress_after_days``: the compression policy of each table
    (community edition; empty on the Apache edition). ``refresh_rollups``: the
    stored body of that function ('' where there is none).
    """

    edition: Edition
    columns: dict[str, frozenset[str]]
    chunk_hours: dict[str, float] = msgspec.field(default_factory=dict)
    retention_days: dict[str, int] = msgspec.field(default_factory=dict)
    compress_after_days: dict[str, int] = msgspec.field(default_factory=dict)
    refresh_rollups: str = ""


class Step(msgspec.Struct, frozen=True):
    """One idempotent change: what it does, in words, and its statements (one transaction)."""

    summary: str
    statements: tuple[str, ...]


class Policy(msgspec.Struct, frozen=True):
    """A policy on one table: what is in force (None: none) and what the settings ask."""

    table: str
    policy: str
    in_force: str | None
    setting: str


def _rollup_columns(metric: str) -> tuple[str, ...]:
    return tuple(f"{metric}_{a}" for a in ROLLUP_AGGREGATES)


def keyed_schema(current: SchemaState) -> bool:
    """Whether readings are stored by device key here (migration 22 made ``device_keys``)."""
    return DEVICE_KEYS in current.columns


def raw_hypertable(current: SchemaState, device_type: str) -> str:
    """The hypertable that stores ``device_type``'s readings in the schema ``current``.

    ``readings_{type}_data`` for a type stored by device key (and for a new
    type of a keyed schema), else ``readings_{type}`` (a type converted by no
    migration: removed from the catalog before migration 22, or a schema
    described before it). Policies are set on it; ``db status`` shows them
    under ``readings_{type}``, the name readers know.
    """
    data = readings_data_table(device_type)
    if data in current.columns:
        return data
    if readings_table(device_type) in current.columns or not keyed_schema(current):
        return readings_table(device_type)
    return data


def _keyed_types(current: SchemaState, catalog: Mapping[str, DeviceType]) -> set[str]:
    return {n for n in catalog if raw_hypertable(current, n) == readings_data_table(n)}


def _type_steps(
    s: str, current: SchemaState, dtype: DeviceType, storage: StorageSettings
) -> list[Step]:
    raw, rollup = readings_table(dtype.name), rollup_table(dtype.name)
    keyed = raw_hypertable(current, dtype.name) == readings_data_table(dtype.name)
    if raw not in current.columns:
        tables = (
            keyed_readings_statements(s, dtype, storage)
            if keyed
            else readings_statements(s, dtype, storage)
        )
        return [
            Step(
                f"create {raw} (hypertable, {count_noun(len(dtype.metrics), 'metric', 'metrics')})"
                " and its hourly "
                f"rollup {rollup} for new device type {dtype.name!r}",
                tables + rollup_statements(s, dtype, current.edition, storage, keyed=keyed),
            )
        ]
    steps = []
    missing = [m for m in dtype.metrics if m.name not in current.columns[raw]]
    if missing:
        steps.append(
            Step(
                f"add column(s) {', '.join(m.name for m in missing)} to {raw}",
                add_metric_statements(s, dtype, [m.name for m in missing])
                if keyed
                else tuple(
                    f"ALTER TABLE {s}.{raw} ADD COLUMN IF NOT EXISTS {m.name} {SQL_TYPES[m.kind]}"
                    for m in missing
                ),
            )
        )
    rolled = current.columns.get(rollup, frozenset())
    if current.edition is Edition.APACHE:
        absent = [c for m in dtype.metrics for c in _rollup_columns(m.name) if c not in rolled]
        if absent:
            steps.append(
                Step(
                    f"add column(s) {', '.join(absent)} to {rollup}",
                    tuple(
                        f"ALTER TABLE {s}.{rollup} ADD COLUMN IF NOT EXISTS {c} real"
                        for c in absent
                    ),
                )
            )
    return steps


def _retention_steps(s: str, current: SchemaState, want: dict[str, int]) -> list[Step]:
    if current.edition is Edition.APACHE:
        if current.retention_days == want:
            return []
        changed = sorted(t for t in want if current.retention_days.get(t) != want[t])
        return [
            Step(
                f"redefine apply_retention: {_days_list(want, changed)}",
                (retention_function(s, want),),
            )
        ]
    steps = []
    for table, days in want.items():
        if current.retention_days.get(table) == days:
            continue
        steps.append(
            Step(
                f"retention of {table}: "
                f"{_days(current.retention_days.get(table))} -> {_days(days)}",
                (
                    f"SELECT remove_retention_policy('{s}.{table}', if_exists => true)",
                    f"""SELECT add_retention_policy('{s}.{table}',
            drop_after => INTERVAL '{days} days', if_not_exists => true)""",
                ),
            )
        )
    return steps


def _days(days: int | None) -> str:
    return "none" if days is None else count_noun(days, "day", "days")


def _days_list(want: Mapping[str, int], tables: list[str]) -> str:
    return ", ".join(f"{t} {_days(want[t])}" for t in tables) or count_noun(
        len(want), "table", "tables"
    )


def _compression_steps(
    s: str, current: SchemaState, catalog: Mapping[str, DeviceType], storage: StorageSettings
) -> list[Step]:
    if current.edition is Edition.APACHE:
        return []
    days = storage.compress_after_days
    steps = []
    for name in catalog:
        raw = raw_hypertable(current, name)
        if current.compress_after_days.get(raw) == days:
            continue
        steps.append(
            Step(
                f"compression of {readings_table(name)}: after "
                f"{_days(current.compress_after_days.get(raw))} "
                f"-> after {_days(days)}",
                (
                    f"SELECT remove_compression_policy('{s}.{raw}', if_exists => true)",
                    f"""SELECT add_compression_policy('{s}.{raw}',
            compress_after => INTERVAL '{days} days', if_not_exists => true)""",
                ),
            )
        )
    return steps


def plan(
    s: str, current: SchemaState, catalog: Mapping[str, DeviceType], storage: StorageSettings
) -> list[Step]:
    """The steps that bring schema ``s`` (as ``current``) to ``catalog`` and ``storage``.

    New tables and columns first, then the rollup job, chunk intervals,
    retention and compression (a new type's policies come with its tables).
    """
    steps: list[Step] = []
    for dtype in catalog.values():
        steps.extend(_type_steps(s, current, dtype, storage))
    keyed = _keyed_types(current, catalog)
    if current.edition is Edition.APACHE and current.refresh_rollups != refresh_rollups_body(
        s, catalog, keyed
    ):
        steps.append(
            Step(
                "redefine refresh_rollups over the rollups of "
                + count_noun(len(catalog), "device type", "device types"),
                (refresh_rollups_function(s, catalog, keyed),),
            )
        )
    hours = storage.chunk_interval_hours
    for name in catalog:
        raw = raw_hypertable(current, name)
        if raw in current.columns and current.chunk_hours.get(raw, hours) != hours:
            steps.append(
                Step(
                    f"chunk interval of {readings_table(name)}: {current.chunk_hours[raw]:g} -> "
                    f"{count_noun(hours, 'hour', 'hours')}"
                    " (new chunks; existing chunks keep theirs)",
                    (f"SELECT set_chunk_time_interval('{s}.{raw}', INTERVAL '{hours} hours')",),
                )
            )
    stored_in = {readings_table(n): raw_hypertable(current, n) for n in catalog}
    want = {stored_in.get(t, t): d for t, d in retention_days(storage, catalog).items()}
    for table in current.retention_days:
        # A type removed from the catalog keeps its tables, and their retention.
        if table not in want and table in current.columns:
            rollup = table.endswith("_1h")
            want[table] = storage.rollup_retention_days if rollup else storage.raw_retention_days
    if current.edition is Edition.COMMUNITY:
        # A new type's policies come with its tables (rollup_statements).
        want = {t: d for t, d in want.items() if t in current.columns}
    steps.extend(_retention_steps(s, current, want))
    steps.extend(
        _compression_steps(
            s,
            current,
            {n: t for n, t in catalog.items() if raw_hypertable(current, n) in current.columns},
            storage,
        )
    )
    return steps


def notes(
    current: SchemaState, catalog: Mapping[str, DeviceType], storage: StorageSettings
) -> list[str]:
    """What the catalog or settings ask for that this server cannot do, in words."""
    said = []
    if current.edition is Edition.APACHE:
        said.append(
            f"storage.compress_after_days = {storage.compress_after_days}: not applied, the "
            "Apache edition of TimescaleDB has no compression (the community edition "
            "compresses raw readings after that many days)"
        )
        said.append(
            "rollups and retention run as `cityhub db maintain` (Apache edition: no "
            "server policies); schedule it, e.g. hourly"
        )
        return said
    for dtype in catalog.values():
        rollup = rollup_table(dtype.name)
        rolled = current.columns.get(rollup)
        if rolled is None:
            continue
        absent = [m.name for m in dtype.metrics if f"{m.name}_avg" not in rolled]
        if absent:
            said.append(
                f"{rollup} is a continuous aggregate, which cannot be altered: "
                f"{', '.join(absent)} stored in {readings_table(dtype.name)} only, not rolled "
                "up hourly (recreating the aggregate would drop the hours past raw retention; "
                "not done)"
            )
    return said


def policies(
    current: SchemaState, catalog: Mapping[str, DeviceType], storage: StorageSettings
) -> list[Policy]:
    """The policies in force on each table beside what the settings ask (``db status``)."""
    rows = []
    hours = storage.chunk_interval_hours
    # Shown under readings_{type}, found on the hypertable that stores it.
    stored_in = {readings_table(n): raw_hypertable(current, n) for n in catalog}
    for name in catalog:
        raw = readings_table(name)
        in_force = current.chunk_hours.get(stored_in[raw])
        rows.append(
            Policy(
                raw, "chunk interval", None if in_force is None else f"{in_force:g} h", f"{hours} h"
            )
        )
    for table, days in retention_days(storage, catalog).items():
        in_force_days = current.retention_days.get(stored_in.get(table, table))
        rows.append(Policy(table, "retention", _maybe_days(in_force_days), f"{days} d"))
    for name in catalog:
        raw = readings_table(name)
        setting = f"after {storage.compress_after_days} d"
        if current.edition is Edition.APACHE:
            setting += " (none on Apache edition)"
        after = current.compress_after_days.get(stored_in[raw])
        rows.append(
            Policy(raw, "compression", None if after is None else f"after {after} d", setting)
        )
    return rows


def _maybe_days(days: int | None) -> str | None:
    return None if days is None else f"{days} d"
