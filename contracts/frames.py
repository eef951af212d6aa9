"""Sans-IO serial frame codecs for the particulate sensors: bytes in, frames out.

Frame layouts (from the datasheets):

- Plantower PMS5003 (datasheet V2.5), 9600 baud 8N1, 32 bytes: 0x42 0x4D,
  frame length (big-endian 16-bit, 28 = 13 data words + checksum), 13
  big-endian 16-bit words (PM1.0 / PM2.5 / PM10 at CF=1, the same under
  atmospheric environment, particle counts beyond 0.3 / 0.5 / 1.0 / 2.5 /
  5.0 / 10 um per 0.1 L, reserved), then a 16-bit checksum: the sum of the
  30 bytes before it.
- Nova Fitness SDS011 (datasheet V1.3), 9600 baud 8N1, 10 bytes: 0xAA 0xC0,
  PM2.5 low, high, PM10 low, high (tenths of ug/m3), device id (2 bytes),
  checksum (sum of bytes 2..7, low 8 bits), 0xAB.

``decode_*`` take a buffer and return the frames found, how many bytes the
caller may drop from its front, and error counts; they resynchronise on
garbage by scanning for the start bytes and, after a false start (bad length,
checksum or tail), skip one byte and scan again, so a real frame right after
a false start is still found. Bytes that may begin an incomplete frame at the
end of the buffer are never consumed. Nothing here raises on any input.
Reading the port is the gateway's business.
"""

from __future__ import annotations

import struct
from typing import Final, Literal

import msgspec

SERIAL_BAUD: Final = 9600
PMS5003_FRAME_BYTES: Final = 32
SDS011_FRAME_BYTES: Final = 10
# 9600 baud 8N1 carries 960 bytes/s: at most 30 PMS5003 or 96 SDS011 frames
# a second on the wire; both sensors actually send about one a second.
PMS5003_LINE_FRAMES_PER_S: Final = SERIAL_BAUD // 10 // PMS5003_FRAME_BYTES
SDS011_LINE_FRAMES_PER_S: Final = SERIAL_BAUD // 10 // SDS011_FRAME_BYTES

_PMS_START: Final = b"\x42\x4d"
_PMS_LENGTH: Final = 28
_PMS_WORDS: Final = struct.Struct(">2sH13HH")
_SDS_START: Final = b"\xaa\xc0"
_SDS_TAIL: Final = 0xAB


class Pms5003Frame(msgspec.Struct, frozen=True, kw_only=True):
    pm1_cf1: int  # ug/m3, CF=1 (factory calibration particle)
    pm25_cf1: int
    pm10_cf1: int
    pm1_atm: int  # ug/m3, atmospheric environment
    pm25_atm: int
    pm10_atm: int
    n0_3: int  # particles beyond 0.3 um per 0.1 L of air
    n0_5: int
    n1_0: int
    n2_5: int
    n5_0: int
    n10: int
    reserved: int = 0


class Sds011Frame(msgspec.Struct, frozen=True, kw_only=True):
    pm25: float  # ug/m3, 0.1 resolution
    pm10: float
    device_id: int


Frame = Pms5003Frame | Sds011Frame
SensorKind = Literal["pms5003", "sds011"]


class DecodeResult(msgspec.Struct, frozen=True):
    frames: list[Frame]
    consumed: int
    checksum_errors: int = 0
    length_errors: int = 0
    garbage_bytes: int = 0


def _word(value: int) -> int:
    return max(0, min(0xFFFF, int(value)))


def encode_pms5003(frame: Pms5003Frame) -> bytes:
    words = [
        frame.pm1_cf1,
        frame.pm25_cf1,
        frame.pm10_cf1,
        frame.pm1_atm,
        frame.pm25_atm,
        frame.pm10_atm,
        frame.n0_3,
        frame.n0_5,
        frame.n1_0,
        frame.n2_5,
        frame.n5_0,
        frame.n10,
        frame.reserved,
    ]
    body = _PMS_START + struct.pack(">H13H", _PMS_LENGTH, *(_word(w) for w in words))
    return body + struct.pack(">H", sum(body) & 0xFFFF)


def encode_sds011(frame: Sds011Frame) -> bytes:
    pm25 = _word(round(frame.pm25 * 10))
    pm10 = _word(round(frame.pm10 * 10))
    data = struct.pack("<HHH", pm25, pm10, _word(frame.device_id))
    return _SDS_START + data + bytes([sum(data) & 0xFF, _SDS_TAIL])


def _keep_from(buffer: bytes, start: bytes) -> int:
    """Index from which the tail of ``buffer`` could still begin a frame."""
    if buffer.endswith(start[:1]):
        return len(buffer) - 1
    return len(buffer)


def decode_pms5003(buffer: bytes | bytearray | memoryview) -> DecodeResult:
    data = bytes(buffer)
    frames: list[Frame] = []
    pos = checksum_errors = length_errors = garbage = 0
    while True:
        start = data.find(_PMS_START, pos)
        if start < 0:
            keep = max(pos, _keep_from(data, _PMS_START))
            garbage += keep - pos
            pos = keep
            break
        garbage += start - pos
        pos = start
        if len(data) - start < 4:
            break  # the length field has not arrived yet
        if data[start + 2] << 8 | data[start + 3] != _PMS_LENGTH:
            length_errors += 1
            garbage += 1
            pos = start + 1
            continue
        if len(data) - start < PMS5003_FRAME_BYTES:
            break
        raw = data[start : start + PMS5003_FRAME_BYTES]
        fields = _PMS_WORDS.unpack(raw)
        if sum(raw[:30]) & 0xFFFF != fields[-1]:
            checksum_errors += 1
            garbage += 1
            pos = start + 1
            continue
        w = fields[2:15]
        frames.append(
            Pms5003Frame(
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
        )
        pos = start + PMS5003_FRAME_BYTES
    return DecodeResult(frames, pos, checksum_errors, length_errors, garbage)


def decode_sds011(buffer: bytes | bytearray | memoryview) -> DecodeResult:
    data = bytes(buffer)
    frames: list[Frame] = []
    pos = checksum_errors = length_errors = garbage = 0
    while True:
        start = data.find(_SDS_START, pos)
        if start < 0:
            keep = max(pos, _keep_from(data, _SDS_START))
            garbage += keep - pos
            pos = keep
            break
        garbage += start - pos
        pos = start
        if len(data) - start < SDS011_FRAME_BYTES:
            break
        raw = data[start : start + SDS011_FRAME_BYTES]
        if raw[9] != _SDS_TAIL:
            length_errors += 1
            garbage += 1
            pos = start + 1
            continue
        if sum(raw[2:8]) & 0xFF != raw[8]:
            checksum_errors += 1
            garbage += 1
            pos = start + 1
            continue
        pm25, pm10, device_id = struct.unpack_from("<HHH", raw, 2)
        frames.append(Sds011Frame(pm25=pm25 / 10, pm10=pm10 / 10, device_id=device_id))
        pos = start + SDS011_FRAME_BYTES
    return DecodeResult(frames, pos, checksum_errors, length_errors, garbage)


class FrameDecoder:
    """Stateful wrapper: feed bytes as they arrive, get whole frames; counts errors."""

    def __init__(self, kind: SensorKind) -> None:
        self.kind: SensorKind = kind
        self._decode = decode_pms5003 if kind == "pms5003" else decode_sds011
        self._max_tail = PMS5003_FRAME_BYTES if kind == "pms5003" else SDS011_FRAME_BYTES
        self._tail = b""
        self.frames = 0
        self.checksum_errors = 0
        self.length_errors = 0
        self.garbage_bytes = 0

    def feed(self, data: bytes) -> list[Frame]:
        buffer = self._tail + data
        result = self._decode(buffer)
        self._tail = buffer[result.consumed :]
        # The kept tail is at most one incomplete frame by construction; bound
        # it anyway so no input can grow it.
        if len(self._tail) > self._max_tail:
            self.garbage_bytes += len(self._tail) - self._max_tail
            self._tail = self._tail[-self._max_tail :]
        self.frames += len(result.frames)
        self.checksum_errors += result.checksum_errors
        self.length_errors += result.length_errors
        self.garbage_bytes += result.garbage_bytes
        return result.frames


def to_metrics(frame: Frame) -> dict[str, float]:
    """Catalog metrics of ``air_quality`` from one frame.

    PMS5003: the atmospheric-environment values, what outdoor monitors
    report (the CF=1 values are for factory calibration particles).
    """
    if isinstance(frame, Pms5003Frame):
        return {
            "pm1": float(frame.pm1_atm),
            "pm25": float(frame.pm25_atm),
            "pm10": float(frame.pm10_atm),
        }
    return {"pm25": frame.pm25, "pm10": frame.pm10}
