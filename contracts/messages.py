"""Wire messages: msgspec structs, their codecs and the checks every receiver runs.

==================  ==========================  =======  ==========================
message             topic (contracts.topics)    codec    producer -> consumer
==================  ==========================  =======  ==========================
DeviceUplink        d/{device}/up               JSON     device -> gateway
device status       d/{device}/status           text     device (Will) -> gateway
Batch               hub/v1/gw/{gw}/batch        msgpack  gateway -> ingest
GatewayState        hub/v1/gw/{gw}/state        JSON     gateway (Will) -> anyone
Ack                 hub/v1/gw/{gw}/ack          JSON     ingest -> gateway
GatewayConfig       hub/v1/gw/{gw}/config       JSON     registry -> gateway
==================  ==========================  =======  ==========================

A GatewayState that is not a Will also carries the gateway's rejects since
the previous one that did (``RejectCount`` per device and reason), so that
what a gateway refuses reaches the central ``rejects`` table.

Every ``decode_*`` function checks the payload size first, then the syntax
(MalformedPayloadError), the types (FieldTypeError), then the meaning against
the device catalog and the id allow-list, and raises the most specific
InputError naming the offending field. ``encode_*`` functions trust their
argument: they do not validate (the simulator builds faulty messages on
purpose; a producer that wants to be sure calls the matching ``check_*``).

The one exception to "raise, never return errors" is ``check_block_rows``: a
batch is accepted or refused as a whole by ``decode_batch``, but a bad
*reading* inside an accepted batch (NaN, out of range, out of the time window)
must not sink its neighbours, so ``check_block_rows`` returns a per-row report
that ingest uses to route those rows to the rejects table.

Evolution: append fields with defaults, never change a field's type or remove
one (old gateways and old ingest workers run side by side during an upgrade).
Unknown fields are ignored on decode so that an older receiver accepts a newer
sender's messages. Clocks, I/O and logging are the callers' business.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable
from operator import itemgetter
from typing import Any, Final, Literal, TypeVar

import msgspec

from contracts import catalog
from contracts.catalog import DeviceType, Metric
from contracts.commands import STATE_RANK
from contracts.decoding import check_size as _check_size
from contracts.decoding import decode_payload as _decode
from contracts.errors import (
    FieldTypeError,
    InconsistentBatchError,
    InputError,
    InvalidIdError,
    InvalidPortError,
    MalformedPayloadError,
    NonFiniteValueError,
    OutOfRangeError,
    TimestampWindowError,
    UnknownDeviceTypeError,
    UnknownMetricError,
)
from contracts.ids import (
    DEFAULT_MAX_FUTURE_MS,
    DEFAULT_MAX_PAST_MS,
    ID_PATTERN,
    check_id,
    check_timestamp,
    is_valid_id,
    parse_batch_id,
)
from contracts.lorawanmodels import LorawanModel
from contracts.registermaps import (
    POLL_INTERVAL_MAX_S,
    POLL_INTERVAL_MIN_S,
    SLAVE_ID_MAX,
    SLAVE_ID_MIN,
    ModbusModel,
)
from contracts.serialurl import check_port_url

# A device uplink carries at most the 8 metrics of the widest catalog type:
# 200-400 bytes of JSON (a float spelled with 17 digits is 22 bytes). 4 KiB
# leaves 10x headroom (pretty-printed firmware output, future fields) while
# bounding what a misbehaving device can make a small gateway parse per message.
DEVICE_PAYLOAD_MAX_BYTES: Final = 4096

# A batch row costs 9 bytes per metric (msgpack float64) plus ~24 for index,
# seq and two timestamps: a 100-row air-quality batch is ~10 KB (measured 9.7),
# and even a backlog batch of 50,000 rows stays under 5 MB. 8 MiB bounds
# ingest's memory per in-flight message (decoded, a float costs 32 bytes in a
# Python list instead of 9: ~4x the wire size). Mosquitto's
# `message_size_limit` defaults to 0, i.e. the MQTT maximum of 256 MiB; when a
# broker config sets it, it must be at least this, because Mosquitto drops an
# oversized QoS 1 message *after* completing the PUBACK flow (v5 clients see
# only a reason code), so gateways must never build a batch above this limit.
BATCH_MAX_BYTES: Final = 8 * 1024 * 1024

# State, ack and config messages: a config for a 2,000-device site is ~400 KB
# of JSON (~200 bytes a device) and an ack for 1,000 batches at most ~150 KB
# (a batch id is at most 149 characters); 1 MiB covers both.
CONTROL_MAX_BYTES: Final = 1024 * 1024

# An ack names each batch by its id AND the digest of the exact payload that
# was committed (or refused and stored) under it: SHA-256, the first 16 bytes
# in hex. 128 bits put a second payload with a given digest (what a spoof
# that wants to remove a real batch needs) far out of reach; a full 64-hex
# digest would only make acks longer.
DIGEST_HEX_CHARS: Final = 32
_DIGEST_RE: Final = re.compile(f"[0-9a-f]{{{DIGEST_HEX_CHARS}}}")

# Sequence numbers end up in PostgreSQL bigint columns (contracts.schema).
SEQ_MAX: Final = 2**63 - 1

# 9999-12-31T23:59:59.999Z: PostgreSQL's timestamptz goes further (year
# 294276), but no clock that reads past this is telling the time.
TS_MAX_MS: Final = 253_402_300_799_999

# A software version such as "1.4.0+git.0123abcd" is ~20 characters; 64 leaves
# room for a longer build tag and keeps a board's table column readable.
VERSION_MAX_CHARS: Final = 64

# Serial frame protocols the gateway can decode (contracts frame codecs).
SERIAL_PROTOCOLS: Final = ("pms5003", "sds011")

DeviceStatus = Literal["online", "offline"]
GatewayStatus = Literal["online", "offline"]
Transport = Literal["serial", "mqtt", "modbus", "lorawan", "http"]
TRANSPORTS: Final[tuple[Transport, ...]] = ("serial", "mqtt", "modbus", "lorawan", "http")
# A LoRaWAN DevEUI: 8 bytes, written as ChirpStack's topics and events do (lower-case hex).
DEV_EUI_RE: Final = re.compile(r"[0-9a-f]{16}")
# An HTTP device's token is kept by the gateway only as its SHA-256 (hex).
TOKEN_SHA256_RE: Final = re.compile(r"[0-9a-f]{64}")

_T = TypeVar("_T")


# --- shared helpers -------------------------------------------------------------


def payload_digest(payload: bytes) -> str:
    """The digest an ack names a payload by (DIGEST_HEX_CHARS lowercase hex characters)."""
    return hashlib.sha256(payload).hexdigest()[:DIGEST_HEX_CHARS]


def _lookup_type(name: str, where: str) -> DeviceType:
    try:
        return catalog.device_type(name)
    except UnknownDeviceTypeError as exc:
        raise UnknownDeviceTypeError(f"{where}: {exc}") from exc


def _lookup_metric(dtype: DeviceType, name: str, where: str) -> Metric:
    try:
        return dtype.metric(name)
    except UnknownMetricError as exc:
        raise UnknownMetricError(f"{where}: {exc}") from exc


def _check_non_negative(value: int, what: str, maximum: int = SEQ_MAX) -> int:
    if not 0 <= value <= maximum:
        raise OutOfRangeError(f"{what} {value} is outside [0, {maximum}]")
    return value


_JSON_ENCODER: Final = msgspec.json.Encoder()
_MSGPACK_ENCODER: Final = msgspec.msgpack.Encoder()


# --- device uplink (device -> gateway, JSON) ------------------------------------


class DeviceUplink(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One reading from a device: ``{"seq": 7, "ts": 1767225600000, "m": {"pm25": 12.5}}``."""

    # Per-device counter, reset only by a reboot; the gateway uses it to spot
    # gaps and duplicates.
    seq: int
    # Integer milliseconds UTC, stamped by the device.
    ts_ms: int = msgspec.field(name="ts")
    metrics: dict[str, float] = msgspec.field(name="m")
    # Device boot id (appended field): lets the gateway see reboots besides seq resets.
    boot: str | None = None


class _DeviceUplinkWire(msgspec.Struct, frozen=True, kw_only=True):
    """DeviceUplink as decoded, before checks; must keep DeviceUplink's fields.

    Metric values are untyped here, decoded with ``float_hook=float``: a typed
    ``float`` field turns ``1e999`` into a ValidationError ("Number out of
    range") that does not say which metric, whereas ``float("1e999")`` is inf,
    which the checks below report as non-finite, naming the metric.
    """

    seq: int
    ts_ms: int = msgspec.field(name="ts")
    metrics: dict[str, Any] = msgspec.field(name="m")
    boot: str | None = None


_UPLINK_DECODER: Final = msgspec.json.Decoder(_DeviceUplinkWire, float_hook=float)


def _metric_value(dtype: DeviceType, name: str, value: object) -> float:
    """Check one uplink metric: known name, a number (not a bool), finite, in range."""
    metric = _lookup_metric(dtype, name, f"m.{name}")
    # bool is an int subclass, but `true` is not a metric value (BOOL metrics are 0 / 1).
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FieldTypeError(f"m.{name}: expected a number, got {type(value).__name__} {value!r}")
    try:
        number = float(value)
    except OverflowError:
        raise NonFiniteValueError(f"m.{name}: {value} does not fit a 64-bit float") from None
    return metric.check(number)


# The fast path of decode_device_uplink: a typed decode straight into
# DeviceUplink and one range comparison per metric. It accepts exactly what the
# checks below accept and returns None for anything else, which then takes the
# detailed path to be rejected with its precise reason: a gateway receives tens
# of thousands of good readings a second and very few bad ones.
_FAST_UPLINK_DECODER: Final = msgspec.json.Decoder(DeviceUplink)
# metric -> (min, max, whole number required)
_Bounds = dict[str, tuple[float, float, bool]]
# device type -> its _Bounds; rebuilt in place
# for each installed catalog (a type a gateway receives with its config).
_METRIC_BOUNDS: Final[dict[str, _Bounds]] = {}


def _follow_bounds(installed: catalog.Catalog) -> None:
    # Key by key: a reader in another thread sees each type's old or new bounds.
    for name, dtype in installed.types.items():
        _METRIC_BOUNDS[name] = {
            m.name: (m.min, m.max, m.kind is not catalog.MetricKind.FLOAT) for m in dtype.metrics
        }
    for name in [name for name in _METRIC_BOUNDS if name not in installed.types]:
        _METRIC_BOUNDS.pop(name, None)


catalog.follow_catalog(_follow_bounds)


def _uplink_fits(
    uplink: DeviceUplink,
    bounds: _Bounds,
    low_ts_ms: int,
    high_ts_ms: int,
) -> bool:
    """True if a typed-decoded uplink passes every check of the detailed path."""
    if (
        not 0 <= uplink.seq <= SEQ_MAX
        or not low_ts_ms <= uplink.ts_ms <= high_ts_ms
        or not uplink.metrics
        or (uplink.boot is not None and not is_valid_id(uplink.boot))
    ):
        return False
    for name, value in uplink.metrics.items():
        limits = bounds.get(name)
        # NaN fails both comparisons; a typed decode never yields infinities.
        if limits is None or not limits[0] <= value <= limits[1]:
            return False
        if limits[2] and value != int(value):
            return False
    return True


def _accept_uplink(  # noqa: PLR0917 - the arguments of decode_device_uplink, passed on
    payload: bytes,
    device_type: str,
    now_ms: int,
    max_bytes: int,
    max_past_ms: int,
    max_future_ms: int,
) -> DeviceUplink | None:
    bounds = _METRIC_BOUNDS.get(device_type)
    if bounds is None or len(payload) > max_bytes:
        return None
    try:
        uplink = _FAST_UPLINK_DECODER.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    if _uplink_fits(uplink, bounds, now_ms - max_past_ms, now_ms + max_future_ms):
        return uplink
    return None


# Below this many uplinks, accept_device_uplinks checks them one by one: the
# column checks cost a few list and set builds per call, which only pays from
# a handful of readings on (bench figures in the function's commit).
_GROUP_MIN_UPLINKS: Final = 16


def _decode_group(payloads: list[bytes], max_bytes: int) -> list[DeviceUplink | None]:
    """Typed decode of each payload; None for one too large or not decodable."""
    decode = _FAST_UPLINK_DECODER.decode
    if max(map(len, payloads)) <= max_bytes:
        try:
            return [decode(payload) for payload in payloads]
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            pass  # one of them is bad: find it below
    decoded: list[DeviceUplink | None] = []
    for payload in payloads:
        try:
            decoded.append(decode(payload) if len(payload) <= max_bytes else None)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            decoded.append(None)
    return decoded


def _metrics_fit(dicts: list[dict[str, float]], bounds: _Bounds) -> bool:
    """True if ``dicts`` all have the first one's metric names and every value is in bounds.

    False also when their names differ (the caller then groups them by
    names). Column by column: min, max and the whole-number test run in C
    over each metric's values. A typed decode yields neither NaN nor
    infinities (JSON has no literal for them and msgspec refuses a number past
    the float range), so min and max see every value.
    """
    names = tuple(dicts[0])
    if not names or max(map(len, dicts)) != len(names):
        return False
    try:
        rows = list(map(itemgetter(*names), dicts))
    except KeyError:
        return False
    columns = zip(*rows, strict=True) if len(names) > 1 else (rows,)
    for name, column in zip(names, columns, strict=True):
        limits = bounds.get(name)
        if limits is None or not limits[0] <= min(column) or not max(column) <= limits[1]:
            return False
        if limits[2] and not all(map(float.is_integer, column)):
            return False
    return True


def accept_device_uplinks(
    payloads: list[bytes],
    *,
    device_type: str,
    now_ms: int,
    max_bytes: int = DEVICE_PAYLOAD_MAX_BYTES,
    max_past_ms: int = DEFAULT_MAX_PAST_MS,
    max_future_ms: int = DEFAULT_MAX_FUTURE_MS,
) -> list[DeviceUplink | None]:
    """The fast path of ``decode_device_uplink`` over uplinks of devices of one type.

    Entry i of the result is the DeviceUplink ``decode_device_uplink``
    returns for ``payloads[i]``, or None where that has to look closer: the
    caller then calls ``decode_device_uplink`` for that payload, which raises
    the precise error (or accepts it after all). The readings are checked
    column by column: seq, ts and boot over all of them, then each metric's
    values over the readings with the same metric names, so the per-reading
    Python work is a few list entries instead of a loop over its metrics. If
    one of them fails, they are checked one by one to find it.
    """
    bounds = _METRIC_BOUNDS.get(device_type)
    if bounds is None:
        return [None] * len(payloads)
    low_ts_ms, high_ts_ms = now_ms - max_past_ms, now_ms + max_future_ms
    if len(payloads) < _GROUP_MIN_UPLINKS:
        return [
            _accept_uplink(payload, device_type, now_ms, max_bytes, max_past_ms, max_future_ms)
            for payload in payloads
        ]
    decoded = _decode_group(payloads, max_bytes)
    uplinks = [u for u in decoded if u is not None]
    if uplinks and _all_fit(uplinks, bounds, low_ts_ms, high_ts_ms):
        return decoded
    return [
        u if u is not None and _uplink_fits(u, bounds, low_ts_ms, high_ts_ms) else None
        for u in decoded
    ]


def _all_fit(
    uplinks: list[DeviceUplink],
    bounds: _Bounds,
    low_ts_ms: int,
    high_ts_ms: int,
) -> bool:
    """True if every one of ``uplinks`` passes ``_uplink_fits``, checked column by column."""
    seqs = [u.seq for u in uplinks]
    stamps = [u.ts_ms for u in uplinks]
    if (
        min(seqs) < 0
        or max(seqs) > SEQ_MAX
        or min(stamps) < low_ts_ms
        or max(stamps) > high_ts_ms
        or not all(map(is_valid_id, {u.boot for u in uplinks if u.boot is not None}))
    ):
        return False
    dicts = [u.metrics for u in uplinks]
    if _metrics_fit(dicts, bounds):
        return True
    # Readings of one type whose metric names differ (firmware that leaves
    # out a metric now and then): each set of names on its own.
    shapes: dict[tuple[str, ...], list[dict[str, float]]] = {}
    for metrics in dicts:
        shapes.setdefault(tuple(metrics), []).append(metrics)
    return len(shapes) > 1 and all(_metrics_fit(group, bounds) for group in shapes.values())


def decode_device_uplink(
    payload: bytes,
    *,
    device_type: str,
    now_ms: int,
    max_bytes: int = DEVICE_PAYLOAD_MAX_BYTES,
    max_past_ms: int = DEFAULT_MAX_PAST_MS,
    max_future_ms: int = DEFAULT_MAX_FUTURE_MS,
) -> DeviceUplink:
    """Decode and check a device uplink for a device of ``device_type``.

    Raises PayloadTooLargeError, MalformedPayloadError, FieldTypeError (also
    for a bool metric value or an empty ``m``), OutOfRangeError (negative
    seq, value outside the metric's range), TimestampWindowError (its
    message says so when ``ts`` looks like seconds), UnknownDeviceTypeError,
    UnknownMetricError (any metric the type lacks; see
    ``decode_device_uplink_tolerant``), NonFiniteValueError, InvalidIdError
    (``boot``).
    """
    fast = _accept_uplink(payload, device_type, now_ms, max_bytes, max_past_ms, max_future_ms)
    if fast is not None:
        return fast
    return _check_uplink(payload, device_type, now_ms, max_bytes, max_past_ms, max_future_ms)


def decode_device_uplink_tolerant(
    payload: bytes,
    *,
    device_type: str,
    now_ms: int,
    max_bytes: int = DEVICE_PAYLOAD_MAX_BYTES,
    max_past_ms: int = DEFAULT_MAX_PAST_MS,
    max_future_ms: int = DEFAULT_MAX_FUTURE_MS,
) -> tuple[DeviceUplink, list[str]]:
    """``decode_device_uplink`` that keeps the known metrics of a reading with unknown ones.

    Returns the uplink with the metrics of ``device_type`` only, and the
    names of the metrics it dropped (in payload order; empty if none). A
    device type whose ``unknown_metrics`` is "reject", or a reading with no
    known metric at all, raises UnknownMetricError as ``decode_device_uplink``
    does; every other check is the same. The gateway calls this only after
    ``decode_device_uplink`` raised UnknownMetricError, so the fast path of
    good readings is not touched.
    """
    unknown: list[str] = []
    uplink = _check_uplink(
        payload, device_type, now_ms, max_bytes, max_past_ms, max_future_ms, unknown=unknown
    )
    return uplink, unknown


# Milliseconds since 1970 passed 10**11 in March 1973 and seconds will not
# reach it for another 3,000 years: a ts below it is a clock in seconds.
SECONDS_LIKE_BELOW_MS: Final = 10**11

# Longest metric name quoted back in an error about it (names are identifiers
# of a few characters; a payload of up to 4 KiB could carry a longer key).
_NAME_QUOTE_CHARS: Final = 64


def _check_uplink_ts(ts_ms: int, now_ms: int, max_past_ms: int, max_future_ms: int) -> None:
    try:
        check_timestamp(
            ts_ms, now_ms, max_past_ms=max_past_ms, max_future_ms=max_future_ms, what="ts"
        )
    except TimestampWindowError as exc:
        if 0 <= ts_ms < SECONDS_LIKE_BELOW_MS:
            raise TimestampWindowError(
                f"{exc}: {ts_ms} looks like seconds; ts is integer milliseconds since "
                "1970-01-01 UTC (seconds x 1000)"
            ) from None
        raise


def _check_uplink(  # noqa: PLR0917 - the arguments of decode_device_uplink, passed on
    payload: bytes,
    device_type: str,
    now_ms: int,
    max_bytes: int,
    max_past_ms: int,
    max_future_ms: int,
    *,
    unknown: list[str] | None = None,
) -> DeviceUplink:
    """The detailed path: every check in turn, raising the first failure's error.

    With ``unknown`` given and the type's ``unknown_metrics`` "report",
    metrics the type lacks are appended to it and left out of the result.
    """
    _check_size(payload, max_bytes, "device uplink")
    dtype = _lookup_type(device_type, "device_type")
    wire = _decode(_UPLINK_DECODER, payload, "device uplink")
    _check_non_negative(wire.seq, "seq")
    _check_uplink_ts(wire.ts_ms, now_ms, max_past_ms, max_future_ms)
    if wire.boot is not None:
        check_id(wire.boot, "boot")
    if not wire.metrics:
        raise FieldTypeError("m: a device uplink needs at least one metric")
    values = wire.metrics
    if unknown is not None and dtype.unknown_metrics == "report":
        known = dtype.metric_names
        unknown.extend(name[:_NAME_QUOTE_CHARS] for name in values if name not in known)
        if unknown:
            values = {name: value for name, value in values.items() if name in known}
            if not values:
                raise UnknownMetricError(
                    f"m: device type {dtype.name!r} has none of the metrics {unknown!r}"
                )
    metrics = {name: _metric_value(dtype, name, value) for name, value in values.items()}
    return DeviceUplink(seq=wire.seq, ts_ms=wire.ts_ms, metrics=metrics, boot=wire.boot)


def encode_device_uplink(message: DeviceUplink) -> bytes:
    """JSON for ``d/{device_id}/up``; ``boot`` is left out when None."""
    return _JSON_ENCODER.encode(message)


# --- device status (device Will, plain text) ------------------------------------

DEVICE_ONLINE: Final = b"online"
DEVICE_OFFLINE: Final = b"offline"


def encode_device_status(status: DeviceStatus) -> bytes:
    """Payload for the retained ``d/{device_id}/status``."""
    if status == "online":
        return DEVICE_ONLINE
    if status == "offline":
        return DEVICE_OFFLINE
    raise FieldTypeError(f"device status {status!r} is not 'online' or 'offline'")


def decode_device_status(payload: bytes) -> DeviceStatus:
    """``online`` / ``offline``; anything else is MalformedPayloadError."""
    if payload == DEVICE_ONLINE:
        return "online"
    if payload == DEVICE_OFFLINE:
        return "offline"
    raise MalformedPayloadError(f"device status {payload[:32]!r} is not 'online' or 'offline'")


# --- batch (gateway -> ingest, msgpack, columnar) -------------------------------
#
# Structs are maps, not array_like: in the columnar layout field names are paid
# once per batch and once per block (measured: 113 bytes, 1.2% of a 100-row
# air-quality batch of 9.7 KB), and maps keep a stored reject readable with any
# msgpack tool and make a field-order mistake between two software versions
# impossible.


class ReadingBlock(msgspec.Struct, frozen=True, kw_only=True):
    """The rows of one device type in a batch, column by column.

    Every list has one entry per row; ``values`` has one column per metric
    present in the block (None where a row lacks that metric).
    """

    device_type: str
    device_index: list[int]  # index into Batch.devices
    seq: list[int]
    ts_ms: list[int]  # device time, ms UTC
    recv_ms: list[int]  # gateway receive time, ms UTC
    values: dict[str, list[float | None]]

    @property
    def row_count(self) -> int:
        return len(self.device_index)


class Batch(msgspec.Struct, frozen=True, kw_only=True):
    """A gateway's batch of readings; ``batch_id`` is ``{gateway_id}:{boot_id}:{counter}``."""

    batch_id: str
    gateway_id: str
    boot_id: str
    sent_ms: int  # when the batch was built; kept unchanged on resend
    devices: list[str]  # device ids, referenced by ReadingBlock.device_index
    blocks: list[ReadingBlock]
    # Appended: per-device boot id aligned with `devices` (None: unknown);
    # an empty list means no device reported one.
    device_boot: list[str | None] = msgspec.field(default_factory=list)


_BATCH_DECODER: Final = msgspec.msgpack.Decoder(Batch)


def _check_block_columns(block: ReadingBlock, where: str) -> DeviceType:
    """Device type and metric names known, every column as long as device_index."""
    dtype = _lookup_type(block.device_type, f"{where}.device_type")
    rows = len(block.device_index)
    for name, column in (("seq", block.seq), ("ts_ms", block.ts_ms), ("recv_ms", block.recv_ms)):
        if len(column) != rows:
            raise InconsistentBatchError(
                f"{where}.{name} has {len(column)} rows, device_index has {rows}"
            )
    for name, values in block.values.items():
        _lookup_metric(dtype, name, f"{where}.values.{name}")
        if len(values) != rows:
            raise InconsistentBatchError(
                f"{where}.values.{name} has {len(values)} rows, device_index has {rows}"
            )
    return dtype


# The ids of a batch's devices, one a line: each line an id (ID_PATTERN without ^ and $).
_ID_LINES_RE: Final = re.compile(f"(?:{ID_PATTERN[1:-1]}\n)*{ID_PATTERN[1:-1]}")


def _ids_unique_and_valid(ids: list[str]) -> bool:
    """Whether every entry is a valid id and none repeats: one regex and one set, not a loop.

    False says only that the caller must look entry by entry. An id holding a
    line break would split into two lines, so the line count must match too.
    """
    if not ids:
        return True
    try:
        text = "\n".join(ids)
        unique = len(set(ids)) == len(ids)
    except TypeError:  # not all strings
        return False
    return unique and text.count("\n") == len(ids) - 1 and _ID_LINES_RE.fullmatch(text) is not None


def _check_device_ids(ids: list[str]) -> None:
    """Every device id of a batch valid (InvalidIdError), none twice (InconsistentBatchError)."""
    if _ids_unique_and_valid(ids):
        return
    # Find the first bad entry and say what is wrong with it.
    seen: dict[str, int] = {}
    for index, device_id in enumerate(ids):
        check_id(device_id, f"devices[{index}]")
        if device_id in seen:
            raise InconsistentBatchError(
                f"devices[{index}] {device_id!r} repeats devices[{seen[device_id]}]"
            )
        seen[device_id] = index


def check_batch(
    batch: Batch,
    *,
    now_ms: int,
    max_past_ms: int = DEFAULT_MAX_PAST_MS,
    max_future_ms: int = DEFAULT_MAX_FUTURE_MS,
) -> Batch:
    """The batch-level checks of ``decode_batch``; return ``batch`` or raise.

    Ids (InvalidIdError), batch id consistent with gateway and boot id, equal
    column lengths, device indexes in range, one device type per device,
    ``device_boot`` aligned with ``devices`` (InconsistentBatchError), known
    device types and metric names, ``sent_ms`` in the window
    (TimestampWindowError). Individual readings are not checked here: see
    ``check_block_rows``. A gateway may call this before publishing.
    """
    check_id(batch.gateway_id, "gateway_id")
    check_id(batch.boot_id, "boot_id")
    id_gateway, id_boot, _ = parse_batch_id(batch.batch_id)
    if (id_gateway, id_boot) != (batch.gateway_id, batch.boot_id):
        raise InconsistentBatchError(
            f"batch_id {batch.batch_id!r} does not match gateway_id {batch.gateway_id!r}"
            f" and boot_id {batch.boot_id!r}"
        )
    check_timestamp(
        batch.sent_ms, now_ms, max_past_ms=max_past_ms, max_future_ms=max_future_ms, what="sent_ms"
    )
    _check_device_ids(batch.devices)
    if batch.device_boot:
        if len(batch.device_boot) != len(batch.devices):
            raise InconsistentBatchError(
                f"device_boot has {len(batch.device_boot)} entries, devices has"
                f" {len(batch.devices)}"
            )
        for index, boot in enumerate(batch.device_boot):
            if boot is not None:
                check_id(boot, f"device_boot[{index}]")
    device_count = len(batch.devices)
    type_of_device: dict[int, str] = {}
    for block_index, block in enumerate(batch.blocks):
        where = f"blocks[{block_index}]"
        _check_block_columns(block, where)
        if not block.device_index:
            continue
        if min(block.device_index) < 0 or max(block.device_index) >= device_count:
            row, bad = next(
                (row, i) for row, i in enumerate(block.device_index) if not 0 <= i < device_count
            )
            raise InconsistentBatchError(
                f"{where}.device_index[{row}] = {bad} is outside [0, {device_count})"
            )
        indexes = set(block.device_index)
        if type_of_device.keys().isdisjoint(indexes):
            # No device of this block seen in an earlier one: nothing to compare.
            type_of_device.update(dict.fromkeys(indexes, block.device_type))
            continue
        for device_index in indexes:
            other = type_of_device.setdefault(device_index, block.device_type)
            if other != block.device_type:
                raise InconsistentBatchError(
                    f"{where}: device {batch.devices[device_index]!r} appears as"
                    f" {block.device_type!r} and as {other!r}"
                )
    return batch


def decode_batch(
    payload: bytes,
    *,
    now_ms: int,
    max_bytes: int = BATCH_MAX_BYTES,
    max_past_ms: int = DEFAULT_MAX_PAST_MS,
    max_future_ms: int = DEFAULT_MAX_FUTURE_MS,
) -> Batch:
    """Decode a batch and run ``check_batch``; any error refuses the whole batch.

    Raises PayloadTooLargeError, MalformedPayloadError, FieldTypeError,
    InvalidIdError, InconsistentBatchError, UnknownDeviceTypeError,
    UnknownMetricError, TimestampWindowError (``sent_ms``). Readings that are
    NaN, out of range or out of the window pass: ``check_block_rows`` finds them.
    """
    _check_size(payload, max_bytes, "batch")
    batch = _decode(_BATCH_DECODER, payload, "batch")
    return check_batch(batch, now_ms=now_ms, max_past_ms=max_past_ms, max_future_ms=max_future_ms)


def encode_batch(batch: Batch) -> bytes:
    """msgpack for ``hub/v1/gw/{gateway_id}/batch``."""
    return _MSGPACK_ENCODER.encode(batch)


def _check_row(
    block: ReadingBlock,
    row: int,
    metrics: list[tuple[Metric, list[float | None]]],
    *,
    now_ms: int,
    max_past_ms: int,
    max_future_ms: int,
) -> None:
    """Raise the first problem of one row, in a fixed order: seq, ts_ms, recv_ms, values."""
    _check_non_negative(block.seq[row], "seq")
    for what, times in (("ts_ms", block.ts_ms), ("recv_ms", block.recv_ms)):
        check_timestamp(
            times[row], now_ms, max_past_ms=max_past_ms, max_future_ms=max_future_ms, what=what
        )
    present = 0
    for metric, column in metrics:
        value = column[row]
        if value is not None:
            metric.check(value)
            present += 1
    if not present:
        raise FieldTypeError("row has no metric values")


def _suspect_rows(
    block: ReadingBlock,
    metrics: list[tuple[Metric, list[float | None]]],
    earliest_ms: int,
    latest_ms: int,
) -> set[int]:
    """Rows that *may* be bad: a superset found column by column, cheaply.

    Chained comparisons are False for NaN, so NaN and infinities land here
    along with out-of-range values; ``_check_row`` then names the exact error.
    """
    suspects = {row for row, seq in enumerate(block.seq) if not 0 <= seq <= SEQ_MAX}
    for column in (block.ts_ms, block.recv_ms):
        suspects.update(row for row, ts in enumerate(column) if not earliest_ms <= ts <= latest_ms)
    for metric, values in metrics:
        low, high = metric.min, metric.max
        if metric.kind is catalog.MetricKind.FLOAT:
            suspects.update(
                row
                for row, value in enumerate(values)
                if value is not None and not low <= value <= high
            )
        else:
            suspects.update(
                row
                for row, value in enumerate(values)
                if value is not None and (not low <= value <= high or value != int(value))
            )
    width = len(metrics)
    if width:
        suspects.update(
            row
            for row, row_values in enumerate(zip(*(v for _, v in metrics), strict=True))
            if row_values.count(None) == width
        )
    else:
        suspects.update(range(block.row_count))
    return suspects


def check_block_rows(
    block: ReadingBlock,
    *,
    now_ms: int,
    max_past_ms: int = DEFAULT_MAX_PAST_MS,
    max_future_ms: int = DEFAULT_MAX_FUTURE_MS,
) -> list[tuple[int, InputError]]:
    """Per-row validation report of a block: ``[(row, error), ...]`` in row order.

    This returns errors instead of raising on purpose: it is the report ingest
    uses to store bad readings in the rejects table (each with
    ``error.reason``) while committing the good ones. A row's error is the
    first of: seq outside [0, 2**63) (OutOfRangeError), ``ts_ms`` or
    ``recv_ms`` out of the window (TimestampWindowError), a value NaN or
    infinite (NonFiniteValueError) or outside its metric's range or not whole
    for an integer metric (OutOfRangeError), no value at all (FieldTypeError).

    The block's shape must be sound (``decode_batch`` checked it); if it is
    not, this raises InconsistentBatchError / UnknownDeviceTypeError /
    UnknownMetricError rather than report every row.
    """
    dtype = _check_block_columns(block, "block")
    return check_sound_block_rows(
        block, dtype, now_ms=now_ms, max_past_ms=max_past_ms, max_future_ms=max_future_ms
    )


def check_sound_block_rows(
    block: ReadingBlock,
    dtype: DeviceType,
    *,
    now_ms: int,
    max_past_ms: int = DEFAULT_MAX_PAST_MS,
    max_future_ms: int = DEFAULT_MAX_FUTURE_MS,
) -> list[tuple[int, InputError]]:
    """``check_block_rows`` of a block that ``check_batch`` already passed.

    ``dtype`` is the block's device type. The shape is not checked again:
    a block whose columns ``check_batch`` did not pass may raise anything.
    Ingest calls this once per block of a decoded batch.
    """
    metrics = [(dtype.metric(name), values) for name, values in block.values.items()]
    earliest_ms = now_ms - max_past_ms
    latest_ms = now_ms + max_future_ms
    return check_rows(
        block,
        dtype,
        sorted(_suspect_rows(block, metrics, earliest_ms, latest_ms)),
        now_ms=now_ms,
        max_past_ms=max_past_ms,
        max_future_ms=max_future_ms,
    )


def check_rows(
    block: ReadingBlock,
    dtype: DeviceType,
    rows: Iterable[int],
    *,
    now_ms: int,
    max_past_ms: int = DEFAULT_MAX_PAST_MS,
    max_future_ms: int = DEFAULT_MAX_FUTURE_MS,
) -> list[tuple[int, InputError]]:
    """``check_sound_block_rows``'s report for the given ``rows`` of the block only.

    For a caller that screened the block by other means (ingest does it in
    numpy) and passes the rows that may be bad, in order: every bad row must
    be among them; a good row among them is simply not reported.
    """
    metrics = [(dtype.metric(name), values) for name, values in block.values.items()]
    report: list[tuple[int, InputError]] = []
    for row in rows:
        try:
            _check_row(
                block,
                row,
                metrics,
                now_ms=now_ms,
                max_past_ms=max_past_ms,
                max_future_ms=max_future_ms,
            )
        except InputError as exc:
            report.append((row, exc))
    return report


# --- gateway state (retained birth / death, JSON) -------------------------------


# Rejects a gateway reports with a state: at most this many (device, reason)
# entries per state (the gateway's aggregation caps it lower, at 64 + 16), each
# with a sample of at most REJECT_SAMPLE_MAX_BYTES of the first refused payload
# (base64 in JSON: ~350 bytes) and a detail of at most REJECT_DETAIL_MAX_CHARS.
# 128 entries of ~1 KB stay far under CONTROL_MAX_BYTES.
REJECTS_PER_STATE_MAX: Final = 128
REJECT_SAMPLE_MAX_BYTES: Final = 256
REJECT_DETAIL_MAX_CHARS: Final = 300
# Reject reasons are short snake_case names (contracts.errors ``reason``).
_REASON_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")


class RejectCount(msgspec.Struct, frozen=True, kw_only=True):
    """Rejects of one device and reason that a gateway counted over one state interval.

    ``device_id`` is the id the uplink's topic names, served by the gateway
    or not, or "" when the topic names no valid id. ``first_ms`` and
    ``last_ms`` are the gateway's clock at the first and last of them;
    ``detail`` and ``sample`` (the head of the payload, when the gateway had
    one) are the first one's.
    """

    device_id: str
    reason: str
    count: int
    first_ms: int
    last_ms: int
    detail: str = ""
    sample: bytes = b""
    sample_of_bytes: int = 0  # the sampled payload's whole size


class GatewayState(msgspec.Struct, frozen=True, kw_only=True):
    """Retained on ``hub/v1/gw/{gateway_id}/state``: birth (online) or death (offline).

    JSON so that operators can read it with ``mosquitto_sub -v``. ``birth``
    increases at every gateway start (persisted by the gateway), so a
    receiver can tell a stale death Will from the current session's state.
    The death message is registered as the Will at connect time, so its
    ``ts_ms`` is the connect time, not the time of death; it says so with
    ``will`` (appended), and a receiver that gets it live takes its own
    receive time as the time of death. ``ts_ms`` is not checked against a
    window: a retained death may be months old. ``revoked`` (appended)
    marks the last state of a gateway that provisioning revoked
    (``revoked_gateway_state``).
    """

    gateway_id: str
    status: GatewayStatus
    birth: int
    boot_id: str
    version: str  # gateway software version
    outbox_depth: int  # batches waiting for an ack
    ts_ms: int
    # Appended: health since this boot (counters) and over the last state
    # interval (readings_per_s). Older gateways leave them at 0.
    outbox_readings: int = 0
    readings_per_s: float = 0.0
    received: int = 0
    accepted: int = 0
    rejected: int = 0
    rate_limited: int = 0
    serial_errors: int = 0
    devices_online: int = 0
    batches_resent: int = 0
    puback_refused: int = 0
    # Subscribed at the site broker to its configured devices.
    site_ready: bool = False
    # Appended: this is the Will, built at connect: ts_ms and the figures are
    # the connect time's, and the broker publishes it when the link dies.
    will: bool = False
    # Appended: the rejects counted since the previous state that carried
    # some, per (device, reason), and how many more the gateway counted but
    # could not itemise (over its cap of distinct keys per interval).
    rejects: tuple[RejectCount, ...] = ()
    rejects_dropped: int = 0
    # Appended: readings the gateway gave up because its outbox was full, in
    # all since its outbox file was created (kept there across restarts):
    # refused (under ``refuse``: serial readings while full, a batch larger
    # than the whole outbox) and dropped (the oldest, under ``drop_oldest``).
    outbox_refused_readings: int = 0
    outbox_dropped_readings: int = 0
    # Appended: published by provisioning (not the gateway) when it revoked the
    # gateway and cut its sessions, which the broker does without sending the
    # Will: the gateway's final state, offline, whatever its birth.
    revoked: bool = False


# The boot id of a state that provisioning, not the gateway, published.
REVOKED_BOOT_ID: Final = "revoked"


def revoked_gateway_state(gateway_id: str, *, birth: int, ts_ms: int) -> GatewayState:
    """The retained state that ends a revoked gateway's "online" (``GatewayState.revoked``).

    ``birth``: the gateway's latest known birth (0 if it never reported), so a
    receiver that compares births sees no older session; the figures are
    zero (the gateway's own last state keeps its real ones).
    """
    return GatewayState(
        gateway_id=gateway_id,
        status="offline",
        birth=birth,
        boot_id=REVOKED_BOOT_ID,
        version="",
        outbox_depth=0,
        ts_ms=ts_ms,
        revoked=True,
    )


_STATE_DECODER: Final = msgspec.json.Decoder(GatewayState)


# The health counters of a state; each fits a bigint column, like a seq.
_STATE_COUNTERS: Final = (
    "outbox_readings",
    "received",
    "accepted",
    "rejected",
    "rate_limited",
    "serial_errors",
    "devices_online",
    "outbox_refused_readings",
    "outbox_dropped_readings",
)


def check_gateway_state(state: GatewayState) -> GatewayState:
    """The one check of a gateway state; return ``state`` or raise.

    Ids allow-listed (InvalidIdError); birth, outbox_depth, ts_ms and the
    health counters in [0, SEQ_MAX] and ts_ms at most TS_MAX_MS
    (OutOfRangeError); a version of at most VERSION_MAX_CHARS printable
    characters (FieldTypeError); readings_per_s a finite
    (NonFiniteValueError), non-negative (OutOfRangeError) number. A state
    that passes can be stored as it is.
    """
    check_id(state.gateway_id, "gateway_id")
    check_id(state.boot_id, "boot_id")
    _check_non_negative(state.birth, "birth")
    _check_non_negative(state.outbox_depth, "outbox_depth")
    _check_non_negative(state.ts_ms, "ts_ms")
    if len(state.version) > VERSION_MAX_CHARS or not state.version.isprintable():
        raise FieldTypeError(
            f"version {state.version[:VERSION_MAX_CHARS]!r}: at most {VERSION_MAX_CHARS} "
            "printable characters"
        )
    for name in _STATE_COUNTERS:
        _check_non_negative(getattr(state, name), name)
    if state.ts_ms > TS_MAX_MS:
        raise OutOfRangeError(f"ts_ms {state.ts_ms} is after the year 9999")
    if not math.isfinite(state.readings_per_s):
        raise NonFiniteValueError(f"readings_per_s: {state.readings_per_s!r}")
    if state.readings_per_s < 0:
        raise OutOfRangeError(f"readings_per_s {state.readings_per_s!r} is negative")
    _check_non_negative(state.rejects_dropped, "rejects_dropped")
    if len(state.rejects) > REJECTS_PER_STATE_MAX:
        raise OutOfRangeError(
            f"{len(state.rejects)} reject entries, at most {REJECTS_PER_STATE_MAX}"
        )
    for entry in state.rejects:
        _check_reject_count(entry)
    return state


def _check_reject_count(entry: RejectCount) -> None:
    """One reported reject entry: an id (or ""), a reason name, bounded counts and text."""
    if entry.device_id:
        check_id(entry.device_id, "rejects.device_id")
    if not _REASON_RE.fullmatch(entry.reason):
        raise FieldTypeError(f"rejects.reason {entry.reason[:64]!r}: not a reason name")
    if _check_non_negative(entry.count, "rejects.count") == 0:
        raise OutOfRangeError("rejects.count is 0")
    for name, ts in (("rejects.first_ms", entry.first_ms), ("rejects.last_ms", entry.last_ms)):
        if _check_non_negative(ts, name) > TS_MAX_MS:
            raise OutOfRangeError(f"{name} {ts} is after the year 9999")
    if entry.first_ms > entry.last_ms:
        raise OutOfRangeError(f"rejects.first_ms {entry.first_ms} after last_ms {entry.last_ms}")
    if len(entry.detail) > REJECT_DETAIL_MAX_CHARS:
        raise FieldTypeError(f"rejects.detail: more than {REJECT_DETAIL_MAX_CHARS} characters")
    if len(entry.sample) > REJECT_SAMPLE_MAX_BYTES:
        raise FieldTypeError(f"rejects.sample: more than {REJECT_SAMPLE_MAX_BYTES} bytes")
    _check_non_negative(entry.sample_of_bytes, "rejects.sample_of_bytes")


def encode_gateway_state(state: GatewayState) -> bytes:
    return _JSON_ENCODER.encode(state)


def decode_gateway_state(payload: bytes, *, max_bytes: int = CONTROL_MAX_BYTES) -> GatewayState:
    """Decode a state and run ``check_gateway_state``.

    Raises PayloadTooLargeError, MalformedPayloadError, FieldTypeError and
    whatever ``check_gateway_state`` raises.
    """
    _check_size(payload, max_bytes, "gateway state")
    return check_gateway_state(_decode(_STATE_DECODER, payload, "gateway state"))


# --- ack (ingest -> gateway, JSON) ----------------------------------------------
#
# JSON rather than msgpack: an ack is small, text only (batch ids) and sent
# once per committed batch, so the codec's cost is noise next to the database
# commit, while `mosquitto_sub -t 'hub/v1/gw/+/ack'` showing readable ids is
# what one needs when debugging the delivery contract.


class Ack(msgspec.Struct, frozen=True, kw_only=True):
    """The batch ids ingest has committed; the gateway then drops them from its outbox.

    ``digests`` (appended) runs parallel to ``batch_ids``: ``payload_digest``
    of the exact payload ingest committed, or refused and stored, under that
    id. A gateway drops a batch only if the digest of the payload it holds
    matches, so a refused or spoofed message that reuses a held batch id can
    never remove the real batch. Older ingest sends no digests; a gateway
    that checks digests keeps such batches (upgrade ingest first).
    """

    batch_ids: list[str]
    ts_ms: int  # ingest's commit time, informational
    digests: list[str] = msgspec.field(default_factory=list)
    # Appended: the command reports ingest has stored (``CommandReport.report_id``),
    # which the gateway then drops from its store. An ack may name reports only.
    reports: list[str] = msgspec.field(default_factory=list)


_ACK_DECODER: Final = msgspec.json.Decoder(Ack)


def check_ack(ack: Ack, *, gateway_id: str | None = None) -> Ack:
    """Every batch id well formed (InvalidIdError) and, if ``gateway_id`` is given, its own.

    A batch id of another gateway raises InconsistentBatchError; ``ts_ms``
    must be >= 0 (OutOfRangeError). ``digests``, if any, must be one per
    batch id (InconsistentBatchError), each DIGEST_HEX_CHARS lowercase hex
    characters (FieldTypeError).
    """
    _check_non_negative(ack.ts_ms, "ts_ms")
    if ack.digests:
        if len(ack.digests) != len(ack.batch_ids):
            raise InconsistentBatchError(
                f"digests has {len(ack.digests)} entries, batch_ids has {len(ack.batch_ids)}"
            )
        for index, digest in enumerate(ack.digests):
            if not _DIGEST_RE.fullmatch(digest):
                raise FieldTypeError(
                    f"digests[{index}] {digest[: DIGEST_HEX_CHARS + 8]!r}: not "
                    f"{DIGEST_HEX_CHARS} lowercase hex characters"
                )
    for index, value in enumerate(ack.reports):
        command_id, _, state = value.rpartition(".")
        check_id(command_id, f"reports[{index}]")
        if state not in STATE_RANK:
            raise FieldTypeError(f"reports[{index}] {value[:80]!r}: not {{command_id}}.{{state}}")
    for index, value in enumerate(ack.batch_ids):
        owner, _, _ = parse_batch_id(value)
        if gateway_id is not None and owner != gateway_id:
            raise InconsistentBatchError(
                f"batch_ids[{index}] {value!r} belongs to {owner!r}, not {gateway_id!r}"
            )
    return ack


def encode_ack(ack: Ack) -> bytes:
    return _JSON_ENCODER.encode(ack)


def decode_ack(
    payload: bytes, *, gateway_id: str | None = None, max_bytes: int = CONTROL_MAX_BYTES
) -> Ack:
    _check_size(payload, max_bytes, "ack")
    return check_ack(_decode(_ACK_DECODER, payload, "ack"), gateway_id=gateway_id)


# --- gateway config (registry -> gateway, retained, JSON) -----------------------


class DeviceConfig(msgspec.Struct, frozen=True, kw_only=True):
    """One device a gateway serves."""

    device_id: str
    device_type: str
    transport: Transport
    # Serial and Modbus: a pyserial URL (/dev/ttyUSB0, a pty path,
    # socket://host:port). Modbus devices on one RS-485 bus share it.
    port: str | None = None
    # Serial only: the frame protocol, one of SERIAL_PROTOCOLS.
    protocol: str | None = None
    label: str = ""
    # Readings accepted per second before the gateway drops them: devices
    # report every second or slower (PMS5003 active mode ~1 Hz), so 5/s lets
    # a burst after a reconnect through and stops a runaway device.
    rate_limit_per_s: float = 5.0
    enabled: bool = True
    # Appended. Modbus and LoRaWAN: the catalog model (its register map, its
    # payload codec); Modbus: the slave id on the bus (1-247) and, if set,
    # the poll interval (else the model's); LoRaWAN: the DevEUI; HTTP: the
    # SHA-256 of the device's bearer token (the token is in its bundle only).
    model: str | None = None
    slave_id: int | None = None
    poll_interval_s: float | None = None
    dev_eui: str | None = None
    token_sha256: str | None = None


class GatewayConfig(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Retained on ``hub/v1/gw/{gateway_id}/config``; ``version`` only ever increases."""

    gateway_id: str
    version: int
    site_id: str
    devices: list[DeviceConfig]
    # Appended: the catalog entries of the devices' types, so that a gateway
    # serves a type defined after it was installed (``contracts.catalog.merge_types``).
    # Left out of the JSON when empty: such a config is encoded as before.
    types: tuple[DeviceType, ...] = ()
    # Appended: the Modbus and LoRaWAN models its devices name
    # (``contracts.catalog.merge_models``), for the same reason.
    modbus_models: tuple[ModbusModel, ...] = ()
    lorawan_models: tuple[LorawanModel, ...] = ()


_CONFIG_DECODER: Final = msgspec.json.Decoder(GatewayConfig)


# The fields each transport uses; any other of them set is an error.
_TRANSPORT_FIELDS: Final[dict[str, frozenset[str]]] = {
    "serial": frozenset({"port", "protocol"}),
    "mqtt": frozenset(),
    "modbus": frozenset({"port", "model", "slave_id", "poll_interval_s"}),
    "lorawan": frozenset({"model", "dev_eui"}),
    "http": frozenset({"token_sha256"}),
}
# Left out: poll_interval_s (the model's then); protocol (its own check names the choices).
_OPTIONAL_FIELDS: Final = frozenset({"poll_interval_s", "protocol"})


def _check_device_port(device: DeviceConfig) -> None:
    if device.transport in ("serial", "modbus"):
        if device.port is None:
            raise InvalidPortError(
                f"a {device.transport} device needs a port (a /dev path or a URL)"
            )
        check_port_url(device.port)
    elif device.port is not None:
        raise InvalidPortError(f"port {device.port!r}: only serial and Modbus devices have a port")


def _check_transport_fields(device: DeviceConfig, where: str) -> None:
    """Each transport's own fields set (``poll_interval_s`` may be left out), the others not."""
    used = _TRANSPORT_FIELDS[device.transport]
    for name in ("protocol", "model", "slave_id", "poll_interval_s", "dev_eui", "token_sha256"):
        value = getattr(device, name)
        if value is not None and name not in used:
            raise FieldTypeError(
                f"{where}.{name}: {value!r}: a {device.transport} device has no {name}"
            )
        if value is None and name in used and name not in _OPTIONAL_FIELDS:
            raise FieldTypeError(f"{where}.{name}: a {device.transport} device needs one")


def _check_model(device: DeviceConfig, dtype: DeviceType, where: str) -> None:
    model_name = str(device.model)
    try:
        model = (
            catalog.modbus_model(model_name)
            if device.transport == "modbus"
            else catalog.lorawan_model(model_name)
        )
    except UnknownDeviceTypeError as exc:
        raise FieldTypeError(f"{where}.model: {exc}") from None
    if model.device_type != dtype.name:
        raise FieldTypeError(
            f"{where}.model: {model_name} is a {model.device_type} model, not {dtype.name}"
        )


def _check_transport(device: DeviceConfig, dtype: DeviceType, where: str) -> None:
    """What each transport needs: a protocol, a model, a slave id, a DevEUI, a token hash."""
    _check_transport_fields(device, where)
    if device.transport == "serial" and device.protocol not in SERIAL_PROTOCOLS:
        raise FieldTypeError(
            f"{where}.protocol: {device.protocol!r}: a serial device needs one of"
            f" {', '.join(SERIAL_PROTOCOLS)}"
        )
    if device.transport in ("modbus", "lorawan"):
        _check_model(device, dtype, where)
    if device.transport == "modbus":
        slave = device.slave_id
        if isinstance(slave, bool) or not isinstance(slave, int):
            raise FieldTypeError(f"{where}.slave_id: {slave!r} is not a whole number")
        if not SLAVE_ID_MIN <= slave <= SLAVE_ID_MAX:
            raise OutOfRangeError(
                f"{where}.slave_id: {slave} is outside [{SLAVE_ID_MIN}, {SLAVE_ID_MAX}]"
            )
        interval = device.poll_interval_s
        if interval is not None and not (
            math.isfinite(interval) and POLL_INTERVAL_MIN_S <= interval <= POLL_INTERVAL_MAX_S
        ):
            raise OutOfRangeError(
                f"{where}.poll_interval_s: {interval!r} is outside"
                f" [{POLL_INTERVAL_MIN_S:g}, {POLL_INTERVAL_MAX_S:g}] seconds"
            )
    if device.transport == "lorawan" and DEV_EUI_RE.fullmatch(str(device.dev_eui)) is None:
        raise FieldTypeError(f"{where}.dev_eui: {device.dev_eui!r} is not 16 lower-case hex digits")
    if device.transport == "http" and TOKEN_SHA256_RE.fullmatch(str(device.token_sha256)) is None:
        raise FieldTypeError(f"{where}.token_sha256: not 64 lower-case hex digits")


def check_device_config(device: DeviceConfig, where: str = "device") -> DeviceConfig:
    """The one check of a device's config, for provisioning and the gateway alike.

    The id allow-listed (InvalidIdError), the type known
    (UnknownDeviceTypeError), the transport one its type offers, a serial or
    Modbus device with a port (``contracts.serialurl``'s rule; the error's
    cause is the InvalidPortError), a serial device with a known protocol, a
    Modbus device with a model of its type and a slave id (1-247), a LoRaWAN
    device with a model of its type and a DevEUI, an HTTP device with its
    token's hash, and no device with another transport's fields
    (FieldTypeError); the rate limit finite (NonFiniteValueError) and
    positive (OutOfRangeError). Messages start with ``where`` and the field.
    """
    check_id(device.device_id, f"{where}.device_id")
    try:
        dtype = catalog.device_type(device.device_type)
    except UnknownDeviceTypeError:
        known = ", ".join(sorted(catalog.DEVICE_TYPES))
        raise UnknownDeviceTypeError(
            f"{where}.device_type: device type {device.device_type!r} is not one of {known}"
        ) from None
    if device.transport not in TRANSPORTS:
        raise FieldTypeError(
            f"{where}.transport: {device.transport!r} is not one of {', '.join(TRANSPORTS)}"
        )
    if device.transport not in dtype.transports:
        raise FieldTypeError(
            f"{where}.transport: a {dtype.name} device does not speak {device.transport}"
            f" (its transports: {', '.join(dtype.transports)})"
        )
    try:
        _check_device_port(device)
    except InvalidPortError as exc:
        raise FieldTypeError(f"{where}.port: {exc}") from exc
    _check_transport(device, dtype, where)
    if not math.isfinite(device.rate_limit_per_s):
        raise NonFiniteValueError(f"{where}.rate_limit_per_s: {device.rate_limit_per_s!r}")
    if device.rate_limit_per_s <= 0:
        raise OutOfRangeError(
            f"{where}.rate_limit_per_s: {device.rate_limit_per_s!r} must be positive"
        )
    return device


def check_shared_ports(devices: list[DeviceConfig], where: str = "devices") -> None:
    """Who may share what, among one gateway's devices (InvalidIdError naming both).

    A serial sensor has its port to itself; Modbus devices share a bus, each
    with its own slave id, all at the line settings of their models; a
    DevEUI belongs to one device.
    """
    ports: dict[str, tuple[int, DeviceConfig]] = {}
    slaves: dict[tuple[str, int], int] = {}
    euis: dict[str, int] = {}
    for index, device in enumerate(devices):
        at = f"{where}[{index}]"
        if device.port is not None:
            first = ports.setdefault(device.port, (index, device))
            other_index, other = first
            if other_index != index:
                if "serial" in (device.transport, other.transport):
                    raise InvalidIdError(
                        f"{at}.port {device.port!r} is already {where}[{other_index}]'s"
                        f" ({other.device_id}): a serial sensor has its port to itself"
                    )
                line = catalog.modbus_model(str(device.model)).line
                other_line = catalog.modbus_model(str(other.model)).line
                if line != other_line:
                    raise InvalidIdError(
                        f"{at}.model {device.model}: the bus {device.port} runs at"
                        f" {_line_text(other_line)} ({other.device_id}'s {other.model}),"
                        f" this model at {_line_text(line)}"
                    )
        if device.transport == "modbus" and device.port is not None:
            key = (device.port, int(device.slave_id or 0))
            if key in slaves:
                raise InvalidIdError(
                    f"{at}.slave_id {key[1]} is already {where}[{slaves[key]}]'s on {device.port}"
                )
            slaves[key] = index
        if device.dev_eui is not None:
            if device.dev_eui in euis:
                raise InvalidIdError(
                    f"{at}.dev_eui {device.dev_eui} is already {where}[{euis[device.dev_eui]}]'s"
                )
            euis[device.dev_eui] = index


def _line_text(line: tuple[int, str, int]) -> str:
    baud, parity, stop = line
    return f"{baud} baud 8{parity}{stop}"


def check_gateway_config(config: GatewayConfig) -> GatewayConfig:
    """Ids allow-listed and device ids unique (InvalidIdError), version >= 0
    (OutOfRangeError), and every device as ``check_device_config`` checks it.
    """
    check_id(config.gateway_id, "gateway_id")
    check_id(config.site_id, "site_id")
    _check_non_negative(config.version, "version")
    seen: dict[str, int] = {}
    for index, device in enumerate(config.devices):
        where = f"devices[{index}]"
        check_device_config(device, where)
        if device.device_id in seen:
            raise InvalidIdError(
                f"{where}.device_id {device.device_id!r} repeats devices[{seen[device.device_id]}]"
            )
        seen[device.device_id] = index
    check_shared_ports(config.devices)
    return config


def encode_gateway_config(config: GatewayConfig) -> bytes:
    return _JSON_ENCODER.encode(config)


def decode_gateway_config(
    payload: bytes, *, max_bytes: int = CONTROL_MAX_BYTES, check: bool = True
) -> GatewayConfig:
    """Decode a gateway config and run ``check_gateway_config``.

    ``check=False`` decodes its shape only: a gateway installs the config's
    ``types`` first, then checks the devices against them.
    """
    _check_size(payload, max_bytes, "gateway config")
    config = _decode(_CONFIG_DECODER, payload, "gateway config")
    return check_gateway_config(config) if check else config
