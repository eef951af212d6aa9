"""Ingest throughput: batches -> broker -> ingest workers -> TimescaleDB, against the COPY ceiling.

Starts a private Mosquitto and a private PostgreSQL/TimescaleDB (fsync on, as
deployed), migrates a schema and registers gateways with air-quality
monitors. In the same run it measures:

- the raw binary COPY ceiling: the same readings, pre-encoded, COPYed
  straight into ``readings_air_quality_data`` (device keys, 32k rows a transaction);
- ingest's database path alone: ``BatchWriter.commit`` of pre-built batches
  in groups of 64 (stage COPY + INSERT ... ON CONFLICT + bookkeeping);
- end to end: a publisher process sends pre-encoded 500-row batches at QoS 1
  as fast as the broker takes them; `python -m ingest` with 1 and 2 workers
  commits and acks them; readings/s from the first publish to the last ack;
- optionally, the worker's RSS while it drains a backlog queued while it was
  stopped (SIGSTOP), with Receive Maximum bounding what it holds.

Medians of ``--runs`` runs; prints a table and the machine.

    .venv/bin/python bench/bench_ingest.py [--batches 400] [--runs 3] [--backlog 2000]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion

from cityhub import database
from cityhub.localstack.mosquitto import ADMIN_USER, MosquittoServer
from cityhub.localstack.postgres import PostgresServer, find_pg_bindir
from cityhub.localstack.procs import free_port, run_as_for
from contracts.ids import batch_id
from contracts.messages import Batch, ReadingBlock, decode_ack, encode_batch
from contracts.settings import IngestSettings, StorageSettings
from contracts.topics import batch_topic, gateway_filter
from ingest.copyformat import encode_copy_binary
from ingest.prepare import GoodBatch
from ingest.rows import build_rows, concat_rows
from ingest.writer import BatchWriter, copy_columns

ROWS_PER_BATCH = 500
DEVICES_PER_GATEWAY = 50  # 10 readings per device per batch
GATEWAYS = 8
COPY_CHUNK_ROWS = 32_000  # ingest's default max_rows_per_commit
GROUP_BATCHES = 64  # ingest's default max_batches_per_commit

PUBLISHER = textwrap.dedent(
    """
    import sys, time, struct
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    port, user, password, path = sys.argv[1:5]
    data = open(path, "rb").read()
    messages, pos = [], 0
    while pos < len(data):
        tlen, plen = struct.unpack_from(">HI", data, pos); pos += 6
        topic = data[pos:pos + tlen].decode(); pos += tlen
        messages.append((topic, data[pos:pos + plen])); pos += plen
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-publisher",
                    protocol=mqtt.MQTTv5)
    c.username_pw_set(user, password)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", int(port))
    c.loop_start()
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.perf_counter()
    infos = [c.publish(topic, payload, qos=1) for topic, payload in messages]
    for info in infos:
        info.wait_for_publish(600)
    print(f"published {len(messages)} in {time.perf_counter() - t0:.3f} s", flush=True)
    c.disconnect()
    c.loop_stop()
    """
)


def gateways_and_devices(tag: str) -> dict[str, list[str]]:
    return {
        f"gw-{tag}-{g}": [f"aq-{tag}-{g}-{d:02d}" for d in range(DEVICES_PER_GATEWAY)]
        for g in range(GATEWAYS)
    }


def make_batches(fleet: dict[str, list[str]], count: int, boot: str, base_ms: int) -> list[Batch]:
    """``count`` 500-row air-quality batches, spread over the gateways; fixed values."""
    rng = np.random.default_rng(7)
    per_device = ROWS_PER_BATCH // DEVICES_PER_GATEWAY
    gateways = list(fleet)
    batches = []
    for n in range(count):
        gw = gateways[n % len(gateways)]
        round_ = n // len(gateways)
        index = [d for d in range(DEVICES_PER_GATEWAY) for _ in range(per_device)]
        seq = [
            round_ * per_device + k for _ in range(DEVICES_PER_GATEWAY) for k in range(per_device)
        ]
        ts = [base_ms + s * 1000 for s in seq]
        values: dict[str, list[float | None]] = {
            name: [float(v) for v in np.round(rng.uniform(lo, hi, ROWS_PER_BATCH), 1)]
            for name, lo, hi in (
                ("pm1", 5, 80),
                ("pm25", 10, 150),
                ("pm10", 20, 250),
                ("co2", 400, 1500),
                ("no2", 10, 200),
                ("o3", 10, 180),
                ("temperature", 18, 38),
                ("humidity", 40, 95),
            )
        }
        block = ReadingBlock(
            device_type="air_quality",
            device_index=index,
            seq=seq,
            ts_ms=ts,
            recv_ms=[t + 50 for t in ts],
            values=values,
        )
        batches.append(
            Batch(
                batch_id=batch_id(gw, boot, n),
                gateway_id=gw,
                boot_id=boot,
                sent_ms=int(time.time() * 1000),
                devices=fleet[gw],
                blocks=[block],
            )
        )
    return batches


def seed(conn: psycopg.Connection, schema: str, fleet: dict[str, list[str]]) -> None:
    conn.execute(
        f"INSERT INTO {schema}.sites (site_id, name, district, kind, latitude, longitude) "
        "VALUES ('bench', 'bench', 'Ba Dinh', 'street_monitor', 21.03, 105.83)"
    )
    for gw, devices in fleet.items():
        conn.execute(
            f"INSERT INTO {schema}.gateways (gateway_id, site_id) VALUES (%s, 'bench')", (gw,)
        )
        with conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {schema}.devices (device_id, device_type, site_id, gateway_id, "
                "transport) VALUES (%s, 'air_quality', 'bench', %s, 'mqtt')",
                [(d, gw) for d in devices],
            )


def reset(conn: psycopg.Connection, schema: str) -> None:
    conn.execute(
        f"TRUNCATE {schema}.readings_air_quality_data, {schema}.ingested_batches, "
        f"{schema}.device_state, {schema}.rejects"
    )


def copy_ceiling(
    conn: psycopg.Connection, schema: str, batches: list[Batch], owners: dict[str, str | None]
) -> float:
    """Rows/s of pre-encoded binary COPY straight into the hypertable, 32k rows a commit.

    The hypertable's own layout (migration 22): device keys and receive delays
    are computed before the clock starts, like the rest of the encoding.
    """
    keys: dict[str, int] = {
        str(d): int(k)
        for d, k in conn.execute(f"SELECT device_id, device_key FROM {schema}.device_keys")
    }
    tables = [
        build_rows(b, owners=owners, now_ms=int(time.time() * 1000)).tables["air_quality"]
        for b in batches
    ]
    per_chunk = COPY_CHUNK_ROWS // ROWS_PER_BATCH
    streams = []
    for start in range(0, len(tables), per_chunk):
        rows = concat_rows(tables[start : start + per_chunk])
        device_keys = np.array([keys[d] for d in rows.device_ids], dtype=np.int64)
        keyed = copy_columns(rows, device_keys)
        streams.append(encode_copy_binary(keyed, rows.row_count))
    total = sum(t.row_count for t in tables)
    columns = (
        "ts, seq, device_key, recv_delay_ms, pm1, pm25, pm10, co2, no2, o3, temperature, humidity"
    )
    sql = f"COPY {schema}.readings_air_quality_data ({columns}) FROM STDIN (FORMAT BINARY)"
    t0 = time.perf_counter()
    for stream in streams:
        with conn.transaction(), conn.cursor() as cur, cur.copy(sql) as copy:
            copy.write(stream)
    return total / (time.perf_counter() - t0)


def writer_path(url: str, schema: str, batches: list[Batch]) -> float:
    """Rows/s of BatchWriter.commit on pre-built batches, groups of 64 (no broker)."""
    writer = BatchWriter(url=url, schema=schema, worker_id="bench")
    writer.refresh_owners()
    now = int(time.time() * 1000)
    items = [
        GoodBatch.build(
            topic="t",
            batch=b,
            rows=build_rows(b, owners=writer.owners, now_ms=now),
            payload=b"",
            owners=writer.owners,
        )
        for b in batches
    ]
    t0 = time.perf_counter()
    written = 0
    for start in range(0, len(items), GROUP_BATCHES):
        written += writer.commit(items[start : start + GROUP_BATCHES]).readings
    elapsed = time.perf_counter() - t0
    writer.close()
    if written != len(batches) * ROWS_PER_BATCH:
        raise SystemExit(f"writer stored {written} readings, expected {len(batches) * 500}")
    return written / elapsed


class AckCounter:
    """Counts the batch ids acked on every gateway's ack topic, and when the last came."""

    def __init__(self, server: MosquittoServer, prefix: str) -> None:
        self.ids: set[str] = set()
        self.last_s = 0.0
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"acks-{uuid.uuid4().hex[:6]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.username_pw_set(ADMIN_USER, server.admin_password)
        self.client.on_connect = lambda c, *_: c.subscribe(gateway_filter("ack", prefix), qos=1)
        self.client.on_subscribe = lambda *_: self.ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", server.port)
        self.client.loop_start()
        if not self.ready.wait(10):
            raise SystemExit("ack subscription failed")

    def _on_message(self, _c: object, _u: object, message: mqtt.MQTTMessage) -> None:
        ack = decode_ack(bytes(message.payload))
        with self.lock:
            self.ids.update(ack.batch_ids)
            self.last_s = time.perf_counter()

    def count(self) -> int:
        with self.lock:
            return len(self.ids)

    def clear(self) -> None:
        with self.lock:
            self.ids.clear()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def write_messages(path: Path, batches: list[Batch], prefix: str) -> int:
    """The publisher's input: (topic, payload) records; returns the file size."""
    out = bytearray()
    for b in batches:
        topic = batch_topic(b.gateway_id, prefix).encode()
        payload = encode_batch(b)
        out += len(topic).to_bytes(2, "big") + len(payload).to_bytes(4, "big") + topic + payload
    path.write_bytes(bytes(out))
    return len(out)


def wait(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.01)


@dataclass
class Rig:
    """The servers, the schema and the files of one benchmark run."""

    broker: MosquittoServer
    conn: psycopg.Connection
    url: str
    schema: str
    acks: AckCounter
    config: Path
    log: Path
    messages: Path

    def start_publisher(self) -> subprocess.Popen[str]:
        """A publisher process, connected and waiting for a line on stdin to start."""
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                PUBLISHER,
                str(self.broker.port),
                ADMIN_USER,
                self.broker.admin_password,
                str(self.messages),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        if proc.stdout is None or proc.stdout.readline().strip() != "ready":
            raise SystemExit("publisher did not start")
        return proc

    def start_ingest(self, workers: int) -> subprocess.Popen[bytes]:
        return start_ingest(self.config, self.log, workers)

    def end_to_end(self, batches: int) -> tuple[float, float, float]:
        """(readings/s, first publish to last ack; publisher batches/s; batches a commit)."""
        reset(self.conn, self.schema)
        self.acks.clear()
        publisher = self.start_publisher()
        t0 = time.perf_counter()
        go(publisher)
        wait(lambda: self.acks.count() >= batches, 600, "all batches acked")
        elapsed = self.acks.last_s - t0
        out, _ = publisher.communicate(timeout=60)
        fields = out.split()
        pub_rate = int(fields[1]) / float(fields[3])
        stored = self.conn.execute(
            f"SELECT count(*) FROM {self.schema}.readings_air_quality"
        ).fetchone()
        if stored is None or stored[0] != batches * ROWS_PER_BATCH:
            raise SystemExit(f"stored {stored} readings, expected {batches * ROWS_PER_BATCH}")
        return (
            batches * ROWS_PER_BATCH / elapsed,
            pub_rate,
            batches_per_commit(self.conn, self.schema),
        )

    def backlog_rss(self, batches: int) -> tuple[int, int, float]:
        """(idle RSS KiB, peak RSS KiB while draining, readings/s) of one worker.

        The worker is stopped (SIGSTOP) while the backlog is published, so
        the broker queues it in the worker's shared-subscription session.
        """
        reset(self.conn, self.schema)
        self.acks.clear()
        proc = self.start_ingest(1)
        time.sleep(1.0)
        idle = rss_kib(proc.pid)
        os.kill(proc.pid, signal.SIGSTOP)
        publisher = self.start_publisher()
        go(publisher)
        publisher.wait(300)
        peak = 0
        t0 = time.perf_counter()
        os.kill(proc.pid, signal.SIGCONT)
        while self.acks.count() < batches:
            peak = max(peak, rss_kib(proc.pid))
            time.sleep(0.05)
            if time.perf_counter() - t0 > 600:
                raise SystemExit("backlog not drained")
        rate = batches * ROWS_PER_BATCH / (self.acks.last_s - t0)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        return idle, peak, rate


def start_ingest(config: Path, log: Path, workers: int) -> subprocess.Popen[bytes]:
    """`python -m ingest` with ``workers`` workers, once each has subscribed."""
    before = log.read_text().count("subscribed to") if log.exists() else 0
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                *("-m", "ingest", "--config", str(config)),
                *("--workers", str(workers)),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[1],
            env={k: v for k, v in os.environ.items() if not k.startswith("CITYHUB_")},
        )
    wait(
        lambda: log.read_text().count("subscribed to") >= before + workers,
        60,
        "ingest subscribed",
    )
    return proc


def batches_per_commit(conn: psycopg.Connection, schema: str) -> float:
    """Batches a commit since the last reset: each transaction stamps its own committed_at."""
    row = conn.execute(
        f"SELECT count(*), count(DISTINCT committed_at) FROM {schema}.ingested_batches"
    ).fetchone()
    return 0.0 if row is None or not row[1] else row[0] / row[1]


def go(publisher: subprocess.Popen[str]) -> None:
    if publisher.stdin is None:
        raise SystemExit("publisher has no stdin")
    publisher.stdin.write("go\n")
    publisher.stdin.flush()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def database_machine(conn: psycopg.Connection) -> str:
    """The host, its CPU, Python and the server behind ``conn`` with its TimescaleDB edition."""
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    pg = conn.execute("SHOW server_version").fetchone()
    ts = conn.execute(
        "SELECT extversion, current_setting('timescaledb.license') "
        "FROM pg_extension WHERE extname = 'timescaledb'"
    ).fetchone()
    return (
        f"{platform.system()} {platform.release()} {platform.machine()}, "
        f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
        f"PostgreSQL {pg[0] if pg else '?'} + TimescaleDB {ts[0] if ts else '?'} "
        f"({ts[1] if ts else '?'} edition, fsync on)"
    )


def machine(conn: psycopg.Connection) -> str:
    """``database_machine`` and the Mosquitto version."""
    mosquitto = shutil.which("mosquitto") or "mosquitto"
    mosq = subprocess.run([mosquitto, "-h"], capture_output=True, text=True, check=False)
    return (
        f"{database_machine(conn)}, {mosq.stdout.splitlines()[0] if mosq.stdout else 'mosquitto ?'}"
    )


def ingest_config(path: Path, broker: MosquittoServer, url: str, schema: str, prefix: str) -> None:
    """Default ingest settings, on the bench's broker, database and topic prefix."""
    settings = IngestSettings(topic_prefix=prefix)
    lines = [
        'log_level = "INFO"',
        "[broker]",
        'host = "127.0.0.1"',
        f"port = {broker.port}",
        f'username = "{ADMIN_USER}"',
        f'password = "{broker.admin_password}"',
        "[database]",
        f'url = "{url}"',
        f'schema = "{schema}"',
        "[ingest]",
    ]
    for name in IngestSettings.__struct_fields__:
        value = getattr(settings, name)
        lines.append(f'{name} = "{value}"' if isinstance(value, str) else f"{name} = {value}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({' / '.join(f'{v:,.0f}' for v in values)})"


def report(
    ceilings: list[float], writers: list[float], e2e: dict[int, list[tuple[float, float, float]]]
) -> None:
    ceiling = statistics.median(ceilings)
    print()
    print("| measure | readings/s, median (runs) | x COPY ceiling |")
    print("|---|---|---|")
    print(
        f"| raw binary COPY into readings_air_quality_data, 32k rows a commit "
        f"| {fmt(ceilings)} | 1.00 |"
    )
    print(
        "| BatchWriter.commit, 64 batches a group (stage COPY + INSERT + bookkeeping) "
        f"| {fmt(writers)} | {statistics.median(writers) / ceiling:.2f} |"
    )
    for workers, results in e2e.items():
        rates = [r for r, _, _ in results]
        plural = "s" if workers > 1 else ""
        print(
            f"| end to end, {workers} worker{plural} (publish -> broker -> ingest -> ack) "
            f"| {fmt(rates)} | {statistics.median(rates) / ceiling:.2f} |"
        )
    print()
    for workers, results in e2e.items():
        groups = [g for _, _, g in results]
        print(
            f"batches a commit, {workers} worker(s): {statistics.median(groups):.1f} "
            f"({' / '.join(f'{g:.1f}' for g in groups)})"
        )
    pubs = statistics.median([p for results in e2e.values() for _, p, _ in results])
    print(
        f"publisher alone: {pubs:,.0f} batches/s ({pubs * ROWS_PER_BATCH:,.0f} readings/s offered)"
    )


def start_servers(tmp: Path) -> tuple[MosquittoServer, PostgresServer]:
    is_root = os.geteuid() == 0
    broker = MosquittoServer(
        base_dir=tmp / "mosquitto",
        port=free_port(),
        run_as=run_as_for("mosquitto", is_root=is_root),
        dev_mode=False,
    )
    pg = PostgresServer(
        base_dir=tmp / "postgres",
        port=free_port(),
        bindir=find_pg_bindir(),
        run_as=run_as_for("postgres", is_root=is_root),
        password_file=tmp / "postgres.password",
        durable=True,
    )
    broker.start()
    pg.start()
    return broker, pg


def run(args: argparse.Namespace, tmp: Path, broker: MosquittoServer, pg: PostgresServer) -> None:
    url, schema, tag = pg.url(), "bench", uuid.uuid4().hex[:4]
    prefix = f"b{tag}"
    conn = psycopg.connect(url, autocommit=True)
    database.migrate(conn, schema=schema, storage=StorageSettings())
    fleet = gateways_and_devices(tag)
    seed(conn, schema, fleet)
    owners: dict[str, str | None] = {d: gw for gw, ds in fleet.items() for d in ds}
    base_ms = int(time.time() * 1000) - 6 * 3600 * 1000
    batches = make_batches(fleet, args.batches, "run", base_ms)
    print(f"machine: {machine(conn)}")
    print(f"{args.batches} batches x {ROWS_PER_BATCH} air-quality rows a run")

    ceilings, writers = [], []
    for _ in range(args.runs):
        reset(conn, schema)
        ceilings.append(copy_ceiling(conn, schema, batches, owners))
        reset(conn, schema)
        writers.append(writer_path(url, schema, batches))

    messages = tmp / "messages.bin"
    size = write_messages(messages, batches, prefix)
    print(f"encoded: {size / len(batches) / 1024:.1f} KiB a batch")
    config = tmp / "ingest.toml"
    ingest_config(config, broker, url, schema, prefix)
    rig = Rig(
        broker, conn, url, schema, AckCounter(broker, prefix), config, tmp / "ingest.log", messages
    )
    e2e: dict[int, list[tuple[float, float, float]]] = {}
    for workers in (1, 2):
        proc = rig.start_ingest(workers)
        try:
            e2e[workers] = [rig.end_to_end(args.batches) for _ in range(args.runs)]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    report(ceilings, writers, e2e)

    if args.backlog:
        big = make_batches(fleet, args.backlog, "backlog", base_ms)
        size = write_messages(messages, big, prefix)
        idle, peak, rate = rig.backlog_rss(args.backlog)
        print(
            f"backlog: {args.backlog} batches ({args.backlog * ROWS_PER_BATCH:,} readings, "
            f"{size / 2**20:.0f} MiB) published while 1 worker was stopped; "
            f"RSS idle {idle / 1024:.0f} MiB, peak while draining {peak / 1024:.0f} MiB, "
            f"drained at {rate:,.0f} readings/s "
            f"(queue_max_messages {IngestSettings().queue_max_messages})"
        )
    rig.acks.close()
    conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, default=400, help="500-row batches per run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--backlog", type=int, default=2000, help="batches for the RSS run; 0: skip"
    )
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cityhub-bench-"))
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
