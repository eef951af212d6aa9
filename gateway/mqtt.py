"""The gateway's uplink to the central broker: a paho MQTT v5 client bridged to asyncio.

paho-mqtt runs the network in its own thread and reconnects with backoff by
itself. ``MqttLink`` hands what matters to the service: incoming acks and
configs (in the network thread), connects and disconnects, and PUBACK
results with their MQTT v5 reason codes (aiomqtt drops those, which is why
this adapter exists). The uplink carries about a hundred batches a second at
most, far from paho's limits; the site side, with one message per reading,
has its own codec (``gateway.sitelink``). Library errors become
``BrokerUnavailableError``.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from contracts.errors import BrokerUnavailableError

logger = logging.getLogger(__name__)

# Seconds between reconnect attempts: start fast (a broker restart takes ~1 s),
# back off to 30 s so a long outage does not hammer the network.
RECONNECT_MIN_S = 1
RECONNECT_MAX_S = 30
KEEPALIVE_S = 30
# Maximum Packet Size announced in CONNECT: the broker discards (MQTT 5.0
# section 3.1.2.11.4) any packet longer than this instead of sending it. What
# the uplink reads, acks and configs, is refused past contracts'
# CONTROL_MAX_BYTES (1 MiB) when decoded; 64 KiB more leaves room for the
# topic and properties, so only what would be refused anyway is dropped, and
# never read into memory (paho buffers a whole packet before handing it over).
MAX_PACKET_BYTES = 1024 * 1024 + 64 * 1024


def client_ssl_context(name: str, *, ca_file: str, cert_file: str, key_file: str) -> ssl.SSLContext:
    """A TLS client context: the broker is verified against ``ca_file`` (else the
    system's CAs); a client certificate is presented when the listener requires one.
    """
    try:
        context = ssl.create_default_context(cafile=ca_file or None)
        if cert_file:
            context.load_cert_chain(cert_file, key_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise BrokerUnavailableError(f"{name}: TLS files: {exc}") from exc
    return context


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    retain: bool = True


class MqttLink:
    """One broker connection. Callbacks run in paho's network thread."""

    def __init__(
        self,
        *,
        name: str,
        host: str,
        port: int,
        client_id: str,
        username: str | None,
        password: str | None,
        tls: bool = False,
        ca_file: str = "",
        cert_file: str = "",
        key_file: str = "",
        will: Will | None = None,
        on_message: Callable[[str, bytes], None],
        on_connect: Callable[[], None],
        on_disconnect: Callable[[], None] = lambda: None,
        on_publish: Callable[[int, int], None] = lambda _mid, _code: None,
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self._on_message = on_message
        self._on_connect_cb = on_connect
        self._on_disconnect_cb = on_disconnect
        self._on_publish_cb = on_publish
        self.connected = threading.Event()
        # Successful connections, and messages whose handling raised.
        self.connects = 0
        self.callback_errors = 0
        self._stopping = False
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if username is not None:
            client.username_pw_set(username, password)
        if tls:
            client.tls_set_context(
                client_ssl_context(name, ca_file=ca_file, cert_file=cert_file, key_file=key_file)
            )
        if will is not None:
            client.will_set(will.topic, will.payload, qos=1, retain=will.retain)
        client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        client.max_queued_messages_set(0)  # unbounded: the caller bounds in-flight batches
        client.max_inflight_messages_set(1000)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        client.on_subscribe = self._handle_subscribe
        self.client = client

    def start(self) -> None:
        """Connect in the background; paho keeps reconnecting until ``stop``."""
        try:
            # Clean start: what was in flight is resent from the outbox anyway.
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.MaximumPacketSize = MAX_PACKET_BYTES
            self.client.connect_async(
                self.host,
                self.port,
                keepalive=KEEPALIVE_S,
                clean_start=True,
                properties=properties,
            )
        except (OSError, ValueError) as exc:
            raise BrokerUnavailableError(f"{self.name}: {self.host}:{self.port}: {exc}") from exc
        self.client.loop_start()

    def stop(self) -> None:
        self._stopping = True
        self.client.disconnect()
        self.client.loop_stop()

    def subscribe(self, topics: list[str], qos: int = 1) -> None:
        """Subscribe to a few filters; not connected is not an error."""
        result, _mid = self.client.subscribe([(t, qos) for t in topics])
        if result not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise BrokerUnavailableError(f"{self.name}: subscribe failed: {result}")

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int:
        """Queue a publish; returns its mid (PUBACK arrives through ``on_publish``)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise BrokerUnavailableError(f"{self.name}: publish failed: {info.rc}")
        return int(info.mid)

    # -- paho callbacks (network thread) ------------------------------------

    def _handle_connect(
        self, _c: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any
    ) -> None:
        if reason.is_failure:
            logger.warning(
                "%s: %s:%d refused the connection: %s", self.name, self.host, self.port, reason
            )
            return
        logger.info("%s: connected to %s:%d", self.name, self.host, self.port)
        self.connects += 1
        self.connected.set()
        self._on_connect_cb()

    def _handle_disconnect(
        self, _c: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any
    ) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        if was and not self._stopping:
            logger.warning("%s: disconnected (%s); reconnecting", self.name, reason)
        self._on_disconnect_cb()

    def _handle_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        # The outermost frame of paho's network thread for every incoming
        # message: an exception escaping here would end that thread (and with
        # it the uplink) for good, so one bad message is logged and skipped.
        try:
            self._on_message(message.topic, bytes(message.payload))
        except Exception:
            self.callback_errors += 1
            logger.exception("%s: message on %s could not be handled", self.name, message.topic)

    def _handle_subscribe(self, _c: mqtt.Client, _u: Any, _mid: int, codes: Any, _p: Any) -> None:
        failed = [c for c in codes if getattr(c, "is_failure", False)]
        if failed:
            logger.warning("%s: subscription refused: %s", self.name, failed)

    def _handle_publish(
        self, _c: mqtt.Client, _u: Any, mid: int, reason: ReasonCode, _p: Any
    ) -> None:
        self._on_publish_cb(mid, int(reason.value))
