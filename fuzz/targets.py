"""One harness per decoder that takes bytes from outside: bytes in, declared errors only.

Each target is a function of one ``bytes`` argument. It runs the decoder and
lets ``InputError`` (the project's tree for bad input, ``MqttProtocolError``
included) pass where the decoder declares it; any other exception escapes to
the fuzzer as a finding. On what decodes, cheap invariants are checked and a
broken one raises ``InvariantError``:

- ``frames``: ``consumed == (frames + replies) * frame_bytes + garbage``, the
  kept tail is shorter than a frame, each frame and SDS011 reply re-encodes to
  bytes of the stream, and ``FrameDecoder`` fed in two pieces finds what one
  decode of the whole finds.
- ``mqtt``: a stream fed to ``PacketReader`` in two pieces, or in reads of
  1-16 bytes, yields what it yields in one; a PUBLISH built by
  ``encode_publish`` reads back unchanged.
- ``uplink``: the fast path of ``decode_device_uplink`` accepts only what the
  detailed checks accept, with the same result; decode(encode(x)) == x.
- ``status``, ``state``, ``ack``, ``config``, ``batch``: decode(encode(x)) ==
  x (as bytes for batches and states, which may hold NaN); every block of an
  accepted batch passes ``check_block_rows`` without raising.
- ``command``, ``gateway_commands``, ``command_reports``, ``device_answer``:
  the command downlink's decoders (``contracts.commands``) round-trip.
- ``ingest_batch`` / ``ingest_state``: ingest's ``prepare_item`` /
  ``prepare_state`` classify anything without raising; every row of a good
  batch is stored or rejected, and its COPY stream encodes.
- ``topics``: topic parsers raise only InputError and round-trip.
- ``batch_fields`` / ``state_fields``: the checks of ``batch`` and
  ``ingest_batch`` (``state`` and ``ingest_state``) on messages built by the
  real encoders from the fuzzer's choices, to reach the checks behind the
  syntax (column lengths, indexes, per-row values, counters).

The first byte or two of an input choose a variant (device type, topic,
split point) so that one corpus explores them all. Everything here is pure;
running the fuzzer is ``fuzz.__main__``'s.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Final, TypeVar

import msgspec
import numpy as np

from contracts import catalog
from contracts.commands import (
    decode_command,
    decode_command_reports,
    decode_device_answer,
    decode_gateway_commands,
    encode_command,
    encode_command_reports,
    encode_device_answer,
    encode_gateway_commands,
)
from contracts.errors import InputError, MqttProtocolError
from contracts.frames import (
    PMS5003_FRAME_BYTES,
    SDS011_FRAME_BYTES,
    FrameDecoder,
    Pms5003Frame,
    decode_pms5003,
    decode_sds011,
    encode_pms5003,
    encode_sds011,
    encode_sds011_reply,
)
from contracts.messages import (
    DEVICE_PAYLOAD_MAX_BYTES,
    Batch,
    ReadingBlock,
    _accept_uplink,
    _check_uplink,
    check_block_rows,
    decode_ack,
    decode_batch,
    decode_device_status,
    decode_device_uplink,
    decode_gateway_config,
    decode_gateway_state,
    encode_ack,
    encode_batch,
    encode_device_status,
    encode_device_uplink,
    encode_gateway_config,
    encode_gateway_state,
)
from contracts.mqttcodec import PacketReader, encode_publish
from contracts.topics import (
    device_uplink_topic,
    gateway_topic,
    parse_device_topic,
    parse_gateway_topic,
)
from ingest.copyformat import encode_copy_binary
from ingest.prepare import GoodBatch, GoodState, prepare_item, prepare_state
from ingest.writer import copy_columns

# 2026-01-01T00:00:00Z: every target decodes as if it were now, so that the
# seeds (stamped around it) stay inside the time windows on any day.
NOW_MS: Final = 1_767_225_600_000
GATEWAY_ID: Final = "gw-1"
OTHER_GATEWAY_ID: Final = "gw-2"
# Device types by index (the first byte of an uplink input picks one); the
# last entry is not in the catalog.
DEVICE_TYPE_NAMES: Final = (*sorted(catalog.DEVICE_TYPES), "no_such_type")
# (topic, prefix) pairs for ingest's targets; the first byte picks one. The
# wrong kind, the wrong prefix and a bad gateway id are all in there.
BATCH_TOPICS: Final = (
    (f"hub/v1/gw/{GATEWAY_ID}/batch", ""),
    (f"site/a/hub/v1/gw/{GATEWAY_ID}/batch", "site/a"),
    (f"hub/v1/gw/{OTHER_GATEWAY_ID}/batch", ""),
    (f"hub/v1/gw/{GATEWAY_ID}/state", ""),
    ("hub/v1/gw/GW+1/batch", ""),
    (f"hub/v1/gw/{GATEWAY_ID}/batch", "site/a"),
)
STATE_TOPICS: Final = tuple((t.replace("/batch", "/state"), p) for t, p in BATCH_TOPICS)
PREFIXES: Final = ("", "site/a", "x")


_M = TypeVar("_M")


class InvariantError(AssertionError):
    """A decoder broke one of its own promises; only the fuzzer raises this."""


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise InvariantError(what)


def _split(data: bytes) -> tuple[int, bytes]:
    """(a choice byte, the rest); an empty input chooses 0."""
    return (data[0], data[1:]) if data else (0, b"")


# --- serial frames --------------------------------------------------------------


def fuzz_frames(data: bytes) -> None:
    """Byte 0: sensor (even PMS5003, odd SDS011); byte 1: split point; then the stream."""
    choice, rest = _split(data)
    cut, stream = _split(rest)
    pms = choice % 2 == 0
    frame_bytes = PMS5003_FRAME_BYTES if pms else SDS011_FRAME_BYTES
    result = (decode_pms5003 if pms else decode_sds011)(stream)
    _require(0 <= result.consumed <= len(stream), "consumed outside the input")
    _require(
        result.consumed
        == (len(result.frames) + len(result.replies)) * frame_bytes + result.garbage_bytes,
        "consumed != (frames + replies) * frame_bytes + garbage",
    )
    _require(not (pms and result.replies), "a PMS5003 stream yields SDS011 replies")
    _require(len(stream) - result.consumed < frame_bytes, "kept tail as long as a frame")
    for frame in result.frames:
        raw = encode_pms5003(frame) if isinstance(frame, Pms5003Frame) else encode_sds011(frame)
        _require(raw in stream, f"{frame!r} does not re-encode to bytes of the stream")
    for reply in result.replies:
        raw = encode_sds011_reply(reply)
        _require(raw in stream, f"{reply!r} does not re-encode to bytes of the stream")
    decoder = FrameDecoder("pms5003" if pms else "sds011")
    cut = min(cut, len(stream))
    first, second = decoder.feed_all(stream[:cut]), decoder.feed_all(stream[cut:])
    _require(first[0] + second[0] == result.frames, "a split stream decodes to other frames")
    _require(first[1] + second[1] == result.replies, "a split stream decodes to other replies")
    _require(
        (decoder.checksum_errors, decoder.length_errors, decoder.garbage_bytes)
        == (result.checksum_errors, result.length_errors, result.garbage_bytes),
        "a split stream counts other errors",
    )
    _require(decoder.pending_bytes == len(stream) - result.consumed, "a split stream keeps more")


# --- MQTT codec -------------------------------------------------------------------


def _read_all(chunks: list[bytes], limit: int) -> tuple[list[object], list[object]] | None:
    """Every packet of ``chunks`` fed in turn, or None if the stream is refused."""
    reader = PacketReader(max_packet_bytes=limit)
    publishes: list[object] = []
    controls: list[object] = []
    try:
        for chunk in chunks:
            got_publishes, got_controls = reader.feed(chunk)
            publishes.extend(got_publishes)
            controls.extend(got_controls)
            _require(reader.buffered <= sum(map(len, chunks)), "buffered more than was fed")
    except MqttProtocolError:
        return None
    return publishes, controls


def fuzz_mqtt(data: bytes) -> None:
    """Byte 0: mode, limit, split; byte 1: split point or QoS and packet id; then the bytes."""
    choice, rest = _split(data)
    cut, body = _split(rest)
    if choice & 1:
        # Round trip: a PUBLISH our own encoder builds must read back unchanged.
        qos = cut % 2
        packet_id = (cut >> 1) + 1 if qos else 0
        raw_topic, _, payload = body.partition(b"\x00")
        topic = raw_topic.decode("utf-8", "replace")
        packet = encode_publish(topic, payload, qos=qos, packet_id=packet_id)
        read = _read_all([packet], 1 << 20)
        _require(read == ([(topic, payload, qos, packet_id, False)], []), "PUBLISH round trip")
        return
    # 256 bytes or 1 MiB, the reader's default: a small limit reaches the oversize branch.
    limit = 256 if choice & 2 else 1 << 20
    if choice & 4:
        # Many small reads, as a slow link delivers them: 1 to 16 bytes each.
        size = cut % 16 + 1
        chunks = [body[i : i + size] for i in range(0, len(body), size)]
    else:
        cut = min(cut, len(body))
        chunks = [body[:cut], body[cut:]]
    _require(
        _read_all([body], limit) == _read_all(chunks, limit), "a split stream reads differently"
    )


# --- wire messages --------------------------------------------------------------


def fuzz_uplink(data: bytes) -> None:
    """Byte 0: the device type; then the JSON payload."""
    choice, payload = _split(data)
    device_type = DEVICE_TYPE_NAMES[choice % len(DEVICE_TYPE_NAMES)]
    past_ms, future_ms = 30 * 86_400_000, 300_000
    fast = _accept_uplink(
        payload, device_type, NOW_MS, DEVICE_PAYLOAD_MAX_BYTES, past_ms, future_ms
    )
    try:
        checked = _check_uplink(
            payload, device_type, NOW_MS, DEVICE_PAYLOAD_MAX_BYTES, past_ms, future_ms
        )
    except InputError as exc:
        _require(fast is None, f"the fast path accepts what the checks refuse: {exc}")
        return
    _require(fast is None or fast == checked, "the fast path decodes differently")
    uplink = decode_device_uplink(payload, device_type=device_type, now_ms=NOW_MS)
    _require(uplink == checked, "decode_device_uplink differs from its checks")
    again = decode_device_uplink(
        encode_device_uplink(uplink), device_type=device_type, now_ms=NOW_MS
    )
    _require(again == uplink, "uplink round trip")


def fuzz_status(data: bytes) -> None:
    try:
        status = decode_device_status(data)
    except InputError:
        return
    _require(encode_device_status(status) == data, "status round trip")


def fuzz_batch(data: bytes) -> None:
    try:
        batch = decode_batch(data, now_ms=NOW_MS)
    except InputError:
        return
    # Compared as bytes: a NaN reading (a reject-to-be) is not equal to itself.
    raw = encode_batch(batch)
    _require(encode_batch(decode_batch(raw, now_ms=NOW_MS)) == raw, "batch round trip")
    for index, block in enumerate(batch.blocks):
        try:
            check_block_rows(block, now_ms=NOW_MS)
        except InputError as exc:
            raise InvariantError(f"block {index} of an accepted batch: {exc}") from exc


def fuzz_state(data: bytes) -> None:
    try:
        state = decode_gateway_state(data)
    except InputError:
        return
    raw = encode_gateway_state(state)
    _require(encode_gateway_state(decode_gateway_state(raw)) == raw, "state round trip")


def _sender_round_trip(
    data: bytes,
    decode: Callable[..., _M],
    encode: Callable[[_M], bytes],
    what: str,
) -> None:
    """Byte 0: odd checks the sender against the topic's gateway (as the receiver does)."""
    choice, payload = _split(data)
    gateway_id = GATEWAY_ID if choice & 1 else None
    try:
        message = decode(payload, gateway_id=gateway_id)
    except InputError:
        return
    _require(decode(encode(message), gateway_id=gateway_id) == message, f"{what} round trip")


def fuzz_ack(data: bytes) -> None:
    """A gateway's check of the batch ids' owner, or none."""
    _sender_round_trip(data, decode_ack, encode_ack, "ack")


def fuzz_config(data: bytes) -> None:
    try:
        config = decode_gateway_config(data)
    except InputError:
        return
    again = decode_gateway_config(encode_gateway_config(config))
    _require(again == config, "config round trip")


def fuzz_command(data: bytes) -> None:
    """Byte 0 picks the device type whose catalog entry re-checks the args (or none)."""
    choice, payload = _split(data)
    names = DEVICE_TYPE_NAMES[:-1]
    dtype = catalog.DEVICE_TYPES[names[choice % len(names)]] if choice & 0x80 else None
    try:
        command = decode_command(payload, catalog_type=dtype)
    except InputError:
        return
    again = decode_command(encode_command(command), catalog_type=dtype)
    _require(again == command, "command round trip")


def fuzz_gateway_commands(data: bytes) -> None:
    """A gateway's check of the sender, or none."""
    _sender_round_trip(data, decode_gateway_commands, encode_gateway_commands, "commands")


def fuzz_command_reports(data: bytes) -> None:
    """Ingest's check of the sender, or none."""
    _sender_round_trip(data, decode_command_reports, encode_command_reports, "reports")


def fuzz_device_answer(data: bytes) -> None:
    try:
        answer = decode_device_answer(data)
    except InputError:
        return
    _require(decode_device_answer(encode_device_answer(answer)) == answer, "answer round trip")


# --- ingest -----------------------------------------------------------------------


class _Owners(Mapping[str, str | None]):
    """Device -> gateway: ids ending in 8 belong to another gateway, in 9 to none."""

    def __getitem__(self, device_id: str) -> str | None:
        if device_id.endswith("9"):
            return None
        return OTHER_GATEWAY_ID if device_id.endswith("8") else GATEWAY_ID

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


_OWNERS: Final = _Owners()


def fuzz_ingest_batch(data: bytes) -> None:
    """Byte 0: topic and prefix; then the payload. ``prepare_item`` must never raise."""
    choice, payload = _split(data)
    topic, prefix = BATCH_TOPICS[choice % len(BATCH_TOPICS)]
    item = prepare_item(topic, payload, prefix=prefix, now_ms=NOW_MS, owners=_OWNERS)
    if not isinstance(item, GoodBatch):
        return
    batch = decode_batch(payload, now_ms=NOW_MS)
    rows = sum(block.row_count for block in batch.blocks)
    _require(
        item.rows.readings + len(item.rows.rejects) == rows, "rows neither stored nor rejected"
    )
    for table in item.rows.tables.values():
        keys = np.arange(len(table.device_ids), dtype=np.int64)
        encode_copy_binary(copy_columns(table, keys), table.row_count)


def fuzz_ingest_state(data: bytes) -> None:
    """Byte 0: topic and prefix; then the payload. ``prepare_state`` must never raise."""
    choice, payload = _split(data)
    topic, prefix = STATE_TOPICS[choice % len(STATE_TOPICS)]
    item = prepare_state(topic, payload, prefix=prefix)
    if isinstance(item, GoodState):
        owner, _ = parse_gateway_topic(topic, prefix)
        _require(item.row.gateway_id == owner, "a state stored under another gateway's topic")


def fuzz_topics(data: bytes) -> None:
    """Byte 0: the prefix; then the topic (MQTT topics are UTF-8; the codec refuses others)."""
    choice, raw = _split(data)
    prefix = PREFIXES[choice % len(PREFIXES)]
    try:
        topic = raw.decode()
    except UnicodeDecodeError:
        return
    try:
        device_id, device_kind = parse_device_topic(topic, prefix)
    except InputError:
        pass
    else:
        if device_kind == "up":
            _require(device_uplink_topic(device_id, prefix) == topic, "device topic round trip")
    try:
        gateway_id, gateway_kind = parse_gateway_topic(topic, prefix)
    except InputError:
        return
    _require(gateway_topic(gateway_id, gateway_kind, prefix) == topic, "gateway topic round trip")


# --- structure-aware targets ----------------------------------------------------
#
# Mutating msgpack bytes rarely yields a batch whose shape is sound but for one
# thing (a column one row short, an index one past the end, a row without
# values): the replay of the byte-level corpus never reached those checks.
# These targets read the input as a list of choices and build the message
# from them with the real encoders, so every input is well-formed msgpack or
# JSON and the fuzzer spends its time on the checks behind the syntax.


_V = TypeVar("_V")


class _Choices:
    """Reads small choices from the fuzzer's bytes; past the end, every choice is 0."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def below(self, bound: int) -> int:
        """An int in [0, bound), from one byte (two when bound > 256)."""
        width = 1 if bound <= 256 else 2
        chunk = self._data[self._pos : self._pos + width]
        self._pos += width
        return int.from_bytes(chunk, "big") % bound if chunk else 0

    def pick(self, options: tuple[_V, ...]) -> _V:
        return options[self.below(len(options))]


_ID_POOL: Final = ("dev-1", "dev-2", "dev-8", "dev-9", "dev-1", "Dev-3", "", "d" * 65)
_INT_POOL: Final = (0, 1, 7, -1, 2**63 - 1, 2**63, 2**64 - 1, 1_000_000)
_TS_OFFSETS_MS: Final = (0, -1, -1000, 299_999, 300_001, -30 * 86_400_000, -31 * 86_400_000)
_FLOAT_POOL: Final = (0.0, -0.0, 0.5, 1.0, 1e9, -1e9, 1e308, math.nan, math.inf, -math.inf)
_SHAPES: Final = (0, 0, 0, 0, 1, -1)  # how much longer a column is than device_index


def _value(choices: _Choices, metric: catalog.Metric) -> float | None:
    kind = choices.below(6)
    if kind == 0:
        return None
    if kind == 1:
        return metric.min
    if kind == 2:
        return metric.max
    if kind == 3:
        return metric.min + (metric.max - metric.min) * choices.below(1000) / 999
    if kind == 4:
        return metric.max + 1
    return choices.pick(_FLOAT_POOL)


def _column(choices: _Choices, rows: int, draw: Callable[[], _V]) -> list[_V]:
    return [draw() for _ in range(max(0, rows + choices.pick(_SHAPES)))]


def _block(choices: _Choices, devices: int) -> ReadingBlock:
    name = choices.pick(DEVICE_TYPE_NAMES)
    dtype = catalog.DEVICE_TYPES.get(name, catalog.DEVICE_TYPES["kiosk"])
    rows = choices.below(9)
    values: dict[str, list[float | None]] = {}
    for metric in dtype.metrics:
        if choices.below(4):
            values[metric.name] = _column(choices, rows, functools.partial(_value, choices, metric))
    if choices.below(16) == 0:
        values["no_such_metric"] = [1.0] * rows
    return ReadingBlock(
        device_type=name,
        device_index=[choices.below(devices + 2) - 1 for _ in range(rows)],
        seq=_column(choices, rows, lambda: choices.pick(_INT_POOL)),
        ts_ms=_column(choices, rows, lambda: NOW_MS + choices.pick(_TS_OFFSETS_MS)),
        recv_ms=_column(choices, rows, lambda: NOW_MS + choices.pick(_TS_OFFSETS_MS)),
        values=values,
    )


def build_batch(data: bytes) -> tuple[int, bytes]:
    """(a topic choice, a batch payload) built from ``data`` with ``encode_batch``."""
    choices = _Choices(data)
    topic = choices.below(len(BATCH_TOPICS))
    devices = [choices.pick(_ID_POOL) for _ in range(choices.below(6))]
    gateway_id = choices.pick((GATEWAY_ID, GATEWAY_ID, GATEWAY_ID, OTHER_GATEWAY_ID, "GW"))
    boot_id = choices.pick(("b0", "b0", "b1"))
    counter = choices.pick(("1", "1", "01", "x", str(2**63)))
    blocks = [_block(choices, len(devices)) for _ in range(choices.below(4))]
    boots = choices.below(4)
    device_boot: list[str | None] = (
        [] if boots == 0 else [choices.pick((None, "b1", "B")) for _ in devices[: boots + 1]]
    )
    batch = Batch(
        batch_id=f"{choices.pick((gateway_id, GATEWAY_ID))}:{boot_id}:{counter}",
        gateway_id=gateway_id,
        boot_id=boot_id,
        sent_ms=NOW_MS + choices.pick(_TS_OFFSETS_MS),
        devices=devices,
        blocks=blocks,
        device_boot=device_boot,
    )
    return topic, encode_batch(batch)


def fuzz_batch_fields(data: bytes) -> None:
    """A batch built from choices, through ``decode_batch`` and ingest's ``prepare_item``."""
    topic, payload = build_batch(data)
    fuzz_batch(payload)
    fuzz_ingest_batch(bytes((topic,)) + payload)


def fuzz_state_fields(data: bytes) -> None:
    """A gateway state built from choices, through ``decode_gateway_state``, ``prepare_state``."""
    choices = _Choices(data)
    topic = choices.below(len(STATE_TOPICS))
    fields: dict[str, object] = {
        "gateway_id": choices.pick((GATEWAY_ID, GATEWAY_ID, OTHER_GATEWAY_ID, "GW")),
        "status": choices.pick(("online", "offline", "dead")),
        "boot_id": choices.pick(("b0", "b0", "")),
        "version": choices.pick(("1.4.0", "1.4.0", "v" * 65, "1.4\x00", "1.4\n")),
        "readings_per_s": choices.pick((*_FLOAT_POOL, 12.5)),
        "site_ready": choices.pick((True, False, 1)),
    }
    for name in ("birth", "outbox_depth", "ts_ms", "outbox_readings", "received", "accepted"):
        fields[name] = choices.pick((*_INT_POOL, NOW_MS, 253_402_300_800_000))
    for name in ("rejected", "rate_limited", "serial_errors", "devices_online", "batches_resent"):
        if choices.below(2):
            fields[name] = choices.pick(_INT_POOL)
    payload = msgspec.json.encode(fields)
    fuzz_state(payload)
    fuzz_ingest_state(bytes((topic,)) + payload)


Target = Callable[[bytes], None]

TARGETS: Final[dict[str, Target]] = {
    "frames": fuzz_frames,
    "mqtt": fuzz_mqtt,
    "uplink": fuzz_uplink,
    "status": fuzz_status,
    "batch": fuzz_batch,
    "state": fuzz_state,
    "ack": fuzz_ack,
    "config": fuzz_config,
    "command": fuzz_command,
    "gateway_commands": fuzz_gateway_commands,
    "command_reports": fuzz_command_reports,
    "device_answer": fuzz_device_answer,
    "ingest_batch": fuzz_ingest_batch,
    "ingest_state": fuzz_ingest_state,
    "topics": fuzz_topics,
    "batch_fields": fuzz_batch_fields,
    "state_fields": fuzz_state_fields,
}

# libFuzzer's -max_len per target: a few times the largest seed, so inputs
# can grow past what real encoders produce without each run parsing
# megabytes (the size limits themselves are tested in tests/contracts/test_messages.py).
MAX_LEN: Final[dict[str, int]] = {
    "frames": 512,
    "mqtt": 4096,
    "uplink": 8192,
    "status": 64,
    "batch": 16384,
    "state": 4096,
    "ack": 4096,
    "config": 8192,
    "command": 4096,
    "gateway_commands": 8192,
    "command_reports": 8192,
    "device_answer": 1024,
    "ingest_batch": 16384,
    "ingest_state": 4096,
    "topics": 512,
    # Choices, not bytes of a message: a few hundred cover 3 blocks of 8 rows.
    "batch_fields": 1024,
    "state_fields": 64,
}
