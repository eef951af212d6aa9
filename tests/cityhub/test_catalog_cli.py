"""`cityhub catalog list | show | check | schema` through typer's CliRunner."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
from typer.testing import CliRunner

from cityhub.cli.main import app
from contracts.catalog import DEVICE_TYPES, SHIPPED_CATALOG, use_catalog
from contracts.uplinkschema import schema_file_name, schema_files

NOISE = """
[types.noise_probe]
description = "Street noise meter"
transports = ["mqtt"]
metrics = [
    { name = "laeq", unit = "dBA", kind = "float", min = 20, max = 140, description = "LAeq" },
]
"""

REFUSED = """
[types.air_quality]
metrics = [
    { name = "pm25", unit = "mg/m3", kind = "float", min = 0, max = 1, description = "PM2.5" },
]
"""


@pytest.fixture(autouse=True)
def shipped_catalog():
    use_catalog(SHIPPED_CATALOG)
    yield
    use_catalog(SHIPPED_CATALOG)


def _run(*args, env=None):
    environ = {"COLUMNS": "200", "CITYHUB_CONFIG": ""} | (env or {})
    return CliRunner().invoke(app, list(args), env=environ)


def test_list_shows_every_type_with_metrics_and_transports():
    result = _run("catalog", "list")
    assert result.exit_code == 0, result.output
    assert "Device types (7)" in result.output
    for name, dtype in SHIPPED_CATALOG.types.items():
        line = next(line for line in result.output.splitlines() if f" {name} " in line)
        assert f" {len(dtype.metrics)} " in line
        assert ", ".join(dtype.transports) in line


def test_list_includes_configured_files(tmp_path):
    (tmp_path / "noise.toml").write_text(NOISE, encoding="utf-8")
    result = _run("catalog", "list", env={"CITYHUB_CATALOG__PATHS": str(tmp_path)})
    assert result.exit_code == 0, result.output
    assert "Device types (8)" in result.output
    assert "noise_probe" in result.output
    # The catalog commands examine files; they do not install them.
    assert "noise_probe" not in DEVICE_TYPES


def test_show_prints_metrics_with_unit_kind_range_and_labels():
    result = _run("catalog", "show", "kiosk")
    assert result.exit_code == 0, result.output
    uptime = next(line for line in result.output.splitlines() if " uptime " in line)
    for cell in (" s ", " int ", " 0 ", " 315360000 ", "Seconds since the kiosk booted"):
        assert cell in uptime
    assert "4=offline" in result.output


def test_show_lists_commands_with_their_args():
    result = _run("catalog", "show", "air_quality")
    assert result.exit_code == 0, result.output
    assert "air_quality: commands (5)" in result.output
    period = next(line for line in result.output.splitlines() if " set_working_period " in line)
    for cell in ("minutes: int 0..30", " 30 s ", " sds011 "):
        assert cell in period
    mode = next(line for line in result.output.splitlines() if " set_reporting_mode " in line)
    assert "mode: enum active|query" in mode
    assert "pms5003, sds011" in mode
    interval = next(
        line for line in result.output.splitlines() if " set_reporting_interval " in line
    )
    assert "- (MQTT only)" in interval
    kiosk = _run("catalog", "show", "kiosk").output
    assert "message: string <=120 chars, optional" in kiosk
    call = _run("catalog", "show", "conference_endpoint").output
    assert "duration_s: int 10..300, default 30" in call
    assert (
        "satisfaction_terminal: no commands"
        in _run("catalog", "show", "satisfaction_terminal").output
    )


def test_show_unknown_type_is_one_line_exit_1():
    result = _run("catalog", "show", "siren")
    assert result.exit_code == 1
    assert "unknown device type 'siren'" in result.output
    assert "Traceback" not in result.output


def test_check_without_file():
    result = _run("catalog", "check")
    assert result.exit_code == 0, result.output
    assert "ok: 7 device types" in result.output


def test_check_file_prints_what_it_adds(tmp_path):
    file = tmp_path / "noise.toml"
    file.write_text(NOISE, encoding="utf-8")
    result = _run("catalog", "check", str(file))
    assert result.exit_code == 0, result.output
    assert "  new type noise_probe: 1 metric\n" in result.output


COMMANDS = """
[types.kiosk]
commands = [
    { name = "show_notice", description = "Thông báo (notice)", args = [
        { name = "text", kind = "string", max_length = 80, description = "Notice" },
    ] },
    { name = "reboot", args = [
        { name = "delay_s", kind = "int", min = 0, max = 600, default = 0, description = "Wait" },
    ] },
]
"""


def test_check_file_prints_the_commands_it_adds(tmp_path):
    file = tmp_path / "commands.toml"
    file.write_text(COMMANDS, encoding="utf-8")
    result = _run("catalog", "check", str(file))
    assert result.exit_code == 0, result.output
    assert "2 additions or changes" in result.output
    assert "kiosk: command reboot: new arg delay_s (int, default 0)" in result.output
    assert "kiosk: new command show_notice (text)" in result.output
    shown = _run("catalog", "show", "kiosk", env={"CITYHUB_CATALOG__PATHS": str(file)})
    assert "show_notice" in shown.output
    assert "delay_s: int 0..600, default 0" in shown.output


def test_check_refuses_a_changed_arg_kind_naming_the_key(tmp_path):
    file = tmp_path / "bad.toml"
    file.write_text(
        '[types.air_quality]\ncommands = [{ name = "set_working_period", args = [{ name = '
        '"minutes", kind = "float", min = 0, max = 30, description = "m" }] }]\n',
        encoding="utf-8",
    )
    result = _run("catalog", "check", str(file))
    assert result.exit_code == 1
    assert "key 'commands.set_working_period.args.minutes.kind'" in result.output
    assert str(file) in result.output.replace("\n", "")


def test_check_refuses_with_one_line_naming_file_type_and_key(tmp_path):
    file = tmp_path / "bad.toml"
    file.write_text(REFUSED, encoding="utf-8")
    result = _run("catalog", "check", str(file))
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert str(file) in lines[0]
    assert "type 'air_quality'" in lines[0]
    assert "key 'metrics.pm25.unit'" in lines[0]


def test_check_reports_a_refused_configured_file(tmp_path):
    file = tmp_path / "bad.toml"
    file.write_text(REFUSED, encoding="utf-8")
    result = _run("catalog", "check", env={"CITYHUB_CATALOG__PATHS": str(file)})
    assert result.exit_code == 1
    assert "unit cannot change" in result.output
    # Every other command refuses to start with it (status 2, as for bad settings).
    started = _run("devices", "list", env={"CITYHUB_CATALOG__PATHS": str(file)})
    assert started.exit_code == 2
    assert "unit cannot change" in started.output


def test_schema_prints_a_valid_draft_2020_12_schema():
    result = _run("catalog", "schema", "air_quality")
    assert result.exit_code == 0, result.output
    schema = json.loads(result.output)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert list(schema["properties"]["m"]["properties"]) == list(
        SHIPPED_CATALOG.types["air_quality"].metric_names
    )
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid({"seq": 3, "ts": 1_767_225_600_000, "m": {"pm25": 12.5}})
    assert not validator.is_valid({"seq": 3, "ts": 1_767_225_600_000, "m": {"pm25": 1e4}})


def test_schema_of_an_operator_type(tmp_path):
    (tmp_path / "noise.toml").write_text(NOISE, encoding="utf-8")
    result = _run("catalog", "schema", "noise_probe", env={"CITYHUB_CATALOG__PATHS": str(tmp_path)})
    assert result.exit_code == 0, result.output
    laeq = json.loads(result.output)["properties"]["m"]["properties"]["laeq"]
    assert (laeq["minimum"], laeq["maximum"]) == (20, 140)


def test_schemas_writes_checks_and_removes_files(tmp_path):
    target = tmp_path / "schemas"
    assert _run("catalog", "schemas", "--dir", str(target), "--check").exit_code == 1
    written = _run("catalog", "schemas", "--dir", str(target))
    assert written.exit_code == 0, written.output
    assert {p.name for p in target.iterdir()} == set(schema_files())
    assert _run("catalog", "schemas", "--dir", str(target), "--check").exit_code == 0
    (target / schema_file_name("kiosk")).write_text("{}\n", encoding="utf-8")
    (target / "toaster.uplink.schema.json").write_text("{}\n", encoding="utf-8")
    stale = _run("catalog", "schemas", "--dir", str(target), "--check")
    assert stale.exit_code == 1
    assert "kiosk.uplink.schema.json: not current" in stale.output
    assert "toaster.uplink.schema.json: not current" in stale.output
    assert _run("catalog", "schemas", "--dir", str(target)).exit_code == 0
    assert {p.name: p.read_text("utf-8") for p in target.iterdir()} == schema_files()


@pytest.mark.parametrize("command", [[], ["list"], ["show"], ["check"], ["schema"], ["schemas"]])
def test_help(command):
    result = _run("catalog", *command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_readme_example_file_is_accepted(tmp_path):
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    example = re.search(
        r"```toml\n(# /etc/cityhub/catalog\.d/rain\.toml\n.*?)```", readme, re.DOTALL
    )
    assert example is not None, "README lost its Device catalog example"
    file = tmp_path / "rain.toml"
    file.write_text(example.group(1), encoding="utf-8")
    result = _run("catalog", "check", str(file))
    assert result.exit_code == 0, result.output
    assert "new type rain_gauge" in result.output
    assert "kiosk: new metric door_open" in result.output
    # The commands example is read after it.
    example = re.search(
        r"```toml\n(# /etc/cityhub/catalog\.d/rain-commands\.toml.*?)```", readme, re.DOTALL
    )
    assert example is not None, "README lost its commands example"
    commands = tmp_path / "rain-commands.toml"
    commands.write_text(example.group(1), encoding="utf-8")
    result = _run("catalog", "check", str(commands), env={"CITYHUB_CATALOG__PATHS": str(file)})
    assert result.exit_code == 0, result.output
    assert "rain_gauge: new command show_notice (text, level, beep)" in result.output
