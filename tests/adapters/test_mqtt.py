"""adapters.mqtt.MqttLink against a real Mosquitto: reconnects, subscriptions, acks, limits."""

from __future__ import annotations

import logging
import queue
import signal
import socket
import uuid
from dataclasses import dataclass

import pytest

from adapters.mqtt import IncomingMessage, MqttLink
from cityhub.localstack.mosquitto import ADMIN_USER
from cityhub.localstack.procs import stop_process_group
from contracts.errors import BrokerRefusedError, BrokerUnavailableError
from tests.plugins.gateway import client, wait_for

pytestmark = pytest.mark.slow


@dataclass(frozen=True, slots=True)
class Got:
    """A received message as the test keeps it."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    generation: int
    acks_before: int  # acks the test had sent when it arrived


def link_to(server, topic: str, received: queue.Queue[Got], **options) -> MqttLink:
    link: MqttLink
    acks = options.pop("acks", [0])

    def on_message(message: IncomingMessage) -> None:
        received.put(
            Got(
                topic=message.topic,
                payload=bytes(message.payload),
                mid=message.mid,
                qos=message.qos,
                generation=link.generation,
                acks_before=acks[0],
            )
        )

    link = MqttLink(
        name="test",
        host="127.0.0.1",
        port=server.port,
        client_id=f"t-link-{uuid.uuid4().hex[:8]}",
        username=ADMIN_USER,
        password=server.admin_password,
        subscriptions=[topic],
        on_message=on_message,
        **options,
    )
    return link


def test_the_link_reconnects_and_resubscribes_after_the_broker_is_killed(killable_broker):
    topic = f"t{uuid.uuid4().hex[:8]}/x"
    received: queue.Queue[Got] = queue.Queue()
    link = link_to(killable_broker, topic, received, manual_ack=True)
    link.start()
    try:
        wait_for(link.subscribed.is_set, 10, "subscribed")
        pub = client(killable_broker)
        pub.publish(topic, b"before", qos=1).wait_for_publish(10)
        first = received.get(timeout=10)
        assert first.payload == b"before"
        pub.disconnect()
        pub.loop_stop()
        pid = killable_broker.pid()
        assert pid is not None
        stop_process_group(pid, first_signal=signal.SIGKILL, timeout_s=10, what="broker")
        wait_for(lambda: not link.connected.is_set(), 10, "the link saw the broker die")
        assert not link.subscribed.is_set()
        killable_broker.start()
        wait_for(link.subscribed.is_set, 30, "resubscribed after the restart")
        assert link.connects == 2
        # The unacked message belongs to the dead connection: its PUBACK is not
        # sent on the new one, where its message id may mean another message.
        assert link.ack([first]) == 0
        pub = client(killable_broker)
        pub.publish(topic, b"after", qos=1).wait_for_publish(10)
        second = received.get(timeout=10)
        assert (second.payload, second.generation) == (b"after", link.generation)
        assert link.ack([second]) == 1
        pub.disconnect()
        pub.loop_stop()
    finally:
        link.stop()


def test_manual_acks_open_the_receive_maximum_window_one_message_at_a_time(mqtt_server):
    topic = f"t{uuid.uuid4().hex[:8]}/x"
    received: queue.Queue[Got] = queue.Queue()
    acks = [0]
    link = link_to(mqtt_server, topic, received, manual_ack=True, receive_max=1, acks=acks)
    link.start()
    pub = client(mqtt_server)
    try:
        wait_for(link.subscribed.is_set, 10, "subscribed")
        for n in range(3):
            pub.publish(topic, b"m%d" % n, qos=1).wait_for_publish(10)
        for n in range(3):
            got = received.get(timeout=10)
            # Receive Maximum 1: the broker sends the next message only after
            # the PUBACK of the one before, which the link held back.
            assert (got.payload, got.acks_before) == (b"m%d" % n, n)
            acks[0] += 1
            assert link.ack([got]) == 1
    finally:
        pub.disconnect()
        pub.loop_stop()
        link.stop()


def test_a_message_above_the_maximum_packet_size_is_never_delivered(mqtt_server):
    topic = f"t{uuid.uuid4().hex[:8]}/x"
    received: queue.Queue[Got] = queue.Queue()
    link = link_to(mqtt_server, topic, received, max_packet_bytes=1024)
    link.start()
    pub = client(mqtt_server)
    try:
        wait_for(link.subscribed.is_set, 10, "subscribed")
        pub.publish(topic, b"x" * 2048, qos=1).wait_for_publish(10)
        pub.publish(topic, b"sentinel", qos=1).wait_for_publish(10)
        assert received.get(timeout=10).payload == b"sentinel"
        assert received.empty()
        assert link.connects == 1  # discarded by the broker, not a dropped connection
    finally:
        pub.disconnect()
        pub.loop_stop()
        link.stop()


def test_a_failing_message_callback_is_counted_and_the_link_goes_on(mqtt_server):
    topic = f"t{uuid.uuid4().hex[:8]}/x"
    payloads: list[bytes] = []

    def on_message(message: IncomingMessage) -> None:
        if message.payload == b"bad":
            raise ValueError("cannot handle this")
        payloads.append(bytes(message.payload))

    link = MqttLink(
        name="test",
        host="127.0.0.1",
        port=mqtt_server.port,
        username=ADMIN_USER,
        password=mqtt_server.admin_password,
        subscriptions=[topic],
        on_message=on_message,
    )
    link.connect(timeout_s=10)
    pub = client(mqtt_server)
    try:
        pub.publish(topic, b"bad", qos=1).wait_for_publish(10)
        pub.publish(topic, b"good", qos=1).wait_for_publish(10)
        wait_for(lambda: payloads == [b"good"], 10, "the message after the bad one")
        assert link.callback_errors == 1
        assert link.connects == 1
    finally:
        pub.disconnect()
        pub.loop_stop()
        link.stop()


def test_a_refused_connect_is_logged_with_its_reason_and_raised(mqtt_server, caplog):
    caplog.set_level(logging.WARNING, logger="adapters.mqtt")
    link = MqttLink(
        name="test",
        host="127.0.0.1",
        port=mqtt_server.port,
        username=ADMIN_USER,
        password="wrong",
    )
    with pytest.raises(BrokerRefusedError) as refused:
        link.connect(timeout_s=10)
    assert refused.value.reason == "Not authorized"
    assert "wrong" not in str(refused.value)
    lines = [r.getMessage() for r in caplog.records if r.name == "adapters.mqtt"]
    assert lines == [f"test: 127.0.0.1:{mqtt_server.port} refused the connection: Not authorized"]


def test_an_unreachable_broker_is_unavailable():
    link = MqttLink(name="test", host="127.0.0.1", port=1)
    with pytest.raises(
        BrokerUnavailableError, match=r"cannot reach the test broker 127\.0\.0\.1:1"
    ):
        link.connect(timeout_s=2)


def _nodelay(link: MqttLink) -> int:
    sock = link.client.socket()
    assert isinstance(sock, socket.socket)
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_the_link_sends_small_packets_at_once_on_every_connection(killable_broker):
    # Nagle's algorithm held a PUBACK or a command's report up to 40 ms
    # behind the broker's delayed ACK (bench/bench_commands.py).
    topic = f"t{uuid.uuid4().hex[:8]}/x"
    link = link_to(killable_broker, topic, queue.Queue())
    link.start()
    try:
        wait_for(link.subscribed.is_set, 10, "subscribed")
        assert _nodelay(link) != 0
        # A reconnect opens a new socket: it must be set again.
        pid = killable_broker.pid()
        assert pid is not None
        stop_process_group(pid, first_signal=signal.SIGKILL, timeout_s=10, what="broker")
        wait_for(lambda: not link.connected.is_set(), 10, "the link saw the broker die")
        killable_broker.start()
        wait_for(link.subscribed.is_set, 30, "resubscribed after the restart")
        assert link.connects == 2
        assert _nodelay(link) != 0
    finally:
        link.stop()
