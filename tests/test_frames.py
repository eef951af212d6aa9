"""PMS5003 / SDS011 frame codecs: datasheet layout, round trips, noisy and split streams."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from contracts.frames import (
    FrameDecoder,
    Pms5003Frame,
    Sds011Frame,
    decode_pms5003,
    decode_sds011,
    encode_pms5003,
    encode_sds011,
    to_metrics,
)

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
sds_frames = st.builds(
    lambda a, b, d: Sds011Frame(pm25=a / 10, pm10=b / 10, device_id=d), word, word, word
)


def test_pms5003_layout_matches_the_datasheet():
    frame = Pms5003Frame(
        pm1_cf1=1,
        pm25_cf1=2,
        pm10_cf1=3,
        pm1_atm=4,
        pm25_atm=5,
        pm10_atm=6,
        n0_3=7,
        n0_5=8,
        n1_0=9,
        n2_5=10,
        n5_0=11,
        n10=12,
        reserved=0,
    )
    # 42 4D, length 00 1C, words 1..12 and reserved 0; checksum = 0x42 + 0x4D + 0x1C
    # + (1 + 2 + ... + 12) = 66 + 77 + 28 + 78 = 249 = 0x00F9.
    expected = bytes.fromhex("424d001c" + "".join(f"{v:04x}" for v in [*range(1, 13), 0]) + "00f9")
    assert encode_pms5003(frame) == expected
    assert decode_pms5003(expected).frames == [frame]
    assert to_metrics(frame) == {"pm1": 4.0, "pm25": 5.0, "pm10": 6.0}


def test_sds011_layout_matches_the_datasheet():
    # PM2.5 = 0x00D4 / 10 = 21.2, PM10 = 0x01F5 / 10 = 50.1, id 0xA1B2;
    # checksum = D4 + 00 + F5 + 01 + B2 + A1 = 212+0+245+1+178+161 = 797 = 0x31D -> 0x1D.
    raw = bytes.fromhex("aac0d400f501b2a11dab")
    assert decode_sds011(raw).frames == [Sds011Frame(pm25=21.2, pm10=50.1, device_id=0xA1B2)]
    assert encode_sds011(Sds011Frame(pm25=21.2, pm10=50.1, device_id=0xA1B2)) == raw


@given(pms_frames)
def test_pms5003_round_trip(frame):
    assert decode_pms5003(encode_pms5003(frame)).frames == [frame]


@given(sds_frames)
def test_sds011_round_trip(frame):
    assert decode_sds011(encode_sds011(frame)).frames == [frame]


def test_bad_checksum_is_counted_and_the_next_frame_still_decodes():
    good = encode_pms5003(
        Pms5003Frame(
            pm1_cf1=1,
            pm25_cf1=1,
            pm10_cf1=1,
            pm1_atm=1,
            pm25_atm=9,
            pm10_atm=1,
            n0_3=0,
            n0_5=0,
            n1_0=0,
            n2_5=0,
            n5_0=0,
            n10=0,
        )
    )
    bad = bytearray(good)
    bad[-1] ^= 0xFF
    result = decode_pms5003(bytes(bad) + good)
    assert len(result.frames) == 1
    assert result.checksum_errors == 1
    assert result.consumed == len(bad) + len(good)


def test_wrong_length_and_missing_tail_are_counted():
    good = encode_pms5003(
        Pms5003Frame(
            pm1_cf1=0,
            pm25_cf1=0,
            pm10_cf1=0,
            pm1_atm=0,
            pm25_atm=7,
            pm10_atm=0,
            n0_3=0,
            n0_5=0,
            n1_0=0,
            n2_5=0,
            n5_0=0,
            n10=0,
        )
    )
    result = decode_pms5003(b"\x42\x4d\x00\x10" + good)
    assert [f.pm25_atm for f in result.frames] == [7]
    assert result.length_errors == 1
    sds = encode_sds011(Sds011Frame(pm25=1.0, pm10=2.0, device_id=1))
    no_tail = sds[:-1] + b"\x00"
    result = decode_sds011(no_tail + sds)
    assert len(result.frames) == 1
    assert result.length_errors == 1


def test_an_incomplete_frame_or_start_byte_at_the_end_is_kept():
    frame = encode_sds011(Sds011Frame(pm25=3.0, pm10=4.0, device_id=2))
    assert decode_sds011(frame[:6]).consumed == 0
    only_garbage = decode_sds011(b"\x00\x01\x02\xaa")
    assert (only_garbage.consumed, only_garbage.garbage_bytes) == (3, 3)
    assert decode_pms5003(b"").consumed == 0
    assert decode_pms5003(b"\x01\x42\x4d").consumed == 1


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["pms5003", "sds011"]),
    st.lists(st.tuples(pms_frames, sds_frames), min_size=1, max_size=8),
    st.lists(st.binary(max_size=40), min_size=9, max_size=9),
    st.randoms(use_true_random=False),
)
def test_noisy_split_stream_yields_exactly_the_frames(kind, pairs, garbage, rnd):
    start = 0x42 if kind == "pms5003" else 0xAA
    # Garbage that cannot hold a start byte, so it can contain no valid frame.
    clean = [bytes(b for b in g if b != start) for g in garbage]
    frames = [p if kind == "pms5003" else s for p, s in pairs]
    encode = encode_pms5003 if kind == "pms5003" else encode_sds011
    stream = b"".join(clean[i] + encode(f) for i, f in enumerate(frames)) + clean[-1]
    decoder = FrameDecoder(kind)  # type: ignore[arg-type]
    got = []
    pos = 0
    while pos < len(stream):
        step = rnd.randint(1, 64)
        got += decoder.feed(stream[pos : pos + step])
        pos += step
    assert got == frames
    assert decoder.checksum_errors == 0


def test_corrupted_stream_counts_errors_and_keeps_good_frames():
    rng = random.Random(7)
    frames = [Sds011Frame(pm25=i / 10, pm10=i / 5, device_id=i) for i in range(200)]
    chunks = []
    for i, f in enumerate(frames):
        raw = bytearray(encode_sds011(f))
        if i % 10 == 0:
            raw[4] ^= 0x55  # corrupt a data byte: checksum fails
        chunks.append(bytes(raw) + bytes(rng.randrange(0, 0xA0) for _ in range(rng.randrange(4))))
    decoder = FrameDecoder("sds011")
    got = decoder.feed(b"".join(chunks))
    assert got == [f for i, f in enumerate(frames) if i % 10]
    assert decoder.checksum_errors == 20
