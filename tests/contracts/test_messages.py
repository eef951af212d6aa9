"""Wire messages: codec round trips, every bad input with its specific error, fuzzing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contracts import messages
from contracts.catalog import DEVICE_TYPES, DeviceType, Metric, MetricKind
from contracts.errors import (
    FieldTypeError,
    InconsistentBatchError,
    InputError,
    InvalidIdError,
    MalformedPayloadError,
    NonFiniteValueError,
    OutOfRangeError,
    PayloadTooLargeError,
    TimestampWindowError,
    UnknownDeviceTypeError,
    UnknownMetricError,
)
from contracts.ids import DEFAULT_MAX_FUTURE_MS, DEFAULT_MAX_PAST_MS, batch_id
from contracts.messages import (
    BATCH_MAX_BYTES,
    DEVICE_PAYLOAD_MAX_BYTES,
    SEQ_MAX,
    SERIAL_PROTOCOLS,
    Ack,
    Batch,
    DeviceConfig,
    DeviceUplink,
    GatewayConfig,
    GatewayState,
    ReadingBlock,
    Transport,
    _DeviceUplinkWire,
    check_ack,
    check_batch,
    check_block_rows,
    check_gateway_config,
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
    payload_digest,
)

NOW_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z, a fixed "now" for every test
OLDEST_MS = NOW_MS - DEFAULT_MAX_PAST_MS
NEWEST_MS = NOW_MS + DEFAULT_MAX_FUTURE_MS
GW = "gw-hn-001"
BOOT = "0123456789abcdef"
BID = f"{GW}:{BOOT}:7"

# --- strategies built from the catalog --------------------------------------------

ids = st.from_regex(r"[a-z0-9][a-z0-9-]{0,63}", fullmatch=True)
in_window = st.integers(OLDEST_MS, NEWEST_MS)
seqs = st.integers(0, SEQ_MAX)
device_types = st.sampled_from(sorted(DEVICE_TYPES.values(), key=lambda t: t.name))


def valid_values(metric: Metric) -> st.SearchStrategy[float]:
    if metric.kind is MetricKind.FLOAT:
        return st.floats(metric.min, metric.max, allow_nan=False, allow_infinity=False)
    return st.integers(int(metric.min), int(metric.max)).map(float)


@st.composite
def metric_dicts(draw: st.DrawFn, dtype: DeviceType) -> dict[str, float]:
    names = draw(st.lists(st.sampled_from(dtype.metric_names), min_size=1, unique=True))
    return {name: draw(valid_values(dtype.metric(name))) for name in names}


@st.composite
def uplinks(draw: st.DrawFn) -> tuple[str, DeviceUplink]:
    dtype = draw(device_types)
    message = DeviceUplink(
        seq=draw(seqs),
        ts_ms=draw(in_window),
        metrics=draw(metric_dicts(dtype)),
        boot=draw(st.none() | ids),
    )
    return dtype.name, message


@st.composite
def blocks(draw: st.DrawFn, dtype: DeviceType, device_indexes: list[int]) -> ReadingBlock:
    rows = draw(st.integers(0, 6))
    columns = draw(st.lists(st.sampled_from(dtype.metric_names), min_size=1, unique=True))
    values: dict[str, list[float | None]] = {}
    for position, name in enumerate(columns):
        metric = dtype.metric(name)
        # The first column is always present so that every row has a value.
        cell = valid_values(metric) if position == 0 else st.none() | valid_values(metric)
        values[name] = draw(st.lists(cell, min_size=rows, max_size=rows))
    return ReadingBlock(
        device_type=dtype.name,
        device_index=draw(st.lists(st.sampled_from(device_indexes), min_size=rows, max_size=rows)),
        seq=draw(st.lists(seqs, min_size=rows, max_size=rows)),
        ts_ms=draw(st.lists(in_window, min_size=rows, max_size=rows)),
        recv_ms=draw(st.lists(in_window, min_size=rows, max_size=rows)),
        values=values,
    )


@st.composite
def batches(draw: st.DrawFn) -> Batch:
    gateway_id, boot_id = draw(ids), draw(ids)
    devices = draw(st.lists(ids, min_size=1, max_size=5, unique=True))
    # One type per device; one block per type in use.
    types = [draw(device_types) for _ in devices]
    by_type: dict[str, list[int]] = {}
    for index, dtype in enumerate(types):
        by_type.setdefault(dtype.name, []).append(index)
    block_list = [draw(blocks(DEVICE_TYPES[name], indexes)) for name, indexes in by_type.items()]
    device_boot = draw(
        st.just([]) | st.lists(st.none() | ids, min_size=len(devices), max_size=len(devices))
    )
    return Batch(
        batch_id=batch_id(gateway_id, boot_id, draw(st.integers(0, 2**63 - 1))),
        gateway_id=gateway_id,
        boot_id=boot_id,
        sent_ms=draw(in_window),
        devices=devices,
        blocks=block_list,
        device_boot=device_boot,
    )


@st.composite
def device_configs(draw: st.DrawFn, device_id: str) -> DeviceConfig:
    dtype = draw(device_types)
    transport: Transport = (
        "serial" if draw(st.sampled_from(dtype.transports)) == "serial" else "mqtt"
    )
    serial = transport == "serial"
    return DeviceConfig(
        device_id=device_id,
        device_type=dtype.name,
        transport=transport,
        # A serial sensor has its port to itself (check_shared_ports).
        port=draw(st.sampled_from([f"/dev/serial/by-id/{device_id}", f"socket://{device_id}:7001"]))
        if serial
        else None,
        protocol=draw(st.sampled_from(SERIAL_PROTOCOLS)) if serial else None,
        label=draw(st.text(max_size=20)),
        rate_limit_per_s=draw(st.floats(0.001, 1000.0)),
        enabled=draw(st.booleans()),
    )


@st.composite
def gateway_configs(draw: st.DrawFn) -> GatewayConfig:
    device_ids = draw(st.lists(ids, max_size=5, unique=True))
    return GatewayConfig(
        gateway_id=draw(ids),
        version=draw(st.integers(0, 2**63 - 1)),
        site_id=draw(ids),
        devices=[draw(device_configs(device_id)) for device_id in device_ids],
    )


states = st.builds(
    GatewayState,
    gateway_id=ids,
    status=st.sampled_from(["online", "offline"]),
    birth=st.integers(0, 2**63 - 1),
    boot_id=ids,
    # A valid state's version is printable and its time at most TS_MAX_MS.
    version=st.text(max_size=20).filter(str.isprintable),
    outbox_depth=st.integers(0, 10**9),
    ts_ms=st.integers(0, messages.TS_MAX_MS),
    outbox_refused_readings=st.integers(0, 2**63 - 1),
    outbox_dropped_readings=st.integers(0, 2**63 - 1),
)
acks = st.lists(st.builds(batch_id, ids, ids, st.integers(0, 2**63 - 1)), max_size=5).flatmap(
    lambda batch_ids: st.builds(
        Ack,
        batch_ids=st.just(batch_ids),
        ts_ms=st.integers(0, 2**63 - 1),
        digests=st.just([])
        | st.lists(
            st.binary(max_size=8).map(payload_digest),
            min_size=len(batch_ids),
            max_size=len(batch_ids),
        ),
    )
)

# JSON-ish and msgpack-ish values for fuzzing decoders.
scalars = (
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats() | st.text(max_size=10)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
msgpack_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=10)
    | st.binary(max_size=10)
)
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


def raises_exactly(expected: type[InputError], call: Any, *args: Any, **kwargs: Any) -> InputError:
    """Call and insist on exactly ``expected`` (not a parent, not a sibling subclass)."""
    with pytest.raises(InputError) as info:
        call(*args, **kwargs)
    assert type(info.value) is expected, f"{type(info.value).__name__}: {info.value}"
    return info.value


# --- device uplink -----------------------------------------------------------------


def uplink_json(
    *, seq: Any = 7, ts: Any = NOW_MS, m: Any = None, drop: str = "", **extra: Any
) -> bytes:
    document = {"seq": seq, "ts": ts, "m": {"pm25": 12.5} if m is None else m, **extra}
    document.pop(drop, None)
    return json.dumps(document).encode()


def test_uplink_wire_format():
    message = DeviceUplink(seq=7, ts_ms=NOW_MS, metrics={"pm25": 12.5})
    assert encode_device_uplink(message) == b'{"seq":7,"ts":1767225600000,"m":{"pm25":12.5}}'
    with_boot = DeviceUplink(seq=7, ts_ms=NOW_MS, metrics={"pm25": 12.5}, boot="b00t")
    assert encode_device_uplink(with_boot).endswith(b',"boot":"b00t"}')


def test_uplink_decodes_hand_written_json():
    payload = b'{"seq": 3, "ts": 1767225600000, "m": {"pm25": 12, "humidity": 55.5}, "fw": "1.2"}'
    message = decode_device_uplink(payload, device_type="air_quality", now_ms=NOW_MS)
    assert message == DeviceUplink(
        seq=3, ts_ms=NOW_MS, metrics={"pm25": 12.0, "humidity": 55.5}, boot=None
    )
    assert all(type(v) is float for v in message.metrics.values())


def test_uplink_wire_struct_mirrors_public_struct():
    def shape(cls: type[msgspec.Struct]) -> list[tuple[str, str, object]]:
        return [(f.name, f.encode_name, f.default) for f in msgspec.structs.fields(cls)]

    assert shape(_DeviceUplinkWire) == shape(DeviceUplink)


@pytest.mark.parametrize(
    ("payload", "device_type", "expected", "fragment"),
    [
        # syntax
        pytest.param(b"", "air_quality", MalformedPayloadError, "", id="empty"),
        pytest.param(b"{", "air_quality", MalformedPayloadError, "", id="truncated"),
        pytest.param(b"hello", "air_quality", MalformedPayloadError, "", id="not-json"),
        pytest.param(
            uplink_json(m={"pm25": float("nan")}),
            "air_quality",
            MalformedPayloadError,
            "",
            id="NaN-literal",
        ),
        pytest.param(
            uplink_json(m={"pm25": float("inf")}),
            "air_quality",
            MalformedPayloadError,
            "",
            id="Infinity-literal",
        ),
        pytest.param(
            b'{"seq":1,"ts":1767225600000,"m":{"\xff":1}}',
            "air_quality",
            MalformedPayloadError,
            "UTF-8",
            id="invalid-utf8-key",
        ),
        # non-finite numbers that are valid JSON
        pytest.param(
            b'{"seq":1,"ts":1767225600000,"m":{"pm25":1e999}}',
            "air_quality",
            NonFiniteValueError,
            "pm25",
            id="1e999",
        ),
        pytest.param(
            b'{"seq":1,"ts":1767225600000,"m":{"temperature":-1e999}}',
            "air_quality",
            NonFiniteValueError,
            "temperature",
            id="-1e999",
        ),
        pytest.param(
            b'{"seq":1,"ts":1767225600000,"m":{"pm25":' + b"9" * 400 + b"}}",
            "air_quality",
            NonFiniteValueError,
            "pm25",
            id="400-digit-int",
        ),
        # types and missing fields
        pytest.param(b"[1, 2, 3]", "air_quality", FieldTypeError, "", id="list-not-object"),
        pytest.param(b'"x"', "air_quality", FieldTypeError, "", id="string-not-object"),
        pytest.param(uplink_json(drop="seq"), "air_quality", FieldTypeError, "seq", id="no-seq"),
        pytest.param(uplink_json(drop="ts"), "air_quality", FieldTypeError, "ts", id="no-ts"),
        pytest.param(uplink_json(drop="m"), "air_quality", FieldTypeError, "m", id="no-m"),
        pytest.param(uplink_json(seq="1"), "air_quality", FieldTypeError, "seq", id="str-seq"),
        pytest.param(uplink_json(seq=1.5), "air_quality", FieldTypeError, "seq", id="float-seq"),
        pytest.param(uplink_json(seq=True), "air_quality", FieldTypeError, "seq", id="bool-seq"),
        pytest.param(
            uplink_json(ts=float(NOW_MS)), "air_quality", FieldTypeError, "ts", id="float-ts"
        ),
        pytest.param(uplink_json(ts=None), "air_quality", FieldTypeError, "ts", id="null-ts"),
        pytest.param(uplink_json(m=[1, 2]), "air_quality", FieldTypeError, "m", id="m-is-list"),
        pytest.param(uplink_json(m={}), "air_quality", FieldTypeError, "m", id="m-empty"),
        pytest.param(
            uplink_json(m={"pm25": "12"}), "air_quality", FieldTypeError, "pm25", id="str-value"
        ),
        pytest.param(
            uplink_json(m={"online": True}),
            "conference_endpoint",
            FieldTypeError,
            "online",
            id="bool-value",
        ),
        pytest.param(
            uplink_json(m={"pm25": None}), "air_quality", FieldTypeError, "pm25", id="null-value"
        ),
        pytest.param(
            uplink_json(m={"pm25": [1]}), "air_quality", FieldTypeError, "pm25", id="list-value"
        ),
        pytest.param(
            uplink_json(m={"pm25": {"v": 1}}),
            "air_quality",
            FieldTypeError,
            "pm25",
            id="object-value",
        ),
        pytest.param(uplink_json(boot=5), "air_quality", FieldTypeError, "boot", id="int-boot"),
        # ranges
        pytest.param(uplink_json(seq=-1), "air_quality", OutOfRangeError, "seq", id="neg-seq"),
        pytest.param(
            uplink_json(seq=2**63), "air_quality", OutOfRangeError, "seq", id="seq-over-int64"
        ),
        pytest.param(
            uplink_json(m={"pm25": -0.1}), "air_quality", OutOfRangeError, "pm25", id="pm25<0"
        ),
        pytest.param(
            uplink_json(m={"pm25": 1000.01}), "air_quality", OutOfRangeError, "pm25", id="pm25>max"
        ),
        pytest.param(
            uplink_json(m={"humidity": 101}),
            "air_quality",
            OutOfRangeError,
            "humidity",
            id="humidity>100",
        ),
        pytest.param(
            uplink_json(m={"queue_length": 2.5}),
            "kiosk",
            OutOfRangeError,
            "queue_length",
            id="fractional-int-metric",
        ),
        pytest.param(
            uplink_json(m={"printer_status": 5}),
            "kiosk",
            OutOfRangeError,
            "printer_status",
            id="enum-code-past-labels",
        ),
        # time window
        pytest.param(
            uplink_json(ts=OLDEST_MS - 1), "air_quality", TimestampWindowError, "ts", id="ts-old"
        ),
        pytest.param(
            uplink_json(ts=NEWEST_MS + 1), "air_quality", TimestampWindowError, "ts", id="ts-new"
        ),
        pytest.param(
            uplink_json(ts=NOW_MS // 1000),
            "air_quality",
            TimestampWindowError,
            "ts",
            id="ts-in-seconds",
        ),
        pytest.param(
            uplink_json(ts=10**30), "air_quality", TimestampWindowError, "ts", id="ts-huge"
        ),
        # catalog
        pytest.param(
            uplink_json(m={"pm3": 1}), "air_quality", UnknownMetricError, "pm3", id="unknown"
        ),
        pytest.param(
            uplink_json(m={"pm25": 1, "queue_length": 1}),
            "air_quality",
            UnknownMetricError,
            "queue_length",
            id="other-types-metric",
        ),
        pytest.param(uplink_json(), "toaster", UnknownDeviceTypeError, "toaster", id="bad-type"),
        # ids
        pytest.param(uplink_json(boot="B00T"), "air_quality", InvalidIdError, "boot", id="boot"),
        pytest.param(uplink_json(boot="a/b"), "air_quality", InvalidIdError, "boot", id="boot/"),
        # size
        pytest.param(
            uplink_json(pad=" " * DEVICE_PAYLOAD_MAX_BYTES),
            "air_quality",
            PayloadTooLargeError,
            "4096",
            id="oversized",
        ),
    ],
)
def test_decode_device_uplink_rejects(payload, device_type, expected, fragment):
    error = raises_exactly(
        expected, decode_device_uplink, payload, device_type=device_type, now_ms=NOW_MS
    )
    assert fragment in str(error)


def test_uplink_size_limit_is_inclusive():
    base = uplink_json()
    exact = base[:-1] + b" " * (DEVICE_PAYLOAD_MAX_BYTES - len(base)) + b"}"
    assert len(exact) == DEVICE_PAYLOAD_MAX_BYTES
    assert decode_device_uplink(exact, device_type="air_quality", now_ms=NOW_MS).seq == 7
    with pytest.raises(PayloadTooLargeError):
        decode_device_uplink(b" " + exact, device_type="air_quality", now_ms=NOW_MS)
    with pytest.raises(PayloadTooLargeError):
        decode_device_uplink(base, device_type="air_quality", now_ms=NOW_MS, max_bytes=10)


def test_uplink_custom_window():
    payload = uplink_json(ts=NOW_MS - 2000)
    assert decode_device_uplink(payload, device_type="air_quality", now_ms=NOW_MS).ts_ms
    with pytest.raises(TimestampWindowError):
        decode_device_uplink(payload, device_type="air_quality", now_ms=NOW_MS, max_past_ms=1000)
    with pytest.raises(TimestampWindowError):
        decode_device_uplink(
            payload, device_type="air_quality", now_ms=NOW_MS - 5000, max_future_ms=1000
        )


@pytest.mark.parametrize("depth", [10, 2_000, 100_000])
def test_uplink_deep_nesting_is_an_input_error(depth):
    payload = b'{"seq":1,"ts":1767225600000,"m":{"pm25":' + b"[" * depth + b"]" * depth + b"}}"
    with pytest.raises(MalformedPayloadError):
        decode_device_uplink(payload, device_type="air_quality", now_ms=NOW_MS, max_bytes=10**6)


@given(uplinks())
def test_uplink_round_trip(case):
    type_name, message = case
    payload = encode_device_uplink(message)
    assert decode_device_uplink(payload, device_type=type_name, now_ms=NOW_MS) == message


@settings(max_examples=300)
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_uplink_decoder_raises_only_input_errors(payload):
    with contextlib.suppress(InputError):
        decode_device_uplink(payload, device_type="air_quality", now_ms=NOW_MS)


@settings(max_examples=300)
@given(
    st.fixed_dictionaries(
        {"seq": json_values, "ts": json_values | in_window},
        optional={
            "m": st.dictionaries(
                st.sampled_from(DEVICE_TYPES["air_quality"].metric_names) | st.text(max_size=5),
                json_values,
                max_size=4,
            ),
            "boot": json_values | ids,
        },
    )
)
def test_uplink_shaped_fuzz_raises_only_input_errors(document):
    payload = json.dumps(document).encode()
    try:
        message = decode_device_uplink(payload, device_type="air_quality", now_ms=NOW_MS)
    except InputError:
        return
    assert message.metrics
    assert all(math.isfinite(v) for v in message.metrics.values())


uplink_documents = st.fixed_dictionaries(
    {"seq": json_values | seqs, "ts": json_values | in_window},
    optional={
        "m": st.dictionaries(
            st.sampled_from(DEVICE_TYPES["kiosk"].metric_names) | st.text(max_size=5),
            json_values | st.floats() | st.integers(-(2**70), 2**70),
            max_size=4,
        ),
        "boot": json_values | ids,
    },
)


@settings(max_examples=500)
@given(uplink_documents, st.sampled_from(sorted(DEVICE_TYPES)))
def test_uplink_fast_path_accepts_exactly_what_the_checks_accept(document, type_name):
    payload = json.dumps(document).encode()
    args = (payload, type_name, NOW_MS, DEVICE_PAYLOAD_MAX_BYTES, DEFAULT_MAX_PAST_MS, 60_000)
    fast = messages._accept_uplink(*args)
    try:
        checked = messages._check_uplink(*args)
    except InputError:
        assert fast is None
        return
    assert fast is None or fast == checked


@pytest.mark.parametrize(
    "payload",
    [
        b'{"seq":1,"ts":1767225600000,"m":{"queue_length":3}}',
        b'{"seq":1,"ts":1767225600000,"m":{"queue_length":3.0,"paper_level":99.5},"boot":"b-1"}',
    ],
)
def test_uplink_fast_path_takes_ordinary_readings(payload):
    args = (payload, "kiosk", NOW_MS, DEVICE_PAYLOAD_MAX_BYTES, DEFAULT_MAX_PAST_MS, 60_000)
    assert messages._accept_uplink(*args) is not None


# --- device status -----------------------------------------------------------------


@pytest.mark.parametrize("status", ["online", "offline"])
def test_device_status_round_trip(status):
    assert encode_device_status(status) == status.encode()
    assert decode_device_status(encode_device_status(status)) == status


@pytest.mark.parametrize("payload", [b"", b"ONLINE", b"online\n", b" offline", b"1"])
def test_device_status_rejects(payload):
    raises_exactly(MalformedPayloadError, decode_device_status, payload)


def test_encode_device_status_rejects_unknown():
    raises_exactly(FieldTypeError, encode_device_status, "sleeping")


# --- batch -------------------------------------------------------------------------


def make_block(**overrides: Any) -> ReadingBlock:
    fields: dict[str, Any] = {
        "device_type": "air_quality",
        "device_index": [0, 1, 0],
        "seq": [10, 20, 11],
        "ts_ms": [NOW_MS - 2000, NOW_MS - 1500, NOW_MS - 1000],
        "recv_ms": [NOW_MS - 1990, NOW_MS - 1490, NOW_MS - 990],
        "values": {"pm25": [12.5, 30.0, None], "humidity": [55.0, None, 56.0]},
    }
    fields.update(overrides)
    return ReadingBlock(**fields)


def make_batch(**overrides: Any) -> Batch:
    fields: dict[str, Any] = {
        "batch_id": BID,
        "gateway_id": GW,
        "boot_id": BOOT,
        "sent_ms": NOW_MS - 500,
        "devices": ["aq-001", "aq-002", "kiosk-001"],
        "blocks": [
            make_block(),
            make_block(
                device_type="kiosk",
                device_index=[2],
                seq=[1],
                ts_ms=[NOW_MS],
                recv_ms=[NOW_MS],
                values={"queue_length": [4.0]},
            ),
        ],
    }
    fields.update(overrides)
    return Batch(**fields)


def batch_dict(**overrides: Any) -> dict[str, Any]:
    document: dict[str, Any] = msgspec.to_builtins(make_batch())
    document.update(overrides)
    return document


def test_batch_round_trip_example():
    batch = make_batch(device_boot=["b1", None, "b3"])
    decoded = decode_batch(encode_batch(batch), now_ms=NOW_MS)
    assert decoded == batch
    assert decoded.blocks[0].values["pm25"] == [12.5, 30.0, None]
    assert decoded.blocks[0].row_count == 3
    assert [check_block_rows(b, now_ms=NOW_MS) for b in decoded.blocks] == [[], []]


def test_batch_is_a_msgpack_map_with_named_fields():
    document = msgspec.msgpack.decode(encode_batch(make_batch()))
    assert isinstance(document, dict)
    assert document["batch_id"] == BID
    assert set(document["blocks"][0]) == {
        "device_type",
        "device_index",
        "seq",
        "ts_ms",
        "recv_ms",
        "values",
    }


def test_batch_without_device_boot_decodes_with_default():
    document = batch_dict()
    del document["device_boot"]
    decoded = decode_batch(msgspec.msgpack.encode(document), now_ms=NOW_MS)
    assert decoded.device_boot == []


def test_batch_ignores_fields_from_newer_gateways():
    document = batch_dict(future_field={"x": 1})
    assert decode_batch(msgspec.msgpack.encode(document), now_ms=NOW_MS) == make_batch()


def _block_dict(**overrides: Any) -> dict[str, Any]:
    document: dict[str, Any] = msgspec.to_builtins(make_block())
    document.update(overrides)
    return document


def _mutated(**overrides: Any) -> bytes:
    return msgspec.msgpack.encode(batch_dict(**overrides))


def _mutated_block(**overrides: Any) -> bytes:
    return _mutated(blocks=[_block_dict(**overrides)])


@pytest.mark.parametrize(
    ("payload", "expected", "fragment"),
    [
        # syntax
        pytest.param(b"", MalformedPayloadError, "", id="empty"),
        pytest.param(b"\xc1", MalformedPayloadError, "", id="invalid-opcode"),
        pytest.param(encode_batch(make_batch())[:-1], MalformedPayloadError, "", id="truncated"),
        pytest.param(
            _mutated(gateway_id="gw").replace(b"\xa2gw", b"\xa2\xff\xfe"),
            MalformedPayloadError,
            "UTF-8",
            id="invalid-utf8",
        ),
        # types
        pytest.param(msgspec.msgpack.encode([1, 2]), FieldTypeError, "", id="array-not-map"),
        pytest.param(
            msgspec.msgpack.encode({k: v for k, v in batch_dict().items() if k != "batch_id"}),
            FieldTypeError,
            "batch_id",
            id="missing-batch-id",
        ),
        pytest.param(_mutated(sent_ms="now"), FieldTypeError, "sent_ms", id="str-sent-ms"),
        pytest.param(_mutated(sent_ms=1.5), FieldTypeError, "sent_ms", id="float-sent-ms"),
        pytest.param(_mutated(devices="aq-001"), FieldTypeError, "devices", id="devices-str"),
        pytest.param(_mutated(blocks={}), FieldTypeError, "blocks", id="blocks-map"),
        pytest.param(
            _mutated_block(values={"pm25": ["12", None, 1.0], "humidity": [1.0, 1.0, 1.0]}),
            FieldTypeError,
            "values",
            id="str-value",
        ),
        pytest.param(
            _mutated_block(values={"pm25": [True, None, 1.0]}),
            FieldTypeError,
            "values",
            id="bool-value",
        ),
        pytest.param(
            _mutated_block(device_index=[0, True, 0]),
            FieldTypeError,
            "device_index",
            id="bool-index",
        ),
        pytest.param(
            _mutated_block(values=[[1.0, 2.0, 3.0]]), FieldTypeError, "values", id="values-list"
        ),
        # ids
        pytest.param(_mutated(gateway_id="GW-1"), InvalidIdError, "gateway_id", id="gateway"),
        pytest.param(_mutated(boot_id="b+"), InvalidIdError, "boot_id", id="boot"),
        pytest.param(
            _mutated(devices=["aq-001", "a/b", "kiosk-001"]),
            InvalidIdError,
            "devices[1]",
            id="device-slash",
        ),
        pytest.param(
            _mutated(devices=["aq-001", "#", "kiosk-001"]),
            InvalidIdError,
            "devices[1]",
            id="device-wildcard",
        ),
        pytest.param(_mutated(batch_id="nonsense"), InvalidIdError, "batch_id", id="batch-id"),
        pytest.param(
            _mutated(device_boot=[None, "BAD", None]),
            InvalidIdError,
            "device_boot[1]",
            id="device-boot",
        ),
        # consistency
        pytest.param(
            _mutated(batch_id=f"gw-other:{BOOT}:7"),
            InconsistentBatchError,
            "gw-other",
            id="batch-id-other-gateway",
        ),
        pytest.param(
            _mutated(batch_id=f"{GW}:other-boot:7"),
            InconsistentBatchError,
            "other-boot",
            id="batch-id-other-boot",
        ),
        pytest.param(
            _mutated_block(seq=[1, 2]), InconsistentBatchError, "blocks[0].seq", id="short-seq"
        ),
        pytest.param(
            _mutated_block(ts_ms=[NOW_MS] * 4),
            InconsistentBatchError,
            "blocks[0].ts_ms",
            id="long-ts",
        ),
        pytest.param(
            _mutated_block(recv_ms=[]),
            InconsistentBatchError,
            "blocks[0].recv_ms",
            id="empty-recv",
        ),
        pytest.param(
            _mutated_block(values={"pm25": [1.0, 2.0]}),
            InconsistentBatchError,
            "blocks[0].values.pm25",
            id="short-column",
        ),
        pytest.param(
            _mutated_block(device_index=[0, 3, 0]),
            InconsistentBatchError,
            "device_index[1] = 3",
            id="index-past-end",
        ),
        pytest.param(
            _mutated_block(device_index=[0, -1, 0]),
            InconsistentBatchError,
            "device_index[1] = -1",
            id="negative-index",
        ),
        pytest.param(
            _mutated(devices=["aq-001", "aq-001", "kiosk-001"]),
            InconsistentBatchError,
            "aq-001",
            id="duplicate-device",
        ),
        pytest.param(
            _mutated(device_boot=["b1"]),
            InconsistentBatchError,
            "device_boot",
            id="device-boot-misaligned",
        ),
        pytest.param(
            _mutated(
                blocks=[
                    _block_dict(),
                    _block_dict(
                        device_type="kiosk",
                        device_index=[0],
                        seq=[1],
                        ts_ms=[NOW_MS],
                        recv_ms=[NOW_MS],
                        values={"queue_length": [1.0]},
                    ),
                ]
            ),
            InconsistentBatchError,
            "aq-001",
            id="device-with-two-types",
        ),
        # catalog
        pytest.param(
            _mutated_block(device_type="toaster"),
            UnknownDeviceTypeError,
            "toaster",
            id="unknown-type",
        ),
        pytest.param(
            _mutated_block(values={"pm3": [1.0, 1.0, 1.0]}),
            UnknownMetricError,
            "pm3",
            id="unknown-metric",
        ),
        pytest.param(
            _mutated_block(values={"queue_length": [1.0, 1.0, 1.0]}),
            UnknownMetricError,
            "queue_length",
            id="other-types-metric",
        ),
        # batch time
        pytest.param(
            _mutated(sent_ms=OLDEST_MS - 1), TimestampWindowError, "sent_ms", id="sent-old"
        ),
        pytest.param(
            _mutated(sent_ms=NEWEST_MS + 1), TimestampWindowError, "sent_ms", id="sent-new"
        ),
        # size
        pytest.param(
            b"\x00" * (BATCH_MAX_BYTES + 1), PayloadTooLargeError, "8388608", id="oversized"
        ),
    ],
)
def test_decode_batch_rejects(payload, expected, fragment):
    error = raises_exactly(expected, decode_batch, payload, now_ms=NOW_MS)
    assert fragment in str(error)


def test_batch_size_limit_is_inclusive():
    payload = encode_batch(make_batch())
    assert decode_batch(payload, now_ms=NOW_MS, max_bytes=len(payload)) == make_batch()
    raises_exactly(
        PayloadTooLargeError, decode_batch, payload, now_ms=NOW_MS, max_bytes=len(payload) - 1
    )


def test_check_batch_is_what_decode_batch_runs():
    bad = make_batch(batch_id=f"gw-other:{BOOT}:1")
    raises_exactly(InconsistentBatchError, check_batch, bad, now_ms=NOW_MS)
    assert check_batch(make_batch(), now_ms=NOW_MS) == make_batch()


def test_decode_batch_passes_bad_readings_through():
    block = make_block(
        seq=[-1, 20, 11],
        ts_ms=[NOW_MS, OLDEST_MS - 1, NOW_MS],
        values={"pm25": [float("nan"), 1.0, float("inf")], "humidity": [None, 500.0, None]},
    )
    decoded = decode_batch(encode_batch(make_batch(blocks=[block])), now_ms=NOW_MS)
    report = check_block_rows(decoded.blocks[0], now_ms=NOW_MS)
    assert [(row, type(error)) for row, error in report] == [
        (0, OutOfRangeError),  # seq comes first
        (1, TimestampWindowError),
        (2, NonFiniteValueError),
    ]
    first = decoded.blocks[0].values["pm25"][0]
    assert first is not None
    assert math.isnan(first)


@pytest.mark.parametrize(
    ("overrides", "expected", "fragment"),
    [
        pytest.param({"seq": [10, -1, 11]}, OutOfRangeError, "seq", id="negative-seq"),
        pytest.param({"seq": [10, SEQ_MAX + 1, 11]}, OutOfRangeError, "seq", id="seq-over-int64"),
        pytest.param(
            {"ts_ms": [NOW_MS, OLDEST_MS - 1, NOW_MS]}, TimestampWindowError, "ts_ms", id="ts-old"
        ),
        pytest.param(
            {"ts_ms": [NOW_MS, NEWEST_MS + 1, NOW_MS]}, TimestampWindowError, "ts_ms", id="ts-new"
        ),
        pytest.param(
            {"recv_ms": [NOW_MS, OLDEST_MS - 1, NOW_MS]},
            TimestampWindowError,
            "recv_ms",
            id="recv-old",
        ),
        pytest.param(
            {"values": {"pm25": [1.0, float("nan"), 1.0]}}, NonFiniteValueError, "pm25", id="nan"
        ),
        pytest.param(
            {"values": {"pm25": [1.0, float("inf"), 1.0]}}, NonFiniteValueError, "pm25", id="inf"
        ),
        pytest.param(
            {"values": {"temperature": [1.0, float("-inf"), 1.0]}},
            NonFiniteValueError,
            "temperature",
            id="-inf",
        ),
        pytest.param(
            {"values": {"pm25": [1.0, 1000.5, 1.0]}}, OutOfRangeError, "pm25", id="above-max"
        ),
        pytest.param(
            {"values": {"temperature": [1.0, -40.01, 1.0]}},
            OutOfRangeError,
            "temperature",
            id="below-min",
        ),
        pytest.param(
            {"values": {"pm25": [1.0, None, 1.0], "humidity": [1.0, None, 1.0]}},
            FieldTypeError,
            "no metric",
            id="no-values",
        ),
        pytest.param({"values": {}}, FieldTypeError, "no metric", id="no-columns"),
    ],
)
def test_check_block_rows_reports_bad_row(overrides, expected, fragment):
    block = make_block(**overrides)
    report = check_block_rows(block, now_ms=NOW_MS)
    if overrides.get("values") == {}:
        assert [row for row, _ in report] == [0, 1, 2]
    else:
        assert [row for row, _ in report] == [1]
    for _, error in report:
        assert type(error) is expected
        assert fragment in str(error)
        assert error.reason == expected.reason


def test_check_block_rows_integer_metric_must_be_whole():
    block = make_block(
        device_type="kiosk",
        values={"queue_length": [1.0, 2.5, 3.0], "printer_status": [0.0, 1.0, 5.0]},
    )
    report = check_block_rows(block, now_ms=NOW_MS)
    assert [(row, type(error)) for row, error in report] == [
        (1, OutOfRangeError),
        (2, OutOfRangeError),
    ]
    assert "whole" in str(report[0][1])
    assert "printer_status" in str(report[1][1])


def test_check_block_rows_refuses_a_malformed_block():
    raises_exactly(InconsistentBatchError, check_block_rows, make_block(seq=[1]), now_ms=NOW_MS)
    raises_exactly(
        UnknownDeviceTypeError, check_block_rows, make_block(device_type="x"), now_ms=NOW_MS
    )


def _expected_row_error(block: ReadingBlock, row: int) -> type[InputError] | None:
    """An independent oracle for check_block_rows, spelled out row by row."""
    if not 0 <= block.seq[row] <= SEQ_MAX:
        return OutOfRangeError
    for times in (block.ts_ms, block.recv_ms):
        if not OLDEST_MS <= times[row] <= NEWEST_MS:
            return TimestampWindowError
    dtype = DEVICE_TYPES[block.device_type]
    present = False
    for name, column in block.values.items():
        value = column[row]
        if value is None:
            continue
        present = True
        metric = dtype.metric(name)
        if math.isnan(value) or math.isinf(value):
            return NonFiniteValueError
        whole = metric.kind is MetricKind.FLOAT or value == int(value)
        if not (metric.min <= value <= metric.max and whole):
            return OutOfRangeError
    return None if present else FieldTypeError


def _any_values(metric: Metric) -> st.SearchStrategy[float | None]:
    near = st.floats(metric.min - 10, metric.max + 10)
    return st.none() | near | st.sampled_from([math.nan, math.inf, -math.inf, metric.max + 0.5])


@st.composite
def dirty_blocks(draw: st.DrawFn) -> ReadingBlock:
    dtype = draw(device_types)
    rows = draw(st.integers(0, 8))
    columns = draw(st.lists(st.sampled_from(dtype.metric_names), unique=True))
    times = st.integers(OLDEST_MS - 2, NEWEST_MS + 2) | in_window
    return ReadingBlock(
        device_type=dtype.name,
        device_index=[0] * rows,
        seq=draw(st.lists(st.integers(-2, 5) | seqs, min_size=rows, max_size=rows)),
        ts_ms=draw(st.lists(times, min_size=rows, max_size=rows)),
        recv_ms=draw(st.lists(times, min_size=rows, max_size=rows)),
        values={
            name: draw(st.lists(_any_values(dtype.metric(name)), min_size=rows, max_size=rows))
            for name in columns
        },
    )


@settings(max_examples=300)
@given(dirty_blocks())
def test_check_block_rows_agrees_with_row_by_row_oracle(block):
    report = check_block_rows(block, now_ms=NOW_MS)
    expected = [
        (row, error)
        for row in range(block.row_count)
        if (error := _expected_row_error(block, row)) is not None
    ]
    assert [(row, type(error)) for row, error in report] == expected


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_batch_round_trip(batch):
    decoded = decode_batch(encode_batch(batch), now_ms=NOW_MS)
    assert decoded == batch
    for block in decoded.blocks:
        assert check_block_rows(block, now_ms=NOW_MS) == []


@settings(max_examples=300)
@given(st.binary(max_size=300) | msgpack_values.map(msgspec.msgpack.encode))
def test_batch_decoder_raises_only_input_errors(payload):
    with contextlib.suppress(InputError):
        decode_batch(payload, now_ms=NOW_MS)


@settings(max_examples=300, deadline=None)
@given(
    st.data(),
    st.sampled_from(list(batch_dict())),
    msgpack_values,
)
def test_batch_shaped_fuzz_raises_only_input_errors(data, field, value):
    document = batch_dict()
    document[field] = value
    payload = bytearray(msgspec.msgpack.encode(document))
    # And flip a few bytes for good measure.
    for _ in range(data.draw(st.integers(0, 3))):
        position = data.draw(st.integers(0, len(payload) - 1))
        payload[position] = data.draw(st.integers(0, 255))
    with contextlib.suppress(InputError):
        decode_batch(bytes(payload), now_ms=NOW_MS)


# --- gateway state -----------------------------------------------------------------


def state_json(**overrides: Any) -> bytes:
    document = {
        "gateway_id": GW,
        "status": "online",
        "birth": 3,
        "boot_id": BOOT,
        "version": "0.1.0",
        "outbox_depth": 0,
        "ts_ms": NOW_MS,
    }
    document.update(overrides)
    return json.dumps(document).encode()


def test_gateway_state_is_readable_json():
    state = decode_gateway_state(state_json())
    assert state.status == "online"
    # A state from a gateway that predates the appended health fields decodes;
    # re-encoded, it keeps its fields and carries the new ones at their defaults.
    encoded = json.loads(encode_gateway_state(state))
    old = json.loads(state_json())
    assert {k: encoded[k] for k in old} == old
    assert encoded["readings_per_s"] == 0.0
    assert encoded["accepted"] == 0
    assert (state.outbox_refused_readings, state.outbox_dropped_readings) == (0, 0)
    assert encoded["outbox_refused_readings"] == encoded["outbox_dropped_readings"] == 0


@given(states)
def test_gateway_state_round_trip(state):
    assert decode_gateway_state(encode_gateway_state(state)) == state


@pytest.mark.parametrize(
    ("payload", "expected", "fragment"),
    [
        pytest.param(b"{", MalformedPayloadError, "", id="syntax"),
        pytest.param(state_json(status="sleeping"), FieldTypeError, "status", id="status"),
        pytest.param(state_json(birth="3"), FieldTypeError, "birth", id="str-birth"),
        pytest.param(
            json.dumps({"gateway_id": GW}).encode(), FieldTypeError, "status", id="missing"
        ),
        pytest.param(state_json(gateway_id="GW"), InvalidIdError, "gateway_id", id="gateway"),
        pytest.param(state_json(boot_id=""), InvalidIdError, "boot_id", id="boot"),
        pytest.param(state_json(birth=-1), OutOfRangeError, "birth", id="negative-birth"),
        pytest.param(state_json(outbox_depth=-1), OutOfRangeError, "outbox_depth", id="depth"),
        pytest.param(state_json(ts_ms=-1), OutOfRangeError, "ts_ms", id="negative-ts"),
        pytest.param(
            state_json(outbox_refused_readings=-1),
            OutOfRangeError,
            "outbox_refused_readings",
            id="negative-refused",
        ),
        pytest.param(
            state_json(outbox_dropped_readings=2**63),
            OutOfRangeError,
            "outbox_dropped_readings",
            id="dropped-past-bigint",
        ),
        pytest.param(
            state_json(version="x" * (1024 * 1024)), PayloadTooLargeError, "", id="oversized"
        ),
    ],
)
def test_decode_gateway_state_rejects(payload, expected, fragment):
    error = raises_exactly(expected, decode_gateway_state, payload)
    assert fragment in str(error)


# --- ack ---------------------------------------------------------------------------


@given(acks)
def test_ack_round_trip(ack):
    assert decode_ack(encode_ack(ack)) == ack


def test_ack_wire_format():
    ack = Ack(batch_ids=[BID], ts_ms=NOW_MS, digests=[payload_digest(b"batch")])
    assert encode_ack(ack) == (
        b'{"batch_ids":["gw-hn-001:0123456789abcdef:7"],"ts_ms":1767225600000,'
        b'"digests":["' + hashlib.sha256(b"batch").hexdigest()[:32].encode() + b'"],'
        b'"reports":[]}'
    )
    assert decode_ack(encode_ack(ack), gateway_id=GW) == ack


def test_ack_of_command_reports():
    ack = Ack(batch_ids=[], ts_ms=NOW_MS, reports=["c-1.sent", "c-1.succeeded"])
    assert decode_ack(encode_ack(ack), gateway_id=GW) == ack
    # An ack from before the field existed still decodes, naming no reports.
    assert decode_ack(b'{"batch_ids":[],"ts_ms":1}').reports == []


@pytest.mark.parametrize("bad", ["c-1", "c-1.later", "C-1.sent", ".sent", "c-1/x.sent"])
def test_ack_refuses_malformed_report_ids(bad):
    with pytest.raises(InputError):
        decode_ack(encode_ack(Ack(batch_ids=[], ts_ms=NOW_MS, reports=[bad])))


def test_an_ack_from_an_older_ingest_decodes_without_digests():
    ack = decode_ack(b'{"batch_ids":["gw-hn-001:0123456789abcdef:7"],"ts_ms":1}', gateway_id=GW)
    assert ack.digests == []


def test_payload_digest_is_32_lowercase_hex_characters_of_sha256():
    assert payload_digest(b"") == "e3b0c44298fc1c149afbf4c8996fb924"
    assert payload_digest(b"a") != payload_digest(b"b")


def test_a_will_says_so_and_older_states_are_not_wills():
    state = GatewayState(
        gateway_id=GW,
        status="offline",
        birth=1,
        boot_id="b1",
        version="1",
        outbox_depth=0,
        ts_ms=NOW_MS,
        will=True,
    )
    assert decode_gateway_state(encode_gateway_state(state)).will is True
    old = b'{"gateway_id":"gw-hn-001","status":"offline","birth":1,"boot_id":"b1",'
    old += b'"version":"1","outbox_depth":0,"ts_ms":1}'
    assert decode_gateway_state(old).will is False


@pytest.mark.parametrize(
    ("payload", "gateway_id", "expected", "fragment"),
    [
        pytest.param(b"{x", None, MalformedPayloadError, "", id="syntax"),
        pytest.param(
            b'{"batch_ids":"x","ts_ms":1}', None, FieldTypeError, "batch_ids", id="not-a-list"
        ),
        pytest.param(b'{"batch_ids":[]}', None, FieldTypeError, "ts_ms", id="missing-ts"),
        pytest.param(
            b'{"batch_ids":["x"],"ts_ms":1}', None, InvalidIdError, "'x'", id="bad-batch-id"
        ),
        pytest.param(
            b'{"batch_ids":["gw:b:01"],"ts_ms":1}', None, InvalidIdError, "01", id="leading-zero"
        ),
        pytest.param(
            json.dumps({"batch_ids": [BID, "gw-other:b:1"], "ts_ms": 1}).encode(),
            GW,
            InconsistentBatchError,
            "batch_ids[1]",
            id="other-gateway",
        ),
        pytest.param(b'{"batch_ids":[],"ts_ms":-5}', None, OutOfRangeError, "ts_ms", id="neg-ts"),
        pytest.param(
            json.dumps({"batch_ids": [BID, BID], "ts_ms": 1, "digests": ["0" * 32]}).encode(),
            GW,
            InconsistentBatchError,
            "digests has 1",
            id="digests-short",
        ),
        pytest.param(
            json.dumps({"batch_ids": [BID], "ts_ms": 1, "digests": ["A" * 32]}).encode(),
            GW,
            FieldTypeError,
            "digests[0]",
            id="digest-not-lowercase-hex",
        ),
        pytest.param(
            json.dumps({"batch_ids": [BID], "ts_ms": 1, "digests": ["0" * 4000]}).encode(),
            GW,
            FieldTypeError,
            "digests[0]",
            id="digest-oversized",
        ),
        pytest.param(
            json.dumps({"batch_ids": [BID], "ts_ms": 1, "digests": [7]}).encode(),
            GW,
            FieldTypeError,
            "digests",
            id="digest-not-a-string",
        ),
    ],
)
def test_decode_ack_rejects(payload, gateway_id, expected, fragment):
    error = raises_exactly(expected, decode_ack, payload, gateway_id=gateway_id)
    assert fragment in str(error)


def test_ack_size_limit():
    ack = Ack(batch_ids=[BID] * 10, ts_ms=NOW_MS)
    payload = encode_ack(ack)
    raises_exactly(PayloadTooLargeError, decode_ack, payload, max_bytes=len(payload) - 1)
    assert check_ack(ack, gateway_id=GW) == ack


# --- gateway config ----------------------------------------------------------------


def serial_device(**overrides: Any) -> dict[str, Any]:
    document = {
        "device_id": "aq-001",
        "device_type": "air_quality",
        "transport": "serial",
        "port": "/dev/ttyUSB0",
        "protocol": "pms5003",
    }
    document.update(overrides)
    return document


def mqtt_device(**overrides: Any) -> dict[str, Any]:
    document = {"device_id": "kiosk-001", "device_type": "kiosk", "transport": "mqtt"}
    document.update(overrides)
    return document


def config_json(*devices: dict[str, Any], **overrides: Any) -> bytes:
    document: dict[str, Any] = {
        "gateway_id": GW,
        "version": 4,
        "site_id": "hall-ba-dinh",
        "devices": list(devices) if devices else [serial_device(), mqtt_device()],
    }
    document.update(overrides)
    return json.dumps(document).encode()


def test_gateway_config_defaults():
    config = decode_gateway_config(config_json())
    kiosk = config.devices[1]
    assert (kiosk.port, kiosk.protocol, kiosk.label) == (None, None, "")
    assert kiosk.rate_limit_per_s == 5.0
    assert kiosk.enabled is True
    assert config.devices[0].port == "/dev/ttyUSB0"


@settings(deadline=None)
@given(gateway_configs())
def test_gateway_config_round_trip(config):
    assert decode_gateway_config(encode_gateway_config(config)) == config


@pytest.mark.parametrize(
    ("payload", "expected", "fragment"),
    [
        pytest.param(b"{]", MalformedPayloadError, "", id="syntax"),
        pytest.param(config_json(devices={}), FieldTypeError, "devices", id="devices-map"),
        pytest.param(config_json(version="4"), FieldTypeError, "version", id="str-version"),
        pytest.param(
            config_json(serial_device(transport="usb")), FieldTypeError, "transport", id="usb"
        ),
        pytest.param(
            config_json(mqtt_device(transport="serial", port="/dev/ttyS0", protocol="sds011")),
            FieldTypeError,
            "devices[0].transport",
            id="kiosk-on-serial",
        ),
        pytest.param(
            config_json(serial_device(port=None)), FieldTypeError, "port", id="serial-no-port"
        ),
        pytest.param(
            config_json(serial_device(protocol=None)),
            FieldTypeError,
            "protocol",
            id="serial-no-protocol",
        ),
        pytest.param(
            config_json(serial_device(protocol="modbus")),
            FieldTypeError,
            "modbus",
            id="unknown-protocol",
        ),
        pytest.param(
            config_json(serial_device(port="ttyUSB0")), FieldTypeError, "ttyUSB0", id="rel-port"
        ),
        pytest.param(
            config_json(serial_device(port="/dev/tty USB0")),
            FieldTypeError,
            "port",
            id="port-space",
        ),
        pytest.param(
            config_json(serial_device(port="socket://")), FieldTypeError, "port", id="empty-url"
        ),
        pytest.param(
            config_json(mqtt_device(port="/dev/ttyUSB0")),
            FieldTypeError,
            "port",
            id="mqtt-with-port",
        ),
        pytest.param(
            config_json(mqtt_device(protocol="pms5003")),
            FieldTypeError,
            "protocol",
            id="mqtt-with-protocol",
        ),
        pytest.param(
            config_json(mqtt_device(enabled="yes")), FieldTypeError, "enabled", id="str-enabled"
        ),
        pytest.param(
            config_json(mqtt_device(rate_limit_per_s=0)),
            OutOfRangeError,
            "rate_limit_per_s",
            id="zero-rate",
        ),
        pytest.param(
            config_json(mqtt_device(rate_limit_per_s=-1.5)),
            OutOfRangeError,
            "rate_limit_per_s",
            id="negative-rate",
        ),
        pytest.param(
            config_json(mqtt_device(device_type="toaster")),
            UnknownDeviceTypeError,
            "toaster",
            id="unknown-type",
        ),
        pytest.param(config_json(gateway_id="Gw"), InvalidIdError, "gateway_id", id="gateway"),
        pytest.param(config_json(site_id="a b"), InvalidIdError, "site_id", id="site"),
        pytest.param(
            config_json(mqtt_device(device_id="+")), InvalidIdError, "device_id", id="device"
        ),
        pytest.param(
            config_json(mqtt_device(), mqtt_device()),
            InvalidIdError,
            "devices[1].device_id",
            id="duplicate-device",
        ),
        pytest.param(config_json(version=-1), OutOfRangeError, "version", id="negative-version"),
    ],
)
def test_decode_gateway_config_rejects(payload, expected, fragment):
    error = raises_exactly(expected, decode_gateway_config, payload)
    assert fragment in str(error)


def test_gateway_config_rate_limit_must_be_finite():
    device = DeviceConfig(
        device_id="k-1", device_type="kiosk", transport="mqtt", rate_limit_per_s=math.inf
    )
    config = GatewayConfig(gateway_id=GW, version=1, site_id="s-1", devices=[device])
    raises_exactly(NonFiniteValueError, check_gateway_config, config)
    # JSON can only say "infinite" as an overflowing literal: a type error at decode.
    payload = config_json(mqtt_device(rate_limit_per_s=12345.5)).replace(b"12345.5", b"1e999")
    error = raises_exactly(FieldTypeError, decode_gateway_config, payload)
    assert "rate_limit_per_s" in str(error)


@settings(max_examples=200)
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_control_decoders_raise_only_input_errors(payload):
    for decode in (decode_gateway_state, decode_ack, decode_gateway_config):
        with contextlib.suppress(InputError):
            decode(payload)
