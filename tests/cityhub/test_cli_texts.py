"""Help and error texts printed as written, count words that agree with their numbers, and
the terminal QR code within 80 columns."""

from __future__ import annotations

import ast
import itertools
import re
from pathlib import Path

import pytest
import segno
import typer
from typer.testing import CliRunner

from cityhub.cli.main import app
from devices.bundle import MqttAccess, device_bundle, qr_payload
from devices.bundlefiles import QR_TERMINAL_COLUMNS, QUADRANTS, qr_terminal, write_bundle
from devices.validation import device_config
from tests.alerts.test_job import seed_devices


def _commands(command, path: tuple[str, ...] = ()):
    yield path, command
    # typer's groups (its own copy of click's) have their subcommands by name.
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def _flat(text: str) -> str:
    return " ".join(text.split())


def _bracketed_texts(command) -> list[str]:
    """Every help text of a command (its own first paragraph, its parameters') with [ ] in it."""
    texts = [(command.help or "").split("\n\n")[0]]
    texts += [getattr(p, "help", None) or "" for p in command.params]
    return [_flat(t) for t in texts if "[" in t]


def test_help_of_every_command_prints_brackets_whole():
    root = typer.main.get_command(app)
    checked: list[str] = []
    for path, command in _commands(root):
        result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "250"})
        assert result.exit_code == 0, (path, result.output)
        for text in _bracketed_texts(command):
            assert text in _flat(result.output), (path, text)
            checked.append(text)
    # The ones that rich markup used to swallow are among them.
    assert any("^[a-z0-9][a-z0-9-]{0,63}$" in t for t in checked)
    assert any("[broker]" in t for t in checked)


ROOT = Path(__file__).resolve().parents[2]
# Where the texts that `cityhub` prints are written: its own package, the provisioning it
# drives, and the catalog and migration-plan lines that `catalog check` and `db migrate` show.
CLI_TEXT_SOURCES = (
    *sorted((ROOT / "cityhub").rglob("*.py")),
    *sorted((ROOT / "devices").rglob("*.py")),
    ROOT / "contracts" / "catalog.py",
    ROOT / "contracts" / "evolve.py",
)
COUNT_NOUNS = (
    "alerts|batches|commands|days|devices|entries|faults|files|gateways|hours|metrics|"
    "migrations|readings|rows|schemas|sites|steps|tables|times|types|workers"
)
# A number straight before a plural noun, up to two words between ("{n} active devices"),
# or a hedged "(s)" ("{n} lệnh / command(s)"): both read wrong for one. count_noun() gives
# "1 device", "2 devices". Units ("{n} s") and joining words end a number's phrase.
BETWEEN = r"(?:(?!(?:s|ms|and|or|of|in|at|to|for|from|with|while|is|are|was|has)\b)[a-z-]+ )"
BARE_PLURAL = re.compile(rf"^ {BETWEEN}{{0,2}}(?:{COUNT_NOUNS})\b|^[^{{}}]*?[a-z]+(?<!http)\(s\)")
# SQL keeps its plurals: INTERVAL '1 days' is what PostgreSQL reads.
SQL = re.compile(r"\b(?:INTERVAL|SELECT)\b")


def _is_constant(node: ast.expr) -> bool:
    """An upper-case name (REJECTS_SHOWN_DAYS): a fixed count, never one."""
    return isinstance(node, ast.Name) and node.id.isupper()


def _bare_plurals(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if not isinstance(node, ast.JoinedStr):
            continue
        parts = node.values
        if any(isinstance(p, ast.Constant) and SQL.search(str(p.value)) for p in parts):
            continue
        for number, after in itertools.pairwise(parts):
            if (
                isinstance(number, ast.FormattedValue)
                and not _is_constant(number.value)
                and isinstance(after, ast.Constant)
                and BARE_PLURAL.search(str(after.value))
            ):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_count_words_agree_with_their_numbers():
    """No text of the CLI puts a counted number before a bare plural: "1 devices"."""
    found = [line for path in CLI_TEXT_SOURCES for line in _bare_plurals(path)]
    assert not found, "use contracts.wording.count_noun:\n" + "\n".join(found)


def _bundle(device_id: str, host: str):
    config = device_config(
        device_id=device_id,
        device_type="kiosk",
        transport="mqtt",
        port=None,
        protocol=None,
        label="",
    )
    return device_bundle(
        config,
        site_id="hk-hall",
        gateway_id="gw-" + "g" * 61,
        location="Tầng 1, quầy 3",
        hardware_id="SN-0042",
        broker=MqttAccess(
            host=host,
            port=8883,
            tls=True,
            username=f"device.{device_id}",
            password="x" * 43,  # a generated secret's length
            client_id=f"device.{device_id}",
        ),
        prefix="hn",
        issued_at="2026-01-01T00:00:00+00:00",
        issued_by="Phạm Thu Hà",
    )


def _decode(drawing: str) -> list[list[int]]:
    """Module rows (1 dark) back from the half-block text: blank is dark, drawn is light."""
    top = {" ": 1, "\u2580": 0, "\u2584": 1, "\u2588": 0}
    bottom = {" ": 1, "\u2580": 1, "\u2584": 0, "\u2588": 0}
    rows: list[list[int]] = []
    for line in drawing.splitlines():
        rows.append([top[c] for c in line])
        rows.append([bottom[c] for c in line])
    return rows


def _decode_quadrants(drawing: str) -> list[list[int]]:
    """Quadrant blocks back to modules (0 dark, 1 light as drawn): two rows per line."""
    bits = {glyph: corners for corners, glyph in QUADRANTS.items()}
    rows: list[list[int]] = []
    for line in drawing.splitlines():
        top: list[int] = []
        bottom: list[int] = []
        for c in line:
            tl, tr, bl, br = bits[c]
            top += [tl, tr]
            bottom += [bl, br]
        rows += [top, bottom]
    # Drawn light is 1 here; the code's dark modules are the blanks.
    return [[1 - m for m in row] for row in rows]


def _inner(rows: list[list[int]], size: int) -> tuple[int, list[list[int]]]:
    """The quiet zone's width and the size x size code inside it (dark = 1)."""
    border = next(i for i, row in enumerate(rows) if any(row))
    return border, [row[border : border + size] for row in rows[border : border + size]]


@pytest.mark.parametrize(
    ("device_id", "host", "columns"),
    [
        ("kiosk-07", "10.1.2.3", 100),
        ("k" * 64, "site-broker.hoan-kiem.hanoi.example.vn", 120),
    ],
)
def test_terminal_qr_fits_its_columns_and_decodes_to_the_code(device_id, host, columns):
    bundle = _bundle(device_id, host)
    drawing = qr_terminal(bundle, columns=columns)
    lines = drawing.splitlines()
    assert max(len(line) for line in lines) <= columns
    matrix = [list(row) for row in segno.make(qr_payload(bundle), error="l").matrix]
    size = len(matrix)
    rows = _decode(drawing)
    border = (len(lines[0]) - size) // 2
    assert border >= 1
    decoded = [row[border : border + size] for row in rows[border : border + size]]
    assert decoded == matrix
    # The quiet zone is light all round.
    assert all(set(row) == {0} for row in rows[:border])
    assert all(set(row[:border]) == {0} for row in rows)


@pytest.mark.parametrize(
    ("device_id", "host"),
    [("kiosk-07", "10.1.2.3"), ("k" * 64, "site-broker.hoan-kiem.hanoi.example.vn")],
)
def test_terminal_qr_fits_80_columns_in_quadrant_blocks(device_id, host):
    bundle = _bundle(device_id, host)
    matrix = [list(row) for row in segno.make(qr_payload(bundle), error="l").matrix]
    size = len(matrix)
    assert size > QR_TERMINAL_COLUMNS - 2, "a device bundle is too big for half blocks"
    drawing = qr_terminal(bundle, columns=QR_TERMINAL_COLUMNS)
    lines = drawing.splitlines()
    assert max(len(line) for line in lines) <= QR_TERMINAL_COLUMNS
    assert set("".join(lines)) <= set(QUADRANTS.values())
    border, inner = _inner(_decode_quadrants(drawing), size)
    assert border == 4
    assert inner == matrix
    too_narrow = qr_terminal(bundle, columns=(size + 1) // 2)
    assert "too wide for" in too_narrow
    assert too_narrow.count("\n") == 1


def test_qr_of_a_revoked_device_is_an_error(db_conn, db_url, migrated, tmp_path):
    schema = migrated
    seed_devices(db_conn, schema, [("k-live", "kiosk", "hk-hall"), ("k-gone", "kiosk", "hk-hall")])
    db_conn.execute(
        f"UPDATE {schema}.devices SET status = 'revoked', revoked_at = now()"
        " WHERE device_id = 'k-gone'"
    )
    bundles = tmp_path / "bundles"
    for device_id in ("k-live", "k-gone"):
        write_bundle(bundles, _bundle(device_id, "10.1.2.3"))
    env = {
        "CITYHUB_DATABASE__URL": db_url,
        "CITYHUB_DATABASE__SCHEMA": schema,
        "CITYHUB_PROVISIONING__BUNDLE_DIR": str(bundles),
        "COLUMNS": "100",
    }
    live = CliRunner().invoke(app, ["devices", "qr", "k-live"], env=env)
    assert live.exit_code == 0, live.output
    assert max(len(line) for line in live.output.splitlines()) <= 100
    assert "\u2588" in live.output
    gone = CliRunner().invoke(app, ["devices", "qr", "k-gone"], env=env)
    assert gone.exit_code == 1
    assert gone.output.strip().splitlines() == [
        "error: device 'k-gone' is revoked: its credentials no longer work, so it has no QR code"
    ]
