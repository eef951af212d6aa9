"""JSON Schema (draft 2020-12) of a device type's uplink, generated from the catalog.

``uplink_json_schema`` describes the JSON a device publishes on
``d/{device_id}/up`` (contracts.messages ``DeviceUplink``) for one device
type: ``seq``, ``ts`` and ``m`` required, ``boot`` optional, each metric of
the type with its number kind, valid range, unit and description. It states
what a vendor's firmware must send; the gateway's checks
(``decode_device_uplink``) remain the authority, and they check what a
schema cannot: the time window around the gateway's clock and the payload
size. ``schema_files`` renders every type's schema as the text of the files
in docs/schemas/; writing them is ``cityhub catalog schemas``'s job
(``--check`` compares instead), and ``cityhub catalog schema TYPE`` prints
one. Given ``now_ms``, the time window becomes the bounds of ``ts``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

from contracts import catalog
from contracts.catalog import DeviceType, Metric, MetricKind
from contracts.ids import DEFAULT_MAX_FUTURE_MS, DEFAULT_MAX_PAST_MS, ID_PATTERN
from contracts.messages import (
    DEVICE_PAYLOAD_MAX_BYTES,
    SECONDS_LIKE_BELOW_MS,
    SEQ_MAX,
    TS_MAX_MS,
)
from contracts.wording import count_noun

DRAFT: Final = "https://json-schema.org/draft/2020-12/schema"
# Where the generated files live, relative to the repository root.
SCHEMA_DIR: Final = Path("docs/schemas")
# ids and "$id"s of the files name them by this base (the files are not served).
_ID_BASE: Final = "https://cityhub.invalid/schemas/"


def schema_file_name(device_type: str) -> str:
    return f"{device_type}.uplink.schema.json"


def _metric_schema(metric: Metric) -> dict[str, Any]:
    unit = f" [{metric.unit}]" if metric.unit else ""
    description = f"{metric.description}{unit}"
    schema: dict[str, Any] = {
        "type": "number" if metric.kind is MetricKind.FLOAT else "integer",
        "minimum": _number(metric.min),
        "maximum": _number(metric.max),
    }
    if metric.kind is MetricKind.BOOL:
        description += "; 0 = false, 1 = true (not JSON true/false)"
    elif metric.kind is MetricKind.ENUM:
        codes = ", ".join(f"{code} = {label}" for code, label in enumerate(metric.labels))
        description += f"; code: {codes}"
    schema["description"] = description
    return schema


def _number(value: float) -> int | float:
    """Whole bounds as JSON integers (``0``, not ``0.0``) so the schema reads as the catalog."""
    return int(value) if value == int(value) else value


def uplink_json_schema(
    device_type: str | DeviceType,
    *,
    now_ms: int | None = None,
    max_past_ms: int = DEFAULT_MAX_PAST_MS,
    max_future_ms: int = DEFAULT_MAX_FUTURE_MS,
) -> dict[str, Any]:
    """The JSON Schema of an uplink from a device of ``device_type``.

    Without ``now_ms`` the time window is only described (the schema is the
    same at any time, fit for docs); with it, ``ts`` gets the window's bounds.
    Raises UnknownDeviceTypeError for a type name the catalog lacks. Pure:
    the same catalog gives the same schema, keys in a fixed order.
    """
    dtype = device_type if isinstance(device_type, DeviceType) else catalog.device_type(device_type)
    ts_min, ts_max = SECONDS_LIKE_BELOW_MS, TS_MAX_MS
    if now_ms is not None:
        ts_min = max(ts_min, now_ms - max_past_ms)
        ts_max = min(ts_max, now_ms + max_future_ms)
    report = dtype.unknown_metrics == "report"
    unknown_note = (
        "A metric this type lacks is dropped and reported (reason unknown_metric); "
        "the reading's known metrics are stored."
        if report
        else "A metric this type lacks rejects the whole reading (reason unknown_metric)."
    )
    return {
        "$schema": DRAFT,
        "$id": f"{_ID_BASE}{schema_file_name(dtype.name)}",
        "title": f"{dtype.name} uplink",
        "description": (
            f"{dtype.description}. One reading, published as JSON (UTF-8, at most "
            f"{DEVICE_PAYLOAD_MAX_BYTES} bytes) on d/{{device_id}}/up. The gateway also "
            f"requires ts within {count_noun(max_past_ms // 86_400_000, 'day', 'days')} before and "
            f"{count_noun(max_future_ms // 60_000, 'minute', 'minutes')} after its own clock. "
            "Unknown top-level fields are ignored."
        ),
        "type": "object",
        "required": ["seq", "ts", "m"],
        "properties": {
            "seq": {
                "type": "integer",
                "minimum": 0,
                "maximum": SEQ_MAX,
                "description": (
                    "Reading counter of this device: +1 per reading, restarting at 0 "
                    "only when the device reboots."
                ),
            },
            "ts": {
                "type": "integer",
                # Below SECONDS_LIKE_BELOW_MS a ts is a clock in seconds (March 1973 in ms).
                "minimum": ts_min,
                "maximum": ts_max,
                "description": (
                    "When the reading was taken: integer milliseconds since "
                    "1970-01-01T00:00:00Z (not seconds)."
                ),
            },
            "m": {
                "type": "object",
                "minProperties": 1,
                "properties": {m.name: _metric_schema(m) for m in dtype.metrics},
                "additionalProperties": report,
                # At least one metric the type knows: one of unknown names only is refused.
                "anyOf": [{"required": [m.name]} for m in dtype.metrics],
                "description": (
                    f"Metric name -> value; any non-empty subset of them. {unknown_note}"
                ),
            },
            "boot": {
                "type": "string",
                "pattern": ID_PATTERN,
                "description": (
                    "Optional boot id: a new random value at every start of the device, "
                    "kept until the next one."
                ),
            },
        },
    }


def schema_files() -> dict[str, str]:
    """File name -> text of every catalog type's schema (2-space JSON, final newline)."""
    return {
        schema_file_name(name): json.dumps(uplink_json_schema(name), indent=2, ensure_ascii=False)
        + "\n"
        for name in sorted(catalog.DEVICE_TYPES)
    }
