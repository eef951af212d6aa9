"""The device catalog as TOML data: the shipped entries, operators' files, refusals, schemas."""

from __future__ import annotations

import json
import math

import jsonschema
import msgspec
import pytest

from contracts import catalog
from contracts.catalog import (
    DEVICE_TYPES,
    SHIPPED_CATALOG,
    SHIPPED_SOURCE,
    Catalog,
    Metric,
    MetricKind,
    current_catalog,
    describe_changes,
    device_type,
    load_catalog,
    read_catalog,
    use_catalog,
)
from contracts.errors import CatalogError, InputError, UnknownDeviceTypeError
from contracts.messages import (
    SECONDS_LIKE_BELOW_MS,
    SERIAL_PROTOCOLS,
    TS_MAX_MS,
    DeviceUplink,
    decode_device_uplink,
    encode_device_uplink,
)
from contracts.settings import load_settings
from contracts.uplinkschema import uplink_json_schema as uplink_schema

NOW_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


@pytest.fixture
def restore_catalog():
    """Put the shipped catalog back after a test that installs another."""
    yield
    use_catalog(SHIPPED_CATALOG)


# --- the shipped catalog equals the one the code used to define ------------------


def test_shipped_types_counts_and_order():
    # The types the code used to define come first, in their order; the
    # types added as data only are appended after them.
    assert list(DEVICE_TYPES) == [
        "air_quality", "kiosk", "camera_counter", "conference_endpoint",
        "noise_meter", "water_level", "satisfaction_terminal",
    ]  # fmt: skip
    counts = {name: len(t.metrics) for name, t in DEVICE_TYPES.items()}
    assert counts == {
        "air_quality": 8, "kiosk": 6, "camera_counter": 5, "conference_endpoint": 4,
        "noise_meter": 3, "water_level": 3, "satisfaction_terminal": 2,
    }  # fmt: skip
    assert sum(counts[name] for name in list(counts)[:4]) == 23


def test_shipped_entries_exactly():
    aq = device_type("air_quality")
    assert aq.transports == ("serial", "mqtt", "lorawan", "http")
    assert aq.serial_protocols == ("pms5003", "sds011")
    assert aq.metric_names == (
        "pm1", "pm25", "pm10", "co2", "no2", "o3", "temperature", "humidity",
    )  # fmt: skip
    assert aq.metric("temperature") == Metric(
        name="temperature", unit="degC", kind=MetricKind.FLOAT, min=-40, max=85,
        description="Air temperature",
    )  # fmt: skip
    kiosk = catalog.KIOSK
    assert kiosk.description == "Queue-ticket kiosk in a one-stop-shop service hall"
    assert kiosk.metric("printer_status") == Metric(
        name="printer_status", unit="", kind=MetricKind.ENUM, min=0, max=4,
        description="Ticket printer state",
        labels=("ok", "paper_low", "paper_out", "jam", "offline"),
    )  # fmt: skip
    assert kiosk.metric("uptime").max == 10 * 365 * 86400
    assert catalog.PRINTER_STATUS_LABELS == ("ok", "paper_low", "paper_out", "jam", "offline")
    online = catalog.CONFERENCE_ENDPOINT.metric("online")
    assert (online.kind, online.min, online.max, online.unit) == (MetricKind.BOOL, 0, 1, "")
    assert catalog.CAMERA_COUNTER.metric("vehicles_in").max == 100000
    assert catalog.CONFERENCE_ENDPOINT.transports == ("mqtt", "http")


def test_whole_number_bounds_stay_ints():
    # The generated SQL (and the migrations' checksums) spell the bounds as the old code did.
    for dtype in DEVICE_TYPES.values():
        for m in dtype.metrics:
            assert type(m.min) is int, (dtype.name, m.name)
            assert type(m.max) is int, (dtype.name, m.name)


def test_serial_protocols_match_the_gateway_decoders():
    assert tuple(SHIPPED_CATALOG.serial_protocols) == SERIAL_PROTOCOLS
    assert tuple(SHIPPED_CATALOG.transports) == ("serial", "mqtt", "modbus", "lorawan", "http")
    pms = SHIPPED_CATALOG.serial_protocols["pms5003"]
    assert set(pms.metrics) <= set(catalog.AIR_QUALITY.metric_names)


def test_catalog_round_trips_through_msgpack_and_json():
    for codec in (msgspec.msgpack, msgspec.json):
        decoded = codec.decode(codec.encode(SHIPPED_CATALOG), type=Catalog)
        assert decoded == SHIPPED_CATALOG


# --- operators' files ------------------------------------------------------------

NOISE = """
[types.noise_probe]
description = "Street noise meter"
transports = ["mqtt"]
metrics = [
    { name = "laeq", unit = "dBA", kind = "float", min = 20, max = 140, description = "LAeq" },
]

[types.kiosk]
metrics = [
    { name = "door_open", unit = "", kind = "bool", description = "Service door open" },
]
"""


def test_operator_file_adds_a_type_and_a_metric():
    merged = load_catalog([("/etc/cityhub/catalog.d/noise.toml", NOISE)])
    noise = merged.types["noise_probe"]
    assert noise.metric("laeq").unit == "dBA"
    assert noise.transports == ("mqtt",)
    kiosk = merged.types["kiosk"]
    assert kiosk.metric_names == (*catalog.KIOSK.metric_names, "door_open")
    assert kiosk.description == catalog.KIOSK.description
    assert merged.sources == (SHIPPED_SOURCE, "/etc/cityhub/catalog.d/noise.toml")
    assert describe_changes(SHIPPED_CATALOG, merged) == [
        "kiosk: new metric door_open (bool, '')",
        "new type noise_probe: 1 metric",
    ]
    # The shipped definitions stay as they were.
    assert SHIPPED_CATALOG.types["kiosk"] == catalog.KIOSK
    assert "noise_probe" not in SHIPPED_CATALOG.types


def test_restating_a_metric_may_change_range_and_description_and_append_labels():
    text = """
[types.kiosk]

[[types.kiosk.metrics]]
name = "queue_length"
unit = "people"
kind = "int"
min = 0
max = 9000
description = "Queue"

[[types.kiosk.metrics]]
name = "printer_status"
unit = ""
kind = "enum"
labels = ["ok", "paper_low", "paper_out", "jam", "offline", "cover_open"]
description = "Printer"
"""
    kiosk = load_catalog([("ops.toml", text)]).types["kiosk"]
    assert kiosk.metric("queue_length").max == 9000
    assert kiosk.metric("printer_status").labels[-1] == "cover_open"
    assert kiosk.metric("printer_status").max == 5
    assert kiosk.metric_names == catalog.KIOSK.metric_names


def test_directory_files_read_in_name_order(tmp_path):
    (tmp_path / "b.toml").write_text(
        '[types.noise_probe]\nmetrics = [{ name = "lmax", unit = "dBA", kind = "float", '
        'min = 20, max = 140, description = "Lmax" }]\n',
        encoding="utf-8",
    )
    (tmp_path / "a.toml").write_text(NOISE, encoding="utf-8")
    (tmp_path / "notes.txt").write_text("not a catalog", encoding="utf-8")
    merged = read_catalog([tmp_path])
    assert merged.types["noise_probe"].metric_names == ("laeq", "lmax")
    assert merged.sources[1:] == (str(tmp_path / "a.toml"), str(tmp_path / "b.toml"))


def test_missing_path_is_refused(tmp_path):
    with pytest.raises(CatalogError, match="no such file"):
        read_catalog([tmp_path / "absent.toml"])


def _metric_line(**fields):
    entry = {"name": "pm25", "unit": "ug/m3", "kind": "float", "min": 0, "max": 1000}
    entry |= {"description": "PM2.5"} | fields
    # json.dumps spells TOML's strings, numbers and lists; TOML spells infinity `inf`.
    body = ", ".join(f"{k} = {'inf' if v == math.inf else json.dumps(v)}" for k, v in entry.items())
    return f"[types.air_quality]\nmetrics = [{{ {body} }}]\n"


REFUSALS = [
    # (file text, type, key, words in the problem)
    (_metric_line(kind="int"), "air_quality", "metrics.pm25.kind", "kind cannot change"),
    (_metric_line(unit="mg/m3"), "air_quality", "metrics.pm25.unit", "unit cannot change"),
    (_metric_line(name="pm4", min=10, max=5), "air_quality", "metrics.pm4.max", "range"),
    (_metric_line(name="pm4", max=math.inf), "air_quality", "metrics.pm4.max", "finite"),
    (_metric_line(name="pm4", colour="red"), "air_quality", "metrics.pm4.colour", "unknown key"),
    (
        (
            "[types.air_quality]\nmetrics = ["
            '{ name = "pm4", unit = "ug/m3", kind = "float", min=0, max=9, description = "a" },'
            '{ name = "pm4", unit = "ug/m3", kind = "float", min=0, max=9, description = "b" }]\n'
        ),
        "air_quality",
        "metrics.pm4",
        "duplicate",
    ),
    (
        (
            '[types.kiosk]\nmetrics = [{ name = "printer_status", unit = "", kind = "enum", '
            'labels = ["jam", "ok"], description = "x" }]\n'
        ),
        "kiosk",
        "metrics.printer_status.labels",
        "known labels",
    ),
    (
        (
            '[types.kiosk]\nmetrics = [{ name = "level", unit = "%", kind = "enum", '
            'labels = ["a"], min = 0, max = 3, description = "x" }]\n'
        ),
        "kiosk",
        "metrics.level.max",
        "enum",
    ),
    (
        (
            '[types.kiosk]\nmetrics = [{ name = "seq", unit = "", kind = "int", min = 0, '
            'max = 1, description = "x" }]\n'
        ),
        "kiosk",
        "metrics.seq.name",
        "column",
    ),
    ("[types.kiosk]\nowner = 'x'\n", "kiosk", "owner", "unknown key"),
    ('[types.siren]\ndescription = "x"\ntransports = ["mqtt"]\n', "siren", "metrics", "missing"),
    (
        '[types.siren]\ndescription = "x"\ntransports = ["lora"]\nmetrics = []\n',
        "siren",
        "transports",
        "not a transport",
    ),
    (
        (
            '[types.dust]\ndescription = "x"\ntransports = ["serial"]\n'
            'serial_protocols = ["sds011"]\nmetrics = [{ name = "pm25", unit = "ug/m3", '
            'kind = "float", min = 0, max = 1, description = "x" }]'
        ),
        "dust",
        "serial_protocols",
        "sds011 frames carry pm10",
    ),
    ('[types.kiosk]\ntransports = ["serial"]\n', "kiosk", "serial_protocols", "if and only if"),
    (
        '[types.air_quality]\nserial_protocols = ["modbus"]\n',
        "air_quality",
        "serial_protocols",
        "not a serial protocol",
    ),
    ('[types."Bad-Name"]\ndescription = "x"\n', "Bad-Name", None, "type name"),
    ('[transports.lora]\ndescription = "LoRaWAN"\n', None, "transports", "shipped catalog"),
    ("colour = 'red'\n", None, "colour", "unknown key"),
    ("[types.kiosk\n", None, None, "not valid TOML"),
]


@pytest.mark.parametrize(("text", "type_name", "key", "words"), REFUSALS)
def test_refusals_name_file_type_and_key(text, type_name, key, words):
    source = "/etc/cityhub/catalog.d/ops.toml"
    with pytest.raises(CatalogError) as caught:
        load_catalog([("/etc/cityhub/catalog.d/ok.toml", NOISE), (source, text)])
    error = caught.value
    assert (error.source, error.type_name, error.key) == (source, type_name, key)
    assert words in error.problem
    message = str(error)
    assert message.startswith(source)
    if type_name is not None:
        assert repr(type_name) in message
    if key is not None:
        assert repr(key) in message


def test_an_already_loaded_metric_keeps_its_kind_too():
    again = NOISE.replace('kind = "float"', 'kind = "int"').replace("kiosk", "camera_counter")
    with pytest.raises(CatalogError, match=r"type 'noise_probe': key 'metrics.laeq.kind'"):
        load_catalog([("a.toml", NOISE), ("b.toml", again)])


# --- installing the catalog at start-up ------------------------------------------


def test_load_settings_installs_the_configured_catalog(tmp_path, restore_catalog):
    directory = tmp_path / "catalog.d"
    directory.mkdir()
    (directory / "noise.toml").write_text(NOISE, encoding="utf-8")
    config = tmp_path / "cityhub.toml"
    config.write_text(f'[catalog]\npaths = ["{directory}"]\n', encoding="utf-8")
    settings = load_settings(config, {})
    assert settings.catalog.path_list == [str(directory)]
    # Names imported before the installation see it: the dict is updated in place.
    assert device_type("noise_probe") is DEVICE_TYPES["noise_probe"]
    assert catalog.DEVICE_TYPES is DEVICE_TYPES
    assert "door_open" in DEVICE_TYPES["kiosk"].metric_names
    assert current_catalog().sources[-1] == str(directory / "noise.toml")
    uplink = decode_device_uplink(
        b'{"seq": 1, "ts": %d, "m": {"laeq": 61.5}}' % NOW_MS,
        device_type="noise_probe",
        now_ms=NOW_MS,
    )
    assert uplink.metrics == {"laeq": 61.5}
    # Settings without catalog files put the shipped catalog back.
    load_settings(None, {})
    assert "noise_probe" not in DEVICE_TYPES
    with pytest.raises(UnknownDeviceTypeError):
        device_type("noise_probe")


def test_environment_names_catalog_paths(tmp_path, restore_catalog):
    (tmp_path / "noise.toml").write_text(NOISE, encoding="utf-8")
    settings = load_settings(None, {"CITYHUB_CATALOG__PATHS": str(tmp_path / "noise.toml")})
    assert settings.catalog.path_list == [str(tmp_path / "noise.toml")]
    assert "noise_probe" in DEVICE_TYPES


def test_a_refused_catalog_file_stops_load_settings(tmp_path, restore_catalog):
    bad = tmp_path / "bad.toml"
    bad.write_text(_metric_line(unit="mg/m3"), encoding="utf-8")
    with pytest.raises(CatalogError, match="unit cannot change"):
        load_settings(None, {"CITYHUB_CATALOG__PATHS": str(bad)})
    settings = load_settings(None, {"CITYHUB_CATALOG__PATHS": str(bad)}, install_catalog=False)
    assert settings.catalog.path_list == [str(bad)]


# --- the uplink JSON Schema ------------------------------------------------------


def _validator(dtype, **window):
    schema = uplink_schema(dtype, **window)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=None)


def _good_value(metric: Metric) -> float:
    if metric.kind is MetricKind.FLOAT:
        return (metric.min + metric.max) / 2
    return metric.max


@pytest.mark.parametrize("name", list(SHIPPED_CATALOG.types))
def test_schema_accepts_what_the_encoder_builds_and_the_decoder_accepts(name):
    dtype = SHIPPED_CATALOG.types[name]
    validator = _validator(dtype, now_ms=NOW_MS)
    first = dtype.metrics[0].name
    # The first metric alone at its lowest valid value (0.0 for most types;
    # a sound level meter reads no lower than 30 dBA).
    lowest = float(dtype.metrics[0].min)
    uplinks = [
        DeviceUplink(seq=0, ts_ms=NOW_MS, metrics={m.name: _good_value(m) for m in dtype.metrics}),
        DeviceUplink(seq=2**63 - 1, ts_ms=NOW_MS - 1000, metrics={first: lowest}, boot="b-1"),
    ]
    for uplink in uplinks:
        payload = encode_device_uplink(uplink)
        decode_device_uplink(payload, device_type=name, now_ms=NOW_MS)
        assert list(validator.iter_errors(json.loads(payload))) == []


BAD_UPLINKS = [
    {"ts": NOW_MS, "m": {"pm25": 1}},  # no seq
    {"seq": 1, "m": {"pm25": 1}},  # no ts
    {"seq": 1, "ts": NOW_MS},  # no m
    {"seq": -1, "ts": NOW_MS, "m": {"pm25": 1}},
    {"seq": 2**63, "ts": NOW_MS, "m": {"pm25": 1}},
    {"seq": "1", "ts": NOW_MS, "m": {"pm25": 1}},
    {"seq": 1, "ts": NOW_MS // 1000, "m": {"pm25": 1}},  # seconds, not milliseconds
    {"seq": 1, "ts": NOW_MS + 3_600_000, "m": {"pm25": 1}},  # an hour ahead
    {"seq": 1, "ts": NOW_MS, "m": {}},
    {"seq": 1, "ts": NOW_MS, "m": {"pm25": 1001}},
    {"seq": 1, "ts": NOW_MS, "m": {"pm25": -0.5}},
    {"seq": 1, "ts": NOW_MS, "m": {"pm25": "12"}},
    {"seq": 1, "ts": NOW_MS, "m": {"pm25": True}},
    {"seq": 1, "ts": NOW_MS, "m": {"noise": 1}},  # no known metric left
    {"seq": 1, "ts": NOW_MS, "m": {"pm25": 1}, "boot": "Boot 1"},
]


@pytest.mark.parametrize("body", BAD_UPLINKS, ids=lambda b: json.dumps(b)[:60])
def test_schema_rejects_what_the_decoder_rejects(body):
    payload = json.dumps(body).encode()
    with pytest.raises(InputError):
        decode_device_uplink(payload, device_type="air_quality", now_ms=NOW_MS)
    assert list(_validator(catalog.AIR_QUALITY, now_ms=NOW_MS).iter_errors(body))


def test_schema_follows_the_types_unknown_metric_policy():
    # "report" (the default): the gateway stores the known metrics and reports
    # the unknown one, so the schema allows it beside a known one.
    body = {"seq": 1, "ts": NOW_MS, "m": {"pm25": 1, "noise": 1}}
    assert _validator(catalog.AIR_QUALITY, now_ms=NOW_MS).is_valid(body)
    strict = msgspec.structs.replace(catalog.AIR_QUALITY, unknown_metrics="reject")
    assert not _validator(strict, now_ms=NOW_MS).is_valid(body)


def test_schema_of_whole_number_kinds():
    validator = _validator(catalog.KIOSK)
    ok = {"seq": 1, "ts": NOW_MS, "m": {"printer_status": 4, "queue_length": 12}}
    assert not list(validator.iter_errors(ok))
    for m in ({"printer_status": 5}, {"queue_length": 1.5}, {"queue_length": True}):
        assert list(validator.iter_errors({"seq": 1, "ts": NOW_MS, "m": m})), m
    online = uplink_schema(catalog.CONFERENCE_ENDPOINT)["properties"]["m"]["properties"]["online"]
    assert (online["type"], online["minimum"], online["maximum"]) == ("integer", 0, 1)
    status = uplink_schema(catalog.KIOSK)["properties"]["m"]["properties"]["printer_status"]
    assert "4 = offline" in status["description"]


def test_schema_without_now_describes_the_window():
    schema = uplink_schema(catalog.AIR_QUALITY)
    ts = schema["properties"]["ts"]
    assert (ts["minimum"], ts["maximum"]) == (SECONDS_LIKE_BELOW_MS, TS_MAX_MS)
    assert "milliseconds" in ts["description"]
    assert "30 days" in schema["description"]


def test_use_catalog_keeps_the_shipped_order_and_objects(restore_catalog):
    merged = load_catalog([("noise.toml", NOISE)])
    use_catalog(merged)
    assert list(DEVICE_TYPES) == [*SHIPPED_CATALOG.types, "noise_probe"]
    assert DEVICE_TYPES["kiosk"] is merged.types["kiosk"]
    use_catalog(SHIPPED_CATALOG)
    assert list(DEVICE_TYPES) == list(SHIPPED_CATALOG.types)
    assert all(DEVICE_TYPES[n] is t for n, t in SHIPPED_CATALOG.types.items())
    assert current_catalog() is SHIPPED_CATALOG
