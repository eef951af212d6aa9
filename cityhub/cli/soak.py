"""`cityhub soak`: run the whole system under a schedule of faults and prove the ledger.

It starts what `cityhub up` starts (``cityhub.cli.up.System``: private
broker and database, the simulated fleet keeping its ledger, one gateway
per site, the ingest workers, the alerts job, as separate processes), puts
a ``LinkCutter`` between each gateway and the central broker, applies the
schedule (``cityhub.soak.schedule``), stops the simulator, waits for the
system to drain and accounts for every reading of the ledger: stored
exactly once, or rejected with a reason. It prints the fault timeline and
the counts and exits 1 on any loss or duplicate.

A `cityhub` command rather than a script in bench/: it composes every
service and the local servers (only the `cityhub` layer may import them
all), it is installed with the package, has --help and the settings like
every command, and CI runs the same command a person runs.

Two kinds of loss are reported apart, because the system cannot prevent
them: readings the site broker acknowledged and held only in memory when
it was killed (Mosquitto saves its store every ``autosave_interval``),
and serial readings a killed gateway had read from the
line but not yet put in its outbox, or that were written while it was down
(a serial line has no acknowledgement and the restarted gateway opens the
port with an empty input buffer). The first fails the run unless
``--broker-crash-loss report``; serial readings missing outside the
windows of their gateway's kills fail it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import re
import signal
import subprocess
import time
import tomllib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import msgspec
import typer
from rich.markup import escape
from rich.table import Table

from cityhub.cli.context import CliState, reported_errors, state_of
from cityhub.cli.sim import gateway_id_for, load_fleet, parse_duration
from cityhub.cli.up import DEFAULT_SITES, System
from cityhub.localstack.procs import group_alive
from cityhub.soak.proxy import LinkCutter
from cityhub.soak.schedule import (
    BROKER_FAULTS,
    LINK_FAULTS,
    Fault,
    Schedule,
    make_schedule,
    parse_schedule,
    schedule_toml,
)
from contracts.errors import LocalServiceError, SettingsError
from contracts.wording import count_noun
from firmware_sim.ledger import Ledger, LedgerEntry, Reconciliation

# A killed gateway loses the serial readings it had read but not yet put in
# its fsynced outbox (one batch interval, 200 ms, and the frame it was
# decoding) and those written while it was down (the restarted gateway opens
# the port with an empty input buffer, as a UART would have overrun): the
# window of each kill starts this much before it.
SERIAL_IN_MEMORY_MS = 1000
# How long a broker kill waits for the gateways to be connected and caught up.
CATCH_UP_TIMEOUT_S = 60.0
PROGRESS_EVERY_S = 10.0
# Batches in flight in a gateway that is caught up (one leaves every 200 ms
# and its ack follows a commit later): no backlog, not an empty outbox.
CAUGHT_UP_BATCHES = 3
# A gateway state older than this (they come every second) does not show it caught up.
FRESH_STATE_MS = 3000
# Mosquitto's autosave_interval when its config does not say.
DEFAULT_AUTOSAVE_S = 1800.0


class CrashLoss(enum.StrEnum):
    fail = "fail"
    report = "report"


@dataclass
class Event:
    """One fault as it happened."""

    at_s: float
    kind: str
    target: str
    duration_s: float
    note: str = ""


@dataclass
class Outcome:
    result: Reconciliation
    drained: bool
    broker_window: list[LedgerEntry] = field(default_factory=list)
    serial_in_crash: Counter[str] = field(default_factory=Counter)
    lost: list[LedgerEntry] = field(default_factory=list)
    serial_lost: Counter[str] = field(default_factory=Counter)


def soak(
    ctx: typer.Context,
    duration: Annotated[
        str,
        typer.Option("--for", help="Run length when the schedule is generated (3m, 30m)."),
    ] = "3m",
    seed: Annotated[int, typer.Option(help="Seed of the generated schedule and the fleet.")] = 0,
    schedule_file: Annotated[
        Path | None,
        typer.Option(
            "--schedule",
            help="Schedule (TOML, as --print-schedule writes it) instead of a generated one.",
            dir_okay=False,
            exists=True,
        ),
    ] = None,
    sites: Annotated[
        str | None,
        typer.Option(help="Comma-separated seed site ids (default: those of `cityhub up`)."),
    ] = None,
    workers: Annotated[
        int, typer.Option(min=2, help="Ingest worker processes (two or more: each is killed).")
    ] = 2,
    cut: Annotated[
        str, typer.Option(help="How long a cut uplink or a full outbox lasts (60s).")
    ] = "60s",
    small_outbox_bytes: Annotated[
        int,
        typer.Option(
            min=1024,
            help="gateway.outbox_max_bytes of the gateways an outbox_full fault targets.",
        ),
    ] = 16384,
    broker_crash_loss: Annotated[
        CrashLoss,
        typer.Option(
            help="Readings lost in a broker crash window (acknowledged, not yet saved by the "
            "broker): fail the run, or only report them."
        ),
    ] = CrashLoss.fail,
    drain_timeout: Annotated[
        str, typer.Option(help="How long to wait for the backlog after the schedule (5m).")
    ] = "5m",
    print_schedule: Annotated[
        bool, typer.Option(help="Print the schedule as TOML and exit without running it.")
    ] = False,
) -> None:
    """Run the whole system under a fault schedule; exit 1 on any lost or duplicated reading.

    Faults: kill -9 and restart of a gateway, an ingest worker, the broker and
    PostgreSQL; SIGSTOP hangs of each; a gateway's uplink cut; a small outbox
    filling up while its uplink is cut. The same seed and duration give the
    same schedule; the one used is written to the run directory (soak/).
    """
    state = state_of(ctx)
    # SIGTERM stops a soak like Ctrl-C: every child and server is stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    with reported_errors(state):
        failed = _soak(
            state,
            duration_s=parse_duration(duration),
            seed=seed,
            schedule_file=schedule_file,
            sites=sites,
            workers=workers,
            cut_s=parse_duration(cut),
            small_outbox_bytes=small_outbox_bytes,
            broker_crash_loss=broker_crash_loss,
            drain_timeout_s=parse_duration(drain_timeout),
            print_schedule=print_schedule,
        )
    if failed:
        raise typer.Exit(1)


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _load_schedule(
    path: Path | None,
    *,
    duration_s: float,
    seed: int,
    gateways: list[str],
    workers: int,
    cut_s: float,
) -> Schedule:
    if path is None:
        return make_schedule(
            seed=seed, duration_s=duration_s, gateways=gateways, workers=workers, cut_s=cut_s
        )
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError("--schedule", f"{path}: {exc}") from None
    return parse_schedule(document, gateways=gateways, workers=workers)


def _soak(
    state: CliState,
    *,
    duration_s: float,
    seed: int,
    schedule_file: Path | None,
    sites: str | None,
    workers: int,
    cut_s: float,
    small_outbox_bytes: int,
    broker_crash_loss: CrashLoss,
    drain_timeout_s: float,
    print_schedule: bool,
) -> bool:
    _, specs = load_fleet(None, sites=sites, seed=seed, default_sites=DEFAULT_SITES)
    gateways = sorted({gateway_id_for(s.site_id) for s in specs})
    schedule = _load_schedule(
        schedule_file,
        duration_s=duration_s,
        seed=seed,
        gateways=gateways,
        workers=workers,
        cut_s=cut_s,
    )
    if print_schedule:
        state.console.print(schedule_toml(schedule), highlight=False, markup=False)
        return False
    system, cutters = _soak_system(
        state,
        schedule,
        sites=sites,
        workers=workers,
        seed=seed,
        small_outbox_bytes=small_outbox_bytes,
    )
    try:
        runner, result, drained = _run_schedule(
            state, system, cutters, schedule, gateways=gateways, drain_timeout_s=drain_timeout_s
        )
    finally:
        system.close()
        for cutter in cutters.values():
            cutter.close()
    outcome = classify(
        result,
        drained=drained,
        broker_kills_ms=runner.broker_kills_ms,
        window_ms=int(_autosave_s(system) * 1000) + 1000,
        gateway_down_ms=runner.gateway_down_ms,
        ledger=system.ledger,
        gateway_of={s.device_id: gateway_id_for(s.site_id) for s in specs},
    )
    _print_timeline(state, runner.events)
    failed = _print_outcome(state, outcome, broker_crash_loss)
    by_transport = Counter(str(e.transport) for e in system.ledger.acknowledged())
    _write_report(
        system.run_dir / "report.json", schedule, runner.events, outcome, failed, by_transport
    )
    return failed


def _soak_system(
    state: CliState,
    schedule: Schedule,
    *,
    sites: str | None,
    workers: int,
    seed: int,
    small_outbox_bytes: int,
) -> tuple[System, dict[str, LinkCutter]]:
    """`cityhub up`'s system, each gateway's uplink through a cutter, small outboxes to fill.

    The cutters are made as the gateways start (one per gateway, by id); the
    caller closes them with the system.
    """
    small = {f.target for f in schedule.fault if f.kind == "outbox_full"}
    cutters: dict[str, LinkCutter] = {}

    def central_port(gateway_id: str) -> int:
        cutter = cutters.get(gateway_id)
        if cutter is None:
            cutter = LinkCutter(name=gateway_id, upstream_port=system.stack.mqtt_port)
            cutters[gateway_id] = cutter
        return cutter.port

    system = System(
        state,
        sites=sites,
        fleet=None,
        workers=workers,
        seed=seed,
        run_name="soak",
        gateway_settings=lambda g: {"outbox_max_bytes": small_outbox_bytes} if g in small else {},
        central_port=central_port,
    )
    return system, cutters


def _run_schedule(
    state: CliState,
    system: System,
    cutters: dict[str, LinkCutter],
    schedule: Schedule,
    *,
    gateways: list[str],
    drain_timeout_s: float,
) -> tuple[FaultRunner, Reconciliation, bool]:
    """Start the system, inject the schedule's faults, wait for the backlog to drain."""
    system.start()
    _simulator_log_to(system.run_dir / "simulator.log")
    (system.run_dir / "schedule.toml").write_text(schedule_toml(schedule), encoding="utf-8")
    state.console.print(
        f"cityhub soak: {count_noun(len(system.specs), 'device', 'devices')}, "
        f"{count_noun(len(gateways), 'gateway', 'gateways')}, "
        f"{count_noun(system.workers, 'ingest worker', 'ingest workers')}, "
        f"{count_noun(len(schedule.fault), 'fault', 'faults')} over "
        f"{schedule.duration_s:.0f} s (seed {schedule.seed}); logs and schedule in "
        f"{system.run_dir}",
        highlight=False,
    )
    runner = FaultRunner(state, system, cutters)
    asyncio.run(runner.run(schedule))
    state.console.print("schedule done; waiting for the system to drain", highlight=False)
    result, drained = system.drain(timeout_s=drain_timeout_s, progress=runner.drain_progress)
    return runner, result, drained


def _write_report(
    path: Path,
    schedule: Schedule,
    events: list[Event],
    outcome: Outcome,
    failed: bool,
    by_transport: Counter[str],
) -> None:
    """The run as JSON: schedule, timeline, counts and every lost reading."""
    r = outcome.result

    def entries(items: list[LedgerEntry]) -> list[dict[str, object]]:
        return [msgspec.to_builtins(e) for e in items]

    report = {
        "failed": failed,
        "drained": outcome.drained,
        "schedule": msgspec.to_builtins(schedule),
        "timeline": [msgspec.to_builtins(e) for e in events],
        "acknowledged": r.acknowledged,
        "acknowledged_by_transport": dict(sorted(by_transport.items())),
        "stored": r.stored,
        "rejected": dict(r.rejected),
        "unacked_sent": r.unacked_sent,
        "unacked_stored": r.unacked_stored,
        "duplicates": r.duplicates,
        "lost": entries(outcome.lost),
        "serial_lost": dict(outcome.serial_lost),
        "broker_crash_window": entries(outcome.broker_window),
        "serial_while_gateway_down": dict(outcome.serial_in_crash),
    }
    path.write_bytes(msgspec.json.format(msgspec.json.encode(report)))


def _simulator_log_to(path: Path) -> None:
    """The simulated devices' reconnect warnings go to a file, not between the progress lines."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    sim_logger = logging.getLogger("firmware_sim")
    sim_logger.addHandler(handler)
    sim_logger.propagate = False


def _autosave_s(system: System) -> float:
    """The broker's autosave_interval, read from its generated config."""
    try:
        text = system.stack.mosquitto().config_path.read_text(encoding="utf-8")
    except OSError:
        return DEFAULT_AUTOSAVE_S
    match = re.search(r"^autosave_interval\s+(\d+)", text, re.MULTILINE)
    return float(match.group(1)) if match else DEFAULT_AUTOSAVE_S


def classify(
    result: Reconciliation,
    *,
    drained: bool,
    broker_kills_ms: list[int],
    window_ms: int,
    gateway_down_ms: dict[str, list[tuple[int, int]]],
    gateway_of: dict[str, str],
    ledger: Ledger,
) -> Outcome:
    """Split the losses into those a crash explains (reported apart) and the rest."""
    outcome = Outcome(result=result, drained=drained)
    for entry in result.lost:
        acked = entry.acked_ms or 0
        if any(kill - window_ms <= acked <= kill for kill in broker_kills_ms):
            outcome.broker_window.append(entry)
        else:
            outcome.lost.append(entry)
    for device_id, n in result.serial_lost.items():
        windows = gateway_down_ms.get(gateway_of.get(device_id, ""), [])
        allowed = sum(
            1
            for e in ledger.entries
            if e.device_id == device_id
            and e.acked_ms is not None
            and any(a <= e.acked_ms <= b for a, b in windows)
        )
        outcome.serial_in_crash[device_id] = min(n, allowed)
        if n > allowed:
            outcome.serial_lost[device_id] = n - allowed
    return outcome


class FaultRunner:
    """Applies a schedule to a running System, beside the simulator, in one event loop."""

    def __init__(self, state: CliState, system: System, cutters: dict[str, LinkCutter]) -> None:
        self.state = state
        self.system = system
        self.cutters = cutters
        self.events: list[Event] = []
        self.broker_kills_ms: list[int] = []
        # Per gateway: (from, to) wall ms while it was down after a kill -9,
        # until its restarted self reported its site link ready again.
        self.gateway_down_ms: dict[str, list[tuple[int, int]]] = {}
        self.start = time.monotonic()
        self.active: set[str] = set()
        # Faults on the same part wait for each other (a hang and a kill of the
        # broker never overlap, whatever a catch-up wait did to the times).
        self.locks: dict[str, asyncio.Lock] = {}

    def now_s(self) -> float:
        return time.monotonic() - self.start

    async def run(self, schedule: Schedule) -> None:
        stop = asyncio.Event()
        sim = self.system.sim
        sim_task = asyncio.create_task(sim.run(stop), name="simulator")
        progress = asyncio.create_task(self._progress(schedule), name="progress")
        self.start = time.monotonic()
        try:
            async with asyncio.TaskGroup() as group:
                for i, fault in enumerate(schedule.fault):
                    group.create_task(self._apply(fault), name=f"fault[{i}:{fault.kind}]")
                group.create_task(asyncio.sleep(schedule.duration_s), name="duration")
        finally:
            stop.set()
            progress.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await progress
            await sim_task

    async def _progress(self, schedule: Schedule) -> None:
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            ledger = self.system.ledger
            acked = sum(1 for e in ledger.entries if e.acked_ms is not None)
            active = ", ".join(sorted(self.active)) or "none"
            self.state.console.print(
                f"{self.now_s():6.0f}/{schedule.duration_s:.0f} s  "
                f"{count_noun(acked, 'reading', 'readings', grouped=True)} acknowledged  "
                f"faults done {len(self.events)}/{len(schedule.fault)}  "
                f"active: {active}",
                highlight=False,
                markup=False,
            )

    def drain_progress(self, result: Reconciliation) -> None:
        now = time.monotonic()
        if now - getattr(self, "_last_drain_print", 0.0) >= PROGRESS_EVERY_S:
            self._last_drain_print = now
            self.state.console.print(
                f"draining: {result.stored + sum(result.rejected.values()):,} of "
                f"{result.acknowledged:,} accounted for, {result.lost_total:,} still missing",
                highlight=False,
            )

    async def _apply(self, fault: Fault) -> None:
        await asyncio.sleep(max(0.0, fault.at_s - self.now_s()))
        label = f"{fault.kind}[{fault.target}]" if fault.target else fault.kind
        lock = self.locks.setdefault(_part(fault), asyncio.Lock())
        async with lock:
            self.active.add(label)
            at = self.now_s()
            try:
                note = await self._do(fault)
            except (OSError, subprocess.SubprocessError, LocalServiceError) as exc:
                note = f"FAILED: {exc}"
            finally:
                self.active.discard(label)
        self.events.append(Event(at, fault.kind, fault.target, self.now_s() - at, note))

    async def _do(self, fault: Fault) -> str:  # noqa: PLR0911 - one branch per kind
        kind, target, duration = fault.kind, fault.target, fault.duration_s
        children = self.system.children
        if kind == "kill_gateway":
            proc = children.get(target)
            birth = self._birth(target)
            killed_ms = _wall_ms()
            _signal_group(proc.pid, signal.SIGKILL)
            await asyncio.to_thread(proc.wait, 10)
            await asyncio.sleep(duration)
            children.restart(target)
            ready = await asyncio.to_thread(self._wait_reborn, target, birth)
            self.gateway_down_ms.setdefault(target, []).append(
                (killed_ms - SERIAL_IN_MEMORY_MS, _wall_ms())
            )
            return f"pid {proc.pid} killed, restarted" + ("" if ready else " (not ready in time)")
        if kind == "hang_gateway":
            return await self._hang(children.get(target).pid, duration, group=True)
        if kind in {"kill_ingest_worker", "hang_ingest_worker"}:
            pid = self._worker_pid(int(target))
            if kind == "hang_ingest_worker":
                return await self._hang(pid, duration, group=False)
            os.kill(pid, signal.SIGKILL)
            return f"pid {pid} killed; its supervisor restarts it"
        if kind in {"cut_uplink", "outbox_full"}:
            cutter = self.cutters[target]
            cutter.cut()
            try:
                await asyncio.sleep(duration)
            finally:
                cutter.restore()
            return "uplink cut, restored"
        if kind in BROKER_FAULTS:
            waited = await asyncio.to_thread(self._wait_caught_up)
            broker_pid = self.system.stack.mosquitto().pid()
            if broker_pid is None:
                return "broker not running: skipped"
            pid = broker_pid
            if kind == "hang_broker":
                return f"after {waited:.0f} s catching up; " + await self._hang(
                    pid, duration, group=True
                )
            self.broker_kills_ms.append(_wall_ms())
            await asyncio.to_thread(_kill_group_and_wait, pid)
            await asyncio.sleep(duration)
            await asyncio.to_thread(self.system.stack.mosquitto().start)
            return f"after {waited:.0f} s catching up; pid {pid} killed, restarted"
        db_pid = self.system.stack.postgres().pid()
        if db_pid is None:
            return "database not running: skipped"
        pid = db_pid
        if kind == "hang_db":
            return await self._hang(pid, duration, group=True)
        await asyncio.to_thread(_kill_group_and_wait, pid)
        await asyncio.sleep(duration)
        await asyncio.to_thread(self.system.stack.postgres().start)
        return f"pid {pid} and its backends killed, restarted"

    async def _hang(self, pid: int, duration: float, *, group: bool) -> str:
        send: Callable[[int, signal.Signals], None] = _signal_group if group else os.kill
        send(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(duration)
        finally:
            send(pid, signal.SIGCONT)
        return f"pid {pid} stopped, continued"

    def _worker_pid(self, index: int) -> int:
        """The ingest supervisor's worker processes (not its resource tracker), by pid."""
        parent = self.system.children.get("ingest").pid
        pids = []
        for task in Path(f"/proc/{parent}/task").iterdir():
            with contextlib.suppress(OSError):
                pids += [int(p) for p in (task / "children").read_text().split()]
        workers = []
        for pid in sorted(pids):
            with contextlib.suppress(OSError):
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    workers.append(pid)
        if not workers:
            raise LocalServiceError("no ingest worker process is running")
        return workers[index % len(workers)]

    def _birth(self, gateway_id: str) -> int:
        assert self.system.watcher is not None  # noqa: S101 - started
        state = self.system.watcher.snapshot().get(gateway_id)
        return state.birth if state is not None else -1

    def _wait_reborn(self, gateway_id: str, birth: int) -> bool:
        """Wait until the restarted gateway is online with its site link ready."""
        assert self.system.watcher is not None  # noqa: S101 - started
        deadline = time.monotonic() + CATCH_UP_TIMEOUT_S
        while time.monotonic() < deadline:
            s = self.system.watcher.snapshot().get(gateway_id)
            if s is not None and s.birth > birth and s.status == "online" and s.site_ready:
                return True
            time.sleep(0.1)
        return False

    def _wait_caught_up(self) -> float:
        """Wait until no link is cut and every gateway is online with an empty outbox."""
        watcher = self.system.watcher
        assert watcher is not None  # noqa: S101 - started
        started = time.monotonic()
        while time.monotonic() - started < CATCH_UP_TIMEOUT_S:
            states = watcher.snapshot()
            fresh_ms = time.time_ns() // 1_000_000 - FRESH_STATE_MS
            if not any(c.is_cut for c in self.cutters.values()) and all(
                (s := states.get(g)) is not None
                and s.status == "online"
                and s.outbox_depth <= CAUGHT_UP_BATCHES
                and s.ts_ms >= fresh_ms
                for g in self.system.gateway_ids
            ):
                break
            time.sleep(0.2)
        return time.monotonic() - started


def _part(fault: Fault) -> str:
    """The part a fault acts on: faults on one part never overlap."""
    if fault.kind in LINK_FAULTS:
        return f"link:{fault.target}"
    return fault.kind.split("_", 1)[1] + ":" + fault.target


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def _signal_group(pid: int, sig: signal.Signals) -> None:
    os.killpg(pid, sig)


def _kill_group_and_wait(pid: int) -> None:
    """SIGKILL a server's process group and wait until none of it is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        # A zombie member keeps the group; reap ours, wait for the rest.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not group_alive(pid):
            break
        time.sleep(0.05)


def _print_timeline(state: CliState, events: list[Event]) -> None:
    table = Table(title="cityhub soak: fault timeline", title_justify="left")
    for column in ("at s", "fault", "target", "lasted s", "what happened"):
        table.add_column(column, justify="right" if column.endswith(" s") else "left")
    for e in sorted(events, key=lambda e: e.at_s):
        table.add_row(
            f"{e.at_s:.1f}", e.kind, escape(e.target), f"{e.duration_s:.1f}", escape(e.note)
        )
    state.console.print(table)


def _print_outcome(state: CliState, outcome: Outcome, policy: CrashLoss) -> bool:
    r = outcome.result
    table = Table(title="cityhub soak: the ledger", title_justify="left")
    table.add_column("")
    table.add_column("readings", justify="right")
    table.add_row("sent by the simulator", f"{r.acknowledged + r.unacked_sent:,}")
    table.add_row(
        "acknowledged (PUBACK, HTTP 2xx, or answered on a serial line or bus)",
        f"{r.acknowledged:,}",
    )
    table.add_row("stored exactly once", f"{r.stored:,}")
    table.add_row("rejected with a reason", f"{sum(r.rejected.values()):,}")
    for reason, n in sorted(r.rejected.items()):
        table.add_row(f"  {reason}", f"{n:,}")
    table.add_row(
        "sent without PUBACK (stored anyway)", f"{r.unacked_sent:,} ({r.unacked_stored:,})"
    )
    table.add_row("lost in a broker crash window", f"{len(outcome.broker_window):,}")
    table.add_row(
        "serial, written while its gateway was down (kill -9)",
        f"{sum(outcome.serial_in_crash.values()):,}",
    )
    lost = len(outcome.lost) + sum(outcome.serial_lost.values())
    table.add_row("lost", f"[red]{lost:,}[/red]" if lost else "[green]0[/green]")
    dup = r.duplicates
    table.add_row("duplicated", f"[red]{dup:,}[/red]" if dup else "[green]0[/green]")
    state.console.print(table)
    for entry in outcome.lost[:20]:
        state.err.print(
            f"lost: {entry.device_id} seq {entry.seq} ts_ms {entry.ts_ms} "
            f"(acknowledged at {entry.acked_ms})",
            highlight=False,
        )
    for device_id, n in sorted(outcome.serial_lost.items()):
        state.err.print(
            f"lost: {count_noun(n, 'serial reading', 'serial readings')} of {device_id}"
            " while its gateway was up",
            highlight=False,
        )
    if not outcome.drained:
        state.err.print("the system did not drain before --drain-timeout")
    window = bool(outcome.broker_window) and policy is CrashLoss.fail
    failed = bool(lost or dup or window or not outcome.drained)
    state.console.print(
        "soak FAILED" if failed else "soak passed: every acknowledged reading accounted for",
        highlight=False,
    )
    return failed
