"""The downlink's messages: states, the gateway's commands, its reports, a device's answers."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from contracts.commands import (
    ANSWER_STATES,
    COMMAND_REPORTS_MAX_BYTES,
    COMMAND_STATES,
    COMMANDS_PER_MESSAGE_MAX,
    DETAIL_MAX_CHARS,
    DEVICE_ANSWER_MAX_BYTES,
    FINAL_STATES,
    REPORTS_PER_MESSAGE_MAX,
    STATE_LABELS,
    Command,
    CommandReport,
    CommandReports,
    DeviceAnswer,
    GatewayCommands,
    advances,
    decode_command_reports,
    decode_device_answer,
    decode_gateway_commands,
    encode_command_reports,
    encode_device_answer,
    encode_gateway_commands,
    make_report,
)
from contracts.errors import (
    FieldTypeError,
    InconsistentBatchError,
    InputError,
    InvalidIdError,
    MalformedPayloadError,
    OutOfRangeError,
    PayloadTooLargeError,
)

NOW_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
GW = "gw-hk"
COMMAND = Command(
    command_id="c-0123456789abcdef",
    device_id="kiosk-07",
    name="print_test_page",
    args={},
    ttl_s=600,
    created_ms=NOW_MS,
)

ids = st.from_regex(r"[a-z0-9][a-z0-9-]{0,20}", fullmatch=True)
names = st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True)
values = st.one_of(
    st.integers(-(2**53), 2**53),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=0x7E), max_size=20),
)
reports = st.builds(
    make_report,
    ids,
    ids,
    st.sampled_from([s for s in COMMAND_STATES if s != "queued"]),
    st.integers(0, 2**45),
    detail=st.text(max_size=40).filter(lambda t: "\x00" not in t),
    answer=st.dictionaries(names, values, max_size=4),
)


# --- states -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "new", "moves"),
    [
        ("queued", "sent", True),
        ("queued", "succeeded", True),  # a late 'sent' report is not needed first
        ("sent", "delivered", True),
        ("delivered", "failed", True),
        ("sent", "queued", False),
        ("delivered", "sent", False),  # a late report never moves a command back
        ("sent", "sent", False),
        ("succeeded", "failed", False),  # a final state is never replaced
        ("expired", "succeeded", False),
        ("cancelled", "delivered", False),
    ],
)
def test_a_state_only_moves_forward(current, new, moves):
    assert advances(current, new) is moves


def test_every_state_has_a_label_in_both_languages():
    assert set(STATE_LABELS) == set(COMMAND_STATES)
    assert all(vi and en and vi != en for vi, en in STATE_LABELS.values())
    assert set(COMMAND_STATES) > FINAL_STATES
    assert {"delivered", "succeeded", "failed"} == ANSWER_STATES


# --- central -> gateway -------------------------------------------------------------


def test_gateway_commands_round_trip_and_default_fields():
    message = GatewayCommands(gateway_id=GW, ts_ms=NOW_MS, commands=[COMMAND], cancel=["c-9"])
    assert decode_gateway_commands(encode_gateway_commands(message), gateway_id=GW) == message
    # cancel and commands may be left out by a sender that has none.
    bare = decode_gateway_commands(b'{"gateway_id":"gw-hk","ts_ms":1}')
    assert (bare.commands, bare.cancel) == ([], [])


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"{", MalformedPayloadError),
        (b'{"gateway_id":"gw-hk"}', FieldTypeError),
        (b'{"gateway_id":"GW/#","ts_ms":1}', InvalidIdError),
        (b'{"gateway_id":"gw-other","ts_ms":1}', InconsistentBatchError),
        (b'{"gateway_id":"gw-hk","ts_ms":-1}', OutOfRangeError),
        (b'{"gateway_id":"gw-hk","ts_ms":1,"cancel":["c 1"]}', InvalidIdError),
        (b'{"gateway_id":"gw-hk","ts_ms":1,"commands":[{"command_id":"c-1"}]}', FieldTypeError),
        (b"[" * 100_000, MalformedPayloadError),
    ],
)
def test_gateway_commands_refusals(payload, error):
    with pytest.raises(error):
        decode_gateway_commands(payload, gateway_id=GW)


def test_gateway_commands_bounds():
    too_many = GatewayCommands(
        gateway_id=GW, ts_ms=1, cancel=[f"c-{n}" for n in range(COMMANDS_PER_MESSAGE_MAX + 1)]
    )
    with pytest.raises(FieldTypeError, match="at most"):
        decode_gateway_commands(encode_gateway_commands(too_many))
    with pytest.raises(PayloadTooLargeError):
        decode_gateway_commands(b" " * 100, max_bytes=99)
    # A command inside is checked like one on its own: ttl out of bounds.
    bad = GatewayCommands(
        gateway_id=GW, ts_ms=1, commands=[msgspec.structs.replace(COMMAND, ttl_s=0)]
    )
    with pytest.raises(OutOfRangeError, match="ttl_s"):
        decode_gateway_commands(encode_gateway_commands(bad))


# --- gateway -> central -------------------------------------------------------------


@given(st.lists(reports, min_size=1, max_size=5))
def test_command_reports_round_trip(items):
    message = CommandReports(gateway_id=GW, ts_ms=NOW_MS, reports=items)
    assert decode_command_reports(encode_command_reports(message), gateway_id=GW) == message


def test_a_report_names_itself_by_command_and_state():
    report = make_report(COMMAND, "kiosk-07", "failed", NOW_MS, detail="x" * 10_000)
    assert report.report_id == "c-0123456789abcdef.failed"
    assert len(report.detail) == DETAIL_MAX_CHARS


def _reports_payload(**report: object) -> bytes:
    base = {
        "report_id": "c-1.sent",
        "command_id": "c-1",
        "device_id": "kiosk-07",
        "state": "sent",
        "ts_ms": 1,
    }
    return json.dumps({"gateway_id": GW, "ts_ms": 1, "reports": [base | report]}).encode()


@pytest.mark.parametrize(
    ("report", "error", "match"),
    [
        ({"state": "queued", "report_id": "c-1.queued"}, FieldTypeError, "not a state"),
        ({"state": "done", "report_id": "c-1.done"}, FieldTypeError, "not a state"),
        ({"report_id": "c-2.sent"}, FieldTypeError, "report_id"),
        ({"command_id": "C-1", "report_id": "C-1.sent"}, InvalidIdError, "command_id"),
        ({"device_id": "kiosk/#"}, InvalidIdError, "device_id"),
        ({"ts_ms": 2**62}, OutOfRangeError, "ts_ms"),
        ({"detail": "x" * (DETAIL_MAX_CHARS + 1)}, FieldTypeError, "detail"),
        ({"answer": {"rtt": float("nan")}}, MalformedPayloadError, "JSON"),
        ({"answer": {f"k{n}": n for n in range(17)}}, FieldTypeError, "at most"),
        ({"answer": {"Bad-Key": 1}}, FieldTypeError, "not a name"),
        ({"answer": {"text": "a\x07b"}}, FieldTypeError, "control"),
        ({"answer": {"nested": {"a": 1}}}, FieldTypeError, "Expected"),
    ],
)
def test_report_refusals(report, error, match):
    # json.dumps writes NaN, which is not JSON: the decoder refuses the syntax.
    payload = _reports_payload(**report)
    with pytest.raises(error, match=match):
        decode_command_reports(payload, gateway_id=GW)


def test_reports_from_another_gateway_or_too_many_are_refused():
    with pytest.raises(InconsistentBatchError):
        decode_command_reports(_reports_payload(), gateway_id="gw-other")
    empty = CommandReports(gateway_id=GW, ts_ms=1, reports=[])
    with pytest.raises(FieldTypeError, match="between 1"):
        decode_command_reports(encode_command_reports(empty))
    one = make_report("c-1", "kiosk-07", "sent", 1)
    many = CommandReports(gateway_id=GW, ts_ms=1, reports=[one] * (REPORTS_PER_MESSAGE_MAX + 1))
    with pytest.raises(FieldTypeError, match="between 1"):
        decode_command_reports(encode_command_reports(many))
    with pytest.raises(PayloadTooLargeError):
        decode_command_reports(b" " * (COMMAND_REPORTS_MAX_BYTES + 1))


# --- device -> gateway --------------------------------------------------------------


def test_device_answer_round_trip_and_wire_form():
    answer = DeviceAnswer(
        command_id="c-1", state="succeeded", detail="gọi thử xong", answer={"rtt_ms": 41.5}
    )
    raw = encode_device_answer(answer)
    assert json.loads(raw) == {
        "command_id": "c-1",
        "state": "succeeded",
        "detail": "gọi thử xong",
        "answer": {"rtt_ms": 41.5},
    }
    assert decode_device_answer(raw) == answer
    assert decode_device_answer(b'{"command_id":"c-1","state":"delivered"}').detail == ""


@pytest.mark.parametrize(
    "payload",
    [
        b'{"command_id":"c-1","state":"sent"}',  # only the gateway says sent
        b'{"command_id":"c-1","state":"expired"}',
        b'{"command_id":"c-1","state":"cancelled"}',
        b'{"command_id":"../c","state":"failed"}',
        b'{"state":"failed"}',
        b'{"command_id":"c-1","state":"failed","detail":' + b'"' + b"x" * 600 + b'"}',
        b"\xff\xfe",
        b"null",
        b" " * (DEVICE_ANSWER_MAX_BYTES + 1),
    ],
)
def test_device_answer_refusals(payload):
    with pytest.raises(InputError):
        decode_device_answer(payload)


def test_a_gateway_never_reports_queued_and_a_report_is_built_for_any_final_state():
    for state in FINAL_STATES:
        report = make_report("c-1", "d-1", state, 1)
        message = CommandReports(gateway_id=GW, ts_ms=1, reports=[report])
        assert decode_command_reports(encode_command_reports(message)).reports == [report]
    assert isinstance(make_report("c-1", "d-1", "sent", 1), CommandReport)
