"""Migrations, hypertables, idempotent writes, rollups, retention and seed on real TimescaleDB."""

from __future__ import annotations

import unicodedata
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from cityhub import database
from contracts.catalog import DEVICE_TYPES
from contracts.errors import InvalidIdError, SchemaError
from contracts.schema import (
    Edition,
    migrations,
    readings_data_table,
    readings_table,
    rollup_table,
)
from contracts.settings import StorageSettings


def test_migrations_apply_twice_cleanly(db_conn, db_schema, storage):
    first = database.migrate(db_conn, schema=db_schema, storage=storage)
    second = database.migrate(db_conn, schema=db_schema, storage=storage)
    expected = [m.version for m in migrations(db_schema, first.edition, storage)]
    assert [m.version for m in first.applied] == expected
    assert first.already == 0
    assert second.applied == []
    assert second.already == len(expected)
    versions = [v for v, _, _ in database.applied_versions(db_conn, schema=db_schema)]
    assert versions == expected


def test_edition_detection_takes_the_apache_path_here(db_conn, migrated):
    # The test machines build TimescaleDB with APACHE_ONLY (scripts/install-system-deps).
    assert database.detect_edition(db_conn) is Edition.APACHE
    editions = db_conn.execute(f"SELECT DISTINCT edition FROM {migrated}.schema_migrations")
    assert [row[0] for row in editions] == ["apache"]


def test_every_device_type_has_a_wide_hypertable(db_conn, migrated):
    rows = db_conn.execute(
        "SELECT hypertable_name FROM timescaledb_information.hypertables "
        "WHERE hypertable_schema = %s",
        (migrated,),
    ).fetchall()
    names = {r[0] for r in rows}
    for dtype in DEVICE_TYPES.values():
        # Stored by device key (migration 22); readings_{type} is the view readers use.
        assert readings_data_table(dtype.name) in names
        assert rollup_table(dtype.name) in names
        columns = {
            r[0]
            for r in db_conn.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = %s AND table_name = %s",
                (migrated, readings_table(dtype.name)),
            )
        }
        assert set(dtype.metric_names) | {"ts", "device_id", "seq", "recv_ts"} == columns
    assert {"rejects", "aqi_hourly"} <= names


def test_catalog_is_synced_into_metric_tables(db_conn, migrated):
    count = db_conn.execute(f"SELECT count(*) FROM {migrated}.metrics").fetchone()[0]
    assert count == sum(len(t.metrics) for t in DEVICE_TYPES.values())
    unit = db_conn.execute(
        f"SELECT unit, max_value FROM {migrated}.metrics WHERE device_type = 'air_quality' "
        "AND metric = 'pm25'"
    ).fetchone()
    assert unit == ("ug/m3", 1000.0)


def _insert_air(conn, schema, rows):
    """Stage rows in a temp table with COPY, then INSERT ... ON CONFLICT DO NOTHING."""
    table = readings_table("air_quality")
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(
            f"CREATE TEMP TABLE stage (LIKE {schema}.{table} INCLUDING DEFAULTS) ON COMMIT DROP"
        )
        with cur.copy("COPY stage (ts, device_id, seq, recv_ts, pm25) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        cur.execute(f"INSERT INTO {schema}.{table} SELECT * FROM stage ON CONFLICT DO NOTHING")
        return cur.rowcount


def test_duplicates_are_dropped_by_the_unique_key(db_conn, migrated):
    t0 = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)
    rows = [(t0 + timedelta(seconds=i), "aq-hk-1", i, t0, 20.0 + i) for i in range(100)]
    assert _insert_air(db_conn, migrated, rows) == 100
    # The whole batch again (a resend after a lost ack), plus 10 new readings.
    more = [(t0 + timedelta(seconds=100 + i), "aq-hk-1", 100 + i, t0, 1.0) for i in range(10)]
    assert _insert_air(db_conn, migrated, rows + more) == 10
    table = readings_table("air_quality")
    total = db_conn.execute(f"SELECT count(*), count(DISTINCT seq) FROM {migrated}.{table}")
    assert total.fetchone() == (110, 110)
    # A plain INSERT of a duplicate is refused by the key, so nothing can sneak past it.
    with pytest.raises(psycopg.errors.UniqueViolation):
        db_conn.execute(
            f"INSERT INTO {migrated}.{table} (ts, device_id, seq, recv_ts) VALUES (%s, %s, %s, %s)",
            (t0, "aq-hk-1", 0, t0),
        )


def test_apache_rollup_and_retention_jobs(db_conn, migrated):
    now = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    hour = now.replace(minute=0) - timedelta(hours=2)
    old = now - timedelta(days=StorageSettings().raw_retention_days + 10)
    rows = [(hour + timedelta(minutes=i), "aq-cg-1", i, hour, float(i)) for i in range(60)]
    rows += [(old, "aq-cg-1", 1000, old, 5.0)]
    _insert_air(db_conn, migrated, rows)

    report = database.maintain(db_conn, schema=migrated, now=now, lookback=timedelta(hours=72))
    assert report.edition is Edition.APACHE
    assert report.rollup_rows == 1
    assert report.dropped_chunks == 1  # the chunk holding the 100-day-old reading
    rollup = db_conn.execute(
        f"SELECT n, pm25_avg, pm25_min, pm25_max FROM {migrated}.{rollup_table('air_quality')}"
    ).fetchall()
    assert rollup == [(60, pytest.approx(29.5), 0.0, 59.0)]
    remaining = db_conn.execute(
        f"SELECT count(*) FROM {migrated}.{readings_table('air_quality')}"
    ).fetchone()
    assert remaining == (60,)

    # Re-running recomputes the same hour in place: no duplicate rollup rows.
    again = database.maintain(db_conn, schema=migrated, now=now, lookback=timedelta(hours=72))
    assert again.rollup_rows == 1
    count = db_conn.execute(f"SELECT count(*) FROM {migrated}.{rollup_table('air_quality')}")
    assert count.fetchone() == (1,)


def test_seed_loads_hanoi_sites_idempotently(db_conn, migrated):
    sites = database.load_hanoi_sites()
    assert database.seed_sites(db_conn, schema=migrated, sites=sites) == len(sites)
    assert database.seed_sites(db_conn, schema=migrated, sites=sites) == len(sites)
    rows = db_conn.execute(f"SELECT site_id, name, district FROM {migrated}.sites").fetchall()
    assert len(rows) == len(sites)
    names = {r[1] for r in rows}
    districts = {r[2] for r in rows}
    assert {"Long Biên", "Hoàn Kiếm", "Ba Đình", "Cầu Giấy", "Đống Đa", "Hà Đông"} <= districts
    # Vietnamese text survives the round trip, NFC-normalised.
    assert all(unicodedata.is_normalized("NFC", n) for n in names)
    assert any(not n.isascii() for n in names)


def test_seed_into_an_unmigrated_schema_names_the_fix(db_conn, db_schema):
    db_conn.execute(f"CREATE SCHEMA {db_schema}")
    with pytest.raises(SchemaError, match="cityhub db migrate"):
        database.seed_sites(db_conn, schema=db_schema, sites=database.load_hanoi_sites())


@pytest.mark.parametrize("bad", ["Public", "1abc", "a;drop", "a-b", "", "x" * 49])
def test_schema_names_are_allow_listed(bad):
    with pytest.raises(InvalidIdError):
        migrations(bad, Edition.APACHE, StorageSettings())


def test_community_edition_uses_server_policies():
    # Not runnable here (the Apache build has no continuous aggregates); check
    # that the community path asks the server for what only it has.
    sql = "\n".join(
        s for m in migrations("cityhub", Edition.COMMUNITY, StorageSettings()) for s in m.statements
    )
    assert "timescaledb.continuous" in sql
    assert "add_compression_policy" in sql
    assert "add_retention_policy" in sql
    assert "refresh_rollups" not in sql
    apache = "\n".join(
        s for m in migrations("cityhub", Edition.APACHE, StorageSettings()) for s in m.statements
    )
    assert "timescaledb.continuous" not in apache
    assert "add_retention_policy" not in apache
    assert "drop_chunks" in apache


def test_apache_retention_covers_rejects_and_ingest_stats(db_conn, migrated):
    now = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    old = now - timedelta(days=StorageSettings().raw_retention_days + 10)
    for ts in (old, now):
        db_conn.execute(
            f"INSERT INTO {migrated}.rejects (received_at, reason) VALUES (%s, 'malformed')", (ts,)
        )
        db_conn.execute(
            f"INSERT INTO {migrated}.ingest_stats (ts, worker_id, interval_s, readings, "
            "duplicates, batches, replayed, poison, rejects, commits) "
            "VALUES (%s, 'w', 10, 0, 0, 0, 0, 0, 0, 0)",
            (ts,),
        )
    report = database.maintain(db_conn, schema=migrated, now=now, lookback=timedelta(hours=1))
    assert report.dropped_chunks == 2  # the old chunk of each table
    for table, column in (("rejects", "received_at"), ("ingest_stats", "ts")):
        left = db_conn.execute(f"SELECT {column} FROM {migrated}.{table}").fetchall()
        assert left == [(now,)]


def test_gateway_status_history_is_a_hypertable_under_retention(db_conn, migrated):
    hypertables = {
        r[0]
        for r in db_conn.execute(
            "SELECT hypertable_name FROM timescaledb_information.hypertables "
            "WHERE hypertable_schema = %s",
            (migrated,),
        )
    }
    assert "gateway_status_history" in hypertables
    assert "gateway_status" not in hypertables  # one row per gateway, updated in place
    now = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    old = now - timedelta(days=StorageSettings().raw_retention_days + 10)
    for ts in (old, now):
        db_conn.execute(
            f"INSERT INTO {migrated}.gateway_status_history (ts, gateway_id, status, "
            "outbox_depth, outbox_readings, readings_per_s, devices_online) "
            "VALUES (%s, 'gw-1', 'online', 3, 300, 1.5, 4)",
            (ts,),
        )
    report = database.maintain(db_conn, schema=migrated, now=now, lookback=timedelta(hours=1))
    assert report.dropped_chunks == 1
    left = db_conn.execute(f"SELECT ts FROM {migrated}.gateway_status_history").fetchall()
    assert left == [(now,)]


def test_community_retention_policy_covers_gateway_status_history():
    (last,) = [
        m for m in migrations("cityhub", Edition.COMMUNITY, StorageSettings()) if m.version == 9
    ]
    sql = "\n".join(last.statements)
    assert "add_retention_policy('cityhub.gateway_status_history'" in sql
    assert "apply_retention" not in sql
