"""JSON Schemas (draft 2020-12) of the device uplink, generated from the catalog.

``uplink_schema(device_type)`` describes what ``contracts.messages.
decode_device_uplink`` accepts on ``d/{device}/up`` for that type:
``{"seq": int, "ts": int ms, "m": {metric: number}, "boot": id}``, with each
metric's kind and valid range. The command line prints it (``cityhub catalog
schema TYPE``) and the docs can be generated from it; it is data only, the
decoder stays the authority.

What a schema cannot say is written into its descriptions instead: ``ts``
must lie in a window around the receiver's clock (given ``now_ms``, the
window becomes the bounds of ``ts``); ``seq`` and ``ts`` must be written
without a fraction (``7``, not ``7.0``); the payload is at most
``DEVICE_PAYLOAD_MAX_BYTES`` bytes. Validation itself is left to a
validator library (the tests use ``jsonschema``).
"""

from __future__ import annotations

from typing import Any, Final

from contracts.catalog import DeviceType, Metric, MetricKind
from contracts.ids import DEFAULT_MAX_FUTURE_MS, DEFAULT_MAX_PAST_MS, ID_PATTERN
from contracts.messages import DEVICE_PAYLOAD_MAX_BYTES, SEQ_MAX

DRAFT: Final = "https://json-schema.org/draft/2020-12/schema"

_MS_PER_DAY: Final = 86_400_000


def _metric_schema(metric: Metric) -> dict[str, Any]:
    unit = f" [{metric.unit}]" if metric.unit else ""
    description = f"{metric.description}{unit}"
    schema: dict[str, Any] = {
        "type": "number" if metric.kind is MetricKind.FLOAT else "integer",
        "minimum": metric.min,
        "maximum": metric.max,
    }
    if metric.kind is MetricKind.BOOL:
        description += "; 0 or 1 (not true/false)"
    elif metric.kind is MetricKind.ENUM:
        codes = ", ".join(f"{code} = {label}" for code, label in enumerate(metric.labels))
        description += f"; a code: {codes}"
    elif metric.kind is MetricKind.INT:
        description += "; a whole number"
    schema["description"] = description
    return schema


def uplink_schema(
    device_type: DeviceType,
    *,
    now_ms: int | None = None,
    max_past_ms: int = DEFAULT_MAX_PAST_MS,
    max_future_ms: int = DEFAULT_MAX_FUTURE_MS,
) -> dict[str, Any]:
    """The JSON Schema of an uplink from a device of ``device_type``.

    Without ``now_ms`` the time window is only described (the schema is
    the same at any time, fit for docs); with it, ``ts`` gets the window's
    bounds as ``minimum`` and ``maximum``.
    """
    window = (
        f"within {max_past_ms // _MS_PER_DAY} days before and {max_future_ms // 60_000} "
        "minutes after the receiving gateway's clock"
    )
    ts: dict[str, Any] = {
        "type": "integer",
        "minimum": 0,
        "description": (
            "When the reading was taken: integer milliseconds since 1970-01-01 UTC "
            f"(13 digits today, not seconds), {window}; written without a fraction"
        ),
    }
    if now_ms is not None:
        ts["minimum"] = now_ms - max_past_ms
        ts["maximum"] = now_ms + max_future_ms
    return {
        "$schema": DRAFT,
        "title": f"{device_type.name} uplink",
        "description": (
            f"{device_type.description}. One reading, published as JSON on d/{{device_id}}/up "
            f"(at most {DEVICE_PAYLOAD_MAX_BYTES} bytes). Other top-level fields are ignored."
        ),
        "type": "object",
        "required": ["seq", "ts", "m"],
        "properties": {
            "seq": {
                "type": "integer",
                "minimum": 0,
                "maximum": SEQ_MAX,
                "description": (
                    "Per-device reading counter, +1 per reading, reset only by a reboot; "
                    "written without a fraction"
                ),
            },
            "ts": ts,
            "boot": {
                "type": ["string", "null"],
                "pattern": ID_PATTERN,
                "description": "Optional id of the device's current boot, new at every start",
            },
            "m": {
                "type": "object",
                "minProperties": 1,
                "additionalProperties": False,
                "description": "The metrics measured, by name; at least one",
                "properties": {m.name: _metric_schema(m) for m in device_type.metrics},
            },
        },
    }
