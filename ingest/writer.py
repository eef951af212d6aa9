"""Database adapter of ingest: commits groups of batches exactly once.

``BatchWriter.commit`` writes a group of batches in ONE transaction:

1. records each batch id with the digest of its payload in
   ``{schema}.ingested_batches`` (``ON CONFLICT DO NOTHING RETURNING``): an
   (id, digest) already there was committed before, by this worker or
   another, and is only acked again, not rewritten. Another payload under a
   known id is not the same batch: it is committed (and acked) on its own. Two workers
   holding the same resent batch serialise on that row lock; ids are
   inserted sorted so two groups never lock in opposite orders;
2. per device type, a binary COPY (``ingest.copyformat``, with the stage
   columns' exact types) into a temporary stage table (created once per
   connection, again when the type's metrics change; ``ON COMMIT DELETE
   ROWS``) holding the data table's own columns, then ``INSERT INTO
   readings_{type}_data SELECT ... FROM stage`` (``keyed_insert``). Device
   ids become their integer keys (``device_keys``, loaded with the ownership
   map, a device missing from it looked up in the same transaction) and
   the receive time a delay after ``ts`` in numpy before the COPY, so the
   server maps nothing per row.
   The key (device_key, ts, seq) includes the time column, so a reading
   stored before (by another batch, or a batch whose id was pruned) is
   never stored twice: the plain INSERT,
   tried first inside a savepoint, fails on it as a whole, and the rows go
   in again with ``ON CONFLICT DO NOTHING``. Resent batches are caught by
   step 1, so duplicates are rare here, and the plain statement is about
   twice as fast on a hypertable (no speculative insertion: ~155k vs ~83k
   rows/s measured here with bench/bench_ingest.py's data);
3. the rejects of the new batches: per reading (gateway, device, batch id,
   reason, detail) and whole poison messages (reason, detail, the head of
   the raw payload, at most REJECT_RAW_MAX_BYTES, and its size);
4. ``device_state``: last seen, last seq, boot id, readings count (devices
   upserted in id order, for the same lock-order reason).

``BatchWriter.write_states`` stores gateway state messages in a small
transaction of their own: for each state, in arrival order per gateway, an
upsert of ``gateway_status`` that replaces the stored row only with a newer
state (see ``write_states``), a ``gateway_status_history`` row (``ON
CONFLICT DO NOTHING``: a retained state received again is stored once), and
the refused ones as rejects, recorded under poison keys like refused batches;
the rejects a gateway reported with a state go into ``rejects`` too, one
row per (device, reason) with its count, at the state's time, once however
often the state comes. A revoked gateway's states are ignored, but the final
one provisioning publishes, which sets it offline.

It also keeps the device -> gateway ownership map (reloaded every
``ownership_refresh_s``, and at once for devices it does not know), writes
worker stats rows and prunes old batch ids.

The connection and its error map are ``adapters.database``'s: an
unreachable, failing or interrupted server is ``DatabaseUnavailableError``
(retry later); a group the server refuses for its data (constraint or data
errors) is ``RefusedByDatabaseError`` (an InputError: poison); a missing
table is ``SchemaError``. ``interrupt`` (from another thread) cuts a hung
connection so the blocked call fails fast. Each connection also asks the
server to end its transaction when this worker vanishes (a partition, a dead
host: ``server_dead_client_settings``), so the row locks of a half-done
commit never hold another worker's commit of the same resent batches.

Which batches to group, retry timing, acks and metrics are the service's
business; rows are built by ``ingest.rows``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from adapters.database import Connection, Cursor, Database, insert_unless_duplicate, sql
from contracts.catalog import DEVICE_TYPES, DeviceType
from contracts.errors import RefusedByDatabaseError
from contracts.schema import (
    DEVICE_KEYS,
    KEYED_COLUMNS,
    SQL_TYPES,
    check_schema_name,
    readings_data_table,
)
from ingest.copyformat import CopyColumn, encode_copy_binary
from ingest.prepare import GoodBatch, GoodState, PoisonBatch, StateItem, WriteItem, readings_of
from ingest.rows import DeviceSummary, TypeRows, concat_rows, merge_summaries
from ingest.states import StateRow, in_lock_order

# After a plain INSERT of a type's rows hit a duplicate, that type's rows go
# straight to INSERT ... ON CONFLICT for this long: a fleet that really sends
# duplicates pays the slower statement once, not both statements every commit.
CONFLICT_MEMORY_S: Final = 60.0
# A device the registry did not know is looked up again after this long when
# it shows up again: a technician registering a device sees its readings
# stored within seconds, while a flood of unknown ids costs one small query
# per id every 5 s, not one per batch.
UNKNOWN_RETRY_S: Final = 5.0
# Bytes of a refused payload kept in ``rejects.raw`` (its full size goes to
# ``raw_bytes``). 64 KiB holds a whole batch of the gateway's default size
# (500 rows, ~50 KB), so a batch refused for its content can be replayed
# from the table, and any state, ack or device message whole (states are
# ~0.5 KB); beyond that the head shows what the message was. Without the
# bound one 8 MiB message made an 8 MiB row, and a flood of them filled the
# disk at the broker's rate.
REJECT_RAW_MAX_BYTES: Final = 64 * 1024


@dataclass
class StateOutcome:
    """What ``write_states`` did."""

    stored: list[GoodState] = field(default_factory=list)
    history: int = 0  # history rows inserted (a repeated state adds none)
    gateway_rejects: int = 0  # reported reject rows inserted (a repeated state adds none)
    refused: list[PoisonBatch] = field(default_factory=list)  # new rejects, not repeats
    rejects: Counter[str] = field(default_factory=Counter)  # rejects rows by reason
    # States of revoked gateways (but their final one), not stored: late or replayed.
    ignored: list[GoodState] = field(default_factory=list)


@dataclass
class CommitOutcome:
    """What a commit did. Every item of the group is either written or replayed."""

    written: list[WriteItem] = field(default_factory=list)
    replayed: list[WriteItem] = field(default_factory=list)  # committed before, or repeated
    readings: int = 0  # rows inserted into readings tables
    duplicates: int = 0  # staged rows that were already stored
    rejects: Counter[str] = field(default_factory=Counter)  # rejects rows by reason


@dataclass(frozen=True, slots=True)
class StatsRow:
    """One row of {schema}.ingest_stats: a worker's counts over one interval."""

    worker_id: str
    ts_ms: int
    interval_s: float
    readings: int
    duplicates: int
    batches: int
    replayed: int
    poison: int
    rejects: int
    commits: int
    commit_p50_ms: float | None
    commit_p95_ms: float | None
    lag_p95_ms: float | None
    queue_depth: int


def _stage_table(dtype: DeviceType) -> str:
    return f"ingest_stage_{dtype.name}"


def _metric_types(dtype: DeviceType) -> list[tuple[str, str]]:
    return [(m.name, SQL_TYPES[m.kind]) for m in dtype.metrics]


def _create_stage_table(conn: Connection[Any], dtype: DeviceType) -> None:
    """The temporary stage table of ``dtype`` on this connection (emptied at each commit).

    Dropped first: a metric added to the catalog while the connection was
    open (``cityhub db migrate`` added its column) needs a new stage table.
    """
    columns = ", ".join(f"{n} {t}" for n, t in _metric_types(dtype))
    conn.execute(f"DROP TABLE IF EXISTS pg_temp.{_stage_table(dtype)}")
    conn.execute(
        f"CREATE TEMP TABLE {_stage_table(dtype)} (ts timestamptz, seq bigint, "
        f"device_key integer, recv_delay_ms integer, {columns}) ON COMMIT DELETE ROWS"
    )


def keyed_insert(schema: str, dtype: DeviceType, stage: str) -> str:
    """INSERT ... SELECT from the stage table into the type's data table, column for column.

    The stage holds the data table's own columns: device keys and receive
    delays are computed by ``copy_columns`` from the key map the worker
    loads with the ownership map, so the server joins nothing per row.
    """
    columns = ", ".join([*KEYED_COLUMNS, *dtype.metric_names])
    return (
        f"INSERT INTO {schema}.{readings_data_table(dtype.name)} ({columns}) "
        f"SELECT {columns} FROM {stage}"
    )


# ``recv_delay_ms`` is an int4: a delay past its range is clamped, as the
# schema's ``recv_delay_ms`` function does for rows written through the view.
_INT4_MIN: Final = -(2**31)
_INT4_MAX: Final = 2**31 - 1


def copy_columns(rows: TypeRows, keys: NDArray[np.int64]) -> list[CopyColumn]:
    """The stage table's columns, in its order, with its exact types.

    ``keys[i]`` is the device key of ``rows.device_ids[i]``.
    """
    columns = [
        CopyColumn("timestamptz", rows.ts_ms),
        CopyColumn("bigint", rows.seq),
        CopyColumn("integer", keys[rows.device]),
        CopyColumn("integer", np.clip(rows.recv_ms - rows.ts_ms, _INT4_MIN, _INT4_MAX)),
    ]
    for name, sql_type in _metric_types(DEVICE_TYPES[rows.device_type]):
        values = rows.values[name]
        missing = np.isnan(values)
        columns.append(CopyColumn(sql_type, values, missing if missing.any() else None))
    return columns


def server_dead_client_settings(dead_client_s: float) -> dict[str, str]:
    """Session settings that make the server end this connection's transaction when we vanish.

    A worker cut off from the network mid-transaction (host down, a
    partition) leaves its backend holding the transaction's row locks, among
    them the ``ingested_batches`` rows of its batches; another worker
    committing the same batches, resent by their gateways, waits on those
    locks. The server notices a silent peer only through TCP keepalives,
    by default after two hours. With these, the backend gives up within
    about ``dead_client_s``: waiting for our next statement inside a
    transaction (``idle_in_transaction_session_timeout``), or waiting for
    data (COPY) with keepalive probes unanswered (first after a third, then
    two more a third apart), or with its own data unacknowledged
    (``tcp_user_timeout``). The client cuts its own calls after the same
    time (the service's commit timeout), so a healthy commit never meets them.
    """
    third_s = max(1, math.ceil(dead_client_s / 3))
    return {
        "idle_in_transaction_session_timeout": f"{max(1, round(dead_client_s * 1000))}ms",
        "tcp_keepalives_idle": str(third_s),
        "tcp_keepalives_interval": str(third_s),
        "tcp_keepalives_count": "2",
        "tcp_user_timeout": f"{max(1, round(dead_client_s * 1000))}ms",
    }


def set_dead_client_limits(conn: Connection[Any], dead_client_s: float) -> None:
    """Give a new connection the server's limits of ``server_dead_client_settings``."""
    for name, value in server_dead_client_settings(dead_client_s).items():
        conn.execute(sql.SQL("SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))


class BatchWriter:
    """One database connection of one ingest worker. Thread-safe (one call at a time)."""

    def __init__(
        self,
        *,
        url: str,
        schema: str,
        worker_id: str,
        connect_timeout_s: float = 5.0,
        ownership_refresh_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        dead_client_s: float = 0.0,
    ) -> None:
        self.url = url
        self.schema = check_schema_name(schema)
        self.worker_id = worker_id
        self.connect_timeout_s = connect_timeout_s
        self.ownership_refresh_s = ownership_refresh_s
        self.clock = clock
        self.dead_client_s = dead_client_s
        self._db = Database(
            url=url,
            schema=self.schema,
            application_name=f"cityhub-ingest-{worker_id}",
            connect_timeout_s=connect_timeout_s,
            on_connect=self._stage_catalog,
        )
        # Device type -> the metrics of its stage table on the current connection.
        self._staged: dict[str, tuple[str, ...]] = {}
        # Replaced, never mutated: readers in other threads keep a consistent snapshot.
        self._owners: Mapping[str, str | None] = {}
        self._owners_loaded_s: float | None = None
        # Device id -> its key in the readings tables (``device_keys``): keys
        # never change, so entries are only ever added; loaded with the owners.
        self._keys: Mapping[str, int] = {}
        self._unknown_since: dict[str, float] = {}
        self._conflict_seen_s: dict[str, float] = {}  # device type -> last duplicate

    # -- connection ------------------------------------------------------------

    @property
    def connects(self) -> int:
        """Successful connections so far, for metrics and tests."""
        return self._db.connects

    def connect(self) -> None:
        """Connect now (otherwise the first call does); DatabaseUnavailableError if it can't."""
        self._db.connect()

    def close(self) -> None:
        self._db.close()

    def interrupt(self) -> None:
        """Cut the connection under a call that hangs; safe from any thread."""
        self._db.interrupt()

    def _stage_catalog(self, conn: Connection[Any]) -> None:
        """A new connection: the server's dead-client limits, a stage table per device type."""
        if self.dead_client_s > 0:
            set_dead_client_limits(conn, self.dead_client_s)
        self._staged = {}
        for dtype in DEVICE_TYPES.values():
            _create_stage_table(conn, dtype)
            self._staged[dtype.name] = dtype.metric_names

    def _stage_new_shapes(self, conn: Connection[Any], items: Iterable[WriteItem]) -> None:
        """Stage tables for types added, or given metrics, since the connection was opened.

        The catalog may grow while ingest runs (a type or metric added, then
        ``cityhub db migrate``); a dictionary lookup per type per commit
        notices it, so readings of the new type or metric are stored without
        a restart.
        """
        for item in items:
            if not isinstance(item, GoodBatch):
                continue
            for name in item.rows.tables:
                dtype = DEVICE_TYPES[name]
                if self._staged.get(name) != dtype.metric_names:
                    _create_stage_table(conn, dtype)
                    self._staged[name] = dtype.metric_names

    # -- ownership -------------------------------------------------------------

    @property
    def owners(self) -> Mapping[str, str | None]:
        """The current device -> gateway map (None: unknown or revoked); a snapshot."""
        return self._owners

    def read_type_entries(self) -> list[tuple[str, str]]:
        """``(device type, its catalog entry as JSON)`` as ``cityhub db migrate`` recorded them."""
        with self._db.session("reading the device types' catalog entries") as conn:
            rows = conn.execute(
                f"SELECT device_type, entry::text FROM {self.schema}.device_types"
                " WHERE entry IS NOT NULL ORDER BY device_type"
            ).fetchall()
        return [(str(name), str(entry)) for name, entry in rows]

    def refresh_owners(self, devices: Collection[str] = ()) -> bool:
        """Reload the map if it is older than the refresh interval; else look up unknown devices.

        ``devices`` are the ids a caller found unknown or not owned; those not
        in the map, or unknown for more than UNKNOWN_RETRY_S, are looked up.
        Returns whether the map changed.
        """
        with self._db.session("ownership") as conn:
            now = self.clock()
            owned = (
                f"SELECT d.device_id, d.gateway_id, k.device_key FROM {self.schema}.devices d "
                f"JOIN {self.schema}.gateways g ON g.gateway_id = d.gateway_id "
                f"LEFT JOIN {self.schema}.{DEVICE_KEYS} k ON k.device_id = d.device_id "
                "WHERE d.status = 'active' AND g.status = 'active'"
            )
            if self._owners_loaded_s is None or now - self._owners_loaded_s >= (
                self.ownership_refresh_s
            ):
                rows = conn.execute(owned).fetchall()
                old = self._owners
                self._owners = {str(d): str(g) for d, g, _ in rows}
                self._learn_keys((str(d), k) for d, _, k in rows)
                self._owners_loaded_s = now
                self._unknown_since = {}
                return dict(old) != self._owners
            missing = [
                d
                for d in devices
                if self._owners.get(d) is None
                and (
                    d not in self._unknown_since or now - self._unknown_since[d] >= UNKNOWN_RETRY_S
                )
            ]
            if not missing:
                return False
            rows = conn.execute(f"{owned} AND d.device_id = ANY(%s)", (missing,)).fetchall()
            found = {str(d): g for d, g, _ in rows}
            self._learn_keys((str(d), k) for d, _, k in rows)
            updated: dict[str, str | None] = dict(self._owners)
            for device_id in missing:
                owner = found.get(device_id)
                updated[device_id] = None if owner is None else str(owner)
                if owner is None:
                    self._unknown_since[device_id] = now
            changed = any(updated[d] != self._owners.get(d) for d in missing)
            self._owners = updated
            return changed

    def _learn_keys(self, pairs: Iterable[tuple[str, int | None]]) -> None:
        new = {d: int(k) for d, k in pairs if k is not None and d not in self._keys}
        if new:
            self._keys = {**self._keys, **new}

    def _keys_of(self, cur: Cursor[Any], rows: TypeRows) -> NDArray[np.int64]:
        """The device key of each of ``rows.device_ids`` (-1 for a label no row uses).

        A device not in the map is looked up. Every registered device has a
        key (``device_keys``, migration 22); a row of one without is refused
        like a constraint violation of the group, never stored under a
        made-up key.
        """
        labels = rows.device_ids
        used = [labels[i] for i in np.unique(rows.device).tolist()]
        missing = [d for d in used if d not in self._keys]
        if missing:
            cur.execute(
                f"SELECT device_id, device_key FROM {self.schema}.{DEVICE_KEYS} "
                "WHERE device_id = ANY(%s)",
                (missing,),
            )
            self._learn_keys((str(d), k) for d, k in cur.fetchall())
            unknown = [d for d in missing if d not in self._keys]
            if unknown:
                raise RefusedByDatabaseError(
                    f"device {unknown[0]!r} has no key in {DEVICE_KEYS}: not registered"
                )
        keys = self._keys
        return np.fromiter((keys.get(d, -1) for d in labels), dtype=np.int64, count=len(labels))

    # -- commit ----------------------------------------------------------------

    def commit(self, items: Sequence[WriteItem]) -> CommitOutcome:
        """Write ``items`` in one transaction; see the module docstring for the steps."""
        outcome = CommitOutcome()
        unique: dict[str, WriteItem] = {}
        for item in items:
            if item.key in unique:
                outcome.replayed.append(item)  # the same message twice in one group
            else:
                unique[item.key] = item
        with self._db.session("commit") as conn:
            self._stage_new_shapes(conn, unique.values())
            with conn.transaction(), conn.cursor() as cur:
                new = self._claim_keys(cur, unique)
                for key in sorted(unique):
                    (outcome.written if key in new else outcome.replayed).append(unique[key])
                goods = [i for i in outcome.written if isinstance(i, GoodBatch)]
                self._write_readings(cur, goods, outcome)
                self._write_rejects(cur, outcome.written, outcome.rejects)
                self._upsert_device_state(
                    cur, merge_summaries(s for g in goods for s in g.rows.devices)
                )
        return outcome

    def _claim_keys(self, cur: Cursor[Any], unique: Mapping[str, WriteItem]) -> set[str]:
        """Record the items in ``ingested_batches``; returns the keys not recorded before."""
        keys = sorted(unique)
        records = [unique[k].record for k in keys]
        cur.execute(
            f"INSERT INTO {self.schema}.ingested_batches (batch_id, digest, gateway_id, readings) "
            "SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::int[]) ORDER BY 1, 2 "
            "ON CONFLICT DO NOTHING RETURNING batch_id, digest",
            (
                [r[0] for r in records],
                [r[1] for r in records],
                [unique[k].gateway_id for k in keys],
                [readings_of(unique[k]) for k in keys],
            ),
        )
        return {f"{row[0]}\0{row[1]}" for row in cur.fetchall()}

    def _write_readings(
        self, cur: Cursor[Any], goods: Sequence[GoodBatch], outcome: CommitOutcome
    ) -> None:
        parts: dict[str, list[TypeRows]] = {}
        for good in goods:
            for name, rows in good.rows.tables.items():
                if rows.row_count:
                    parts.setdefault(name, []).append(rows)
        for name in sorted(parts):
            rows = concat_rows(parts[name])
            dtype = DEVICE_TYPES[name]
            stage = _stage_table(dtype)
            columns = ", ".join([*KEYED_COLUMNS, *dtype.metric_names])
            keys = self._keys_of(cur, rows)
            data = encode_copy_binary(copy_columns(rows, keys), rows.row_count)
            with cur.copy(f"COPY {stage} ({columns}) FROM STDIN (FORMAT BINARY)") as copy:
                copy.write(data)
            insert = keyed_insert(self.schema, dtype, stage)
            inserted = self._insert_staged(cur, name, insert)
            outcome.readings += inserted
            outcome.duplicates += rows.row_count - inserted

    def _insert_staged(self, cur: Cursor[Any], device_type: str, insert: str) -> int:
        """Plain INSERT in a savepoint; on a duplicate key, again with ON CONFLICT DO NOTHING."""
        now = self.clock()
        seen = self._conflict_seen_s.get(device_type)
        if seen is None or now - seen >= CONFLICT_MEMORY_S:
            inserted = insert_unless_duplicate(cur, insert)
            if inserted is not None:
                return inserted
            self._conflict_seen_s[device_type] = now
        cur.execute(f"{insert} ON CONFLICT DO NOTHING")
        return max(cur.rowcount, 0)

    def _write_rejects(
        self, cur: Cursor[Any], fresh: Sequence[WriteItem], rejects: Counter[str]
    ) -> None:
        records: list[
            tuple[str | None, str | None, str | None, str, str, bytes | None, int | None]
        ] = []
        for item in fresh:
            if isinstance(item, PoisonBatch):
                detail = _text(item.detail)
                raw = item.payload[:REJECT_RAW_MAX_BYTES]
                records.append(
                    (
                        item.gateway_id,
                        None,
                        item.batch_id,
                        item.reason,
                        detail,
                        raw,
                        len(item.payload),
                    )
                )
                continue
            for r in item.rows.rejects:
                detail = _text(f"seq {r.seq} ts_ms {r.ts_ms}: {r.detail}")
                records.append(
                    (item.gateway_id, r.device_id, item.batch_id, r.reason, detail, None, None)
                )
        if not records:
            return
        with cur.copy(
            f"COPY {self.schema}.rejects (gateway_id, device_id, batch_id, reason, detail, raw, "
            "raw_bytes) FROM STDIN (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["text", "text", "text", "text", "text", "bytea", "int8"])
            for record in records:
                copy.write_row(record)
        rejects.update(r[3] for r in records)

    def _upsert_device_state(self, cur: Cursor[Any], summaries: Sequence[DeviceSummary]) -> None:
        if not summaries:
            return
        s = self.schema
        # The newest reading wins last_seen / last_seq / boot_id: batches of one
        # device can commit out of order (resends, several workers).
        cur.execute(
            f"""INSERT INTO {s}.device_state AS d
                (device_id, last_seen, last_seq, boot_id, readings, updated_at)
            SELECT u.device_id, timestamptz 'epoch' + u.ts_ms * interval '1 millisecond',
                u.seq, u.boot_id, u.n, now()
            FROM unnest(%s::text[], %s::bigint[], %s::bigint[], %s::text[], %s::bigint[])
                AS u (device_id, ts_ms, seq, boot_id, n)
            ORDER BY u.device_id
            ON CONFLICT (device_id) DO UPDATE SET
                last_seq = CASE WHEN EXCLUDED.last_seen >= d.last_seen
                    THEN EXCLUDED.last_seq ELSE d.last_seq END,
                boot_id = CASE WHEN EXCLUDED.last_seen >= d.last_seen
                    THEN coalesce(EXCLUDED.boot_id, d.boot_id) ELSE d.boot_id END,
                last_seen = greatest(d.last_seen, EXCLUDED.last_seen),
                readings = d.readings + EXCLUDED.readings,
                updated_at = now()""",
            (
                [x.device_id for x in summaries],
                [x.last_ts_ms for x in summaries],
                [x.last_seq for x in summaries],
                [x.boot_id for x in summaries],
                [x.readings for x in summaries],
            ),
        )

    # -- gateway states --------------------------------------------------------

    def write_states(self, items: Sequence[StateItem]) -> StateOutcome:
        """Store state messages and refused ones in one transaction.

        A death Will (``row.will``, timed when ingest received it) takes
        ``_UPSERT_WILL``: the session's death at the time it was noticed,
        stored once however often its retained copy comes again. Any other
        state replaces the stored row of its gateway when it is newer:
        a higher ``birth`` (a later session), or the same birth and a later
        ``ts_ms``, or the same birth and ``offline`` over ``online``. The last
        case is the Will of a gateway too old to mark it as one, carrying its
        connect time: it ends its session's "online" but leaves the figures
        and the time of the newest state in place. So a
        state that arrives late never moves the row back, the Will is applied
        whenever it comes, and a gateway that reconnects in the same session
        is online again with its next state. Applying the same state twice
        changes nothing.

        A revoked gateway (the registry's ``gateways.status``) can publish no
        more: its final state is provisioning's (``row.revoked``,
        ``_UPSERT_REVOKED``: offline whatever the birth), and any other state
        of it is a late or replayed copy, returned as ``ignored``, not stored.
        """
        outcome = StateOutcome()
        goods = [i for i in items if isinstance(i, GoodState)]
        poison = {i.key: i for i in items if isinstance(i, PoisonBatch)}
        s = self.schema
        with self._db.session("states") as conn, conn.transaction(), conn.cursor() as cur:
            revoked = _revoked_gateways(cur, s, {g.row.gateway_id for g in goods})
            outcome.ignored = [
                g for g in goods if g.row.gateway_id in revoked and not g.row.revoked
            ]
            goods = [g for g in goods if g.row.gateway_id not in revoked or g.row.revoked]
            rows = in_lock_order(g.row for g in goods)
            history: list[StateRow] = []
            for row in rows:
                if row.revoked:
                    cur.execute(_UPSERT_REVOKED.format(s=s), _state_params(row))
                    kept = cur.fetchone()
                    if kept is not None:  # its history row: offline, the outbox as last known
                        depth, readings, refused, dropped = (int(v) for v in kept)
                        history.append(
                            dataclasses.replace(
                                row,
                                outbox_depth=depth,
                                outbox_readings=readings,
                                outbox_refused_readings=refused,
                                outbox_dropped_readings=dropped,
                            )
                        )
                    continue
                if not row.will:
                    cur.execute(_UPSERT_STATE.format(s=s), _state_params(row))
                    history.append(row)
                    continue
                cur.execute(_UPSERT_WILL.format(s=s), (*_state_params(row), row.retained))
                applied = cur.fetchone()
                if applied is not None:  # its death, at the time stored
                    history.append(dataclasses.replace(row, ts_ms=int(applied[0])))
            if history:
                cur.execute(
                    _INSERT_STATE_HISTORY.format(s=s),
                    (
                        [r.ts_ms for r in history],
                        [r.gateway_id for r in history],
                        [r.status for r in history],
                        [r.outbox_depth for r in history],
                        [r.outbox_readings for r in history],
                        [r.readings_per_s for r in history],
                        [r.devices_online for r in history],
                        [r.outbox_refused_readings for r in history],
                        [r.outbox_dropped_readings for r in history],
                    ),
                )
                outcome.history = max(cur.rowcount, 0)
            reported = _reported_rejects(r for r in rows if not r.will)
            if reported:
                cur.execute(_INSERT_REPORTED_REJECTS.format(s=s), reported)
                outcome.gateway_rejects = max(cur.rowcount, 0)
            if poison:
                new = self._claim_keys(cur, poison)
                outcome.refused = [poison[k] for k in sorted(poison) if k in new]
                self._write_rejects(cur, outcome.refused, outcome.rejects)
        outcome.stored = goods
        return outcome

    # -- housekeeping ----------------------------------------------------------

    def write_stats(self, row: StatsRow) -> None:
        with self._db.session("stats") as conn:
            conn.execute(
                f"""INSERT INTO {self.schema}.ingest_stats (ts, worker_id, interval_s, readings,
                    duplicates, batches, replayed, poison, rejects, commits, commit_p50_ms,
                    commit_p95_ms, lag_p95_ms, queue_depth)
                VALUES (timestamptz 'epoch' + %s * interval '1 millisecond',
                    %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
                ON CONFLICT DO NOTHING""",
                (
                    row.ts_ms,
                    row.worker_id,
                    row.interval_s,
                    row.readings,
                    row.duplicates,
                    row.batches,
                    row.replayed,
                    row.poison,
                    row.rejects,
                    row.commits,
                    row.commit_p50_ms,
                    row.commit_p95_ms,
                    row.lag_p95_ms,
                    row.queue_depth,
                ),
            )

    def prune_ingested(self, older_than_s: float) -> int:
        """Forget batch ids committed more than ``older_than_s`` ago; returns how many."""
        with self._db.session("prune") as conn:
            cur = conn.execute(
                f"DELETE FROM {self.schema}.ingested_batches "
                "WHERE committed_at < now() - make_interval(secs => %s)",
                (older_than_s,),
            )
            return max(cur.rowcount, 0)


# Figures of gateway_status that come from the newest state of a session.
_STATE_FIGURES: Final = (
    "ts",
    "outbox_depth",
    "outbox_readings",
    "readings_per_s",
    "received",
    "accepted",
    "rejected",
    "rate_limited",
    "serial_errors",
    "devices_online",
    "site_ready",
    "outbox_refused_readings",
    "outbox_dropped_readings",
)
_LATER: Final = "(EXCLUDED.birth > g.birth OR EXCLUDED.ts > g.ts)"
_UPSERT_STATE: Final = (
    """INSERT INTO {s}.gateway_status AS g (gateway_id, status, birth, boot_id, version, ts,
        outbox_depth, outbox_readings, readings_per_s, received, accepted, rejected,
        rate_limited, serial_errors, devices_online, site_ready, outbox_refused_readings,
        outbox_dropped_readings, updated_at)
    VALUES (%s, %s, %s, %s, %s, timestamptz 'epoch' + %s * interval '1 millisecond',
        %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, now())
    ON CONFLICT (gateway_id) DO UPDATE SET
        status = EXCLUDED.status, birth = EXCLUDED.birth, boot_id = EXCLUDED.boot_id,
        version = EXCLUDED.version, """
    + ", ".join(
        f"{c} = CASE WHEN {_LATER} THEN EXCLUDED.{c} ELSE g.{c} END" for c in _STATE_FIGURES
    )
    + """, updated_at = now()
    WHERE EXCLUDED.birth > g.birth
        OR (EXCLUDED.birth = g.birth
            AND (EXCLUDED.ts > g.ts OR (EXCLUDED.status = 'offline' AND g.status = 'online')))"""
)
# A death Will (``StateRow.will``), whose time is when ingest received it.
# Of a later birth than the stored row, it is the whole row (its figures are
# the connect time's: nothing newer is known). Of the same birth it ends the
# session: offline at the time of death, site not ready, the figures of the
# newest state kept. It applies if the session is stored online, or if it
# came live with a later time (a session that reconnected and died again);
# a retained copy seen again (at a resubscribe) never moves a stored death.
# RETURNING gives the stored time when it applied, nothing when it did not.
_WILL_FIGURES: Final = tuple(c for c in _STATE_FIGURES if c not in ("ts", "site_ready"))
_UPSERT_WILL: Final = (
    _UPSERT_STATE[: _UPSERT_STATE.index("ON CONFLICT")]
    + """ON CONFLICT (gateway_id) DO UPDATE SET
        status = 'offline', birth = EXCLUDED.birth, boot_id = EXCLUDED.boot_id,
        version = EXCLUDED.version, site_ready = EXCLUDED.site_ready,
        ts = CASE WHEN EXCLUDED.birth > g.birth THEN EXCLUDED.ts
            ELSE greatest(g.ts, EXCLUDED.ts) END, """
    + ", ".join(
        f"{c} = CASE WHEN EXCLUDED.birth > g.birth THEN EXCLUDED.{c} ELSE g.{c} END"
        for c in _WILL_FIGURES
    )
    + """, updated_at = now()
    WHERE EXCLUDED.birth > g.birth
        OR (EXCLUDED.birth = g.birth
            AND (g.status = 'online' OR (NOT %s AND EXCLUDED.ts > g.ts)))
    RETURNING (extract(epoch FROM g.ts) * 1000)::bigint"""
)
# Provisioning's final state of a revoked gateway (``StateRow.revoked``): offline
# whatever the stored birth (the gateway's sessions were cut without a Will,
# and later states of a revoked gateway are ignored), at the later of the two
# times, with the site not ready and the newest state's other figures kept.
# A gateway that never reported gets the message's row. A copy seen again
# changes nothing.
_UPSERT_REVOKED: Final = (
    _UPSERT_STATE[: _UPSERT_STATE.index("ON CONFLICT")]
    + """ON CONFLICT (gateway_id) DO UPDATE SET
        status = 'offline', site_ready = false, birth = greatest(g.birth, EXCLUDED.birth),
        ts = greatest(g.ts, EXCLUDED.ts), updated_at = now()
    WHERE g.status = 'online' OR EXCLUDED.ts > g.ts OR g.site_ready
    RETURNING g.outbox_depth, g.outbox_readings, g.outbox_refused_readings,
        g.outbox_dropped_readings"""
)
_INSERT_STATE_HISTORY: Final = """INSERT INTO {s}.gateway_status_history
        (ts, gateway_id, status, outbox_depth, outbox_readings, readings_per_s, devices_online,
            outbox_refused_readings, outbox_dropped_readings)
    SELECT timestamptz 'epoch' + u.ts_ms * interval '1 millisecond', u.gateway_id, u.status,
        u.outbox_depth, u.outbox_readings, u.readings_per_s, u.devices_online,
        u.outbox_refused_readings, u.outbox_dropped_readings
    FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::bigint[], %s::bigint[],
        %s::float8[], %s::bigint[], %s::bigint[], %s::bigint[])
        AS u (ts_ms, gateway_id, status, outbox_depth, outbox_readings, readings_per_s,
            devices_online, outbox_refused_readings, outbox_dropped_readings)
    ON CONFLICT DO NOTHING"""


# The rejects a gateway reported with a state, at the state's time. A state
# received again (its retained copy after a resubscribe, or on another host)
# finds its rows there and adds none: its gateway_status row, upserted first in
# the same transaction, is locked until the commit, so a second writer of the
# same gateway waits and then sees them. Ingest's own rows have a batch id or
# other times; at most ~80 rows per gateway per state interval.
_INSERT_REPORTED_REJECTS: Final = """INSERT INTO {s}.rejects
        (received_at, gateway_id, device_id, reason, detail, raw, raw_bytes, count,
            first_at, last_at)
    SELECT r.at, r.gateway_id, r.device_id, r.reason, r.detail, r.raw, r.raw_bytes, r.count,
        timestamptz 'epoch' + r.first_ms * interval '1 millisecond',
        timestamptz 'epoch' + r.last_ms * interval '1 millisecond'
    FROM (SELECT timestamptz 'epoch' + u.ts_ms * interval '1 millisecond' AS at, u.*
        FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::text[], %s::text[],
            %s::bytea[], %s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[])
        AS u (ts_ms, gateway_id, device_id, reason, detail, raw, raw_bytes, count,
            first_ms, last_ms)) AS r
    WHERE NOT EXISTS (SELECT 1 FROM {s}.rejects AS x
        WHERE x.received_at = r.at AND x.gateway_id = r.gateway_id
            AND x.device_id IS NOT DISTINCT FROM r.device_id AND x.reason = r.reason
            AND x.batch_id IS NULL)"""
# The row that counts what a gateway could not itemise (over its per-interval cap).
REPORT_OVERFLOW_REASON: Final = "report_overflow"
_REPORT_OVERFLOW_DETAIL: Final = (
    "rejects over the gateway's cap of distinct devices and reasons in one state interval"
)


def _revoked_gateways(cur: Cursor[Any], schema: str, gateway_ids: set[str]) -> set[str]:
    """Those of ``gateway_ids`` that the registry says are revoked."""
    if not gateway_ids:
        return set()
    cur.execute(
        f"SELECT gateway_id FROM {schema}.gateways"
        " WHERE status = 'revoked' AND gateway_id = ANY(%s)",
        (sorted(gateway_ids),),
    )
    return {str(r[0]) for r in cur.fetchall()}


def _reported_rejects(rows: Iterable[StateRow]) -> tuple[list[Any], ...] | None:
    """The unnest columns of ``_INSERT_REPORTED_REJECTS`` for ``rows``; None if none."""
    columns: tuple[list[Any], ...] = tuple([] for _ in range(10))
    seen: set[tuple[str, int]] = set()
    for row in rows:
        # The same state twice in one group (live and its retained copy):
        # the statement cannot see its own rows, so the second is left out here.
        if (row.gateway_id, row.ts_ms) in seen:
            continue
        seen.add((row.gateway_id, row.ts_ms))
        entries = [
            (
                e.device_id or None,
                e.reason,
                _text(e.detail),
                e.sample or None,
                e.sample_of_bytes if e.sample else None,
                e.count,
                e.first_ms,
                e.last_ms,
            )
            for e in row.rejects
        ]
        if row.rejects_dropped:
            entries.append(
                (
                    None,
                    REPORT_OVERFLOW_REASON,
                    _REPORT_OVERFLOW_DETAIL,
                    None,
                    None,
                    row.rejects_dropped,
                    row.ts_ms,
                    row.ts_ms,
                )
            )
        for entry in entries:
            for column, value in zip(columns, (row.ts_ms, row.gateway_id, *entry), strict=True):
                column.append(value)
    return columns if columns[0] else None


def _state_params(row: StateRow) -> tuple[object, ...]:
    return (
        row.gateway_id,
        row.status,
        row.birth,
        row.boot_id,
        row.version,
        row.ts_ms,
        row.outbox_depth,
        row.outbox_readings,
        row.readings_per_s,
        row.received,
        row.accepted,
        row.rejected,
        row.rate_limited,
        row.serial_errors,
        row.devices_online,
        row.site_ready,
        row.outbox_refused_readings,
        row.outbox_dropped_readings,
    )


def _text(detail: str) -> str:
    """PostgreSQL text holds no NUL; a detail quoting input must not turn poison into an error."""
    return detail.replace("\x00", "\\x00")
