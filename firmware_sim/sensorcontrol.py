"""What a simulated particulate sensor does with the commands it reads: pure.

Bytes from the host in, the sensor's answers out, and whether a data frame
may go on the line at a tick; the command layouts and what they mean are
``contracts.sensorcommands``' (which cites the datasheets), the replies'
``contracts.frames``'. Writing to the pty and the clock are
``firmware_sim.service``'s; the frames themselves ``firmware_sim.sensorframes``'.

- SDS011: a command addressed to its device id or to 0xFFFF is obeyed; one
  for another id is ignored. Reporting mode (2), sleep/work (6) and working
  period (8) are answered with a 0xC5 reply carrying the sensor's own id,
  whether they query or set. Query mode: a data frame only on command 4.
  Asleep: no data frames, queries included, until woken. Working period n:
  one frame at the first tick after the setting, then one every n minutes of
  simulated time (the simulator's time acceleration applies). A period
  above 30, or a reporting mode or sleep setting other than 0/1, is outside
  the protocol and ignored without a reply. Commands 5 (set device id) and 7
  (firmware version) are not simulated and get no reply.
- PMS5003: 0xE1 passive/active, 0xE2 read (answered with a data frame in
  passive mode while awake, ignored otherwise), 0xE4 sleep/wake; no
  answer to 0xE1/0xE4 (the manual documents none).

A malformed command (bad checksum, wrong tail, truncated by what follows) is
skipped, as a real sensor ignores it; the counts are kept for tests.
"""

from __future__ import annotations

from typing import Final, Literal, TypeAlias

from contracts.frames import Sds011Reply, encode_sds011_reply
from contracts.sensorcommands import (
    PMS5003_CHANGE_MODE,
    PMS5003_COMMAND_BYTES,
    PMS5003_READ_PASSIVE,
    PMS5003_SLEEP_WAKE,
    SDS011_ALL_DEVICES,
    SDS011_COMMAND_BYTES,
    SDS011_MAX_PERIOD_MIN,
    SDS011_QUERY_DATA,
    SDS011_REPORTING_MODE,
    SDS011_SET,
    SDS011_SLEEP_WORK,
    SDS011_WORKING_PERIOD,
    Pms5003Command,
    Sds011Command,
    decode_pms5003_commands,
    decode_sds011_commands,
)
from firmware_sim.faults import SerialProtocol

MINUTE_MS: Final = 60_000

# An answer to write: reply bytes, or FRAME: a data frame of the current reading.
FRAME: Final = "frame"
Answer: TypeAlias = bytes | Literal["frame"]
# The settings commands the simulator obeys and their highest setting: 0/1
# for reporting mode and sleep/work, 30 minutes for the working period.
_SDS011_SETTING_MAX: Final = {
    SDS011_REPORTING_MODE: 1,
    SDS011_SLEEP_WORK: 1,
    SDS011_WORKING_PERIOD: SDS011_MAX_PERIOD_MIN,
}


class SensorControl:
    """One simulated sensor's settings, changed by the commands fed to it."""

    def __init__(self, protocol: SerialProtocol, *, device_id: int = 0) -> None:
        self.protocol: SerialProtocol = protocol
        self.device_id = device_id  # the SDS011's 16-bit id
        self.working = True
        # SDS011 query mode / PMS5003 passive mode: frames only when asked.
        self.on_request = False
        self.period_min = 0
        self._last_report_ms: int | None = None
        self._tail = b""
        self.commands = 0
        self.malformed = 0  # checksum and framing errors of the host's bytes

    def feed(self, data: bytes) -> list[Answer]:
        """Obey the complete commands in ``data`` (after the kept tail); the answers, in order."""
        buffer = self._tail + data
        if self.protocol == "sds011":
            result = decode_sds011_commands(buffer)
            keep = SDS011_COMMAND_BYTES - 1
        else:
            result = decode_pms5003_commands(buffer)
            keep = PMS5003_COMMAND_BYTES - 1
        self._tail = buffer[result.consumed :][-keep:] if keep else b""
        self.malformed += result.checksum_errors + result.length_errors
        answers: list[Answer] = []
        for command in result.commands:
            self.commands += 1
            if isinstance(command, Sds011Command):
                answers.extend(self._sds011(command))
            else:
                answers.extend(self._pms5003(command))
        return answers

    def may_report(self, tick_ms: int) -> bool:
        """Whether the frame of the reading at ``tick_ms`` goes on the line (counts it if so)."""
        if not self.working or self.on_request:
            return False
        last = self._last_report_ms
        if self.period_min and last is not None and tick_ms - last < self.period_min * MINUTE_MS:
            return False
        self._last_report_ms = tick_ms
        return True

    def _reply(self, command: int, write: int, setting: int) -> bytes:
        return encode_sds011_reply(
            Sds011Reply(command=command, data=bytes((write, setting, 0)), device_id=self.device_id)
        )

    def _sds011(self, command: Sds011Command) -> list[Answer]:
        if command.device_id not in (SDS011_ALL_DEVICES, self.device_id):
            return []
        if command.command == SDS011_QUERY_DATA:
            return [FRAME] if self.working else []
        write, setting = command.args[0], command.args[1]
        value = self._sds011_setting(command.command, setting if write == SDS011_SET else None)
        return [] if value is None else [self._reply(command.command, write, value)]

    def _sds011_setting(self, command: int, setting: int | None) -> int | None:
        """Apply ``setting`` (None: a query); the setting's value now, or None: ignored."""
        highest = _SDS011_SETTING_MAX.get(command)
        if highest is None or (setting is not None and setting > highest):
            return None
        if command == SDS011_REPORTING_MODE:
            if setting is not None:
                self.on_request = setting == 1
            return int(self.on_request)
        if setting is not None:
            # A new sleep state or period starts the reporting schedule afresh.
            self._last_report_ms = None
            if command == SDS011_SLEEP_WORK:
                self.working = setting == 1
            else:
                self.period_min = setting
        return int(self.working) if command == SDS011_SLEEP_WORK else self.period_min

    def _pms5003(self, command: Pms5003Command) -> list[Answer]:
        low = command.data & 0xFF
        if command.command == PMS5003_READ_PASSIVE:
            return [FRAME] if self.working and self.on_request else []
        if command.command == PMS5003_CHANGE_MODE and low <= 1:
            self.on_request = low == 0
        elif command.command == PMS5003_SLEEP_WAKE and low <= 1:
            self.working = low == 1
        return []
