"""What a simulated MQTT device does with commands: effects, answers, the ids it remembers."""

from __future__ import annotations

import msgspec
import pytest

from contracts import catalog
from contracts.commands import Command, DeviceAnswer, check_device_answer, encode_command
from firmware_sim.devicecontrol import (
    ANSWERS_KEPT,
    FAILURE_DETAILS,
    HANDLERS,
    DeviceControl,
    Work,
)
from firmware_sim.faults import FaultPlan
from firmware_sim.models import (
    MODEL_CLASSES,
    PRINTER_JAM,
    CameraCounterModel,
    CameraParams,
    ConferenceEndpointModel,
    DeviceModel,
    KioskModel,
    KioskParams,
    device_rng,
)
from firmware_sim.signals import ConferenceState

NOW_MS = 1_767_225_600_000  # Thursday 1 January 2026, 07:00 in Hanoi
PERIOD_MS = 10_000


def make_control(model: DeviceModel, plan: FaultPlan | None = None) -> DeviceControl:
    return DeviceControl(
        model,
        period_ms=PERIOD_MS,
        plan=plan or FaultPlan(),
        rng=device_rng(0, model.device_id, "commands"),
    )


def command(
    name: str,
    device_id: str = "kiosk-01",
    *,
    command_id: str = "c-0123456789abcdef",
    args: dict[str, object] | None = None,
    ttl_s: int = 600,
    created_ms: int = NOW_MS,
) -> bytes:
    return encode_command(
        Command(
            command_id=command_id,
            device_id=device_id,
            name=name,
            args=args or {},  # type: ignore[arg-type]
            ttl_s=ttl_s,
            created_ms=created_ms,
        )
    )


def kiosk(**params: object) -> KioskModel:
    return KioskModel(device_id="kiosk-01", seed=0, params=KioskParams(**params))  # type: ignore[arg-type]


def run(control: DeviceControl, payload: bytes, now_ms: int = NOW_MS + 1000) -> list[DeviceAnswer]:
    """Every answer of one command, as the device gives them (its work done at once)."""
    decision = control.receive(payload, now_ms=now_ms)
    answers = list(decision.answers)
    if decision.work is not None:
        answers.append(control.complete(decision.work))
    for answer in answers:
        check_device_answer(answer)
    return answers


def states(answers: list[DeviceAnswer]) -> list[str]:
    return [a.state for a in answers]


def test_every_command_of_an_mqtt_type_has_a_handler() -> None:
    for dtype in catalog.SHIPPED_CATALOG.types.values():
        if "mqtt" not in dtype.transports:
            continue
        for name in dtype.command_names:
            assert (dtype.name, name) in HANDLERS or ("*", name) in HANDLERS, (dtype.name, name)


@pytest.mark.parametrize(
    ("type_name", "interval_s"),
    [("kiosk", 5), ("camera_counter", 60), ("conference_endpoint", 200), ("noise_meter", 10),
     ("water_level", 300)],
)  # fmt: skip
def test_set_reporting_interval_changes_the_period(type_name: str, interval_s: int) -> None:
    model = MODEL_CLASSES[type_name](device_id="dev-01", seed=0)
    control = make_control(model)
    answers = run(
        control,
        command("set_reporting_interval", "dev-01", args={"interval_s": interval_s}),
    )
    assert states(answers) == ["delivered", "succeeded"]
    assert answers[1].answer == {"interval_s": interval_s}
    assert control.period_ms == interval_s * 1000


@pytest.mark.parametrize(
    ("name", "args", "setup", "state", "detail", "check"),
    [
        ("close_queue", {"message": "Hết giờ lấy số"}, {}, "succeeded",
         "queue closed; screen shows: Hết giờ lấy số",
         lambda k: not k.queue_open and k.notice == "Hết giờ lấy số"),
        ("open_queue", {}, {"queue_open": False}, "succeeded", "queue opened: issuing tickets",
         lambda k: k.queue_open and k.notice == ""),
        ("open_queue", {}, {}, "succeeded", "queue was already open", lambda k: k.queue_open),
        ("print_test_page", {}, {}, "succeeded", "test ticket printed",
         lambda k: k.paper_tickets == 499),
        ("print_test_page", {}, {"paper_tickets": 0}, "failed", "printer out of paper",
         lambda k: k.paper_tickets == 0),
        ("print_test_page", {}, {"jammed": True}, "failed", "printer jammed",
         lambda k: k.paper_tickets == 500),
    ],
)  # fmt: skip
def test_kiosk_commands(
    name: str, args: dict[str, object], setup: dict[str, object], state: str, detail: str, check
) -> None:
    model = kiosk(initial_paper_pct=50.0)
    for key, value in setup.items():
        setattr(model, key, value)
    control = make_control(model)
    answers = run(control, command(name, args=args))
    assert states(answers) == ["delivered", state]
    assert answers[1].detail == detail
    assert check(model)


def test_print_test_page_takes_one_to_three_seconds() -> None:
    control = make_control(kiosk())
    decision = control.receive(command("print_test_page"), now_ms=NOW_MS)
    assert decision.work is not None
    assert 1.0 <= decision.work.duration_s <= 3.0


def test_a_closed_queue_issues_no_tickets_and_is_still_served() -> None:
    model = kiosk(initial_paper_pct=50.0)
    control = make_control(model)
    # 09:00-10:00 on a weekday: a busy hall.
    t = NOW_MS + 2 * 3_600_000
    for i in range(60):
        model.step(t + i * 10_000)
    run(control, command("close_queue"))
    waiting = model.queue.waiting
    readings = [model.step(t + 600_000 + i * 10_000) for i in range(360)]
    assert all(r["tickets_issued"] == 0 for r in readings)
    assert readings[-1]["queue_length"] < max(waiting, 1)
    run(control, command("open_queue", command_id="c-1111111111111111"))
    readings = [model.step(t + 4_300_000 + i * 10_000) for i in range(360)]
    assert sum(r["tickets_issued"] for r in readings) > 0


def test_reboot_is_work_offline_then_answers_with_the_new_boot_id() -> None:
    model = kiosk()
    old_boot = model.boot_id
    control = make_control(model)
    decision = control.receive(command("reboot"), now_ms=NOW_MS)
    assert states(list(decision.answers)) == ["delivered"]
    work = decision.work
    assert work is not None
    assert work.reboot
    assert 3.0 <= work.duration_s <= 8.0
    model.reboot(NOW_MS + 5000)  # the transport does it while offline
    final = control.complete(work)
    assert final.state == "succeeded"
    assert final.answer == {"boot": model.boot_id} != {"boot": old_boot}
    assert model.seq == 0


@pytest.mark.parametrize(("mode", "occupancy", "expected"), [("hall", 0, 0), ("hall", 120, 120)])
def test_reset_count_sets_a_hall_cameras_occupancy(
    mode: str, occupancy: int, expected: int
) -> None:
    model = CameraCounterModel(device_id="cam-01", seed=0, params=CameraParams(mode="hall"))
    model.occupancy = 37
    control = make_control(model)
    answers = run(control, command("reset_count", "cam-01", args={"occupancy": occupancy}))
    assert states(answers) == ["delivered", "succeeded"]
    assert model.occupancy == expected


def test_reset_count_without_args_restarts_from_zero_and_a_street_camera_has_nothing() -> None:
    hall = CameraCounterModel(device_id="cam-01", seed=0, params=CameraParams(mode="hall"))
    hall.occupancy = 37
    run(make_control(hall), command("reset_count", "cam-01"))
    assert hall.occupancy == 0
    street = CameraCounterModel(device_id="cam-02", seed=0, params=CameraParams(mode="street"))
    answers = run(make_control(street), command("reset_count", "cam-02"))
    assert answers[-1].state == "succeeded"
    assert "per interval" in answers[-1].detail


@pytest.mark.parametrize(
    ("state", "outcome", "detail"),
    [
        (ConferenceState(), "succeeded", "test call of 30 s completed"),
        (ConferenceState(online=False), "failed", "not registered with the conference service"),
        (ConferenceState(in_meeting=True), "failed", "busy: a meeting is in progress"),
    ],
)
def test_start_test_call(state: ConferenceState, outcome: str, detail: str) -> None:
    model = ConferenceEndpointModel(device_id="conf-01", seed=0)
    model.state = state
    control = make_control(model)
    decision = control.receive(command("start_test_call", "conf-01"), now_ms=NOW_MS)
    assert decision.work is not None
    final = control.complete(decision.work)
    assert (final.state, final.detail) == (outcome, detail)
    if outcome == "succeeded":
        # The call's 30 s (the catalog default) plus its set-up.
        assert 32.0 <= decision.work.duration_s <= 35.0
        assert set(final.answer) == {"rtt_ms", "loss_pct", "jitter_ms", "duration_s"}
        assert 5.0 < float(final.answer["rtt_ms"]) < 200.0


def test_a_command_id_seen_before_is_not_carried_out_again() -> None:
    model = kiosk(initial_paper_pct=50.0)
    control = make_control(model)
    payload = command("print_test_page")
    first = control.receive(payload, now_ms=NOW_MS)
    # Again while printing: "delivered" again, no second work.
    again = control.receive(payload, now_ms=NOW_MS)
    assert states(list(again.answers)) == ["delivered"]
    assert again.work is None
    assert again.repeated
    assert first.work is not None
    final = control.complete(first.work)
    # Again after: the final answer again.
    later = control.receive(payload, now_ms=NOW_MS + 60_000)
    assert later.answers == (final,)
    assert later.work is None
    assert model.paper_tickets == 499
    assert control.executed == 1


def test_the_memory_keeps_the_last_few_hundred_ids() -> None:
    control = make_control(kiosk())
    for i in range(ANSWERS_KEPT + 1):
        run(control, command("open_queue", command_id=f"c-{i:016x}"))
    assert control.executed == ANSWERS_KEPT + 1
    # The newest are remembered, the oldest forgotten (carried out again).
    assert control.receive(
        command("open_queue", command_id=f"c-{ANSWERS_KEPT:016x}"), now_ms=NOW_MS
    ).repeated
    assert not control.receive(
        command("open_queue", command_id=f"c-{0:016x}"), now_ms=NOW_MS
    ).repeated


@pytest.mark.parametrize(
    ("payload", "answers", "problem"),
    [
        # Expired: created_ms + ttl_s before the device's now.
        (command("open_queue", ttl_s=60, created_ms=NOW_MS - 61_000), ["failed"],
         "expired before it arrived"),
        (command("open_queue", "kiosk-02"), ["failed"], "for device kiosk-02, not kiosk-01"),
        (command("reset_count"), ["failed"], "unknown command"),
        (command("set_reporting_interval", args={"interval_s": 1}), ["failed"], "outside [5, 100]"),
        (b'{"command_id": "c-0123456789abcdef", "name": 3}', ["failed"], "command"),
        (b"not json", [], "command"),
        (b'{"command_id": "BAD ID"}', [], "command"),
        # Over COMMAND_MAX_BYTES (16 KiB): refused before it is parsed as a command.
        (b'{"command_id": "c-0123456789abcdee", "pad": "' + b"x" * 17_000 + b'"}', ["failed"],
         "exceeds the limit"),
    ],
)  # fmt: skip
def test_refused_commands(payload: bytes, answers: list[str], problem: str) -> None:
    model = kiosk()
    control = make_control(model)
    decision = control.receive(payload, now_ms=NOW_MS)
    assert states(list(decision.answers)) == answers
    assert decision.work is None
    assert problem in decision.problem
    if answers:
        assert problem in decision.answers[0].detail
        # Remembered: the same id again is answered the same, not carried out.
        assert control.receive(payload, now_ms=NOW_MS).answers == decision.answers
    assert control.executed == 0
    assert model.queue_open


def test_a_failure_from_the_plan_says_what_the_device_says_and_changes_nothing() -> None:
    model = kiosk(initial_paper_pct=50.0)
    control = make_control(model, FaultPlan(command_failure_probability=1.0))
    answers = run(control, command("print_test_page"))
    assert states(answers) == ["delivered", "failed"]
    assert answers[1].detail == FAILURE_DETAILS["print_test_page"]
    assert model.paper_tickets == 500
    answers = run(control, command("close_queue", command_id="c-1111111111111111"))
    assert answers[1].detail == FAILURE_DETAILS["close_queue"]
    assert model.queue_open


def test_a_late_answer_comes_after_the_commands_timeout() -> None:
    plan = FaultPlan(command_late_probability=1.0, command_late_s=10.0)
    control = make_control(kiosk(), plan)
    decision = control.receive(command("print_test_page"), now_ms=NOW_MS)
    work = decision.work
    assert isinstance(work, Work)
    # print_test_page: the catalog's default 30 s timeout.
    assert work.duration_s + work.late_s == pytest.approx(40.0)


def test_probabilities_do_not_shift_the_handlers_draws() -> None:
    durations = []
    for plan in (FaultPlan(), FaultPlan(command_late_probability=0.5)):
        control = make_control(kiosk(), plan)
        decision = control.receive(command("print_test_page"), now_ms=NOW_MS)
        assert decision.work is not None
        durations.append(decision.work.duration_s)
    assert durations[0] == durations[1]


def test_air_quality_on_mqtt_sleeps_wakes_and_refuses_query_mode() -> None:
    model = MODEL_CLASSES["air_quality"](device_id="aq-01", seed=0)
    control = make_control(model)
    run(control, command("sleep", "aq-01", command_id="c-0000000000000001"))
    assert not control.may_report()
    run(control, command("wake", "aq-01", command_id="c-0000000000000002"))
    assert control.may_report()
    answers = run(
        control,
        command(
            "set_reporting_mode", "aq-01", command_id="c-0000000000000003", args={"mode": "query"}
        ),
    )
    assert answers[-1].state == "failed"
    run(
        control,
        command(
            "set_working_period", "aq-01", command_id="c-0000000000000004", args={"minutes": 5}
        ),
    )
    assert control.period_ms == 300_000
    run(
        control,
        command(
            "set_working_period", "aq-01", command_id="c-0000000000000005", args={"minutes": 0}
        ),
    )
    assert control.period_ms == PERIOD_MS


def test_answers_are_valid_json_device_answers() -> None:
    control = make_control(kiosk())
    for answer in run(control, command("print_test_page")):
        raw = msgspec.json.encode(answer)
        assert msgspec.json.decode(raw, type=DeviceAnswer) == answer


def test_the_printer_jam_code_is_the_catalogs() -> None:
    assert catalog.PRINTER_STATUS_LABELS[PRINTER_JAM] == "jam"
