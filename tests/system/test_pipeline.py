"""The whole pipeline under faults: devices -> gateway -> central broker -> ingest -> TimescaleDB.

Real parts throughout: a gateway (in a thread) with its SQLite outbox, a
central Mosquitto that the test kills with -9, an ingest worker process that
the test kills with -9, and the private TimescaleDB. The ledger is every
reading the devices published; at the end the readings table must equal it
exactly (no loss, no duplicate), and every gateway outbox must be empty.
"""

from __future__ import annotations

import signal
import time
import uuid

import pytest

from cityhub.localstack.procs import stop_process_group
from contracts.schema import readings_table
from tests.plugins.gateway import (
    broker_settings,
    client,
    gateway_in_thread,
    gateway_settings,
    mqtt_devices,
    publish_config,
    publish_readings,
    wait_for,
)
from tests.plugins.ingest import (
    ingest_settings,
    seed_registry,
    start_ingest_process,
    write_config,
)

pytestmark = pytest.mark.slow


def stored(conn, schema: str) -> list[tuple[str, int, int]]:
    rows = conn.execute(
        f"SELECT device_id, seq, (extract(epoch FROM ts) * 1000)::bigint "
        f"FROM {schema}.{readings_table('kiosk')}"
    ).fetchall()
    return [(d, int(s), int(t)) for d, s, t in rows]


def test_pipeline_survives_ingest_and_broker_kill_9_exactly_once(
    mqtt_server,
    killable_broker,
    db_conn,
    db_url,
    migrated,
    tmp_path,
):
    tag = uuid.uuid4().hex[:6]
    gateway_id, prefix = f"gw-{tag}", f"t{tag}"
    devices = mqtt_devices(prefix, 10)
    seed_registry(db_conn, migrated, {gateway_id: [(d.device_id, "kiosk") for d in devices]})
    central = broker_settings(killable_broker)
    config_pub = client(killable_broker)
    publish_config(config_pub, gateway_id=gateway_id, prefix=prefix, devices=devices, version=1)
    config_pub.disconnect()
    ingest_config = write_config(
        tmp_path / "ingest.toml",
        server=killable_broker,
        db_url=db_url,
        schema=migrated,
        settings=ingest_settings(prefix, max_batches_per_commit=4),
    )
    log = tmp_path / "ingest.log"
    ingest = start_ingest_process(ingest_config, log)
    site_pub = client(mqtt_server)
    try:
        wait_for(lambda: "subscribed to" in log.read_text(), 20, "ingest subscribed")
        with gateway_in_thread(
            settings=gateway_settings(gateway_id, prefix, batch_max_rows=50, ack_timeout_s=2.0),
            central=central,
            site=broker_settings(mqtt_server),
            outbox=tmp_path / "outbox.sqlite3",
        ) as gw:
            wait_for(lambda: len(gw.devices) == 10, 10, "config applied")
            sent = publish_readings(site_pub, prefix=prefix, devices=devices, per_device=40)
            wait_for(lambda: gw.counters.readings_acked > 0, 20, "first acks")

            # 1. Ingest killed with -9 while batches flow, then restarted.
            sent |= publish_readings(
                site_pub, prefix=prefix, devices=devices, per_device=40, start_seq=40
            )
            ingest.send_signal(signal.SIGKILL)
            ingest.wait(10)
            sent |= publish_readings(
                site_pub, prefix=prefix, devices=devices, per_device=40, start_seq=80
            )
            ingest = start_ingest_process(ingest_config, log)

            # 2. The central broker killed with -9 mid-stream, then restarted.
            time.sleep(0.5)
            pid = killable_broker.pid()
            assert pid is not None
            stop_process_group(pid, first_signal=signal.SIGKILL, timeout_s=10, what="broker")
            sent |= publish_readings(
                site_pub, prefix=prefix, devices=devices, per_device=40, start_seq=120
            )
            killable_broker.start()

            wait_for(
                lambda: gw.outbox.depth().readings == 0 and gw.builder.rows == 0,
                90,
                "every outbox batch acked",
            )
            rows = stored(db_conn, migrated)
            assert len(rows) == len(set(rows))  # no duplicates
            assert set(rows) == sent  # no loss
            assert gw.counters.batches_resent > 0  # the faults really hit in-flight batches
    finally:
        if ingest.poll() is None:
            ingest.send_signal(signal.SIGTERM)
            ingest.wait(30)
        site_pub.disconnect()
