"""SQLite for the gateway's outbox: the one place that imports sqlite3.

``open_outbox_database`` opens (or creates) the file for one writer shared by
threads, in WAL mode with ``synchronous=FULL`` (every commit fsynced), and
creates the schema it is given. ``SqliteErrors`` is a reusable context
manager that turns sqlite3 errors raised inside it into ``contracts.errors``:

- disk full, an I/O error, a busy or locked file: ``OutboxUnavailableError``
  (retryable: nothing was stored, space or the disk may come back);
- a read-only file or file system, no permission, a file that cannot be
  opened: ``OutboxUnusableError`` (a person must act);
- a damaged file or one that is not SQLite: ``OutboxCorruptError``.

It costs one ``with`` per call, not per row. What is stored, the
transactions and the locking are ``gateway.outbox``'s business.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from types import TracebackType
from typing import Final

from contracts.errors import (
    HubError,
    OutboxCorruptError,
    OutboxUnavailableError,
    OutboxUnusableError,
)

Connection = sqlite3.Connection

# Primary result codes (the low byte of an extended code).
_UNAVAILABLE: Final = frozenset(
    {sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}
)
_CORRUPT: Final = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


def translate_error(exc: sqlite3.Error, path: Path) -> HubError:
    """The project error for ``exc`` raised on the database at ``path``."""
    code = getattr(exc, "sqlite_errorcode", None)
    name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
    message = f"outbox {path}: {exc} ({name})"
    if code is not None and code & 0xFF in _CORRUPT:
        return OutboxCorruptError(message)
    if code is not None and code & 0xFF in _UNAVAILABLE:
        return OutboxUnavailableError(message)
    return OutboxUnusableError(message)


class SqliteErrors:
    """``with errors:`` turns a sqlite3 error inside into a ``contracts.errors`` one."""

    __slots__ = ("path",)

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if isinstance(exc, sqlite3.Error):
            raise translate_error(exc, self.path) from exc


def open_outbox_database(path: Path, *, schema: str) -> Connection:
    """Open or create ``path`` (autocommit, any thread), WAL and fsynced commits, ``schema`` run.

    The caller serialises access (one lock around the connection).
    """
    errors = SqliteErrors(path)
    with errors:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: every commit is fsynced (WAL alone with NORMAL may lose the last
            # transactions on power loss, which the delivery contract forbids).
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(schema)
        except BaseException:
            db.close()
            raise
    return db
