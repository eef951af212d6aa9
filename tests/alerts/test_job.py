"""The alerts job against a real PostgreSQL/TimescaleDB: lifecycle, restarts, catch-up, AQI.

Readings are inserted straight into the readings tables at chosen times; the
job runs its cycles at chosen ``now`` values (``evaluation_delay_s = 0``, so
an evaluation time is the cycle's ``now`` rounded down to the interval).
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path
from typing import cast

import psycopg
import pytest

from alerts.aqi import daily_vn_aqi, hourly_vn_aqi, nowcast, us_pm25_aqi
from alerts.rules import load_rules
from alerts.service import AlertsJob
from alerts.store import AlertStore
from contracts.errors import AlertNotFoundError, AlreadyAcknowledgedError, JobLockedError
from contracts.schema import readings_table
from contracts.settings import AlertsSettings, DatabaseSettings

# A fixed, 10 s-aligned base time (2030-03-17 17:46:40 UTC); the readings
# are placed around it.
T0 = 1_900_000_000_000
S = 1000

KIOSK_RULES = """
[[rule]]
rule_id = "t-queue"
name = "Queue long"
device_type = "kiosk"
severity = "minor"
summary_vi = "Hàng chờ dài: {value:.0f} người tại {site_name}"
summary_en = "Long queue: {value:.0f} waiting at {site_name}"
description_vi = "Mức {severity_vi}: {value:.0f} người chờ tại {site_name} ({ward}, {district})"
description_en = "{severity_en}: {value:.0f} waiting at {site_id} ({ward})"
escalate = [{ severity = "major", threshold = 80 }]
condition.kind = "threshold"
condition.metric = "queue_length"
condition.op = ">"
condition.threshold = 40
condition.clear = 25
condition.for_s = 30

[[rule]]
rule_id = "t-offline"
name = "Kiosk offline"
device_type = "kiosk"
severity = "warning"
message = "{device_id} silent for {value:.0f} s"
condition = { kind = "no_data", silence_s = 60 }
"""


def ts(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def seed_devices(
    conn: psycopg.Connection, schema: str, devices: list[tuple[str, str, str]]
) -> None:
    """Sites (two districts) and devices: ``[(device_id, device_type, site_id)]``."""
    conn.execute(
        f"""INSERT INTO {schema}.sites (site_id, name, district, kind, latitude, longitude,
            unit_code)
        VALUES ('hk-hall', 'Hoan Kiem hall', 'Hoàn Kiếm', 'service_hall', 21.03, 105.85, '00070'),
               ('cg-aq', 'Cau Giay station', 'Cầu Giấy', 'street_monitor', 21.03, 105.80, NULL)
        ON CONFLICT DO NOTHING"""
    )
    for device_id, device_type, site_id in devices:
        conn.execute(
            f"INSERT INTO {schema}.devices (device_id, device_type, site_id, transport) "
            "VALUES (%s, %s, %s, 'mqtt')",
            (device_id, device_type, site_id),
        )


def put(
    conn: psycopg.Connection, schema: str, device_type: str, device_id: str, at_ms: int, **metrics
) -> None:
    columns = ", ".join(metrics)
    marks = ", ".join(["%s"] * len(metrics))
    conn.execute(
        f"INSERT INTO {schema}.{readings_table(device_type)} "
        f"(ts, device_id, seq, recv_ts, {columns}) VALUES (%s, %s, %s, %s, {marks})",
        (ts(at_ms), device_id, at_ms // S, ts(at_ms), *metrics.values()),
    )


def put_series(
    conn, schema, device_type, device_id, start_ms, stop_ms, step_ms=10 * S, **metrics
) -> None:
    for at in range(start_ms, stop_ms + 1, step_ms):
        put(conn, schema, device_type, device_id, at, **metrics)


def make_job(db_url: str, schema: str, rules_text: str, tmp_path: Path, **settings) -> AlertsJob:
    path = tmp_path / "rules.toml"
    path.write_text(rules_text, encoding="utf-8")
    options = {"interval_s": 10.0, "evaluation_delay_s": 0.0, "aqi": False} | settings
    return AlertsJob(
        settings=AlertsSettings(**options),
        database=DatabaseSettings(url=db_url, schema=schema),
        rules=load_rules([path], include_defaults=False),
    )


def make_catchup_aqi_job(db_url: str, schema: str, tmp_path: Path) -> AlertsJob:
    """The AQI rules every 10 minutes, catching up four hours in one cycle."""
    return make_job(
        db_url,
        schema,
        AQI_RULES,
        tmp_path,
        interval_s=600.0,
        aqi=True,
        max_catchup_s=4 * 3600.0,
        catchup_steps_per_cycle=100,
    )


def alerts_of(conn, schema) -> list[tuple]:
    return conn.execute(
        f"SELECT alert_id, rule_id, device_id, state, severity, value, raised_at, cleared_at, "
        f"site_id, message, description FROM {schema}.alerts ORDER BY alert_id"
    ).fetchall()


def transitions_of(conn, schema, alert_id: int) -> list[tuple]:
    return conn.execute(
        f"SELECT ts, from_state, to_state, severity, value FROM {schema}.alert_transitions "
        "WHERE alert_id = %s ORDER BY ts, to_state",
        (alert_id,),
    ).fetchall()


def counts(conn, schema) -> tuple[int, int]:
    a = conn.execute(f"SELECT count(*) FROM {schema}.alerts").fetchone()[0]
    t = conn.execute(f"SELECT count(*) FROM {schema}.alert_transitions").fetchone()[0]
    return a, t


@pytest.fixture
def kiosks(db_conn, migrated):
    seed_devices(
        db_conn,
        migrated,
        [("k1", "kiosk", "hk-hall"), ("k2", "kiosk", "hk-hall"), ("k3", "kiosk", "hk-hall")],
    )
    return migrated


def test_raise_escalate_ack_and_auto_clear(db_conn, db_url, kiosks, tmp_path):
    schema = kiosks
    put_series(db_conn, schema, "kiosk", "k1", T0 - 60 * S, T0, queue_length=50)
    put_series(db_conn, schema, "kiosk", "k2", T0 - 60 * S, T0, queue_length=10)
    put_series(db_conn, schema, "kiosk", "k3", T0 - 120 * S, T0 - 60 * S, queue_length=0)
    job = make_job(db_url, schema, KIOSK_RULES, tmp_path)
    try:
        report = job.run_cycle(T0 + 3 * S)
        assert report.evaluated == [T0]
        rows = alerts_of(db_conn, schema)
        assert [(r[1], r[2], r[3], r[4], r[5]) for r in rows] == [
            ("t-queue", "k1", "active_unack", "minor", 50.0)
        ]
        assert rows[0][6] == ts(T0)
        assert rows[0][8] == "hk-hall"
        # Bilingual texts, with the site's name and its ward (admin_units, code 00070).
        assert rows[0][9] == (
            "Hàng chờ dài: 50 người tại Hoan Kiem hall / Long queue: 50 waiting at Hoan Kiem hall"
        )
        assert rows[0][10] == (
            "Mức Trung bình: 50 người chờ tại Hoan Kiem hall (Phường Hoàn Kiếm, Hoàn Kiếm) / "
            "Minor: 50 waiting at hk-hall (Phường Hoàn Kiếm)"
        )
        queue_id = rows[0][0]

        # k1 climbs to 90: the held level passes 80 once the 30 s span is all 90.
        put_series(db_conn, schema, "kiosk", "k1", T0 + 10 * S, T0 + 40 * S, queue_length=90)
        put_series(db_conn, schema, "kiosk", "k2", T0 + 10 * S, T0 + 90 * S, queue_length=10)
        report = job.run_cycle(T0 + 40 * S)
        assert report.evaluated == [T0 + k * 10 * S for k in (1, 2, 3, 4)]
        assert report.escalated == 1
        # k3 has been silent since T0 - 60 s: over 60 s at T0 + 10 s.
        by_rule = {r[1]: r for r in alerts_of(db_conn, schema)}
        assert by_rule["t-offline"][2] == "k3"
        assert by_rule["t-offline"][6] == ts(T0 + 10 * S)
        assert by_rule["t-offline"][5] == 70.0
        assert by_rule["t-queue"][3:6] == ("active_unack", "major", 90.0)
        # The escalation re-rendered both texts at the new severity and value.
        assert by_rule["t-queue"][9].startswith("Hàng chờ dài: 90 người")
        assert by_rule["t-queue"][10].startswith("Mức Cao: 90 người")
        assert "Major: 90 waiting" in by_rule["t-queue"][10]
        # A rule with only `message` (operators' older files): generic Vietnamese first.
        assert by_rule["t-offline"][9] == (
            "Thấp: Kiosk offline (ki-ốt lấy số k3 tại Hoan Kiem hall) / k3 silent for 70 s"
        )

        with AlertStore(url=db_url, schema=schema) as store:
            acked = store.ack(queue_id, by="Nguyễn Văn An", now_ms=T0 + 45 * S)
        assert acked.state == "active_ack"
        assert acked.acked_by == "Nguyễn Văn An"

        # k1 falls to 10: cleared at the first evaluation whose newest sample is below 25.
        put_series(db_conn, schema, "kiosk", "k1", T0 + 50 * S, T0 + 90 * S, queue_length=10)
        report = job.run_cycle(T0 + 90 * S)
        assert report.cleared == 1
        by_rule = {r[1]: r for r in alerts_of(db_conn, schema)}
        assert by_rule["t-queue"][3] == "cleared_ack"
        assert by_rule["t-queue"][7] == ts(T0 + 50 * S)
        assert transitions_of(db_conn, schema, queue_id) == [
            (ts(T0), None, "active_unack", "minor", 50.0),
            (ts(T0 + 40 * S), "active_unack", "active_unack", "major", 90.0),
            (ts(T0 + 45 * S), "active_unack", "active_ack", "major", 90.0),
            (ts(T0 + 50 * S), "active_ack", "cleared_ack", "major", 10.0),
        ]
        assert by_rule["t-offline"][3] == "active_unack"  # k3 is still silent
    finally:
        job.close()


def test_rerunning_an_evaluation_time_stores_nothing_twice(db_conn, db_url, kiosks, tmp_path):
    schema = kiosks
    put_series(db_conn, schema, "kiosk", "k1", T0 - 60 * S, T0 + 20 * S, queue_length=50)
    job = make_job(db_url, schema, KIOSK_RULES, tmp_path)
    try:
        job.run_cycle(T0)
        first = (alerts_of(db_conn, schema), counts(db_conn, schema))
        assert first[1] == (1, 1)
        # The same time again, explicitly and through the cycle.
        job.evaluate_at(T0, {})
        job.evaluate_at(T0, {})
        assert job.run_cycle(T0 + 5 * S).evaluated == []
        assert (alerts_of(db_conn, schema), counts(db_conn, schema)) == first
        # A second job instance that replays the same time finds the alert open.
        job.close()
        other = make_job(db_url, schema, KIOSK_RULES, tmp_path)
        try:
            other.run_cycle(T0 + 20 * S)
            other.evaluate_at(T0 + 20 * S, {})
        finally:
            other.close()
        assert counts(db_conn, schema) == (1, 1)
    finally:
        job.close()


def test_ack_in_each_state_and_errors(db_conn, db_url, kiosks, tmp_path):
    schema = kiosks
    put_series(db_conn, schema, "kiosk", "k1", T0 - 60 * S, T0, queue_length=50)
    put_series(db_conn, schema, "kiosk", "k2", T0 - 60 * S, T0, queue_length=50)
    put_series(db_conn, schema, "kiosk", "k2", T0 + 10 * S, T0 + 10 * S, queue_length=0)
    put_series(db_conn, schema, "kiosk", "k1", T0 + 10 * S, T0 + 10 * S, queue_length=60)
    put_series(db_conn, schema, "kiosk", "k3", T0 - 60 * S, T0 + 10 * S, queue_length=0)
    job = make_job(db_url, schema, KIOSK_RULES, tmp_path)
    try:
        job.run_cycle(T0)
        job.run_cycle(T0 + 10 * S)
    finally:
        job.close()
    ids = {r[2]: r[0] for r in alerts_of(db_conn, schema)}
    states = {r[2]: r[3] for r in alerts_of(db_conn, schema)}
    assert states == {"k1": "active_unack", "k2": "cleared_unack"}
    with AlertStore(url=db_url, schema=schema) as store:
        assert store.ack(ids["k1"], by="an", now_ms=T0 + 11 * S).state == "active_ack"
        assert store.ack(ids["k2"], by="an", now_ms=T0 + 11 * S).state == "cleared_ack"
        for alert_id in ids.values():
            with pytest.raises(AlreadyAcknowledgedError, match="already acknowledged"):
                store.ack(alert_id, by="binh", now_ms=T0 + 12 * S)
        with pytest.raises(AlertNotFoundError, match="no alert with id 999999"):
            store.ack(999_999, by="an", now_ms=T0 + 12 * S)
        alert, transitions = store.alert(ids["k2"])
    assert alert.acked_by == "an"
    assert [(t.from_state, t.to_state, t.note) for t in transitions] == [
        (None, "active_unack", "raised"),
        ("active_unack", "cleared_unack", "cleared"),
        ("cleared_unack", "cleared_ack", "acknowledged by an"),
    ]
    # An acknowledged active alert that clears becomes cleared_ack.
    put_series(db_conn, schema, "kiosk", "k1", T0 + 20 * S, T0 + 20 * S, queue_length=0)
    put_series(db_conn, schema, "kiosk", "k3", T0 + 20 * S, T0 + 20 * S, queue_length=0)
    job = make_job(db_url, schema, KIOSK_RULES, tmp_path)
    try:
        job.run_cycle(T0 + 20 * S)
    finally:
        job.close()
    assert {r[2]: r[3] for r in alerts_of(db_conn, schema)} == {
        "k1": "cleared_ack",
        "k2": "cleared_ack",
    }


def test_restart_in_the_middle_rebuilds_and_continues(db_conn, db_url, kiosks, tmp_path):
    schema = kiosks
    put_series(db_conn, schema, "kiosk", "k1", T0 - 60 * S, T0 + 20 * S, queue_length=50)
    put_series(db_conn, schema, "kiosk", "k2", T0 - 60 * S, T0 + 20 * S, queue_length=45)
    put_series(db_conn, schema, "kiosk", "k3", T0 - 60 * S, T0 - 20 * S, queue_length=0)
    job = make_job(db_url, schema, KIOSK_RULES, tmp_path)
    try:
        job.run_cycle(T0)
        job.run_cycle(T0 + 20 * S)
    finally:
        job.close()
    assert {r[2]: r[3] for r in alerts_of(db_conn, schema)} == {
        "k1": "active_unack",
        "k2": "active_unack",
    }
    # While no job runs: k1 drops (its alert must clear at T0 + 30 s), k2 stays
    # between the thresholds (hysteresis: its alert holds), k3 goes quiet.
    put_series(db_conn, schema, "kiosk", "k1", T0 + 30 * S, T0 + 60 * S, queue_length=5)
    put_series(db_conn, schema, "kiosk", "k2", T0 + 30 * S, T0 + 60 * S, queue_length=30)
    restarted = make_job(db_url, schema, KIOSK_RULES, tmp_path)
    try:
        report = restarted.run_cycle(T0 + 60 * S)
        assert report.evaluated == [T0 + k * 10 * S for k in (3, 4, 5, 6)]
        # The rebuilt window holds the history read at start-up plus the delta.
        kiosk = restarted.buffers["kiosk"]
        row = kiosk.devices.device_ids.index("k1")
        assert kiosk.ts_ms[row, -1] == T0 + 60 * S
        assert kiosk.values["queue_length"][row, -5:].tolist() == [50, 5, 5, 5, 5]
    finally:
        restarted.close()
    rows = {(r[1], r[2]): r for r in alerts_of(db_conn, schema)}
    assert len(rows) == 3  # nothing raised twice
    assert rows["t-queue", "k1"][3] == "cleared_unack"
    assert rows["t-queue", "k1"][7] == ts(T0 + 30 * S)
    assert rows["t-queue", "k2"][3] == "active_unack"
    assert rows["t-offline", "k3"][6] == ts(T0 + 50 * S)  # silent since T0 - 20 s
    assert [t[2] for t in transitions_of(db_conn, schema, rows["t-queue", "k1"][0])] == [
        "active_unack",
        "cleared_unack",
    ]


def test_catch_up_after_downtime_replays_missed_times(db_conn, db_url, kiosks, tmp_path):
    schema = kiosks
    put_series(db_conn, schema, "kiosk", "k1", T0 - 60 * S, T0, queue_length=10)
    job = make_job(db_url, schema, KIOSK_RULES, tmp_path, catchup_steps_per_cycle=5)
    try:
        job.run_cycle(T0)
    finally:
        job.close()
    # Down for 200 s: k1 rises for 90 s and falls again, all of it unseen.
    put_series(db_conn, schema, "kiosk", "k1", T0 + 10 * S, T0 + 100 * S, queue_length=50)
    put_series(db_conn, schema, "kiosk", "k1", T0 + 110 * S, T0 + 200 * S, queue_length=10)
    job = make_job(db_url, schema, KIOSK_RULES, tmp_path, catchup_steps_per_cycle=5)
    try:
        cycles = []
        while True:
            report = job.run_cycle(T0 + 200 * S)
            if not report.evaluated:
                break
            cycles.append(report)
    finally:
        job.close()
    assert [len(c.evaluated) for c in cycles] == [5, 5, 5, 5]
    assert [c.behind for c in cycles] == [True, True, True, False]
    assert cycles[-1].evaluated[-1] == T0 + 200 * S
    (alert,) = alerts_of(db_conn, schema)
    # Raised when the 30 s span first held 50 throughout; cleared at the first drop.
    assert alert[3:8] == ("cleared_unack", "minor", 10.0, ts(T0 + 40 * S), ts(T0 + 110 * S))
    stored = db_conn.execute(
        f"SELECT last_eval_at FROM {schema}.alert_jobs WHERE job_id = 'alerts'"
    ).fetchone()
    assert stored == (ts(T0 + 200 * S),)


def test_catch_up_is_bounded_by_max_catchup(db_conn, db_url, kiosks, tmp_path):
    schema = kiosks
    put_series(db_conn, schema, "kiosk", "k1", T0 - 60 * S, T0, queue_length=10)
    job = make_job(db_url, schema, KIOSK_RULES, tmp_path, max_catchup_s=60.0)
    try:
        job.run_cycle(T0)
        report = job.run_cycle(T0 + 3600 * S)
    finally:
        job.close()
    assert report.evaluated == [T0 + 3540 * S + k * 10 * S for k in range(7)]


def test_devices_registered_later_are_loaded_with_their_history(db_conn, db_url, kiosks, tmp_path):
    schema = kiosks
    put_series(db_conn, schema, "kiosk", "k1", T0 - 60 * S, T0, queue_length=10)
    job = make_job(db_url, schema, KIOSK_RULES, tmp_path, devices_refresh_s=10.0)
    try:
        job.run_cycle(T0)
        seed_devices(db_conn, schema, [("k9", "kiosk", "cg-aq")])
        put_series(db_conn, schema, "kiosk", "k9", T0 - 60 * S, T0 + 20 * S, queue_length=70)
        job.run_cycle(T0 + 20 * S)
    finally:
        job.close()
    rows = alerts_of(db_conn, schema)
    assert [(r[1], r[2], r[6], r[8]) for r in rows] == [("t-queue", "k9", ts(T0 + 10 * S), "cg-aq")]


AQI_RULES = """
[[rule]]
rule_id = "t-aqi"
name = "VN_AQI moderate or worse"
device_type = "air_quality"
severity = "warning"
message = "VN_AQI {value:.0f} at {site_id}"
condition = { kind = "aqi_band", band = "moderate", max_age_s = 7200 }
"""


def test_aqi_hourly_and_daily_rows_for_known_inputs(db_conn, db_url, migrated, tmp_path):
    schema = migrated
    seed_devices(db_conn, schema, [("aq1", "air_quality", "cg-aq")])
    # 03:00 UTC is 10:00 in Hanoi: the three hours lie in one local day.
    h = int(datetime(2030, 3, 18, 3, tzinfo=UTC).timestamp()) * 1000
    hour = 3600 * S
    pm25 = {h - 2 * hour: 30.0, h - hour: 40.0, h: 50.0}
    for start, value in pm25.items():
        put_series(
            db_conn,
            schema,
            "air_quality",
            "aq1",
            start,
            start + 50 * 60 * S,
            step_ms=10 * 60 * S,
            pm25=value,
            pm10=60.0,
            no2=50.0,
            o3=100.0 + value,
        )
    job = make_catchup_aqi_job(db_url, schema, tmp_path)
    try:
        job.run_cycle(h - 2 * hour - 600 * S)  # starts before the first reading
        report = job.run_cycle(h + 50 * 60 * S)
    finally:
        job.close()
    assert report.evaluated[-1] == h + 50 * 60 * S
    rows = db_conn.execute(
        f"""SELECT ts, site_id, vn_aqi, dominant, band, aqi_pm25, aqi_pm10, aqi_no2, aqi_o3,
            nowcast_pm25, nowcast_pm10, us_aqi_pm25 FROM {schema}.aqi_hourly ORDER BY ts"""
    ).fetchall()
    # The first hour has no NowCast (2 of the newest 3 hours needed): no row.
    assert [r[0] for r in rows] == [ts(h - hour), ts(h)]
    for row, c in zip(rows, ([40.0, 30.0], [50.0, 40.0, 30.0]), strict=True):
        expected = hourly_vn_aqi(
            pm25_hourly=c, pm10_hourly=[60.0] * len(c), o3_1h=100.0 + c[0], no2_1h=50.0
        )
        assert expected is not None
        assert row[1:9] == (
            "cg-aq",
            expected.aqi,
            expected.dominant,
            expected.band.name_vi,
            expected.sub_indices["pm25"],
            expected.sub_indices["pm10"],
            expected.sub_indices["no2"],
            expected.sub_indices["o3"],
        )
        assert row[9] == pytest.approx(nowcast(c), rel=1e-6)
        assert row[10] == pytest.approx(60.0)
        assert row[11] == us_pm25_aqi(cast(float, nowcast(c)))[0]
    # The NowCast of 50, 40, 30: w = 0.6, (50 + 24 + 10.8) / 1.96 = 43.27 -> AQI 87.
    assert rows[-1][2] == 87
    assert rows[-1][4] == "Trung bình"

    daily = db_conn.execute(
        f"""SELECT day, site_id, vn_aqi, dominant, band, aqi_pm25, aqi_pm10, aqi_no2, aqi_o3,
            us_aqi_pm25 FROM {schema}.aqi_daily"""
    ).fetchall()
    expected_day = daily_vn_aqi(
        pm25_24h=40.0, pm10_24h=60.0, o3_max_1h=150.0, o3_max_8h=None, no2_max_1h=50.0
    )
    assert expected_day is not None
    assert daily == [
        (
            date(2030, 3, 18),
            "cg-aq",
            expected_day.aqi,
            expected_day.dominant,
            expected_day.band.name_vi,
            expected_day.sub_indices["pm25"],
            expected_day.sub_indices["pm10"],
            expected_day.sub_indices["no2"],
            expected_day.sub_indices["o3"],
            us_pm25_aqi(40.0)[0],
        )
    ]
    # The derived vn_aqi metric reached the rules: moderate (51+) from the second
    # hour, whose AQI (71) a catch-up computes as soon as that hour is over.
    (alert,) = alerts_of(db_conn, schema)
    assert alert[1:4] == ("t-aqi", "aq1", "active_unack")
    assert alert[6] == ts(h)
    assert alert[5] == rows[0][2] == 71


def test_aqi_state_is_rebuilt_after_a_restart(db_conn, db_url, migrated, tmp_path):
    schema = migrated
    seed_devices(db_conn, schema, [("aq1", "air_quality", "cg-aq")])
    h = int(datetime(2030, 3, 18, 3, tzinfo=UTC).timestamp()) * 1000
    hour = 3600 * S
    for start, value in {h - 2 * hour: 30.0, h - hour: 40.0, h: 50.0}.items():
        put_series(
            db_conn, schema, "air_quality", "aq1", start, start + 50 * 60 * S,
            step_ms=10 * 60 * S, pm25=value,
        )  # fmt: skip
    # A job started only now reads the past hours' sums from the database.
    job = make_job(db_url, schema, AQI_RULES, tmp_path, interval_s=600.0, aqi=True)
    try:
        job.run_cycle(h + 50 * 60 * S)
    finally:
        job.close()
    rows = db_conn.execute(
        f"SELECT ts, nowcast_pm25 FROM {schema}.aqi_hourly ORDER BY ts"
    ).fetchall()
    assert rows[-1][0] == ts(h)
    assert rows[-1][1] == pytest.approx(nowcast([50.0, 40.0, 30.0]), rel=1e-6)


def test_a_second_job_with_the_same_id_waits(db_url, kiosks, tmp_path):

    first = make_job(db_url, kiosks, KIOSK_RULES, tmp_path)
    second = make_job(db_url, kiosks, KIOSK_RULES, tmp_path)
    try:
        first.run_cycle(T0)
        with pytest.raises(JobLockedError, match="another alerts job"):
            second.run_cycle(T0 + 10 * S)
        first.close()
        assert second.run_cycle(T0 + 10 * S).evaluated == [T0 + 10 * S]
    finally:
        first.close()
        second.close()


def test_schema_not_migrated_is_a_schema_error(db_url, db_schema, tmp_path):
    from contracts.errors import SchemaError

    job = make_job(db_url, db_schema, KIOSK_RULES, tmp_path)
    try:
        with pytest.raises(SchemaError, match="not migrated"):
            job.run_cycle(T0)
    finally:
        job.close()


def test_a_cycle_hung_on_the_database_is_cut_and_the_job_goes_on(db_url, kiosks, tmp_path, caplog):
    """A server that stops answering while its host still does (the proxy holds the
    sockets open: TCP keepalives pass) holds a cycle until ``cycle_timeout_s``; then
    the connection is cut, the cycle counts as failed, and cycles resume once the
    server answers again."""
    import asyncio
    import logging
    import time

    from alerts.service import run_job
    from tests.plugins.ingest import TcpProxy, proxied_url

    proxy = TcpProxy(int(db_url.rsplit(":", 1)[1].split("/", maxsplit=1)[0]))
    job = make_job(
        proxied_url(db_url, proxy),
        kiosks,
        KIOSK_RULES,
        tmp_path,
        interval_s=0.5,
        cycle_timeout_s=1.5,
        retry_min_s=0.1,
        retry_max_s=0.5,
    )

    async def until(condition, timeout_s: float) -> float:
        start = time.monotonic()
        while not condition():
            assert time.monotonic() - start < timeout_s, "timed out"
            await asyncio.sleep(0.05)
        return time.monotonic() - start

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(run_job(job, stop))
        try:
            await until(lambda: job.counters.cycles >= 2, 30)
            proxy.hang()
            hung_at = job.counters.cycles
            await until(lambda: "cutting its database connection" in caplog.text, 15)
            # Nothing completes while the server is silent.
            assert job.counters.cycles <= hung_at + 1
            proxy.restore()
            await until(lambda: job.counters.cycles >= hung_at + 3, 30)
        finally:
            stop.set()
            proxy.close()  # whatever still hangs fails now, so the job can stop
            await asyncio.wait_for(task, 30)

    caplog.set_level(logging.WARNING, logger="alerts.service")
    try:
        asyncio.run(scenario())
    finally:
        job.close()
        proxy.close()
