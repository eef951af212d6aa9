"""Gateway throughput: MQTT device messages -> validation -> durable outbox -> uplink -> ack.

Starts a private Mosquitto, runs the gateway in this process, and a publisher
process that plays N MQTT devices sending kiosk readings at QoS 1 as fast as
the broker takes them. A subscriber plays ingest and acks every batch. The
figure is readings acked per second from the first to the last ack, median of
several runs; also the outbox commit cost per batch (fsynced put of one
encoded 500-row batch) measured on its own.

    .venv/bin/python bench/bench_gateway.py [--readings 100000] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from contextlib import AbstractContextManager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cityhub.localstack.mosquitto import ADMIN_USER, MosquittoServer
from cityhub.localstack.procs import free_port, run_as_for
from contracts.messages import Batch, ReadingBlock, encode_batch
from gateway.outbox import Outbox
from gateway.service import Gateway
from tests.gatewayharness import (
    FakeIngest,
    broker_settings,
    client,
    gateway_in_thread,
    gateway_settings,
    mqtt_devices,
    publish_config,
    wait_for,
)

PUBLISHER = textwrap.dedent(
    """
    import sys, time, json
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    port, user, password, prefix, ndev, per_dev, first = sys.argv[1:8]
    ndev, per_dev, first = int(ndev), int(per_dev), int(first)
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{first}",
                    protocol=mqtt.MQTTv5)
    c.username_pw_set(user, password)
    c.max_inflight_messages_set(1000)
    c.connect("127.0.0.1", int(port))
    c.loop_start()
    base = time.time_ns() // 1_000_000
    infos = []
    for seq in range(per_dev):
        for d in range(first, first + ndev):
            payload = json.dumps({"seq": seq, "ts": base + seq,
                                  "m": {"queue_length": seq % 40, "uptime": seq,
                                        "paper_level": 50.0, "cpu_temperature": 45.5}})
            infos.append(c.publish(f"{prefix}/d/{prefix}-dev-{d:03d}/up", payload, qos=1))
    for info in infos:
        info.wait_for_publish(120)
    c.disconnect()
    c.loop_stop()
    """
)


def publish(server: MosquittoServer, prefix: str, readings: int, ndev: int, procs: int) -> None:
    """Publish ``readings`` device messages from ``procs`` publisher processes."""
    per_proc_devices = ndev // procs
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                PUBLISHER,
                str(server.port),
                ADMIN_USER,
                server.admin_password,
                prefix,
                str(per_proc_devices),
                str(readings // ndev),
                str(k * per_proc_devices),
            ],
        )
        for k in range(procs)
    ]
    for child in children:
        if child.wait() != 0:
            raise SystemExit("publisher failed")


def run_once(server: MosquittoServer, tmp: Path, readings: int, ndev: int, *, drain: bool) -> float:
    """Readings acked per second, from the gateway's point of view.

    live: publishers and gateway run at once (the publishers set the pace).
    drain: the readings are queued at the site broker in the gateway's
    persistent session while it is away, then the gateway starts and drains
    them: what one gateway process can take.
    """
    tag = uuid.uuid4().hex[:6]
    gateway_id, prefix = f"gw-{tag}", f"b{tag}"
    devices = mqtt_devices(prefix, ndev)
    ingest = FakeIngest(server, gateway_id=gateway_id, prefix=prefix)
    ingest.acking = True
    pub = client(server)
    publish_config(pub, gateway_id=gateway_id, prefix=prefix, devices=devices, version=1)
    broker = broker_settings(server)
    settings = gateway_settings(
        gateway_id,
        prefix,
        batch_max_rows=500,
        batch_max_ms=100,
        device_rate_per_s=1e6,
        device_burst=1e6,
        ack_timeout_s=30.0,
    )
    outbox = tmp / f"{tag}.sqlite3"

    def gateway() -> AbstractContextManager[Gateway]:
        return gateway_in_thread(settings=settings, central=broker, site=broker, outbox=outbox)

    if drain:
        with gateway() as gw:  # first run: creates the persistent site session
            wait_for(lambda: len(gw.devices) == ndev, 10, "config")
        publish(server, prefix, readings, ndev, procs=2)
        start = time.perf_counter()
        with gateway() as gw:
            wait_for(lambda: gw.counters.readings_acked >= readings, 300, "all acked")
            elapsed = time.perf_counter() - start
    else:
        with gateway() as gw:
            wait_for(lambda: len(gw.devices) == ndev, 10, "config")
            start = time.perf_counter()
            publish(server, prefix, readings, ndev, procs=1)
            wait_for(lambda: gw.counters.readings_acked >= readings, 300, "all acked")
            elapsed = time.perf_counter() - start
    if ingest.count() != readings:
        raise SystemExit(f"lost readings: {ingest.count()} of {readings} at ingest")
    pub.disconnect()
    ingest.close()
    return readings / elapsed


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
    parser.add_argument("--readings", type=int, default=100_000)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cityhub-bench-"))
    tmp.chmod(0o755)
    server = MosquittoServer(
        base_dir=tmp / "mosquitto",
        port=free_port(),
        run_as=run_as_for("mosquitto", is_root=os.geteuid() == 0),
        dev_mode=False,
    )
    server.start()
    try:
        live = [
            run_once(server, tmp, args.readings, args.devices, drain=False)
            for _ in range(args.runs)
        ]
        drained = [
            run_once(server, tmp, args.readings, args.devices, drain=True) for _ in range(args.runs)
        ]
        put_s = outbox_put_cost(tmp)
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    machine = f"{platform.platform()}, {os.cpu_count()} cores"
    print(f"machine: {machine}, Python {platform.python_version()}")
    print(f"{'measure':<44} {'value':>14}")
    for name, rates in (
        ("live, paced by 1 publisher", live),
        ("draining a queued backlog", drained),
    ):
        label = f"gateway readings/s, {name}"
        print(f"{label:<50} {statistics.median(rates):>10,.0f}")
        print(f"{'  runs':<50} {', '.join(f'{r:,.0f}' for r in rates)}")
    print(f"{'outbox put, one 500-row batch, fsynced (ms)':<44} {put_s * 1000:>14.2f}")
    print(f"{'outbox put per reading (us)':<44} {put_s / 500 * 1e6:>14.2f}")


if __name__ == "__main__":
    main()
