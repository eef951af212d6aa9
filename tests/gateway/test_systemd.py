"""The gateway run as systemd runs it: notify protocol, watchdog, JSON logs, with real processes.

A real ``python -m gateway`` process gets ``NOTIFY_SOCKET`` (a datagram
socket this test binds, as systemd does), ``WATCHDOG_USEC`` and
``CITYHUB_LOG_FORMAT=json``. The test reads READY=1, then the periodic
WATCHDOG=1; it then holds the outbox's write lock from another connection
(as a hung disk or a stray writer would) and sees the pings stop, and come
back when the lock goes; SIGTERM brings STOPPING=1. Every stderr line must be
a JSON object naming the service and the gateway, and the rejected device
message must carry its device id as a field.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from contracts.topics import device_uplink_topic
from tests.gateway.test_faults import gateway_config_file
from tests.plugins.gateway import client, mqtt_devices, publish_config, wait_for

pytestmark = pytest.mark.slow

# systemd's WatchdogSec=1s: a ping every 0.5 s while healthy.
WATCHDOG_USEC = 1_000_000


class NotifyListener:
    """The service manager's end: a bound AF_UNIX datagram socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))

    def receive(self, timeout_s: float) -> dict[str, str] | None:
        """The next datagram's KEY=value lines, or None when none came in ``timeout_s``."""
        self.sock.settimeout(timeout_s)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        return dict(line.split("=", 1) for line in data.decode().splitlines())

    def wait_for(self, key: str, timeout_s: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            message = self.receive(left)
            if message is not None and key in message:
                return message
        raise AssertionError(f"no {key} within {timeout_s} s")

    def pings_during(self, seconds: float) -> int:
        count = 0
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            message = self.receive(left)
            count += message is not None and message.get("WATCHDOG") == "1"
        return count

    def close(self) -> None:
        self.sock.close()


# The service module, and the command the systemd unit runs (deploy/systemd).
COMMANDS = {
    "python -m gateway": ["-m", "gateway", "--config", "{config}"],
    "cityhub gateway run": ["-m", "cityhub", "--config", "{config}", "gateway", "run"],
}


def start_gateway(
    command: str, config: Path, log: Path, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    args = [arg.format(config=config) for arg in COMMANDS[command]]
    with log.open("wb") as err:
        return subprocess.Popen(
            [sys.executable, *args],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
        )


def check_json_log(log: Path, *, gateway_id: str, device_id: str) -> None:
    """Every stderr line is JSON naming the service and gateway; the reject names its device."""
    lines = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    assert lines
    for line in lines:
        assert line["service"] == "gateway"
        assert line["gateway_id"] == gateway_id
        assert {"ts", "level", "logger", "message"} <= set(line)
    rejects = [line for line in lines if str(line["message"]).startswith("rejected reading")]
    assert rejects
    assert all(line["device_id"] == device_id for line in rejects)
    assert all(line["level"] == "WARNING" for line in rejects)
    messages = [str(line["message"]) for line in lines]
    assert any(m.startswith("watchdog: outbox not writable") for m in messages)
    assert any(m.startswith("watchdog: outbox writable again") for m in messages)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_notify_watchdog_and_json_logs_of_a_real_gateway_process(command, mqtt_server, tmp_path):
    tag = uuid.uuid4().hex[:6]
    gateway_id, prefix = f"gw-{tag}", f"t{tag}"
    devices = mqtt_devices(prefix, 1)
    config = tmp_path / "gateway.toml"
    gateway_config_file(config, mqtt_server, gateway_id=gateway_id, prefix=prefix)
    notify = NotifyListener(tmp_path / "notify")
    log = tmp_path / "gateway.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITYHUB_")}
    env |= {
        "CITYHUB_LOG_FORMAT": "json",
        "NOTIFY_SOCKET": str(notify.path),
        "WATCHDOG_USEC": str(WATCHDOG_USEC),
    }
    pub = client(mqtt_server)
    publish_config(pub, gateway_id=gateway_id, prefix=prefix, devices=devices, version=1)
    proc = start_gateway(command, config, log, env)
    try:
        ready = notify.wait_for("READY", 60)
        assert ready["READY"] == "1"
        assert "outbox" in ready["STATUS"]
        assert notify.pings_during(3.0) >= 2

        # A malformed device message: a WARNING naming the device as a field.
        def rejected() -> bool:
            pub.publish(device_uplink_topic(devices[0].device_id, prefix), b"{not json", qos=1)
            return "rejected reading from" in log.read_text(encoding="utf-8")

        wait_for(rejected, 30, "the gateway's reject line")

        # The outbox's write lock held elsewhere: the gateway is stuck for
        # storage, and systemd must hear nothing from it.
        outbox = sqlite3.connect(tmp_path / "outbox.sqlite3", timeout=30, isolation_level=None)
        outbox.execute("BEGIN IMMEDIATE")
        try:
            notify.pings_during(2.0)  # a probe that finished just before the lock
            assert notify.pings_during(4.0) == 0
        finally:
            outbox.execute("ROLLBACK")
            outbox.close()
        assert notify.wait_for("WATCHDOG", 30)["WATCHDOG"] == "1"
        assert proc.poll() is None

        proc.send_signal(signal.SIGTERM)
        stopping = notify.wait_for("STOPPING", 30)
        assert stopping["STOPPING"] == "1"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
        pub.disconnect()

    check_json_log(log, gateway_id=gateway_id, device_id=devices[0].device_id)
