"""`cityhub devices command` and `cityhub commands list | show | cancel`: commands to devices.

An operator asks for a command (checked against the device type's catalog
entry, stored, audited with the ``operator`` setting); ingest's dispatcher
sends it to the device's gateway, which delivers it and reports its states.
``--wait`` follows those states as ingest stores them. The work is
``devices.commands``; this module parses options and shows rows, times on
Hanoi's clock, states in Vietnamese and English.

Exit codes of `cityhub devices command`: 0 queued (or, with --wait,
succeeded); 1 failed, expired or cancelled; 2 the request was refused
(nothing stored); 3 the database could not be reached or used; 4 --wait's
timeout ran out before a final state (the command goes on); 130 Ctrl-C
while waiting (the command goes on). The `commands` group exits 1 on any
error, as the other command groups do.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Final

import msgspec
import typer
from rich.table import Table

from cityhub.cli.context import (
    TIME_ZONE_NOTE,
    CliState,
    error_line,
    local_time,
    reported_errors,
    required_operator,
    since_time,
    state_of,
)
from cityhub.cli.devices import JsonOption, registry_of
from contracts.catalog import DEFAULT_COMMAND_TIMEOUT_S, DEVICE_TYPES
from contracts.commands import COMMAND_STATES, COMMAND_TTL_MAX_S, FINAL_STATES, STATE_LABELS
from contracts.errors import HubError, InputError, SettingsError
from contracts.wording import choose_noun

if TYPE_CHECKING:
    from devices.commands import CommandEvent, CommandRegistry, CommandRow

app = typer.Typer(
    # Help is printed as written: ids, patterns and TOML sections have [ ] in them.
    rich_markup_mode=None,
    help="Commands sent to devices: list them, show one with its history, cancel one.",
    no_args_is_help=True,
)

EXIT_SUCCEEDED: Final = 0
EXIT_FAILED: Final = 1  # failed, expired or cancelled
EXIT_REFUSED: Final = 2  # the request was refused: nothing stored
EXIT_UNAVAILABLE: Final = 3  # the database could not be reached or used
EXIT_PENDING: Final = 4  # --wait's timeout ran out; the command goes on
EXIT_INTERRUPTED: Final = 130  # Ctrl-C while waiting (128 + SIGINT); the command goes on

DEFAULT_TTL: Final = "10m"
# --wait re-reads the command this often when no notice comes (a notice lost
# with a reconnect, or an ingest that does not notify): half a second is
# quicker than a person notices and costs one indexed read.
POLL_INTERVAL_S: Final = 0.5
# --wait's default: the command's ttl, its device's time to answer, and the
# dispatcher's grace before it expires a command never sent (30 s), plus a
# margin: by then every command running normally is final.
WAIT_MARGIN_S: Final = 60.0

_DURATION_RE: Final = re.compile(r"(?P<n>[0-9]{1,9})(?P<unit>s|m|h|d)?")
_UNIT_S: Final = {"s": 1, "m": 60, "h": 3600, "d": 86_400, None: 1}


def parse_seconds(text: str, option: str) -> int:
    """'90', '90s', '10m', '2h', '1d' -> whole seconds (SettingsError naming ``option``)."""
    match = _DURATION_RE.fullmatch(text.strip())
    if match is None:
        raise SettingsError(option, f"{text!r} is not a duration like 90s, 10m, 2h or 1d")
    return int(match.group("n")) * _UNIT_S[match.group("unit")]


def parse_ttl(text: str) -> int:
    ttl_s = parse_seconds(text, "--ttl")
    if not 1 <= ttl_s <= COMMAND_TTL_MAX_S:
        raise SettingsError(
            "--ttl", f"{text!r}: a command's ttl is 1 s to {COMMAND_TTL_MAX_S // 3600} h (1d)"
        )
    return ttl_s


def parse_since(text: str, now: datetime) -> datetime:
    """'2h' (that long before ``now``) or an ISO date/time (UTC if it names no offset)."""
    return since_time(text, now, lambda t: parse_seconds(t, "--since"))


def parse_states(values: Sequence[str]) -> tuple[str, ...]:
    states: dict[str, None] = {}
    for value in values:
        for item in value.split(","):
            name = item.strip()
            if name == "final":
                states.update(dict.fromkeys(sorted(FINAL_STATES)))
            elif name in COMMAND_STATES:
                states[name] = None
            else:
                known = ", ".join((*COMMAND_STATES, "final"))
                raise SettingsError("--state", f"{name!r} is not one of {known}")
    return tuple(states)


def state_label(state: str) -> str:
    """The label "thành công / succeeded": Vietnamese, then English."""
    vi, en = STATE_LABELS.get(state, (state, state))
    return f"{vi} / {en}"


def _state_cell(row: CommandRow) -> str:
    label = state_label(row.state)
    if row.cancel_requested_at is not None and not row.final:
        label += " (đã yêu cầu huỷ / cancel requested)"
    return label


def _args_text(args: dict[str, object]) -> str:
    return " ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in sorted(args.items()))


def event_line(event: CommandEvent) -> str:
    """One state as --wait and `show` print it: Hanoi time, label, the reporter's detail."""
    line = f"{local_time(event.ts)}  {state_label(event.state)}"
    return f"{line} — {event.detail}" if event.detail else line


@contextmanager
def _commands(state: CliState) -> Iterator[CommandRegistry]:
    from devices.commands import CommandRegistry

    with registry_of(state) as registry:
        yield CommandRegistry(registry.conn, schema=registry.schema)


@contextmanager
def _exit_codes(state: CliState) -> Iterator[None]:
    """A refused request exits 2, a database that fails 3; one line, no traceback."""
    try:
        yield
    except HubError as exc:
        state.err.print(error_line(exc), highlight=False, soft_wrap=True)
        refused = isinstance(exc, InputError | SettingsError)
        raise typer.Exit(EXIT_REFUSED if refused else EXIT_UNAVAILABLE) from None


def command(
    ctx: typer.Context,
    device_id: Annotated[str, typer.Argument(help="The device's id.")],
    name: Annotated[
        str,
        typer.Argument(
            help="The command, one of the device type's (`cityhub catalog show TYPE` lists them)."
        ),
    ],
    arg: Annotated[
        list[str] | None,
        typer.Option(
            "--arg",
            help="An argument as key=value (repeat for each: --arg interval_s=60);"
            " checked against the catalog.",
        ),
    ] = None,
    ttl: Annotated[
        str,
        typer.Option(
            help="How long it may wait for its device (offline, asleep) before it expires:"
            " 90s, 10m, 2h or 1d (at most 1d).",
        ),
    ] = DEFAULT_TTL,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait",
            help="Follow its states until it ends; exit 0 if it succeeded, 1 if it failed,"
            " expired or was cancelled.",
        ),
    ] = False,
    timeout: Annotated[
        str | None,
        typer.Option(
            help="With --wait: stop waiting after this long (exit 4; the command goes on)."
            " Default: its ttl plus its device's time to answer plus 90 s.",
        ),
    ] = None,
) -> None:
    """Send a command to a device: checked against its type's catalog entry, then queued.

    The request is refused, and nothing stored, if the device is unknown,
    revoked, disabled or has no gateway, or if the catalog refuses it (an
    unknown command or arg, a value out of bounds, a command a serial
    device's protocol cannot carry). A queued command is sent to the device's
    gateway, which delivers it when the device is online, until its ttl runs
    out. Audited with the `operator` setting. Times are Hanoi's
    (Asia/Ho_Chi_Minh).

    Exit codes: 0 queued (with --wait: succeeded), 1 failed, expired or
    cancelled, 2 refused, 3 database unreachable, 4 --wait timed out, 130
    interrupted (Ctrl-C); after 4 and 130 the command goes on.
    """
    state = state_of(ctx)
    with _exit_codes(state):
        operator = required_operator(state, "a command")
        ttl_s = parse_ttl(ttl)
        if timeout is not None and not wait:
            raise SettingsError("--timeout", "applies with --wait only")
        timeout_s = None if timeout is None else parse_seconds(timeout, "--timeout")
        with _commands(state) as commands:
            if wait:
                # Before the command exists, so that no notice of it can be missed.
                commands.listen()
            row = commands.ask(device_id, name, arg or [], ttl_s=ttl_s, operator=operator)
            state.console.print(
                f"Đã xếp hàng / Queued: {row.command_id} {row.name} {_args_text(row.args)}".rstrip()
                + f" → {row.device_id} (gateway {row.gateway_id});"
                f" hết hạn / expires {local_time(row.expires_at)}",
                highlight=False,
                soft_wrap=True,
            )
            if not wait:
                state.console.print(
                    f"  theo dõi / follow: cityhub commands show {row.command_id}",
                    highlight=False,
                )
                return
            if timeout_s is None:
                spec = DEVICE_TYPES[row.device_type].command(row.name)
                answer_s = spec.timeout_s if spec else DEFAULT_COMMAND_TIMEOUT_S
                timeout_s = int(row.ttl_s + answer_s + 30 + WAIT_MARGIN_S)
            code = follow(state, commands, row.command_id, timeout_s=timeout_s)
    raise typer.Exit(code)


def follow(state: CliState, commands: CommandRegistry, command_id: str, *, timeout_s: float) -> int:
    """Print each state ``command_id`` reaches, in order, until a final one; the exit code.

    Woken by ingest's notices; reads again every POLL_INTERVAL_S without one.
    """
    deadline = time.monotonic() + timeout_s
    shown: set[str] = set()
    try:
        while True:
            row = commands.command(command_id)
            for event in commands.events(command_id):
                if event.state not in shown:
                    shown.add(event.state)
                    state.console.print(event_line(event), highlight=False, soft_wrap=True)
            if row.final:
                if row.state not in shown:  # a final state stored without its event
                    state.console.print(
                        f"{local_time(row.state_at)}  {state_label(row.state)}"
                        + (f" — {row.detail}" if row.detail else ""),
                        highlight=False,
                        soft_wrap=True,
                    )
                if row.answer:
                    state.console.print(
                        f"  trả lời / answer: {_args_text(row.answer)}", highlight=False
                    )
                return EXIT_SUCCEEDED if row.state == "succeeded" else EXIT_FAILED
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                state.err.print(
                    f"Hết thời gian chờ / wait timed out: {command_id} is still"
                    f" {state_label(row.state)}; it goes on"
                    f" (cityhub commands show {command_id}).",
                    highlight=False,
                    soft_wrap=True,
                )
                return EXIT_PENDING
            commands.wait_for_change(command_id, min(POLL_INTERVAL_S, left_s))
    except KeyboardInterrupt:
        state.err.print(
            f"Ngừng theo dõi; lệnh vẫn tiếp tục / Stopped following; the command goes on"
            f" (cityhub commands show {command_id}, cityhub commands cancel {command_id}).",
            highlight=False,
            soft_wrap=True,
        )
        return EXIT_INTERRUPTED


# Column labels: Vietnamese first, English after.
_COLUMNS: Final = (
    "mã / id",
    "thiết bị / device",
    "gateway",
    "lệnh / command",
    "tham số / args",
    "trạng thái / state",
    f"lúc / at ({TIME_ZONE_NOTE})",
    "chi tiết / detail",
    "tạo lúc / created",
    "hết hạn / expires",
    "người gửi / operator",
)


def _cells(row: CommandRow) -> list[str]:
    return [
        row.command_id,
        row.device_id,
        row.gateway_id,
        row.name,
        _args_text(row.args),
        _state_cell(row),
        local_time(row.state_at),
        row.detail,
        local_time(row.created_at),
        local_time(row.expires_at),
        row.operator,
    ]


def _table(rows: Sequence[CommandRow]) -> Table:
    commands = choose_noun(len(rows), "command", "commands")
    table = Table(title=f"{len(rows)} lệnh / {commands}, mới nhất trước / newest first")
    for column in _COLUMNS:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*_cells(row))
    return table


@app.command(name="list")
def list_commands(
    ctx: typer.Context,
    device: Annotated[str | None, typer.Option(help="Only commands to this device.")] = None,
    gateway: Annotated[str | None, typer.Option(help="Only commands through this gateway.")] = None,
    state_filter: Annotated[
        list[str] | None,
        typer.Option(
            "--state",
            help="Only these states (repeat or comma-separate): queued, sent, delivered,"
            " succeeded, failed, expired, cancelled, or final (the last four).",
        ),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(help="Only commands asked since: a duration ago (2h, 1d) or an ISO time."),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, newest first.")] = 50,
    as_json: JsonOption = False,
) -> None:
    """List commands to devices, newest first: state, when reached (Hanoi time), who asked.

    --json prints the rows as stored, times in UTC (ISO 8601).
    """
    from devices.commands import CommandFilter

    state = state_of(ctx)
    with reported_errors(state):
        where = CommandFilter(
            device_id=device,
            gateway_id=gateway,
            states=parse_states(state_filter or []),
            since=parse_since(since, datetime.now(UTC)) if since else None,
            limit=limit,
        )
        with _commands(state) as commands:
            rows = commands.commands(where)
    if as_json:
        typer.echo(msgspec.json.encode(rows).decode())
        return
    state.console.print(_table(rows))


@app.command()
def show(
    ctx: typer.Context,
    command_id: Annotated[str, typer.Argument(help="The command's id (c-...).")],
    as_json: JsonOption = False,
) -> None:
    """Show one command and every state it reached: when, who reported it, what it said."""
    state = state_of(ctx)
    with reported_errors(state), _commands(state) as commands:
        row = commands.command(command_id)
        events = commands.events(command_id)
    if as_json:
        typer.echo(msgspec.json.encode({"command": row, "events": events}).decode())
        return
    table = Table(title=f"lệnh / command {row.command_id}", show_header=False)
    table.add_column("field")
    table.add_column("value", overflow="fold")
    for column, cell in zip(_COLUMNS, _cells(row), strict=True):
        table.add_row(column, cell)
    table.add_row("thời hạn / ttl", f"{row.ttl_s} s")
    table.add_row("trả lời / answer", _args_text(row.answer) if row.answer else "")
    table.add_row("số lần gửi / sends", str(row.sends))
    table.add_row("gửi lần cuối / last sent", local_time(row.last_sent_at))
    if row.cancel_requested_at is not None:
        table.add_row(
            "yêu cầu huỷ / cancel asked",
            f"{local_time(row.cancel_requested_at)} ({row.cancelled_by})",
        )
    state.console.print(table)
    history = Table(title="lịch sử / history")
    for column in (
        f"lúc / at ({TIME_ZONE_NOTE})",
        "trạng thái / state",
        "nguồn / source",
        "nhận lúc / received",
        "chi tiết / detail",
    ):
        history.add_column(column, overflow="fold")
    for e in events:
        history.add_row(
            local_time(e.ts), state_label(e.state), e.source, local_time(e.received_at), e.detail
        )
    state.console.print(history)


@app.command()
def cancel(
    ctx: typer.Context,
    command_id: Annotated[str, typer.Argument(help="The command's id (c-...).")],
) -> None:
    """Cancel a command that has not reached its device; audited with the `operator` setting.

    A command never sent to its gateway is cancelled at once. One its gateway
    may hold gets a cancel request: it is cancelled when the gateway confirms
    (a command the device got meanwhile ends as usual). A command already
    delivered or ended cannot be cancelled.
    """
    state = state_of(ctx)
    with reported_errors(state):
        operator = required_operator(state, "cancelling a command")
        with _commands(state) as commands:
            outcome = commands.cancel(command_id, operator=operator)
    row = outcome.row
    if outcome.cancelled:
        state.console.print(
            f"Đã huỷ / Cancelled: {row.command_id} ({row.name} → {row.device_id}),"
            " chưa từng được gửi / never sent",
            highlight=False,
        )
        return
    state.console.print(
        f"Đã yêu cầu huỷ / Cancel requested: {row.command_id} ({row.name} → {row.device_id})"
        f" is {state_label(row.state)}; gateway {row.gateway_id} confirms it"
        f" (cityhub commands show {row.command_id}).",
        highlight=False,
        soft_wrap=True,
    )
