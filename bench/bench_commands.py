"""Command downlink latency: an operator's command -> ingest -> gateway -> device -> answer, stored.

Everything runs as deployed, each part its own process on this machine: a
private PostgreSQL + TimescaleDB (fsync on) and Mosquitto, the schema
migrated, one gateway and ``--devices`` MQTT kiosks in the registry, an
ingest worker (``python -m ingest``: worker 0 runs the dispatcher and the
report consumer), the gateway (``python -m gateway``, central and site
broker the same Mosquitto), and a responder process that plays the devices
(paho, MQTT v5: it says each device is online, subscribes ``d/+/cmd`` and
answers ``delivered`` then ``succeeded`` at once on the request's Response
Topic with its Correlation Data, noting when). Commands are queued through
``devices.commands.CommandRegistry.ask`` (what ``cityhub devices command``
does), ``--rate`` a second spread over the devices.

Per command, every clock being this machine's:

- created -> the device answered (the responder's time);
- created -> the final state stored centrally (``command_events``
  'succeeded' ``received_at``, the storing transaction's start, minus
  ``commands.created_at``);
- created -> the final state's notice on ``command_state_channel`` (what
  ``cityhub devices command --wait`` sees: the commit is done);
- the path split: queued -> sent (the gateway stored it), sent -> the
  device has it, the device's answer -> ``delivered`` stored at the gateway,
  ``delivered`` -> ``succeeded``, and the gateway's ``succeeded`` -> stored
  centrally.

p50 / p90 / p99 / max of each run; the table shows the medians of ``--runs``
runs (a short warm-up first, not counted).

    .venv/bin/python bench/bench_commands.py [--commands 1000] [--rate 20] [--devices 50] [--runs 3]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paho.mqtt.client as mqtt
import psycopg
from bench_ingest import ingest_config, machine, start_servers, wait

from cityhub import database
from cityhub.localstack.mosquitto import ADMIN_USER, MosquittoServer
from contracts.commands import decode_command_reports, report_id
from contracts.schema import command_state_channel
from contracts.settings import StorageSettings
from contracts.topics import command_report_topic
from devices.commands import CommandRegistry
from tests.plugins.gateway import client, mqtt_devices, publish_config, watch_states
from tests.plugins.ingest import cpu_seconds, seed_registry

ROOT = Path(__file__).resolve().parents[1]
COMMAND = "open_queue"  # a kiosk command without arguments, 30 s answer timeout
WARMUP_COMMANDS = 20
IDLE_S = 10.0  # the services' idle CPU is measured this long
FINAL = ("succeeded", "failed", "expired", "cancelled")

# The devices: online (retained status), answer every command at once.
# On a line on stdin, prints what it received and answered since the last one.
RESPONDER = textwrap.dedent(
    """
    import json, sys, threading, time
    sys.path.insert(0, sys.argv[1])
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    from contracts.commands import DeviceAnswer, decode_command, encode_device_answer
    from contracts.messages import DEVICE_ONLINE
    from contracts.topics import device_status_topic, _join
    port, user, password, prefix = sys.argv[2:6]
    devices = [d for d in sys.argv[6].split(",") if d]  # none: online by their readings
    lock = threading.Lock()
    seen = {}  # command id -> [received s, answered s, times received]
    subscribed = threading.Event()
    def on_connect(c, *_):
        c.subscribe(_join(prefix, "d/+/cmd"), qos=1)
    def on_message(c, _u, message):
        received = time.time()
        command = decode_command(bytes(message.payload))
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = message.properties.CorrelationData
        topic = message.properties.ResponseTopic
        cid = command.command_id
        with lock:
            again = cid in seen
            if again:
                seen[cid][2] += 1
        if again:  # a command seen before: its final state again, not run twice
            c.publish(topic, encode_device_answer(DeviceAnswer(command_id=cid, state="succeeded")),
                      qos=1, properties=props)
            return
        answered = time.time()
        c.publish(topic, encode_device_answer(DeviceAnswer(command_id=cid, state="delivered")),
                  qos=1, properties=props)
        c.publish(topic, encode_device_answer(DeviceAnswer(
            command_id=cid, state="succeeded", detail="queue opened", answer={"queue": 0})),
            qos=1, properties=props)
        with lock:
            seen[cid] = [received, answered, 1]
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-devices", protocol=mqtt.MQTTv5)
    c.username_pw_set(user, password)
    c.on_connect, c.on_message = on_connect, on_message
    c.on_subscribe = lambda *_: subscribed.set()
    c.max_inflight_messages_set(1000)
    c.connect("127.0.0.1", int(port))
    c.loop_start()
    if not subscribed.wait(30):
        raise SystemExit("responder: no SUBACK")
    for d in devices:
        info = c.publish(device_status_topic(d, prefix), DEVICE_ONLINE, qos=1, retain=True)
        info.wait_for_publish(10)
    print("ready", flush=True)
    for line in sys.stdin:
        with lock:
            out = json.dumps(seen)
        print(out, flush=True)
    c.disconnect()
    c.loop_stop()
    """
)


def cpu_now(*procs: subprocess.Popen[bytes]) -> list[float]:
    return [cpu_seconds(p.pid) for p in procs]


def idle_cpu_per_s(*procs: subprocess.Popen[bytes]) -> list[float]:
    """What the services burn with no command about, CPU s per s: the baseline."""
    cpu0, t0 = cpu_now(*procs), time.monotonic()
    time.sleep(IDLE_S)
    elapsed = time.monotonic() - t0
    return [(b - a) / elapsed for a, b in zip(cpu0, cpu_now(*procs), strict=True)]


def write_gateway_settings(
    path: Path, server: MosquittoServer, *, gateway_id: str, prefix: str
) -> None:
    """The gateway's defaults, on the bench's broker (central and site) and topic prefix."""
    broker = (
        f'host = "127.0.0.1"\nport = {server.port}\n'
        f'username = "{ADMIN_USER}"\npassword = "{server.admin_password}"\n'
    )
    path.write_text(
        textwrap.dedent(
            f"""\
            log_level = "INFO"
            [broker]
            {{broker}}
            [gateway]
            gateway_id = "{gateway_id}"
            site_id = "hk-hall"
            topic_prefix = "{prefix}"
            outbox_path = "{path.parent / (gateway_id + ".sqlite3")}"
            [gateway.site_broker]
            {{broker}}
            """
        ).replace("{broker}", broker)
    )


class Notices:
    """When each command's last state-change notice came (a thread LISTENing on its channel)."""

    def __init__(self, url: str, schema: str) -> None:
        self.last_s: dict[str, float] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.conn = psycopg.connect(url, autocommit=True)
        self.conn.execute(f'LISTEN "{command_state_channel(schema)}"')
        self.thread = threading.Thread(target=self._run, name="notices", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            for notice in self.conn.notifies(timeout=0.2):
                now = time.time()
                with self.lock:
                    self.last_s[notice.payload] = now

    def get(self, command_id: str) -> float | None:
        with self.lock:
            return self.last_s.get(command_id)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.conn.close()


class ReportWatch:
    """When each report first reached the central broker (a subscriber beside ingest's)."""

    def __init__(self, server: MosquittoServer, gateway_id: str, prefix: str) -> None:
        self.first_s: dict[str, float] = {}
        self.lock = threading.Lock()
        self.gateway_id = gateway_id
        subscribed = threading.Event()
        self.client = client(server)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.subscribe(command_report_topic(gateway_id, prefix), qos=1)
        if not subscribed.wait(10):
            raise SystemExit("report watch: no SUBACK")

    def _on_message(self, _c: object, _u: object, message: mqtt.MQTTMessage) -> None:
        now = time.time()
        reports = decode_command_reports(bytes(message.payload), gateway_id=self.gateway_id)
        with self.lock:
            for r in reports.reports:
                self.first_s.setdefault(r.report_id, now)

    def get(self, report_id: str) -> float:
        with self.lock:
            return self.first_s[report_id]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Responder:
    def __init__(self, server: MosquittoServer, prefix: str, devices: list[str]) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                RESPONDER,
                str(ROOT),
                str(server.port),
                ADMIN_USER,
                server.admin_password,
                prefix,
                ",".join(devices),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        if self.proc.stdin is None or self.proc.stdout is None:
            raise SystemExit("no pipes to the responder")
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        if self.stdout.readline().strip() != "ready":
            raise SystemExit("responder did not start")

    def seen(self) -> dict[str, list[float]]:
        """command id -> [received s, answered s, times received]."""
        self.stdin.write("dump\n")
        self.stdin.flush()
        ready, _, _ = select.select([self.stdout], [], [], 30)
        if not ready:
            raise SystemExit("responder did not answer")
        seen: dict[str, list[float]] = json.loads(self.stdout.readline())
        return seen

    def close(self) -> None:
        self.stdin.close()
        self.proc.wait(30)


def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if not k.startswith("CITYHUB_")},
        )


def stop(proc: subprocess.Popen[bytes], what: str) -> None:
    proc.terminate()
    if proc.wait(30) != 0:
        raise SystemExit(f"{what} exited with {proc.returncode}")


def ask_paced(
    commands: CommandRegistry, devices: list[str], count: int, rate_per_s: float
) -> list[str]:
    """Queue ``count`` commands, ``rate_per_s`` a second, round-robin over the devices."""
    ids = []
    t0 = time.perf_counter()
    for i in range(count):
        delay = t0 + i / rate_per_s - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        row = commands.ask(devices[i % len(devices)], COMMAND, [], ttl_s=600, operator="bench")
        ids.append(row.command_id)
    return ids


def all_final(conn: psycopg.Connection, schema: str, ids: list[str]) -> bool:
    row = conn.execute(
        f"SELECT count(*) FROM {schema}.commands WHERE command_id = ANY(%s) AND state = ANY(%s)",
        (ids, list(FINAL)),
    ).fetchone()
    return row is not None and row[0] == len(ids)


def quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    cuts = statistics.quantiles(ordered, n=100, method="inclusive")
    return {"p50": statistics.median(ordered), "p90": cuts[89], "p99": cuts[98], "max": ordered[-1]}


MEASURES = (
    ("answered", "created -> device answered"),
    ("stored", "created -> final state stored centrally"),
    ("notified", "created -> final state notified (--wait sees it)"),
    ("queued_sent", "split: queued -> sent (dispatch, gateway stores it)"),
    ("sent_device", "split: sent -> the device has it"),
    ("device_delivered", "split: device answered -> delivered at the gateway"),
    ("delivered_succeeded", "split: delivered -> succeeded at the gateway"),
    ("succeeded_stored", "split: succeeded at the gateway -> stored centrally"),
    ("succeeded_broker", "  of which: succeeded at the gateway -> its report at the broker"),
    ("broker_stored", "  of which: report at the broker -> stored centrally"),
)


def measure(
    conn: psycopg.Connection,
    schema: str,
    ids: list[str],
    *,
    seen: dict[str, list[float]],
    notices: Notices,
    watch: ReportWatch,
) -> dict[str, Any]:
    """Each command's latencies in ms; the run's quantiles of each."""
    rows = conn.execute(
        f"""SELECT c.command_id, c.state, c.created_at, e.state, e.ts, e.received_at
        FROM {schema}.commands c JOIN {schema}.command_events e USING (command_id)
        WHERE c.command_id = ANY(%s)""",
        (ids,),
    ).fetchall()
    created: dict[str, datetime] = {}
    states: dict[str, str] = {}
    events: dict[tuple[str, str], tuple[datetime, datetime]] = {}
    for cid, state, created_at, event, ts, received_at in rows:
        created[cid], states[cid] = created_at, state
        events[(cid, event)] = (ts, received_at)
    failed = [cid for cid in ids if states.get(cid) != "succeeded"]
    if failed:
        raise SystemExit(f"{len(failed)} commands did not succeed, e.g. {failed[:3]}")
    per: dict[str, list[float]] = {key: [] for key, _ in MEASURES}
    for cid in ids:
        c = created[cid].timestamp()
        sent = events[(cid, "sent")][0].timestamp()
        delivered = events[(cid, "delivered")][0].timestamp()
        succeeded, stored = (t.timestamp() for t in events[(cid, "succeeded")])
        received, answered, _times = seen[cid]
        notified = notices.get(cid)
        if notified is None:
            raise SystemExit(f"no notice for {cid}")
        at_broker = watch.get(report_id(cid, "succeeded"))
        for key, value in (
            ("answered", answered - c),
            ("stored", stored - c),
            ("notified", notified - c),
            ("queued_sent", sent - c),
            ("sent_device", received - sent),
            ("device_delivered", delivered - answered),
            ("delivered_succeeded", succeeded - delivered),
            ("succeeded_stored", stored - succeeded),
            ("succeeded_broker", at_broker - succeeded),
            ("broker_stored", stored - at_broker),
        ):
            per[key].append(value * 1000)
    again = sum(seen[cid][2] > 1 for cid in ids)
    return {
        "quantiles": {key: quantiles(values) for key, values in per.items()},
        "received_twice": again,
    }


def registry(url: str, schema: str, gateway_id: str, devices: list[str]) -> psycopg.Connection:
    """The schema migrated, the gateway and its kiosks registered; an autocommit connection."""
    conn = psycopg.connect(url, autocommit=True)
    database.migrate(conn, schema=schema, storage=StorageSettings())
    seed_registry(conn, schema, {gateway_id: [(d, "kiosk") for d in devices]})
    print(f"machine: {machine(conn)}")
    return conn


def run(args: argparse.Namespace, tmp: Path, broker: MosquittoServer, url: str) -> None:
    schema, tag = "bench", uuid.uuid4().hex[:6]
    gateway_id, prefix = f"gw-{tag}", f"c{tag}"
    devices = mqtt_devices(prefix, args.devices)
    device_ids = [d.device_id for d in devices]
    conn = registry(url, schema, gateway_id, device_ids)

    control = client(broker)
    publish_config(control, gateway_id=gateway_id, prefix=prefix, devices=devices, version=1)
    states = watch_states(control, gateway_id=gateway_id, prefix=prefix)
    config = tmp / "ingest.toml"
    ingest_config(config, broker, url, schema, prefix)
    ingest_log, gateway_log = tmp / "ingest.log", tmp / "gateway.log"
    gateway_toml = tmp / "gateway.toml"
    write_gateway_settings(gateway_toml, broker, gateway_id=gateway_id, prefix=prefix)
    notices = Notices(url, schema)
    watch = ReportWatch(broker, gateway_id, prefix)
    responder = Responder(broker, prefix, device_ids)
    ingest = start(["-m", "ingest", "--config", str(config), "--workers", "1"], ingest_log)
    gateway = start(["-m", "gateway", "--config", str(gateway_toml)], gateway_log)
    commands = CommandRegistry(psycopg.connect(url, autocommit=True), schema=schema)
    results = []
    try:
        wait(
            lambda: ingest_log.exists() and "subscribed to" in ingest_log.read_text(), 60, "ingest"
        )
        wait(lambda: any(s.site_ready for s in states), 60, "gateway subscribed at the site")
        warm = ask_paced(commands, device_ids, WARMUP_COMMANDS, args.rate)
        wait(lambda: all_final(conn, schema, warm), 120, "the warm-up commands")
        responder.seen()
        idle_per_s = idle_cpu_per_s(gateway, ingest)
        for n in range(args.runs):
            cpu0, t0 = cpu_now(gateway, ingest), time.monotonic()
            ids = ask_paced(commands, device_ids, args.commands, args.rate)
            wait(functools.partial(all_final, conn, schema, ids), 300, "every command final")
            time.sleep(0.5)  # the last notices
            spent = [b - a for a, b in zip(cpu0, cpu_now(gateway, ingest), strict=True)]
            elapsed = time.monotonic() - t0
            result = measure(conn, schema, ids, seen=responder.seen(), notices=notices, watch=watch)
            result["cpu_ms"] = [
                (cpu - idle * elapsed) / len(ids) * 1000
                for cpu, idle in zip(spent, idle_per_s, strict=True)
            ]
            results.append(result)
            q = result["quantiles"]
            print(
                f"run {n + 1}: created -> answered p50 {q['answered']['p50']:.0f} ms, "
                f"p99 {q['answered']['p99']:.0f} ms; -> stored p50 {q['stored']['p50']:.0f} ms",
                flush=True,
            )
    finally:
        stop(gateway, "gateway")
        stop(ingest, "ingest")
        responder.close()
        notices.close()
        watch.close()
        control.disconnect()
        commands.conn.close()
        conn.close()
    report(args, results)


def report(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    print(
        f"\n{args.commands:,} commands a run ({COMMAND}, {args.rate:g} a second over "
        f"{args.devices} devices), {args.runs} runs; ms, medians of the runs' figures"
    )
    print("\n| measure, ms | p50 | p90 | p99 | max | p50 of each run |")
    print("|---|---|---|---|---|---|")
    for key, label in MEASURES:
        cells = [
            f"{statistics.median(r['quantiles'][key][q] for r in results):,.0f}"
            for q in ("p50", "p90", "p99", "max")
        ]
        runs = " / ".join(f"{r['quantiles'][key]['p50']:,.0f}" for r in results)
        print(f"| {label} | {' | '.join(cells)} | {runs} |")
    print(f"\ncommands a device received twice: {[r['received_twice'] for r in results]}")
    for i, name in enumerate(("gateway", "ingest")):
        cpu = [r["cpu_ms"][i] for r in results]
        listed = " / ".join(f"{v:.2f}" for v in cpu)
        label = f"{name} CPU per command, idle rate taken off (ms)"
        print(f"{label}: {statistics.median(cpu):.2f} ({listed})")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--commands", type=int, default=1000, help="commands a run")
    parser.add_argument("--rate", type=float, default=20.0, help="commands queued a second")
    parser.add_argument("--devices", type=int, default=50, help="MQTT kiosks of the gateway")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cityhub-bench-"))
    tmp.chmod(0o755)
    broker, pg = start_servers(tmp)
    try:
        run(args, tmp, broker, pg.url())
    finally:
        pg.stop()
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")


if __name__ == "__main__":
    main()
