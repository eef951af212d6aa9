"""Schema evolution: a database made by the first migrations, brought to a grown catalog.

The "legacy" database is what `cityhub db migrate` made before schemas
evolved: the numbered migrations generated from the catalog frozen in
``legacy_catalog.json`` (whose checksums the first test pins), with readings
in it. The tests then add a device type and a metric (a ``DeviceType`` built
here, passed to ``migrate`` as the catalog, or put into ``DEVICE_TYPES`` for
the ingest writer), change storage settings, and check tables, columns,
rows, policies and the planner's output, on the real PostgreSQL/TimescaleDB
of the fixtures (Apache edition). The community edition's plans are checked
without a server, from a described schema.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest

from cityhub import database
from contracts.catalog import DEVICE_TYPES, DeviceType, Metric, MetricKind
from contracts.evolve import SchemaState, notes, plan, policies
from contracts.messages import encode_batch
from contracts.schema import (
    Edition,
    migrations,
    readings_data_table,
    readings_table,
    retention_days,
    rollup_table,
)
from contracts.settings import StorageSettings
from contracts.topics import batch_topic
from ingest.prepare import prepare_item
from ingest.writer import BatchWriter
from tests.plugins.gateway import now_ms
from tests.plugins.ingest import make_batch, seed_registry

LEGACY = json.loads((Path(__file__).parent / "legacy_catalog.json").read_text("utf-8"))
LEGACY_CATALOG: dict[str, DeviceType] = {
    t.name: t for t in msgspec.convert(LEGACY["device_types"], list[DeviceType])
}

# A device type and a metric the legacy catalog never had.
NOISE = DeviceType(
    name="noise_probe",
    description="Street noise probe (class 2 sound level meter)",
    transports=("mqtt",),
    metrics=(
        Metric(name="laeq", unit="dBA", kind=MetricKind.FLOAT, min=20, max=140, description="LAeq"),
        Metric(
            name="overload", unit="", kind=MetricKind.BOOL, min=0, max=1, description="Overload"
        ),
    ),
)
VOC = Metric(
    name="voc_index", unit="", kind=MetricKind.INT, min=0, max=500, description="VOC index"
)
AIR_WITH_VOC = msgspec.structs.replace(
    LEGACY_CATALOG["air_quality"], metrics=(*LEGACY_CATALOG["air_quality"].metrics, VOC)
)
GROWN_CATALOG = {**LEGACY_CATALOG, "air_quality": AIR_WITH_VOC, "noise_probe": NOISE}

T0 = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)


def _columns(conn, schema, table):
    return {
        r[0]
        for r in conn.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = %s AND table_name = %s",
            (schema, table),
        )
    }


def _schema_snapshot(conn, schema):
    """Every column of every relation, and the functions' bodies: what a dry run must not touch."""
    columns = conn.execute(
        "SELECT table_name, column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = %s ORDER BY 1, 2",
        (schema,),
    ).fetchall()
    functions = conn.execute(
        "SELECT p.proname, p.prosrc FROM pg_proc p JOIN pg_namespace n "
        "ON n.oid = p.pronamespace WHERE n.nspname = %s ORDER BY 1",
        (schema,),
    ).fetchall()
    chunks = conn.execute(
        "SELECT hypertable_name, time_interval FROM timescaledb_information.dimensions "
        "WHERE hypertable_schema = %s ORDER BY 1",
        (schema,),
    ).fetchall()
    types = conn.execute(f"SELECT * FROM {schema}.device_types ORDER BY 1").fetchall()
    return columns, functions, chunks, types


@pytest.fixture
def legacy(db_conn, db_schema):
    """A schema migrated with the legacy catalog and default settings, with readings in it."""
    database.migrate(db_conn, schema=db_schema, storage=StorageSettings(), catalog=LEGACY_CATALOG)
    air = readings_table("air_quality")
    kiosk = readings_table("kiosk")
    for i in range(50):
        ts = T0 + timedelta(seconds=10 * i)
        db_conn.execute(
            f"INSERT INTO {db_schema}.{air} (ts, device_id, seq, recv_ts, pm25, temperature) "
            "VALUES (%s, 'aq-hk-1', %s, %s, %s, %s)",
            (ts, i, ts, 10.0 + i, 25.0),
        )
        db_conn.execute(
            f"INSERT INTO {db_schema}.{kiosk} (ts, device_id, seq, recv_ts) "
            "VALUES (%s, 'ki-hk-1', %s, %s)",
            (ts, i, ts),
        )
    return db_schema


def _rows(conn, schema, table):
    return conn.execute(f"SELECT * FROM {schema}.{table} ORDER BY device_id, ts, seq").fetchall()


def test_legacy_migrations_are_the_ones_applied_before_evolution():
    # An applied migration never changes: same catalog, same settings, same SQL.
    # Later migrations are appended after them.
    applied = migrations("legacy", Edition.APACHE, StorageSettings(), LEGACY_CATALOG)
    legacy = {str(m.version): m.checksum for m in applied if str(m.version) in LEGACY["checksums"]}
    assert legacy == LEGACY["checksums"]
    assert [m.version for m in applied][: len(legacy)] == sorted(int(v) for v in legacy)


def test_a_fresh_migrate_leaves_nothing_to_reconcile(db_conn, db_schema):
    report = database.migrate(db_conn, schema=db_schema, storage=StorageSettings())
    assert report.applied
    assert report.steps == []
    # A setting the Apache edition cannot honour is said, not dropped.
    assert any("compress_after_days" in n for n in report.notes)
    again = database.plan_migration(db_conn, schema=db_schema, storage=StorageSettings())
    assert (again.pending, again.steps) == ([], [])


def test_dry_run_prints_the_plan_and_changes_nothing(db_conn, legacy):
    before = _schema_snapshot(db_conn, legacy)
    planned = database.plan_migration(
        db_conn, schema=legacy, storage=StorageSettings(), catalog=GROWN_CATALOG
    )
    summaries = [s.summary for s in planned.steps]
    assert planned.pending == []
    assert any("create readings_noise_probe" in s for s in summaries)
    assert "add column(s) voc_index to readings_air_quality" in summaries
    assert any("voc_index_avg" in s and "readings_air_quality_1h" in s for s in summaries)
    assert any("refresh_rollups" in s for s in summaries)
    assert any("apply_retention" in s for s in summaries)
    assert _schema_snapshot(db_conn, legacy) == before


def test_upgrade_adds_type_and_metric_keeping_rows(db_conn, legacy):
    air, kiosk = readings_table("air_quality"), readings_table("kiosk")
    old_air, old_kiosk = _rows(db_conn, legacy, air), _rows(db_conn, legacy, kiosk)

    report = database.migrate(
        db_conn, schema=legacy, storage=StorageSettings(), catalog=GROWN_CATALOG
    )

    assert report.applied == []
    assert len(report.steps) == 5  # new type, raw column, rollup columns, two functions
    hypertables = {
        r[0]
        for r in db_conn.execute(
            "SELECT hypertable_name FROM timescaledb_information.hypertables "
            "WHERE hypertable_schema = %s",
            (legacy,),
        )
    }
    # A new type gets the keyed layout at once: its data hypertable, a view of the old shape.
    assert {readings_data_table("noise_probe"), rollup_table("noise_probe")} <= hypertables
    assert _columns(db_conn, legacy, readings_table("noise_probe")) == {
        "ts", "device_id", "seq", "recv_ts", "laeq", "overload"
    }  # fmt: skip
    assert "voc_index" in _columns(db_conn, legacy, air)
    assert {"voc_index_avg", "voc_index_min", "voc_index_max"} <= _columns(
        db_conn, legacy, rollup_table("air_quality")
    )
    # Old rows are intact; the new column is NULL in them.
    now_air = db_conn.execute(
        f"SELECT ts, device_id, seq, recv_ts, pm1, pm25, pm10, co2, no2, o3, temperature, "
        f"humidity FROM {legacy}.{air} ORDER BY device_id, ts, seq"
    ).fetchall()
    assert now_air == old_air
    assert db_conn.execute(f"SELECT count(voc_index) FROM {legacy}.{air}").fetchone() == (0,)
    assert _rows(db_conn, legacy, kiosk) == old_kiosk
    # The registry knows the new type and metric (devices add checks against it).
    assert db_conn.execute(
        f"SELECT unit FROM {legacy}.metrics WHERE device_type = 'noise_probe' AND metric = 'laeq'"
    ).fetchone() == ("dBA",)
    # The Apache edition's jobs cover the new type: rollups and retention.
    retained = database.policies_in_force(db_conn, schema=legacy, storage=StorageSettings(),
                                          catalog=GROWN_CATALOG)[0]  # fmt: skip
    by_table = {(p.table, p.policy): p.in_force for p in retained}
    assert by_table[readings_table("noise_probe"), "retention"] == "90 d"
    assert by_table[rollup_table("noise_probe"), "retention"] == "1825 d"

    second = database.migrate(
        db_conn, schema=legacy, storage=StorageSettings(), catalog=GROWN_CATALOG
    )
    assert (second.applied, second.steps) == ([], [])


def test_a_removed_metric_keeps_its_column_and_data(db_conn, legacy):
    air = LEGACY_CATALOG["air_quality"]
    shrunk = {
        **LEGACY_CATALOG,
        "air_quality": msgspec.structs.replace(
            air, metrics=tuple(m for m in air.metrics if m.name != "temperature")
        ),
    }
    report = database.migrate(db_conn, schema=legacy, storage=StorageSettings(), catalog=shrunk)
    assert not any("temperature" in s.summary for s in report.steps)
    table = readings_table("air_quality")
    assert "temperature" in _columns(db_conn, legacy, table)
    assert db_conn.execute(f"SELECT count(temperature) FROM {legacy}.{table}").fetchone() == (50,)


def test_new_type_rollup_is_refreshed_by_maintain(db_conn, legacy):
    database.migrate(db_conn, schema=legacy, storage=StorageSettings(), catalog=GROWN_CATALOG)
    hour = T0.replace(minute=0)
    for i in range(6):
        db_conn.execute(
            f"INSERT INTO {legacy}.{readings_table('noise_probe')} "
            "(ts, device_id, seq, recv_ts, laeq, overload) VALUES (%s, 'np-1', %s, %s, %s, %s)",
            (hour + timedelta(minutes=i), i, hour, 60.0 + i, i == 5),
        )
    report = database.maintain(
        db_conn, schema=legacy, now=hour + timedelta(hours=2), lookback=timedelta(hours=3)
    )
    assert report.rollup_rows >= 1
    rolled = db_conn.execute(
        f"SELECT n, laeq_max, overload_max FROM {legacy}.{rollup_table('noise_probe')}"
    ).fetchall()
    assert rolled == [(6, 65.0, 1.0)]


def test_storage_settings_are_applied_on_every_migrate(db_conn, legacy):
    changed = StorageSettings(raw_retention_days=30, rollup_retention_days=400,
                              chunk_interval_hours=6)  # fmt: skip
    shown, _ = database.policies_in_force(db_conn, schema=legacy, storage=changed,
                                          catalog=LEGACY_CATALOG)  # fmt: skip
    raw = readings_table("air_quality")
    before = {(p.table, p.policy): (p.in_force, p.setting) for p in shown}
    assert before[raw, "retention"] == ("90 d", "30 d")
    assert before[raw, "chunk interval"] == ("24 h", "6 h")

    report = database.migrate(db_conn, schema=legacy, storage=changed, catalog=LEGACY_CATALOG)
    summaries = [s.summary for s in report.steps]
    assert any(s.startswith("chunk interval of readings_air_quality: 24 -> 6") for s in summaries)
    assert any("apply_retention" in s for s in summaries)

    shown, _ = database.policies_in_force(db_conn, schema=legacy, storage=changed,
                                          catalog=LEGACY_CATALOG)  # fmt: skip
    after = {(p.table, p.policy): (p.in_force, p.setting) for p in shown}
    assert after[raw, "retention"] == ("30 d", "30 d")
    assert after[rollup_table("air_quality"), "retention"] == ("400 d", "400 d")
    assert after["rejects", "retention"] == ("30 d", "30 d")
    assert after[raw, "chunk interval"] == ("6 h", "6 h")
    # The new retention is the one maintain applies: a 40-day-old chunk goes.
    now = T0 + timedelta(days=40)
    report_m = database.maintain(db_conn, schema=legacy, now=now, lookback=timedelta(hours=1))
    assert report_m.dropped_chunks >= 1
    assert db_conn.execute(f"SELECT count(*) FROM {legacy}.{raw}").fetchone() == (0,)

    again = database.migrate(db_conn, schema=legacy, storage=changed, catalog=LEGACY_CATALOG)
    assert again.steps == []


def run_cityhub(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cityhub", *args],
        env={**os.environ, "COLUMNS": "200", **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_db_status_and_dry_run_on_the_command_line(db_url, db_conn, legacy):
    env = {
        "CITYHUB_DATABASE__URL": db_url,
        "CITYHUB_DATABASE__SCHEMA": legacy,
        "CITYHUB_STORAGE__RAW_RETENTION_DAYS": "45",
    }
    before = _schema_snapshot(db_conn, legacy)
    dry = run_cityhub("db", "migrate", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert "would run  redefine apply_retention" in dry.stdout
    assert "nothing changed" in dry.stdout
    assert _schema_snapshot(db_conn, legacy) == before

    status = run_cityhub("db", "status", env=env)
    assert status.returncode == 0, status.stderr
    line = next(
        x for x in status.stdout.splitlines() if "readings_kiosk " in x and "retention" in x
    )
    assert "90 d" in line
    assert "45 d" in line
    assert "differs" in line

    done = run_cityhub("db", "migrate", env=env)
    assert done.returncode == 0, done.stderr
    assert "done     redefine apply_retention" in done.stdout
    assert "note: storage.compress_after_days" in done.stdout
    status = run_cityhub("db", "status", env=env)
    line = next(
        x for x in status.stdout.splitlines() if "readings_kiosk " in x and "retention" in x
    )
    assert line.count("45 d") == 2
    assert "differs" not in line


def test_ingest_stores_a_new_type_and_metric_without_a_restart(
    db_url, db_conn, legacy, monkeypatch
):
    seed_registry(db_conn, legacy, {"gw-1": [("aq-1", "air_quality")]})
    writer = BatchWriter(url=db_url, schema=legacy, worker_id="w0")
    try:
        writer.refresh_owners()
        devices = [("aq-1", "air_quality")]
        batch = make_batch("gw-1", 1, devices, rows_per_device=3)
        item = prepare_item(batch_topic("gw-1"), encode_batch(batch), prefix="",
                            now_ms=now_ms(), owners=writer.owners)  # fmt: skip
        assert writer.commit([item]).readings == 3

        # The catalog grows while the writer's connection stays open; migrate.
        monkeypatch.setitem(DEVICE_TYPES, "air_quality", AIR_WITH_VOC)
        monkeypatch.setitem(DEVICE_TYPES, "noise_probe", NOISE)
        database.migrate(db_conn, schema=legacy, storage=StorageSettings(), catalog=DEVICE_TYPES)
        db_conn.execute(
            f"INSERT INTO {legacy}.devices (device_id, device_type, site_id, gateway_id, "
            "transport) VALUES ('np-1', 'noise_probe', 'hk-hall', 'gw-1', 'mqtt')"
        )
        devices = [("aq-1", "air_quality"), ("np-1", "noise_probe")]
        writer.refresh_owners(["np-1"])
        batch = make_batch("gw-1", 2, devices, rows_per_device=3, start_seq=10)
        item = prepare_item(batch_topic("gw-1"), encode_batch(batch), prefix="",
                            now_ms=now_ms(), owners=writer.owners)  # fmt: skip
        outcome = writer.commit([item])
        assert outcome.readings == 6
        assert writer.connects == 1  # the same connection throughout
    finally:
        writer.close()
    noise = db_conn.execute(
        f"SELECT count(*), count(laeq) FROM {legacy}.{readings_table('noise_probe')}"
    ).fetchone()
    assert noise == (3, 2)  # make_batch leaves every third row's first metric out
    voc = db_conn.execute(
        f"SELECT count(voc_index) FROM {legacy}.{readings_table('air_quality')} "
        "WHERE device_id = 'aq-1' AND seq >= 10"
    ).fetchone()
    assert voc == (3,)


# --- the planner alone, community edition (the test server is the Apache build) ---------


def _community_state(catalog, storage, **changes):
    """A community-edition schema exactly as ``catalog`` and ``storage`` would make it."""
    columns = {}
    for dtype in catalog.values():
        names = frozenset({"ts", "device_id", "seq", "recv_ts", *dtype.metric_names})
        columns[readings_table(dtype.name)] = names
        columns[rollup_table(dtype.name)] = frozenset(
            {"bucket", "device_id", "n"}
            | {f"{m}_{a}" for m in dtype.metric_names for a in ("avg", "min", "max")}
        )
    for table in ("rejects", "ingest_stats", "aqi_hourly", "gateway_status_history"):
        columns[table] = frozenset({"ts"})
    state = SchemaState(
        edition=Edition.COMMUNITY,
        columns=columns,
        chunk_hours={readings_table(t): float(storage.chunk_interval_hours) for t in catalog},
        retention_days=retention_days(storage, catalog),
        compress_after_days={readings_table(t): storage.compress_after_days for t in catalog},
    )
    return msgspec.structs.replace(state, **changes)


def test_community_plan_is_empty_when_the_schema_matches():
    storage = StorageSettings()
    state = _community_state(LEGACY_CATALOG, storage)
    assert plan("cityhub", state, LEGACY_CATALOG, storage) == []
    assert notes(state, LEGACY_CATALOG, storage) == []


def test_community_new_metric_is_stored_raw_and_said_about_the_aggregate():
    storage = StorageSettings()
    state = _community_state(LEGACY_CATALOG, storage)
    steps = plan("cityhub", state, GROWN_CATALOG, storage)
    sql = "\n".join(x for s in steps for x in s.statements)
    assert "ALTER TABLE cityhub.readings_air_quality ADD COLUMN IF NOT EXISTS voc_index" in sql
    assert "ALTER TABLE cityhub.readings_air_quality_1h" not in sql  # an aggregate: not altered
    assert "timescaledb.continuous" in sql  # the new type's aggregate
    assert "add_retention_policy('cityhub.readings_noise_probe_1h'" in sql
    assert "add_compression_policy('cityhub.readings_noise_probe'" in sql
    assert "refresh_rollups" not in sql
    said = notes(state, GROWN_CATALOG, storage)
    assert len(said) == 1
    assert "readings_air_quality_1h" in said[0]
    assert "voc_index" in said[0]


def test_community_changed_settings_replace_the_policies():
    old = StorageSettings()
    new = StorageSettings(raw_retention_days=30, compress_after_days=2, chunk_interval_hours=12)
    state = _community_state(LEGACY_CATALOG, old)
    steps = plan("cityhub", state, LEGACY_CATALOG, new)
    sql = "\n".join(x for s in steps for x in s.statements)
    assert "remove_retention_policy('cityhub.readings_kiosk', if_exists => true)" in sql
    assert "drop_after => INTERVAL '30 days'" in sql
    assert "remove_compression_policy('cityhub.readings_kiosk', if_exists => true)" in sql
    assert "compress_after => INTERVAL '2 days'" in sql
    assert "set_chunk_time_interval('cityhub.readings_kiosk', INTERVAL '12 hours')" in sql
    # Rollups keep their 1825 days: no step touches them.
    assert "readings_kiosk_1h" not in sql
    shown = {(p.table, p.policy): p for p in policies(state, LEGACY_CATALOG, new)}
    assert shown["readings_kiosk", "compression"].in_force == "after 7 d"
    assert shown["readings_kiosk", "compression"].setting == "after 2 d"
    applied = _community_state(LEGACY_CATALOG, new)
    assert plan("cityhub", applied, LEGACY_CATALOG, new) == []


def test_a_removed_type_keeps_its_tables_and_retention():
    storage = StorageSettings()
    state = _community_state(LEGACY_CATALOG, storage)
    apache = msgspec.structs.replace(state, edition=Edition.APACHE, compress_after_days={})
    shrunk = {n: t for n, t in LEGACY_CATALOG.items() if n != "kiosk"}
    for current in (state, apache):
        steps = plan("cityhub", current, shrunk, storage)
        sql = "\n".join(x for s in steps for x in s.statements)
        assert "DROP" not in sql.upper()
        assert "retention" not in sql  # readings_kiosk and its rollup stay under retention
    # A retention change still covers the removed type's tables.
    longer = StorageSettings(raw_retention_days=120)
    (step,) = [s for s in plan("cityhub", apache, shrunk, longer) if "retention" in s.summary]
    assert "('readings_kiosk', 120)" in step.statements[0]
