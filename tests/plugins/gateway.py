"""Test helpers for the gateway: run it in a thread or a process, play devices and ingest.

Loaded as a pytest plugin (tests/conftest.py): its fixtures (``ids``) reach
every test by name; its helpers are imported by name.

Until ingest exists the tests play its part: ``FakeIngest`` subscribes to the
gateway's batch topic on the real broker, decodes every batch, records the
readings and (when told to) publishes acks, exactly as ingest will.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cityhub.localstack.mosquitto import ADMIN_USER, MosquittoServer
from contracts.messages import (
    Ack,
    DeviceConfig,
    DeviceUplink,
    GatewayConfig,
    GatewayState,
    decode_batch,
    decode_gateway_state,
    encode_ack,
    encode_device_uplink,
    encode_gateway_config,
    payload_digest,
)
from contracts.settings import BrokerSettings, GatewaySettings
from contracts.topics import (
    ack_topic,
    batch_topic,
    config_topic,
    device_uplink_topic,
    state_topic,
)
from gateway.service import Gateway


@pytest.fixture
def ids() -> tuple[str, str]:
    """A gateway id and a topic prefix of this test's own."""
    tag = uuid.uuid4().hex[:6]
    return f"gw-{tag}", f"t{tag}"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def broker_settings(server: MosquittoServer) -> BrokerSettings:
    return BrokerSettings(
        host="127.0.0.1", port=server.port, username=ADMIN_USER, password=server.admin_password
    )


def client(server: MosquittoServer, name: str | None = None) -> mqtt.Client:
    c = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=name or f"t-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv5,
    )
    c.username_pw_set(ADMIN_USER, server.admin_password)
    c.reconnect_delay_set(0.2, 1)  # type: ignore[arg-type]  # paho takes float seconds
    c.connect("127.0.0.1", server.port)
    c.loop_start()
    return c


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


class FakeIngest:
    """Records every reading in every batch; acks when ``acking`` is on."""

    def __init__(self, server: MosquittoServer, *, gateway_id: str, prefix: str) -> None:
        self.gateway_id = gateway_id
        self.prefix = prefix
        self.acking = False
        self.lock = threading.Lock()
        self.readings: set[tuple[str, int, int]] = set()  # (device, seq, ts)
        self.deliveries = 0  # readings received, duplicates included
        self.batch_ids: list[str] = []
        self.values: dict[str, list[dict[str, float | None]]] = {}
        self.subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"ingest-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.username_pw_set(ADMIN_USER, server.admin_password)
        self.client.reconnect_delay_set(0.2, 1)  # type: ignore[arg-type]  # float seconds
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.connect("127.0.0.1", server.port)
        self.client.loop_start()
        assert self.subscribed.wait(10)

    def _on_connect(self, c, _u, _f, _r, _p) -> None:
        c.subscribe(batch_topic(self.gateway_id, self.prefix), qos=1)

    def _on_message(self, c, _u, message) -> None:
        batch = decode_batch(message.payload, now_ms=now_ms())
        with self.lock:
            self.batch_ids.append(batch.batch_id)
            for block in batch.blocks:
                for row in range(block.row_count):
                    device = batch.devices[block.device_index[row]]
                    self.readings.add((device, block.seq[row], block.ts_ms[row]))
                    self.deliveries += 1
                    self.values.setdefault(device, []).append(
                        {name: column[row] for name, column in block.values.items()}
                    )
        if self.acking:
            ack = Ack(
                batch_ids=[batch.batch_id],
                digests=[payload_digest(message.payload)],
                ts_ms=now_ms(),
            )
            c.publish(ack_topic(self.gateway_id, self.prefix), encode_ack(ack), qos=1)

    def count(self) -> int:
        with self.lock:
            return len(self.readings)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def watch_states(c: mqtt.Client, *, gateway_id: str, prefix: str) -> list[GatewayState]:
    """Collect the gateway's state messages as ``c`` receives them (the list fills in place)."""
    states: list[GatewayState] = []

    def on_message(_c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        if message.payload:  # an empty retained message clears the topic
            states.append(decode_gateway_state(bytes(message.payload)))

    c.on_message = on_message
    c.subscribe(state_topic(gateway_id, prefix), qos=1)
    return states


def mqtt_devices(prefix: str, n: int, *, device_type: str = "kiosk") -> list[DeviceConfig]:
    return [
        DeviceConfig(device_id=f"{prefix}-dev-{i:03d}", device_type=device_type, transport="mqtt")
        for i in range(n)
    ]


def publish_config(
    c: mqtt.Client, *, gateway_id: str, prefix: str, devices: list[DeviceConfig], version: int
) -> None:
    config = GatewayConfig(
        gateway_id=gateway_id, version=version, site_id="hk-hall-ubnd", devices=devices
    )
    info = c.publish(
        config_topic(gateway_id, prefix), encode_gateway_config(config), qos=1, retain=True
    )
    info.wait_for_publish(10)


def kiosk_uplink(seq: int, ts_ms: int) -> bytes:
    return encode_device_uplink(
        DeviceUplink(seq=seq, ts_ms=ts_ms, metrics={"queue_length": seq % 50, "uptime": seq})
    )


def publish_readings(
    c: mqtt.Client, *, prefix: str, devices: list[DeviceConfig], per_device: int, start_seq: int = 0
) -> set[tuple[str, int, int]]:
    """Publish ``per_device`` readings for each device at QoS 1; return the ledger."""
    sent: set[tuple[str, int, int]] = set()
    base = now_ms()
    infos = []
    for seq in range(start_seq, start_seq + per_device):
        for device in devices:
            ts = base + seq
            infos.append(
                c.publish(
                    device_uplink_topic(device.device_id, prefix), kiosk_uplink(seq, ts), qos=1
                )
            )
            sent.add((device.device_id, seq, ts))
    for info in infos:
        info.wait_for_publish(30)
    return sent


def gateway_settings(gateway_id: str, prefix: str, **overrides: object) -> GatewaySettings:
    values: dict[str, object] = {
        "gateway_id": gateway_id,
        "site_id": "hk-hall-ubnd",
        "topic_prefix": prefix,
        "batch_max_rows": 100,
        "batch_max_ms": 50,
        "ack_timeout_s": 2.0,
        "device_rate_per_s": 1000.0,
        "device_burst": 1000.0,
        "state_interval_s": 1.0,
    }
    values.update(overrides)
    return GatewaySettings(**values)  # type: ignore[arg-type]


@contextmanager
def service_in_thread(
    run: Callable[[asyncio.Event], Coroutine[Any, Any, None]], *, name: str
) -> Iterator[None]:
    """Run ``run(stop)`` in its own thread and event loop; set ``stop`` and join on exit.

    An exception that ended the service fails the test when the block exits.
    """
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, asyncio.Event] = {}
    errors: list[BaseException] = []

    async def main() -> None:
        holder["stop"] = asyncio.Event()
        ready.set()
        await run(holder["stop"])

    def target() -> None:
        try:
            loop.run_until_complete(main())
        except BaseException as exc:  # noqa: BLE001 - handed to the test, which fails on it
            errors.append(exc)
        finally:
            loop.close()

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield
    finally:
        loop.call_soon_threadsafe(holder["stop"].set)
        thread.join(30)
        assert not thread.is_alive(), f"{name} did not stop"
        assert not errors, errors


@contextmanager
def gateway_in_thread(
    *,
    settings: GatewaySettings,
    central: BrokerSettings,
    site: BrokerSettings,
    outbox: Path,
) -> Iterator[Gateway]:
    """Run a Gateway in its own thread and event loop; stop it cleanly on exit."""
    gateway = Gateway(settings=settings, central=central, site=site, outbox_path=outbox)
    with service_in_thread(gateway.run, name="gateway"):
        wait_for(gateway.central.connected.is_set, 10, "gateway uplink connection")
        wait_for(gateway.site.connected.is_set, 10, "gateway site connection")
        # A reading published before the subscriptions exist has no session to
        # wait in: wait until the broker has granted every configured device's.
        if gateway.router.routes:
            wait_for(gateway.site_ready, 10, "gateway site subscriptions")
        yield gateway
