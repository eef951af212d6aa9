"""The `cityhub` command as a user runs it: help everywhere, db commands, settings errors."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, timedelta
from typing import cast

import pytest
import typer.main
from typer.testing import CliRunner

from cityhub.cli.main import app
from contracts.schema import Edition, migrations
from contracts.settings import StorageSettings


def _all_command_paths() -> list[list[str]]:
    root = typer.main.get_command(app)
    paths: list[list[str]] = [[]]

    # Typer vendors its own click: look for groups by their `commands` mapping.
    def walk(command, prefix: list[str]) -> None:
        if hasattr(command, "commands"):
            for name, sub in command.commands.items():
                paths.append([*prefix, name])
                walk(sub, [*prefix, name])

    walk(root, [])
    return paths


@pytest.mark.parametrize("path", _all_command_paths(), ids=lambda p: " ".join(p) or "cityhub")
def test_every_command_and_group_has_help(path):
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    command = typer.main.get_command(app)
    for name in path:
        command = cast(typer.core.TyperGroup, command).commands[name]
    assert (command.help or "").strip(), f"{' '.join(path)} has no help text"


def run_cityhub(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cityhub", *args],
        env={**os.environ, "COLUMNS": "200", **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_db_migrate_seed_status_maintain(db_url, db_schema, db_conn):
    env = {"CITYHUB_DATABASE__URL": db_url, "CITYHUB_DATABASE__SCHEMA": db_schema}
    first = run_cityhub("db", "migrate", env=env)
    assert first.returncode == 0, first.stderr
    total = len(migrations(db_schema, Edition.APACHE, StorageSettings()))
    assert f"{total} applied, 0 already present" in first.stdout
    assert "edition: apache" in first.stdout
    second = run_cityhub("db", "migrate", env=env)
    assert f"0 applied, {total} already present" in second.stdout

    seeded = run_cityhub("db", "seed", env=env)
    assert seeded.returncode == 0, seeded.stderr
    count = db_conn.execute(f"SELECT count(*) FROM {db_schema}.sites").fetchone()[0]
    assert f"seeded {count} Hanoi sites" in seeded.stdout

    status = run_cityhub("db", "status", env=env)
    assert status.returncode == 0, status.stderr
    assert "TimescaleDB apache" in status.stdout
    # Applied-at times on Hanoi's clock (UTC+7, no daylight saving), zone shown.
    (applied_at,) = db_conn.execute(
        f"SELECT applied_at FROM {db_schema}.schema_migrations WHERE version = 1"
    ).fetchone()
    hanoi = applied_at.astimezone(UTC) + timedelta(hours=7)
    assert f"{hanoi:%d/%m/%Y %H:%M:%S} +07" in status.stdout
    assert "giờ Hà Nội / Asia/Ho_Chi_Minh" in status.stdout
    maintain = run_cityhub("db", "maintain", env=env)
    assert maintain.returncode == 0, maintain.stderr
    assert "rollup rows written: 0" in maintain.stdout


def test_bad_setting_stops_the_command_naming_the_key():
    result = run_cityhub("db", "status", env={"CITYHUB_DATABASE__CONNECT_TIMEOUT_S": "soon"})
    assert result.returncode == 2
    assert "CITYHUB_DATABASE__CONNECT_TIMEOUT_S" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_database_is_reported_without_traceback(db_schema):
    from cityhub.localstack.procs import free_port

    url = f"postgresql://cityhub:x@127.0.0.1:{free_port()}/cityhub"
    result = run_cityhub(
        "db", "migrate", env={"CITYHUB_DATABASE__URL": url, "CITYHUB_DATABASE__SCHEMA": db_schema}
    )
    assert result.returncode == 1
    assert "cannot connect to the database" in result.stderr
    assert "Traceback" not in result.stderr
    assert ":x@" not in result.stderr  # the password in the URL is not echoed
