"""Ingest against hostile and unlucky input, with the real broker and database (issue 11).

Client ids and session takeovers, oversized messages on every topic ingest
subscribes to, acks that name exactly the payload committed, bounded rejects,
and a gateway's death stored at the time it was noticed.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import signal
import time
import uuid
from typing import Any

import msgspec
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
    decode_batch,
    encode_batch,
    encode_gateway_state,
    payload_digest,
)
from contracts.settings import DatabaseSettings
from contracts.topics import batch_topic, state_topic
from gateway.outbox import AckResult, Outbox
from ingest.mqtt import (
    StateSubscriber,
    batch_packet_max_bytes,
    client_id_for,
    state_packet_max_bytes,
)
from ingest.writer import REJECT_RAW_MAX_BYTES
from tests.plugins.gateway import broker_settings, client, now_ms, wait_for
from tests.plugins.ingest import (
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

            def subscribed(log=log) -> bool:
                return "subscribed to" in log.read_text()

            wait_for(subscribed, 20, "worker subscribed")
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
            assert own.startswith("ingest-w0-")
            assert worker.state_subscriber is not None
            assert worker.state_subscriber.client_id != own
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
    subscriber.link._handle_disconnect(subscriber.link.client, None, None, taken_over, None)
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


# --- item 9: an ack removes only the payload that was committed ----------------------


def _held_attempts(gateway) -> int:
    return min(i.attempts for i in gateway.outbox.due(now_ms(), resend_after_ms=0, limit=10))


def _held_batch(gateway) -> tuple[str, bytes]:
    """The oldest held batch (a burst may leave the gateway as several)."""
    item = gateway.outbox.due(now_ms(), resend_after_ms=0, limit=10)[0]
    return item.batch_id, item.payload


@pytest.mark.parametrize("spoof", ["undecodable", "valid-other-content"])
def test_a_spoofed_payload_under_a_held_batch_id_never_removes_the_real_batch(
    spoof, mqtt_server, db_conn, db_url, migrated, tmp_path, caplog
):
    """Real gateway, real ingest: the spoof is stored and acked, the real batch stays and lands."""
    from tests.plugins.gateway import (
        gateway_in_thread,
        gateway_settings,
        mqtt_devices,
        publish_config,
        publish_readings,
    )

    t = tag()
    gw, prefix = f"gw-{t}", f"t{t}"
    devices = mqtt_devices(prefix, 3)
    seed_registry(db_conn, migrated, {gw: [(d.device_id, d.device_type) for d in devices]})
    pub = client(mqtt_server)
    publish_config(pub, gateway_id=gw, prefix=prefix, devices=devices, version=1)
    broker = broker_settings(mqtt_server)
    caplog.set_level(logging.WARNING, logger="gateway")
    # Resent after 8 s: the spoofs are handled long before the real batch comes again.
    settings = gateway_settings(gw, prefix, ack_timeout_s=8.0, batch_max_rows=1000)
    try:
        with gateway_in_thread(
            settings=settings, central=broker, site=broker, outbox=tmp_path / "outbox.sqlite3"
        ) as gateway:
            wait_for(lambda: len(gateway.devices) == 3, 10, "gateway config")
            # No ingest yet: the batch is sent once into the void and held.
            sent = publish_readings(pub, prefix=prefix, devices=devices, per_device=5)
            wait_for(lambda: gateway.outbox.depth().readings == len(sent), 10, "batch held")
            wait_for(
                lambda: all(
                    i.attempts >= 1
                    for i in gateway.outbox.due(now_ms(), resend_after_ms=0, limit=10)
                ),
                10,
                "the batch sent once",
            )
            held_id, held_payload = _held_batch(gateway)
            held = gateway.outbox.depth().batches
            if spoof == "undecodable":
                payload = msgspec.msgpack.encode({"batch_id": held_id, "blocks": "nonsense"})
            else:
                real = decode_batch(held_payload, now_ms=now_ms())
                payload = encode_batch(msgspec.structs.replace(real, sent_ms=real.sent_ms + 1))
            assert payload != held_payload
            with ingest_in_thread(
                settings=ingest_settings(prefix),
                broker=broker,
                database=db(db_url, migrated),
            ) as worker:
                pub.publish(batch_topic(gw, prefix), payload, qos=1)

                def spoof_acked() -> bool:
                    kept = [r for r in caplog.records if "with another payload" in r.getMessage()]
                    return bool(kept) or gateway.outbox.depth().batches == 0

                wait_for(spoof_acked, 10, "the spoof's ack handled by the gateway")
                # The real batches are still held (and, until their resend, not acked).
                assert gateway.outbox.depth().batches == held
                assert _held_batch(gateway)[0] == held_id
                if spoof == "undecodable":
                    assert worker.counters.poison == 1
                else:
                    assert worker.counters.batches == 1
                # Resent unchanged, committed, acked with its own digest: gone.
                wait_for(lambda: gateway.outbox.depth().batches == 0, 30, "the real batch acked")
                wait_for(lambda: gateway.counters.readings_acked == len(sent), 10, "counted")
        stored = db_conn.execute(
            f"SELECT device_id, seq, (extract(epoch FROM ts) * 1000)::bigint "
            f"FROM {migrated}.readings_kiosk"
        ).fetchall()
        assert len(stored) == len(sent)
        assert {(d, int(s), int(ts)) for d, s, ts in stored} == sent
        digests = db_conn.execute(
            f"SELECT digest FROM {migrated}.ingested_batches WHERE batch_id = %s", (held_id,)
        ).fetchall()
        assert payload_digest(held_payload) in {d for (d,) in digests}
    finally:
        pub.disconnect()
        pub.loop_stop()


def test_the_outbox_deletes_only_the_payload_an_ack_names(tmp_path):
    """Spoofed, digest-less, repeated and late acks at the gateway's outbox (no broker)."""
    box = Outbox(tmp_path / "outbox.sqlite3", max_bytes=10**6, full_policy="refuse")
    box.put([("gw-a:b:1", b"real-1", 10), ("gw-a:b:2", b"real-2", 20)], now_ms=0)
    # Spoofed: the held id with another payload's digest. Without digests: an older ingest.
    assert box.ack(["gw-a:b:1"], [payload_digest(b"spoof")]) == AckResult(0, 0, 1)
    assert box.ack(["gw-a:b:1", "gw-a:b:2"], []) == AckResult(0, 0, 2)
    assert box.depth().batches == 2
    # The real digest removes it; repeated in the same ack or again later, nothing more.
    real = payload_digest(b"real-1")
    assert box.ack(["gw-a:b:1", "gw-a:b:1"], [real, real]) == AckResult(1, 10, 0)
    assert box.ack(["gw-a:b:1"], [real]) == AckResult(0, 0, 0)
    # A spoof and the real batch committed in one group: one ack names both.
    box.put([("gw-a:b:3", b"real-3", 30)], now_ms=0)
    both = box.ack(["gw-a:b:3", "gw-a:b:3"], [payload_digest(b"real-3"), real])
    assert both == AckResult(1, 30, 0)
    # A mixed ack: each id on its own digest.
    mixed = box.ack(["gw-a:b:2", "gw-a:b:9"], [payload_digest(b"real-2"), real])
    assert mixed == AckResult(1, 20, 0)
    assert box.depth().batches == 0
    box.close()


# --- item 10: bounded rejects ------------------------------------------------------------


def test_a_large_reject_keeps_its_head_and_its_size_once(mqtt_server, db_conn, db_url, migrated):
    t = tag()
    gw, prefix = f"gw-{t}", f"t{t}"
    devices = devices_of(gw)
    seed_registry(db_conn, migrated, {gw: devices})
    player = GatewayPlayer(mqtt_server, gateway_id=gw, prefix=prefix)
    large = bytes(range(256)) * (3 * 1024 * 1024 // 256)  # 3 MiB, not msgpack of a batch
    small = b"\xc1 not msgpack"
    try:
        with ingest_in_thread(
            settings=ingest_settings(prefix),
            broker=broker_settings(mqtt_server),
            database=db(db_url, migrated),
        ) as worker:
            for payload in (large, large, small):  # the repeat is stored once
                player.publish_raw(payload)
            sentinel = make_batch(gw, 1, devices, rows_per_device=1)
            player.send(sentinel)
            wait_for(lambda: sentinel.batch_id in player.acked, 20, "the sentinel acked")
            wait_for(lambda: worker.counters.received == 4, 10, "all received")
        rows = db_conn.execute(
            f"SELECT raw, raw_bytes FROM {migrated}.rejects WHERE gateway_id = %s "
            "ORDER BY raw_bytes",
            (gw,),
        ).fetchall()
        assert [(bytes(raw), size) for raw, size in rows] == [
            (small, len(small)),
            (large[:REJECT_RAW_MAX_BYTES], len(large)),
        ]
    finally:
        player.close()


# --- item 8: a gateway's death at the time it was noticed --------------------------------


def test_a_gateway_killed_with_9_is_stored_dead_at_the_time_it_was_noticed(
    mqtt_server, db_conn, db_url, migrated, tmp_path
):
    """A real `python -m gateway`, killed with -9 after a while: its Will is timed at receipt.

    A later worker receives the retained Will again: the stored death keeps its time
    and its one history row.
    """
    from tests.gateway.test_faults import gateway_config_file, start_gateway_process
    from tests.ingest.test_ingest import history, latest_state
    from tests.plugins.gateway import mqtt_devices, publish_config

    t = tag()
    gw, prefix = f"gw-{t}", f"t{t}"
    devices = mqtt_devices(prefix, 2)
    seed_registry(db_conn, migrated, {gw: [(d.device_id, d.device_type) for d in devices]})
    config = tmp_path / "gateway.toml"
    gateway_config_file(config, mqtt_server, gateway_id=gw, prefix=prefix)
    pub = client(mqtt_server)
    publish_config(pub, gateway_id=gw, prefix=prefix, devices=devices, version=1)
    settings = ingest_settings(prefix)
    try:
        with ingest_in_thread(
            settings=settings, broker=broker_settings(mqtt_server), database=db(db_url, migrated)
        ):
            proc = start_gateway_process(config, tmp_path / "gateway.log")
            try:
                # Running a while: several states (every 0.5 s) after the connect.
                wait_for(
                    lambda: len(history(db_conn, migrated, gw)) >= 5, 30, "the gateway ran a while"
                )
                connected_ms = history(db_conn, migrated, gw)[0][0]
                killed_ms = now_ms()
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
            wait_for(
                lambda: latest_state(db_conn, migrated, gw)["status"] == "offline",
                20,
                "the death stored",
            )
        dead = latest_state(db_conn, migrated, gw)
        assert connected_ms < killed_ms <= dead["ts_ms"]
        assert dead["site_ready"] is False
        deaths = [r for r in history(db_conn, migrated, gw) if r[1] == "offline"]
        assert [r[0] for r in deaths] == [dead["ts_ms"]]

        # A restart: the retained Will comes again, and changes nothing.
        with ingest_in_thread(
            settings=settings, broker=broker_settings(mqtt_server), database=db(db_url, migrated)
        ) as later:
            wait_for(lambda: later.counters.states >= 1, 20, "the retained Will received")
        assert latest_state(db_conn, migrated, gw) == dead
        assert [r for r in history(db_conn, migrated, gw) if r[1] == "offline"] == deaths
    finally:
        pub.disconnect()
        pub.loop_stop()


def test_wills_late_repeated_and_stale_keep_the_first_noticed_death(
    mqtt_server, db_conn, db_url, migrated
):
    from tests.ingest.test_ingest import history, latest_state

    t = tag()
    gw, prefix = f"gw-{t}", f"t{t}"
    pub = client(mqtt_server)
    connect_ms = now_ms() - 60_000

    def state(**fields) -> bytes:
        values = {
            "gateway_id": gw,
            "status": "online",
            "birth": 2,
            "boot_id": "boot-b",
            "version": "1.0",
            "outbox_depth": 5,
            "ts_ms": connect_ms + 10_000,
        }
        return encode_gateway_state(GatewayState(**{**values, **fields}))

    will = {"status": "offline", "will": True, "ts_ms": connect_ms, "outbox_depth": 0}
    try:
        with ingest_in_thread(
            settings=ingest_settings(prefix),
            broker=broker_settings(mqtt_server),
            database=db(db_url, migrated),
        ) as worker:

            def send(payload: bytes, expected: int) -> Any:  # a row as latest_state returns it
                pub.publish(state_topic(gw, prefix), payload, qos=1)
                wait_for(lambda: worker.counters.states == expected, 10, f"state {expected}")
                return latest_state(db_conn, migrated, gw)

            alive = send(state(), 1)
            # The previous session's Will, late: nothing changes.
            assert send(state(birth=1, boot_id="boot-a", **will), 2) == alive
            before_ms = now_ms()
            dead = send(state(**will), 3)
            assert dead["status"] == "offline"
            assert dead["ts_ms"] >= before_ms  # noticed now, not at the connect
            assert dead["outbox_depth"] == 5  # the newest state's figures
            # A spoofed or stale non-Will state of the same session, older: nothing changes.
            assert send(state(ts_ms=connect_ms + 5_000), 4) == dead
        # A new worker gets the retained copy of the Will: the death does not move.
        pub.publish(state_topic(gw, prefix), state(**will), qos=1, retain=True).wait_for_publish(5)
        with ingest_in_thread(
            settings=ingest_settings(prefix),
            broker=broker_settings(mqtt_server),
            database=db(db_url, migrated),
        ) as later:
            wait_for(lambda: later.counters.states == 1, 10, "the retained Will")
        assert latest_state(db_conn, migrated, gw) == dead
        offline = [r for r in history(db_conn, migrated, gw) if r[1] == "offline"]
        assert [r[0] for r in offline] == [dead["ts_ms"]]
    finally:
        pub.publish(state_topic(gw, prefix), b"", qos=1, retain=True).wait_for_publish(5)
        pub.disconnect()
        pub.loop_stop()


# --- a busy metrics port ------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_a_busy_metrics_port_is_a_one_line_error_before_any_connection(
    mqtt_server, db_url, migrated, tmp_path, workers
):
    import socket
    import subprocess
    import sys

    from tests.plugins.ingest import TcpProxy

    proxy = TcpProxy(mqtt_server.port)
    config = tmp_path / "ingest.toml"
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        write_config(
            config,
            server=mqtt_server,
            db_url=db_url,
            schema=migrated,
            settings=ingest_settings(f"t{tag()}", metrics_port=port),
        )
        text = config.read_text().replace(f"port = {mqtt_server.port}", f"port = {proxy.port}")
        config.write_text(text)
        done = subprocess.run(
            [sys.executable, "-m", "ingest", "--config", str(config), "--workers", str(workers)],
            capture_output=True,
            timeout=60,
            env={k: v for k, v in os.environ.items() if not k.startswith("CITYHUB_")},
            check=False,
        )
    stderr = done.stderr.decode()
    assert done.returncode != 0, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert "ingest.metrics_port" in errors[0]
    assert f"127.0.0.1:{port}" in errors[0]
    assert "Traceback" not in stderr
    # Not one connection reached the broker.
    assert proxy.accepted == 0
    proxy.close()


def test_workers_serve_metrics_on_the_configured_host_and_not_on_loopback(
    mqtt_server, db_url, migrated, tmp_path, other_address
):
    import urllib.error

    first = free_port()
    config = write_config(
        tmp_path / "ingest.toml",
        server=mqtt_server,
        db_url=db_url,
        schema=migrated,
        settings=ingest_settings(f"t{tag()}", metrics_host=other_address, metrics_port=first),
    )
    log = tmp_path / "ingest.log"
    proc = start_ingest_process(config, log, "--workers", "2")
    try:
        for index in (0, 1):
            port = first + index
            wait_for(
                functools.partial(_answers, other_address, port), 30, f"worker {index} /metrics"
            )
            assert f'cityhub_ingest_received_total{{worker="{_worker(index)}"}}' in scrape(
                port, host=other_address
            )
            with pytest.raises(urllib.error.URLError) as refused:
                scrape(port)
            assert isinstance(refused.value.reason, ConnectionRefusedError)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0, log.read_text()[-3000:]


def _worker(index: int) -> str:
    from ingest.workers import worker_id_for

    return worker_id_for(index)


def _answers(host: str, port: int) -> bool:
    try:
        scrape(port, host=host)
    except OSError:
        return False
    return True
