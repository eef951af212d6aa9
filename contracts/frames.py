"""Sans-IO serial frame codecs for the two particulate sensors: bytes in, frames out.

Frame layouts, from the manufacturers' documents:

- Plantower PMS5003 ("PMS5003 series data manual" V2.3, 2016-06-01, appendix I,
  active mode): 9600 baud 8N1, 32 bytes a frame::

      0x42 0x4D | length (16-bit BE) = 28 = 2 * 13 data bytes + 2 checksum bytes
      | 13 data words (16-bit BE):
      |   PM1.0, PM2.5, PM10 in ug/m3, CF=1 ("standard particle")
      |   PM1.0, PM2.5, PM10 in ug/m3, atmospheric environment
      |   particles beyond 0.3, 0.5, 1.0, 2.5, 5.0, 10 um per 0.1 L of air
      |   reserved
      | checksum (16-bit BE) = sum of the 30 bytes before it, start bytes included

  The manual gives two active sub-modes: "stable", one frame every 2.3 s while
  the concentration changes little, and "fast", one every 200-800 ms (shorter
  the higher the concentration) while it changes a lot.
- Nova Fitness SDS011 ("Laser PM2.5 Sensor specification" V1.3 and "Laser Dust
  Sensor Control Protocol" V1.3, 2015-07-20): 9600 baud 8N1, one 10-byte frame
  a second in active (factory default) mode::

      0xAA | 0xC0 | PM2.5 low, high | PM10 low, high | device id byte 1, byte 2
      | checksum = (sum of bytes 2..7) & 0xFF | 0xAB

  PM values are tenths of ug/m3 (``(high * 256 + low) / 10``). The protocol's
  example reply ``AA C0 D4 04 3A 0A A1 60 1D AB`` comes from "the sensor with
  ID A160": device id byte 1 is the high byte, so ``device_id`` here is
  ``byte1 << 8 | byte2``.

Decoding is sans-IO: ``decode_pms5003`` / ``decode_sds011`` take a buffer and
return a ``DecodeResult`` with the frames (and SDS011 replies) found, how
many bytes the caller may drop from the front of its buffer, and error counts. They resynchronise on
garbage by scanning for the start bytes (``bytes.find``); after a false start
(a PMS5003 length other than 28, an SDS011 tail other than 0xAB, a bad
checksum) they skip ONE byte and scan again, so a real frame hidden right
after a false start is still found. Bytes that may still begin a frame at the
end of the buffer (a start pair with less than a frame after it, or a lone
first start byte) are never consumed; everything else consumed that is not
part of a good frame (or reply) is counted as garbage, so ``consumed ==
(frames + replies) * frame_bytes + garbage_bytes`` always holds. Nothing here raises on any input.
``FrameDecoder`` wraps this for a byte stream: it keeps the unconsumed tail
(always shorter than one frame) and cumulative counters.

``to_metrics`` maps a frame to the ``air_quality`` metrics of the device
catalog; checking those values against the catalog's ranges (a PMS5003 word
can say 65535 ug/m3) is the receiver's business. Opening and reading the port,
logging the error counts and turning frames into readings with timestamps are
the gateway's (``gateway.serialport``); producing a byte stream with faults is
the simulator's.

Besides data frames, the SDS011 sends a 10-byte reply to a command
("Laser Dust Sensor Control Protocol" V1.3, section 3)::

    0xAA | 0xC5 | command id | data bytes 2-4 | device id byte 1, byte 2
    | checksum = (sum of bytes 2..7) & 0xFF | 0xAB

e.g. ``AA C5 06 01 00 00 A1 60 08 AB``: sensor A160 set to sleep.
``decode_sds011`` returns replies in ``DecodeResult.replies`` (``Sds011Reply``),
judged like data frames (tail, then checksum; a bad one is a length or
checksum error and skips one byte), so ``consumed == (frames + replies) *
10 + garbage_bytes``; ``FrameDecoder.feed_all`` returns them beside the
frames (the gateway's serial source uses it when it wants replies), and
``feed`` returns frames only and counts replies.
The PMS5003 manual documents no answer to its host commands (appendix II:
0xE1 mode, 0xE4 sleep; 0xE2 passive read is answered with a data frame);
the 8 bytes ``42 4D 00 04 ...`` real sensors are seen to send count as a
length error here. The host's command frames themselves (SDS011 0xAA 0xB4
..., PMS5003 0x42 0x4D 0xE1/0xE2/0xE4 ...) are ``contracts.sensorcommands``',
which shares this module's resynchronising scan (``scan_frames``).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from typing import Any, Final, Generic, Literal, NamedTuple, TypeAlias, TypeVar

import msgspec

SERIAL_BAUD: Final = 9600
# 8N1 puts 10 bits on the wire per byte (start bit, 8 data bits, stop bit).
SERIAL_BYTES_PER_S: Final = SERIAL_BAUD // 10  # 960

PMS5003_FRAME_BYTES: Final = 32
SDS011_FRAME_BYTES: Final = 10
MAX_FRAME_BYTES: Final = max(PMS5003_FRAME_BYTES, SDS011_FRAME_BYTES)

# The most frames a 9600-baud line can carry: 960 / 32 = 30 a second for the
# PMS5003, 960 / 10 = 96 for the SDS011. The sensors send far fewer:
PMS5003_LINE_FRAMES_PER_S: Final = SERIAL_BYTES_PER_S // PMS5003_FRAME_BYTES  # 30
SDS011_LINE_FRAMES_PER_S: Final = SERIAL_BYTES_PER_S // SDS011_FRAME_BYTES  # 96
# ~1 frame a second: the SDS011 sends one a second; the PMS5003 one every
# 2.3 s (stable air) to one every 0.2-0.8 s (fast-changing air).
SENSOR_FRAMES_PER_S: Final = 1.0

_WORD_MAX: Final = 0xFFFF

_PMS_START: Final = b"\x42\x4d"
# 13 data words of 2 bytes + a 2-byte checksum (the manual: "2 x 13 + 2").
_PMS_LENGTH: Final = 2 * 13 + 2
_PMS_CHECKED_BYTES: Final = PMS5003_FRAME_BYTES - 2  # all but the checksum itself
# Skip the start pair and the length (checked before the frame is complete),
# then the 13 data words and the checksum, all big-endian.
_PMS_BODY: Final = struct.Struct(">4x13HH")
_PMS_ENCODE: Final = struct.Struct(">2sH13H")

_PMS_STARTS: Final = (_PMS_START,)
_SDS_START: Final = b"\xaa\xc0"
# A reply to a command: same head, length, checksum rule and tail as a data frame.
_SDS_REPLY_START: Final = b"\xaa\xc5"
_SDS_REPLY_DATA_BYTES: Final = 3
_SDS_REPLY_COMMAND: Final = _SDS_REPLY_START[1]
_SDS_BOTH_STARTS: Final = (_SDS_START, _SDS_REPLY_START)
_SDS_DATA_START_ONLY: Final = (_SDS_START,)
_SDS_TAIL: Final = 0xAB
# Skip head and command; PM2.5 and PM10 little-endian, the two id bytes, the
# checksum and the tail.
_SDS_BODY: Final = struct.Struct("<2xHHBBBB")
_SDS_ENCODE: Final = struct.Struct("<HHBB")


class Pms5003Frame(msgspec.Struct, frozen=True, kw_only=True):
    """One PMS5003 active-mode frame, the 13 data words as sent."""

    pm1_cf1: int  # ug/m3, CF=1 ("standard particle", the factory environment)
    pm25_cf1: int  # ug/m3, CF=1
    pm10_cf1: int  # ug/m3, CF=1
    pm1_atm: int  # ug/m3, atmospheric environment
    pm25_atm: int  # ug/m3, atmospheric environment
    pm10_atm: int  # ug/m3, atmospheric environment
    n0_3: int  # particles beyond 0.3 um per 0.1 L of air
    n0_5: int  # particles beyond 0.5 um per 0.1 L
    n1_0: int  # particles beyond 1.0 um per 0.1 L
    n2_5: int  # particles beyond 2.5 um per 0.1 L
    n5_0: int  # particles beyond 5.0 um per 0.1 L
    n10: int  # particles beyond 10 um per 0.1 L
    reserved: int = 0  # "reserved" in the manual; real sensors may send non-zero


class Sds011Frame(msgspec.Struct, frozen=True, kw_only=True):
    """One SDS011 active-mode data frame (command 0xC0)."""

    pm25: float  # ug/m3, resolution 0.1
    pm10: float  # ug/m3, resolution 0.1
    device_id: int  # 0..65535, id byte 1 high


class Sds011Reply(msgspec.Struct, frozen=True, kw_only=True):
    """One SDS011 reply to a command (0xAA 0xC5 ...), as the control protocol lays it out.

    ``command`` is the command it answers (data byte 1: 2 reporting mode, 5
    device id, 6 sleep/work, 7 firmware version, 8 working period); ``data``
    is data bytes 2-4 as sent. For commands 2, 6 and 8, data byte 2 says
    whether the command queried (0) or set (1) the setting and data byte 3
    is the setting (2: 0 active, 1 query; 6: 0 sleep, 1 work; 8: the working
    period in minutes, 0 continuous); for 7 they are the firmware's year,
    month and day. ``contracts.sensorcommands`` names the commands.
    """

    command: int  # 0..255, data byte 1
    data: bytes  # data bytes 2-4, 3 bytes
    device_id: int  # 0..65535, id byte 1 high


Frame: TypeAlias = Pms5003Frame | Sds011Frame
SensorKind: TypeAlias = Literal["pms5003", "sds011"]


class DecodeResult(msgspec.Struct, frozen=True, kw_only=True):
    """What one ``decode_*`` call found in a buffer."""

    frames: list[Frame]
    # Bytes the caller may drop from the front of its buffer; the rest may be
    # the start of a frame still arriving: keep it and prepend it to the next read.
    consumed: int
    checksum_errors: int = 0
    # Framing errors: a PMS5003 length field other than 28, an SDS011 byte 9
    # other than the 0xAB tail.
    length_errors: int = 0
    # Consumed bytes that were not part of a good frame or reply (skipped
    # while resynchronising, false starts included).
    garbage_bytes: int = 0
    # SDS011 command replies (0xAA 0xC5 ...), in stream order; always empty
    # for the PMS5003, whose answers the manual does not document.
    replies: list[Sds011Reply] = []


# --- encoding (the simulator's side) -----------------------------------------


def _word(value: float) -> int:
    """``value`` as the sensor would send it: nearest integer, clamped to 0..65535."""
    if math.isnan(value):
        raise ValueError("NaN cannot be encoded in a sensor frame")
    if value <= 0:
        return 0
    if value >= _WORD_MAX:
        return _WORD_MAX  # also +inf, which round() would refuse
    return round(value)


def encode_pms5003(frame: Pms5003Frame) -> bytes:
    """The 32 bytes a PMS5003 sends for ``frame``; words are rounded and clamped to 0..65535.

    Raises ValueError for a NaN field (no sensor sends one).
    """
    body = _PMS_ENCODE.pack(
        _PMS_START,
        _PMS_LENGTH,
        _word(frame.pm1_cf1),
        _word(frame.pm25_cf1),
        _word(frame.pm10_cf1),
        _word(frame.pm1_atm),
        _word(frame.pm25_atm),
        _word(frame.pm10_atm),
        _word(frame.n0_3),
        _word(frame.n0_5),
        _word(frame.n1_0),
        _word(frame.n2_5),
        _word(frame.n5_0),
        _word(frame.n10),
        _word(frame.reserved),
    )
    return body + (sum(body) & 0xFFFF).to_bytes(2, "big")


def encode_sds011(frame: Sds011Frame) -> bytes:
    """The 10 bytes an SDS011 sends for ``frame``.

    PM values go to the nearest tenth of ug/m3, clamped to 0..6553.5 (what 16
    bits of tenths hold); the device id is clamped to 0..65535. Raises
    ValueError for a NaN field.
    """
    device_id = _word(frame.device_id)
    data = _SDS_ENCODE.pack(
        _word(frame.pm25 * 10), _word(frame.pm10 * 10), device_id >> 8, device_id & 0xFF
    )
    return _SDS_START + data + bytes((sum(data) & 0xFF, _SDS_TAIL))


def encode_sds011_reply(reply: Sds011Reply) -> bytes:
    """The 10 bytes an SDS011 sends for ``reply``.

    Raises ValueError for a ``data`` other than 3 bytes or a field outside a
    byte (the device id outside 0..65535).
    """
    if len(reply.data) != _SDS_REPLY_DATA_BYTES:
        raise ValueError(f"an SDS011 reply carries 3 data bytes, not {len(reply.data)}")
    if not 0 <= reply.command <= 0xFF or not 0 <= reply.device_id <= _WORD_MAX:
        raise ValueError("SDS011 reply command or device id out of range")
    body = bytes((reply.command, *reply.data, reply.device_id >> 8, reply.device_id & 0xFF))
    return _SDS_REPLY_START + body + bytes((sum(body) & 0xFF, _SDS_TAIL))


# --- decoding -------------------------------------------------------------------


def _garbage_end(data: bytes, pos: int, first: int) -> int:
    """Where the consumable garbage ends when no start pair follows ``pos``.

    Only a last byte equal to the first start byte can still begin a frame
    (the next read may bring the second); every other byte is garbage.
    """
    end = len(data)
    if end > pos and data[end - 1] == first:
        return end - 1
    return end


# What a judge says of the bytes at a start pair: a frame (or reply, or
# command), a framing error, or None: the frame has not fully arrived yet.
LENGTH_ERROR: Final = "length"
CHECKSUM_ERROR: Final = "checksum"
_T = TypeVar("_T")


class Scan(NamedTuple, Generic[_T]):
    """What ``scan_frames`` found: the items and the byte accounting of ``DecodeResult``."""

    items: list[_T]
    consumed: int
    checksum_errors: int
    length_errors: int
    garbage_bytes: int


def scan_frames(
    buffer: bytes | bytearray | memoryview,
    *,
    start_pairs: tuple[bytes, ...],
    frame_bytes: int,
    judge: Callable[[bytes, int, int], _T | Literal["length", "checksum"] | None],
) -> Scan[_T]:
    """The resynchronising scan every fixed-length layout here shares; ``judge`` knows one.

    ``start_pairs`` are the two-byte heads that may begin a frame, all with the
    same first byte (an SDS011 sends 0xAA 0xC0 data frames and 0xAA 0xC5
    replies). Garbage up to a start pair is counted and consumed; a false
    start (length or checksum error) skips one byte and scans again; an
    incomplete frame or a trailing first start byte is kept for the next read.
    ``consumed == len(items) * frame_bytes + garbage_bytes`` always. Also used
    by ``contracts.sensorcommands`` for the host's commands.
    """
    return Scan(*_scan(buffer, start_pairs, frame_bytes, judge))


# The decoders' own path: a plain tuple, not a Scan, since a serial read of a
# few frames makes the per-call cost count (bench/bench_frames.py).
_Scanned: TypeAlias = tuple[list[Any], int, int, int, int]


def _scan(
    buffer: bytes | bytearray | memoryview,
    start_pairs: tuple[bytes, ...],
    frame_bytes: int,
    judge: Callable[[bytes, int, int], object],
) -> _Scanned:
    data = bytes(buffer)
    end = len(data)
    items: list[Any] = []
    pos = checksum_errors = length_errors = garbage = 0
    find = data.find
    first = start_pairs[0][0]
    # One head: find the pair itself (the common case, and the fastest);
    # several: find the first byte and check the second.
    single = len(start_pairs) == 1
    needle = start_pairs[0] if single else start_pairs[0][:1]
    seconds = b"" if single else bytes(pair[1] for pair in start_pairs)
    while True:
        start = find(needle, pos)
        if start < 0:
            keep = _garbage_end(data, pos, first)
            garbage += keep - pos
            pos = keep
            break
        garbage += start - pos
        pos = start
        if not single:
            if start + 1 >= end:
                break  # a lone first byte at the end: the next read may bring a head
            if data[start + 1] not in seconds:
                garbage += 1
                pos = start + 1
                continue
        verdict = judge(data, start, end)
        if verdict is None:
            break  # the frame has not fully arrived yet
        if isinstance(verdict, str):
            if verdict == LENGTH_ERROR:
                length_errors += 1
            else:
                checksum_errors += 1
            garbage += 1
            pos = start + 1
            continue
        items.append(verdict)
        pos = start + frame_bytes
    return items, pos, checksum_errors, length_errors, garbage


_Verdict: TypeAlias = Sds011Frame | Sds011Reply | Literal["length", "checksum"] | None


def _judge_pms5003(
    data: bytes, start: int, end: int
) -> Pms5003Frame | Literal["length", "checksum"] | None:
    if end - start < 4:
        return None  # the length field has not arrived yet
    # Judge the length as soon as it arrives, not 28 bytes later.
    if data[start + 2] != 0 or data[start + 3] != _PMS_LENGTH:
        return LENGTH_ERROR
    if end - start < PMS5003_FRAME_BYTES:
        return None
    w = _PMS_BODY.unpack_from(data, start)
    # At most 30 * 255 = 7650: the 16-bit mask of the manual never bites.
    if sum(data[start : start + _PMS_CHECKED_BYTES]) & 0xFFFF != w[13]:
        return CHECKSUM_ERROR
    return Pms5003Frame(
        pm1_cf1=w[0],
        pm25_cf1=w[1],
        pm10_cf1=w[2],
        pm1_atm=w[3],
        pm25_atm=w[4],
        pm10_atm=w[5],
        n0_3=w[6],
        n0_5=w[7],
        n1_0=w[8],
        n2_5=w[9],
        n5_0=w[10],
        n10=w[11],
        reserved=w[12],
    )


def _judge_sds011(data: bytes, start: int, end: int) -> _Verdict:
    if end - start < SDS011_FRAME_BYTES:
        return None
    pm25, pm10, id1, id2, checksum, tail = _SDS_BODY.unpack_from(data, start)
    if tail != _SDS_TAIL:
        return LENGTH_ERROR
    # Data frames and replies alike: the checksum covers bytes 2..7.
    if sum(data[start + 2 : start + 8]) & 0xFF != checksum:
        return CHECKSUM_ERROR
    if data[start + 1] == _SDS_REPLY_COMMAND:
        return Sds011Reply(
            command=data[start + 2],
            data=data[start + 3 : start + 6],
            device_id=id1 << 8 | id2,
        )
    return Sds011Frame(pm25=pm25 / 10, pm10=pm10 / 10, device_id=id1 << 8 | id2)


def decode_pms5003(buffer: bytes | bytearray | memoryview) -> DecodeResult:
    """Decode every complete PMS5003 frame in ``buffer``; never raises.

    The 8-byte answers real sensors send to mode and sleep commands (length
    field 4) are not in the manual and count as length errors.
    """
    items, consumed, checksum_errors, length_errors, garbage = _scan(
        buffer, _PMS_STARTS, PMS5003_FRAME_BYTES, _judge_pms5003
    )
    return DecodeResult(
        frames=items,
        consumed=consumed,
        checksum_errors=checksum_errors,
        length_errors=length_errors,
        garbage_bytes=garbage,
    )


def decode_sds011(buffer: bytes | bytearray | memoryview) -> DecodeResult:
    """Decode every complete SDS011 data frame and command reply in ``buffer``; never raises.

    A frame or reply whose byte 9 is not the 0xAB tail counts as a length
    error (it does not end where 10 bytes put it), checked before the checksum.
    """
    data = bytes(buffer)  # the same object when it is bytes already
    # Replies are rare (one per command sent): a buffer without a reply's head
    # (one C-level search) is scanned for data frames alone, the fast way.
    has_replies = _SDS_REPLY_START in data
    items, consumed, checksum_errors, length_errors, garbage = _scan(
        data,
        _SDS_BOTH_STARTS if has_replies else _SDS_DATA_START_ONLY,
        SDS011_FRAME_BYTES,
        _judge_sds011,
    )
    if not has_replies:
        return DecodeResult(
            frames=items,
            consumed=consumed,
            checksum_errors=checksum_errors,
            length_errors=length_errors,
            garbage_bytes=garbage,
        )
    return DecodeResult(
        frames=[i for i in items if i.__class__ is Sds011Frame],
        consumed=consumed,
        checksum_errors=checksum_errors,
        length_errors=length_errors,
        garbage_bytes=garbage,
        replies=[i for i in items if i.__class__ is Sds011Reply],
    )


class FrameDecoder:
    """Decode one sensor's byte stream as it arrives; pure, keeps only a short tail.

    ``feed`` returns the frames completed by the new bytes, in order;
    ``feed_all`` returns those and the SDS011 command replies completed too
    (``feed`` counts replies in ``replies`` and drops them: for a reader that
    sends no commands). The counters are cumulative since construction. The kept tail is always
    shorter than one frame (the ``decode_*`` functions keep at most a
    started frame), and ``feed`` enforces that bound as well, so no input can
    grow the decoder's memory.
    """

    __slots__ = (
        "_decode",
        "_frame_bytes",
        "_tail",
        "checksum_errors",
        "frames",
        "garbage_bytes",
        "kind",
        "length_errors",
        "replies",
    )

    def __init__(self, kind: SensorKind) -> None:
        if kind == "pms5003":
            self._decode = decode_pms5003
            self._frame_bytes = PMS5003_FRAME_BYTES
        elif kind == "sds011":
            self._decode = decode_sds011
            self._frame_bytes = SDS011_FRAME_BYTES
        else:
            raise ValueError(f"unknown serial protocol {kind!r} (known: pms5003, sds011)")
        self.kind: SensorKind = kind
        self._tail = b""
        self.frames = 0
        self.checksum_errors = 0
        self.length_errors = 0
        self.garbage_bytes = 0
        self.replies = 0

    @property
    def pending_bytes(self) -> int:
        """Bytes kept for the next ``feed``: the start of a frame still arriving."""
        return len(self._tail)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        return self._feed(data).frames

    def feed_all(
        self, data: bytes | bytearray | memoryview
    ) -> tuple[list[Frame], list[Sds011Reply]]:
        result = self._feed(data)
        return result.frames, result.replies

    def _feed(self, data: bytes | bytearray | memoryview) -> DecodeResult:
        buffer = self._tail + data if self._tail else bytes(data)
        result = self._decode(buffer)
        tail = buffer[result.consumed :]
        if len(tail) >= self._frame_bytes:
            # Unreachable while decode_* keep their contract; a bound anyway.
            drop = len(tail) - self._frame_bytes + 1
            self.garbage_bytes += drop
            tail = tail[drop:]
        self._tail = tail
        self.frames += len(result.frames)
        self.checksum_errors += result.checksum_errors
        self.length_errors += result.length_errors
        self.garbage_bytes += result.garbage_bytes
        if result.replies:
            self.replies += len(result.replies)
        return result

    def reset(self) -> None:
        """Drop the kept tail (counted as garbage), e.g. after the port was reopened."""
        self.garbage_bytes += len(self._tail)
        self._tail = b""


def to_metrics(frame: Frame) -> dict[str, float]:
    """The ``air_quality`` catalog metrics of one frame.

    PMS5003: ``pm1``, ``pm25``, ``pm10`` from the atmospheric-environment
    words, the values the manual gives for ambient air and the ones outdoor
    monitors report; the CF=1 words are for the factory calibration
    environment. (Some correction models, e.g. the US EPA's for PurpleAir,
    start from the CF=1 PM2.5 instead; the frame keeps both for that.)
    SDS011: ``pm25`` and ``pm10``; it has no PM1.0 channel.
    """
    if isinstance(frame, Pms5003Frame):
        return {
            "pm1": float(frame.pm1_atm),
            "pm25": float(frame.pm25_atm),
            "pm10": float(frame.pm10_atm),
        }
    return {"pm25": frame.pm25, "pm10": frame.pm10}
