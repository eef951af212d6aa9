"""`cityhub alerts health`: a hung or stopped alerts job fails its health check.

A real alerts job process (``python -m alerts``) on the session's private
PostgreSQL serves /metrics; the check passes while it completes cycles and
fails once it is stopped with SIGSTOP (what a hung process looks like from
outside: the port is open, nothing answers). The age rule itself is checked
against a real /metrics server holding a given last-cycle time.
"""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from alerts.metrics import serve_metrics
from alerts.service import JobCounters
from cityhub.cli.main import app
from cityhub.localstack.procs import free_port, stop_process_group

ROOT = Path(__file__).resolve().parents[2]


def health(port: int, *args: str) -> tuple[int, str]:
    env = {"CITYHUB_ALERTS__METRICS_PORT": str(port), "CITYHUB_ALERTS__METRICS_HOST": "0.0.0.0"}  # noqa: S104
    result = CliRunner().invoke(app, ["alerts", "health", *args], env=env)
    return result.exit_code, result.output


@pytest.fixture
def metrics_of() -> Iterator[object]:
    servers = []

    def serve(counters: JobCounters) -> int:
        port = free_port()
        servers.append(serve_metrics("127.0.0.1", port, job_id="alerts", counters=counters))
        return port

    yield serve
    for server in servers:
        server.close()


def test_the_age_of_the_last_cycle_decides(metrics_of) -> None:
    recent = metrics_of(JobCounters(cycles=3, last_cycle_end_s=time.time()))
    code, output = health(recent, "--max-age", "60")
    assert code == 0, output
    assert "ok" in output

    stale = metrics_of(JobCounters(cycles=3, last_cycle_end_s=time.time() - 600))
    code, output = health(stale, "--max-age", "60")
    assert code == 1
    assert "unhealthy" in output
    assert "--max-age 60" in output

    never = metrics_of(JobCounters())
    code, output = health(never, "--max-age", "60")
    assert code == 1
    assert "no cycle completed yet" in output


def test_nothing_listening_and_no_metrics_port_are_failures() -> None:
    code, output = health(free_port(), "--max-age", "60", "--timeout", "1")
    assert code == 1
    assert "no answer" in output
    result = CliRunner().invoke(app, ["alerts", "health", "--max-age", "60"], env={})
    assert result.exit_code == 1
    assert "alerts.metrics_port" in result.output


class _Liar(http.server.BaseHTTPRequestHandler):
    """Something else on the metrics port: it answers, but not Prometheus' text format."""

    def do_GET(self) -> None:
        body = b"cityhub_alerts_last_cycle_timestamp_seconds{job=alerts 1e9 trailing junk\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
        pass


def test_a_listener_that_is_not_the_job_is_a_failure() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Liar)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        code, output = health(server.server_address[1], "--max-age", "60")
    finally:
        server.shutdown()
        server.server_close()
    assert code == 1
    assert "did not answer in the metrics format" in output


def test_a_stopped_job_fails_within_max_age(db_url, migrated, tmp_path) -> None:
    port = free_port()
    config = tmp_path / "alerts.toml"
    # Cycles every second, evaluated at once: a healthy job is never more than ~1 s old.
    config.write_text(
        f'log_level = "INFO"\n[database]\nurl = "{db_url}"\nschema = "{migrated}"\n'
        f"[alerts]\ninterval_s = 1.0\nevaluation_delay_s = 0.0\nmetrics_port = {port}\n",
        encoding="utf-8",
    )
    log = (tmp_path / "alerts.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "alerts", "--config", str(config)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    max_age_s = 5.0
    try:
        deadline = time.monotonic() + 60
        while True:
            code, output = health(port, "--max-age", str(max_age_s), "--timeout", "1")
            if code == 0:
                break
            assert proc.poll() is None, (tmp_path / "alerts.log").read_text()
            assert time.monotonic() < deadline, output
            time.sleep(0.2)

        os.kill(proc.pid, signal.SIGSTOP)
        # Stopped, the job answers nothing: the very first check fails, well within max-age
        # (it waits --timeout, 1 s, for an answer).
        code, output = health(port, "--max-age", str(max_age_s), "--timeout", "1")
        assert code == 1, output
        assert "no answer" in output

        os.kill(proc.pid, signal.SIGCONT)
        deadline = time.monotonic() + 30
        while health(port, "--max-age", str(max_age_s), "--timeout", "1")[0] != 0:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        stop_process_group(proc.pid, first_signal=signal.SIGTERM, timeout_s=10, what="alerts job")
        proc.wait(10)
        log.close()
