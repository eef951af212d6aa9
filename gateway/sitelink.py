"""The gateway's connection to its site broker: an asyncio MQTT v5 subscriber.

Built on the sans-IO codec in ``contracts.mqttcodec`` rather than paho for
two reasons, both measured or required here:

- throughput: paho reads each packet with several small socket reads, builds
  a message object and writes its PUBACK at once, about 110 us a message on
  this machine class (under 10,000 messages/s); reading whatever the socket
  holds and parsing it in one loop drains a queued backlog at over 200,000
  messages/s (bench/RESULTS.md);
- durability: paho acknowledges a QoS 1 message as soon as its callback
  returns, while the reading is still in memory. Here the caller acknowledges
  (``ack``) only after the reading is in the fsynced outbox; until then the
  broker keeps the message in the gateway's persistent session and delivers
  it again after a crash or a reconnect.

Messages are handed over in the order received, in one list per socket read,
on the event loop's thread. ``subscribe``, ``unsubscribe`` and ``ack`` may be
called from any thread. Library errors become log lines and reconnects with
backoff; nothing here raises into the caller's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable

from contracts.errors import MqttProtocolError
from contracts.mqttcodec import (
    PINGREQ_PACKET,
    Connack,
    Disconnect,
    PacketReader,
    Publish,
    Suback,
    encode_connect,
    encode_disconnect,
    encode_pubacks,
    encode_subscribe,
    encode_unsubscribe,
)

logger = logging.getLogger(__name__)

# Seconds between reconnect attempts: a broker restart takes about 1 s, and a
# long outage should not be hammered.
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 30.0
KEEPALIVE_S = 30
CONNECT_TIMEOUT_S = 10.0
# Topic filters per SUBSCRIBE packet: a 2,000-device site subscribes in a
# handful of packets well under any broker's packet size limit.
SUBSCRIBE_CHUNK = 500


class _Protocol(asyncio.Protocol):
    def __init__(self, link: SiteLink) -> None:
        self.link = link
        self.reader = PacketReader()
        self.connack: asyncio.Future[Connack] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.last_rx = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # noqa: S101 - a stream connection always is
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.last_rx = time.monotonic()
        try:
            publishes, controls = self.reader.feed(data)
        except MqttProtocolError as exc:
            logger.warning("%s: broker sent a malformed packet (%s); reconnecting", self.link, exc)
            if self.transport is not None:
                self.transport.abort()
            return
        for control in controls:
            self.link.on_control(self, control)
        if publishes:
            self.link.on_messages(publishes)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connack.done():
            self.connack.set_exception(ConnectionError(str(exc or "connection closed")))
        if not self.closed.done():
            self.closed.set_result(None)


class SiteLink:
    """One persistent-session subscriber connection, reconnected until ``stop``."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        client_id: str,
        username: str | None,
        password: str | None,
        ssl_context: ssl.SSLContext | None = None,
        session_expiry_s: int = 3600,
        receive_maximum: int = 2000,
        on_messages: Callable[[list[Publish]], None],
        on_connect: Callable[[], None],
        on_subscribed: Callable[[], None] = lambda: None,
    ) -> None:
        self.host = host
        self.port = port
        self.client_id = client_id
        self._username = username
        self._password = password
        self._ssl = ssl_context
        self.session_expiry_s = session_expiry_s
        self.receive_maximum = receive_maximum
        self._on_messages = on_messages
        self._on_connect = on_connect
        self._on_subscribed = on_subscribed
        self.connected = threading.Event()
        # SUBACKs received: lets a caller see a subscription take effect.
        self.subacks = 0
        # Bumped at every connection: packet ids belong to one connection, and
        # an ack for an older one must not be sent on a newer one.
        self.generation = 0
        self._packet_id = 0
        self._proto: _Protocol | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False

    def __str__(self) -> str:
        return f"site broker {self.host}:{self.port}"

    # -- any thread ------------------------------------------------------------

    def _call(self, fn: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            fn()
        else:
            loop.call_soon_threadsafe(fn)

    def subscribe(self, topics: list[str]) -> None:
        """Subscribe at QoS 1, in packets of SUBSCRIBE_CHUNK; not connected is not an error."""
        if topics:
            self._call(lambda: self._send_filters(topics, subscribe=True))

    def unsubscribe(self, topics: list[str]) -> None:
        if topics:
            self._call(lambda: self._send_filters(topics, subscribe=False))

    def ack(self, generation: int, packet_ids: list[int]) -> None:
        """PUBACK ``packet_ids`` received on connection ``generation`` (dropped if it is gone)."""
        if packet_ids:
            self._call(lambda: self._send_acks(generation, packet_ids))

    # -- event loop thread -----------------------------------------------------------

    def _next_packet_id(self) -> int:
        self._packet_id = self._packet_id % 0xFFFF + 1
        return self._packet_id

    def _write(self, data: bytes) -> None:
        proto = self._proto
        if proto is not None and proto.transport is not None and self.connected.is_set():
            proto.transport.write(data)

    def _send_filters(self, topics: list[str], *, subscribe: bool) -> None:
        for start in range(0, len(topics), SUBSCRIBE_CHUNK):
            chunk = topics[start : start + SUBSCRIBE_CHUNK]
            pid = self._next_packet_id()
            if subscribe:
                self._write(encode_subscribe(pid, [(t, 1) for t in chunk]))
            else:
                self._write(encode_unsubscribe(pid, chunk))

    def _send_acks(self, generation: int, packet_ids: list[int]) -> None:
        if generation == self.generation:
            self._write(encode_pubacks(packet_ids))

    def on_messages(self, publishes: list[Publish]) -> None:
        self._on_messages(publishes)

    def on_control(self, proto: _Protocol, control: object) -> None:
        if isinstance(control, Connack):
            if not proto.connack.done():
                proto.connack.set_result(control)
        elif isinstance(control, Suback):
            failed = [code for code in control.reason_codes if code >= 0x80]
            if failed:
                logger.warning("%s: %d subscriptions refused: %s", self, len(failed), failed[:5])
            self.subacks += 1
            self._on_subscribed()
        elif isinstance(control, Disconnect):
            logger.warning(
                "%s: disconnected by the broker: reason 0x%02x %s",
                self,
                control.reason_code,
                control.reason,
            )

    async def run(self) -> None:
        """Connect, serve and reconnect with backoff until cancelled."""
        self._loop = asyncio.get_running_loop()
        delay_s = RECONNECT_MIN_S
        while not self._stopping:
            started = time.monotonic()
            try:
                await self._session()
            except (OSError, ConnectionError, TimeoutError) as exc:
                if not self._stopping:
                    reason = str(exc) or type(exc).__name__
                    logger.warning("%s: %s; retrying in %.1f s", self, reason, delay_s)
            finally:
                self.connected.clear()
                self._proto = None
            if self._stopping:
                return
            # A connection that lived a while resets the backoff.
            if time.monotonic() - started > RECONNECT_MAX_S:
                delay_s = RECONNECT_MIN_S
            await asyncio.sleep(delay_s * random.uniform(0.8, 1.2))  # noqa: S311 - jitter, not security
            delay_s = min(delay_s * 2, RECONNECT_MAX_S)

    async def _session(self) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            transport, proto = await loop.create_connection(
                lambda: _Protocol(self), self.host, self.port, ssl=self._ssl
            )
            transport.write(
                encode_connect(
                    client_id=self.client_id,
                    keepalive_s=KEEPALIVE_S,
                    clean_start=self.session_expiry_s == 0,
                    session_expiry_s=self.session_expiry_s,
                    receive_maximum=self.receive_maximum,
                    username=self._username,
                    password=self._password,
                )
            )
            try:
                connack = await proto.connack
            except BaseException:
                transport.abort()
                raise
        if connack.reason_code >= 0x80:
            transport.abort()
            raise ConnectionError(f"connection refused: reason code 0x{connack.reason_code:02x}")
        self._proto = proto
        self.generation += 1
        self.connected.set()
        logger.info(
            "connected to %s (session %s)", self, "resumed" if connack.session_present else "new"
        )
        self._on_connect()
        try:
            await self._keepalive(proto)
        finally:
            # close, not abort: PUBACKs still in the write buffer must go out.
            if not transport.is_closing():
                transport.write(encode_disconnect())
                transport.close()

    async def _keepalive(self, proto: _Protocol) -> None:
        """Ping at half the keep-alive; a silent broker past 1.5 keep-alives is dead."""
        while not proto.closed.done():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(KEEPALIVE_S / 2):
                    await asyncio.shield(proto.closed)
            if proto.closed.done():
                break
            if time.monotonic() - proto.last_rx > KEEPALIVE_S * 1.5:
                raise TimeoutError(f"no data from the broker for {KEEPALIVE_S * 1.5:.0f} s")
            self._write(PINGREQ_PACKET)
        raise ConnectionError("connection lost")

    def stop(self) -> None:
        """Disconnect cleanly (a persistent session stays at the broker)."""
        self._stopping = True
        proto = self._proto
        if proto is not None and proto.transport is not None:
            with contextlib.suppress(OSError, RuntimeError):
                proto.transport.write(encode_disconnect())
                proto.transport.close()
        self.connected.clear()
