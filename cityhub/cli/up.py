"""`cityhub up`: the whole system on one machine, on the embedded default.

Starts the private broker and database (unless running), migrates, seeds
the Hanoi sites, registers the simulated fleet (one gateway per site), and
starts the ingest workers, one gateway per site and the alerts job as child
processes and the simulator in this process. Shows a live view until Ctrl-C or ``--for``;
then stops the simulator, lets the gateways deliver their backlog, stops
every child (SIGTERM, SIGKILL after a timeout: no orphans) and prints a
summary. Exits 1 if any reading the simulator sent is missing from the
database and not accounted for as a reject.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import msgspec
import psycopg
import typer
from rich.live import Live
from rich.table import Table

from cityhub import database
from cityhub.cli.context import CliState, reported_errors, state_of
from cityhub.cli.sim import (
    gateway_configs,
    load_fleet,
    parse_duration,
    publish_gateway_configs,
    register_simulated_fleet,
)
from cityhub.localstack.mosquitto import ADMIN_USER
from cityhub.localstack.stack import LocalStack
from contracts.catalog import DEVICE_TYPES
from contracts.errors import HubError, LocalServiceError
from contracts.messages import GatewayState, decode_gateway_state
from contracts.schema import SEVERITIES, readings_table
from contracts.settings import BrokerSettings
from firmware_sim.fleet import DeviceSpec
from firmware_sim.service import Simulator

# Sites the default run simulates: a ward office, service halls of four
# districts and two street stations, so every device type and both serial sensors
# appear.
DEFAULT_SITES = (
    "hk-ward-trang-tien",
    "hk-hall-quan",
    "bd-hall-quan",
    "cg-hall-quan",
    "lb-hall-quan",
    "hk-aq-hang-dau",
    "lb-aq-nguyen-van-cu",
)
# How long the gateways get to deliver their backlog after the simulator stops.
DRAIN_TIMEOUT_S = 60.0
CHILD_STOP_TIMEOUT_S = 20.0
GATEWAY_READY_TIMEOUT_S = 30.0


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


def write_toml(path: Path, sections: dict[str, dict[str, Any]]) -> None:
    """Write a settings file (0600: it holds passwords)."""
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml(v)}" for key, v in values.items() if v is not None)
        lines.append("")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines))


@dataclass
class Children:
    """Child processes, each in a session of its own, stopped in reverse order."""

    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def start(self, name: str, argv: list[str], log: Path) -> None:
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs.append((name, proc))

    def dead(self) -> list[str]:
        return [name for name, proc in self.procs if proc.poll() is not None]

    def stop(self) -> None:
        for _name, proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + CHILD_STOP_TIMEOUT_S
        for _name, proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


class StateWatcher:
    """Keeps the latest retained state of every gateway from the central broker."""

    def __init__(self, broker: BrokerSettings) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.states: dict[str, GatewayState] = {}
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(broker.username, broker.password)
        self.client.on_connect = lambda c, *_: c.subscribe("hub/v1/gw/+/state", qos=1)
        self.client.on_message = self._on_message
        self.client.connect(broker.host or "127.0.0.1", broker.port)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, message: Any) -> None:
        try:
            state = decode_gateway_state(message.payload)
        except HubError:
            return
        with self.lock:
            self.states[state.gateway_id] = state

    def snapshot(self) -> dict[str, GatewayState]:
        with self.lock:
            return dict(self.states)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _count(conn: psycopg.Connection, table: str) -> int:
    row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    return int(row[0]) if row else 0


def stored_counts(url: str, schema: str) -> dict[str, int]:
    """Exact rows per device type, plus rejects."""
    with psycopg.connect(url) as conn:
        counts = {name: _count(conn, f"{schema}.{readings_table(name)}") for name in DEVICE_TYPES}
        counts["rejects"] = _count(conn, f"{schema}.rejects")
    return counts


def live_stored(conn: psycopg.Connection, schema: str) -> int:
    row = conn.execute(f"SELECT coalesce(sum(readings), 0) FROM {schema}.device_state")
    value = row.fetchone()
    return int(value[0]) if value else 0


def open_alerts(conn: psycopg.Connection, schema: str) -> dict[str, int]:
    """Active alerts by severity."""
    rows = conn.execute(
        f"SELECT severity, count(*) FROM {schema}.alerts "
        "WHERE state IN ('active_unack', 'active_ack') GROUP BY severity"
    ).fetchall()
    return {str(severity): int(n) for severity, n in rows}


def _alerts_line(alerts: dict[str, int]) -> str:
    if not alerts:
        return "open alerts: none"
    parts = [f"{alerts[s]} {s}" for s in SEVERITIES if s in alerts]
    return f"open alerts: {sum(alerts.values())} ({', '.join(parts)})"


def _view(
    sim: Simulator,
    states: dict[str, GatewayState],
    stored: int,
    started: float,
    alerts: dict[str, int],
) -> Table:
    elapsed = time.monotonic() - started
    table = Table(title=f"cityhub up: {elapsed:,.0f} s", title_justify="left")
    for column in (
        "gateway",
        "state",
        "readings/s",
        "accepted",
        "rejected",
        "outbox",
        "devices online",
    ):
        table.add_column(column, justify="right" if column != "gateway" else "left")
    for gateway_id, s in sorted(states.items()):
        table.add_row(
            gateway_id,
            "[green]online[/green]" if s.status == "online" else "[red]offline[/red]",
            f"{s.readings_per_s:,.0f}",
            f"{s.accepted:,}",
            f"{s.rejected + s.rate_limited:,}",
            f"{s.outbox_readings:,}",
            str(s.devices_online),
        )
    table.caption = (
        f"simulator sent {sim.stats.total():,} readings | stored in TimescaleDB {stored:,} | "
        + _alerts_line(alerts)
    )
    return table


@dataclass(frozen=True)
class Plan:
    state: CliState
    stack: LocalStack
    url: str
    schema: str
    run_dir: Path


def up(
    ctx: typer.Context,
    duration: Annotated[
        str | None, typer.Option("--for", help="Run this long (60s, 5m), then stop and summarise.")
    ] = None,
    sites: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated seed site ids (default: seven sites of four districts)."
        ),
    ] = None,
    fleet: Annotated[
        Path | None,
        typer.Option(
            "--fleet",
            "-f",
            help="Fleet description (TOML) for the simulator.",
            dir_okay=False,
            exists=True,
        ),
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="Ingest worker processes.")] = 1,
    seed: Annotated[int, typer.Option(help="Simulator seed.")] = 0,
) -> None:
    """Run the whole system here: broker, TimescaleDB, simulated fleet, gateways, ingest, alerts.

    Ctrl-C (or the end of --for) stops everything cleanly and prints a
    summary: readings sent, stored and rejected, and the loss, which must be
    zero (exit status 1 otherwise).
    """
    state = state_of(ctx)
    with reported_errors(state):
        lost = _up(state, duration=duration, sites=sites, fleet=fleet, workers=workers, seed=seed)
    if lost:
        raise typer.Exit(1)


def _up(
    state: CliState,
    *,
    duration: str | None,
    sites: str | None,
    fleet: Path | None,
    workers: int,
    seed: int,
) -> int:
    seconds = parse_duration(duration) if duration else None
    command_start = time.monotonic()
    settings = state.settings
    stack = LocalStack(state_dir=state.state_dir, local=settings.local, is_root=state.is_root)
    was_running = stack.postgres().running() and stack.mosquitto().running()
    stack.up()
    schema = settings.database.schema
    url = settings.database.url or stack.database_url()
    with database.connect(url) as conn:
        database.migrate(conn, schema=schema, storage=settings.storage)
        database.seed_sites(conn, schema=schema, sites=database.load_hanoi_sites())

    specs, sim, broker = _prepare_fleet(stack, url, schema, fleet=fleet, sites=sites, seed=seed)
    configs = gateway_configs(specs, sim.ports)
    broker_toml = msgspec.to_builtins(broker)
    run_dir = state.state_dir / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    children = Children()
    watcher: StateWatcher | None = None
    started = time.monotonic()
    counts: dict[str, int] = {}
    first_stored: list[float] = []
    try:
        write_toml(
            run_dir / "ingest.toml",
            {
                "database": {"url": url, "schema": schema},
                "broker": broker_toml,
                "ingest": {"workers": workers},
            },
        )
        children.start(
            "ingest",
            [sys.executable, "-m", "ingest", "--config", str(run_dir / "ingest.toml")],
            run_dir / "ingest.log",
        )
        publish_gateway_configs(broker, configs)
        for config in configs:
            gateway_id = config.gateway_id
            path = run_dir / f"{gateway_id}.toml"
            write_toml(
                path,
                {
                    "broker": broker_toml,
                    "gateway": {
                        "gateway_id": gateway_id,
                        "site_id": config.site_id,
                        "outbox_path": str(run_dir / f"{gateway_id}.outbox.sqlite3"),
                        # Fresh state every second for the live view.
                        "state_interval_s": 1.0,
                    },
                    "gateway.site_broker": broker_toml,
                },
            )
            children.start(
                gateway_id,
                [sys.executable, "-m", "gateway", "--config", str(path)],
                run_dir / f"{gateway_id}.log",
            )
        write_toml(
            run_dir / "alerts.toml",
            {"database": {"url": url, "schema": schema}, "alerts": {"interval_s": 10.0}},
        )
        children.start(
            "alerts",
            [sys.executable, "-m", "alerts", "--config", str(run_dir / "alerts.toml")],
            run_dir / "alerts.log",
        )
        watcher = StateWatcher(broker)
        _wait_ready(watcher, children, {c.gateway_id for c in configs})
        state.console.print(
            f"cityhub up: {len(specs)} simulated devices, {len(configs)} sites with a gateway "
            f"each, {workers} ingest worker(s), the alerts job; logs in {run_dir}; "
            "Ctrl-C to stop",
            highlight=False,
        )
        asyncio.run(
            _run(state, sim, watcher, children, url, schema, seconds, started, first_stored)
        )
        state.console.print()
        counts = _drain(state, sim, url, schema)
    finally:
        children.stop()
        if watcher is not None:
            watcher.close()
        sim.close()
        if not was_running:
            stack.down()
    lost = _print_summary(state, sim, counts)
    if first_stored:
        state.console.print(
            f"first reading stored {first_stored[0] - command_start:.1f} s after `cityhub up` "
            "started (servers, schema, fleet and processes included)",
            highlight=False,
        )
    return lost


def _prepare_fleet(
    stack: LocalStack, url: str, schema: str, *, fleet: Path | None, sites: str | None, seed: int
) -> tuple[list[DeviceSpec], Simulator, BrokerSettings]:
    """Build the simulated fleet and register its gateways and devices."""
    description, specs = load_fleet(fleet, sites=sites, seed=seed, default_sites=DEFAULT_SITES)
    mq = stack.mosquitto()
    broker = BrokerSettings(
        host="127.0.0.1", port=mq.port, username=ADMIN_USER, password=mq.admin_password
    )
    sim = Simulator(
        devices=specs,
        site_broker=broker,
        seed=description.seed,
        period_ms=description.period_ms,
        time_acceleration=description.time_acceleration,
        record=True,
    )
    register_simulated_fleet(url, schema, specs, sim.ports)
    return specs, sim, broker


def _wait_ready(watcher: StateWatcher, children: Children, gateway_ids: set[str]) -> None:
    """Wait until every gateway is subscribed to its devices, so none of the first readings
    goes to a topic nobody listens to yet."""
    deadline = time.monotonic() + GATEWAY_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        states = watcher.snapshot()
        ready = {g for g, s in states.items() if s.status == "online" and s.site_ready}
        if gateway_ids <= ready:
            return
        dead = children.dead()
        if dead:
            raise LocalServiceError(f"{', '.join(dead)} exited during start; see its log")
        time.sleep(0.1)
    missing = ", ".join(sorted(gateway_ids - set(watcher.snapshot())))
    raise LocalServiceError(f"gateways not ready after {GATEWAY_READY_TIMEOUT_S:.0f} s: {missing}")


async def _run(
    state: CliState,
    sim: Simulator,
    watcher: StateWatcher,
    children: Children,
    url: str,
    schema: str,
    seconds: float | None,
    started: float,
    first_stored: list[float],
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if seconds is not None:
        loop.call_later(seconds, stop.set)
    sim_task = asyncio.create_task(sim.run(stop), name="simulator")
    # One connection for the whole live view, not one per refresh.
    with (
        psycopg.connect(url, autocommit=True) as conn,
        Live(console=state.console, refresh_per_second=2, transient=False) as live,
    ):
        while not stop.is_set():
            dead = children.dead()
            if dead:
                stop.set()
                raise LocalServiceError(f"stopped: {', '.join(dead)} exited; see its log")
            stored = await asyncio.to_thread(live_stored, conn, schema)
            alerts = await asyncio.to_thread(open_alerts, conn, schema)
            if stored and not first_stored:
                first_stored.append(time.monotonic())
            live.update(_view(sim, watcher.snapshot(), stored, started, alerts))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await stop.wait()
    await sim_task


def _drain(state: CliState, sim: Simulator, url: str, schema: str) -> dict[str, int]:
    """Wait until all the simulator sent is stored or rejected; return the final counts."""
    sent = len(sim.sent or [])
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while True:
        counts = stored_counts(url, schema)
        arrived = sum(counts.values())  # stored rows of every type plus rejects
        if arrived >= sent:
            return counts
        if time.monotonic() > deadline:
            state.err.print(f"the backlog did not drain within {DRAIN_TIMEOUT_S:.0f} s")
            return counts
        time.sleep(1.0)


def _print_summary(state: CliState, sim: Simulator, counts: dict[str, int]) -> int:
    sent = len(sim.sent or [])
    stored = sum(v for k, v in counts.items() if k != "rejects")
    rejected = counts.get("rejects", 0)
    lost = max(0, sent - stored - rejected)
    table = Table(title="cityhub up: summary", title_justify="left")
    table.add_column("")
    table.add_column("readings", justify="right")
    table.add_row("sent by the simulator", f"{sent:,}")
    for name in DEVICE_TYPES:
        table.add_row(f"  stored: {name}", f"{counts.get(name, 0):,}")
    table.add_row("stored", f"{stored:,}")
    table.add_row("rejected (in the rejects table)", f"{rejected:,}")
    table.add_row("lost", f"[red]{lost:,}[/red]" if lost else "[green]0[/green]")
    state.console.print(table)
    return lost
