"""`cityhub gateway`: run a site gateway."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated

import msgspec
import typer

from cityhub.cli.context import CliState, reported_errors, state_of
from cityhub.localstack.mosquitto import ADMIN_USER
from contracts.errors import SettingsError
from contracts.settings import BrokerSettings, describe_settings, load_settings

app = typer.Typer(
    # Help is printed as written: ids, patterns and TOML sections have [ ] in them.
    rich_markup_mode=None,
    help="Site gateway: devices in, durable outbox, batches to the hub.",
    no_args_is_help=True,
)


def embedded_broker(
    state: CliState, configured: BrokerSettings, kind: str | None = None
) -> BrokerSettings:
    """``configured`` if it names a host, else the embedded broker.

    With ``kind`` ("ingest", "sim", "monitor") the service account of that
    kind (``MosquittoServer.service_broker``); without it the admin account,
    which only provisioning (the dynamic-security control API, retained
    configs) uses.
    """
    if configured.host is not None:
        return configured
    # Imported here: a gateway that names its brokers needs no psycopg (central extra).
    from cityhub.localstack.stack import LocalStack

    stack = LocalStack(state_dir=state.state_dir, local=state.settings.local, is_root=state.is_root)
    stack.broker_url()  # raises with the fix if the embedded broker is not running
    mq = stack.mosquitto()
    if kind is not None:
        service = mq.service_broker(kind)
        return msgspec.structs.replace(
            configured,
            host=service.host,
            port=service.port,
            username=service.username,
            password=service.password,
        )
    return msgspec.structs.replace(
        configured,
        host="127.0.0.1",
        port=mq.port,
        username=ADMIN_USER,
        password=mq.admin_password,
    )


def gateway_broker(configured: BrokerSettings, key: str) -> BrokerSettings:
    """A gateway's broker as configured: it connects with its own accounts, never the admin's."""
    if configured.host is None or not configured.username:
        raise SettingsError(
            key,
            "a gateway connects with its own broker accounts: `cityhub gateways add` writes "
            "its settings file (brokers, accounts, client ids); run `cityhub gateway run -c "
            "<that file>`",
        )
    return configured


@app.command()
def run(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="Settings file with a [gateway] section.", dir_okay=False
        ),
    ] = None,
) -> None:
    """Run one site gateway until Ctrl-C (SIGINT) or SIGTERM.

    Reads the site's MQTT devices and serial sensors of its config, batches
    readings into a durable SQLite outbox and sends them to the central broker
    until ingest acks them. Both brokers must be set with the gateway's own
    accounts (the settings file `cityhub gateways add` writes); the admin
    account is provisioning's, not a gateway's.
    """
    from gateway.service import Gateway, outbox_path, serve

    state = state_of(ctx)
    with reported_errors(state):
        settings = load_settings(config, state.environ) if config else state.settings
        central = gateway_broker(settings.broker, "broker.host")
        site = gateway_broker(settings.gateway.site_broker, "gateway.site_broker.host")
        logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
        logging.getLogger(__name__).info("settings: %s", describe_settings(settings))
        gateway = Gateway(
            settings=settings.gateway,
            central=central,
            site=site,
            outbox_path=outbox_path(settings.gateway, state.state_dir),
        )
        asyncio.run(serve(gateway))
