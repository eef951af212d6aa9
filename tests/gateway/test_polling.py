"""Modbus polling decisions (gateway.polling): buses, the schedule, offline runs."""

from __future__ import annotations

from contracts.messages import DeviceConfig
from gateway.polling import (
    OFFLINE_AFTER_FAILURES,
    FailureRuns,
    PollOutcome,
    PollSchedule,
    bus_changes,
    modbus_buses,
    poll_interval_ms,
)


def dev(device_id: str, port: str = "/dev/ttyUSB0", slave: int = 1, **kw: object) -> DeviceConfig:
    return DeviceConfig(
        device_id=device_id,
        device_type="noise_meter",
        transport="modbus",
        port=port,
        model="sonbest_sm6365b",
        slave_id=slave,
        **kw,  # type: ignore[arg-type]
    )


def test_devices_are_grouped_by_port_in_slave_order_and_disabled_ones_left_out() -> None:
    a, b, c = dev("a", slave=2), dev("b", slave=1), dev("c", port="/dev/ttyUSB1")
    off = dev("d", slave=3, enabled=False)
    serial = DeviceConfig(
        device_id="e",
        device_type="air_quality",
        transport="serial",
        port="/dev/ttyUSB2",
        protocol="sds011",
    )
    assert modbus_buses([a, b, c, off, serial]) == {"/dev/ttyUSB0": (b, a), "/dev/ttyUSB1": (c,)}


def test_a_bus_whose_devices_change_is_restarted_and_the_others_kept() -> None:
    a, b, c = dev("a", slave=1), dev("b", slave=2), dev("c", port="/dev/ttyUSB1")
    running = modbus_buses([a, b, c])
    assert bus_changes(running, [a, b, c]) == ([], {})
    b2 = dev("b", slave=3)
    stop, start = bus_changes(running, [a, b2, c])
    assert stop == ["/dev/ttyUSB0"]
    assert start == {"/dev/ttyUSB0": (a, b2)}
    stop, start = bus_changes(running, [c])
    assert (stop, start) == (["/dev/ttyUSB0"], {})


def test_the_schedule_polls_each_device_at_its_interval_without_bursts() -> None:
    schedule = PollSchedule({"a": 1000, "b": 3000}, now_ms=0)
    assert schedule.next(0) == ("a", 0)
    schedule.polled("a", 10)
    assert schedule.next(10) == ("b", 0)
    schedule.polled("b", 20)
    assert schedule.next(20) == (None, 980)
    assert schedule.next(1000) == ("a", 0)
    # Far behind (a slow bus): one poll, then an interval from now.
    schedule.polled("a", 5500)
    assert schedule.due_ms["a"] == 6500


def test_a_device_goes_offline_once_after_the_run_and_online_at_its_next_answer() -> None:
    runs = FailureRuns()
    outcomes: list[PollOutcome] = ["no_answer", "garbled"]
    outcomes += ["no_answer"] * (OFFLINE_AFTER_FAILURES + 2)
    transitions = [runs.record("a", o) for o in outcomes]
    assert transitions.count("offline") == 1
    assert transitions.index("offline") == OFFLINE_AFTER_FAILURES - 1
    assert runs.record("b", "no_answer") is None  # another device's run is its own
    assert runs.record("a", "exception") == "online"  # it answered: it is there
    assert runs.record("a", "ok") is None


def test_a_devices_own_interval_wins_over_its_models() -> None:
    assert poll_interval_ms(dev("a"), 10.0) == 10_000
    assert poll_interval_ms(dev("a", poll_interval_s=0.5), 10.0) == 500
