"""Database fixtures on the session's private PostgreSQL: connections and per-test schemas.

Each test gets a schema of its own, dropped afterwards, so tests never see
each other's rows; ``migrated`` and ``seeded`` run the real migrations and
load the Hanoi sites into it. The server itself comes from ``servers``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest

from cityhub import database
from cityhub.localstack.postgres import PostgresServer
from contracts.roles import ROLE_KINDS, role_name
from contracts.settings import StorageSettings


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
    drop_service_roles(db_conn, schema)


def drop_service_roles(conn: psycopg.Connection, schema: str) -> None:
    """Drop the schema's service roles (cluster-wide: they outlive the schema otherwise)."""
    for kind in ROLE_KINDS:
        role = role_name(schema, kind)
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


@pytest.fixture
def storage() -> StorageSettings:
    return StorageSettings()


@pytest.fixture
def migrated(db_conn: psycopg.Connection, db_schema: str, storage: StorageSettings) -> str:
    database.migrate(db_conn, schema=db_schema, storage=storage)
    return db_schema


@pytest.fixture
def seeded(db_conn: psycopg.Connection, migrated: str) -> str:
    """A migrated schema with the Hanoi sites loaded."""
    database.seed_sites(db_conn, schema=migrated, sites=database.load_hanoi_sites())
    return migrated
