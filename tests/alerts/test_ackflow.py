"""Acknowledging, assigning and commenting on alerts, with a real Alertmanager and database.

`cityhub alerts ack` silences the alert in Alertmanager; the alerts job
expires the silence at the clear and creates the ones the command could
not. Assignments and comments are stored with the operator and the time,
shown by `alerts show`, and refused with one line and nothing stored when
they are not storable.
"""

from __future__ import annotations

import json
import time
import urllib.request
from datetime import datetime

import pytest
from typer.testing import CliRunner

from adapters.alertmanager import expire_silence
from alerts.lifecycle import MAX_NOTE_CHARS, check_note
from alerts.service import AlertsJob, wall_ms
from cityhub.cli.main import app
from cityhub.localstack.procs import free_port
from contracts.errors import InvalidNoteError
from tests.alerts.test_job import KIOSK_RULES, S, make_job, put_series
from tests.alerts.test_notify_job import kiosk_site, notify_settings, past_base, raise_k1
from tests.cityhub.test_alerts_cli import with_alerts

__all__ = ["kiosk_site", "with_alerts"]  # fixtures used below

OPERATOR = "Trần Thị Bình"
DAY_S = 86_400


def cli(env: dict[str, str], *args: str):
    return CliRunner().invoke(app, ["alerts", *args], env=env)


def cli_env(db_url: str, schema: str, alertmanager_url: str = "") -> dict[str, str]:
    return {
        "CITYHUB_DATABASE__URL": db_url,
        "CITYHUB_DATABASE__SCHEMA": schema,
        "CITYHUB_OPERATOR": OPERATOR,
        "CITYHUB_ALERTS__NOTIFY__ALERTMANAGER_URL": alertmanager_url,
        "COLUMNS": "250",
    }


def silence(url: str, silence_id: str) -> dict:
    with urllib.request.urlopen(f"{url}/api/v2/silence/{silence_id}", timeout=5) as answer:  # noqa: S310
        return json.loads(answer.read())


def k1_status(alertmanager) -> dict:
    [alert] = [a for a in alertmanager.alerts() if a["labels"]["device_id"] == "k1"]
    return alert["status"]


def stored(db_conn, schema: str, alert_id: int) -> tuple:
    return db_conn.execute(
        f"SELECT state, silence_id, ack_comment, acked_by FROM {schema}.alerts WHERE alert_id = %s",
        (alert_id,),
    ).fetchone()


def matchers(body: dict) -> set[tuple[str, str, bool, bool]]:
    return {(m["name"], m["value"], m["isRegex"], m["isEqual"]) for m in body["matchers"]}


def posted(job: AlertsJob, alert_id: int) -> None:
    assert job.notifier is not None
    job.notifier.add([alert_id])
    assert job.notifier.run(wall_ms()) >= 1


def test_ack_silences_the_alert_and_the_clear_expires_it(
    db_conn, db_url, kiosk_site, alertmanager, tmp_path
):
    schema, _, _ = kiosk_site
    job = make_job(db_url, schema, KIOSK_RULES, tmp_path, notify=notify_settings(alertmanager.url))
    try:
        base = past_base()
        alert_id = raise_k1(db_conn, schema, job, base)
        posted(job, alert_id)
        assert k1_status(alertmanager)["state"] == "active"

        before = time.time()
        env = cli_env(db_url, schema, alertmanager.url)
        result = cli(env, "ack", str(alert_id), "--comment", "Đang kiểm tra / checking the queue")
        assert result.exit_code == 0, result.output
        assert f"alert {alert_id}: active_ack (by {OPERATOR})" in result.output
        assert "silenced in Alertmanager" in result.output
        state, silence_id, comment, _ = stored(db_conn, schema, alert_id)
        assert (state, comment) == ("active_ack", "Đang kiểm tra / checking the queue")
        assert silence_id

        body = silence(alertmanager.url, silence_id)
        assert matchers(body) == {
            ("rule_id", "t-queue", False, True),
            ("device_id", "k1", False, True),
            ("severity", "minor", False, True),
        }
        assert body["createdBy"] == OPERATOR
        assert body["comment"] == "Đang kiểm tra / checking the queue"
        assert body["status"]["state"] == "active"
        ends = datetime.fromisoformat(body["endsAt"]).timestamp()
        assert before + DAY_S - 5 < ends < time.time() + DAY_S + 5  # the 24 h bound
        status = k1_status(alertmanager)
        assert status["state"] == "suppressed"
        assert status["silencedBy"] == [silence_id]

        # The clear: the job's post of the changed alert expires the silence.
        put_series(db_conn, schema, "kiosk", "k1", base + 10 * S, base + 60 * S, queue_length=10)
        report = job.run_cycle(base + 60 * S)
        assert report.cleared == 1
        posted(job, alert_id)
        assert silence(alertmanager.url, silence_id)["status"]["state"] == "expired"
        assert stored(db_conn, schema, alert_id)[:2] == ("cleared_ack", None)
        expire_silence(alertmanager.url, silence_id, 2.0)  # already expired: done, no error
        expire_silence(alertmanager.url, "00000000-0000-0000-0000-000000000000", 2.0)  # unknown
    finally:
        job.close()


def test_ack_with_alertmanager_down_warns_and_the_job_creates_the_silence(
    db_conn, db_url, kiosk_site, alertmanager, tmp_path
):
    schema, _, _ = kiosk_site
    job = make_job(db_url, schema, KIOSK_RULES, tmp_path, notify=notify_settings(alertmanager.url))
    try:
        alert_id = raise_k1(db_conn, schema, job, past_base())
        nobody = f"http://127.0.0.1:{free_port()}"
        result = cli(cli_env(db_url, schema, nobody), "ack", str(alert_id), "--comment", "xem lại")
        assert result.exit_code == 0, result.output
        assert f"alert {alert_id}: active_ack (by {OPERATOR})" in result.output
        assert "silence could not be created; the alerts job retries" in result.output
        assert "unreachable" in result.output
        assert stored(db_conn, schema, alert_id) == ("active_ack", None, "xem lại", OPERATOR)

        assert job.notifier is not None
        job.notifier.run(wall_ms())  # the first run is a full post
        silence_id = stored(db_conn, schema, alert_id)[1]
        assert silence_id
        body = silence(alertmanager.url, silence_id)
        assert (body["createdBy"], body["comment"]) == (OPERATOR, "xem lại")
        assert ("severity", "minor", False, True) in matchers(body)
        assert k1_status(alertmanager)["silencedBy"] == [silence_id]

        job.notifier.sync_silences(wall_ms())  # nothing missing any more: no second silence
        assert stored(db_conn, schema, alert_id)[1] == silence_id
    finally:
        job.close()


def test_ack_without_alertmanager_works_as_before(with_alerts, db_conn, migrated):
    env, ids = with_alerts
    k1 = ids["t-queue", "k1"]
    result = cli(env | {"CITYHUB_OPERATOR": OPERATOR}, "ack", str(k1))
    assert result.exit_code == 0, result.output
    assert "silence" not in result.output
    assert stored(db_conn, migrated, k1) == ("active_ack", None, None, OPERATOR)
    [(action, operator, detail)] = db_conn.execute(
        f"SELECT action, operator, detail FROM {migrated}.audit_log WHERE subject_kind = 'alert' "
        "AND subject_id = %s",
        (str(k1),),
    ).fetchall()
    assert (action, operator, detail["state"]) == ("alert.ack", OPERATOR, "active_ack")


def test_assign_and_comment_are_stored_and_shown(with_alerts, db_conn, migrated):
    env, ids = with_alerts
    env = env | {"CITYHUB_OPERATOR": OPERATOR}
    k1 = ids["t-queue", "k1"]
    result = cli(env, "assign", str(k1), "--to", "Lê Văn Cường")
    assert result.exit_code == 0, result.output
    assert f"alert {k1}: assigned to Lê Văn Cường (by {OPERATOR})" in result.output
    result = cli(env, "comment", str(k1), "Quầy 1 đông / kiosk 1 crowded", "--by", "an")
    assert result.exit_code == 0, result.output

    shown = json.loads(cli(env, "show", str(k1), "--json").output)
    assert shown["alert"]["assignee"] == "Lê Văn Cường"
    assert [(n["operator"], n["kind"], n["text"]) for n in shown["notes"]] == [
        (OPERATOR, "assign", "Lê Văn Cường"),
        ("an", "comment", "Quầy 1 đông / kiosk 1 crowded"),
    ]
    assert all(n["ts"].startswith(time.strftime("%Y-%m-%d")) for n in shown["notes"])
    table = cli(env, "show", str(k1))
    assert "notes" in table.output
    assert "kiosk 1 crowded" in table.output

    listed = json.loads(cli(env, "list", "--json", "--device", "k1").output)
    assert [a["assignee"] for a in listed] == ["Lê Văn Cường"]
    assert "Lê Văn Cường" in cli(env, "list").output
    actions = [
        r[0]
        for r in db_conn.execute(
            f"SELECT action FROM {migrated}.audit_log WHERE subject_kind = 'alert' "
            "ORDER BY audit_id"
        )
    ]
    assert actions == ["alert.assign", "alert.comment"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("comment", "424242", "hello"), "no alert with id 424242"),
        (("assign", "424242", "--to", "an"), "no alert with id 424242"),
        (("comment", "{k1}", "   "), "the comment is empty"),
        (("comment", "{k1}", "x" * (MAX_NOTE_CHARS + 1)), "over 1000"),
        (("comment", "{k1}", "line one\nline two"), "control character (U+000A)"),
        (("assign", "{k1}", "--to", ""), "the assignee is empty"),
        (("assign", "{k2}", "--to", "an"), "cleared and acknowledged (cleared_ack)"),
        (("ack", "{k3}", "--comment", "a\tb"), "control character (U+0009)"),
    ],
)
def test_refusals_store_nothing(with_alerts, db_conn, migrated, args, message):
    env, ids = with_alerts
    env = env | {"CITYHUB_OPERATOR": OPERATOR}
    k2 = ids["t-queue", "k2"]
    assert cli(env, "ack", str(k2)).exit_code == 0  # k2: cleared_ack
    before = db_conn.execute(
        f"SELECT (SELECT count(*) FROM {migrated}.alert_notes), "
        f"(SELECT count(*) FROM {migrated}.audit_log), "
        f"(SELECT count(*) FROM {migrated}.alerts WHERE assignee IS NOT NULL OR state = "
        "'active_ack')"
    ).fetchone()
    names = {"k1": ids["t-queue", "k1"], "k2": k2, "k3": ids["t-offline", "k3"]}
    result = cli(env, *(a.format(**names) for a in args))
    assert result.exit_code == 1
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    after = db_conn.execute(
        f"SELECT (SELECT count(*) FROM {migrated}.alert_notes), "
        f"(SELECT count(*) FROM {migrated}.audit_log), "
        f"(SELECT count(*) FROM {migrated}.alerts WHERE assignee IS NOT NULL OR state = "
        "'active_ack')"
    ).fetchone()
    assert after == before


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  đã gọi kỹ thuật  ", "đã gọi kỹ thuật"),
        ("x" * MAX_NOTE_CHARS, "x" * MAX_NOTE_CHARS),
        ("", None),
        ("x" * (MAX_NOTE_CHARS + 1), None),
        ("bell\x07", None),
        ("esc\x1b[31m", None),
        ("del\x7f", None),
    ],
)
def test_check_note(text, expected):
    if expected is None:
        with pytest.raises(InvalidNoteError):
            check_note(text)
    else:
        assert check_note(text) == expected


def test_escalation_expires_the_silence_and_a_new_ack_silences_the_new_severity(
    db_conn, db_url, kiosk_site, alertmanager, tmp_path
):
    schema, _, _ = kiosk_site
    job = make_job(db_url, schema, KIOSK_RULES, tmp_path, notify=notify_settings(alertmanager.url))
    try:
        base = past_base()
        alert_id = raise_k1(db_conn, schema, job, base)
        posted(job, alert_id)
        env = cli_env(db_url, schema, alertmanager.url)
        assert cli(env, "ack", str(alert_id)).exit_code == 0
        minor_silence = stored(db_conn, schema, alert_id)[1]
        assert silence(alertmanager.url, minor_silence)["comment"] == (
            "Đã xác nhận / acknowledged in cityhub"
        )

        # Over the escalation threshold (80): major, unacknowledged, the minor silence expired.
        put_series(db_conn, schema, "kiosk", "k1", base + 10 * S, base + 40 * S, queue_length=95)
        report = job.run_cycle(base + 40 * S)
        assert report.escalated == 1
        posted(job, alert_id)
        assert stored(db_conn, schema, alert_id)[:2] == ("active_unack", None)
        assert silence(alertmanager.url, minor_silence)["status"]["state"] == "expired"
        assert k1_status(alertmanager)["state"] == "active"  # the major alert notifies

        result = cli(env, "ack", str(alert_id))
        assert result.exit_code == 0, result.output
        major_silence = stored(db_conn, schema, alert_id)[1]
        assert major_silence not in {None, minor_silence}
        body = silence(alertmanager.url, major_silence)
        assert ("severity", "major", False, True) in matchers(body)
        assert k1_status(alertmanager)["silencedBy"] == [major_silence]
    finally:
        job.close()
