"""Simulated sensors obeying the datasheets' commands: the pure state, then on a real pty."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

import msgspec
import pytest

from contracts.frames import FrameDecoder, Sds011Reply, SensorKind, encode_sds011_reply
from contracts.sensorcommands import (
    pms5003_read_passive,
    pms5003_set_passive,
    pms5003_set_sleep,
    sds011_command,
    sds011_query_data,
    sds011_set_reporting_mode,
    sds011_set_working,
    sds011_set_working_period,
)
from contracts.settings import BrokerSettings
from firmware_sim.fleet import DeviceCounts, FleetDescription, SiteInfo, build_fleet
from firmware_sim.sensorcontrol import FRAME, MINUTE_MS, SensorControl
from firmware_sim.sensorframes import sds011_id
from firmware_sim.service import Simulator

ID = 0xA160


def reply(command: int, data: str) -> bytes:
    return encode_sds011_reply(Sds011Reply(command=command, data=bytes.fromhex(data), device_id=ID))


# --- the pure state -------------------------------------------------------------


def test_sds011_sleep_query_mode_and_period() -> None:
    control = SensorControl("sds011", device_id=ID)
    assert control.may_report(0)
    # The protocol's example reply to "set A160 to sleep": AA C5 06 01 00 00 A1 60 08 AB.
    assert control.feed(sds011_set_working(False)) == [bytes.fromhex("AAC506010000A16008AB")]
    assert not control.may_report(1000)
    assert control.feed(sds011_query_data()) == []  # asleep: nothing to report
    assert control.feed(sds011_set_working(True)) == [reply(6, "010100")]
    assert control.may_report(2000)
    assert control.feed(sds011_set_working_period(1)) == [reply(8, "010100")]
    assert control.may_report(3000)
    assert not control.may_report(3000 + MINUTE_MS - 1)
    assert control.may_report(3000 + MINUTE_MS)
    assert control.feed(sds011_command(8)) == [reply(8, "000100")]  # query the period
    assert control.feed(sds011_set_reporting_mode("query")) == [reply(2, "010100")]
    assert not control.may_report(10 * MINUTE_MS)
    assert control.feed(sds011_query_data(device_id=ID)) == [FRAME]


def test_sds011_ignores_other_ids_and_malformed_commands() -> None:
    control = SensorControl("sds011", device_id=ID)
    assert control.feed(sds011_set_working(False, device_id=ID + 1)) == []
    bad = bytearray(sds011_set_working(False))
    bad[17] ^= 0x01
    assert control.feed(bytes(bad)) == []
    assert control.feed(sds011_set_working(False)[:7]) == []  # truncated so far
    assert control.working
    assert control.malformed == 1
    assert control.feed(sds011_command(8, bytes((1, 31)))) == []  # period beyond 30
    assert control.period_min == 0
    # The rest of a command split over two reads is one command.
    whole = sds011_set_working(False)
    assert control.feed(whole[:5]) == []
    assert control.feed(whole[5:]) == [reply(6, "010000")]
    assert not control.working


def test_pms5003_passive_read_and_sleep() -> None:
    control = SensorControl("pms5003")
    assert control.feed(pms5003_read_passive()) == []  # active mode: not a command it answers
    assert control.feed(pms5003_set_passive(True)) == []  # no answer in the manual
    assert not control.may_report(0)
    assert control.feed(pms5003_read_passive() + pms5003_read_passive()) == [FRAME, FRAME]
    assert control.feed(pms5003_set_sleep(True) + pms5003_read_passive()) == []
    assert control.feed(pms5003_set_sleep(False) + pms5003_set_passive(False)) == []
    assert control.may_report(0)


# --- a real pty -----------------------------------------------------------------

# 60x: a simulated minute passes in a wall second, so a working period of one
# minute shows within seconds; continuous reporting is then 60 frames a second.
ACCELERATION = 60.0


def serial_spec(protocol: SensorKind):
    fleet = build_fleet(
        FleetDescription(
            seed=3,
            site=[SiteInfo(id="cmd-street", kind="street_monitor")],
            devices={"street_monitor": DeviceCounts(air_quality=1, camera_counter=0)},
        ),
        [],
    )
    (spec,) = [s for s in fleet if s.transport == "serial"]
    return msgspec.structs.replace(spec, protocol=protocol)


class Line:
    """The host end of a simulated sensor's pty, read in the simulator's event loop."""

    def __init__(self, path: str, kind: SensorKind) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        self.decoder = FrameDecoder(kind)
        self.replies: list[Sds011Reply] = []

    async def read_for(self, seconds: float) -> int:
        """Frames that arrive within ``seconds`` (replies are kept in ``replies``)."""
        frames = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                data = os.read(self.fd, 4096)
            except BlockingIOError:
                await asyncio.sleep(0.01)
                continue
            got, replies = self.decoder.feed_all(data)
            frames += len(got)
            self.replies += replies
        return frames

    async def command(self, raw: bytes, settle_s: float = 0.3) -> int:
        """Write ``raw``; the frames read while it takes effect (not counted after)."""
        os.write(self.fd, raw)
        return await self.read_for(settle_s)

    def close(self) -> None:
        os.close(self.fd)


def run_with_line(protocol: SensorKind, script: Callable[[Line], object]) -> Simulator:
    spec = serial_spec(protocol)
    sim = Simulator(
        devices=[spec], site_broker=BrokerSettings(port=0), time_acceleration=ACCELERATION
    )

    async def main() -> None:
        stop = asyncio.Event()
        runner = asyncio.create_task(sim.run(stop))
        line = Line(sim.ports[spec.device_id], protocol)
        try:
            await script(line)  # type: ignore[misc]
        finally:
            stop.set()
            await runner
            line.close()

    try:
        asyncio.run(main())
    finally:
        sim.close()
    return sim


@pytest.mark.slow
def test_sds011_on_a_pty_sleeps_wakes_and_keeps_its_working_period() -> None:
    seen: dict[str, int] = {}

    async def script(line: Line) -> None:
        seen["awake"] = await line.read_for(1.0)
        await line.command(sds011_set_working(False))
        seen["asleep"] = await line.read_for(1.5)
        bad = bytearray(sds011_set_working(True))
        bad[17] ^= 0x01  # a wake-up with a bad checksum: ignored
        await line.command(bytes(bad))
        seen["bad_wake"] = await line.read_for(1.0)
        await line.command(sds011_set_working(True))
        seen["woken"] = await line.read_for(1.0)
        await line.command(sds011_set_working_period(1))
        # 3 s of wall time at 60x: three simulated minutes.
        seen["period_1min"] = await line.read_for(3.0)
        await line.command(sds011_set_working_period(0) + sds011_set_reporting_mode("query"))
        seen["query_mode"] = await line.read_for(1.0)
        seen["queried"] = await line.command(sds011_query_data(), settle_s=0.5)

    run_with_line("sds011", script)
    # Continuous: about 60 frames a wall second at 60x.
    assert seen["awake"] >= 20
    assert seen["asleep"] == 0
    assert seen["bad_wake"] == 0
    assert seen["woken"] >= 20
    # One frame a simulated minute: the first at once, then about one a second.
    assert 2 <= seen["period_1min"] <= 4
    assert seen["query_mode"] == 0
    assert seen["queried"] == 1


@pytest.mark.slow
def test_sds011_on_a_pty_answers_with_c5_replies() -> None:
    spec = serial_spec("sds011")
    own_id = sds011_id(spec.device_id)
    replies: list[Sds011Reply] = []

    async def script(line: Line) -> None:
        await line.command(sds011_set_working(False), settle_s=0.5)
        await line.command(sds011_set_working_period(1, device_id=own_id), settle_s=0.5)
        await line.command(sds011_set_working(True, device_id=own_id ^ 1), settle_s=0.5)
        replies.extend(line.replies)

    run_with_line("sds011", script)
    assert replies == [
        Sds011Reply(command=6, data=b"\x01\x00\x00", device_id=own_id),
        Sds011Reply(command=8, data=b"\x01\x01\x00", device_id=own_id),
    ]  # the last command was for another sensor's id: no reply


@pytest.mark.slow
def test_pms5003_on_a_pty_sleeps_and_reads_in_passive_mode() -> None:
    seen: dict[str, int] = {}

    async def script(line: Line) -> None:
        seen["active"] = await line.read_for(1.0)
        await line.command(pms5003_set_sleep(True))
        seen["asleep"] = await line.read_for(1.5)
        await line.command(pms5003_set_sleep(False) + pms5003_set_passive(True))
        seen["passive"] = await line.read_for(1.5)
        seen["read"] = await line.command(pms5003_read_passive(), settle_s=0.5)
        seen["read_twice"] = await line.command(
            pms5003_read_passive() + pms5003_read_passive(), settle_s=0.5
        )
        await line.command(pms5003_set_passive(False))
        seen["active_again"] = await line.read_for(1.0)

    sim = run_with_line("pms5003", script)
    assert seen["active"] >= 20
    assert seen["asleep"] == 0
    assert seen["passive"] == 0
    assert seen["read"] == 1
    assert seen["read_twice"] == 2
    assert seen["active_again"] >= 20
    assert sum(sim.stats.frames_written.values()) > 0
