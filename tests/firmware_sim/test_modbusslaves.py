"""Simulated Modbus slaves: registers from the model, writes into it, the ledger, the bus pty."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest
from pymodbus.constants import ExcCodes

from contracts.catalog import modbus_model
from contracts.registermaps import decode_registers, read_answer_bytes, read_blocks, transaction_s
from contracts.settings import BrokerSettings
from firmware_sim.faults import FaultPlan
from firmware_sim.fleet import DeviceCounts, FleetDescription, SiteInfo, build_fleet
from firmware_sim.ledger import LedgerEntry, StoredRow, reconcile
from firmware_sim.modbusslaves import SlaveMemory
from firmware_sim.service import Simulator


def street_specs(sites: int = 1):
    fleet = build_fleet(
        FleetDescription(
            seed=3,
            site=[SiteInfo(id=f"mbs-{i}", kind="street_monitor") for i in range(sites)],
            devices={
                "street_monitor": DeviceCounts(
                    air_quality=0, camera_counter=0, noise_meter=1, water_level=1
                )
            },
        ),
        [],
    )
    return [s for s in fleet if s.transport == "modbus"]


def memory_of(device_type: str) -> SlaveMemory:
    spec = next(s for s in street_specs() if s.device_type == device_type)
    return SlaveMemory(spec, modbus_model(str(spec.catalog_model)))


def test_the_registers_hold_the_models_values_as_the_gateway_decodes_them() -> None:
    memory = memory_of("water_level")
    memory.load({"water_depth": 12.3, "sensor_status": 0.0, "battery": 80.0})
    (block,) = read_blocks(memory.model)
    words = memory.get(block.function, block.address, block.count)
    assert isinstance(words, list)
    values = decode_registers(block, words)
    assert values["water_depth"] == pytest.approx(12.3, abs=1e-4)
    assert values["sensor_status"] == 0.0
    # No echo: the map has no code for it and no depth comes; the registers stay.
    memory.load({"sensor_status": 1.0, "battery": 80.0})
    assert memory.get(block.function, block.address, block.count) == words
    assert memory.get(4, 9000, 1) == ExcCodes.ILLEGAL_ADDRESS


def test_a_write_changes_the_register_and_the_device() -> None:
    water = memory_of("water_level")
    assert water.set(6, 206, [120]) is None
    assert water.spec.model.response_delay_ms == 120  # type: ignore[attr-defined]
    noise = memory_of("noise_meter")
    assert noise.set(6, 0x6B, [(-15) & 0xFFFF]) is None  # int16 x 0.1: -1.5 dB
    assert noise.spec.model.offset_db == pytest.approx(-1.5)  # type: ignore[attr-defined]
    # Only the registers a write names can be written; input registers never.
    assert noise.set(6, 0x6C, [1]) == ExcCodes.ILLEGAL_ADDRESS
    assert water.set(6, 2303, [1]) == ExcCodes.ILLEGAL_ADDRESS


def test_modbus_readings_are_reconciled_by_count_like_serial_ones() -> None:
    entries = [
        LedgerEntry(
            device_id="noise-1",
            transport="modbus",
            seq=i,
            ts_ms=1000 + i,
            acked_ms=5 if i < 4 else None,
        )
        for i in range(5)
    ]
    # The gateway stamps its own seq and time: rows match by count only.
    rows = [StoredRow("noise-1", seq=100 + i, ts_ms=9000 + i) for i in range(3)]
    result = reconcile(entries, rows, [])
    assert result.serial_lost == {"noise-1": 1}
    assert result.acknowledged == 4
    assert result.unacked_sent == 1
    result = reconcile(entries, [*rows, StoredRow("noise-1", 200, 9999)], [])
    assert result.ok


def test_each_site_bus_is_one_pty_its_slaves_answer_on_paced_at_the_baud_rate() -> None:
    from gateway.modbusbus import ModbusBus

    specs = street_specs(sites=2)
    quiet = FaultPlan()
    specs = [msgspec.structs.replace(s, faults=quiet) for s in specs]
    sim = Simulator(devices=specs, site_broker=BrokerSettings(port=0), record=True)
    ports = sim.ports
    by_site: dict[str, set[str]] = {}
    for spec in specs:
        by_site.setdefault(spec.site_id, set()).add(ports[spec.device_id])
    assert all(len(paths) == 1 for paths in by_site.values())
    assert len({p for paths in by_site.values() for p in paths}) == 2
    noise = next(s for s in specs if s.device_type == "noise_meter")
    model = modbus_model(str(noise.catalog_model))
    (block,) = read_blocks(model)
    n = 20

    async def main() -> float:
        stop = asyncio.Event()
        task = asyncio.create_task(sim.run(stop))
        bus = ModbusBus(port=ports[noise.device_id], baudrate=9600, parity="N", stopbits=1)
        await bus.open()
        try:
            started = time.monotonic()
            for _ in range(n):
                words = await bus.read(
                    int(noise.slave_id or 0),
                    block.function,
                    block.address,
                    block.count,
                    timeout_s=model.timeout_s,
                )
                assert 30 <= decode_registers(block, words)["laeq"] <= 130
            return time.monotonic() - started
        finally:
            bus.close()
            stop.set()
            await task

    elapsed = asyncio.run(main())
    sim.close()
    line_s = transaction_s(9600, request_bytes=8, answer_bytes=read_answer_bytes(block.count))
    assert elapsed >= n * line_s * 0.9
    assert sim.ledger is not None
    assert len(sim.ledger.acknowledged()) == n
    assert sim.stats.frames_written["noise_meter"] == n
