"""Every transport through the whole system while its gateway is killed with -9.

`cityhub soak` runs the system of `cityhub up` at a street station (a
serial air monitor, a Modbus RTU bus with a noise meter and a flood gauge,
a LoRaWAN air monitor and flood sensor through the simulated ChirpStack
integration, an MQTT camera) and a service hall (MQTT kiosks and camera, a
rating terminal on MQTT and one posting over HTTP), and kills each gateway
with SIGKILL while its devices send: twice the street station's, once the
hall's. Then the simulator's ledger is reconciled with the database: every
reading acknowledged to its device (a PUBACK, ChirpStack's PUBACK, an HTTP
200) is stored exactly once; serial and Modbus readings, which nothing
acknowledges, may be lost only while their gateway was down.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cityhub.localstack.procs import free_port
from tests.plugins.servers import kill_everything_under, processes_under

pytestmark = pytest.mark.slow

STREET, HALL = "hk-aq-hang-dau", "hk-hall-quan"
SCHEDULE = f"""
seed = 0
duration_s = 60.0

[[fault]]
at_s = 12.0
kind = "kill_gateway"
target = "gw-{STREET}"
duration_s = 4.0

[[fault]]
at_s = 26.0
kind = "kill_gateway"
target = "gw-{HALL}"
duration_s = 4.0

[[fault]]
at_s = 40.0
kind = "kill_gateway"
target = "gw-{STREET}"
duration_s = 4.0
"""


@pytest.mark.timeout(600)
@pytest.mark.usefixtures("pg_bindir", "mosquitto_bin")  # skipped without the servers
def test_killing_each_gateway_loses_no_acknowledged_reading_of_any_transport():
    state_dir = Path(tempfile.mkdtemp(prefix="cityhub-transports-"))
    state_dir.chmod(0o755)
    schedule = state_dir / "schedule.toml"
    schedule.write_text(SCHEDULE, encoding="utf-8")
    env = {
        **os.environ,
        "CITYHUB_LOCAL__STATE_DIR": str(state_dir),
        "CITYHUB_LOCAL__PG_PORT": str(free_port()),
        "CITYHUB_LOCAL__MQTT_PORT": str(free_port()),
        "COLUMNS": "200",
    }
    argv = [sys.executable, "-m", "cityhub", "soak", "--schedule", str(schedule)]
    argv += ["--sites", f"{STREET},{HALL}", "--drain-timeout", "2m"]
    try:
        result = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=540, check=False
        )
        out = result.stdout + result.stderr
        report = json.loads((state_dir / "soak" / "report.json").read_text())
        kills = [e for e in report["timeline"] if e["kind"] == "kill_gateway"]
        assert len(kills) == 3, out[-4000:]
        assert all("FAILED" not in e["note"] for e in kills), out[-4000:]
        by_transport = report["acknowledged_by_transport"]
        # Every transport handed readings over: a minute's worth, less the kills
        # (the Modbus models are polled every 10 s: two slaves, about 12).
        least = {"mqtt": 20, "serial": 20, "modbus": 8, "lorawan": 20, "http": 20}
        for transport, n in least.items():
            assert by_transport.get(transport, 0) >= n, (transport, by_transport)
        assert report["drained"], out[-4000:]
        assert report["lost"] == [], out[-4000:]
        assert report["duplicates"] == 0, out[-4000:]
        assert report["serial_lost"] == {}, out[-4000:]
        assert result.returncode == 0, out[-4000:]
        assert processes_under(state_dir) == []
    finally:
        kill_everything_under(state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)
