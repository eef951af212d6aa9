"""Ingest against hostile and unlucky input, with the real broker and database (issue 11).

Client ids and session takeovers, oversized messages on every topic ingest
subscribes to, acks that name exactly the payload committed, bounded rejects,
and a gateway's death stored at the time it was noticed.
"""

from __future__ import annotations

import logging
import os
import queue
import time
import uuid

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from cityhub.localstack.mosquitto import ADMIN_USER
from cityhub.localstack.procs import free_port
from contracts.catalog import DEVICE_TYPES
from contracts.messages import (
    BATCH_MAX_BYTES,
    CONTROL_MAX_BYTES,
    GatewayState,
    encode_gateway_state,
)
from contracts.settings import DatabaseSettings
from contracts.topics import batch_topic, state_topic
from ingest.mqtt import (
    StateSubscriber,
    batch_packet_max_bytes,
    client_id_for,
    state_packet_max_bytes,
)
from tests.gatewayharness import broker_settings, client, now_ms, wait_for
from tests.ingestharness import (
    GatewayPlayer,
    Ledger,
    assert_table_equals_ledger,
    ingest_in_thread,
    ingest_settings,
    make_batch,
    scrape,
    seed_registry,
    start_ingest_process,
    write_config,
)

pytestmark = pytest.mark.slow


def tag() -> str:
    return uuid.uuid4().hex[:6]


def devices_of(gateway_id: str) -> list[tuple[str, str]]:
    return [(f"{gateway_id}-{t.replace('_', '')}", t) for t in DEVICE_TYPES]


def db(db_url: str, schema: str) -> DatabaseSettings:
    return DatabaseSettings(url=db_url, schema=schema)


def counter(scraped: dict[str, float], name: str) -> float:
    return sum(v for k, v in scraped.items() if k.startswith(f"cityhub_ingest_{name}{{"))


# --- item 6: client ids and takeovers ---------------------------------------------------


def test_two_ingest_processes_on_one_host_share_the_stream_without_takeovers(
    mqtt_server, db_conn, db_url, migrated, tmp_path
):
    t = tag()
    gw, prefix = f"gw-{t}", f"t{t}"
    devices = devices_of(gw)
    seed_registry(db_conn, migrated, {gw: devices})
    ports = [free_port(), free_port()]
    procs, logs = [], []
    player = GatewayPlayer(mqtt_server, gateway_id=gw, prefix=prefix)
    try:
        for index, port in enumerate(ports):
            config = write_config(
                tmp_path / f"ingest-{index}.toml",
                server=mqtt_server,
                db_url=db_url,
                schema=migrated,
                settings=ingest_settings(prefix, metrics_port=port, max_batches_per_commit=1),
            )
            logs.append(tmp_path / f"ingest-{index}.log")
            procs.append(start_ingest_process(config, logs[-1]))
        for log in logs:
            wait_for(lambda log=log: "subscribed to" in log.read_text(), 20, "worker subscribed")
        ledger = Ledger()
        batches = [
            make_batch(gw, n, devices, rows_per_device=2, start_seq=2 * n, ledger=ledger)
            for n in range(40)
        ]
        for batch in batches:
            player.send(batch)
            time.sleep(0.02)  # spread over a second: both connections have time to be kicked
        wait_for(lambda: player.pending() == 0, 30, "every batch acked")
        received = [counter(scrape(port), "received_total") for port in ports]
        assert all(r > 0 for r in received), f"one process got nothing: {received}"
        assert_table_equals_ledger(db_conn, migrated, ledger)
        texts = [log.read_text() for log in logs]
        for text in texts:
            assert "taken over" not in text.lower(), text[-2000:]
            assert text.count("connected to broker") == 1, text[-2000:]
    finally:
        player.close()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(20)


def test_a_takeover_is_logged_once_naming_the_client_id(
    mqtt_server, db_conn, db_url, migrated, caplog
):
    """A client with the worker's id kicks it off: one line naming the id, then it goes on.

    Mosquitto 2.0.11 closes the taken-over connection without a DISCONNECT
    packet (no reason code reaches the client), so the line is the
    lost-connection one; a broker that sends 0x8E gets the takeover line
    (the next test).
    """
    t = tag()
    gw, prefix = f"gw-{t}", f"t{t}"
    devices = devices_of(gw)
    seed_registry(db_conn, migrated, {gw: devices})
    player = GatewayPlayer(mqtt_server, gateway_id=gw, prefix=prefix)
    caplog.set_level(logging.INFO, logger="ingest")
    try:
        with ingest_in_thread(
            settings=ingest_settings(prefix),
            broker=broker_settings(mqtt_server),
            database=db(db_url, migrated),
        ) as worker:
            own = worker.subscriber.client_id
            assert own.startswith("ingest-w0-")
            assert worker.state_subscriber is not None
            assert worker.state_subscriber.client_id != own
            # An intruder with the worker's client id, which waits long before retrying.
            intruder = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=own, protocol=mqtt.MQTTv5)
            intruder.username_pw_set(ADMIN_USER, mqtt_server.admin_password)
            intruder.reconnect_delay_set(120, 120)
            intruder.connect("127.0.0.1", mqtt_server.port)
            intruder.loop_start()
            try:
                wait_for(lambda: worker.subscriber.connects >= 2, 10, "the worker reconnected")
                wait_for(worker.subscriber.subscribed.is_set, 10, "resubscribed")
                batch = make_batch(gw, 1, devices, rows_per_device=2)
                player.send(batch)
                wait_for(lambda: batch.batch_id in player.acked, 10, "a batch after the takeover")
            finally:
                intruder.disconnect()
                intruder.loop_stop()
            lines = [
                r.getMessage()
                for r in caplog.records
                if r.levelno >= logging.WARNING and own in r.getMessage()
            ]
            assert len(lines) == 1, lines
            assert worker.subscriber.connects == 2
    finally:
        player.close()


def test_a_disconnect_with_reason_session_taken_over_is_logged_as_exactly_that(caplog):
    """The MQTT v5 reason 0x8E, as a broker that sends it delivers it to paho's callback."""
    subscriber = StateSubscriber(
        host="127.0.0.1",
        port=1,
        client_id=client_id_for("w7", "states"),
        username=None,
        password=None,
        topic_filter="hub/v1/gw/+/state",
        messages=queue.Queue(),
    )
    subscriber.connected.set()
    caplog.set_level(logging.INFO, logger="ingest")
    taken_over = ReasonCode(PacketTypes.DISCONNECT, identifier=0x8E)
    subscriber._handle_disconnect(subscriber.client, None, None, taken_over, None)
    lines = [r.getMessage() for r in caplog.records]
    expected = (
        f"session taken over: the broker closed connection {subscriber.client_id!r} because "
        "another client connected with the same client id; reconnecting"
    )
    assert lines == [expected]
    assert subscriber.takeovers == 1


def test_client_ids_differ_per_process_worker_and_connection():
    ids = {client_id_for("host-0"), client_id_for("host-0"), client_id_for("host-0", "states")}
    assert len(ids) == 3
    assert all(i.startswith("ingest-host-0-") for i in ids)
    assert all(str(os.getpid()) in i for i in ids)


# --- item 1: oversized messages on ingest's subscriptions -------------------------------


def test_oversized_batches_and_states_are_discarded_or_refused_and_the_stream_goes_on(
    mqtt_server, db_conn, db_url, migrated
):
    t = tag()
    gw, prefix = f"gw-{t}", f"t{t}"
    devices = devices_of(gw)
    seed_registry(db_conn, migrated, {gw: devices})
    player = GatewayPlayer(mqtt_server, gateway_id=gw, prefix=prefix)
    pub = client(mqtt_server)
    try:
        with ingest_in_thread(
            settings=ingest_settings(prefix),
            broker=broker_settings(mqtt_server),
            database=db(db_url, migrated),
        ) as worker:
            # Above the announced Maximum Packet Size: the broker discards them.
            pub.publish(batch_topic(gw, prefix), b"\x92" * batch_packet_max_bytes(), qos=1)
            pub.publish(state_topic(gw, prefix), b"{" * state_packet_max_bytes(), qos=1)
            # Under it but above the decoders' limits: refused, counted, acked.
            pub.publish(batch_topic(gw, prefix), b"\x92" * (BATCH_MAX_BYTES + 1), qos=1)
            pub.publish(state_topic(gw, prefix), b"{" * (CONTROL_MAX_BYTES + 1), qos=1)
            # Then the normal stream.
            ledger = Ledger()
            batches = [
                make_batch(gw, n, devices, rows_per_device=3, start_seq=3 * n, ledger=ledger)
                for n in range(5)
            ]
            for batch in batches:
                player.send(batch)
            state = GatewayState(
                gateway_id=gw,
                status="online",
                birth=1,
                boot_id="b1",
                version="1.0",
                outbox_depth=0,
                ts_ms=now_ms(),
            )
            pub.publish(state_topic(gw, prefix), encode_gateway_state(state), qos=1)
            wait_for(lambda: player.pending() == 0, 20, "the normal batches acked")
            wait_for(lambda: worker.counters.states == 1, 20, "the normal state stored")
            c = worker.counters
            assert c.received == 5 + 1  # the discarded one never arrived
            assert c.poison == 1
            assert c.states_rejected == 1
            assert c.rejects["too_large"] == 2
            # Every batch message that arrived was PUBACKed.
            wait_for(lambda: c.mqtt_acks == c.received, 10, "every delivery acked")
        assert_table_equals_ledger(db_conn, migrated, ledger)
    finally:
        pub.disconnect()
        pub.loop_stop()
        player.close()
