"""Simulated Modbus RTU slaves: one RS-485 bus per site on a pty, answered with pymodbus.

The gateway opens the pty's slave side as its bus; ``ModbusBusSim`` reads
the requests off the master side with pymodbus's server side pieces: its
RTU framer and request decoder, and each request PDU's own
``datastore_update`` against a store of the bus's slaves (``BusStore``:
pymodbus 3.16's ``ModbusServerContext`` is deprecated and reads nothing but
its simulator's data, and its servers open a port by name, so the store and
the loop on the fd are ours). Each slave's registers hold its device
model's current values encoded per its catalog model's register map
(``contracts.registermaps.encode_register``); a write changes the
register and the model (``WRITE_EFFECTS``: the response delay of a level
gauge, the offset of a noise meter).

A read of a slave's first read block is a poll: the device steps (its
``FaultInjector``: value faults, seq; a dropout leaves the poll
unanswered) and its registers take the new values. The line runs at the
model's speed: a request takes its characters' time (10 or 11 bits each)
and 3.5 characters of silence, the slave its response delay, and the
answer its characters and silence.
Line faults come from each slave's ``FaultPlan`` (noise before an answer,
an answer past the gateway's timeout, a wrong CRC, no answer), drawn from
the injector's rng and counted in its ``FaultCounters``.

A poll answered with a good frame is a reading handed over (``on_reading``
with acked True); one answered late or behind noise may or may not have
been taken (acked False); a wrong CRC or silence hands nothing over.
Recording the ledger and owning the pty are the simulator's
(``firmware_sim.service``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Final

import numpy as np
from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerRTU
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU

from contracts.catalog import modbus_model
from contracts.errors import InputError
from contracts.registermaps import (
    SILENT_CHARS,
    ModbusModel,
    ReadBlock,
    Register,
    char_bits,
    decode_register,
    encode_register,
    read_blocks,
)
from firmware_sim.faults import Emission, FaultInjector
from firmware_sim.fleet import DeviceSpec
from firmware_sim.models import DeviceModel

logger = logging.getLogger(__name__)

# A read of the pty takes what is there; a request is 8 bytes, a write of
# several registers at most 7 + 2 x 123.
READ_BYTES: Final = 512
# A slow answer comes this many times the model's timeout after the request:
# past the gateway's timeout, within the timeout it then waits before using
# the line again (gateway.modbuspoller), so it is dropped, never taken for
# the next request's answer.
SLOW_FACTOR: Final = 1.5


def _set_response_delay(model: DeviceModel, value: float) -> None:
    model.response_delay_ms = round(value)  # type: ignore[attr-defined]


def _set_offset(model: DeviceModel, value: float) -> None:
    model.offset_db = value  # type: ignore[attr-defined]


# What a written register does to the device, by the command the catalog
# writes it for.
WRITE_EFFECTS: Final[dict[str, Callable[[DeviceModel, float], None]]] = {
    "set_response_delay": _set_response_delay,
    "calibrate_offset": _set_offset,
}

_SPACE: Final = {3: "h", 6: "h", 16: "h", 23: "h", 4: "i"}


class SlaveMemory:
    """One slave's registers: its model's values per the register map, and writes' effects."""

    def __init__(self, spec: DeviceSpec, model: ModbusModel) -> None:
        self.spec = spec
        self.model = model
        blocks = read_blocks(model)
        self.first_block: ReadBlock = blocks[0]
        self.words: dict[tuple[str, int], int] = {}
        # Every word the gateway's reads cover, the unused ones between
        # registers included (a real device answers for those too).
        for block in blocks:
            for i in range(block.count):
                self.words[(_SPACE[block.function], block.address + i)] = 0
        for write in model.writes:
            for i in range(_words_of(write.type)):
                self.words[("h", write.address + i)] = 0

    def load(self, values: dict[str, float]) -> None:
        """Hold ``values`` in the registers; a value the map cannot express leaves its register."""
        for reg in self.model.registers:
            if reg.metric not in values:
                continue  # e.g. no depth without an echo: the last one stays
            try:
                words = encode_register(reg, values[reg.metric])
            except InputError:
                continue  # a status the register has no code for
            for i, word in enumerate(words):
                self.words[(_SPACE[reg.function], reg.address + i)] = word

    def get(self, function: int, address: int, count: int) -> list[int] | ExcCodes:
        space = _SPACE.get(function)
        keys = [(space, address + i) for i in range(count)]
        if space is None or any(k not in self.words for k in keys):
            return ExcCodes.ILLEGAL_ADDRESS
        return [self.words[k] for k in keys]  # type: ignore[index]

    def set(self, function: int, address: int, values: Sequence[int]) -> ExcCodes | None:
        """A write of holding registers: only those the model's writes name."""
        written = range(address, address + len(values))
        if _SPACE.get(function) != "h" or any(("h", a) not in self.words for a in written):
            return ExcCodes.ILLEGAL_ADDRESS
        for a, word in zip(written, values, strict=True):
            self.words[("h", a)] = int(word)
        for write in self.model.writes:
            if write.address not in written:
                continue
            as_read = Register(
                metric=write.command,
                function=3,
                address=write.address,
                type=write.type,
                word_order=write.word_order,
                byte_order=write.byte_order,
                scale=write.scale,
                offset=write.offset,
            )
            words = [self.words[("h", write.address + i)] for i in range(as_read.words)]
            effect = WRITE_EFFECTS.get(write.command)
            if effect is not None:
                effect(self.spec.model, decode_register(as_read, words))
        return None


def _words_of(kind: str) -> int:
    return 2 if kind.endswith("32") else 1


class BusStore:
    """The bus's slaves by id, as the datastore request PDUs update (``datastore_update``)."""

    def __init__(self, slaves: dict[int, SlaveMemory]) -> None:
        self.slaves = slaves

    async def async_getValues(  # noqa: N802 - pymodbus' datastore interface
        self, device_id: int, func_code: int, address: int, count: int = 1
    ) -> list[int] | ExcCodes:
        return self.slaves[device_id].get(func_code, address, count)

    async def async_setValues(  # noqa: N802 - pymodbus' datastore interface
        self, device_id: int, func_code: int, address: int, values: Sequence[int]
    ) -> ExcCodes | None:
        return self.slaves[device_id].set(func_code, address, values)


# (spec, the emission of the poll, acked: a good frame on time)
OnReading = Callable[[DeviceSpec, Emission, bool], None]


class ModbusBusSim:
    """One site's bus on a pty master: its slaves answer the gateway's requests."""

    def __init__(
        self,
        *,
        name: str,
        specs: Sequence[DeviceSpec],
        master_fd: int,
        injectors: dict[str, FaultInjector],
        sim_now: Callable[[], int],
        on_reading: OnReading,
        models: Mapping[str, ModbusModel] | None = None,
    ) -> None:
        """``models``: a device's register map and line if not its catalog model's (benchmarks)."""
        self.name = name
        self.master_fd = master_fd
        self.specs = {int(s.slave_id or 0): s for s in specs}
        self.injectors = injectors
        self.sim_now = sim_now
        self.on_reading = on_reading
        chosen = models or {}
        self.memories = {
            slave_id: SlaveMemory(
                spec, chosen.get(spec.device_id) or modbus_model(str(spec.catalog_model))
            )
            for slave_id, spec in self.specs.items()
        }
        self.store = BusStore(self.memories)
        baudrate, parity, stopbits = next(iter(self.memories.values())).model.line
        # Seconds one character takes on the wire.
        self.char_s = char_bits(parity, stopbits) / baudrate
        self.framer = FramerRTU(DecodePDU(True))
        self.good_answers = 0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        # Slaves powered on now do not answer what the gateway asked before:
        # requests waiting in the pty from before the start are dropped, or
        # each would be answered long after the gateway gave up on it.
        self._discard_pending()
        readable = asyncio.Event()
        loop.add_reader(self.master_fd, readable.set)
        buffer = b""
        try:
            while True:
                await readable.wait()
                readable.clear()
                try:
                    data = os.read(self.master_fd, READ_BYTES)
                except BlockingIOError:
                    continue
                except OSError as exc:  # the gateway side is closed (EIO): wait for a reopen
                    logger.debug("modbus bus %s: read failed: %s", self.name, exc)
                    await asyncio.sleep(0.05)
                    continue
                buffer += data
                while buffer:
                    used, pdu = self.framer.handleFrame(buffer, 0, 0)
                    buffer = buffer[used:]
                    if pdu is None:
                        break
                    # The request's own time on the line, then the silence after it.
                    await asyncio.sleep((used + SILENT_CHARS) * self.char_s)
                    await self._answer(pdu)
        finally:
            loop.remove_reader(self.master_fd)

    def _discard_pending(self) -> None:
        while True:
            try:
                if not os.read(self.master_fd, READ_BYTES):
                    return
            except OSError:  # nothing waiting (EAGAIN), or no gateway side yet (EIO)
                return

    async def _answer(self, request: ModbusPDU) -> None:
        slave_id = request.dev_id
        memory = self.memories.get(slave_id)
        if memory is None:
            return  # no such slave on this bus: nobody answers
        spec = memory.spec
        injector = self.injectors[spec.device_id]
        plan, counters, rng = spec.faults, injector.counters, injector.rng
        counters.modbus_requests += 1
        if plan.modbus_silent_probability and rng.random() < plan.modbus_silent_probability:
            counters.modbus_silent += 1
            return
        emission = None
        block = memory.first_block
        if request.function_code == block.function and getattr(request, "address", None) == (
            block.address
        ):
            emissions = injector.emit(self.sim_now())
            if not emissions:
                return  # a dropout: a slave that is down does not answer
            # A flood's extra messages have no meaning on a polled bus: one
            # poll, one reading.
            emission = emissions[-1]
            memory.load(emission.uplink.metrics)
        response = await request.datastore_update(self.store, slave_id)  # type: ignore[arg-type]
        if isinstance(response, ExceptionResponse):
            emission = None
        response.dev_id = slave_id
        frame = bytearray(self.framer.buildFrame(response))
        delay_s = getattr(spec.model, "response_delay_ms", 0) / 1000
        slow = bool(plan.modbus_slow_probability) and rng.random() < plan.modbus_slow_probability
        if slow:
            counters.modbus_slow += 1
            delay_s += SLOW_FACTOR * memory.model.timeout_s
        crc = (
            bool(plan.modbus_crc_error_probability)
            and rng.random() < plan.modbus_crc_error_probability
        )
        if crc:
            counters.modbus_crc_errors += 1
            frame[-1] ^= 0xFF
        noisy = bool(plan.modbus_noise_probability) and rng.random() < plan.modbus_noise_probability
        if noisy:
            counters.modbus_noise += 1
            size = 1 + int(rng.integers(plan.garbage_max_bytes))
            frame[:0] = _noise(rng, size)
        # The answer is all there once its last character is on the line.
        await asyncio.sleep(delay_s + len(frame) * self.char_s)
        try:
            os.write(self.master_fd, bytes(frame))
        except OSError as exc:
            logger.debug("modbus bus %s: answer not written: %s", self.name, exc)
            return
        counters.modbus_answers += 1
        # Recorded as it is written: a stop during the silence after it must
        # not leave a reading handed over out of the ledger.
        if emission is not None and not crc:
            good = not (slow or noisy)
            self.good_answers += good
            self.on_reading(spec, emission, good)
        await asyncio.sleep(SILENT_CHARS * self.char_s)


def _noise(rng: np.random.Generator, size: int) -> bytes:
    return bytes(rng.integers(0, 256, size, dtype=np.uint8).tolist())
