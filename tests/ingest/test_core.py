"""Ingest's pure core around the rows: acks of a group, ownership rebuilds, poison: no fixtures."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contracts.catalog import device_type
from contracts.errors import RefusedByDatabaseError
from contracts.messages import (
    GatewayState,
    check_block_rows,
    check_sound_block_rows,
    encode_batch,
    payload_digest,
)
from contracts.topics import state_topic
from ingest.acks import ACK_MAX_IDS, ack_id, build_acks
from ingest.ownership import ownership_changed, rebuild_if_changed, suspect_devices
from ingest.prepare import (
    INTERNAL_ERROR,
    GoodBatch,
    GoodState,
    PoisonBatch,
    internal_error,
    prepare_item,
    prepare_state,
    readings_of,
    refused,
)
from ingest.rows import NOT_OWNED
from tests.ingest.test_rows import NOW_MS, aq_block, batch_of, batches

TOPIC = "p/hub/v1/gw/gw-a/batch"


def good_item(owners, devices=("dev-a", "dev-b"), topic=TOPIC) -> GoodBatch:
    rows: list[tuple[int, int, int, float | None]] = [
        (i, i + 1, NOW_MS - 5, 1.0) for i in range(len(devices))
    ]
    payload = encode_batch(batch_of([aq_block(rows)], list(devices)))
    item = prepare_item(topic, payload, prefix="p", now_ms=NOW_MS, owners=owners)
    assert isinstance(item, GoodBatch)
    return item


def poison(gateway_id, batch_id, payload=b"x") -> PoisonBatch:
    return PoisonBatch(
        topic=TOPIC,
        gateway_id=gateway_id,
        batch_id=batch_id,
        reason="malformed",
        detail="",
        payload=payload,
    )


# --- acks ------------------------------------------------------------------------


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["gw-a", "gw-b", None]),
            st.sampled_from(["gw-a:b1:1", "gw-a:b1:2", "gw-b:b1:1", None]),
            st.binary(max_size=2),
        ),
        max_size=30,
    )
)
def test_acks_name_each_ackable_item_once_per_gateway_in_order(specs):
    items = [poison(gw, bid, payload) for gw, bid, payload in specs]
    acks = build_acks(items, now_ms=NOW_MS)
    expected: dict[str, list[tuple[str, str]]] = {}
    for item in items:
        found = ack_id(item)
        if found is not None and (found[1], found[2]) not in expected.get(found[0], []):
            expected.setdefault(found[0], []).append((found[1], found[2]))
    assert [gw for gw, _ in acks] == list(expected)
    for gateway_id, ack in acks:
        assert list(zip(ack.batch_ids, ack.digests, strict=True)) == expected[gateway_id]
        assert ack.ts_ms == NOW_MS


def test_acks_are_split_at_the_id_limit():
    items = [poison("gw-a", f"gw-a:b1:{n}") for n in range(2 * ACK_MAX_IDS + 1)]
    acks = build_acks(items, now_ms=NOW_MS)
    assert [len(ack.batch_ids) for _, ack in acks] == [ACK_MAX_IDS, ACK_MAX_IDS, 1]
    assert [b for _, ack in acks for b in ack.batch_ids] == [i.batch_id for i in items]


def test_a_good_batch_is_acked_by_its_id_and_digest():
    item = good_item({"dev-a": "gw-a"})
    assert build_acks([item, item], now_ms=NOW_MS)[0][1].batch_ids == [item.batch_id]
    assert ack_id(item) == ("gw-a", item.batch_id, payload_digest(item.payload))


# --- ownership -------------------------------------------------------------------


def test_suspects_are_the_devices_refused_as_not_owned():
    item = good_item({"dev-a": "gw-a", "dev-b": "gw-b"})
    assert [r.reason for r in item.rows.rejects] == [NOT_OWNED]
    assert suspect_devices([item, poison("gw-a", None)]) == {"dev-b"}
    assert suspect_devices([good_item({"dev-a": "gw-a", "dev-b": "gw-a"})]) == set()


@pytest.mark.parametrize(
    ("built_with", "now", "changed"),
    [
        ({"dev-a": "gw-a"}, {"dev-a": "gw-a"}, False),
        ({"dev-a": "gw-a"}, {"dev-a": "gw-a", "dev-b": "gw-a"}, True),  # registered since
        ({"dev-a": "gw-a", "dev-b": "gw-a"}, {"dev-a": "gw-a"}, True),  # revoked since
        ({"dev-a": "gw-a", "dev-b": "gw-b"}, {"dev-a": "gw-a", "dev-b": None}, False),
        ({"dev-a": "gw-a"}, {"dev-a": "gw-a", "dev-z": "gw-a"}, False),  # not in the batch
    ],
)
def test_ownership_changed_only_when_the_senders_share_of_its_devices_changed(
    built_with, now, changed
):
    item = good_item(built_with)
    assert ownership_changed(item, now) is changed
    rebuilt = rebuild_if_changed(item, now, prefix="p", now_ms=NOW_MS)
    assert (rebuilt is not item) is changed
    assert isinstance(rebuilt, GoodBatch)
    assert rebuilt.rows.readings == sum(now.get(d) == "gw-a" for d in item.devices)


def test_the_same_map_and_poison_are_never_rebuilt():
    owners = {"dev-a": "gw-a"}
    item = good_item(owners)
    assert rebuild_if_changed(item, owners, prefix="p", now_ms=NOW_MS) is item
    bad = poison("gw-a", None)
    assert rebuild_if_changed(bad, {}, prefix="p", now_ms=NOW_MS) is bad


# --- poison from the database or from a bug ----------------------------------------


STATE = GatewayState(
    gateway_id="gw-a",
    status="online",
    birth=1,
    boot_id="b1",
    version="1",
    outbox_depth=0,
    ts_ms=NOW_MS,
)


def test_a_refused_item_keeps_its_topic_payload_and_ids():
    batch = good_item({"dev-a": "gw-a"})
    state = prepare_state(state_topic("gw-a", "p"), msgspec.json.encode(STATE), prefix="p")
    assert isinstance(state, GoodState)
    exc = RefusedByDatabaseError("value too long")
    for item, batch_id in ((batch, batch.batch_id), (state, None)):
        bad = refused(item, exc)
        assert (bad.topic, bad.payload, bad.gateway_id, bad.batch_id) == (
            item.topic,
            item.payload,
            "gw-a",
            batch_id,
        )
        assert (bad.reason, bad.detail) == ("db_refused", "value too long")
    assert ack_id(refused(batch, exc)) == ack_id(batch)


def test_an_internal_error_is_poison_no_one_acks():
    bad = internal_error(TOPIC, b"x", ValueError("bug"))
    assert (bad.reason, bad.detail, bad.gateway_id) == (INTERNAL_ERROR, "ValueError: bug", None)
    assert ack_id(bad) is None
    assert readings_of(bad) == 0
    assert readings_of(good_item({"dev-a": "gw-a"})) == 1


# --- the block columns are checked once --------------------------------------------


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_rows_of_a_checked_block_report_as_check_block_rows_does(case):
    batch, _ = case
    for block in batch.blocks:
        sound = check_sound_block_rows(block, device_type(block.device_type), now_ms=NOW_MS)
        full = check_block_rows(block, now_ms=NOW_MS)
        assert [(row, type(e), str(e)) for row, e in sound] == [
            (row, type(e), str(e)) for row, e in full
        ]
