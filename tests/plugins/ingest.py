"""Test helpers for ingest: registry rows, batches with a ledger, a gateway player, a TCP proxy.

``GatewayPlayer`` plays a site gateway on the real broker the way
``gateway.service`` does: it publishes encoded batches at QoS 1, listens on
its ack topic and resends every unacked batch, unchanged, after a timeout.
``TcpProxy`` sits between ingest and PostgreSQL so a test can cut the link
(connections closed, new ones refused) or hang it (bytes stop flowing,
sockets stay open) without touching the shared server.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion

from cityhub.localstack.mosquitto import ADMIN_USER, MosquittoServer
from contracts.catalog import DEVICE_TYPES, MetricKind
from contracts.ids import batch_id
from contracts.messages import Batch, ReadingBlock, decode_ack, encode_batch
from contracts.schema import readings_table
from contracts.settings import BrokerSettings, DatabaseSettings, IngestSettings
from contracts.topics import ack_topic, batch_topic
from ingest.service import Ingest
from tests.plugins.gateway import now_ms, service_in_thread, wait_for

Key = tuple[str, int, int]  # device_id, ts_ms, seq
Values = tuple[object, ...]  # as PostgreSQL returns them, in catalog metric order


# --- registry -------------------------------------------------------------------


def seed_registry(
    conn: psycopg.Connection, schema: str, owners: dict[str, Sequence[tuple[str, str]]]
) -> None:
    """A site, the gateways and their devices: ``{gateway_id: [(device_id, device_type)]}``."""
    conn.execute(
        f"INSERT INTO {schema}.sites (site_id, name, district, kind, latitude, longitude) "
        "VALUES ('hk-hall', 'Hoan Kiem service hall', 'Hoan Kiem', 'service_hall', 21.03, 105.85) "
        "ON CONFLICT DO NOTHING"
    )
    for gateway_id, devices in owners.items():
        conn.execute(
            f"INSERT INTO {schema}.gateways (gateway_id, site_id) VALUES (%s, 'hk-hall')",
            (gateway_id,),
        )
        for device_id, device_type in devices:
            conn.execute(
                f"INSERT INTO {schema}.devices (device_id, device_type, site_id, gateway_id, "
                "transport) VALUES (%s, %s, 'hk-hall', %s, 'mqtt')",
                (device_id, device_type, gateway_id),
            )


# --- batches and the ledger ---------------------------------------------------------


def value_for(kind: MetricKind, lo: float, hi: float, seq: int, index: int) -> float:
    """A valid value in [lo, hi], exact in float32 (multiples of 1/4), varying with seq."""
    if kind is MetricKind.BOOL:
        return float((seq + index) % 2)
    if kind in (MetricKind.INT, MetricKind.ENUM):
        return lo + float((seq * 7 + index) % (int(hi - lo) + 1))
    return lo + ((seq * 13 + index * 5) % int(min(hi - lo, 100) * 4)) / 4


def stored_value(kind: MetricKind, value: float | None) -> object:
    """What PostgreSQL gives back for ``value`` in the catalog's column type."""
    if value is None:
        return None
    if kind is MetricKind.BOOL:
        return bool(value)
    if kind in (MetricKind.INT, MetricKind.ENUM):
        return int(value)
    return float(np.float32(value))


@dataclass
class Ledger:
    """What was sent, per device type: {(device, ts_ms, seq): stored values}."""

    rows: dict[str, dict[Key, Values]] = field(default_factory=dict)

    def add(self, device_type: str, key: Key, values: dict[str, float | None]) -> None:
        dtype = DEVICE_TYPES[device_type]
        self.rows.setdefault(device_type, {})[key] = tuple(
            stored_value(m.kind, values.get(m.name)) for m in dtype.metrics
        )

    def count(self) -> int:
        return sum(len(r) for r in self.rows.values())


def make_batch(
    gateway_id: str,
    counter: int,
    devices: Sequence[tuple[str, str]],
    *,
    rows_per_device: int,
    boot_id: str = "boot1",
    start_seq: int = 0,
    base_ms: int | None = None,
    ledger: Ledger | None = None,
    drop_metric: str | None = None,
) -> Batch:
    """A batch with ``rows_per_device`` readings per device, recorded in ``ledger``."""
    # An hour back, 100 ms apart: 36,000 seqs stay in the past (the window
    # allows 5 minutes into the future).
    base = now_ms() - 3_600_000 if base_ms is None else base_ms
    names = [d for d, _ in devices]
    blocks = []
    for device_type in dict.fromkeys(t for _, t in devices):
        dtype = DEVICE_TYPES[device_type]
        index, seqs, ts, recv = [], [], [], []
        columns: dict[str, list[float | None]] = {
            m.name: [] for m in dtype.metrics if m.name != drop_metric
        }
        for device_index, (device_id, t) in enumerate(devices):
            if t != device_type:
                continue
            for i in range(rows_per_device):
                seq = start_seq + i
                ts_ms = base + seq * 100 + device_index
                index.append(device_index)
                seqs.append(seq)
                ts.append(ts_ms)
                recv.append(ts_ms + 5)
                values: dict[str, float | None] = {}
                for m_index, metric in enumerate(dtype.metrics):
                    if metric.name == drop_metric:
                        continue
                    # Every third row lacks its first metric: NULLs in the column.
                    value = (
                        None
                        if m_index == 0 and seq % 3 == 2
                        else value_for(metric.kind, metric.min, metric.max, seq, m_index)
                    )
                    columns[metric.name].append(value)
                    values[metric.name] = value
                if ledger is not None:
                    ledger.add(device_type, (device_id, ts_ms, seq), values)
        blocks.append(
            ReadingBlock(
                device_type=device_type,
                device_index=index,
                seq=seqs,
                ts_ms=ts,
                recv_ms=recv,
                values=columns,
            )
        )
    return Batch(
        batch_id=batch_id(gateway_id, boot_id, counter),
        gateway_id=gateway_id,
        boot_id=boot_id,
        sent_ms=now_ms(),
        devices=names,
        blocks=blocks,
        device_boot=[f"devboot-{i}" for i in range(len(names))],
    )


def stored_rows(
    conn: psycopg.Connection, schema: str, device_type: str
) -> list[tuple[Key, Values]]:
    """Every row of a readings table, as (key, values), duplicates kept."""
    dtype = DEVICE_TYPES[device_type]
    metrics = ", ".join(dtype.metric_names)
    rows = conn.execute(
        f"SELECT device_id, (extract(epoch FROM ts) * 1000)::bigint, seq, {metrics} "
        f"FROM {schema}.{readings_table(device_type)}"
    ).fetchall()
    return [((r[0], int(r[1]), int(r[2])), tuple(r[3:])) for r in rows]


def assert_table_equals_ledger(conn: psycopg.Connection, schema: str, ledger: Ledger) -> None:
    """Every table holds exactly the ledger's rows, each once."""
    for device_type in DEVICE_TYPES:
        rows = stored_rows(conn, schema, device_type)
        expected = ledger.rows.get(device_type, {})
        keys = [k for k, _ in rows]
        assert len(keys) == len(set(keys)), f"{device_type}: duplicate rows"
        count, distinct = cast(
            tuple[int, int],
            conn.execute(
                f"SELECT count(*), count(DISTINCT (device_id, ts, seq)) "
                f"FROM {schema}.{readings_table(device_type)}"
            ).fetchone(),
        )
        assert count == distinct == len(expected), (device_type, count, distinct, len(expected))
        assert dict(rows) == expected, device_type


# --- the gateway player -------------------------------------------------------------


class GatewayPlayer:
    """Publishes batches like a gateway and resends each until ingest acks it."""

    def __init__(
        self,
        server: MosquittoServer,
        *,
        gateway_id: str,
        prefix: str,
        resend_after_s: float = 2.0,
    ) -> None:
        self.gateway_id = gateway_id
        self.prefix = prefix
        self.resend_after_s = resend_after_s
        self.lock = threading.Lock()
        self.unacked: dict[str, tuple[bytes, float]] = {}  # batch id -> payload, last sent
        self.acked: set[str] = set()
        self.ack_messages: list[list[str]] = []
        self.ack_times: dict[str, float] = {}
        self.sends = 0
        self.subscribed = threading.Event()
        self._stop = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"player-{gateway_id}-{uuid.uuid4().hex[:6]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.username_pw_set(ADMIN_USER, server.admin_password)
        self.client.reconnect_delay_set(0.2, 1)  # type: ignore[arg-type]  # float seconds
        self.client.max_inflight_messages_set(1000)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.connect("127.0.0.1", server.port)
        self.client.loop_start()
        assert self.subscribed.wait(10), "player did not subscribe to its acks"
        self._resender = threading.Thread(target=self._resend_loop, daemon=True)
        self._resender.start()

    def _on_connect(self, c, _u, _f, _r, _p) -> None:
        c.subscribe(ack_topic(self.gateway_id, self.prefix), qos=1)

    def _on_message(self, _c, _u, message) -> None:
        ack = decode_ack(message.payload, gateway_id=self.gateway_id)
        now = time.monotonic()
        with self.lock:
            self.ack_messages.append(list(ack.batch_ids))
            for value in ack.batch_ids:
                self.acked.add(value)
                self.ack_times.setdefault(value, now)
                self.unacked.pop(value, None)

    def publish_raw(self, payload: bytes, *, track_as: str | None = None) -> None:
        """Publish a payload on the batch topic; tracked for resends if ``track_as`` is given."""
        with self.lock:
            if track_as is not None:
                self.unacked[track_as] = (payload, time.monotonic())
            self.sends += 1
        self.client.publish(batch_topic(self.gateway_id, self.prefix), payload, qos=1)

    def send(self, batch: Batch) -> bytes:
        payload = encode_batch(batch)
        self.publish_raw(payload, track_as=batch.batch_id)
        return payload

    def _resend_loop(self) -> None:
        while not self._stop.wait(0.1):
            now = time.monotonic()
            with self.lock:
                due = [
                    (key, payload)
                    for key, (payload, sent) in self.unacked.items()
                    if now - sent >= self.resend_after_s
                ]
            for key, payload in due:
                with self.lock:
                    if key not in self.unacked:
                        continue
                    self.unacked[key] = (payload, now)
                    self.sends += 1
                self.client.publish(batch_topic(self.gateway_id, self.prefix), payload, qos=1)

    def pending(self) -> int:
        with self.lock:
            return len(self.unacked)

    def close(self) -> None:
        self._stop.set()
        self._resender.join(5)
        self.client.disconnect()
        self.client.loop_stop()


# --- running ingest ---------------------------------------------------------------


def ingest_settings(prefix: str, **overrides: object) -> IngestSettings:
    values: dict[str, object] = {
        "topic_prefix": prefix,
        "max_delay_ms": 20,
        "stats_interval_s": 0.0,
        "retry_min_s": 0.1,
        "retry_max_s": 1.0,
        "commit_timeout_s": 5.0,
        "queue_max_messages": 64,
        "max_batches_per_commit": 16,
    }
    values.update(overrides)
    return IngestSettings(**values)  # type: ignore[arg-type]


@contextmanager
def ingest_in_thread(
    *,
    settings: IngestSettings,
    broker: BrokerSettings,
    database: DatabaseSettings,
    worker_id: str = "w0",
) -> Iterator[Ingest]:
    """Run an ingest worker in its own thread and event loop; stop it cleanly on exit."""
    worker = Ingest(settings=settings, broker=broker, database=database, worker_id=worker_id)
    with service_in_thread(worker.run, name=f"ingest-{worker_id}"):
        wait_for(worker.subscriber.subscribed.is_set, 10, "ingest subscription")
        if worker.state_subscriber is not None:
            wait_for(worker.state_subscriber.subscribed.is_set, 10, "state subscription")
        if worker.downlink is not None:
            wait_for(worker.downlink.subscriber.subscribed.is_set, 10, "report subscription")
        yield worker


def write_config(
    path: Path,
    *,
    server: MosquittoServer,
    db_url: str,
    schema: str,
    settings: IngestSettings,
    host: str = "127.0.0.1",
) -> Path:
    """A TOML settings file for `python -m ingest`, the broker at ``host``."""
    lines = [
        "[broker]",
        f'host = "{host}"',
        f"port = {server.port}",
        f'username = "{ADMIN_USER}"',
        f'password = "{server.admin_password}"',
        "[database]",
        f'url = "{db_url}"',
        f'schema = "{schema}"',
        "connect_timeout_s = 2.0",
        "[ingest]",
    ]
    for name in IngestSettings.__struct_fields__:
        value = getattr(settings, name)
        lines.append(f'{name} = "{value}"' if isinstance(value, str) else f"{name} = {value}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def start_ingest_process(config: Path, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "ingest", "--config", str(config), *extra],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if not k.startswith("CITYHUB_")},
        )


@contextmanager
def ingest_subscribed(
    workdir: Path, *, server: MosquittoServer, db_url: str, schema: str, prefix: str
) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m ingest` on ``schema``, yielded once it has subscribed; SIGTERM at the end."""
    config = write_config(
        workdir / "ingest.toml",
        server=server,
        db_url=db_url,
        schema=schema,
        settings=ingest_settings(prefix),
    )
    log = workdir / "ingest.log"
    proc = start_ingest_process(config, log)
    try:
        wait_for(lambda: "subscribed to" in log.read_text(), 20, "ingest subscribed")
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def scrape(port: int, host: str = "127.0.0.1") -> dict[str, float]:
    """Prometheus text exposition -> {'name{labels}': value}."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


# --- a TCP proxy the test can cut -------------------------------------------------------


class TcpProxy:
    """127.0.0.1:port -> target, forwarding in threads; ``cut``, ``hang`` and ``restore``.

    cut: every connection is closed and new ones are refused (a stopped server).
    hang: bytes stop flowing both ways, sockets stay open, new connections are
    accepted but never answered (a hung server or a black-holed network).
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.mode = "up"
        self.lock = threading.Lock()
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.accepted = 0
        self._listener: socket.socket | None = None
        self.port = 0
        self._stop = threading.Event()
        self._listen()

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept_loop, args=(listener,), daemon=True).start()

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            self.accepted += 1
            if self.mode == "hang":
                with self.lock:
                    self.pairs.append((client, client))  # held open, never answered
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while not self._stop.is_set():
                if self.mode == "hang":
                    time.sleep(0.05)
                    continue
                readable, _, _ = select.select([a, b], [], [], 0.1)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (b if sock is a else a).sendall(data)
        except (OSError, ValueError):
            return
        finally:
            for sock in (a, b):
                with contextlib.suppress(OSError):
                    sock.close()

    def _close_all(self) -> None:
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for a, b in pairs:
            for sock in (a, b):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            # close() alone leaves a thread blocked in accept() accepting on
            # Linux; shutdown() wakes it.
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()

    def cut(self) -> None:
        self.mode = "cut"
        self._close_listener()
        self._close_all()

    def hang(self) -> None:
        self.mode = "hang"

    def restore(self) -> None:
        if self.mode == "hang":
            self._close_all()  # what hung is lost, as after a real network failure
        self.mode = "up"
        if self._listener is None:
            self._listen()

    def close(self) -> None:
        self._stop.set()
        self._close_listener()
        self._close_all()


def proxied_url(db_url: str, proxy: TcpProxy) -> str:
    head, _, rest = db_url.rpartition("@")
    _, _, dbname = rest.partition("/")
    return f"{head}@127.0.0.1:{proxy.port}/{dbname}"
