"""The gateway's command decisions (gateway.commanding): tables and properties, no fixtures."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contracts.catalog import SHIPPED_CATALOG
from contracts.commands import (
    FINAL_STATES,
    Command,
    DeviceAnswer,
    GatewayCommands,
    advances,
)
from contracts.errors import UnknownCommandError
from contracts.messages import DeviceConfig
from gateway.commanding import (
    DELIVERING,
    TOMBSTONE_KEEP_MS,
    UNKNOWN_DEVICE,
    Held,
    cancel,
    deliverable,
    interrupted,
    prunable,
    public_state,
    receive_answer,
    receive_commands,
    redeliverable,
    refused_by_broker,
    start_delivery,
    sweep,
)

GW = "gw-a"
NOW = 1_767_225_600_000
KIOSK = DeviceConfig(device_id="k-1", device_type="kiosk", transport="mqtt")
OTHER = DeviceConfig(device_id="k-2", device_type="kiosk", transport="mqtt")
OFF = DeviceConfig(device_id="k-3", device_type="kiosk", transport="mqtt", enabled=False)
DEVICES = {d.device_id: d for d in (KIOSK, OTHER, OFF)}
TYPES = SHIPPED_CATALOG.types


def command(
    cid: str = "c-0000000000000001",
    device: str = "k-1",
    name: str = "open_queue",
    args: dict | None = None,
    ttl_s: int = 600,
    created_ms: int = NOW,
) -> Command:
    return Command(
        command_id=cid,
        device_id=device,
        name=name,
        args=args or {},
        ttl_s=ttl_s,
        created_ms=created_ms,
    )


def receive(*commands: Command, cancels=(), held=None, now=NOW):
    message = GatewayCommands(
        gateway_id=GW, ts_ms=now, commands=list(commands), cancel=list(cancels)
    )
    return receive_commands(
        message, held=held or {}, devices=DEVICES, types=TYPES, gateway_id=GW, now_ms=now
    )


@pytest.mark.parametrize(
    ("cmd", "state", "detail"),
    [
        (command(), "sent", ""),
        (command(device="k-9"), "failed", "device k-9 is not served by gateway gw-a"),
        (command(device="k-3"), "failed", "device k-3 is not served by gateway gw-a"),
        (command(ttl_s=1, created_ms=NOW - 5000), "expired", "ttl passed"),
        (command(name="set_reporting_interval", args={"interval_s": 1}), "failed", "interval_s"),
        (command(name="no_such_command"), "failed", "unknown command"),
        (command(name="set_reporting_interval", args={"interval_s": 60}), "sent", ""),
    ],
)
def test_a_new_command_is_held_or_refused_with_its_reason(cmd, state, detail):
    (change,) = receive(cmd)
    assert change.held.state == state
    assert change.report is not None
    assert change.report.state == state
    assert change.report.report_id == f"{cmd.command_id}.{state}"
    assert detail in change.report.detail
    assert change.held.expires_ms == cmd.expires_ms


def test_a_copy_of_a_held_command_changes_nothing_and_its_report_is_due_again():
    (first,) = receive(command())
    held = {first.held.command_id: start_delivery(first.held, timeout_s=30, now_ms=NOW).held}
    (again,) = receive(command(), held=held, now=NOW + 1000)
    assert again.held == held["c-0000000000000001"]
    assert again.report is not None
    assert again.report.state == "sent"  # delivering: the centre knows it as sent


def test_the_same_command_twice_in_one_message_is_held_once():
    changes = receive(command(), command())
    assert [c.held.state for c in changes] == ["sent", "sent"]
    assert changes[0].held == changes[1].held


@pytest.mark.parametrize(
    ("state", "outcome"),
    [
        ("sent", "cancelled"),
        (DELIVERING, None),
        ("delivered", None),
        ("succeeded", None),
        ("expired", None),
    ],
)
def test_a_cancel_cancels_only_what_has_not_reached_the_device(state, outcome):
    held = Held("c-1", "k-1", command(cid="c-1"), state, NOW + 600_000)
    change = cancel(held, "c-1", NOW)
    assert (change.held.state if change else None) == outcome


def test_a_cancel_for_an_unknown_id_leaves_a_tombstone_that_refuses_the_late_command():
    (tomb,) = receive(cancels=["c-late"])
    assert tomb.held.state == "cancelled"
    assert tomb.held.device_id == UNKNOWN_DEVICE
    assert tomb.report is not None
    assert tomb.report.state == "cancelled"
    (late,) = receive(command(cid="c-late"), held={"c-late": tomb.held})
    assert late.held.state == "cancelled"
    assert late.report is not None
    assert late.report.report_id == "c-late.cancelled"
    assert late.report.device_id == "k-1"


def test_a_command_and_its_cancel_in_one_message_end_cancelled():
    changes = receive(command(), cancels=["c-0000000000000001"])
    assert [c.held.state for c in changes] == ["sent", "cancelled"]


def test_only_sent_unexpired_commands_of_online_devices_are_deliverable():
    held = [
        Held("c-1", "k-1", command(cid="c-1"), "sent", NOW + 1),
        Held("c-2", "k-2", command(cid="c-2", device="k-2"), "sent", NOW + 1),
        Held("c-3", "k-1", command(cid="c-3"), "sent", NOW),  # expired now
        Held("c-4", "k-1", command(cid="c-4"), DELIVERING, NOW + 1),
    ]
    assert [h.command_id for h in deliverable(held, online={"k-1"}, now_ms=NOW)] == ["c-1"]


@pytest.mark.parametrize(
    ("held", "now", "state", "detail"),
    [
        (Held("c-1", "k-1", command(), "sent", NOW + 10), NOW + 10, "expired", "stayed offline"),
        (Held("c-1", "k-1", command(), "sent", NOW + 10), NOW + 9, None, ""),
        (Held("c-1", "k-9", command(), "sent", NOW + 10), NOW, "failed", "no longer served"),
        (
            Held("c-1", "k-1", command(), DELIVERING, NOW, NOW, NOW + 30_000),
            NOW + 30_000,
            "failed",
            "no answer from the device within 30 s",
        ),
        (
            Held("c-1", "k-1", command(), "delivered", NOW, NOW, NOW + 30_000),
            NOW + 29_999,
            None,
            "",
        ),
        (Held("c-1", "k-1", command(), "succeeded", NOW), NOW + 99_000, None, ""),
    ],
)
def test_the_clock_expires_waiting_commands_and_fails_unanswered_ones(held, now, state, detail):
    changes = sweep([held], devices=DEVICES, gateway_id=GW, now_ms=now)
    assert [c.held.state for c in changes] == ([state] if state else [])
    if state:
        assert detail in changes[0].report.detail


@pytest.mark.parametrize(
    ("state", "answer", "new_state"),
    [
        (DELIVERING, "delivered", "delivered"),
        (DELIVERING, "succeeded", "succeeded"),
        ("delivered", "failed", "failed"),
        ("delivered", "delivered", None),  # a repeat
        ("succeeded", "succeeded", None),  # answered again after a redelivery
        ("succeeded", "failed", None),  # final states never change
        ("cancelled", "succeeded", None),
    ],
)
def test_answers_move_a_command_only_forward(state, answer, new_state):
    held = Held("c-1", "k-1", command(cid="c-1"), state, NOW + 1, NOW, NOW + 30_000)
    change = receive_answer(
        held,
        device_id="k-1",
        answer=DeviceAnswer(command_id="c-1", state=answer, detail="ok", answer={"n": 1}),
        now_ms=NOW,
    )
    assert (change.held.state if change else None) == new_state
    if change is not None:
        assert change.report.report_id == f"c-1.{answer}"
        assert change.report.answer == {"n": 1}
        if new_state in FINAL_STATES:
            assert change.held.deadline_ms is None


@pytest.mark.parametrize(
    "held",
    [
        None,  # never held
        Held("c-1", "k-2", command(cid="c-1", device="k-2"), DELIVERING, NOW),  # another device's
        Held("c-1", UNKNOWN_DEVICE, None, "cancelled", NOW),  # a tombstone
    ],
)
def test_an_answer_for_a_command_the_device_was_not_given_is_unknown_command(held):
    with pytest.raises(UnknownCommandError) as info:
        receive_answer(
            held,
            device_id="k-1",
            answer=DeviceAnswer(command_id="c-1", state="succeeded"),
            now_ms=NOW,
        )
    assert info.value.reason == "unknown_command"


def test_a_refused_publish_fails_the_command_with_the_reason_code():
    held = Held("c-1", "k-1", command(cid="c-1"), DELIVERING, NOW + 1, NOW, NOW + 30_000)
    change = refused_by_broker(held, 0x87, NOW)
    assert change is not None
    assert change.held.state == "failed"
    assert "0x87 (not authorized)" in change.report.detail
    assert refused_by_broker(change.held, 0x87, NOW) is None


def test_after_a_restart_serial_commands_in_hand_fail_and_mqtt_ones_are_published_again():
    held = [
        Held("c-1", "k-1", command(cid="c-1"), DELIVERING, NOW + 1),
        Held("c-2", "s-1", command(cid="c-2", device="s-1"), DELIVERING, NOW + 1),
        Held("c-3", "k-1", command(cid="c-3"), "delivered", NOW + 1),
        Held("c-4", "k-1", command(cid="c-4"), "succeeded", NOW + 1),
    ]
    (failed,) = interrupted(held, serial={"s-1"}, now_ms=NOW)
    assert failed.held.command_id == "c-2"
    assert "interrupted" in failed.report.detail
    again = redeliverable(held, published={"c-3"})
    assert [h.command_id for h in again] == ["c-1", "c-2"]


def test_final_commands_are_pruned_a_day_past_their_expiry():
    held = [
        Held("c-1", "k-1", command(cid="c-1"), "succeeded", NOW),
        Held("c-2", "k-1", command(cid="c-2"), "sent", NOW),
    ]
    assert prunable(held, NOW + TOMBSTONE_KEEP_MS) == []
    assert prunable(held, NOW + TOMBSTONE_KEEP_MS + 1) == ["c-1"]


_STATES = ["sent", DELIVERING, "delivered", "succeeded", "failed", "expired", "cancelled"]
_events = st.lists(
    st.one_of(
        st.tuples(st.just("answer"), st.sampled_from(["delivered", "succeeded", "failed"])),
        st.tuples(st.just("cancel"), st.none()),
        st.tuples(st.just("deliver"), st.none()),
        st.tuples(st.just("tick"), st.integers(0, 1_000_000)),
        st.tuples(st.just("again"), st.none()),
        st.tuples(st.just("refused"), st.sampled_from([0x00, 0x80, 0x87])),
    ),
    max_size=20,
)


@given(_events)
def test_any_sequence_of_events_only_ever_advances_and_reports_each_state_once(events):
    """Whatever comes in any order, the public state only advances; a final one never changes."""
    (first,) = receive(command(ttl_s=600))
    held = first.held
    reported = {first.report.report_id}
    now = NOW
    for kind, value in events:
        before = public_state(held.state)
        change = None
        if kind == "answer":
            change = receive_answer(
                held,
                device_id="k-1",
                answer=DeviceAnswer(command_id=held.command_id, state=value),
                now_ms=now,
            )
        elif kind == "cancel":
            change = cancel(held, held.command_id, now)
        elif kind == "deliver" and held.state == "sent":
            change = start_delivery(held, timeout_s=30, now_ms=now)
        elif kind == "tick":
            now += value
            changes = sweep([held], devices=DEVICES, gateway_id=GW, now_ms=now)
            change = changes[0] if changes else None
        elif kind == "again":
            (change,) = receive(command(ttl_s=600), held={held.command_id: held}, now=now)
        elif kind == "refused" and value >= 0x80:
            change = refused_by_broker(held, value, now)
        if change is None:
            continue
        after = public_state(change.held.state)
        assert after == before or advances(before, after)
        if kind != "again" and change.report is not None:
            assert change.report.report_id not in reported
            reported.add(change.report.report_id)
        held = change.held
    assert held.state in _STATES
