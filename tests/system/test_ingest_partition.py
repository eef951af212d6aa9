"""Two ingest hosts in network namespaces; one is cut off from broker and database for 60 s.

Each ingest "host" is a real `python -m ingest` in a network namespace of its
own (a veth pair, a /30 from 10.203.0.0/16, loopback up) and a UTS namespace
of its own (its host name, hence its worker id ``{host}-0`` in ingest_stats).
The test's own Mosquitto and PostgreSQL(+TimescaleDB) listen on loopback and
on the veth pairs' host-side addresses; the two workers share the batch
stream through the MQTT v5 shared subscription. Two real gateway processes
(SQLite outboxes) carry readings from simulated MQTT devices; the devices'
ledger is every reading published.

The cut is a black hole, not a clean close: both ends of host A's veth pair
get a permanent neighbour entry with a MAC address nobody has, so every frame
between A and the root namespace is dropped by the receiving side. No RST, no
ICMP, no error on send: established connections (A's MQTT links, its database
connection) hang, and new ones hang in SYN_SENT, as they would behind a dead
switch. (netem and nftables are the usual tools; this machine's kernel has no
netem qdisc and nft is not installed, while ``ip neigh`` needs nothing else.)
After CUT_S the entries are removed and ARP finds the real peers again.

Asserted: every reading is in the database exactly once; host B committed
readings during the cut; host A reconnects to the broker and commits again
after the heal. Measured and printed (``-s``): when the broker dropped A's
connections (its keepalive, 1.5 x 30 s), the outbox depth's peak and when the
backlog was back down, i.e. host B carried the whole load.

Test settings, and what production values do differently: gateway
ack_timeout_s 3 s (production 15 s: the batches the shared subscription
handed to the dead host wait up to 15 s for each resend instead of 3, so the
outbox holds about five times as much meanwhile); ingest commit_timeout_s
5 s (production 30 s: a hung database call on the cut host, and with it the
server-side transaction it may hold, is given up after 30 s); a stats row
every second (production 10 s). The ingest's MQTT keepalive is the
production 30 s: Mosquitto drops the dead client 1.5 x 30 s after its last
packet, and until then the shared subscription still hands it its share of
new and resent batches, which only a later resend gets to B. Measured here
(2 cores, 50 readings/s): the broker dropped A's batch link 46-47 s into the
cut, the outboxes held a median ~130 readings (peak 140) until then, and
were back to their pre-cut depth (<= 10) about 3 s later (one ack timeout);
A reconnected within a second of the heal and committed again ~1 s after.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
import pytest

from cityhub import database
from cityhub.localstack.mosquitto import MosquittoServer
from cityhub.localstack.postgres import PostgresServer
from cityhub.localstack.procs import free_port, run_as_for
from contracts.messages import DeviceConfig, GatewayState, decode_gateway_state
from contracts.schema import readings_table
from contracts.settings import StorageSettings
from contracts.topics import state_topic
from tests.gateway.test_faults import gateway_config_file, start_gateway_process
from tests.plugins.gateway import client, mqtt_devices, publish_config, publish_readings, wait_for
from tests.plugins.ingest import ingest_settings, seed_registry, write_config
from tests.plugins.servers import IS_ROOT, mosquitto_server

pytestmark = pytest.mark.slow

SCHEMA = "cityhub"
CUT_S = 60  # the figure
STATS_INTERVAL_S = 1.0  # a stats row a second, so the rows show the cut to the second
ACK_TIMEOUT_S = 3.0  # gateway resend timeout; production 15 s (module docstring)
DEVICES_PER_GATEWAY = 5
# One reading per device every 0.2 s: 50 readings/s in all, a steady trickle
# of small batches (batch_max_rows 20) for both hosts to share.
FEED_PERIOD_S = 0.2
# A MAC address no interface has (locally administered bit set).
NOWHERE_MAC = "02:00:5e:00:de:ad"


IP = shutil.which("ip") or "/usr/sbin/ip"
UNSHARE = shutil.which("unshare") or "/usr/bin/unshare"


def _run(*argv: str) -> str:
    if argv[0] == "ip":
        argv = (IP, *argv[1:])
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


@dataclass(frozen=True)
class Host:
    """An ingest host: a network namespace on a veth pair, and its UTS host name."""

    netns: str
    hostname: str
    host_if: str  # the root namespace's end
    ns_if: str  # the namespace's end
    host_ip: str
    ns_ip: str

    def cut(self) -> None:
        """Black-hole the link both ways (frames to a MAC address nobody has)."""
        _run("ip", "neigh", "replace", self.ns_ip, "lladdr", NOWHERE_MAC, "dev", self.host_if,
             "nud", "permanent")  # fmt: skip
        _run("ip", "netns", "exec", self.netns, "ip", "neigh", "replace", self.host_ip, "lladdr",
             NOWHERE_MAC, "dev", self.ns_if, "nud", "permanent")  # fmt: skip

    def heal(self) -> None:
        _run("ip", "neigh", "del", self.ns_ip, "dev", self.host_if)
        _run(
            "ip", "netns", "exec", self.netns, "ip", "neigh", "del", self.host_ip, "dev", self.ns_if
        )


def _free_third_octets(count: int) -> list[int]:
    """Third octets X with no 10.203.X.0/24 address on this machine yet."""
    used = set(re.findall(r"inet 10\.203\.(\d+)\.", _run("ip", "-4", "-o", "addr")))
    free = [x for x in range(256) if str(x) not in used]
    return random.sample(free, count)


def _host(tag: str, letter: str, octet: int) -> Host:
    return Host(
        netns=f"cityhub-{tag}-{letter}",
        hostname=f"ingest-{letter}-{tag}",
        host_if=f"vh{tag}{letter}",  # interface names: 15 characters at most
        ns_if=f"vn{tag}{letter}",
        host_ip=f"10.203.{octet}.1",
        ns_ip=f"10.203.{octet}.2",
    )


def _create(host: Host) -> None:
    _run("ip", "netns", "add", host.netns)
    _run("ip", "link", "add", host.host_if, "type", "veth", "peer", "name", host.ns_if)
    _run("ip", "link", "set", host.ns_if, "netns", host.netns)
    _run("ip", "addr", "add", f"{host.host_ip}/30", "dev", host.host_if)
    _run("ip", "link", "set", host.host_if, "up")
    inside = ("ip", "netns", "exec", host.netns, "ip")
    _run(*inside, "addr", "add", f"{host.ns_ip}/30", "dev", host.ns_if)
    _run(*inside, "link", "set", host.ns_if, "up")
    _run(*inside, "link", "set", "lo", "up")


def _remove(host: Host) -> None:
    """Delete the namespace (which deletes its veth end, and so the pair) and the pair."""
    subprocess.run([IP, "netns", "del", host.netns], capture_output=True, check=False)
    subprocess.run([IP, "link", "del", host.host_if], capture_output=True, check=False)


@pytest.fixture
def hosts() -> Iterator[tuple[Host, Host]]:
    """Two namespaced hosts, names unique to this run; removed even when the test fails."""
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} (iproute2 / util-linux) missing: needed for network namespaces")
    if not IS_ROOT:
        pytest.skip("network namespaces need CAP_NET_ADMIN (run as root)")
    tag = uuid.uuid4().hex[:6]
    a, b = (_host(tag, letter, x) for letter, x in zip("ab", _free_third_octets(2), strict=True))
    try:
        try:
            _create(a)
            _create(b)
        except RuntimeError as exc:
            if "Operation not permitted" in str(exc):
                pytest.skip(f"network namespaces need CAP_NET_ADMIN: {exc}")
            raise
        yield a, b
    finally:
        _remove(a)
        _remove(b)


@pytest.fixture
def servers(
    hosts: tuple[Host, Host], servers_dir: Path, pg_bindir: Path, mosquitto_bin: str
) -> Iterator[tuple[MosquittoServer, PostgresServer]]:
    """This test's own broker and database, on loopback and on both hosts' veth addresses."""
    tag = uuid.uuid4().hex[:6]
    broker = mosquitto_server(servers_dir / f"mosquitto-netns-{tag}", binary=mosquitto_bin)
    broker.extra_hosts = tuple(h.host_ip for h in hosts)
    pg = PostgresServer(
        base_dir=servers_dir / f"postgres-netns-{tag}",
        port=free_port(),
        bindir=pg_bindir,
        run_as=run_as_for("postgres", is_root=IS_ROOT),
        password_file=servers_dir / f"postgres-netns-{tag}.password",
        durable=False,
        extra_listen=tuple(f"{h.host_ip}/30" for h in hosts),
    )
    try:
        broker.start()
        pg.start()
        with psycopg.connect(pg.url(), autocommit=True) as conn:
            database.migrate(conn, schema=SCHEMA, storage=StorageSettings())
        yield broker, pg
    finally:
        broker.stop()
        pg.stop()


def start_ingest_on(host: Host, config: Path, log: Path) -> subprocess.Popen[bytes]:
    """`python -m ingest` inside the host's network namespace, under its own host name."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [
                *(IP, "netns", "exec", host.netns, UNSHARE, "--uts", "--"),
                *("sh", "-c", 'hostname "$0" && exec "$@"', host.hostname),
                *(sys.executable, "-m", "ingest", "--config", str(config)),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if not k.startswith("CITYHUB_")},
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@dataclass
class Depths:
    """Every gateway's last reported outbox depth (readings), sampled into a time series."""

    last: dict[str, int] = field(default_factory=dict)
    ready: set[str] = field(default_factory=set)
    samples: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, total)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_state(self, state: GatewayState) -> None:
        with self.lock:
            self.last[state.gateway_id] = state.outbox_readings
            if state.site_ready:
                self.ready.add(state.gateway_id)

    def sample(self) -> int:
        with self.lock:
            total = sum(self.last.values())
            self.samples.append((time.monotonic(), total))
        return total


def watch_depths(c: mqtt.Client, gateway_ids: list[str], prefix: str) -> Depths:
    depths = Depths()

    def on_message(_c: object, _u: object, message: mqtt.MQTTMessage) -> None:
        if message.payload:
            depths.on_state(decode_gateway_state(bytes(message.payload)))

    c.on_message = on_message
    for gateway_id in gateway_ids:
        c.subscribe(state_topic(gateway_id, prefix), qos=1)
    return depths


class Feeder:
    """Simulated devices: one reading per device per period until stopped; the ledger."""

    def __init__(self, c: mqtt.Client, prefix: str, devices: list[DeviceConfig]) -> None:
        self.client = c
        self.prefix = prefix
        self.devices = devices
        self.sent: set[tuple[str, int, int]] = set()
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="feeder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        seq = 0
        while not self._stop.wait(FEED_PERIOD_S):
            sent = publish_readings(
                self.client, prefix=self.prefix, devices=self.devices, per_device=1, start_seq=seq
            )
            seq += 1
            with self.lock:
                self.sent |= sent

    def stop(self) -> set[tuple[str, int, int]]:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "feeder did not stop"
        with self.lock:
            return set(self.sent)


def stats(conn: psycopg.Connection, worker_id: str, since_s: float) -> tuple[int, int, int]:
    """(stats rows, readings, commits) of a worker since the wall-clock time ``since_s``."""
    row = conn.execute(
        f"SELECT count(*), coalesce(sum(readings), 0), coalesce(sum(commits), 0) "
        f"FROM {SCHEMA}.ingest_stats WHERE worker_id = %s AND ts >= to_timestamp(%s)",
        (worker_id, since_s),
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def stats_between(
    conn: psycopg.Connection,
    worker_id: str,
    start_s: float,
    end_s: float,
    *,
    max_interval_s: float | None = None,
) -> tuple[int, int, int]:
    """(rows, readings, commits) of the worker's stats rows stamped in [start, end).

    ``max_interval_s``: only rows covering at most that long. A row the worker
    could not write carries its counts over into the next one, whose
    ``interval_s`` then reaches back to the last row written.
    """
    row = conn.execute(
        f"SELECT count(*), coalesce(sum(readings), 0), coalesce(sum(commits), 0) "
        f"FROM {SCHEMA}.ingest_stats WHERE worker_id = %s "
        "AND ts >= to_timestamp(%s) AND ts < to_timestamp(%s) "
        "AND (%s::real IS NULL OR interval_s <= %s::real)",
        (worker_id, start_s, end_s, max_interval_s, max_interval_s),
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def stored(conn: psycopg.Connection, device_type: str = "kiosk") -> list[tuple[str, int, int]]:
    rows = conn.execute(
        "SELECT device_id, seq, (extract(epoch FROM ts) * 1000)::bigint "
        f"FROM {SCHEMA}.{readings_table(device_type)}"
    ).fetchall()
    return [(d, int(s), int(t)) for d, s, t in rows]


def broker_dropped(log: Path, hostname: str) -> bool:
    """Mosquitto logged that the host's batch link (``ingest-{host}-0-{pid}-{token}``) timed out.

    Its idle links (states, command reports) ping only every 30 s and time
    out earlier; the batch link was busy up to the cut.
    """
    batch_link = re.compile(rf"Client ingest-{re.escape(hostname)}-0-\d+-[0-9a-f]+ has exceeded")
    return bool(batch_link.search(log.read_text(errors="replace")))


def start_ingest_hosts(
    hosts: tuple[Host, Host],
    broker: MosquittoServer,
    pg: PostgresServer,
    prefix: str,
    workdir: Path,
) -> tuple[list[subprocess.Popen[bytes]], dict[str, Path]]:
    """One `python -m ingest` per host, to the servers' host-side addresses; once subscribed."""
    procs, logs = [], {}
    for host in hosts:
        logs[host.hostname] = workdir / f"{host.hostname}.log"
        config = write_config(
            workdir / f"{host.hostname}.toml",
            server=broker,
            host=host.host_ip,
            db_url=pg.url().replace(f"@127.0.0.1:{pg.port}/", f"@{host.host_ip}:{pg.port}/"),
            schema=SCHEMA,
            # A stats row a second shows each host's commits over time; a hung
            # database call is cut after 5 s (production 30 s).
            settings=ingest_settings(
                prefix, stats_interval_s=STATS_INTERVAL_S, commit_timeout_s=5.0, retry_max_s=2.0
            ),
        )
        procs.append(start_ingest_on(host, config, logs[host.hostname]))
    for host in hosts:
        wait_for(partial(subscribed, logs[host.hostname]), 30, f"{host.hostname} up")
    return procs, logs


def subscribed(log: Path) -> bool:
    return "subscribed to" in log.read_text()


def start_gateways(
    broker: MosquittoServer, gateway_ids: list[str], prefix: str, workdir: Path
) -> list[subprocess.Popen[bytes]]:
    procs = []
    for gateway_id in gateway_ids:
        (workdir / gateway_id).mkdir()
        config = workdir / gateway_id / "gateway.toml"
        gateway_config_file(
            config,
            broker,
            gateway_id=gateway_id,
            prefix=prefix,
            batch_max_rows=20,
            batch_max_ms=100,
            ack_timeout_s=ACK_TIMEOUT_S,
        )
        procs.append(start_gateway_process(config, workdir / gateway_id / "gateway.log"))
    return procs


@dataclass
class Cut:
    """What happened around the cut (monotonic seconds, wall-clock seconds for SQL)."""

    start_s: float
    start_wall_s: float
    end_s: float
    end_wall_s: float
    broker_dropped_after_s: float | None


def cut_off(host: Host, broker: MosquittoServer, depths: Depths) -> Cut:
    """Black-hole ``host`` for CUT_S, sampling outbox depths and watching the broker's log."""
    start_wall_s, start_s = time.time(), time.monotonic()
    host.cut()
    dropped_after_s = None
    try:
        while time.monotonic() - start_s < CUT_S:
            depths.sample()
            if dropped_after_s is None and broker_dropped(broker.log_path, host.hostname):
                dropped_after_s = time.monotonic() - start_s
            time.sleep(0.5)
    finally:
        host.heal()
    return Cut(start_s, start_wall_s, time.monotonic(), time.time(), dropped_after_s)


def report(
    conn: psycopg.Connection,
    cut: Cut,
    depths: Depths,
    *,
    sent: int,
    before_peak: int,
    workers: tuple[str, str],
    reconnected_after_s: float,
    committed_after_s: float,
    a_log: Path,
) -> None:
    """Check both hosts' stats rows around the cut; print the figures measured."""
    worker_a, worker_b = workers
    during_b = stats_between(conn, worker_b, cut.start_wall_s, cut.end_wall_s)
    assert during_b[1] > 0, f"host B committed nothing during the cut: {during_b}"
    # A stats row covers the second before it: from 2 s into the cut on,
    # host A cannot have committed anything. Its rows may be written late: a
    # row made during the cut whose write got through at the heal carries the
    # counts of every row it could not write, from before the cut (its
    # interval_s says so), so only rows covering one stats interval count.
    during_a = stats_between(
        conn, worker_a, cut.start_wall_s + 2, cut.end_wall_s, max_interval_s=STATS_INTERVAL_S * 1.5
    )
    assert during_a[1] == 0, f"host A committed while cut off: {during_a}"
    # The database was cut off from A too: its calls hung until they were cut.
    assert "cutting the connection" in a_log.read_text(), "host A's database calls went on"

    in_cut = [(t - cut.start_s, d) for t, d in depths.samples if cut.start_s <= t <= cut.end_s]
    peak_at_s, peak = max(in_cut, key=lambda s: s[1])
    dropped_s = cut.broker_dropped_after_s or CUT_S
    until_drop = sorted(d for t, d in in_cut if t < dropped_s)
    back_s = next((t for t, d in in_cut if t > peak_at_s and d <= before_peak), None)
    print(  # noqa: T201 - the measured figures, shown with -s
        f"\npartition figures: readings {sent}; broker dropped host A after "
        f"{cut.broker_dropped_after_s} s; outbox depth before the cut <= {before_peak} "
        f"readings, median {until_drop[len(until_drop) // 2]} until the broker dropped A, "
        f"peak {peak} at {peak_at_s:.1f} s into the cut, back to <= {before_peak} "
        f"at {back_s} s; host B during the cut: {during_b[1]} readings in {during_b[2]} "
        f"commits; host A reconnected {reconnected_after_s:.1f} s and committed "
        f"{committed_after_s:.1f} s after the heal"
    )


def test_one_ingest_host_cut_off_for_a_minute_loses_and_duplicates_nothing(
    hosts: tuple[Host, Host], servers: tuple[MosquittoServer, PostgresServer], tmp_path: Path
) -> None:
    host_a = hosts[0]
    broker, pg = servers
    tag = uuid.uuid4().hex[:6]
    prefix = f"t{tag}"
    gateway_ids = [f"gw-{tag}-{i}" for i in range(2)]
    devices = {
        gw: mqtt_devices(f"{prefix}-{i}", DEVICES_PER_GATEWAY) for i, gw in enumerate(gateway_ids)
    }
    conn = psycopg.connect(pg.url(), autocommit=True)
    seed_registry(
        conn, SCHEMA, {gw: [(d.device_id, d.device_type) for d in ds] for gw, ds in devices.items()}
    )
    pub = client(broker)
    for gw, ds in devices.items():
        publish_config(pub, gateway_id=gw, prefix=prefix, devices=ds, version=1)
    watcher = client(broker)
    depths = watch_depths(watcher, gateway_ids, prefix)
    worker_a, worker_b = (f"{h.hostname}-0" for h in hosts)
    procs: list[subprocess.Popen[bytes]] = []
    feeder: Feeder | None = None
    try:
        procs, logs = start_ingest_hosts(hosts, broker, pg, prefix, tmp_path)
        procs += start_gateways(broker, gateway_ids, prefix, tmp_path)
        wait_for(lambda: depths.ready >= set(gateway_ids), 30, "gateways subscribed at the site")

        feeder = Feeder(pub, prefix, [d for ds in devices.values() for d in ds])
        fed_s = time.time()
        wait_for(
            lambda: min(stats(conn, w, fed_s)[1] for w in (worker_a, worker_b)) > 0,
            30,
            "both hosts sharing the stream",
        )
        before_peak = 0
        for _ in range(20):
            before_peak = max(before_peak, depths.sample())
            time.sleep(0.2)

        a_log = logs[host_a.hostname]
        connects_before = a_log.read_text().count("connected to broker")
        cut = cut_off(host_a, broker, depths)
        assert procs[0].poll() is None, "host A's ingest died during the cut"
        # Host A comes back: its MQTT link reconnects (paho's backoff is capped
        # at 30 s) and it commits its share again.
        wait_for(
            lambda: a_log.read_text().count("connected to broker") > connects_before,
            60,
            "host A reconnected to the broker",
        )
        reconnected_after_s = time.monotonic() - cut.end_s
        wait_for(lambda: stats(conn, worker_a, cut.end_wall_s)[1] > 0, 60, "host A commits again")
        committed_after_s = time.monotonic() - cut.end_s

        sent = feeder.stop()
        feeder = None
        wait_for(lambda: len(stored(conn)) >= len(sent), 60, "every reading stored")
        time.sleep(1)  # a stray duplicate would land now
        rows = stored(conn)
        assert len(rows) == len(set(rows)), "duplicate readings"
        assert set(rows) == sent

        # The returning host took no connection from the other (unique client ids).
        assert "lost (" not in logs[hosts[1].hostname].read_text()
        report(
            conn,
            cut,
            depths,
            sent=len(sent),
            before_peak=before_peak,
            workers=(worker_a, worker_b),
            reconnected_after_s=reconnected_after_s,
            committed_after_s=committed_after_s,
            a_log=a_log,
        )
    finally:
        if feeder is not None:
            feeder.stop()
        for proc in procs:
            stop(proc)
        pub.disconnect()
        watcher.disconnect()
        conn.close()
