"""adapters.database against the session's real PostgreSQL: the error map, connect, Database.

Each row of the table runs real statements and names the project error they
must become; a stopped server, a cut proxy and a terminated backend must be
retryable (DatabaseUnavailableError), a refused row poison
(RefusedByDatabaseError), a schema that lacks a table SchemaError.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import psycopg
import pytest

from adapters.database import Database, connect, database_errors, insert_unless_duplicate
from cityhub.localstack.procs import free_port
from contracts.errors import (
    DatabaseUnavailableError,
    HubError,
    MigrationError,
    RefusedByDatabaseError,
    SchemaError,
    SettingsError,
)
from tests.plugins.ingest import TcpProxy, proxied_url

Statement = Callable[[psycopg.Connection, str], object]


def _sql(template: str, *params: object) -> Statement:
    """A statement with ``{s}`` standing for the test's schema."""
    return lambda conn, schema: conn.execute(template.format(s=schema), params or None)


def _read_only_write(conn: psycopg.Connection, schema: str) -> None:
    with conn.transaction():
        conn.execute("SET TRANSACTION READ ONLY")
        conn.execute(f"INSERT INTO {schema}.t (k) VALUES (99)")


def _cancelled(conn: psycopg.Connection, schema: str) -> None:
    with conn.transaction():
        conn.execute("SET LOCAL statement_timeout = 50")
        conn.execute("SELECT pg_sleep(5)")


REFUSED, NOT_MIGRATED = "refused the data", "is not migrated (run `cityhub db migrate`)"
# (statement, the error it must become, a piece of its message)
CASES: dict[str, tuple[Statement, type[HubError], str]] = {
    "unique key": (_sql("INSERT INTO {s}.t (k) VALUES (1)"), RefusedByDatabaseError, REFUSED),
    "not null": (_sql("INSERT INTO {s}.t (k) VALUES (NULL)"), RefusedByDatabaseError, REFUSED),
    "check": (_sql("INSERT INTO {s}.t (k) VALUES (-1)"), RefusedByDatabaseError, REFUSED),
    "not a number": (_sql("SELECT 'x'::int"), RefusedByDatabaseError, REFUSED),
    "NUL in text": (
        _sql("INSERT INTO {s}.t (k, note) VALUES (5, %s)", "a\x00b"),
        RefusedByDatabaseError,
        REFUSED,
    ),
    "missing table": (_sql("SELECT * FROM {s}.absent"), SchemaError, NOT_MIGRATED),
    "missing column": (_sql("SELECT absent FROM {s}.t"), SchemaError, NOT_MIGRATED),
    "missing function": (_sql("SELECT {s}.absent()"), SchemaError, NOT_MIGRATED),
    "missing schema": (_sql("CREATE TABLE {s}_absent.t ()"), SchemaError, NOT_MIGRATED),
    "syntax": (_sql("SELEC 1"), SchemaError, "refused the statement"),
    "statement timeout": (_cancelled, DatabaseUnavailableError, "statement timeout"),
    "read-only transaction": (_read_only_write, DatabaseUnavailableError, "read-only"),
}


@pytest.fixture
def table(db_conn: psycopg.Connection, db_schema: str) -> str:
    """A schema of this test's own with one table: a unique, non-null, positive key."""
    db_conn.execute(f"CREATE SCHEMA {db_schema}")
    db_conn.execute(f"CREATE TABLE {db_schema}.t (k int PRIMARY KEY CHECK (k > 0), note text)")
    db_conn.execute(f"INSERT INTO {db_schema}.t (k) VALUES (1)")
    return db_schema


@pytest.mark.parametrize("case", list(CASES))
def test_the_error_map(db_url, table, case):
    statement, expected, text = CASES[case]
    with connect(db_url) as conn:
        with pytest.raises(expected) as caught, database_errors("work", schema=table):
            statement(conn, table)
        assert type(caught.value) is expected
        assert str(caught.value).startswith("work: ")
        assert text in str(caught.value)
        assert isinstance(caught.value.__cause__, psycopg.Error)
        # The connection outlives every refusal: the same map, the next statement works.
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_retryable_and_poison_are_apart():
    assert not issubclass(RefusedByDatabaseError, DatabaseUnavailableError)
    assert not issubclass(DatabaseUnavailableError, RefusedByDatabaseError)
    assert not issubclass(SchemaError, DatabaseUnavailableError | RefusedByDatabaseError)


def test_refused_as_makes_every_refusal_one_type(db_url, table):
    with connect(db_url) as conn:
        for statement in ("SELEC 1", f"INSERT INTO {table}.t (k) VALUES (1)"):
            with (
                pytest.raises(MigrationError, match=r"^migration 7 failed: "),
                database_errors("migration 7 failed", refused_as=MigrationError),
            ):
                conn.execute(statement)


def test_errors_that_are_not_the_database_pass_through(db_url):
    with pytest.raises(OSError, match="disk"), database_errors("work"):
        raise OSError("a disk of our own")
    with pytest.raises(SchemaError, match=r"^ours$"), database_errors("work"):
        raise SchemaError("ours")


def test_a_stopped_server_is_unavailable():
    url = f"postgresql://cityhub:secret@127.0.0.1:{free_port()}/cityhub"
    with pytest.raises(DatabaseUnavailableError, match="cannot connect to the database") as caught:
        connect(url, timeout_s=1)
    assert "secret" not in str(caught.value)


def test_a_url_that_is_not_one_is_a_settings_error_without_the_password():
    with pytest.raises(SettingsError, match=r"database\.url") as caught:
        connect("postgresql://cityhub:secret@127.0.0.1:5/x?bogus=1")
    assert "secret" not in str(caught.value)
    assert caught.value.__cause__ is None


def test_a_terminated_backend_is_unavailable_and_the_next_session_reconnects(
    db_url, db_conn, table
):
    name = f"t-{uuid.uuid4().hex[:8]}"
    db = Database(url=db_url, application_name=name, schema=table, connect_timeout_s=2)
    try:
        with db.session("first") as conn:
            assert conn.execute(f"SELECT count(*) FROM {table}.t").fetchone() == (1,)
        db_conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (name,),
        )
        with (
            pytest.raises(DatabaseUnavailableError, match=r"^second: "),
            db.session("second") as conn,
        ):
            conn.execute("SELECT 1")
        with db.session("third") as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert db.connects == 2
    finally:
        db.close()


def test_a_cut_proxy_is_unavailable_until_it_is_restored(db_url, table):
    port = int(db_url.rsplit(":", 1)[1].split("/", maxsplit=1)[0])
    proxy = TcpProxy(port)
    db = Database(
        url=proxied_url(db_url, proxy), application_name="cut", schema=table, connect_timeout_s=1
    )
    try:
        db.connect()
        proxy.cut()
        with pytest.raises(DatabaseUnavailableError), db.session("cut") as conn:
            conn.execute("SELECT 1")
        # While cut, connecting again fails the same way.
        with pytest.raises(DatabaseUnavailableError, match="cannot connect to the database"):
            db.connect()
        proxy.restore()
        with db.session("restored") as conn:
            assert conn.execute(f"SELECT count(*) FROM {table}.t").fetchone() == (1,)
        assert db.connects == 2
    finally:
        db.close()
        proxy.close()


def test_a_refusal_keeps_the_connection(db_url, table):
    db = Database(url=db_url, application_name="keeps", schema=table)
    try:
        with pytest.raises(RefusedByDatabaseError), db.session("insert") as conn:
            conn.execute(f"INSERT INTO {table}.t (k) VALUES (1)")
        with pytest.raises(SchemaError), db.session("select") as conn:
            conn.execute(f"SELECT * FROM {table}.absent")
        with db.session("again") as conn:
            conn.execute("SELECT 1")
        assert db.connects == 1
    finally:
        db.close()


def test_on_connect_failure_closes_the_connection_and_is_tried_again(db_url, table):
    prepared: list[psycopg.Connection] = []

    def prepare(conn: psycopg.Connection) -> None:
        prepared.append(conn)
        if len(prepared) == 1:
            raise SchemaError("not ready")
        conn.execute("CREATE TEMP TABLE prepared (x int)")

    db = Database(url=db_url, application_name="prepare", schema=table, on_connect=prepare)
    try:
        with pytest.raises(SchemaError, match="not ready"):
            db.connect()
        assert db.connects == 0
        assert prepared[0].closed
        with db.session("prepared") as conn:
            assert conn.execute("SELECT count(*) FROM prepared").fetchone() == (0,)
        assert len(prepared) == 2
    finally:
        db.close()


def test_insert_unless_duplicate(db_url, table):
    with connect(db_url) as conn, conn.transaction(), conn.cursor() as cur:
        assert insert_unless_duplicate(cur, f"INSERT INTO {table}.t (k) VALUES (2), (3)") == 2
        assert insert_unless_duplicate(cur, f"INSERT INTO {table}.t (k) VALUES (4), (1)") is None
        # Only the refused statement was undone; the transaction goes on.
        cur.execute(f"SELECT k FROM {table}.t ORDER BY k")
        assert cur.fetchall() == [(1,), (2,), (3,)]


@pytest.mark.parametrize(
    "given",
    [
        "",
        "&keepalives_idle=3&tcp_user_timeout=1000",
    ],
    ids=["defaults", "the URL's own"],
)
def test_tcp_keepalives_and_user_timeout_unless_the_url_sets_them(db_url, given):
    """A vanished server (no FIN, no RST) must not hold a call for TCP's 15 min or 2 h."""
    url = db_url + ("?" + given.lstrip("&") if given else "")
    with connect(url) as conn:
        params = conn.info.get_parameters()
    assert params["keepalives"] == "1"
    assert params["keepalives_count"] == "3"
    if given:
        assert (params["keepalives_idle"], params["tcp_user_timeout"]) == ("3", "1000")
    else:
        assert (params["keepalives_idle"], params["tcp_user_timeout"]) == ("10", "30000")
