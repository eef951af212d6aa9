"""The AQI ring at start-up: finished hours from the hourly rollups, the rest from raw rows.

The same readings are read by a freshly started job: once with the rollup
empty (every hour summed from raw rows) and once with the rollup refreshed up
to two hours back (so the last finished hour is not rolled up yet, and the
hour in progress never is). The AQI rows and alerts written must be the same;
a third run with one rolled-up hour altered in the rollup writes other
values, so the second did read the rollup.

Values are multiples of 0.5 and hours hold 4 readings (or 3 summing to a
multiple of 3), so the rollup's ``real`` means are exact and both paths
agree to the bit.
"""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg

from alerts.service import AlertsJob
from tests.alerts.test_job import S, make_catchup_aqi_job, put, seed_devices, ts

HOUR = 3600 * S
# 03:00 UTC on 2030-03-18 (10:00 in Hanoi): the hour in progress at start-up.
H = int(datetime(2030, 3, 18, 3, tzinfo=UTC).timestamp()) * 1000
START = H + 20 * 60 * S  # the start-up cycle's time, 20 minutes into H
LATER = H + 70 * 60 * S  # a cycle after new readings, into the next hour


def readings(conn: psycopg.Connection, schema: str, *, upto_ms: int, after_ms: int = 0) -> None:
    """aq1: every 15 min over 14 hours; aq2 with gaps and rows missing pm25."""
    for k in range(14 * 4 + 6):
        at = H - 12 * HOUR + k * 15 * 60 * S
        if not after_ms < at <= upto_ms:
            continue
        hour = (at - H) // HOUR
        pm25 = 30.0 + 2.5 * (hour % 7) + 0.5 * (k % 4)
        put(conn, schema, "air_quality", "aq1", at, pm25=pm25, pm10=60.0 + hour, no2=50.0,
            o3=90.0 + 0.5 * k)  # fmt: skip
        if hour in (-9, -8, -5):  # aq2 silent for these hours
            continue
        if hour == -3 and k % 4 == 0:  # one row of the hour without pm25: 3 of 4 have it
            put(conn, schema, "air_quality", "aq2", at, pm10=80.0, no2=40.0, o3=70.0)
            continue
        put(conn, schema, "air_quality", "aq2", at, pm25=pm25 + 40.0 + 0.5 * (k % 4),
            pm10=80.0, no2=40.0, o3=70.0)  # fmt: skip


def run(
    db_url: str, schema: str, conn: psycopg.Connection, tmp_path, *, add_later: bool = False
) -> tuple[list, list, list]:
    """Start a job at START, (add the readings up to LATER,) run to LATER; return what it wrote."""
    job: AlertsJob = make_catchup_aqi_job(db_url, schema, tmp_path)
    try:
        first = job.run_cycle(START)
        assert first.evaluated == [START]
        if add_later:
            readings(conn, schema, after_ms=START, upto_ms=LATER)
        job.run_cycle(LATER)
    finally:
        job.close()
    hourly = conn.execute(
        f"""SELECT ts, device_id, vn_aqi, dominant, aqi_pm25, aqi_pm10, aqi_no2, aqi_o3,
            nowcast_pm25, nowcast_pm10, us_aqi_pm25 FROM {schema}.aqi_hourly
        ORDER BY device_id, ts"""
    ).fetchall()
    daily = conn.execute(
        f"""SELECT day, device_id, vn_aqi, dominant, aqi_pm25, aqi_pm10, aqi_no2, aqi_o3,
            us_aqi_pm25 FROM {schema}.aqi_daily ORDER BY device_id, day"""
    ).fetchall()
    alerts = conn.execute(
        f"""SELECT rule_id, device_id, state, severity, value, raised_at, cleared_at
        FROM {schema}.alerts ORDER BY device_id, alert_id"""
    ).fetchall()
    return hourly, daily, alerts


def forget_outputs(conn: psycopg.Connection, schema: str) -> None:
    for table in ("alert_transitions", "alerts", "aqi_hourly", "aqi_daily", "alert_jobs"):
        conn.execute(f"DELETE FROM {schema}.{table}")


def test_start_up_from_rollups_writes_what_start_up_from_raw_rows_writes(
    db_conn, db_url, migrated, tmp_path
):
    schema = migrated
    seed_devices(
        db_conn, schema, [("aq1", "air_quality", "cg-aq"), ("aq2", "air_quality", "cg-aq")]
    )
    readings(db_conn, schema, upto_ms=START)
    rollup = f"{schema}.readings_air_quality_1h"
    assert db_conn.execute(f"SELECT count(*) FROM {rollup}").fetchone() == (0,)
    from_raw = run(db_url, schema, db_conn, tmp_path, add_later=True)

    forget_outputs(db_conn, schema)
    # Rolled up to H - 1 h: H - 1 h itself is finished but not rolled up yet.
    db_conn.execute(f"SELECT {schema}.refresh_rollups(%s, %s)", (ts(H - 13 * HOUR), ts(H - HOUR)))
    rolled = db_conn.execute(f"SELECT min(bucket), max(bucket) FROM {rollup}").fetchone()
    assert rolled == (ts(H - 12 * HOUR), ts(H - 2 * HOUR))
    from_rollups = run(db_url, schema, db_conn, tmp_path)

    hourly, daily, alerts = from_raw
    # The run covers what it should: both devices' hours H and H + 1 h, their
    # day, and the aqi_band alert on each.
    assert {(r[0], r[1]) for r in hourly} >= {
        (ts(h), d) for h in (H, H + HOUR) for d in ("aq1", "aq2")
    }
    assert {r[1] for r in daily} == {"aq1", "aq2"}
    assert {r[1] for r in alerts} == {"aq1", "aq2"}
    assert from_rollups == from_raw

    forget_outputs(db_conn, schema)
    db_conn.execute(
        f"UPDATE {rollup} SET pm25_avg = pm25_avg + 50 WHERE bucket = %s", (ts(H - 3 * HOUR),)
    )
    altered = run(db_url, schema, db_conn, tmp_path)
    assert altered[0] != hourly
