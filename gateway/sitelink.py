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
on the event loop's thread. A message longer than ``SITE_MAX_PACKET_BYTES``
is skipped as it streams in, never buffered whole, and handed over as a
``TooLarge`` for the caller to count and acknowledge: acknowledging is what
stops the broker from sending it again after every reconnect. Subscriptions
are tracked per SUBSCRIBE packet id until the broker's SUBACK grants or
refuses each topic (``granted``, ``pending``). ``subscribe``, ``unsubscribe`` and ``ack`` may be
called from any thread. ``publish`` (the event loop's thread only) sends a
QoS 1 request (a command to a device, with its Response Topic and
Correlation Data) and returns its packet id; the broker's PUBACK comes back
through ``on_puback`` with its reason code. Library errors become log lines and reconnects with
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

from adapters.backoff import backoff_delay_s
from adapters.mqtt import ack_at_once
from contracts.errors import MqttProtocolError
from contracts.mqttcodec import (
    PINGREQ_PACKET,
    Connack,
    Disconnect,
    PacketReader,
    Puback,
    Publish,
    Suback,
    TooLarge,
    encode_connect,
    encode_disconnect,
    encode_pubacks,
    encode_publish,
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
# The longest message read into memory: 16x contracts' DEVICE_PAYLOAD_MAX_BYTES
# (4 KiB) leaves room for any topic and properties. A longer device message
# is skipped unbuffered and reported; a shorter one past 4 KiB is decoded's
# business (refused there as too large). Both are counted as too_large.
SITE_MAX_PACKET_BYTES = 64 * 1024
# Maximum Packet Size announced in CONNECT: the broker discards, uncounted,
# any packet longer than this instead of sending it. 16 MiB is the listener
# limit of cityhub's own broker (cityhub.localstack), so every message that
# broker accepts still reaches the gateway to be counted against its device;
# against a broker without a listener limit (MQTT allows 256 MiB) it caps what
# the gateway reads to skip one message at 16 MiB.
SITE_ANNOUNCED_MAX_PACKET_BYTES = 16 * 1024 * 1024


class _Protocol(asyncio.Protocol):
    def __init__(self, link: SiteLink) -> None:
        self.link = link
        self.reader = PacketReader(max_packet_bytes=SITE_MAX_PACKET_BYTES)
        self.connack: asyncio.Future[Connack] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.sock: object = None
        self.last_rx = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # noqa: S101 - a stream connection always is
        self.transport = transport
        self.sock = transport.get_extra_info("socket")

    def data_received(self, data: bytes) -> None:
        self.last_rx = time.monotonic()
        ack_at_once(self.sock)  # a device's answer must not wait on the broker's Nagle
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
        on_refused: Callable[[list[tuple[str, int]]], None] = lambda _refused: None,
        on_too_large: Callable[[TooLarge], None] = lambda _message: None,
        on_puback: Callable[[int, int], None] = lambda _pid, _code: None,
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
        self._on_refused = on_refused
        self._on_too_large = on_too_large
        self._on_puback = on_puback
        self.connected = threading.Event()
        # SUBACKs received, over all connections.
        self.subacks = 0
        # Topics the broker has granted on this connection, and SUBSCRIBE
        # packets not yet answered (packet id -> topics). Written on the event
        # loop; other threads read them as snapshots (``granted_topics``).
        self._granted: frozenset[str] = frozenset()
        self._pending: dict[int, list[str]] = {}
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

    def granted_topics(self) -> frozenset[str]:
        """Topics whose subscription the broker has confirmed on the current connection."""
        return self._granted

    def subscriptions_pending(self) -> bool:
        """True while a SUBSCRIBE of the current connection awaits its SUBACK."""
        return bool(self._pending)

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

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
    ) -> int | None:
        """Publish at QoS 1 on the current connection; its packet id, or None if not connected.

        A publish whose PUBACK never comes (the connection drops) is the
        caller's to send again on the next connection.
        """
        if not self.connected.is_set() or self._proto is None:
            return None
        pid = self._next_packet_id()
        self._write(
            encode_publish(
                topic,
                payload,
                qos=1,
                packet_id=pid,
                response_topic=response_topic,
                correlation_data=correlation_data,
            )
        )
        return pid

    def _send_filters(self, topics: list[str], *, subscribe: bool) -> None:
        for start in range(0, len(topics), SUBSCRIBE_CHUNK):
            chunk = topics[start : start + SUBSCRIBE_CHUNK]
            if not self.connected.is_set():
                return  # on_connect subscribes again from the device list
            pid = self._next_packet_id()
            if subscribe:
                self._pending[pid] = chunk
                self._write(encode_subscribe(pid, [(t, 1) for t in chunk]))
            else:
                self._granted = self._granted.difference(chunk)
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
            self._on_suback(control)
        elif isinstance(control, TooLarge):
            self._on_too_large(control)
        elif isinstance(control, Puback):
            self._on_puback(control.packet_id, control.reason_code)
        elif isinstance(control, Disconnect):
            logger.warning(
                "%s: disconnected by the broker: reason 0x%02x %s",
                self,
                control.reason_code,
                control.reason,
            )

    def _on_suback(self, suback: Suback) -> None:
        topics = self._pending.pop(suback.packet_id, None)
        if topics is None:
            logger.warning("%s: SUBACK for unknown packet id %d", self, suback.packet_id)
            return
        self.subacks += 1
        codes = suback.reason_codes
        if len(codes) != len(topics):
            logger.warning(
                "%s: SUBACK %d answers %d of %d topics; taking the missing as refused",
                self,
                suback.packet_id,
                len(codes),
                len(topics),
            )
        granted, refused = [], []
        for i, topic in enumerate(topics):
            code = codes[i] if i < len(codes) else 0x80
            if code < 0x80:
                granted.append(topic)
            else:
                refused.append((topic, code))
        self._granted = self._granted.union(granted)
        if refused:
            self._on_refused(refused)
        self._on_subscribed()

    async def run(self) -> None:
        """Connect, serve and reconnect with backoff until cancelled."""
        self._loop = asyncio.get_running_loop()
        failures = 0
        while not self._stopping:
            started = time.monotonic()
            error: str | None = None
            try:
                await self._session()
            except (OSError, ConnectionError, TimeoutError) as exc:
                error = str(exc) or type(exc).__name__
            finally:
                self.connected.clear()
                self._proto = None
                self._granted = frozenset()
                self._pending = {}
            if self._stopping:
                return
            # A connection that lived a while resets the backoff.
            failures = 1 if time.monotonic() - started > RECONNECT_MAX_S else failures + 1
            delay_s = backoff_delay_s(
                failures,
                min_s=RECONNECT_MIN_S,
                max_s=RECONNECT_MAX_S,
                draw=random.random(),  # noqa: S311 - jitter, not security
            )
            if error is not None:
                logger.warning("%s: %s; retrying in %.1f s", self, error, delay_s)
            await asyncio.sleep(delay_s)

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
                    maximum_packet_size=SITE_ANNOUNCED_MAX_PACKET_BYTES,
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
        self._granted = frozenset()
        self._pending = {}
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
