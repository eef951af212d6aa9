"""Commands through the whole path while each part is killed: none lost, none run twice.

Real parts throughout: the operator's side (``CommandRegistry.ask``, what
`cityhub devices command` runs), an ingest worker process (the dispatcher
and the report consumer) that the test kills with -9, a central Mosquitto
that the test kills with -9, a gateway process that the test kills with -9
while a command is at its device, MQTT v5 devices that answer on the
request's Response Topic and keep each command id once, and the private
TimescaleDB. At the end every command has its final state centrally, with
each state reached once, and each device carried out each of its commands
exactly once.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from cityhub.localstack.mosquitto import ADMIN_USER, MosquittoServer
from cityhub.localstack.procs import stop_process_group
from devices.commands import CommandRegistry
from tests.gateway.test_commands import Device
from tests.plugins.gateway import client, mqtt_devices, publish_config, wait_for
from tests.plugins.ingest import (
    ingest_settings,
    seed_registry,
    start_ingest_process,
    write_config,
)

pytestmark = pytest.mark.slow
OPERATOR = "dieu-hanh-vien"


def _broker_lines(server: MosquittoServer) -> str:
    return (
        f'host = "127.0.0.1"\nport = {server.port}\n'
        f'username = "{ADMIN_USER}"\npassword = "{server.admin_password}"\n'
    )


def _gateway_config(
    path: Path, *, central: MosquittoServer, site: MosquittoServer, gateway_id: str, prefix: str
) -> Path:
    path.write_text(
        f"[broker]\n{_broker_lines(central)}\n[gateway]\n"
        f'gateway_id = "{gateway_id}"\nsite_id = "hk-hall"\ntopic_prefix = "{prefix}"\n'
        f'outbox_path = "{path.parent / "outbox.sqlite3"}"\n'
        "device_rate_per_s = 1000.0\ndevice_burst = 1000.0\nstate_interval_s = 0.5\n"
        f"ack_timeout_s = 1.0\n[gateway.site_broker]\n{_broker_lines(site)}",
        encoding="utf-8",
    )
    return path


def _start_gateway(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _kill(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(10)


def _finals(conn: psycopg.Connection, schema: str, ids: list[str]) -> dict[str, str]:
    rows = conn.execute(
        f"SELECT command_id, state FROM {schema}.commands WHERE command_id = ANY(%s) "
        "AND state IN ('succeeded', 'failed', 'expired', 'cancelled')",
        (ids,),
    ).fetchall()
    return dict(rows)


def test_commands_survive_gateway_broker_and_ingest_kill_9_executed_once(  # noqa: PLR0915 - one scenario, its faults in order
    mqtt_server, killable_broker, db_url, migrated, tmp_path
):
    tag = uuid.uuid4().hex[:6]
    gateway_id, prefix = f"gw-{tag}", f"t{tag}"
    configs = mqtt_devices(prefix, 4)
    conn = psycopg.connect(db_url, autocommit=True)
    seed_registry(conn, migrated, {gateway_id: [(d.device_id, "kiosk") for d in configs]})
    registry = CommandRegistry(conn, schema=migrated)
    config_pub = client(killable_broker)
    publish_config(config_pub, gateway_id=gateway_id, prefix=prefix, devices=configs, version=1)
    config_pub.disconnect()
    devices = [Device(mqtt_server, d.device_id, prefix) for d in configs]
    for device in devices:
        device.online()
    ingest_config = write_config(
        tmp_path / "ingest.toml",
        server=killable_broker,
        db_url=db_url,
        schema=migrated,
        settings=ingest_settings(prefix, command_resend_s=1.0),
    )
    ingest_log, gateway_log = tmp_path / "ingest.log", tmp_path / "gateway.log"
    gateway_config = _gateway_config(
        tmp_path / "gateway.toml",
        central=killable_broker,
        site=mqtt_server,
        gateway_id=gateway_id,
        prefix=prefix,
    )
    ingest = start_ingest_process(ingest_config, ingest_log)
    gateway = _start_gateway(gateway_config, gateway_log)
    asked: list[str] = []

    def ask(device: Device, name: str = "print_test_page") -> str:
        row = registry.ask(device.device_id, name, [], ttl_s=600, operator=OPERATOR)
        asked.append(row.command_id)
        return row.command_id

    def all_final(timeout_s: float, what: str) -> None:
        wait_for(lambda: len(_finals(conn, migrated, asked)) == len(asked), timeout_s, what)

    try:
        wait_for(lambda: "listening for command reports" in ingest_log.read_text(), 20, "ingest")
        # 1. The path works: a command to each device.
        for device in devices:
            ask(device)
        all_final(30, "the first commands")

        # 2. The gateway killed with -9 while a command is at its device, unanswered,
        #    and with more commands arriving: after the restart it is sent again,
        #    carried out once, and its final state arrives.
        devices[0].answering = False
        slow = ask(devices[0])
        wait_for(lambda: devices[0].got(slow) == 1, 20, "the command at its device")
        more = [ask(d) for d in devices[1:]]
        _kill(gateway)
        devices[0].answering = True
        gateway = _start_gateway(gateway_config, gateway_log)
        all_final(40, "the commands across the gateway's restart")
        assert devices[0].got(slow) == 2  # published again after the restart

        # 3. The central broker killed with -9 with commands just queued.
        burst = [ask(d) for d in devices for _ in range(3)]
        pid = killable_broker.pid()
        assert pid is not None
        stop_process_group(pid, first_signal=signal.SIGKILL, timeout_s=10, what="broker")
        time.sleep(1.0)
        killable_broker.start()
        all_final(60, "the commands across the broker's restart")

        # 4. Ingest killed with -9 with commands queued and reports on their way.
        burst += [ask(d) for d in devices for _ in range(3)]
        time.sleep(0.3)
        _kill(ingest)
        ingest = start_ingest_process(ingest_config, ingest_log)
        all_final(60, "the commands across ingest's restart")
    finally:
        for process in (ingest, gateway):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(30)
        for device in devices:
            device.close()

    _check_outcome(conn, migrated, asked, devices)
    assert set(more + burst) <= set(asked)
    conn.close()


def _check_outcome(
    conn: psycopg.Connection, schema: str, asked: list[str], devices: list[Device]
) -> None:
    """Every command succeeded, each state reached once, each carried out once by its device."""
    finals = _finals(conn, schema, asked)
    assert set(finals.values()) == {"succeeded"}, finals
    events = conn.execute(
        f"SELECT command_id, array_agg(state ORDER BY state) FROM {schema}.command_events "
        "WHERE command_id = ANY(%s) GROUP BY command_id",
        (asked,),
    ).fetchall()
    expected = sorted(["queued", "sent", "delivered", "succeeded"])
    assert {cid: sorted(states) for cid, states in events} == dict.fromkeys(asked, expected)
    # Each device carried out each of its commands once (a copy after a crash
    # was answered from its memory), and no command went to a device not its own.
    executed = [cid for device in devices for cid in device.outcomes]
    assert sorted(executed) == sorted(asked)
    assert all(1 <= d.got(cid) <= 2 for d in devices for cid in d.outcomes)
