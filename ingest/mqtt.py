"""Ingest's two broker subscriptions: the shared batch stream with manual acks, and states.

Both are built on ``adapters.mqtt.MqttLink`` (paho-mqtt's network thread,
the fastest Python MQTT path measured here, bench/RESULTS.md, and the
one that keeps MQTT v5 reason codes; it reconnects with backoff by itself).
What is ingest's own is here: what to subscribe to, the client ids, the
queues that hand messages to the service, and the lines logged when a
subscription is up. ``BatchSubscriber``:

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

Client ids: every connection has its own (``client_id_for``: the service
account's username, the worker id, the process id and a random token),
because a broker that sees a second CONNECT with a client id it already
holds closes the first connection with DISCONNECT 0x8E, "session taken
over". Two processes that shared an id took turns kicking each other off
forever. The link logs such a takeover as
exactly that, once per takeover, naming the client id (when the broker says
so: Mosquitto 2.0.11 just closes the socket, and the lost-connection line,
which names the client id too, is what shows).

A PUBACK belongs to the connection the message came on: message ids are
reused by a new connection, so the link skips acks for deliveries of an
earlier connection (the broker redelivers those, or the gateway resends them).

The worker that handles commands (``ingest.service``) runs a second
``BatchSubscriber`` (named "command reports", its own client id and queue) on
``$share/{group}/[prefix/]hub/v1/gw/+/cmdreport``, acked the same way after
the reports' commit; it also carries the commands published to gateways.

``StateSubscriber`` is another connection, of the worker that stores the
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

The link turns library errors into ``BrokerUnavailableError``. What to do
with a message is the service's business.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from adapters.mqtt import IncomingMessage, MqttLink, unique_client_id
from contracts.commands import COMMAND_REPORTS_MAX_BYTES
from contracts.messages import BATCH_MAX_BYTES, CONTROL_MAX_BYTES

logger = logging.getLogger(__name__)

# How long the network thread waits on a full hand-over queue before looking
# at the stop flag again.
_PUT_POLL_S: Final = 0.5
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


def report_packet_max_bytes() -> int:
    """Maximum Packet Size of the command reports connection: a reports message plus overhead."""
    return COMMAND_REPORTS_MAX_BYTES + PACKET_HEADROOM_BYTES


def state_packet_max_bytes() -> int:
    """Maximum Packet Size of the state connection: a control message plus the overhead."""
    return CONTROL_MAX_BYTES + PACKET_HEADROOM_BYTES


def client_id_for(worker_id: str, role: str = "", username: str | None = None) -> str:
    """``{ingest.inst|ingest}-{worker_id}[-{role}]-{pid}-{token}``: an id no other connection uses.

    With a service account (``username`` ``ingest.{instance}``) the id starts
    with that username: a dot is never in a device or gateway id, so no
    account bound to its own client id can ever hold one of ingest's (its
    account is not bound to one id: devices.dynsec says why).

    Ingest needs no session to survive a reconnect (clean start, no session
    expiry: see ``BatchSubscriber``), so nothing is lost by a new id at
    each start: what was in flight to a gone connection is unacked, and the
    gateways resend every unacked batch, which ingest then commits once.
    """
    head = username if username is not None and username.startswith("ingest.") else "ingest"
    return unique_client_id(head, worker_id, role)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One batch message as received: what to decode and how to ack it."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    generation: int  # the connection it came on (``MqttLink.generation``)
    received_s: float  # time.monotonic()


class _Subscription:
    """One broker connection holding one subscription; the link reconnects it until ``stop``."""

    link: MqttLink

    @property
    def client_id(self) -> str:
        return self.link.client_id

    @property
    def topic_filter(self) -> str:
        return self.link.subscriptions[0]

    @property
    def connected(self) -> threading.Event:
        return self.link.connected

    @property
    def subscribed(self) -> threading.Event:
        return self.link.subscribed

    @property
    def connects(self) -> int:
        return self.link.connects

    @property
    def takeovers(self) -> int:
        """Connections the broker closed for another with the same client id."""
        return self.link.takeovers

    def start(self) -> None:
        """Connect in the background; the link keeps reconnecting until ``stop``."""
        self.link.start()

    def stop(self) -> None:
        self.link.stop()


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
        name: str = "batches",
        max_packet_bytes: int | None = None,
    ) -> None:
        self.receive_max = receive_max
        self._deliveries = deliveries
        # Clean start, no session kept (no Session Expiry Interval: 0): messages
        # in flight to a worker that is gone are the gateway's to resend (it
        # keeps them until acked); a persistent session would instead park
        # them with a dead worker. So the client id needs no stability across
        # restarts, and a fresh, unique one per process costs no reading.
        self.link = MqttLink(
            name=name,
            host=host,
            port=port,
            client_id=client_id,
            username=username,
            password=password,
            tls=tls,
            subscriptions=[topic_filter],
            max_packet_bytes=max_packet_bytes or batch_packet_max_bytes(),
            receive_max=receive_max,
            manual_ack=True,
            max_inflight=_MAX_OUTGOING_INFLIGHT,
            on_message=self._on_message,
            on_connect=self._on_connect,
            on_subscribed=self._on_subscribed,
        )

    def ack(self, deliveries: Iterable[Delivery]) -> int:
        """PUBACK deliveries of the current connection; returns how many were acked."""
        return self.link.ack(deliveries)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1) -> None:
        """Queue a publish; while disconnected paho keeps it for the next connection."""
        self.link.publish(topic, payload, qos=qos)

    # -- link callbacks (network thread) -------------------------------------------

    def _on_connect(self) -> None:
        # The batch link's lines are the ones operators (and tests) look for
        # to see a worker ready; another link says which it is.
        if self.link.name == "batches":
            logger.info("connected to broker %s:%d", self.link.host, self.link.port)
        else:
            logger.info(
                "%s link connected to %s:%d", self.link.name, self.link.host, self.link.port
            )

    def _on_subscribed(self) -> None:
        if self.link.name == "batches":
            logger.info("subscribed to %s", self.topic_filter)
        else:
            logger.info("listening for %s on %s", self.link.name, self.topic_filter)

    def _on_message(self, message: IncomingMessage) -> None:
        delivery = Delivery(
            topic=message.topic,
            payload=bytes(message.payload),
            mid=message.mid,
            qos=message.qos,
            generation=self.link.generation,
            received_s=time.monotonic(),
        )
        stopping = self.link.stopping
        while not stopping.is_set():
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
        self.dropped = 0  # messages dropped from a full queue
        self._messages = messages
        # Clean start: the retained states at each subscribe are the catch-up.
        self.link = MqttLink(
            name="states",
            host=host,
            port=port,
            client_id=client_id,
            username=username,
            password=password,
            tls=tls,
            subscriptions=[topic_filter],
            max_packet_bytes=state_packet_max_bytes(),
            on_message=self._on_message,
            on_subscribed=self._on_subscribed,
        )

    # -- link callbacks (network thread) -------------------------------------------

    def _on_subscribed(self) -> None:
        logger.info("listening for gateway states on %s", self.topic_filter)

    def _on_message(self, message: IncomingMessage) -> None:
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
