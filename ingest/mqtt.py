"""MQTT v5 adapter of ingest: the shared batch subscription, manual acks, app acks out.

paho-mqtt runs the network in its own thread (the fastest Python MQTT path
measured here, DESIGN.md section 5, and the one that keeps MQTT v5 reason
codes) and reconnects with backoff by itself. ``BatchSubscriber``:

- subscribes to ``$share/{group}/[prefix/]hub/v1/gw/+/batch`` at QoS 1 on
  every (re)connect, so N workers split the stream;
- turns paho's automatic PUBACK off (``manual_ack_set``): a batch message is
  acked (``ack``) only after the commit that covers it, so a worker that dies
  leaves it unacked for the broker and the gateway to redeliver;
- sends MQTT v5 *Receive Maximum* = ``receive_max`` in CONNECT, asking the
  broker to keep at most that many unacked messages in flight to this
  client (the rest waits in the broker's queue);
- puts ``Delivery`` records on a hand-over queue from the network thread. The
  caller bounds that queue; when it is full the network thread blocks and
  stops reading from the socket, which is TCP backpressure. That block is
  the bound that holds: Mosquitto 2.0.11 keeps Receive Maximum only while
  nothing is acked; with PUBACKs flowing (in groups of 64) it was measured
  here with 643 messages unacked in flight against a Receive Maximum of 256
  for 47 KB messages, and 1,132 for 100-byte ones.

Client ids: every connection has its own (``client_id_for``: the worker id,
the process id and a random token), because a broker that sees a second
CONNECT with a client id it already holds closes the first connection with
DISCONNECT 0x8E, "session taken over". Two processes that shared an id took
turns kicking each other off forever. Such a takeover is logged as exactly
that, once per takeover, naming the client id (when the broker says so:
Mosquitto 2.0.11 just closes the socket, and the lost-connection line, which
names the client id too, is what shows).

A PUBACK belongs to the connection the message came on: message ids are
reused by a new connection, so acks for deliveries of an earlier connection
are skipped (the broker redelivers those, or the gateway resends them).

``StateSubscriber`` is a second connection, of the worker that stores the
gateways' states (``ingest.service`` says which and why): a plain
subscription to ``[prefix/]hub/v1/gw/+/state``, so the broker sends the
retained state of every gateway at each (re)subscribe, acked by paho on
receipt. Messages go onto a bounded queue without ever blocking the network
thread; when it is full the oldest is dropped (and counted), since each
gateway repeats its state and the newest matters most.

Both connections announce an MQTT v5 *Maximum Packet Size* in CONNECT
(``batch_packet_max_bytes`` / ``state_packet_max_bytes``): the broker must
discard, not send, a message that would exceed it, so one oversized message
can neither wedge a connection (a client that cannot read a packet must
drop the connection, and gets the packet again at the next one) nor cost a
worker its memory. A message that arrives and is still too large for its
decoder is refused there, counted, stored as a reject and acked.

Library errors become ``BrokerUnavailableError``. What to do with a message
is the service's business.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import ssl
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from contracts.errors import BrokerUnavailableError
from contracts.messages import BATCH_MAX_BYTES, CONTROL_MAX_BYTES

logger = logging.getLogger(__name__)

# Seconds between reconnect attempts: start fast (a broker restart takes ~1 s),
# back off to 30 s so a long outage does not hammer the network.
RECONNECT_MIN_S: Final = 1
RECONNECT_MAX_S: Final = 30
KEEPALIVE_S: Final = 30
# How long the network thread waits on a full hand-over queue before looking
# at the stop flag again.
_PUT_POLL_S: Final = 0.5
# MQTT v5 reason code of the DISCONNECT a broker sends to a connection whose
# client id another connection has just claimed.
SESSION_TAKEN_OVER: Final = 0x8E
# Characters of randomness in a client id: 48 bits, so two processes that
# share a host name and (in separate PID namespaces) a process id still differ.
_CLIENT_TOKEN_CHARS: Final = 12
# What a PUBLISH packet adds to its payload: a fixed header (<= 5 bytes), the
# topic (2 + its length), a packet id (2) and properties (a few bytes; the
# broker adds none we asked for). Gateway topics are under 200 bytes; 64 KiB
# covers nearly the longest topic MQTT allows, so no payload a gateway may
# send is ever discarded for its topic's length.
PACKET_HEADROOM_BYTES: Final = 64 * 1024
# Ack messages ingest publishes (QoS 1) without a PUBACK yet: acks are one
# small message per gateway per commit.
_MAX_OUTGOING_INFLIGHT: Final = 100


def batch_packet_max_bytes() -> int:
    """Maximum Packet Size of a batch connection: the largest batch plus a PUBLISH's overhead."""
    return BATCH_MAX_BYTES + PACKET_HEADROOM_BYTES


def state_packet_max_bytes() -> int:
    """Maximum Packet Size of the state connection: a control message plus the overhead."""
    return CONTROL_MAX_BYTES + PACKET_HEADROOM_BYTES


def client_id_for(worker_id: str, role: str = "") -> str:
    """``ingest-{worker_id}[-{role}]-{pid}-{token}``: a client id no other connection uses.

    Ingest needs no session to survive a reconnect (clean start, no session
    expiry: see ``BatchSubscriber.start``), so nothing is lost by a new id at
    each start: what was in flight to a gone connection is unacked, and the
    gateways resend every unacked batch, which ingest then commits once.
    """
    parts = [
        "ingest",
        worker_id,
        role,
        str(os.getpid()),
        secrets.token_hex(_CLIENT_TOKEN_CHARS // 2),
    ]
    return "-".join(p for p in parts if p)


def _new_client(
    client_id: str, username: str | None, password: str | None, *, tls: bool
) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    if username is not None:
        client.username_pw_set(username, password)
    if tls:
        client.tls_set(cert_reqs=ssl.CERT_REQUIRED)
    client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
    return client


@dataclass(frozen=True, slots=True)
class Delivery:
    """One batch message as received: what to decode and how to ack it."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    generation: int  # the connection it came on
    received_s: float  # time.monotonic()


class _Subscription:
    """One broker connection holding one subscription; paho reconnects it until ``stop``.

    Subclasses set up the client's message handling and say what to log; the
    connect / subscribe / disconnect bookkeeping is common. Callbacks run in
    paho's network thread.
    """

    # Logged at INFO when the broker grants the subscription ({} = topic filter).
    granted_log = "subscribed to %s"
    # Logged at WARNING when a live connection is lost ({} = client id, reason).
    lost_log = "connection %r to the broker lost (%s); reconnecting"

    def __init__(
        self, *, host: str, port: int, topic_filter: str, client_id: str, client: mqtt.Client
    ) -> None:
        self.client_id = client_id
        self.takeovers = 0  # connections closed by the broker for another with our id
        self.host = host
        self.port = port
        self.topic_filter = topic_filter
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self._stopping = threading.Event()
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_subscribe = self._handle_subscribe
        self.client = client

    def _connect(self, *, properties: Properties | None = None) -> None:
        try:
            self.client.connect_async(
                self.host,
                self.port,
                keepalive=KEEPALIVE_S,
                clean_start=True,
                properties=properties,
            )
        except (OSError, ValueError) as exc:
            raise BrokerUnavailableError(f"broker {self.host}:{self.port}: {exc}") from exc
        self.client.loop_start()

    def stop(self) -> None:
        self._stopping.set()
        self.client.disconnect()
        self.client.loop_stop()

    def _connected(self) -> None:
        """Called in the network thread when a connection is accepted."""

    def _disconnected(self) -> None:
        """Called in the network thread when a connection ends."""

    def _handle_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        raise NotImplementedError

    # -- paho callbacks (network thread) ----------------------------------------

    def _handle_connect(
        self, _c: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any
    ) -> None:
        if reason.is_failure:
            logger.warning("broker %s:%d refused the connection: %s", self.host, self.port, reason)
            return
        self._connected()
        self.connected.set()
        result, _mid = self.client.subscribe(self.topic_filter, options=SubscribeOptions(qos=1))
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
            logger.warning("subscribe to %s failed: %s", self.topic_filter, result)

    def _handle_subscribe(
        self, _c: mqtt.Client, _u: Any, _mid: int, reasons: list[ReasonCode], _p: Any
    ) -> None:
        refused = [r for r in reasons if r.is_failure]
        if refused:
            logger.error(
                "broker refused the subscription %s: %s (check the ACL)",
                self.topic_filter,
                ", ".join(str(r) for r in refused),
            )
            return
        logger.info(self.granted_log, self.topic_filter)
        self.subscribed.set()

    def _handle_disconnect(
        self, _c: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any
    ) -> None:
        self._disconnected()
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
        elif was and not self._stopping.is_set():
            # Mosquitto 2.0.11 closes a taken-over connection without the
            # DISCONNECT packet; then this line, naming the id, is what shows.
            logger.warning(self.lost_log, self.client_id, reason)


class BatchSubscriber(_Subscription):
    """One broker connection of one ingest worker. Callbacks run in paho's network thread."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        client_id: str,
        username: str | None,
        password: str | None,
        topic_filter: str,
        receive_max: int,
        deliveries: queue.Queue[Delivery],
        tls: bool = False,
    ) -> None:
        if not 1 <= receive_max <= 65535:  # MQTT v5: a two-byte integer, not 0
            raise ValueError(f"receive_max must be in [1, 65535], got {receive_max}")
        client = _new_client(client_id, username, password, tls=tls)
        client.max_inflight_messages_set(_MAX_OUTGOING_INFLIGHT)
        client.max_queued_messages_set(0)  # acks to send while reconnecting: few, keep all
        client.manual_ack_set(True)
        super().__init__(
            host=host, port=port, topic_filter=topic_filter, client_id=client_id, client=client
        )
        self.receive_max = receive_max
        self.connects = 0
        self._deliveries = deliveries
        self._generation = 0
        self._ack_lock = threading.Lock()

    def start(self) -> None:
        """Connect in the background; paho keeps reconnecting until ``stop``."""
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.ReceiveMaximum = self.receive_max
        props.MaximumPacketSize = batch_packet_max_bytes()
        # Clean start, no session kept (no Session Expiry Interval: 0): messages
        # in flight to a worker that is gone are the gateway's to resend (it
        # keeps them until acked); a persistent session would instead park
        # them with a dead worker. So the client id needs no stability across
        # restarts, and a fresh, unique one per process costs no reading.
        self._connect(properties=props)

    def ack(self, deliveries: Iterable[Delivery]) -> int:
        """PUBACK deliveries of the current connection; returns how many were acked."""
        acked = 0
        with self._ack_lock:
            for d in deliveries:
                if d.qos == 0 or d.generation != self._generation:
                    continue
                self.client.ack(d.mid, d.qos)
                acked += 1
        return acked

    def publish(self, topic: str, payload: bytes, *, qos: int = 1) -> None:
        """Queue a publish; while disconnected paho keeps it for the next connection."""
        info = self.client.publish(topic, payload, qos=qos)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise BrokerUnavailableError(f"publish to {topic} failed: {info.rc}")

    # -- paho callbacks (network thread) ----------------------------------------

    def _connected(self) -> None:
        self.connects += 1
        logger.info("connected to broker %s:%d", self.host, self.port)

    def _disconnected(self) -> None:
        with self._ack_lock:
            # From here on, acks for what came on the old connection are skipped.
            self._generation += 1

    def _handle_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        delivery = Delivery(
            topic=message.topic,
            payload=bytes(message.payload),
            mid=message.mid,
            qos=message.qos,
            generation=self._generation,
            received_s=time.monotonic(),
        )
        while not self._stopping.is_set():
            try:
                self._deliveries.put(delivery, timeout=_PUT_POLL_S)
            except queue.Full:
                continue
            return


@dataclass(frozen=True, slots=True)
class StateMessage:
    """One message from a gateway state topic, as received."""

    topic: str
    payload: bytes
    # Sent from the broker's store at (re)subscribe, not forwarded live.
    retained: bool = False
    # Wall clock when it arrived: a live Will's time of death (MQTT gives a
    # message no broker timestamp, and the Will's own is its connect time).
    received_ms: int = 0


class StateSubscriber(_Subscription):
    """The state subscription's own broker connection. Callbacks run in paho's network thread."""

    granted_log = "listening for gateway states on %s"
    lost_log = "state subscription %r lost (%s); reconnecting"

    def __init__(
        self,
        *,
        host: str,
        port: int,
        client_id: str,
        username: str | None,
        password: str | None,
        topic_filter: str,
        messages: queue.Queue[StateMessage],
        tls: bool = False,
    ) -> None:
        client = _new_client(client_id, username, password, tls=tls)
        super().__init__(
            host=host, port=port, topic_filter=topic_filter, client_id=client_id, client=client
        )
        self.dropped = 0  # messages dropped from a full queue
        self._messages = messages

    def start(self) -> None:
        """Connect in the background; paho keeps reconnecting until ``stop``."""
        # Clean start: the retained states at each subscribe are the catch-up.
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.MaximumPacketSize = state_packet_max_bytes()
        self._connect(properties=props)

    # -- paho callbacks (network thread) ----------------------------------------

    def _handle_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        received = StateMessage(
            topic=message.topic,
            payload=bytes(message.payload),
            retained=bool(message.retain),
            received_ms=time.time_ns() // 1_000_000,
        )
        while True:
            try:
                self._messages.put_nowait(received)
            except queue.Full:
                try:
                    self._messages.get_nowait()
                except queue.Empty:
                    continue
                self.dropped += 1
                continue
            return
