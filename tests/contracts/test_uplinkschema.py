"""The uplink contract a vendor implements: the generated JSON Schemas, the seconds hint
and the tolerance for unknown metrics, at the decoder and in the gateway's router.

The schemas in docs/schemas/ must be what the catalog generates now
(``cityhub catalog schemas`` rewrites them), must accept what the
gateway accepts and refuse what it refuses for reasons a schema can state.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import msgspec
import pytest

from contracts import catalog
from contracts.errors import (
    OutOfRangeError,
    TimestampWindowError,
    UnknownDeviceTypeError,
    UnknownMetricError,
)
from contracts.messages import (
    DeviceConfig,
    GatewayConfig,
    decode_device_uplink,
    decode_device_uplink_tolerant,
)
from contracts.settings import GatewaySettings
from contracts.topics import device_uplink_topic
from contracts.uplinkschema import (
    SCHEMA_DIR,
    schema_files,
    uplink_json_schema,
)
from gateway.counters import GatewayCounters
from gateway.routing import Rejected, Router

ROOT = Path(__file__).resolve().parents[2]
NOW_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def uplink(**fields: object) -> bytes:
    document: dict[str, object] = {"seq": 1, "ts": NOW_MS, "m": {"queue_length": 3}}
    document.update(fields)
    return json.dumps(document).encode()


# --- the generated schemas ---------------------------------------------------------


def test_docs_schemas_are_current():
    on_disk = {p.name: p.read_text("utf-8") for p in (ROOT / SCHEMA_DIR).glob("*.schema.json")}
    assert on_disk == schema_files(), "run: cityhub catalog schemas"


@pytest.mark.parametrize("name", sorted(catalog.DEVICE_TYPES))
def test_schema_is_valid_draft_2020_12_and_names_every_metric(name):
    schema = uplink_json_schema(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    metrics = schema["properties"]["m"]["properties"]
    assert list(metrics) == list(catalog.device_type(name).metric_names)


def test_unknown_type_has_no_schema():
    with pytest.raises(UnknownDeviceTypeError, match="toaster"):
        uplink_json_schema("toaster")


def _schema_accepts(name: str, payload: bytes) -> bool:
    validator = jsonschema.Draft202012Validator(uplink_json_schema(name))
    return validator.is_valid(json.loads(payload))


@pytest.mark.parametrize(
    ("payload", "gateway_accepts"),
    [
        pytest.param(uplink(), True, id="good"),
        pytest.param(uplink(boot="b-1", m={"printer_status": 2, "paper_level": 40.5}), True),
        pytest.param(uplink(m={"queue_length": 3.0}), True, id="whole-float-for-int"),
        pytest.param(uplink(m={"queue_length": 3.5}), False, id="fraction-for-int"),
        pytest.param(uplink(m={"paper_level": 101}), False, id="out-of-range"),
        pytest.param(uplink(m={"printer_status": 5}), False, id="enum-code-too-big"),
        pytest.param(uplink(m={"queue_length": True}), False, id="bool-value"),
        pytest.param(uplink(m={}), False, id="no-metric"),
        pytest.param(uplink(seq=-1), False, id="negative-seq"),
        pytest.param(uplink(ts=NOW_MS // 1000), False, id="ts-in-seconds"),
        pytest.param(uplink(boot="B00T"), False, id="bad-boot"),
        pytest.param(json.dumps({"seq": 1, "m": {"queue_length": 1}}).encode(), False, id="no-ts"),
    ],
)
def test_schema_agrees_with_the_gateway(payload, gateway_accepts):
    assert _schema_accepts("kiosk", payload) is gateway_accepts
    try:
        decode_device_uplink(payload, device_type="kiosk", now_ms=NOW_MS)
    except Exception:  # noqa: BLE001 - any refusal counts as one here
        accepted = False
    else:
        accepted = True
    assert accepted is gateway_accepts


def test_schema_allows_unknown_metrics_only_where_the_type_reports_them(monkeypatch):
    payload = uplink(m={"queue_length": 3, "noise_db": 55})
    assert _schema_accepts("kiosk", payload)
    strict = msgspec.structs.replace(catalog.KIOSK, unknown_metrics="reject")
    monkeypatch.setitem(catalog.DEVICE_TYPES, "kiosk", strict)
    assert not _schema_accepts("kiosk", payload)
    assert uplink_json_schema("kiosk")["properties"]["m"]["additionalProperties"] is False


# --- timestamps in seconds ------------------------------------------------------------


def test_a_timestamp_in_seconds_is_rejected_with_the_hint():
    with pytest.raises(TimestampWindowError, match=r"looks like seconds.*milliseconds"):
        decode_device_uplink(uplink(ts=NOW_MS // 1000), device_type="kiosk", now_ms=NOW_MS)


def test_a_timestamp_from_last_year_gets_no_seconds_hint():
    with pytest.raises(TimestampWindowError) as caught:
        decode_device_uplink(
            uplink(ts=NOW_MS - 365 * 86_400_000), device_type="kiosk", now_ms=NOW_MS
        )
    assert "seconds" not in str(caught.value)


# --- unknown metrics ------------------------------------------------------------------


def test_tolerant_decode_keeps_known_metrics_and_names_the_unknown():
    payload = uplink(m={"queue_length": 3, "noise_db": 55, "paper_level": 80})
    with pytest.raises(UnknownMetricError, match="noise_db"):
        decode_device_uplink(payload, device_type="kiosk", now_ms=NOW_MS)
    got, unknown = decode_device_uplink_tolerant(payload, device_type="kiosk", now_ms=NOW_MS)
    assert got.metrics == {"queue_length": 3.0, "paper_level": 80.0}
    assert unknown == ["noise_db"]


def test_tolerant_decode_of_a_good_uplink_names_nothing():
    got, unknown = decode_device_uplink_tolerant(uplink(), device_type="kiosk", now_ms=NOW_MS)
    assert got == decode_device_uplink(uplink(), device_type="kiosk", now_ms=NOW_MS)
    assert unknown == []


@pytest.mark.parametrize(
    ("metrics", "error"),
    [
        pytest.param({"noise_db": 55}, UnknownMetricError, id="nothing-known"),
        pytest.param({"noise_db": 55, "paper_level": 101}, OutOfRangeError, id="known-bad"),
    ],
)
def test_tolerant_decode_still_rejects(metrics, error):
    with pytest.raises(error):
        decode_device_uplink_tolerant(uplink(m=metrics), device_type="kiosk", now_ms=NOW_MS)


def test_a_type_set_to_reject_refuses_the_whole_reading(monkeypatch):
    strict = msgspec.structs.replace(catalog.KIOSK, unknown_metrics="reject")
    monkeypatch.setitem(catalog.DEVICE_TYPES, "kiosk", strict)
    with pytest.raises(UnknownMetricError, match="noise_db"):
        decode_device_uplink_tolerant(
            uplink(m={"queue_length": 3, "noise_db": 55}), device_type="kiosk", now_ms=NOW_MS
        )


def test_catalog_types_report_unknown_metrics_by_default():
    assert {t.unknown_metrics for t in catalog.DEVICE_TYPES.values()} == {"report"}


PREFIX = "t1"


def _router() -> Router:
    settings = GatewaySettings(gateway_id="gw-hk", topic_prefix=PREFIX)
    r = Router(settings=settings, boot_id="b00t", counters=GatewayCounters())
    device = DeviceConfig(device_id="k-1", device_type="kiosk", transport="mqtt")
    r.apply_config(GatewayConfig(gateway_id="gw-hk", version=1, site_id="s-1", devices=[device]))
    return r


def _send(r: Router, payload: bytes) -> list[Rejected]:
    topic = device_uplink_topic("k-1", PREFIX)
    r.site_messages([(topic, payload, 1, 1, False)], generation=1, now=NOW_MS)
    r.cut(NOW_MS)
    return [e for e in r.take_events() if isinstance(e, Rejected)]


def test_router_stores_the_known_metrics_and_reports_the_unknown_one():
    r = _router()
    rejects = _send(r, uplink(m={"queue_length": 3, "noise_db": 55}))
    assert [(e.reason, e.device_id) for e in rejects] == [("unknown_metric", "k-1")]
    assert "noise_db" in rejects[0].detail
    assert r.counters.accepted == 1
    assert r.counters.rejects == {"unknown_metric": 1}
    assert r.counters.device_rejects == {("k-1", "unknown_metric"): 1}
    (batch, _acks, _generation), *_ = r.ready
    assert batch is not None
    assert batch.blocks[0].values == {"queue_length": [3.0]}


def test_router_rejects_the_reading_when_its_type_says_so(monkeypatch):
    strict = msgspec.structs.replace(catalog.KIOSK, unknown_metrics="reject")
    monkeypatch.setitem(catalog.DEVICE_TYPES, "kiosk", strict)
    r = _router()
    rejects = _send(r, uplink(m={"queue_length": 3, "noise_db": 55}))
    assert [e.reason for e in rejects] == ["unknown_metric"]
    assert r.counters.accepted == 0
    assert all(batch is None for batch, _acks, _generation in r.ready)
