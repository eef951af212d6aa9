"""Serial adapter: one PMS5003 / SDS011 sensor on a port URL, frames to readings.

Opens the port with pyserial-asyncio-fast (a device path, a pty, or
``socket://host:port``) at the sensors' 9600 baud, feeds what arrives into the
sans-IO ``FrameDecoder`` of ``contracts.frames`` and hands each frame's
metrics to the gateway. A port that fails or closes is reopened with backoff;
decoder error counts go into the gateway's counters.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING

import serial
import serial_asyncio_fast

from adapters.backoff import backoff_delay_s
from contracts.frames import SERIAL_BAUD, FrameDecoder, to_metrics

if TYPE_CHECKING:
    from contracts.messages import DeviceConfig
    from gateway.service import Gateway

logger = logging.getLogger(__name__)

# Reopen backoff: a USB adapter re-enumerates within a second or two; cap at
# 30 s so an unplugged sensor does not fill the log.
REOPEN_MIN_S = 0.5
REOPEN_MAX_S = 30.0
READ_BYTES = 512


class SerialSource:
    def __init__(self, *, device: DeviceConfig, gateway: Gateway) -> None:
        if device.port is None or device.protocol not in ("pms5003", "sds011"):
            raise ValueError(f"{device.device_id}: serial device needs a port and a protocol")
        self.device = device
        self.port: str = device.port
        self.gateway = gateway
        self.decoder = FrameDecoder(device.protocol)  # type: ignore[arg-type]

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                reader, writer = await serial_asyncio_fast.open_serial_connection(
                    url=self.port, baudrate=SERIAL_BAUD
                )
            except (OSError, serial.SerialException) as exc:
                failures += 1
                delay = _reopen_delay_s(failures)
                logger.warning(
                    "serial %s (%s): %s; retry in %.1f s",
                    self.port,
                    self.device.device_id,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            logger.info("serial %s open for %s", self.port, self.device.device_id)
            # A partial frame from before the reopen would only cost a false error.
            self.decoder.reset()
            failures = 0
            try:
                await self._read(reader)
            except (OSError, serial.SerialException) as exc:
                logger.warning("serial %s (%s) failed: %s", self.port, self.device.device_id, exc)
            finally:
                writer.close()
            self.gateway.counters.serial_reconnects += 1
            await asyncio.sleep(_reopen_delay_s(1))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        counters = self.gateway.counters
        decoder = self.decoder
        while True:
            data = await reader.read(READ_BYTES)
            if not data:
                logger.warning("serial %s closed", self.port)
                return
            before = (decoder.checksum_errors, decoder.length_errors, decoder.garbage_bytes)
            frames = decoder.feed(data)
            counters.serial_checksum_errors += decoder.checksum_errors - before[0]
            counters.serial_length_errors += decoder.length_errors - before[1]
            counters.serial_garbage_bytes += decoder.garbage_bytes - before[2]
            counters.serial_frames += len(frames)
            for frame in frames:
                self.gateway.accept_serial_reading(self.device, to_metrics(frame))


def _reopen_delay_s(attempt: int) -> float:
    return backoff_delay_s(
        attempt,
        min_s=REOPEN_MIN_S,
        max_s=REOPEN_MAX_S,
        draw=random.random(),  # noqa: S311 - jitter, not security
    )
