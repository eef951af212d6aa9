"""A command for a serial particulate sensor: the frames to write and how to judge the answer.

Pure: ``plan_serial_command`` turns a ``contracts.commands.Command`` into a
``SerialPlan`` (the bytes of ``contracts.sensorcommands`` to write, in order,
and what confirms them); ``judge_written``, ``judge_reply``, ``judge_timeout``
and, after a restart, ``judge_interrupted`` turn what then happens on the
line into a ``SerialOutcome`` (a final state, a detail and an answer for the
command's report). The service runs one command at a time per port: a reply
says which command and setting it answers, not which command id. Writing to
the port, the clock, the reply timer and the reports themselves are the
gateway service's (``gateway.serialport.SerialSource.send`` and its
``on_replies`` callback).

The catalog's serial commands (``contracts/data/catalog.toml``, air_quality)
and what each protocol makes of them:

=====================  =============================  ==========================
command                SDS011 (replies 0xC5)          PMS5003 (no replies)
=====================  =============================  ==========================
sleep                  6 set 0: sleep                 0xE4 data 0: sleep
wake                   6 set 1: work                  0xE4 data 1: wake
set_working_period     8 set n: n minutes, 0..30      refused (no such command)
set_reporting_mode     2 set 0 active / 1 query       0xE1 data 1 active / 0 passive
=====================  =============================  ==========================

SDS011 commands are addressed to 0xFFFF, every sensor on the line: one sensor
hangs on a port, and the gateway does not configure its 16-bit id. Its reply
carries the sensor's own id, which a plan for 0xFFFF therefore accepts; a
plan for one id takes only that id's replies.

A reply is this plan's when it answers the same command (data byte 1), says
"set" (data byte 2 = 1) and carries the setting asked. A reply that says a
*different* setting is **not** taken as the sensor's refusal: the sensor sets
what it was sent and echoes it, and a sensor that finds a setting outside
the protocol stays silent (the simulator does the same), so such a reply is
a late answer to an earlier command of the same kind (one that timed out).
``judge_reply`` returns None for it and the plan goes on waiting; if nothing
better comes, ``judge_timeout`` fails the command saying what the sensor did
say. A reply to a query (data byte 2 = 0) is not this plan's either: the
gateway only sets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Literal

import msgspec

from contracts.catalog import ArgValue
from contracts.commands import Command, CommandState
from contracts.errors import CommandRefusedError
from contracts.frames import Sds011Reply, SensorKind
from contracts.sensorcommands import (
    SDS011_ALL_DEVICES,
    SDS011_MAX_PERIOD_MIN,
    SDS011_REPORTING_MODE,
    SDS011_SET,
    SDS011_SLEEP_WORK,
    SDS011_WORKING_PERIOD,
    pms5003_set_passive,
    pms5003_set_sleep,
    sds011_set_reporting_mode,
    sds011_set_working,
    sds011_set_working_period,
)

# The SDS011 answers a command within its next second (its control protocol
# shows the reply as the command's immediate answer; the 19 + 10 bytes take
# 30 ms at 9600 baud); 3 s leaves room for a busy gateway and a slow USB
# adapter without holding the line long for a sensor that will never answer.
SDS011_REPLY_TIMEOUT_S: Final = 3.0
PMS5003_UNCONFIRMED: Final = "the PMS5003 does not confirm commands"
NO_REPLY: Final = "no reply"
INTERRUPTED: Final = "interrupted: the gateway restarted before the sensor answered"

SerialState = Literal["succeeded", "failed"]
_REPORTING_MODES: Final = ("active", "query")


class SerialPlan(msgspec.Struct, frozen=True, kw_only=True):
    """How one command goes to a serial sensor, and what says it was done.

    ``frames`` are written in order. ``confirms``: the sensor answers (an
    SDS011 reply: ``reply_command`` with "set" and ``reply_setting`` from
    ``sensor_id``, 0xFFFF: any id) within ``reply_timeout_s``; a PMS5003 does
    not (``reply_timeout_s`` 0). ``answer`` is what the sensor is set to, for
    the command's report.
    """

    protocol: SensorKind
    command_id: str
    name: str
    frames: tuple[bytes, ...]
    confirms: bool
    reply_timeout_s: float
    answer: dict[str, ArgValue]
    reply_command: int | None = None  # SDS011 data byte 1 the reply answers
    reply_setting: int | None = None  # the setting (data byte 3) it must carry
    sensor_id: int = SDS011_ALL_DEVICES


class SerialOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """A final state of a serial command, for its report."""

    state: SerialState
    detail: str
    answer: dict[str, ArgValue] = msgspec.field(default_factory=dict)


def _refused(command: Command, arg: str | None, problem: str) -> CommandRefusedError:
    return CommandRefusedError(None, command.name, arg, problem)


def _int_arg(command: Command, name: str, low: int, high: int) -> int:
    value = command.args.get(name)
    # bool is an int in Python: True is not a number of minutes.
    if type(value) is not int or not low <= value <= high:
        raise _refused(command, name, f"{value!r} is not a whole number in {low}..{high}")
    return value


def _mode_arg(command: Command) -> str:
    mode = command.args.get("mode")
    if mode not in _REPORTING_MODES:
        raise _refused(command, "mode", f"{mode!r} is not one of {', '.join(_REPORTING_MODES)}")
    assert isinstance(mode, str)  # noqa: S101 - narrowed by the test above
    return mode


def _check_no_args(command: Command, allowed: Sequence[str]) -> None:
    for key in command.args:
        if key not in allowed:
            raise _refused(command, key, "unknown arg")


def plan_serial_command(
    command: Command, protocol: str, *, sensor_id: int = SDS011_ALL_DEVICES
) -> SerialPlan:
    """The frames for ``command`` on a ``protocol`` sensor; CommandRefusedError if it cannot go.

    Refused: a protocol other than pms5003 / sds011, a command the protocol
    does not carry (set_working_period on a PMS5003, anything outside the
    catalog's serial commands), an unknown arg, a missing or out-of-range
    value. The args were checked against the catalog already; this check is
    of what the frames can hold. ``sensor_id`` addresses one SDS011 (16 bits).
    """
    if protocol == "sds011":
        if not 0 <= sensor_id <= SDS011_ALL_DEVICES:
            raise _refused(command, None, f"SDS011 id {sensor_id} is not 16 bits")
        return _plan_sds011(command, sensor_id)
    if protocol == "pms5003":
        return _plan_pms5003(command)
    raise _refused(command, None, f"no serial protocol {protocol[:32]!r} (known: pms5003, sds011)")


def _plan_sds011(command: Command, sensor_id: int) -> SerialPlan:
    name = command.name
    answer: dict[str, ArgValue]
    if name in ("sleep", "wake"):
        _check_no_args(command, ())
        working = name == "wake"
        frame = sds011_set_working(working, device_id=sensor_id)
        reply_command, setting, answer = SDS011_SLEEP_WORK, int(working), {"working": working}
    elif name == "set_working_period":
        _check_no_args(command, ("minutes",))
        minutes = _int_arg(command, "minutes", 0, SDS011_MAX_PERIOD_MIN)
        frame = sds011_set_working_period(minutes, device_id=sensor_id)
        reply_command, setting = SDS011_WORKING_PERIOD, minutes
        answer = {"working_period_min": minutes}
    elif name == "set_reporting_mode":
        _check_no_args(command, ("mode",))
        mode = _mode_arg(command)
        frame = sds011_set_reporting_mode(
            "query" if mode == "query" else "active", device_id=sensor_id
        )
        reply_command, setting = SDS011_REPORTING_MODE, int(mode == "query")
        answer = {"reporting_mode": mode}
    else:
        raise _refused(command, None, "a serial sds011 sensor cannot take it")
    return SerialPlan(
        protocol="sds011",
        command_id=command.command_id,
        name=name,
        frames=(frame,),
        confirms=True,
        reply_timeout_s=SDS011_REPLY_TIMEOUT_S,
        answer=answer,
        reply_command=reply_command,
        reply_setting=setting,
        sensor_id=sensor_id,
    )


def _plan_pms5003(command: Command) -> SerialPlan:
    name = command.name
    answer: dict[str, ArgValue]
    if name in ("sleep", "wake"):
        _check_no_args(command, ())
        frame = pms5003_set_sleep(name == "sleep")
        answer = {"working": name == "wake"}
    elif name == "set_reporting_mode":
        _check_no_args(command, ("mode",))
        mode = _mode_arg(command)
        # The manual's "passive" mode is the catalog's query mode.
        frame = pms5003_set_passive(mode == "query")
        answer = {"reporting_mode": mode}
    else:
        raise _refused(command, None, "a serial pms5003 sensor cannot take it")
    return SerialPlan(
        protocol="pms5003",
        command_id=command.command_id,
        name=name,
        frames=(frame,),
        confirms=False,
        reply_timeout_s=0.0,
        answer=answer,
    )


def _says(plan: SerialPlan, setting: int) -> str:
    """What a setting of the plan's command means, in words."""
    if plan.reply_command == SDS011_SLEEP_WORK:
        return "working" if setting == 1 else "asleep" if setting == 0 else f"sleep/work {setting}"
    if plan.reply_command == SDS011_REPORTING_MODE:
        return f"{_REPORTING_MODES[setting]} mode" if setting in (0, 1) else f"mode {setting}"
    if setting == 0:
        return "working period 0 (continuous)"
    return f"working period {setting} min"


def judge_written(plan: SerialPlan) -> SerialOutcome | None:
    """The outcome once the frames are written: a PMS5003's, which never answers; else None."""
    if plan.confirms:
        return None
    return SerialOutcome(
        state=CommandState.SUCCEEDED, detail=PMS5003_UNCONFIRMED, answer=dict(plan.answer)
    )


def _is_answer(plan: SerialPlan, reply: Sds011Reply) -> bool:
    """A reply to the plan's command, a "set", from the plan's sensor (any value)."""
    return (
        plan.confirms
        and reply.command == plan.reply_command
        and len(reply.data) >= 2
        and reply.data[0] == SDS011_SET
        and plan.sensor_id in (SDS011_ALL_DEVICES, reply.device_id)
    )


def judge_reply(plan: SerialPlan, reply: Sds011Reply) -> SerialOutcome | None:
    """'succeeded' if ``reply`` confirms the plan; None if it is not the reply it waits for.

    Not the plan's: another command's reply, a query's, another sensor's, or
    one carrying another setting (a late reply to an earlier command: see the
    module docstring; ``judge_timeout`` reports it if nothing better comes).
    """
    if not _is_answer(plan, reply) or reply.data[1] != plan.reply_setting:
        return None
    return SerialOutcome(
        state=CommandState.SUCCEEDED,
        detail=f"the SDS011 {reply.device_id:04X} confirmed: {_says(plan, reply.data[1])}",
        answer=dict(plan.answer),
    )


def judge_timeout(plan: SerialPlan, seen: Sequence[Sds011Reply] = ()) -> SerialOutcome:
    """'failed': no confirming reply within ``reply_timeout_s``.

    ``seen`` are the replies that came meanwhile; the last of them that
    answered the same command with another setting is quoted, so the
    operator learns what the sensor is set to.
    """
    detail = f"{NO_REPLY} from the sensor within {plan.reply_timeout_s:g} s"
    for reply in reversed(seen):
        if _is_answer(plan, reply) and reply.data[1] != plan.reply_setting:
            detail += f" (it last said: {_says(plan, reply.data[1])})"
            break
    return SerialOutcome(state=CommandState.FAILED, detail=detail)


def judge_interrupted() -> SerialOutcome:
    """'failed': a command found half done after a restart (written or not, unconfirmed).

    It is not written again: the sensor may have obeyed it, and its ttl may
    be long past the operator's intent.
    """
    return SerialOutcome(state=CommandState.FAILED, detail=INTERRUPTED)
