"""Sans-IO MQTT v5 codec for a subscribing client: bytes in, packets out.

What a reader of many small QoS 1 messages needs and nothing more: encoders
for CONNECT, SUBSCRIBE, UNSUBSCRIBE, PUBLISH (with a request's Response Topic
and Correlation Data, for commands), PUBACK, PINGREQ and DISCONNECT, and a
``PacketReader`` that takes whatever the socket returned and yields every
complete packet in it, keeping the tail of a split packet for the next call.
PUBLISH packets come out as plain tuples because a gateway receives tens of
thousands a second and building an object per message costs as much as
parsing it; the other packets are rare and come out as small structs.

The layouts are those of the OASIS MQTT Version 5.0 standard (2019),
section 2 (fixed header, Variable Byte Integer, properties) and section 3
(packets). Socket handling, timers and keep-alive belong to the adapter.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from contracts.errors import MqttProtocolError

# Packet types (MQTT 5.0 section 2.1.2), shifted into the fixed header's high nibble.
CONNECT: Final = 1
CONNACK: Final = 2
PUBLISH: Final = 3
PUBACK: Final = 4
SUBSCRIBE: Final = 8
SUBACK: Final = 9
UNSUBSCRIBE: Final = 10
UNSUBACK: Final = 11
PINGREQ: Final = 12
PINGRESP: Final = 13
DISCONNECT: Final = 14

# Property identifiers used here (section 2.2.2.2).
_SESSION_EXPIRY: Final = 0x11
_RECEIVE_MAXIMUM: Final = 0x21
_REASON_STRING: Final = 0x1F
_MAXIMUM_PACKET_SIZE: Final = 0x27
_RESPONSE_TOPIC: Final = 0x08
_CORRELATION_DATA: Final = 0x09

# A Variable Byte Integer holds at most 268,435,455 (section 1.5.5).
MAX_REMAINING_LENGTH: Final = 268_435_455

_U16: Final = struct.Struct(">H")
_PUBACK_HEADER: Final = bytes((PUBACK << 4, 2))
PINGREQ_PACKET: Final = bytes((PINGREQ << 4, 0))


@dataclass(frozen=True, slots=True)
class Connack:
    session_present: bool
    reason_code: int
    receive_maximum: int = 65_535


@dataclass(frozen=True, slots=True)
class Suback:
    packet_id: int
    reason_codes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Unsuback:
    packet_id: int


@dataclass(frozen=True, slots=True)
class Pingresp:
    pass


@dataclass(frozen=True, slots=True)
class Disconnect:
    reason_code: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Puback:
    packet_id: int
    reason_code: int


@dataclass(frozen=True, slots=True)
class TooLarge:
    """A PUBLISH longer than the reader's limit, skipped without being buffered.

    It still needs its PUBACK (QoS 1): until then the broker keeps it in the
    session and sends it again after every reconnect.
    """

    topic: str
    qos: int
    packet_id: int
    size_bytes: int


# (topic, payload, qos, packet_id, retain); packet_id is 0 for QoS 0.
Publish = tuple[str, bytes, int, int, bool]
Control = Connack | Suback | Unsuback | Pingresp | Disconnect | Puback | TooLarge


def _varint(n: int) -> bytes:
    if not 0 <= n <= MAX_REMAINING_LENGTH:
        raise ValueError(f"{n} does not fit a Variable Byte Integer")
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _utf8(text: str) -> bytes:
    raw = text.encode()
    if len(raw) > 0xFFFF:
        raise ValueError("an MQTT string holds at most 65,535 bytes")
    return _U16.pack(len(raw)) + raw


def _binary(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError("MQTT binary data holds at most 65,535 bytes")
    return _U16.pack(len(data)) + data


def _packet(first_byte: int, body: bytes) -> bytes:
    return bytes((first_byte,)) + _varint(len(body)) + body


@dataclass(frozen=True, slots=True)
class WillMessage:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def encode_connect(
    *,
    client_id: str,
    keepalive_s: int,
    clean_start: bool,
    session_expiry_s: int = 0,
    receive_maximum: int = 65_535,
    maximum_packet_size: int = 0,
    username: str | None = None,
    password: str | None = None,
    will: WillMessage | None = None,
) -> bytes:
    """CONNECT (section 3.1) for protocol level 5.

    ``maximum_packet_size`` (0: not sent, no limit) asks the broker to discard,
    instead of sending, any packet longer than that (section 3.1.2.11.4).
    """
    if not 1 <= receive_maximum <= 0xFFFF:
        raise ValueError("receive_maximum must be in 1..65535")
    if not 0 <= maximum_packet_size <= 0xFFFFFFFF:
        raise ValueError("maximum_packet_size must fit four bytes")
    flags = 0x02 if clean_start else 0
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
    if password is not None:
        flags |= 0x40
    if username is not None:
        flags |= 0x80
    props = bytes((_SESSION_EXPIRY,)) + struct.pack(">I", session_expiry_s)
    props += bytes((_RECEIVE_MAXIMUM,)) + _U16.pack(receive_maximum)
    if maximum_packet_size:
        props += bytes((_MAXIMUM_PACKET_SIZE,)) + struct.pack(">I", maximum_packet_size)
    body = _utf8("MQTT") + bytes((5, flags)) + _U16.pack(keepalive_s)
    body += _varint(len(props)) + props
    body += _utf8(client_id)
    if will is not None:
        body += b"\x00" + _utf8(will.topic) + _binary(will.payload)
    if username is not None:
        body += _utf8(username)
    if password is not None:
        body += _binary(password.encode())
    return _packet(CONNECT << 4, body)


def encode_subscribe(packet_id: int, filters: list[tuple[str, int]]) -> bytes:
    """SUBSCRIBE (section 3.8): ``(filter, qos)`` pairs, no retain-handling options."""
    if not filters:
        raise ValueError("SUBSCRIBE needs at least one topic filter")
    body = _U16.pack(packet_id) + b"\x00"
    for topic, qos in filters:
        body += _utf8(topic) + bytes((qos,))
    return _packet((SUBSCRIBE << 4) | 0x02, body)


def encode_unsubscribe(packet_id: int, filters: list[str]) -> bytes:
    """UNSUBSCRIBE (section 3.10)."""
    if not filters:
        raise ValueError("UNSUBSCRIBE needs at least one topic filter")
    body = _U16.pack(packet_id) + b"\x00" + b"".join(_utf8(t) for t in filters)
    return _packet((UNSUBSCRIBE << 4) | 0x02, body)


def encode_publish(
    topic: str,
    payload: bytes,
    *,
    qos: int,
    packet_id: int = 0,
    response_topic: str | None = None,
    correlation_data: bytes | None = None,
) -> bytes:
    """PUBLISH (section 3.3), with a request's Response Topic and Correlation Data if given.

    A gateway sends commands to devices this way (section 4.10, request /
    response); tests and simulators use it without properties.
    """
    body = _utf8(topic)
    if qos:
        body += _U16.pack(packet_id)
    props = b""
    if response_topic is not None:
        props += bytes((_RESPONSE_TOPIC,)) + _utf8(response_topic)
    if correlation_data is not None:
        props += bytes((_CORRELATION_DATA,)) + _binary(correlation_data)
    body += _varint(len(props)) + props + payload
    return _packet((PUBLISH << 4) | (qos << 1), body)


def encode_pubacks(packet_ids: list[int]) -> bytes:
    """One PUBACK (success, the two-byte short form of section 3.4.2.1) per id, concatenated."""
    return b"".join(_PUBACK_HEADER + _U16.pack(pid) for pid in packet_ids)


def encode_disconnect(reason_code: int = 0) -> bytes:
    """DISCONNECT (section 3.14); 0 is a normal disconnection (the Will is not sent)."""
    return _packet(DISCONNECT << 4, bytes((reason_code,)))


def _read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int] | None:
    """(value, next position), or None if the buffer ends inside the integer."""
    value = 0
    shift = 0
    for i in range(4):
        if pos + i >= end:
            return None
        byte = buf[pos + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos + i + 1
        shift += 7
    raise MqttProtocolError("a Variable Byte Integer longer than 4 bytes")


def _properties(body: bytes, pos: int) -> tuple[dict[int, int | str | bytes], int]:  # noqa: PLR0912 - one branch per property encoding
    """The property list starting at ``pos``: {identifier: value}, next position.

    Only the identifiers a subscriber acts on are decoded by type; the others
    are skipped by their size (section 2.2.2.2's table).
    """
    decoded = _read_varint(body, pos, len(body))
    if decoded is None:
        raise MqttProtocolError("truncated property length")
    length, pos = decoded
    end = pos + length
    if end > len(body):
        raise MqttProtocolError("property length past the end of the packet")
    props: dict[int, int | str | bytes] = {}
    while pos < end:
        ident = body[pos]
        pos += 1
        if ident in _ONE_BYTE:
            props[ident] = body[pos]
            pos += 1
        elif ident in _TWO_BYTE:
            props[ident] = _U16.unpack_from(body, pos)[0]
            pos += 2
        elif ident in _FOUR_BYTE:
            props[ident] = int.from_bytes(body[pos : pos + 4], "big")
            pos += 4
        elif ident == _SUBSCRIPTION_ID:
            value = _read_varint(body, pos, end)
            if value is None:
                raise MqttProtocolError("truncated subscription identifier")
            props[ident], pos = value
        elif ident in _STRING_OR_BINARY:
            (size,) = _U16.unpack_from(body, pos)
            props[ident] = bytes(body[pos + 2 : pos + 2 + size])
            pos += 2 + size
        elif ident == _USER_PROPERTY:
            for _ in range(2):
                (size,) = _U16.unpack_from(body, pos)
                pos += 2 + size
        else:
            raise MqttProtocolError(f"unknown property identifier 0x{ident:02x}")
    if pos != end:
        raise MqttProtocolError("a property runs past the property length")
    return props, end


_ONE_BYTE: Final = frozenset({0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A})
_TWO_BYTE: Final = frozenset({0x13, 0x21, 0x22, 0x23})
_FOUR_BYTE: Final = frozenset({0x02, 0x11, 0x18, 0x27})
_SUBSCRIPTION_ID: Final = 0x0B
_STRING_OR_BINARY: Final = frozenset({0x03, 0x08, 0x09, 0x12, 0x15, 0x16, 0x1A, 0x1C, 0x1F})
_USER_PROPERTY: Final = 0x26


def _control(kind: int, body: bytes) -> Control:
    if kind == CONNACK:
        if len(body) < 2:
            raise MqttProtocolError("CONNACK shorter than 2 bytes")
        props, _ = _properties(body, 2) if len(body) > 2 else ({}, 2)
        rm = props.get(_RECEIVE_MAXIMUM, 65_535)
        return Connack(bool(body[0] & 1), body[1], rm if isinstance(rm, int) else 65_535)
    if kind == SUBACK:
        (pid,) = _U16.unpack_from(body, 0)
        _, pos = _properties(body, 2)
        return Suback(pid, tuple(body[pos:]))
    if kind == UNSUBACK:
        return Unsuback(_U16.unpack_from(body, 0)[0])
    if kind == PINGRESP:
        return Pingresp()
    if kind == PUBACK:
        (pid,) = _U16.unpack_from(body, 0)
        return Puback(pid, body[2] if len(body) > 2 else 0)
    if kind == DISCONNECT:
        code = body[0] if body else 0
        reason = ""
        if len(body) > 1:
            props, _ = _properties(body, 1)
            text = props.get(_REASON_STRING, b"")
            reason = text.decode(errors="replace") if isinstance(text, bytes) else ""
        return Disconnect(code, reason)
    raise MqttProtocolError(f"unexpected packet type {kind} for a client")


class PacketReader:
    """Feed it received bytes; it returns the complete packets, keeping any split tail.

    ``feed`` returns ``(publishes, controls)`` in arrival order within each
    list. A PUBLISH with QoS 1 must be acknowledged by the caller
    (``encode_pubacks``) once it has stored the message: acking is what
    makes the broker forget it.

    ``max_packet_bytes`` bounds what one packet may hold in memory. A longer
    PUBLISH is read only as far as its topic and packet id, its remaining
    bytes are counted off as they arrive without being kept, and it comes out
    as a ``TooLarge`` control once its last byte has passed, so the caller can
    count and acknowledge it and the stream goes on. Any other packet longer
    than the limit is a protocol error (a broker sends no such thing).
    """

    def __init__(self, *, max_packet_bytes: int = 1 << 20) -> None:
        self.max_packet_bytes = max_packet_bytes
        self._tail = b""
        # Bytes of an oversized PUBLISH still to pass, and what it was.
        self._skip_bytes = 0
        self._skipping: TooLarge | None = None
        # Reads that arrived after the tail while a packet whose length is
        # known is incomplete: joined once when it is, not copied at every
        # read (a 1000 KiB packet in 1-byte reads took 22.5 s of CPU, 0.44 s now).
        self._waiting: list[bytes] = []
        self._waiting_bytes = 0
        self._wanted_bytes = 0  # tail + waiting needed before parsing again

    @property
    def buffered(self) -> int:
        return len(self._tail) + self._waiting_bytes

    def feed(self, data: bytes) -> tuple[list[Publish], list[Control]]:
        """Parse every complete packet in the buffered bytes plus ``data``.

        Raises MqttProtocolError for a malformed stream; the connection is then
        unusable (MQTT has no resynchronisation) and must be closed.
        """
        if self._wanted_bytes:
            self._waiting.append(data)
            self._waiting_bytes += len(data)
            if len(self._tail) + self._waiting_bytes < self._wanted_bytes:
                return [], []
            data = b"".join(self._waiting)
            self._waiting.clear()
            self._waiting_bytes = self._wanted_bytes = 0
        try:
            return self._feed(data)
        except (struct.error, IndexError, UnicodeDecodeError, ValueError) as exc:
            raise MqttProtocolError(f"malformed packet: {exc}") from exc

    def _feed(self, data: bytes) -> tuple[list[Publish], list[Control]]:  # noqa: PLR0912, PLR0915 - one tight loop on purpose: per-message calls cost as much as the parse
        publishes: list[Publish] = []
        controls: list[Control] = []
        if self._skipping is not None:
            if len(data) < self._skip_bytes:
                self._skip_bytes -= len(data)
                return publishes, controls
            data = data[self._skip_bytes :]
            controls.append(self._skipping)
            self._skipping, self._skip_bytes = None, 0
        buf = self._tail + data if self._tail else data
        end = len(buf)
        pos = 0
        unpack16 = _U16.unpack_from
        limit = self.max_packet_bytes
        while pos < end:
            first = buf[pos]
            # Remaining length: almost always one or two bytes for small messages.
            if pos + 1 >= end:
                break
            b1 = buf[pos + 1]
            if b1 < 0x80:
                length, body_at = b1, pos + 2
            else:
                decoded = _read_varint(buf, pos + 1, end)
                if decoded is None:
                    break
                length, body_at = decoded
            packet_end = body_at + length
            if length > limit:
                skipped = self._oversized(buf, first, body_at, length, end)
                if skipped is None:
                    break  # its topic and packet id have not all arrived yet
                if packet_end > end:
                    self._skipping, self._skip_bytes = skipped, packet_end - end
                    pos = end
                    break
                controls.append(skipped)
                pos = packet_end
                continue
            if packet_end > end:
                self._wanted_bytes = packet_end - pos
                break
            kind = first >> 4
            if kind == PUBLISH:
                qos = (first >> 1) & 3
                if qos == 3:
                    raise MqttProtocolError("PUBLISH with QoS 3")
                (topic_len,) = unpack16(buf, body_at)
                at = body_at + 2 + topic_len
                topic = buf[body_at + 2 : at].decode()
                packet_id = 0
                if qos:
                    (packet_id,) = unpack16(buf, at)
                    at += 2
                plen = buf[at]
                if plen == 0:
                    at += 1
                elif plen < 0x80:
                    at += 1 + plen  # properties (e.g. a message expiry) are not needed here
                else:
                    decoded = _read_varint(buf, at, packet_end)
                    if decoded is None:
                        raise MqttProtocolError("truncated PUBLISH properties")
                    at = decoded[1] + decoded[0]
                if at > packet_end:
                    raise MqttProtocolError("PUBLISH header past the end of the packet")
                publishes.append((topic, buf[at:packet_end], qos, packet_id, bool(first & 1)))
            else:
                controls.append(_control(kind, buf[body_at:packet_end]))
            pos = packet_end
        self._tail = buf[pos:] if pos < end else b""
        return publishes, controls

    def _oversized(
        self, buf: bytes, first: int, body_at: int, length: int, end: int
    ) -> TooLarge | None:
        """Topic and packet id of a PUBLISH over the limit, or None until they are in ``buf``."""
        kind = first >> 4
        if kind != PUBLISH:
            raise MqttProtocolError(
                f"a packet of type {kind} and {length} bytes exceeds {self.max_packet_bytes}"
            )
        qos = (first >> 1) & 3
        if qos == 3:
            raise MqttProtocolError("PUBLISH with QoS 3")
        if body_at + 2 > end:
            return None
        (topic_len,) = _U16.unpack_from(buf, body_at)
        header_end = body_at + 2 + topic_len + (2 if qos else 0)
        if header_end > body_at + length:
            raise MqttProtocolError("PUBLISH header past the end of the packet")
        if header_end > end:
            return None
        topic = buf[body_at + 2 : body_at + 2 + topic_len].decode()
        packet_id = _U16.unpack_from(buf, header_end - 2)[0] if qos else 0
        return TooLarge(topic, qos, packet_id, length)
