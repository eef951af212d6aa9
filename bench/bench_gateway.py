"""Gateway throughput: MQTT device messages -> validation -> durable outbox -> uplink -> ack.

Everything runs as it is deployed, each part in its own process on this
machine: a private Mosquitto (site and central broker at once), the gateway
(`python -m gateway`), and an acking ingest stand-in that decodes every batch,
records its readings and acks it. A raw-socket publisher plays the devices
(kiosk readings, QoS 1). Drain runs queue the messages in the gateway's
persistent site session while it is stopped, then start it: what one gateway
process can take. Live runs start the publisher against the running gateway:
publisher, broker, gateway and ingest stand-in then share the two cores.

Figures: readings acked per second from the first to the last ack, and from
the gateway's process start to the last ack (includes interpreter start-up);
medians of several runs. Measured on their own in the same run: a bare
subscriber on the same codec draining the same backlog with no gateway logic
(what the broker and the socket allow), the gateway's logic per message with
no network (topic, rate limit, decode and checks, tracking, batching), and
the outbox commit cost per batch (an fsynced put of one encoded 500-row
batch).

With ``--commands-per-s N`` the downlink runs too, during the drain and live
runs: the ingest stand-in is also the centre, publishing N GatewayCommands a
second (one kiosk command each, over the devices) from the first batch on and
acking the gateway's command reports (``Ack.reports``); a responder process
(``bench_commands.RESPONDER``) answers each command on the device's answer
topic. The devices are online through their readings.

    .venv/bin/python bench/bench_gateway.py [--readings 300000] [--runs 3] [--commands-per-s 0]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_commands import Responder

from cityhub.localstack.mosquitto import ADMIN_USER, MosquittoServer
from cityhub.localstack.procs import free_port, run_as_for
from contracts import mqttcodec
from contracts.messages import (
    Batch,
    DeviceUplink,
    GatewayConfig,
    ReadingBlock,
    encode_batch,
    encode_device_uplink,
)
from contracts.settings import BrokerSettings
from contracts.topics import device_uplink_topic
from gateway.outbox import Outbox
from gateway.service import Gateway
from tests.plugins.gateway import (
    client,
    gateway_settings,
    mqtt_devices,
    now_ms,
    publish_config,
    wait_for,
    watch_states,
)
from tests.plugins.ingest import cpu_seconds

ROOT = Path(__file__).resolve().parents[1]

# Queues device messages with pipelined QoS 1 PUBLISH packets on one socket:
# paho publishes ~4,500 messages/s, too slow to build a large backlog quickly.
PUBLISHER = textwrap.dedent(
    """
    import json, socket, sys, time
    sys.path.insert(0, sys.argv[1])
    from contracts import mqttcodec as mc
    port, user, password, prefix, ndev, per_dev = sys.argv[2:8]
    ndev, per_dev = int(ndev), int(per_dev)
    s = socket.create_connection(("127.0.0.1", int(port)))
    s.sendall(mc.encode_connect(client_id="bench-pub", keepalive_s=60, clean_start=True,
                                username=user, password=password))
    reader = mc.PacketReader()
    window = 0
    def drain(until):
        global window
        while window > until:
            pubs, controls = reader.feed(s.recv(1 << 16))
            for c in controls:
                if isinstance(c, mc.Connack) and c.reason_code:
                    raise SystemExit(f"refused: {c}")
                if isinstance(c, mc.Puback):
                    if c.reason_code >= 0x80:
                        raise SystemExit(f"publish refused: {c}")
                    window -= 1
    window = 1  # the CONNACK
    pubs, controls = reader.feed(s.recv(1 << 16))
    window = 0
    base = time.time_ns() // 1_000_000
    pid = 0
    chunk = []
    for seq in range(per_dev):
        for d in range(ndev):
            payload = json.dumps({"seq": seq, "ts": base + seq,
                                  "m": {"queue_length": seq % 40, "uptime": seq,
                                        "paper_level": 50.0, "cpu_temperature": 45.5}}).encode()
            pid = pid % 65535 + 1
            chunk.append(mc.encode_publish(f"{prefix}/d/{prefix}-dev-{d:03d}/up", payload,
                                           qos=1, packet_id=pid))
            if len(chunk) == 200:
                s.sendall(b"".join(chunk))
                window += len(chunk)
                chunk = []
                drain(800)
    s.sendall(b"".join(chunk))
    window += len(chunk)
    drain(0)
    s.sendall(mc.encode_disconnect())
    s.close()
    """
)

# The ingest stand-in: decode, record, ack; prints one JSON line when done.
# With commands a second > 0 it is the centre too: from the first batch on it
# publishes GatewayCommands (one kiosk command a message, round-robin over the
# devices) and acks the gateway's command reports as ingest does.
ACKER = textwrap.dedent(
    """
    import json, sys, time, threading, uuid
    sys.path.insert(0, sys.argv[1])
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from contracts.commands import (Command, GatewayCommands, decode_command_reports,
                                    encode_gateway_commands)
    from contracts.messages import Ack, decode_batch, encode_ack, payload_digest
    from contracts.topics import ack_topic, batch_topic, command_report_topic, command_topic
    port, user, password, prefix, gateway_id, expected, ndev, per_s = sys.argv[2:10]
    expected, ndev, per_s = int(expected), int(ndev), float(per_s)
    seen = set()
    state = {"first": None, "first_rows": 0, "last": None, "deliveries": 0, "batches": 0,
             "commands": 0, "reports": 0, "succeeded": 0}
    done = threading.Event()
    started = threading.Event()
    reports_topic = command_report_topic(gateway_id, prefix)
    def on_connect(c, *_):
        topics = [(batch_topic(gateway_id, prefix), 1)]
        if per_s:
            topics.append((reports_topic, 1))
        c.subscribe(topics)
    def on_subscribe(*_):
        print("ready", flush=True)
    def on_reports(c, message):
        reports = decode_command_reports(message.payload, gateway_id=gateway_id)
        ids = [r.report_id for r in reports.reports]
        ack = Ack(batch_ids=[], ts_ms=int(time.time() * 1000), reports=ids)
        c.publish(ack_topic(gateway_id, prefix), encode_ack(ack), qos=1)
        state["reports"] += len(ids)
        state["succeeded"] += sum(r.state == "succeeded" for r in reports.reports)
    def on_message(c, _u, message):
        if message.topic == reports_topic:
            on_reports(c, message)
            return
        now = time.time()
        batch = decode_batch(message.payload, now_ms=int(now * 1000))
        rows = 0
        for block in batch.blocks:
            for i, s in zip(block.device_index, block.seq):
                seen.add((batch.devices[i], s))
            rows += block.row_count
        state["deliveries"] += rows
        state["batches"] += 1
        ack = Ack(batch_ids=[batch.batch_id], ts_ms=int(now * 1000),
                  digests=[payload_digest(message.payload)])
        c.publish(ack_topic(gateway_id, prefix), encode_ack(ack), qos=1)
        if state["first"] is None:
            state["first"], state["first_rows"] = now, rows
            started.set()
        if len(seen) >= expected and not done.is_set():
            state["last"] = time.time()
            done.set()
    def centre(c):
        started.wait()
        t0, n = time.perf_counter(), 0
        while not done.is_set():
            delay = t0 + n / per_s - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            now_ms = int(time.time() * 1000)
            command = Command(command_id=f"c-{uuid.uuid4().hex[:16]}",
                              device_id=f"{prefix}-dev-{n % ndev:03d}", name="open_queue",
                              args={}, ttl_s=600, created_ms=now_ms)
            message = GatewayCommands(gateway_id=gateway_id, ts_ms=now_ms, commands=[command])
            c.publish(command_topic(gateway_id, prefix), encode_gateway_commands(message), qos=1)
            n += 1
            state["commands"] = n
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"acker-{gateway_id}",
                    protocol=mqtt.MQTTv5)
    c.username_pw_set(user, password)
    c.on_connect, c.on_message, c.on_subscribe = on_connect, on_message, on_subscribe
    c.connect("127.0.0.1", int(port))
    c.loop_start()
    if per_s:
        threading.Thread(target=centre, args=(c,), daemon=True).start()
    if not done.wait(600):
        raise SystemExit(f"only {len(seen)} of {expected} readings arrived")
    time.sleep(0.5)  # let the last acks go out
    c.disconnect()
    c.loop_stop()
    print(json.dumps({"first": state["first"], "first_rows": state["first_rows"],
                      "last": state["last"], "unique": len(seen),
                      "deliveries": state["deliveries"], "batches": state["batches"],
                      "commands": state["commands"],
                      "reports": state["reports"], "succeeded": state["succeeded"]}),
          flush=True)
    """
)


def write_settings(
    path: Path,
    server: MosquittoServer,
    *,
    gateway_id: str,
    prefix: str,
    gateway: Mapping[str, float] | None = None,
) -> None:
    """The benchmarked gateway's settings file; ``gateway``: [gateway] numbers to set or add."""
    broker = (
        f'host = "127.0.0.1"\nport = {server.port}\n'
        f'username = "{ADMIN_USER}"\npassword = "{server.admin_password}"\n'
    )
    numbers: dict[str, float] = {
        "batch_max_rows": 500,
        "batch_max_ms": 100,
        "ack_timeout_s": 30.0,
        # Per-device rate limits lifted: devices send as fast as they are answered.
        "device_rate_per_s": 1_000_000.0,
        "device_burst": 1_000_000.0,
        **(gateway or {}),
    }
    lines = "".join(f"{key} = {value}\n" for key, value in numbers.items())
    path.write_text(
        'log_level = "WARNING"\n'
        f"[broker]\n{broker}"
        f'[gateway]\ngateway_id = "{gateway_id}"\nsite_id = "hk-hall-ubnd"\n'
        f'topic_prefix = "{prefix}"\noutbox_path = "{path.parent / (gateway_id + ".sqlite3")}"\n'
        f"{lines}"
        f"[gateway.site_broker]\n{broker}"
    )


def start_gateway(settings: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway", "--config", str(settings)],
            cwd=ROOT,
            stdout=out,
            stderr=out,
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    if proc.wait(30) != 0:
        raise SystemExit(f"gateway exited with {proc.returncode}")


def start_broker(prefix: str) -> tuple[Path, MosquittoServer]:
    """A temporary directory (world-readable: the broker may run as its own user) and a
    private authenticated broker in it, started."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    tmp.chmod(0o755)
    server = MosquittoServer(
        base_dir=tmp / "mosquitto",
        port=free_port(),
        run_as=run_as_for("mosquitto", is_root=os.geteuid() == 0),
        dev_mode=False,
    )
    server.start()
    return tmp, server


def start_acker(
    server: MosquittoServer,
    prefix: str,
    gateway_id: str,
    *,
    readings: int,
    ndev: int,
    commands_per_s: float = 0.0,
) -> subprocess.Popen[str]:
    """The ingest stand-in (ACKER) in its own process, once it has subscribed."""
    acker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            ACKER,
            str(ROOT),
            str(server.port),
            ADMIN_USER,
            server.admin_password,
            prefix,
            gateway_id,
            str(readings),
            str(ndev),
            str(commands_per_s),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    if acker.stdout is None:
        raise SystemExit("no pipe to the acker")
    if acker.stdout.readline().strip() != "ready":
        raise SystemExit("acker failed to subscribe")
    return acker


def run_once(
    server: MosquittoServer,
    tmp: Path,
    readings: int,
    ndev: int,
    *,
    live: bool,
    commands_per_s: float = 0.0,
) -> dict[str, float]:
    """One run. drain: the backlog waits at the broker, then the gateway starts;
    live: the gateway runs and the publisher sends as fast as the broker takes.
    With ``commands_per_s``, from the first batch on the stand-in sends that
    many commands a second and a responder plays the devices that answer them.
    """
    tag = uuid.uuid4().hex[:6]
    gateway_id, prefix = f"gw-{tag}", f"b{tag}"
    settings = tmp / f"{gateway_id}.toml"
    log = tmp / f"{gateway_id}.log"
    write_settings(settings, server, gateway_id=gateway_id, prefix=prefix)
    control = client(server)
    publish_config(
        control, gateway_id=gateway_id, prefix=prefix, devices=mqtt_devices(prefix, ndev), version=1
    )
    states = watch_states(control, gateway_id=gateway_id, prefix=prefix)

    # First start: the gateway creates its persistent site session (and, for
    # a drain, stops so the backlog can build up there).
    gateway = start_gateway(settings, log)
    wait_for(lambda: any(s.site_ready for s in states), 30, "gateway subscribed at the site broker")
    control.disconnect()
    queue_s = math.nan
    if not live:
        stop(gateway)
        t0 = time.perf_counter()
        subprocess.run(publisher_command(server, prefix, ndev, readings), check=True)
        queue_s = time.perf_counter() - t0

    responder = Responder(server, prefix, []) if commands_per_s else None
    acker = start_acker(
        server, prefix, gateway_id, readings=readings, ndev=ndev, commands_per_s=commands_per_s
    )
    started = time.time()
    if live:
        t0 = time.perf_counter()
        subprocess.run(publisher_command(server, prefix, ndev, readings), check=True)
        queue_s = time.perf_counter() - t0
    else:
        gateway = start_gateway(settings, log)
    out, _ = acker.communicate(timeout=600)
    # The gateway's CPU over the whole run (for a drain, its second start: the drain itself).
    gateway_cpu_s = cpu_seconds(gateway.pid)
    responder_cpu_s = cpu_seconds(responder.proc.pid) if responder is not None else 0.0
    stop(gateway)
    if responder is not None:
        responder.close()
    result = json.loads(out.strip().splitlines()[-1])
    if result["unique"] != readings:
        raise SystemExit(f"lost readings: {result['unique']} of {readings}")
    return {
        "first_to_last": (readings - result["first_rows"]) / (result["last"] - result["first"]),
        "start_to_last": readings / (result["last"] - started),
        "duplicates": result["deliveries"] - readings,
        "rows_per_batch": result["deliveries"] / result["batches"],
        "queue_rate": readings / queue_s,
        "commands": result["commands"],
        "reports": result["reports"],
        "succeeded": result["succeeded"],
        "gateway_cpu_s": gateway_cpu_s,
        "responder_cpu_s": responder_cpu_s,
    }


def publisher_command(server: MosquittoServer, prefix: str, ndev: int, readings: int) -> list[str]:
    return [
        sys.executable,
        "-c",
        PUBLISHER,
        str(ROOT),
        str(server.port),
        ADMIN_USER,
        server.admin_password,
        prefix,
        str(ndev),
        str(readings // ndev),
    ]


def bare_drain(server: MosquittoServer, readings: int, ndev: int) -> float:
    """Messages/s a subscriber on the same codec drains with no gateway logic (acks at once)."""
    prefix = f"r{uuid.uuid4().hex[:6]}"
    filters = [(device_uplink_topic(f"{prefix}-dev-{d:03d}", prefix), 1) for d in range(ndev)]

    def session(*, clean: bool) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(
            mqttcodec.encode_connect(
                client_id=f"bare-{prefix}",
                keepalive_s=60,
                clean_start=clean,
                session_expiry_s=600,
                receive_maximum=2000,
                username=ADMIN_USER,
                password=server.admin_password,
            )
        )
        return sock

    reader = mqttcodec.PacketReader()
    sock = session(clean=True)
    sock.sendall(mqttcodec.encode_subscribe(1, filters))
    while not any(isinstance(c, mqttcodec.Suback) for c in reader.feed(sock.recv(1 << 16))[1]):
        pass
    sock.sendall(mqttcodec.encode_disconnect())
    sock.close()
    subprocess.run(publisher_command(server, prefix, ndev, readings), check=True)
    reader = mqttcodec.PacketReader()
    start = time.perf_counter()
    sock = session(clean=False)
    received = 0
    while received < readings:
        publishes, _ = reader.feed(sock.recv(1 << 18))
        received += len(publishes)
        sock.sendall(mqttcodec.encode_pubacks([p[3] for p in publishes if p[2]]))
    elapsed = time.perf_counter() - start
    sock.sendall(mqttcodec.encode_disconnect())
    sock.close()
    return readings / elapsed


def logic_cost(tmp: Path, messages: int = 100_000, ndev: int = 100) -> float:
    """Seconds per message of the gateway's own logic, fed socket-read-sized lists, no network."""
    prefix = "blogic"
    devices = mqtt_devices(prefix, ndev)
    settings = gateway_settings(
        "gw-logic", prefix, batch_max_rows=500, device_rate_per_s=1e9, device_burst=1e9
    )
    nowhere = BrokerSettings(host="127.0.0.1", port=1)
    gateway = Gateway(
        settings=settings, central=nowhere, site=nowhere, outbox_path=tmp / "logic.sqlite3"
    )
    gateway.apply_config(
        GatewayConfig(gateway_id="gw-logic", site_id="hk-hall-ubnd", version=1, devices=devices),
        persist=False,
    )
    base = now_ms()
    chunks: list[list[mqttcodec.Publish]] = []
    chunk: list[mqttcodec.Publish] = []
    for i in range(messages):
        seq = i // ndev
        payload = encode_device_uplink(
            DeviceUplink(
                seq=seq,
                ts_ms=base + seq,
                metrics={
                    "queue_length": seq % 40,
                    "uptime": seq,
                    "paper_level": 50.0,
                    "cpu_temperature": 45.5,
                },
            )
        )
        topic = device_uplink_topic(devices[i % ndev].device_id, prefix)
        chunk.append((topic, payload, 1, i % 65535 + 1, False))
        if len(chunk) == 600:  # about one 64 KiB socket read of these messages
            chunks.append(chunk)
            chunk = []
    chunks.append(chunk)
    start = time.perf_counter()
    for part in chunks:
        gateway._on_site_messages(part)  # the hot path itself, without the socket
        gateway.router.ready.clear()  # drop the cut batches: no outbox here
    elapsed = time.perf_counter() - start
    gateway.outbox.close()
    return elapsed / messages


def outbox_put_cost(tmp: Path, runs: int = 200) -> float:
    rows = 500
    block = ReadingBlock(
        device_type="kiosk",
        device_index=[i % 50 for i in range(rows)],
        seq=list(range(rows)),
        ts_ms=[1_790_000_000_000 + i for i in range(rows)],
        recv_ms=[1_790_000_000_000] * rows,
        values={
            "queue_length": [float(i % 40) for i in range(rows)],
            "uptime": [float(i) for i in range(rows)],
        },
    )
    box = Outbox(tmp / "put.sqlite3", max_bytes=1 << 34, full_policy="refuse")
    times = []
    for i in range(runs):
        batch = Batch(
            batch_id=f"gw:b:{i}",
            gateway_id="gw",
            boot_id="b",
            sent_ms=0,
            devices=[f"d-{k}" for k in range(50)],
            blocks=[block],
        )
        payload = encode_batch(batch)
        t0 = time.perf_counter()
        box.put([(batch.batch_id, payload, rows)], 0)
        times.append(time.perf_counter() - t0)
    box.close()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--readings", type=int, default=300_000)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--commands-per-s",
        type=float,
        default=0.0,
        help="commands a second sent to the gateway during the drain and live runs",
    )
    parser.add_argument(
        "--logic-only",
        action="store_true",
        help="only the gateway's logic per message, --runs times in this process (best and"
        " median): run it alternately in two checkouts to compare them on a noisy machine",
    )
    args = parser.parse_args()
    if args.logic_only:
        with tempfile.TemporaryDirectory(prefix="cityhub-logic-") as logic_tmp:
            costs_us = [logic_cost(Path(logic_tmp)) * 1e6 for _ in range(args.runs)]
        print(
            f"gateway logic per message, no network (us): best {min(costs_us):.2f},"
            f" median {statistics.median(costs_us):.2f} of {args.runs}"
        )
        return
    per_s = args.commands_per_s
    tmp, server = start_broker("cityhub-bench-")
    try:
        drains = [
            run_once(server, tmp, args.readings, args.devices, live=False, commands_per_s=per_s)
            for _ in range(args.runs)
        ]
        lives = [
            run_once(server, tmp, args.readings, args.devices, live=True, commands_per_s=per_s)
            for _ in range(args.runs)
        ]
        bare = [bare_drain(server, args.readings, args.devices) for _ in range(args.runs)]
        logic_s = statistics.median(logic_cost(tmp) for _ in range(3))
        put_s = outbox_put_cost(tmp)
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    machine = f"{platform.platform()}, {os.cpu_count()} cores"
    print(f"machine: {machine}, Python {platform.python_version()}")
    print(f"{args.readings:,} readings from {args.devices} devices a run, {args.runs} runs")
    print(f"commands sent to the gateway during the runs: {per_s:g} a second")
    print(f"{'measure':<58} {'median':>10}  runs")
    for runs, key, label in (
        (drains, "first_to_last", "drain: readings/s acked, first to last ack"),
        (drains, "start_to_last", "drain: readings/s acked, gateway start to last ack"),
        (drains, "duplicates", "drain: readings delivered twice (ingest drops them)"),
        (drains, "rows_per_batch", "drain: readings a batch (mean)"),
        (drains, "queue_rate", "drain: backlog queued at the broker, msgs/s"),
        (lives, "first_to_last", "live: readings/s acked, first to last ack"),
        (lives, "start_to_last", "live: readings/s acked, publisher start to last ack"),
        (lives, "queue_rate", "live: publisher msgs/s (acked by the broker)"),
        (lives, "duplicates", "live: readings delivered twice"),
        (lives, "rows_per_batch", "live: readings a batch (mean)"),
        (drains, "gateway_cpu_s", "drain: gateway CPU s a run (user + system)"),
        (lives, "gateway_cpu_s", "live: gateway CPU s a run (user + system)"),
    ):
        values = [r[key] for r in runs]
        digits = 2 if key.endswith("cpu_s") else 0
        listed = ", ".join(f"{v:,.{digits}f}" for v in values)
        print(f"{label:<58} {statistics.median(values):>10,.{digits}f}  {listed}")
    if per_s:
        for runs, name in ((drains, "drain"), (lives, "live")):
            for key, what in (
                ("commands", "commands sent"),
                ("succeeded", "commands reported succeeded"),
                ("reports", "command reports acked"),
                ("responder_cpu_s", "responder CPU s"),
            ):
                digits = 2 if key.endswith("cpu_s") else 0
                listed = ", ".join(f"{r[key]:,.{digits}f}" for r in runs)
                print(f"{name + ': ' + what + ' a run':<58} {'':>10}  {listed}")
    label = "bare codec subscriber draining, no gateway logic, msgs/s"
    listed = ", ".join(f"{v:,.0f}" for v in bare)
    print(f"{label:<58} {statistics.median(bare):>10,.0f}  {listed}")
    print(f"{'gateway logic per message, no network (us)':<58} {logic_s * 1e6:>10.2f}")
    print(f"{'outbox put, one 500-row batch, fsynced (ms)':<58} {put_s * 1000:>10.2f}")
    print(f"{'outbox put per reading (us)':<58} {put_s / 500 * 1e6:>10.2f}")


if __name__ == "__main__":
    main()
