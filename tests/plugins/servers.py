"""Private servers on free ports: a PostgreSQL with TimescaleDB and Mosquitto brokers.

They use the same code as `cityhub services` (cityhub.localstack), never the
machine's own servers, and are started once per session in a temporary
directory that the servers' system users can reach when the tests run as
root. When a server's binary is missing, every test that needs it is skipped
with a reason naming the binary and ``scripts/install-system-deps``; the
tests that need no server still run.

The binaries are found the way ``cityhub services`` finds them:
``CITYHUB_LOCAL__PG_BINDIR`` names PostgreSQL's bin directory (default: the
newest under /usr/lib/postgresql with TimescaleDB) and
``CITYHUB_LOCAL__MOSQUITTO_BIN`` the broker (default: ``mosquitto`` on PATH).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn, Protocol, TypeVar

import pytest

from cityhub.localstack.mosquitto import MosquittoServer, TlsListener
from cityhub.localstack.postgres import PostgresServer, find_pg_bindir
from cityhub.localstack.procs import free_port, run_as_for
from contracts.errors import MissingDependencyError, PortInUseError

IS_ROOT = os.geteuid() == 0
PG_BINDIR_ENV = "CITYHUB_LOCAL__PG_BINDIR"
MOSQUITTO_BIN_ENV = "CITYHUB_LOCAL__MOSQUITTO_BIN"


class _Startable(Protocol):
    def start(self) -> int: ...


S = TypeVar("S", bound=_Startable)


def skip_missing(what: str, exc: MissingDependencyError) -> NoReturn:
    """Skip the requesting test: ``what`` is missing; ``exc`` says where it looked."""
    pytest.skip(f"{what} missing: {exc}")


def start_or_skip(server: S, what: str) -> S:
    """Start ``server``; skip the test when a piece it needs (a plugin, an extension) is missing."""
    try:
        server.start()
    except MissingDependencyError as exc:
        skip_missing(what, exc)
    return server


@pytest.fixture(scope="session")
def pg_bindir() -> Path:
    """PostgreSQL's bin directory (with TimescaleDB), or a skip naming what is missing."""
    try:
        return find_pg_bindir(os.environ.get(PG_BINDIR_ENV, ""))
    except MissingDependencyError as exc:
        skip_missing("PostgreSQL with TimescaleDB", exc)


@pytest.fixture(scope="session")
def mosquitto_bin() -> str:
    """The Mosquitto broker's executable, or a skip naming it."""
    name = os.environ.get(MOSQUITTO_BIN_ENV, "mosquitto")
    found = shutil.which(name)
    if found is None:
        pytest.skip(
            f"Mosquitto broker ({name!r}, not on PATH) missing: run scripts/install-system-deps"
        )
    return found


@pytest.fixture(scope="session")
def servers_dir() -> Iterator[Path]:
    # Not pytest's tmp_path: /tmp/pytest-of-root is 0700, which the postgres
    # and mosquitto users cannot enter.
    path = Path(tempfile.mkdtemp(prefix="cityhub-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _start_with_free_port(make: Callable[[int], S], what: str, attempts: int = 5) -> S:
    for _ in range(attempts):
        server = make(free_port())
        try:
            return start_or_skip(server, what)
        except PortInUseError:
            continue  # another process took the port between probe and bind
    raise RuntimeError("no free port found")


@pytest.fixture(scope="session")
def pg_server(servers_dir: Path, pg_bindir: Path) -> Iterator[PostgresServer]:
    def make(port: int) -> PostgresServer:
        return PostgresServer(
            base_dir=servers_dir / f"postgres-{port}",
            port=port,
            bindir=pg_bindir,
            run_as=run_as_for("postgres", is_root=IS_ROOT),
            password_file=servers_dir / "postgres.password",
            durable=False,
        )

    server = _start_with_free_port(make, "PostgreSQL with TimescaleDB")
    yield server
    server.stop()


def mosquitto_server(
    base_dir: Path, *, binary: str, port: int | None = None, tls: TlsListener | None = None
) -> MosquittoServer:
    """A broker (not started) on ``port`` or a free one, run as the mosquitto user when root."""
    return MosquittoServer(
        base_dir=base_dir,
        port=free_port() if port is None else port,
        run_as=run_as_for("mosquitto", is_root=IS_ROOT),
        dev_mode=False,
        binary=binary,
        tls=tls,
    )


@pytest.fixture(scope="session")
def mqtt_server(servers_dir: Path, mosquitto_bin: str) -> Iterator[MosquittoServer]:
    def make(port: int) -> MosquittoServer:
        return mosquitto_server(servers_dir / f"mosquitto-{port}", binary=mosquitto_bin, port=port)

    server = _start_with_free_port(make, "Mosquitto's dynamic-security plugin")
    yield server
    server.stop()


@pytest.fixture
def killable_broker(servers_dir: Path, mosquitto_bin: str) -> Iterator[MosquittoServer]:
    """A broker of this test's own, which the test may kill."""
    server = mosquitto_server(
        servers_dir / f"mosquitto-killable-{uuid.uuid4().hex[:6]}", binary=mosquitto_bin
    )
    start_or_skip(server, "Mosquitto's dynamic-security plugin")
    yield server
    server.stop()


def processes_under(path: Path) -> list[int]:
    """The pids whose command line names ``path`` (a state directory's servers and services)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if str(path) in cmdline:
            pids.append(int(entry.name))
    return pids


def kill_everything_under(path: Path) -> None:
    for pid in processes_under(path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def up_dir(
    pg_bindir: Path, mosquitto_bin: str, alertmanager_bin: str
) -> Iterator[tuple[Path, dict[str, str]]]:
    """A state directory and environment for `cityhub up` (skipped without the servers)."""
    state_dir = Path(tempfile.mkdtemp(prefix="cityhub-up-"))
    state_dir.chmod(0o755)
    env = {
        **os.environ,
        "CITYHUB_LOCAL__STATE_DIR": str(state_dir),
        "CITYHUB_LOCAL__PG_PORT": str(free_port()),
        "CITYHUB_LOCAL__MQTT_PORT": str(free_port()),
        "CITYHUB_LOCAL__ALERTMANAGER_PORT": str(free_port()),
        "CITYHUB_LOCAL__ALERTMANAGER_BIN": alertmanager_bin,
        "COLUMNS": "150",
    }
    try:
        yield state_dir, env
    finally:
        kill_everything_under(state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)
