"""Database adapter of the `cityhub` command: connect, migrate, seed, maintain.

Applies the migrations that ``contracts.schema`` generates, once each, under
an advisory lock so two `cityhub db migrate` runs cannot interleave, and
records each in ``{schema}.schema_migrations``. Then, under the same lock,
it reads what the schema holds (``inspect_schema``) and runs the reconcile
steps that ``contracts.evolve.plan`` computes from it, the catalog and the
storage settings (new types' tables, new metrics' columns, policies), each
in its own transaction; last, the services' roles (``contracts.roles``) are
created if missing and given exactly their privileges on the tables there
are now, new types' included; ``plan_migration`` computes the same without
changing anything (``db migrate --dry-run``). Connections and the error map
are ``adapters.database``'s: an unreachable server is
``DatabaseUnavailableError`` (retryable); while migrating, any statement the
server refuses is ``MigrationError``; elsewhere a schema that is not
migrated is ``SchemaError``.
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from importlib import resources
from typing import Any, Final

import msgspec

from adapters.database import Connection, database_errors, set_login_password
from adapters.database import connect as connect_database
from contracts.catalog import DEVICE_TYPES, DeviceType, encode_device_type
from contracts.errors import MigrationError, SchemaError
from contracts.evolve import Policy, SchemaState, Step, notes, plan, policies
from contracts.geography import UNITS
from contracts.roles import ROLE_KINDS, create_role_statement, grant_statements, role_name
from contracts.schema import (
    Edition,
    Migration,
    check_schema_name,
    migrations,
    parse_retention,
)
from contracts.settings import StorageSettings
from contracts.sites import Site, site_from_fields

logger = logging.getLogger(__name__)


def connect(url: str, *, timeout_s: float = 5.0, os_user: str = "") -> Connection[Any]:
    """A connection of the `cityhub` command (autocommit; a ``with`` block closes it).

    ``os_user``, when given, is put in the session setting ``cityhub.os_user``,
    which the audit log's ``os_user`` column takes by default. An
    unreachable server is DatabaseUnavailableError.
    """
    conn = connect_database(url, timeout_s=timeout_s, application_name="cityhub")
    if os_user:
        with database_errors("setting the session's OS user"):
            conn.execute("SELECT set_config('cityhub.os_user', %s, false)", (os_user,))
    return conn


def detect_edition(conn: Connection[Any]) -> Edition:
    """Which TimescaleDB edition the server runs; fails if the extension is not available."""
    with database_errors("detecting the TimescaleDB edition"):
        row = conn.execute(
            "SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb'"
        ).fetchone()
        if row is None:
            raise SchemaError(
                "the TimescaleDB extension is not installed on this server "
                "(scripts/install-system-deps builds it; docker-compose uses the timescale image)"
            )
        license_row = conn.execute("SELECT current_setting('timescaledb.license', true)").fetchone()
    return Edition.from_license(license_row[0] if license_row else None)


@dataclass(frozen=True)
class MigrationReport:
    """Numbered migrations applied now (and how many were already), reconcile steps run."""

    edition: Edition
    applied: list[Migration]
    already: int
    steps: list[Step] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Types whose catalog entry is new or changed in the database: gateways
    # serving such devices hold the old entry until their config is published.
    changed_types: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class MigrationPlan:
    """What `db migrate` would do: pending migrations, then reconcile steps.

    The reconcile steps are planned against the schema as it is, so only when
    no numbered migration is pending (``steps`` is empty otherwise).
    """

    edition: Edition
    pending: list[Migration]
    steps: list[Step]
    notes: list[str]


# Every column of the schema's tables, views and materialized views: (table, column).
_SCHEMA_COLUMNS_SQL = """SELECT c.relname, a.attname FROM pg_attribute a
    JOIN pg_class c ON c.oid = a.attrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = %s AND c.relkind IN ('r', 'p', 'v', 'm')
    AND a.attnum > 0 AND NOT a.attisdropped"""
_LOCK_SQL = "SELECT pg_advisory_lock(hashtext('cityhub.migrate.' || %s))"
_UNLOCK_SQL = "SELECT pg_advisory_unlock(hashtext('cityhub.migrate.' || %s))"


def migrate(
    conn: Connection[Any],
    *,
    schema: str,
    storage: StorageSettings,
    catalog: Mapping[str, DeviceType] = DEVICE_TYPES,
) -> MigrationReport:
    """Apply pending migrations, reconcile the schema with ``catalog`` and ``storage``; sync.

    Each migration and each reconcile step runs in its own transaction.
    """
    s = check_schema_name(schema)
    with database_errors("cannot create the timescaledb extension", refused_as=MigrationError):
        conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    edition = detect_edition(conn)
    with database_errors(f"migrating schema {s!r}", refused_as=MigrationError):
        return _migrate_locked(conn, s, edition, storage, catalog)


def _migrate_locked(
    conn: Connection[Any],
    s: str,
    edition: Edition,
    storage: StorageSettings,
    catalog: Mapping[str, DeviceType],
) -> MigrationReport:
    """``migrate`` under the schema's advisory lock."""
    conn.execute(_LOCK_SQL, (s,))
    try:
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
        conn.execute(
            f"""CREATE TABLE IF NOT EXISTS {s}.schema_migrations (
                version integer PRIMARY KEY,
                name text NOT NULL,
                checksum text NOT NULL,
                edition text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done: dict[int, str] = dict(
            conn.execute(f"SELECT version, checksum FROM {s}.schema_migrations").fetchall()
        )
        applied: list[Migration] = []
        for migration in migrations(s, edition, storage, catalog):
            if migration.version in done:
                if done[migration.version] != migration.checksum:
                    logger.debug(
                        "migration %d (%s) was applied with another catalog or other settings; "
                        "the reconcile steps bring the schema up to date",
                        migration.version,
                        migration.name,
                    )
                continue
            _apply(conn, s, migration, edition)
            applied.append(migration)
        current = inspect_schema(conn, schema=s, edition=edition)
        steps = plan(s, current, catalog, storage)
        for step in steps:
            _apply_step(conn, s, step)
        changed_types = _sync_catalog(conn, s, catalog)
        _sync_units(conn, s)
        role_notes = sync_roles(conn, s)
    finally:
        conn.execute(_UNLOCK_SQL, (s,))
    return MigrationReport(
        edition=edition,
        applied=applied,
        already=len(done),
        steps=steps,
        notes=notes(current, catalog, storage) + role_notes,
        changed_types=changed_types,
    )


def _apply(conn: Connection[Any], s: str, migration: Migration, edition: Edition) -> None:
    logger.info("applying migration %d: %s", migration.version, migration.name)
    with (
        database_errors(
            f"migration {migration.version} ({migration.name}) failed", refused_as=MigrationError
        ),
        conn.transaction(),
    ):
        for statement in migration.statements:
            conn.execute(statement)
        conn.execute(
            f"INSERT INTO {s}.schema_migrations (version, name, checksum, edition) "
            "VALUES (%s, %s, %s, %s)",
            (migration.version, migration.name, migration.checksum, edition.value),
        )


def _apply_step(conn: Connection[Any], s: str, step: Step) -> None:
    logger.info("schema %s: %s", s, step.summary)
    with (
        database_errors(f"reconcile step failed ({step.summary})", refused_as=MigrationError),
        conn.transaction(),
    ):
        for statement in step.statements:
            conn.execute(statement)


def plan_migration(
    conn: Connection[Any],
    *,
    schema: str,
    storage: StorageSettings,
    catalog: Mapping[str, DeviceType] = DEVICE_TYPES,
) -> MigrationPlan:
    """What ``migrate`` would do now, changing nothing (``db migrate --dry-run``)."""
    s = check_schema_name(schema)
    edition = detect_edition(conn)
    done = {v for v, _, _ in applied_versions(conn, schema=s)}
    pending = [m for m in migrations(s, edition, storage, catalog) if m.version not in done]
    if pending:
        return MigrationPlan(edition=edition, pending=pending, steps=[], notes=[])
    current = inspect_schema(conn, schema=s, edition=edition)
    return MigrationPlan(
        edition=edition,
        pending=[],
        steps=plan(s, current, catalog, storage),
        notes=notes(current, catalog, storage),
    )


def policies_in_force(
    conn: Connection[Any],
    *,
    schema: str,
    storage: StorageSettings,
    catalog: Mapping[str, DeviceType] = DEVICE_TYPES,
) -> tuple[list[Policy], list[str]]:
    """The policies on each table beside the settings, and what the server cannot do."""
    s = check_schema_name(schema)
    current = inspect_schema(conn, schema=s, edition=detect_edition(conn))
    return policies(current, catalog, storage), notes(current, catalog, storage)


def inspect_schema(conn: Connection[Any], *, schema: str, edition: Edition) -> SchemaState:
    """Read what ``contracts.evolve.plan`` compares: tables, columns, chunk sizes, policies."""
    s = check_schema_name(schema)
    columns: dict[str, set[str]] = {}
    retention: dict[str, int] = {}
    compression: dict[str, int] = {}
    refresh = ""
    with database_errors(f"reading schema {s!r}", schema=s):
        for table, column in conn.execute(
            _SCHEMA_COLUMNS_SQL,
            (s,),
        ):
            columns.setdefault(table, set()).add(column)
        chunk_hours = {
            str(table): interval / timedelta(hours=1)
            for table, interval in conn.execute(
                """SELECT hypertable_name, time_interval FROM timescaledb_information.dimensions
                    WHERE hypertable_schema = %s AND time_interval IS NOT NULL""",
                (s,),
            )
        }
        functions = dict(
            conn.execute(
                """SELECT p.proname, p.prosrc FROM pg_proc p
                    JOIN pg_namespace n ON n.oid = p.pronamespace
                    WHERE n.nspname = %s AND p.proname IN ('apply_retention', 'refresh_rollups')""",
                (s,),
            ).fetchall()
        )
        if edition is Edition.COMMUNITY:
            retention, compression = _server_policies(conn, s)
        else:
            retention = parse_retention(functions.get("apply_retention", ""))
            refresh = functions.get("refresh_rollups", "")
    return SchemaState(
        edition=edition,
        columns={t: frozenset(c) for t, c in columns.items()},
        chunk_hours=chunk_hours,
        retention_days=retention,
        compress_after_days=compression,
        refresh_rollups=refresh,
    )


def _server_policies(conn: Connection[Any], s: str) -> tuple[dict[str, int], dict[str, int]]:
    """Community edition: days of each retention and compression policy, by table or view.

    A continuous aggregate's policies are on its materialization hypertable
    (in TimescaleDB's own schema): they are reported under the view's name.
    """
    retention: dict[str, int] = {}
    compression: dict[str, int] = {}
    rows = conn.execute(
        """SELECT coalesce(ca.view_name, j.hypertable_name), j.proc_name,
                (j.config ->> 'drop_after')::interval, (j.config ->> 'compress_after')::interval
            FROM timescaledb_information.jobs j
            LEFT JOIN timescaledb_information.continuous_aggregates ca
                ON ca.materialization_hypertable_schema = j.hypertable_schema
                AND ca.materialization_hypertable_name = j.hypertable_name
            WHERE coalesce(ca.view_schema, j.hypertable_schema) = %s
            AND j.proc_name IN ('policy_retention', 'policy_compression')""",
        (s,),
    ).fetchall()
    for table, proc, drop_after, compress_after in rows:
        if proc == "policy_retention" and drop_after is not None:
            retention[str(table)] = drop_after.days
        elif compress_after is not None:
            compression[str(table)] = compress_after.days
    return retention, compression


def _sync_catalog(conn: Connection[Any], s: str, catalog: Mapping[str, DeviceType]) -> list[str]:
    """Make device_types / metrics hold ``catalog`` (rows of removed types or metrics stay).

    Each type's whole entry goes to ``device_types.entry``: running ingest
    workers read it there when a batch carries a type they do not know yet.
    """
    stored = dict(conn.execute(f"SELECT device_type, entry::text FROM {s}.device_types").fetchall())
    entries = {t.name: encode_device_type(t).decode() for t in catalog.values()}
    changed = [
        name
        for name, entry in entries.items()
        if stored.get(name) is None
        or msgspec.json.decode(stored[name]) != msgspec.json.decode(entry)
    ]
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(
            f"""INSERT INTO {s}.device_types (device_type, description, entry, offline_after_s)
                VALUES (%s, %s, %s::jsonb, %s)
                ON CONFLICT (device_type) DO UPDATE SET description = EXCLUDED.description,
                entry = EXCLUDED.entry, offline_after_s = EXCLUDED.offline_after_s""",
            [(t.name, t.description, entries[t.name], t.offline_after_s) for t in catalog.values()],
        )
        cur.executemany(
            f"""INSERT INTO {s}.metrics
                (device_type, metric, unit, kind, min_value, max_value, description, labels)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
                ON CONFLICT (device_type, metric) DO UPDATE SET
                unit = EXCLUDED.unit, kind = EXCLUDED.kind, min_value = EXCLUDED.min_value,
                max_value = EXCLUDED.max_value, description = EXCLUDED.description,
                labels = EXCLUDED.labels""",
            [
                (t.name, m.name, m.unit, m.kind.value, m.min, m.max, m.description, list(m.labels))
                for t in catalog.values()
                for m in t.metrics
            ],
        )
    return changed


def _sync_units(conn: Connection[Any], s: str) -> None:
    """Make admin_units hold Hanoi's wards and communes (``contracts.geography``)."""
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(
            f"""INSERT INTO {s}.admin_units (unit_code, name, kind) VALUES (%s, %s, %s)
                ON CONFLICT (unit_code) DO UPDATE SET name = EXCLUDED.name, kind = EXCLUDED.kind""",
            [(u.code, u.name, u.kind) for u in UNITS],
        )


def applied_versions(conn: Connection[Any], *, schema: str) -> list[tuple[int, str, datetime]]:
    s = check_schema_name(schema)
    with database_errors("reading the applied migrations", schema=s):
        exists = conn.execute("SELECT to_regclass(%s)", (f"{s}.schema_migrations",)).fetchone()
        if exists is None or exists[0] is None:
            return []
        rows = conn.execute(
            f"SELECT version, name, applied_at FROM {s}.schema_migrations ORDER BY version"
        ).fetchall()
    return [(int(v), str(n), at) for v, n, at in rows]


class _SeedSite(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    id: str
    name: str
    ward: str
    former_district: str
    kind: str
    address: str
    latitude: float
    longitude: float
    opening_hours: str


class _SiteFile(msgspec.Struct, frozen=True):
    site: list[_SeedSite]


def load_hanoi_sites() -> list[Site]:
    """The shipped seed: real Hanoi service halls, ward offices and monitoring points."""
    source = "cityhub/data/hanoi_sites.toml"
    text = resources.files("cityhub").joinpath("data/hanoi_sites.toml").read_text("utf-8")
    seeds = msgspec.convert(tomllib.loads(text), _SiteFile).site
    return [
        site_from_fields(
            {**msgspec.structs.asdict(seed), "site_id": seed.id}, source=source, row=index
        )
        for index, seed in enumerate(seeds, start=1)
    ]


_SITE_COLUMNS: Final = (
    "site_id, name, kind, unit_code, district, address, latitude, longitude, opening_hours"
)


def site_values(site: Site) -> tuple[object, ...]:
    """A site's values in the order of ``_SITE_COLUMNS``."""
    return (
        site.site_id,
        site.name,
        site.kind,
        site.unit_code,
        site.former_district,
        site.address,
        site.latitude,
        site.longitude,
        site.opening_hours,
    )


def seed_sites(conn: Connection[Any], *, schema: str, sites: list[Site]) -> int:
    """Insert or update the sites; returns how many rows were written."""
    s = check_schema_name(schema)
    with database_errors("seeding sites", schema=s), conn.transaction(), conn.cursor() as cur:
        cur.executemany(
            f"""INSERT INTO {s}.sites ({_SITE_COLUMNS})
                    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
                    ON CONFLICT (site_id) DO UPDATE SET name = EXCLUDED.name,
                    kind = EXCLUDED.kind, unit_code = EXCLUDED.unit_code,
                    district = EXCLUDED.district, address = EXCLUDED.address,
                    latitude = EXCLUDED.latitude, longitude = EXCLUDED.longitude,
                    opening_hours = EXCLUDED.opening_hours, updated_at = now()""",
            [site_values(x) for x in sites],
        )
    return len(sites)


@dataclass(frozen=True)
class MaintenanceReport:
    edition: Edition
    rollup_rows: int
    dropped_chunks: int
    packed_indexes: int = 0


# The primary-key indexes of readings chunks that no longer take current
# readings (their range ended before ``now``) and are not packed yet. Devices
# interleave, so each device's index pages split half full as its readings
# arrive: about 47 bytes a row for 36-byte entries (bench/bench_storage.py).
# Rebuilt with fillfactor 100 they take ~36; a late reading still fits, by
# splitting a page. The fillfactor marks an index as packed.
_UNPACKED_CLOSED_INDEXES = """SELECT format('%%I.%%I', n.nspname, x.relname)
    FROM timescaledb_information.chunks c
    JOIN pg_namespace n ON n.nspname = c.chunk_schema
    JOIN pg_class t ON t.relnamespace = n.oid AND t.relname = c.chunk_name
    JOIN pg_index i ON i.indrelid = t.oid AND i.indisprimary
    JOIN pg_class x ON x.oid = i.indexrelid
    WHERE c.hypertable_schema = %s AND c.hypertable_name LIKE 'readings\\_%%\\_data'
    AND c.range_end <= %s AND NOT coalesce(x.reloptions @> '{fillfactor=100}', false)
    ORDER BY c.range_end"""


def maintain(
    conn: Connection[Any], *, schema: str, now: datetime, lookback: timedelta
) -> MaintenanceReport:
    """Refresh hourly rollups over ``lookback`` and apply retention (Apache edition).

    On the community edition the server's own policies do both; this reports
    that and does nothing.
    """
    s = check_schema_name(schema)
    edition = detect_edition(conn)
    if edition is Edition.COMMUNITY:
        return MaintenanceReport(edition=edition, rollup_rows=0, dropped_chunks=0)
    with database_errors("maintenance", schema=s), conn.transaction():
        rows = conn.execute(f"SELECT {s}.refresh_rollups(%s, %s)", (now - lookback, now)).fetchone()
        dropped = conn.execute(f"SELECT {s}.apply_retention(%s)", (now,)).fetchone()
    return MaintenanceReport(
        edition=edition,
        rollup_rows=int(rows[0]) if rows else 0,
        dropped_chunks=int(dropped[0]) if dropped else 0,
        packed_indexes=pack_closed_chunks(conn, schema=s, now=now),
    )


def pack_closed_chunks(conn: Connection[Any], *, schema: str, now: datetime) -> int:
    """Rebuild the key index of readings chunks that ended before ``now``, packed full.

    Apache edition (the community edition compresses those chunks instead).
    On an autocommit connection (the `cityhub` command's) the index is
    rebuilt CONCURRENTLY, so late readings written to its chunk and queries
    reading it are never blocked; inside a caller's transaction a plain
    REINDEX blocks writes to the chunk while it runs. Returns how many were
    packed.
    """
    s = check_schema_name(schema)
    concurrently = "CONCURRENTLY " if conn.autocommit else ""
    with database_errors("packing closed chunks' indexes", schema=s):
        names = [str(r[0]) for r in conn.execute(_UNPACKED_CLOSED_INDEXES, (s, now))]
        for name in names:
            conn.execute(f"ALTER INDEX {name} SET (fillfactor = 100)")
            conn.execute(f"REINDEX INDEX {concurrently}{name}")
    return len(names)


@dataclass(frozen=True)
class DeviceRecord:
    device_id: str
    device_type: str
    site_id: str
    gateway_id: str
    transport: str
    port: str | None = None
    protocol: str | None = None
    label: str = ""
    # Modbus, LoRaWAN and HTTP devices (``contracts.messages.DeviceConfig``'s fields).
    model: str | None = None
    slave_id: int | None = None
    poll_interval_s: float | None = None
    dev_eui: str | None = None
    token_sha256: str | None = None


def register_fleet(
    conn: Connection[Any],
    *,
    schema: str,
    gateways: list[tuple[str, str]],
    devices: list[DeviceRecord],
) -> None:
    """Upsert gateways ``(gateway_id, site_id)`` and devices into the registry tables.

    Ingest checks device ownership against these rows. The technicians'
    provisioning commands write them too; this is the bulk path the local
    stack uses for its simulated fleet.
    """
    s = check_schema_name(schema)
    with (
        database_errors("registering the fleet", schema=s),
        conn.transaction(),
        conn.cursor() as cur,
    ):
        cur.executemany(
            f"""INSERT INTO {s}.gateways (gateway_id, site_id, label) VALUES (%s, %s, %s)
                    ON CONFLICT (gateway_id) DO UPDATE SET site_id = EXCLUDED.site_id,
                    status = 'active', revoked_at = NULL""",
            [(g, site, f"gateway of {site}") for g, site in gateways],
        )
        cur.executemany(
            f"""INSERT INTO {s}.devices (device_id, device_type, site_id, gateway_id,
                    transport, port, protocol, label, model, slave_id, poll_interval_s,
                    dev_eui, token_sha256)
                    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
                    ON CONFLICT (device_id) DO UPDATE SET device_type = EXCLUDED.device_type,
                    site_id = EXCLUDED.site_id, gateway_id = EXCLUDED.gateway_id,
                    transport = EXCLUDED.transport, port = EXCLUDED.port,
                    protocol = EXCLUDED.protocol, label = EXCLUDED.label,
                    model = EXCLUDED.model, slave_id = EXCLUDED.slave_id,
                    poll_interval_s = EXCLUDED.poll_interval_s, dev_eui = EXCLUDED.dev_eui,
                    token_sha256 = EXCLUDED.token_sha256,
                    status = 'active', revoked_at = NULL""",
            [
                (
                    d.device_id,
                    d.device_type,
                    d.site_id,
                    d.gateway_id,
                    d.transport,
                    d.port,
                    d.protocol,
                    d.label,
                    d.model,
                    d.slave_id,
                    d.poll_interval_s,
                    d.dev_eui,
                    d.token_sha256,
                )
                for d in devices
            ],
        )


def sync_roles(conn: Connection[Any], s: str) -> list[str]:
    """Create the schema's service roles if missing and grant their privileges (one transaction).

    Returns notes: a login that may not create roles gets one saying so,
    and the roles are left as they are.
    """
    row = conn.execute(
        "SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    if not (row and row[0]):
        return [
            (
                "the service roles were not created or updated: this login may not create "
                "roles (CREATEROLE); run `cityhub db migrate` as the schema owner with CREATEROLE"
            )
        ]
    tables: dict[str, set[str]] = {}
    for table, column in conn.execute(
        _SCHEMA_COLUMNS_SQL,
        (s,),
    ):
        tables.setdefault(str(table), set()).add(str(column))
    columns = {t: frozenset(c) for t, c in tables.items()}
    with conn.transaction():
        for kind in ROLE_KINDS:
            conn.execute(create_role_statement(role_name(s, kind)))
            for statement in grant_statements(s, kind, columns):
                conn.execute(statement)
    return []


@dataclass(frozen=True)
class RoleRow:
    """A service role of a schema: whether it exists and may log in."""

    kind: str
    role: str
    exists: bool
    can_login: bool


def service_roles(conn: Connection[Any], *, schema: str) -> list[RoleRow]:
    """The schema's service roles in ``ROLE_KINDS`` order (``cityhub db roles``)."""
    s = check_schema_name(schema)
    names = {kind: role_name(s, kind) for kind in ROLE_KINDS}
    with database_errors("reading the service roles", schema=s):
        login = dict(
            conn.execute(
                "SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname = ANY(%s)",
                (list(names.values()),),
            ).fetchall()
        )
    return [
        RoleRow(kind=kind, role=name, exists=name in login, can_login=bool(login.get(name)))
        for kind, name in names.items()
    ]


def set_role_password(conn: Connection[Any], *, schema: str, kind: str, password: str) -> str:
    """Give the schema's ``kind`` role LOGIN and ``password`` (SCRAM); returns the role name.

    SchemaError if the role does not exist yet (`cityhub db migrate` creates it).
    """
    role = role_name(check_schema_name(schema), kind)
    with database_errors(f"setting the password of {role}", refused_as=MigrationError):
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
        if exists is None:
            raise SchemaError(f"role {role} does not exist: run `cityhub db migrate` first")
        set_login_password(conn, role, password)
    return role
