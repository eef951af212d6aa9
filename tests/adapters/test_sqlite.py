"""The outbox's SQLite errors leave as contracts errors: full, read-only, corrupt.

A real SQLite file in tmp_path each time; a full disk is a database at its
``max_page_count``, a read-only one a connection with ``query_only`` (the
tests may run as root, whom file modes do not stop).
"""

from __future__ import annotations

import os
import sqlite3

import pytest

from adapters.sqlite import SqliteErrors, translate_error
from contracts.errors import (
    OutboxCorruptError,
    OutboxUnavailableError,
    OutboxUnusableError,
    UnavailableError,
)
from gateway.outbox import Outbox


def _error(code: int) -> sqlite3.Error:
    exc = sqlite3.OperationalError("boom")
    exc.sqlite_errorcode = code
    return exc


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (sqlite3.SQLITE_FULL, OutboxUnavailableError),
        (sqlite3.SQLITE_IOERR, OutboxUnavailableError),
        (sqlite3.SQLITE_IOERR_FSYNC, OutboxUnavailableError),  # an extended code
        (sqlite3.SQLITE_BUSY, OutboxUnavailableError),
        (sqlite3.SQLITE_LOCKED, OutboxUnavailableError),
        (sqlite3.SQLITE_READONLY, OutboxUnusableError),
        (sqlite3.SQLITE_CANTOPEN, OutboxUnusableError),
        (sqlite3.SQLITE_PERM, OutboxUnusableError),
        (sqlite3.SQLITE_CORRUPT, OutboxCorruptError),
        (sqlite3.SQLITE_NOTADB, OutboxCorruptError),
    ],
)
def test_codes_map_to_errors(tmp_path, code, expected):
    error = translate_error(_error(code), tmp_path / "o.sqlite3")
    assert type(error) is expected
    assert str(tmp_path) in str(error)


def test_the_context_manager_chains_the_cause(tmp_path):
    original = _error(sqlite3.SQLITE_FULL)
    with pytest.raises(OutboxUnavailableError) as info, SqliteErrors(tmp_path):
        raise original
    assert info.value.__cause__ is original


def test_a_full_disk_is_retryable_and_stores_nothing(tmp_path):
    box = Outbox(tmp_path / "o.sqlite3", max_bytes=1 << 30, full_policy="refuse")
    box.put([("b-0", b"x" * 100, 1)], now_ms=1)
    pages = box._db.execute("PRAGMA page_count").fetchone()[0]
    box._db.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(OutboxUnavailableError, match="full") as info:
        box.put([("b-1", os.urandom(64_000), 1)], now_ms=2)
    assert isinstance(info.value, UnavailableError)
    assert isinstance(info.value.__cause__, sqlite3.Error)
    assert box.depth().batches == 1
    # Space again: the same outbox goes on.
    box._db.execute(f"PRAGMA max_page_count = {pages * 1000}")
    assert box.put([("b-1", os.urandom(64_000), 1)], now_ms=3).stored_batches == 1
    assert [item.batch_id for item in box.due(4, resend_after_ms=0, limit=10)] == ["b-0", "b-1"]
    box.close()


def test_a_read_only_database_is_unusable(tmp_path):
    box = Outbox(tmp_path / "o.sqlite3", max_bytes=1 << 20, full_policy="refuse")
    box._db.execute("PRAGMA query_only = ON")
    with pytest.raises(OutboxUnusableError, match="readonly") as info:
        box.put([("b-0", b"x", 1)], now_ms=1)
    assert not isinstance(info.value, OutboxCorruptError)
    box.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to files whatever their mode")
def test_a_read_only_file_is_unusable(tmp_path):
    path = tmp_path / "o.sqlite3"
    Outbox(path, max_bytes=1 << 20, full_policy="refuse").close()
    for file in tmp_path.iterdir():
        file.chmod(0o444)
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(OutboxUnusableError):
            _open_and_put(path)
    finally:
        tmp_path.chmod(0o755)


def test_a_file_that_is_not_sqlite_is_corrupt(tmp_path):
    path = tmp_path / "o.sqlite3"
    path.write_bytes(b"not a database, just some bytes " * 100)
    with pytest.raises(OutboxCorruptError, match="not a database"):
        Outbox(path, max_bytes=1 << 20, full_policy="refuse")


def test_a_damaged_database_is_corrupt(tmp_path):
    path = tmp_path / "o.sqlite3"
    box = Outbox(path, max_bytes=1 << 30, full_policy="refuse")
    box.put([(f"b-{i}", os.urandom(3000), 1) for i in range(50)], now_ms=1)
    box._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    box.close()
    data = bytearray(path.read_bytes())
    page = 4096
    data[page : 4 * page] = b"\xff" * (3 * page)  # the pages after the first: tables and index
    path.write_bytes(bytes(data))
    with pytest.raises(OutboxCorruptError):
        _open_and_put(path)


def _open_and_put(path):
    box = Outbox(path, max_bytes=1 << 30, full_policy="refuse")
    box.put([("b-new", b"x", 1)], now_ms=2)
