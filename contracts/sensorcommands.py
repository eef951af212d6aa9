"""Sans-IO codecs for what a host sends the two particulate sensors: commands in bytes.

``contracts.frames`` decodes what the sensors send (data frames and the
SDS011's replies); this module encodes the host's commands and decodes them
again (the simulated sensors read them off their line). Layouts, from the
manufacturers' documents (the same ones ``contracts.frames`` cites):

- Nova Fitness SDS011, "Laser Dust Sensor Control Protocol" V1.3 (2015-07-20;
  https://cdn.sparkfun.com/assets/parts/1/2/2/7/5/Laser_Dust_Sensor_Control_Protocol_V1.3.pdf),
  section 1 and section 3, 1)-5). A command is 19 bytes::

      0xAA | 0xB4 | data bytes 1-15 | checksum | 0xAB
      data byte 1: the command id; data bytes 2-13: its arguments (zero when
      unused); data bytes 14-15: the device id, byte 1 high; 0xFF 0xFF
      addresses every sensor on the line
      checksum = low 8 bits of the sum of data bytes 1-15

  Commands (data byte 2 is 0 to query the setting, 1 to set it; data byte 3
  the new setting):

  - 2, reporting mode: 0 active (the factory default; kept over power-off),
    1 query: the sensor sends a data frame only when asked with command 4.
  - 4, query data: the answer is an ordinary data frame (0xAA 0xC0 ...).
  - 6, sleep and work: 0 sleep (fan and laser off), 1 work.
  - 8, working period: 0 continuous (a frame a second), 1-30 minutes: the
    sensor measures once every n minutes (the protocol: "work 30 seconds
    and sleep n*60-30 seconds") and reports then.

  Commands 2, 6 and 8 are answered with a reply
  ``0xAA 0xC5 <id> <query/set> <setting> 0x00 <device id> <checksum> 0xAB``
  (``contracts.frames.Sds011Reply``). The protocol's examples, for the sensor
  with id 0xA160, are the test vectors of ``tests/contracts/test_sensorcommands.py``
  (the same bytes are transcribed in the test suites of open-source drivers,
  e.g. a Go driver's ``TestPacketConversionsFromDoc``).
- Plantower PMS5003, "PMS5003 series data manual" V2.3 (2016-06-01), appendix
  II: 7-byte host commands::

      0x42 0x4D | CMD | DATAH | DATAL | LRCH LRCL = sum of the first 5 bytes (16-bit BE)

  - 0xE1 change mode: DATAL 0 passive, 1 active (the default);
  - 0xE2 read in passive mode: the answer is an ordinary 32-byte data frame;
  - 0xE4 sleep/wake: DATAL 0 sleep, 1 wake.

  The manual documents no answer to 0xE1 and 0xE4. Real sensors are observed
  to send 8 bytes ``0x42 0x4D 0x00 0x04 CMD DATAL LRCH LRCL`` (e.g. avaldebe/PyPMS,
  ``src/pms/sensors/plantower``); since that is not in the manual, it is not
  decoded here (``contracts.frames`` counts it as a length error) and the
  simulator does not send it.

Encoders raise ValueError on arguments outside the documents' ranges; the
decoders resynchronise the way ``contracts.frames`` does (its ``scan_frames``)
and never raise: a malformed command is counted and skipped, as a sensor
ignores it. Acting on a command is the simulator's (``firmware_sim``);
choosing the frames for a catalog command and judging the reply are the
gateway's (``gateway.serialcommands``).
"""

from __future__ import annotations

from typing import Final, Literal

import msgspec

from contracts.frames import CHECKSUM_ERROR, LENGTH_ERROR, Scan, scan_frames

SDS011_COMMAND_BYTES: Final = 19
PMS5003_COMMAND_BYTES: Final = 7

# SDS011 command ids (data byte 1), section 3 of the control protocol.
SDS011_REPORTING_MODE: Final = 2
SDS011_QUERY_DATA: Final = 4
SDS011_SET_DEVICE_ID: Final = 5
SDS011_SLEEP_WORK: Final = 6
SDS011_FIRMWARE_VERSION: Final = 7
SDS011_WORKING_PERIOD: Final = 8
SDS011_ALL_DEVICES: Final = 0xFFFF
# Data byte 2 of commands 2, 6 and 8.
SDS011_QUERY: Final = 0
SDS011_SET: Final = 1
# Working period: 0 continuous, else minutes; the protocol allows up to 30.
SDS011_MAX_PERIOD_MIN: Final = 30

# PMS5003 commands (CMD byte), appendix II of the data manual.
PMS5003_CHANGE_MODE: Final = 0xE1  # DATAL 0 passive, 1 active
PMS5003_READ_PASSIVE: Final = 0xE2
PMS5003_SLEEP_WAKE: Final = 0xE4  # DATAL 0 sleep, 1 wake
_PMS_COMMANDS: Final = frozenset((PMS5003_CHANGE_MODE, PMS5003_READ_PASSIVE, PMS5003_SLEEP_WAKE))

_SDS_HEAD: Final = b"\xaa\xb4"
_SDS_TAIL: Final = 0xAB
# Data bytes 2-13: twelve argument bytes between the command id and the device id.
_SDS_ARG_BYTES: Final = 12
_PMS_HEAD: Final = b"\x42\x4d"


class Sds011Command(msgspec.Struct, frozen=True, kw_only=True):
    """One SDS011 command as sent: id, the 12 argument bytes, the addressed device."""

    command: int  # data byte 1
    args: bytes = bytes(_SDS_ARG_BYTES)  # data bytes 2-13
    device_id: int = SDS011_ALL_DEVICES  # data bytes 14-15, byte 14 high


class Pms5003Command(msgspec.Struct, frozen=True, kw_only=True):
    """One PMS5003 host command: CMD and its 16-bit data word."""

    command: int  # 0xE1, 0xE2 or 0xE4
    data: int = 0  # DATAH << 8 | DATAL


class CommandDecodeResult(msgspec.Struct, frozen=True, kw_only=True):
    """What one ``decode_*_commands`` call found; the accounting of ``frames.DecodeResult``."""

    commands: list[Sds011Command | Pms5003Command]
    consumed: int
    checksum_errors: int = 0
    # SDS011: byte 18 other than the 0xAB tail; PMS5003: a CMD it does not know.
    length_errors: int = 0
    garbage_bytes: int = 0


# --- encoding (the host's side) ---------------------------------------------------


def sds011_command(
    command: int, args: bytes = b"", *, device_id: int = SDS011_ALL_DEVICES
) -> bytes:
    """The 19 bytes of SDS011 command ``command`` with ``args`` (data bytes 2.., zero-padded)."""
    if not 0 <= command <= 0xFF:
        raise ValueError(f"SDS011 command id {command} is not a byte")
    if len(args) > _SDS_ARG_BYTES:
        raise ValueError(f"SDS011 commands carry at most {_SDS_ARG_BYTES} argument bytes")
    if not 0 <= device_id <= 0xFFFF:
        raise ValueError(f"SDS011 device id {device_id} is not 16 bits")
    data = bytes((command,)) + args.ljust(_SDS_ARG_BYTES, b"\x00")
    data += bytes((device_id >> 8, device_id & 0xFF))
    return _SDS_HEAD + data + bytes((sum(data) & 0xFF, _SDS_TAIL))


def encode_sds011_command(command: Sds011Command) -> bytes:
    return sds011_command(command.command, command.args, device_id=command.device_id)


def sds011_set_reporting_mode(
    mode: Literal["active", "query"], *, device_id: int = SDS011_ALL_DEVICES
) -> bytes:
    return sds011_command(
        SDS011_REPORTING_MODE,
        bytes((SDS011_SET, 1 if mode == "query" else 0)),
        device_id=device_id,
    )


def sds011_query_data(*, device_id: int = SDS011_ALL_DEVICES) -> bytes:
    return sds011_command(SDS011_QUERY_DATA, device_id=device_id)


def sds011_set_working(working: bool, *, device_id: int = SDS011_ALL_DEVICES) -> bytes:
    """Sleep (``working=False``: fan and laser off, no frames) or work."""
    return sds011_command(
        SDS011_SLEEP_WORK, bytes((SDS011_SET, 1 if working else 0)), device_id=device_id
    )


def sds011_set_working_period(period_min: int, *, device_id: int = SDS011_ALL_DEVICES) -> bytes:
    """0: continuous (a frame a second); 1-30: one measurement every ``period_min`` minutes."""
    if not 0 <= period_min <= SDS011_MAX_PERIOD_MIN:
        raise ValueError(f"SDS011 working period {period_min} min outside 0..30")
    return sds011_command(
        SDS011_WORKING_PERIOD, bytes((SDS011_SET, period_min)), device_id=device_id
    )


def pms5003_command(command: int, data: int = 0) -> bytes:
    """The 7 bytes of PMS5003 command ``command`` (0xE1, 0xE2, 0xE4) with data word ``data``."""
    if command not in _PMS_COMMANDS:
        raise ValueError(f"PMS5003 command {command:#x} is not in the manual (0xE1, 0xE2, 0xE4)")
    if not 0 <= data <= 0xFFFF:
        raise ValueError(f"PMS5003 command data {data} is not 16 bits")
    head = _PMS_HEAD + bytes((command, data >> 8, data & 0xFF))
    return head + (sum(head) & 0xFFFF).to_bytes(2, "big")


def encode_pms5003_command(command: Pms5003Command) -> bytes:
    return pms5003_command(command.command, command.data)


def pms5003_set_passive(passive: bool) -> bytes:
    return pms5003_command(PMS5003_CHANGE_MODE, 0 if passive else 1)


def pms5003_read_passive() -> bytes:
    return pms5003_command(PMS5003_READ_PASSIVE)


def pms5003_set_sleep(sleep: bool) -> bytes:
    return pms5003_command(PMS5003_SLEEP_WAKE, 0 if sleep else 1)


# --- decoding (the sensor's side) ---------------------------------------------------


def _judge_sds011(
    data: bytes, start: int, end: int
) -> Sds011Command | Literal["length", "checksum"] | None:
    if end - start < SDS011_COMMAND_BYTES:
        return None
    if data[start + 18] != _SDS_TAIL:
        return LENGTH_ERROR
    body = data[start + 2 : start + 17]
    if sum(body) & 0xFF != data[start + 17]:
        return CHECKSUM_ERROR
    return Sds011Command(command=body[0], args=body[1:13], device_id=body[13] << 8 | body[14])


def _judge_pms5003(
    data: bytes, start: int, end: int
) -> Pms5003Command | Literal["length", "checksum"] | None:
    if end - start < 3:
        return None
    if data[start + 2] not in _PMS_COMMANDS:
        return LENGTH_ERROR  # no command of the manual: a false start
    if end - start < PMS5003_COMMAND_BYTES:
        return None
    if sum(data[start : start + 5]) & 0xFFFF != int.from_bytes(data[start + 5 : start + 7], "big"):
        return CHECKSUM_ERROR
    return Pms5003Command(command=data[start + 2], data=data[start + 3] << 8 | data[start + 4])


def _result(scan: Scan[Sds011Command] | Scan[Pms5003Command]) -> CommandDecodeResult:
    return CommandDecodeResult(
        commands=list(scan.items),
        consumed=scan.consumed,
        checksum_errors=scan.checksum_errors,
        length_errors=scan.length_errors,
        garbage_bytes=scan.garbage_bytes,
    )


def decode_sds011_commands(buffer: bytes | bytearray | memoryview) -> CommandDecodeResult:
    """Every complete SDS011 command in ``buffer``; never raises."""
    scan: Scan[Sds011Command] = scan_frames(
        buffer, start_pairs=(_SDS_HEAD,), frame_bytes=SDS011_COMMAND_BYTES, judge=_judge_sds011
    )
    return _result(scan)


def decode_pms5003_commands(buffer: bytes | bytearray | memoryview) -> CommandDecodeResult:
    """Every complete PMS5003 command in ``buffer``; never raises."""
    scan: Scan[Pms5003Command] = scan_frames(
        buffer, start_pairs=(_PMS_HEAD,), frame_bytes=PMS5003_COMMAND_BYTES, judge=_judge_pms5003
    )
    return _result(scan)
