"""The server fixtures skip, naming the missing binary, when Mosquitto or PostgreSQL is absent.

Runs pytest in a subprocess on a few tests that need the session servers,
with PATH and ``CITYHUB_LOCAL__PG_BINDIR`` pointing at an empty directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = """
def test_broker(mqtt_server):
    raise AssertionError("ran without Mosquitto")


def test_own_broker(killable_broker):
    raise AssertionError("ran without Mosquitto")


def test_database(db_conn):
    raise AssertionError("ran without PostgreSQL")


def test_without_servers():
    pass
"""


def test_tests_needing_a_missing_server_binary_skip_and_say_how_to_install_it(
    tmp_path: Path,
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_needs_servers.py").write_text(TESTS)
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PATH": str(empty),
        "PYTHONPATH": str(root),
        "CITYHUB_LOCAL__PG_BINDIR": str(empty),
    }
    env.pop("CITYHUB_LOCAL__MOSQUITTO_BIN", None)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.plugins.servers",
            "-p",
            "tests.plugins.database",
            "-p",
            "no:cacheprovider",
            "-rs",
            str(tmp_path),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "1 passed, 3 skipped" in out, out
    skips = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    assert len(skips) == 3, out
    for line in skips:
        assert "scripts/install-system-deps" in line, line
    broker = [line for line in skips if "Mosquitto broker ('mosquitto', not on PATH)" in line]
    assert len(broker) == 2, out
    assert any(f"{empty}: no postgres binary" in line for line in skips), out
