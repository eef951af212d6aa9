"""`cityhub ingest`: run the central ingest workers."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import msgspec
import typer

from adapters.logs import add_log_fields
from cityhub.cli.context import reported_errors, state_of
from cityhub.cli.db import database_url
from cityhub.cli.gateway import embedded_broker
from contracts.settings import describe_settings, load_settings

app = typer.Typer(
    # Help is printed as written: ids, patterns and TOML sections have [ ] in them.
    rich_markup_mode=None,
    help="Central ingest: batches from the gateways into TimescaleDB, exactly once.",
    no_args_is_help=True,
)


@app.command()
def run(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="Settings file ([ingest], [broker], [database]).", dir_okay=False
        ),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Worker processes (default: ingest.workers).")
    ] = None,
) -> None:
    """Run ingest workers until Ctrl-C (SIGINT) or SIGTERM.

    Workers share the batch stream through the MQTT v5 shared subscription
    $share/ingest/hub/v1/gw/+/batch, commit each group of batches in one
    transaction (COPY into staging, INSERT ... ON CONFLICT DO NOTHING), and ack
    to the gateways only after the commit. A broker or database left unset
    uses the embedded default's (its broker with the ingest.local account).
    """
    from ingest.workers import run_workers

    state = state_of(ctx)
    with reported_errors(state):
        settings = load_settings(config, state.environ) if config else state.settings
        settings = msgspec.structs.replace(
            settings,
            broker=embedded_broker(state, settings.broker, "ingest"),
            database=msgspec.structs.replace(
                settings.database, url=settings.database.url or database_url(state)
            ),
        )
        logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
        add_log_fields(service="ingest")
        logging.getLogger(__name__).info("settings: %s", describe_settings(settings))
        run_workers(settings, workers=workers or settings.ingest.workers)
