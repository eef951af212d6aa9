"""Modbus RTU adapter: one RS-485 bus on a port URL, through pymodbus's async serial client.

``ModbusBus`` opens the port at the bus's line settings (a device path, a
pty, ``socket://host:port``), reads and writes registers of a slave, one
transaction at a time, and translates what pymodbus reports into the
project's errors, once, here:

- no answer within the timeout: ``NoAnswerError``; when bytes did arrive in
  that time (pymodbus' RTU framer drops a frame with a bad CRC, or noise in
  front of an answer, silently and waits on), ``GarbledAnswerError``: the
  bytes seen are counted through a packet trace;
- an exception response: ``SlaveExceptionError`` with its code;
- a port that cannot be opened, or was closed under us: ``BusUnavailableError``.

pymodbus retries nothing and reconnects nothing here: a failed poll is
counted and polled again at its next interval by the caller
(``gateway.modbuspoller``), which also reopens the bus with backoff.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final

from pymodbus.client import AsyncModbusSerialClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.framer import FramerType
from pymodbus.pdu import ExceptionResponse, ModbusPDU

from contracts.errors import (
    BusUnavailableError,
    GarbledAnswerError,
    NoAnswerError,
    SlaveExceptionError,
)

logger = logging.getLogger(__name__)

# pymodbus logs every unanswered request at ERROR ("No response received
# ..."); the poller counts and rate-limits those itself.
logging.getLogger("pymodbus.logging").setLevel(logging.CRITICAL)

# Modbus Application Protocol V1.1b3, section 7: the exception codes.
EXCEPTION_NAMES: Final = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "slave device failure",
    5: "acknowledge",
    6: "slave device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}
# How long opening the port may take (a USB adapter answers at once).
OPEN_TIMEOUT_S: Final = 2.0


class ModbusBus:
    """One bus: its port and line settings; ``read`` and ``write`` one slave at a time."""

    def __init__(self, *, port: str, baudrate: int, parity: str, stopbits: int) -> None:
        self.port = port
        self._received_bytes = 0
        self._client = AsyncModbusSerialClient(
            port,
            framer=FramerType.RTU,
            baudrate=baudrate,
            bytesize=8,
            parity=parity,
            stopbits=stopbits,
            name=f"modbus[{port}]",
            # Reopening is the poller's, with the project's backoff.
            reconnect_delay=0,
            timeout=OPEN_TIMEOUT_S,
            retries=0,
            trace_packet=self._trace,
        )
        # pymodbus counts unanswered requests to drop a TCP connection; a
        # serial bus stays open whatever its slaves do.
        self._client.set_max_no_responses(1 << 30)

    def _trace(self, sending: bool, data: bytes) -> bytes:
        if not sending:
            self._received_bytes += len(data)
        return data

    @property
    def is_open(self) -> bool:
        return self._client.connected

    async def open(self) -> None:
        if not await self._client.connect():
            raise BusUnavailableError(f"modbus {self.port}: cannot open the port")

    def close(self) -> None:
        self._client.close()

    async def read(
        self, slave_id: int, function: int, address: int, count: int, *, timeout_s: float
    ) -> list[int]:
        """``count`` registers from ``address`` (function 3 holding, 4 input)."""
        client = self._client
        call = client.read_holding_registers if function == 3 else client.read_input_registers
        response = await self._execute(
            lambda: call(address, count=count, device_id=slave_id), slave_id, timeout_s
        )
        registers = list(getattr(response, "registers", []))
        if len(registers) != count:
            raise GarbledAnswerError(
                f"slave {slave_id}: {len(registers)} registers in the answer, asked for {count}"
            )
        return registers

    async def write(
        self, slave_id: int, function: int, address: int, words: Sequence[int], *, timeout_s: float
    ) -> None:
        """Write ``words`` from ``address`` (function 6: one word, 16: several); check the echo."""
        client = self._client
        if function == 6:
            response = await self._execute(
                lambda: client.write_register(address, words[0], device_id=slave_id),
                slave_id,
                timeout_s,
            )
            echoed = list(getattr(response, "registers", []))
            if getattr(response, "address", None) != address or echoed[:1] != list(words[:1]):
                raise GarbledAnswerError(
                    f"slave {slave_id}: write of register {address} echoed"
                    f" {getattr(response, 'address', None)}={echoed}"
                )
            return
        response = await self._execute(
            lambda: client.write_registers(address, list(words), device_id=slave_id),
            slave_id,
            timeout_s,
        )
        if getattr(response, "address", None) != address or getattr(response, "count", None) != len(
            words
        ):
            raise GarbledAnswerError(
                f"slave {slave_id}: write of {len(words)} registers at {address} answered"
                f" {getattr(response, 'address', None)}/{getattr(response, 'count', None)}"
            )

    async def _execute(self, call: object, slave_id: int, timeout_s: float) -> ModbusPDU:
        if not self.is_open:
            raise BusUnavailableError(f"modbus {self.port}: the port is not open")
        # The client waits this long for each answer (its one timeout setting).
        self._client.comm_params.timeout_connect = timeout_s
        self._client.ctx.comm_params.timeout_connect = timeout_s
        self._received_bytes = 0
        try:
            response: ModbusPDU = await call()  # type: ignore[operator]
        except ConnectionException as exc:
            raise BusUnavailableError(f"modbus {self.port}: {exc}") from exc
        except ModbusIOException as exc:
            if not self.is_open:
                raise BusUnavailableError(f"modbus {self.port}: the port closed") from exc
            if self._received_bytes:
                raise GarbledAnswerError(
                    f"slave {slave_id}: {self._received_bytes} bytes in {timeout_s:g} s,"
                    " no valid answer (CRC or framing)"
                ) from exc
            raise NoAnswerError(f"slave {slave_id}: no answer within {timeout_s:g} s") from exc
        except (ModbusException, OSError) as exc:
            if not self.is_open:
                raise BusUnavailableError(f"modbus {self.port}: {exc}") from exc
            raise GarbledAnswerError(f"slave {slave_id}: {exc}") from exc
        if isinstance(response, ExceptionResponse) or response.isError():
            code = int(getattr(response, "exception_code", 0))
            raise SlaveExceptionError(
                f"slave {slave_id}: exception {code} ({EXCEPTION_NAMES.get(code, 'unknown')})",
                code=code,
            )
        return response
