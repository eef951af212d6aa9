"""What a simulated MQTT device does with a command: its effect, the ids it remembers, its answers.

A command's bytes (from ``d/{id}/cmd``) in, the ``DeviceAnswer``s to send at
once out, plus the ``Work`` still to do: how long the device is busy (or,
for a reboot, offline) and the final answer it then gives. Each catalog
command of an MQTT type has a handler in ``HANDLERS`` that applies its
effect to the device's model (or to the ``DeviceControl``, for the reporting
schedule) and says how long it takes and how it ends:

- every periodic type: ``set_reporting_interval`` (the new period applies
  at once; the transport reschedules the next reading);
- kiosk: ``reboot`` (offline a few seconds, back with a new boot id and seq
  from 0: ``DeviceModel.reboot``), ``print_test_page`` (1-3 s, one ticket of
  paper; refused by a jammed or empty printer), ``open_queue`` /
  ``close_queue`` (a closed queue issues no tickets);
- camera counter: ``reset_count`` (a hall camera's occupancy set; a street
  camera counts per interval and has nothing to reset);
- conference endpoint: ``start_test_call`` (its duration plus the call set-up;
  figures in the answer; refused while unregistered or in a meeting);
- air quality on MQTT: ``sleep`` / ``wake``, ``set_working_period``, and
  ``set_reporting_mode`` (query mode needs a serial host that asks: refused).

Protocol (docs/devices.md): a command is decoded against the device's
catalog type; "delivered" first, then "succeeded" or "failed". An id seen
before is not carried out again: the answer is repeated (the final one, or
"delivered" while still at work); the last ``ANSWERS_KEPT`` ids are kept. A
command for another device, past its expiry (created_ms + ttl_s, against the
device's clock) or refused by the decoder is answered "failed" at once; a
payload without a readable command id gets no answer (``Decision.problem``).
The fault plan's ``command_failure_probability`` makes a command fail with
what such a device says (``FAILURE_DETAILS``), ``command_late_probability``
delays the final answer past the command's catalog timeout.

Pure: the clock is the caller's (``now_ms``), the randomness a Generator of
the device's own stream (``models.device_rng(..., "commands")``); sockets,
waiting and publishing are ``firmware_sim.service``'s.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import msgspec
import numpy as np

from contracts.catalog import ArgValue
from contracts.commands import (
    DETAIL_MAX_CHARS,
    Command,
    CommandState,
    DeviceAnswer,
    decode_command,
)
from contracts.errors import InputError
from contracts.ids import check_id
from firmware_sim.faults import FaultPlan
from firmware_sim.models import (
    PRINTER_JAM,
    PRINTER_PAPER_OUT,
    CameraCounterModel,
    ConferenceEndpointModel,
    DeviceModel,
    KioskModel,
    NoiseMeterModel,
    WaterLevelModel,
)

# A few hundred answers a device keeps (ids and outcome, ~100 bytes each):
# a gateway sends a command again within minutes, not after hundreds more.
ANSWERS_KEPT: Final = 512

# What a device of each kind says when a command fails for its own reasons
# (the fault plan's command_failure_probability); "*": any command.
FAILURE_DETAILS: Final[dict[str, str]] = {
    "print_test_page": "printer out of paper",
    "reboot": "reboot refused: a ticket is printing",
    "open_queue": "display not responding",
    "close_queue": "display not responding",
    "reset_count": "counter busy: recalibrating the scene",
    "start_test_call": "test room did not answer (SIP 408 request timeout)",
    "set_reporting_interval": "flash write failed: setting not saved",
    "*": "internal error: command not carried out",
}


@dataclass(frozen=True)
class Outcome:
    """How a command ends: its final answer and the simulated seconds it takes."""

    state: str  # succeeded | failed
    detail: str
    duration_s: float
    answer: dict[str, ArgValue] = field(default_factory=dict)
    reboot: bool = False  # the device restarts: duration_s offline, then answers


@dataclass(frozen=True)
class Work:
    """What a delivered command still takes: busy (or offline) a while, then the final answer."""

    command: Command
    duration_s: float  # simulated seconds before the answer (a reboot: offline)
    final: DeviceAnswer
    reboot: bool = False
    # Simulated seconds the final answer comes late (after duration_s).
    late_s: float = 0.0


@dataclass(frozen=True)
class Decision:
    """What to do with one command message: answers to send now, work to carry out."""

    answers: tuple[DeviceAnswer, ...] = ()
    work: Work | None = None
    # Why the message was refused (for the log), empty when it was not.
    problem: str = ""
    repeated: bool = False  # an id seen before: answered again, not carried out


_IN_PROGRESS: Final = object()


def _cut(text: str) -> str:
    return text[:DETAIL_MAX_CHARS]


class DeviceControl:
    """One MQTT device's command side: its schedule, the answers it gave, its command handlers."""

    def __init__(
        self,
        model: DeviceModel,
        *,
        period_ms: int,
        plan: FaultPlan,
        rng: np.random.Generator,
    ) -> None:
        self.model = model
        self.plan = plan
        self.rng = rng
        self.interval_ms = period_ms  # the reporting interval
        self.working_period_ms = 0  # air quality: one reading every n minutes; 0: off
        self.sleeping = False  # air quality: fan and laser stopped
        self.executed = 0  # commands carried out (repeats and refusals excluded)
        # command id -> its final answer, or _IN_PROGRESS; oldest first.
        self._answers: OrderedDict[str, object] = OrderedDict()

    @property
    def device_id(self) -> str:
        return self.model.device_id

    @property
    def period_ms(self) -> int:
        """Milliseconds (simulated) between readings as the commands have set them."""
        return self.working_period_ms or self.interval_ms

    def may_report(self) -> bool:
        return not self.sleeping

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * float(self.rng.random())

    def _remember(self, command_id: str, answer: object) -> None:
        self._answers[command_id] = answer
        self._answers.move_to_end(command_id)
        while len(self._answers) > ANSWERS_KEPT:
            self._answers.popitem(last=False)

    def receive(self, payload: bytes, *, now_ms: int) -> Decision:
        """Decide what a command message means for this device at ``now_ms`` (its clock)."""
        try:
            command = decode_command(payload, catalog_type=self.model.device_type)
        except InputError as exc:
            return self._refused(payload, str(exc))
        known = self._answers.get(command.command_id)
        if known is not None:
            self._answers.move_to_end(command.command_id)
            again = (
                known
                if isinstance(known, DeviceAnswer)
                else DeviceAnswer(command_id=command.command_id, state=CommandState.DELIVERED)
            )
            return Decision(answers=(again,), repeated=True)
        if command.device_id != self.device_id:
            return self._fail_now(
                command.command_id, f"command for device {command.device_id}, not {self.device_id}"
            )
        if now_ms > command.expires_ms:
            return self._fail_now(command.command_id, "expired before it arrived")
        handler = HANDLERS.get((self.model.device_type.name, command.name)) or HANDLERS.get(
            ("*", command.name)
        )
        if handler is None:
            return self._fail_now(
                command.command_id, f"{command.name}: not implemented by this firmware"
            )
        # Two draws for every command, used or not: a plan's probabilities do
        # not shift the handlers' own draws.
        fail_u, late_u = self.rng.random(2).tolist()
        if fail_u < self.plan.command_failure_probability:
            detail = FAILURE_DETAILS.get(command.name, FAILURE_DETAILS["*"])
            outcome = Outcome(CommandState.FAILED, detail, self.uniform(0.5, 2.0))
        else:
            outcome = handler(self, command)
            self.executed += 1
        late_s = 0.0
        if late_u < self.plan.command_late_probability:
            spec = self.model.device_type.command(command.name)
            timeout_s = spec.timeout_s if spec is not None else 0.0
            late_s = max(0.0, timeout_s - outcome.duration_s) + self.plan.command_late_s
        self._remember(command.command_id, _IN_PROGRESS)
        final = DeviceAnswer(
            command_id=command.command_id,
            state=outcome.state,
            detail=_cut(outcome.detail),
            answer=outcome.answer,
        )
        return Decision(
            answers=(DeviceAnswer(command_id=command.command_id, state=CommandState.DELIVERED),),
            work=Work(
                command=command,
                duration_s=outcome.duration_s,
                final=final,
                reboot=outcome.reboot,
                late_s=late_s,
            ),
        )

    def complete(self, work: Work) -> DeviceAnswer:
        """The final answer of ``work``, now done (after a reboot: with the new boot id); kept."""
        final = work.final
        if work.reboot and final.state == CommandState.SUCCEEDED:
            final = msgspec.structs.replace(final, answer={"boot": self.model.boot_id})
        self._remember(final.command_id, final)
        return final

    def _fail_now(self, command_id: str, detail: str) -> Decision:
        answer = DeviceAnswer(command_id=command_id, state=CommandState.FAILED, detail=_cut(detail))
        self._remember(command_id, answer)
        return Decision(answers=(answer,), problem=detail)

    def _refused(self, payload: bytes, problem: str) -> Decision:
        command_id = _command_id(payload)
        if command_id is None:
            return Decision(problem=problem)
        known = self._answers.get(command_id)
        if isinstance(known, DeviceAnswer):
            return Decision(answers=(known,), problem=problem, repeated=True)
        if known is not None:
            # A mangled copy of a command at work: it is being carried out.
            return Decision(
                answers=(DeviceAnswer(command_id=command_id, state=CommandState.DELIVERED),),
                problem=problem,
                repeated=True,
            )
        return self._fail_now(command_id, f"refused: {problem}")


def _command_id(payload: bytes) -> str | None:
    """The command id of a payload the decoder refused, if one can be read and is an id."""
    try:
        document = msgspec.json.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    command_id = document.get("command_id") if isinstance(document, dict) else None
    if not isinstance(command_id, str):
        return None
    try:
        return check_id(command_id, "command_id")
    except InputError:
        return None


# --- handlers ------------------------------------------------------------------------

Handler = Callable[[DeviceControl, Command], Outcome]


def _int_arg(command: Command, name: str) -> int:
    value = command.args[name]
    # decode_command checked it against the catalog: an int arg is an int.
    return int(value)


def _set_reporting_interval(control: DeviceControl, command: Command) -> Outcome:
    interval_s = _int_arg(command, "interval_s")
    control.interval_ms = interval_s * 1000
    # Writing the setting to flash: a fraction of a second.
    return Outcome(
        CommandState.SUCCEEDED,
        f"reporting every {interval_s} s",
        control.uniform(0.2, 0.8),
        {"interval_s": interval_s},
    )


def _kiosk(control: DeviceControl) -> KioskModel:
    model = control.model
    assert isinstance(model, KioskModel)  # noqa: S101 - HANDLERS keys it by type
    return model


def _reboot(control: DeviceControl, _command: Command) -> Outcome:
    # A kiosk PC with a small embedded Linux is back in a few seconds.
    return Outcome(CommandState.SUCCEEDED, "restarted", control.uniform(3.0, 8.0), reboot=True)


def _print_test_page(control: DeviceControl, _command: Command) -> Outcome:
    kiosk = _kiosk(control)
    status = kiosk.printer_status
    if status == PRINTER_JAM:
        return Outcome(CommandState.FAILED, "printer jammed", control.uniform(0.5, 1.5))
    if status == PRINTER_PAPER_OUT:
        return Outcome(CommandState.FAILED, "printer out of paper", control.uniform(0.5, 1.5))
    kiosk.paper_tickets -= 1
    # A thermal ticket printer: warm-up, print and cut in 1-3 s.
    return Outcome(
        CommandState.SUCCEEDED,
        "test ticket printed",
        control.uniform(1.0, 3.0),
        {"paper_level": round(kiosk.paper_pct, 1)},
    )


def _open_queue(control: DeviceControl, _command: Command) -> Outcome:
    kiosk = _kiosk(control)
    was_open = kiosk.queue_open
    kiosk.queue_open = True
    kiosk.notice = ""
    detail = "queue was already open" if was_open else "queue opened: issuing tickets"
    return Outcome(CommandState.SUCCEEDED, detail, control.uniform(0.2, 1.0))


def _close_queue(control: DeviceControl, command: Command) -> Outcome:
    kiosk = _kiosk(control)
    message = str(command.args.get("message", ""))
    kiosk.queue_open = False
    kiosk.notice = message
    detail = f"queue closed; screen shows: {message}" if message else "queue closed"
    answer: dict[str, ArgValue] = {"message": message} if message else {}
    return Outcome(CommandState.SUCCEEDED, detail, control.uniform(0.2, 1.0), answer)


def _reset_count(control: DeviceControl, command: Command) -> Outcome:
    camera = control.model
    assert isinstance(camera, CameraCounterModel)  # noqa: S101 - HANDLERS keys it by type
    occupancy = _int_arg(command, "occupancy")
    if camera.params.mode == "street":
        return Outcome(
            CommandState.SUCCEEDED,
            "nothing to reset: a street camera counts per interval",
            control.uniform(0.2, 0.5),
        )
    camera.occupancy = occupancy
    return Outcome(
        CommandState.SUCCEEDED,
        f"occupancy count set to {occupancy}",
        control.uniform(0.2, 0.5),
        {"occupancy": occupancy},
    )


def _start_test_call(control: DeviceControl, command: Command) -> Outcome:
    endpoint = control.model
    assert isinstance(endpoint, ConferenceEndpointModel)  # noqa: S101 - keyed by type
    duration_s = _int_arg(command, "duration_s")
    state = endpoint.state
    if not state.online:
        # The SIP REGISTER / INVITE times out: ~5 s.
        return Outcome(
            CommandState.FAILED,
            "not registered with the conference service",
            control.uniform(4.0, 6.0),
        )
    if state.in_meeting:
        return Outcome(
            CommandState.FAILED, "busy: a meeting is in progress", control.uniform(0.3, 1.0)
        )
    z = control.rng.standard_normal(3).tolist()
    # A ward office to the city's conference service over the metro network:
    # ~25 ms round trip; loss and jitter as the endpoint's readings (signals).
    rtt_ms = 25.0 * math.exp(0.3 * z[0])
    if state.burst:
        loss_pct = control.uniform(2.0, 12.0)
        jitter_ms = control.uniform(60.0, 200.0)
    else:
        loss_pct = 0.1 * math.exp(0.9 * z[1])
        jitter_ms = 12.0 * math.exp(0.35 * z[2])
    # Dialling and media set-up take 2-5 s before the call's own duration.
    return Outcome(
        CommandState.SUCCEEDED,
        f"test call of {duration_s} s completed",
        duration_s + control.uniform(2.0, 5.0),
        {
            "rtt_ms": round(rtt_ms, 1),
            "loss_pct": round(loss_pct, 2),
            "jitter_ms": round(jitter_ms, 1),
            "duration_s": duration_s,
        },
    )


def _sleep(control: DeviceControl, _command: Command) -> Outcome:
    control.sleeping = True
    return Outcome(CommandState.SUCCEEDED, "fan and laser stopped", control.uniform(0.2, 0.5))


def _wake(control: DeviceControl, _command: Command) -> Outcome:
    control.sleeping = False
    # The fan runs ~30 s before readings are stable again (SDS011 datasheet).
    return Outcome(CommandState.SUCCEEDED, "fan and laser running", control.uniform(1.0, 3.0))


def _set_working_period(control: DeviceControl, command: Command) -> Outcome:
    minutes = _int_arg(command, "minutes")
    control.working_period_ms = minutes * 60_000
    detail = f"one reading every {minutes} min" if minutes else "continuous: the reporting interval"
    return Outcome(CommandState.SUCCEEDED, detail, control.uniform(0.2, 0.8), {"minutes": minutes})


def _set_reporting_mode(control: DeviceControl, command: Command) -> Outcome:
    if command.args.get("mode") == "query":
        return Outcome(
            CommandState.FAILED,
            "query mode needs a host that asks: this monitor reports over MQTT",
            control.uniform(0.1, 0.3),
        )
    return Outcome(CommandState.SUCCEEDED, "reporting on its own", control.uniform(0.1, 0.3))


def _calibrate_offset(control: DeviceControl, command: Command) -> Outcome:
    model = control.model
    assert isinstance(model, NoiseMeterModel)  # noqa: S101 - HANDLERS keys it by type
    # decode_command checked it against the catalog: a float arg is a number.
    offset = float(command.args["offset_db"])
    model.offset_db = offset
    return Outcome(
        CommandState.SUCCEEDED,
        f"levels corrected by {offset:+.1f} dB",
        control.uniform(0.1, 0.3),
        {"offset_db": offset},
    )


def _set_response_delay(control: DeviceControl, command: Command) -> Outcome:
    model = control.model
    assert isinstance(model, WaterLevelModel)  # noqa: S101 - HANDLERS keys it by type
    model.response_delay_ms = _int_arg(command, "delay_ms")
    return Outcome(
        CommandState.SUCCEEDED,
        f"answers after {model.response_delay_ms} ms",
        control.uniform(0.1, 0.3),
        {"delay_ms": model.response_delay_ms},
    )


# (device type | "*", command) -> handler. A catalog command of an MQTT type
# without one is answered "failed: not implemented by this firmware".
HANDLERS: Final[dict[tuple[str, str], Handler]] = {
    ("*", "set_reporting_interval"): _set_reporting_interval,
    ("kiosk", "reboot"): _reboot,
    ("kiosk", "print_test_page"): _print_test_page,
    ("kiosk", "open_queue"): _open_queue,
    ("kiosk", "close_queue"): _close_queue,
    ("camera_counter", "reset_count"): _reset_count,
    ("conference_endpoint", "start_test_call"): _start_test_call,
    ("air_quality", "sleep"): _sleep,
    ("air_quality", "wake"): _wake,
    ("air_quality", "set_working_period"): _set_working_period,
    ("air_quality", "set_reporting_mode"): _set_reporting_mode,
    ("noise_meter", "calibrate_offset"): _calibrate_offset,
    ("water_level", "set_response_delay"): _set_response_delay,
}
