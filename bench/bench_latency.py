"""Reading latency: device publish -> gateway -> broker -> ingest -> visible in TimescaleDB.

Everything runs as deployed, each part in its own process on this machine: a
private Mosquitto (site and central broker at once, as in bench_gateway), a
private PostgreSQL with TimescaleDB (fsync on), the gateway (`python -m
gateway`, default settings but for the per-device rate limit, lifted) and
one ingest worker (`python -m ingest`, default settings). A separate
publisher process plays the devices: air-quality monitors publishing JSON on
``d/{id}/up`` at QoS 1, each at 10 readings/s, paced evenly over time (200
devices for 2,000 readings/s, 2,000 devices for 20,000/s); each reading's
``ts`` is the wall-clock time it was sent.

Method (no polling of a growing table): the bench's PostgreSQL runs with
``track_commit_timestamp = on``, so after a run the commit time of the
transaction that inserted each row, ``pg_xact_commit_timestamp(xmin)``, is
its first visibility to any reader. ``xmin`` is read from the rows of the
readings hypertable: a select on the hypertable returns its chunks' rows
with their own system columns, xmin being the ingest transaction that
inserted them (each run checks that every row has a commit time and none
precedes its ``recv_ts``). ``visibility_query`` is the one place that names
the physical table. Per row:

- total: commit time - ``ts`` (the reading's timestamp);
- device -> gateway: ``recv_ts`` - ``ts`` (broker hop and the gateway's
  socket read; ``recv_ts`` is stamped when the gateway handles the message);
- gateway -> database: commit time - ``recv_ts`` (batching, outbox fsync,
  uplink, ingest's grouping and the commit).

All clocks are this machine's. Readings timestamped in the first
``--warmup-s`` seconds of a run are left out. Loss is the readings the
publisher sent minus the rows stored (0 expected; rows are unique by device,
ts and seq). Medians over ``--runs`` runs of p50/p90/p99 and of the
achieved rate (stored readings over the publishing time), with the mean
readings a gateway batch and batches an ingest commit (from
``ingested_batches``: each transaction stamps its own ``committed_at``).

    .venv/bin/python bench/bench_latency.py [--rates 2000 20000] [--duration-s 15] [--runs 3]
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import psycopg
from bench_gateway import start_gateway, stop, write_settings
from bench_ingest import (
    batches_per_commit,
    ingest_config,
    machine,
    reset,
    seed,
    start_ingest,
    start_servers,
)

from cityhub import database
from cityhub.localstack.mosquitto import ADMIN_USER, MosquittoServer
from cityhub.localstack.postgres import PostgresServer
from contracts.schema import readings_table
from contracts.settings import GatewaySettings, StorageSettings
from tests.plugins.gateway import client, mqtt_devices, publish_config, wait_for, watch_states

DEVICE_TYPE = "air_quality"
PER_DEVICE_PER_S = 10  # each device's reading rate; devices = rate / this
PERCENTILES = (50, 90, 99)

# The devices: a raw-socket MQTT client (paho publishes ~4,500 messages/s, too
# few for 20,000/s) sending what is due every TICK_S, each message stamped
# with the time it is sent. PUBACKs are read as they come; at most WINDOW
# messages are in flight (the broker's max_inflight_messages is 1,000).
PUBLISHER = textwrap.dedent(
    """
    import json, select, socket, sys, time
    sys.path.insert(0, sys.argv[1])
    from contracts import mqttcodec as mc
    from contracts.topics import device_uplink_topic
    port, user, password, prefix, ndev, rate, duration_s, seq_base = sys.argv[2:10]
    ndev, rate, duration_s, seq_base = int(ndev), float(rate), float(duration_s), int(seq_base)
    TICK_S, WINDOW = 0.002, 900
    topics = [device_uplink_topic(f"{prefix}-dev-{d:03d}", prefix) for d in range(ndev)]
    s = socket.create_connection(("127.0.0.1", int(port)))
    s.sendall(mc.encode_connect(client_id=f"lat-pub-{prefix}", keepalive_s=60, clean_start=True,
                                username=user, password=password))
    reader = mc.PacketReader()
    window = 0
    def read(timeout):
        global window
        if not select.select([s], [], [], timeout)[0]:
            return
        data = s.recv(1 << 16)
        if not data:
            raise SystemExit("broker closed the connection")
        for c in reader.feed(data)[1]:
            if isinstance(c, mc.Connack) and c.reason_code:
                raise SystemExit(f"refused: {c}")
            if isinstance(c, mc.Puback):
                if c.reason_code >= 0x80:
                    raise SystemExit(f"publish refused: {c}")
                window -= 1
    read(10)
    total = int(rate * duration_s)
    sent = pid = 0
    start_wall = time.time()
    t0 = time.monotonic()
    while sent < total:
        # Behind after a stall: catch up a window at a time.
        due = min(total, int((time.monotonic() - t0) * rate) + 1, sent + WINDOW)
        if due > sent:
            while window + (due - sent) > WINDOW:
                read(1.0)
            now_ms = time.time_ns() // 1_000_000
            chunk = []
            for i in range(sent, due):
                payload = json.dumps({"seq": seq_base + i // ndev, "ts": now_ms,
                                      "m": {"pm1": 8.0, "pm25": 12.5, "pm10": 20.0,
                                            "co2": 450.0, "no2": 20.0, "o3": 30.0,
                                            "temperature": 28.5, "humidity": 70.0}}).encode()
                pid = pid % 65535 + 1
                chunk.append(mc.encode_publish(topics[i % ndev], payload, qos=1, packet_id=pid))
            s.sendall(b"".join(chunk))
            window += due - sent
            sent = due
        read(TICK_S)
    elapsed_s = time.monotonic() - t0
    while window > 0:
        read(5.0)
    s.sendall(mc.encode_disconnect())
    s.close()
    print(start_wall, elapsed_s, sent, flush=True)
    """
)


@dataclass
class RunResult:
    """One run: latency percentiles (ms) per part, achieved rate and loss."""

    total_ms: dict[int, float]
    device_gateway_ms: dict[int, float]
    gateway_db_ms: dict[int, float]
    rate: float
    lost: int
    rows: int
    rows_per_batch: float
    batches_per_commit: float


def visibility_query(schema: str, *, since_ms: int, keyed: bool) -> str:
    """Each reading's (ts, recv_ts, commit time) in ms since the epoch, from ``since_ms`` on.

    The one place that names the physical table carrying ``xmin``: the
    keyed data table behind the ``readings_{type}`` view (migration 22), or
    the wide table itself on a schema from before it (``keyed`` False), so
    the same script measures the code before the change.
    """
    if keyed:
        table, recv = (
            f"{readings_table(DEVICE_TYPE)}_data",
            "ts + recv_delay_ms * 0.001 * INTERVAL '1 s'",
        )
    else:
        table, recv = readings_table(DEVICE_TYPE), "recv_ts"
    return (
        f"SELECT extract(epoch FROM ts) * 1000, extract(epoch FROM {recv}) * 1000, "
        "extract(epoch FROM pg_xact_commit_timestamp(xmin)) * 1000 "
        f"FROM {schema}.{table} WHERE ts >= to_timestamp({since_ms / 1000})"
    )


def enable_commit_timestamps(pg: PostgresServer) -> None:
    """track_commit_timestamp needs a restart: set it with ALTER SYSTEM, restart."""
    with psycopg.connect(pg.url(), autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET track_commit_timestamp = on")
    pg.stop()
    pg.start()


def percentiles(values: np.ndarray) -> dict[int, float]:
    return {p: float(np.percentile(values, p)) for p in PERCENTILES}


@dataclass
class Stack:
    """The servers, the schema, and a running gateway and ingest worker for one rate."""

    broker: MosquittoServer
    conn: psycopg.Connection
    schema: str
    prefix: str
    devices: int
    gateway: subprocess.Popen[bytes]
    ingest: subprocess.Popen[bytes]

    def run(self, *, rate: float, duration_s: float, warmup_s: float, seq_base: int) -> RunResult:
        reset(self.conn, self.schema)
        publisher = subprocess.run(
            [
                sys.executable,
                "-c",
                PUBLISHER,
                str(Path(__file__).resolve().parents[1]),
                str(self.broker.port),
                ADMIN_USER,
                self.broker.admin_password,
                self.prefix,
                str(self.devices),
                str(rate),
                str(duration_s),
                str(seq_base),
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=duration_s + 120,
        )
        start_wall, elapsed_s, sent = publisher.stdout.split()
        table = f"{self.schema}.{readings_table(DEVICE_TYPE)}"

        def stored() -> int:
            row = self.conn.execute(f"SELECT count(*) FROM {table}").fetchone()
            return 0 if row is None else int(row[0])

        # Everything sent is stored within seconds; what is not by then is lost.
        deadline = time.monotonic() + 60
        while stored() < int(sent) and time.monotonic() < deadline:
            time.sleep(0.2)
        rows = stored()
        since_ms = int((float(start_wall) + warmup_s) * 1000)
        data = np.array(
            self.conn.execute(
                visibility_query(self.schema, since_ms=since_ms, keyed=self.keyed())
            ).fetchall(),
            dtype=np.float64,
        )
        if not len(data):
            raise SystemExit("no rows after the warm-up")
        ts, recv, visible = data[:, 0], data[:, 1], data[:, 2]
        # The method's check: every row has its commit time (NULL: commit
        # timestamps off, or xmin not the inserting transaction's), and none
        # was visible before the gateway received it (1 ms: recv_ts's rounding).
        if np.isnan(visible).any() or (visible < recv - 1).any():
            raise SystemExit("commit timestamps missing or before recv_ts: method broken")
        return RunResult(
            total_ms=percentiles(visible - ts),
            device_gateway_ms=percentiles(recv - ts),
            gateway_db_ms=percentiles(visible - recv),
            rate=rows / float(elapsed_s),
            lost=int(sent) - rows,
            rows=len(data),
            rows_per_batch=self.rows_per_batch(),
            batches_per_commit=batches_per_commit(self.conn, self.schema),
        )

    def keyed(self) -> bool:
        """Whether readings are stored by device key (migration 22) under this schema."""
        row = self.conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL",
            (f"{self.schema}.{readings_table(DEVICE_TYPE)}_data",),
        ).fetchone()
        return bool(row and row[0])

    def rows_per_batch(self) -> float:
        """Readings a gateway batch, over the run (ingest records each batch's count)."""
        row = self.conn.execute(
            "SELECT sum(readings)::float / greatest(count(*), 1) "
            f"FROM {self.schema}.ingested_batches"
        ).fetchone()
        return 0.0 if row is None or row[0] is None else float(row[0])

    def close(self) -> None:
        try:
            stop(self.gateway)
        finally:
            self.ingest.send_signal(signal.SIGTERM)
            self.ingest.wait(60)


def start_stack(
    broker: MosquittoServer, pg: PostgresServer, tmp: Path, conn: psycopg.Connection, devices: int
) -> Stack:
    """A fresh schema with ``devices`` monitors of one gateway; gateway and ingest started."""
    tag = uuid.uuid4().hex[:6]
    schema, prefix, gateway_id = f"lat{tag}", f"l{tag}", f"gw-{tag}"
    database.migrate(conn, schema=schema, storage=StorageSettings())
    configs = mqtt_devices(prefix, devices, device_type=DEVICE_TYPE)
    seed(conn, schema, {gateway_id: [d.device_id for d in configs]})
    ingest_toml = tmp / f"ingest-{tag}.toml"
    ingest_config(ingest_toml, broker, pg.url(), schema, prefix)
    ingest = start_ingest(ingest_toml, tmp / f"ingest-{tag}.log", 1)
    defaults = GatewaySettings()
    gateway_toml = tmp / f"{gateway_id}.toml"
    write_settings(
        gateway_toml,
        broker,
        gateway_id=gateway_id,
        prefix=prefix,
        gateway={
            "batch_max_rows": defaults.batch_max_rows,
            "batch_max_ms": defaults.batch_max_ms,
            "ack_timeout_s": defaults.ack_timeout_s,
        },
    )
    control = client(broker)
    publish_config(control, gateway_id=gateway_id, prefix=prefix, devices=configs, version=1)
    states = watch_states(control, gateway_id=gateway_id, prefix=prefix)
    gateway = start_gateway(gateway_toml, tmp / f"{gateway_id}.log")
    wait_for(lambda: any(s.site_ready for s in states), 30, "gateway subscribed at the site")
    control.disconnect()
    return Stack(broker, conn, schema, prefix, devices, gateway, ingest)


def row(name: str, values: list[dict[int, float]]) -> str:
    cells = [
        f"{statistics.median(v[p] for v in values):,.1f} "
        f"({' / '.join(f'{v[p]:,.1f}' for v in values)})"
        for p in PERCENTILES
    ]
    return f"| {name} | " + " | ".join(cells) + " |"


def report(rate: int, devices: int, results: list[RunResult]) -> None:
    print()
    print(
        f"offered {rate:,} readings/s ({devices} devices x {PER_DEVICE_PER_S}/s); "
        f"achieved {statistics.median(r.rate for r in results):,.0f}/s "
        f"({' / '.join(f'{r.rate:,.0f}' for r in results)}); "
        f"lost {sum(r.lost for r in results)}; "
        f"{statistics.median(r.rows for r in results):,.0f} rows measured a run; "
        f"readings a gateway batch {statistics.median(r.rows_per_batch for r in results):,.1f}, "
        f"batches a commit {statistics.median(r.batches_per_commit for r in results):,.1f}"
    )
    print("| ms, median (runs) | p50 | p90 | p99 |")
    print("|---|---|---|---|")
    print(row("device publish -> visible in the database", [r.total_ms for r in results]))
    print(row("device -> gateway (recv_ts - ts)", [r.device_gateway_ms for r in results]))
    print(row("gateway -> database (visible - recv_ts)", [r.gateway_db_ms for r in results]))


def run(args: argparse.Namespace, tmp: Path, broker: MosquittoServer, pg: PostgresServer) -> None:
    enable_commit_timestamps(pg)
    with psycopg.connect(pg.url(), autocommit=True) as conn:
        for n, rate in enumerate(args.rates):
            devices = max(1, rate // PER_DEVICE_PER_S)
            stack = start_stack(broker, pg, tmp, conn, devices)
            if not n:  # TimescaleDB's version once a schema has the extension
                print(f"machine: {machine(conn)}")
                print(
                    f"{args.runs} runs of {args.duration_s:.0f} s a rate, the first "
                    f"{args.warmup_s:.0f} s of each left out"
                )
            try:
                results = [
                    stack.run(
                        rate=rate,
                        duration_s=args.duration_s,
                        warmup_s=args.warmup_s,
                        seq_base=n * 1_000_000,
                    )
                    for n in range(args.runs)
                ]
            finally:
                stack.close()
            report(rate, devices, results)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rates", type=int, nargs="+", default=[2_000, 20_000])
    parser.add_argument("--duration-s", type=float, default=15.0)
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if args.duration_s <= args.warmup_s:
        parser.error("--duration-s must exceed --warmup-s")
    tmp = Path(tempfile.mkdtemp(prefix="cityhub-latency-"))
    tmp.chmod(0o755)
    broker, pg = start_servers(tmp)
    try:
        run(args, tmp, broker, pg)
    finally:
        pg.stop()
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
