"""LoRaWAN device models as data: how a model's uplink payload becomes metrics.

A *model* (``[lorawan_models.NAME]`` in a catalog file) names the device
type its readings feed and the codec of its uplinks:

- ``codec = "cayenne_lpp"``: the gateway decodes the raw ``data`` of
  ChirpStack's uplink event as Cayenne LPP; each field maps an LPP channel
  (and data type) to a metric;
- ``codec = "object"``: ChirpStack's own payload codec has decoded it; each
  field maps a key of the event's ``object`` to a metric (the key defaults to
  the metric's name).

Each field may scale and offset the decoded value. Pure:
``parse_lorawan_model`` checks a table as the catalog loader hands it over
and raises ``CatalogError`` naming the model and key. Decoding events and
payloads is ``contracts.chirpstack``'s.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Final, Literal

import msgspec

from contracts.errors import CatalogError

Codec = Literal["cayenne_lpp", "object"]
CODECS: Final[tuple[Codec, ...]] = ("cayenne_lpp", "object")
# Cayenne LPP data types (myDevices' Cayenne Low Power Payload reference),
# by the names used in the catalog: type code, bytes, resolution per unit, signed.
LPP_TYPES: Final[Mapping[str, tuple[int, int, float, bool]]] = {
    "digital_input": (0x00, 1, 1.0, False),
    "digital_output": (0x01, 1, 1.0, False),
    "analog_input": (0x02, 2, 0.01, True),
    "analog_output": (0x03, 2, 0.01, True),
    "illuminance": (0x65, 2, 1.0, False),
    "presence": (0x66, 1, 1.0, False),
    "temperature": (0x67, 2, 0.1, True),
    "humidity": (0x68, 1, 0.5, False),
    "barometer": (0x73, 2, 0.1, False),
}

_MODEL_NAME_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")
_KEY_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_MODEL_KEYS: Final = frozenset({"device_type", "description", "source", "codec", "fields"})
_FIELD_KEYS: Final = frozenset({"metric", "channel", "lpp_type", "key", "scale", "offset"})


class LorawanField(msgspec.Struct, frozen=True, kw_only=True):
    metric: str
    # cayenne_lpp: the channel and data type that carry the metric.
    channel: int | None = None
    lpp_type: str | None = None
    # object: the key of ChirpStack's decoded object.
    key: str | None = None
    scale: float = 1.0
    offset: float = 0.0


class LorawanModel(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    device_type: str
    description: str
    codec: Codec
    fields: tuple[LorawanField, ...]
    source: str = ""


def parse_lorawan_model(
    name: str, raw: object, *, source: str, metrics: Mapping[str, tuple[str, ...]]
) -> LorawanModel:
    """Check one ``[lorawan_models.NAME]`` table; ``metrics``: types with the lorawan transport."""

    def err(key: str | None, problem: str) -> CatalogError:
        return CatalogError(source, f"lorawan_models.{name}", key, problem)

    if _MODEL_NAME_RE.fullmatch(name) is None:
        raise err(None, f"a model name must match {_MODEL_NAME_RE.pattern}")
    if not isinstance(raw, dict):
        raise err(None, f"expected a table, got {type(raw).__name__}")
    table: Mapping[str, Any] = raw
    for key in table:
        if key not in _MODEL_KEYS:
            raise err(key, f"unknown key (known: {', '.join(sorted(_MODEL_KEYS))})")
    type_name = table.get("device_type")
    if not isinstance(type_name, str) or type_name not in metrics:
        raise err(
            "device_type",
            f"{type_name!r} is not a device type with the lorawan transport"
            f" (those are: {', '.join(sorted(metrics)) or 'none'})",
        )
    description = table.get("description")
    if not isinstance(description, str) or not description.strip():
        raise err("description", "expected a non-empty string")
    cited = table.get("source", "")
    if not isinstance(cited, str):
        raise err("source", "expected a string")
    codec = table.get("codec")
    if codec not in CODECS:
        raise err("codec", f"{codec!r} is not one of {', '.join(CODECS)}")
    raw_fields = table.get("fields")
    if not isinstance(raw_fields, list) or not raw_fields:
        raise err("fields", "expected a non-empty list of field tables")
    fields = [
        _field(entry, f"fields[{index}].", codec, metrics[type_name], err)
        for index, entry in enumerate(raw_fields)
    ]
    for key, what in (("metric", "is fed twice"), ("slot", "is read by two fields")):
        seen: set[object] = set()
        for index, field in enumerate(fields):
            value = field.metric if key == "metric" else (field.channel, field.lpp_type, field.key)
            if value in seen:
                raise err(f"fields[{index}]", f"{value!r} {what}")
            seen.add(value)
    return LorawanModel(
        name=name,
        device_type=type_name,
        description=description,
        codec=codec,
        fields=tuple(fields),
        source=cited,
    )


def _field(
    entry: object, prefix: str, codec: str, metric_names: tuple[str, ...], err: Any
) -> LorawanField:
    if not isinstance(entry, dict):
        raise err(prefix.rstrip("."), "expected a table")
    unknown = sorted(set(entry) - _FIELD_KEYS)
    if unknown:
        raise err(prefix + unknown[0], f"unknown key (known: {', '.join(sorted(_FIELD_KEYS))})")
    metric = entry.get("metric")
    if not isinstance(metric, str) or metric not in metric_names:
        raise err(prefix + "metric", f"{metric!r} is not a metric of the model's device type")
    scale, offset = entry.get("scale", 1.0), entry.get("offset", 0.0)
    for key, value in (("scale", scale), ("offset", offset)):
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise err(prefix + key, f"expected a finite number, got {value!r}")
    if scale == 0:
        raise err(prefix + "scale", "must not be 0")
    if codec == "cayenne_lpp":
        channel, lpp_type = entry.get("channel"), entry.get("lpp_type")
        if isinstance(channel, bool) or not isinstance(channel, int) or not 0 <= channel <= 255:
            raise err(prefix + "channel", f"expected a channel 0-255, got {channel!r}")
        if lpp_type not in LPP_TYPES:
            raise err(prefix + "lpp_type", f"{lpp_type!r} is not one of {', '.join(LPP_TYPES)}")
        if "key" in entry:
            raise err(prefix + "key", "a cayenne_lpp field names a channel, not a key")
        return LorawanField(
            metric=metric, channel=channel, lpp_type=lpp_type, scale=scale, offset=offset
        )
    key = entry.get("key", metric)
    if not isinstance(key, str) or _KEY_RE.fullmatch(key) is None:
        raise err(prefix + "key", f"expected a key matching {_KEY_RE.pattern}, got {key!r}")
    if "channel" in entry or "lpp_type" in entry:
        raise err(prefix + "channel", "an object field names a key, not a channel")
    return LorawanField(metric=metric, key=key, scale=scale, offset=offset)
