"""Simulator capacity: MQTT devices one process drives at one message a second each.

Starts a private Mosquitto, builds a fleet of N MQTT devices (kiosks in
N/5 simulated service halls open around the clock), runs the simulator in
this process for a warm-up (all devices connect) and a measured window, and
reports messages/s acknowledged by the broker (QoS 1), the share of the
target rate, the simulator's CPU use and the worst lateness of a send.

    .venv/bin/python bench/bench_sim.py [--devices 2000] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cityhub.localstack.mosquitto import ADMIN_USER, MosquittoServer
from cityhub.localstack.procs import free_port, run_as_for
from contracts.settings import BrokerSettings
from firmware_sim.fleet import DeviceCounts, FleetDescription, SiteInfo, build_fleet
from firmware_sim.service import Simulator


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(sim: Simulator, devices: int, seconds: float) -> tuple[float, float, float]:
    stop = asyncio.Event()
    task = asyncio.create_task(sim.run(stop), name="simulator")
    deadline = time.monotonic() + 120
    while sim.stats.connected < devices and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    connect_s = time.monotonic() - (deadline - 120)
    await asyncio.sleep(3)  # settle after the connection storm
    sim.stats.late_ms_max = 0
    sent0, cpu0, t0 = sim.stats.total(), cpu_s(), time.monotonic()
    await asyncio.sleep(seconds)
    sent1, cpu1, t1 = sim.stats.total(), cpu_s(), time.monotonic()
    stop.set()
    await task
    return (sent1 - sent0) / (t1 - t0), (cpu1 - cpu0) / (t1 - t0), connect_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    halls = args.devices // 5
    description = FleetDescription(
        seed=1,
        site=[SiteInfo(id=f"bench-hall-{i:04d}", kind="service_hall") for i in range(halls)],
        devices={"service_hall": DeviceCounts(kiosk=5)},
    )
    specs = build_fleet(description, [])
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
        sim = Simulator(
            devices=specs,
            site_broker=BrokerSettings(
                host="127.0.0.1",
                port=server.port,
                username=ADMIN_USER,
                password=server.admin_password,
            ),
            seed=1,
        )
        rate, cpu, connect_s = asyncio.run(measure(sim, len(specs), args.seconds))
        late = sim.stats.late_ms_max
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    machine = f"{platform.platform()}, {os.cpu_count()} cores"
    print(f"machine: {machine}, Python {platform.python_version()}")
    print(f"{'devices (MQTT, own connection each)':<42} {len(specs):>10}")
    print(f"{'time to connect them all (s)':<42} {connect_s:>10.1f}")
    print(f"{'messages/s acked by the broker':<42} {rate:>10,.0f}")
    print(f"{'share of the 1 msg/s/device target':<42} {rate / len(specs):>10.1%}")
    print(f"{'simulator CPU (cores)':<42} {cpu:>10.2f}")
    print(f"{'worst send lateness (ms)':<42} {late:>10}")


if __name__ == "__main__":
    main()
