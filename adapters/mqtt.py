"""The MQTT v5 link: one paho-mqtt client connection, the only place cityhub imports paho.

paho-mqtt runs the network in its own thread (the fastest Python MQTT path
measured here, and the one that keeps MQTT v5 reason codes, which aiomqtt
drops) and reconnects with backoff by itself. ``MqttLink`` wraps one such
connection and is what the gateway's uplink, ingest's subscriptions,
provisioning's control connection and the CLI use:

- connects with clean start, an optional Will, TLS, and the MQTT v5
  properties a service asks for in CONNECT: *Maximum Packet Size* (the broker
  must discard, not send, anything longer, so an oversized message is never
  read into memory) and *Receive Maximum* (how many unacked messages the
  broker may have in flight to this client);
- subscribes to its topic filters at QoS 1 on every (re)connect;
- turns paho's automatic PUBACK off on request (``manual_ack``): ``ack``
  sends it later, and only for messages of the connection that is still up,
  because a new connection reuses message ids (``Ackable.generation``);
- reports PUBACK results with their reason codes, connects, disconnects and
  granted subscriptions through callbacks that run in paho's network thread.
  Each callback is shielded: an exception escaping into paho would end that
  thread, and with it the connection, for good, so it is logged and counted
  (``callback_errors``) instead;
- logs what goes wrong with the connection itself (a refused CONNECT, a lost
  connection, a session taken over, a refused subscription) once, here.

Library errors become ``BrokerUnavailableError`` (retryable), a CONNECT the
broker refuses when connecting in the foreground ``BrokerRefusedError``, and
unusable TLS files ``PkiError``. What a message means, which queue it goes
to and what to log on a successful connect is the caller's business.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from contracts.errors import BrokerRefusedError, BrokerUnavailableError, PkiError

logger = logging.getLogger(__name__)

# Seconds between reconnect attempts: start fast (a broker restart takes ~1 s),
# back off to 30 s so a long outage does not hammer the network.
RECONNECT_MIN_S: Final = 1
RECONNECT_MAX_S: Final = 30
KEEPALIVE_S: Final = 30
# paho's own default: outgoing QoS 1 messages without a PUBACK yet.
DEFAULT_MAX_INFLIGHT: Final = 20
# MQTT v5 reason code of the DISCONNECT a broker sends to a connection whose
# client id another connection has just claimed.
SESSION_TAKEN_OVER: Final = 0x8E
# Characters of randomness in a client id: 48 bits, so two processes that
# share a host name and (in separate PID namespaces) a process id still differ.
_CLIENT_TOKEN_CHARS: Final = 12
# Receive Maximum is a two-byte integer in MQTT v5, and 0 is a protocol error.
_RECEIVE_MAX_LIMIT: Final = 65535


def unique_client_id(*parts: str) -> str:
    """``{parts}-{pid}-{token}``: a client id no other connection uses.

    A broker that sees a second CONNECT with a client id it already holds
    closes the first connection ("session taken over"); two processes that
    shared an id would take turns kicking each other off forever.
    """
    token = secrets.token_hex(_CLIENT_TOKEN_CHARS // 2)
    return "-".join([*(p for p in parts if p), str(os.getpid()), token])


def answer_properties(correlation_data: bytes | None) -> Properties:
    """MQTT v5 PUBLISH properties of an answer to a request: its Correlation Data echoed.

    For aiomqtt clients (``publish(..., properties=...)``), whose property
    type is paho's.
    """
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if correlation_data is not None:
        properties.CorrelationData = correlation_data
    return properties


def client_ssl_context(name: str, *, ca_file: str, cert_file: str, key_file: str) -> ssl.SSLContext:
    """A TLS client context: the broker is verified against ``ca_file`` (else the
    system's CAs); a client certificate is presented when the listener requires one.
    """
    try:
        context = ssl.create_default_context(cafile=ca_file or None)
        if cert_file:
            context.load_cert_chain(cert_file, key_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise PkiError(f"{name}: TLS files: {exc}") from exc
    return context


@dataclass(frozen=True, slots=True)
class Will:
    """The message the broker publishes for a client whose connection dies (QoS 1)."""

    topic: str
    payload: bytes
    retain: bool = True


class IncomingMessage(Protocol):
    """A message as the network thread hands it to ``on_message`` (paho's, not copied)."""

    @property
    def topic(self) -> str: ...
    @property
    def payload(self) -> bytes | bytearray: ...
    @property
    def mid(self) -> int: ...
    @property
    def qos(self) -> int: ...
    @property
    def retain(self) -> bool: ...


class Ackable(Protocol):
    """What ``MqttLink.ack`` needs of a received message."""

    @property
    def mid(self) -> int: ...
    @property
    def qos(self) -> int: ...
    @property
    def generation(self) -> int: ...  # ``MqttLink.generation`` when it arrived


def _nothing() -> None:
    pass


def _no_puback(_mid: int, _reason_code: int) -> None:
    pass


def _ignore(_message: IncomingMessage) -> None:
    pass


def _send_at_once(_client: mqtt.Client, _userdata: object, sock: object) -> None:
    """TCP_NODELAY on each new connection: paho leaves Nagle's algorithm on.

    With it, a small packet (a PUBACK, an ack, a command) written while an
    earlier one is unacknowledged waits for the broker's delayed TCP ACK, up
    to 40 ms. MQTT packets are written whole: there is nothing to coalesce.
    """
    setsockopt = getattr(sock, "setsockopt", None)  # a websocket wrapper has none
    if setsockopt is not None:
        with contextlib.suppress(OSError):  # not TCP: nothing to turn off
            setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _paho_client(
    *,
    client_id: str,
    username: str | None,
    password: str | None,
    tls: ssl.SSLContext | None,
    will: Will | None,
    max_inflight: int,
    manual_ack: bool,
) -> mqtt.Client:
    """A paho MQTT v5 client with the link's options; callbacks are the link's to set."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    if username is not None:
        client.username_pw_set(username, password)
    if tls is not None:
        client.tls_set_context(tls)
    if will is not None:
        client.will_set(will.topic, will.payload, qos=1, retain=will.retain)
    client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
    # Unbounded: callers bound what they have in flight (batches, acks).
    client.max_queued_messages_set(0)
    client.max_inflight_messages_set(max_inflight)
    client.manual_ack_set(manual_ack)
    client.on_socket_open = _send_at_once
    return client


# Linux only; elsewhere the link does without.
_TCP_QUICKACK: Final = getattr(socket, "TCP_QUICKACK", None)


def ack_at_once(sock: object) -> None:
    """Have the kernel ACK what was just read now, not up to 40 ms later (Linux).

    The broker leaves Nagle's algorithm on (turning it off costs its bulk
    sends more than half their rate, bench/RESULTS.md): a small packet it
    writes to a client while an earlier one is unacknowledged waits for the
    client's TCP ACK, which Linux delays up to 40 ms when the client has
    nothing to send back. A command's answer, report or ack then waited 40 ms
    at each hop. TCP_QUICKACK is not sticky, so it is set after each read.
    """
    setsockopt = getattr(sock, "setsockopt", None)  # a websocket wrapper has none
    if _TCP_QUICKACK is not None and setsockopt is not None:
        with contextlib.suppress(OSError):  # closed meanwhile, or not TCP
            setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)


class MqttLink:
    """One broker connection; paho reconnects it until ``stop``.

    Callbacks run in paho's network thread: ``on_message`` per message,
    ``on_connect`` after each accepted CONNECT (the subscriptions are already
    asked for), ``on_subscribed`` when the broker granted all of them,
    ``on_disconnect`` when a connection ends, ``on_publish(mid, reason_code)``
    per PUBACK of a QoS 1 publish.
    """

    def __init__(
        self,
        *,
        name: str,
        host: str,
        port: int,
        client_id: str = "",
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        ca_file: str = "",
        cert_file: str = "",
        key_file: str = "",
        will: Will | None = None,
        subscriptions: Sequence[str] = (),
        max_packet_bytes: int | None = None,
        receive_max: int | None = None,
        manual_ack: bool = False,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        keepalive_s: int = KEEPALIVE_S,
        on_message: Callable[[IncomingMessage], None] = _ignore,
        on_connect: Callable[[], None] = _nothing,
        on_subscribed: Callable[[], None] = _nothing,
        on_disconnect: Callable[[], None] = _nothing,
        on_publish: Callable[[int, int], None] = _no_puback,
    ) -> None:
        if receive_max is not None and not 1 <= receive_max <= _RECEIVE_MAX_LIMIT:
            raise ValueError(f"receive_max must be in [1, 65535], got {receive_max}")
        self.name = name
        self.host = host
        self.port = port
        self.client_id = client_id
        self.username = username
        self.subscriptions = tuple(subscriptions)
        self.keepalive_s = keepalive_s
        self._properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if max_packet_bytes is not None:
            self._properties.MaximumPacketSize = max_packet_bytes
        if receive_max is not None:
            self._properties.ReceiveMaximum = receive_max
        self._on_message = on_message
        self._on_connect = on_connect
        self._on_subscribed = on_subscribed
        self._on_disconnect = on_disconnect
        self._on_publish = on_publish
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.stopping = threading.Event()
        # Set when the broker answered a CONNECT (accepted or refused).
        self._answered = threading.Event()
        self._give_up_when_refused = False
        # Why the broker refused the last CONNECT (None: it accepted it).
        self.refusal: str | None = None
        self.connects = 0  # accepted connections
        self.takeovers = 0  # connections closed by the broker for another with our id
        self.callback_errors = 0  # callbacks that raised
        # Counts connections: a delivery acks only on the connection it came on.
        self.generation = 0
        self._ack_lock = threading.Lock()
        client = _paho_client(
            client_id=client_id,
            username=username,
            password=password,
            tls=client_ssl_context(name, ca_file=ca_file, cert_file=cert_file, key_file=key_file)
            if tls
            else None,
            will=will,
            max_inflight=max_inflight,
            manual_ack=manual_ack,
        )
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_subscribe = self._handle_subscribe
        client.on_publish = self._handle_publish
        self.client = client

    def __repr__(self) -> str:
        return f"MqttLink({self.name} {self.host}:{self.port})"

    # -- connection --------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background; paho keeps reconnecting until ``stop``."""
        try:
            # Clean start, no session kept: what was in flight to a gone
            # connection is the sender's to resend (gateways keep every
            # batch until acked), never parked with a dead client.
            self.client.connect_async(
                self.host,
                self.port,
                keepalive=self.keepalive_s,
                clean_start=True,
                properties=self._properties,
            )
        except (OSError, ValueError) as exc:
            raise BrokerUnavailableError(f"{self.name}: {self.host}:{self.port}: {exc}") from exc
        self.client.loop_start()

    def connect(self, *, timeout_s: float) -> None:
        """Connect now and wait until the broker accepted it and granted the subscriptions.

        Raises ``BrokerUnavailableError`` if the broker cannot be reached or
        does not answer in ``timeout_s``, ``BrokerRefusedError`` if it refuses
        the CONNECT. Afterwards paho reconnects as after ``start``, except
        after a refusal: retrying the same credentials cannot help, so a
        refused reconnect ends the link (it is logged).
        """
        self._give_up_when_refused = True
        where = f"{self.name} broker {self.host}:{self.port}"
        try:
            self.client.connect(
                self.host,
                self.port,
                keepalive=self.keepalive_s,
                clean_start=True,
                properties=self._properties,
            )
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise BrokerUnavailableError(f"cannot reach the {where}: {exc}") from exc
        self.client.loop_start()
        try:
            self._await_ready(where, timeout_s)
        except BaseException:
            self.stop()
            raise

    def _await_ready(self, where: str, timeout_s: float) -> None:
        if not self._answered.wait(timeout_s):
            raise BrokerUnavailableError(f"the {where} did not accept the connection in time")
        if self.refusal is not None:
            raise BrokerRefusedError(where, self.username, self.refusal)
        if self.subscriptions and not self.subscribed.wait(timeout_s):
            raise BrokerUnavailableError(f"the {where} did not confirm the subscription")

    def stop(self) -> None:
        """Disconnect (sending what is queued first) and end the network thread."""
        self.stopping.set()
        self.client.disconnect()
        self.client.loop_stop()

    # -- sending -----------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int:
        """Queue a publish and return its mid; the PUBACK arrives through ``on_publish``.

        While disconnected paho keeps it for the next connection.
        """
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise BrokerUnavailableError(f"{self.name}: publish to {topic} failed: {info.rc}")
        return int(info.mid)

    def publish_confirmed(
        self, topic: str, payload: bytes, *, timeout_s: float, retain: bool = False
    ) -> None:
        """Publish at QoS 1 and wait for the broker's PUBACK."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        try:
            info.wait_for_publish(timeout_s)
            published = info.is_published()
        except (RuntimeError, ValueError) as exc:
            raise BrokerUnavailableError(f"{self.name}: publish to {topic}: {exc}") from exc
        if not published:
            raise BrokerUnavailableError(f"{self.name} broker did not acknowledge {topic}")

    def ack(self, messages: Iterable[Ackable]) -> int:
        """PUBACK messages of the current connection (``manual_ack``); returns how many.

        Messages of an earlier connection are skipped: the new connection
        reuses their ids, and the broker redelivers them (or the sender
        resends them) anyway.
        """
        acked = 0
        with self._ack_lock:
            generation = self.generation
            for m in messages:
                if m.qos == 0 or m.generation != generation:
                    continue
                self.client.ack(m.mid, m.qos)
                acked += 1
        return acked

    # -- paho callbacks (network thread) -------------------------------------------

    def _handle_connect(
        self, _c: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any
    ) -> None:
        if reason.is_failure:
            logger.warning(
                "%s: %s:%d refused the connection: %s", self.name, self.host, self.port, reason
            )
            self.refusal = str(reason)
            if self._give_up_when_refused:
                self.client.disconnect()  # stop paho from retrying; ``connect`` reports it
            self._answered.set()
            return
        logger.debug("%s: connected to %s:%d", self.name, self.host, self.port)
        self.refusal = None
        self.connects += 1
        self.connected.set()
        self._answered.set()
        if self.subscriptions:
            topics = [(t, SubscribeOptions(qos=1)) for t in self.subscriptions]
            result, _mid = self.client.subscribe(topics)
            if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
                logger.warning(
                    "%s: subscribe to %s failed: %s", self.name, self.subscriptions, result
                )
        try:
            self._on_connect()
        except Exception:
            self.callback_errors += 1
            logger.exception("%s: the connect callback failed", self.name)

    def _handle_subscribe(
        self, _c: mqtt.Client, _u: Any, _mid: int, reasons: list[ReasonCode], _p: Any
    ) -> None:
        refused = [r for r in reasons if r.is_failure]
        if refused:
            logger.error(
                "%s: broker refused the subscription %s: %s (check the ACL)",
                self.name,
                ", ".join(self.subscriptions),
                ", ".join(str(r) for r in refused),
            )
            return
        self.subscribed.set()
        try:
            self._on_subscribed()
        except Exception:
            self.callback_errors += 1
            logger.exception("%s: the subscription callback failed", self.name)

    def _handle_disconnect(
        self, _c: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any
    ) -> None:
        with self._ack_lock:
            # From here on, acks for what came on the old connection are skipped.
            self.generation += 1
        was = self.connected.is_set()
        self.connected.clear()
        self.subscribed.clear()
        if reason.value == SESSION_TAKEN_OVER:
            self.takeovers += 1
            logger.error(
                "session taken over: the broker closed connection %r because another client "
                "connected with the same client id; reconnecting",
                self.client_id,
            )
        elif was and not self.stopping.is_set():
            # Mosquitto 2.0.11 closes a taken-over connection without the
            # DISCONNECT packet; then this line, naming the id, is what shows.
            logger.warning(
                "%s: connection %r to %s:%d lost (%s); reconnecting",
                self.name,
                self.client_id,
                self.host,
                self.port,
                reason,
            )
        try:
            self._on_disconnect()
        except Exception:
            self.callback_errors += 1
            logger.exception("%s: the disconnect callback failed", self.name)

    def _handle_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        # The outermost frame of paho's network thread for every incoming
        # message: one bad message is logged and skipped, the thread goes on.
        ack_at_once(self.client.socket())
        try:
            self._on_message(message)
        except Exception:
            self.callback_errors += 1
            logger.exception("%s: message on %s could not be handled", self.name, message.topic)

    def _handle_publish(
        self, _c: mqtt.Client, _u: Any, mid: int, reason: ReasonCode, _p: Any
    ) -> None:
        ack_at_once(self.client.socket())
        try:
            self._on_publish(mid, int(reason.value))
        except Exception:
            self.callback_errors += 1
            logger.exception("%s: the PUBACK callback failed", self.name)
