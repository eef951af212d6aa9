"""The SQL schema, generated from the catalog: versioned migrations as plain statements.

``migrations(schema, edition, storage)`` returns the ordered list of
migrations for one schema (tests give each test its own). Each migration is a
version number, a name and SQL statements; applying them, recording them and
locking against concurrent runs is the database adapter's job
(``cityhub.database``). Statements are written to be harmless when re-run
(IF NOT EXISTS), so a migration interrupted between its statements and its
record is safe to apply again.

Storage shape (docs/architecture.md, section 6):

- metadata: sites, gateways, device types and metrics (synced from the
  catalog), devices, device state;
- one wide hypertable per device type, a column per metric:
  ``readings_{type}_data`` since migration 22, keyed by (device_key, ts,
  seq) so a replayed reading is dropped by ``ON CONFLICT DO NOTHING``, with
  ``device_keys`` mapping device ids to compact integer keys and the view
  ``readings_{type}`` showing the old columns (ts, device_id, seq, recv_ts,
  metrics) to readers; before it, ``readings_{type}`` was the hypertable,
  keyed by (device_id, ts, seq) (``readings_statements``, migration 2);
- rejects, alerts and their transitions, AQI results;
- ingest's processed batch ids (to recognise resends) and its workers' stats;
- the gateways' reported state (outbox depth, throughput): the latest per
  gateway and its history;
- hourly rollups ``readings_{type}_1h`` with the same columns on both
  TimescaleDB editions: a continuous aggregate with refresh, compression and
  retention policies where the server has them (the community edition), the
  project's own rollup table and SQL functions (``refresh_rollups``,
  ``apply_retention``, run by ``cityhub db maintain``) on the Apache edition.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Collection, Mapping
from typing import Final

import msgspec

from contracts.catalog import DEVICE_TYPES, DeviceType, MetricKind
from contracts.commands import COMMAND_STATES
from contracts.errors import InvalidIdError
from contracts.settings import StorageSettings
from contracts.sites import SITE_KINDS

SQL_TYPES: dict[MetricKind, str] = {
    # real (4 bytes, ~7 significant digits) is finer than any sensor here.
    MetricKind.FLOAT: "real",
    MetricKind.INT: "integer",
    MetricKind.BOOL: "boolean",
    MetricKind.ENUM: "smallint",
}

SEVERITIES = ("critical", "major", "minor", "warning")
ALERT_STATES = ("active_unack", "active_ack", "cleared_unack", "cleared_ack")
ID_CHECK = "~ '^[a-z0-9][a-z0-9-]{0,63}$'"


class Edition(enum.StrEnum):
    """What the server's TimescaleDB offers (``timescaledb.license``)."""

    APACHE = "apache"  # hypertables, time_bucket, drop_chunks
    COMMUNITY = "timescale"  # + compression, continuous aggregates, policies

    @classmethod
    def from_license(cls, license_name: str | None) -> Edition:
        return cls.COMMUNITY if license_name == "timescale" else cls.APACHE


class Migration(msgspec.Struct, frozen=True):
    version: int
    name: str
    statements: tuple[str, ...]

    @property
    def checksum(self) -> str:
        return hashlib.sha256("\n;\n".join(self.statements).encode()).hexdigest()[:16]


def check_schema_name(schema: str) -> str:
    """Schema names are interpolated into SQL: allow lowercase identifiers only."""
    if not (schema.isascii() and schema.replace("_", "a").isalnum() and schema[:1].isalpha()):
        raise InvalidIdError(f"schema name {schema!r} must be a lowercase identifier")
    if schema != schema.lower() or len(schema) > 48:
        raise InvalidIdError(f"schema name {schema!r} must be lowercase, at most 48 chars")
    return schema


def readings_table(device_type: str) -> str:
    return f"readings_{device_type}"


def rollup_table(device_type: str) -> str:
    return f"readings_{device_type}_1h"


def readings_data_table(device_type: str) -> str:
    """The hypertable that stores a type's readings by device key (migration 22 on).

    ``readings_{type}`` is then a view of it with the device ids, for readers.
    """
    return f"readings_{device_type}_data"


# The registry's compact device keys: every device id that has readings gets one.
DEVICE_KEYS: Final = "device_keys"
# The data table's own columns besides the metrics, in their order.
KEYED_COLUMNS: Final = ("ts", "seq", "device_key", "recv_delay_ms")


def _core(s: str) -> tuple[str, ...]:
    return (
        f"""CREATE TABLE IF NOT EXISTS {s}.sites (
            site_id text PRIMARY KEY CHECK (site_id {ID_CHECK}),
            name text NOT NULL,
            district text NOT NULL,
            kind text NOT NULL CHECK (kind IN ({", ".join(f"'{k}'" for k in SITE_KINDS)})),
            address text NOT NULL DEFAULT '',
            latitude double precision NOT NULL CHECK (latitude BETWEEN -90 AND 90),
            longitude double precision NOT NULL CHECK (longitude BETWEEN -180 AND 180),
            opening_hours text NOT NULL DEFAULT '',
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now()
        )""",
        f"""CREATE TABLE IF NOT EXISTS {s}.gateways (
            gateway_id text PRIMARY KEY CHECK (gateway_id {ID_CHECK}),
            site_id text NOT NULL REFERENCES {s}.sites (site_id),
            label text NOT NULL DEFAULT '',
            status text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked')),
            created_at timestamptz NOT NULL DEFAULT now(),
            revoked_at timestamptz
        )""",
        f"""CREATE TABLE IF NOT EXISTS {s}.device_types (
            device_type text PRIMARY KEY,
            description text NOT NULL
        )""",
        f"""CREATE TABLE IF NOT EXISTS {s}.metrics (
            device_type text NOT NULL REFERENCES {s}.device_types (device_type),
            metric text NOT NULL,
            unit text NOT NULL,
            kind text NOT NULL,
            min_value double precision NOT NULL,
            max_value double precision NOT NULL,
            description text NOT NULL,
            labels text[] NOT NULL DEFAULT '{{}}',
            PRIMARY KEY (device_type, metric)
        )""",
        f"""CREATE TABLE IF NOT EXISTS {s}.devices (
            device_id text PRIMARY KEY CHECK (device_id {ID_CHECK}),
            device_type text NOT NULL REFERENCES {s}.device_types (device_type),
            site_id text NOT NULL REFERENCES {s}.sites (site_id),
            gateway_id text REFERENCES {s}.gateways (gateway_id),
            transport text NOT NULL CHECK (transport IN ('serial', 'mqtt')),
            port text,
            protocol text,
            label text NOT NULL DEFAULT '',
            status text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked')),
            created_at timestamptz NOT NULL DEFAULT now(),
            revoked_at timestamptz
        )""",
        f"CREATE INDEX IF NOT EXISTS devices_gateway_idx ON {s}.devices (gateway_id)",
        f"CREATE INDEX IF NOT EXISTS devices_site_idx ON {s}.devices (site_id)",
        f"""CREATE TABLE IF NOT EXISTS {s}.device_state (
            device_id text PRIMARY KEY,
            last_seen timestamptz NOT NULL,
            last_seq bigint NOT NULL,
            boot_id text,
            seq_gaps bigint NOT NULL DEFAULT 0,
            readings bigint NOT NULL DEFAULT 0,
            updated_at timestamptz NOT NULL DEFAULT now()
        )""",
        f"""CREATE TABLE IF NOT EXISTS {s}.rejects (
            received_at timestamptz NOT NULL DEFAULT now(),
            gateway_id text,
            device_id text,
            batch_id text,
            reason text NOT NULL,
            detail text NOT NULL DEFAULT '',
            raw bytea
        )""",
        f"""SELECT create_hypertable('{s}.rejects', by_range('received_at', INTERVAL '7 days'),
            if_not_exists => true)""",
        f"CREATE INDEX IF NOT EXISTS rejects_reason_idx ON {s}.rejects (reason, received_at DESC)",
    )


def _alerts_and_aqi(s: str) -> tuple[str, ...]:
    severities = ", ".join(f"'{v}'" for v in SEVERITIES)
    states = ", ".join(f"'{v}'" for v in ALERT_STATES)
    return (
        f"""CREATE TABLE IF NOT EXISTS {s}.alerts (
            alert_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            rule_id text NOT NULL,
            device_id text NOT NULL,
            site_id text,
            severity text NOT NULL CHECK (severity IN ({severities})),
            state text NOT NULL CHECK (state IN ({states})),
            value double precision,
            message text NOT NULL DEFAULT '',
            raised_at timestamptz NOT NULL,
            cleared_at timestamptz,
            acked_at timestamptz,
            acked_by text,
            updated_at timestamptz NOT NULL DEFAULT now()
        )""",
        # One active alert per (rule, device).
        f"""CREATE UNIQUE INDEX IF NOT EXISTS alerts_one_active_idx
            ON {s}.alerts (rule_id, device_id) WHERE state IN ('active_unack', 'active_ack')""",
        f"CREATE INDEX IF NOT EXISTS alerts_raised_idx ON {s}.alerts (raised_at DESC)",
        f"""CREATE TABLE IF NOT EXISTS {s}.alert_transitions (
            alert_id bigint NOT NULL REFERENCES {s}.alerts (alert_id),
            ts timestamptz NOT NULL,
            from_state text,
            to_state text NOT NULL CHECK (to_state IN ({states})),
            severity text NOT NULL CHECK (severity IN ({severities})),
            value double precision,
            note text NOT NULL DEFAULT '',
            PRIMARY KEY (alert_id, ts, to_state)
        )""",
        f"""CREATE TABLE IF NOT EXISTS {s}.aqi_hourly (
            ts timestamptz NOT NULL,
            device_id text NOT NULL,
            site_id text NOT NULL,
            vn_aqi integer,
            dominant text,
            band text,
            aqi_pm25 integer,
            aqi_pm10 integer,
            aqi_no2 integer,
            aqi_o3 integer,
            nowcast_pm25 real,
            nowcast_pm10 real,
            us_aqi_pm25 integer,
            computed_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (device_id, ts)
        )""",
        f"""SELECT create_hypertable('{s}.aqi_hourly', by_range('ts', INTERVAL '30 days'),
            if_not_exists => true)""",
        f"""CREATE TABLE IF NOT EXISTS {s}.aqi_daily (
            day date NOT NULL,
            device_id text NOT NULL,
            site_id text NOT NULL,
            vn_aqi integer,
            dominant text,
            band text,
            aqi_pm25 integer,
            aqi_pm10 integer,
            aqi_no2 integer,
            aqi_o3 integer,
            us_aqi_pm25 integer,
            computed_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (device_id, day)
        )""",
    )


def readings_statements(s: str, dtype: DeviceType, storage: StorageSettings) -> tuple[str, ...]:
    """A device type's wide hypertable as migration 2 made it (device id as text).

    Kept as it was: applied migrations never change. Types are stored by
    device key since migration 22 (``keyed_readings_statements``).
    """
    table = readings_table(dtype.name)
    columns = ",\n            ".join(f"{m.name} {SQL_TYPES[m.kind]}" for m in dtype.metrics)
    return (
        f"""CREATE TABLE IF NOT EXISTS {s}.{table} (
            ts timestamptz NOT NULL,
            device_id text NOT NULL,
            seq bigint NOT NULL,
            recv_ts timestamptz NOT NULL,
            {columns},
            PRIMARY KEY (device_id, ts, seq)
        )""",
        # The primary key (device, time, seq) serves per-device range scans;
        # time-only scans prune by chunk. A default time index would be a
        # second index to maintain on every insert for little gain.
        f"""SELECT create_hypertable('{s}.{table}',
            by_range('ts', INTERVAL '{storage.chunk_interval_hours} hours'),
            create_default_indexes => false, if_not_exists => true)""",
    )


def keyed_readings_statements(
    s: str, dtype: DeviceType, storage: StorageSettings
) -> tuple[str, ...]:
    """A device type's readings by device key: the data hypertable and the view of it.

    ``readings_{type}_data`` holds (ts, seq, device_key, recv_delay_ms,
    metrics...), keyed by (device_key, ts, seq); ``readings_{type}`` is the
    view with the old columns (``define_readings_view``, migration 22).
    """
    data = readings_data_table(dtype.name)
    columns = "".join(f",\n            {m.name} {SQL_TYPES[m.kind]}" for m in dtype.metrics)
    return (
        f"""CREATE TABLE IF NOT EXISTS {s}.{data} (
            ts timestamptz NOT NULL,
            seq bigint NOT NULL,
            device_key integer NOT NULL,
            recv_delay_ms integer NOT NULL{columns},
            PRIMARY KEY (device_key, ts, seq)
        )""",
        f"""SELECT create_hypertable('{s}.{data}',
            by_range('ts', INTERVAL '{storage.chunk_interval_hours} hours'),
            create_default_indexes => false, if_not_exists => true)""",
        # Rows arrive in about time order, so a block-range index on ts finds
        # the last seconds' rows of every device (the alerts job's shared
        # scan) in a few ranges, for a few kilobytes and next to no work per
        # insert; the primary key serves one device's range.
        f"""CREATE INDEX IF NOT EXISTS {data}_ts_brin ON {s}.{data}
            USING brin (ts) WITH (pages_per_range = 32)""",
        f"SELECT {s}.define_readings_view('{dtype.name}')",
    )


def add_metric_statements(s: str, dtype: DeviceType, metrics: Collection[str]) -> tuple[str, ...]:
    """New metric columns of a keyed type: on its data table, then appended to its view."""
    kinds = {m.name: SQL_TYPES[m.kind] for m in dtype.metrics}
    data = readings_data_table(dtype.name)
    return (
        *(f"ALTER TABLE {s}.{data} ADD COLUMN IF NOT EXISTS {m} {kinds[m]}" for m in metrics),
        f"SELECT {s}.define_readings_view('{dtype.name}')",
    )


def _key_registry(s: str) -> tuple[str, ...]:
    """``device_keys``: a compact key per device id, given once and never reused.

    Every registered device gets one when it is added (trigger), and every
    device id found in readings (migrated rows, or rows a tool inserts through
    a readings view) gets one too, so that no reading is lost for want of a
    key. ``recv_delay_ms`` is the gateway's receive time as milliseconds after
    the reading's time, clamped to the int4 range (+-24.8 days; ingest accepts
    readings up to 30 days old, so only a reading that waited over 24.8 days
    between device and gateway is clamped).
    """
    return (
        f"""CREATE TABLE IF NOT EXISTS {s}.{DEVICE_KEYS} (
            device_key integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            device_id text NOT NULL UNIQUE
        )""",
        f"""INSERT INTO {s}.{DEVICE_KEYS} (device_id)
            SELECT device_id FROM {s}.devices ORDER BY device_id ON CONFLICT DO NOTHING""",
        f"""CREATE OR REPLACE FUNCTION {s}.device_keys_assign() RETURNS trigger
            LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
            BEGIN
                INSERT INTO {s}.{DEVICE_KEYS} (device_id) VALUES (NEW.device_id)
                    ON CONFLICT (device_id) DO NOTHING;
                RETURN NULL;
            END
            $fn$""",
        f"DROP TRIGGER IF EXISTS device_keys_assign ON {s}.devices",
        f"""CREATE TRIGGER device_keys_assign AFTER INSERT ON {s}.devices
            FOR EACH ROW EXECUTE FUNCTION {s}.device_keys_assign()""",
        f"""CREATE OR REPLACE FUNCTION {s}.recv_delay_ms(ts timestamptz, recv_ts timestamptz)
            RETURNS integer LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
            SELECT least(greatest(round(extract(epoch FROM recv_ts - ts) * 1000),
                -2147483648), 2147483647)::integer
            $fn$""",
    )


def _define_readings_view(s: str) -> str:
    """``define_readings_view(type)``: (re)create ``readings_{type}`` over its data table.

    The view has the old table's columns (ts, device_id, seq, recv_ts, then
    every column of the data table after its own four, in order), so boards,
    rules and tools read it unchanged; CREATE OR REPLACE keeps its grants
    when a metric is appended. An INSTEAD OF INSERT trigger lets tools and
    tests insert through it as before (ingest writes the data table), and
    delete through it (privileges are checked on the view as on a table;
    an UPDATE is refused: readings are not changed once stored): a
    duplicate (device, ts, seq) fails a plain INSERT and is skipped under ON
    CONFLICT DO NOTHING, which PostgreSQL does not pass to an INSTEAD OF
    trigger, so the trigger reads it from the statement.
    """
    return f"""CREATE OR REPLACE FUNCTION {s}.define_readings_view(p_type text) RETURNS void
        LANGUAGE plpgsql AS $fn$
        DECLARE
            data regclass := format('%I.%I', '{s}', 'readings_' || p_type || '_data')::regclass;
            -- Spelled out with its schema: a regclass prints bare when its
            -- schema is on the search_path, and the trigger functions below
            -- run with a search_path of their own.
            qualified text := format('%I.%I', '{s}', 'readings_' || p_type || '_data');
            view_name text := 'readings_' || p_type;
            picked text := ''; listed text := ''; fed text := '';
        BEGIN
            SELECT coalesce(string_agg(', r.' || quote_ident(a.attname), '' ORDER BY a.attnum), ''),
                coalesce(string_agg(', ' || quote_ident(a.attname), '' ORDER BY a.attnum), ''),
                coalesce(string_agg(', NEW.' || quote_ident(a.attname), '' ORDER BY a.attnum), '')
                INTO picked, listed, fed
                FROM pg_attribute a WHERE a.attrelid = data AND a.attnum > 0
                AND NOT a.attisdropped
                AND a.attname NOT IN ('ts', 'seq', 'device_key', 'recv_delay_ms');
            EXECUTE format('CREATE OR REPLACE VIEW %I.%I AS SELECT r.ts, k.device_id, r.seq, '
                'r.ts + r.recv_delay_ms * INTERVAL ''1 millisecond'' AS recv_ts%s '
                'FROM %s r JOIN %I.{DEVICE_KEYS} k ON k.device_key = r.device_key',
                '{s}', view_name, picked, qualified, '{s}');
            EXECUTE format($def$CREATE OR REPLACE FUNCTION %I.%I() RETURNS trigger
                LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $body$
                DECLARE
                    key integer;
                BEGIN
                    INSERT INTO %I.{DEVICE_KEYS} (device_id) VALUES (NEW.device_id)
                        ON CONFLICT (device_id) DO NOTHING;
                    SELECT k.device_key INTO key FROM %I.{DEVICE_KEYS} k
                        WHERE k.device_id = NEW.device_id;
                    IF current_query() ~* '\\mON\\s+CONFLICT\\M' THEN
                        INSERT INTO %s (ts, seq, device_key, recv_delay_ms%s)
                            VALUES (NEW.ts, NEW.seq, key, %I.recv_delay_ms(NEW.ts, NEW.recv_ts)%s)
                            ON CONFLICT DO NOTHING;
                        IF NOT FOUND THEN
                            RETURN NULL;
                        END IF;
                    ELSE
                        INSERT INTO %s (ts, seq, device_key, recv_delay_ms%s)
                            VALUES (NEW.ts, NEW.seq, key, %I.recv_delay_ms(NEW.ts, NEW.recv_ts)%s);
                    END IF;
                    RETURN NEW;
                END
                $body$$def$, '{s}', view_name || '_insert', '{s}', '{s}',
                qualified, listed, '{s}', fed, qualified, listed, '{s}', fed);
            EXECUTE format($def$CREATE OR REPLACE FUNCTION %I.%I() RETURNS trigger
                LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $body$
                BEGIN
                    IF TG_OP = 'UPDATE' THEN
                        RAISE EXCEPTION 'readings are not changed once stored'
                            USING ERRCODE = 'feature_not_supported';
                    END IF;
                    DELETE FROM %s r USING %I.{DEVICE_KEYS} k
                        WHERE k.device_id = OLD.device_id AND r.device_key = k.device_key
                        AND r.ts = OLD.ts AND r.seq = OLD.seq;
                    RETURN OLD;
                END
                $body$$def$, '{s}', view_name || '_change', qualified, '{s}');
            EXECUTE format('DROP TRIGGER IF EXISTS readings_insert ON %I.%I', '{s}', view_name);
            EXECUTE format('CREATE TRIGGER readings_insert INSTEAD OF INSERT ON %I.%I '
                'FOR EACH ROW EXECUTE FUNCTION %I.%I()', '{s}', view_name, '{s}',
                view_name || '_insert');
            EXECUTE format('DROP TRIGGER IF EXISTS readings_change ON %I.%I', '{s}', view_name);
            EXECUTE format('CREATE TRIGGER readings_change INSTEAD OF UPDATE OR DELETE ON %I.%I '
                'FOR EACH ROW EXECUTE FUNCTION %I.%I()', '{s}', view_name, '{s}',
                view_name || '_change');
        END
        $fn$"""


def _convert_readings(s: str) -> str:
    """``convert_readings(type, chunk)``: move a type's wide table to the keyed layout.

    Does nothing when ``readings_{type}`` is not a table (a type new to the
    catalog, or converted already). Else, in the caller's transaction: a key
    for every device id in it (registered or not: no row is left behind), the
    data table with the old table's metric columns (a metric removed from the
    catalog keeps its column and data) and chunk interval, every row copied
    across in time order, the old table dropped, and the view in its place.
    Returns the rows moved.
    """
    return f"""CREATE OR REPLACE FUNCTION {s}.convert_readings(p_type text, p_chunk interval)
        RETURNS bigint LANGUAGE plpgsql AS $fn$
        DECLARE
            old_name text := 'readings_' || p_type;
            data_name text := 'readings_' || p_type || '_data';
            old regclass;
            chunk interval;
            defs text; names text; moved bigint;
        BEGIN
            SELECT c.oid INTO old FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE n.nspname = '{s}' AND c.relname = old_name AND c.relkind = 'r';
            IF old IS NULL THEN
                RETURN 0;
            END IF;
            SELECT coalesce(string_agg(format(', %I %s', a.attname,
                    format_type(a.atttypid, a.atttypmod)), '' ORDER BY a.attnum), ''),
                coalesce(string_agg(format(', r.%I', a.attname), '' ORDER BY a.attnum), '')
                INTO defs, names
                FROM pg_attribute a WHERE a.attrelid = old AND a.attnum > 0
                AND NOT a.attisdropped AND a.attname NOT IN ('ts', 'device_id', 'seq', 'recv_ts');
            SELECT coalesce(min(d.time_interval), p_chunk) INTO chunk
                FROM timescaledb_information.dimensions d
                WHERE d.hypertable_schema = '{s}' AND d.hypertable_name = old_name;
            EXECUTE format('INSERT INTO %I.{DEVICE_KEYS} (device_id) SELECT DISTINCT device_id '
                'FROM %s ORDER BY 1 ON CONFLICT (device_id) DO NOTHING', '{s}', old);
            EXECUTE format('CREATE TABLE %I.%I (ts timestamptz NOT NULL, seq bigint NOT NULL, '
                'device_key integer NOT NULL, recv_delay_ms integer NOT NULL%s, '
                'PRIMARY KEY (device_key, ts, seq))', '{s}', data_name, defs);
            PERFORM create_hypertable(format('%I.%I', '{s}', data_name)::regclass,
                by_range('ts', chunk), create_default_indexes => false);
            EXECUTE format('INSERT INTO %I.%I SELECT r.ts, r.seq, k.device_key, '
                '%I.recv_delay_ms(r.ts, r.recv_ts)%s FROM %s r JOIN %I.{DEVICE_KEYS} k '
                'ON k.device_id = r.device_id ORDER BY r.ts', '{s}', data_name, '{s}', names,
                old, '{s}');
            GET DIAGNOSTICS moved = ROW_COUNT;
            EXECUTE format('DROP TABLE %s', old);
            PERFORM {s}.define_readings_view(p_type);
            RETURN moved;
        END
        $fn$"""


def _keyed_readings(
    s: str, edition: Edition, storage: StorageSettings, catalog: Mapping[str, DeviceType]
) -> tuple[str, ...]:
    """Migration 22: readings stored by compact device key, behind views of the old shape.

    Per type of the catalog: (community edition) its continuous aggregate is
    dropped first, since it depends on the old table; the rows are converted
    (``convert_readings``) or, for a type with no table yet, the keyed tables
    are created; then the rollup is (re)made over the data table. On the
    Apache edition ``refresh_rollups`` and ``apply_retention`` are redefined
    over the data tables (its rollup tables keep their rows).
    """
    hours = storage.chunk_interval_hours
    statements = [*_key_registry(s), _define_readings_view(s), _convert_readings(s)]
    for dtype in catalog.values():
        if edition is Edition.COMMUNITY:
            statements.append(f"DROP MATERIALIZED VIEW IF EXISTS {s}.{rollup_table(dtype.name)}")
        statements.append(f"SELECT {s}.convert_readings('{dtype.name}', INTERVAL '{hours} hours')")
        statements.extend(keyed_readings_statements(s, dtype, storage))
        if edition is Edition.COMMUNITY:
            statements.extend(_rollup_community(s, dtype, storage, keyed=True))
    if edition is Edition.APACHE:
        statements.append(refresh_rollups_function(s, catalog, keyed=catalog))
        statements.append(retention_function(s, keyed_retention_days(storage, catalog)))
    return tuple(statements)


def keyed_retention_days(
    storage: StorageSettings, catalog: Mapping[str, DeviceType]
) -> dict[str, int]:
    """``retention_days`` with each type's raw readings under its data table's name."""
    data = {readings_table(t): readings_data_table(t) for t in catalog}
    return {data.get(t, t): d for t, d in retention_days(storage, catalog).items()}


def _rollup_select(s: str, dtype: DeviceType, *, keyed: bool = False) -> str:
    """The hourly aggregates of a type; ``keyed``: from its data table joined to the keys.

    Grouped by ``k.device_id`` (keyed) or ``device_id``: the rollups keep device ids.
    """
    aggregates = []
    for m in dtype.metrics:
        value = f"{m.name}::int" if m.kind is MetricKind.BOOL else m.name
        aggregates.append(
            f"avg({value})::real AS {m.name}_avg, min({value})::real AS {m.name}_min, "
            f"max({value})::real AS {m.name}_max"
        )
    if keyed:
        return (
            f"SELECT time_bucket(INTERVAL '1 hour', r.ts) AS bucket, k.device_id, "
            f"count(*) AS n, {', '.join(aggregates)} FROM {s}.{readings_data_table(dtype.name)} r "
            f"JOIN {s}.{DEVICE_KEYS} k ON k.device_key = r.device_key"
        )
    return (
        f"SELECT time_bucket(INTERVAL '1 hour', ts) AS bucket, device_id, "
        f"count(*) AS n, {', '.join(aggregates)} FROM {s}.{readings_table(dtype.name)}"
    )


def _rollup_community(
    s: str, dtype: DeviceType, storage: StorageSettings, *, keyed: bool = False
) -> tuple[str, ...]:
    rollup = rollup_table(dtype.name)
    if keyed:
        # A continuous aggregate over a hypertable joined to a plain table
        # (TimescaleDB >= 2.10); the data table is compressed per device key.
        raw, group, segment = readings_data_table(dtype.name), "bucket, k.device_id", "device_key"
    else:
        raw, group, segment = readings_table(dtype.name), "bucket, device_id", "device_id"
    return (
        f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {s}.{rollup}
            WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
            {_rollup_select(s, dtype, keyed=keyed)} GROUP BY {group} WITH NO DATA""",
        f"""SELECT add_continuous_aggregate_policy('{s}.{rollup}',
            start_offset => INTERVAL '3 days', end_offset => INTERVAL '1 hour',
            schedule_interval => INTERVAL '30 minutes', if_not_exists => true)""",
        f"""ALTER TABLE {s}.{raw} SET (timescaledb.compress,
            timescaledb.compress_segmentby = '{segment}',
            timescaledb.compress_orderby = 'ts DESC, seq DESC')""",
        f"""SELECT add_compression_policy('{s}.{raw}',
            compress_after => INTERVAL '{storage.compress_after_days} days',
            if_not_exists => true)""",
        f"""SELECT add_retention_policy('{s}.{raw}',
            drop_after => INTERVAL '{storage.raw_retention_days} days',
            if_not_exists => true)""",
        f"""SELECT add_retention_policy('{s}.{rollup}',
            drop_after => INTERVAL '{storage.rollup_retention_days} days',
            if_not_exists => true)""",
    )


def rollup_statements(
    s: str, dtype: DeviceType, edition: Edition, storage: StorageSettings, *, keyed: bool = False
) -> tuple[str, ...]:
    """A device type's hourly rollup with its policies, as ``edition`` allows.

    Community edition: a continuous aggregate with refresh, compression and
    retention policies (over the data table when ``keyed``). Apache edition:
    the project's own rollup hypertable (``refresh_rollups`` fills it;
    ``apply_retention`` covers it).
    """
    if edition is Edition.COMMUNITY:
        return _rollup_community(s, dtype, storage, keyed=keyed)
    return _rollup_apache(s, dtype)


def _rollup_apache(s: str, dtype: DeviceType) -> tuple[str, ...]:
    rollup = rollup_table(dtype.name)
    columns = ", ".join(
        f"{m.name}_avg real, {m.name}_min real, {m.name}_max real" for m in dtype.metrics
    )
    return (
        f"""CREATE TABLE IF NOT EXISTS {s}.{rollup} (
            bucket timestamptz NOT NULL,
            device_id text NOT NULL,
            n bigint NOT NULL,
            {columns},
            PRIMARY KEY (device_id, bucket)
        )""",
        f"""SELECT create_hypertable('{s}.{rollup}', by_range('bucket', INTERVAL '30 days'),
            create_default_indexes => false, if_not_exists => true)""",
    )


def _apache_jobs(
    s: str, storage: StorageSettings, catalog: Mapping[str, DeviceType]
) -> tuple[str, ...]:
    """SQL functions standing in for continuous aggregates and retention policies."""
    days_of: dict[str, int] = {}
    for t in catalog:
        days_of[readings_table(t)] = storage.raw_retention_days
        days_of[rollup_table(t)] = storage.rollup_retention_days
    return (refresh_rollups_function(s, catalog), retention_function(s, days_of))


def refresh_rollups_body(
    s: str, catalog: Mapping[str, DeviceType], keyed: Collection[str] = ()
) -> str:
    """The body of ``refresh_rollups`` (Apache edition): one upsert per type of ``catalog``.

    The types named in ``keyed`` are read from their data table (migration 22).
    Returned alone so the reconcile step (``contracts.evolve``) can compare it
    with the body stored in the database (``pg_proc.prosrc``).
    """
    refresh_parts = []
    for dtype in catalog.values():
        by_key = dtype.name in keyed
        r, k = ("r.", "k.") if by_key else ("", "")
        where = f"WHERE {r}ts >= lo AND {r}ts < hi GROUP BY bucket, {k}device_id"
        rollup = rollup_table(dtype.name)
        updates = ", ".join(
            f"{m.name}_{a} = EXCLUDED.{m.name}_{a}"
            for m in dtype.metrics
            for a in ("avg", "min", "max")
        )
        refresh_parts.append(
            f"""INSERT INTO {s}.{rollup}
            {_rollup_select(s, dtype, keyed=by_key)} {where}
            ON CONFLICT (device_id, bucket) DO UPDATE SET n = EXCLUDED.n, {updates};
        GET DIAGNOSTICS rows = ROW_COUNT; total := total + rows;"""
        )
    refresh_body = "\n        ".join(refresh_parts)
    return f"""
        DECLARE
            lo timestamptz := time_bucket(INTERVAL '1 hour', p_from);
            hi timestamptz := time_bucket(INTERVAL '1 hour', p_to);
            rows bigint; total bigint := 0;
        BEGIN
        -- Recompute whole hours in [lo, hi): hours with late readings are redone,
        -- the current, incomplete hour is left for the next run.
        {refresh_body}
        RETURN total;
        END
        """


def refresh_rollups_function(
    s: str, catalog: Mapping[str, DeviceType], keyed: Collection[str] = ()
) -> str:
    """``CREATE OR REPLACE FUNCTION refresh_rollups`` over the rollups of ``catalog``."""
    body = refresh_rollups_body(s, catalog, keyed)
    return f"""CREATE OR REPLACE FUNCTION {s}.refresh_rollups(p_from timestamptz, p_to timestamptz)
        RETURNS bigint LANGUAGE plpgsql AS $fn${body}$fn$"""


def retention_function(s: str, days_of: Mapping[str, int]) -> str:
    """``apply_retention``: drop_chunks on each table of ``days_of``, older than its days.

    The Apache edition's stand-in for retention policies; ``parse_retention``
    reads the (table, days) pairs back from the stored body.
    """
    tables = ", ".join(f"('{table}', {days})" for table, days in days_of.items())
    return f"""CREATE OR REPLACE FUNCTION {s}.apply_retention(p_now timestamptz)
        RETURNS bigint LANGUAGE plpgsql AS $fn$
        DECLARE
            item record; dropped bigint := 0; n bigint;
        BEGIN
        FOR item IN SELECT * FROM (VALUES {tables}) AS t (tbl, days) LOOP
            SELECT count(*) INTO n FROM drop_chunks(
                format('%I.%I', '{s}', item.tbl)::regclass,
                older_than => p_now - make_interval(days => item.days));
            dropped := dropped + n;
        END LOOP;
        RETURN dropped;
        END
        $fn$"""


_RETENTION_ROW = re.compile(r"\('([a-z0-9_]+)', (\d+)\)")


def parse_retention(body: str) -> dict[str, int]:
    """The (table, days) pairs of a stored ``apply_retention`` body, in its order."""
    values = body.partition("(VALUES ")[2].partition(") AS t (tbl, days)")[0]
    return {table: int(days) for table, days in _RETENTION_ROW.findall(values)}


def _retention_of_the_rest(
    s: str, edition: Edition, storage: StorageSettings, catalog: Mapping[str, DeviceType]
) -> tuple[str, ...]:
    """Retention for the hypertables migration 4 left out: rejects, ingest stats, AQI.

    Rejects and ingest stats are kept as long as raw readings; hourly AQI as
    long as the rollups.
    """
    extra = _auxiliary_retention_days(storage)
    if edition is Edition.COMMUNITY:
        return _retention_policies(s, extra)
    return (retention_function(s, _apache_retention_days(storage, extra, catalog)),)


def _auxiliary_retention_days(storage: StorageSettings) -> dict[str, int]:
    """Days kept of the hypertables migration 6 put under retention."""
    return {
        "rejects": storage.raw_retention_days,
        "ingest_stats": storage.raw_retention_days,
        "aqi_hourly": storage.rollup_retention_days,
    }


def _retention_policies(s: str, days_of: dict[str, int]) -> tuple[str, ...]:
    """Community edition: a server retention policy per (table, days)."""
    return tuple(
        f"""SELECT add_retention_policy('{s}.{table}',
            drop_after => INTERVAL '{days} days', if_not_exists => true)"""
        for table, days in days_of.items()
    )


def _apache_retention_days(
    storage: StorageSettings, extra: Mapping[str, int], catalog: Mapping[str, DeviceType]
) -> dict[str, int]:
    """Apache edition: the (table, days) rows of ``apply_retention``."""
    days_of: dict[str, int] = {}
    for t in catalog:
        days_of[readings_table(t)] = storage.raw_retention_days
        days_of[rollup_table(t)] = storage.rollup_retention_days
    return {**days_of, **extra}


def retention_days(storage: StorageSettings, catalog: Mapping[str, DeviceType]) -> dict[str, int]:
    """Days kept of every table under retention, from the settings (both editions).

    Raw readings, rejects, ingest stats and gateway history as long as
    ``raw_retention_days``; hourly rollups and hourly AQI as long as
    ``rollup_retention_days``. The order is ``apply_retention``'s.
    """
    extra = {**_auxiliary_retention_days(storage), **_history_retention_days(storage)}
    return _apache_retention_days(storage, extra, catalog)


def _history_retention_days(storage: StorageSettings) -> dict[str, int]:
    return {"gateway_status_history": storage.raw_retention_days}


def _ingest(s: str) -> tuple[str, ...]:
    """What ingest keeps besides the readings: batch ids it committed, its workers' stats.

    ``ingested_batches`` is how a resent batch is recognised (and acked without
    being written again); it is pruned by ``committed_at`` (the index), not
    partitioned: the batch id alone must be unique, which a hypertable's key
    (it must include the time column) could not enforce. Poison messages are
    recorded under ``poison:{sha256}`` keys so a redelivery is stored once.
    """
    return (
        f"""CREATE TABLE IF NOT EXISTS {s}.ingested_batches (
            batch_id text PRIMARY KEY,
            gateway_id text,
            committed_at timestamptz NOT NULL DEFAULT now(),
            readings integer NOT NULL DEFAULT 0
        )""",
        f"""CREATE INDEX IF NOT EXISTS ingested_batches_committed_idx
            ON {s}.ingested_batches (committed_at)""",
        f"""CREATE TABLE IF NOT EXISTS {s}.ingest_stats (
            ts timestamptz NOT NULL,
            worker_id text NOT NULL,
            interval_s real NOT NULL,
            readings bigint NOT NULL,
            duplicates bigint NOT NULL,
            batches bigint NOT NULL,
            replayed bigint NOT NULL,
            poison bigint NOT NULL,
            rejects bigint NOT NULL,
            commits bigint NOT NULL,
            commit_p50_ms real,
            commit_p95_ms real,
            lag_p95_ms real,
            queue_depth integer NOT NULL DEFAULT 0,
            PRIMARY KEY (worker_id, ts)
        )""",
        f"""SELECT create_hypertable('{s}.ingest_stats', by_range('ts', INTERVAL '7 days'),
            create_default_indexes => false, if_not_exists => true)""",
    )


def _alert_jobs(s: str) -> tuple[str, ...]:
    """The alerts job's own state: the last evaluation time it completed, per job id.

    Written in the same transaction as that evaluation's alert changes, so a
    job restarted after a crash resumes after the last evaluation that is
    fully stored, never re-raising or losing a transition.
    """
    return (
        f"""CREATE TABLE IF NOT EXISTS {s}.alert_jobs (
            job_id text PRIMARY KEY,
            last_eval_at timestamptz NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now()
        )""",
    )


def _provisioning(s: str) -> tuple[str, ...]:
    """What the technicians' commands keep besides the devices and gateways tables.

    ``credentials`` has one row per broker account (a device's on the site
    broker, a gateway's on the central and on the site broker) with a salted
    hash of its secret only: the broker keeps its own hash, and the clear
    secret exists only in the bundle given to the technician. ``audit_log``
    records every provisioning action with the operator's name. A gateway's
    ``config_version`` numbers its retained config messages.
    """
    return (
        f"ALTER TABLE {s}.gateways ADD COLUMN IF NOT EXISTS location text NOT NULL DEFAULT ''",
        f"""ALTER TABLE {s}.gateways
            ADD COLUMN IF NOT EXISTS config_version bigint NOT NULL DEFAULT 0""",
        f"ALTER TABLE {s}.devices ADD COLUMN IF NOT EXISTS location text NOT NULL DEFAULT ''",
        f"ALTER TABLE {s}.devices ADD COLUMN IF NOT EXISTS hardware_id text NOT NULL DEFAULT ''",
        f"ALTER TABLE {s}.devices ADD COLUMN IF NOT EXISTS enabled boolean NOT NULL DEFAULT true",
        f"""CREATE TABLE IF NOT EXISTS {s}.credentials (
            broker text NOT NULL CHECK (broker IN ('site', 'central')),
            username text NOT NULL,
            owner_kind text NOT NULL CHECK (owner_kind IN ('device', 'gateway')),
            owner_id text NOT NULL CHECK (owner_id {ID_CHECK}),
            secret_hash text NOT NULL,
            status text NOT NULL DEFAULT 'active'
                CHECK (status IN ('active', 'disabled', 'revoked')),
            created_at timestamptz NOT NULL DEFAULT now(),
            rotated_at timestamptz,
            revoked_at timestamptz,
            PRIMARY KEY (broker, username)
        )""",
        f"CREATE INDEX IF NOT EXISTS credentials_owner_idx ON {s}.credentials (owner_id)",
        f"""CREATE TABLE IF NOT EXISTS {s}.audit_log (
            audit_id bigserial PRIMARY KEY,
            ts timestamptz NOT NULL DEFAULT now(),
            operator text NOT NULL,
            action text NOT NULL,
            subject_kind text NOT NULL CHECK (subject_kind IN ('device', 'gateway', 'pki')),
            subject_id text NOT NULL,
            detail jsonb NOT NULL DEFAULT '{{}}'
        )""",
        f"CREATE INDEX IF NOT EXISTS audit_log_ts_idx ON {s}.audit_log (ts)",
        f"CREATE INDEX IF NOT EXISTS audit_log_subject_idx ON {s}.audit_log (subject_id, ts)",
    )


def _gateway_status(
    s: str, edition: Edition, storage: StorageSettings, catalog: Mapping[str, DeviceType]
) -> tuple[str, ...]:
    """The gateways' own reports (their retained state messages), stored by ingest.

    ``gateway_status`` holds the latest state of each gateway: outbox depth,
    throughput, counters since boot, devices online, online / offline.
    ``gateway_status_history`` keeps every state received, for the boards'
    time series; it is kept as long as raw readings, under the same
    retention as the other auxiliary hypertables (a policy on the community
    edition, ``apply_retention`` on the Apache edition, which this migration
    redefines with the history table added).
    """
    statuses = "'online', 'offline'"
    tables = (
        f"""CREATE TABLE IF NOT EXISTS {s}.gateway_status (
            gateway_id text PRIMARY KEY CHECK (gateway_id {ID_CHECK}),
            status text NOT NULL CHECK (status IN ({statuses})),
            birth bigint NOT NULL,
            boot_id text NOT NULL,
            version text NOT NULL,
            ts timestamptz NOT NULL,
            outbox_depth bigint NOT NULL,
            outbox_readings bigint NOT NULL,
            readings_per_s double precision NOT NULL,
            received bigint NOT NULL,
            accepted bigint NOT NULL,
            rejected bigint NOT NULL,
            rate_limited bigint NOT NULL,
            serial_errors bigint NOT NULL,
            devices_online bigint NOT NULL,
            site_ready boolean NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now()
        )""",
        f"""CREATE TABLE IF NOT EXISTS {s}.gateway_status_history (
            ts timestamptz NOT NULL,
            gateway_id text NOT NULL,
            status text NOT NULL CHECK (status IN ({statuses})),
            outbox_depth bigint NOT NULL,
            outbox_readings bigint NOT NULL,
            readings_per_s double precision NOT NULL,
            devices_online bigint NOT NULL,
            PRIMARY KEY (gateway_id, ts, status)
        )""",
        # A row per gateway every state interval (10 s): 1,000 gateways make
        # ~8.6 M rows a day, so day-sized chunks, which retention drops whole.
        f"""SELECT create_hypertable('{s}.gateway_status_history',
            by_range('ts', INTERVAL '1 day'),
            create_default_indexes => false, if_not_exists => true)""",
    )
    history = _history_retention_days(storage)
    if edition is Edition.COMMUNITY:
        return tables + _retention_policies(s, history)
    return (*tables, retention_function(s, retention_days(storage, catalog)))


def _gateway_outbox_losses(s: str) -> tuple[str, ...]:
    """The readings each gateway's outbox refused and dropped while full (issue 20, item 3).

    Totals since the gateway's outbox file was created, as its states carry
    them (they survive its restarts); 0 in rows stored before, and from
    gateways that predate the fields. The history keeps them beside the
    depth, so a board can show what was lost in a time range.
    """
    return tuple(
        f"ALTER TABLE {s}.{table} ADD COLUMN IF NOT EXISTS {column} bigint NOT NULL DEFAULT 0"
        for table in ("gateway_status", "gateway_status_history")
        for column in ("outbox_refused_readings", "outbox_dropped_readings")
    )


def _ingest_hardening(s: str) -> tuple[str, ...]:
    """Bounded rejects and acks that name the payload (issue 11, items 9 and 10).

    ``rejects.raw`` keeps only the head of a refused payload (ingest's
    ``REJECT_RAW_MAX_BYTES``); ``raw_bytes`` keeps its original size (NULL
    for rows stored before, whose ``raw`` is whole).

    ``ingested_batches`` records the digest of the exact payload committed
    under a batch id, and the key becomes (batch id, digest): a resend (the
    same bytes) is recognised as before, while another payload under the
    same id (a spoof, or a gateway bug) is committed on its own (its
    readings' key still drops duplicates) and acked with its own digest, so
    it can never acknowledge the gateway's real batch. Rows from before the
    upgrade have the digest '': a batch resent across the upgrade is
    committed again, and the readings' key stores each reading once.
    """
    return (
        f"ALTER TABLE {s}.rejects ADD COLUMN IF NOT EXISTS raw_bytes bigint",
        f"""ALTER TABLE {s}.ingested_batches
            ADD COLUMN IF NOT EXISTS digest text NOT NULL DEFAULT ''""",
        f"""ALTER TABLE {s}.ingested_batches DROP CONSTRAINT ingested_batches_pkey,
            ADD PRIMARY KEY (batch_id, digest)""",
    )


def _gateway_rejects(s: str) -> tuple[str, ...]:
    """Rejects that gateways report, aggregated per device and reason over a period.

    A gateway's report row counts ``count`` rejects of one (device, reason)
    between ``first_at`` and ``last_at`` (the gateway's clock); its
    ``received_at`` is the time of the state message that carried it, so a
    state received twice finds its rows already there. Rows stored before
    (one per reject, by ingest) keep ``count`` 1 and no first/last time.
    """
    return (
        f"ALTER TABLE {s}.rejects ADD COLUMN IF NOT EXISTS count bigint NOT NULL DEFAULT 1",
        f"ALTER TABLE {s}.rejects ADD COLUMN IF NOT EXISTS first_at timestamptz",
        f"ALTER TABLE {s}.rejects ADD COLUMN IF NOT EXISTS last_at timestamptz",
        f"""CREATE INDEX IF NOT EXISTS rejects_device_idx
            ON {s}.rejects (device_id, received_at DESC)""",
    )


def _catalog_entries(s: str) -> tuple[str, ...]:
    """Each type's whole catalog entry, as JSON, beside the columns that describe it.

    ``cityhub db migrate`` writes it (``contracts.catalog.encode_device_type``);
    ingest reads it to learn a type defined after it started. NULL until the
    next migrate on a database from before.
    """
    return (f"ALTER TABLE {s}.device_types ADD COLUMN IF NOT EXISTS entry jsonb",)


def _two_tier_geography(s: str) -> tuple[str, ...]:
    """Sites in Hanoi's wards and communes since 1 July 2025 (``contracts.geography``).

    ``admin_units`` lists the 126 commune-level units; ``cityhub db migrate``
    fills it from the package data on every run (``cityhub.database``), so a
    corrected list arrives with an upgrade. A site's ``unit_code`` is the unit
    it is in now; ``district`` becomes the optional former district, kept for
    history (NULL for a site added without one). Sites from before keep their
    former district and have no unit until seeded again or imported with one.
    The audit log learns the subject kind ``site``.
    """
    return (
        f"""CREATE TABLE IF NOT EXISTS {s}.admin_units (
            unit_code text PRIMARY KEY CHECK (unit_code ~ '^[0-9]{{5}}$'),
            name text NOT NULL UNIQUE,
            kind text NOT NULL CHECK (kind IN ('ward', 'commune'))
        )""",
        f"""ALTER TABLE {s}.sites
            ADD COLUMN IF NOT EXISTS unit_code text REFERENCES {s}.admin_units (unit_code)""",
        f"ALTER TABLE {s}.sites ALTER COLUMN district DROP NOT NULL",
        f"CREATE INDEX IF NOT EXISTS sites_unit_idx ON {s}.sites (unit_code)",
        # `cityhub sites` audits its changes like the device commands.
        f"""ALTER TABLE {s}.audit_log DROP CONSTRAINT IF EXISTS audit_log_subject_kind_check,
            ADD CONSTRAINT audit_log_subject_kind_check
            CHECK (subject_kind IN ('device', 'gateway', 'pki', 'site'))""",
    )


def _alert_texts(s: str) -> tuple[str, ...]:
    """Alerts in Vietnamese and English: ``message`` and the new ``description``.

    ``message`` keeps the rendered summary, now "<vi> / <en>"; ``description``
    is the rule's sentence with context, rendered the same way (``alerts.rules``);
    an alert raised before has an empty one.
    """
    return (
        f"ALTER TABLE {s}.alerts ADD COLUMN IF NOT EXISTS description text NOT NULL DEFAULT ''",
    )


def _offline_after(s: str) -> tuple[str, ...]:
    """Each type's ``offline_after_s`` (the catalog's), beside its description.

    ``cityhub db migrate`` writes it with the rest of the type; SQL that asks
    whether a device is online reads it here (``online_sql``).
    """
    return (
        f"""ALTER TABLE {s}.device_types
            ADD COLUMN IF NOT EXISTS offline_after_s double precision NOT NULL DEFAULT 300""",
    )


def online_sql(last_seen: str, offline_after_s: str, now: str = "now()") -> str:
    """The one SQL test of "online": seen within the type's ``offline_after_s``.

    ``last_seen`` and ``offline_after_s`` are column expressions (a device
    never seen has a NULL ``last_seen`` and is not online).
    """
    return f"({last_seen} > {now} - make_interval(secs => {offline_after_s}))"


def _alert_notifications(s: str) -> tuple[str, ...]:
    """The alerts job's notifier state beside its evaluation state (``alert_jobs``).

    The last time Alertmanager took a post, and the last failure with its
    time, so that `cityhub alerts status` can say whether it is reachable. A
    success clears nothing: the times say which came last.
    """
    return (
        f"""ALTER TABLE {s}.alert_jobs
            ADD COLUMN IF NOT EXISTS notified_at timestamptz,
            ADD COLUMN IF NOT EXISTS notify_error text,
            ADD COLUMN IF NOT EXISTS notify_error_at timestamptz""",
    )


def _alert_follow_up(s: str) -> tuple[str, ...]:
    """What operators add to an alert: its Alertmanager silence, an assignee, comments.

    ``alerts.silence_id`` is the silence an acknowledgement created in
    Alertmanager (NULL: none, or not yet: the job creates it), expired by the
    job when the alert stops being ``active_ack``; ``ack_comment`` is the
    acknowledgement's comment, which that silence carries. ``assignee`` is
    who the alert is assigned to. ``alert_notes`` keeps comments and
    assignments with their operator and time, apart from
    ``alert_transitions``, whose key (alert_id, ts, to_state) is for state
    changes: a comment made in the same millisecond as a transition must not
    collide with it. The audit log learns the subject kind ``alert``.
    """
    return (
        f"""ALTER TABLE {s}.alerts
            ADD COLUMN IF NOT EXISTS silence_id text,
            ADD COLUMN IF NOT EXISTS ack_comment text,
            ADD COLUMN IF NOT EXISTS assignee text""",
        # The job looks for silences to create or expire on every full post.
        f"""CREATE INDEX IF NOT EXISTS alerts_silence_idx ON {s}.alerts (alert_id)
            WHERE silence_id IS NOT NULL OR state = 'active_ack'""",
        f"""CREATE TABLE IF NOT EXISTS {s}.alert_notes (
            note_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            alert_id bigint NOT NULL REFERENCES {s}.alerts (alert_id),
            ts timestamptz NOT NULL,
            operator text NOT NULL,
            kind text NOT NULL CHECK (kind IN ('comment', 'assign')),
            text text NOT NULL
        )""",
        f"CREATE INDEX IF NOT EXISTS alert_notes_alert_idx ON {s}.alert_notes (alert_id, ts)",
        f"""ALTER TABLE {s}.audit_log DROP CONSTRAINT IF EXISTS audit_log_subject_kind_check,
            ADD CONSTRAINT audit_log_subject_kind_check
            CHECK (subject_kind IN ('device', 'gateway', 'pki', 'site', 'alert'))""",
    )


def _commands(s: str) -> tuple[str, ...]:
    """Commands to devices (``contracts.commands``): the queue, their states, their history.

    ``commands`` holds one row per command from the moment an operator asks
    for it: what was asked (``name``, ``args`` as checked against the
    catalog), of which device through which gateway, who asked, its ttl, and
    where it is now (``state``, ``state_at``, the last ``detail`` and the
    device's ``answer``). Ingest's dispatcher sends ``queued`` ones to their
    gateway (``sends``, ``last_sent_at``) until the gateway reports ``sent``;
    ``cancel_requested_at`` / ``cancelled_by`` record an operator's cancel,
    which becomes the state ``cancelled`` only when the gateway (or, for a
    command it never got, the hub) confirms it. ``command_events`` keeps each
    state reached once, with the reporter's time and the time it arrived.
    The audit log learns the subject kind ``command``.
    """
    states = ", ".join(f"'{state}'" for state in COMMAND_STATES)
    return (
        f"""CREATE TABLE IF NOT EXISTS {s}.commands (
            command_id text PRIMARY KEY CHECK (command_id {ID_CHECK}),
            device_id text NOT NULL,
            gateway_id text NOT NULL,
            device_type text NOT NULL,
            name text NOT NULL,
            args jsonb NOT NULL,
            ttl_s integer NOT NULL CHECK (ttl_s > 0),
            created_at timestamptz NOT NULL,
            expires_at timestamptz NOT NULL,
            operator text NOT NULL,
            state text NOT NULL CHECK (state IN ({states})),
            state_at timestamptz NOT NULL,
            detail text NOT NULL DEFAULT '',
            answer jsonb,
            sends integer NOT NULL DEFAULT 0,
            last_sent_at timestamptz,
            cancel_requested_at timestamptz,
            cancelled_by text
        )""",
        f"""CREATE INDEX IF NOT EXISTS commands_device_idx
            ON {s}.commands (device_id, created_at DESC)""",
        f"CREATE INDEX IF NOT EXISTS commands_created_idx ON {s}.commands (created_at DESC)",
        # The dispatcher's scan: commands not yet held by their gateway.
        f"""CREATE INDEX IF NOT EXISTS commands_queued_idx ON {s}.commands (last_sent_at)
            WHERE state = 'queued' OR (state = 'sent' AND cancel_requested_at IS NOT NULL)""",
        f"""CREATE TABLE IF NOT EXISTS {s}.command_events (
            command_id text NOT NULL REFERENCES {s}.commands (command_id) ON DELETE CASCADE,
            state text NOT NULL CHECK (state IN ({states})),
            ts timestamptz NOT NULL,
            received_at timestamptz NOT NULL DEFAULT now(),
            source text NOT NULL,
            detail text NOT NULL DEFAULT '',
            PRIMARY KEY (command_id, state)
        )""",
        f"""ALTER TABLE {s}.audit_log DROP CONSTRAINT IF EXISTS audit_log_subject_kind_check,
            ADD CONSTRAINT audit_log_subject_kind_check
            CHECK (subject_kind IN ('device', 'gateway', 'pki', 'site', 'alert', 'command'))""",
    )


def _field_transports(s: str) -> tuple[str, ...]:
    """Devices on Modbus RTU buses, behind a LoRaWAN network server, or posting over HTTP.

    The transport CHECK takes the five of ``contracts.messages.TRANSPORTS``.
    New nullable columns, each set only for its transport (the registry's
    check, ``contracts.messages.check_device_config``, says which): ``model``
    (a catalog Modbus or LoRaWAN model), ``slave_id`` (1-247 on its bus),
    ``poll_interval_s`` (NULL: the model's), ``dev_eui`` (16 lower-case hex
    digits; one active device each) and ``token_sha256`` (an HTTP device's
    bearer token, hashed: the token itself is in its bundle only). Rows from
    before are serial or MQTT devices, with NULL in every new column.
    """
    return (
        f"""ALTER TABLE {s}.devices DROP CONSTRAINT IF EXISTS devices_transport_check,
            ADD CONSTRAINT devices_transport_check
            CHECK (transport IN ('serial', 'mqtt', 'modbus', 'lorawan', 'http'))""",
        f"ALTER TABLE {s}.devices ADD COLUMN IF NOT EXISTS model text",
        f"""ALTER TABLE {s}.devices ADD COLUMN IF NOT EXISTS slave_id integer
            CHECK (slave_id BETWEEN 1 AND 247)""",
        f"""ALTER TABLE {s}.devices ADD COLUMN IF NOT EXISTS poll_interval_s double precision
            CHECK (poll_interval_s > 0)""",
        f"""ALTER TABLE {s}.devices ADD COLUMN IF NOT EXISTS dev_eui text
            CHECK (dev_eui ~ '^[0-9a-f]{{16}}$')""",
        f"""ALTER TABLE {s}.devices ADD COLUMN IF NOT EXISTS token_sha256 text
            CHECK (token_sha256 ~ '^[0-9a-f]{{64}}$')""",
        # A DevEUI names one device on the network server: two active devices
        # with one would be fed each other's uplinks. A revoked device's may be reused.
        f"""CREATE UNIQUE INDEX IF NOT EXISTS devices_dev_eui_idx ON {s}.devices (dev_eui)
            WHERE status = 'active' AND dev_eui IS NOT NULL""",
    )


def _audit_actor(s: str) -> tuple[str, ...]:
    """Who did an audited action, as the database and the machine saw it.

    ``db_user`` is the login of the session that wrote the row
    (``session_user``: a ``SET ROLE`` does not change it), stamped by a
    trigger so that a client cannot write another name (a DEFAULT alone can
    be overridden by an explicit value), nor change it later. ``os_user`` is the operating-system
    user the `cityhub` command ran as, which the command puts in the session
    setting ``cityhub.os_user`` (NULL when the writer did not say). The
    free-text ``operator`` stays as the operator's own comment. Rows from
    before have NULL in both: the columns are added without a default first,
    which would otherwise fill them with the migrating login.
    """
    return (
        f"ALTER TABLE {s}.audit_log ADD COLUMN IF NOT EXISTS db_user text",
        f"ALTER TABLE {s}.audit_log ADD COLUMN IF NOT EXISTS os_user text",
        f"ALTER TABLE {s}.audit_log ALTER COLUMN db_user SET DEFAULT session_user",
        f"""ALTER TABLE {s}.audit_log ALTER COLUMN os_user
            SET DEFAULT nullif(current_setting('cityhub.os_user', true), '')""",
        f"""CREATE OR REPLACE FUNCTION {s}.audit_log_stamp() RETURNS trigger
            LANGUAGE plpgsql AS $fn$
            BEGIN
                IF TG_OP = 'INSERT' THEN
                    NEW.db_user := session_user;
                ELSE
                    NEW.db_user := OLD.db_user;
                END IF;
                RETURN NEW;
            END
            $fn$""",
        f"DROP TRIGGER IF EXISTS audit_log_stamp ON {s}.audit_log",
        f"""CREATE TRIGGER audit_log_stamp BEFORE INSERT OR UPDATE ON {s}.audit_log
            FOR EACH ROW EXECUTE FUNCTION {s}.audit_log_stamp()""",
    )


def _channel(schema: str, suffix: str) -> str:
    # A channel name is an identifier of at most 63 bytes (pg_notify enforces
    # it): a schema name has at most 48 characters, so "_command_states" fits.
    return f"{check_schema_name(schema)}_{suffix}"


def command_channel(schema: str) -> str:
    """The NOTIFY channel that wakes the dispatcher when a command is queued or cancelled."""
    return _channel(schema, "commands")


def command_state_channel(schema: str) -> str:
    """The NOTIFY channel ingest signals when a command's state changes (payload: its id)."""
    return _channel(schema, "command_states")


# A gateway sends its state every 10 s (``GatewaySettings.state_interval_s``):
# 30 missed states in a row is not a hiccup but a gateway killed without its
# Will reaching ingest, or ingest's state worker away (the fleet board's
# "silent").
GATEWAY_SILENT_AFTER_S: Final = 300


def gateway_online_sql(status: str, ts: str, now: str = "now()") -> str:
    """The one SQL test of a gateway "online": its latest state says so, and is recent.

    ``status`` and ``ts`` are ``gateway_status`` column expressions (NULL for
    a gateway that never reported: not online). ``ts`` is the time of its
    newest state; older than ``GATEWAY_SILENT_AFTER_S``, the gateway is
    silent, which counts as not online.
    """
    return (
        f"({status} = 'online' AND {ts} > {now} - make_interval(secs => {GATEWAY_SILENT_AFTER_S}))"
    )


def migrations(
    schema: str,
    edition: Edition,
    storage: StorageSettings,
    catalog: Mapping[str, DeviceType] = DEVICE_TYPES,
) -> list[Migration]:
    """Every migration for ``schema`` on a server of ``edition``, oldest first.

    Generated from ``catalog`` and ``storage`` as they are now: on a database
    migrated before either changed, the applied ones differ from these, and
    the reconcile step (``contracts.evolve``) brings the database up to date.
    """
    s = check_schema_name(schema)
    readings: list[str] = []
    for dtype in catalog.values():
        readings.extend(readings_statements(s, dtype, storage))
    rollups: list[str] = []
    for dtype in catalog.values():
        rollups.extend(rollup_statements(s, dtype, edition, storage))
    if edition is Edition.APACHE:
        rollups.extend(_apache_jobs(s, storage, catalog))
    return [
        Migration(1, "core metadata, device state and rejects", _core(s)),
        Migration(2, "wide readings hypertables from the catalog", tuple(readings)),
        Migration(3, "alerts, transitions and AQI results", _alerts_and_aqi(s)),
        Migration(4, f"hourly rollups and retention ({edition.value} edition)", tuple(rollups)),
        Migration(5, "ingest: processed batch ids and worker stats", _ingest(s)),
        Migration(
            6,
            "retention for rejects, ingest stats and hourly AQI",
            _retention_of_the_rest(s, edition, storage, catalog),
        ),
        Migration(7, "alerts job state", _alert_jobs(s)),
        Migration(8, "provisioning: credentials and audit log", _provisioning(s)),
        Migration(
            9,
            "gateway status: latest state per gateway and its history",
            _gateway_status(s, edition, storage, catalog),
        ),
        Migration(
            10,
            "ingest: bounded reject payloads, batch ids keyed with their payload digest",
            _ingest_hardening(s),
        ),
        Migration(
            11,
            "rejects: gateway reports per device and reason, with count and first/last time",
            _gateway_rejects(s),
        ),
        Migration(
            12, "device types: the whole catalog entry, for running services", _catalog_entries(s)
        ),
        Migration(
            13,
            "sites: current ward/commune (two-tier Hanoi since 2025-07), former district optional",
            _two_tier_geography(s),
        ),
        Migration(14, "alerts: bilingual texts, a description beside the summary", _alert_texts(s)),
        Migration(
            15,
            "alerts job: last Alertmanager post and last notification error",
            _alert_notifications(s),
        ),
        Migration(16, "device types: the catalog's offline_after_s", _offline_after(s)),
        Migration(
            17,
            "alerts: Alertmanager silence of an ack, assignee, operators' comments",
            _alert_follow_up(s),
        ),
        Migration(18, "commands to devices: queue, states, history", _commands(s)),
        Migration(
            19,
            "devices: Modbus, LoRaWAN and HTTP transports (model, slave id, DevEUI, token hash)",
            _field_transports(s),
        ),
        Migration(
            20,
            "audit log: the database login and the OS user of each action",
            _audit_actor(s),
        ),
        Migration(
            21,
            "audit log: services' broker accounts as a subject of their own",
            (
                f"""ALTER TABLE {s}.audit_log DROP CONSTRAINT IF EXISTS
                    audit_log_subject_kind_check,
                ADD CONSTRAINT audit_log_subject_kind_check CHECK (subject_kind IN
                    ('device', 'gateway', 'pki', 'site', 'alert', 'command', 'service'))""",
            ),
        ),
        Migration(
            22,
            "readings by compact device key: data hypertables behind views of the old shape",
            _keyed_readings(s, edition, storage, catalog),
        ),
        Migration(
            23,
            "gateway status: readings the outbox refused and dropped while full",
            _gateway_outbox_losses(s),
        ),
    ]
