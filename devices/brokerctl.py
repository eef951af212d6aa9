"""Adapter for a broker's dynamic-security control API, over MQTT v5 with paho.

``BrokerControl`` connects with an account allowed to use
``$CONTROL/dynamic-security/v1`` (the embedded broker's admin), sends the
commands that ``devices.dynsec`` builds, waits for the broker's response and
raises BrokerControlError if any command failed. It also publishes the
retained gateway configs. An unreachable broker, or one that does not answer
in time, is BrokerUnavailableError; a refused control account is
BrokerControlError.
"""

from __future__ import annotations

import logging
import queue
import secrets
import ssl
import threading
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from contracts.errors import BrokerControlError, BrokerUnavailableError
from contracts.settings import BrokerSettings
from devices.dynsec import (
    CONTROL_TOPIC,
    RESPONSE_TOPIC,
    Command,
    check_responses,
    decode_responses,
    encode_commands,
)

logger = logging.getLogger(__name__)


def tls_context(settings: BrokerSettings) -> ssl.SSLContext:
    """Verify the broker against ``ca_file`` (else the system's CAs); present a client cert."""
    try:
        context = ssl.create_default_context(cafile=settings.ca_file or None)
        if settings.cert_file:
            context.load_cert_chain(settings.cert_file, settings.key_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise BrokerControlError(f"TLS files for {settings.host}: {exc}") from exc
    return context


class BrokerControl:
    """One control connection; use as a context manager."""

    def __init__(self, *, name: str, broker: BrokerSettings, timeout_s: float = 10.0) -> None:
        self.name = name
        self.broker = broker
        self.host = broker.host or "127.0.0.1"
        self.timeout_s = timeout_s
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._connect_reason: ReasonCode | None = None
        self._responses: queue.Queue[bytes] = queue.Queue()
        self._lock = threading.Lock()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"cityhub-ctl-{secrets.token_hex(4)}",
            protocol=mqtt.MQTTv5,
        )
        if broker.username is not None:
            client.username_pw_set(broker.username, broker.password)
        if broker.tls:
            client.tls_set_context(tls_context(broker))
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self.client = client

    def __repr__(self) -> str:
        return f"BrokerControl({self.name} {self.host}:{self.broker.port})"

    # -- connection ---------------------------------------------------------------

    def __enter__(self) -> BrokerControl:
        where = f"{self.name} broker {self.host}:{self.broker.port}"
        try:
            self.client.connect(self.host, self.broker.port, keepalive=30)
        except (OSError, ssl.SSLError) as exc:
            raise BrokerUnavailableError(f"cannot reach the {where}: {exc}") from exc
        self.client.loop_start()
        try:
            self._await_ready(where)
        except BaseException:
            self.close()
            raise
        return self

    def _await_ready(self, where: str) -> None:
        if not self._connected.wait(self.timeout_s):
            raise BrokerUnavailableError(f"the {where} did not accept the connection in time")
        if self._connect_reason is not None and self._connect_reason.is_failure:
            raise BrokerControlError(
                f"the {where} refused the control account"
                f" {self.broker.username!r}: {self._connect_reason}"
            )
        self.client.subscribe(RESPONSE_TOPIC, qos=1)
        if not self._subscribed.wait(self.timeout_s):
            raise BrokerUnavailableError(f"the {where} did not confirm the subscription")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    # -- paho callbacks (network thread) -------------------------------------------

    def _on_connect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        self._connect_reason = reason
        if reason.is_failure:
            # Stop paho from retrying a refused account; __enter__ reports it.
            self.client.disconnect()
            self._connected.set()
            return
        self._connected.set()

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, _mid: int, codes: Any, _p: Any) -> None:
        if not any(getattr(c, "is_failure", False) for c in codes):
            self._subscribed.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic == RESPONSE_TOPIC:
            self._responses.put(bytes(message.payload))

    # -- commands ---------------------------------------------------------------

    def _check_connected(self) -> None:
        if self._connect_reason is not None and self._connect_reason.is_failure:
            raise BrokerControlError(
                f"the {self.name} broker refused the control account"
                f" {self.broker.username!r}: {self._connect_reason}"
            )

    def run(
        self, commands: list[Command], *, tolerated: frozenset[str] = frozenset()
    ) -> list[dict[str, Any] | None]:
        """Send ``commands`` in one control message; raise if any failed (but ``tolerated``)."""
        if not commands:
            return []
        self._check_connected()
        with self._lock:
            while not self._responses.empty():
                self._responses.get_nowait()
            info = self.client.publish(CONTROL_TOPIC, encode_commands(commands), qos=1)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise BrokerUnavailableError(f"{self.name} broker: publish failed: {info.rc}")
            try:
                payload = self._responses.get(timeout=self.timeout_s)
            except queue.Empty:
                raise BrokerUnavailableError(
                    f"the {self.name} broker did not answer the control command in"
                    f" {self.timeout_s:g} s (is its dynamic-security plugin loaded?)"
                ) from None
        names = ", ".join(str(c["command"]) for c in commands)
        logger.debug("%s broker: %s", self.name, names)
        return check_responses(commands, decode_responses(payload), tolerated=tolerated)

    def publish_retained(self, topic: str, payload: bytes) -> None:
        """Publish a retained QoS 1 message and wait for the broker's PUBACK."""
        self._check_connected()
        info = self.client.publish(topic, payload, qos=1, retain=True)
        try:
            info.wait_for_publish(self.timeout_s)
        except (RuntimeError, ValueError) as exc:
            raise BrokerUnavailableError(f"{self.name} broker: publish to {topic}: {exc}") from exc
        if not info.is_published():
            raise BrokerUnavailableError(f"{self.name} broker did not acknowledge {topic}")
