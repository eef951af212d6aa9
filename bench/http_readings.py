"""HTTP device readings into the gateway's fsynced outbox, beside MQTT devices measured alike.

Everything as deployed, on this machine: a private Mosquitto (site and
central broker), the gateway (`python -m gateway`, its HTTP endpoint on
loopback, production batch settings: 500 rows, 200 ms) and, in this process,
the devices. Rate limits are lifted: the figure is what the gateway takes.

- HTTP: each device posts on its own keep-alive connection (aiohttp), one
  request at a time, the next as soon as the 200 arrives (which the gateway
  sends only once the reading is in its fsynced outbox): one device, one
  device posting arrays of 20 (a backlog), and several devices at once.
  Readings/s from the first request to the last 200; latency of each request
  to its 200 (p50, p99).
- MQTT: as many devices publish the same number of readings at QoS 1 as fast
  as the broker takes them; readings/s from the first publish until the
  outbox (polled every 5 ms, read-only) holds them all. The site broker, not
  the gateway, acknowledges an MQTT device, so there is no per-reading
  latency to the outbox to compare.

    .venv/bin/python bench/http_readings.py [--readings 4000] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import paho.mqtt.client as mqtt
from bench_gateway import start_broker, write_settings
from paho.mqtt.enums import CallbackAPIVersion

from cityhub.localstack.mosquitto import ADMIN_USER, MosquittoServer
from cityhub.localstack.procs import free_port
from contracts.httpapi import CONTENT_TYPE, encode_readings, readings_path, token_sha256
from contracts.messages import DeviceConfig
from contracts.topics import device_uplink_topic
from gateway.outbox import Outbox
from tests.plugins.gateway import (
    client,
    kiosk_uplink,
    now_ms,
    publish_config,
    wait_for,
    watch_states,
)

ROOT = Path(__file__).resolve().parents[1]
# Per-device rate limits lifted: the devices send as fast as they are answered.
NO_LIMIT_PER_S = 1_000_000.0


class Run:
    """A gateway process with ``ndev`` HTTP and ``ndev`` MQTT devices."""

    def __init__(self, server: MosquittoServer, tmp: Path, ndev: int) -> None:
        tag = uuid.uuid4().hex[:6]
        self.gateway_id, self.prefix = f"gw-{tag}", f"b{tag}"
        self.port = free_port()
        self.tokens = [uuid.uuid4().hex for _ in range(ndev)]
        self.http = [
            DeviceConfig(
                device_id=f"{self.prefix}-http-{i:03d}",
                device_type="kiosk",
                transport="http",
                token_sha256=token_sha256(token),
                rate_limit_per_s=NO_LIMIT_PER_S,
            )
            for i, token in enumerate(self.tokens)
        ]
        self.mqtt = [
            DeviceConfig(
                device_id=f"{self.prefix}-mqtt-{i:03d}",
                device_type="kiosk",
                transport="mqtt",
                rate_limit_per_s=NO_LIMIT_PER_S,
            )
            for i in range(ndev)
        ]
        settings = tmp / f"{self.gateway_id}.toml"
        self.outbox = tmp / f"{self.gateway_id}.sqlite3"
        write_settings(
            settings,
            server,
            gateway_id=self.gateway_id,
            prefix=self.prefix,
            gateway={"batch_max_ms": 200, "http_port": self.port},
        )
        self.control = client(server)
        publish_config(
            self.control,
            gateway_id=self.gateway_id,
            prefix=self.prefix,
            devices=self.http + self.mqtt,
            version=1,
        )
        states = watch_states(self.control, gateway_id=self.gateway_id, prefix=self.prefix)
        with (tmp / f"{self.gateway_id}.log").open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "--config", str(settings)],
                cwd=ROOT,
                stdout=out,
                stderr=out,
            )
        wait_for(lambda: any(s.site_ready for s in states), 30, "gateway ready")

    def stored(self) -> int:
        with sqlite3.connect(f"file:{self.outbox}?mode=ro", uri=True) as db:
            row = db.execute("SELECT coalesce(sum(readings), 0) FROM batches").fetchone()
        return int(row[0])

    def close(self) -> None:
        self.control.disconnect()
        self.proc.terminate()
        if self.proc.wait(30) != 0:
            raise SystemExit(f"gateway exited with {self.proc.returncode}")


async def http_devices(run: Run, ndev: int, readings: int, per_request: int) -> dict[str, float]:
    """Each of ``ndev`` devices posts readings/ndev readings, per_request a request."""
    latencies: list[float] = []
    per_device = readings // ndev

    async def device(index: int) -> None:
        device_id = run.http[index].device_id
        url = f"http://127.0.0.1:{run.port}{readings_path(device_id)}"
        headers = {"Authorization": f"Bearer {run.tokens[index]}", "Content-Type": CONTENT_TYPE}
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector) as session:
            base = now_ms()
            for first in range(0, per_device, per_request):
                body = encode_readings(
                    [kiosk_uplink(seq, base + seq) for seq in range(first, first + per_request)]
                )
                started = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        raise SystemExit(f"HTTP {response.status}: {await response.text()}")
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(device(i) for i in range(ndev)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "readings_per_s": per_device * ndev / elapsed,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
    }


def mqtt_devices(run: Run, server: MosquittoServer, ndev: int, readings: int) -> float:
    """Readings/s from the first publish until the outbox holds all of them."""
    before = run.stored()
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.username_pw_set(ADMIN_USER, server.admin_password)
    pub.max_inflight_messages_set(1000)  # paho's 20 would pace the devices, not the gateway
    pub.connect("127.0.0.1", server.port)
    pub.loop_start()
    per_device = readings // ndev
    base = now_ms()
    started = time.perf_counter()
    infos = [
        pub.publish(
            device_uplink_topic(device.device_id, run.prefix),
            kiosk_uplink(seq, base + seq),
            qos=1,
        )
        for seq in range(per_device)
        for device in run.mqtt[:ndev]
    ]
    target = before + per_device * ndev
    while run.stored() < target:
        time.sleep(0.005)
    elapsed = time.perf_counter() - started
    for info in infos:
        info.wait_for_publish(10)
    pub.disconnect()
    pub.loop_stop()
    return per_device * ndev / elapsed


def fsync_floor_ms(tmp: Path, runs: int = 200) -> float:
    """Median time of the outbox's fsynced put of one small batch: what a 200 waits at least."""
    box = Outbox(tmp / "floor.sqlite3", max_bytes=1 << 30, full_policy="refuse")
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        box.put([(f"gw:b:{i}", b"x" * 200, 1)], 0)
        times.append(time.perf_counter() - t0)
    box.close()
    return 1000 * statistics.median(times)


SCENARIOS = (
    # (label, devices, readings per request)
    ("1 device, 1 reading a request", 1, 1),
    ("1 device, arrays of 20 (a backlog)", 1, 20),
    ("8 devices at once, 1 reading a request", 8, 1),
    ("32 devices at once, 1 reading a request", 32, 1),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--readings", type=int, default=4000, help="readings a scenario and run")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    tmp, server = start_broker("cityhub-bench-http-")
    rows: list[tuple[str, list[float], list[float], list[float], list[float]]] = []
    try:
        for label, ndev, per_request in SCENARIOS:
            http_rates, p50s, p99s, mqtt_rates = [], [], [], []
            for _ in range(args.runs):
                run = Run(server, tmp, ndev)
                try:
                    result = asyncio.run(http_devices(run, ndev, args.readings, per_request))
                    mqtt_rates.append(mqtt_devices(run, server, ndev, args.readings))
                finally:
                    run.close()
                http_rates.append(result["readings_per_s"])
                p50s.append(result["p50_ms"])
                p99s.append(result["p99_ms"])
            rows.append((label, http_rates, p50s, p99s, mqtt_rates))
        floor_ms = fsync_floor_ms(tmp)
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    machine = f"{platform.platform()}, {os.cpu_count()} cores"
    print(f"machine: {machine}, Python {platform.python_version()}")
    print(f"{args.readings:,} readings a scenario and run, {args.runs} runs, medians")
    print(f"outbox put of one small batch (the fsync floor of a 200): {floor_ms:.2f} ms")
    header = (
        f"{'scenario':<42} {'HTTP readings/s':>16} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'MQTT readings/s':>16}"
    )
    print(header)
    for label, http_rates, p50s, p99s, mqtt_rates in rows:
        print(
            f"{label:<42} {statistics.median(http_rates):>16,.0f} "
            f"{statistics.median(p50s):>8.1f} {statistics.median(p99s):>8.1f} "
            f"{statistics.median(mqtt_rates):>16,.0f}"
        )


if __name__ == "__main__":
    main()
