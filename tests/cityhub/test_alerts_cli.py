"""`cityhub alerts list / show / ack / run` through typer's CliRunner against a real database."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from cityhub.cli.main import app
from contracts.severity import SEVERITY_NAMES
from tests.alerts.test_job import KIOSK_RULES, T0, S, make_job, put_series, seed_devices


@pytest.fixture
def with_alerts(db_conn, db_url, migrated, tmp_path):
    """Three alerts: k1 queue (active, major), k2 queue (cleared), k3 offline (active)."""
    schema = migrated
    seed_devices(
        db_conn,
        schema,
        [("k1", "kiosk", "hk-hall"), ("k2", "kiosk", "cg-aq"), ("k3", "kiosk", "hk-hall")],
    )
    put_series(db_conn, schema, "kiosk", "k1", T0 - 60 * S, T0 + 40 * S, queue_length=95)
    put_series(db_conn, schema, "kiosk", "k2", T0 - 60 * S, T0 + 10 * S, queue_length=50)
    put_series(db_conn, schema, "kiosk", "k2", T0 + 20 * S, T0 + 40 * S, queue_length=1)
    put_series(db_conn, schema, "kiosk", "k3", T0 - 60 * S, T0 - 60 * S, queue_length=0)
    job = make_job(db_url, schema, KIOSK_RULES, tmp_path)
    try:
        job.run_cycle(T0)
        job.run_cycle(T0 + 40 * S)
    finally:
        job.close()
    ids = {
        (rule, device): alert_id
        for alert_id, rule, device in db_conn.execute(
            f"SELECT alert_id, rule_id, device_id FROM {schema}.alerts"
        )
    }
    assert len(ids) == 3
    env = {"CITYHUB_DATABASE__URL": db_url, "CITYHUB_DATABASE__SCHEMA": schema, "COLUMNS": "500"}
    return env, ids


def cli(env: dict[str, str], *args: str):
    return CliRunner().invoke(app, ["alerts", *args], env=env)


def listed(env, *args: str) -> list[dict]:
    result = cli(env, "list", "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_list_filters(with_alerts):
    env, ids = with_alerts
    everything = listed(env)
    assert {(a["rule_id"], a["device_id"], a["state"]) for a in everything} == {
        ("t-queue", "k1", "active_unack"),
        ("t-queue", "k2", "cleared_unack"),
        ("t-offline", "k3", "active_unack"),
    }
    assert [a["device_id"] for a in listed(env, "--state", "active", "--rule", "t-queue")] == ["k1"]
    assert [a["device_id"] for a in listed(env, "--state", "cleared_unack")] == ["k2"]
    assert sorted(a["device_id"] for a in listed(env, "--severity", "minor,major")) == [
        "k1",
        "k2",
    ]
    assert [a["device_id"] for a in listed(env, "--severity", "warning")] == ["k3"]
    assert {a["device_id"] for a in listed(env, "--site", "hk-hall")} == {"k1", "k3"}
    assert [a["alert_id"] for a in listed(env, "--device", "k3")] == [ids["t-offline", "k3"]]
    assert listed(env, "--since", "2031-01-01T00:00:00") == []
    assert len(listed(env, "--since", "2030-01-01T00:00:00")) == 3
    assert len(listed(env, "--since", "2h")) == 3  # the test's alerts lie in 2030
    assert len(listed(env, "--limit", "1")) == 1

    table = cli(env, "list")
    assert table.exit_code == 0, table.output
    assert "3 cảnh báo / alerts" in table.output
    one = cli(env, "list", "--limit", "1")
    assert one.exit_code == 0, one.output
    assert re.search(r"\b1 cảnh báo / alert\b(?!s)", one.output), one.output
    assert "t-offline" in table.output
    assert "Hàng chờ dài: 95 người tại Hoan Kiem hall" in table.output
    assert "Long queue: 95 waiting at Hoan Kiem hall" in table.output
    # Severities in the shared vocabulary, "Cảnh báo" never one of them.
    assert "Cao / Major" in table.output  # k1 escalated to major
    assert "Thấp / Warning" in table.output  # k3 offline
    assert_no_alert_word_for_a_severity(table.output)
    # k1 was raised at T0 = 2030-03-17 17:46:40 UTC: 00:46:40 the next day in Hanoi.
    assert "18/03/2030 00:46:40 +07" in table.output
    assert "17:46:40" not in table.output

    bad = cli(env, "list", "--state", "open-ish")
    assert bad.exit_code == 1
    assert "'open-ish' is not one of" in bad.output


def test_show_prints_the_alert_and_its_transitions(with_alerts):
    env, ids = with_alerts
    result = cli(env, "show", str(ids["t-queue", "k1"]), "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["alert"]["severity"] == "major"
    assert [(t["from_state"], t["to_state"], t["severity"]) for t in shown["transitions"]] == [
        (None, "active_unack", "major")
    ]
    k2 = json.loads(cli(env, "show", str(ids["t-queue", "k2"]), "--json").output)
    assert [t["note"] for t in k2["transitions"]] == ["raised", "cleared"]
    assert k2["transitions"][1]["ts"].startswith("2030-03-17T17:47:00")

    table = cli(env, "show", str(ids["t-queue", "k2"]))
    assert table.exit_code == 0, table.output
    assert "transitions" in table.output
    assert "cleared_unack" in table.output
    assert "Trung bình / Minor" in table.output
    assert "mô tả / description" in table.output
    # k2's site has no ward/commune yet: its former district stands in.
    assert "Mức Trung bình: 50 người chờ tại Cau Giay station (Cầu Giấy, Cầu Giấy)" in table.output
    # Raised at T0, cleared at T0 + 20 s (17:47:00 UTC): Hanoi time, zone shown.
    assert "18/03/2030 00:46:40 +07" in table.output
    assert "18/03/2030 00:47:00 +07" in table.output
    assert "17:47:00" not in table.output
    assert_no_alert_word_for_a_severity(table.output)

    missing = cli(env, "show", "424242")
    assert missing.exit_code == 1
    assert "no alert with id 424242" in missing.output


def assert_no_alert_word_for_a_severity(output: str) -> None:
    """ "Cảnh báo" means an alert: no severity label is or contains it."""
    for name in SEVERITY_NAMES.values():
        assert "Cảnh báo" not in name.label
    for line in output.splitlines():
        if "Cảnh báo" in line or "cảnh báo" in line:
            assert not any(s in line for s in ("(warning)", "/ Warning)", "Cảnh báo / Warning"))


def test_ack_records_the_operator_and_reports_errors(with_alerts, db_conn, migrated):
    env, ids = with_alerts
    k1, k2, k3 = ids["t-queue", "k1"], ids["t-queue", "k2"], ids["t-offline", "k3"]
    result = cli(env | {"CITYHUB_OPERATOR": "Trần Thị Bình"}, "ack", str(k1), str(k2))
    assert result.exit_code == 0, result.output
    assert f"alert {k1}: active_ack (by Trần Thị Bình)" in result.output
    assert f"alert {k2}: cleared_ack (by Trần Thị Bình)" in result.output

    again = cli(env, "ack", str(k1), str(k3), "999999", "--by", "an")
    assert again.exit_code == 1
    assert f"alert {k1} is already acknowledged (active_ack)" in again.output
    assert "no alert with id 999999" in again.output
    assert f"alert {k3}: active_ack (by an)" in again.output  # the good id still went through
    rows = dict(db_conn.execute(f"SELECT alert_id, acked_by FROM {migrated}.alerts").fetchall())
    assert rows == {k1: "Trần Thị Bình", k2: "Trần Thị Bình", k3: "an"}

    nobody = cli(env, "ack", str(k1))
    assert nobody.exit_code == 1
    assert "--by NAME" in nobody.output


def test_run_once_against_the_database(db_conn, db_url, migrated, tmp_path):
    seed_devices(db_conn, migrated, [("k1", "kiosk", "hk-hall")])
    rules = tmp_path / "extra.toml"
    rules.write_text(KIOSK_RULES, encoding="utf-8")
    env = {
        "CITYHUB_DATABASE__URL": db_url,
        "CITYHUB_DATABASE__SCHEMA": migrated,
        "CITYHUB_ALERTS__RULES_PATH": str(rules),
    }
    result = CliRunner().invoke(app, ["alerts", "run", "--once", "--every", "1m"], env=env)
    assert result.exit_code == 0, result.output
    assert "evaluated 1 time: " in result.output
    (stored,) = db_conn.execute(f"SELECT last_eval_at FROM {migrated}.alert_jobs").fetchone()
    assert stored.timestamp() % 60 == 0  # on the one-minute grid

    bad = CliRunner().invoke(app, ["alerts", "run", "--once", "--every", "soon"], env=env)
    assert bad.exit_code == 1
    assert "--every" in bad.output
