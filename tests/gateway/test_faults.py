"""Gateway fault tests with real processes: gateway kill -9 with a backlog, broker kill -9."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from cityhub.localstack.mosquitto import ADMIN_USER
from cityhub.localstack.procs import stop_process_group
from contracts.messages import GatewayState, decode_batch
from gateway.outbox import Outbox, OutboxTotals
from tests.plugins.gateway import (
    FakeIngest,
    broker_settings,
    client,
    gateway_in_thread,
    gateway_settings,
    mqtt_devices,
    now_ms,
    publish_config,
    publish_readings,
    wait_for,
    watch_states,
)

pytestmark = pytest.mark.slow


def outbox_readings(path: Path) -> tuple[set[tuple[str, int, int]], set[str]]:
    """Decode every batch stored in an outbox file: its readings and batch ids."""
    readings: set[tuple[str, int, int]] = set()
    ids: set[str] = set()
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT batch_id, payload FROM batches").fetchall()
    for batch_id, payload in rows:
        batch = decode_batch(payload, now_ms=now_ms())
        assert batch.batch_id == batch_id
        ids.add(batch_id)
        for block in batch.blocks:
            for row in range(block.row_count):
                device = batch.devices[block.device_index[row]]
                readings.add((device, block.seq[row], block.ts_ms[row]))
    return readings, ids


def start_gateway_process(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if not k.startswith("CITYHUB_")},
        )


def gateway_config_file(path: Path, server, *, gateway_id: str, prefix: str, **gateway: object):
    """Write a gateway settings file with both brokers on ``server``."""
    broker = (
        f'host = "127.0.0.1"\nport = {server.port}\n'
        f'username = "{ADMIN_USER}"\npassword = "{server.admin_password}"\n'
    )
    extra = "\n".join(f"{key} = {value}" for key, value in gateway.items())
    path.write_text(
        f'[broker]\n{broker}\n[gateway]\ngateway_id = "{gateway_id}"\n'
        f'site_id = "hk-hall-ubnd"\ntopic_prefix = "{prefix}"\n'
        f'outbox_path = "{path.parent / "outbox.sqlite3"}"\n'
        f"device_rate_per_s = 1000.0\ndevice_burst = 1000.0\nstate_interval_s = 0.5\n"
        f"{extra}\n[gateway.site_broker]\n{broker}",
        encoding="utf-8",
    )


def test_gateway_kill_9_with_a_backlog_loses_and_duplicates_nothing(mqtt_server, tmp_path):
    tag = uuid.uuid4().hex[:6]
    gateway_id, prefix = f"gw-{tag}", f"t{tag}"
    outbox = tmp_path / "outbox.sqlite3"
    config = tmp_path / "gateway.toml"
    gateway_config_file(
        config,
        mqtt_server,
        gateway_id=gateway_id,
        prefix=prefix,
        batch_max_rows=100,
        batch_max_ms=50,
        ack_timeout_s=2.0,
    )
    devices = mqtt_devices(prefix, 20)
    ingest = FakeIngest(mqtt_server, gateway_id=gateway_id, prefix=prefix)  # not acking yet
    pub = client(mqtt_server)
    publish_config(pub, gateway_id=gateway_id, prefix=prefix, devices=devices, version=1)
    states = watch_states(pub, gateway_id=gateway_id, prefix=prefix)
    log = tmp_path / "gateway.log"
    proc = start_gateway_process(config, log)
    try:
        wait_for(outbox.exists, 10, "outbox created")
        # Its first run creates the site session: readings published before
        # the subscriptions exist would have no session to wait in.
        wait_for(lambda: any(s.site_ready for s in states), 15, "subscribed at the site")
        sent = publish_readings(pub, prefix=prefix, devices=devices, per_device=100)
        # Every reading has been in a published batch: all are in the outbox.
        wait_for(lambda: ingest.count() == len(sent), 30, "backlog built")
        first_ids = set(ingest.batch_ids)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)

        ledger, stored_ids = outbox_readings(outbox)
        assert ledger == sent  # nothing acked yet: the whole backlog is on disk
        assert stored_ids == first_ids

        ingest.acking = True
        proc = start_gateway_process(config, log)
        wait_for(lambda: not outbox_readings(outbox)[0], 30, "backlog delivered and acked")
        # Resent unchanged: the batch ids after the restart are the stored ones.
        assert set(ingest.batch_ids) == first_ids
        assert ingest.readings == ledger
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        pub.disconnect()
        ingest.close()
    assert proc.returncode == 0, log.read_text()[-2000:]


def test_central_broker_kill_9_mid_stream_loses_nothing(mqtt_server, killable_broker, tmp_path):
    tag = uuid.uuid4().hex[:6]
    gateway_id, prefix = f"gw-{tag}", f"t{tag}"
    devices = mqtt_devices(prefix, 10)
    site_pub = client(mqtt_server)
    central_pub = client(killable_broker)
    publish_config(central_pub, gateway_id=gateway_id, prefix=prefix, devices=devices, version=1)
    ingest = FakeIngest(killable_broker, gateway_id=gateway_id, prefix=prefix)
    ingest.acking = True
    with gateway_in_thread(
        settings=gateway_settings(gateway_id, prefix),
        central=broker_settings(killable_broker),
        site=broker_settings(mqtt_server),
        outbox=tmp_path / "o.sqlite3",
    ) as gw:
        wait_for(lambda: len(gw.devices) == 10, 10, "config applied")
        sent = publish_readings(site_pub, prefix=prefix, devices=devices, per_device=100)
        pid = killable_broker.pid()
        assert pid is not None
        stop_process_group(pid, first_signal=signal.SIGKILL, timeout_s=10, what="broker")
        # Readings keep arriving at the site while the central broker is down.
        sent |= publish_readings(
            site_pub, prefix=prefix, devices=devices, per_device=100, start_seq=100
        )
        wait_for(lambda: gw.builder.rows == 0, 10, "builder flushed to the outbox")
        assert gw.outbox.depth().readings > 0  # the backlog waits in the outbox
        killable_broker.start()
        wait_for(lambda: ingest.count() == len(sent), 60, "everything delivered after restart")
        wait_for(lambda: gw.outbox.depth().readings == 0, 30, "outbox drained")
        assert ingest.readings == sent
    site_pub.disconnect()
    central_pub.disconnect()
    ingest.close()


def test_readings_sent_while_the_gateway_is_down_are_delivered_after_restart(mqtt_server, tmp_path):
    tag = uuid.uuid4().hex[:6]
    gateway_id, prefix = f"gw-{tag}", f"t{tag}"
    devices = mqtt_devices(prefix, 5)
    pub = client(mqtt_server)
    publish_config(pub, gateway_id=gateway_id, prefix=prefix, devices=devices, version=1)
    ingest = FakeIngest(mqtt_server, gateway_id=gateway_id, prefix=prefix)
    ingest.acking = True
    broker = broker_settings(mqtt_server)
    settings = gateway_settings(gateway_id, prefix)
    outbox = tmp_path / "o.sqlite3"
    with gateway_in_thread(settings=settings, central=broker, site=broker, outbox=outbox) as gw:
        wait_for(lambda: len(gw.devices) == 5, 10, "config applied")
        sent = publish_readings(pub, prefix=prefix, devices=devices, per_device=20)
        wait_for(lambda: ingest.count() == len(sent), 10, "first readings")
    # The gateway is away; its persistent session at the site broker queues these.
    sent |= publish_readings(pub, prefix=prefix, devices=devices, per_device=20, start_seq=20)
    with gateway_in_thread(settings=settings, central=broker, site=broker, outbox=outbox) as gw:
        wait_for(lambda: ingest.count() == len(sent), 20, "readings queued while away")
        assert ingest.readings == sent
    pub.disconnect()
    ingest.close()


def test_gateway_kill_9_before_its_outbox_commit_loses_nothing(mqtt_server, tmp_path):
    """Readings received but not yet stored are not acknowledged at the site broker.

    The gateway acknowledges a device message only after the reading is in
    its fsynced outbox. Here the test holds the outbox's write lock, so no
    batch is stored before the kill (a batch is cut as soon as the site reads
    are handled: its commit waits on the lock), every message is still
    unacknowledged in the gateway's persistent site session, and the broker
    delivers it again to the restarted gateway.
    """
    tag = uuid.uuid4().hex[:6]
    gateway_id, prefix = f"gw-{tag}", f"t{tag}"
    holding = tmp_path / "holding.toml"
    gateway_config_file(
        holding,
        mqtt_server,
        gateway_id=gateway_id,
        prefix=prefix,
        batch_max_rows=100_000,
        batch_max_ms=600_000,
        # A batch is also cut when half this many messages await their ack.
        site_receive_maximum=5000,
    )
    normal = tmp_path / "normal.toml"
    gateway_config_file(normal, mqtt_server, gateway_id=gateway_id, prefix=prefix)
    devices = mqtt_devices(prefix, 20)
    ingest = FakeIngest(mqtt_server, gateway_id=gateway_id, prefix=prefix)
    ingest.acking = True
    pub = client(mqtt_server)
    publish_config(pub, gateway_id=gateway_id, prefix=prefix, devices=devices, version=1)
    states = watch_states(pub, gateway_id=gateway_id, prefix=prefix)
    log = tmp_path / "gateway.log"
    proc = start_gateway_process(holding, log)
    try:
        wait_for(lambda: any(s.site_ready for s in states), 15, "subscribed at the site")
        # The gateway's commit waits on this lock (up to SQLite's 5 s busy
        # timeout, then fails without storing anything).
        lock = sqlite3.connect(tmp_path / "outbox.sqlite3", isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        sent = publish_readings(pub, prefix=prefix, devices=devices, per_device=50)
        wait_for(
            lambda: any(s.accepted == len(sent) for s in states), 15, "all received, none stored"
        )
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        lock.rollback()
        lock.close()
        assert outbox_readings(tmp_path / "outbox.sqlite3")[0] == set()
        assert ingest.count() == 0

        proc = start_gateway_process(normal, log)
        wait_for(lambda: ingest.count() == len(sent), 30, "redelivered by the site broker")
        assert ingest.readings == sent
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        pub.disconnect()
        ingest.close()
    assert proc.returncode == 0, log.read_text()[-2000:]


def test_site_broker_kill_9_the_gateway_reconnects_and_resubscribes(
    mqtt_server, killable_broker, tmp_path
):
    tag = uuid.uuid4().hex[:6]
    gateway_id, prefix = f"gw-{tag}", f"t{tag}"
    devices = mqtt_devices(prefix, 10)
    central_pub = client(mqtt_server)
    publish_config(central_pub, gateway_id=gateway_id, prefix=prefix, devices=devices, version=1)
    ingest = FakeIngest(mqtt_server, gateway_id=gateway_id, prefix=prefix)
    ingest.acking = True
    site_pub = client(killable_broker)
    with gateway_in_thread(
        settings=gateway_settings(gateway_id, prefix),
        central=broker_settings(mqtt_server),
        site=broker_settings(killable_broker),
        outbox=tmp_path / "o.sqlite3",
    ) as gw:
        wait_for(lambda: gw.site.subacks > 0, 10, "subscribed at the site")
        sent = publish_readings(site_pub, prefix=prefix, devices=devices, per_device=20)
        wait_for(lambda: ingest.count() == len(sent), 20, "first readings delivered")
        generation, subacks = gw.site.generation, gw.site.subacks
        pid = killable_broker.pid()
        assert pid is not None
        stop_process_group(pid, first_signal=signal.SIGKILL, timeout_s=10, what="broker")
        wait_for(lambda: not gw.site.connected.is_set(), 40, "the loss noticed")
        killable_broker.start()
        # The killed broker lost the session: the gateway must subscribe again.
        wait_for(lambda: gw.site.subacks > subacks, 30, "resubscribed after the restart")
        assert gw.site.generation == generation + 1
        wait_for(site_pub.is_connected, 10, "device client back")
        sent |= publish_readings(
            site_pub, prefix=prefix, devices=devices, per_device=20, start_seq=20
        )
        wait_for(lambda: ingest.count() == len(sent), 20, "readings after the restart")
        assert ingest.readings == sent
    site_pub.disconnect()
    central_pub.disconnect()
    ingest.close()


def test_a_busy_metrics_port_is_a_one_line_error_before_anything_starts(mqtt_server, tmp_path):
    import socket
    import threading

    from contracts.topics import state_topic

    tag = uuid.uuid4().hex[:6]
    gateway_id, prefix = f"gw-{tag}", f"t{tag}"
    pub = client(mqtt_server)
    publish_config(
        pub, gateway_id=gateway_id, prefix=prefix, devices=mqtt_devices(prefix, 1), version=1
    )
    watcher = client(mqtt_server)
    seen: list[str] = []
    sentinel = threading.Event()

    def on_message(_c, _u, message):
        if message.topic == f"{prefix}/sentinel":
            sentinel.set()
        elif message.payload:
            seen.append(message.topic)

    watcher.on_message = on_message
    watcher.subscribe([(state_topic(gateway_id, prefix), 1), (f"{prefix}/sentinel", 1)])
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        config = tmp_path / "gateway.toml"
        gateway_config_file(
            config, mqtt_server, gateway_id=gateway_id, prefix=prefix, metrics_port=port
        )
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "--config", str(config)],
            capture_output=True,
            timeout=60,
            env={k: v for k, v in os.environ.items() if not k.startswith("CITYHUB_")},
            check=False,
        )
    assert done.returncode != 0
    errors = [line for line in done.stderr.decode().splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr.decode()
    assert "gateway.metrics_port" in errors[0]
    assert str(port) in errors[0]
    assert b"Traceback" not in done.stderr
    # Nothing was published: no birth, no Will (a connection that died would send it).
    pub.publish(f"{prefix}/sentinel", b"1", qos=1).wait_for_publish(10)
    assert sentinel.wait(10)
    assert seen == []
    watcher.disconnect()
    pub.disconnect()


def assert_refused_once(gw, states: list[GatewayState]) -> None:
    """One serial reading refused: counted once, in the outbox file and in the states.

    The held batches were put again and again while the outbox was full:
    none of them counts as refused.
    """
    assert gw.counters.outbox_refused_readings == 1
    wait_for(
        lambda: any(s.outbox_refused_readings for s in states[-1:]),
        10,
        "a state carrying the refused reading",
    )
    assert {s.outbox_refused_readings for s in states} <= {0, 1}
    assert gw.outbox.totals() == OutboxTotals(refused_readings=1, dropped_readings=0)


def assert_refused_kept_after_stop(states: list[GatewayState], path: Path) -> None:
    """The offline state carries the total, and the file keeps it for the next boot's states."""
    wait_for(lambda: states[-1].status == "offline", 10, "the offline state")
    assert states[-1].outbox_refused_readings == 1
    box = Outbox(path, max_bytes=1 << 20, full_policy="refuse")
    try:
        assert box.totals() == OutboxTotals(refused_readings=1, dropped_readings=0)
    finally:
        box.close()


def test_a_full_outbox_holds_device_messages_back_and_loses_none(mqtt_server, tmp_path, caplog):
    """Under ``refuse``: central cut off, a small outbox fills, devices keep publishing.

    Every reading the broker acknowledged to a device is stored exactly once
    and acked by ingest after the uplink comes back; the full outbox is logged
    once per episode, not per batch. The one serial reading refused is counted
    once, in the outbox file and in the state messages, and stays counted
    after the gateway stops.
    """
    import logging

    from contracts.messages import DeviceConfig
    from contracts.settings import BrokerSettings
    from tests.plugins.ingest import TcpProxy

    caplog.set_level(logging.INFO, logger="gateway.service")
    tag = uuid.uuid4().hex[:6]
    gateway_id, prefix = f"gw-{tag}", f"t{tag}"
    devices = mqtt_devices(prefix, 3)
    ingest = FakeIngest(mqtt_server, gateway_id=gateway_id, prefix=prefix)
    ingest.acking = True
    pub = client(mqtt_server)
    publish_config(pub, gateway_id=gateway_id, prefix=prefix, devices=devices, version=1)
    watcher = client(mqtt_server)
    states = watch_states(watcher, gateway_id=gateway_id, prefix=prefix)
    proxy = TcpProxy(mqtt_server.port)
    site = broker_settings(mqtt_server)
    central = BrokerSettings(
        host="127.0.0.1", port=proxy.port, username=site.username, password=site.password
    )
    settings = gateway_settings(
        gateway_id,
        prefix,
        outbox_max_bytes=20_000,
        outbox_full_policy="refuse",
        batch_max_rows=50,
        site_receive_maximum=100,
    )
    try:
        with gateway_in_thread(
            settings=settings, central=central, site=site, outbox=tmp_path / "o.sqlite3"
        ) as gw:
            proxy.cut()
            wait_for(lambda: not gw.central.connected.is_set(), 10, "the uplink cut")
            # Every one of these gets its PUBACK from the broker.
            sent = publish_readings(pub, prefix=prefix, devices=devices, per_device=300)

            def full_warnings() -> int:
                return sum("outbox full" in r.getMessage() for r in caplog.records)

            wait_for(
                lambda: full_warnings() == 1 or gw.counters.outbox_refused_readings > 0,
                20,
                "the outbox full",
            )
            assert gw.counters.outbox_refused_readings == 0
            # A serial sensor cannot be held back: its reading is refused and counted.
            sensor = DeviceConfig(
                device_id=f"{prefix}-aq-01",
                device_type="air_quality",
                transport="serial",
                port="/dev/null",
                protocol="pms5003",
            )
            gw.accept_serial_reading(sensor, {"pm25": 12.0})
            assert gw.counters.outbox_refused_readings == 1
            stored = gw.counters.readings_stored
            assert 0 < stored < len(sent)
            assert gw.outbox.depth().bytes <= 20_000
            proxy.restore()
            wait_for(lambda: ingest.count() == len(sent), 60, "every reading at ingest")
            wait_for(lambda: gw.outbox.depth().readings == 0, 30, "the outbox drained")
            assert ingest.readings == sent
            # Each reading went into the outbox exactly once and was acked once.
            assert gw.counters.readings_stored == len(sent)
            assert gw.counters.readings_acked == len(sent)
            assert_refused_once(gw, states)
            # One WARNING per episode, each closed by one INFO.
            marks = [
                "start" if "outbox full" in r.getMessage() else "end"
                for r in caplog.records
                if "outbox full" in r.getMessage() or "room again" in r.getMessage()
            ]
            assert marks[0] == "start"
            assert marks == ["start", "end"] * (len(marks) // 2)
        assert_refused_kept_after_stop(states, tmp_path / "o.sqlite3")
    finally:
        proxy.close()
        pub.disconnect()
        watcher.disconnect()
        ingest.close()
