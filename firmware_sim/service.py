"""The simulator service: drives a fleet's devices over real transports.

- MQTT devices: one aiomqtt connection per device (its own client id and
  credential, a retained ``offline`` Will on ``d/{id}/status``, ``online``
  published at connect), all in one event loop; each device publishes its
  emissions at QoS 1 on ``d/{id}/up`` at their (accelerated) times. It
  subscribes ``d/{id}/cmd`` and obeys commands (``devicecontrol`` decides):
  answers on the request's Response Topic with its Correlation Data, the
  work in a task of its own; a new reporting interval reschedules the next
  reading at once; a reboot leaves the broker between readings and comes
  back with a new boot id and seq from 0 before it answers.
- LoRaWAN devices: a simulated ChirpStack MQTT integration
  (``firmware_sim.chirpstack``), one client publishing every device's join,
  uplink and status events to the site broker.
- Serial devices: a pseudo-terminal per device; the gateway opens the
  slave side (``ports``) with pyserial; the simulator writes PMS5003 /
  SDS011 frames (with line faults) into the master side, paced at 9600 baud,
  and reads the host's command frames from it: a sensor obeys them (sleep,
  query/passive mode, SDS011 working period; ``sensorcontrol``) and answers
  as its datasheet says.
- HTTP devices (``firmware_sim.httpdevice``): each posts its readings to
  its site's gateway endpoint (``http_endpoints``) with its bearer token,
  keeping a backlog of what is unanswered; a reading enters the ledger as
  acknowledged only with a 2xx (or the ``accepted`` count of an answer).

- Modbus devices: one pty per site bus (``ports`` names it for each of
  its devices), its slaves answered by ``firmware_sim.modbusslaves``; a
  poll answered with a good frame is a reading (``frames_written``, ledger).

Signals, models and faults are the pure modules' (``fleet``, ``models``,
``faults``); this module owns sockets, ptys and the clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import random
import termios
import time
import tty
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import aiomqtt

from adapters.backoff import backoff_delay_s
from adapters.mqtt import answer_properties
from contracts.commands import DeviceAnswer, encode_device_answer
from contracts.errors import BrokerUnavailableError
from contracts.frames import SERIAL_BAUD
from contracts.messages import DEVICE_OFFLINE, DEVICE_ONLINE, DeviceUplink
from contracts.settings import BrokerSettings
from contracts.topics import (
    device_answer_topic,
    device_command_topic,
    device_status_topic,
    device_uplink_topic,
)
from firmware_sim.chirpstack import ChirpStackIntegration
from firmware_sim.devicecontrol import DeviceControl, Work
from firmware_sim.faults import Emission, FaultCounters, FaultInjector
from firmware_sim.fleet import DeviceSpec, send_phases_ms, wall_time_ms
from firmware_sim.ledger import Ledger, LedgerEntry
from firmware_sim.models import device_rng
from firmware_sim.sensorcontrol import FRAME, SensorControl
from firmware_sim.sensorframes import frame_for, sds011_id

logger = logging.getLogger(__name__)

# 8N1: ten bits on the wire per byte.
LINE_BYTES_PER_S = SERIAL_BAUD / 10
# Reconnect backoff of a simulated device (firmware retries like this).
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 10.0
# A host's commands are 7 or 19 bytes; a read takes several at once.
COMMAND_READ_BYTES = 256


# How long a cancelled task gets before it is cancelled again.
_CANCEL_AGAIN_S: Final = 1.0


async def cancel_until_done(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` until each has ended, and collect how they ended.

    Once is not always enough on Python 3.11: ``asyncio.wait_for`` (aiomqtt's
    publish and subscribe, the reading loop's tick) returns its result and
    drops a cancellation that lands just as its inner wait completes, and
    the task runs on (a simulator then never stopped). ``asyncio.wait``
    neither raises what a task raised nor swallows a cancellation of the
    caller, which ``contextlib.suppress(CancelledError)`` around an await
    would.
    """
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _done, pending = await asyncio.wait(pending, timeout=_CANCEL_AGAIN_S)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: the caller has raised or logged what mattered


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


Credentials = Callable[[str], tuple[str | None, str | None]]


@dataclass(frozen=True)
class _Reply:
    """Where a command's answers go: its Response Topic and Correlation Data."""

    topic: str
    correlation: bytes | None


@dataclass
class _Link:
    """An MQTT device's connection state, shared by its readings, commands and jobs."""

    tick_ms: int  # the next reading's scheduled (simulated) time
    client: aiomqtt.Client | None = None
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    # Set by a command that changed the schedule or is rebooting the device.
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    reboot: Work | None = None  # a commanded reboot in progress
    rebooted: bool = False  # ... and done: the model has its new boot
    back: asyncio.Event = field(default_factory=asyncio.Event)  # up again after it
    jobs: set[asyncio.Task[None]] = field(default_factory=set)


@dataclass
class SimStats:
    """What the simulator did, by device type; the fault counters summed."""

    published: Counter[str] = field(default_factory=Counter)  # MQTT messages by type
    frames_written: Counter[str] = field(default_factory=Counter)  # serial frames by type
    bytes_dropped: int = 0  # serial bytes nobody read (the pty buffer was full)
    publish_failures: int = 0
    connected: int = 0
    late_ms_max: int = 0  # worst lateness of a send against its schedule
    commands: Counter[str] = field(default_factory=Counter)  # command messages by type
    answers: Counter[str] = field(default_factory=Counter)  # answers published by state
    posted: Counter[str] = field(default_factory=Counter)  # HTTP readings stored, by type

    def total(self) -> int:
        return (
            sum(self.published.values())
            + sum(self.frames_written.values())
            + sum(self.posted.values())
        )


class Simulator:
    def __init__(
        self,
        *,
        devices: list[DeviceSpec],
        site_broker: BrokerSettings,
        credentials: Credentials | None = None,
        topic_prefix: str = "",
        seed: int = 0,
        period_ms: int = 1000,
        time_acceleration: float = 1.0,
        clock: Callable[[], int] = wall_ms,
        record: bool = False,
        http_endpoints: dict[str, str] | None = None,
    ) -> None:
        self.devices = devices
        # Site id -> its gateway's HTTP base URL (http://127.0.0.1:port), for HTTP devices.
        self.http_endpoints = http_endpoints or {}
        # record=True keeps every reading sent (device id, uplink): the
        # ledger end-to-end tests compare the database with.
        self.sent: list[tuple[str, DeviceUplink]] | None = [] if record else None
        # record=True also keeps the ledger: every reading with its PUBACK time.
        self.ledger: Ledger | None = Ledger() if record else None
        self.broker = site_broker
        self.credentials = credentials or (lambda _id: (site_broker.username, site_broker.password))
        self.prefix = topic_prefix
        self.period_ms = period_ms
        self.seed = seed
        # The simulated ChirpStack integration of the LoRaWAN devices, once running.
        self.chirpstack: ChirpStackIntegration | None = None
        self.time_acceleration = time_acceleration
        self.clock = clock
        self.stats = SimStats()
        self.injectors: dict[str, FaultInjector] = {}
        # Serial device id -> what its commands have set (sleep, modes, period).
        self.controls: dict[str, SensorControl] = {}
        # MQTT device id -> its commands' side (schedule, answers kept).
        self.commanded: dict[str, DeviceControl] = {}
        phases = send_phases_ms([d.device_id for d in devices], seed=seed, period_ms=period_ms)
        self.phases = {d.device_id: int(p) for d, p in zip(devices, phases, strict=True)}
        # Serial devices get their pty now, so the gateway configs can name them.
        self._pty: dict[str, tuple[int, int, str]] = {}
        for spec in devices:
            if spec.transport == "serial":
                self._pty[spec.device_id] = self._open_pty()
        # Modbus devices: one bus (pty) per site, shared by its slaves.
        self._buses: dict[str, tuple[int, int, str]] = {}
        self._bus_specs: dict[str, list[DeviceSpec]] = {}
        for spec in devices:
            if spec.transport == "modbus":
                if spec.site_id not in self._buses:
                    self._buses[spec.site_id] = self._open_pty()
                self._bus_specs.setdefault(spec.site_id, []).append(spec)
        self.wall_start_ms = clock()
        self.sim_start_ms = self.wall_start_ms

    @staticmethod
    def _open_pty() -> tuple[int, int, str]:
        master, slave = os.openpty()
        tty.setraw(slave, termios.TCSANOW)
        flags = fcntl.fcntl(master, fcntl.F_GETFL)
        fcntl.fcntl(master, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        return master, slave, os.ttyname(slave)

    @property
    def ports(self) -> dict[str, str]:
        """Serial and Modbus device id -> the pty path its gateway reads (a Modbus bus's)."""
        ports = {device_id: path for device_id, (_m, _s, path) in self._pty.items()}
        for site_id, specs in self._bus_specs.items():
            for spec in specs:
                ports[spec.device_id] = self._buses[site_id][2]
        return ports

    def fault_counters(self) -> FaultCounters:
        total = FaultCounters()
        for injector in self.injectors.values():
            c = injector.counters
            for name in FaultCounters.__struct_fields__:
                value = getattr(c, name)
                if isinstance(value, dict):
                    merged = getattr(total, name)
                    for key, count in value.items():
                        merged[key] = merged.get(key, 0) + count
                else:
                    setattr(total, name, getattr(total, name) + value)
        return total

    def _sim_to_wall(self, sim_ms: int) -> int:
        return wall_time_ms(
            sim_ms,
            wall_start_ms=self.wall_start_ms,
            sim_start_ms=self.sim_start_ms,
            time_acceleration=self.time_acceleration,
        )

    def _sim_now(self) -> int:
        elapsed = self.clock() - self.wall_start_ms
        return self.sim_start_ms + round(elapsed * self.time_acceleration)

    async def _sleep_until_sim(self, sim_ms: int) -> None:
        delay_ms = self._sim_to_wall(sim_ms) - self.clock()
        if delay_ms > 0:
            await asyncio.sleep(delay_ms / 1000)
        else:
            self.stats.late_ms_max = max(self.stats.late_ms_max, -delay_ms)

    def _ticks(self, spec: DeviceSpec) -> FaultInjector:
        injector = spec.injector(period_ms=self.period_ms)
        self.injectors[spec.device_id] = injector
        return injector

    def _next_tick(self, spec: DeviceSpec, after_sim_ms: int) -> int:
        """The next point of the device's grid (its phase + k periods) after ``after_sim_ms``."""
        phase = self.phases[spec.device_id]
        control = self.commanded.get(spec.device_id)
        period_ms = control.period_ms if control is not None else self.period_ms
        steps = (after_sim_ms - phase) // period_ms + 1
        return phase + steps * period_ms

    def _sim_delay_s(self, sim_s: float) -> float:
        """Wall-clock seconds that ``sim_s`` simulated seconds take."""
        return sim_s / self.time_acceleration

    async def _mqtt_device(self, spec: DeviceSpec) -> None:
        injector = self._ticks(spec)
        control = DeviceControl(
            spec.model,
            period_ms=self.period_ms,
            plan=spec.faults,
            rng=device_rng(spec.model.seed, spec.device_id, "commands"),
        )
        self.commanded[spec.device_id] = control
        link = _Link(tick_ms=self._next_tick(spec, self._sim_now()))
        username, password = self.credentials(spec.device_id)
        status = device_status_topic(spec.device_id, self.prefix)
        failures = 0
        try:
            while True:
                try:
                    async with aiomqtt.Client(
                        self.broker.host or "127.0.0.1",
                        self.broker.port,
                        identifier=spec.device_id,
                        username=username,
                        password=password,
                        protocol=aiomqtt.ProtocolVersion.V5,
                        will=aiomqtt.Will(status, DEVICE_OFFLINE, qos=1, retain=True),
                        keepalive=30,
                    ) as client:
                        self.stats.connected += 1
                        failures = 0
                        try:
                            await client.subscribe(
                                device_command_topic(spec.device_id, self.prefix), qos=1
                            )
                            await client.publish(status, DEVICE_ONLINE, qos=1, retain=True)
                            link.client = client
                            link.connected.set()
                            if link.reboot is not None and link.rebooted:
                                # Back from a commanded reboot: its job answers now.
                                link.reboot = None
                                link.rebooted = False
                                link.back.set()
                            await self._connected(spec, client, injector, control, link)
                        finally:
                            link.connected.clear()
                            link.client = None
                            self.stats.connected -= 1
                            with contextlib.suppress(aiomqtt.MqttError):
                                await client.publish(status, DEVICE_OFFLINE, qos=1, retain=True)
                except aiomqtt.MqttError as exc:
                    self.stats.publish_failures += 1
                    failures += 1
                    delay = backoff_delay_s(
                        failures,
                        min_s=RECONNECT_MIN_S,
                        max_s=RECONNECT_MAX_S,
                        draw=random.random(),  # noqa: S311 - jitter, not security
                    )
                    logger.warning(
                        "device %s: %s; reconnecting in %.1f s", spec.device_id, exc, delay
                    )
                    await asyncio.sleep(delay)
                    link.tick_ms = self._next_tick(spec, self._sim_now())
                # Off the broker with a commanded reboot due (the connection was
                # left for it, or broke meanwhile): off for a while, then up
                # again with a new boot id and seq from 0.
                work = link.reboot
                if work is not None and not link.rebooted:
                    await asyncio.sleep(self._sim_delay_s(work.duration_s))
                    spec.model.reboot(self._sim_now())
                    injector.note_reboot()
                    link.rebooted = True
                    link.tick_ms = self._next_tick(spec, self._sim_now())
        finally:
            for job in list(link.jobs):
                job.cancel()

    async def _connected(
        self,
        spec: DeviceSpec,
        client: aiomqtt.Client,
        injector: FaultInjector,
        control: DeviceControl,
        link: _Link,
    ) -> None:
        """Readings and commands on one connection; returns when a reboot takes the device down.

        Raises MqttError when the connection breaks (either side sees it).
        """
        readings = asyncio.create_task(
            self._readings(spec, client, injector, control, link),
            name=f"readings[{spec.device_id}]",
        )
        commands = asyncio.create_task(
            self._commands(spec, client, injector, control, link),
            name=f"commands[{spec.device_id}]",
        )
        try:
            done, _pending = await asyncio.wait(
                {readings, commands}, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                task.result()  # raises what ended it
        finally:
            await cancel_until_done([readings, commands])

    async def _wait_tick(self, sim_ms: int, wake: asyncio.Event) -> bool:
        """Sleep until simulated ``sim_ms``; False if ``wake`` was set first."""
        delay_ms = self._sim_to_wall(sim_ms) - self.clock()
        if delay_ms <= 0:
            self.stats.late_ms_max = max(self.stats.late_ms_max, -delay_ms)
            return not wake.is_set()
        try:
            await asyncio.wait_for(wake.wait(), delay_ms / 1000)
        except TimeoutError:
            return True
        return False

    async def _readings(
        self,
        spec: DeviceSpec,
        client: aiomqtt.Client,
        injector: FaultInjector,
        control: DeviceControl,
        link: _Link,
    ) -> None:
        """Publish readings at the device's ticks until a reboot is due (then return)."""
        uplink = device_uplink_topic(spec.device_id, self.prefix)
        last_tick = link.tick_ms - control.period_ms
        while link.reboot is None:
            if not await self._wait_tick(link.tick_ms, link.wake):
                # A command changed the schedule (or a reboot is due): the new
                # period applies from the last reading; if that point is
                # past, from now.
                link.wake.clear()
                injector.period_ms = control.period_ms
                tick = self._next_tick(spec, last_tick)
                now = self._sim_now()
                link.tick_ms = tick if tick >= now else self._next_tick(spec, now)
                continue
            tick = link.tick_ms
            if control.may_report():
                for emission in injector.emit(tick):
                    if emission.payload is None:
                        continue
                    await self._sleep_until_sim(emission.at_ms)
                    try:
                        await client.publish(uplink, emission.payload, qos=1)
                    except aiomqtt.MqttError:
                        self._record(spec, emission.uplink, emission, acked=False)
                        raise
                    self.stats.published[spec.device_type] += 1
                    self._record(spec, emission.uplink, emission, acked=True)
                    if self.sent is not None and emission.malformed is None:
                        self.sent.append((spec.device_id, emission.uplink))
            last_tick = tick
            link.tick_ms = self._next_tick(spec, tick)

    async def _commands(
        self,
        spec: DeviceSpec,
        client: aiomqtt.Client,
        injector: FaultInjector,
        control: DeviceControl,
        link: _Link,
    ) -> None:
        """Take the commands on ``d/{id}/cmd``: answer at once, carry out the work in a task."""
        async for message in client.messages:
            payload = message.payload
            raw = bytes(payload) if isinstance(payload, bytes | bytearray) else b""
            properties = message.properties
            reply = _Reply(
                topic=getattr(properties, "ResponseTopic", None)
                or device_answer_topic(spec.device_id, self.prefix),
                correlation=getattr(properties, "CorrelationData", None),
            )
            self.stats.commands[spec.device_type] += 1
            decision = control.receive(raw, now_ms=self.clock())
            if decision.problem:
                logger.warning("device %s: command refused: %s", spec.device_id, decision.problem)
            for answer in decision.answers:
                await self._answer(spec, link, reply, answer)
            if control.period_ms != injector.period_ms:
                link.wake.set()
            if decision.work is not None:
                job = asyncio.create_task(
                    self._carry_out(spec, control, link, reply, decision.work),
                    name=f"command[{spec.device_id}:{decision.work.command.command_id}]",
                )
                link.jobs.add(job)
                job.add_done_callback(link.jobs.discard)

    async def _carry_out(
        self, spec: DeviceSpec, control: DeviceControl, link: _Link, reply: _Reply, work: Work
    ) -> None:
        """Do a delivered command's work (a reboot included), then give its final answer."""
        if work.reboot:
            link.back.clear()
            link.reboot = work
            link.wake.set()
            await link.back.wait()
        else:
            await asyncio.sleep(self._sim_delay_s(work.duration_s))
        if work.late_s:
            await asyncio.sleep(self._sim_delay_s(work.late_s))
        await self._answer(spec, link, reply, control.complete(work))

    async def _answer(
        self, spec: DeviceSpec, link: _Link, reply: _Reply, answer: DeviceAnswer
    ) -> None:
        """Publish an answer on the request's Response Topic, once connected (again)."""
        properties = answer_properties(reply.correlation)
        payload = encode_device_answer(answer)
        while True:
            await link.connected.wait()
            client = link.client
            if client is None:
                await asyncio.sleep(RECONNECT_MIN_S)
                continue
            try:
                await client.publish(reply.topic, payload, qos=1, properties=properties)
            except aiomqtt.MqttError as exc:
                logger.warning("device %s: answer not sent (%s); retrying", spec.device_id, exc)
                await asyncio.sleep(RECONNECT_MIN_S)
                continue
            self.stats.answers[answer.state] += 1
            logger.debug(
                "device %s: %s %s %s",
                spec.device_id,
                answer.command_id,
                answer.state,
                answer.detail,
            )
            return

    def _record(
        self, spec: DeviceSpec, uplink: DeviceUplink, emission: Emission, *, acked: bool
    ) -> None:
        """Ledger entry of one reading; malformed payloads are refused by design and left out."""
        if self.ledger is None or emission.malformed is not None:
            return
        self.ledger.add(
            LedgerEntry(
                device_id=spec.device_id,
                transport=spec.transport,
                seq=uplink.seq,
                ts_ms=uplink.ts_ms,
                acked_ms=wall_ms() if acked else None,
                faults=emission.faults,
            )
        )

    async def _http_device(self, spec: DeviceSpec) -> None:
        """Readings at the device's ticks into its backlog; its uplink posts them."""
        from firmware_sim.httpdevice import HttpUplink

        url = self.http_endpoints.get(spec.site_id)
        if url is None or spec.http_token is None:
            # The rest of the fleet runs on: a run without gateway endpoints
            # (`cityhub sim run`) simulates the other transports.
            logger.warning(
                "device %s: no HTTP endpoint for site %s (or no token): not simulated",
                spec.device_id,
                spec.site_id,
            )
            return
        injector = self._ticks(spec)

        def settled(emission: Emission, acked: bool) -> None:
            self._record(spec, emission.uplink, emission, acked=acked)
            if acked:
                self.stats.posted[spec.device_type] += 1
                if self.sent is not None:
                    self.sent.append((spec.device_id, emission.uplink))

        uplink = HttpUplink(
            base_url=url, device_id=spec.device_id, token=spec.http_token, on_settled=settled
        )
        sender = asyncio.create_task(uplink.run(), name=f"http[{spec.device_id}]")
        tick = self._next_tick(spec, self._sim_now())
        try:
            while True:
                await self._sleep_until_sim(tick)
                for emission in injector.emit(tick):
                    await self._sleep_until_sim(emission.at_ms)
                    uplink.add(emission)
                tick = self._next_tick(spec, tick)
        finally:
            await cancel_until_done([sender])
            uplink.abandon()

    async def _serial_device(self, spec: DeviceSpec) -> None:
        assert spec.protocol is not None  # noqa: S101 - build_fleet gives serial devices one
        injector = self._ticks(spec)
        master = self._pty[spec.device_id][0]
        control = SensorControl(spec.protocol, device_id=sds011_id(spec.device_id))
        self.controls[spec.device_id] = control
        # One writer on the line at a time: a reply never lands inside a frame.
        line = asyncio.Lock()
        latest: list[dict[str, float]] = [{}]  # the metrics of the last reading
        commands = asyncio.create_task(
            self._serial_commands(spec, control, line, latest),
            name=f"commands[{spec.device_id}]",
        )
        tick = self._next_tick(spec, self._sim_now())
        try:
            while True:
                await self._sleep_until_sim(tick)
                emissions = injector.emit(tick)
                if emissions:
                    latest[0] = emissions[-1].uplink.metrics
                async with line:
                    # Asked under the lock: a command answered meanwhile applies.
                    # No: asleep, in query/passive mode or between working periods.
                    if control.may_report(tick):
                        await self._write_frames(spec, injector, master, emissions)
                tick = self._next_tick(spec, tick)
        finally:
            commands.cancel()

    async def _write_frames(
        self, spec: DeviceSpec, injector: FaultInjector, master: int, emissions: list[Emission]
    ) -> None:
        assert spec.protocol is not None  # noqa: S101 - checked by the caller
        frames = [frame_for(spec.protocol, e.uplink.metrics, spec.device_id) for e in emissions]
        complete = True
        try:
            for chunk in injector.serial_write(frames, spec.protocol):
                try:
                    os.write(master, chunk)
                except BlockingIOError:
                    self.stats.bytes_dropped += len(chunk)
                    complete = False
                # Pace at the line rate: 32 bytes take 33 ms at 9600 baud.
                await asyncio.sleep(len(chunk) / LINE_BYTES_PER_S / self.time_acceleration)
        except asyncio.CancelledError:
            # Stopped between writes: some of these frames are on the line,
            # which ones is unknown (the ledger holds them as unacknowledged).
            for e in emissions:
                self._record(spec, e.uplink, e, acked=False)
            raise
        # Counted once on the line (stats and ``sent``).
        self.stats.frames_written[spec.device_type] += len(frames)
        if self.sent is not None:
            self.sent.extend((spec.device_id, e.uplink) for e in emissions)
        for e in emissions:
            # A full pty buffer dropped bytes of this tick: which frame is unknown.
            self._record(spec, e.uplink, e, acked=complete)

    async def _serial_commands(
        self,
        spec: DeviceSpec,
        control: SensorControl,
        line: asyncio.Lock,
        latest: list[dict[str, float]],
    ) -> None:
        """Read the host's commands off the pty and answer them (``sensorcontrol``).

        A frame answering a query (SDS011 command 4, PMS5003 0xE2) is the last
        reading's, without line faults; it is counted in ``frames_written`` but
        not in ``sent`` or the ledger (it repeats a reading, seq and all).
        """
        assert spec.protocol is not None  # noqa: S101 - checked by the caller
        master = self._pty[spec.device_id][0]
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        loop.add_reader(master, readable.set)
        try:
            while True:
                await readable.wait()
                readable.clear()
                try:
                    data = os.read(master, COMMAND_READ_BYTES)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    logger.warning("device %s: pty read failed: %s", spec.device_id, exc)
                    return
                answers = control.feed(data)
                if not answers:
                    continue
                async with line:
                    for answer in answers:
                        raw = (
                            frame_for(spec.protocol, latest[0], spec.device_id)
                            if answer == FRAME
                            else answer
                        )
                        try:
                            os.write(master, raw)
                        except BlockingIOError:
                            self.stats.bytes_dropped += len(raw)
                            continue
                        if answer == FRAME:
                            self.stats.frames_written[spec.device_type] += 1
                        await asyncio.sleep(len(raw) / LINE_BYTES_PER_S / self.time_acceleration)
        finally:
            loop.remove_reader(master)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run every device until ``stop`` is set (or the task is cancelled).

        The ptys stay open afterwards, so a gateway can read the last frames;
        ``close`` them when done.
        """
        if any(d.transport in ("mqtt", "lorawan") for d in self.devices) and self.broker.port <= 0:
            raise BrokerUnavailableError("simulator: no site broker port")
        logger.info(
            "simulating %d devices (%d serial) at %gx",
            len(self.devices),
            len(self._pty),
            self.time_acceleration,
        )
        tasks: list[asyncio.Task[None]] = []
        try:
            async with asyncio.TaskGroup() as group:
                lorawan = [d for d in self.devices if d.transport == "lorawan"]
                if lorawan:
                    self.chirpstack = self._chirpstack(lorawan)
                    tasks.append(group.create_task(self.chirpstack.run(), name="chirpstack"))
                tasks.extend(
                    group.create_task(self._modbus_bus(site_id), name=f"modbus[{site_id}]")
                    for site_id in self._buses
                )
                for spec in self.devices:
                    if spec.transport in ("lorawan", "modbus"):
                        continue  # the ChirpStack integration / its site's bus sends for it
                    runner = (
                        self._serial_device
                        if spec.transport == "serial"
                        else self._http_device
                        if spec.transport == "http"
                        else self._mqtt_device
                    )
                    tasks.append(group.create_task(runner(spec), name=f"device[{spec.device_id}]"))
                if stop is not None:
                    await stop.wait()
                    await cancel_until_done(tasks)
        finally:
            logger.info("simulator stopped: %d readings sent", self.stats.total())

    def _chirpstack(self, devices: list[DeviceSpec]) -> ChirpStackIntegration:
        """The simulated ChirpStack integration publishing the LoRaWAN devices' events."""
        return ChirpStackIntegration(
            devices=devices,
            broker=self.broker,
            credentials=self.credentials("chirpstack"),
            seed=self.seed,
            injector=self._ticks,
            next_tick=self._next_tick,
            sim_now=self._sim_now,
            sleep_until_sim=self._sleep_until_sim,
            wall_ms=wall_ms,
            ledger=self.ledger,
            sent=self.sent,
            published=self.stats.published,
        )

    async def _modbus_bus(self, site_id: str) -> None:
        """Answer the gateway's requests to the site's slaves (``modbusslaves``)."""
        from firmware_sim.modbusslaves import ModbusBusSim

        specs = self._bus_specs[site_id]
        for spec in specs:
            self._ticks(spec)

        def reading(spec: DeviceSpec, emission: Emission, good: bool) -> None:
            if good:
                self.stats.frames_written[spec.device_type] += 1
                if self.sent is not None:
                    self.sent.append((spec.device_id, emission.uplink))
            self._record(spec, emission.uplink, emission, acked=good)

        bus = ModbusBusSim(
            name=site_id,
            specs=specs,
            master_fd=self._buses[site_id][0],
            injectors=self.injectors,
            sim_now=self._sim_now,
            on_reading=reading,
        )
        await bus.run()

    def close(self) -> None:
        """Close the ptys (after the gateways have read what was written)."""
        for master, slave, _path in [*self._pty.values(), *self._buses.values()]:
            for fd in (master, slave):
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._pty.clear()
        self._buses.clear()
