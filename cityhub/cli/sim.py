"""`cityhub sim`: run a simulated Hanoi fleet against the site broker."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import time
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
import typer
from rich.table import Table

from adapters.logs import add_log_fields
from cityhub.cli.context import CliState, reported_errors, state_of
from cityhub.cli.db import database_url
from cityhub.cli.gateway import embedded_broker
from contracts.errors import SettingsError
from contracts.messages import GatewayConfig, encode_gateway_config
from contracts.settings import BrokerSettings
from contracts.topics import config_topic
from contracts.wording import count_noun

# numpy, aiomqtt and psycopg are imported where used, so that `cityhub --help` and
# `cityhub gateway` run with the gateway extra alone.
if TYPE_CHECKING:
    from firmware_sim.fleet import DeviceSpec, FleetDescription, SiteInfo
    from firmware_sim.service import Simulator

app = typer.Typer(
    # Help is printed as written: ids, patterns and TOML sections have [ ] in them.
    rich_markup_mode=None,
    help="Simulated devices speaking the real serial and MQTT protocols.",
    no_args_is_help=True,
)

_DURATION = re.compile(r"^(?P<n>\d+(?:\.\d+)?)(?P<unit>ms|s|m|h)?$")
# Seconds to wait for the broker's CONNACK, and for each config's PUBACK: the
# embedded broker answers within milliseconds; 10 s only fails a dead one.
CONFIG_PUBLISH_TIMEOUT_S = 10.0


def parse_duration(text: str) -> float:
    """'90', '90s', '5m', '1h', '500ms' -> seconds."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise SettingsError("--for", f"{text!r} is not a duration like 60s, 5m or 1h")
    factor = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[match.group("unit")]
    return float(match.group("n")) * factor


def gateway_id_for(site_id: str) -> str:
    """The simulated fleet's gateway of a site (one per site)."""
    return f"gw-{site_id}"[:64]


def seed_sites() -> list[SiteInfo]:
    from cityhub import database
    from firmware_sim.fleet import SiteInfo

    return [
        SiteInfo(id=s.site_id, kind=s.kind, opening_hours=s.opening_hours)  # type: ignore[arg-type]
        for s in database.load_hanoi_sites()
    ]


def load_fleet(
    fleet: Path | None,
    *,
    sites: str | None,
    seed: int | None,
    default_sites: tuple[str, ...] = (),
) -> tuple[FleetDescription, list[DeviceSpec]]:
    """The fleet file (if any) with the command line's sites and seed applied, built."""
    from firmware_sim.fleet import build_fleet, parse_fleet_description

    document: dict[str, Any] = {}
    if fleet is not None:
        try:
            document = tomllib.loads(fleet.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError("--fleet", f"{fleet}: not valid TOML: {exc}") from None
    if sites:
        document["sites"] = [s.strip() for s in sites.split(",") if s.strip()]
    elif default_sites:
        document.setdefault("sites", list(default_sites))
    if seed is not None:
        document["seed"] = seed
    description = parse_fleet_description(document)
    return description, build_fleet(description, seed_sites())


def gateway_configs(specs: list[DeviceSpec], ports: dict[str, str]) -> list[GatewayConfig]:
    """One config per site for its gateway gw-{site}, naming its devices and serial ports."""
    by_site: dict[str, list[DeviceSpec]] = {}
    for spec in specs:
        by_site.setdefault(spec.site_id, []).append(spec)
    version = int(time.time())  # newer than any earlier run's config
    return [
        GatewayConfig(
            gateway_id=gateway_id_for(site_id),
            version=version,
            site_id=site_id,
            devices=[s.device_config(port=ports.get(s.device_id)) for s in site_specs],
        )
        for site_id, site_specs in by_site.items()
    ]


def publish_gateway_configs(
    broker: BrokerSettings, configs: list[GatewayConfig], prefix: str = ""
) -> None:
    """Publish the configs as retained messages, as the registry does for real gateways."""
    from adapters.mqtt import MqttLink, unique_client_id

    link = MqttLink(
        name="central",
        host=broker.host or "127.0.0.1",
        port=broker.port,
        # A provisioning connection, named like BrokerControl's.
        client_id=unique_client_id("cityhub-ctl", "configs"),
        username=broker.username or None,
        password=broker.password,
    )
    link.connect(timeout_s=CONFIG_PUBLISH_TIMEOUT_S)
    try:
        for config in configs:
            link.publish_confirmed(
                config_topic(config.gateway_id, prefix),
                encode_gateway_config(config),
                timeout_s=CONFIG_PUBLISH_TIMEOUT_S,
                retain=True,
            )
    finally:
        link.stop()


def register_simulated_fleet(
    url: str, schema: str, specs: list[DeviceSpec], ports: dict[str, str]
) -> None:
    """Register the fleet's gateways (gw-{site}) and devices, so ingest accepts their readings."""
    from cityhub import database

    with database.connect(url) as conn:
        database.register_fleet(
            conn,
            schema=schema,
            gateways=sorted({(gateway_id_for(s.site_id), s.site_id) for s in specs}),
            devices=[
                database.DeviceRecord(
                    device_id=s.device_id,
                    device_type=s.device_type,
                    site_id=s.site_id,
                    gateway_id=gateway_id_for(s.site_id),
                    transport=s.transport,
                    port=config.port,
                    protocol=s.protocol,
                    label=f"simulated {s.device_type}",
                    model=config.model,
                    slave_id=config.slave_id,
                    poll_interval_s=config.poll_interval_s,
                    dev_eui=config.dev_eui,
                    token_sha256=config.token_sha256,
                )
                for s in specs
                for config in [s.device_config(port=ports.get(s.device_id))]
            ],
        )


@app.command()
def run(
    ctx: typer.Context,
    fleet: Annotated[
        Path | None,
        typer.Option(
            "--fleet",
            "-f",
            help="Fleet description (TOML); default: every seed site.",
            dir_okay=False,
            exists=True,
        ),
    ] = None,
    sites: Annotated[
        str | None,
        typer.Option(help="Comma-separated seed site ids to simulate (overrides the file)."),
    ] = None,
    duration: Annotated[
        str | None,
        typer.Option("--for", help="Stop after this long (60s, 5m, 1h); default: Ctrl-C."),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (overrides the file).")] = None,
    publish_configs: Annotated[
        bool,
        typer.Option(
            help="Publish each site's retained gateway config (gateway gw-{site}) "
            "naming its simulated devices and serial ports."
        ),
    ] = True,
    topic_prefix: Annotated[str, typer.Option(help="Prefix for every topic.")] = "",
    register: Annotated[
        bool,
        typer.Option(
            help="Register the simulated gateways and devices in the database first, so "
            "ingest accepts their readings (the sites must be seeded)."
        ),
    ] = False,
    http_url: Annotated[
        list[str] | None,
        typer.Option(
            "--http-url",
            help="SITE=URL: where the site's HTTP devices post (its gateway's endpoint, "
            "e.g. hk-hall-quan=http://127.0.0.1:8470); repeat per site. A site without "
            "one has its HTTP devices sit out, with a warning.",
        ),
    ] = None,
) -> None:
    """Run the simulated fleet: MQTT devices on the site broker, serial sensors on ptys.

    Deterministic for a seed. Prints progress every 5 s and a summary at the
    end (messages by device type, injected faults).
    """
    from firmware_sim.service import Simulator

    state = state_of(ctx)
    add_log_fields(service="sim")
    with reported_errors(state):
        description, specs = load_fleet(fleet, sites=sites, seed=seed)
        endpoints = parse_http_urls(http_url or [], {s.site_id for s in specs})
        site_broker = embedded_broker(state, state.settings.gateway.site_broker, "sim")
        sim = Simulator(
            devices=specs,
            site_broker=site_broker,
            topic_prefix=topic_prefix,
            seed=description.seed,
            period_ms=description.period_ms,
            time_acceleration=description.time_acceleration,
            http_endpoints=endpoints,
        )
        if register:
            register_simulated_fleet(
                database_url(state), state.settings.database.schema, specs, sim.ports
            )
        if publish_configs:
            central = embedded_broker(state, state.settings.broker)
            publish_gateway_configs(central, gateway_configs(specs, sim.ports), topic_prefix)
        seconds = parse_duration(duration) if duration else None
        state.console.print(
            f"simulating {count_noun(len(specs), 'device', 'devices')} at"
            f" {count_noun(len({s.site_id for s in specs}), 'site', 'sites')} "
            f"(seed {description.seed}, {description.time_acceleration:g}x)"
        )
        try:
            asyncio.run(_run(state, sim, seconds))
        finally:
            sim.close()
        _summary(state, sim)


def parse_http_urls(values: list[str], site_ids: set[str]) -> dict[str, str]:
    """``SITE=URL`` options as {site: base URL}; SettingsError naming the bad one."""
    endpoints: dict[str, str] = {}
    for value in values:
        site_id, sep, url = value.partition("=")
        if not sep or not url.startswith(("http://", "https://")):
            raise SettingsError("--http-url", f"{value!r} is not SITE=http(s)://host:port")
        if site_id not in site_ids:
            raise SettingsError("--http-url", f"{site_id!r} is not a simulated site")
        endpoints[site_id] = url.rstrip("/")
    return endpoints


async def _run(state: CliState, sim: Simulator, seconds: float | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if seconds is not None:
        loop.call_later(seconds, stop.set)

    async def progress() -> None:
        last, last_t = 0, time.monotonic()
        while True:
            await asyncio.sleep(5)
            total, now = sim.stats.total(), time.monotonic()
            state.console.print(
                f"{total:>9} sent  {(total - last) / (now - last_t):>7.0f}/s  "
                f"{sim.stats.connected} connected  worst lateness {sim.stats.late_ms_max} ms",
                highlight=False,
            )
            last, last_t = total, now

    reporter = asyncio.create_task(progress(), name="progress")
    try:
        await sim.run(stop)
    finally:
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter


def _summary(state: CliState, sim: Simulator) -> None:
    table = Table(title="simulated readings")
    table.add_column("device type")
    table.add_column("MQTT messages", justify="right")
    table.add_column("serial frames / Modbus answers", justify="right")
    table.add_column("HTTP readings", justify="right")
    stats = sim.stats
    for dtype in sorted(set(stats.published) | set(stats.frames_written) | set(stats.posted)):
        table.add_row(
            dtype,
            str(stats.published[dtype]),
            str(stats.frames_written[dtype]),
            str(stats.posted[dtype]),
        )
    state.console.print(table)
    faults = {
        k: v for k, v in msgspec.to_builtins(sim.fault_counters()).items() if v not in (0, {})
    }
    state.console.print(f"injected: {faults}", highlight=False)
    if sim.stats.commands:
        state.console.print(
            f"lệnh đã nhận / commands received: {dict(sim.stats.commands)}  "
            f"trả lời / answers: {dict(sim.stats.answers)}",
            highlight=False,
        )
