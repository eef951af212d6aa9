"""The boards as JSON files: what ``cityhub grafana build`` writes and what is committed.

``board_files()`` renders every board to the exact text of its file
(sorted keys, two-space indent, UTF-8 with the Vietnamese as is, a final
newline), so a rebuild of unchanged code gives byte-identical files.
``stale_files(directory)`` names the files that differ from what the code
generates (or are missing, or are boards the code no longer has), and
``write_boards(directory)`` rewrites them. ``decode_board`` reads a board's
JSON back into the SDK's types (with cityhub's SQL query type registered).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models.dashboard import Dashboard

from grafana.boards import build_boards
from grafana.sqlquery import register_sql_query

DASHBOARDS_DIR: Final = Path(__file__).resolve().parent / "dashboards"
PROVISIONING_DIR: Final = Path(__file__).resolve().parent / "provisioning"


def encode_board(dashboard: Dashboard) -> str:
    text = json.dumps(dashboard, cls=JSONEncoder, sort_keys=True, indent=2, ensure_ascii=False)
    return text + "\n"


def normalise(text: str) -> str:
    """A board's JSON as the SDK's types read it back (their defaults filled in)."""
    return encode_board(decode_board(json.loads(text)))


def board_files() -> dict[str, str]:
    """File name -> file text, for every board.

    The text is what the SDK's types give after reading the built board back,
    so a committed file is a fixed point of them: decoding and re-encoding it
    gives the same bytes.
    """
    return {
        f"{name}.json": normalise(encode_board(board)) for name, board in build_boards().items()
    }


def stale_files(directory: Path = DASHBOARDS_DIR) -> list[str]:
    """Board files in ``directory`` that are missing, differ, or are not generated any more."""
    expected = board_files()
    stale = []
    for name, text in expected.items():
        path = directory / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            stale.append(name)
    if directory.is_dir():
        stale.extend(p.name for p in sorted(directory.glob("*.json")) if p.name not in expected)
    return stale


def write_boards(directory: Path = DASHBOARDS_DIR) -> list[str]:
    """Write every board file that differs; remove files of boards no longer generated."""
    directory.mkdir(parents=True, exist_ok=True)
    expected = board_files()
    changed = []
    for name in stale_files(directory):
        path = directory / name
        if name in expected:
            path.write_text(expected[name], encoding="utf-8")
        else:
            path.unlink()
        changed.append(name)
    return changed


def decode_board(document: dict[str, Any]) -> Dashboard:
    """A board's JSON as the SDK's Dashboard; SQL targets decode as SqlQuery."""
    register_default_plugins()
    register_sql_query()
    return Dashboard.from_json(document)
