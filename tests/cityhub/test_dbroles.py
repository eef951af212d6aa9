"""Database roles per service and the audit actor, on the real PostgreSQL/TimescaleDB.

Each test migrates a schema of its own, which creates that schema's four
roles; the ``db_schema`` fixture drops them afterwards. A role logs in with a
password set by ``set_role_password`` (the private server wants SCRAM over
TCP), so every check here runs as that login, not through SET ROLE.
"""

from __future__ import annotations

import os
import pwd
import secrets
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg import errors as pg_errors
from psycopg.conninfo import make_conninfo
from typer.testing import CliRunner

from alerts.store import AlertStore
from cityhub import database
from cityhub.cli.main import app
from contracts.catalog import DEVICE_TYPES, DeviceType, Metric, MetricKind
from contracts.commands import make_report
from contracts.errors import InvalidIdError, SchemaError, SettingsError
from contracts.messages import encode_gateway_state
from contracts.roles import ROLE_KINDS, grant_statements, privileges, role_name
from contracts.schema import readings_data_table, readings_table
from contracts.settings import DatabaseSettings, StorageSettings, load_settings
from tests.alerts.test_job import KIOSK_RULES, T0, S, alerts_of, make_job, put_series, seed_devices
from tests.devices.test_devices import SITE, env, ok  # noqa: F401 (env: a fixture)
from tests.ingest.test_commands import CommandGateway, command_row, queue_command
from tests.ingest.test_ingest import a_state, latest_state, publish_state
from tests.plugins.gateway import broker_settings, client, now_ms, wait_for
from tests.plugins.ingest import (
    GatewayPlayer,
    Ledger,
    assert_table_equals_ledger,
    ingest_in_thread,
    ingest_settings,
    make_batch,
    seed_registry,
)

Denied = pg_errors.InsufficientPrivilege


def login(db_conn: psycopg.Connection, db_url: str, schema: str, kind: str) -> str:
    """A connection string of the schema's ``kind`` role, after giving it a password."""
    password = secrets.token_urlsafe(18)
    role = database.set_role_password(db_conn, schema=schema, kind=kind, password=password)
    return make_conninfo(db_url, user=role, password=password)


@contextmanager
def as_role(db_conn, db_url, schema, kind) -> Iterator[psycopg.Connection]:
    with psycopg.connect(login(db_conn, db_url, schema, kind), autocommit=True) as conn:
        yield conn


def refused(conn: psycopg.Connection, statement: str, params: tuple = ()) -> None:
    with pytest.raises(Denied):
        conn.execute(statement, params)


def a_reading(schema: str, at: datetime, device_id: str = "k-1") -> tuple[str, tuple]:
    return (
        (
            f"INSERT INTO {schema}.{readings_table('kiosk')} (ts, device_id, seq, recv_ts, "
            "queue_length) VALUES (%s, %s, 1, %s, 5)"
        ),
        (at, device_id, at),
    )


@pytest.fixture
def registry(db_conn, migrated) -> str:
    """A site, a gateway, a kiosk and an HTTP device with a token hash, and a credential."""
    s = migrated
    seed_registry(db_conn, s, {"gw-a": [("k-1", "kiosk")]})
    db_conn.execute(
        f"UPDATE {s}.devices SET token_sha256 = %s WHERE device_id = 'k-1'", ("a" * 64,)
    )
    db_conn.execute(
        f"""INSERT INTO {s}.credentials (broker, username, owner_kind, owner_id, secret_hash)
            VALUES ('central', 'gateway.gw-a', 'gateway', 'gw-a', 'pbkdf2$secret')"""
    )
    return s


def test_role_names_fit_postgresql_and_unknown_kinds_are_refused():
    assert role_name("cityhub", "ingest") == "cityhub_ingest"
    longest = role_name("s" * 48, "technician")
    assert len(longest.encode()) <= 63
    with pytest.raises(InvalidIdError):
        role_name("cityhub", "admin")
    with pytest.raises(InvalidIdError):
        role_name("s" * 49, "reader")
    with pytest.raises(InvalidIdError):
        role_name("x; DROP ROLE postgres", "reader")


def test_grants_follow_the_tables_present_and_hide_secrets_from_services():
    tables = {
        "devices": frozenset({"device_id", "gateway_id", "token_sha256"}),
        "credentials": frozenset({"username", "secret_hash"}),
        "readings_noise": frozenset({"ts", "laeq"}),
        "readings_noise_1h": frozenset({"bucket"}),
        "schema_migrations": frozenset({"version"}),
        "audit_log": frozenset({"audit_id"}),
    }
    assert privileges("ingest", tables)["readings_noise"] == "INSERT"
    assert "readings_noise_1h" not in privileges("ingest", tables)
    assert privileges("alerts", tables)["readings_noise_1h"] == "SELECT"
    assert "schema_migrations" not in privileges("reader", tables)
    assert privileges("technician", tables)["audit_log"] == "SELECT, INSERT"
    reader = grant_statements("s1", "reader", tables)
    assert "GRANT SELECT (device_id, gateway_id) ON s1.devices TO s1_reader" in reader
    assert "GRANT SELECT (username) ON s1.credentials TO s1_reader" in reader
    assert not any("token_sha256" in g or "secret_hash" in g for g in reader)
    technician = grant_statements("s1", "technician", tables)
    # Provisioning writes an HTTP device's token hash into its gateway's config.
    assert "GRANT SELECT, INSERT, UPDATE ON s1.devices TO s1_technician" in technician
    assert not any("GRANT SELECT (" in g for g in technician)


def test_migrate_creates_the_roles_without_login_once(db_conn, migrated):
    rows = database.service_roles(db_conn, schema=migrated)
    assert [(r.kind, r.role, r.exists, r.can_login) for r in rows] == [
        (kind, f"{migrated}_{kind}", True, False) for kind in ROLE_KINDS
    ]
    # Again: nothing to create, grants the same, no error.
    database.migrate(db_conn, schema=migrated, storage=StorageSettings())
    assert database.service_roles(db_conn, schema=migrated) == rows
    with pytest.raises(SchemaError, match="does not exist"):
        database.set_role_password(db_conn, schema="never_migrated", kind="reader", password="x")


def test_a_role_without_a_password_cannot_log_in(db_conn, db_url, migrated):
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(make_conninfo(db_url, user=f"{migrated}_reader", password="guess"))


def test_ingest_writes_readings_and_nothing_it_must_not(db_conn, db_url, registry):
    s = registry
    # A time far from any chunk there is: the insert creates a chunk, as the role.
    at = datetime.now(UTC) + timedelta(days=400)
    with as_role(db_conn, db_url, s, "ingest") as conn:
        conn.execute(*a_reading(s, at))
        conn.execute(*a_reading(s, at - timedelta(days=30)))
        assert conn.execute(f"SELECT device_id, gateway_id FROM {s}.devices").fetchall() == [
            ("k-1", "gw-a")
        ]
        refused(conn, f"DELETE FROM {s}.{readings_table('kiosk')}")
        refused(conn, f"SELECT * FROM {s}.{readings_table('kiosk')}")
        refused(conn, f"UPDATE {s}.devices SET gateway_id = NULL")
        refused(conn, f"UPDATE {s}.gateways SET status = 'revoked'")
        refused(conn, f"SELECT token_sha256 FROM {s}.devices")
        refused(conn, f"SELECT * FROM {s}.credentials")
        refused(
            conn,
            f"""INSERT INTO {s}.alerts (rule_id, device_id, severity, state, raised_at)
                VALUES ('r', 'k-1', 'minor', 'active_unack', now())""",
        )
        refused(conn, f"INSERT INTO {s}.audit_log (operator, action, subject_kind, subject_id) "
                "VALUES ('x', 'device.add', 'device', 'k-1')")  # fmt: skip
        refused(conn, f"DROP TABLE {s}.rejects")
    chunks = db_conn.execute(
        "SELECT count(*) FROM timescaledb_information.chunks "
        "WHERE hypertable_schema = %s AND hypertable_name = %s",
        (s, readings_data_table("kiosk")),
    ).fetchone()[0]
    assert chunks == 2


def test_alerts_reads_readings_writes_alerts_and_not_readings_or_devices(db_conn, db_url, registry):
    s = registry
    db_conn.execute(*a_reading(s, datetime.now(UTC)))
    with as_role(db_conn, db_url, s, "alerts") as conn:
        assert conn.execute(f"SELECT count(*) FROM {s}.{readings_table('kiosk')}").fetchone() == (
            1,
        )
        conn.execute(
            f"""INSERT INTO {s}.alerts (rule_id, device_id, severity, state, raised_at)
                VALUES ('r', 'k-1', 'minor', 'active_unack', now())"""
        )
        refused(conn, *a_reading(s, datetime.now(UTC) - timedelta(hours=1)))
        refused(conn, f"UPDATE {s}.{readings_table('kiosk')} SET queue_length = 0")
        refused(conn, f"UPDATE {s}.devices SET label = 'x'")
        refused(conn, f"INSERT INTO {s}.sites (site_id, name, kind, latitude, longitude) "
                "VALUES ('x', 'x', 'service_hall', 21, 105)")  # fmt: skip
        refused(conn, f"SELECT secret_hash FROM {s}.credentials")
        refused(conn, f"DELETE FROM {s}.alerts")


def test_reader_reads_everything_but_secrets_and_writes_nothing(db_conn, db_url, registry):
    s = registry
    db_conn.execute(*a_reading(s, datetime.now(UTC)))
    tables = [
        str(t)
        for (t,) in db_conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s ORDER BY 1", (s,)
        )
    ]
    with as_role(db_conn, db_url, s, "reader") as conn:
        # What a Grafana session starts with: the schema's tables unqualified,
        # read-only transactions, a statement timeout.
        assert conn.execute("SHOW search_path").fetchone() == (f"{s}, public",)
        assert conn.execute("SHOW statement_timeout").fetchone() == ("30s",)
        conn.execute("SELECT count(*) FROM devices").fetchone()
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute(f"DELETE FROM {s}.rejects")
        # The grants hold on their own, for a session that turns read-only off.
        conn.execute("SET default_transaction_read_only = off")
        for table in tables:
            if table in ("devices", "credentials", "schema_migrations"):
                continue
            conn.execute(f"SELECT * FROM {s}.{table} LIMIT 1")
            refused(conn, f"DELETE FROM {s}.{table}")
            refused(conn, f"TRUNCATE {s}.{table}")
        assert conn.execute(f"SELECT device_id, status FROM {s}.devices").fetchall() == [
            ("k-1", "active")
        ]
        assert conn.execute(f"SELECT username FROM {s}.credentials").fetchall() == [
            ("gateway.gw-a",)
        ]
        refused(conn, f"SELECT * FROM {s}.devices")
        refused(conn, f"SELECT token_sha256 FROM {s}.devices")
        refused(conn, f"SELECT secret_hash FROM {s}.credentials")
        refused(conn, f"SELECT * FROM {s}.schema_migrations")
        refused(conn, *a_reading(s, datetime.now(UTC) - timedelta(hours=1)))
        refused(conn, f"UPDATE {s}.devices SET label = 'x'")
        refused(conn, f"INSERT INTO {s}.audit_log (operator, action, subject_kind, subject_id) "
                "VALUES ('x', 'device.add', 'device', 'k-1')")  # fmt: skip
        refused(conn, f"CREATE TABLE {s}.mine (x int)")


def test_technician_changes_the_registry_appends_to_the_audit_log_only(db_conn, db_url, registry):
    s = registry
    with as_role(db_conn, db_url, s, "technician") as conn:
        conn.execute(f"UPDATE {s}.devices SET label = 'quầy 1' WHERE device_id = 'k-1'")
        conn.execute(f"SELECT token_sha256 FROM {s}.devices").fetchall()
        conn.execute(
            f"INSERT INTO {s}.audit_log (operator, action, subject_kind, subject_id) "
            "VALUES ('Hà', 'device.update', 'device', 'k-1')"
        )
        refused(conn, f"UPDATE {s}.audit_log SET operator = 'someone else'")
        refused(conn, f"DELETE FROM {s}.audit_log")
        refused(conn, f"TRUNCATE {s}.audit_log")
        refused(conn, *a_reading(s, datetime.now(UTC)))
        refused(conn, f"DELETE FROM {s}.{readings_table('kiosk')}")
        refused(conn, f"INSERT INTO {s}.ingested_batches (batch_id) VALUES ('b')")
        refused(conn, f"DELETE FROM {s}.devices")


NOISE = DeviceType(
    name="noise_probe",
    description="Street noise probe",
    transports=("mqtt",),
    metrics=(
        Metric(name="laeq", unit="dBA", kind=MetricKind.FLOAT, min=20, max=140, description="LAeq"),
    ),
)


def test_a_type_added_after_migration_gets_its_grants(db_conn, db_url, migrated):
    s = migrated
    table = readings_table(NOISE.name)
    database.migrate(
        db_conn,
        schema=s,
        storage=StorageSettings(),
        catalog={**DEVICE_TYPES, NOISE.name: NOISE},
    )
    at = datetime.now(UTC) - timedelta(minutes=5)
    with as_role(db_conn, db_url, s, "ingest") as conn:
        conn.execute(
            f"INSERT INTO {s}.{table} (ts, device_id, seq, recv_ts, laeq) "
            "VALUES (%s, 'n1', 1, %s, 61.5)",
            (at, at),
        )
        refused(conn, f"DELETE FROM {s}.{table}")
    with as_role(db_conn, db_url, s, "alerts") as conn:
        assert conn.execute(f"SELECT laeq FROM {s}.{table}").fetchall() == [(61.5,)]
        conn.execute(f"SELECT * FROM {s}.{table}_1h").fetchall()
    with as_role(db_conn, db_url, s, "reader") as conn:
        assert conn.execute(f"SELECT count(*) FROM {s}.{table}").fetchone() == (1,)
        conn.execute("SET default_transaction_read_only = off")
        refused(conn, f"DELETE FROM {s}.{table}")


@pytest.mark.slow
def test_ingest_commits_batches_states_and_rejects_as_its_role(
    mqtt_server, db_conn, db_url, migrated
):
    s = migrated
    t = uuid.uuid4().hex[:6]
    gw = f"gw-{t}"
    devices = [(f"{gw}-{name.replace('_', '')}", name) for name in DEVICE_TYPES]
    seed_registry(db_conn, s, {gw: devices})
    ledger = Ledger()
    player = GatewayPlayer(mqtt_server, gateway_id=gw, prefix=f"t{t}")
    url = login(db_conn, db_url, s, "ingest")
    try:
        with ingest_in_thread(
            settings=ingest_settings(f"t{t}", stats_interval_s=0.2),
            broker=broker_settings(mqtt_server),
            database=DatabaseSettings(url=url, schema=s),
        ) as worker:
            batches = [
                make_batch(gw, n, devices, rows_per_device=5, ledger=ledger) for n in range(3)
            ]
            for batch in batches:
                player.send(batch)
            player.send(batches[0])  # a resend: recognised in ingested_batches
            player.publish_raw(b"\xc1 not msgpack")  # poison: a rejects row
            pub = client(mqtt_server, f"state-{t}")
            try:
                publish_state(pub, f"t{t}", encode_gateway_state(a_state(gw)), gw)
                wait_for(lambda: latest_state(db_conn, s, gw) is not None, 10, "gateway state")
            finally:
                pub.disconnect()
            wait_for(lambda: player.acked == {b.batch_id for b in batches}, 20, "all acked")
            wait_for(lambda: worker.counters.poison == 1, 10, "poison stored")
            wait_for(
                lambda: db_conn.execute(f"SELECT count(*) FROM {s}.ingest_stats").fetchone()[0] > 0,
                10,
                "stats row",
            )
            assert worker.writer.prune_ingested(0.0) >= 3
        assert_table_equals_ledger(db_conn, s, ledger)
        assert db_conn.execute(f"SELECT count(*) FROM {s}.rejects").fetchone()[0] == 1
        stored = db_conn.execute(f"SELECT count(*) FROM {s}.device_state").fetchone()[0]
        assert stored == len(devices)
    finally:
        player.close()


def test_the_alerts_job_cycle_runs_as_its_role(db_conn, db_url, migrated, tmp_path):
    s = migrated
    seed_devices(db_conn, s, [("k1", "kiosk", "hk-hall"), ("k2", "kiosk", "hk-hall")])
    put_series(db_conn, s, "kiosk", "k1", T0 - 60 * S, T0, queue_length=50)
    put_series(db_conn, s, "kiosk", "k2", T0 - 120 * S, T0 - 60 * S, queue_length=0)
    url = login(db_conn, db_url, s, "alerts")
    job = make_job(url, s, KIOSK_RULES, tmp_path, aqi=True)
    try:
        report = job.run_cycle(T0 + 3 * S)
        assert report.evaluated == [T0]
        put_series(db_conn, s, "kiosk", "k1", T0 + 10 * S, T0 + 40 * S, queue_length=10)
        job.run_cycle(T0 + 40 * S)
    finally:
        job.close()
    assert {(r[1], r[2]) for r in alerts_of(db_conn, s)} == {("t-queue", "k1"), ("t-offline", "k2")}
    # An operator's ack is the technicians' (the `cityhub alerts` commands), not the job's.
    alert_id = alerts_of(db_conn, s)[0][0]
    technician = login(db_conn, db_url, s, "technician")
    with AlertStore(url=technician, schema=s, os_user="pham") as store:
        assert store.ack(alert_id, by="Hà", now_ms=T0 + 50 * S).state in (
            "active_ack",
            "cleared_ack",
        )
    assert db_conn.execute(
        f"SELECT action, operator, db_user, os_user FROM {s}.audit_log WHERE subject_id = %s",
        (str(alert_id),),
    ).fetchall() == [("alert.ack", "Hà", f"{s}_technician", "pham")]


def test_the_audit_log_records_who_wrote_and_cannot_be_told_otherwise(db_conn, db_url, migrated):
    s = migrated
    db_conn.execute(
        f"INSERT INTO {s}.audit_log (operator, action, subject_kind, subject_id) "
        "VALUES ('old', 'device.add', 'device', 'd0')"
    )
    owner = db_conn.execute("SELECT session_user").fetchone()[0]
    with as_role(db_conn, db_url, s, "technician") as conn:
        conn.execute("SELECT set_config('cityhub.os_user', 'pham', false)")
        conn.execute(
            f"""INSERT INTO {s}.audit_log (operator, action, subject_kind, subject_id, db_user)
                VALUES ('claims', 'device.add', 'device', 'd1', %s)""",
            (owner,),
        )
        # SET ROLE to another role changes current_user, not the login.
        refused(conn, f"SET ROLE {s}_ingest")
    rows = db_conn.execute(
        f"SELECT subject_id, db_user, os_user FROM {s}.audit_log ORDER BY audit_id"
    ).fetchall()
    assert rows[-1] == ("d1", f"{s}_technician", "pham")
    # The owner can UPDATE, but db_user stays what the database recorded.
    db_conn.execute(f"UPDATE {s}.audit_log SET db_user = 'nobody' WHERE subject_id = 'd1'")
    assert db_conn.execute(
        f"SELECT db_user FROM {s}.audit_log WHERE subject_id = 'd1'"
    ).fetchone() == (f"{s}_technician",)


def test_rows_from_before_the_migration_have_no_actor(db_conn, migrated):
    s = migrated
    # The schema as it was before migration 20, with a row in its audit log.
    db_conn.execute(f"DROP TRIGGER audit_log_stamp ON {s}.audit_log")
    db_conn.execute(f"DROP FUNCTION {s}.audit_log_stamp()")
    db_conn.execute(f"ALTER TABLE {s}.audit_log DROP COLUMN db_user, DROP COLUMN os_user")
    db_conn.execute(f"DELETE FROM {s}.schema_migrations WHERE version = 20")
    db_conn.execute(
        f"INSERT INTO {s}.audit_log (operator, action, subject_kind, subject_id) "
        "VALUES ('old', 'device.add', 'device', 'd0')"
    )
    report = database.migrate(db_conn, schema=s, storage=StorageSettings())
    assert [m.version for m in report.applied] == [20]
    db_conn.execute(
        f"INSERT INTO {s}.audit_log (operator, action, subject_kind, subject_id) "
        "VALUES ('new', 'device.add', 'device', 'd1')"
    )
    owner = db_conn.execute("SELECT session_user").fetchone()[0]
    assert db_conn.execute(
        f"SELECT subject_id, db_user, os_user FROM {s}.audit_log ORDER BY audit_id"
    ).fetchall() == [("d0", None, None), ("d1", owner, None)]


def technician_url(db_conn, db_url: str, schema: str, secret: Path) -> str:
    """The technicians' login as a URL without its password, which ``secret`` holds."""
    password = secrets.token_urlsafe(18)
    database.set_role_password(db_conn, schema=schema, kind="technician", password=password)
    secret.write_text(password + "\n", encoding="utf-8")
    info = psycopg.conninfo.conninfo_to_dict(db_url)
    return f"postgresql://{schema}_technician@{info['host']}:{info['port']}/{info['dbname']}"


@pytest.mark.slow
def test_devices_add_records_the_login_and_the_os_user(env, db_conn, db_url, tmp_path):  # noqa: F811
    s = env["CITYHUB_DATABASE__SCHEMA"]
    secret = tmp_path / "technician_password"
    as_technician = {
        **env,
        "CITYHUB_DATABASE__URL": technician_url(db_conn, db_url, s, secret),
        "CITYHUB_DATABASE__PASSWORD_FILE": str(secret),
        # The environment's claim is not what is recorded: the uid's name is.
        "USER": "mallory",
        "LOGNAME": "mallory",
    }
    os_user = pwd.getpwuid(os.getuid()).pw_name
    gw, device = f"gw-{uuid.uuid4().hex[:8]}", f"aq-{uuid.uuid4().hex[:8]}"
    ok("gateways", "add", gw, "--site", SITE, env=as_technician)
    ok(
        "devices", "add", device, "--type", "air_quality", "--site", SITE, "--gateway", gw,
        "--transport", "serial", "--port", "socket://10.20.0.5:4001", "--protocol", "sds011",
        env=as_technician,
    )  # fmt: skip
    rows = db_conn.execute(
        f"SELECT action, operator, db_user, os_user FROM {s}.audit_log WHERE subject_id = %s",
        (device,),
    ).fetchall()
    assert rows == [("device.add", "Phạm Thu Hà", f"{s}_technician", os_user)]
    shown = ok("audit", "--subject", device, env=as_technician)
    assert f"{s}_technician / {os_user}" in shown
    assert "mallory" not in shown


# --- settings and the command line -------------------------------------------------------


def test_password_file_goes_into_the_url_for_every_host(tmp_path):
    secret = tmp_path / "db_password"
    secret.write_text("p@ss:/wörd\n", encoding="utf-8")
    multi = "postgresql://ingest@h1:5432,h2:5432/hub?target_session_attrs=read-write"
    environ = {"CITYHUB_DATABASE__URL": multi, "CITYHUB_DATABASE__PASSWORD_FILE": str(secret)}
    url = load_settings(None, environ, install_catalog=False).database.url
    assert url is not None
    info = psycopg.conninfo.conninfo_to_dict(url)
    assert info["password"] == "p@ss:/wörd"
    assert (info["host"], info["port"], info["user"]) == ("h1,h2", "5432,5432", "ingest")
    assert info["target_session_attrs"] == "read-write"


@pytest.mark.parametrize(
    ("url", "content", "problem"),
    [
        ("postgresql://u@h/db", None, "cannot read"),
        ("postgresql://u@h/db", "\n", "is empty"),
        ("postgresql://u:other@h/db", "pw", "has a password already"),
        ("host=h user=u", "pw", "postgresql:// URL"),
        (None, "pw", "postgresql:// URL"),
    ],
)
def test_password_file_problems_name_the_key(tmp_path, url, content, problem):
    secret = tmp_path / "pw"
    if content is not None:
        secret.write_text(content, encoding="utf-8")
    environ = {"CITYHUB_DATABASE__PASSWORD_FILE": str(secret)}
    if url is not None:
        environ["CITYHUB_DATABASE__URL"] = url
    with pytest.raises(SettingsError, match=problem) as caught:
        load_settings(None, environ, install_catalog=False)
    assert caught.value.key == "database.password_file"
    assert "other" not in str(caught.value)


def test_set_password_and_roles_commands(db_url, migrated, tmp_path):
    cli_env = {
        "CITYHUB_DATABASE__URL": db_url,
        "CITYHUB_DATABASE__SCHEMA": migrated,
        "COLUMNS": "200",
    }
    secret = tmp_path / "reader_password"
    secret.write_text(secrets.token_urlsafe(18) + "\n", encoding="utf-8")
    before = CliRunner().invoke(app, ["db", "roles"], env=cli_env)
    assert before.exit_code == 0, before.output
    assert before.output.count("không / no") == 4
    done = CliRunner().invoke(
        app, ["db", "set-password", "reader", "--password-file", str(secret)], env=cli_env
    )
    assert done.exit_code == 0, done.output
    assert f"{migrated}_reader" in done.output
    after = CliRunner().invoke(app, ["db", "roles"], env=cli_env)
    assert after.output.count("không / no") == 3
    # The reader logs in with it, through database.password_file.
    info = psycopg.conninfo.conninfo_to_dict(db_url)
    reader_url = f"postgresql://{migrated}_reader@{info['host']}:{info['port']}/{info['dbname']}"
    as_reader = {**cli_env, "CITYHUB_DATABASE__URL": reader_url}
    as_reader["CITYHUB_DATABASE__PASSWORD_FILE"] = str(secret)
    listed = CliRunner().invoke(app, ["db", "roles"], env=as_reader)
    assert listed.exit_code == 0, listed.output
    secret.write_text("wrong\n", encoding="utf-8")
    wrong = CliRunner().invoke(app, ["db", "roles"], env=as_reader)
    assert wrong.exit_code != 0
    assert "password authentication failed" in wrong.output
    bad = CliRunner().invoke(
        app, ["db", "set-password", "admin", "--password-file", str(secret)], env=cli_env
    )
    assert bad.exit_code != 0
    assert "admin" in bad.output


@pytest.mark.slow
def test_commands_queued_by_technicians_are_dispatched_and_reported_by_ingest_as_roles(
    mqtt_server, db_conn, db_url, migrated
):
    s = migrated
    t = uuid.uuid4().hex[:6]
    gw, prefix = f"gw-{t}", f"t{t}"
    seed_registry(db_conn, s, {gw: [("aq-hk-01", "air_quality")]})
    gateway = CommandGateway(mqtt_server, gateway_id=gw, prefix=prefix)
    try:
        with as_role(db_conn, db_url, s, "technician") as technician:
            command_id = queue_command(technician, s, gateway_id=gw)
        with ingest_in_thread(
            settings=ingest_settings(prefix, command_resend_s=30.0),
            broker=broker_settings(mqtt_server),
            database=DatabaseSettings(url=login(db_conn, db_url, s, "ingest"), schema=s),
        ) as worker:
            wait_for(lambda: command_id in gateway.sent_ids(), 10, "the command sent")
            at = now_ms()
            gateway.publish(
                make_report(command_id, "aq-hk-01", "sent", at),
                make_report(command_id, "aq-hk-01", "succeeded", at + 10, answer={"v": 1}),
            )
            wait_for(lambda: len(gateway.acks) >= 1, 10, "the reports acked")
            assert worker.counters.command_reports_stored == 2
        assert command_row(db_conn, s, command_id)[:3] == ("succeeded", "", {"v": 1})
    finally:
        gateway.close()
