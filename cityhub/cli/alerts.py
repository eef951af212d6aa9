"""`cityhub alerts`: run the alerts job; list, show, acknowledge, assign and comment on alerts.

Tables speak the operators' language: severities in the shared vocabulary
(``contracts.severity``: "Cao / Major"), the alerts' bilingual texts as
stored, and times on Hanoi's clock (``cityhub.cli.context.local_time``).
``--json`` keeps the raw values (severity names, UTC times).

With ``alerts.notify.alertmanager_url`` set, an acknowledgement also
silences the alert in Alertmanager (``alerts.notify.silence_for``); when
Alertmanager cannot be reached the acknowledgement stands, the command warns,
and the alerts job creates the silence at its next full post.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Final

import msgspec
import typer
from rich.markup import escape
from rich.table import Table

from adapters.logs import add_log_fields
from cityhub.cli.context import (
    TIME_ZONE_NOTE,
    CliState,
    error_line,
    local_time,
    reported_errors,
    since_time,
    state_of,
)
from cityhub.cli.db import database_url
from contracts.errors import AlertmanagerRefusedError, HubError, InputError, SettingsError
from contracts.schema import ALERT_STATES, SEVERITIES
from contracts.settings import describe_settings, load_settings
from contracts.severity import ALERT_EN, ALERT_VI, severity_label
from contracts.wording import choose_noun, count_noun

if TYPE_CHECKING:
    from alerts.store import AlertRow, AlertStore, NoteRow

app = typer.Typer(
    # Help is printed as written: ids, patterns and TOML sections have [ ] in them.
    rich_markup_mode=None,
    help="Alert rules over the readings (numpy jobs), VN_AQI, and the operators' alert list.",
    no_args_is_help=True,
)

# `--state` also takes these groups of states.
STATE_GROUPS = {
    "active": ("active_unack", "active_ack"),
    "cleared": ("cleared_unack", "cleared_ack"),
    "unacked": ("active_unack", "cleared_unack"),
}
# The alerts job's gauge of its last completed cycle (alerts.metrics).
LAST_CYCLE_SAMPLE: Final = "cityhub_alerts_last_cycle_timestamp_seconds"
_SEVERITY_STYLE = {"critical": "bold red", "major": "red", "minor": "yellow", "warning": "cyan"}


@contextmanager
def _store(state: CliState) -> Iterator[AlertStore]:
    from alerts.store import AlertStore

    settings = state.settings
    with AlertStore(
        url=database_url(state),
        schema=settings.database.schema,
        connect_timeout_s=settings.database.connect_timeout_s,
        os_user=state.os_user,
    ) as store:
        yield store


def _seconds(text: str, option: str) -> float:
    from cityhub.cli.sim import parse_duration

    try:
        return parse_duration(text)
    except SettingsError:
        raise SettingsError(option, f"{text!r} is not a duration like 10s, 1m or 1h") from None


def _since(text: str) -> datetime:
    """'2h' (that long ago) or an ISO date/time (UTC if it names no offset)."""
    return since_time(text, datetime.now(UTC), lambda t: _seconds(t, "--since"))


def _states(values: list[str]) -> tuple[str, ...]:
    result: dict[str, None] = {}
    for value in values:
        for item in value.split(","):
            name = item.strip()
            if name in STATE_GROUPS:
                result.update(dict.fromkeys(STATE_GROUPS[name]))
            elif name in ALERT_STATES:
                result[name] = None
            else:
                known = ", ".join((*ALERT_STATES, *STATE_GROUPS))
                raise SettingsError("--state", f"{name!r} is not one of {known}")
    return tuple(result)


def _severities(values: list[str]) -> tuple[str, ...]:
    result: dict[str, None] = {}
    for value in values:
        for item in value.split(","):
            name = item.strip()
            if name not in SEVERITIES:
                raise SettingsError("--severity", f"{name!r} is not one of {', '.join(SEVERITIES)}")
            result[name] = None
    return tuple(result)


def _value(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


@app.command()
def run(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="Settings file ([alerts], [database]).", dir_okay=False
        ),
    ] = None,
    every: Annotated[
        str | None,
        typer.Option(help="Evaluation interval, like 10s or 1m (default: alerts.interval_s)."),
    ] = None,
    once: Annotated[
        bool, typer.Option("--once", help="Run one cycle (catching up if behind) and exit.")
    ] = False,
) -> None:
    """Run the alerts job until Ctrl-C (SIGINT) or SIGTERM.

    Every interval it fetches only the readings newer than each device's
    last, evaluates the rules (shipped defaults plus alerts.rules_path) over
    (devices x samples) windows, raises, escalates and clears alerts, and
    writes hourly and daily VN_AQI. After downtime it replays the missed
    evaluation times. A database left unset uses the embedded default's.
    """
    from alerts.service import AlertsJob, load_job_rules, serve

    state = state_of(ctx)
    with reported_errors(state):
        settings = load_settings(config, state.environ) if config else state.settings
        alerts = settings.alerts
        if every is not None:
            interval_s = _seconds(every, "--every")
            if interval_s <= 0:
                raise SettingsError("--every", "must be positive")
            alerts = msgspec.structs.replace(alerts, interval_s=interval_s)
        settings = msgspec.structs.replace(
            settings,
            alerts=alerts,
            database=msgspec.structs.replace(
                settings.database, url=settings.database.url or database_url(state)
            ),
        )
        logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
        add_log_fields(service="alerts")
        logging.getLogger(__name__).info("settings: %s", describe_settings(settings))
        rules = load_job_rules(settings.alerts)
        job = AlertsJob(settings=settings.alerts, database=settings.database, rules=rules)
        report = asyncio.run(serve(job, once=once))
    if once and report is not None:
        state.console.print(
            f"evaluated {count_noun(len(report.evaluated), 'time', 'times')}:"
            f" {report.raised} raised, "
            f"{report.escalated} escalated, {report.cleared} cleared; "
            f"{report.aqi_hourly} hourly and {report.aqi_daily} daily AQI rows"
        )


@app.command()
def health(
    ctx: typer.Context,
    max_age: Annotated[
        float,
        typer.Option(
            "--max-age",
            help="Seconds since the job's last completed cycle above which it is unhealthy.",
            min=0.001,
        ),
    ],
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="Settings file ([alerts] metrics_port).", dir_okay=False
        ),
    ] = None,
    timeout: Annotated[
        float,
        typer.Option(help="Seconds to wait for the job's /metrics to answer.", min=0.001),
    ] = 3.0,
) -> None:
    """Exit 0 if the running alerts job completed a cycle within --max-age seconds, else 1.

    Reads the job's own /metrics (alerts.metrics_port, on loopback): a job
    that is stopped, hung in a cycle or waiting on its database has no recent
    cycle. A health check for containers and service managers.
    """
    from adapters.metrics import MetricsAddress, scrape_sample

    state = state_of(ctx)
    with reported_errors(state):
        settings = load_settings(config, state.environ) if config else state.settings
        alerts = settings.alerts
        if not alerts.metrics_port:
            raise SettingsError("alerts.metrics_port", "0: the job serves no /metrics to read")
        address = MetricsAddress(alerts.metrics_host, alerts.metrics_port, section="alerts")
        last_s = scrape_sample(address, LAST_CYCLE_SAMPLE, timeout_s=timeout)
        now_s = time.time()
        if last_s is None:
            state.err.print(
                "không khỏe / unhealthy: chưa có chu kỳ nào hoàn tất / no cycle completed yet",
                highlight=False,
            )
            raise typer.Exit(1)
        age_s = max(0.0, now_s - last_s)
        when = local_time(datetime.fromtimestamp(last_s, UTC))
        if age_s > max_age:
            state.err.print(
                f"không khỏe / unhealthy: chu kỳ cuối {age_s:.0f} s trước / last cycle"
                f" {age_s:.0f} s ago ({when}), quá / over --max-age {max_age:g} s",
                highlight=False,
            )
            raise typer.Exit(1)
        state.console.print(
            f"ok: chu kỳ cuối {age_s:.0f} s trước / last cycle {age_s:.0f} s ago ({when})",
            highlight=False,
        )


@app.command(name="list")
def list_alerts(
    ctx: typer.Context,
    state_filter: Annotated[
        list[str] | None,
        typer.Option(
            "--state",
            help="Only these states (repeat or comma-separate): active_unack, active_ack, "
            "cleared_unack, cleared_ack, or the groups active, cleared, unacked.",
        ),
    ] = None,
    severity: Annotated[
        list[str] | None,
        typer.Option(help="Only these severities: critical, major, minor, warning."),
    ] = None,
    site: Annotated[str | None, typer.Option(help="Only alerts of this site id.")] = None,
    rule: Annotated[str | None, typer.Option(help="Only alerts of this rule id.")] = None,
    device: Annotated[str | None, typer.Option(help="Only alerts of this device id.")] = None,
    since: Annotated[
        str | None,
        typer.Option(help="Only alerts raised or changed since: a duration ago (2h) or ISO time."),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, newest first.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
) -> None:
    """List alerts, newest first (a table, or JSON with --json)."""
    from alerts.store import AlertFilter

    state = state_of(ctx)
    with reported_errors(state):
        where = AlertFilter(
            states=_states(state_filter or []),
            severities=_severities(severity or []),
            site_id=site,
            rule_id=rule,
            device_id=device,
            since=_since(since) if since else None,
            limit=limit,
        )
        with _store(state) as store:
            rows = store.list_alerts(where)
    if as_json:
        typer.echo(msgspec.json.encode(rows).decode())
        return
    state.console.print(_alerts_table(rows))


# Column labels of the alert tables: Vietnamese first, English after.
_COLUMNS: Final = (
    "mã / id",
    "trạng thái / state",
    "mức độ / severity",
    "quy tắc / rule",
    "thiết bị / device",
    "điểm / site",
    "giá trị / value",
    f"phát sinh / raised ({TIME_ZONE_NOTE})",
    "kết thúc / cleared",
    "xác nhận bởi / acked by",
    "nội dung / summary",
    "người xử lý / assignee",
)


def _alerts_table(rows: Sequence[AlertRow]) -> Table:
    alerts = choose_noun(len(rows), ALERT_EN.lower(), f"{ALERT_EN.lower()}s")
    table = Table(title=f"{len(rows)} {ALERT_VI.lower()} / {alerts}")
    for column in _COLUMNS:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*_cells(row))
    return table


def _cells(row: AlertRow) -> list[str]:
    style = _SEVERITY_STYLE.get(row.severity, "")
    return [
        str(row.alert_id),
        row.state,
        f"[{style}]{severity_label(row.severity)}[/]" if style else severity_label(row.severity),
        row.rule_id,
        row.device_id,
        row.site_id or "",
        _value(row.value),
        local_time(row.raised_at),
        local_time(row.cleared_at),
        row.acked_by or "",
        row.message,
        row.assignee or "",
    ]


@app.command()
def show(
    ctx: typer.Context,
    alert_id: Annotated[int, typer.Argument(help="The alert's id (from `cityhub alerts list`).")],
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of tables.")] = False,
) -> None:
    """Show one alert and every transition it went through."""
    state = state_of(ctx)
    with reported_errors(state), _store(state) as store:
        alert, transitions = store.alert(alert_id)
        notes = store.notes(alert_id)
    if as_json:
        shown = {"alert": alert, "transitions": transitions, "notes": notes}
        typer.echo(msgspec.json.encode(shown).decode())
        return
    table = Table(title=f"{ALERT_VI} / {ALERT_EN} {alert.alert_id}", show_header=False)
    table.add_column("field")
    table.add_column("value", overflow="fold")
    for name, cell in zip(_COLUMNS, _cells(alert), strict=True):
        table.add_row(name, cell)
    table.add_row("mô tả / description", alert.description)
    table.add_row("xác nhận lúc / acked at", local_time(alert.acked_at))
    table.add_row("cập nhật / updated", local_time(alert.updated_at))
    table.add_row("im lặng / silence", alert.silence_id or "")
    state.console.print(table)
    history = Table(title="chuyển trạng thái / transitions")
    for column in (
        f"thời điểm / time ({TIME_ZONE_NOTE})",
        "từ / from",
        "sang / to",
        "mức độ / severity",
        "giá trị / value",
        "ghi chú / note",
    ):
        history.add_column(column)
    for t in transitions:
        history.add_row(
            local_time(t.ts),
            t.from_state or "",
            t.to_state,
            severity_label(t.severity),
            _value(t.value),
            t.note,
        )
    state.console.print(history)
    if notes:
        state.console.print(_notes_table(notes))


def _notes_table(notes: Sequence[NoteRow]) -> Table:
    table = Table(title="ghi chú / notes")
    for column in (
        f"lúc / time ({TIME_ZONE_NOTE})",
        "bởi / by",
        "loại / kind",
        "nội dung / text",
    ):
        table.add_column(column, overflow="fold")
    for n in notes:
        table.add_row(local_time(n.ts), n.operator, n.kind, n.text)
    return table


@app.command()
def ack(
    ctx: typer.Context,
    alert_ids: Annotated[list[int], typer.Argument(help="Ids of the alerts to acknowledge.")],
    by: Annotated[
        str | None,
        typer.Option(help="Who acknowledges (default: the `operator` setting)."),
    ] = None,
    comment: Annotated[
        str | None,
        typer.Option(help="Why, or what is being done (one line); the silence's comment too."),
    ] = None,
) -> None:
    """Acknowledge alerts: active ones become active_ack, cleared ones cleared_ack.

    Each id is handled on its own; an unknown or already acknowledged id is
    reported and the command exits 1 after handling the others. With
    Alertmanager configured, an active alert is also silenced there; if
    that fails the acknowledgement stands and a warning says so.
    """
    from alerts.lifecycle import check_note

    state = state_of(ctx)
    who = (by if by is not None else state.settings.operator).strip()
    failed = 0
    with reported_errors(state):
        if not who:
            raise SettingsError("operator", "say who acknowledges: --by NAME or set `operator`")
        text = None if comment is None else check_note(comment)
        with _store(state) as store:
            for alert_id in alert_ids:
                now_ms = time.time_ns() // 1_000_000
                try:
                    row = store.ack(alert_id, by=who, now_ms=now_ms, comment=text)
                except InputError as exc:  # unknown, or acknowledged before
                    state.err.print(error_line(exc), highlight=False, soft_wrap=True)
                    failed += 1
                    continue
                state.console.print(f"alert {row.alert_id}: {row.state} (by {row.acked_by})")
                _silence(state, store, row, now_ms)
    if failed:
        raise typer.Exit(1)


def _silence(state: CliState, store: AlertStore, row: AlertRow, now_ms: int) -> None:
    """Silence the acknowledged ``row`` in Alertmanager, if configured; warn if that fails."""
    from adapters.alertmanager import create_silence, expire_silence
    from alerts.notify import silence_for

    notify = state.settings.alerts.notify
    if not notify.alertmanager_url or row.state != "active_ack":
        return
    url, timeout_s = notify.alertmanager_url, notify.timeout_s
    try:
        if row.silence_id:  # an earlier acknowledgement's, of the severity before an escalation
            expire_silence(url, row.silence_id, timeout_s)
        silence = silence_for(
            rule_id=row.rule_id,
            device_id=row.device_id,
            severity=row.severity,
            now_ms=now_ms,
            ends_ms=now_ms + round(notify.silence_s * 1000),
            created_by=row.acked_by or "",
            comment=row.ack_comment,
        )
        silence_id = create_silence(url, silence, timeout_s)
        if not store.set_silence(row.alert_id, silence_id, replacing=row.silence_id):
            expire_silence(url, silence_id, timeout_s)  # the job made one meanwhile, or a clear
            return
    except HubError as exc:
        later = "" if isinstance(exc, AlertmanagerRefusedError) else "; the alerts job retries"
        state.err.print(
            f"[yellow]warning:[/yellow] alert {row.alert_id} is acknowledged, but its "
            f"Alertmanager silence could not be created{later}: {escape(str(exc))}",
            highlight=False,
            soft_wrap=True,
        )
        return
    state.console.print(f"alert {row.alert_id}: silenced in Alertmanager ({silence_id})")


@app.command()
def assign(
    ctx: typer.Context,
    alert_id: Annotated[int, typer.Argument(help="The alert's id.")],
    to: Annotated[str, typer.Option("--to", help="Who the alert is assigned to.")],
    by: Annotated[
        str | None, typer.Option(help="Who assigns (default: the `operator` setting).")
    ] = None,
) -> None:
    """Assign an alert to someone (any state but cleared_ack); shown by list and show."""
    from alerts.lifecycle import check_note

    state = state_of(ctx)
    with reported_errors(state):
        who = _operator(state, by, "assigns")
        name = check_note(to, "assignee")
        with _store(state) as store:
            row = store.assign(alert_id, to=name, by=who, now_ms=time.time_ns() // 1_000_000)
    state.console.print(f"alert {row.alert_id}: assigned to {row.assignee} (by {who})")


@app.command(name="comment")
def comment_on(
    ctx: typer.Context,
    alert_id: Annotated[int, typer.Argument(help="The alert's id.")],
    text: Annotated[str, typer.Argument(help="The comment: one line, at most 1000 characters.")],
    by: Annotated[
        str | None, typer.Option(help="Who comments (default: the `operator` setting).")
    ] = None,
) -> None:
    """Add a comment to an alert (any state); shown by show."""
    from alerts.lifecycle import check_note

    state = state_of(ctx)
    with reported_errors(state):
        who = _operator(state, by, "comments")
        note = check_note(text)
        with _store(state) as store:
            row = store.comment(alert_id, text=note, by=who, now_ms=time.time_ns() // 1_000_000)
    state.console.print(f"alert {row.alert_id}: comment added (by {who})")


def _operator(state: CliState, by: str | None, does: str) -> str:
    who = (by if by is not None else state.settings.operator).strip()
    if not who:
        raise SettingsError("operator", f"say who {does}: --by NAME or set `operator`")
    return who
