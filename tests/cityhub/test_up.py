"""`cityhub up`: the whole system on one machine, as a user runs it, and its loss check."""

from __future__ import annotations

import re
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from cityhub.cli.up import _alerts_line
from cityhub.localstack.postgres import DB_NAME, DB_USER
from cityhub.localstack.procs import port_is_free
from contracts.schema import readings_table
from firmware_sim.ledger import LedgerEntry, RejectedRow, StoredRow, reconcile
from tests.plugins.servers import processes_under

SITES = "hk-ward-trang-tien,lb-hall-quan,hk-aq-hang-dau"


def _up(env: dict[str, str], seconds: int, sites: str = SITES) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cityhub", "up", "--for", f"{seconds}s", "--sites", sites],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def _row(out: str, label: str) -> int:
    match = re.search(rf"{re.escape(label)}\s*│\s*([\d,]+)", out)
    assert match, out[-3000:]
    return int(match.group(1).replace(",", ""))


@pytest.mark.slow
def test_up_for_a_fixed_time_stores_every_reading_and_leaves_nothing_running(up_dir):
    state_dir, env = up_dir
    result = _up(env, 12)
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    acknowledged = _row(out, "acknowledged (PUBACK, HTTP 2xx, or answered on a serial line or bus)")
    stored = _row(out, "│ stored")
    assert acknowledged > 50  # a dozen devices for about 12 s
    assert stored == acknowledged
    assert re.search(r"lost\s*│\s*0", out)
    assert re.search(r"duplicated\s*│\s*0", out)
    # The alerts job ran beside the pipeline and evaluated the rules.
    assert "open alerts:" in out
    alerts_log = (state_dir / "run" / "alerts.log").read_text()
    assert re.search(r"alerts job alerts: \d+ rules", alerts_log), alerts_log[-2000:]
    assert "evaluated " in alerts_log, alerts_log[-2000:]
    # A private Alertmanager ran with the null receiver, the alerts job posting to it.
    am_url = f"http://127.0.0.1:{env['CITYHUB_LOCAL__ALERTMANAGER_PORT']}"
    assert f"Alertmanager: {am_url} (no receivers file: alerts are shown there and sent " in out
    assert f'alertmanager_url = "{am_url}"' in (state_dir / "run" / "alerts.toml").read_text()
    assert (
        "receiver: 'cityhub-null'" in (state_dir / "alertmanager" / "alertmanager.yml").read_text()
    )
    assert (state_dir / "alertmanager" / "data").is_dir()
    # Ingest and the alerts job logged in as their own roles (they stored and
    # evaluated above), each with an owner-only password file.
    for kind in ("ingest", "alerts"):
        config = (state_dir / "run" / f"{kind}.toml").read_text()
        assert f'url = "postgresql://cityhub_{kind}@127.0.0.1:' in config
        secret = state_dir / f"db_cityhub_{kind}.password"
        assert f'password_file = "{secret}"' in config
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    # Authenticated (dev mode off by default), and no service connected as the admin:
    # its connections are provisioning's (control API, retained configs, start probe).
    conf = (state_dir / "mosquitto" / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in conf
    logins = _broker_logins(state_dir)
    users = {user for _, user in logins}
    gateways = {f"gw-{site}" for site in SITES.split(",")}
    assert {"ingest.local", "sim.local", "monitor.local"} <= users, logins
    assert {f"gateway.{g}" for g in gateways} | {f"gateway.{g}.site" for g in gateways} <= users
    admin_ids = [client_id for client_id, user in logins if user == "cityhub-admin"]
    assert admin_ids, logins
    assert all(i.startswith(("cityhub-ctl-", "cityhub-probe-")) for i in admin_ids), admin_ids
    for toml in (state_dir / "run").glob("*.toml"):
        assert "cityhub-admin" not in toml.read_text(), toml
    assert 'username = "ingest.local"' in (state_dir / "run" / "ingest.toml").read_text()
    # Every child and the servers are gone; their ports are free again.
    assert processes_under(state_dir) == []
    assert port_is_free(int(env["CITYHUB_LOCAL__PG_PORT"]))
    assert port_is_free(int(env["CITYHUB_LOCAL__MQTT_PORT"]))
    assert port_is_free(int(env["CITYHUB_LOCAL__ALERTMANAGER_PORT"]))


_LOGIN = re.compile(r"New client connected from \S+ as (?P<id>\S+) \(.*u'(?P<user>[^']*)'\)")


def _broker_logins(state_dir: Path) -> list[tuple[str, str]]:
    """(client id, username) of every connection the broker's log records."""
    log = (state_dir / "mosquitto" / "mosquitto.log").read_text(errors="replace")
    return [(m["id"], m["user"]) for m in _LOGIN.finditer(log)]


def _delete_one_reading(
    state_dir: Path, pg_port: int, since: float, done: threading.Event, deleted: list[tuple]
) -> None:
    """Delete one stored kiosk reading with a time after ``since``: a loss on purpose."""
    table = f"cityhub.{readings_table('kiosk')}"
    while not done.is_set() and not deleted:
        time.sleep(0.5)
        try:
            password = (state_dir / "postgres.password").read_text().strip()
            with psycopg.connect(
                f"postgresql://{DB_USER}:{password}@127.0.0.1:{pg_port}/{DB_NAME}",
                connect_timeout=2,
                autocommit=True,
            ) as conn:
                row = conn.execute(
                    f"DELETE FROM {table} WHERE (device_id, ts, seq) = "
                    f"(SELECT device_id, ts, seq FROM {table} WHERE ts >= to_timestamp(%s) "
                    "ORDER BY ts LIMIT 1) RETURNING device_id, seq",
                    (since,),
                ).fetchone()
        except (OSError, psycopg.Error):
            continue  # the server or the schema is not there yet
        if row is not None:
            deleted.append(row)


@pytest.mark.slow
def test_a_reading_lost_in_a_second_run_on_the_same_state_dir_fails_the_run(up_dir):
    """Earlier rows in the tables cannot hide a loss: the check is by reading, not by count."""
    state_dir, env = up_dir
    # Without the Alertmanager program the run goes on without notifications, saying so.
    first = _up({**env, "CITYHUB_LOCAL__ALERTMANAGER_BIN": str(state_dir / "no-such-program")}, 8)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "no-such-program) not installed: no notifications" in first.stdout, first.stdout[-3000:]
    assert "alertmanager_url" not in (state_dir / "run" / "alerts.toml").read_text()
    done = threading.Event()
    deleted: list[tuple] = []
    deleter = threading.Thread(
        target=_delete_one_reading,
        args=(state_dir, int(env["CITYHUB_LOCAL__PG_PORT"]), time.time(), done, deleted),
    )
    deleter.start()
    try:
        second = _up(env, 8)
    finally:
        done.set()
        deleter.join()
    assert deleted, "no reading of the second run was stored to delete"
    device_id, seq = deleted[0]
    out = second.stdout + second.stderr
    assert second.returncode == 1, out[-3000:]
    assert re.search(r"lost\s*│\s*1\b", out), out[-3000:]
    assert f"lost: {device_id} seq {seq} " in out, out[-3000:]


# --- the ledger's accounting (pure) ------------------------------------------------------


def _mqtt(seq: int, *, acked: bool = True, faults: tuple[str, ...] = ()) -> LedgerEntry:
    return LedgerEntry(
        device_id="kiosk-a",
        transport="mqtt",
        seq=seq,
        ts_ms=1000 + seq,
        acked_ms=5 if acked else None,
        faults=faults,
    )


def _serial(seq: int, *, acked: bool = True) -> LedgerEntry:
    return LedgerEntry(
        device_id="aq-a",
        transport="serial",
        seq=seq,
        ts_ms=1000 + seq,
        acked_ms=5 if acked else None,
    )


def test_reconcile_counts_stored_rejected_lost_and_duplicated():
    entries = [_mqtt(i) for i in range(5)] + [_mqtt(5, acked=False), _mqtt(6, acked=False)]
    stored = [StoredRow("kiosk-a", 0, 1000), StoredRow("kiosk-a", 1, 1001)]
    stored += [StoredRow("kiosk-a", 5, 1005), StoredRow("kiosk-a", 9, 9)]  # unacked; foreign
    rejected = [
        RejectedRow("kiosk-a", 2, 1002, "out_of_range"),
        RejectedRow("kiosk-a", 1, 1001, "out_of_range"),  # seq 1 stored and rejected
        RejectedRow("kiosk-a", None, None, "malformed"),
    ]
    r = reconcile(entries, stored, rejected)
    assert (r.acknowledged, r.stored, dict(r.rejected)) == (5, 1, {"out_of_range": 2})
    assert [e.seq for e in r.lost] == [3, 4]
    assert (r.duplicates, r.unacked_sent, r.unacked_stored, r.foreign_rows) == (1, 2, 1, 2)
    assert not r.ok


def test_reconcile_repeated_rows_and_refusals_at_the_gateway():
    entries = [_mqtt(0), _mqtt(1, faults=("spike_out_of_range:pm25",)), _mqtt(2)]
    stored = [StoredRow("kiosk-a", 0, 1000), StoredRow("kiosk-a", 2, 1002)]
    rejected = [RejectedRow("kiosk-a", 2, 1002, "x"), RejectedRow("kiosk-a", 2, 1002, "x")]
    r = reconcile(entries, stored, rejected)
    assert dict(r.refused_at_gateway) == {"spike_out_of_range": 1}
    assert r.lost == []
    assert r.duplicates == 2


def test_reconcile_matches_serial_readings_by_count():
    entries = [_serial(i) for i in range(4)] + [_serial(4, acked=False)]
    # The gateway stamps serial readings: their keys never match the ledger's.
    rows = [StoredRow("aq-a", i, 77 + i) for i in range(3)]
    r = reconcile(entries, rows, [])
    assert dict(r.serial_lost) == {"aq-a": 1}
    assert r.lost_total == 1
    assert r.stored == 3
    r = reconcile(entries, [*rows, StoredRow("aq-a", 3, 80), StoredRow("aq-a", 4, 81)], [])
    assert r.ok
    assert r.unacked_stored == 1
    six = [*rows, *(StoredRow("aq-a", i, 80 + i) for i in range(3))]
    assert reconcile(entries, six, []).duplicates == 1
    r = reconcile(entries, rows, [RejectedRow("aq-a", 9, 9, "out_of_range")])
    assert r.ok
    assert r.stored == 3
    assert dict(r.rejected) == {"out_of_range": 1}


def test_open_alerts_line_names_severities_in_the_shared_vocabulary():
    assert _alerts_line({"warning": 2, "major": 1}) == (
        "open alerts: 3 (1 Cao / Major, 2 Thấp / Warning)"
    )
    assert _alerts_line({}) == "open alerts: none"
