"""The gateway's reject report: aggregation per (device, reason), bounds, and the wire check."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contracts.errors import FieldTypeError, InvalidIdError, OutOfRangeError
from contracts.messages import (
    REJECT_SAMPLE_MAX_BYTES,
    REJECTS_PER_STATE_MAX,
    GatewayState,
    RejectCount,
    check_gateway_state,
    decode_gateway_state,
    encode_gateway_state,
)
from contracts.topics import device_uplink_topic
from gateway.rejects import MAX_KEYS, MAX_OTHER_KEYS, RejectAggregator
from tests.gateway.test_core import NOW, PREFIX, mqtt, router, uplink


def state(**fields) -> GatewayState:
    values: dict[str, Any] = {
        "gateway_id": "gw-hk",
        "status": "online",
        "birth": 1,
        "boot_id": "b00t",
        "version": "1.0",
        "outbox_depth": 0,
        "ts_ms": NOW,
    }
    values.update(fields)
    return GatewayState(**values)


def entry(**fields) -> RejectCount:
    values: dict[str, Any] = {
        "device_id": "k-1",
        "reason": "malformed",
        "count": 1,
        "first_ms": NOW,
        "last_ms": NOW,
    }
    values.update(fields)
    return RejectCount(**values)


def test_rejects_are_counted_per_device_and_reason_with_the_first_sample():
    agg = RejectAggregator()
    agg.add("k-1", "malformed", "first", b"{]" * 200, NOW, True)
    agg.add("k-1", "malformed", "second", b"xx", NOW + 5, True)
    agg.add("k-1", "out_of_range", "range", b"{}", NOW + 7, True)
    agg.add("k-9", "unknown_device", "not served", b"{}", NOW + 9, False)
    entries, dropped = agg.take()
    assert dropped == 0
    by_key = {(e.device_id, e.reason): e for e in entries}
    first = by_key["k-1", "malformed"]
    assert (first.count, first.first_ms, first.last_ms) == (2, NOW, NOW + 5)
    assert first.detail == "first"
    assert first.sample == (b"{]" * 200)[:REJECT_SAMPLE_MAX_BYTES]
    assert first.sample_of_bytes == 400
    assert by_key["k-9", "unknown_device"].count == 1
    assert [e.device_id for e in entries][-1] == "k-9"  # served devices first
    assert agg.take() == ((), 0)  # a new period


def test_a_flood_of_distinct_ids_stays_bounded_and_counts_what_was_dropped():
    agg = RejectAggregator()
    for i in range(10_000):
        agg.add(f"bogus-{i}", "unknown_device", "", b"{}", NOW + i, False)
    for i in range(200):
        agg.add(f"k-{i}", "malformed", "", b"{]", NOW, True)
    assert len(agg) == MAX_OTHER_KEYS + MAX_KEYS
    entries, dropped = agg.take()
    assert len(entries) == MAX_OTHER_KEYS + MAX_KEYS <= REJECTS_PER_STATE_MAX
    assert dropped == (10_000 - MAX_OTHER_KEYS) + (200 - MAX_KEYS)
    # The unserved flood did not crowd out the served devices.
    assert sum(e.device_id.startswith("k-") for e in entries) == MAX_KEYS
    # The state that carries it decodes within the control message limit.
    payload = encode_gateway_state(state(rejects=entries, rejects_dropped=dropped))
    assert decode_gateway_state(payload).rejects == entries


@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(["x", "y"]))))
def test_counts_add_up_to_what_was_added(keys):
    agg = RejectAggregator()
    for device_id, reason in keys:
        agg.add(device_id, reason, "", b"", NOW, True)
    entries, dropped = agg.take()
    assert dropped == 0
    assert sum(e.count for e in entries) == len(keys)
    assert len(entries) == len(set(keys))


def test_router_reports_served_and_unserved_ids_and_topics_without_one():
    r = router(mqtt("k-1"))
    r.site_messages(
        [
            (device_uplink_topic("k-1", PREFIX), b"{]", 1, 1, False),
            (device_uplink_topic("k-1", PREFIX), b"{]]", 1, 2, False),
            (device_uplink_topic("k-9", PREFIX), uplink(1), 1, 3, False),
            ("t1/x/k-1/up", b"{}", 1, 4, False),
            (device_uplink_topic("k-1", PREFIX), uplink(2), 1, 5, False),
        ],
        generation=1,
        now=NOW,
    )
    entries, dropped = r.report.take()
    assert dropped == 0
    by_key = {(e.device_id, e.reason): e for e in entries}
    assert set(by_key) == {("k-1", "malformed"), ("k-9", "unknown_device"), ("", "bad_topic")}
    assert by_key["k-1", "malformed"].count == 2
    assert by_key["k-1", "malformed"].sample == b"{]"
    assert by_key["k-9", "unknown_device"].sample == uplink(1)
    # The counters keep their bounded "other" key for unserved ids.
    assert r.counters.device_rejects["other", "unknown_device"] == 1
    assert r.counters.accepted == 1


def test_a_state_with_rejects_round_trips_and_old_states_decode():
    entries = (entry(count=3, last_ms=NOW + 10, detail="bad", sample=b"\x00\xff"),)
    decoded = decode_gateway_state(encode_gateway_state(state(rejects=entries, rejects_dropped=4)))
    assert decoded.rejects == entries
    assert decoded.rejects_dropped == 4
    assert decode_gateway_state(encode_gateway_state(state())).rejects == ()


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ({"device_id": "K 1"}, InvalidIdError),
        ({"reason": "Not A Reason"}, FieldTypeError),
        ({"count": 0}, OutOfRangeError),
        ({"count": -1}, OutOfRangeError),
        ({"first_ms": NOW + 1}, OutOfRangeError),
        ({"last_ms": 10**18}, OutOfRangeError),
        ({"detail": "x" * 1000}, FieldTypeError),
        ({"sample": b"x" * (REJECT_SAMPLE_MAX_BYTES + 1)}, FieldTypeError),
    ],
)
def test_reject_entries_are_checked(bad, error):
    with pytest.raises(error):
        check_gateway_state(state(rejects=(entry(**bad),)))


def test_too_many_entries_or_a_negative_dropped_count_are_refused():
    with pytest.raises(OutOfRangeError):
        check_gateway_state(state(rejects=(entry(),) * (REJECTS_PER_STATE_MAX + 1)))
    with pytest.raises(OutOfRangeError):
        check_gateway_state(state(rejects_dropped=-1))
    assert check_gateway_state(state(rejects=(entry(device_id=""),))).rejects[0].device_id == ""
