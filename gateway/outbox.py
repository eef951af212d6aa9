"""The gateway's durable outbox: encoded batches in SQLite until ingest acks them.

A batch is in the outbox once ``put`` returns: SQLite in WAL mode with
``synchronous=FULL`` has fsynced it, so it survives kill -9 and power loss.
It leaves only when ingest's ack for its batch id arrives (``ack``) naming
the digest of the very payload stored here (``contracts.messages.
payload_digest``): an ack for another payload under the same id (a refused
or spoofed message) leaves it in place. Until then ``due`` hands it out
again, unchanged, after ``resend_after_ms``.

The outbox is bounded by ``max_bytes`` of payload. When a new batch would
exceed the bound the policy decides: ``refuse`` raises OutboxFullError and
stores nothing (the gateway asks ``fits`` first and holds the batch back, its
device messages unacknowledged, until acks make room), ``drop_oldest``
deletes the oldest batches to make room and counts their readings as
dropped. A refused ``put`` counts nothing: the batch is held and put again,
so counting it would count the same readings at every try, and readings
that are later stored as refused. The readings the gateway does give up
(serial readings while the outbox is full, a batch larger than the whole
outbox) it records with ``count_refused``. Both totals are kept in the
file, so they survive restarts; ``totals`` reads them for the gateway's
state message.

The same file holds the commands the gateway was given (``commands``) and
the reports it owes the centre (``reports``): a command's new state and its
report are written in one fsynced transaction (``apply_changes``); a report
leaves when an ack names its report id (``ack_reports``). What the states
mean is ``gateway.commanding``'s business.

Blocking calls (fsync): the service runs them in a worker thread. Opening
the file and translating SQLite's errors (disk full, read-only, corrupt)
into ``contracts.errors`` is ``adapters.sqlite``'s business.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import msgspec

from adapters.sqlite import SqliteErrors, open_outbox_database
from contracts.commands import CommandReport, decode_command, encode_command
from contracts.errors import OutboxFullError
from contracts.messages import payload_digest
from gateway.commanding import Change, Held

FullPolicy = Literal["refuse", "drop_oldest"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY,          -- insertion order: oldest first
    batch_id TEXT NOT NULL UNIQUE,
    payload BLOB NOT NULL,
    readings INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    sent_ms INTEGER,                 -- last publish, NULL if never sent
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS batches_sent_idx ON batches (sent_ms);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS documents (
    name TEXT PRIMARY KEY,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS commands (
    command_id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    body BLOB NOT NULL,              -- the Command's JSON; empty for a cancel tombstone
    state TEXT NOT NULL,             -- gateway.commanding: a command state or 'delivering'
    expires_ms INTEGER NOT NULL,
    delivered_ms INTEGER,            -- last handed to the device
    deadline_ms INTEGER              -- no final answer by then: failed
);
CREATE TABLE IF NOT EXISTS reports (
    id INTEGER PRIMARY KEY,          -- insertion order: oldest first
    report_id TEXT NOT NULL UNIQUE,
    body BLOB NOT NULL,              -- the CommandReport's JSON
    created_ms INTEGER NOT NULL,
    sent_ms INTEGER                  -- last publish, NULL if never sent
);
"""


@dataclass(frozen=True)
class OutboxItem:
    batch_id: str
    payload: bytes
    readings: int
    attempts: int


@dataclass(frozen=True)
class OutboxDepth:
    batches: int
    readings: int
    bytes: int


@dataclass(frozen=True)
class OutboxTotals:
    """Readings given up since the file was created, kept in it across restarts."""

    refused_readings: int
    dropped_readings: int


@dataclass(frozen=True)
class AckResult:
    removed_batches: int
    removed_readings: int
    # Held batch ids acked for another payload (or without a digest): kept.
    mismatched: int


@dataclass(frozen=True)
class PutResult:
    stored_batches: int
    dropped_batches: int
    dropped_readings: int


@dataclass(frozen=True)
class DueReport:
    report: CommandReport
    resend: bool  # sent before and not acked


_REPORT_ENCODER = msgspec.json.Encoder()
_REPORT_DECODER = msgspec.json.Decoder(CommandReport)


class Outbox:
    """One SQLite file; safe to call from several threads (one lock, one connection)."""

    def __init__(self, path: Path, *, max_bytes: int, full_policy: FullPolicy) -> None:
        if max_bytes < 1:
            raise ValueError("outbox max_bytes must be positive")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_bytes = max_bytes
        self.full_policy = full_policy
        self._lock = threading.Lock()
        self._errors = SqliteErrors(path)
        self._db = open_outbox_database(path, schema=_SCHEMA)
        with self._errors:
            row = self._db.execute(
                "SELECT count(*), coalesce(sum(readings), 0), coalesce(sum(length(payload)), 0) "
                "FROM batches"
            ).fetchone()
            reports = self._db.execute("SELECT count(*) FROM reports").fetchone()[0]
            counters = dict(self._db.execute("SELECT name, value FROM counters").fetchall())
        self._depth = OutboxDepth(batches=row[0], readings=row[1], bytes=row[2])
        self._totals = OutboxTotals(
            refused_readings=int(counters.get("refused_readings", 0)),
            dropped_readings=int(counters.get("dropped_readings", 0)),
        )
        self._reports_pending = int(reports)

    def close(self) -> None:
        with self._lock, self._errors:
            self._db.close()

    def depth(self) -> OutboxDepth:
        return self._depth

    def totals(self) -> OutboxTotals:
        """The refused and dropped readings the file holds (no I/O)."""
        return self._totals

    def count_refused(self, readings: int) -> None:
        """Add ``readings`` the gateway gave up because the outbox was full to the file's total.

        Not fsynced: a count lost to a power cut is a few readings too few in
        a report, and a full outbox may refuse serial readings every second.
        """
        if readings <= 0:
            return
        with self._lock, self._errors, self._relaxed():
            self._bump("refused_readings", readings)
            totals = self._totals
            self._totals = OutboxTotals(
                refused_readings=totals.refused_readings + readings,
                dropped_readings=totals.dropped_readings,
            )

    def counter(self, name: str) -> int:
        with self._lock, self._errors:
            row = self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def _bump(self, name: str, by: int) -> None:
        self._db.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
            (name, by),
        )

    def save_document(self, name: str, body: bytes) -> None:
        """Keep a small document (the last applied config) across restarts, fsynced."""
        with self._lock, self._errors:
            self._db.execute(
                "INSERT INTO documents (name, body) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET body = excluded.body",
                (name, body),
            )

    def load_document(self, name: str) -> bytes | None:
        with self._lock, self._errors:
            row = self._db.execute("SELECT body FROM documents WHERE name = ?", (name,)).fetchone()
        return bytes(row[0]) if row else None

    def next_birth(self) -> int:
        """A birth counter that increases at every gateway start, kept across restarts."""
        with self._lock, self._errors:
            self._db.execute("BEGIN IMMEDIATE")
            self._bump("birth", 1)
            row = self._db.execute("SELECT value FROM counters WHERE name = 'birth'").fetchone()
            self._db.execute("COMMIT")
        return int(row[0])

    def check_writable(self) -> None:
        """Take the file's write lock and let it go, writing nothing (the watchdog's probe).

        Blocks while another writer holds the lock (up to SQLite's 5 s busy
        timeout, then raises); a hung or locked outbox so stops the pings.
        """
        with self._lock, self._errors:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("ROLLBACK")

    def fits(self, incoming_bytes: int) -> bool:
        """Whether ``incoming_bytes`` more payload stay within ``max_bytes`` (no I/O)."""
        return self._depth.bytes + incoming_bytes <= self.max_bytes

    def put(self, items: list[tuple[str, bytes, int]], now_ms: int) -> PutResult:
        """Store ``(batch_id, payload, readings)`` items in one fsynced transaction.

        Raises OutboxFullError (nothing stored, nothing counted: the caller
        holds the items) under the ``refuse`` policy when they do not fit.
        """
        if not items:
            return PutResult(0, 0, 0)
        incoming = sum(len(payload) for _, payload, _ in items)
        with self._lock, self._errors:
            depth = self._depth
            dropped_batches = dropped_readings = dropped_bytes = 0
            overflow = depth.bytes + incoming - self.max_bytes
            if overflow > 0 and self.full_policy == "refuse":
                refused = sum(r for _, _, r in items)
                raise OutboxFullError(
                    f"outbox {self.path} holds {depth.bytes} of {self.max_bytes} bytes; "
                    f"refused {refused} readings"
                )
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if overflow > 0:
                    for rowid, readings, size in self._db.execute(
                        "SELECT id, readings, length(payload) FROM batches ORDER BY id"
                    ).fetchall():
                        if dropped_bytes >= overflow:
                            break
                        self._db.execute("DELETE FROM batches WHERE id = ?", (rowid,))
                        dropped_batches += 1
                        dropped_readings += readings
                        dropped_bytes += size
                    self._bump("dropped_readings", dropped_readings)
                    self._bump("dropped_batches", dropped_batches)
                stored = stored_readings = stored_bytes = 0
                for bid, payload, readings in items:
                    cursor = self._db.execute(
                        "INSERT INTO batches (batch_id, payload, readings, created_ms) "
                        "VALUES (?, ?, ?, ?) ON CONFLICT (batch_id) DO NOTHING",
                        (bid, payload, readings, now_ms),
                    )
                    if cursor.rowcount == 1:  # 0: a batch id already stored
                        stored += 1
                        stored_readings += readings
                        stored_bytes += len(payload)
                self._db.execute("COMMIT")
            except BaseException:
                # SQLite ends the transaction itself on some errors (a full disk).
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            self._depth = OutboxDepth(
                batches=depth.batches + stored - dropped_batches,
                readings=depth.readings + stored_readings - dropped_readings,
                bytes=depth.bytes + stored_bytes - dropped_bytes,
            )
            if dropped_readings:
                totals = self._totals
                self._totals = OutboxTotals(
                    refused_readings=totals.refused_readings,
                    dropped_readings=totals.dropped_readings + dropped_readings,
                )
        return PutResult(stored, dropped_batches, dropped_readings)

    def due(self, now_ms: int, *, resend_after_ms: int, limit: int) -> list[OutboxItem]:
        """Oldest batches never sent, or sent longer than ``resend_after_ms`` ago."""
        with self._lock, self._errors:
            rows = self._db.execute(
                "SELECT batch_id, payload, readings, attempts FROM batches "
                "WHERE sent_ms IS NULL OR sent_ms <= ? ORDER BY id LIMIT ?",
                (now_ms - resend_after_ms, limit),
            ).fetchall()
        return [OutboxItem(r[0], r[1], r[2], r[3]) for r in rows]

    def mark_sent(self, batch_ids: list[str], now_ms: int) -> None:
        """Record a publish, without an fsync: after a crash everything is resent anyway."""
        if not batch_ids:
            return
        with self._lock, self._errors, self._relaxed():
            self._db.executemany(
                "UPDATE batches SET sent_ms = ?, attempts = attempts + 1 WHERE batch_id = ?",
                [(now_ms, bid) for bid in batch_ids],
            )

    @contextmanager
    def _relaxed(self) -> Iterator[None]:
        """synchronous=NORMAL for writes whose loss only causes a resend.

        In WAL mode NORMAL skips the fsync at commit yet cannot corrupt the file.
        """
        self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            yield
        finally:
            self._db.execute("PRAGMA synchronous=FULL")

    def reset_sent(self) -> None:
        """After a reconnect: everything unacked is due again at once."""
        with self._lock, self._errors:
            self._db.execute("UPDATE batches SET sent_ms = NULL WHERE sent_ms IS NOT NULL")

    def ack(self, batch_ids: list[str], digests: list[str]) -> AckResult:
        """Delete each acked batch whose stored payload has the acked digest.

        ``digests`` runs parallel to ``batch_ids``. A held id acked with
        another digest, or with none (an ack from an ingest that sends no
        digests: upgrade ingest before the gateways), is kept and counted in
        ``mismatched``; it is resent and acked properly once committed.
        """
        if not batch_ids:
            return AckResult(0, 0, 0)
        # An id may come twice in one ack (a spoof and the real batch committed
        # in one group): any of its digests may match.
        named: dict[str, set[str]] = {}
        for bid, digest in zip(batch_ids, digests, strict=False):
            named.setdefault(bid, set()).add(digest)
        # Not fsynced: an ack lost to a power cut means a resend, which ingest
        # drops as a duplicate batch.
        with self._lock, self._errors, self._relaxed():
            self._db.execute("BEGIN IMMEDIATE")
            removed_batches = removed_readings = removed_bytes = mismatched = 0
            for bid in dict.fromkeys(batch_ids):
                row = self._db.execute(
                    "SELECT id, payload, readings FROM batches WHERE batch_id = ?", (bid,)
                ).fetchone()
                if row is None:
                    continue
                rowid, payload, readings = row
                if payload_digest(payload) not in named.get(bid, ()):
                    mismatched += 1
                    continue
                self._db.execute("DELETE FROM batches WHERE id = ?", (rowid,))
                removed_batches += 1
                removed_readings += readings
                removed_bytes += len(payload)
            self._db.execute("COMMIT")
            depth = self._depth
            self._depth = OutboxDepth(
                batches=depth.batches - removed_batches,
                readings=depth.readings - removed_readings,
                bytes=depth.bytes - removed_bytes,
            )
        return AckResult(removed_batches, removed_readings, mismatched)

    # -- commands and their reports ---------------------------------------------------

    def reports_pending(self) -> int:
        """Reports stored and not yet acked (no I/O)."""
        return self._reports_pending

    def load_commands(self) -> list[Held]:
        """Every command held or remembered, as stored."""
        with self._lock, self._errors:
            rows = self._db.execute(
                "SELECT command_id, device_id, body, state, expires_ms, delivered_ms, deadline_ms "
                "FROM commands"
            ).fetchall()
        held = []
        for command_id, device_id, body, state, expires_ms, delivered_ms, deadline_ms in rows:
            # Written by this gateway after its own check: decoding cannot refuse it.
            command = decode_command(bytes(body)) if body else None
            held.append(
                Held(
                    command_id=command_id,
                    device_id=device_id,
                    command=command,
                    state=state,
                    expires_ms=expires_ms,
                    delivered_ms=delivered_ms,
                    deadline_ms=deadline_ms,
                )
            )
        return held

    def apply_changes(self, changes: list[Change], now_ms: int) -> int:
        """Store each command's new record and its report in one fsynced transaction.

        A report already stored (by report id) is kept as it is. Returns the
        reports added.
        """
        if not changes:
            return 0
        added = 0
        with self._lock, self._errors:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for change in changes:
                    h = change.held
                    self._db.execute(
                        "INSERT INTO commands (command_id, device_id, body, state, expires_ms, "
                        "delivered_ms, deadline_ms) VALUES (?, ?, ?, ?, ?, ?, ?) "
                        "ON CONFLICT (command_id) DO UPDATE SET state = excluded.state, "
                        "delivered_ms = excluded.delivered_ms, deadline_ms = excluded.deadline_ms",
                        (
                            h.command_id,
                            h.device_id,
                            encode_command(h.command) if h.command is not None else b"",
                            h.state,
                            h.expires_ms,
                            h.delivered_ms,
                            h.deadline_ms,
                        ),
                    )
                    if change.report is not None:
                        cursor = self._db.execute(
                            "INSERT INTO reports (report_id, body, created_ms) VALUES (?, ?, ?) "
                            "ON CONFLICT (report_id) DO NOTHING",
                            (
                                change.report.report_id,
                                _REPORT_ENCODER.encode(change.report),
                                now_ms,
                            ),
                        )
                        added += cursor.rowcount
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            self._reports_pending += added
        return added

    def prune_commands(self, command_ids: list[str]) -> None:
        """Forget final commands (not fsynced: a pruned tombstone coming back is harmless)."""
        if not command_ids:
            return
        with self._lock, self._errors, self._relaxed():
            self._db.executemany(
                "DELETE FROM commands WHERE command_id = ?", [(cid,) for cid in command_ids]
            )

    def due_reports(self, now_ms: int, *, resend_after_ms: int, limit: int) -> list[DueReport]:
        """Oldest reports never sent, or sent longer than ``resend_after_ms`` ago."""
        with self._lock, self._errors:
            rows = self._db.execute(
                "SELECT body, sent_ms FROM reports WHERE sent_ms IS NULL OR sent_ms <= ? "
                "ORDER BY id LIMIT ?",
                (now_ms - resend_after_ms, limit),
            ).fetchall()
        return [DueReport(_REPORT_DECODER.decode(body), sent is not None) for body, sent in rows]

    def mark_reports_sent(self, report_ids: list[str], now_ms: int) -> None:
        """Record a publish, without an fsync: after a crash everything is resent anyway."""
        if not report_ids:
            return
        with self._lock, self._errors, self._relaxed():
            self._db.executemany(
                "UPDATE reports SET sent_ms = ? WHERE report_id = ?",
                [(now_ms, rid) for rid in report_ids],
            )

    def reset_reports_sent(self) -> None:
        """After a reconnect: every unacked report is due again at once."""
        with self._lock, self._errors:
            self._db.execute("UPDATE reports SET sent_ms = NULL WHERE sent_ms IS NOT NULL")

    def ack_reports(self, report_ids: list[str]) -> int:
        """Delete the acked reports; an id not held is ignored. Returns how many left."""
        if not report_ids:
            return 0
        # Not fsynced: an ack lost to a power cut means a resend, stored once by ingest.
        with self._lock, self._errors, self._relaxed():
            self._db.execute("BEGIN IMMEDIATE")
            removed = 0
            for rid in dict.fromkeys(report_ids):
                removed += self._db.execute(
                    "DELETE FROM reports WHERE report_id = ?", (rid,)
                ).rowcount
            self._db.execute("COMMIT")
            self._reports_pending -= removed
        return removed
