"""The whole pipeline while its database is stopped for 30 s, or hung (SIGSTOP) for 30 s.

A PostgreSQL server of this test's own (the session server stays up for the
others) under a real gateway and a real ingest process. During the outage no
batch may be acked (the gateway keeps everything in its outbox); afterwards
the readings table must equal the ledger exactly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from cityhub import database
from cityhub.localstack.postgres import PostgresServer
from cityhub.localstack.procs import free_port, run_as_for
from contracts.schema import readings_table
from contracts.settings import StorageSettings
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
from tests.plugins.ingest import ingest_settings, seed_registry, start_ingest_process, write_config
from tests.plugins.servers import IS_ROOT

pytestmark = pytest.mark.slow

OUTAGE_S = 30  # the figure for both the stopped and the hung database
SCHEMA = "cityhub"


def signal_server(postmaster: int, sig: signal.Signals) -> list[int]:
    """Signal the postmaster and every process it forked.

    Backends call setsid(), so the postmaster's process group is not enough.
    """
    pids = [postmaster]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
            except OSError:
                continue
            if int(fields[1]) == postmaster:
                pids.append(int(entry.name))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # a backend that just exited
            os.kill(pid, sig)
    return pids


@pytest.fixture
def own_pg(servers_dir: Path, pg_bindir: Path) -> Iterator[PostgresServer]:
    server = PostgresServer(
        base_dir=servers_dir / f"postgres-own-{uuid.uuid4().hex[:6]}",
        port=free_port(),
        bindir=pg_bindir,
        run_as=run_as_for("postgres", is_root=IS_ROOT),
        password_file=servers_dir / "postgres-own.password",
        durable=False,
    )
    server.start()
    with psycopg.connect(server.url(), autocommit=True) as conn:
        database.migrate(conn, schema=SCHEMA, storage=StorageSettings())
    yield server
    pid = server.pid()
    if pid is not None:
        signal_server(pid, signal.SIGCONT)
    server.stop()


@pytest.mark.parametrize("outage", ["stopped", "hung"])
def test_database_outage_acks_nothing_and_loses_nothing(outage, mqtt_server, own_pg, tmp_path):
    tag = uuid.uuid4().hex[:6]
    gateway_id, prefix = f"gw-{tag}", f"t{tag}"
    devices = mqtt_devices(prefix, 5)
    with psycopg.connect(own_pg.url(), autocommit=True) as conn:
        seed_registry(conn, SCHEMA, {gateway_id: [(d.device_id, "kiosk") for d in devices]})
    pub = client(mqtt_server)
    publish_config(pub, gateway_id=gateway_id, prefix=prefix, devices=devices, version=1)
    config = write_config(
        tmp_path / "ingest.toml",
        server=mqtt_server,
        db_url=own_pg.url(),
        schema=SCHEMA,
        # A hung call is cut after 5 s and retried, instead of the default 30.
        settings=ingest_settings(prefix, commit_timeout_s=5.0, retry_max_s=3.0),
    )
    log = tmp_path / "ingest.log"
    ingest = start_ingest_process(config, log)
    try:
        wait_for(lambda: "subscribed to" in log.read_text(), 20, "ingest subscribed")
        with gateway_in_thread(
            settings=gateway_settings(gateway_id, prefix, batch_max_rows=20, ack_timeout_s=3.0),
            central=broker_settings(mqtt_server),
            site=broker_settings(mqtt_server),
            outbox=tmp_path / "outbox.sqlite3",
        ) as gw:
            wait_for(lambda: len(gw.devices) == 5, 10, "config applied")
            sent = publish_readings(pub, prefix=prefix, devices=devices, per_device=20)
            wait_for(lambda: gw.counters.readings_acked == len(sent), 20, "first readings acked")

            pid = own_pg.pid()
            assert pid is not None
            if outage == "stopped":
                own_pg.stop()
            else:
                hung = signal_server(pid, signal.SIGSTOP)
                assert len(hung) > 1  # the postmaster and its backends
            acked_before = gw.counters.readings_acked
            for round_ in range(OUTAGE_S // 5):
                sent |= publish_readings(
                    pub, prefix=prefix, devices=devices, per_device=5, start_seq=20 + 5 * round_
                )
                time.sleep(5)
            assert gw.counters.readings_acked == acked_before  # nothing acked meanwhile
            assert gw.outbox.depth().readings == len(sent) - acked_before
            assert ingest.poll() is None  # the worker rode the outage out
            if outage == "stopped":
                own_pg.start()
            else:
                signal_server(pid, signal.SIGCONT)

            wait_for(lambda: gw.outbox.depth().readings == 0, 90, "backlog acked")
        with psycopg.connect(own_pg.url()) as conn:
            rows = conn.execute(
                "SELECT device_id, seq, (extract(epoch FROM ts) * 1000)::bigint "
                f"FROM {SCHEMA}.{readings_table('kiosk')}"
            ).fetchall()
        got = [(d, int(s), int(t)) for d, s, t in rows]
        assert len(got) == len(set(got))
        assert set(got) == sent
    finally:
        if ingest.poll() is None:
            ingest.send_signal(signal.SIGTERM)
            ingest.wait(30)
        pub.disconnect()
