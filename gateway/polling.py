"""Modbus polling decisions: which buses to run, whom to poll next, when a slave is offline.

Pure: device lists and times (``now_ms``) in, decisions out. ``modbus_buses``
groups the enabled Modbus devices by port (one bus each) and
``bus_changes`` says which bus tasks a new config stops and starts, as
``gateway.configdiff.serial_changes`` does for serial readers.
``PollSchedule`` keeps each device's next poll time on one bus (one
transaction at a time: the bus asks it whom to poll and how long to wait);
``FailureRuns`` counts each device's failed polls in a row and says when
one goes offline. Talking to the bus, counting and logging are
``gateway.modbuspoller``'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final, Literal

from contracts.messages import DeviceConfig

# Failed polls in a row before a slave is marked offline. One lost answer is
# ordinary on RS-485 (a burst of noise, a slave busy writing its flash); three
# in a row is a slave that has stopped answering: 30 s at the models' 10 s
# interval, long before offline_after_s (600-900 s) would notice.
OFFLINE_AFTER_FAILURES: Final = 3

PollOutcome = Literal["ok", "no_answer", "garbled", "exception", "invalid"]
POLL_OUTCOMES: Final[tuple[PollOutcome, ...]] = (
    "ok",
    "no_answer",
    "garbled",
    "exception",
    "invalid",
)

Bus = tuple[DeviceConfig, ...]
Transition = Literal["offline", "online"] | None


def modbus_buses(devices: Iterable[DeviceConfig]) -> dict[str, Bus]:
    """Enabled Modbus devices by port, each bus's devices in slave id order."""
    buses: dict[str, list[DeviceConfig]] = {}
    for device in devices:
        if device.transport == "modbus" and device.enabled and device.port:
            buses.setdefault(device.port, []).append(device)
    return {
        port: tuple(sorted(group, key=lambda d: (d.slave_id or 0, d.device_id)))
        for port, group in buses.items()
    }


def bus_changes(
    running: Mapping[str, Bus], devices: Iterable[DeviceConfig]
) -> tuple[list[str], dict[str, Bus]]:
    """Bus tasks to stop (ports) and to start: a bus whose devices changed is restarted."""
    wanted = modbus_buses(devices)
    stop = [port for port, bus in running.items() if wanted.get(port) != bus]
    start = {port: bus for port, bus in wanted.items() if port not in running or port in stop}
    return stop, start


class PollSchedule:
    """When each device of one bus is polled next.

    A device is due every ``interval_ms`` from its first poll. A bus that
    fell behind (slow slaves, many devices) polls a late device once and
    moves its next poll one interval past now: it does not try to catch up
    in a burst that would hold the bus.
    """

    def __init__(self, intervals_ms: Mapping[str, int], now_ms: int) -> None:
        self.intervals_ms = dict(intervals_ms)
        # Devices start in the order given (slave ids), each due now.
        self.due_ms = dict.fromkeys(self.intervals_ms, now_ms)

    def next(self, now_ms: int) -> tuple[str | None, int]:
        """The device to poll now (None if none is due) and, if none, ms until one is."""
        if not self.due_ms:
            return None, 60_000
        device_id = min(self.due_ms, key=lambda d: self.due_ms[d])
        wait_ms = self.due_ms[device_id] - now_ms
        if wait_ms > 0:
            return None, wait_ms
        return device_id, 0

    def polled(self, device_id: str, now_ms: int) -> None:
        """``device_id`` was polled (whatever the outcome): schedule its next poll."""
        interval = self.intervals_ms[device_id]
        after = self.due_ms[device_id] + interval
        self.due_ms[device_id] = after if after > now_ms else now_ms + interval


class FailureRuns:
    """Failed polls in a row per device; the decision to mark one offline."""

    def __init__(self, *, limit: int = OFFLINE_AFTER_FAILURES) -> None:
        self.limit = limit
        self.failures: dict[str, int] = {}

    def record(self, device_id: str, outcome: PollOutcome) -> Transition:
        """Count one poll's outcome; "offline" exactly when the run reaches the limit,
        "online" at the first answer after that.

        An answer (``ok``, ``exception``, or values it could not decode:
        ``invalid``) shows the slave is there and ends the run.
        """
        run = self.failures.get(device_id, 0)
        if outcome in ("ok", "exception", "invalid"):
            self.failures[device_id] = 0
            return "online" if run >= self.limit else None
        self.failures[device_id] = run + 1
        return "offline" if run + 1 == self.limit else None


def poll_interval_ms(device: DeviceConfig, model_interval_s: float) -> int:
    """The device's own poll interval if set, else its model's, in ms."""
    return round((device.poll_interval_s or model_interval_s) * 1000)
