"""Host commands and SDS011 replies: the datasheets' examples, round trips, noisy streams."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contracts.frames import (
    DecodeResult,
    FrameDecoder,
    Sds011Frame,
    Sds011Reply,
    decode_pms5003,
    decode_sds011,
    encode_sds011,
    encode_sds011_reply,
)
from contracts.sensorcommands import (
    PMS5003_CHANGE_MODE,
    PMS5003_READ_PASSIVE,
    PMS5003_SLEEP_WAKE,
    Pms5003Command,
    Sds011Command,
    decode_pms5003_commands,
    decode_sds011_commands,
    encode_pms5003_command,
    encode_sds011_command,
    pms5003_command,
    pms5003_read_passive,
    pms5003_set_passive,
    pms5003_set_sleep,
    sds011_command,
    sds011_query_data,
    sds011_set_reporting_mode,
    sds011_set_working,
    sds011_set_working_period,
)

A160 = 0xA160  # the sensor id of the control protocol's examples


def h(text: str) -> bytes:
    return bytes.fromhex(text)


# "Laser Dust Sensor Control Protocol" V1.3, section 3: the examples' commands.
SDS011_COMMAND_EXAMPLES = [
    # 1) set the sensor with ID A160 to report query mode
    (
        sds011_set_reporting_mode("query", device_id=A160),
        "AA B4 02 01 01" + " 00" * 10 + " A1 60 05 AB",
    ),
    # 1) query the current mode (all sensors)
    (sds011_command(2), "AA B4 02" + " 00" * 12 + " FF FF 00 AB"),
    # 2) query data, all sensors and A160
    (sds011_query_data(), "AA B4 04" + " 00" * 12 + " FF FF 02 AB"),
    (sds011_query_data(device_id=A160), "AA B4 04" + " 00" * 12 + " A1 60 05 AB"),
    # 4) sleep, work, query the working mode of A160
    (sds011_set_working(False, device_id=A160), "AA B4 06 01 00" + " 00" * 10 + " A1 60 08 AB"),
    (sds011_set_working(True, device_id=A160), "AA B4 06 01 01" + " 00" * 10 + " A1 60 09 AB"),
    (sds011_command(6, device_id=A160), "AA B4 06" + " 00" * 12 + " A1 60 07 AB"),
    # 5) working period 1 minute, 0 (continuous), query it
    (sds011_set_working_period(1, device_id=A160), "AA B4 08 01 01" + " 00" * 10 + " A1 60 0B AB"),
    (sds011_set_working_period(0, device_id=A160), "AA B4 08 01 00" + " 00" * 10 + " A1 60 0A AB"),
    (sds011_command(8, device_id=A160), "AA B4 08" + " 00" * 12 + " A1 60 09 AB"),
    # 6) firmware version of A160
    (sds011_command(7, device_id=A160), "AA B4 07" + " 00" * 12 + " A1 60 08 AB"),
]

# The same section's replies of sensor A160: (reply bytes, command, data bytes 2-4).
SDS011_REPLY_EXAMPLES = [
    ("AA C5 02 00 00 00 A1 60 03 AB", 2, "00 00 00"),  # in active mode
    ("AA C5 02 00 01 00 A1 60 04 AB", 2, "00 01 00"),  # in query mode
    ("AA C5 02 01 01 00 A1 60 05 AB", 2, "01 01 00"),  # set to query mode
    ("AA C5 06 01 00 00 A1 60 08 AB", 6, "01 00 00"),  # set to sleep
    ("AA C5 06 01 01 00 A1 60 09 AB", 6, "01 01 00"),  # set to work
    ("AA C5 06 00 01 00 A1 60 08 AB", 6, "00 01 00"),  # is working
    ("AA C5 06 00 00 00 A1 60 07 AB", 6, "00 00 00"),  # is sleeping
    ("AA C5 08 01 01 00 A1 60 0B AB", 8, "01 01 00"),  # period set to 1 minute
    ("AA C5 08 01 00 00 A1 60 0A AB", 8, "01 00 00"),  # period set to continuous
    ("AA C5 08 00 02 00 A1 60 0B AB", 8, "00 02 00"),  # period is 2 minutes
    ("AA C5 07 0F 07 0A A1 60 28 AB", 7, "0F 07 0A"),  # firmware 15-7-10
]

# PMS5003 data manual V2.3, appendix II: CMD, DATAH/DATAL, LRC = sum of the 5 bytes before.
PMS5003_COMMAND_EXAMPLES = [
    (pms5003_set_passive(True), "42 4D E1 00 00 01 70"),
    (pms5003_set_passive(False), "42 4D E1 00 01 01 71"),
    (pms5003_read_passive(), "42 4D E2 00 00 01 71"),
    (pms5003_set_sleep(True), "42 4D E4 00 00 01 73"),
    (pms5003_set_sleep(False), "42 4D E4 00 01 01 74"),
]


@pytest.mark.parametrize(("encoded", "expected"), SDS011_COMMAND_EXAMPLES)
def test_sds011_commands_match_the_protocols_examples(encoded: bytes, expected: str) -> None:
    assert encoded == h(expected)
    (command,) = decode_sds011_commands(encoded).commands
    assert encode_sds011_command(command) == encoded  # type: ignore[arg-type]


@pytest.mark.parametrize(("raw", "command", "data"), SDS011_REPLY_EXAMPLES)
def test_sds011_replies_of_the_protocol_decode(raw: str, command: int, data: str) -> None:
    reply = Sds011Reply(command=command, data=h(data), device_id=A160)
    assert decode_sds011(h(raw)) == DecodeResult(frames=[], consumed=10, replies=[reply])
    assert encode_sds011_reply(reply) == h(raw)


@pytest.mark.parametrize(("encoded", "expected"), PMS5003_COMMAND_EXAMPLES)
def test_pms5003_commands_match_the_manual(encoded: bytes, expected: str) -> None:
    assert encoded == h(expected)
    (command,) = decode_pms5003_commands(encoded).commands
    assert encode_pms5003_command(command) == encoded  # type: ignore[arg-type]


def test_encoders_refuse_what_the_documents_do_not_allow() -> None:
    with pytest.raises(ValueError, match=r"outside 0\.\.30"):
        sds011_set_working_period(31)
    with pytest.raises(ValueError, match="at most 12"):
        sds011_command(2, bytes(13))
    with pytest.raises(ValueError, match="not 16 bits"):
        sds011_query_data(device_id=0x10000)
    with pytest.raises(ValueError, match="not in the manual"):
        pms5003_command(0xE3)
    with pytest.raises(ValueError, match="3 data bytes"):
        encode_sds011_reply(Sds011Reply(command=6, data=b"\x01", device_id=1))


@given(
    command=st.integers(0, 255),
    args=st.binary(min_size=12, max_size=12),
    device_id=st.integers(0, 0xFFFF),
)
def test_sds011_command_round_trip(command: int, args: bytes, device_id: int) -> None:
    sent = Sds011Command(command=command, args=args, device_id=device_id)
    raw = encode_sds011_command(sent)
    assert len(raw) == 19
    assert decode_sds011_commands(raw).commands == [sent]


@given(
    command=st.sampled_from([PMS5003_CHANGE_MODE, PMS5003_READ_PASSIVE, PMS5003_SLEEP_WAKE]),
    data=st.integers(0, 0xFFFF),
)
def test_pms5003_command_round_trip(command: int, data: int) -> None:
    sent = Pms5003Command(command=command, data=data)
    assert decode_pms5003_commands(encode_pms5003_command(sent)).commands == [sent]


@given(
    command=st.integers(0, 255),
    data=st.binary(min_size=3, max_size=3),
    device_id=st.integers(0, 0xFFFF),
    noise=st.binary(max_size=40),
    cut=st.integers(0, 200),
)
def test_replies_and_frames_through_a_noisy_split_stream(
    command: int, data: bytes, device_id: int, noise: bytes, cut: int
) -> None:
    reply = Sds011Reply(command=command, data=data, device_id=device_id)
    frame = Sds011Frame(pm25=12.3, pm10=45.6, device_id=device_id)
    stream = noise + encode_sds011_reply(reply) + encode_sds011(frame) + noise
    whole = decode_sds011(stream)
    assert reply in whole.replies
    assert frame in whole.frames
    assert whole.consumed == 10 * (len(whole.frames) + len(whole.replies)) + whole.garbage_bytes
    decoder = FrameDecoder("sds011")
    cut = min(cut, len(stream))
    first, second = decoder.feed_all(stream[:cut]), decoder.feed_all(stream[cut:])
    assert first[0] + second[0] == whole.frames
    assert first[1] + second[1] == whole.replies
    assert decoder.replies == len(whole.replies)


def test_a_partial_reply_then_a_frame_resynchronises() -> None:
    reply = h("AA C5 06 01 00 00 A1 60 08 AB")
    frame = encode_sds011(Sds011Frame(pm25=1.0, pm10=2.0, device_id=A160))
    # The reply's last 4 bytes lost: the frame after it must still be found.
    result = decode_sds011(reply[:6] + frame)
    assert result.frames == [Sds011Frame(pm25=1.0, pm10=2.0, device_id=A160)]
    assert result.replies == []
    assert result.length_errors + result.checksum_errors >= 1
    assert result.consumed == 6 + 10


def test_bad_replies_count_as_errors_like_bad_frames() -> None:
    good = h("AA C5 08 01 01 00 A1 60 0B AB")
    bad_sum = bytearray(good)
    bad_sum[8] ^= 0xFF
    result = decode_sds011(bytes(bad_sum))
    assert (result.replies, result.checksum_errors, result.length_errors) == ([], 1, 0)
    bad_tail = bytearray(good)
    bad_tail[9] = 0x00
    result = decode_sds011(bytes(bad_tail))
    assert (result.replies, result.checksum_errors, result.length_errors) == ([], 0, 1)
    # Garbage that merely starts like a reply is garbage.
    assert decode_sds011(b"\xaa\xc5\x00").replies == []


def test_feed_keeps_returning_only_frames() -> None:
    decoder = FrameDecoder("sds011")
    frame = Sds011Frame(pm25=3.0, pm10=4.0, device_id=7)
    got = decoder.feed(h("AA C5 06 01 00 00 A1 60 08 AB") + encode_sds011(frame))
    assert got == [frame]
    assert (decoder.frames, decoder.replies, decoder.garbage_bytes) == (1, 1, 0)


def test_pms5003_undocumented_answer_is_a_length_error() -> None:
    # 42 4D 00 04 E1 00 01 74: what sensors send after 0xE1, not in the manual.
    result = decode_pms5003(h("42 4D 00 04 E1 00 01 74"))
    assert result.frames == []
    assert result.length_errors == 1


def test_malformed_commands_are_skipped_and_the_next_found() -> None:
    good = sds011_set_working(False)
    bad = bytearray(good)
    bad[17] ^= 0x01  # checksum
    truncated = good[:11]
    result = decode_sds011_commands(bytes(bad) + truncated + good)
    assert result.commands == [Sds011Command(command=6, args=b"\x01" + bytes(11))]
    assert result.checksum_errors + result.length_errors >= 2
    assert result.consumed == len(bad) + len(truncated) + len(good)
    pms = decode_pms5003_commands(b"\x42\x4d\xe4\x00\x00\x01\x74" + pms5003_set_sleep(True))
    assert pms.commands == [Pms5003Command(command=PMS5003_SLEEP_WAKE, data=0)]
    assert pms.checksum_errors == 1
