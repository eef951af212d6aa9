"""The gateway's Modbus buses: one task per bus polls its slaves and writes commands.

The shell around ``gateway.polling`` (whom to poll, when a slave is
offline) and ``gateway.modbusbus`` (pymodbus). A ``BusPoller`` owns one
port: it opens it at the line settings its devices' models share, then
runs one transaction at a time: a command's register writes first (queued
by the command downlink, ``write``), then the next device due. A poll reads
each of the model's ``read_blocks`` and decodes them
(``contracts.registermaps``); the values go to ``on_reading`` (the gateway's
serial path: catalog checks, rate limit, seq and time stamped by the
gateway, the fsynced outbox). Each poll's outcome is counted per device
(``GatewayCounters.modbus_polls``); OFFLINE_AFTER_FAILURES failed polls in
a row go to ``on_status`` (offline), as does the next answer (online). A
port that cannot be opened or fails is reopened with backoff and counted
(``modbus_reconnects``).

Nothing here is acknowledged to a slave: a reading that reached the
outbox is the gateway's to deliver, one that did not is simply read again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from adapters.loglimit import LogLimiter
from contracts.catalog import modbus_model
from contracts.errors import (
    BusUnavailableError,
    GarbledAnswerError,
    InputError,
    NoAnswerError,
    SlaveExceptionError,
)
from contracts.messages import DeviceConfig
from contracts.registermaps import ModbusModel, RegisterWrite, decode_registers, read_blocks
from gateway.counters import GatewayCounters
from gateway.modbusbus import ModbusBus
from gateway.polling import Bus, FailureRuns, PollOutcome, PollSchedule, poll_interval_ms
from gateway.serialport import reopen_delay_s

logger = logging.getLogger(__name__)

_LOG_PER_MINUTE: Final = 5


def monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


@dataclass
class WriteRequest:
    """A command's register writes for one slave, and where its outcome goes."""

    device_id: str
    writes: Sequence[tuple[RegisterWrite, list[int]]]
    sent: asyncio.Event = field(default_factory=asyncio.Event)
    # None: every write answered correctly; else why not.
    done: asyncio.Future[str | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class BusPoller:
    """One bus: its devices (one line, their models'), polled and written one at a time."""

    def __init__(
        self,
        *,
        port: str,
        devices: Bus,
        counters: GatewayCounters,
        on_reading: Callable[[DeviceConfig, dict[str, float]], None],
        on_status: Callable[[DeviceConfig, bool, str], None],
        on_reject: Callable[[str, str, str], None],
        clock: Callable[[], int] = monotonic_ms,
    ) -> None:
        self.port = port
        self.devices = {d.device_id: d for d in devices}
        # The config was checked on receipt: each device names an installed
        # model, and devices on a bus share a line (check_shared_ports).
        self.models: dict[str, ModbusModel] = {
            d.device_id: modbus_model(str(d.model)) for d in devices
        }
        self.line = next(iter(self.models.values())).line
        self.counters = counters
        self._on_reading = on_reading
        self._on_status = on_status
        self._on_reject = on_reject
        self.clock = clock
        self.failures = FailureRuns()
        self._bus: ModbusBus | None = None
        self._writes: deque[WriteRequest] = deque()
        self._wake = asyncio.Event()
        self._log = LogLimiter(limit=_LOG_PER_MINUTE, span=60_000)

    @property
    def is_open(self) -> bool:
        return self._bus is not None and self._bus.is_open

    def write(
        self, device_id: str, writes: Sequence[tuple[RegisterWrite, list[int]]]
    ) -> WriteRequest:
        """Queue a command's writes, carried out between polls; await its ``done``."""
        request = WriteRequest(device_id, writes)
        self._writes.append(request)
        self._wake.set()
        return request

    async def run(self) -> None:
        failures = 0
        baudrate, parity, stopbits = self.line
        try:
            while True:
                bus = ModbusBus(port=self.port, baudrate=baudrate, parity=parity, stopbits=stopbits)
                try:
                    await bus.open()
                except BusUnavailableError as exc:
                    bus.close()
                    failures += 1
                    self.counters.modbus_reconnects += 1
                    # As a serial port's: a USB adapter re-enumerates in a second or two.
                    delay = reopen_delay_s(failures)
                    logger.warning("%s; retry in %.1f s", exc, delay)
                    await asyncio.sleep(delay)
                    continue
                failures = 0
                logger.info(
                    "modbus %s open at %d %s%d for %d devices",
                    self.port,
                    baudrate,
                    parity,
                    stopbits,
                    len(self.devices),
                )
                self._bus = bus
                try:
                    await self._serve(bus)
                except BusUnavailableError as exc:
                    logger.warning("modbus %s failed: %s", self.port, exc)
                except Exception:
                    # The bus task's outermost loop: whatever a slave sent
                    # must not end polling for the others; reopen.
                    logger.exception("modbus %s: polling failed; reopening the bus", self.port)
                finally:
                    self._bus = None
                    bus.close()
                self.counters.modbus_reconnects += 1
                await asyncio.sleep(reopen_delay_s(1))
        finally:
            for request in self._writes:
                if not request.done.done():
                    request.done.set_result("the bus stopped before the command was written")

    async def _serve(self, bus: ModbusBus) -> None:
        schedule = PollSchedule(
            {
                device_id: poll_interval_ms(device, self.models[device_id].poll_interval_s)
                for device_id, device in self.devices.items()
            },
            self.clock(),
        )
        while True:
            while self._writes:
                await self._write(bus, self._writes.popleft())
            device_id, wait_ms = schedule.next(self.clock())
            if device_id is None:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait_ms / 1000):
                        await self._wake.wait()
                continue
            outcome = await self._poll(bus, self.devices[device_id])
            schedule.polled(device_id, self.clock())
            if outcome in ("no_answer", "garbled"):
                # A late answer must not pass for the next request's: let it
                # land (and be dropped) before the line is used again.
                await asyncio.sleep(self.models[device_id].timeout_s)

    async def _poll(self, bus: ModbusBus, device: DeviceConfig) -> PollOutcome:
        model = self.models[device.device_id]
        slave_id = int(device.slave_id or 0)
        values: dict[str, float] = {}
        outcome: PollOutcome = "ok"
        detail = ""
        try:
            for block in read_blocks(model):
                words = await bus.read(
                    slave_id, block.function, block.address, block.count, timeout_s=model.timeout_s
                )
                values.update(decode_registers(block, words))
        except GarbledAnswerError as exc:
            outcome, detail = "garbled", str(exc)
        except NoAnswerError as exc:
            outcome, detail = "no_answer", str(exc)
        except SlaveExceptionError as exc:
            outcome, detail = "exception", str(exc)
        except InputError as exc:
            outcome, detail = "invalid", str(exc)
            self._on_reject(exc.reason, device.device_id, detail)
        self.counters.modbus_polls[(device.device_id, outcome)] += 1
        if outcome != "ok" and self._log.allow(outcome, self.clock()):
            logger.warning(
                "modbus %s: %s poll failed (%s): %s",
                self.port,
                device.device_id,
                outcome,
                detail,
                extra={"device_id": device.device_id},
            )
        # The status first: the reading then finds the device online.
        transition = self.failures.record(device.device_id, outcome)
        if transition is not None:
            self._on_status(device, transition == "online", detail)
        if outcome == "ok":
            self._on_reading(device, values)
        return outcome

    async def _write(self, bus: ModbusBus, request: WriteRequest) -> None:
        device = self.devices.get(request.device_id)
        if device is None:
            request.done.set_result(f"{request.device_id} is not on bus {self.port}")
            return
        timeout_s = self.models[device.device_id].timeout_s
        problem: str | None = None
        try:
            for write, words in request.writes:
                request.sent.set()
                await bus.write(
                    int(device.slave_id or 0),
                    write.function,
                    write.address,
                    words,
                    timeout_s=timeout_s,
                )
        except (NoAnswerError, SlaveExceptionError) as exc:
            problem = str(exc)
        except BusUnavailableError as exc:
            problem = f"the bus failed: {exc}"
            request.done.set_result(problem)
            raise
        request.done.set_result(problem)
