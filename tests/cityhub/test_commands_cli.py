"""`cityhub devices command` and `cityhub commands list | show | cancel` against a real database.

Devices are registered with the registry's own statements (no broker: asking
for a command touches the database only). Ingest's report consumer is played
by plain SQL on another connection: an event, the state, a pg_notify, as
spec'd for it. `--wait` runs as a subprocess so that the test can write
states while it follows them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from typer.testing import CliRunner

from cityhub.cli.commands import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_PENDING,
    EXIT_REFUSED,
    EXIT_SUCCEEDED,
    parse_since,
    parse_states,
    parse_ttl,
)
from cityhub.cli.context import local_time
from cityhub.cli.main import app
from contracts.commands import COMMAND_TTL_MAX_S
from contracts.errors import SettingsError
from contracts.messages import DeviceConfig
from contracts.schema import command_channel, command_state_channel
from devices.registry import Registry

SITE = "hk-hall-quan"
OPERATOR = "Phạm Thu Hà"

# --- pure: the options' parsing -----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("90", 90), ("10m", 600), ("2h", 7200), ("1d", 86_400), (" 5m ", 300)],
)
def test_ttl_takes_seconds_minutes_hours_and_a_day(text, seconds):
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["0s", "2d", "25h", "1.5h", "10 m", "-1m", "m", "", "1w"])
def test_ttl_refused_outside_a_day_or_malformed(text):
    with pytest.raises(SettingsError, match="--ttl"):
        parse_ttl(text)
    assert COMMAND_TTL_MAX_S == 86_400


def test_since_and_states_filters():
    now = datetime(2026, 12, 6, 10, 0, tzinfo=UTC)
    assert parse_since("2h", now) == now - timedelta(hours=2)
    assert parse_since("2026-12-06T08:00:00", now) == datetime(2026, 12, 6, 8, tzinfo=UTC)
    assert parse_since("2026-12-06T15:00:00+07:00", now) == datetime(2026, 12, 6, 8, tzinfo=UTC)
    assert parse_states(["queued,sent", "final"]) == (
        "queued",
        "sent",
        "cancelled",
        "expired",
        "failed",
        "succeeded",
    )
    with pytest.raises(SettingsError, match="'done' is not one of"):
        parse_states(["done"])


# --- the commands against the database ----------------------------------------------


@pytest.fixture
def env(db_url, seeded):
    return {
        "CITYHUB_DATABASE__URL": db_url,
        "CITYHUB_DATABASE__SCHEMA": seeded,
        "CITYHUB_OPERATOR": OPERATOR,
        "COLUMNS": "500",
    }


def _uid() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture
def fleet(db_conn, seeded):
    """A gateway with an MQTT kiosk, a serial PMS5003 and an SDS011 air-quality sensor."""
    gw = f"gw-{_uid()}"
    devices = {
        "kiosk": DeviceConfig(device_id=f"kiosk-{_uid()}", device_type="kiosk", transport="mqtt"),
        "pms": DeviceConfig(
            device_id=f"aq-{_uid()}",
            device_type="air_quality",
            transport="serial",
            port="/dev/ttyUSB0",
            protocol="pms5003",
        ),
        "sds": DeviceConfig(
            device_id=f"aq-{_uid()}",
            device_type="air_quality",
            transport="serial",
            port="/dev/ttyUSB1",
            protocol="sds011",
        ),
    }
    with Registry(db_conn, schema=seeded).transaction() as tx:
        tx.insert_gateway(gateway_id=gw, site_id=SITE, label="", location="")
        for config in devices.values():
            tx.insert_device(config, site_id=SITE, gateway_id=gw, location="", hardware_id="")
    return gw, {k: v.device_id for k, v in devices.items()}


def cli(env, *args: str):
    return CliRunner().invoke(app, list(args), env=env)


def _counts(db_conn, schema: str) -> tuple[int, int, int]:
    return db_conn.execute(
        f"""SELECT (SELECT count(*) FROM {schema}.commands),
            (SELECT count(*) FROM {schema}.command_events),
            (SELECT count(*) FROM {schema}.audit_log WHERE subject_kind = 'command')"""
    ).fetchone()


def _ask(env, device_id: str, name: str, *args: str) -> str:
    result = cli(env, "devices", "command", device_id, name, *args)
    assert result.exit_code == 0, result.output
    return result.output.split("Queued: ")[1].split()[0]


def report(db_conn, schema: str, command_id: str, state: str, detail: str = "", answer=None):
    """What ingest's report consumer does with a gateway's report, in plain SQL."""
    with db_conn.transaction():
        db_conn.execute(
            f"""INSERT INTO {schema}.command_events (command_id, state, ts, source, detail)
                VALUES (%s, %s, now(), 'gateway', %s) ON CONFLICT DO NOTHING""",
            (command_id, state, detail),
        )
        db_conn.execute(
            f"""UPDATE {schema}.commands SET state = %s, state_at = now(), detail = %s,
                answer = %s::jsonb,
                sends = CASE WHEN %s = 'sent' THEN sends + 1 ELSE sends END
                WHERE command_id = %s""",
            (state, detail, json.dumps(answer) if answer else None, state, command_id),
        )
        db_conn.execute("SELECT pg_notify(%s, %s)", (command_state_channel(schema), command_id))


def test_refused_requests_store_nothing_and_name_the_catalog_entry(env, fleet, db_conn, seeded):
    gw, ids = fleet
    revoked, disabled, orphan = (f"kiosk-{_uid()}" for _ in range(3))
    with Registry(db_conn, schema=seeded).transaction() as tx:
        for device_id in (revoked, disabled, orphan):
            config = DeviceConfig(device_id=device_id, device_type="kiosk", transport="mqtt")
            tx.insert_device(config, site_id=SITE, gateway_id=gw, location="", hardware_id="")
        tx.revoke_device(revoked)
        tx.update_device(disabled, enabled=False)
        tx.update_device(orphan, gateway_id=None)
    cases = [
        ((ids["kiosk"], "fly"), "device type 'kiosk': command 'fly'", "unknown command"),
        (
            (ids["kiosk"], "set_reporting_interval", "--arg", "interval_s=soon"),
            "command 'set_reporting_interval': arg 'interval_s'",
            "",
        ),
        (
            (ids["kiosk"], "set_reporting_interval", "--arg", "interval_s=0"),
            "arg 'interval_s'",
            "outside",
        ),
        (
            (ids["kiosk"], "set_reporting_interval"),
            "arg 'interval_s'",
            "missing (it is required)",
        ),
        ((ids["kiosk"], "open_queue", "--arg", "color=red"), "arg 'color'", "unknown arg"),
        (
            (ids["pms"], "set_working_period", "--arg", "minutes=5"),
            "device type 'air_quality': command 'set_working_period'",
            "a serial pms5003 device cannot take it",
        ),
        (
            (ids["sds"], "set_reporting_interval", "--arg", "interval_s=60"),
            "command 'set_reporting_interval'",
            "a serial sds011 device cannot take it",
        ),
        ((f"ghost-{_uid()}", "reboot"), "is not registered", ""),
        ((revoked, "reboot"), f"device {revoked!r} is revoked", ""),
        ((disabled, "reboot"), f"device {disabled!r} is disabled", ""),
        ((orphan, "reboot"), f"device {orphan!r} has no gateway", ""),
        ((ids["kiosk"], "reboot", "--ttl", "2d"), "--ttl", "1 s to 24 h"),
    ]
    for args, names, problem in cases:
        result = cli(env, "devices", "command", *args)
        assert result.exit_code == EXIT_REFUSED, (args, result.output)
        assert names in result.output, (args, result.output)
        assert problem in result.output, (args, result.output)
        assert "Traceback" not in result.output
    assert _counts(db_conn, seeded) == (0, 0, 0)
    # The serial SDS011 takes a command its frames carry.
    _ask(env, ids["sds"], "set_working_period", "--arg", "minutes=5")
    assert _counts(db_conn, seeded) == (1, 1, 1)


def test_a_command_is_stored_with_its_event_audit_row_and_a_notice(
    env, fleet, db_conn, db_url, seeded
):
    gw, ids = fleet
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute(f'LISTEN "{command_channel(seeded)}"')
        command_id = _ask(
            env, ids["kiosk"], "close_queue", "--arg", "message=Hết giờ làm việc", "--ttl", "90s"
        )
        notices = list(listener.notifies(timeout=5, stop_after=1))
    assert [(n.channel, n.payload) for n in notices] == [(command_channel(seeded), command_id)]
    assert re.fullmatch(r"c-[0-9a-f]{16}", command_id)
    row = db_conn.execute(
        f"""SELECT device_id, gateway_id, device_type, name, args, ttl_s, operator, state,
            sends, expires_at - created_at, state_at = created_at
            FROM {seeded}.commands WHERE command_id = %s""",
        (command_id,),
    ).fetchone()
    assert row == (
        ids["kiosk"],
        gw,
        "kiosk",
        "close_queue",
        {"message": "Hết giờ làm việc"},
        90,
        OPERATOR,
        "queued",
        0,
        timedelta(seconds=90),
        True,
    )
    events = db_conn.execute(
        f"SELECT state, source FROM {seeded}.command_events WHERE command_id = %s", (command_id,)
    ).fetchall()
    assert events == [("queued", "hub")]
    audit = db_conn.execute(
        f"""SELECT operator, action, subject_kind, detail FROM {seeded}.audit_log
            WHERE subject_id = %s""",
        (command_id,),
    ).fetchall()
    assert len(audit) == 1
    assert audit[0][:3] == (OPERATOR, "command", "command")
    assert audit[0][3]["device"] == ids["kiosk"]
    assert audit[0][3]["name"] == "close_queue"
    assert audit[0][3]["args"] == {"message": "Hết giờ làm việc"}
    # Typed by the catalog: an int arg is stored as a number; the default ttl is 10 minutes.
    other = _ask(env, ids["kiosk"], "set_reporting_interval", "--arg", "interval_s=60")
    assert db_conn.execute(
        f"SELECT args, ttl_s FROM {seeded}.commands WHERE command_id = %s", (other,)
    ).fetchone() == ({"interval_s": 60}, 600)


def test_an_operator_is_required(env, fleet, db_conn, seeded):
    _gw, ids = fleet
    result = cli({**env, "CITYHUB_OPERATOR": ""}, "devices", "command", ids["kiosk"], "reboot")
    assert result.exit_code == EXIT_REFUSED
    assert "operator" in result.output
    assert _counts(db_conn, seeded) == (0, 0, 0)


def test_list_and_show_in_both_languages_on_hanoi_time(env, fleet, db_conn, seeded):
    gw, ids = fleet
    first = _ask(env, ids["kiosk"], "open_queue")
    second = _ask(env, ids["pms"], "sleep")
    report(db_conn, seeded, first, "sent")
    report(db_conn, seeded, first, "delivered")
    report(db_conn, seeded, first, "succeeded", "queue opened", {"queue_length": 3})

    listed = cli(env, "commands", "list", "--json")
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.output)
    assert [r["command_id"] for r in rows] == [second, first]  # newest first
    assert [r["state"] for r in rows] == ["queued", "succeeded"]
    by_state = json.loads(cli(env, "commands", "list", "--json", "--state", "final").output)
    assert [r["command_id"] for r in by_state] == [first]
    by_device = json.loads(cli(env, "commands", "list", "--json", "--device", ids["pms"]).output)
    assert [r["command_id"] for r in by_device] == [second]
    by_gateway = json.loads(cli(env, "commands", "list", "--json", "--gateway", gw).output)
    assert len(by_gateway) == 2
    assert json.loads(cli(env, "commands", "list", "--json", "--gateway", "gw-none").output) == []
    assert len(json.loads(cli(env, "commands", "list", "--json", "--limit", "1").output)) == 1
    assert len(json.loads(cli(env, "commands", "list", "--json", "--since", "1h").output)) == 2
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert json.loads(cli(env, "commands", "list", "--json", "--since", future).output) == []
    refused = cli(env, "commands", "list", "--state", "done")
    assert refused.exit_code == 1
    assert "'done' is not one of" in refused.output

    table = cli(env, "commands", "list")
    assert table.exit_code == 0, table.output
    assert "2 lệnh / commands, mới nhất trước / newest first" in table.output
    assert "thành công / succeeded" in table.output
    assert "đang chờ gửi / queued" in table.output
    created = db_conn.execute(
        f"SELECT created_at FROM {seeded}.commands WHERE command_id = %s", (first,)
    ).fetchone()[0]
    assert local_time(created) in table.output
    assert local_time(created).endswith("+07")

    shown = cli(env, "commands", "show", first)
    assert shown.exit_code == 0, shown.output
    out = shown.output
    positions = [
        out.index(label)
        for label in (
            "đang chờ gửi / queued",
            "đã gửi tới gateway / sent to the gateway",
            "thiết bị đã nhận / delivered to the device",
        )
    ]
    assert positions == sorted(positions)
    assert "queue opened" in out
    assert "queue_length=3" in out
    assert local_time(created) in out
    document = json.loads(cli(env, "commands", "show", first, "--json").output)
    assert document["command"]["answer"] == {"queue_length": 3}
    assert [e["state"] for e in document["events"]] == ["queued", "sent", "delivered", "succeeded"]
    assert [e["source"] for e in document["events"]] == ["hub", "gateway", "gateway", "gateway"]
    missing = cli(env, "commands", "show", "c-0000000000000000")
    assert missing.exit_code == 1
    assert "is not known" in missing.output


def test_cancel_of_a_command_never_sent_is_at_once(env, fleet, db_conn, db_url, seeded):
    _gw, ids = fleet
    command_id = _ask(env, ids["kiosk"], "reboot")
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute(f'LISTEN "{command_state_channel(seeded)}"')
        result = cli(env, "commands", "cancel", command_id)
        notices = [n.payload for n in listener.notifies(timeout=5, stop_after=1)]
    assert result.exit_code == 0, result.output
    assert "Đã huỷ / Cancelled" in result.output
    assert notices == [command_id]
    row = db_conn.execute(
        f"""SELECT state, detail, cancelled_by, cancel_requested_at IS NOT NULL
            FROM {seeded}.commands WHERE command_id = %s""",
        (command_id,),
    ).fetchone()
    assert row == ("cancelled", "cancelled before it was sent", OPERATOR, True)
    events = db_conn.execute(
        f"""SELECT state, source, detail FROM {seeded}.command_events WHERE command_id = %s
            ORDER BY ts""",
        (command_id,),
    ).fetchall()
    assert events == [("queued", "hub", ""), ("cancelled", "hub", "cancelled before it was sent")]
    audit = db_conn.execute(
        f"SELECT operator, detail FROM {seeded}.audit_log WHERE action = 'command.cancel'"
    ).fetchall()
    assert audit == [
        (
            OPERATOR,
            {"device": ids["kiosk"], "name": "reboot", "state": "queued", "outcome": "cancelled"},
        )
    ]
    again = cli(env, "commands", "cancel", command_id)
    assert again.exit_code == 1
    assert "already cancelled" in again.output


def test_cancel_of_a_sent_command_is_a_request_and_the_state_stays(
    env, fleet, db_conn, db_url, seeded
):
    _gw, ids = fleet
    command_id = _ask(env, ids["kiosk"], "reboot")
    report(db_conn, seeded, command_id, "sent")
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute(f'LISTEN "{command_channel(seeded)}"')
        result = cli(env, "commands", "cancel", command_id)
        notices = [n.payload for n in listener.notifies(timeout=5, stop_after=1)]
    assert result.exit_code == 0, result.output
    assert "Đã yêu cầu huỷ / Cancel requested" in result.output
    assert notices == [command_id]  # the dispatcher is woken to send the cancel
    row = db_conn.execute(
        f"""SELECT state, cancelled_by, cancel_requested_at IS NOT NULL
            FROM {seeded}.commands WHERE command_id = %s""",
        (command_id,),
    ).fetchone()
    assert row == ("sent", OPERATOR, True)
    assert "cancel requested" in cli(env, "commands", "list").output
    twice = cli(env, "commands", "cancel", command_id)
    assert twice.exit_code == 1
    assert "already asked to cancel it" in twice.output
    # A command the device has cannot be taken back.
    delivered = _ask(env, ids["kiosk"], "open_queue")
    report(db_conn, seeded, delivered, "sent")
    report(db_conn, seeded, delivered, "delivered")
    late = cli(env, "commands", "cancel", delivered)
    assert late.exit_code == 1
    assert "can no longer be cancelled" in late.output
    assert db_conn.execute(
        f"SELECT cancel_requested_at FROM {seeded}.commands WHERE command_id = %s", (delivered,)
    ).fetchone() == (None,)


def _start_wait(env, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "cityhub", "devices", "command", *args, "--wait"],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _queued_id(db_conn, schema: str, device_id: str, waiter: subprocess.Popen[str]) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        row = db_conn.execute(
            f"SELECT command_id FROM {schema}.commands WHERE device_id = %s", (device_id,)
        ).fetchone()
        if row is not None:
            return row[0]
        assert waiter.poll() is None, waiter.communicate()
        time.sleep(0.05)
    raise AssertionError("the command was never queued")


@pytest.mark.parametrize(
    ("final", "detail", "code"),
    [
        ("succeeded", "interval set", EXIT_SUCCEEDED),
        ("failed", "no answer from the device within 30 s", EXIT_FAILED),
    ],
)
def test_wait_follows_the_states_ingest_stores(env, fleet, db_conn, seeded, final, detail, code):
    _gw, ids = fleet
    waiter = _start_wait(env, ids["kiosk"], "set_reporting_interval", "--arg", "interval_s=30")
    try:
        command_id = _queued_id(db_conn, seeded, ids["kiosk"], waiter)
        for state in ("sent", "delivered"):
            time.sleep(0.2)
            report(db_conn, seeded, command_id, state)
        time.sleep(0.2)
        report(db_conn, seeded, command_id, final, detail)
        out, err = waiter.communicate(timeout=30)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.communicate()
    assert waiter.returncode == code, (out, err)
    lines = [line for line in out.splitlines() if line.endswith("+07") or " +07  " in line]
    labels = [
        "đang chờ gửi / queued",
        "đã gửi tới gateway / sent to the gateway",
        "thiết bị đã nhận / delivered to the device",
        {"succeeded": "thành công / succeeded", "failed": "thất bại / failed"}[final],
    ]
    states = [line for line in lines if any(label in line for label in labels)]
    assert len(states) == 4, out
    for line, label in zip(states, labels, strict=True):
        assert label in line
        assert line[:19].count("/") == 2  # dd/mm/yyyy HH:MM:SS +07: Hanoi's clock
    assert states[-1].endswith(f"— {detail}")


def test_wait_gives_up_after_its_timeout_and_the_command_goes_on(env, fleet, db_conn, seeded):
    _gw, ids = fleet
    waiter = _start_wait(env, ids["kiosk"], "reboot", "--timeout", "1s")
    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == EXIT_PENDING, (out, err)
    assert "it goes on" in err
    assert "đang chờ gửi / queued" in out
    assert db_conn.execute(f"SELECT state FROM {seeded}.commands").fetchall() == [("queued",)]


def test_ctrl_c_stops_following_and_the_command_goes_on(env, fleet, db_conn, seeded):
    _gw, ids = fleet
    waiter = _start_wait(env, ids["kiosk"], "reboot")
    try:
        command_id = _queued_id(db_conn, seeded, ids["kiosk"], waiter)
        time.sleep(0.5)  # following: printing the queued state, listening
        waiter.send_signal(signal.SIGINT)
        out, err = waiter.communicate(timeout=30)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.communicate()
    assert waiter.returncode == EXIT_INTERRUPTED, (out, err)
    assert "the command goes on" in err
    assert f"cityhub commands cancel {command_id}" in err
    assert "Traceback" not in err
    assert db_conn.execute(f"SELECT state FROM {seeded}.commands").fetchall() == [("queued",)]
