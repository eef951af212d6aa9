"""`cityhub db`: schema migrations, seed data, maintenance and status."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer
from rich.table import Table

from cityhub.cli.context import CliState, reported_errors, state_of

app = typer.Typer(
    help="Database schema migrations, seed data and maintenance.", no_args_is_help=True
)


def database_url(state: CliState) -> str:
    """database.url if set, else the embedded default's running server."""
    if state.settings.database.url:
        return state.settings.database.url
    # Imported here, as psycopg: installed with the central extra, not with the gateway one.
    from cityhub.localstack.stack import LocalStack

    stack = LocalStack(state_dir=state.state_dir, local=state.settings.local, is_root=state.is_root)
    return stack.database_url()


@app.command()
def migrate(ctx: typer.Context) -> None:
    """Apply pending schema migrations (safe to run any number of times).

    Creates the TimescaleDB extension, the metadata tables, one wide hypertable
    per device type, rejects, alerts and AQI tables, and hourly rollups:
    continuous aggregates with policies on the community edition, the
    project's own rollup tables and jobs on the Apache edition.
    """
    from cityhub import database

    state = state_of(ctx)
    settings = state.settings
    with reported_errors(state):
        url = database_url(state)
        with database.connect(url, timeout_s=settings.database.connect_timeout_s) as conn:
            report = database.migrate(
                conn, schema=settings.database.schema, storage=settings.storage
            )
    for m in report.applied:
        state.console.print(f"applied {m.version:>3}  {m.name}")
    state.console.print(
        f"schema {settings.database.schema!r}: {len(report.applied)} applied, "
        f"{report.already} already present; TimescaleDB edition: {report.edition.value}"
    )


@app.command()
def seed(ctx: typer.Context) -> None:
    """Load the Hanoi sites (service halls, ward offices, street monitors) into the sites table.

    Idempotent: existing sites are updated in place.
    """
    from cityhub import database

    state = state_of(ctx)
    settings = state.settings
    with reported_errors(state):
        sites = database.load_hanoi_sites()
        url = database_url(state)
        with database.connect(url, timeout_s=settings.database.connect_timeout_s) as conn:
            count = database.seed_sites(conn, schema=settings.database.schema, sites=sites)
    kinds: dict[str, int] = {}
    for site in sites:
        kinds[site.kind] = kinds.get(site.kind, 0) + 1
    detail = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
    state.console.print(f"seeded {count} Hanoi sites ({detail})")


@app.command()
def maintain(
    ctx: typer.Context,
    lookback_hours: Annotated[
        int, typer.Option(min=1, help="Recompute hourly rollups over this many past hours.")
    ] = 72,
) -> None:
    """Refresh hourly rollups and drop data past retention (Apache edition).

    On the community edition the server's own policies do this and the command
    only says so.
    """
    from cityhub import database

    state = state_of(ctx)
    settings = state.settings
    with reported_errors(state):
        url = database_url(state)
        with database.connect(url, timeout_s=settings.database.connect_timeout_s) as conn:
            report = database.maintain(
                conn,
                schema=settings.database.schema,
                now=datetime.now(UTC),
                lookback=timedelta(hours=lookback_hours),
            )
    if report.edition.value == "timescale":
        state.console.print("community edition: rollups and retention run as server policies")
    else:
        state.console.print(
            f"rollup rows written: {report.rollup_rows}; chunks dropped: {report.dropped_chunks}"
        )


@app.command()
def status(ctx: typer.Context) -> None:
    """Show the TimescaleDB edition and the applied migrations."""
    from cityhub import database

    state = state_of(ctx)
    settings = state.settings
    with reported_errors(state):
        url = database_url(state)
        with database.connect(url, timeout_s=settings.database.connect_timeout_s) as conn:
            edition = database.detect_edition(conn)
            rows = database.applied_versions(conn, schema=settings.database.schema)
    table = Table(title=f"schema {settings.database.schema!r} (TimescaleDB {edition.value})")
    for column in ("version", "migration", "applied at"):
        table.add_column(column)
    for version, name, at in rows:
        table.add_row(str(version), name, at.isoformat(timespec="seconds"))
    state.console.print(table)
    if not rows:
        state.console.print("no migrations applied: run `cityhub db migrate`")
