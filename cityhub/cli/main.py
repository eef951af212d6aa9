"""The `cityhub` command: global options, settings loading and the command groups.

Settings are loaded once here, in the root callback, and handed to the
commands through typer's context; logging is configured here too.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Final

import typer
from rich.console import Console

from adapters.logs import configure_logging
from cityhub.cli import alertmanager as alertmanager_cli
from cityhub.cli import alerts as alerts_cli
from cityhub.cli import audit as audit_cli
from cityhub.cli import backup as backup_cli
from cityhub.cli import broker as broker_cli
from cityhub.cli import catalog as catalog_cli
from cityhub.cli import commands as commands_cli
from cityhub.cli import db as db_cli
from cityhub.cli import devices as devices_cli
from cityhub.cli import gateway as gateway_cli
from cityhub.cli import gateways as gateways_cli
from cityhub.cli import grafana as grafana_cli
from cityhub.cli import ingest as ingest_cli
from cityhub.cli import pki as pki_cli
from cityhub.cli import services as services_cli
from cityhub.cli import sim as sim_cli
from cityhub.cli import sites as sites_cli
from cityhub.cli import soak as soak_cli
from cityhub.cli import status as status_cli
from cityhub.cli import up as up_cli
from cityhub.cli.context import CliState, error_line, os_user_name
from contracts.errors import HubError, SettingsError
from contracts.settings import load_settings

# The levels `--log-level` and the settings' log_level may name.
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

app = typer.Typer(
    # Help is printed as written: ids, patterns and TOML sections have [ ] in them.
    rich_markup_mode=None,
    name="cityhub",
    help="Smart-city sensor and device telemetry hub: services, storage and tools.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(services_cli.app, name="services")
app.add_typer(db_cli.app, name="db")
app.add_typer(gateway_cli.app, name="gateway")
app.add_typer(ingest_cli.app, name="ingest")
app.add_typer(sim_cli.app, name="sim")
app.add_typer(alerts_cli.app, name="alerts")
app.add_typer(alertmanager_cli.app, name="alertmanager")
app.command(name="up")(up_cli.up)
app.command(name="soak")(soak_cli.soak)
app.add_typer(sites_cli.app, name="sites")
app.add_typer(devices_cli.app, name="devices")
# `devices command` lives with the `commands` group it feeds.
devices_cli.app.command(name="command")(commands_cli.command)
app.add_typer(commands_cli.app, name="commands")
app.add_typer(gateways_cli.app, name="gateways")
app.add_typer(broker_cli.app, name="broker")
app.add_typer(pki_cli.app, name="pki")
app.add_typer(grafana_cli.app, name="grafana")
app.command(name="audit")(audit_cli.audit)
app.add_typer(catalog_cli.app, name="catalog")
app.command(name="status")(status_cli.status)
app.command(name="backup")(backup_cli.backup)
app.command(name="restore")(backup_cli.restore)


@app.callback()
def root(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="Settings file (TOML). Default: $CITYHUB_CONFIG, else built-in defaults.",
            dir_okay=False,
        ),
    ] = None,
    log_level: Annotated[
        str | None,
        typer.Option(help=f"Log level: {', '.join(LOG_LEVELS)} (any case). Default: settings'."),
    ] = None,
) -> None:
    """Load settings once and configure logging for every command."""
    err = Console(stderr=True)
    try:
        # `cityhub catalog` reads the catalog files itself, to report on them.
        examines_catalog = ctx.invoked_subcommand == "catalog"
        settings = load_settings(config, os.environ, install_catalog=not examines_catalog)
        level = (log_level or settings.log_level).upper()
        if level not in LOG_LEVELS:
            key = "--log-level" if log_level else "log_level"
            raise SettingsError(key, f"{level!r} is not one of {', '.join(LOG_LEVELS)}")
    except HubError as exc:
        err.print(error_line(exc), highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    # The commands that run a service (gateway run, ingest run, ...) name it
    # with adapters.logs.add_log_fields.
    configure_logging(getattr(logging, level), log_format=settings.log_format, service="cityhub")
    ctx.obj = CliState(
        settings=settings,
        environ=dict(os.environ),
        is_root=os.geteuid() == 0,
        os_user=os_user_name(),
    )
