"""The sans-IO MQTT v5 codec: packets by the standard's layouts, split streams, bad bytes.

The gateway tests run the same codec against a real Mosquitto; these check
the byte layouts (OASIS MQTT 5.0, sections 2 and 3) and the reader's handling
of arbitrary splits and malformed streams.
"""

from __future__ import annotations

import contextlib
import struct
import time
from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts import mqttcodec as mc
from contracts.errors import MqttProtocolError

topics = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\x00+#"),
    min_size=1,
    max_size=40,
)
messages = st.tuples(
    topics, st.binary(max_size=300), st.sampled_from([0, 1]), st.integers(1, 65535)
)


def publish_bytes(topic: str, payload: bytes, qos: int, packet_id: int) -> bytes:
    return mc.encode_publish(topic, payload, qos=qos, packet_id=packet_id)


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, b"\x00"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (16_383, b"\xff\x7f"),
        (16_384, b"\x80\x80\x01"),
        (2_097_151, b"\xff\xff\x7f"),
        (2_097_152, b"\x80\x80\x80\x01"),
        (268_435_455, b"\xff\xff\xff\x7f"),
    ],
)
def test_variable_byte_integer_matches_the_standards_table(value, encoded):
    # MQTT 5.0 section 1.5.5, table 1-1.
    assert mc._varint(value) == encoded
    assert mc._read_varint(encoded, 0, len(encoded)) == (value, len(encoded))
    assert mc._read_varint(encoded[:-1], 0, len(encoded) - 1) is None


def test_variable_byte_integer_limits():
    with pytest.raises(ValueError, match="Variable Byte Integer"):
        mc._varint(268_435_456)
    with pytest.raises(MqttProtocolError, match="longer than 4 bytes"):
        mc._read_varint(b"\xff\xff\xff\xff\x01", 0, 5)


def test_publish_qos1_layout():
    packet = mc.encode_publish("d/x/up", b"{}", qos=1, packet_id=258)
    # fixed header 0x32, remaining length 13, topic "d/x/up", packet id, no properties, payload
    assert packet == b"\x32\x0d\x00\x06d/x/up\x01\x02\x00{}"


def test_puback_and_pingreq_layouts():
    assert mc.encode_pubacks([1, 0x1234]) == b"\x40\x02\x00\x01\x40\x02\x12\x34"
    assert mc.PINGREQ_PACKET == b"\xc0\x00"
    assert mc.encode_disconnect() == b"\xe0\x01\x00"


def test_connect_layout_with_credentials_and_persistent_session():
    packet = mc.encode_connect(
        client_id="gw-1-site",
        keepalive_s=30,
        clean_start=False,
        session_expiry_s=3600,
        receive_maximum=2000,
        username="u",
        password="p",
    )
    assert packet[0] == 0x10
    body = packet[2:]  # remaining length fits one byte here
    assert packet[1] == len(body)
    assert body[:6] == b"\x00\x04MQTT"
    assert body[6] == 5  # protocol level
    assert body[7] == 0x80 | 0x40  # username and password; clean start off
    assert struct.unpack(">H", body[8:10])[0] == 30
    # properties: length 8 = session expiry (0x11, 4 bytes) + receive maximum (0x21, 2 bytes)
    assert body[10:19] == b"\x08\x11\x00\x00\x0e\x10\x21\x07\xd0"
    assert body[19:] == b"\x00\x09gw-1-site\x00\x01u\x00\x01p"


def test_connect_with_will_and_clean_start():
    will = mc.WillMessage(topic="t/s", payload=b"offline", qos=1, retain=True)
    packet = mc.encode_connect(client_id="c", keepalive_s=10, clean_start=True, will=will)
    flags = packet[2 + 7]
    assert flags == 0x02 | 0x04 | 0x08 | 0x20
    assert packet.endswith(b"\x00\x00\x03t/s\x00\x07offline")


def test_subscribe_and_unsubscribe_layouts():
    assert mc.encode_subscribe(7, [("a/b", 1)]) == b"\x82\x09\x00\x07\x00\x00\x03a/b\x01"
    assert mc.encode_unsubscribe(8, ["a/b"]) == b"\xa2\x08\x00\x08\x00\x00\x03a/b"
    with pytest.raises(ValueError, match="at least one"):
        mc.encode_subscribe(1, [])


def test_reader_returns_publishes_and_controls():
    reader = mc.PacketReader()
    stream = (
        b"\x20\x06\x00\x00\x03\x21\x03\xe8"  # CONNACK, success, receive maximum 1000
        + mc.encode_publish("d/a/up", b"x", qos=1, packet_id=5)
        + b"\x90\x05\x00\x07\x00\x01\x87"  # SUBACK id 7: granted QoS 1, refused 0x87
        + b"\xd0\x00"  # PINGRESP
        + mc.encode_publish("d/a/status", b"online", qos=0)
    )
    publishes, controls = reader.feed(stream)
    assert publishes == [("d/a/up", b"x", 1, 5, False), ("d/a/status", b"online", 0, 0, False)]
    assert controls == [
        mc.Connack(session_present=False, reason_code=0, receive_maximum=1000),
        mc.Suback(7, (1, 0x87)),
        mc.Pingresp(),
    ]
    assert reader.buffered == 0


def test_publish_properties_are_skipped():
    # PUBLISH QoS 1, retain, with a message expiry (0x02) and a user property (0x26).
    props = b"\x02\x00\x00\x00\x3c" + b"\x26\x00\x01k\x00\x01v"
    body = b"\x00\x03a/b" + b"\x00\x09" + bytes((len(props),)) + props + b"payload"
    packet = bytes((0x33, len(body))) + body
    publishes, _ = mc.PacketReader().feed(packet)
    assert publishes == [("a/b", b"payload", 1, 9, True)]


def test_disconnect_and_long_puback_from_the_broker():
    reason = b"\x1f\x00\x04gone"
    packet = b"\xe0" + bytes((2 + len(reason),)) + b"\x8e" + bytes((len(reason),)) + reason
    _, controls = mc.PacketReader().feed(packet + b"\x40\x03\x00\x02\x97")
    assert controls == [mc.Disconnect(0x8E, "gone"), mc.Puback(2, 0x97)]


@settings(max_examples=200)
@given(st.lists(messages, min_size=1, max_size=30), st.data())
def test_any_split_of_a_stream_yields_the_same_packets(batch, data):
    stream = b"".join(publish_bytes(*m) for m in batch)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    reader = mc.PacketReader()
    got: list[mc.Publish] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        publishes, controls = reader.feed(stream[start:cut])
        assert controls == []
        got.extend(publishes)
        start = cut
    expected = [(t, p, q, pid if q else 0, False) for t, p, q, pid in batch]
    assert got == expected
    assert reader.buffered == 0


def test_large_payload_uses_a_multi_byte_length():
    payload = bytes(range(256)) * 100
    packet = mc.encode_publish("t", payload, qos=1, packet_id=1)
    assert packet[1] & 0x80  # the remaining length spans several bytes
    reader = mc.PacketReader()
    assert reader.feed(packet[:3]) == ([], [])
    publishes, _ = reader.feed(packet[3:])
    assert publishes == [("t", payload, 1, 1, False)]


@pytest.mark.parametrize(
    ("stream", "fragment"),
    [
        (b"\x36\x05\x00\x01a\x00\x00", "QoS 3"),
        (b"\x30\xff\xff\xff\xff\x01", "longer than 4 bytes"),
        (b"\x10\x02\x00\x00", "unexpected packet type 1"),
        (b"\x30\x05\x00\x02\xff\xfe\x00", "malformed packet"),  # topic not UTF-8
        (b"\x30\x03\x00\x09a", "malformed packet"),  # topic longer than the packet
        (b"\x90\x04\x00\x01\x05\x01", "property length past"),
        (b"\x20\x05\x00\x00\x02\x7f\x00", "unknown property"),
    ],
)
def test_malformed_streams_raise_protocol_errors(stream, fragment):
    with pytest.raises(MqttProtocolError, match=fragment):
        mc.PacketReader().feed(stream)


def test_a_control_packet_claiming_more_than_the_limit_is_refused_before_buffering():
    reader = mc.PacketReader(max_packet_bytes=1000)
    with pytest.raises(MqttProtocolError, match="exceeds 1000"):
        reader.feed(b"\x90\xe9\x07")  # a SUBACK announcing 1001 bytes


def test_connect_announces_a_maximum_packet_size():
    packet = mc.encode_connect(client_id="c", keepalive_s=30, clean_start=True)
    assert b"\x27" not in packet[10:20]
    packet = mc.encode_connect(
        client_id="c", keepalive_s=30, clean_start=True, maximum_packet_size=16 << 20
    )
    # Properties: session expiry (5 bytes), receive maximum (3), maximum packet size (5).
    assert packet[12:26] == b"\x0d\x11\x00\x00\x00\x00\x21\xff\xff\x27\x01\x00\x00\x00"
    with pytest.raises(ValueError, match="four bytes"):
        mc.encode_connect(client_id="c", keepalive_s=1, clean_start=True, maximum_packet_size=-1)


LIMIT = 1000


def feed_in_pieces(reader: mc.PacketReader, stream: bytes, cuts: list[int]):
    publishes: list[mc.Publish] = []
    controls: list[mc.Control] = []
    start = 0
    for cut in [*sorted(cuts), len(stream)]:
        p, c = reader.feed(stream[start:cut])
        publishes.extend(p)
        controls.extend(c)
        start = max(start, cut)
    return publishes, controls


@pytest.mark.parametrize("piece", [1, 2, 7, 1000, 1001, 5000, 1 << 20])
def test_an_oversized_publish_is_skipped_reported_and_the_stream_goes_on(piece):
    big = mc.encode_publish("d/big/up", b"x" * 5000, qos=1, packet_id=77)
    stream = (
        mc.encode_publish("d/a/up", b"before", qos=1, packet_id=1)
        + big
        + mc.encode_publish("d/a/up", b"after", qos=1, packet_id=2)
    )
    reader = mc.PacketReader(max_packet_bytes=LIMIT)
    cuts = list(range(piece, len(stream), piece))
    publishes, controls = feed_in_pieces(reader, stream, cuts)
    assert publishes == [("d/a/up", b"before", 1, 1, False), ("d/a/up", b"after", 1, 2, False)]
    assert controls == [mc.TooLarge("d/big/up", 1, 77, len(big) - 3)]
    assert reader.buffered == 0


def test_skipping_never_buffers_the_oversized_payload():
    reader = mc.PacketReader(max_packet_bytes=LIMIT)
    big = mc.encode_publish("d/big/up", b"x" * 8_000_000, qos=0)
    most = 0
    for start in range(0, len(big), 65_536):
        assert reader.feed(big[start : start + 65_536])[0] == []
        most = max(most, reader.buffered)
    assert most < 100  # at most the topic header, never the payload
    assert reader.feed(b"\xd0\x00") == ([], [mc.Pingresp()])


@pytest.mark.parametrize(
    ("stream", "fragment"),
    [
        (b"\x36\xe9\x07\x00\x01a", "QoS 3"),
        (b"\x32\xe9\x07\x10\x00", "header past the end"),  # topic longer than the packet
        (b"\x30\xe9\x07\x00\x02\xff\xfe", "malformed packet"),  # topic not UTF-8
    ],
)
def test_an_oversized_publish_with_a_bad_header_is_a_protocol_error(stream, fragment):
    with pytest.raises(MqttProtocolError, match=fragment):
        mc.PacketReader(max_packet_bytes=LIMIT).feed(stream)


small_or_big = st.tuples(
    topics,
    st.one_of(st.binary(max_size=300), st.integers(LIMIT, 4 * LIMIT).map(lambda n: b"y" * n)),
    st.sampled_from([0, 1]),
    st.integers(1, 65535),
)


@settings(max_examples=300)
@given(st.lists(small_or_big, min_size=1, max_size=12), messages, st.data())
def test_any_split_of_a_stream_with_oversized_publishes_decodes_the_rest(batch, last, data):
    stream = b"".join(publish_bytes(*m) for m in [*batch, last])
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    reader = mc.PacketReader(max_packet_bytes=LIMIT)
    publishes, controls = feed_in_pieces(reader, stream, cuts)
    expected_publishes, expected_controls = [], []
    for t, p, q, pid in [*batch, last]:
        packet = publish_bytes(t, p, q, pid)
        remaining, _ = cast(tuple[int, int], mc._read_varint(packet, 1, len(packet)))
        if remaining > LIMIT:
            expected_controls.append(mc.TooLarge(t, q, pid if q else 0, remaining))
        else:
            expected_publishes.append((t, p, q, pid if q else 0, False))
    assert publishes == expected_publishes
    assert controls == expected_controls
    assert publishes[-1] == (last[0], last[1], last[2], last[3] if last[2] else 0, False)
    assert reader.buffered == 0


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_protocol_errors(stream):
    with contextlib.suppress(MqttProtocolError):
        mc.PacketReader().feed(stream)


def _trickle_s_per_byte(payload_bytes: int) -> float:
    """Seconds per byte to read one PUBLISH delivered one byte per ``feed`` (best of 3)."""
    packet = mc.encode_publish("d/aq-1/up", b"x" * payload_bytes, qos=1, packet_id=1)
    chunks = [packet[i : i + 1] for i in range(len(packet))]
    best = float("inf")
    for _ in range(3):
        reader = mc.PacketReader()
        started = time.perf_counter()
        for chunk in chunks:
            publishes, _ = reader.feed(chunk)
        best = min(best, time.perf_counter() - started)
        assert len(publishes) == 1
        assert reader.buffered == 0
    return best / len(packet)


def test_a_packet_trickling_in_costs_linear_time():
    """A large packet arriving in tiny reads must not be copied again at every read.

    Each feed used to join the kept tail with the new bytes and parse the
    header again: a 1000 KiB packet read one byte at a time took 22.5 s of
    CPU on the gateway's event loop (0.44 s since). The per-byte cost then
    grew with the packet (3.7x from 16 KiB to 256 KiB); now it stays flat
    (1.3x). A ratio, not an absolute time: the machine may be loaded.
    """
    small = _trickle_s_per_byte(16 * 1024)
    large = _trickle_s_per_byte(256 * 1024)
    assert large / small < 2, f"{large / small:.1f}x the per-byte cost at 16x the size"
