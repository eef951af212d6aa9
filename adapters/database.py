"""PostgreSQL for every service: connections, one error map, the psycopg names they use.

The one module that imports psycopg (3). ``connect`` opens a connection
(autocommit by default, a connect timeout, an application name);
``Database`` keeps one connection for a long-running worker, opened on
first use and again after it failed, with ``interrupt`` to cut a call that
hangs. ``database_errors`` translates psycopg's errors into
``contracts.errors``, the same way for every caller:

    psycopg error                                  project error
    IntegrityError, DataError                      RefusedByDatabaseError (poison: the data)
    UndefinedTable, UndefinedColumn,               SchemaError: not migrated
      UndefinedFunction, InvalidSchemaName
    any other ProgrammingError, NotSupportedError  SchemaError: the statement is refused
                                                   (grants, server version, a bad query)
    OperationalError (server gone, cancelled,      DatabaseUnavailableError (retry)
      deadlock, disk full), InterfaceError
      (connection closed), InternalError (among
      them ReadOnlySqlTransaction: a standby, or
      a primary demoted after a failover) and
      the rest

A multi-host URL (``postgresql://u:p@h1:5432,h2:5432/db?target_session_attrs=read-write``,
or ``host=h1,h2 port=5432,5432 ... target_session_attrs=read-write``) is
handed to libpq as it is: each connect tries the hosts in turn (each for
the connect timeout) and keeps the first that takes writes. A ``Database``
whose server went away or read-only drops its connection on the
DatabaseUnavailableError, so the caller's retry connects to the new primary.

psycopg reports socket errors as OperationalError, so an ``OSError`` inside
the block is not the database's and passes through untranslated (a
provisioning transaction writes certificate files, for one).

The services keep writing their own SQL on the ``Connection`` and ``Cursor``
re-exported here (``transaction()`` for transactions and savepoints,
``copy()`` for COPY); ``insert_unless_duplicate`` runs a statement that a
unique key may refuse. What to retry and when, and what a refused row
becomes, is the callers' business.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Final

import psycopg
from psycopg import Connection, Cursor, sql
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

from contracts.errors import (
    DatabaseUnavailableError,
    HubError,
    RefusedByDatabaseError,
    SchemaError,
    SettingsError,
)

__all__ = [
    "Connection",
    "Cursor",
    "Database",
    "connect",
    "database_errors",
    "dict_row",
    "insert_unless_duplicate",
    "sql",
]

logger = logging.getLogger(__name__)

# A missing table, column, function or schema: the schema is older than the code.
_NOT_MIGRATED: Final = (
    pg_errors.UndefinedTable,
    pg_errors.UndefinedColumn,
    pg_errors.UndefinedFunction,
    pg_errors.InvalidSchemaName,
)
# libpq counts its connect timeout in whole seconds; 0 would mean "wait forever".
_MIN_CONNECT_TIMEOUT_S: Final = 1
# A server that vanishes without closing its connections (a host powered off,
# a network partition around a failover) would leave a blocked call waiting
# for TCP to give up: ~15 min with data in flight, 2 h when idle. With these,
# libpq finds an idle dead peer after 10 + 3 x 5 = 25 s, and drops a
# connection whose sent data stays unacknowledged for 30 s (a live server on
# a busy link acknowledges far sooner). Set only where the URL says nothing:
# an operator's own values win.
_TCP_DEFAULTS: Final = {
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "30000",  # milliseconds
}


@contextmanager
def database_errors(
    what: str, *, schema: str | None = None, refused_as: type[HubError] | None = None
) -> Iterator[None]:
    """Translate psycopg errors raised in the block (see the module docstring).

    ``what`` starts each message; ``schema`` is named in a "not migrated"
    one. ``refused_as``, when given, is what every error except an
    unavailable server becomes: a failing migration is a MigrationError,
    whatever the server's reason.
    """
    try:
        yield
    except (pg_errors.OperationalError, pg_errors.InterfaceError, pg_errors.InternalError) as exc:
        raise DatabaseUnavailableError(f"{what}: {exc}") from exc
    except psycopg.Error as exc:
        if refused_as is not None:
            raise refused_as(f"{what}: {exc}") from exc
        if isinstance(exc, pg_errors.IntegrityError | pg_errors.DataError):
            raise RefusedByDatabaseError(f"{what}: the database refused the data: {exc}") from exc
        if isinstance(exc, _NOT_MIGRATED):
            where = "the database" if schema is None else f"schema {schema!r}"
            raise SchemaError(
                f"{what}: {where} is not migrated (run `cityhub db migrate`): {exc}"
            ) from exc
        if isinstance(exc, pg_errors.ProgrammingError | pg_errors.NotSupportedError):
            raise SchemaError(f"{what}: the database refused the statement: {exc}") from exc
        raise DatabaseUnavailableError(f"{what}: {exc}") from exc


def connect(
    url: str,
    *,
    timeout_s: float = 5.0,
    application_name: str | None = None,
    autocommit: bool = True,
) -> Connection[Any]:
    """A new connection; use it in a ``with`` block, which closes it.

    An unreachable or refusing server is DatabaseUnavailableError ("cannot
    connect to the database"); a URL that is not a connection string is
    SettingsError, without the URL (it may hold a password). TCP keepalives
    and a TCP user timeout are added unless the URL sets them.
    """
    options: dict[str, Any] = {}
    if application_name is not None:
        options["application_name"] = application_name[:63]  # PostgreSQL's NAMEDATALEN - 1
    try:
        given = conninfo_to_dict(url)
        options.update({k: v for k, v in _TCP_DEFAULTS.items() if k not in given})
        return psycopg.connect(
            url,
            autocommit=autocommit,
            connect_timeout=max(_MIN_CONNECT_TIMEOUT_S, round(timeout_s)),
            **options,
        )
    except (pg_errors.OperationalError, pg_errors.InterfaceError) as exc:
        raise DatabaseUnavailableError(f"cannot connect to the database: {exc}") from exc
    except psycopg.Error as exc:
        raise SettingsError(
            "database.url", f"not a PostgreSQL connection URL ({type(exc).__name__})"
        ) from None


def insert_unless_duplicate(cur: Cursor[Any], statement: str) -> int | None:
    """Run ``statement`` in a savepoint: its row count, or None if a unique key refused it.

    When refused, nothing of the statement stays and the transaction goes on.
    """
    try:
        with cur.connection.transaction():  # a savepoint inside a transaction
            cur.execute(statement)
    except pg_errors.UniqueViolation:
        return None
    return max(cur.rowcount, 0)


class Database:
    """One connection of a long-running worker, opened when needed; thread-safe.

    ``session`` holds a re-entrant lock for the whole block, so one thread
    uses the connection at a time and a caller may nest sessions. An
    unavailable server closes the connection; the next session opens a new
    one. ``on_connect`` prepares each new connection (temporary tables, an
    advisory lock); if it raises, the connection is closed and the error
    passes on.
    """

    def __init__(
        self,
        *,
        url: str,
        application_name: str,
        schema: str | None = None,
        connect_timeout_s: float = 5.0,
        on_connect: Callable[[Connection[Any]], None] | None = None,
    ) -> None:
        self.url = url
        self.application_name = application_name
        self.schema = schema
        self.connect_timeout_s = connect_timeout_s
        self.on_connect = on_connect
        self.connects = 0  # successful connections, for metrics and tests
        self._conn: Connection[Any] | None = None
        self._lock = threading.RLock()

    @contextmanager
    def session(self, what: str) -> Iterator[Connection[Any]]:
        """The connection, with errors translated; ``what`` names the work in messages."""
        with self._lock:
            try:
                with database_errors(what, schema=self.schema):
                    yield self._connection()
            except DatabaseUnavailableError:
                self._drop()
                raise

    def connect(self) -> None:
        """Connect now (otherwise the first session does); DatabaseUnavailableError if it can't."""
        with self.session("connect"):
            pass

    def close(self) -> None:
        with self._lock:
            self._drop()

    def interrupt(self) -> None:
        """Cut the connection under a call that hangs; safe from any thread.

        Shuts the socket down (through a duplicate of its descriptor, so
        libpq's own stays valid): the blocked call fails at once with a
        connection error, which becomes DatabaseUnavailableError.
        """
        conn = self._conn
        if conn is None:
            return
        try:
            fd = os.dup(conn.fileno())
        except (psycopg.Error, OSError) as exc:
            logger.debug("interrupt: no socket to cut: %s", exc)
            return
        with socket.socket(fileno=fd) as sock:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError as exc:
                logger.debug("interrupt: shutdown failed: %s", exc)

    def _connection(self) -> Connection[Any]:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        conn = connect(
            self.url, timeout_s=self.connect_timeout_s, application_name=self.application_name
        )
        if self.on_connect is not None:
            try:
                self.on_connect(conn)
            except BaseException:
                conn.close()
                raise
        self._conn = conn
        self.connects += 1
        logger.info(
            "connected to the database as %s (schema %s)", self.application_name, self.schema
        )
        return conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except (psycopg.Error, OSError) as exc:
                logger.debug("closing a broken connection: %s", exc)


def set_login_password(conn: Connection[Any], role: str, password: str) -> None:
    """Give ``role`` LOGIN and ``password``, sent as a SCRAM-SHA-256 verifier.

    libpq computes the verifier here, so the password itself never reaches
    the server (nor its statement log); the server stores the verifier as
    it is.
    """
    verifier = conn.pgconn.encrypt_password(password.encode(), role.encode(), b"scram-sha-256")
    conn.execute(
        sql.SQL("ALTER ROLE {} WITH LOGIN PASSWORD {}").format(
            sql.Identifier(role), sql.Literal(verifier.decode())
        )
    )
