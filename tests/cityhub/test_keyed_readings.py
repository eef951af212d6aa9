"""Migration 22 on a database with readings: rows kept exactly, keyed, still stored once.

The "before" database is made by the migrations up to 21 (``migrate`` given
only those), holding readings of registered devices and of a device the
registry never knew; then ``migrate`` runs migration 22 on it, on the real
PostgreSQL/TimescaleDB of the fixtures (Apache edition).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from cityhub import database
from contracts.catalog import DEVICE_TYPES, DeviceType, Metric, MetricKind
from contracts.errors import RefusedByDatabaseError
from contracts.evolve import SchemaState, plan, policies
from contracts.messages import encode_batch
from contracts.schema import (
    Edition,
    keyed_retention_days,
    migrations,
    readings_data_table,
    readings_table,
    rollup_table,
)
from contracts.settings import StorageSettings
from contracts.topics import batch_topic
from ingest.prepare import prepare_item
from ingest.writer import BatchWriter
from tests.plugins.gateway import now_ms
from tests.plugins.ingest import make_batch, seed_registry

T0 = datetime(2026, 11, 20, 8, 0, 0, 123000, tzinfo=UTC)
KIOSK = readings_table("kiosk")
NOISE = DeviceType(
    name="noise_probe",
    description="Street noise probe",
    transports=("mqtt",),
    metrics=(
        Metric(name="laeq", unit="dBA", kind=MetricKind.FLOAT, min=20, max=140, description="LAeq"),
    ),
)


def _rows(conn, schema, table):
    return conn.execute(f"SELECT * FROM {schema}.{table} ORDER BY device_id, ts, seq").fetchall()


@pytest.fixture
def before_22(db_conn, db_schema, monkeypatch):
    """A schema at migration 21 with kiosk readings: two registered kiosks, one unknown id."""
    with monkeypatch.context() as patch:
        patch.setattr(
            database,
            "migrations",
            lambda *a, **k: [m for m in migrations(*a, **k) if m.version < 22],
        )
        database.migrate(db_conn, schema=db_schema, storage=StorageSettings())
    seed_registry(db_conn, db_schema, {"gw-1": [("ki-1", "kiosk"), ("ki-2", "kiosk")]})
    for i in range(40):
        ts = T0 + timedelta(seconds=10 * i)
        for device in ("ki-1", "ki-2", "ki-ghost"):
            db_conn.execute(
                f"INSERT INTO {db_schema}.{KIOSK} (ts, device_id, seq, recv_ts, queue_length, "
                "paper_level, printer_status) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (ts, device, i, ts + timedelta(milliseconds=250 + i), i, None if i % 3 else 0.5, 1),
            )
    # Two readings of one device in the same millisecond, told apart by seq.
    db_conn.execute(
        f"INSERT INTO {db_schema}.{KIOSK} (ts, device_id, seq, recv_ts) "
        "VALUES (%s, 'ki-1', 999, %s)",
        (T0, T0 + timedelta(days=26)),  # waited 26 days: beyond an int4 of milliseconds
    )
    return db_schema


def test_migration_keeps_every_row_and_keys_it(db_conn, before_22):
    s = before_22
    assert db_conn.execute(f"SELECT max(version) FROM {s}.schema_migrations").fetchone() == (21,)
    old = _rows(db_conn, s, KIOSK)
    assert len(old) == 121

    report = database.migrate(db_conn, schema=s, storage=StorageSettings())

    # 22, then the later ones, which leave readings alone.
    assert report.applied[0].version == 22
    assert report.steps == []  # the migration leaves nothing for the reconcile step
    kinds = dict(
        db_conn.execute(
            "SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n "
            "ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname LIKE 'readings_kiosk%%'",
            (s,),
        ).fetchall()
    )
    assert kinds[KIOSK] == "v"
    assert kinds[readings_data_table("kiosk")] == "r"
    new = _rows(db_conn, s, KIOSK)
    clamped = T0 + timedelta(milliseconds=2**31 - 1)
    # Every row as it was, but the 26-day receive delay, kept at the int4 bound.
    assert new == [(*r[:3], clamped, *r[4:]) if r[2] == 999 else r for r in old]
    keys = dict(db_conn.execute(f"SELECT device_id, device_key FROM {s}.device_keys").fetchall())
    assert set(keys) == {"ki-1", "ki-2", "ki-ghost"}  # the unknown id kept its readings
    per_key = dict(
        db_conn.execute(
            f"SELECT device_key, count(*) FROM {s}.{readings_data_table('kiosk')} GROUP BY 1"
        ).fetchall()
    )
    assert per_key == {keys["ki-1"]: 41, keys["ki-2"]: 40, keys["ki-ghost"]: 40}
    assert db_conn.execute(
        f"SELECT count(*), sum(queue_length) FROM {s}.{KIOSK} WHERE device_id = 'ki-2'"
    ).fetchone() == (40, sum(range(40)))
    # Every other type got its data table and view too, empty.
    for name in DEVICE_TYPES:
        assert db_conn.execute(f"SELECT count(*) FROM {s}.{readings_table(name)}").fetchone()


def test_a_device_registered_after_the_migration_gets_a_new_key(db_conn, before_22):
    s = before_22
    database.migrate(db_conn, schema=s, storage=StorageSettings())
    top = db_conn.execute(f"SELECT max(device_key) FROM {s}.device_keys").fetchone()[0]
    db_conn.execute(
        f"INSERT INTO {s}.devices (device_id, device_type, site_id, gateway_id, transport) "
        "VALUES ('ki-3', 'kiosk', 'hk-hall', 'gw-1', 'mqtt')"
    )
    key = db_conn.execute(f"SELECT device_key FROM {s}.device_keys WHERE device_id = 'ki-3'")
    assert key.fetchone()[0] > top


def test_ingest_after_the_migration_stores_each_reading_once(db_conn, db_url, before_22):
    s = before_22
    database.migrate(db_conn, schema=s, storage=StorageSettings())
    writer = BatchWriter(url=db_url, schema=s, worker_id="w0")
    try:
        writer.refresh_owners()
        devices = [("ki-1", "kiosk"), ("ki-2", "kiosk")]
        batch = make_batch("gw-1", 1, devices, rows_per_device=5, start_seq=100)

        def item():
            return prepare_item(batch_topic("gw-1"), encode_batch(batch), prefix="",
                                now_ms=now_ms(), owners=writer.owners)  # fmt: skip

        first = writer.commit([item()])
        assert (first.readings, first.duplicates) == (10, 0)
        # The same readings again under a batch id no longer known (pruned):
        # the key (device_key, ts, seq) drops every one of them.
        db_conn.execute(f"DELETE FROM {s}.ingested_batches")
        again = writer.commit([item()])
        assert (again.readings, again.duplicates) == (0, 10)
    finally:
        writer.close()
    stored = db_conn.execute(
        f"SELECT device_id, count(*), min(recv_ts - ts) >= interval '0' FROM {s}.{KIOSK} "
        "WHERE seq BETWEEN 100 AND 104 GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert stored == [("ki-1", 5, True), ("ki-2", 5, True)]


def test_rollups_and_retention_run_over_the_migrated_rows(db_conn, before_22):
    s = before_22
    database.migrate(db_conn, schema=s, storage=StorageSettings())
    report = database.maintain(
        db_conn, schema=s, now=T0 + timedelta(hours=2), lookback=timedelta(hours=3)
    )
    assert report.rollup_rows == 3  # one hour, three devices
    rolled = db_conn.execute(
        f"SELECT device_id, n, queue_length_max FROM {s}.{rollup_table('kiosk')} ORDER BY 1"
    ).fetchall()
    assert rolled == [("ki-1", 41, 39.0), ("ki-2", 40, 39.0), ("ki-ghost", 40, 39.0)]
    gone = database.maintain(
        db_conn, schema=s, now=T0 + timedelta(days=200), lookback=timedelta(hours=1)
    )
    assert gone.dropped_chunks >= 1
    assert db_conn.execute(f"SELECT count(*) FROM {s}.{KIOSK}").fetchone() == (0,)


# --- the community edition's SQL, checked without a server (the test server is Apache) ---


def test_community_migration_remakes_aggregates_over_the_data_tables():
    (m,) = [
        m for m in migrations("cityhub", Edition.COMMUNITY, StorageSettings()) if m.version == 22
    ]
    sql = "\n".join(m.statements)
    dropped = sql.index("DROP MATERIALIZED VIEW IF EXISTS cityhub.readings_kiosk_1h")
    # The aggregate depends on the old table: dropped before the rows move, made again after.
    assert (
        dropped
        < sql.index("convert_readings('kiosk'")
        < sql.index("CREATE MATERIALIZED VIEW IF NOT EXISTS cityhub.readings_kiosk_1h")
    )
    assert "FROM cityhub.readings_kiosk_data r JOIN cityhub.device_keys k" in sql
    assert "GROUP BY bucket, k.device_id WITH NO DATA" in sql
    assert "timescaledb.compress_segmentby = 'device_key'" in sql
    assert "add_compression_policy('cityhub.readings_kiosk_data'" in sql
    assert "add_retention_policy('cityhub.readings_kiosk_data'" in sql
    assert "refresh_rollups" not in sql


def test_community_plan_gives_a_new_type_the_keyed_layout():
    storage = StorageSettings()
    columns = {"device_keys": frozenset({"device_key", "device_id"})}
    for name, dtype in DEVICE_TYPES.items():
        columns[readings_table(name)] = frozenset({"ts", "device_id", "seq", "recv_ts"}) | set(
            dtype.metric_names
        )
        columns[readings_data_table(name)] = frozenset({"ts", "seq", "device_key"})
        columns[rollup_table(name)] = frozenset(
            {"bucket", "device_id", "n"}
            | {f"{m}_{a}" for m in dtype.metric_names for a in ("avg", "min", "max")}
        )
    state = SchemaState(
        edition=Edition.COMMUNITY,
        columns=columns,
        chunk_hours={readings_data_table(t): 24.0 for t in DEVICE_TYPES},
        retention_days=keyed_retention_days(storage, DEVICE_TYPES),
        compress_after_days={readings_data_table(t): 7 for t in DEVICE_TYPES},
    )
    catalog = {**DEVICE_TYPES, "noise_probe": NOISE}
    steps = plan("cityhub", state, catalog, storage)
    sql = "\n".join(x for s in steps for x in s.statements)
    assert "CREATE TABLE IF NOT EXISTS cityhub.readings_noise_probe_data" in sql
    assert "cityhub.define_readings_view('noise_probe')" in sql
    assert "add_compression_policy('cityhub.readings_noise_probe_data'" in sql
    assert "add_retention_policy('cityhub.readings_noise_probe_data'" in sql
    # The converted types' policies are where the settings want them: nothing else to do.
    assert len(steps) == 1
    shown = {(p.table, p.policy): p.in_force for p in policies(state, DEVICE_TYPES, storage)}
    assert shown["readings_kiosk", "chunk interval"] == "24 h"
    assert shown["readings_kiosk", "compression"] == "after 7 d"


def test_maintain_packs_the_key_index_of_closed_chunks_once(db_conn, before_22):
    s = before_22
    database.migrate(db_conn, schema=s, storage=StorageSettings())
    # The kiosk rows are in one day's chunk: still open at T0, closed two days on.
    assert database.pack_closed_chunks(db_conn, schema=s, now=T0) == 0
    first = database.maintain(
        db_conn, schema=s, now=T0 + timedelta(days=2), lookback=timedelta(hours=1)
    )
    assert first.packed_indexes == 1
    options = db_conn.execute(
        "SELECT x.reloptions FROM timescaledb_information.chunks c "
        "JOIN pg_class t ON t.relname = c.chunk_name "
        "JOIN pg_index i ON i.indrelid = t.oid AND i.indisprimary "
        "JOIN pg_class x ON x.oid = i.indexrelid "
        "WHERE c.hypertable_schema = %s AND c.hypertable_name = %s",
        (s, readings_data_table("kiosk")),
    ).fetchall()
    assert options == [(["fillfactor=100"],)]
    again = database.maintain(
        db_conn, schema=s, now=T0 + timedelta(days=2), lookback=timedelta(hours=1)
    )
    assert again.packed_indexes == 0
    assert db_conn.execute(f"SELECT count(*) FROM {s}.{KIOSK}").fetchone() == (121,)


def test_the_view_writes_with_its_schema_on_the_search_path(db_conn, migrated):
    """A schema named like the login (``cityhub``) is on the search_path ("$user"):
    the view's trigger functions, which run with a search_path of their own,
    must still name the data table with its schema."""
    s = migrated
    db_conn.execute(f"SET search_path TO {s}, public")
    db_conn.execute(f"SELECT {s}.define_readings_view('kiosk')")
    db_conn.execute("RESET search_path")
    view = f"{s}.{readings_table('kiosk')}"
    db_conn.execute(
        f"INSERT INTO {view} (ts, device_id, seq, recv_ts, queue_length) "
        "VALUES (%s, 'k-1', 1, %s, 3)",
        (T0, T0),
    )
    deleted = db_conn.execute(
        f"DELETE FROM {view} WHERE device_id = 'k-1' RETURNING device_id, seq"
    ).fetchall()
    assert deleted == [("k-1", 1)]
    assert db_conn.execute(f"SELECT count(*) FROM {view}").fetchone() == (0,)


def test_a_reading_of_a_device_without_a_key_is_refused_not_stored_under_another(
    db_conn, db_url, migrated
):
    """An ownership map that names a device the registry has no key for (a
    spoofed or stale map entry) refuses the group: nothing is stored under a
    made-up key, and the batch id is not recorded, so the service commits it
    alone and stores it as a reject."""
    s = migrated
    writer = BatchWriter(url=db_url, schema=s, worker_id="w0")
    try:
        batch = make_batch("gw-1", 1, [("ki-unknown", "kiosk")], rows_per_device=3)
        item = prepare_item(
            batch_topic("gw-1"), encode_batch(batch), prefix="", now_ms=now_ms(),
            owners={"ki-unknown": "gw-1"},
        )  # fmt: skip
        with pytest.raises(RefusedByDatabaseError, match="ki-unknown"):
            writer.commit([item])
    finally:
        writer.close()
    assert db_conn.execute(f"SELECT count(*) FROM {s}.{KIOSK}_data").fetchone() == (0,)
    assert db_conn.execute(f"SELECT count(*) FROM {s}.ingested_batches").fetchone() == (0,)
