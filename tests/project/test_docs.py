"""Every repository path that the README and docs/*.md name exists.

A path is a backquoted or linked name whose first level is a top-level
directory of the repository (``gateway/sitelink.py``, ``bench/RESULTS.md``,
``grafana/provisioning/``); names with placeholders (``readings_{type}``),
absolute paths and paths under the state directory are not repository paths
and are left alone. A glob must match at least one file. The modules of
``adapters/`` are left out: the docs name them by their role.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
TOP_DIRS = frozenset(
    p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))
)
# `code` spans and the targets of [text](target) links.
_CODE = re.compile(r"`([^`\n]+)`")
_LINK = re.compile(r"\]\(([^)\s]+)\)")
# Files a user makes from a committed template: named, never committed.
MADE_BY_USER = frozenset({"deploy/cityhub.env"})  # from deploy/cityhub.env.example
# Directories whose files a script makes on the user's machine (git-ignored).
MADE_BY_SCRIPT = ("deploy/secrets/",)  # deploy/make-secrets
_PATH = re.compile(r"[A-Za-z0-9_.*-]+(?:/[A-Za-z0-9_.*-]+)+/?")


def _named_paths(doc: Path) -> set[str]:
    text = doc.read_text(encoding="utf-8")
    found: set[str] = set()
    for match in _CODE.finditer(text):
        found.update(word for word in match.group(1).split() if _PATH.fullmatch(word))
    for match in _LINK.finditer(text):
        target = match.group(1).split("#")[0]
        if "://" in target or not target:
            continue
        resolved = (doc.parent / target).resolve()
        if resolved.is_relative_to(ROOT):
            found.add(resolved.relative_to(ROOT).as_posix())
    return {
        path
        for path in found
        if path.split("/")[0] in TOP_DIRS
        and path.split("/")[0] != "adapters"
        and path not in MADE_BY_USER
        and not path.startswith(MADE_BY_SCRIPT)
    }


def test_docs_are_found() -> None:
    assert ROOT / "docs" / "architecture.md" in DOCS
    assert "contracts/messages.py" in _named_paths(ROOT / "docs" / "architecture.md")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_named_paths_exist(doc: Path) -> None:
    missing = sorted(
        path
        for path in _named_paths(doc)
        if not (any(ROOT.glob(path.rstrip("/"))) if "*" in path else (ROOT / path).exists())
    )
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"
