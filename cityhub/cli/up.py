"""`cityhub up`: the whole system on one machine, on the embedded default.

Starts the private broker and database (unless running), migrates, seeds
the Hanoi sites, registers the simulated fleet (one gateway per site), and
starts a private Alertmanager (configured from ``--receivers``, or sending
nowhere), the ingest workers, one gateway per site and the alerts job as child
processes and the simulator in this process. Without the Alertmanager program
it runs without notifications and says so. Each part connects to the broker
with an account of its own (devices.dynsec's account table): ingest as
``ingest.local``, the simulator as ``sim.local``, each gateway as
``gateway.{id}`` and ``gateway.{id}.site`` (made at each run with new
secrets), the live view as ``monitor.local``; the admin account only
registers the gateways' accounts and publishes their configs. Shows a live
view until Ctrl-C or ``--for``;
then stops the simulator, lets the gateways deliver their backlog, stops
every child (SIGTERM, SIGKILL after a timeout: no orphans) and prints a
summary. Exits 1 if any reading of this run that the simulator had handed
over (PUBACK from the site broker, an HTTP 2xx from the gateway, or
answered on a serial line or Modbus bus) is missing from the database and
not accounted for as a reject, or is there twice: the check compares the simulator's ledger, reading
by reading (device, seq, ts), with the rows of this run, so a state
directory holding earlier runs' data cannot hide a loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
import typer
from rich.live import Live
from rich.table import Table

from cityhub.cli.context import CliState, reported_errors, state_of
from cityhub.cli.sim import (
    gateway_configs,
    gateway_id_for,
    load_fleet,
    parse_duration,
    publish_gateway_configs,
    register_simulated_fleet,
)
from cityhub.localstack.mosquitto import ADMIN_USER
from cityhub.localstack.procs import LOOPBACK, free_port
from contracts.catalog import DEVICE_TYPES
from contracts.errors import HubError, LocalServiceError, MissingDependencyError
from contracts.messages import GatewayConfig, GatewayState, decode_gateway_state
from contracts.schema import SEVERITIES, readings_table
from contracts.settings import BrokerSettings
from contracts.severity import severity_label
from contracts.wording import count_noun
from devices.dynsec import gateway_username
from firmware_sim.ledger import Ledger, Reconciliation, RejectedRow, StoredRow, reconcile

# psycopg, numpy and aiomqtt are imported where used, so that `cityhub --help` and
# `cityhub gateway` run with the gateway extra alone.
if TYPE_CHECKING:
    from adapters.database import Connection
    from adapters.mqtt import IncomingMessage
    from cityhub.localstack.alertmanager import AlertmanagerServer
    from cityhub.localstack.stack import LocalStack
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
# The children that log in to the database as their own role (contracts.roles).
SERVICE_ROLES = ("ingest", "alerts")
# Gateways online, outboxes empty and counters still this long: nothing more
# is on its way (their state comes every second in `up`).
QUIET_S = 5.0
# Lost readings named one by one in the summary (the count is always whole).
MAX_LOST_SHOWN = 20
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
    commands: dict[str, tuple[list[str], Path]] = field(default_factory=dict)

    def start(self, name: str, argv: list[str], log: Path) -> None:
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs = [(n, p) for n, p in self.procs if n != name]
        self.procs.append((name, proc))
        self.commands[name] = (argv, log)

    def get(self, name: str) -> subprocess.Popen[bytes]:
        for child, proc in self.procs:
            if child == name:
                return proc
        raise KeyError(name)

    def restart(self, name: str) -> None:
        """Start ``name`` again with its command line (after it died or was killed)."""
        argv, log = self.commands[name]
        self.start(name, argv, log)

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
    """Keeps the latest retained state of every gateway from the central broker.

    It connects with the read-only monitor account (``monitor.local``:
    subscribe to gateway states, nothing else).
    """

    # Seconds to wait for the embedded broker to accept the connection and
    # the subscription: it answers within milliseconds; 10 s only fails a dead one.
    CONNECT_TIMEOUT_S = 10.0

    def __init__(self, broker: BrokerSettings) -> None:
        from adapters.mqtt import MqttLink

        self.states: dict[str, GatewayState] = {}
        self.lock = threading.Lock()
        self.link = MqttLink(
            name="central",
            host=broker.host or "127.0.0.1",
            port=broker.port,
            # The monitor account is bound to its username as client id.
            client_id=broker.username or "",
            username=broker.username,
            password=broker.password,
            subscriptions=["hub/v1/gw/+/state"],
            on_message=self._on_message,
        )
        self.link.connect(timeout_s=self.CONNECT_TIMEOUT_S)

    def _on_message(self, message: IncomingMessage) -> None:
        try:
            state = decode_gateway_state(bytes(message.payload))
        except HubError:
            return
        with self.lock:
            self.states[state.gateway_id] = state

    def snapshot(self) -> dict[str, GatewayState]:
        with self.lock:
            return dict(self.states)

    def close(self) -> None:
        self.link.stop()


# A rejects row's detail starts with the reading it refused (ingest.writer).
_REJECT_DETAIL = re.compile(r"^seq (?P<seq>-?\d+) ts_ms (?P<ts>-?\d+):")


def run_rows(
    url: str, schema: str, devices: Collection[str], since_ms: int
) -> tuple[list[StoredRow], list[RejectedRow]]:
    """The stored rows and rejects of ``devices`` from ``since_ms`` on (the run's window).

    Rows are read by their key (device, seq, ts), so rows of an earlier run
    on the same state directory (earlier times) are not counted as this
    run's.
    """
    from adapters.database import connect

    device_list = sorted(devices)
    since = "timestamptz 'epoch' + %s * interval '1 millisecond'"
    stored: list[StoredRow] = []
    rejected: list[RejectedRow] = []
    with connect(url, autocommit=False) as conn:
        for name in DEVICE_TYPES:
            rows = conn.execute(
                f"SELECT device_id, seq, (extract(epoch FROM ts) * 1000)::bigint "
                f"FROM {schema}.{readings_table(name)} "
                f"WHERE device_id = ANY(%s) AND ts >= {since}",
                (device_list, since_ms),
            ).fetchall()
            stored.extend(StoredRow(str(d), int(q), int(t)) for d, q, t in rows)
        rows = conn.execute(
            f"SELECT device_id, reason, detail FROM {schema}.rejects "
            f"WHERE device_id = ANY(%s) AND received_at >= {since}",
            (device_list, since_ms),
        ).fetchall()
    for device_id, reason, detail in rows:
        match = _REJECT_DETAIL.match(str(detail))
        rejected.append(
            RejectedRow(
                device_id=str(device_id),
                seq=int(match["seq"]) if match else None,
                ts_ms=int(match["ts"]) if match else None,
                reason=str(reason),
            )
        )
    return stored, rejected


def reconcile_run(url: str, schema: str, ledger: Ledger, since_ms: int) -> Reconciliation:
    """This run's ledger against the database's rows of this run."""
    stored, rejected = run_rows(url, schema, ledger.devices(), since_ms)
    return reconcile(ledger.entries, stored, rejected)


def live_stored(conn: Connection[Any], schema: str) -> int:
    row = conn.execute(f"SELECT coalesce(sum(readings), 0) FROM {schema}.device_state")
    value = row.fetchone()
    return int(value[0]) if value else 0


def open_alerts(conn: Connection[Any], schema: str) -> dict[str, int]:
    """Active alerts by severity."""
    rows = conn.execute(
        f"SELECT severity, count(*) FROM {schema}.alerts "
        "WHERE state IN ('active_unack', 'active_ack') GROUP BY severity"
    ).fetchall()
    return {str(severity): int(n) for severity, n in rows}


def _alerts_line(alerts: dict[str, int]) -> str:
    if not alerts:
        return "open alerts: none"
    parts = [f"{alerts[s]} {severity_label(s)}" for s in SEVERITIES if s in alerts]
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
        f"simulator sent {count_noun(sim.stats.total(), 'reading', 'readings', grouped=True)}"
        f" | stored in TimescaleDB {stored:,} | " + _alerts_line(alerts)
    )
    return table


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
    receivers: Annotated[
        Path | None,
        typer.Option(
            "--receivers",
            help="Who the private Alertmanager notifies (TOML, as for `cityhub alertmanager "
            "config`); without it alerts reach Alertmanager and are sent nowhere.",
            dir_okay=False,
            exists=True,
        ),
    ] = None,
) -> None:
    """Run the whole system here: broker, TimescaleDB, simulated fleet, gateways, ingest, alerts.

    Ctrl-C (or the end of --for) stops everything cleanly and prints a
    summary: readings sent, stored and rejected, and the loss, which must be
    zero (exit status 1 otherwise).
    """
    state = state_of(ctx)
    with reported_errors(state):
        lost = _up(
            state,
            duration=duration,
            sites=sites,
            fleet=fleet,
            workers=workers,
            seed=seed,
            receivers=receivers,
        )
    if lost:
        raise typer.Exit(1)


class System:
    """The whole system of `cityhub up` on the embedded default, its parts as child processes.

    ``start`` brings up the servers (unless running), the schema, the fleet
    and every child; ``close`` stops the children, the simulator's ptys and
    the servers it started. The soak runner (`cityhub soak`) drives the same
    object and kills its parts.
    """

    def __init__(
        self,
        state: CliState,
        *,
        sites: str | None,
        fleet: Path | None,
        workers: int,
        seed: int,
        run_name: str = "run",
        gateway_settings: Callable[[str], dict[str, Any]] | None = None,
        central_port: Callable[[str], int | None] | None = None,
        alertmanager: bool = False,
        receivers: Path | None = None,
    ) -> None:
        from cityhub.localstack.stack import LocalStack

        self.state = state
        settings = state.settings
        self.stack = LocalStack(
            state_dir=state.state_dir, local=settings.local, is_root=state.is_root
        )
        self.was_running = self.stack.postgres().running() and self.stack.mosquitto().running()
        self.schema = settings.database.schema
        self.workers = workers
        self.run_dir = state.state_dir / run_name
        self.children = Children()
        self.watcher: StateWatcher | None = None
        self._fleet = (fleet, sites, seed)
        self._gateway_settings = gateway_settings or (lambda _id: {})
        self._central_port = central_port or (lambda _id: None)
        self._alertmanager = alertmanager
        self.receivers = receivers
        self.alertmanager: AlertmanagerServer | None = None
        # What `up` says about notifications in its startup lines.
        self.notices: list[str] = []

    def start(self) -> None:
        from cityhub import database

        settings = self.state.settings
        # A bad receivers file fails before any server starts.
        am_files = self._alertmanager_files() if self._alertmanager else None
        self.stack.up()
        self.url = settings.database.url or self.stack.database_url()
        with database.connect(self.url) as conn:
            database.migrate(conn, schema=self.schema, storage=settings.storage)
            database.seed_sites(conn, schema=self.schema, sites=database.load_hanoi_sites())
            self.service_databases = self._service_logins(conn)
        fleet, sites, seed = self._fleet
        self.specs, self.sim, self.broker = _prepare_fleet(
            self.stack, self.url, self.schema, fleet=fleet, sites=sites, seed=seed
        )
        self.http_settings = http_gateway_settings(self.sim.http_endpoints)
        self.configs = gateway_configs(self.specs, self.sim.ports)
        self.gateway_ids = {c.gateway_id for c in self.configs}
        self.gateway_secrets = provision_gateway_accounts(
            self.broker, self.configs, settings.provisioning.control_timeout_s
        )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if am_files is not None:
            self._start_alertmanager(am_files)
        self._start_children()
        self.watcher = StateWatcher(self.stack.mosquitto().service_broker("monitor"))
        _wait_ready(self.watcher, self.children, self.gateway_ids)

    def _service_logins(self, conn: Connection[Any]) -> dict[str, dict[str, str]]:
        """The [database] of ingest and of the alerts job: each logs in as its own role.

        On the private server, as in production: the role's password is a
        file (generated once under the state directory, owner-only), named by
        ``database.password_file``. With database.url set, the services use
        that URL as before: the roles' passwords there are the operator's.
        """
        from cityhub import database
        from cityhub.localstack.postgres import DB_NAME
        from cityhub.localstack.procs import write_owned_file
        from contracts.settings import LOOPBACK, read_password_file

        if self.state.settings.database.url:
            return {kind: {"url": self.url, "schema": self.schema} for kind in SERVICE_ROLES}
        port = self.stack.postgres().port
        logins: dict[str, dict[str, str]] = {}
        for kind in SERVICE_ROLES:
            path = self.state.state_dir / f"db_{self.schema}_{kind}.password"
            if not path.exists():
                write_owned_file(path, secrets.token_urlsafe(24) + "\n", None)
            password = read_password_file(str(path), f"database.password_file ({kind})")
            role = database.set_role_password(
                conn, schema=self.schema, kind=kind, password=password
            )
            logins[kind] = {
                "url": f"postgresql://{role}@{LOOPBACK}:{port}/{DB_NAME}",
                "password_file": str(path),
                "schema": self.schema,
            }
        return logins

    def _alertmanager_files(self) -> dict[str, str]:
        """alertmanager.yml (from the receivers file, or the null configuration) and templates."""
        from cityhub.alertmanager import (
            TEMPLATE_NAME,
            TEMPLATE_PATH,
            build_config,
            null_config,
            parse_receivers,
            render_yaml,
        )
        from cityhub.cli.alertmanager import read_receivers

        if self.receivers is None:
            config = render_yaml(null_config(), source="no receivers file (cityhub up)")
        else:
            plan = parse_receivers(read_receivers(self.receivers), source=str(self.receivers))
            config = render_yaml(build_config(plan), source=self.receivers.name)
        return {
            "alertmanager.yml": config,
            TEMPLATE_NAME: TEMPLATE_PATH.read_text(encoding="utf-8"),
        }

    def _start_alertmanager(self, files: dict[str, str]) -> None:
        """Start the private Alertmanager as a child; without its program, say so and go on
        (unless a receivers file asked for notifications)."""
        from cityhub.localstack.alertmanager import AlertmanagerServer, find_alertmanager

        local = self.state.settings.local
        binary = find_alertmanager(local.alertmanager_bin)
        if binary is None:
            if self.receivers is not None:
                raise MissingDependencyError(
                    f"--receivers {self.receivers}: Alertmanager ({local.alertmanager_bin!r}) "
                    "is not installed: run scripts/install-system-deps"
                )
            self.notices.append(
                f"Alertmanager ({local.alertmanager_bin}) not installed: no notifications, "
                "alerts stay in the database and on the boards (scripts/install-system-deps "
                "installs it)"
            )
            return
        server = AlertmanagerServer(
            base_dir=self.state.state_dir / "alertmanager",
            port=local.alertmanager_port,
            binary=binary,
            start_timeout_s=local.start_timeout_s,
        )
        server.write_config(files)
        self.children.start("alertmanager", server.argv(), server.log_path)
        proc = self.children.get("alertmanager")
        server.wait_ready(lambda: proc.poll() is None)
        self.alertmanager = server
        sent_to = (
            f"notifications to the receivers of {self.receivers}"
            if self.receivers is not None
            else "no receivers file: alerts are shown there and sent nowhere "
            "(--receivers FILE to send them)"
        )
        self.notices.append(f"Alertmanager: {server.url} ({sent_to})")

    def _start_children(self) -> None:
        run_dir, mq = self.run_dir, self.stack.mosquitto()
        # Ingest reads its account's password from the state directory's file.
        ingest_broker = msgspec.to_builtins(
            msgspec.structs.replace(mq.service_broker("ingest"), password=None)
        )
        write_toml(
            run_dir / "ingest.toml",
            {
                "database": self.service_databases["ingest"],
                "broker": ingest_broker,
                "ingest": {"workers": self.workers},
            },
        )
        self.children.start(
            "ingest",
            [sys.executable, "-m", "ingest", "--config", str(run_dir / "ingest.toml")],
            run_dir / "ingest.log",
        )
        publish_gateway_configs(self.broker, self.configs)
        for config in self.configs:
            gateway_id = config.gateway_id
            path = run_dir / f"{gateway_id}.toml"
            central_secret, site_secret = self.gateway_secrets[gateway_id]
            central = {
                "host": LOOPBACK,
                "port": mq.port,
                "username": gateway_username(gateway_id, "central"),
                "password": central_secret,
            }
            port = self._central_port(gateway_id)
            if port is not None:
                central["port"] = port
            write_toml(
                path,
                {
                    "broker": central,
                    "gateway": {
                        "gateway_id": gateway_id,
                        "site_id": config.site_id,
                        "outbox_path": str(run_dir / f"{gateway_id}.outbox.sqlite3"),
                        # Fresh state every second for the live view.
                        "state_interval_s": 1.0,
                        # Its HTTP devices' endpoint, on loopback: the simulator is here.
                        **self.http_settings.get(gateway_id, {}),
                        **self._gateway_settings(gateway_id),
                    },
                    "gateway.site_broker": {
                        "host": LOOPBACK,
                        "port": mq.port,
                        "username": gateway_username(gateway_id, "site"),
                        "password": site_secret,
                    },
                },
            )
            self.children.start(
                gateway_id,
                [sys.executable, "-m", "gateway", "--config", str(path)],
                run_dir / f"{gateway_id}.log",
            )
        alerts_toml: dict[str, dict[str, Any]] = {
            "database": self.service_databases["alerts"],
            "alerts": {"interval_s": 10.0},
        }
        if self.alertmanager is not None:
            alerts_toml["alerts.notify"] = {"alertmanager_url": self.alertmanager.url}
        write_toml(run_dir / "alerts.toml", alerts_toml)
        self.children.start(
            "alerts",
            [sys.executable, "-m", "alerts", "--config", str(run_dir / "alerts.toml")],
            run_dir / "alerts.log",
        )

    @property
    def ledger(self) -> Ledger:
        assert self.sim.ledger is not None  # noqa: S101 - built with record=True
        return self.sim.ledger

    def since_ms(self) -> int:
        """Where this run's window starts: its first reading, or the simulator's start."""
        return min(self.sim.wall_start_ms, self.ledger.min_ts_ms() or self.sim.wall_start_ms)

    def drain(
        self,
        timeout_s: float = DRAIN_TIMEOUT_S,
        progress: Callable[[Reconciliation], None] | None = None,
    ) -> tuple[Reconciliation, bool]:
        assert self.watcher is not None  # noqa: S101 - started
        return drain(
            ledger=self.ledger,
            watcher=self.watcher,
            gateway_ids=self.gateway_ids,
            url=self.url,
            schema=self.schema,
            since_ms=self.since_ms(),
            timeout_s=timeout_s,
            progress=progress,
        )

    def close(self) -> None:
        self.children.stop()
        if self.watcher is not None:
            self.watcher.close()
        if hasattr(self, "sim"):
            self.sim.close()
        if not self.was_running:
            self.stack.down()


def _up(
    state: CliState,
    *,
    duration: str | None,
    sites: str | None,
    fleet: Path | None,
    workers: int,
    seed: int,
    receivers: Path | None = None,
) -> int:
    seconds = parse_duration(duration) if duration else None
    command_start = time.monotonic()
    system = System(
        state,
        sites=sites,
        fleet=fleet,
        workers=workers,
        seed=seed,
        alertmanager=True,
        receivers=receivers,
    )
    first_stored: list[float] = []
    result: Reconciliation | None = None
    try:
        result = _run_system(state, system, seconds, first_stored)
    finally:
        system.close()
    if result is None:
        return 1
    lost = _print_summary(state, result)
    if first_stored:
        state.console.print(
            f"first reading stored {first_stored[0] - command_start:.1f} s after `cityhub up` "
            "started (servers, schema, fleet and processes included)",
            highlight=False,
        )
    return lost


def _run_system(
    state: CliState, system: System, seconds: float | None, first_stored: list[float]
) -> Reconciliation:
    """Start the system, run it until ``seconds`` pass or Ctrl-C, drain it; its reconciliation.

    The time the first reading of the run was stored is appended to ``first_stored``.
    """
    system.start()
    started = time.monotonic()
    assert system.watcher is not None  # noqa: S101 - started
    state.console.print(
        f"cityhub up: {count_noun(len(system.specs), 'simulated device', 'simulated devices')}, "
        f"{count_noun(len(system.configs), 'site', 'sites')} with a gateway each, "
        f"{count_noun(system.workers, 'ingest worker', 'ingest workers')}, the alerts job; logs in "
        f"{system.run_dir}; Ctrl-C to stop",
        highlight=False,
    )
    for notice in system.notices:
        state.console.print(notice, highlight=False)
    asyncio.run(
        _run(
            state,
            system.sim,
            system.watcher,
            system.children,
            system.url,
            system.schema,
            seconds,
            started,
            first_stored,
        )
    )
    state.console.print()
    result, drained = system.drain()
    if not drained:
        state.err.print(f"the backlog did not drain within {DRAIN_TIMEOUT_S:.0f} s")
    return result


def _prepare_fleet(
    stack: LocalStack, url: str, schema: str, *, fleet: Path | None, sites: str | None, seed: int
) -> tuple[list[DeviceSpec], Simulator, BrokerSettings]:
    """Build the simulated fleet and register its gateways and devices.

    Returns the fleet, its simulator (on the sim account) and the admin
    account's settings, which only provisioning uses (gateway accounts,
    retained configs).
    """
    from firmware_sim.service import Simulator

    description, specs = load_fleet(fleet, sites=sites, seed=seed, default_sites=DEFAULT_SITES)
    http_sites = sorted({s.site_id for s in specs if s.transport == "http"})
    mq = stack.mosquitto()
    broker = BrokerSettings(
        host="127.0.0.1", port=mq.port, username=ADMIN_USER, password=mq.admin_password
    )
    sim = Simulator(
        devices=specs,
        site_broker=mq.service_broker("sim"),
        seed=description.seed,
        period_ms=description.period_ms,
        time_acceleration=description.time_acceleration,
        record=True,
        http_endpoints={site: f"http://127.0.0.1:{free_port()}" for site in http_sites},
    )
    register_simulated_fleet(url, schema, specs, sim.ports)
    return specs, sim, broker


def provision_gateway_accounts(
    admin: BrokerSettings, configs: list[GatewayConfig], timeout_s: float
) -> dict[str, tuple[str, str]]:
    """Give each gateway of the run its two accounts, with new secrets: gateway id -> secrets.

    The central account (``gateway.{id}``) and the site account
    (``gateway.{id}.site``, its MQTT devices and LoRaWAN DevEUIs), made as
    `cityhub gateways add` makes them (``devices.provisioning.put_account``:
    created, or brought current with a new secret). Secrets are new at each
    run and written only into the run's gateway settings files (0600).
    """
    from devices.brokerctl import BrokerControl
    from devices.credentials import new_secret
    from devices.dynsec import gateway_central_account, gateway_site_account
    from devices.provisioning import put_account

    secrets: dict[str, tuple[str, str]] = {}
    with BrokerControl(name="central", broker=admin, timeout_s=timeout_s) as control:
        for config in configs:
            gateway_id = config.gateway_id
            central = gateway_central_account(gateway_id)
            site = gateway_site_account(
                gateway_id,
                device_ids=[d.device_id for d in config.devices if d.transport == "mqtt"],
                dev_euis=[d.dev_eui for d in config.devices if d.dev_eui],
            )
            secrets[gateway_id] = (new_secret(), new_secret())
            for account, secret in zip((central, site), secrets[gateway_id], strict=True):
                put_account(control, account, secret)
    return secrets


def http_gateway_settings(endpoints: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Gateway id -> its HTTP endpoint settings, for each site whose devices post readings."""
    settings: dict[str, dict[str, Any]] = {}
    for site_id, url in endpoints.items():
        port = int(url.rsplit(":", 1)[1])
        settings[gateway_id_for(site_id)] = {"http_host": "127.0.0.1", "http_port": port}
    return settings


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
    from cityhub import database

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if seconds is not None:
        loop.call_later(seconds, stop.set)
    sim_task = asyncio.create_task(sim.run(stop), name="simulator")
    # One connection for the whole live view, not one per refresh.
    with (
        database.connect(url) as conn,
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


def _gateways_quiet(
    watcher: StateWatcher, gateway_ids: set[str], last: dict[str, tuple[int, ...]]
) -> bool:
    """True if every gateway is online with an empty outbox and took nothing new since ``last``."""
    states = watcher.snapshot()
    quiet = True
    for gateway_id in gateway_ids:
        s = states.get(gateway_id)
        if s is None or s.status != "online":
            return False
        progress = (s.birth, s.received, s.accepted, s.rejected, s.rate_limited, s.outbox_depth)
        if s.outbox_depth or last.get(gateway_id) != progress:
            quiet = False
        last[gateway_id] = progress
    return quiet


def drain(
    *,
    ledger: Ledger,
    watcher: StateWatcher,
    gateway_ids: set[str],
    url: str,
    schema: str,
    since_ms: int,
    timeout_s: float = DRAIN_TIMEOUT_S,
    progress: Callable[[Reconciliation], None] | None = None,
) -> tuple[Reconciliation, bool]:
    """Wait until every reading of the ledger is accounted for, or the gateways are quiet.

    Quiet: each gateway online, its outbox empty and its counters unchanged
    for QUIET_S (nothing more can arrive). Returns the accounting and whether
    the system drained (False: the timeout came first).
    """
    deadline = time.monotonic() + timeout_s
    last: dict[str, tuple[int, ...]] = {}
    quiet_since: float | None = None
    while True:
        result = reconcile_run(url, schema, ledger, since_ms)
        if progress is not None:
            progress(result)
        if result.lost_total == 0:
            return result, True
        now = time.monotonic()
        if _gateways_quiet(watcher, gateway_ids, last):
            quiet_since = quiet_since or now
            if now - quiet_since >= QUIET_S:
                # One more look: a commit may have landed since the query.
                return reconcile_run(url, schema, ledger, since_ms), True
        else:
            quiet_since = None
        if now > deadline:
            return result, False
        time.sleep(1.0)


def _print_summary(state: CliState, result: Reconciliation) -> int:
    table = Table(title="cityhub up: summary (this run's readings)", title_justify="left")
    table.add_column("")
    table.add_column("readings", justify="right")
    table.add_row("sent by the simulator", f"{result.acknowledged + result.unacked_sent:,}")
    table.add_row(
        "acknowledged (PUBACK, HTTP 2xx, or answered on a serial line or bus)",
        f"{result.acknowledged:,}",
    )
    table.add_row("stored", f"{result.stored:,}")
    table.add_row("rejected (in the rejects table)", f"{sum(result.rejected.values()):,}")
    for reason, n in sorted(result.rejected.items()):
        table.add_row(f"  rejected: {reason}", f"{n:,}")
    for fault, n in sorted(result.refused_at_gateway.items()):
        table.add_row(f"  refused at the gateway: {fault} (injected)", f"{n:,}")
    table.add_row(
        "sent without PUBACK (stored anyway)",
        f"{result.unacked_sent:,} ({result.unacked_stored:,})",
    )
    dup = result.duplicates
    table.add_row("duplicated", f"[red]{dup:,}[/red]" if dup else "[green]0[/green]")
    lost = result.lost_total
    table.add_row("lost", f"[red]{lost:,}[/red]" if lost else "[green]0[/green]")
    state.console.print(table)
    for entry in result.lost[:MAX_LOST_SHOWN]:
        state.err.print(
            f"lost: {entry.device_id} seq {entry.seq} ts_ms {entry.ts_ms} "
            f"(acknowledged at {entry.acked_ms})",
            highlight=False,
        )
    for device_id, n in sorted(result.serial_lost.items()):
        state.err.print(
            f"lost: {count_noun(n, 'serial reading', 'serial readings')} of {device_id}",
            highlight=False,
        )
    return lost + dup
