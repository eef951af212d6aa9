"""Modbus RTU polls a second on one bus, against the line's own limit.

The gateway's bus adapter (``gateway.modbusbus.ModbusBus``: pymodbus' async
serial client) polls simulated noise meters (``firmware_sim.modbusslaves``:
pymodbus' RTU framer and request PDUs, the line paced at the baud rate, no
response delay) on a real pty, round robin, one register each, back to
back, for ``--seconds``; at 9,600 and 19,200 baud, with one and several
slaves. The line's limit per poll: an 8-byte request and a 5 + 2N byte
answer (N registers), each followed by 3.5 characters of silence, at 10
bits a character (8N1). Prints a table; recording it in bench/RESULTS.md is
left to whoever runs it.

    .venv/bin/python bench/modbus_polls.py [--seconds S]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import msgspec

from contracts.catalog import modbus_model
from contracts.registermaps import REQUEST_BYTES, read_answer_bytes, read_blocks, transaction_s
from firmware_sim.faults import FaultInjector, FaultPlan
from firmware_sim.fleet import DeviceCounts, DeviceSpec, FleetDescription, SiteInfo, build_fleet
from firmware_sim.modbusslaves import ModbusBusSim
from firmware_sim.service import Simulator
from gateway.modbusbus import ModbusBus

MODEL = "sonbest_sm6365b"


def noise_meters(n: int) -> list[DeviceSpec]:
    fleet = build_fleet(
        FleetDescription(
            seed=1,
            site=[SiteInfo(id=f"bench-{i}", kind="street_monitor") for i in range(n)],
            devices={
                "street_monitor": DeviceCounts(
                    air_quality=0, camera_counter=0, noise_meter=1, water_level=0
                )
            },
        ),
        [],
    )
    specs = [s for s in fleet if s.device_type == "noise_meter"]
    return [
        msgspec.structs.replace(s, slave_id=i + 1, faults=FaultPlan()) for i, s in enumerate(specs)
    ]


async def run_case(baudrate: int, slaves: int, seconds: float) -> tuple[int, float]:
    specs = noise_meters(slaves)
    model = msgspec.structs.replace(modbus_model(MODEL), baudrate=baudrate)
    master, slave_fd, path = Simulator._open_pty()
    sim = ModbusBusSim(
        name="bench",
        specs=specs,
        master_fd=master,
        injectors={
            s.device_id: FaultInjector(s.model, s.faults, transport="modbus") for s in specs
        },
        sim_now=lambda: time.time_ns() // 1_000_000,
        on_reading=lambda *_a: None,
        models={s.device_id: model for s in specs},
    )
    task = asyncio.create_task(sim.run())
    bus = ModbusBus(port=path, baudrate=baudrate, parity="N", stopbits=1)
    await bus.open()
    (block,) = read_blocks(model)
    polls = 0
    try:
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < seconds:
            slave_id = polls % slaves + 1
            await bus.read(slave_id, block.function, block.address, block.count, timeout_s=0.5)
            polls += 1
    finally:
        bus.close()
        task.cancel()
        for fd in (master, slave_fd):
            os.close(fd)
    return polls, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    print(
        f"python {platform.python_version()}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, {platform.system()} {platform.release()}"
    )
    count = read_blocks(modbus_model(MODEL))[0].count
    print("| baud | slaves | polls/s | line limit polls/s | share of limit | ms a poll |")
    print("|---|---|---|---|---|---|")
    for baudrate in (9600, 19200):
        limit = 1 / transaction_s(
            baudrate, request_bytes=REQUEST_BYTES, answer_bytes=read_answer_bytes(count)
        )
        for slaves in (1, 4):
            polls, elapsed = asyncio.run(run_case(baudrate, slaves, args.seconds))
            rate = polls / elapsed
            print(
                f"| {baudrate:,} | {slaves} | {rate:.1f} | {limit:.1f} | {rate / limit:.0%} |"
                f" {1000 / rate:.2f} |"
            )


if __name__ == "__main__":
    main()
