"""Database roles per service: their names and the privileges each gets, as SQL statements.

A schema ``S`` has four roles besides its owner (who keeps the migrations):
``S_ingest`` writes readings and what ingest keeps beside them, ``S_alerts``
reads readings and writes alerts and AQI, ``S_reader`` only reads (Grafana),
``S_technician`` changes the registry and the commands and appends to the
audit log. ``privileges`` says which table gets which privileges;
``role_statements`` turns it and the tables a schema holds into the SQL that
creates the roles (NOLOGIN: ``cityhub db set-password`` gives one a login)
and grants exactly those privileges, revoking any other first. Running the
statements, under the migration lock, is ``cityhub.database``'s job; it runs
them after every migration and reconcile step, so a device type's tables
added later get their grants in the same run (TimescaleDB copies a
hypertable's grants to its chunks).

Credentials (``credentials.secret_hash``) and HTTP device tokens
(``devices.token_sha256``) are hashes, but of secrets: only the technicians'
role reads them (provisioning writes the token hash into a gateway's config).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from contracts.errors import InvalidIdError
from contracts.schema import check_schema_name

ROLE_KINDS: Final = ("ingest", "alerts", "reader", "technician")
# PostgreSQL truncates identifiers longer than NAMEDATALEN - 1 bytes.
MAX_ROLE_NAME_BYTES: Final = 63

# Columns only the technicians' role may read.
SECRET_COLUMNS: Final[Mapping[str, frozenset[str]]] = {
    "credentials": frozenset({"secret_hash"}),
    "devices": frozenset({"token_sha256"}),
}

# A device type's readings (the data hypertable readings_{type}_data and the
# view readings_{type} over it), and their hourly rollups (a continuous
# aggregate or the project's own table): matched by name, so types added later match.
READINGS: Final = "readings_*"
ROLLUPS: Final = "readings_*_1h"

# device_keys: ingest maps device ids to the readings' compact keys (migration 22).
_REGISTRY_READ = (
    "sites",
    "admin_units",
    "gateways",
    "devices",
    "device_keys",
    "device_types",
    "metrics",
)

# kind -> table (or READINGS / ROLLUPS) -> privileges. Read from the SQL each
# service runs: ingest/writer.py, ingest/commandstore.py (ingest); alerts/store.py
# and alerts/aqijob.py (alerts); devices/registry.py, devices/commands.py and the
# alerts commands of `cityhub alerts` (technician). A RETURNING clause, an
# ON CONFLICT DO UPDATE and SELECT ... FOR UPDATE each need SELECT or UPDATE too.
_PRIVILEGES: Final[Mapping[str, Mapping[str, str]]] = {
    "ingest": {
        **dict.fromkeys(_REGISTRY_READ, "SELECT"),
        READINGS: "INSERT",
        "ingested_batches": "SELECT, INSERT, DELETE",
        "ingest_stats": "INSERT",
        "rejects": "SELECT, INSERT",
        "device_state": "SELECT, INSERT, UPDATE",
        "gateway_status": "SELECT, INSERT, UPDATE",
        "gateway_status_history": "INSERT",
        "commands": "SELECT, UPDATE",
        "command_events": "SELECT, INSERT",
    },
    "alerts": {
        **dict.fromkeys(_REGISTRY_READ, "SELECT"),
        READINGS: "SELECT",
        ROLLUPS: "SELECT",
        "device_state": "SELECT",
        "gateway_status": "SELECT",
        "alerts": "SELECT, INSERT, UPDATE",
        "alert_transitions": "SELECT, INSERT",
        "alert_notes": "SELECT",
        "alert_jobs": "SELECT, INSERT, UPDATE",
        "aqi_hourly": "SELECT, INSERT, UPDATE",
        "aqi_daily": "SELECT, INSERT, UPDATE",
    },
    # Everything but the schema's migration record, read only.
    "reader": {"*": "SELECT"},
    "technician": {
        "*": "SELECT",
        "sites": "SELECT, INSERT, UPDATE",
        "gateways": "SELECT, INSERT, UPDATE",
        "devices": "SELECT, INSERT, UPDATE",
        "credentials": "SELECT, INSERT, UPDATE",
        # Appended to, never changed: not even by the people it records.
        "audit_log": "SELECT, INSERT",
        "commands": "SELECT, INSERT, UPDATE",
        "command_events": "SELECT, INSERT",
        # `cityhub alerts ack / assign / comment`.
        "alerts": "SELECT, UPDATE",
        "alert_transitions": "SELECT, INSERT",
        "alert_notes": "SELECT, INSERT",
    },
}
# Roles that may read SECRET_COLUMNS.
_READS_SECRETS: Final = frozenset({"technician"})
# Tables of the owner alone.
_OWNER_ONLY: Final = frozenset({"schema_migrations"})


def role_name(schema: str, kind: str) -> str:
    """``{schema}_{kind}``; InvalidIdError if ``kind`` is unknown or the name is too long."""
    if kind not in ROLE_KINDS:
        raise InvalidIdError(f"role kind {kind!r} is not one of {', '.join(ROLE_KINDS)}")
    name = f"{check_schema_name(schema)}_{kind}"
    if len(name.encode()) > MAX_ROLE_NAME_BYTES:
        raise InvalidIdError(
            f"role name {name!r} is longer than {MAX_ROLE_NAME_BYTES} bytes: use a shorter schema"
        )
    return name


def role_names(schema: str) -> dict[str, str]:
    """kind -> role name, for every kind."""
    return {kind: role_name(schema, kind) for kind in ROLE_KINDS}


def _table_privileges(kind: str, table: str) -> str:
    spec = _PRIVILEGES[kind]
    if table in _OWNER_ONLY:
        return ""
    if table in spec:
        return spec[table]
    if table.startswith("readings_") and table.endswith("_1h") and ROLLUPS in spec:
        return spec[ROLLUPS]
    if table.startswith("readings_") and not table.endswith("_1h") and READINGS in spec:
        return spec[READINGS]
    return spec.get("*", "")


def privileges(kind: str, tables: Mapping[str, frozenset[str]]) -> dict[str, str]:
    """table -> privileges of ``kind``'s role, for the ``tables`` (name -> columns) present."""
    granted = {t: _table_privileges(kind, t) for t in sorted(tables)}
    return {t: p for t, p in granted.items() if p}


def create_role_statement(role: str) -> str:
    """Create ``role`` NOLOGIN unless it exists (roles are cluster-wide, not per schema)."""
    return f"""DO $do$ BEGIN
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN
            CREATE ROLE {role} NOLOGIN;
        END IF;
        END $do$"""


def grant_statements(schema: str, kind: str, tables: Mapping[str, frozenset[str]]) -> list[str]:
    """Revoke what ``kind``'s role holds in ``schema``, then grant exactly its privileges.

    Run in one transaction, no session sees the role without its grants.
    SELECT on a table with secret columns is granted column by column,
    leaving those out, unless the role reads secrets.
    """
    s = check_schema_name(schema)
    role = role_name(s, kind)
    statements = [
        f"GRANT USAGE ON SCHEMA {s} TO {role}",
        f"REVOKE ALL ON ALL TABLES IN SCHEMA {s} FROM {role}",
        f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA {s} FROM {role}",
    ]
    writes = False
    for table, granted in privileges(kind, tables).items():
        names = [p.strip() for p in granted.split(",")]
        writes = writes or "INSERT" in names
        hidden = SECRET_COLUMNS.get(table, frozenset()) & tables[table]
        if "SELECT" in names and hidden and kind not in _READS_SECRETS:
            names.remove("SELECT")
            visible = ", ".join(sorted(tables[table] - hidden))
            statements.append(f"GRANT SELECT ({visible}) ON {s}.{table} TO {role}")
        if names:
            statements.append(f"GRANT {', '.join(names)} ON {s}.{table} TO {role}")
    if writes:
        # Serial keys (audit_log's) draw from a sequence; identity columns do not need this.
        statements.append(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA {s} TO {role}")
    statements.extend(session_defaults(s, kind))
    return statements


def session_defaults(schema: str, kind: str) -> list[str]:
    """``ALTER ROLE ... SET`` lines: what a session of ``kind``'s role starts with.

    Every role finds the schema's tables unqualified (the boards' SQL names
    them so). The reader's sessions are read-only whatever a query asks, and a
    board query is cut after 30 s: a panel that slow is a panel to fix, and it
    must not hold a backend of the database that ingest writes to.
    """
    s = check_schema_name(schema)
    role = role_name(s, kind)
    statements = [f"ALTER ROLE {role} SET search_path = {s}, public"]
    if kind == "reader":
        statements.append(f"ALTER ROLE {role} SET default_transaction_read_only = on")
        statements.append(f"ALTER ROLE {role} SET statement_timeout = '30s'")
    return statements
