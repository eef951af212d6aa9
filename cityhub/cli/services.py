"""`cityhub services`: start, stop and inspect the embedded private broker and database."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from cityhub.cli.context import CliState, reported_errors, state_of

if TYPE_CHECKING:
    from cityhub.localstack.stack import LocalStack, ServiceStatus

app = typer.Typer(
    # Help is printed as written: ids, patterns and TOML sections have [ ] in them.
    rich_markup_mode=None,
    help="Private Mosquitto and PostgreSQL/TimescaleDB for the embedded default.",
    no_args_is_help=True,
)


def stack_of(state: CliState) -> LocalStack:
    # Imported here: the embedded database needs psycopg, installed with the central extra.
    from cityhub.localstack.stack import LocalStack

    return LocalStack(state_dir=state.state_dir, local=state.settings.local, is_root=state.is_root)


def _show(state: CliState, statuses: list[ServiceStatus], title: str) -> None:
    """One line per server, URLs unbroken so they can be copied."""
    state.console.print(f"[bold]{title}[/bold]", highlight=False)
    for s in statuses:
        mark = "[green]running[/green]" if s.running else "[red]stopped[/red]"
        pid = f"pid {s.pid}" if s.pid else "-"
        state.console.print(
            f"  {s.name:<10} {mark}  {pid:<10} {s.url}\n  {'':<10} log {s.log}",
            highlight=False,
            soft_wrap=True,
        )


def _show_accounts(state: CliState, stack: LocalStack) -> None:
    """Which broker account each service connects with, and the file holding its password."""
    from cityhub.localstack.mosquitto import ADMIN_USER, EMBEDDED_SERVICES

    mq = stack.mosquitto()
    state.console.print(
        "broker accounts (password files readable by you only; services never use the admin one):",
        highlight=False,
    )
    rows = [
        (ADMIN_USER, "provisioning only (cityhub devices|gateways|broker)", mq.admin_password_path)
    ]
    uses = {
        "ingest": "ingest (cityhub ingest run, cityhub up)",
        "sim": "simulated fleet (cityhub sim run, cityhub up)",
        "monitor": "read-only gateway states (cityhub up's live view)",
    }
    for kind in EMBEDDED_SERVICES:
        username = mq.service_broker_username(kind)
        rows.append((username, uses[kind], mq.service_password_path(kind)))
    for username, use, path in rows:
        state.console.print(
            f"  {username:<15} {use}\n  {'':<15} password_file = {path}",
            highlight=False,
            soft_wrap=True,
        )


@app.command()
def up(ctx: typer.Context) -> None:
    """Start the private broker and database (initialising them on first use) and wait for them.

    Ports come from local.pg_port / local.mqtt_port (CITYHUB_LOCAL__PG_PORT,
    CITYHUB_LOCAL__MQTT_PORT); the state directory from local.state_dir.
    Passwords are written to files in the state directory, readable by you only.
    """
    state = state_of(ctx)
    with reported_errors(state):
        stack = stack_of(state)
        statuses = stack.up()
    _show(state, statuses, f"cityhub services in {state.state_dir}")
    state.console.print(
        f"database password (readable by you only): {state.state_dir / 'postgres.password'}",
        highlight=False,
        soft_wrap=True,
    )
    _show_accounts(state, stack)


@app.command()
def down(ctx: typer.Context) -> None:
    """Stop the private broker and database; no server process is left behind."""
    state = state_of(ctx)
    with reported_errors(state):
        statuses = stack_of(state).down()
    _show(state, statuses, "cityhub services stopped")


@app.command()
def status(ctx: typer.Context) -> None:
    """Show whether the private servers run, their pids, URLs (passwords masked) and logs.

    Exits 0 when both run, 3 when any is stopped.
    """
    state = state_of(ctx)
    with reported_errors(state):
        stack = stack_of(state)
        statuses = stack.status()
    _show(state, statuses, f"cityhub services in {state.state_dir}")
    _show_accounts(state, stack)
    if not all(s.running for s in statuses):
        raise typer.Exit(3)
