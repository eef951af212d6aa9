"""`cityhub gateway`: run a site gateway."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated

import msgspec
import typer

from adapters.logs import add_log_fields
from adapters.sdnotify import Notifier
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
        add_log_fields(service="gateway", gateway_id=settings.gateway.gateway_id)
        logging.getLogger(__name__).info("settings: %s", describe_settings(settings))
        gateway = Gateway(
            settings=settings.gateway,
            central=central,
            site=site,
            outbox_path=outbox_path(settings.gateway, state.state_dir),
            # Read once here: systemd's NOTIFY_SOCKET and WATCHDOG_USEC (Type=notify).
            notifier=Notifier.from_environ(state.environ),
        )
        asyncio.run(serve(gateway))


@app.command(name="install-bundle")
def install_bundle(
    ctx: typer.Context,
    bundle: Annotated[
        Path,
        typer.Argument(
            help="Gateway bundle (gateway-ID.json) from `cityhub gateways add`.",
            dir_okay=False,
            exists=True,
        ),
    ],
    config_dir: Annotated[
        Path,
        typer.Option(
            help="Where the gateway service reads its settings (the unit's CITYHUB_CONFIG "
            "is CONFIG_DIR/gateway.toml).",
            file_okay=False,
        ),
    ] = Path("/etc/cityhub"),
    group: Annotated[
        str,
        typer.Option(
            help="Group (name or gid) that may read the files (the service's: cityhub); "
            "empty: owner only."
        ),
    ] = "",
    installed_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where CONFIG_DIR is on the running machine, when it is written into an "
            "image's root (the settings name the TLS files there). Default: CONFIG_DIR.",
            file_okay=False,
        ),
    ] = None,
) -> None:
    """Install a gateway bundle on this machine: gateway.toml and tls/ in CONFIG_DIR.

    The settings hold the broker secrets: files are created 0600 and, with
    --group, handed to that group read-only (0640, tls/ 0750). Run it again
    with a new bundle after `cityhub gateways rotate-credentials`, then restart
    the service.
    """
    from devices.bundlefiles import install_gateway_bundle

    state = state_of(ctx)
    with reported_errors(state):
        written = install_gateway_bundle(
            bundle, config_dir, group=group, installed_dir=installed_dir
        )
    for path in written:
        mode = path.stat().st_mode & 0o777
        state.console.print(f"  {path} ({mode:04o})", highlight=False, soft_wrap=True)
