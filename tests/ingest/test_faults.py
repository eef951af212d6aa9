"""Ingest faults with real processes: worker kill -9, database cut and hung, two workers.

The worker runs as `python -m ingest`; the database sits behind a TcpProxy
the test can cut or hang, so the shared PostgreSQL keeps running. The test
plays a gateway that resends unacked batches until acked (``GatewayPlayer``),
as gateway.service does, and keeps the ledger of what it sent.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest

from cityhub.localstack.procs import free_port
from contracts.settings import DatabaseSettings
from tests.plugins.gateway import broker_settings, wait_for
from tests.plugins.ingest import (
    GatewayPlayer,
    Ledger,
    TcpProxy,
    assert_table_equals_ledger,
    cpu_seconds,
    ingest_in_thread,
    ingest_settings,
    make_batch,
    proxied_url,
    scrape,
    seed_registry,
    start_ingest_process,
    write_config,
)

pytestmark = pytest.mark.slow


def pg_port(db_url: str) -> int:
    return int(db_url.rsplit(":", 1)[1].split("/", maxsplit=1)[0])


def fleet(gateway_id: str) -> list[tuple[str, str]]:
    return [(f"{gateway_id}-aq-{i}", "air_quality") for i in range(4)] + [
        (f"{gateway_id}-k-{i}", "kiosk") for i in range(2)
    ]


def metric(scraped: dict[str, float], name: str) -> float:
    """``cityhub_ingest_{name}`` of the one worker in a /metrics scrape."""
    (value,) = [v for k, v in scraped.items() if k.startswith(f"cityhub_ingest_{name}{{worker=")]
    return value


def worker_pids(supervisor: int) -> list[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    return [
        int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


def stop_process(proc, log: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    assert proc.returncode == 0, log.read_text()[-3000:]


def test_worker_kill_9_mid_stream_loses_and_duplicates_nothing(
    mqtt_server, db_conn, db_url, migrated, tmp_path
):
    t = uuid.uuid4().hex[:6]
    gw, prefix = f"gw-{t}", f"t{t}"
    devices = fleet(gw)
    seed_registry(db_conn, migrated, {gw: devices})
    config = write_config(
        tmp_path / "ingest.toml",
        server=mqtt_server,
        db_url=db_url,
        schema=migrated,
        settings=ingest_settings(prefix, max_batches_per_commit=4),
    )
    log = tmp_path / "ingest.log"
    ledger = Ledger()
    batches = [
        make_batch(gw, n, devices, rows_per_device=10, start_seq=10 * n, ledger=ledger)
        for n in range(80)
    ]
    player = GatewayPlayer(mqtt_server, gateway_id=gw, prefix=prefix, resend_after_s=1.5)
    proc = start_ingest_process(config, log)
    try:
        wait_for(lambda: "subscribed to" in log.read_text(), 20, "worker subscribed")

        def feed() -> None:
            for batch in batches:
                player.send(batch)
                time.sleep(0.02)

        sender = threading.Thread(target=feed, daemon=True)
        sender.start()
        wait_for(lambda: len(player.acked) >= 20, 20, "a first part acked")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        killed_at = len(player.acked)
        assert killed_at < len(batches), "the kill came too late to be mid-stream"
        time.sleep(0.5)
        proc = start_ingest_process(config, log)
        sender.join(10)
        wait_for(lambda: len(player.acked) == len(batches), 40, "every batch acked")
        stop_process(proc, log)
        assert_table_equals_ledger(db_conn, migrated, ledger)
        assert player.sends > len(batches)  # something was in flight at the kill and resent
    finally:
        if proc.poll() is None:
            proc.kill()
        player.close()


def test_database_down_no_acks_no_spinning_then_everything_stored(
    mqtt_server, db_conn, db_url, migrated, tmp_path
):
    t = uuid.uuid4().hex[:6]
    gw, prefix = f"gw-{t}", f"t{t}"
    devices = fleet(gw)
    seed_registry(db_conn, migrated, {gw: devices})
    proxy = TcpProxy(pg_port(db_url))
    metrics_port = free_port()
    window = 16
    config = write_config(
        tmp_path / "ingest.toml",
        server=mqtt_server,
        db_url=proxied_url(db_url, proxy),
        schema=migrated,
        settings=ingest_settings(
            prefix,
            retry_min_s=0.2,
            retry_max_s=2.0,
            queue_max_messages=window,
            max_batches_per_commit=4,
            metrics_port=metrics_port,
        ),
    )
    log = tmp_path / "ingest.log"
    ledger = Ledger()
    player = GatewayPlayer(mqtt_server, gateway_id=gw, prefix=prefix, resend_after_s=3.0)
    proc = start_ingest_process(config, log)
    try:
        wait_for(lambda: "subscribed to" in log.read_text(), 20, "worker subscribed")
        before = [
            make_batch(gw, n, devices, rows_per_device=5, start_seq=5 * n, ledger=ledger)
            for n in range(5)
        ]
        for batch in before:
            player.send(batch)
        wait_for(lambda: len(player.acked) == 5, 10, "acks before the cut")

        proxy.cut()
        during = [
            make_batch(gw, n, devices, rows_per_device=5, start_seq=5 * n, ledger=ledger)
            for n in range(5, 65)
        ]
        for batch in during:
            player.send(batch)
        time.sleep(0.5)
        cpu_before, metrics_before = cpu_seconds(proc.pid), scrape(metrics_port)
        cut_s = 4.0
        time.sleep(cut_s)
        cpu_used = cpu_seconds(proc.pid) - cpu_before
        metrics = scrape(metrics_port)
        retries = metric(metrics, "db_errors_total") - metric(metrics_before, "db_errors_total")
        assert len(player.acked) == 5, "acked while the database was down"
        # Backoff from 0.2 s doubling to 2 s: a handful of attempts in 4 s, not a spin.
        assert 1 <= retries <= 12, retries
        assert cpu_used < 0.1 * cut_s, f"worker used {cpu_used:.2f} s CPU in {cut_s} s"
        # The broker holds the rest (Receive Maximum).
        assert metric(metrics, "received_total") <= 5 + window
        assert metric(metrics, "db_connected") == 0

        proxy.restore()
        wait_for(lambda: len(player.acked) == 65, 30, "everything acked after restore")
        stop_process(proc, log)
        assert_table_equals_ledger(db_conn, migrated, ledger)
    finally:
        if proc.poll() is None:
            proc.kill()
        player.close()
        proxy.close()


def test_hung_database_is_cut_after_the_timeout_and_does_not_block_a_stop(
    mqtt_server, db_conn, db_url, migrated
):
    t = uuid.uuid4().hex[:6]
    gw, prefix = f"gw-{t}", f"t{t}"
    devices = fleet(gw)
    seed_registry(db_conn, migrated, {gw: devices})
    proxy = TcpProxy(pg_port(db_url))
    ledger = Ledger()
    player = GatewayPlayer(mqtt_server, gateway_id=gw, prefix=prefix, resend_after_s=60)
    try:
        with ingest_in_thread(
            settings=ingest_settings(prefix, commit_timeout_s=1.0, retry_max_s=0.5),
            broker=broker_settings(mqtt_server),
            database=DatabaseSettings(
                url=proxied_url(db_url, proxy), schema=migrated, connect_timeout_s=1
            ),
        ) as worker:
            first = make_batch(gw, 0, devices, rows_per_device=5, ledger=ledger)
            player.send(first)
            wait_for(lambda: first.batch_id in player.acked, 10, "ack before the hang")
            proxy.hang()
            rest = [
                make_batch(gw, n, devices, rows_per_device=5, start_seq=5 * n, ledger=ledger)
                for n in range(1, 11)
            ]
            for batch in rest:
                player.send(batch)
            wait_for(lambda: worker.counters.db_timeouts >= 1, 10, "the hung call cut")
            time.sleep(1.5)
            assert player.acked == {first.batch_id}
            proxy.restore()
            wait_for(lambda: len(player.acked) == 11, 20, "everything acked after the hang")
        # Hung in the middle of a commit, the worker is asked to stop: it gives
        # up after its grace (5 s), well before the 30 s commit timeout.
        with ingest_in_thread(
            settings=ingest_settings(prefix, commit_timeout_s=30.0),
            broker=broker_settings(mqtt_server),
            database=DatabaseSettings(url=proxied_url(db_url, proxy), schema=migrated),
        ) as worker:
            wait_for(
                lambda: worker.counters.commits == 0 and worker.metrics.db_connected,
                10,
                "connected",
            )
            proxy.hang()
            late = [
                make_batch(gw, n, devices, rows_per_device=5, start_seq=5 * n, ledger=ledger)
                for n in range(11, 16)
            ]
            for batch in late:
                player.send(batch)
            wait_for(lambda: worker.counters.received == 5, 10, "late batches taken")
            time.sleep(0.3)  # the commit is on the wire, waiting for the hung server
            stopping = time.monotonic()
        assert time.monotonic() - stopping < 8.0, "stop took too long while the database hung"
        assert len(player.acked) == 11
        proxy.restore()
        player.resend_after_s = 0.5  # the gateway resends what the stopped worker held
        with ingest_in_thread(
            settings=ingest_settings(prefix),
            broker=broker_settings(mqtt_server),
            database=DatabaseSettings(url=proxied_url(db_url, proxy), schema=migrated),
        ):
            wait_for(lambda: len(player.acked) == 16, 20, "late batches acked after restart")
        assert_table_equals_ledger(db_conn, migrated, ledger)
    finally:
        player.close()
        proxy.close()


def test_two_workers_share_the_stream_store_everything_once_and_survive_kill_9(
    mqtt_server, db_conn, db_url, migrated, tmp_path
):
    t = uuid.uuid4().hex[:6]
    prefix = f"t{t}"
    gateways = [f"gw-{t}-{i}" for i in range(3)]
    seed_registry(db_conn, migrated, {gw: fleet(gw) for gw in gateways})
    config = write_config(
        tmp_path / "ingest.toml",
        server=mqtt_server,
        db_url=db_url,
        schema=migrated,
        settings=ingest_settings(prefix, stats_interval_s=0.5, max_batches_per_commit=4),
    )
    log = tmp_path / "ingest.log"
    ledger = Ledger()
    players = [GatewayPlayer(mqtt_server, gateway_id=gw, prefix=prefix) for gw in gateways]
    proc = start_ingest_process(config, log, "--workers", "2")
    try:
        wait_for(lambda: log.read_text().count("subscribed to") == 2, 30, "two subscriptions")
        sent = 0
        for n in range(40):
            for player in players:
                batch = make_batch(
                    player.gateway_id,
                    n,
                    fleet(player.gateway_id),
                    rows_per_device=5,
                    start_seq=5 * n,
                    ledger=ledger,
                )
                player.send(batch)
                sent += 1
            time.sleep(0.01)
        wait_for(lambda: sum(len(p.acked) for p in players) == sent, 30, "everything acked")
        wait_for(
            lambda: (
                db_conn.execute(
                    f"SELECT coalesce(sum(batches), 0) FROM {migrated}.ingest_stats"
                ).fetchone()[0]
                == sent
            ),
            10,
            "stats rows covering every batch",
        )
        per_worker = dict(
            db_conn.execute(
                f"SELECT worker_id, sum(batches) FROM {migrated}.ingest_stats GROUP BY 1"
            ).fetchall()
        )
        assert len(per_worker) == 2, per_worker
        assert all(n > 0 for n in per_worker.values()), per_worker  # both took a share
        assert sum(per_worker.values()) == sent

        # A worker killed with -9 is restarted by the supervisor; nothing is lost.
        (victim, *_) = worker_pids(proc.pid)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: "exited with code -9" in log.read_text(), 10, "supervisor saw the death")
        for n in range(40, 60):
            for player in players:
                batch = make_batch(
                    player.gateway_id,
                    n,
                    fleet(player.gateway_id),
                    rows_per_device=5,
                    start_seq=5 * n,
                    ledger=ledger,
                )
                player.send(batch)
                sent += 1
        wait_for(lambda: log.read_text().count("subscribed to") == 3, 20, "worker restarted")
        wait_for(lambda: sum(len(p.acked) for p in players) == sent, 30, "everything acked")
        assert len(worker_pids(proc.pid)) == 2
        stop_process(proc, log)
        assert_table_equals_ledger(db_conn, migrated, ledger)
    finally:
        if proc.poll() is None:
            proc.kill()
        for player in players:
            player.close()
