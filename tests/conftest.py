"""Session fixtures: a private PostgreSQL/TimescaleDB and a private Mosquitto on free ports.

They use the same code as `cityhub services` (cityhub.localstack), never the
machine's own servers. Each test gets its own database schema; servers are
started once per session in a temporary directory that the servers' system
users can reach when the tests run as root.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from cityhub import database
from cityhub.localstack.mosquitto import MosquittoServer
from cityhub.localstack.postgres import PostgresServer, find_pg_bindir
from cityhub.localstack.procs import free_port, run_as_for
from contracts.errors import PortInUseError
from contracts.settings import StorageSettings

IS_ROOT = os.geteuid() == 0


@pytest.fixture(scope="session")
def servers_dir() -> Iterator[Path]:
    # Not pytest's tmp_path: /tmp/pytest-of-root is 0700, which the postgres
    # and mosquitto users cannot enter.
    path = Path(tempfile.mkdtemp(prefix="cityhub-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _start_with_free_port(make, attempts: int = 5):
    for _ in range(attempts):
        server = make(free_port())
        try:
            server.start()
        except PortInUseError:
            continue  # another process took the port between probe and bind
        return server
    raise RuntimeError("no free port found")


@pytest.fixture(scope="session")
def pg_server(servers_dir: Path) -> Iterator[PostgresServer]:
    bindir = find_pg_bindir()

    def make(port: int) -> PostgresServer:
        return PostgresServer(
            base_dir=servers_dir / f"postgres-{port}",
            port=port,
            bindir=bindir,
            run_as=run_as_for("postgres", is_root=IS_ROOT),
            password_file=servers_dir / "postgres.password",
            durable=False,
        )

    server = _start_with_free_port(make)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mqtt_server(servers_dir: Path) -> Iterator[MosquittoServer]:
    def make(port: int) -> MosquittoServer:
        return MosquittoServer(
            base_dir=servers_dir / f"mosquitto-{port}",
            port=port,
            run_as=run_as_for("mosquitto", is_root=IS_ROOT),
            dev_mode=False,
        )

    server = _start_with_free_port(make)
    yield server
    server.stop()


@pytest.fixture
def db_url(pg_server: PostgresServer) -> str:
    return pg_server.url()


@pytest.fixture
def db_conn(db_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def db_schema(db_conn: psycopg.Connection) -> Iterator[str]:
    """A schema name of this test's own, dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    yield schema
    db_conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture
def storage() -> StorageSettings:
    return StorageSettings()


@pytest.fixture
def migrated(db_conn: psycopg.Connection, db_schema: str, storage: StorageSettings) -> str:
    database.migrate(db_conn, schema=db_schema, storage=storage)
    return db_schema


@pytest.fixture
def killable_broker(servers_dir: Path) -> Iterator[MosquittoServer]:
    """A broker of this test's own, which the test may kill."""
    server = MosquittoServer(
        base_dir=servers_dir / f"mosquitto-killable-{uuid.uuid4().hex[:6]}",
        port=free_port(),
        run_as=run_as_for("mosquitto", is_root=IS_ROOT),
        dev_mode=False,
    )
    server.start()
    yield server
    server.stop()


# --- provisioning: the session broker's admin account, a registry with sites --------


@pytest.fixture
def broker_admin(mqtt_server: MosquittoServer):
    """The session broker's admin account (dynamic-security control API included)."""
    from cityhub.localstack.mosquitto import ADMIN_USER
    from contracts.settings import BrokerSettings

    return BrokerSettings(
        host="127.0.0.1",
        port=mqtt_server.port,
        username=ADMIN_USER,
        password=mqtt_server.admin_password,
    )


@pytest.fixture
def seeded(db_conn: psycopg.Connection, migrated: str) -> str:
    """A migrated schema with the Hanoi sites loaded."""
    database.seed_sites(db_conn, schema=migrated, sites=database.load_hanoi_sites())
    return migrated


@pytest.fixture
def topic_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def ids() -> tuple[str, str]:
    """A gateway id and a topic prefix of this test's own."""
    tag = uuid.uuid4().hex[:6]
    return f"gw-{tag}", f"t{tag}"


@pytest.fixture
def provisioner(db_conn, seeded, broker_admin, mqtt_server, topic_prefix, tmp_path):
    """Provisioning with the real registry and the session broker, in a topic space of its own."""
    from devices.brokerctl import BrokerControl
    from devices.provisioning import Endpoint, Provisioner
    from devices.registry import Registry

    endpoint = Endpoint(host="127.0.0.1", port=mqtt_server.port)
    with BrokerControl(name="central", broker=broker_admin) as control:
        yield Provisioner(
            registry=Registry(db_conn, schema=seeded),
            operator="Nguyễn Thị Lan",
            central=control,
            site=control,
            central_endpoint=endpoint,
            site_endpoint=endpoint,
            bundle_dir=tmp_path / "bundles",
            prefix=topic_prefix,
        )
