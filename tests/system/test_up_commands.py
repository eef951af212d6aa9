"""`cityhub devices command` against the simulated fleet of a running `cityhub up`, every type.

The whole system runs as a user runs it: a real `cityhub up` process (private
broker and database, ingest, a gateway per site, the simulator), and the
operator's commands are separate `cityhub devices command ... --wait`
processes with the same state directory, as a second terminal would run
them. Each device type with commands gets one of them and must succeed end
to end: the CLI stores it, ingest's dispatcher sends it to the gateway, the
gateway hands it to the device (an MQTT v5 request, or SDS011 / PMS5003
frames on a pty), the device carries it out and answers, and the states come
back to the database. The audit log names the operator. The fleet file's
empty `[faults]` turns the standard fleet's occasional command failures off.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from cityhub.localstack.postgres import DB_NAME, DB_USER
from contracts import catalog
from tests.plugins.alertmanager import wait_for
from tests.plugins.servers import processes_under

SITES = ("hk-hall-quan", "hk-ward-cua-dong", "hk-aq-hang-dau", "hk-aq-dao-duy-tu")
FLEET = f"""
sites = {json.dumps(list(SITES))}

[devices.service_hall]
kiosk = 1
camera_counter = 1

[devices.ward_office]
conference_endpoint = 1

[devices.street_monitor]
air_quality = 1
noise_meter = 1
water_level = 1

[faults]
"""
OPERATOR = "ky-thuat-vien-an"
# One command per type with commands (and per serial protocol), with its args.
COMMANDS: dict[str, tuple[str, ...]] = {
    "kiosk": ("print_test_page",),
    "camera_counter": ("reset_count", "--arg", "occupancy=0"),
    "conference_endpoint": ("start_test_call", "--arg", "duration_s=10"),
    # The street stations' meters are on a Modbus bus: these commands write
    # registers (their models' writes).
    "noise_meter": ("calibrate_offset", "--arg", "offset_db=1.5"),
    "water_level": ("set_response_delay", "--arg", "delay_ms=60"),
    "sds011": ("set_working_period", "--arg", "minutes=0"),
    "pms5003": ("wake",),
}
# Start-up (servers, schema, fleet, processes) and the slowest command (a
# 10 s test call and the endpoint's 2-5 s around it); more only on a machine in trouble.
RUN_S = 240


def _connect(state_dir: Path, env: dict[str, str]) -> psycopg.Connection:
    password = (state_dir / "postgres.password").read_text().strip()
    port = env["CITYHUB_LOCAL__PG_PORT"]
    return psycopg.connect(
        f"postgresql://{DB_USER}:{password}@127.0.0.1:{port}/{DB_NAME}",
        connect_timeout=5,
        autocommit=True,
    )


def _fleet_devices(state_dir: Path, env: dict[str, str]) -> dict[str, str]:
    """Kind (device type, or serial protocol) -> a device id of the running fleet."""
    try:
        with _connect(state_dir, env) as conn:
            rows = conn.execute(
                "SELECT device_id, device_type, transport, protocol FROM cityhub.devices "
                "WHERE status = 'active' ORDER BY device_id"
            ).fetchall()
    except (psycopg.Error, OSError):
        return {}
    found: dict[str, str] = {}
    for device_id, device_type, transport, protocol in rows:
        found.setdefault(protocol if transport == "serial" else device_type, device_id)
    return found


def _online(state_dir: Path, env: dict[str, str], device_ids: list[str]) -> bool:
    """Every device has a reading stored (its gateway serves it; its answers can come)."""
    try:
        with _connect(state_dir, env) as conn:
            row = conn.execute(
                "SELECT count(*) FROM cityhub.device_state WHERE device_id = ANY(%s)",
                (device_ids,),
            ).fetchone()
    except (psycopg.Error, OSError):
        return False
    return row is not None and row[0] == len(device_ids)


@pytest.mark.slow
def test_every_device_type_takes_a_command_through_cityhub_up(
    up_dir: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    state_dir, env = up_dir
    env = {**env, "CITYHUB_OPERATOR": OPERATOR}
    typed = {t.name for t in catalog.DEVICE_TYPES.values() if t.commands}
    assert typed - {"air_quality"} <= set(COMMANDS), "a command for every type that has some"
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(FLEET, encoding="utf-8")
    out_path = tmp_path / "up.out"
    with out_path.open("wb") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "cityhub", "up", "--fleet", str(fleet), "--for", f"{RUN_S}s"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def running() -> None:
        if up.poll() is not None:
            raise AssertionError(f"cityhub up exited: {out_path.read_text()[-3000:]}")

    results: dict[str, subprocess.CompletedProcess[str]] = {}
    try:
        devices: dict[str, str] = {}

        def fleet_ready() -> bool:
            running()
            devices.update(_fleet_devices(state_dir, env))
            return set(COMMANDS) <= set(devices) and _online(
                state_dir, env, [devices[k] for k in COMMANDS]
            )

        wait_for(fleet_ready, 120, "every device of the fleet registered and reporting")
        # The operator's commands, all at once, as separate processes.
        started = {
            kind: subprocess.Popen(
                [
                    *(sys.executable, "-m", "cityhub", "devices", "command"),
                    *(devices[kind], *COMMANDS[kind], "--ttl", "5m", "--wait"),
                    *("--timeout", "90s"),
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for kind in COMMANDS
        }
        for kind, process in started.items():
            stdout, _ = process.communicate(timeout=120)
            results[kind] = subprocess.CompletedProcess(process.args, process.returncode, stdout)
        running()
        with _connect(state_dir, env) as conn:
            stored = {
                row[0]: row[1:]
                for row in conn.execute(
                    "SELECT device_id, state, name, operator, "
                    "  array(SELECT e.state FROM cityhub.command_events e "
                    "        WHERE e.command_id = c.command_id ORDER BY e.ts, e.received_at) "
                    "FROM cityhub.commands c"
                ).fetchall()
            }
            audited = {
                row[0]
                for row in conn.execute(
                    "SELECT detail->>'device' FROM cityhub.audit_log "
                    "WHERE subject_kind = 'command' AND operator = %s",
                    (OPERATOR,),
                ).fetchall()
            }
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
        up.wait(timeout=120)

    failures = {k: r.stdout[-1500:] for k, r in results.items() if r.returncode != 0}
    assert not failures, failures
    for kind, result in results.items():
        device_id = devices[kind]
        state, name, operator, events = stored[device_id]
        assert (state, name, operator) == ("succeeded", COMMANDS[kind][0], OPERATOR), kind
        assert events == ["queued", "sent", "delivered", "succeeded"], (kind, events)
        # --wait printed each state, in Vietnamese and English, on Hanoi time.
        assert "thành công / succeeded" in result.stdout, result.stdout
        assert "+07" in result.stdout, result.stdout
    assert audited >= {devices[k] for k in COMMANDS}
    assert up.returncode == 0, out_path.read_text()[-3000:]
    assert processes_under(state_dir) == []
