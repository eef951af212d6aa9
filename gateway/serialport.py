"""Serial adapter: one PMS5003 / SDS011 sensor on a port URL, frames to readings.

Opens the port with pyserial-asyncio-fast (a device path, a pty, or
``socket://host:port``) at the sensors' 9600 baud, feeds what arrives into the
sans-IO ``FrameDecoder`` of ``contracts.frames`` and hands each frame's
metrics to the ``on_metrics`` callback. A port that fails or closes is
reopened with backoff. What it saw is reported through callbacks too
(``on_decoded``: frames and decoder errors per read; ``on_reopen``), so the
adapter knows nothing of the gateway; checking the device's config (the port
rule of ``contracts.serialurl``) and counting are the caller's.

Commands go the other way: ``send`` writes bytes (``gateway.serialcommands``'
frames) to the open port, and an SDS011's replies to them (0xAA 0xC5 ...) go
to the ``on_replies`` callback as the decoder finds them. Which command a
reply answers, and the timeout, are the caller's.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

import serial
import serial_asyncio_fast

from adapters.backoff import backoff_delay_s
from contracts.errors import SerialUnavailableError
from contracts.frames import SERIAL_BAUD, FrameDecoder, Sds011Reply, SensorKind, to_metrics

logger = logging.getLogger(__name__)

# Reopen backoff: a USB adapter re-enumerates within a second or two; cap at
# 30 s so an unplugged sensor does not fill the log.
REOPEN_MIN_S = 0.5
REOPEN_MAX_S = 30.0
READ_BYTES = 512


# frames, checksum errors, length errors, garbage bytes: of one read.
OnDecoded = Callable[[int, int, int, int], None]
OnReplies = Callable[[list[Sds011Reply]], None]


class SerialSource:
    def __init__(
        self,
        *,
        port: str,
        protocol: SensorKind,
        name: str,
        on_metrics: Callable[[dict[str, float]], None],
        on_decoded: OnDecoded,
        on_reopen: Callable[[], None],
        on_replies: OnReplies | None = None,
    ) -> None:
        self.port = port
        self.name = name  # the device id, for the log
        self.decoder = FrameDecoder(protocol)
        self._on_metrics = on_metrics
        self._on_decoded = on_decoded
        self._on_reopen = on_reopen
        # Only an SDS011 replies (the PMS5003 manual documents no answers).
        self._on_replies = on_replies if protocol == "sds011" else None
        self._writer: asyncio.StreamWriter | None = None

    @property
    def is_open(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def send(self, data: bytes) -> None:
        """Write ``data`` to the open port; return once the transport has taken it.

        Raises SerialUnavailableError if the port is not open (not yet, or
        being reopened after a failure) or the write fails. The write itself
        does not block the event loop (the transport buffers what the port
        cannot take at once, and ``drain`` waits for it); a caller wanting a
        bound on that wait wraps it in ``asyncio.timeout``.
        """
        writer = self._writer
        if writer is None or writer.is_closing():
            raise SerialUnavailableError(f"serial {self.port} ({self.name}) is not open")
        try:
            writer.write(data)
            await writer.drain()
        except (OSError, serial.SerialException) as exc:
            raise SerialUnavailableError(
                f"serial {self.port} ({self.name}): write failed: {exc}"
            ) from exc
        logger.debug("serial %s (%s): wrote %d bytes", self.port, self.name, len(data))

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                reader, writer = await serial_asyncio_fast.open_serial_connection(
                    url=self.port, baudrate=SERIAL_BAUD
                )
            except (OSError, serial.SerialException) as exc:
                failures += 1
                delay = reopen_delay_s(failures)
                logger.warning(
                    "serial %s (%s): %s; retry in %.1f s",
                    self.port,
                    self.name,
                    exc,
                    delay,
                    extra={"device_id": self.name},
                )
                await asyncio.sleep(delay)
                continue
            logger.info(
                "serial %s open for %s", self.port, self.name, extra={"device_id": self.name}
            )
            # A partial frame from before the reopen would only cost a false error.
            self.decoder.reset()
            failures = 0
            self._writer = writer
            try:
                await self._read(reader)
            except (OSError, serial.SerialException) as exc:
                logger.warning(
                    "serial %s (%s) failed: %s",
                    self.port,
                    self.name,
                    exc,
                    extra={"device_id": self.name},
                )
            finally:
                self._writer = None
                writer.close()
            self._on_reopen()
            await asyncio.sleep(reopen_delay_s(1))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        decoder = self.decoder
        on_metrics = self._on_metrics
        on_replies = self._on_replies
        while True:
            data = await reader.read(READ_BYTES)
            if not data:
                logger.warning("serial %s closed", self.port)
                return
            before = (decoder.checksum_errors, decoder.length_errors, decoder.garbage_bytes)
            if on_replies is None:
                frames = decoder.feed(data)
            else:
                frames, replies = decoder.feed_all(data)
                if replies:
                    on_replies(replies)
            self._on_decoded(
                len(frames),
                decoder.checksum_errors - before[0],
                decoder.length_errors - before[1],
                decoder.garbage_bytes - before[2],
            )
            for frame in frames:
                on_metrics(to_metrics(frame))


def reopen_delay_s(attempt: int) -> float:
    """Seconds before reopening a line that failed ``attempt`` times (a serial port, a bus)."""
    return backoff_delay_s(
        attempt,
        min_s=REOPEN_MIN_S,
        max_s=REOPEN_MAX_S,
        draw=random.random(),  # noqa: S311 - jitter, not security
    )
