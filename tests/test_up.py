"""`cityhub up`: the whole system on one machine, as a user runs it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cityhub.localstack.procs import free_port, port_is_free
from tests.test_localstack import _kill_everything_under, _processes_under

pytestmark = pytest.mark.slow


def test_up_for_a_fixed_time_stores_every_reading_and_leaves_nothing_running():
    state_dir = Path(tempfile.mkdtemp(prefix="cityhub-up-"))
    state_dir.chmod(0o755)
    pg_port, mqtt_port = free_port(), free_port()
    env = {
        **os.environ,
        "CITYHUB_LOCAL__STATE_DIR": str(state_dir),
        "CITYHUB_LOCAL__PG_PORT": str(pg_port),
        "CITYHUB_LOCAL__MQTT_PORT": str(mqtt_port),
        "COLUMNS": "150",
    }
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "cityhub",
                "up",
                "--for",
                "12s",
                "--sites",
                "hk-ward-trang-tien,lb-hall-quan,hk-aq-hang-dau",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        out = result.stdout
        assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
        sent = int(
            re.search(r"sent by the simulator\s*│\s*([\d,]+)", out).group(1).replace(",", "")
        )
        stored = int(re.search(r"│ stored\s*│\s*([\d,]+)", out).group(1).replace(",", ""))
        assert sent > 50  # a dozen devices for about 12 s
        assert stored == sent
        assert re.search(r"lost\s*│\s*0", out)
        # The alerts job ran beside the pipeline and evaluated the rules.
        assert "open alerts:" in out
        alerts_log = (state_dir / "run" / "alerts.log").read_text()
        assert re.search(r"alerts job alerts: \d+ rules", alerts_log), alerts_log[-2000:]
        assert "evaluated " in alerts_log, alerts_log[-2000:]
        # Every child and both servers are gone; their ports are free again.
        assert _processes_under(state_dir) == []
        assert port_is_free(pg_port)
        assert port_is_free(mqtt_port)
    finally:
        _kill_everything_under(state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)
