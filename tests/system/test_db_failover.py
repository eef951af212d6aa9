"""Database failover: the primary killed with -9, its synchronous replica promoted, nothing lost.

Two private PostgreSQL+TimescaleDB servers: a primary and a streaming
replica made from it with ``pg_basebackup -R``. Ingest (``python -m
ingest``), the alerts job (``python -m alerts``) and the ``cityhub``
command are given a libpq multi-host URL naming both, with
``target_session_attrs=read-write``: each connect tries the hosts in turn
and keeps the one that takes writes, so after the promotion they find the
new primary by themselves.

Why synchronous replication, and at which level. Ingest acks a batch
once its COMMIT returned, and the gateway then deletes the batch from its
outbox: an acked commit must survive whatever server is promoted. With
asynchronous replication the primary acknowledges a commit as soon as its
own WAL has it; a commit the standby had not received when the primary
died is gone after the promotion, and so are its readings (shown below:
``test_an_acked_commit_survives_promotion_only_with_synchronous_replication``).
``synchronous_standby_names`` names the standby that must confirm, and
``synchronous_commit`` says how far:

- ``remote_write``: the standby has written the WAL to its OS, not flushed
  it. It survives the primary's crash (the case here, and the common one)
  but not the standby's OS crashing at the same moment;
- ``on``: the standby has flushed the WAL to disk. It survives the
  primary's crash and any crash of the standby, so an acked commit is in
  the standby's WAL whatever happens before the promotion;
- ``remote_apply``: flushed and applied, so reads on the standby see it at
  once; ingest does not read from the standby, and it costs more.

We choose ``on``: the delivery contract is "every reading acked is stored",
and ``on`` is the weakest level for which that holds for any single
machine failure (a power cut takes the OS buffers ``remote_write`` relies
on). The price is one round trip to the standby per commit, which ingest's
group commits spread over many batches. (These test servers run with fsync
off for speed; the levels are the same, only a machine crash differs.)

A commit waiting for its standby is not acknowledged: if the primary dies
meanwhile, the client gets an error and ingest does not ack, the gateway
resends and the idempotent commit on the new primary stores each reading
once. A cancelled wait (pg_cancel_backend, statement_timeout) would end in a
WARNING and a committed transaction: ingest never cancels, it cuts the
socket (``Database.interrupt``), which acknowledges nothing.

The promoted standby runs without ``synchronous_standby_names`` (its
settings are its own), so its commits do not wait for a standby that does
not exist; in production Patroni's ``synchronous_mode`` does the same.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from adapters.database import Database
from cityhub import database
from cityhub.localstack.mosquitto import MosquittoServer
from cityhub.localstack.postgres import DB_NAME, DB_USER, PostgresServer
from cityhub.localstack.procs import LOOPBACK, free_port, run_as_for
from contracts.errors import DatabaseUnavailableError
from contracts.schema import readings_table
from contracts.settings import StorageSettings
from tests.gateway.test_faults import gateway_config_file, start_gateway_process
from tests.plugins.gateway import (
    client,
    mqtt_devices,
    publish_config,
    publish_readings,
    wait_for,
    watch_states,
)
from tests.plugins.ingest import (
    ingest_settings,
    scrape,
    seed_registry,
    start_ingest_process,
    write_config,
)
from tests.plugins.servers import IS_ROOT
from tests.system.test_pipeline_db_outage import signal_server

pytestmark = pytest.mark.slow
logger = logging.getLogger(__name__)

SCHEMA = "cityhub"


def multi_host_url(*servers: PostgresServer, password: str) -> str:
    hosts = ",".join(f"{LOOPBACK}:{s.port}" for s in servers)
    return f"postgresql://{DB_USER}:{password}@{hosts}/{DB_NAME}?target_session_attrs=read-write"


def multi_host_conninfo(*ports: int, password: str) -> str:
    """The same in libpq's key=value form."""
    return (
        f"host={','.join(LOOPBACK for _ in ports)} port={','.join(map(str, ports))} "
        f"user={DB_USER} password={password} dbname={DB_NAME} target_session_attrs=read-write"
    )


@pytest.fixture
def pair(servers_dir: Path, pg_bindir: Path) -> Iterator[tuple[PostgresServer, PostgresServer]]:
    """A primary and its streaming replica (asynchronous until a test says otherwise)."""
    tag = uuid.uuid4().hex[:6]

    def server(role: str) -> PostgresServer:
        return PostgresServer(
            base_dir=servers_dir / f"postgres-{role}-{tag}",
            port=free_port(),
            bindir=pg_bindir,
            run_as=run_as_for("postgres", is_root=IS_ROOT),
            # The replica is a copy: the same accounts, the same password.
            password_file=servers_dir / f"postgres-pair-{tag}.password",
            durable=False,
        )

    primary, replica = server("primary"), server("replica")
    primary.start()
    try:
        replica.clone_from(primary)
        replica.start()
        yield primary, replica
    finally:
        for s in (replica, primary):
            pid = s.pid()
            if pid is not None:
                signal_server(pid, signal.SIGCONT)
            s.stop()


def make_synchronous(primary: PostgresServer, level: str) -> None:
    """Require the standby's confirmation for every commit, at ``level``.

    Set once the standby streams: before that, every commit (CREATE DATABASE
    at start-up among them) would wait for it.
    """
    with psycopg.connect(primary.url("postgres"), autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
        conn.execute(f"ALTER SYSTEM SET synchronous_commit = '{level}'")
        conn.execute("SELECT pg_reload_conf()")

        def in_sync() -> bool:
            rows = conn.execute("SELECT sync_state FROM pg_stat_replication").fetchall()
            return rows == [("sync",)]

        wait_for(in_sync, 20, "the standby synchronous")


def one(conn: psycopg.Connection, query: str) -> Any:
    """The single value of a query that returns one row."""
    row = conn.execute(query).fetchone()
    assert row is not None, query
    return row[0]


def kill_9(server: PostgresServer) -> None:
    pid = server.pid()
    assert pid is not None
    signal_server(pid, signal.SIGKILL)
    wait_for(lambda: not server.running(), 20, "the primary dead")


def outbox_depth(path: Path) -> int:
    """Readings in a gateway's outbox file (written, not yet acked)."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        row = db.execute("SELECT coalesce(sum(readings), 0) FROM batches").fetchone()
    return int(row[0])


def stored(url: str) -> list[tuple[str, int, int]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT device_id, seq, (extract(epoch FROM ts) * 1000)::bigint "
            f"FROM {SCHEMA}.{readings_table('kiosk')}"
        ).fetchall()
    return [(d, int(s), int(t)) for d, s, t in rows]


def start_alerts_process(
    path: Path, *, url: str, job_id: str, metrics_port: int
) -> subprocess.Popen[bytes]:
    path.write_text(
        f'[database]\nurl = "{url}"\nschema = "{SCHEMA}"\nconnect_timeout_s = 2.0\n'
        f'[alerts]\njob_id = "{job_id}"\ninterval_s = 1.0\nevaluation_delay_s = 0.0\n'
        f"retry_min_s = 0.1\nretry_max_s = 1.0\nmetrics_port = {metrics_port}\n",
        encoding="utf-8",
    )
    with (path.parent / "alerts.log").open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "alerts", "--config", str(path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if not k.startswith("CITYHUB_")},
        )


def alerts_cycles(port: int) -> float:
    values = scrape(port)
    return next(v for k, v in values.items() if k.split("{")[0].endswith("cycles_total"))


class Devices:
    """MQTT devices publishing a round (one reading each) every ``period_s``, with the ledger."""

    def __init__(self, server: MosquittoServer, *, prefix: str, n: int, period_s: float) -> None:
        self.pub = client(server)
        self.prefix = prefix
        self.devices = mqtt_devices(prefix, n)
        self.period_s = period_s
        self.sent: set[tuple[str, int, int]] = set()
        self._seq = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="devices", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.sent |= publish_readings(
                self.pub,
                prefix=self.prefix,
                devices=self.devices,
                per_device=1,
                start_seq=self._seq,
            )
            self._seq += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive()

    def close(self) -> None:
        if self._thread.is_alive():
            self.stop()
        self.pub.disconnect()


class DepthSampler:
    """The gateway's outbox depth, sampled in a thread: the peak and the last value."""

    def __init__(self, outbox: Path, period_s: float = 0.1) -> None:
        self.outbox = outbox
        self.period_s = period_s
        self.peak = 0
        self.last = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="depth", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            with contextlib.suppress(sqlite3.OperationalError):  # locked by a commit
                self.last = outbox_depth(self.outbox)
                self.peak = max(self.peak, self.last)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


@dataclass
class Pipeline:
    """The processes under test: ingest, a gateway with its outbox, the alerts job."""

    devices: Devices
    outbox: Path
    metrics_port: int
    job_id: str
    procs: list[subprocess.Popen[bytes]]


@contextmanager
def pipeline(server: MosquittoServer, url: str, workdir: Path) -> Iterator[Pipeline]:
    """Start ingest, a gateway and the alerts job on ``url``; yield once they are subscribed.

    On exit: SIGTERM to each, which must end it cleanly (exit 0).
    """
    tag = uuid.uuid4().hex[:6]
    gateway_id, prefix = f"gw-{tag}", f"t{tag}"
    devices = Devices(server, prefix=prefix, n=10, period_s=0.1)
    with psycopg.connect(url, autocommit=True) as conn:
        seed_registry(conn, SCHEMA, {gateway_id: [(d.device_id, "kiosk") for d in devices.devices]})
    publish_config(
        devices.pub, gateway_id=gateway_id, prefix=prefix, devices=devices.devices, version=1
    )
    states = watch_states(devices.pub, gateway_id=gateway_id, prefix=prefix)
    gateway_conf = workdir / "gateway" / "gateway.toml"
    gateway_conf.parent.mkdir()
    gateway_config_file(
        gateway_conf,
        server,
        gateway_id=gateway_id,
        prefix=prefix,
        batch_max_rows=50,
        batch_max_ms=50,
        ack_timeout_s=2.0,
    )
    ingest_conf = write_config(
        workdir / "ingest.toml",
        server=server,
        db_url=url,
        schema=SCHEMA,
        settings=ingest_settings(prefix, commit_timeout_s=5.0, retry_max_s=1.0),
    )
    logs = [workdir / "ingest.log", workdir / "gateway.log", workdir / "alerts.log"]
    metrics_port = free_port()
    procs = [
        start_ingest_process(ingest_conf, logs[0]),
        start_gateway_process(gateway_conf, logs[1]),
        start_alerts_process(
            workdir / "alerts.toml", url=url, job_id=f"alerts-{tag}", metrics_port=metrics_port
        ),
    ]
    try:
        wait_for(lambda: "subscribed to" in logs[0].read_text(), 30, "ingest subscribed")
        wait_for(lambda: any(s.site_ready for s in states), 30, "the gateway subscribed")
        yield Pipeline(
            devices=devices,
            outbox=gateway_conf.parent / "outbox.sqlite3",
            metrics_port=metrics_port,
            job_id=f"alerts-{tag}",
            procs=procs,
        )
    finally:
        devices.close()
        for proc in procs:
            stop_process(proc)
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log.read_text()[-3000:]


def test_failover_to_a_synchronous_replica_loses_and_duplicates_nothing(
    mqtt_server, pair, tmp_path, record_property
):
    primary, replica = pair
    make_synchronous(primary, "on")
    with psycopg.connect(primary.url(), autocommit=True) as conn:
        database.migrate(conn, schema=SCHEMA, storage=StorageSettings())
    url = multi_host_url(primary, replica, password=primary.password)
    with pipeline(mqtt_server, url, tmp_path) as run:
        run.devices.start()
        sampler = DepthSampler(run.outbox)
        try:
            wait_for(lambda: len(stored(primary.url())) >= 300, 30, "readings on the primary")
            wait_for(lambda: alerts_cycles(run.metrics_port) >= 1, 30, "an alerts cycle")

            kill_9(primary)
            # The gap: nothing is acked, the outbox grows while the devices go on.
            depth_at_kill = sampler.last
            wait_for(lambda: sampler.last >= depth_at_kill + 200, 30, "the outbox carrying the gap")
            cycles_before = alerts_cycles(run.metrics_port)
            replica.promote()
            promoted_at = time.monotonic()
            with psycopg.connect(replica.url()) as conn:
                promoted_db_at = one(conn, "SELECT now()")
            replicated = len(stored(replica.url()))  # what the standby had at the kill
            wait_for(lambda: len(stored(replica.url())) > replicated, 60, "ingest resumed")
            resumed_s = time.monotonic() - promoted_at
            time.sleep(1)  # readings after the failover too
            run.devices.stop()
            # The last round may not be in the outbox yet: wait for the count too (a reading
            # lost fails here, as a timeout; the comparison below names what is missing).
            n_sent = len(run.devices.sent)
            wait_for(
                lambda: outbox_depth(run.outbox) == 0 and len(stored(url)) >= n_sent,
                60,
                "the backlog acked",
            )
            drained_s = time.monotonic() - promoted_at
        finally:
            sampler.close()
        assert sampler.peak >= depth_at_kill + 200

        got = stored(url)  # the URL finds the new primary
        assert len(got) == len(set(got)), "duplicates"
        sent = run.devices.sent
        assert set(got) == sent, f"lost {len(sent - set(got))}, unknown {len(set(got) - sent)}"

        # The alerts job went on with its cycles on the new primary by itself.
        wait_for(lambda: alerts_cycles(run.metrics_port) > cycles_before + 1, 30, "alerts cycles")
        with psycopg.connect(replica.url()) as conn:
            row = conn.execute(
                f"SELECT updated_at FROM {SCHEMA}.alert_jobs WHERE job_id = %s", (run.job_id,)
            ).fetchone()
        assert row is not None
        assert row[0] > promoted_db_at
        assert [p.poll() for p in run.procs] == [None, None, None]  # all rode the failover out
        # The figures, in the report with -rA (run with -s to see them at once).
        record_property("outbox_peak_readings", sampler.peak)
        record_property("first_commit_after_promotion_s", round(resumed_s, 2))
        record_property("backlog_acked_after_promotion_s", round(drained_s, 2))
        logger.warning(
            "failover: %d readings, outbox peak %d readings, first commit %.1f s and backlog "
            "acked %.1f s after promotion",
            len(sent),
            sampler.peak,
            resumed_s,
            drained_s,
        )


@pytest.mark.parametrize("synchronous", [False, True], ids=["asynchronous", "synchronous"])
def test_an_acked_commit_survives_promotion_only_with_synchronous_replication(pair, synchronous):
    """The negative control, made deterministic: the standby misses one commit on purpose.

    The standby's WAL receiver is stopped (SIGSTOP) and its sender on the
    primary ended, so nothing the primary writes next reaches the standby:
    the moment of a kill -9 that a live stream would race. Asynchronous, the
    primary acknowledges the INSERT at once and the promoted standby does not
    have it: an ack ingest would have sent, a batch the gateway would have
    deleted, lost. Synchronous, the INSERT waits for the standby
    (wait_event SyncRep), the kill ends it with an error, nothing is
    acknowledged and the gateway would resend.
    """
    primary, replica = pair
    with psycopg.connect(primary.url(), autocommit=True) as conn:
        conn.execute("CREATE TABLE probe (n int)")
        conn.execute("INSERT INTO probe VALUES (1)")
    if synchronous:
        make_synchronous(primary, "on")
    with psycopg.connect(replica.url(), autocommit=True) as conn:
        wait_for(
            lambda: conn.execute("SELECT to_regclass('probe') IS NOT NULL").fetchone() == (True,),
            20,
            "the table on the standby",
        )
        receiver = one(conn, "SELECT pid FROM pg_stat_wal_receiver")
    os.kill(receiver, signal.SIGSTOP)
    with psycopg.connect(primary.url("postgres"), autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_replication")
        wait_for(
            lambda: conn.execute("SELECT count(*) FROM pg_stat_replication").fetchone() == (0,),
            20,
            "the sender gone",
        )

    outcome: list[str] = []

    def insert() -> None:
        try:
            with psycopg.connect(primary.url(), autocommit=True) as conn:
                conn.execute("INSERT INTO probe VALUES (2)")
            outcome.append("acked")
        except psycopg.OperationalError:
            outcome.append("error")

    writer = threading.Thread(target=insert, name="insert")
    writer.start()
    if synchronous:
        with psycopg.connect(primary.url("postgres"), autocommit=True) as conn:
            wait_for(
                lambda: (
                    conn.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'"
                    ).fetchone()
                    == (1,)
                ),
                20,
                "the commit waiting for the standby",
            )
        assert outcome == []
    else:
        writer.join(20)
        assert outcome == ["acked"]
    kill_9(primary)
    writer.join(20)
    assert not writer.is_alive()
    os.kill(receiver, signal.SIGCONT)
    replica.promote()
    with psycopg.connect(replica.url()) as conn:
        rows = sorted(n for (n,) in conn.execute("SELECT n FROM probe").fetchall())
    if synchronous:
        assert outcome == ["error"]  # not acknowledged: the sender retries
    else:
        assert rows == [1]  # acknowledged, then lost with the primary


def cityhub(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cityhub", *args],
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("CITYHUB_")},
            "CITYHUB_DATABASE__URL": url,
            "CITYHUB_DATABASE__SCHEMA": SCHEMA,
            "COLUMNS": "200",
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cityhub_db_and_status_find_the_primary_in_a_multi_host_url(pair):
    primary, replica = pair
    password = primary.password
    # The standby first: a migration that landed on it would fail (read-only).
    migrated = cityhub("db", "migrate", url=multi_host_url(replica, primary, password=password))
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    # Nothing listens on the first port, the second is the standby: libpq goes on to the third.
    conninfo = multi_host_conninfo(free_port(), replica.port, primary.port, password=password)
    shown = cityhub("db", "status", url=conninfo)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert f"schema {SCHEMA!r}" in shown.stdout
    assert "no migrations applied" not in shown.stdout
    status = cityhub("status", "--json", url=conninfo)
    # Exit 3 and this one problem: the database answered (no alerts job has run on it yet).
    assert status.returncode == 3, status.stdout + status.stderr
    assert json.loads(status.stdout)["problems"] == ["the alerts job has never completed a cycle"]
    for done in (migrated, shown, status):
        assert password not in done.stdout + done.stderr


def test_a_server_gone_read_only_is_retryable_and_the_next_connect_finds_the_primary(pair):
    """A primary demoted under a live connection answers read_only_sql_transaction.

    The adapter makes it DatabaseUnavailableError (retry), not a poison
    error, and drops the connection; the next connect skips every server
    that does not take writes. The demotion is played with
    default_transaction_read_only, which the server applies to open sessions.
    """
    primary, replica = pair
    db = Database(
        url=multi_host_url(primary, replica, password=primary.password),
        application_name="failover-test",
    )
    try:
        with db.session("create") as conn:
            conn.execute("CREATE TABLE probe (n int)")
        with psycopg.connect(primary.url(), autocommit=True) as admin:
            admin.execute("ALTER SYSTEM SET default_transaction_read_only = on")
            admin.execute("SELECT pg_reload_conf()")
        with psycopg.connect(primary.url(), autocommit=True) as probe:
            wait_for(
                lambda: one(probe, "SHOW default_transaction_read_only") == "on",
                20,
                "the primary read-only",
            )
        with pytest.raises(DatabaseUnavailableError) as caught, db.session("write") as conn:
            conn.execute("INSERT INTO probe VALUES (1)")
        assert isinstance(caught.value.__cause__, psycopg.errors.ReadOnlySqlTransaction)
        assert db.connects == 1
        # Neither server takes writes now: no connection, and no write anywhere.
        with pytest.raises(DatabaseUnavailableError, match=r"read-only|read-write"):
            db.connect()
        replica.promote()
        with db.session("write") as conn:
            conn.execute("INSERT INTO probe VALUES (2)")
            assert one(conn, "SELECT inet_server_port()") == replica.port
        assert db.connects == 2
    finally:
        db.close()
