"""Commands to devices, ingest's side: what to send each gateway, and what its reports are.

The dispatcher (``ingest.service``) reads the commands that are due
(``ingest.commandstore``) as ``CommandRow``s; ``plan_dispatch`` turns them
into a ``DispatchPlan``: per gateway, ``GatewayCommands`` messages of at most
COMMANDS_PER_MESSAGE_MAX entries (and GATEWAY_COMMANDS_MAX_BYTES), the
queued commands rebuilt as ``contracts.commands.Command`` and the ids to
cancel; and the states the hub decides by itself: ``expired`` for a command
still queued COMMAND_EXPIRY_GRACE_S after its ttl, ``failed`` for a row the
gateway would refuse (``check_command_message``), so that one bad row never
makes a gateway refuse the commands sent with it.

The report consumer gets a gateway's ``CommandReports``: ``prepare_reports``
checks size, syntax, the envelope (sender = the topic's gateway, time,
count) and each report on its own, into a ``ReportsMessage`` (the good
reports, and the refused ones with their reason) or a ``PoisonReports``;
``refuse_report`` decides, from the stored command, whether a report may
touch it (``unknown_command``, ``command_not_owned``); ``report_ack`` builds
the ``Ack`` that names every report id the gateway may drop.

Pure: the time comes in as an argument; SQL, publishing and logging are the
service's and the store's business.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

import msgspec

from contracts.commands import (
    COMMANDS_PER_MESSAGE_MAX,
    GATEWAY_COMMANDS_MAX_BYTES,
    STATE_RANK,
    Command,
    CommandReport,
    CommandState,
    GatewayCommands,
    check_command_message,
    check_command_report,
    decode_command_reports,
    encode_command,
    report_id,
)
from contracts.errors import (
    FieldTypeError,
    InputError,
    InvalidTopicError,
)
from contracts.ids import check_id
from contracts.messages import Ack
from contracts.topics import parse_gateway_topic
from ingest.prepare import GATEWAY_MISMATCH

# A command still queued this long after its ttl ran out is expired by the
# hub: the gateway expires what it holds by itself, and 30 s covers a clock
# difference between hub and gateway and a send still in flight.
COMMAND_EXPIRY_GRACE_S: Final = 30
# Reasons of the rejects rows of reports that may not touch a stored command.
UNKNOWN_COMMAND: Final = "unknown_command"
COMMAND_NOT_OWNED: Final = "command_not_owned"
# What a GatewayCommands message adds around its entries: the gateway id
# (<= 64 characters), ts_ms and the keys, well under 1 KiB; 4 KiB keeps any
# message under GATEWAY_COMMANDS_MAX_BYTES.
_ENVELOPE_BYTES: Final = 4096
# Each entry in a JSON list costs its comma; a cancel id its two quotes too.
_ENTRY_OVERHEAD_BYTES: Final = 1
# What a refusal quotes back of a value the sender made up.
_QUOTE_CHARS: Final = 64


# --- dispatch -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommandRow:
    """A command due for its gateway, as stored (``commands``)."""

    command_id: str
    device_id: str
    gateway_id: str
    name: str
    args: object  # the stored jsonb, checked when the command is rebuilt
    ttl_s: int
    created_ms: int
    expires_ms: int
    state: str
    cancel_requested: bool = False


@dataclass(frozen=True, slots=True)
class Decided:
    """A state the hub decides for a command by itself (source 'hub')."""

    command_id: str
    state: str
    detail: str


@dataclass(frozen=True, slots=True)
class DispatchPlan:
    """What one dispatch pass does: messages to publish, states to store."""

    messages: list[tuple[str, GatewayCommands]] = field(default_factory=list)
    decided: list[Decided] = field(default_factory=list)


def is_expired(row: CommandRow, *, now_ms: int) -> bool:
    """A queued command whose ttl ran out more than COMMAND_EXPIRY_GRACE_S ago."""
    return (
        row.state == CommandState.QUEUED and now_ms > row.expires_ms + COMMAND_EXPIRY_GRACE_S * 1000
    )


def rebuild_command(row: CommandRow) -> Command:
    """The Command a gateway is sent for ``row``; an InputError if the gateway would refuse it."""
    try:
        command = msgspec.convert(
            {
                "command_id": row.command_id,
                "device_id": row.device_id,
                "name": row.name,
                "args": row.args,
                "ttl_s": row.ttl_s,
                "created_ms": row.created_ms,
            },
            Command,
        )
    except msgspec.ValidationError as exc:
        raise FieldTypeError(f"command: {exc}") from exc
    return check_command_message(command)


def sent_ids(message: GatewayCommands) -> list[str]:
    """The command ids a message carries, commands and cancels: each counts as a send."""
    return [c.command_id for c in message.commands] + list(message.cancel)


def _chunks(
    gateway_id: str, entries: Sequence[Command | str], now_ms: int
) -> Iterable[GatewayCommands]:
    """Entries into messages of at most COMMANDS_PER_MESSAGE_MAX entries and the byte bound."""
    budget = GATEWAY_COMMANDS_MAX_BYTES - _ENVELOPE_BYTES
    commands: list[Command] = []
    cancel: list[str] = []
    size = 0
    for entry in entries:
        entry_bytes = _ENTRY_OVERHEAD_BYTES + (
            len(entry) + 2 if isinstance(entry, str) else len(encode_command(entry))
        )
        if commands or cancel:
            full = len(commands) + len(cancel) >= COMMANDS_PER_MESSAGE_MAX
            if full or size + entry_bytes > budget:
                yield GatewayCommands(
                    gateway_id=gateway_id, ts_ms=now_ms, commands=commands, cancel=cancel
                )
                commands, cancel, size = [], [], 0
        if isinstance(entry, str):
            cancel.append(entry)
        else:
            commands.append(entry)
        size += entry_bytes
    if commands or cancel:
        yield GatewayCommands(gateway_id=gateway_id, ts_ms=now_ms, commands=commands, cancel=cancel)


def plan_dispatch(rows: Iterable[CommandRow], *, now_ms: int) -> DispatchPlan:
    """Per gateway (first seen first), its messages; the commands expired or refused.

    A queued command past its ttl and the grace is ``expired`` ("never
    reached gateway X") and not sent; a command with a cancel requested is
    sent as a cancel only (never again as a command: the gateway cancels one
    it holds, and keeps a tombstone for one it never got); a queued command
    the gateway would refuse is ``failed`` with the refusal.
    """
    plan = DispatchPlan()
    entries: dict[str, list[Command | str]] = {}
    for row in rows:
        if is_expired(row, now_ms=now_ms):
            plan.decided.append(
                Decided(row.command_id, CommandState.EXPIRED, f"never reached {row.gateway_id}")
            )
        elif row.cancel_requested:
            entries.setdefault(row.gateway_id, []).append(row.command_id)
        elif row.state == CommandState.QUEUED:
            try:
                command = rebuild_command(row)
            except InputError as exc:
                plan.decided.append(
                    Decided(row.command_id, CommandState.FAILED, f"refused by the hub: {exc}")
                )
                continue
            entries.setdefault(row.gateway_id, []).append(command)
    for gateway_id, listed in entries.items():
        plan.messages.extend((gateway_id, m) for m in _chunks(gateway_id, listed, now_ms))
    return plan


# --- reports --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RefusedReport:
    """One report of a message refused on its own: a rejects row; acked if its id is readable."""

    report: CommandReport
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class ReportsMessage:
    """A gateway's reports message whose envelope is sound: good reports, refused ones."""

    topic: str
    gateway_id: str
    payload: bytes
    reports: list[CommandReport]
    refused: list[RefusedReport] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class PoisonReports:
    """A reports message refused as a whole: one rejects row with the head of its payload."""

    topic: str
    gateway_id: str | None  # the topic's, when it parses
    reason: str
    detail: str
    payload: bytes


ReportsItem = ReportsMessage | PoisonReports


def ackable(report: CommandReport) -> bool:
    """Whether an Ack may name the report's id: ``{command_id}.{state}`` as a gateway reads it."""
    try:
        check_id(report.command_id, "command_id")
    except InputError:
        return False
    return report.state in STATE_RANK and report.report_id == report_id(
        report.command_id, report.state
    )


def prepare_reports(topic: str, payload: bytes, *, prefix: str) -> ReportsItem:
    """Classify one message of ``[prefix/]hub/v1/gw/{id}/cmdreport``.

    Poison (refused whole, nothing acked but the MQTT message): a topic that
    is not a cmdreport topic, a payload too large (size first) or not a
    CommandReports, a sender that is not the topic's gateway, a bad time or
    count. Otherwise each report is checked on its own
    (``check_command_report``): a refused one is a RefusedReport, the rest
    go on to the store.
    """
    try:
        gateway_id, kind = parse_gateway_topic(topic, prefix)
        if kind != "cmdreport":
            raise InvalidTopicError(f"topic {topic!r} is not a cmdreport topic")
    except InputError as exc:
        return PoisonReports(topic, None, exc.reason, str(exc), payload)
    try:
        # Size first, syntax, types, sender id, time and count: each report alone below.
        message = decode_command_reports(payload, each=False)
    except InputError as exc:
        return PoisonReports(topic, gateway_id, exc.reason, str(exc), payload)
    if message.gateway_id != gateway_id:
        # Not acked: a gateway's Ack goes to the gateway that sent it, and
        # this one names another.
        return PoisonReports(
            topic,
            gateway_id,
            GATEWAY_MISMATCH,
            f"reports of gateway {message.gateway_id!r} published by {gateway_id!r}",
            payload,
        )
    reports: list[CommandReport] = []
    refused: list[RefusedReport] = []
    for report in message.reports:
        try:
            reports.append(check_command_report(report))
        except InputError as exc:
            refused.append(RefusedReport(report, exc.reason, f"report {_quote(report)}: {exc}"))
    return ReportsMessage(topic, gateway_id, payload, reports, refused)


def _quote(report: CommandReport) -> str:
    return repr(report.report_id[: _QUOTE_CHARS * 2])


@dataclass(frozen=True, slots=True)
class StoredCommand:
    """What a report is checked against: the stored command's gateway and device."""

    gateway_id: str
    device_id: str


def refuse_report(
    report: CommandReport, stored: StoredCommand | None, *, gateway_id: str
) -> RefusedReport | None:
    """Why ``gateway_id``'s report may not touch the stored command, or None if it may."""
    if stored is None:
        return RefusedReport(
            report, UNKNOWN_COMMAND, f"report {_quote(report)}: no command {report.command_id!r}"
        )
    if stored.gateway_id != gateway_id:
        return RefusedReport(
            report,
            COMMAND_NOT_OWNED,
            f"report {_quote(report)}: command {report.command_id!r} was sent through "
            f"{stored.gateway_id!r}, not {gateway_id!r}",
        )
    if stored.device_id != report.device_id:
        return RefusedReport(
            report,
            COMMAND_NOT_OWNED,
            f"report {_quote(report)}: command {report.command_id!r} is for device "
            f"{stored.device_id!r}, not {report.device_id[:_QUOTE_CHARS]!r}",
        )
    return None


def report_ack(message: ReportsMessage, *, now_ms: int) -> Ack | None:
    """The Ack for a message once it is stored: every report id the gateway may drop.

    The good reports (stored now, or before: the same report again) and the
    refused ones whose id reads as ``{command_id}.{state}`` (a poison report
    acked so that the gateway stops resending it), each once, in order.
    """
    ids = dict.fromkeys(
        [r.report_id for r in message.reports]
        + [x.report.report_id for x in message.refused if ackable(x.report)]
    )
    if not ids:
        return None
    return Ack(batch_ids=[], ts_ms=now_ms, reports=list(ids))
