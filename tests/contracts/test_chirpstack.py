"""ChirpStack's integration events and Cayenne LPP: ChirpStack's own messages decoded by ours."""

from __future__ import annotations

import datetime

import pytest
from chirpstack_api import integration
from google.protobuf.json_format import MessageToJson, Parse
from hypothesis import given
from hypothesis import strategies as st

from contracts.catalog import current_catalog
from contracts.chirpstack import (
    CHIRPSTACK_EVENT_MAX_BYTES,
    decode_join_event,
    decode_lpp,
    decode_status_event,
    decode_uplink_event,
    encode_event,
    encode_lpp,
    event_time_ms,
    to_rfc3339,
    uplink_metrics,
)
from contracts.errors import (
    FieldTypeError,
    MalformedPayloadError,
    ModelMismatchError,
    PayloadTooLargeError,
    UndecodablePayloadError,
)
from contracts.lorawanmodels import LPP_TYPES

EUI = "0102030405060708"
APP = "f3c1a6a2-6b0e-4b8b-9c53-1a4f8b2c7d10"
# 2024-05-01T08:30:15.250Z
TS_MS = 1714552215250


def _info() -> integration.DeviceInfo:
    return integration.DeviceInfo(
        tenant_id="52f14cd4-c6f1-4fbd-8f87-4025e1d49242",
        application_id=APP,
        application_name="street-nodes",
        device_profile_name="aq-lpp",
        device_name="aq-hk-01",
        dev_eui=EUI,
        tags={"ward": "hang-bac"},
    )


def _at(message, ts_ms: int = TS_MS):
    message.time.FromDatetime(
        datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(milliseconds=ts_ms)
    )
    return message


def test_an_uplink_event_as_chirpstack_marshals_it():
    event = _at(
        integration.UplinkEvent(
            deduplication_id="6c7a5d5e-3b8c-4c1f-a2b0-8d1b0a6a9f11",
            device_info=_info(),
            dev_addr="00189440",
            adr=True,
            dr=5,
            f_cnt=1234567,
            f_port=2,
            confirmed=True,
            data=bytes.fromhex("03670110056700ff"),
            rx_info=[{"gateway_id": "0016c001f153a14c", "rssi": -57, "snr": 10.5}],
            tx_info={"frequency": 923200000},
        )
    )
    decoded = decode_uplink_event(MessageToJson(event).encode())
    assert decoded.deduplication_id == "6c7a5d5e-3b8c-4c1f-a2b0-8d1b0a6a9f11"
    assert event_time_ms(decoded.time) == TS_MS
    assert decoded.device_info.dev_eui == EUI
    assert decoded.device_info.application_id == APP
    assert decoded.device_info.tags == {"ward": "hang-bac"}
    assert (decoded.dev_addr, decoded.f_cnt, decoded.f_port, decoded.dr) == (
        "00189440",
        1234567,
        2,
        5,
    )
    assert decoded.adr
    assert decoded.confirmed
    assert decoded.data == bytes.fromhex("03670110056700ff")
    assert decoded.object is None


def test_fields_at_their_default_are_left_out_and_read_as_the_default():
    # Protobuf's JSON mapping writes no fCnt 0, no empty data, no false flags.
    event = integration.UplinkEvent(device_info=_info(), dev_addr="00000001", f_cnt=0)
    text = MessageToJson(event)
    assert "fCnt" not in text
    assert "time" not in text
    decoded = decode_uplink_event(text.encode())
    assert decoded.f_cnt == 0
    assert decoded.data == b""
    assert decoded.time is None
    assert event_time_ms(decoded.time) is None


def test_an_object_decoded_by_chirpstack_comes_through():
    event = integration.UplinkEvent(device_info=_info(), f_cnt=3)
    event.object.update({"depth_cm": 41.5, "status": "obstructed", "battery": 93})
    decoded = decode_uplink_event(MessageToJson(event).encode())
    # protobuf's Struct carries numbers as doubles.
    assert decoded.object == {"depth_cm": 41.5, "status": "obstructed", "battery": 93.0}


def test_status_and_join_events():
    status = _at(
        integration.StatusEvent(
            deduplication_id="a", device_info=_info(), margin=12, battery_level=81.5
        )
    )
    decoded = decode_status_event(MessageToJson(status).encode())
    assert (decoded.margin, decoded.battery_level) == (12, 81.5)
    assert not decoded.battery_level_unavailable
    assert event_time_ms(decoded.time) == TS_MS
    mains = integration.StatusEvent(device_info=_info(), external_power_source=True)
    decoded = decode_status_event(MessageToJson(mains).encode())
    assert decoded.external_power_source
    assert decoded.battery_level is None
    joined = _at(integration.JoinEvent(device_info=_info(), dev_addr="26011b2c"))
    decoded_join = decode_join_event(MessageToJson(joined).encode())
    assert decoded_join.dev_addr == "26011b2c"
    assert decoded_join.device_info.dev_eui == EUI


def test_our_encoding_is_chirpstacks():
    """What the simulator publishes parses as ChirpStack's message, field for field."""
    original = _at(
        integration.UplinkEvent(
            deduplication_id="x1",
            device_info=_info(),
            dev_addr="00189440",
            f_cnt=9,
            f_port=1,
            data=b"\x01\x02\x00\x7b",
        )
    )
    ours = decode_uplink_event(MessageToJson(original).encode())
    again = Parse(encode_event(ours), integration.UplinkEvent(), ignore_unknown_fields=False)
    assert again.deduplication_id == "x1"
    assert again.f_cnt == 9
    assert again.data == b"\x01\x02\x00\x7b"
    assert again.time.ToMilliseconds() == TS_MS
    assert again.device_info.dev_eui == EUI
    assert to_rfc3339(TS_MS) == "2024-05-01T08:30:15.250Z"


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"{", MalformedPayloadError),
        (b"[]", FieldTypeError),
        (b'{"fCnt": "12"}', FieldTypeError),
        (b'{"fCnt": -1}', FieldTypeError),
        (b'{"fCnt": 4294967296}', FieldTypeError),
        (b'{"devAddr": "0018944"}', FieldTypeError),
        (b'{"data": "not base64!"}', FieldTypeError),
        (b'{"time": "yesterday"}', FieldTypeError),
        (b'{"object": [1, 2]}', FieldTypeError),
        (b'{"data": "' + b"A" * 400 + b'"}', FieldTypeError),  # 300 bytes > 242
        (b'{"x": "' + b"a" * CHIRPSTACK_EVENT_MAX_BYTES + b'"}', PayloadTooLargeError),
    ],
)
def test_bad_uplink_events_are_refused_with_their_reason(payload, error):
    with pytest.raises(error) as caught:
        decode_uplink_event(payload)
    assert type(caught.value) is error


# --- Cayenne LPP --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hex_payload", "items"),
    [
        # The LPP reference's examples: two temperature sensors, then one
        # temperature and an accelerometer (here only what the catalog knows).
        ("03670110056700ff", [(3, "temperature", 27.2), (5, "temperature", 25.5)]),
        ("0167ffd7", [(1, "temperature", -4.1)]),
        ("066828", [(6, "humidity", 20.0)]),
        ("0173 2767", [(1, "barometer", 1008.7)]),
        ("0265 0190", [(2, "illuminance", 400.0)]),
        ("0702 fc18", [(7, "analog_input", -10.0)]),
        (
            "0800 01 0901 00 0a66 01",
            [(8, "digital_input", 1.0), (9, "digital_output", 0.0), (10, "presence", 1.0)],
        ),
        ("", []),
    ],
)
def test_lpp_reference_vectors(hex_payload, items):
    data = bytes.fromhex(hex_payload)
    assert decode_lpp(data) == items
    assert encode_lpp(items) == data


@pytest.mark.parametrize(
    ("hex_payload", "words"),
    [
        ("0188 065e9d f2960a 0003e8", "unknown data type 0x88"),  # GPS: not in the catalog
        ("0367 01", "needs 2 bytes"),
        ("03", "a header needs 2"),
        ("0367 0110 05", "a header needs 2"),
    ],
)
def test_undecodable_lpp_names_what_is_wrong(hex_payload, words):
    with pytest.raises(UndecodablePayloadError, match=words):
        decode_lpp(bytes.fromhex(hex_payload))


def _lpp_item(name: str) -> st.SearchStrategy[tuple[int, str, float]]:
    _code, size, resolution, signed = LPP_TYPES[name]
    bits = 8 * size
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    decimals = max(0, len(repr(resolution).split(".")[1].rstrip("0")))
    return st.tuples(
        st.integers(0, 255),
        st.just(name),
        st.integers(low, high).map(lambda raw: round(raw * resolution, decimals)),
    )


@given(st.lists(st.one_of([_lpp_item(name) for name in LPP_TYPES]), max_size=20))
def test_lpp_round_trip(items):
    assert decode_lpp(encode_lpp(items)) == items


def test_lpp_encoder_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match="does not fit"):
        encode_lpp([(1, "humidity", 200.0)])
    with pytest.raises(ValueError, match="does not fit"):
        encode_lpp([(256, "temperature", 1.0)])


# --- metrics by model ---------------------------------------------------------------


def _uplink(*, data: bytes = b"", obj: dict | None = None):
    event = integration.UplinkEvent(device_info=_info(), f_cnt=1, data=data)
    if obj is not None:
        event.object.update(obj)
    return decode_uplink_event(MessageToJson(event).encode())


def test_cayenne_model_metrics():
    model = current_catalog().lorawan_models["lpp_air_quality"]
    data = encode_lpp(
        [
            (1, "analog_input", 35.27),
            (2, "analog_input", 61.0),
            (3, "temperature", 31.4),
            (4, "humidity", 77.5),
            (9, "presence", 1.0),  # a channel the model does not read: ignored
        ]
    )
    # The node sends PM in tens of ug/m3 (the model's scale 10).
    assert uplink_metrics(_uplink(data=data), model) == pytest.approx(
        {"pm25": 352.7, "pm10": 610.0, "temperature": 31.4, "humidity": 77.5}
    )
    # A channel left out leaves its metric out.
    partial = encode_lpp([(3, "temperature", 30.0)])
    assert uplink_metrics(_uplink(data=partial), model) == {"temperature": 30.0}


def test_cayenne_model_refusals():
    model = current_catalog().lorawan_models["lpp_air_quality"]
    with pytest.raises(ModelMismatchError, match="channel 3 carries humidity"):
        uplink_metrics(_uplink(data=encode_lpp([(3, "humidity", 50.0)])), model)
    with pytest.raises(ModelMismatchError, match="carries none of"):
        uplink_metrics(_uplink(data=encode_lpp([(9, "presence", 1.0)])), model)
    with pytest.raises(UndecodablePayloadError, match="no data"):
        uplink_metrics(_uplink(), model)
    with pytest.raises(UndecodablePayloadError, match="0x88"):
        uplink_metrics(_uplink(data=bytes.fromhex("018806")), model)


def test_object_model_metrics():
    model = current_catalog().lorawan_models["object_water_level"]
    event = _uplink(obj={"depth_cm": 41.5, "status": "obstructed", "battery": 93, "rssi": -80})
    assert uplink_metrics(event, model) == {
        "water_depth": 41.5,
        "sensor_status": 2.0,  # the label's code in the catalog's enum
        "battery": 93.0,
    }
    assert uplink_metrics(_uplink(obj={"status": 1}), model) == {"sensor_status": 1.0}


def test_object_model_refusals():
    model = current_catalog().lorawan_models["object_water_level"]
    with pytest.raises(UndecodablePayloadError, match="has none"):
        uplink_metrics(_uplink(data=b"\x01"), model)
    with pytest.raises(ModelMismatchError, match="carries none of"):
        uplink_metrics(_uplink(obj={"temperature": 20}), model)
    with pytest.raises(ModelMismatchError, match="not one of"):
        uplink_metrics(_uplink(obj={"status": "flooded"}), model)
    with pytest.raises(FieldTypeError, match="not a number"):
        uplink_metrics(_uplink(obj={"depth_cm": {"value": 3}}), model)
