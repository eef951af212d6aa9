"""Database adapter of ingest's command downlink: due commands out, reported states in.

``CommandStore`` has a connection of its own (the batch writer's may be busy
with a large commit):

- ``dispatch`` runs one pass of the dispatcher in ONE transaction: the
  commands due (``queued`` ones, and ``sent`` ones with a cancel requested,
  not sent within ``resend_s``, doubling per send up to RESEND_MAX_S)
  ``FOR UPDATE SKIP LOCKED``, so two hosts'
  dispatchers never send the same row at once; the plan of
  ``ingest.commanding.plan_dispatch``; the states the hub decides
  (``expired``, ``failed``) with their ``command_events`` rows (source
  'hub'); each message handed to ``publish``; then ``sends`` and
  ``last_sent_at`` of what was published;
- ``store_reports`` stores one gateway message of reports in ONE
  transaction: the commands named locked in id order, each report checked
  against its command (``refuse_report``), a ``command_events`` row per
  state reached (``ON CONFLICT DO NOTHING``: a report received again is
  stored once), the command's state moved only forward (``advances``, in
  SQL), rejects rows for the refused; and a NOTIFY on
  ``command_state_channel`` per command changed, delivered at the commit.
  A message refused whole is one rejects row.

``CommandListener`` holds an autocommit connection that LISTENs on
``command_channel`` and waits for notifications.

Errors are ``adapters.database``'s map (unavailable: retry; schema: not
migrated). Timing, retries, publishing and acks are the service's business.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from adapters.database import Connection, Cursor, Database, connect, database_errors, sql
from contracts.commands import FINAL_STATES, STATE_RANK, CommandReport, GatewayCommands
from contracts.errors import HubError
from contracts.schema import check_schema_name, command_state_channel
from ingest.commanding import (
    CommandRow,
    Decided,
    PoisonReports,
    RefusedReport,
    ReportsItem,
    StoredCommand,
    plan_dispatch,
    refuse_report,
    sent_ids,
)
from ingest.writer import REJECT_RAW_MAX_BYTES, set_dead_client_limits

# Rows one dispatch pass takes: 4,096 commands of ~200 bytes are 16 messages
# of 256; a longer queue is taken in further passes right away.
DISPATCH_ROWS_MAX: Final = 4096
# The longest wait between two sends of a command its gateway has not
# reported 'sent' (doubling from ingest.command_resend_s): a gateway back from
# an outage whose broker session lost the copies waits at most this long.
RESEND_MAX_S: Final = 60.0
# Characters of a refused report's device id kept in ``rejects.device_id``.
_DEVICE_ID_MAX_CHARS: Final = 64

_EPOCH_MS: Final = "timestamptz 'epoch' + %s * interval '1 millisecond'"
# ``contracts.commands.advances`` in SQL: the stored state's rank, from STATE_RANK.
_RANK_SQL: Final = (
    "CASE c.state "
    + " ".join(f"WHEN '{state}' THEN {rank}" for state, rank in STATE_RANK.items())
    + " END"
)
_FINALS_SQL: Final = ", ".join(f"'{state}'" for state in sorted(FINAL_STATES))
_ENCODER: Final = msgspec.json.Encoder()


@dataclass
class DispatchOutcome:
    """What a dispatch pass did."""

    messages: int = 0  # GatewayCommands published
    sent: int = 0  # command ids in them (commands and cancels)
    decided: list[Decided] = field(default_factory=list)  # expired or refused by the hub
    unpublished: int = 0  # messages ``publish`` could not hand over
    full: bool = False  # DISPATCH_ROWS_MAX rows taken: more may be due


@dataclass
class ReportsOutcome:
    """What storing one message of reports did."""

    stored: list[str] = field(default_factory=list)  # report ids new to command_events
    repeated: int = 0  # reports already stored (sent again)
    changed: list[str] = field(default_factory=list)  # command ids whose state moved
    refused: list[RefusedReport] = field(default_factory=list)
    poison: PoisonReports | None = None
    rejects: Counter[str] = field(default_factory=Counter)  # rejects rows by reason


def _text(value: str) -> str:
    """PostgreSQL text holds no NUL; a detail quoting input must not make an error of it."""
    return value.replace("\x00", "\\x00")


class CommandStore:
    """The command downlink's connection of one ingest worker. Thread-safe (one call at a time)."""

    def __init__(
        self,
        *,
        url: str,
        schema: str,
        worker_id: str,
        connect_timeout_s: float = 5.0,
        dead_client_s: float = 0.0,
    ) -> None:
        self.schema = check_schema_name(schema)
        # dead_client_s > 0: the server ends this connection's transaction (and
        # its row locks) that long after the client fell silent, as the batch
        # writer's (``ingest.writer.set_dead_client_limits``).
        self.dead_client_s = dead_client_s
        self._db = Database(
            url=url,
            schema=self.schema,
            application_name=f"cityhub-ingest-{worker_id}-commands",
            connect_timeout_s=connect_timeout_s,
            on_connect=self._set_limits if dead_client_s > 0 else None,
        )

    def _set_limits(self, conn: Connection[Any]) -> None:
        set_dead_client_limits(conn, self.dead_client_s)

    def close(self) -> None:
        self._db.close()

    def interrupt(self) -> None:
        """Cut the connection under a call that hangs; safe from any thread."""
        self._db.interrupt()

    # -- dispatch ------------------------------------------------------------------
    #
    # A command is sent again after resend_s, then after twice as long each
    # time, up to RESEND_MAX_S: a gateway away for a day gets ~1,440 copies
    # queued in its broker session per command, not one every resend_s
    # (17,280 at 5 s); the gateway keeps each command once whatever arrives.

    def dispatch(
        self,
        *,
        now_ms: int,
        resend_s: float,
        publish: Callable[[str, GatewayCommands], bool],
        limit: int = DISPATCH_ROWS_MAX,
    ) -> DispatchOutcome:
        """One pass: take the due commands, decide, publish, record the sends (one transaction).

        ``publish(gateway_id, message)`` returns whether the message was
        handed to the broker link; what was not is due again at the next pass.
        """
        s = self.schema
        outcome = DispatchOutcome()
        with (
            self._db.session("dispatching commands") as conn,
            conn.transaction(),
            conn.cursor() as cur,
        ):
            cur.execute(
                f"""SELECT command_id, device_id, gateway_id, name, args, ttl_s,
                    (extract(epoch FROM created_at) * 1000)::bigint,
                    (extract(epoch FROM expires_at) * 1000)::bigint,
                    state, cancel_requested_at IS NOT NULL
                FROM {s}.commands
                WHERE (state = 'queued'
                        OR (state = 'sent' AND cancel_requested_at IS NOT NULL))
                    AND (last_sent_at IS NULL OR last_sent_at <= {_EPOCH_MS}
                        - make_interval(secs => least(
                            %s * power(2, least(greatest(sends - 1, 0), 16)), %s)))
                ORDER BY created_at, command_id
                LIMIT %s
                FOR UPDATE SKIP LOCKED""",
                (now_ms, resend_s, max(resend_s, RESEND_MAX_S), limit),
            )
            rows = [
                CommandRow(
                    command_id=str(r[0]),
                    device_id=str(r[1]),
                    gateway_id=str(r[2]),
                    name=str(r[3]),
                    args=r[4],
                    ttl_s=int(r[5]),
                    created_ms=int(r[6]),
                    expires_ms=int(r[7]),
                    state=str(r[8]),
                    cancel_requested=bool(r[9]),
                )
                for r in cur.fetchall()
            ]
            outcome.full = len(rows) >= limit
            plan = plan_dispatch(rows, now_ms=now_ms)
            outcome.decided = self._decide(cur, plan.decided, now_ms)
            published: list[str] = []
            for gateway_id, message in plan.messages:
                if not publish(gateway_id, message):
                    outcome.unpublished += 1
                    continue
                outcome.messages += 1
                published.extend(sent_ids(message))
            if published:
                cur.execute(
                    f"""UPDATE {s}.commands SET sends = sends + 1,
                        last_sent_at = {_EPOCH_MS}
                    WHERE command_id = ANY(%s)""",
                    (now_ms, published),
                )
            outcome.sent = len(published)
        return outcome

    def _decide(self, cur: Cursor[Any], decided: Sequence[Decided], now_ms: int) -> list[Decided]:
        """Store the states the hub decided for queued commands; returns those applied."""
        applied: list[Decided] = []
        channel = command_state_channel(self.schema)
        for d in decided:
            cur.execute(
                f"""UPDATE {self.schema}.commands SET state = %s, state_at = {_EPOCH_MS},
                    detail = %s
                WHERE command_id = %s AND state = 'queued' RETURNING command_id""",
                (d.state, now_ms, _text(d.detail), d.command_id),
            )
            if cur.fetchone() is None:
                continue
            cur.execute(
                f"""INSERT INTO {self.schema}.command_events (command_id, state, ts, source, detail)
                VALUES (%s, %s, {_EPOCH_MS}, 'hub', %s) ON CONFLICT DO NOTHING""",
                (d.command_id, d.state, now_ms, _text(d.detail)),
            )
            cur.execute("SELECT pg_notify(%s, %s)", (channel, d.command_id))
            applied.append(d)
        return applied

    # -- reports -------------------------------------------------------------------

    def store_reports(self, item: ReportsItem) -> ReportsOutcome:
        """Store one message of reports, or the reject of a message refused whole."""
        outcome = ReportsOutcome()
        with (
            self._db.session("storing command reports") as conn,
            conn.transaction(),
            conn.cursor() as cur,
        ):
            if isinstance(item, PoisonReports):
                outcome.poison = item
                self._reject(
                    cur,
                    [
                        (
                            item.gateway_id,
                            None,
                            item.reason,
                            item.detail,
                            item.payload,
                        )
                    ],
                    outcome.rejects,
                )
                return outcome
            stored = self._lock_commands(cur, {r.command_id for r in item.reports})
            refused = list(item.refused)
            changed: dict[str, None] = {}
            for report in item.reports:
                refusal = refuse_report(
                    report, stored.get(report.command_id), gateway_id=item.gateway_id
                )
                if refusal is not None:
                    refused.append(refusal)
                    continue
                if self._insert_event(cur, report):
                    outcome.stored.append(report.report_id)
                    changed[report.command_id] = None
                else:
                    outcome.repeated += 1
                if self._advance(cur, report):
                    changed[report.command_id] = None
            outcome.refused = refused
            self._reject(
                cur,
                [
                    (
                        item.gateway_id,
                        _text(x.report.device_id[:_DEVICE_ID_MAX_CHARS]),
                        x.reason,
                        x.detail,
                        _ENCODER.encode(x.report),
                    )
                    for x in refused
                ],
                outcome.rejects,
            )
            channel = command_state_channel(self.schema)
            for command_id in changed:
                cur.execute("SELECT pg_notify(%s, %s)", (channel, command_id))
            outcome.changed = list(changed)
        return outcome

    def _lock_commands(self, cur: Cursor[Any], ids: set[str]) -> dict[str, StoredCommand]:
        """The commands named, locked until the commit, in id order (one lock order for all)."""
        if not ids:
            return {}
        cur.execute(
            f"""SELECT command_id, gateway_id, device_id FROM {self.schema}.commands
            WHERE command_id = ANY(%s) ORDER BY command_id FOR UPDATE""",
            (sorted(ids),),
        )
        return {str(r[0]): StoredCommand(str(r[1]), str(r[2])) for r in cur.fetchall()}

    def _insert_event(self, cur: Cursor[Any], report: CommandReport) -> bool:
        cur.execute(
            f"""INSERT INTO {self.schema}.command_events (command_id, state, ts, source, detail)
            VALUES (%s, %s, {_EPOCH_MS}, 'gateway', %s)
            ON CONFLICT DO NOTHING RETURNING command_id""",
            (report.command_id, report.state, report.ts_ms, _text(report.detail)),
        )
        return cur.fetchone() is not None

    def _advance(self, cur: Cursor[Any], report: CommandReport) -> bool:
        """Move the command to the report's state if it ``advances``; whether it did."""
        answer = _ENCODER.encode(report.answer).decode() if report.answer else None
        cur.execute(
            f"""UPDATE {self.schema}.commands AS c SET state = %s, state_at = {_EPOCH_MS},
                detail = %s, answer = coalesce(%s::jsonb, c.answer)
            WHERE c.command_id = %s AND c.state NOT IN ({_FINALS_SQL})
                AND {_RANK_SQL} < %s
            RETURNING c.command_id""",
            (
                report.state,
                report.ts_ms,
                _text(report.detail),
                answer,
                report.command_id,
                STATE_RANK[report.state],
            ),
        )
        return cur.fetchone() is not None

    def _reject(
        self,
        cur: Cursor[Any],
        records: Sequence[tuple[str | None, str | None, str, str, bytes]],
        rejects: Counter[str],
    ) -> None:
        """Rejects rows (gateway, device, reason, detail, raw): the head of raw and its size."""
        if not records:
            return
        cur.executemany(
            f"""INSERT INTO {self.schema}.rejects
                (gateway_id, device_id, reason, detail, raw, raw_bytes)
            VALUES (%s, %s, %s, %s, %s, %s)""",
            [
                (gw, device, reason, _text(detail), raw[:REJECT_RAW_MAX_BYTES], len(raw))
                for gw, device, reason, detail, raw in records
            ],
        )
        rejects.update(r[2] for r in records)


class CommandListener:
    """An autocommit connection LISTENing on one channel; used from one thread."""

    def __init__(
        self, *, url: str, channel: str, application_name: str, connect_timeout_s: float = 5.0
    ) -> None:
        self.url = url
        self.channel = channel
        self.application_name = application_name
        self.connect_timeout_s = connect_timeout_s
        self.connects = 0
        self._conn: Connection[Any] | None = None

    def wait(self, timeout_s: float) -> bool:
        """Block up to ``timeout_s`` for notifications; whether any came, or it just (re)connected.

        A new connection counts as a notification: what was notified while
        there was none is lost, so the caller looks at the table again.
        DatabaseUnavailableError when the server is away (the connection is
        dropped; the next call connects again).
        """
        try:
            with database_errors("listening for commands"):
                if self._conn is None or self._conn.closed:
                    conn = connect(
                        self.url,
                        timeout_s=self.connect_timeout_s,
                        application_name=self.application_name,
                    )
                    self._conn = conn
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                    self.connects += 1
                    return True
                woke = False
                for _ in self._conn.notifies(timeout=timeout_s, stop_after=1):
                    woke = True
                if woke:
                    # A burst (many commands queued at once) is one pass.
                    for _ in self._conn.notifies(timeout=0.0):
                        pass
                return woke
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            # A broken connection is being dropped anyway.
            with contextlib.suppress(HubError), database_errors("closing the listener"):
                conn.close()
