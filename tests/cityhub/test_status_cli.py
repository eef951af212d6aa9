"""`cityhub status`, the list commands' online columns and filters, against a real database."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from typer.testing import CliRunner

from cityhub.cli.context import HANOI_TZ
from cityhub.cli.main import app
from tests.alerts.test_job import seed_devices

LONG_ID = "d" * 30 + "-" + "7" * 33  # 64 characters, the longest id allowed
assert len(LONG_ID) == 64


def run(env: dict[str, str], *args: str):
    return CliRunner().invoke(app, list(args), env=env)


def put_gateway(
    conn, schema, gateway_id, site_id, *, status="online", age_s=5.0, outbox=0, lost=(0, 0)
):
    conn.execute(
        f"INSERT INTO {schema}.gateways (gateway_id, site_id) VALUES (%s, %s)"
        " ON CONFLICT DO NOTHING",
        (gateway_id, site_id),
    )
    conn.execute(
        f"""INSERT INTO {schema}.gateway_status (gateway_id, status, birth, boot_id, version,
            ts, outbox_depth, outbox_readings, readings_per_s, received, accepted, rejected,
            rate_limited, serial_errors, devices_online, site_ready, outbox_refused_readings,
            outbox_dropped_readings)
            VALUES (%s, %s, 1, 'b', '1.0', now() - make_interval(secs => %s), %s, 0, 2.5,
                0, 0, 0, 0, 0, 1, true, %s, %s)
            ON CONFLICT (gateway_id) DO UPDATE SET status = EXCLUDED.status, ts = EXCLUDED.ts,
                outbox_depth = EXCLUDED.outbox_depth""",
        (gateway_id, status, age_s, outbox, *lost),
    )


def seen(conn, schema, device_id, age_s):
    conn.execute(
        f"""INSERT INTO {schema}.device_state (device_id, last_seen, last_seq)
            VALUES (%s, now() - make_interval(secs => %s), 1)
            ON CONFLICT (device_id) DO UPDATE SET last_seen = EXCLUDED.last_seen""",
        (device_id, age_s),
    )


def ingest_stats(conn, schema, *, readings, age_s=5.0):
    conn.execute(
        f"""INSERT INTO {schema}.ingest_stats (ts, worker_id, interval_s, readings, duplicates,
            batches, replayed, poison, rejects, commits, lag_p95_ms, queue_depth)
            VALUES (now() - make_interval(secs => %s), 'w0', 10, %s, 0, 1, 0, 0, 0, 1, 850, 2)""",
        (age_s, readings),
    )


def alert_job(conn, schema, *, age_s):
    conn.execute(
        f"""INSERT INTO {schema}.alert_jobs (job_id, last_eval_at, updated_at)
            VALUES ('alerts', now() - make_interval(secs => %s + 2),
                now() - make_interval(secs => %s))
            ON CONFLICT (job_id) DO UPDATE SET updated_at = EXCLUDED.updated_at""",
        (age_s, age_s),
    )


@pytest.fixture
def fleet(db_conn, db_url, migrated):
    """Two sites, a gateway each, kiosks (offline after 300 s by default) seen at various ages."""
    schema = migrated
    seed_devices(
        db_conn,
        schema,
        [
            ("k-fresh", "kiosk", "hk-hall"),
            ("k-stale", "kiosk", "hk-hall"),
            ("k-never", "kiosk", "cg-aq"),
            (LONG_ID, "kiosk", "cg-aq"),
        ],
    )
    offline_after_s = db_conn.execute(
        f"SELECT offline_after_s FROM {schema}.device_types WHERE device_type = 'kiosk'"
    ).fetchone()[0]
    seen(db_conn, schema, "k-fresh", 1)
    seen(db_conn, schema, "k-stale", offline_after_s + 3600)
    seen(db_conn, schema, LONG_ID, 1)
    put_gateway(db_conn, schema, "gw-hk", "hk-hall", outbox=4, lost=(1234, 3))
    put_gateway(db_conn, schema, "gw-cg", "cg-aq")
    ingest_stats(db_conn, schema, readings=600)
    alert_job(db_conn, schema, age_s=3)
    db_conn.execute(
        f"""INSERT INTO {schema}.alerts (rule_id, device_id, site_id, severity, state, raised_at)
            VALUES ('r1', 'k-stale', 'hk-hall', 'major', 'active_unack', now()),
                   ('r2', 'k-never', 'cg-aq', 'major', 'active_ack', now()),
                   ('r3', 'k-fresh', 'hk-hall', 'critical', 'cleared_unack', now())"""
    )
    env = {"CITYHUB_DATABASE__URL": db_url, "CITYHUB_DATABASE__SCHEMA": schema, "COLUMNS": "250"}
    return env, schema


def status_json(env) -> tuple[int, dict]:
    result = run(env, "status", "--json")
    assert result.exit_code in (0, 3), result.output
    return result.exit_code, json.loads(result.stdout)


def test_status_all_well(fleet):
    env, _ = fleet
    code, doc = status_json(env)
    assert code == 0, doc["problems"]
    assert doc["problems"] == []
    assert [(g["gateway_id"], g["online"], g["outbox_depth"]) for g in doc["gateways"]] == [
        ("gw-cg", True, 0),
        ("gw-hk", True, 4),
    ]
    # Readings lost to a full outbox are shown, not a problem: the totals never go down.
    assert [
        (g["outbox_refused_readings"], g["outbox_dropped_readings"]) for g in doc["gateways"]
    ] == [(0, 0), (1234, 3)]
    assert {s["site_id"]: (s["online"], s["offline"]) for s in doc["sites"]} == {
        "cg-aq": (1, 1),
        "hk-hall": (1, 1),
    }
    # Worst first: never seen, then the longest silent.
    assert [d["device_id"] for d in doc["offline_devices"]] == ["k-never", "k-stale"]
    assert doc["offline_devices"][0]["last_seen"] is None
    assert doc["ingest"]["readings"] == 600
    assert doc["ingest"]["readings_per_s"] == pytest.approx(2.0)
    assert doc["ingest"]["lag_p95_ms"] == pytest.approx(850)
    assert doc["ingest"]["gateways_readings_per_s"] == pytest.approx(5.0)
    assert doc["alert_jobs"][0]["job_id"] == "alerts"
    assert doc["open_alerts"] == {"critical": 0, "major": 2, "minor": 0, "warning": 0}
    assert doc["alertmanager"] == {
        "state": "unknown",
        "notified_at": None,
        "error": None,
        "error_at": None,
    }

    table = run(env, "status")
    assert table.exit_code == 0, table.output
    assert "Gateway: 2 trực tuyến / online, 0 ngoại tuyến / offline" in table.stdout
    assert "Mọi thứ ổn / all well" in table.stdout
    assert "1,234 / 3" in table.stdout
    assert "Alertmanager: không rõ / unknown" in table.stdout
    stale = datetime.fromisoformat(doc["offline_devices"][1]["last_seen"])
    assert stale.astimezone(HANOI_TZ).strftime("%d/%m/%Y %H:%M:%S") in table.stdout


def test_status_exits_3_when_something_is_down(fleet, db_conn):
    env, schema = fleet
    put_gateway(db_conn, schema, "gw-cg", "cg-aq", age_s=600)  # silent
    put_gateway(db_conn, schema, "gw-hk", "hk-hall", status="offline")
    db_conn.execute(
        f"INSERT INTO {schema}.gateways (gateway_id, site_id) VALUES ('gw-new', 'cg-aq')"
    )
    code, doc = status_json(env)
    assert code == 3
    assert doc["problems"] == [  # by site, then id
        "gateway gw-cg is silent (600 s)",
        "gateway gw-new has never reported",
        "gateway gw-hk is offline",
    ]
    table = run(env, "status")
    assert table.exit_code == 3
    assert "gateway gw-hk is offline" in table.output

    db_conn.execute(f"DELETE FROM {schema}.gateway_status")
    db_conn.execute(f"DELETE FROM {schema}.gateways")
    alert_job(db_conn, schema, age_s=61)  # six intervals of 10 s and a second
    code, doc = status_json(env)
    assert code == 3
    assert doc["problems"] == ["the alerts job's last cycle is 61 s old (over 60 s)"]
    db_conn.execute(f"DELETE FROM {schema}.alert_jobs")
    code, doc = status_json(env)
    assert doc["problems"] == ["the alerts job has never completed a cycle"]


def test_status_ingest_silent_while_gateways_send(fleet, db_conn):
    env, schema = fleet
    db_conn.execute(f"DELETE FROM {schema}.ingest_stats")
    ingest_stats(db_conn, schema, readings=900, age_s=400)  # before the window
    code, doc = status_json(env)
    assert code == 3
    assert doc["problems"] == ["ingest stored no readings in 300 s while gateways send 5.0/s"]
    assert doc["ingest"]["last_stats_at"] is not None


def test_status_reads_the_notifier_state(fleet, db_conn):
    env, schema = fleet
    # The job has posted nothing yet: whether Alertmanager answers is unknown.
    assert status_json(env)[1]["alertmanager"]["state"] == "unknown"
    db_conn.execute(f"UPDATE {schema}.alert_jobs SET notified_at = now()")
    code, doc = status_json(env)
    assert (code, doc["alertmanager"]["state"]) == (0, "reachable")
    db_conn.execute(
        f"""UPDATE {schema}.alert_jobs SET notify_error = 'connection refused [am:9093]',
            notify_error_at = now() + interval '1 second'"""
    )
    code, doc = status_json(env)
    assert (code, doc["alertmanager"]["state"]) == (3, "unreachable")
    assert doc["problems"] == ["Alertmanager unreachable: connection refused [am:9093]"]
    table = run(env, "status")
    assert "connection refused [am:9093]" in table.output  # brackets printed whole


def test_status_database_error_exits_1(db_url):
    env = {"CITYHUB_DATABASE__URL": db_url, "CITYHUB_DATABASE__SCHEMA": "no_such_schema"}
    result = run(env, "status")
    assert result.exit_code == 1
    assert result.output.startswith("error: ")
    assert "schema 'no_such_schema' is not migrated" in result.output


def test_lists_show_online_and_last_seen(fleet):
    env, _ = fleet
    result = run(env, "devices", "list", "--json")
    assert result.exit_code == 0, result.output
    listed = {d["device_id"]: d for d in json.loads(result.stdout)}
    assert {i: d["online"] for i, d in listed.items()} == {
        "k-fresh": True,
        "k-stale": False,
        "k-never": False,
        LONG_ID: True,
    }
    assert listed["k-never"]["last_seen"] is None
    last_seen = datetime.fromisoformat(listed["k-stale"]["last_seen"])
    assert datetime.now(UTC) - last_seen > timedelta(hours=1)
    table = run(env, "devices", "list")
    assert table.exit_code == 0, table.output
    assert last_seen.astimezone(HANOI_TZ).strftime("%d/%m/%Y %H:%M:%S") in table.stdout

    gateways = json.loads(run(env, "gateways", "list", "--json").stdout)
    assert [(g["gateway_id"], g["online"], g["outbox_depth"]) for g in gateways] == [
        ("gw-cg", True, 0),
        ("gw-hk", True, 4),
    ]
    assert [(g["outbox_refused_readings"], g["outbox_dropped_readings"]) for g in gateways] == [
        (0, 0),
        (1234, 3),
    ]
    assert all(g["last_seen"] for g in gateways)
    listed = run(env, "gateways", "list")
    assert listed.exit_code == 0, listed.output
    assert "1,234 / 3" in listed.stdout


def test_ids_are_never_cut_in_80_columns(fleet):
    env, _ = fleet
    narrow = {**env, "COLUMNS": "80"}
    wide = run(narrow, "devices", "list", "--wide")
    assert wide.exit_code == 0, wide.output
    assert LONG_ID in wide.stdout
    folded = run(narrow, "devices", "list", "--site", "cg-aq")
    assert folded.exit_code == 0, folded.output
    assert max(len(line) for line in folded.stdout.splitlines()) <= 80
    assert "…" not in folded.stdout  # folded over lines, never an ellipsis
    cells = "".join(
        line.split("│")[1].strip() for line in folded.stdout.splitlines() if "│" in line
    )
    assert LONG_ID in cells


@pytest.mark.parametrize(
    ("args", "valid"),
    [
        (("devices", "list", "--status", "bogus"), "active, revoked"),
        (("gateways", "list", "--status", "bogus"), "active, revoked"),
        (("devices", "list", "--type", "nosuchtype"), "air_quality"),
        (("devices", "list", "--status", "[x]"), "'[x]'"),  # brackets printed whole
    ],
)
def test_unknown_filter_values_are_errors(fleet, args, valid):
    env, _ = fleet
    result = run(env, *args)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: setting '--")
    assert valid in lines[0]
    if "--type" in args:
        assert "kiosk" in lines[0]


def test_unknown_log_level_names_the_valid_ones():
    result = run({}, "--log-level", "chatty", "catalog", "list")
    assert result.exit_code == 2
    assert "'CHATTY' is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL" in result.output


def _pki_with(tmp_path, *, client_days: int, crl_age_days: int = 0):
    from devices.pki import Pki

    now = datetime.now(UTC)
    pki = Pki(tmp_path / "pki")
    pki.create_ca(now=now)
    pki.issue_server(["localhost"], now=now)
    pki.issue_client("gw-soon", now=now, days=client_days)
    pki.issue_client("gw-later", now=now)
    pki.write_crl(now=now - timedelta(days=crl_age_days))
    return pki


def test_status_shows_certificate_expiry(fleet, tmp_path):
    env, _ = fleet
    pki = _pki_with(tmp_path, client_days=10)
    env = {**env, "CITYHUB_PROVISIONING__PKI_DIR": str(pki.root)}
    code, doc = status_json(env)
    assert code == 0, doc["problems"]
    names = [c["name"] for c in doc["certificates"]["lines"]]
    assert names == ["CA", "server", "CRL", "gw-soon", "gw-later"]
    assert [w.split(":")[0] for w in doc["certificates"]["warnings"]] == ["gw-soon"]
    table = run(env, "status")
    assert table.exit_code == 0, table.output
    assert "Chứng chỉ / certificates: CA " in table.stdout
    assert "sắp hết hạn / expiring: gw-soon" in table.stdout


def test_status_an_expired_crl_is_a_problem(fleet, tmp_path):
    env, _ = fleet
    pki = _pki_with(tmp_path, client_days=700, crl_age_days=100)
    env = {**env, "CITYHUB_PROVISIONING__PKI_DIR": str(pki.root)}
    code, doc = status_json(env)
    assert code == 3
    assert doc["problems"] == ["certificate CRL: đã hết hạn / expired"]


def test_status_without_a_pki_shows_no_certificates(fleet, tmp_path):
    env, _ = fleet
    env = {**env, "CITYHUB_PROVISIONING__PKI_DIR": str(tmp_path / "no-pki")}
    code, doc = status_json(env)
    assert code == 0
    assert doc["certificates"] is None
    assert "Chứng chỉ" not in run(env, "status").stdout
