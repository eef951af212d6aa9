"""Commands for serial sensors (gateway.serialcommands): frames planned, replies judged.

Pure: tables of commands and replies, and properties checked against the
simulated sensors' own reading of the frames (firmware_sim.sensorcontrol).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contracts.catalog import DEVICE_TYPES, ArgValue
from contracts.commands import Command, check_command
from contracts.errors import CommandRefusedError
from contracts.frames import Sds011Reply, decode_sds011
from contracts.sensorcommands import (
    SDS011_ALL_DEVICES,
    pms5003_set_passive,
    pms5003_set_sleep,
    sds011_set_reporting_mode,
    sds011_set_working,
    sds011_set_working_period,
)
from firmware_sim.sensorcontrol import SensorControl
from gateway.serialcommands import (
    NO_REPLY,
    PMS5003_UNCONFIRMED,
    SDS011_REPLY_TIMEOUT_S,
    SerialPlan,
    judge_interrupted,
    judge_reply,
    judge_timeout,
    judge_written,
    plan_serial_command,
)

SENSOR = 0xA160


def command(name: str, **args: ArgValue) -> Command:
    return Command(
        command_id="c-0123456789abcdef",
        device_id="aq-hk-01",
        name=name,
        args=dict(args),
        ttl_s=600,
        created_ms=1_767_225_600_000,
    )


def reply(command_id: int, write: int, setting: int, device_id: int = SENSOR) -> Sds011Reply:
    return Sds011Reply(command=command_id, data=bytes((write, setting, 0)), device_id=device_id)


# --- planning -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("protocol", "name", "args", "frame", "reply_to", "answer"),
    [
        ("sds011", "sleep", {}, sds011_set_working(False), (6, 0), {"working": False}),
        ("sds011", "wake", {}, sds011_set_working(True), (6, 1), {"working": True}),
        (
            "sds011",
            "set_working_period",
            {"minutes": 5},
            sds011_set_working_period(5),
            (8, 5),
            {"working_period_min": 5},
        ),
        (
            "sds011",
            "set_working_period",
            {"minutes": 0},
            sds011_set_working_period(0),
            (8, 0),
            {"working_period_min": 0},
        ),
        (
            "sds011",
            "set_reporting_mode",
            {"mode": "query"},
            sds011_set_reporting_mode("query"),
            (2, 1),
            {"reporting_mode": "query"},
        ),
        (
            "sds011",
            "set_reporting_mode",
            {"mode": "active"},
            sds011_set_reporting_mode("active"),
            (2, 0),
            {"reporting_mode": "active"},
        ),
        ("pms5003", "sleep", {}, pms5003_set_sleep(True), None, {"working": False}),
        ("pms5003", "wake", {}, pms5003_set_sleep(False), None, {"working": True}),
        (
            "pms5003",
            "set_reporting_mode",
            {"mode": "query"},
            pms5003_set_passive(True),
            None,
            {"reporting_mode": "query"},
        ),
        (
            "pms5003",
            "set_reporting_mode",
            {"mode": "active"},
            pms5003_set_passive(False),
            None,
            {"reporting_mode": "active"},
        ),
    ],
)
def test_plan_writes_the_datasheet_frame(protocol, name, args, frame, reply_to, answer) -> None:
    plan = plan_serial_command(command(name, **args), protocol)
    assert plan.frames == (frame,)
    assert plan.answer == answer
    assert plan.command_id == "c-0123456789abcdef"
    if reply_to is None:
        assert not plan.confirms
        assert plan.reply_timeout_s == 0
    else:
        assert plan.confirms
        assert (plan.reply_command, plan.reply_setting) == reply_to
        assert plan.reply_timeout_s == SDS011_REPLY_TIMEOUT_S
        assert plan.sensor_id == SDS011_ALL_DEVICES


def test_plan_addresses_one_sds011_when_asked() -> None:
    plan = plan_serial_command(command("sleep"), "sds011", sensor_id=SENSOR)
    assert plan.frames == (sds011_set_working(False, device_id=SENSOR),)
    assert plan.sensor_id == SENSOR


@pytest.mark.parametrize(
    ("protocol", "name", "args", "arg", "says"),
    [
        ("pms5003", "set_working_period", {"minutes": 5}, None, "pms5003 sensor cannot take it"),
        ("sds011", "set_reporting_interval", {"interval_s": 60}, None, "cannot take it"),
        ("pms5003", "reboot", {}, None, "cannot take it"),
        ("modbus", "sleep", {}, None, "no serial protocol 'modbus'"),
        ("sds011", "set_working_period", {"minutes": 31}, "minutes", "0..30"),
        ("sds011", "set_working_period", {"minutes": -1}, "minutes", "0..30"),
        ("sds011", "set_working_period", {"minutes": True}, "minutes", "whole number"),
        ("sds011", "set_working_period", {"minutes": 5.0}, "minutes", "whole number"),
        ("sds011", "set_working_period", {}, "minutes", "None"),
        ("sds011", "set_reporting_mode", {"mode": "passive"}, "mode", "active, query"),
        ("pms5003", "set_reporting_mode", {}, "mode", "None"),
        ("sds011", "sleep", {"now": True}, "now", "unknown arg"),
        ("pms5003", "set_reporting_mode", {"mode": "query", "x": 1}, "x", "unknown arg"),
    ],
)
def test_plan_refuses_what_the_frames_cannot_carry(protocol, name, args, arg, says) -> None:
    with pytest.raises(CommandRefusedError) as caught:
        plan_serial_command(command(name, **args), protocol)
    assert caught.value.command == name
    assert caught.value.arg == arg
    assert says in str(caught.value)


def test_plan_refuses_a_sensor_id_outside_16_bits() -> None:
    with pytest.raises(CommandRefusedError, match="16 bits"):
        plan_serial_command(command("sleep"), "sds011", sensor_id=0x10000)


@pytest.mark.parametrize("protocol", ["pms5003", "sds011"])
def test_every_catalog_command_a_protocol_carries_has_a_plan(protocol) -> None:
    """The catalog and the planner agree: a checked serial command always has frames."""
    dtype = DEVICE_TYPES["air_quality"]
    samples = {"set_working_period": {"minutes": "7"}, "set_reporting_mode": {"mode": "query"}}
    planned = []
    for name in dtype.command_names:
        spec = dtype.command(name)
        assert spec is not None
        if protocol not in spec.protocols:
            continue
        checked = check_command(
            dtype,
            name,
            samples.get(name, {}),
            command_id="c-0123456789abcdef",
            device_id="aq-hk-01",
            ttl_s=600,
            now_ms=1_767_225_600_000,
            serial_protocol=protocol,
        )
        plan_serial_command(checked, protocol)
        planned.append(name)
    assert set(planned) >= {"sleep", "wake", "set_reporting_mode"}


# --- judging --------------------------------------------------------------------------


def period_plan(minutes: int = 5, sensor_id: int = SDS011_ALL_DEVICES) -> SerialPlan:
    return plan_serial_command(
        command("set_working_period", minutes=minutes), "sds011", sensor_id=sensor_id
    )


@pytest.mark.parametrize(
    ("plan_sensor", "answer", "state", "why"),
    [
        (SDS011_ALL_DEVICES, reply(8, 1, 5), "succeeded", "the reply it waits for"),
        (SENSOR, reply(8, 1, 5), "succeeded", "from the sensor addressed"),
        (SDS011_ALL_DEVICES, reply(8, 1, 5, device_id=0x0001), "succeeded", "any id for 0xFFFF"),
        (SENSOR, reply(8, 1, 5, device_id=0x0001), None, "another sensor's"),
        (SDS011_ALL_DEVICES, reply(8, 0, 5), None, "a query's reply"),
        (SDS011_ALL_DEVICES, reply(6, 1, 5), None, "another command's"),
        (SDS011_ALL_DEVICES, reply(2, 1, 1), None, "another command's"),
        (SDS011_ALL_DEVICES, reply(8, 1, 3), None, "a late reply to an earlier setting"),
        (SDS011_ALL_DEVICES, reply(7, 21, 6), None, "a firmware version"),
    ],
)
def test_judge_reply(plan_sensor, answer, state, why) -> None:
    outcome = judge_reply(period_plan(5, plan_sensor), answer)
    if state is None:
        assert outcome is None, why
    else:
        assert outcome is not None, why
        assert outcome.state == state
        assert outcome.answer == {"working_period_min": 5}
        assert "confirmed: working period 5 min" in outcome.detail


@pytest.mark.parametrize(
    ("name", "args", "answer", "says"),
    [
        ("sleep", {}, reply(6, 1, 0), "asleep"),
        ("wake", {}, reply(6, 1, 1), "working"),
        ("set_reporting_mode", {"mode": "query"}, reply(2, 1, 1), "query mode"),
        ("set_reporting_mode", {"mode": "active"}, reply(2, 1, 0), "active mode"),
        ("set_working_period", {"minutes": 0}, reply(8, 1, 0), "continuous"),
    ],
)
def test_judge_reply_names_what_the_sensor_confirmed(name, args, answer, says) -> None:
    outcome = judge_reply(plan_serial_command(command(name, **args), "sds011"), answer)
    assert outcome is not None
    assert outcome.state == "succeeded"
    assert says in outcome.detail
    assert "A160" in outcome.detail


def test_pms5003_succeeds_once_written_and_never_takes_a_reply() -> None:
    plan = plan_serial_command(command("sleep"), "pms5003")
    outcome = judge_written(plan)
    assert outcome is not None
    assert outcome.state == "succeeded"
    assert outcome.detail == PMS5003_UNCONFIRMED == "the PMS5003 does not confirm commands"
    assert outcome.answer == {"working": False}
    assert judge_reply(plan, reply(6, 1, 0)) is None


def test_sds011_waits_for_its_reply_once_written() -> None:
    assert judge_written(period_plan()) is None


def test_a_command_interrupted_by_a_restart_fails() -> None:
    outcome = judge_interrupted()
    assert outcome.state == "failed"
    assert outcome.detail == "interrupted: the gateway restarted before the sensor answered"


@pytest.mark.parametrize(
    ("seen", "tail"),
    [
        ([], ""),
        ([reply(6, 1, 1), reply(8, 0, 5)], ""),  # nothing about this setting
        ([reply(8, 1, 3)], " (it last said: working period 3 min)"),
        (
            [reply(8, 1, 3), reply(8, 1, 0), reply(6, 1, 0)],
            " (it last said: working period 0 (continuous))",
        ),
    ],
)
def test_judge_timeout_fails_saying_what_the_sensor_said(seen, tail) -> None:
    outcome = judge_timeout(period_plan(5), seen)
    assert outcome.state == "failed"
    assert outcome.detail == f"{NO_REPLY} from the sensor within 3 s{tail}"
    assert outcome.answer == {}


# --- properties: the simulated sensors read the frames as the plan means them -----------

_SDS_COMMANDS = st.one_of(
    st.just(command("sleep")),
    st.just(command("wake")),
    st.builds(lambda m: command("set_working_period", minutes=m), st.integers(0, 30)),
    st.builds(
        lambda m: command("set_reporting_mode", mode=m), st.sampled_from(["active", "query"])
    ),
)


@given(
    cmd=_SDS_COMMANDS,
    own_id=st.integers(0, 0xFFFE),
    addressed=st.booleans(),
)
def test_a_simulated_sds011_confirms_every_plan(cmd, own_id, addressed) -> None:
    plan = plan_serial_command(cmd, "sds011", sensor_id=own_id if addressed else 0xFFFF)
    sensor = SensorControl("sds011", device_id=own_id)
    answers = sensor.feed(b"".join(plan.frames))
    (raw,) = answers
    assert isinstance(raw, bytes)
    (answer,) = decode_sds011(raw).replies
    outcome = judge_reply(plan, answer)
    assert outcome is not None
    assert outcome.state == "succeeded"
    assert outcome.answer == plan.answer
    # The sensor is now set as the plan's answer says.
    if "working" in plan.answer:
        assert sensor.working is plan.answer["working"]
    if "working_period_min" in plan.answer:
        assert sensor.period_min == plan.answer["working_period_min"]
    if "reporting_mode" in plan.answer:
        assert sensor.on_request is (plan.answer["reporting_mode"] == "query")


@given(cmd=_SDS_COMMANDS, other=st.integers(0, 0xFFFF), write=st.integers(0, 255))
def test_only_the_exact_reply_confirms(cmd, other, write) -> None:
    plan = plan_serial_command(cmd, "sds011")
    assert plan.reply_command is not None
    assert plan.reply_setting is not None
    for candidate in (
        reply(plan.reply_command, write, plan.reply_setting),
        reply(plan.reply_command, 1, other & 0xFF),
        reply(other & 0xFF, 1, plan.reply_setting),
    ):
        exact = (
            candidate.command == plan.reply_command
            and candidate.data[0] == 1
            and candidate.data[1] == plan.reply_setting
        )
        assert (judge_reply(plan, candidate) is not None) is exact


@given(
    cmd=st.one_of(
        st.just(command("sleep")),
        st.just(command("wake")),
        st.builds(
            lambda m: command("set_reporting_mode", mode=m), st.sampled_from(["active", "query"])
        ),
    ),
    asleep=st.booleans(),
    passive=st.booleans(),
)
def test_a_simulated_pms5003_does_what_every_plan_says(cmd, asleep, passive) -> None:
    plan = plan_serial_command(cmd, "pms5003")
    sensor = SensorControl("pms5003")
    sensor.working, sensor.on_request = not asleep, passive
    assert sensor.feed(b"".join(plan.frames)) == []  # the manual documents no answer
    if "working" in plan.answer:
        assert sensor.working is plan.answer["working"]
    else:
        assert sensor.on_request is (plan.answer["reporting_mode"] == "query")
    assert sensor.malformed == 0
