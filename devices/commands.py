"""Operators' commands to devices, in the registry: ask for one, list, show, cancel, follow.

``CommandRegistry`` is the shell over the registry's connection
(``devices.registry``): ``ask`` checks a request against the device's catalog
entry (``contracts.commands``) and the registry's row of the device (known,
active, enabled, served by a gateway), then stores the ``commands`` row, its
``queued`` event and the audit row in one transaction, with a
``pg_notify(command_channel)`` that wakes ingest's dispatcher on commit.
``cancel`` follows the rules of the command downlink: a command never sent is
cancelled here at once; a command its gateway may hold gets a cancel request,
which the dispatcher sends and the gateway confirms. ``listen`` and
``wait_for_change`` let a caller follow a command's states as ingest stores
them (``command_state_channel``).

Sending, delivery and the states after ``queued`` are ingest's and the
gateway's; showing rows to a person is the CLI's. Database errors are
translated by ``adapters.database`` as for the registry.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import msgspec

from adapters.database import Connection, database_errors, dict_row
from contracts.catalog import DEVICE_TYPES, modbus_model
from contracts.commands import (
    FINAL_STATES,
    STATE_RANK,
    CommandState,
    check_command,
    parse_command_request,
)
from contracts.errors import (
    CommandRefusedError,
    ConflictError,
    NotFoundError,
    UnknownDeviceTypeError,
)
from contracts.ids import check_id
from contracts.schema import command_channel, command_state_channel
from devices.registry import Registry

# "c-" and 16 lowercase hex characters: 64 random bits, so two operators'
# commands never share an id (a collision is the primary key's refusal).
COMMAND_ID_BYTES: Final = 8
# What the hub writes as a command's event source (ingest writes "gateway").
HUB_SOURCE: Final = "hub"
CANCELLED_UNSENT_DETAIL: Final = "cancelled before it was sent"
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def new_command_id() -> str:
    return f"c-{secrets.token_hex(COMMAND_ID_BYTES)}"


def ms_to_datetime(ts_ms: int) -> datetime:
    """Integer ms UTC as an exact timestamptz value (no float rounding)."""
    return _EPOCH + timedelta(milliseconds=ts_ms)


class CommandRow(msgspec.Struct, frozen=True, kw_only=True):
    """A ``commands`` row as stored."""

    command_id: str
    device_id: str
    gateway_id: str
    device_type: str
    name: str
    args: dict[str, Any]
    ttl_s: int
    created_at: datetime
    expires_at: datetime
    operator: str
    state: str
    state_at: datetime
    detail: str
    answer: dict[str, Any] | None
    sends: int
    last_sent_at: datetime | None
    cancel_requested_at: datetime | None
    cancelled_by: str | None

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


class CommandEvent(msgspec.Struct, frozen=True, kw_only=True):
    """A state a command reached: the reporter's time, when it arrived, who said so."""

    command_id: str
    state: str
    ts: datetime
    received_at: datetime
    source: str
    detail: str


class CommandFilter(msgspec.Struct, frozen=True, kw_only=True):
    device_id: str | None = None
    gateway_id: str | None = None
    states: tuple[str, ...] = ()
    since: datetime | None = None  # created at or after
    limit: int = 50


class CancelOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """``cancelled``: at once (never sent); else requested, the gateway to confirm."""

    row: CommandRow
    cancelled: bool


_COLUMNS: Final = (
    "command_id, device_id, gateway_id, device_type, name, args, ttl_s, created_at,"
    " expires_at, operator, state, state_at, detail, answer, sends, last_sent_at,"
    " cancel_requested_at, cancelled_by"
)


def sorted_events(events: Iterable[CommandEvent]) -> list[CommandEvent]:
    """Events in the order the states are reached (rank), then by time."""
    return sorted(events, key=lambda e: (STATE_RANK[e.state], e.ts))


class CommandRegistry:
    """Commands in ``schema`` over one autocommit connection (the registry's)."""

    def __init__(self, conn: Connection[Any], *, schema: str) -> None:
        self.registry = Registry(conn, schema=schema)
        self.conn = conn
        self.schema = self.registry.schema

    # -- ask ------------------------------------------------------------------------

    def ask(
        self, device_id: str, name: str, arg_strings: Iterable[str], *, ttl_s: int, operator: str
    ) -> CommandRow:
        """Check and queue a command for ``device_id``; the dispatcher is woken on commit.

        Refused before anything is stored: an unknown, revoked or disabled
        device, one without a gateway (NotFoundError, ConflictError), a
        request its type's catalog entry refuses, or one its serial protocol,
        its Modbus model or its transport cannot carry (CommandRefusedError,
        naming the type, command and arg, and the model).
        """
        check_id(device_id, "device id")
        s = self.schema
        with self.registry.transaction() as tx:
            device = tx.device(device_id, lock=True)
            if device is None:
                raise NotFoundError(
                    f"device {device_id!r} is not registered (`cityhub devices list` lists them)"
                )
            if device.status != "active":
                raise ConflictError(f"device {device_id!r} is revoked: it takes no commands")
            if not device.enabled:
                raise ConflictError(
                    f"device {device_id!r} is disabled: `cityhub devices enable` it first"
                )
            if device.gateway_id is None:
                raise ConflictError(
                    f"device {device_id!r} has no gateway to carry a command:"
                    " `cityhub devices move` it to one"
                )
            dtype = DEVICE_TYPES.get(device.device_type)
            if dtype is None:
                raise CommandRefusedError(
                    device.device_type, name, None, "the type is not in the catalog"
                )
            request = parse_command_request(device.device_type, name, arg_strings)
            check_transport_takes(device.device_type, device.transport, device.model, request.name)
            tx.cur.execute("SELECT now() AS now")
            now = _one(tx.cur.fetchone())["now"]
            now_ms = (now - _EPOCH) // timedelta(milliseconds=1)
            command = check_command(
                dtype,
                request.name,
                request.args,
                command_id=new_command_id(),
                device_id=device_id,
                ttl_s=ttl_s,
                now_ms=now_ms,
                serial_protocol=device.protocol if device.transport == "serial" else None,
            )
            created = ms_to_datetime(command.created_ms)
            tx.cur.execute(
                f"""INSERT INTO {s}.commands (command_id, device_id, gateway_id, device_type,
                    name, args, ttl_s, created_at, expires_at, operator, state, state_at)
                    VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s, %s, %s, %s)
                    RETURNING {_COLUMNS}""",
                (
                    command.command_id,
                    device_id,
                    device.gateway_id,
                    device.device_type,
                    command.name,
                    json.dumps(command.args, sort_keys=True),
                    command.ttl_s,
                    created,
                    ms_to_datetime(command.expires_ms),
                    operator,
                    CommandState.QUEUED,
                    created,
                ),
            )
            row = msgspec.convert(_one(tx.cur.fetchone()), CommandRow)
            tx.cur.execute(
                f"""INSERT INTO {s}.command_events (command_id, state, ts, source)
                    VALUES (%s, %s, %s, %s)""",
                (command.command_id, CommandState.QUEUED, created, HUB_SOURCE),
            )
            tx.audit(
                operator=operator,
                action="command",
                subject_kind="command",
                subject_id=command.command_id,
                detail={
                    "device": device_id,
                    "gateway": device.gateway_id,
                    "name": command.name,
                    "args": command.args,
                    "ttl_s": command.ttl_s,
                },
            )
            # Inside the transaction: PostgreSQL delivers it on commit, never before.
            tx.cur.execute("SELECT pg_notify(%s, %s)", (command_channel(s), command.command_id))
        return row

    # -- read -----------------------------------------------------------------------

    def commands(self, where: CommandFilter) -> list[CommandRow]:
        """Commands newest first."""
        rows = self._query(
            f"""SELECT {_COLUMNS} FROM {self.schema}.commands
                WHERE (%(device)s::text IS NULL OR device_id = %(device)s)
                  AND (%(gateway)s::text IS NULL OR gateway_id = %(gateway)s)
                  AND (cardinality(%(states)s::text[]) = 0 OR state = ANY(%(states)s))
                  AND (%(since)s::timestamptz IS NULL OR created_at >= %(since)s)
                ORDER BY created_at DESC, command_id LIMIT %(limit)s""",
            {
                "device": where.device_id,
                "gateway": where.gateway_id,
                "states": list(where.states),
                "since": where.since,
                "limit": where.limit,
            },
        )
        return [msgspec.convert(r, CommandRow) for r in rows]

    def command(self, command_id: str) -> CommandRow:
        rows = self._query(
            f"SELECT {_COLUMNS} FROM {self.schema}.commands WHERE command_id = %s", (command_id,)
        )
        if not rows:
            raise NotFoundError(
                f"command {command_id!r} is not known (`cityhub commands list` lists them)"
            )
        return msgspec.convert(rows[0], CommandRow)

    def events(self, command_id: str) -> list[CommandEvent]:
        """The states the command reached, in order."""
        rows = self._query(
            f"""SELECT command_id, state, ts, received_at, source, detail
                FROM {self.schema}.command_events WHERE command_id = %s""",
            (command_id,),
        )
        return sorted_events(msgspec.convert(r, CommandEvent) for r in rows)

    # -- cancel ---------------------------------------------------------------------

    def cancel(self, command_id: str, *, operator: str) -> CancelOutcome:
        """Cancel a command: at once if it was never sent, else ask its gateway.

        Refused (ConflictError): a command already in a final state, already
        delivered to its device (the device has it: it can no longer be
        taken back), or whose cancel was already asked for.
        """
        s = self.schema
        with self.registry.transaction() as tx:
            tx.cur.execute(
                f"SELECT {_COLUMNS} FROM {s}.commands WHERE command_id = %s FOR UPDATE",
                (command_id,),
            )
            found = tx.cur.fetchone()
            if found is None:
                raise NotFoundError(
                    f"command {command_id!r} is not known (`cityhub commands list` lists them)"
                )
            before = msgspec.convert(found, CommandRow)
            if before.final:
                raise ConflictError(f"command {command_id!r} is already {before.state}")
            if before.state == CommandState.DELIVERED:
                raise ConflictError(
                    f"command {command_id!r} is already delivered to {before.device_id}:"
                    " it can no longer be cancelled"
                )
            if before.cancel_requested_at is not None:
                raise ConflictError(
                    f"command {command_id!r}: {before.cancelled_by} already asked to cancel it;"
                    " its gateway has not confirmed yet"
                )
            at_once = before.state == CommandState.QUEUED and before.sends == 0
            if at_once:
                tx.cur.execute(
                    f"""UPDATE {s}.commands SET state = %s, state_at = now(), detail = %s,
                        cancel_requested_at = now(), cancelled_by = %s
                        WHERE command_id = %s RETURNING {_COLUMNS}""",
                    (CommandState.CANCELLED, CANCELLED_UNSENT_DETAIL, operator, command_id),
                )
                row = msgspec.convert(_one(tx.cur.fetchone()), CommandRow)
                tx.cur.execute(
                    f"""INSERT INTO {s}.command_events (command_id, state, ts, source, detail)
                        VALUES (%s, %s, now(), %s, %s) ON CONFLICT DO NOTHING""",
                    (command_id, CommandState.CANCELLED, HUB_SOURCE, CANCELLED_UNSENT_DETAIL),
                )
                # Whoever follows the command (`--wait`) learns its final state.
                tx.cur.execute("SELECT pg_notify(%s, %s)", (command_state_channel(s), command_id))
            else:
                tx.cur.execute(
                    f"""UPDATE {s}.commands SET cancel_requested_at = now(), cancelled_by = %s
                        WHERE command_id = %s RETURNING {_COLUMNS}""",
                    (operator, command_id),
                )
                row = msgspec.convert(_one(tx.cur.fetchone()), CommandRow)
                # The dispatcher sends the cancel to the gateway that may hold it.
                tx.cur.execute("SELECT pg_notify(%s, %s)", (command_channel(s), command_id))
            tx.audit(
                operator=operator,
                action="command.cancel",
                subject_kind="command",
                subject_id=command_id,
                detail={
                    "device": before.device_id,
                    "name": before.name,
                    "state": before.state,
                    "outcome": "cancelled" if at_once else "requested",
                },
            )
        return CancelOutcome(row=row, cancelled=at_once)

    # -- follow ---------------------------------------------------------------------

    def listen(self) -> None:
        """Receive ingest's notices of state changes (``wait_for_change``) from now on."""
        # Quoted: pg_notify takes the channel's name as it is spelled.
        with database_errors("commands", schema=self.schema):
            self.conn.execute(f'LISTEN "{command_state_channel(self.schema)}"')

    def wait_for_change(self, command_id: str, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a notice about ``command_id``; whether one came.

        Notices about other commands are skipped; the caller re-reads the
        command either way (a notice may be lost with a reconnect: polling
        covers it).
        """
        with database_errors("commands", schema=self.schema):
            for notice in self.conn.notifies(timeout=timeout_s):
                if notice.payload == command_id:
                    return True
        return False

    def _query(
        self, sql: str, params: tuple[object, ...] | dict[str, object]
    ) -> list[dict[str, Any]]:
        with (
            database_errors("commands", schema=self.schema),
            self.conn.cursor(row_factory=dict_row) as cur,
        ):
            cur.execute(sql, params)
            return list(cur.fetchall())


# Why a device of a transport takes no commands (yet), as the operator reads it.
_NO_COMMANDS: Final = {
    "lorawan": "LoRaWAN downlinks are not sent by cityhub yet",
    "http": (
        "an HTTP device cannot be reached by the gateway (it posts its readings; nothing is"
        " sent back to it)"
    ),
}


def check_transport_takes(
    device_type: str, transport: str, model_name: str | None, command: str
) -> None:
    """Whether the device's transport can carry ``command``; CommandRefusedError if not.

    A Modbus device takes the commands its model writes registers for
    (``ModbusModel.writes_for``); a LoRaWAN or an HTTP device none yet.
    Serial and MQTT devices are ``check_command``'s to judge.
    """
    if transport in _NO_COMMANDS:
        raise CommandRefusedError(device_type, command, None, _NO_COMMANDS[transport])
    if transport != "modbus":
        return
    try:
        model = modbus_model(str(model_name))
    except UnknownDeviceTypeError as exc:
        raise CommandRefusedError(device_type, command, None, str(exc)) from None
    if not model.writes_for(command):
        takes = ", ".join(model.commands) or "none"
        raise CommandRefusedError(
            device_type,
            command,
            None,
            f"the Modbus model {model.name} has no register for it (its commands: {takes})",
        )


def _one(row: dict[str, Any] | None) -> dict[str, Any]:
    if row is None:  # pragma: no cover - RETURNING and SELECT now() always give a row
        raise NotFoundError("the database returned no row")
    return row
