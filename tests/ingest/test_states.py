"""Gateway state messages as ingest classifies them, before any database: no fixtures."""

from __future__ import annotations

import msgspec
import pytest

from contracts.errors import FieldTypeError, NonFiniteValueError, OutOfRangeError
from contracts.messages import (
    SEQ_MAX,
    TS_MAX_MS,
    GatewayState,
    check_gateway_state,
    encode_gateway_state,
    revoked_gateway_state,
)
from contracts.topics import batch_topic, state_topic
from ingest.prepare import GATEWAY_MISMATCH, GoodState, PoisonBatch, prepare_state
from ingest.states import StateRow, in_lock_order, state_row

STATE = GatewayState(
    gateway_id="gw-hk-1",
    status="online",
    birth=4,
    boot_id="b7",
    version="1.2.0",
    outbox_depth=3,
    ts_ms=1_767_225_600_000,
    outbox_readings=250,
    readings_per_s=12.5,
    received=1000,
    accepted=990,
    rejected=10,
    devices_online=6,
    site_ready=True,
    outbox_refused_readings=7,
    outbox_dropped_readings=5,
)


def test_a_good_state_becomes_its_row() -> None:
    item = prepare_state(state_topic("gw-hk-1", "p1"), encode_gateway_state(STATE), prefix="p1")
    assert isinstance(item, GoodState)
    assert item.row == StateRow(
        gateway_id="gw-hk-1",
        status="online",
        birth=4,
        boot_id="b7",
        version="1.2.0",
        ts_ms=1_767_225_600_000,
        outbox_depth=3,
        outbox_readings=250,
        readings_per_s=12.5,
        received=1000,
        accepted=990,
        rejected=10,
        rate_limited=0,
        serial_errors=0,
        devices_online=6,
        site_ready=True,
        outbox_refused_readings=7,
        outbox_dropped_readings=5,
    )


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"received": -1}, OutOfRangeError),
        ({"serial_errors": SEQ_MAX + 1}, OutOfRangeError),
        ({"devices_online": -2}, OutOfRangeError),
        ({"ts_ms": TS_MAX_MS + 1}, OutOfRangeError),
        ({"readings_per_s": float("nan")}, NonFiniteValueError),
        ({"readings_per_s": float("inf")}, NonFiniteValueError),
        ({"readings_per_s": -0.5}, OutOfRangeError),
        ({"version": "v" * 65}, FieldTypeError),
        ({"version": "1.0\x00"}, FieldTypeError),
    ],
)
def test_values_the_database_cannot_hold_are_refused(change, error) -> None:
    with pytest.raises(error):
        check_gateway_state(msgspec.structs.replace(STATE, **change))


def test_limits_themselves_are_accepted() -> None:
    row = state_row(
        check_gateway_state(
            msgspec.structs.replace(
                STATE, received=SEQ_MAX, ts_ms=TS_MAX_MS, readings_per_s=0.0, version="v" * 64
            )
        )
    )
    assert (row.received, row.ts_ms) == (SEQ_MAX, TS_MAX_MS)


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        (state_topic("gw-hk-1", "p1"), b"\xff{", "malformed"),
        (state_topic("gw-hk-1", "p1"), b'{"gateway_id": "gw-hk-1"}', "wrong_type"),
        (state_topic("gw-hk-1", "p2"), encode_gateway_state(STATE), "bad_topic"),
        (batch_topic("gw-hk-1", "p1"), encode_gateway_state(STATE), "bad_topic"),
        (state_topic("gw-hk-2", "p1"), encode_gateway_state(STATE), GATEWAY_MISMATCH),
        (
            state_topic("gw-hk-1", "p1"),
            encode_gateway_state(msgspec.structs.replace(STATE, received=-1)),
            "out_of_range",
        ),
    ],
)
def test_bad_state_messages_are_poison_with_their_reason(topic, payload, reason) -> None:
    item = prepare_state(topic, payload, prefix="p1")
    assert isinstance(item, PoisonBatch)
    assert item.reason == reason
    assert item.payload == payload
    assert item.batch_id is None
    assert item.gateway_id == (None if reason == "bad_topic" else topic.split("/")[-2])


def test_lock_order_groups_by_gateway_and_keeps_arrival_order_within_one() -> None:
    rows = [
        state_row(msgspec.structs.replace(STATE, gateway_id=gw, ts_ms=ts))
        for gw, ts in [("gw-b", 3), ("gw-a", 9), ("gw-b", 1), ("gw-a", 2)]
    ]
    assert [(r.gateway_id, r.ts_ms) for r in in_lock_order(rows)] == [
        ("gw-a", 9),
        ("gw-a", 2),
        ("gw-b", 3),
        ("gw-b", 1),
    ]


@pytest.mark.parametrize(
    ("will", "received_ms", "retained", "ts_ms"),
    [
        (False, 1_767_225_700_000, False, STATE.ts_ms),  # a state keeps its own time
        (True, 1_767_225_700_000, False, 1_767_225_700_000),  # a Will: when it was received
        (True, 1_767_225_700_000, True, 1_767_225_700_000),  # retained: the writer decides
        (True, None, False, STATE.ts_ms),  # no receive time known: its own
    ],
)
def test_a_will_is_timed_when_it_was_received(will, received_ms, retained, ts_ms) -> None:
    state = msgspec.structs.replace(STATE, status="offline", will=will)
    row = state_row(state, received_ms=received_ms, retained=retained)
    assert (row.ts_ms, row.will, row.retained) == (ts_ms, will, retained)


def test_the_revoked_state_of_provisioning_is_a_checked_offline_row_marked_revoked() -> None:
    state = revoked_gateway_state("gw-hk-1", birth=4, ts_ms=1_767_225_700_000)
    item = prepare_state(state_topic("gw-hk-1", "p1"), encode_gateway_state(state), prefix="p1")
    assert isinstance(item, GoodState)
    row = item.row
    assert (row.status, row.birth, row.ts_ms, row.revoked, row.will) == (
        "offline",
        4,
        1_767_225_700_000,
        True,
        False,
    )
    # A gateway's own states (which never carry the field) are not revoked.
    item = prepare_state(state_topic("gw-hk-1", "p1"), encode_gateway_state(STATE), prefix="p1")
    assert isinstance(item, GoodState)
    assert not item.row.revoked
