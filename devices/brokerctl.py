"""Dynamic-security control of a broker, over an ``adapters.mqtt`` link.

``BrokerControl`` connects with an account allowed to use
``$CONTROL/dynamic-security/v1`` (the embedded broker's admin), sends the
commands that ``devices.dynsec`` builds, waits for the broker's response and
raises BrokerControlError if any command failed. It also publishes the
retained gateway configs. An unreachable broker, or one that does not answer
in time, is BrokerUnavailableError; a refused control account is
BrokerControlError. The connection itself is the link's business.
"""

from __future__ import annotations

import logging
import queue
import threading
from types import TracebackType
from typing import Any

from adapters.mqtt import IncomingMessage, MqttLink, unique_client_id
from contracts.errors import BrokerControlError, BrokerRefusedError, BrokerUnavailableError
from contracts.settings import BrokerSettings
from devices.dynsec import (
    CONTROL_TOPIC,
    RESPONSE_TOPIC,
    Account,
    Command,
    check_responses,
    decode_responses,
    disable_account,
    enable_account,
    encode_commands,
    get_account,
)

logger = logging.getLogger(__name__)


class BrokerControl:
    """One control connection; use as a context manager."""

    def __init__(self, *, name: str, broker: BrokerSettings, timeout_s: float = 10.0) -> None:
        self.name = name
        self.broker = broker
        self.host = broker.host or "127.0.0.1"
        self.timeout_s = timeout_s
        self._refused: BrokerRefusedError | None = None
        self._responses: queue.Queue[bytes] = queue.Queue()
        self._lock = threading.Lock()
        self.link = MqttLink(
            name=name,
            host=self.host,
            port=broker.port,
            client_id=unique_client_id("cityhub-ctl"),
            username=broker.username,
            password=broker.password,
            tls=broker.tls,
            ca_file=broker.ca_file,
            cert_file=broker.cert_file,
            key_file=broker.key_file,
            subscriptions=[RESPONSE_TOPIC],
            on_message=self._on_message,
        )

    def __repr__(self) -> str:
        return f"BrokerControl({self.name} {self.host}:{self.broker.port})"

    # -- connection ---------------------------------------------------------------

    def __enter__(self) -> BrokerControl:
        try:
            self.link.connect(timeout_s=self.timeout_s)
        except BrokerRefusedError as exc:
            self._refused = exc
            raise self._refusal() from exc
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self.link.stop()

    def _refusal(self) -> BrokerControlError:
        refused = self._refused
        reason = refused.reason if refused is not None else "not connected"
        return BrokerControlError(
            f"the {self.name} broker {self.host}:{self.broker.port} refused the control account"
            f" {self.broker.username!r}: {reason}"
        )

    # -- link callback (network thread) ---------------------------------------------

    def _on_message(self, message: IncomingMessage) -> None:
        if message.topic == RESPONSE_TOPIC:
            self._responses.put(bytes(message.payload))

    # -- commands ---------------------------------------------------------------

    def _check_connected(self) -> None:
        if self._refused is not None:
            raise self._refusal()

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
            if not self.link.connected.is_set():
                raise BrokerUnavailableError(f"{self.name} broker: not connected")
            self.link.publish(CONTROL_TOPIC, encode_commands(commands))
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
        self.link.publish_confirmed(topic, payload, timeout_s=self.timeout_s, retain=True)

    def cut_sessions(self, account: Account) -> bool:
        """Disconnect ``account``'s live sessions, leaving it enabled; False if it doesn't exist.

        The dynamic-security plugin has no "kick" command: disabling an
        account disconnects its clients, enabling it again lets a client with
        valid credentials (and, on a TLS listener, a certificate that passes
        the CRL) back in. An account that was disabled stays disabled. Other
        accounts' sessions are untouched.
        """
        data = self.run(get_account(account), tolerated=frozenset({"Client not found"}))[0]
        if data is None:
            return False
        client = data.get("client", {})
        if client.get("disabled"):
            return True
        self.run([*disable_account(account), *enable_account(account)])
        return True
