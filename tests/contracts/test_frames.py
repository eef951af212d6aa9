"""PMS5003 / SDS011 frame codecs: datasheet layout, round trips, noisy and split streams."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts import catalog
from contracts.frames import (
    PMS5003_FRAME_BYTES,
    PMS5003_LINE_FRAMES_PER_S,
    SDS011_FRAME_BYTES,
    SDS011_LINE_FRAMES_PER_S,
    DecodeResult,
    Frame,
    FrameDecoder,
    Pms5003Frame,
    Sds011Frame,
    decode_pms5003,
    decode_sds011,
    encode_pms5003,
    encode_sds011,
    to_metrics,
)

# --- known-good frames, written out byte by byte -------------------------------

# A PMS5003 frame as the manual lays it out (appendix I), values of a hazy
# Hanoi morning.
PMS_RAW = bytes(
    [
        0x42, 0x4D,  # start bytes                                        66 + 77 = 143
        0x00, 0x1C,  # frame length 28 = 2 * 13 + 2                         0 + 28 =  28
        0x00, 0x23,  # data 1:  PM1.0 CF=1        35 ug/m3                          35
        0x00, 0x34,  # data 2:  PM2.5 CF=1        52 ug/m3                          52
        0x00, 0x3D,  # data 3:  PM10  CF=1        61 ug/m3                          61
        0x00, 0x1C,  # data 4:  PM1.0 atmospheric 28 ug/m3                          28
        0x00, 0x29,  # data 5:  PM2.5 atmospheric 41 ug/m3                          41
        0x00, 0x30,  # data 6:  PM10  atmospheric 48 ug/m3                          48
        0x16, 0xC8,  # data 7:  >0.3 um  5832 per 0.1 L                     22 + 200 = 222
        0x06, 0xA9,  # data 8:  >0.5 um  1705 per 0.1 L                      6 + 169 = 175
        0x01, 0x38,  # data 9:  >1.0 um   312 per 0.1 L                       1 + 56 =  57
        0x00, 0x19,  # data 10: >2.5 um    25 per 0.1 L                                 25
        0x00, 0x04,  # data 11: >5.0 um     4 per 0.1 L                                  4
        0x00, 0x01,  # data 12: >10 um      1 per 0.1 L                                  1
        0x97, 0x00,  # data 13: reserved (0x9700)                                      151
        # checksum: 143 + 28 + 35 + 52 + 61 + 28 + 41 + 48 + 222 + 175 + 57 + 25
        # + 4 + 1 + 151 = 1071 = 0x042F
        0x04, 0x2F,
    ]
)  # fmt: skip
PMS_FRAME = Pms5003Frame(
    pm1_cf1=35,
    pm25_cf1=52,
    pm10_cf1=61,
    pm1_atm=28,
    pm25_atm=41,
    pm10_atm=48,
    n0_3=5832,
    n0_5=1705,
    n1_0=312,
    n2_5=25,
    n5_0=4,
    n10=1,
    reserved=0x9700,
)

# The SDS011 control protocol's own example reply, "sensor with ID A160".
SDS_RAW = bytes(
    [
        0xAA,  # head
        0xC0,  # command: data
        0xD4, 0x04,  # PM2.5 low, high: 0x04D4 = 1236 -> 123.6 ug/m3
        0x3A, 0x0A,  # PM10 low, high:  0x0A3A = 2618 -> 261.8 ug/m3
        0xA1, 0x60,  # device id byte 1, byte 2: "A160"
        # checksum: D4 + 04 + 3A + 0A + A1 + 60 = 212 + 4 + 58 + 10 + 161 + 96
        # = 541 = 0x21D -> low byte 0x1D
        0x1D,
        0xAB,  # tail
    ]
)  # fmt: skip
SDS_FRAME = Sds011Frame(pm25=123.6, pm10=261.8, device_id=0xA160)


def pms(i: int) -> Pms5003Frame:
    """A distinct, valid PMS5003 frame per ``i``."""
    return Pms5003Frame(
        pm1_cf1=i,
        pm25_cf1=i + 1,
        pm10_cf1=i + 2,
        pm1_atm=i + 3,
        pm25_atm=i + 4,
        pm10_atm=i + 5,
        n0_3=1000 + i,
        n0_5=500 + i,
        n1_0=100 + i,
        n2_5=10 + i,
        n5_0=i,
        n10=i,
    )


def sds(i: int) -> Sds011Frame:
    return Sds011Frame(pm25=i / 10, pm10=(i + 7) / 10, device_id=0x0100 + i)


def test_pms5003_known_frame_matches_the_manual_layout():
    assert len(PMS_RAW) == PMS5003_FRAME_BYTES
    result = decode_pms5003(PMS_RAW)
    assert result == DecodeResult(frames=[PMS_FRAME], consumed=32)
    assert encode_pms5003(PMS_FRAME) == PMS_RAW
    # Outdoor metrics come from the atmospheric-environment words 4..6.
    assert to_metrics(PMS_FRAME) == {"pm1": 28.0, "pm25": 41.0, "pm10": 48.0}


def test_sds011_protocol_example_decodes():
    assert len(SDS_RAW) == SDS011_FRAME_BYTES
    result = decode_sds011(SDS_RAW)
    assert result == DecodeResult(frames=[SDS_FRAME], consumed=10)
    assert encode_sds011(SDS_FRAME) == SDS_RAW
    assert to_metrics(SDS_FRAME) == {"pm25": 123.6, "pm10": 261.8}


def test_metric_names_belong_to_the_air_quality_type():
    names = set(catalog.AIR_QUALITY.metric_names)
    assert set(to_metrics(PMS_FRAME)) == {"pm1", "pm25", "pm10"} <= names
    assert set(to_metrics(SDS_FRAME)) == {"pm25", "pm10"} <= names


def test_line_rates_at_9600_baud_8n1():
    # 960 bytes/s on the wire.
    assert PMS5003_LINE_FRAMES_PER_S == 30
    assert SDS011_LINE_FRAMES_PER_S == 96


def test_decoders_accept_bytearray_and_memoryview():
    stream = b"\x00" + PMS_RAW
    for buffer in (bytearray(stream), memoryview(stream)):
        assert decode_pms5003(buffer).frames == [PMS_FRAME]
    assert decode_sds011(memoryview(SDS_RAW)).frames == [SDS_FRAME]


# --- round trips and encoders -----------------------------------------------------

word = st.integers(min_value=0, max_value=0xFFFF)
pms_frames = st.builds(
    Pms5003Frame,
    pm1_cf1=word,
    pm25_cf1=word,
    pm10_cf1=word,
    pm1_atm=word,
    pm25_atm=word,
    pm10_atm=word,
    n0_3=word,
    n0_5=word,
    n1_0=word,
    n2_5=word,
    n5_0=word,
    n10=word,
    reserved=word,
)
# Every SDS011 value is a whole number of tenths on the wire.
sds_frames = st.builds(
    lambda pm25, pm10, device_id: Sds011Frame(pm25=pm25 / 10, pm10=pm10 / 10, device_id=device_id),
    word,
    word,
    word,
)


@given(pms_frames)
def test_pms5003_round_trip(frame):
    raw = encode_pms5003(frame)
    assert len(raw) == PMS5003_FRAME_BYTES
    assert decode_pms5003(raw) == DecodeResult(frames=[frame], consumed=32)


@given(sds_frames)
def test_sds011_round_trip(frame):
    raw = encode_sds011(frame)
    assert len(raw) == SDS011_FRAME_BYTES
    assert decode_sds011(raw) == DecodeResult(frames=[frame], consumed=10)


@pytest.mark.parametrize(
    ("pm25", "expected"),
    [
        (12.34, 12.3),  # nearest tenth
        (12.36, 12.4),
        (-3.0, 0.0),  # clamped to what 16 bits of tenths hold
        (6553.5, 6553.5),
        (1e9, 6553.5),
        (math.inf, 6553.5),
        (-math.inf, 0.0),
    ],
)
def test_sds011_encoder_rounds_and_clamps_like_the_sensor(pm25, expected):
    raw = encode_sds011(Sds011Frame(pm25=pm25, pm10=1.0, device_id=70000))
    (frame,) = decode_sds011(raw).frames
    assert frame == Sds011Frame(pm25=expected, pm10=1.0, device_id=0xFFFF)


def test_pms5003_encoder_clamps_words():
    frame = Pms5003Frame(
        pm1_cf1=-5,
        pm25_cf1=70000,
        pm10_cf1=3,
        pm1_atm=0,
        pm25_atm=0xFFFF,
        pm10_atm=0,
        n0_3=0,
        n0_5=0,
        n1_0=0,
        n2_5=0,
        n5_0=0,
        n10=0,
    )
    (got,) = decode_pms5003(encode_pms5003(frame)).frames
    assert isinstance(got, Pms5003Frame)
    assert (got.pm1_cf1, got.pm25_cf1, got.pm10_cf1, got.pm25_atm) == (0, 0xFFFF, 3, 0xFFFF)


def test_encoders_refuse_nan():
    with pytest.raises(ValueError, match="NaN"):
        encode_sds011(Sds011Frame(pm25=math.nan, pm10=1.0, device_id=1))


# --- corrupted frames ------------------------------------------------------------


@pytest.mark.parametrize("index", [30, 31])
def test_pms5003_bad_checksum_byte_is_counted_and_the_next_frame_decodes(index):
    bad = bytearray(encode_pms5003(pms(1)))
    bad[index] ^= 0x01
    good = encode_pms5003(pms(2))
    result = decode_pms5003(bytes(bad) + good)
    assert result.frames == [pms(2)]
    assert result.checksum_errors == 1
    assert result.length_errors == 0
    assert result.consumed == 64
    assert result.garbage_bytes == 32


@pytest.mark.parametrize("index", range(4, 30))
def test_pms5003_corrupted_data_byte_fails_the_checksum(index):
    bad = bytearray(encode_pms5003(pms(1)))
    bad[index] ^= 0x10
    result = decode_pms5003(bytes(bad) + encode_pms5003(pms(2)))
    assert (result.frames, result.checksum_errors) == ([pms(2)], 1)


def test_sds011_bad_checksum_is_counted_and_the_next_frame_decodes():
    bad = bytearray(encode_sds011(sds(1)))
    bad[8] ^= 0xFF
    result = decode_sds011(bytes(bad) + encode_sds011(sds(2)))
    assert result.frames == [sds(2)]
    assert (result.checksum_errors, result.length_errors) == (1, 0)
    assert (result.consumed, result.garbage_bytes) == (20, 10)


def test_pms5003_wrong_length_field_is_counted():
    bad = bytearray(encode_pms5003(pms(1)))
    bad[2:4] = b"\x00\x14"  # 20: a different Plantower model's frame
    result = decode_pms5003(bytes(bad) + encode_pms5003(pms(2)))
    assert result.frames == [pms(2)]
    assert (result.length_errors, result.checksum_errors) == (1, 0)
    assert result.consumed == 64


def test_pms5003_wrong_length_is_judged_before_the_frame_is_complete():
    # Four bytes are enough to reject: nothing is kept waiting for 28 more.
    result = decode_pms5003(b"\x42\x4d\x01\x1c")
    assert (result.consumed, result.length_errors, result.garbage_bytes) == (4, 1, 4)


def test_sds011_missing_tail_is_a_length_error():
    good = encode_sds011(sds(2))
    no_tail = encode_sds011(sds(1))[:-1]  # the tail byte was lost on the line
    result = decode_sds011(no_tail + good)
    assert result.frames == [sds(2)]
    assert (result.length_errors, result.checksum_errors) == (1, 0)
    assert result.consumed == 19


# --- false starts, garbage and the buffer's end -------------------------------------


def test_pms5003_false_start_in_garbage_does_not_hide_the_next_frame():
    # A start pair with a plausible length whose 32-byte window overlaps the
    # real frame: its checksum fails, the decoder steps one byte and finds it.
    false_start = b"\x42\x4d\x00\x1c\x11\x22\x42\x4d\x00"
    frame = encode_pms5003(pms(5))
    result = decode_pms5003(b"\x00" + false_start + frame)
    assert result.frames == [pms(5)]
    assert result.checksum_errors == 1
    assert result.length_errors == 1  # the second pair's length reads 0x0042
    assert result.consumed == 1 + len(false_start) + 32
    assert result.garbage_bytes == 1 + len(false_start)


def test_sds011_false_start_in_garbage_does_not_hide_the_next_frame():
    false_start = b"\xaa\xc0\x01\x02\xaa"
    frame = encode_sds011(sds(5))
    result = decode_sds011(false_start + frame + b"\xaa\xc0\xaa\xc0\x00")
    assert result.frames == [sds(5)]
    assert result.length_errors == 1  # its byte 9 is not 0xAB
    # The trailing pairs could still be a frame: kept.
    assert result.consumed == len(false_start) + 10


def test_start_pair_at_the_end_is_kept_for_the_next_feed():
    result = decode_pms5003(b"\x00\x01\x42\x4d")
    assert (result.frames, result.consumed, result.garbage_bytes) == ([], 2, 2)
    result = decode_sds011(b"\x00\x01\xaa\xc0")
    assert (result.frames, result.consumed, result.garbage_bytes) == ([], 2, 2)

    raw = encode_pms5003(pms(3))
    decoder = FrameDecoder("pms5003")
    assert decoder.feed(b"\x00\x01" + raw[:2]) == []
    assert decoder.pending_bytes == 2
    assert decoder.feed(raw[2:]) == [pms(3)]
    assert (decoder.frames, decoder.garbage_bytes, decoder.pending_bytes) == (1, 2, 0)


@pytest.mark.parametrize(
    ("decode", "buffer", "consumed"),
    [
        (decode_pms5003, b"", 0),
        (decode_pms5003, b"\x00\x01\x02", 3),
        (decode_pms5003, b"\x00\x42", 1),  # 0x42 may start a frame
        (decode_pms5003, b"\x42", 0),
        (decode_pms5003, b"\x4d\x42\x42", 2),  # 0x42 0x42 is no start pair
        (decode_pms5003, b"\x4d\x42\x4d\x00", 1),  # length not yet known
        (decode_pms5003, b"\xaa\xc0\xab", 3),  # SDS011 bytes are garbage here
        (decode_sds011, b"", 0),
        (decode_sds011, b"\x00\x01\x02", 3),
        (decode_sds011, b"\x00\x01\x02\xaa", 3),
        (decode_sds011, b"\xaa\xaa", 1),
        (decode_sds011, b"\xc0\xaa\xc0\x00\x00", 1),
        (decode_sds011, b"\x42\x4d\x00\x1c", 4),  # PMS5003 bytes are garbage here
    ],
)
def test_garbage_is_consumed_except_a_possible_frame_start(decode, buffer, consumed):
    result = decode(buffer)
    assert result.frames == []
    assert result.consumed == consumed
    assert result.garbage_bytes == consumed
    assert result.checksum_errors == result.length_errors == 0


def test_empty_input():
    assert decode_pms5003(b"") == DecodeResult(frames=[], consumed=0)
    assert decode_sds011(b"") == DecodeResult(frames=[], consumed=0)
    decoder = FrameDecoder("sds011")
    assert decoder.feed(b"") == []
    assert (decoder.frames, decoder.garbage_bytes, decoder.pending_bytes) == (0, 0, 0)


# --- streams through FrameDecoder -------------------------------------------------


# Errors in noisy_stream: (checksum, length). The PMS5003 false start has a
# good length, so its 32-byte window fails the checksum; the SDS011 one's
# byte 9 falls inside the next frame and is not the 0xAB tail.
NOISY_ERRORS = {"pms5003": (2, 0), "sds011": (1, 1)}


def noisy_stream(kind: str) -> tuple[bytes, list[Frame]]:
    """Three frames with garbage, a false start and a corrupted frame between them."""
    frames: list[Frame]
    if kind == "pms5003":
        pms_list = [pms(1), pms(2), pms(3)]
        frames, raws = list(pms_list), [encode_pms5003(f) for f in pms_list]
        corrupted = bytearray(encode_pms5003(pms(9)))
        false_start = b"\x42\x4d\x00\x1c\x05"
    else:
        sds_list = [sds(1), sds(2), sds(3)]
        frames, raws = list(sds_list), [encode_sds011(f) for f in sds_list]
        corrupted = bytearray(encode_sds011(sds(9)))
        false_start = b"\xaa\xc0\x05"
    corrupted[5] ^= 0x40
    stream = (
        b"\x00\x13\x37"
        + raws[0]
        + false_start
        + raws[1]
        + bytes(corrupted)
        + b"\xff\xfe"
        + raws[2]
        + b"\x01"
    )
    return stream, frames


@pytest.mark.parametrize("kind", ["pms5003", "sds011"])
def test_stream_split_at_every_byte_boundary(kind):
    stream, frames = noisy_stream(kind)
    whole = FrameDecoder(kind)
    assert whole.feed(stream) == frames
    for cut in range(len(stream) + 1):
        decoder = FrameDecoder(kind)
        got = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert got == frames, f"split at {cut}"
        errors = (decoder.checksum_errors, decoder.length_errors)
        assert errors == NOISY_ERRORS[kind], f"split at {cut}"
        assert decoder.garbage_bytes == whole.garbage_bytes
        assert decoder.pending_bytes == 0


@pytest.mark.parametrize("kind", ["pms5003", "sds011"])
def test_stream_fed_one_byte_at_a_time(kind):
    stream, frames = noisy_stream(kind)
    decoder = FrameDecoder(kind)
    got: list[Frame] = []
    for i in range(len(stream)):
        got += decoder.feed(stream[i : i + 1])
        assert decoder.pending_bytes < (32 if kind == "pms5003" else 10)
    assert got == frames
    assert decoder.frames == 3
    assert (decoder.checksum_errors, decoder.length_errors) == NOISY_ERRORS[kind]
    frame_bytes = PMS5003_FRAME_BYTES if kind == "pms5003" else SDS011_FRAME_BYTES
    assert decoder.garbage_bytes == len(stream) - 3 * frame_bytes


def test_corrupted_frames_in_a_long_stream_are_counted_and_dropped():
    rng = random.Random(7)
    frames = [sds(i) for i in range(200)]
    parts = []
    for i, frame in enumerate(frames):
        raw = bytearray(encode_sds011(frame))
        if i % 10 == 0:
            raw[4] ^= 0x55  # a data byte: the checksum fails
        parts.append(bytes(raw) + bytes(rng.randrange(0, 0xA0) for _ in range(rng.randrange(4))))
    decoder = FrameDecoder("sds011")
    assert decoder.feed(b"".join(parts)) == [f for i, f in enumerate(frames) if i % 10]
    assert decoder.checksum_errors == 20
    assert decoder.frames == 180


def test_reset_drops_the_kept_tail():
    raw = encode_sds011(sds(1))
    decoder = FrameDecoder("sds011")
    decoder.feed(raw[:6])
    decoder.reset()  # the port was reopened: those 6 bytes will never be completed
    assert decoder.feed(raw[6:] + raw) == [sds(1)]
    assert decoder.garbage_bytes == 6 + 4
    assert decoder.checksum_errors == decoder.length_errors == 0


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="pms7003"):
        FrameDecoder("pms7003")  # type: ignore[arg-type]


# --- properties -------------------------------------------------------------------


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given positions (any ints; taken modulo the length)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(["pms5003", "sds011"]),
    seeds=st.lists(st.tuples(pms_frames, sds_frames), max_size=8),
    garbage=st.lists(st.binary(max_size=50), min_size=9, max_size=9),
    cuts=st.lists(st.integers(min_value=0), max_size=30),
)
def test_frames_between_start_free_garbage_come_out_exactly(kind, seeds, garbage, cuts):
    first = 0x42 if kind == "pms5003" else 0xAA
    # Garbage without the first start byte cannot hold a frame or a false start.
    clean = [bytes(b for b in g if b != first) for g in garbage]
    frames: list[Frame]
    if kind == "pms5003":
        frames, raws = [p for p, _ in seeds], [encode_pms5003(p) for p, _ in seeds]
    else:
        frames, raws = [s for _, s in seeds], [encode_sds011(s) for _, s in seeds]
    stream = b"".join(clean[i] + raw for i, raw in enumerate(raws)) + clean[-1]
    decoder = FrameDecoder(kind)
    got: list[Frame] = []
    for chunk in chunked(stream, cuts):
        got += decoder.feed(chunk)
    assert got == frames
    assert decoder.frames == len(frames)
    assert decoder.checksum_errors == decoder.length_errors == 0
    assert decoder.garbage_bytes == len(stream) - sum(len(r) for r in raws)
    assert decoder.pending_bytes == 0


# Streams of anything: real frames, pieces of frames, start pairs, random bytes.
def fragments(kind: str) -> st.SearchStrategy[bytes]:
    if kind == "pms5003":
        raw = pms_frames.map(encode_pms5003)
        start = b"\x42\x4d"
    else:
        raw = sds_frames.map(encode_sds011)
        start = b"\xaa\xc0"
    return st.one_of(
        raw,
        raw.flatmap(lambda r: st.integers(0, len(r)).map(lambda n: r[:n])),
        raw.flatmap(lambda r: st.integers(0, len(r)).map(lambda n: r[n:])),
        st.just(start),
        st.just(start[:1]),
        st.binary(max_size=40),
    )


@settings(max_examples=300, deadline=None)
@given(data=st.data(), kind=st.sampled_from(["pms5003", "sds011"]))
def test_any_stream_decodes_the_same_in_any_chunking(data, kind):
    stream = b"".join(data.draw(st.lists(fragments(kind), max_size=12)))
    cuts = data.draw(st.lists(st.integers(min_value=0), max_size=20))
    decode = decode_pms5003 if kind == "pms5003" else decode_sds011
    frame_bytes = PMS5003_FRAME_BYTES if kind == "pms5003" else SDS011_FRAME_BYTES

    once = decode(stream)
    # Every consumed byte is in a good frame or counted as garbage, and what is
    # left is shorter than a frame.
    assert once.consumed == len(once.frames) * frame_bytes + once.garbage_bytes
    assert 0 <= len(stream) - once.consumed < frame_bytes

    decoder = FrameDecoder(kind)
    got: list[Frame] = []
    for chunk in chunked(stream, cuts):
        got += decoder.feed(chunk)
        assert decoder.pending_bytes < frame_bytes
    assert got == once.frames
    assert decoder.checksum_errors == once.checksum_errors
    assert decoder.length_errors == once.length_errors
    assert decoder.garbage_bytes == once.garbage_bytes
    assert decoder.pending_bytes == len(stream) - once.consumed
