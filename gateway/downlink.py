"""The gateway's command downlink: commands from the centre, to devices, reports back.

The shell around ``gateway.commanding``. One task (``run``) takes every
event in order from one queue, so a command's record is changed by one
writer: a GatewayCommands message from the central link, a device's answer
from the site link, a site PUBACK, and a tick (every TICK_S) that delivers
what can be delivered and applies the clock (expiry, answer deadlines,
pruning). Each change is stored with its report in one fsynced transaction
(``Outbox.apply_changes``) before anything is published, and before a
device's answer is acknowledged to the site broker. A second task
(``send_reports``) publishes the stored reports on the central link at QoS 1,
at most REPORTS_PER_MESSAGE_MAX per message, again after ``ack_timeout_s``
until an ack names them, like batches.

Delivery to an MQTT device: when the tracker says it is online and the site
broker has granted the gateway its answer topic, the command is stored as
``delivering``, then published on ``d/{id}/cmd`` with the Response Topic
``d/{id}/res`` and the command id as Correlation Data. After a restart (or a
site reconnect before the PUBACK), a command handed over but not answered is
published again unchanged.

Delivery to a serial sensor (``gateway.serialcommands``): when its port is
open (a sensor asleep sends nothing, yet must be reachable to be woken),
one command at a time per port: the command is stored as ``delivering``,
its frames are written (``SerialPort.send``), then ``delivered`` and the
outcome come back as the sensor's answers would (an SDS011's 0xC5 reply
within 3 s confirms it; a PMS5003 never answers, so writing it is success).
The exchange runs in a task of its own and hands its answers to the one
writer through the queue, so a sensor's 3 s never hold up other commands.
A serial command found ``delivering`` after a restart fails ("interrupted"):
it is never written twice.

Delivery to a Modbus slave: a catalog command its model writes registers
for (``ModbusModel.writes_for``; any other fails at once, it is never
published over MQTT), when its bus is open, one command at a time per
device: stored as ``delivering``, its words (``encode_write``) queued on
the bus (``BusPoller.write``) and written between polls; ``delivered`` once
the first write is on the line, ``succeeded`` when the slave echoes every
write, ``failed`` with the slave's exception or the timeout otherwise. Like
a serial command, one found ``delivering`` after a restart fails.

Bad input (a malformed message, an answer for a command the device was not
given) is a WARNING, a reject counted by reason, and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

from adapters.loglimit import LogLimiter
from adapters.mqtt import MqttLink
from contracts.catalog import DEFAULT_COMMAND_TIMEOUT_S, current_catalog, modbus_model
from contracts.commands import (
    REPORTS_PER_MESSAGE_MAX,
    CommandReports,
    CommandState,
    DeviceAnswer,
    decode_device_answer,
    decode_gateway_commands,
    encode_command,
    encode_command_reports,
)
from contracts.errors import CommandRefusedError, InputError, SerialUnavailableError
from contracts.messages import DeviceConfig
from contracts.mqttcodec import Publish
from contracts.registermaps import RegisterWrite, encode_write
from contracts.topics import (
    command_report_topic,
    device_answer_topic,
    device_command_topic,
    parse_device_topic,
)
from gateway.commanding import (
    Change,
    Held,
    deliverable,
    fail,
    interrupted,
    is_active,
    prunable,
    receive_answer,
    receive_commands,
    redeliverable,
    refused_by_broker,
    start_delivery,
    sweep,
)
from gateway.counters import GatewayCounters
from gateway.outbox import Outbox
from gateway.sitelink import SiteLink

if TYPE_CHECKING:
    from contracts.frames import Sds011Reply
    from gateway.modbuspoller import BusPoller
    from gateway.serialcommands import SerialPlan

logger = logging.getLogger(__name__)

# Delivery and the clock are looked at this often: a device that comes online
# gets its waiting commands within a quarter second.
TICK_S: Final = 0.25
# Final commands are kept a day (tombstones) and only looked at for pruning,
# this often; every event looks at the open ones only. Scanning every held
# command at each event cost ~2 us per command kept, 9 ms of CPU per command
# after a thousand (bench/bench_commands.py), and grows with a day's commands.
PRUNE_EVERY_MS: Final = 60_000
# A serial exchange's deadline past its reply timeout: the exchange reports
# first; the deadline only ends one whose task died.
_SERIAL_DEADLINE_MARGIN_S: Final = 5.0
_LOG_PER_MINUTE: Final = 5
# Devices on a line the gateway drives (no broker in between): a command
# handed over before a restart is failed, never written twice.
_LINE_TRANSPORTS: Final = ("serial", "modbus")
# Command messages kept while no config says which devices are served.
_DEFERRED_MAX: Final = 64


@dataclass(frozen=True, slots=True)
class _Commands:
    payload: bytes


@dataclass(frozen=True, slots=True)
class _Answers:
    publishes: list[Publish]
    generation: int


@dataclass(frozen=True, slots=True)
class _Puback:
    packet_id: int
    reason_code: int


@dataclass(frozen=True, slots=True)
class _SerialAnswers:
    """What a serial exchange found, as the answers a device would have sent."""

    device_id: str
    answers: list[DeviceAnswer]


_Event = _Commands | _Answers | _Puback | _SerialAnswers | None


class SerialPort(Protocol):
    """What the downlink needs of a serial source (``gateway.serialport.SerialSource``)."""

    @property
    def is_open(self) -> bool: ...

    async def send(self, data: bytes) -> None: ...


class CommandDownlink:
    """Held commands, their delivery and their reports, for one gateway."""

    def __init__(
        self,
        *,
        gateway_id: str,
        prefix: str,
        outbox: Outbox,
        site: SiteLink,
        central: MqttLink,
        counters: GatewayCounters,
        clock: Callable[[], int],
        devices: Callable[[], Mapping[str, DeviceConfig]],
        configured: Callable[[], bool],
        online: Callable[[str], bool],
        reject: Callable[[str, str, str, bytes], None],
        ack_timeout_s: float,
    ) -> None:
        self.gateway_id = gateway_id
        self.prefix = prefix
        self.outbox = outbox
        self.site = site
        self.central = central
        self.counters = counters
        self.clock = clock
        self._devices = devices
        self._configured = configured
        # Messages that came before any config: the devices they name are not known yet.
        self._deferred: list[bytes] = []
        self._online = online
        self._reject = reject
        self.resend_after_ms = int(ack_timeout_s * 1000)
        self.held: dict[str, Held] = {h.command_id: h for h in outbox.load_commands()}
        # The held commands not yet final: what delivery and the clock look at.
        self.open: dict[str, Held] = {c: h for c, h in self.held.items() if not h.final}
        self._pruned_ms = 0
        # Command id -> the site connection it was last published on, this run.
        self.published: dict[str, int] = {}
        # Site packet id -> command id, for PUBACKs of the current connection.
        self._inflight: dict[int, str] = {}
        self._inflight_generation = 0
        self._events: asyncio.Queue[_Event] | None = None
        self._wake_reports: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._restarted = True
        self._log = LogLimiter(limit=_LOG_PER_MINUTE, span=60_000)
        # Serial devices: their open sources, the replies an exchange waits for,
        # and the devices with an exchange under way (one at a time per port).
        self._ports: dict[str, SerialPort] = {}
        self._replies: dict[str, asyncio.Queue[Sds011Reply]] = {}
        self._exchanges: dict[str, asyncio.Task[None]] = {}
        # Modbus devices: the poller of each one's bus.
        self._buses: dict[str, BusPoller] = {}

    # -- event sources (event loop thread) -------------------------------------------

    def _put(self, event: _Event) -> None:
        if self._events is not None:
            self._events.put_nowait(event)

    def on_commands(self, payload: bytes) -> None:
        """A message on the gateway's command topic."""
        self._put(_Commands(payload))

    def on_answers(self, publishes: list[Publish], generation: int) -> None:
        """Device messages on answer topics; acknowledged once their change is stored."""
        self._put(_Answers(publishes, generation))

    def on_puback(self, packet_id: int, reason_code: int) -> None:
        self._put(_Puback(packet_id, reason_code))

    def attach_serial(self, device_id: str, port: SerialPort) -> None:
        """A serial device's source is running: commands can be written to it."""
        self._ports[device_id] = port

    def detach_serial(self, device_id: str, port: SerialPort) -> None:
        if self._ports.get(device_id) is port:
            del self._ports[device_id]

    def attach_modbus(self, device_id: str, bus: BusPoller) -> None:
        """A Modbus device's bus is running: its commands' writes can be queued on it."""
        self._buses[device_id] = bus

    def detach_modbus(self, device_id: str, bus: BusPoller) -> None:
        if self._buses.get(device_id) is bus:
            del self._buses[device_id]

    def on_serial_replies(self, device_id: str, replies: list[Sds011Reply]) -> None:
        """SDS011 replies read from a device's port (event loop): to the exchange waiting."""
        queue = self._replies.get(device_id)
        if queue is not None:
            for reply in replies:
                queue.put_nowait(reply)

    def wake(self) -> None:
        """Look at delivery now (a device came online); any thread."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(self._put, None)

    def wake_reports(self) -> None:
        if self._loop is not None and self._wake_reports is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._wake_reports.set)

    # -- the one writer --------------------------------------------------------------

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        events: asyncio.Queue[_Event] = asyncio.Queue()
        self._events = events
        self._wake_reports = asyncio.Event()
        while True:
            event: _Event = None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK_S):
                    event = await events.get()
            if isinstance(event, _Commands):
                await self._commands(event.payload)
            elif isinstance(event, _Answers):
                await self._answers(event)
            elif isinstance(event, _Puback):
                await self._puback(event)
            elif isinstance(event, _SerialAnswers):
                await self._serial_answers(event)
            await self._tick()

    async def _store(self, changes: list[Change]) -> None:
        """Store changes (fsynced, a worker thread), then take them into memory and count."""
        if not changes:
            return
        await asyncio.to_thread(self.outbox.apply_changes, changes, self.clock())
        counters = self.counters
        for change in changes:
            command_id = change.held.command_id
            before = self.held.get(command_id)
            self.held[command_id] = change.held
            if change.held.final:
                self.open.pop(command_id, None)
                self.published.pop(command_id, None)
            else:
                self.open[command_id] = change.held
            report = change.report
            if report is None or (before is not None and before.state == change.held.state):
                continue  # a report due again changes nothing
            state = report.state
            if state == CommandState.SUCCEEDED:
                counters.commands_succeeded += 1
            elif state == CommandState.FAILED:
                counters.commands_failed += 1
            elif state == CommandState.EXPIRED:
                counters.commands_expired += 1
            elif state == CommandState.CANCELLED:
                counters.commands_cancelled += 1
            if state != CommandState.SENT:
                logger.info(
                    "command %s for %s: %s%s",
                    report.command_id,
                    report.device_id,
                    state,
                    f" ({report.detail})" if report.detail else "",
                    extra={"device_id": report.device_id},
                )
        self.wake_reports()

    async def _commands(self, payload: bytes) -> None:
        if not self._configured():
            # The centre sends them again while they are queued; keep a few meanwhile.
            self._deferred = [*self._deferred[-(_DEFERRED_MAX - 1) :], payload]
            return
        try:
            message = decode_gateway_commands(payload, gateway_id=self.gateway_id)
        except InputError as exc:
            if self._log.allow(exc.reason, self.clock()):
                logger.warning("commands from the centre refused (%s): %s", exc.reason, exc)
            self._reject(exc.reason, "?", str(exc), payload)
            return
        self.counters.commands_received += len(message.commands)
        changes = receive_commands(
            message,
            held=self.held,
            devices=self._devices(),
            types=current_catalog().types,
            gateway_id=self.gateway_id,
            now_ms=self.clock(),
        )
        await self._store(changes)

    async def _answers(self, event: _Answers) -> None:
        changes: list[Change] = []
        acks = []
        now = self.clock()
        for topic, payload, qos, packet_id, _retain in event.publishes:
            if qos:
                acks.append(packet_id)
            try:
                device_id, _kind = parse_device_topic(topic, self.prefix)
            except InputError as exc:
                self._reject(exc.reason, "?", str(exc), payload)
                continue
            try:
                answer = decode_device_answer(payload)
                current = self.held.get(answer.command_id)
                for earlier in changes:  # an earlier answer of this read
                    if earlier.held.command_id == answer.command_id:
                        current = earlier.held
                change = receive_answer(current, device_id=device_id, answer=answer, now_ms=now)
            except InputError as exc:
                if self._log.allow(exc.reason, now):
                    logger.warning(
                        "answer from %s refused (%s): %s",
                        device_id,
                        exc.reason,
                        exc,
                        extra={"device_id": device_id},
                    )
                self._reject(exc.reason, device_id, str(exc), payload)
                continue
            if change is not None:
                changes.append(change)
        await self._store(changes)
        # Stored: the broker may forget the answers now.
        self.site.ack(event.generation, acks)

    async def _serial_answers(self, event: _SerialAnswers) -> None:
        changes: list[Change] = []
        now = self.clock()
        for answer in event.answers:
            current = self.held.get(answer.command_id)
            for earlier in changes:
                if earlier.held.command_id == answer.command_id:
                    current = earlier.held
            try:
                change = receive_answer(
                    current, device_id=event.device_id, answer=answer, now_ms=now
                )
            except InputError:
                continue  # pruned meanwhile: nothing left to report
            if change is not None:
                changes.append(change)
        await self._store(changes)

    async def _puback(self, event: _Puback) -> None:
        if self._inflight_generation != self.site.generation:
            return
        command_id = self._inflight.pop(event.packet_id, None)
        if command_id is None or event.reason_code < 0x80:
            return
        change = refused_by_broker(self.held.get(command_id), event.reason_code, self.clock())
        if change is not None:
            logger.warning("site broker refused command %s: %s", command_id, change.report)
            await self._store([change])

    async def _tick(self) -> None:
        if self._deferred and self._configured():
            deferred, self._deferred = self._deferred, []
            for payload in deferred:
                await self._commands(payload)
        now = self.clock()
        devices = self._devices()
        if self._restarted and self._configured():
            self._restarted = False
            serial = {d for d, dev in devices.items() if dev.transport in _LINE_TRANSPORTS}
            await self._store(interrupted(self.held.values(), serial=serial, now_ms=now))
        active = [h for h in self.open.values() if is_active(h)]
        await self._store(sweep(active, devices=devices, gateway_id=self.gateway_id, now_ms=now))
        if now - self._pruned_ms >= PRUNE_EVERY_MS:
            self._pruned_ms = now
            gone = prunable(self.held.values(), now)
            if gone:
                await asyncio.to_thread(self.outbox.prune_commands, gone)
                for command_id in gone:
                    self.held.pop(command_id, None)
        await self._deliver(devices)

    def _reachable(self, device: DeviceConfig | None) -> bool:
        """MQTT: online, and the gateway's subscription to its answers granted.

        Serial: its port open and no exchange under way on it (a sleeping
        sensor sends nothing, so "online" would never let it be woken).
        """
        if device is None or not device.enabled:
            return False
        if device.transport == "serial":
            port = self._ports.get(device.device_id)
            return port is not None and port.is_open and device.device_id not in self._exchanges
        if device.transport == "modbus":
            bus = self._buses.get(device.device_id)
            return bus is not None and bus.is_open and device.device_id not in self._exchanges
        if not self._online(device.device_id):
            return False
        return device_answer_topic(device.device_id, self.prefix) in self.site.granted_topics()

    async def _deliver(self, devices: Mapping[str, DeviceConfig]) -> None:
        if self._inflight_generation != self.site.generation:
            self._inflight = {}
            self._inflight_generation = self.site.generation
        if not self.site.connected.is_set() and not any(
            d.transport in _LINE_TRANSPORTS for d in devices.values()
        ):
            return
        opened = list(self.open.values())
        waiting = {h.device_id for h in opened if is_active(h)}
        if not waiting:
            return
        now = self.clock()
        online = {d for d in waiting if self._reachable(devices.get(d))}
        todo = deliverable(opened, online=online, now_ms=now)
        generation = self.site.generation
        # Handed over on an earlier run, or on a connection that dropped before its PUBACK.
        again = [
            h
            for h in redeliverable(
                opened,
                published={
                    h.command_id for h in opened if self.published.get(h.command_id) == generation
                },
            )
            if h.device_id in online and devices[h.device_id].transport == "mqtt"
        ]
        for held in [*todo, *again]:
            device = devices[held.device_id]
            if device.transport == "serial":
                if held.device_id not in self._exchanges:  # one at a time per port
                    await self._deliver_serial(held, device)
                continue
            if device.transport == "modbus":
                if held.device_id not in self._exchanges:
                    await self._deliver_modbus(held, device)
                continue
            await self._publish(held, device)

    async def _publish(self, held: Held, device: DeviceConfig) -> None:
        command = held.command
        if command is None or not self.site.connected.is_set():
            return
        first = held.state == CommandState.SENT
        change = start_delivery(
            held, timeout_s=self._timeout_s(device, command.name), now_ms=self.clock()
        )
        await self._store([change])  # 'delivering' is on disk before the device can have it
        pid = self.site.publish(
            device_command_topic(device.device_id, self.prefix),
            encode_command(command),
            response_topic=device_answer_topic(device.device_id, self.prefix),
            correlation_data=command.command_id.encode(),
        )
        if pid is None:
            return  # the connection dropped: published again on the next one
        self._inflight[pid] = command.command_id
        self.published[command.command_id] = self.site.generation
        self.counters.commands_delivered += first
        logger.info(
            "command %s (%s) %s to %s",
            command.command_id,
            command.name,
            "published" if first else "published again",
            device.device_id,
            extra={"device_id": device.device_id},
        )

    async def _deliver_serial(self, held: Held, device: DeviceConfig) -> None:
        """Start one command's exchange with a serial sensor (its task reports back)."""
        # Imported on first use, like the serial source: a site without serial
        # sensors needs no frame codecs.
        from gateway.serialcommands import plan_serial_command

        command = held.command
        port = self._ports.get(device.device_id)
        if command is None or port is None:
            return
        try:
            plan = plan_serial_command(command, str(device.protocol))
        except CommandRefusedError as exc:
            change = fail(held, f"{device.protocol} cannot take it: {exc.problem}", self.clock())
            if change is not None:
                await self._store([change])
            return
        timeout_s = plan.reply_timeout_s + _SERIAL_DEADLINE_MARGIN_S
        await self._store([start_delivery(held, timeout_s=timeout_s, now_ms=self.clock())])
        self.counters.commands_delivered += 1
        replies: asyncio.Queue[Sds011Reply] = asyncio.Queue()
        self._replies[device.device_id] = replies
        task = asyncio.create_task(
            self._serial_exchange(device.device_id, port, plan, replies),
            name=f"serial-command[{device.device_id}]",
        )
        self._exchanges[device.device_id] = task

    async def _serial_exchange(
        self,
        device_id: str,
        port: SerialPort,
        plan: SerialPlan,
        replies: asyncio.Queue[Sds011Reply],
    ) -> None:
        """Write the plan's frames, wait for its reply; hand the outcome to the writer."""
        from gateway.serialcommands import judge_reply, judge_timeout, judge_written

        command_id = plan.command_id
        answers: list[DeviceAnswer] = []
        try:
            try:
                for frame in plan.frames:
                    await port.send(frame)
            except SerialUnavailableError as exc:
                # Some frames may be out: it is not written again (at most once).
                answers.append(
                    DeviceAnswer(
                        command_id=command_id,
                        state=CommandState.FAILED,
                        detail=f"the port failed while the command was written: {exc}"[:500],
                    )
                )
                return
            answers.append(DeviceAnswer(command_id=command_id, state=CommandState.DELIVERED))
            outcome = judge_written(plan)
            seen: list[Sds011Reply] = []
            if outcome is None:
                deadline = asyncio.get_running_loop().time() + plan.reply_timeout_s
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(deadline):
                        while outcome is None:
                            reply = await replies.get()
                            seen.append(reply)
                            outcome = judge_reply(plan, reply)
                if outcome is None:
                    outcome = judge_timeout(plan, seen)
            answers.append(
                DeviceAnswer(
                    command_id=command_id,
                    state=outcome.state,
                    detail=outcome.detail,
                    answer=dict(outcome.answer),
                )
            )
        finally:
            if self._replies.get(device_id) is replies:
                del self._replies[device_id]
            self._exchanges.pop(device_id, None)
            self._put(_SerialAnswers(device_id, answers))

    async def _deliver_modbus(self, held: Held, device: DeviceConfig) -> None:
        """Start one command's register writes on a slave's bus (its task reports back)."""
        command = held.command
        bus = self._buses.get(device.device_id)
        if command is None or bus is None:
            return
        try:
            model = modbus_model(str(device.model))
            writes = model.writes_for(command.name)
            if not writes:
                raise CommandRefusedError(
                    device.device_type,
                    command.name,
                    None,
                    f"model {model.name} has no register for it",
                )
            words = [
                (
                    write,
                    encode_write(
                        write,
                        float(command.args[write.arg]) if write.arg else float(write.value or 0.0),
                    ),
                )
                for write in writes
            ]
        except (InputError, KeyError, TypeError, ValueError) as exc:
            change = fail(held, f"{device.model} cannot take it: {exc}"[:500], self.clock())
            if change is not None:
                await self._store([change])
            return
        timeout_s = model.timeout_s * len(words) + _SERIAL_DEADLINE_MARGIN_S
        await self._store([start_delivery(held, timeout_s=timeout_s, now_ms=self.clock())])
        self.counters.commands_delivered += 1
        task = asyncio.create_task(
            self._modbus_exchange(device.device_id, bus, command.command_id, words),
            name=f"modbus-command[{device.device_id}]",
        )
        self._exchanges[device.device_id] = task

    async def _modbus_exchange(
        self,
        device_id: str,
        bus: BusPoller,
        command_id: str,
        words: list[tuple[RegisterWrite, list[int]]],
    ) -> None:
        """Queue the writes on the bus, wait for the slave's echoes; hand the outcome over."""
        answers: list[DeviceAnswer] = []
        try:
            request = bus.write(device_id, words)
            problem = await request.done
            if request.sent.is_set():
                answers.append(DeviceAnswer(command_id=command_id, state=CommandState.DELIVERED))
            answers.append(
                DeviceAnswer(
                    command_id=command_id,
                    state=CommandState.FAILED if problem else CommandState.SUCCEEDED,
                    detail=(problem or "written")[:500],
                )
            )
        finally:
            self._exchanges.pop(device_id, None)
            self._put(_SerialAnswers(device_id, answers))

    @staticmethod
    def _timeout_s(device: DeviceConfig, name: str) -> float:
        dtype = current_catalog().types.get(device.device_type)
        spec = dtype.command(name) if dtype is not None else None
        return spec.timeout_s if spec is not None else DEFAULT_COMMAND_TIMEOUT_S

    # -- reports to the centre ---------------------------------------------------------

    async def send_reports(self) -> None:
        """Publish due reports, REPORTS_PER_MESSAGE_MAX a message, until acked."""
        while self._wake_reports is None:
            await asyncio.sleep(0.01)
        wake = self._wake_reports
        topic = command_report_topic(self.gateway_id, self.prefix)
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await wake.wait()
            wake.clear()
            if not self.central.connected.is_set():
                continue
            due = await asyncio.to_thread(
                self.outbox.due_reports,
                self.clock(),
                resend_after_ms=self.resend_after_ms,
                limit=REPORTS_PER_MESSAGE_MAX,
            )
            if not due:
                continue
            now = self.clock()
            message = CommandReports(
                gateway_id=self.gateway_id, ts_ms=now, reports=[d.report for d in due]
            )
            self.central.publish(topic, encode_command_reports(message), qos=1)
            self.counters.command_reports_published += len(due)
            self.counters.command_reports_resent += sum(d.resend for d in due)
            await asyncio.to_thread(
                self.outbox.mark_reports_sent, [d.report.report_id for d in due], now
            )
            if len(due) == REPORTS_PER_MESSAGE_MAX:
                wake.set()
