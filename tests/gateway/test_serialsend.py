"""Commands through SerialSource to simulated sensors on real ptys: written, obeyed, confirmed.

The simulator (firmware_sim.service) runs an SDS011 or a PMS5003 on a pty
that obeys the datasheets' commands; a SerialSource reads it as the gateway
does, ``send`` writes the frames of ``gateway.serialcommands``' plans and
``on_replies`` gets the SDS011's replies, which ``judge_reply`` judges.
"""

from __future__ import annotations

import asyncio
import os
import termios
import time
import tty
from collections.abc import Awaitable, Callable

import msgspec
import pytest

from contracts.commands import Command
from contracts.errors import SerialUnavailableError
from contracts.frames import Sds011Reply, SensorKind
from contracts.sensorcommands import PMS5003_COMMAND_BYTES, pms5003_set_sleep
from contracts.settings import BrokerSettings
from firmware_sim.fleet import DeviceCounts, FleetDescription, SiteInfo, build_fleet
from firmware_sim.sensorframes import sds011_id
from firmware_sim.service import Simulator
from gateway.serialcommands import (
    SerialOutcome,
    SerialPlan,
    judge_reply,
    judge_timeout,
    judge_written,
    plan_serial_command,
)
from gateway.serialport import SerialSource

# 60x: a simulated minute passes in a wall second, so continuous reporting is
# ~60 frames a wall second and a working period of one minute ~1 a second.
ACCELERATION = 60.0
# Frames already on the line when a command took effect are read after it.
SETTLE_S = 0.3


def serial_spec(protocol: SensorKind):
    fleet = build_fleet(
        FleetDescription(
            seed=5,
            site=[SiteInfo(id="send-street", kind="street_monitor")],
            devices={"street_monitor": DeviceCounts(air_quality=1, camera_counter=0)},
        ),
        [],
    )
    (spec,) = [s for s in fleet if s.transport == "serial"]
    return msgspec.structs.replace(spec, protocol=protocol)


def command(name: str, **args: str | int) -> Command:
    return Command(
        command_id=f"c-{os.urandom(8).hex()}",
        device_id="aq-send-01",
        name=name,
        args=dict(args),
        ttl_s=600,
        created_ms=int(time.time() * 1000),
    )


class Sensor:
    """A SerialSource on a simulated sensor's pty, with a command's wait for its outcome."""

    def __init__(self, port: str, protocol: SensorKind) -> None:
        self.protocol = protocol
        self.frames = 0
        self.replies: list[Sds011Reply] = []
        self._waiting: tuple[SerialPlan, asyncio.Future[SerialOutcome]] | None = None
        self.source = SerialSource(
            port=port,
            protocol=protocol,
            name="aq-send-01",
            on_metrics=self._on_metrics,
            on_decoded=lambda *_counts: None,
            on_reopen=lambda: None,
            on_replies=self._on_replies,
        )

    def _on_metrics(self, _metrics: dict[str, float]) -> None:
        self.frames += 1

    def _on_replies(self, replies: list[Sds011Reply]) -> None:
        self.replies += replies
        if self._waiting is None:
            return
        plan, done = self._waiting
        for reply in replies:
            outcome = judge_reply(plan, reply)
            if outcome is not None and not done.done():
                done.set_result(outcome)

    async def frames_within(self, seconds: float) -> int:
        before = self.frames
        await asyncio.sleep(seconds)
        return self.frames - before

    async def run_command(self, plan: SerialPlan) -> SerialOutcome:
        """Write the plan's frames; its outcome (a reply, a timeout, or written: a PMS5003)."""
        seen = len(self.replies)
        done: asyncio.Future[SerialOutcome] = asyncio.get_running_loop().create_future()
        self._waiting = (plan, done)
        try:
            for frame in plan.frames:
                await self.source.send(frame)
            written = judge_written(plan)
            if written is not None:
                outcome = written
            else:
                try:
                    outcome = await asyncio.wait_for(done, plan.reply_timeout_s)
                except TimeoutError:
                    outcome = judge_timeout(plan, self.replies[seen:])
        finally:
            self._waiting = None
        await asyncio.sleep(SETTLE_S)
        return outcome

    async def command(self, name: str, **args: str | int) -> SerialOutcome:
        return await self.run_command(plan_serial_command(command(name, **args), self.protocol))


def run_sensor(protocol: SensorKind, script: Callable[[Sensor], Awaitable[None]]) -> Simulator:
    spec = serial_spec(protocol)
    sim = Simulator(
        devices=[spec], site_broker=BrokerSettings(port=0), time_acceleration=ACCELERATION
    )

    async def main() -> None:
        stop = asyncio.Event()
        simulating = asyncio.create_task(sim.run(stop), name="sim")
        sensor = Sensor(sim.ports[spec.device_id], protocol)
        reading = asyncio.create_task(sensor.source.run(), name="serial[test]")
        try:
            deadline = time.monotonic() + 5
            while not sensor.source.is_open:
                assert time.monotonic() < deadline, "the port did not open"
                await asyncio.sleep(0.02)
            await script(sensor)
        finally:
            reading.cancel()
            stop.set()
            await simulating
            await asyncio.gather(reading, return_exceptions=True)

    try:
        asyncio.run(main())
    finally:
        sim.close()
    return sim


@pytest.mark.slow
def test_sds011_confirms_each_command_and_obeys_it() -> None:
    seen: dict[str, int] = {}
    outcomes: dict[str, SerialOutcome] = {}

    async def script(sensor: Sensor) -> None:
        seen["continuous"] = await sensor.frames_within(1.0)
        outcomes["sleep"] = await sensor.command("sleep")
        seen["asleep"] = await sensor.frames_within(1.5)
        outcomes["wake"] = await sensor.command("wake")
        seen["woken"] = await sensor.frames_within(1.0)
        outcomes["period"] = await sensor.command("set_working_period", minutes=1)
        # 3 wall seconds at 60x: three simulated minutes, a frame each.
        seen["period_1min"] = await sensor.frames_within(3.0)
        outcomes["continuous"] = await sensor.command("set_working_period", minutes=0)
        outcomes["query"] = await sensor.command("set_reporting_mode", mode="query")
        seen["query_mode"] = await sensor.frames_within(1.0)
        outcomes["active"] = await sensor.command("set_reporting_mode", mode="active")
        seen["active_again"] = await sensor.frames_within(1.0)

    sim = run_sensor("sds011", script)
    assert {name: o.state for name, o in outcomes.items()} == dict.fromkeys(outcomes, "succeeded")
    assert outcomes["sleep"].answer == {"working": False}
    assert outcomes["period"].answer == {"working_period_min": 1}
    assert outcomes["query"].answer == {"reporting_mode": "query"}
    own = f"{sds011_id(sim.devices[0].device_id):04X}"
    assert f"the SDS011 {own} confirmed: working period 1 min" == outcomes["period"].detail
    assert seen["continuous"] >= 20
    assert seen["asleep"] == 0
    assert seen["woken"] >= 20
    assert 2 <= seen["period_1min"] <= 4
    assert seen["query_mode"] == 0
    assert seen["active_again"] >= 20


@pytest.mark.slow
def test_sds011_replies_reach_on_replies_and_another_ids_command_times_out() -> None:
    spec = serial_spec("sds011")
    own_id = sds011_id(spec.device_id)
    outcomes: list[SerialOutcome] = []
    replies: list[Sds011Reply] = []

    async def script(sensor: Sensor) -> None:
        mine = plan_serial_command(command("sleep"), "sds011", sensor_id=own_id)
        outcomes.append(await sensor.run_command(mine))
        # Addressed to another sensor: this one ignores it and says nothing.
        other = plan_serial_command(command("wake"), "sds011", sensor_id=own_id ^ 1)
        outcomes.append(
            await sensor.run_command(msgspec.structs.replace(other, reply_timeout_s=0.5))
        )
        outcomes.append(await sensor.command("wake"))
        replies.extend(sensor.replies)

    run_sensor("sds011", script)
    assert [o.state for o in outcomes] == ["succeeded", "failed", "succeeded"]
    assert outcomes[1].detail == "no reply from the sensor within 0.5 s"
    assert replies == [
        Sds011Reply(command=6, data=b"\x01\x00\x00", device_id=own_id),
        Sds011Reply(command=6, data=b"\x01\x01\x00", device_id=own_id),
    ]


@pytest.mark.slow
def test_pms5003_sleeps_wakes_and_switches_mode_unconfirmed() -> None:
    seen: dict[str, int] = {}
    outcomes: dict[str, SerialOutcome] = {}

    async def script(sensor: Sensor) -> None:
        seen["active"] = await sensor.frames_within(1.0)
        outcomes["sleep"] = await sensor.command("sleep")
        seen["asleep"] = await sensor.frames_within(1.5)
        outcomes["wake"] = await sensor.command("wake")
        seen["woken"] = await sensor.frames_within(1.0)
        outcomes["query"] = await sensor.command("set_reporting_mode", mode="query")
        seen["passive"] = await sensor.frames_within(1.5)
        outcomes["active"] = await sensor.command("set_reporting_mode", mode="active")
        seen["active_again"] = await sensor.frames_within(1.0)
        assert sensor.replies == []

    run_sensor("pms5003", script)
    for outcome in outcomes.values():
        assert outcome.state == "succeeded"
        assert outcome.detail == "the PMS5003 does not confirm commands"
    assert seen["active"] >= 20
    assert seen["asleep"] == 0
    assert seen["woken"] >= 20
    assert seen["passive"] == 0
    assert seen["active_again"] >= 20


def noop(*_args: object) -> None:
    return None


def test_send_refuses_a_port_that_is_not_open(tmp_path) -> None:
    async def main() -> None:
        source = SerialSource(
            port=str(tmp_path / "ttyUSB9"),
            protocol="sds011",
            name="aq-send-01",
            on_metrics=noop,
            on_decoded=noop,
            on_reopen=noop,
        )
        with pytest.raises(SerialUnavailableError, match="is not open"):
            await source.send(b"\xaa")
        # Running, but the port cannot be opened: still not open, still refused.
        running = asyncio.create_task(source.run(), name="serial[missing]")
        await asyncio.sleep(0.2)
        assert not source.is_open
        with pytest.raises(SerialUnavailableError, match="ttyUSB9"):
            await source.send(b"\xaa")
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)

    asyncio.run(main())


def test_send_refuses_once_the_port_closed() -> None:
    master, slave = os.openpty()
    tty.setraw(slave, termios.TCSANOW)
    path = os.ttyname(slave)

    async def main() -> None:
        source = SerialSource(
            port=path,
            protocol="pms5003",
            name="aq-send-01",
            on_metrics=noop,
            on_decoded=noop,
            on_reopen=noop,
        )
        running = asyncio.create_task(source.run(), name="serial[pty]")
        deadline = time.monotonic() + 5
        while not source.is_open:
            assert time.monotonic() < deadline, "the port did not open"
            await asyncio.sleep(0.02)
        await source.send(pms5003_set_sleep(False))
        written = b""
        while len(written) < PMS5003_COMMAND_BYTES:
            await asyncio.sleep(0.02)
            written += os.read(master, 64)
        assert written == pms5003_set_sleep(False)
        # The sensor's end goes away: the read fails, the source reopens, sends are refused.
        os.close(master)
        os.close(slave)
        deadline = time.monotonic() + 5
        while source.is_open:
            assert time.monotonic() < deadline, "the closed port still looks open"
            await asyncio.sleep(0.02)
        with pytest.raises(SerialUnavailableError):
            await source.send(b"\x42")
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)

    asyncio.run(main())
