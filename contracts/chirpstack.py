"""ChirpStack v4's integration events, as its MQTT integration publishes them, and their payloads.

LoRaWAN devices reach cityhub through a ChirpStack network server whose MQTT
integration publishes each device's events on the site broker
(``application/{application_id}/device/{dev_eui}/event/{up|status|join}``,
``contracts.topics``) with JSON marshaling: protobuf's JSON mapping of
``chirpstack_api.integration`` (``UplinkEvent``, ``StatusEvent``,
``JoinEvent``): lowerCamelCase names, 64-bit integers as strings, bytes as
base64, timestamps in RFC 3339, and fields at their default value (0, "",
false, empty) left out. The structs here name the fields cityhub reads;
others (``rxInfo``, ``txInfo``, ``relayRxInfo``) are skipped unread.

Pure:

- ``decode_uplink_event``, ``decode_status_event``, ``decode_join_event``:
  bytes in, a struct out, or an ``InputError`` with its reason (too large,
  malformed, wrong type: ``contracts.decoding``);
- ``decode_lpp`` / ``encode_lpp``: Cayenne Low Power Payload (myDevices'
  reference), for the data types of ``contracts.lorawanmodels.LPP_TYPES``;
- ``uplink_metrics``: an uplink event and its device's ``LorawanModel`` ->
  {metric: value}, decoding ``data`` (``cayenne_lpp``) or taking keys of
  ``object`` (``object``), with the model's scale and offset. A payload
  that does not decode is an ``UndecodablePayloadError``; one that decodes
  but does not carry what the model says a ``ModelMismatchError``.

Checking the values against the catalog's ranges, mapping DevEUIs to device
ids, duplicates and fCnt accounting are the gateway's (``gateway.lorawan``).
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Iterable
from typing import Annotated, Any, Final

import msgspec

from contracts.catalog import MetricKind, device_type
from contracts.decoding import check_size, decode_payload
from contracts.errors import FieldTypeError, ModelMismatchError, UndecodablePayloadError
from contracts.lorawanmodels import LPP_TYPES, LorawanModel

# An uplink carries at most 242 bytes of application payload (LoRaWAN
# regional parameters, the largest data rate), 324 characters in base64; the
# rest is metadata, about 400 bytes of JSON per gateway that heard the frame
# in rxInfo. 32 KiB holds a frame heard by some 70 gateways, far more than a
# city deployment puts in range of one device, and half the site link's
# 64 KiB read limit (gateway.sitelink).
CHIRPSTACK_EVENT_MAX_BYTES: Final = 32 * 1024
# LoRaWAN's largest FRMPayload (see above).
LORAWAN_PAYLOAD_MAX_BYTES: Final = 242

_EPOCH: Final = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_MS: Final = datetime.timedelta(milliseconds=1)

# uint32 on the wire (fCnt, fPort, dr): protobuf's JSON mapping writes them as numbers.
Uint32 = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
# A DevAddr is 4 bytes, written as 8 hex digits; a DevEUI 8 bytes, 16 hex digits.
DevAddr = Annotated[str, msgspec.Meta(pattern="^[0-9a-fA-F]{8}$")]


class DeviceInfo(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """The device an event is about, as ChirpStack knows it."""

    tenant_id: str = ""
    tenant_name: str = ""
    application_id: str = ""
    application_name: str = ""
    device_profile_id: str = ""
    device_profile_name: str = ""
    device_name: str = ""
    dev_eui: str = ""
    tags: dict[str, str] = msgspec.field(default_factory=dict)


class UplinkEvent(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """``event/up``: one deduplicated uplink frame (``integration.UplinkEvent``)."""

    deduplication_id: str = ""
    time: datetime.datetime | None = None
    device_info: DeviceInfo = DeviceInfo()
    dev_addr: DevAddr | None = None
    adr: bool = False
    dr: Uint32 = 0
    f_cnt: Uint32 = 0
    f_port: Uint32 = 0
    confirmed: bool = False
    data: bytes = b""
    # What the device profile's codec decoded, if it has one.
    # (Any, not object: the field is named object.)
    object: dict[str, Any] | None = None
    region_config_id: str = ""


class StatusEvent(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """``event/status``: the device's answer to a DevStatusReq (``integration.StatusEvent``)."""

    deduplication_id: str = ""
    time: datetime.datetime | None = None
    device_info: DeviceInfo = DeviceInfo()
    margin: int = 0
    external_power_source: bool = False
    battery_level_unavailable: bool = False
    # Percent. Left out when 0: ChirpStack then sets one of the two flags
    # above (LoRaWAN's DevStatusAns codes 0 = external power, 255 = unknown).
    battery_level: float | None = None


class JoinEvent(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """``event/join``: an OTAA join, with the new session's DevAddr (``integration.JoinEvent``)."""

    deduplication_id: str = ""
    time: datetime.datetime | None = None
    device_info: DeviceInfo = DeviceInfo()
    dev_addr: DevAddr | None = None
    region_config_id: str = ""


_UPLINK_DECODER: Final = msgspec.json.Decoder(UplinkEvent)
_STATUS_DECODER: Final = msgspec.json.Decoder(StatusEvent)
_JOIN_DECODER: Final = msgspec.json.Decoder(JoinEvent)
_ENCODER: Final = msgspec.json.Encoder()


def decode_uplink_event(
    payload: bytes, *, max_bytes: int = CHIRPSTACK_EVENT_MAX_BYTES
) -> UplinkEvent:
    check_size(payload, max_bytes, "uplink event")
    event = decode_payload(_UPLINK_DECODER, payload, "uplink event")
    if len(event.data) > LORAWAN_PAYLOAD_MAX_BYTES:
        raise FieldTypeError(
            f"uplink event: data of {len(event.data)} bytes exceeds LoRaWAN's"
            f" {LORAWAN_PAYLOAD_MAX_BYTES}"
        )
    return event


def decode_status_event(
    payload: bytes, *, max_bytes: int = CHIRPSTACK_EVENT_MAX_BYTES
) -> StatusEvent:
    check_size(payload, max_bytes, "status event")
    return decode_payload(_STATUS_DECODER, payload, "status event")


def decode_join_event(payload: bytes, *, max_bytes: int = CHIRPSTACK_EVENT_MAX_BYTES) -> JoinEvent:
    check_size(payload, max_bytes, "join event")
    return decode_payload(_JOIN_DECODER, payload, "join event")


def encode_event(event: UplinkEvent | StatusEvent | JoinEvent) -> bytes:
    """JSON as ChirpStack marshals it (for simulators and tests; the gateway only decodes).

    Fields at their default are left out, as protobuf's JSON mapping does.
    """
    document = msgspec.to_builtins(event)
    return _ENCODER.encode(_without_defaults(document))


def _without_defaults(value: object) -> object:
    if isinstance(value, dict):
        return {
            k: _without_defaults(v)
            for k, v in value.items()
            if v not in (0, "", False, None, {}, [])
        }
    return value


def event_time_ms(time: datetime.datetime | None) -> int | None:
    """An event's ``time`` in ms since the epoch (None if it has none)."""
    if time is None:
        return None
    if time.tzinfo is None:
        time = time.replace(tzinfo=datetime.UTC)
    return (time - _EPOCH) // _MS


def to_rfc3339(ts_ms: int) -> str:
    """``ts_ms`` as protobuf's JSON writes a Timestamp (UTC, ``Z``, milliseconds)."""
    moment = _EPOCH + datetime.timedelta(milliseconds=ts_ms)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts_ms % 1000:03d}Z"


# --- Cayenne LPP ------------------------------------------------------------------

# Type code -> (catalog name, bytes, resolution, signed, decimals of the resolution).
_BY_CODE: Final = {
    code: (name, size, resolution, signed, max(0, -math.floor(math.log10(resolution))))
    for name, (code, size, resolution, signed) in LPP_TYPES.items()
}


def decode_lpp(data: bytes) -> list[tuple[int, str, float]]:
    """Cayenne LPP bytes -> [(channel, type name, value)], in payload order.

    Each item is channel (1 byte), type (1 byte), then the type's big-endian
    value; the value times the type's resolution, rounded to it (0x0110 as a
    temperature is 27.2, not 27.200000000000003). UndecodablePayloadError for
    a type this catalog does not know (its length, and so everything after
    it, is unknown) or a value cut short.
    """
    items = []
    at = 0
    while at < len(data):
        if at + 2 > len(data):
            raise UndecodablePayloadError(
                f"Cayenne LPP: {len(data) - at} byte left at offset {at}, a header needs 2"
            )
        channel, code = data[at], data[at + 1]
        known = _BY_CODE.get(code)
        if known is None:
            raise UndecodablePayloadError(
                f"Cayenne LPP: unknown data type 0x{code:02x} at offset {at + 1}"
                f" (known: {', '.join(f'0x{c:02x}' for c in sorted(_BY_CODE))})"
            )
        name, size, resolution, signed, decimals = known
        start = at + 2
        if start + size > len(data):
            raise UndecodablePayloadError(
                f"Cayenne LPP: channel {channel} {name} needs {size} bytes at offset {start},"
                f" {len(data) - start} left"
            )
        raw = int.from_bytes(data[start : start + size], "big", signed=signed)
        items.append((channel, name, round(raw * resolution, decimals)))
        at = start + size
    return items


def encode_lpp(items: Iterable[tuple[int, str, float]]) -> bytes:
    """[(channel, type name, value)] -> Cayenne LPP bytes; ValueError if a value does not fit."""
    out = bytearray()
    for channel, name, value in items:
        code, size, resolution, signed = LPP_TYPES[name]
        raw = round(value / resolution)
        bits = 8 * size
        low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        if not 0 <= channel <= 255 or not low <= raw <= high:
            raise ValueError(f"Cayenne LPP: channel {channel} {name} {value!r} does not fit")
        out += bytes((channel, code)) + raw.to_bytes(size, "big", signed=signed)
    return bytes(out)


# --- an uplink's metrics ------------------------------------------------------------


def uplink_metrics(event: UplinkEvent, model: LorawanModel) -> dict[str, float]:
    """The metrics an uplink carries, by its model: ``raw * scale + offset`` per field.

    A field the payload lacks is left out; a payload carrying none of the
    model's fields, or one of its channels with another data type, is a
    ModelMismatchError. Range checks are the caller's (the catalog's).
    """
    if model.codec == "cayenne_lpp":
        values = _lpp_metrics(event, model)
    else:
        values = _object_metrics(event, model)
    if not values:
        wanted = ", ".join(
            f"channel {f.channel} {f.lpp_type}" if f.channel is not None else repr(f.key)
            for f in model.fields
        )
        raise ModelMismatchError(f"model {model.name}: the uplink carries none of {wanted}")
    return values


def _lpp_metrics(event: UplinkEvent, model: LorawanModel) -> dict[str, float]:
    if not event.data:
        raise UndecodablePayloadError(
            f"model {model.name} decodes Cayenne LPP, and the uplink has no data"
            f" (fPort {event.f_port})"
        )
    decoded: dict[int, tuple[str, float]] = {}
    for channel, name, value in decode_lpp(event.data):
        decoded[channel] = (name, value)
    values = {}
    for field in model.fields:
        got = decoded.get(field.channel) if field.channel is not None else None
        if got is None:
            continue
        name, value = got
        if name != field.lpp_type:
            raise ModelMismatchError(
                f"model {model.name}: channel {field.channel} carries {name},"
                f" the model expects {field.lpp_type}"
            )
        values[field.metric] = value * field.scale + field.offset
    return values


def _object_metrics(event: UplinkEvent, model: LorawanModel) -> dict[str, float]:
    if event.object is None:
        raise UndecodablePayloadError(
            f"model {model.name} takes ChirpStack's decoded object, and the uplink has none"
            " (no codec in its device profile, or the codec failed)"
        )
    labels = {m.name: m.labels for m in device_type(model.device_type).metrics}
    kinds = {m.name: m.kind for m in device_type(model.device_type).metrics}
    values = {}
    for field in model.fields:
        if field.key is None or field.key not in event.object:
            continue
        raw = event.object[field.key]
        if isinstance(raw, int | float):  # a bool too: 0 / 1
            number = float(raw)
        elif isinstance(raw, str) and kinds.get(field.metric) is MetricKind.ENUM:
            if raw not in labels[field.metric]:
                raise ModelMismatchError(
                    f"model {model.name}: object.{field.key} {raw!r} is not one of"
                    f" {', '.join(labels[field.metric])}"
                )
            number = float(labels[field.metric].index(raw))
        else:
            raise FieldTypeError(
                f"model {model.name}: object.{field.key} is {type(raw).__name__} {raw!r},"
                " not a number"
            )
        values[field.metric] = number * field.scale + field.offset
    return values
