"""Packaging: the lock files agree with pyproject, every import is declared, and a
gateway runs from a fresh venv that has only the gateway extra.

The first tests read files only (no network); the last one installs from PyPI
through pip's cache, as a ward-office board would, and runs the gateway from
there against the session broker.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
import uuid
import venv
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from cityhub.localstack.mosquitto import ADMIN_USER
from tests.plugins.gateway import (
    FakeIngest,
    client,
    mqtt_devices,
    publish_config,
    publish_readings,
    wait_for,
    watch_states,
)

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]
SELF = canonicalize_name(PROJECT["name"])
# Each lock file and the extras it is compiled for (scripts/lock).
LOCKS = {"gateway": ["gateway"], "central": ["central"], "all": ["all"], "dev": ["dev"]}
# What a gateway board must not carry.
NOT_ON_A_GATEWAY = ("numpy", "psycopg", "psycopg-binary", "grafana-foundation-sdk")
# Top-level import names -> the installed distributions that provide them.
_PACKAGES = importlib.metadata.packages_distributions()
# Directories whose Python files are scanned for imports.
SOURCE_DIRS = (
    *PYPROJECT["tool"]["importlinter"]["root_packages"],
    "tests",
    "bench",
    "deploy",
)


def direct_requirements(extras: list[str]) -> list[Requirement]:
    """The base dependencies and those of ``extras``, self-references (cityhub[x]) expanded."""
    optional = PROJECT["optional-dependencies"]
    found = [Requirement(text) for text in PROJECT["dependencies"]]
    pending, seen = list(extras), set[str]()
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for text in optional[extra]:
            req = Requirement(text)
            if canonicalize_name(req.name) == SELF:
                pending.extend(req.extras)
            else:
                found.append(req)
    return found


@dataclass
class Pin:
    name: str
    version: Version
    marker: str
    hashes: list[str] = field(default_factory=list)
    via: list[str] = field(default_factory=list)


_PIN = re.compile(r"^(?P<name>[A-Za-z0-9._-]+)==(?P<version>\S+)(?:\s*;\s*(?P<marker>.*?))?\s*\\?$")


def read_lock(path: Path) -> list[Pin]:
    """The pins of a lock written by `uv pip compile --generate-hashes` (scripts/lock)."""
    pins: list[Pin] = []
    in_via = False
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if match := _PIN.match(line):
            pins.append(
                Pin(
                    name=canonicalize_name(match["name"]),
                    version=Version(match["version"]),
                    marker=match["marker"] or "",
                )
            )
            in_via = False
        elif stripped.startswith("--hash=sha256:"):
            pins[-1].hashes.append(stripped.removeprefix("--hash=").rstrip(" \\"))
        elif stripped == "# via":
            in_via = True
        elif stripped.startswith("# via "):
            pins[-1].via.append(stripped.removeprefix("# via ").strip())
            in_via = False
        elif in_via and stripped.startswith("#   "):
            pins[-1].via.append(stripped.removeprefix("#   ").strip())
        else:
            in_via = False
    return pins


def _via_name(via: str) -> str:
    """``cityhub (pyproject.toml)`` -> ``cityhub``; ``typer`` -> ``typer``."""
    return canonicalize_name(via.split(" ", 1)[0])


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_lock_pins_what_pyproject_declares_and_nothing_else(lock: str):
    path = ROOT / "requirements" / f"{lock}.txt"
    pins = read_lock(path)
    assert pins, f"{path}: no pins read"
    assert "scripts/lock" in path.read_text(encoding="utf-8").split("\n", 3)[1], (
        f"{path}: not written by scripts/lock"
    )
    by_name: dict[str, list[Pin]] = {}
    for pin in pins:
        by_name.setdefault(pin.name, []).append(pin)
        assert pin.hashes, f"{lock}: {pin.name} has no hash"
        assert pin.via, f"{lock}: {pin.name} says nothing of what asks for it"

    declared = direct_requirements(LOCKS[lock])
    for req in declared:
        name = canonicalize_name(req.name)
        assert name in by_name, f"{lock}: {req} declared but not pinned; run scripts/lock"
        for pin in by_name[name]:
            assert req.specifier.contains(pin.version, prereleases=True), (
                f"{lock}: {name}=={pin.version} outside {req}; run scripts/lock"
            )

    # Pinned because pyproject asks for it: exactly the declared names.
    direct = {pin.name for pin in pins if SELF in {_via_name(v) for v in pin.via}}
    assert direct == {canonicalize_name(r.name) for r in declared}, f"{lock}: run scripts/lock"
    # Everything else: wanted by something pinned here, back to the project.
    wanted: set[str] = {SELF}
    changed = True
    while changed:
        changed = False
        for pin in pins:
            if pin.name not in wanted and wanted & {_via_name(v) for v in pin.via}:
                wanted.add(pin.name)
                changed = True
    assert set(by_name) <= wanted, f"{lock}: pinned for nothing: {set(by_name) - wanted}"


def test_the_gateway_lock_leaves_out_the_hubs_libraries():
    names = {pin.name for pin in read_lock(ROOT / "requirements" / "gateway.txt")}
    assert not names & set(NOT_ON_A_GATEWAY)


def _declared() -> set[str]:
    texts = [*PROJECT["dependencies"]]
    for extra in PROJECT["optional-dependencies"].values():
        texts.extend(extra)
    return {str(canonicalize_name(Requirement(text).name)) for text in texts} - {SELF}


def _imported_top_names(path: Path) -> Iterator[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def test_every_imported_package_is_declared():
    """Each third-party import of the code, tests, benchmarks and fuzz targets comes from
    a distribution that pyproject names (base or an extra)."""
    declared = _declared()
    undeclared = {
        name: paths
        for name, paths in _third_party_imports().items()
        if not _providers(name) & declared
    }
    assert not undeclared, f"imported, not declared in pyproject: {undeclared}"


def test_every_declared_library_is_imported():
    """No dependency rots in pyproject once the code stops using it (psycopg-pool did)."""
    imported = set[str]()
    for name in _third_party_imports():
        imported |= _providers(name)
    # Installed for what they are, not imported: tools, stubs, a pytest plugin, and the
    # compiled half of psycopg[binary].
    tools = {"pytest-timeout", "ruff", "mypy", "import-linter", "uv", "psycopg-binary"}
    unused = {name for name in _declared() - imported - tools if not name.startswith("types-")}
    assert not unused, f"declared in pyproject, imported nowhere: {unused}"


def _providers(import_name: str) -> set[str]:
    """The installed distributions that provide a top-level import name."""
    return {canonicalize_name(d) for d in _PACKAGES.get(import_name, [])}


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level names imported by the code, tests, benchmarks and fuzz targets that are
    neither the standard library's nor this project's, each with the files importing it."""
    local = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    found: dict[str, set[str]] = {}
    for directory in SOURCE_DIRS:
        for path in (ROOT / directory).rglob("*.py"):
            for name in _imported_top_names(path):
                if name in sys.stdlib_module_names or name in local or name == "__future__":
                    continue
                # A script importing a script beside it (bench/*.py run as files).
                if (path.parent / f"{name}.py").exists():
                    continue
                found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


# --- a gateway from a fresh venv with the gateway extra only ------------------------------


def _project_copy(dest: Path) -> Path:
    """The files a build needs (as the Dockerfile copies them), away from the worktree, so
    that building leaves no build/ or egg-info behind in it."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    for package in PYPROJECT["tool"]["setuptools"]["packages"]:
        top = package.split(".")[0]
        if not (dest / top).exists():
            shutil.copytree(
                ROOT / top, dest / top, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
            )
    return dest


def _clean_env() -> dict[str, str]:
    """The environment without this checkout on the path and without cityhub settings."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"} and not k.startswith("CITYHUB_")
    }


@pytest.fixture(scope="module")
def gateway_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("gateway-venv")
    env_dir = base / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "--quiet"]
    env = _clean_env()
    # pip's cache (its default directory) keeps the second run off the network.
    subprocess.run(
        [*pip, "install", "--require-hashes", "-r", str(ROOT / "requirements" / "gateway.txt")],
        check=True,
        env=env,
        cwd=base,
        timeout=600,
    )
    subprocess.run(
        [*pip, "install", "--no-deps", str(_project_copy(base / "src"))],
        check=True,
        env=env,
        cwd=base,
        timeout=600,
    )
    return env_dir


@pytest.mark.slow
def test_the_gateway_extra_has_no_hub_libraries_and_runs_cityhub(gateway_venv: Path):
    python = gateway_venv / "bin" / "python"
    probe = (
        "import importlib.util, sys\n"
        "present = [n for n in sys.argv[1:] if importlib.util.find_spec(n) is not None]\n"
        "print(','.join(present))\n"
    )
    modules = ["numpy", "psycopg", "grafana_foundation_sdk", "grafana_client", "segno"]
    done = subprocess.run(
        [str(python), "-c", probe, *modules],
        capture_output=True,
        text=True,
        check=True,
        env=_clean_env(),
        cwd=gateway_venv,
    )
    assert done.stdout.strip() == ""
    for args in (["--help"], ["gateway", "run", "--help"]):
        shown = subprocess.run(
            [str(gateway_venv / "bin" / "cityhub"), *args],
            check=False,
            capture_output=True,
            text=True,
            env=_clean_env(),
            cwd=gateway_venv,
            timeout=60,
        )
        assert shown.returncode == 0, shown.stderr
        assert "Usage" in shown.stdout


@pytest.mark.slow
def test_a_gateway_runs_from_the_gateway_extra(gateway_venv: Path, mqtt_server, tmp_path):
    tag = uuid.uuid4().hex[:6]
    gateway_id, prefix = f"gw-{tag}", f"t{tag}"
    broker = (
        f'host = "127.0.0.1"\nport = {mqtt_server.port}\n'
        f'username = "{ADMIN_USER}"\npassword = "{mqtt_server.admin_password}"\n'
    )
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[broker]\n{broker}\n[gateway]\ngateway_id = "{gateway_id}"\n'
        f'site_id = "hk-hall-ubnd"\ntopic_prefix = "{prefix}"\n'
        f'outbox_path = "{tmp_path / "outbox.sqlite3"}"\n'
        f"batch_max_ms = 50\nstate_interval_s = 0.5\n"
        f"[gateway.site_broker]\n{broker}",
        encoding="utf-8",
    )
    devices = mqtt_devices(prefix, 2)
    ingest = FakeIngest(mqtt_server, gateway_id=gateway_id, prefix=prefix)
    ingest.acking = True
    pub = client(mqtt_server)
    publish_config(pub, gateway_id=gateway_id, prefix=prefix, devices=devices, version=1)
    states = watch_states(pub, gateway_id=gateway_id, prefix=prefix)
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(gateway_venv / "bin" / "python"), "-m", "gateway", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_clean_env(),
            cwd=tmp_path,
        )
    try:
        wait_for(lambda: any(s.site_ready for s in states), 30, "gateway ready at the site")
        sent = publish_readings(pub, prefix=prefix, devices=devices, per_device=5)
        wait_for(lambda: ingest.readings == sent, 30, "readings delivered to the hub")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        pub.disconnect()
        ingest.close()
    assert proc.returncode == 0, log.read_text()[-2000:]
