"""The outbox's SQLite errors leave as contracts errors: full, read-only, corrupt.

A real SQLite file in tmp_path each time; a full disk is a database at its
``max_page_count``, a read-only one a connection with ``query_only`` (the
tests may run as root, whom file modes do not stop).
"""

from __future__ import annotations

import os
import pwd
import shutil
import sqlite3
import tempfile
from pathlib import Path

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


def _outcome_as(uid: int, gid: int, path: Path) -> str:
    """Open the outbox and put a batch in a forked child running as ``uid``: what happened."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        outcome = b"written"
        try:
            os.setgid(gid)
            os.setuid(uid)
            _open_and_put(path)
        except OutboxCorruptError:
            outcome = b"corrupt"
        except OutboxUnusableError:
            outcome = b"unusable"
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which asserts
            outcome = repr(exc).encode()
        os.write(write_end, outcome)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        outcome_bytes = reader.read()
    os.waitpid(pid, 0)
    return outcome_bytes.decode()


def test_a_read_only_file_is_unusable():
    # Root writes to files whatever their mode, so as root the outbox is
    # opened by `nobody`, who may read the directory but not write to it.
    base = Path(tempfile.mkdtemp(prefix="cityhub-ro-", dir="/tmp"))
    try:
        path = base / "o.sqlite3"
        Outbox(path, max_bytes=1 << 20, full_policy="refuse").close()
        for file in base.iterdir():
            file.chmod(0o444)
        base.chmod(0o555)
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            assert _outcome_as(nobody.pw_uid, nobody.pw_gid, path) == "unusable"
        else:
            with pytest.raises(OutboxUnusableError) as info:
                _open_and_put(path)
            assert not isinstance(info.value, OutboxCorruptError)
    finally:
        base.chmod(0o755)
        shutil.rmtree(base)


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
