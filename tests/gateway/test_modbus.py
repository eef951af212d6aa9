"""The gateway's Modbus buses against simulated slaves (firmware_sim.modbusslaves) on a real pty.

The bus is a symlink to the pty, as a udev rule names an RS-485 adapter, so a
test can take the pty away and bring up another one under the same name.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from pathlib import Path
from typing import Any

import msgspec
import pytest

from contracts.catalog import modbus_model
from contracts.commands import Command
from contracts.messages import DeviceConfig
from contracts.registermaps import ModbusModel
from firmware_sim.faults import FaultInjector, FaultPlan
from firmware_sim.fleet import DeviceCounts, DeviceSpec, FleetDescription, SiteInfo, build_fleet
from firmware_sim.modbusslaves import ModbusBusSim
from firmware_sim.service import Simulator
from gateway.polling import OFFLINE_AFTER_FAILURES
from tests.gateway.test_commands import Centre, command_id
from tests.plugins.gateway import (
    FakeIngest,
    broker_settings,
    client,
    gateway_in_thread,
    gateway_settings,
    now_ms,
    publish_config,
    wait_for,
)

pytestmark = pytest.mark.slow

# Polls this often in the tests: 4 a second per slave, under the default
# rate limit of 5 readings a second.
POLL_S = 0.25


def bus_specs(**faults: FaultPlan) -> list[DeviceSpec]:
    """A street station's noise meter (slave 1) and flood gauge (slave 2), faults by type."""
    fleet = build_fleet(
        FleetDescription(
            seed=7,
            site=[SiteInfo(id="mb-street", kind="street_monitor")],
            devices={
                "street_monitor": DeviceCounts(
                    air_quality=0, camera_counter=0, noise_meter=1, water_level=1
                )
            },
        ),
        [],
    )
    specs = [s for s in fleet if s.transport == "modbus"]
    assert sorted(s.slave_id or 0 for s in specs) == [1, 2]
    return [
        msgspec.structs.replace(s, faults=faults.get(s.device_type, FaultPlan())) for s in specs
    ]


class SimBus:
    """Simulated slaves on a pty behind a symlink, in a thread with its own event loop."""

    def __init__(
        self, link: Path, specs: list[DeviceSpec], models: dict[str, ModbusModel] | None = None
    ) -> None:
        self.link = link
        self.specs = specs
        self.models = models
        self.injectors = {
            s.device_id: FaultInjector(s.model, s.faults, transport="modbus") for s in specs
        }
        self.readings: list[tuple[str, bool]] = []
        self.bus: ModbusBusSim | None = None
        self._fds: tuple[int, int] | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        assert ready.wait(10)
        self.call(self._open)

    def _run(self, ready: threading.Event) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(ready.set)
        try:
            self._loop.run_forever()
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        finally:
            self._loop.close()

    def call(self, fn: Any) -> None:
        done = threading.Event()

        def run() -> None:
            try:
                fn()
            finally:
                done.set()

        assert self._loop is not None
        self._loop.call_soon_threadsafe(run)
        assert done.wait(10)

    def _open(self) -> None:
        master, slave, path = Simulator._open_pty()
        self._fds = (master, slave)
        tmp = self.link.with_suffix(".new")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(path)
        tmp.replace(self.link)
        self.bus = ModbusBusSim(
            name="test",
            specs=self.specs,
            master_fd=master,
            injectors=self.injectors,
            sim_now=now_ms,
            on_reading=lambda spec, _e, good: self.readings.append((spec.device_id, good)),
            models=self.models,
        )
        self._task = asyncio.get_running_loop().create_task(self.bus.run())

    def _close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._fds is not None:
            for fd in self._fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._fds = None

    def take_away(self) -> None:
        """The adapter is unplugged: the pty goes, the name points nowhere."""
        self.call(self._close)
        self.link.unlink(missing_ok=True)

    def plug_in(self) -> None:
        self.call(self._open)

    def good(self, device_id: str) -> int:
        return sum(1 for d, good in list(self.readings) if d == device_id and good)

    def close(self) -> None:
        self.call(self._close)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def configs(specs: list[DeviceSpec], port: Path, *, poll_s: float = POLL_S) -> list[DeviceConfig]:
    return [
        msgspec.structs.replace(s.device_config(port=str(port)), poll_interval_s=poll_s)
        for s in specs
    ]


def polls(gw: Any, device_id: str, outcome: str) -> int:
    return gw.counters.modbus_polls[(device_id, outcome)]


@contextlib.contextmanager
def running(
    mqtt_server: Any,
    ids: tuple[str, str],
    tmp_path: Path,
    specs: list[DeviceSpec],
    models: dict[str, ModbusModel] | None = None,
):
    gateway_id, prefix = ids
    link = tmp_path / "rs485"
    bus = SimBus(link, specs, models)
    pub = client(mqtt_server)
    publish_config(
        pub, gateway_id=gateway_id, prefix=prefix, devices=configs(specs, link), version=1
    )
    ingest = FakeIngest(mqtt_server, gateway_id=gateway_id, prefix=prefix)
    ingest.acking = True
    server = broker_settings(mqtt_server)
    try:
        with gateway_in_thread(
            settings=gateway_settings(gateway_id, prefix),
            central=server,
            site=server,
            outbox=tmp_path / "outbox.sqlite3",
        ) as gw:
            yield gw, bus, ingest
    finally:
        bus.close()
        ingest.close()
        pub.disconnect()


def stored(ingest: FakeIngest, device_id: str) -> int:
    with ingest.lock:
        return sum(1 for d, _s, _t in ingest.readings if d == device_id)


def test_two_slaves_on_one_bus_are_both_polled_and_stored(mqtt_server, ids, tmp_path):
    specs = bus_specs()
    noise, water = (s.device_id for s in sorted(specs, key=lambda s: s.slave_id or 0))
    with running(mqtt_server, ids, tmp_path, specs) as (gw, bus, ingest):
        wait_for(
            lambda: stored(ingest, noise) >= 8 and stored(ingest, water) >= 8,
            15,
            "readings of both slaves at the centre",
        )
        assert gw.tracker.devices[noise].online
        assert gw.tracker.devices[water].online
        # Nothing of this gateway's comes through the site broker: it asks for
        # no subscription there, and connected is ready (cityhub up waits for it).
        wait_for(gw.site_ready, 10, "the site link ready with nothing to subscribe")
        with ingest.lock:
            levels = [v["laeq"] for v in ingest.values[noise]]
            depths = list(ingest.values[water])
        assert all(30 <= level <= 130 for level in levels)
        assert all(v["sensor_status"] in (0, 3) for v in depths)
    # Every good answer the slaves gave was stored (the last few polls may be in flight).
    for device_id in (noise, water):
        assert polls(gw, device_id, "ok") >= stored(ingest, device_id) >= bus.good(device_id) - 2
        assert polls(gw, device_id, "no_answer") == polls(gw, device_id, "garbled") == 0


def test_a_missing_slave_goes_offline_and_the_other_is_unaffected(mqtt_server, ids, tmp_path):
    specs = bus_specs(water_level=FaultPlan(modbus_silent_probability=1.0))
    noise, water = (s.device_id for s in sorted(specs, key=lambda s: s.slave_id or 0))
    with running(mqtt_server, ids, tmp_path, specs) as (gw, _bus, ingest):
        wait_for(
            lambda: polls(gw, water, "no_answer") >= OFFLINE_AFTER_FAILURES + 1,
            15,
            "the missing slave's timeouts",
        )
        assert not gw.tracker.devices.get(water) or not gw.tracker.devices[water].online
        wait_for(lambda: stored(ingest, noise) >= 10, 15, "the other slave's readings")
        assert stored(ingest, water) == 0
        assert polls(gw, noise, "no_answer") == 0
        # Counted in the state message's line errors too.
        assert gw.counters.modbus_polls[(water, "ok")] == 0


def test_wrong_crcs_and_noise_are_counted_and_the_bus_keeps_going(mqtt_server, ids, tmp_path):
    specs = bus_specs(
        noise_meter=FaultPlan(modbus_crc_error_probability=0.3),
        water_level=FaultPlan(modbus_noise_probability=0.5),
    )
    noise, water = (s.device_id for s in sorted(specs, key=lambda s: s.slave_id or 0))
    with running(mqtt_server, ids, tmp_path, specs) as (gw, bus, ingest):
        wait_for(lambda: polls(gw, noise, "garbled") >= 3, 20, "answers with a wrong CRC")
        wait_for(
            lambda: stored(ingest, noise) >= 10 and stored(ingest, water) >= 10,
            20,
            "readings of both slaves despite the faults",
        )
        injected = bus.injectors[noise].counters.modbus_crc_errors
        assert injected >= polls(gw, noise, "garbled") >= 3
        # Noise in front of an answer: pymodbus' framer skips it or loses the frame.
        assert bus.injectors[water].counters.modbus_noise >= 3
    # A frame lost to a wrong CRC is never stored; nothing stored is counted twice.
    assert stored(ingest, noise) <= polls(gw, noise, "ok")


def test_exception_answers_are_counted_and_keep_the_slave_online(mqtt_server, ids, tmp_path):
    """A noise meter whose firmware has its level elsewhere: exception 2 to every poll."""
    specs = bus_specs()
    noise, water = (s.device_id for s in sorted(specs, key=lambda s: s.slave_id or 0))
    sonbest = modbus_model("sonbest_sm6365b")
    elsewhere = msgspec.structs.replace(
        sonbest, registers=(msgspec.structs.replace(sonbest.registers[0], address=100),)
    )
    with running(mqtt_server, ids, tmp_path, specs, {noise: elsewhere}) as (gw, _bus, ingest):
        wait_for(
            lambda: polls(gw, noise, "exception") >= OFFLINE_AFTER_FAILURES + 2,
            15,
            "exception answers",
        )
        wait_for(lambda: stored(ingest, water) >= 3, 15, "the other slave's readings")
        assert stored(ingest, noise) == 0
        # It answers, so it is there: never marked offline by the poller.
        assert polls(gw, noise, "no_answer") == polls(gw, noise, "garbled") == 0
        assert gw.counters.modbus_polls[(noise, "ok")] == 0


def test_a_slow_slave_times_out(mqtt_server, ids, tmp_path):
    specs = bus_specs(noise_meter=FaultPlan(modbus_slow_probability=1.0))
    noise, water = (s.device_id for s in sorted(specs, key=lambda s: s.slave_id or 0))
    with running(mqtt_server, ids, tmp_path, specs) as (gw, bus, ingest):
        wait_for(
            lambda: polls(gw, noise, "no_answer") + polls(gw, noise, "garbled") >= 4,
            20,
            "the slow slave's timeouts",
        )
        wait_for(lambda: stored(ingest, water) >= 5, 15, "the other slave's readings")
        assert bus.good(noise) == 0
        assert polls(gw, noise, "ok") <= 1  # a late answer is never taken for the next poll's


def test_the_bus_taken_away_is_reopened_with_backoff(mqtt_server, ids, tmp_path):
    specs = bus_specs()
    noise, _water = (s.device_id for s in sorted(specs, key=lambda s: s.slave_id or 0))
    with running(mqtt_server, ids, tmp_path, specs) as (gw, bus, ingest):
        wait_for(lambda: stored(ingest, noise) >= 3, 15, "readings before the bus goes")
        bus.take_away()
        wait_for(lambda: gw.counters.modbus_reconnects >= 3, 15, "reopen attempts")
        before = stored(ingest, noise)
        bus.plug_in()
        wait_for(lambda: stored(ingest, noise) >= before + 5, 40, "readings after the reopen")


def test_a_command_writes_the_register_and_the_slave_takes_it(mqtt_server, ids, tmp_path):
    gateway_id, prefix = ids
    specs = bus_specs(noise_meter=FaultPlan(modbus_silent_probability=1.0))
    noise, water = (s.device_id for s in sorted(specs, key=lambda s: s.slave_id or 0))
    water_model = next(s.model for s in specs if s.device_id == water)
    centre = Centre(mqtt_server, gateway_id=gateway_id, prefix=prefix)
    centre.acking = True

    def run(device_id: str, name: str, **args: int | float) -> tuple[list[str], Any]:
        cmd = Command(
            command_id=command_id(),
            device_id=device_id,
            name=name,
            args=dict(args),
            ttl_s=600,
            created_ms=now_ms(),
        )
        centre.send([cmd], [])
        wait_for(
            lambda: any(s in centre.states(cmd.command_id) for s in ("succeeded", "failed")),
            20,
            f"{name}'s final report",
        )
        states = centre.states(cmd.command_id)
        return states, centre.report(cmd.command_id, states[-1])

    try:
        with running(mqtt_server, ids, tmp_path, specs) as (gw, _bus, ingest):
            wait_for(lambda: stored(ingest, water) >= 2, 15, "the gauge answering")
            states, report = run(water, "set_response_delay", delay_ms=120)
            assert states == ["sent", "delivered", "succeeded"], (states, report.detail)
            assert water_model.response_delay_ms == 120  # type: ignore[attr-defined]
            # The noise meter never answers: its write fails with the timeout.
            states, report = run(noise, "calibrate_offset", offset_db=1.5)
            assert states[-1] == "failed"
            assert "no answer" in report.detail
            # A command the gauge's register map has no register for.
            states, report = run(water, "set_reporting_interval", interval_s=60)
            assert states == ["sent", "failed"]
            assert "no register" in report.detail
            assert gw.counters.commands_succeeded == 1
    finally:
        centre.close()
