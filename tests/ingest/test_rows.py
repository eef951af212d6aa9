"""Ingest's pure core: binary COPY encoding, row building, prepare/classify, backoff.

Property tests compare against row-by-row oracles; one test sends the
encoder's output through a real PostgreSQL COPY to prove the server reads it.
"""

from __future__ import annotations

import math
import struct
from collections import Counter
from datetime import UTC, datetime, timedelta

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.backoff import backoff_delay_s
from contracts.catalog import DEVICE_TYPES
from contracts.errors import InputError
from contracts.ids import batch_id
from contracts.messages import (
    Batch,
    ReadingBlock,
    check_block_rows,
    encode_batch,
    payload_digest,
)
from ingest.acks import ack_id
from ingest.copyformat import HEADER, PG_EPOCH_MS, TRAILER, CopyColumn, encode_copy_binary
from ingest.prepare import GATEWAY_MISMATCH, GoodBatch, PoisonBatch, prepare_item
from ingest.rows import NOT_OWNED, DeviceSummary, build_rows, concat_rows, merge_summaries

NOW_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z

# --- binary COPY ---------------------------------------------------------------------

_PACK = {
    "smallint": ">h",
    "integer": ">i",
    "bigint": ">q",
    "real": ">f",
    "double precision": ">d",
}


def reference_tuple(columns: list[CopyColumn], row: int) -> bytes:
    """One tuple encoded the slow, obvious way (the format's definition)."""
    out = struct.pack(">h", len(columns))
    for c in columns:
        if c.null is not None and c.null[row]:
            out += struct.pack(">i", -1)
            continue
        value = c.values[row]
        if c.pg_type == "text":
            data = c.labels[int(value)].encode()
        elif c.pg_type == "timestamptz":
            data = struct.pack(">q", (int(value) - PG_EPOCH_MS) * 1000)
        elif c.pg_type == "boolean":
            data = b"\x01" if value != 0 else b"\x00"
        else:
            data = struct.pack(_PACK[c.pg_type], value.item())
        out += struct.pack(">i", len(data)) + data
    return out


def split_tuples(stream: bytes, width: int) -> list[bytes]:
    """Cut a binary COPY stream into its tuples (checks header and trailer)."""
    assert stream.startswith(HEADER)
    assert stream.endswith(TRAILER)
    body, pos, tuples = stream[len(HEADER) : -len(TRAILER)], 0, []
    while pos < len(body):
        start = pos
        (count,) = struct.unpack_from(">h", body, pos)
        assert count == width
        pos += 2
        for _ in range(count):
            (length,) = struct.unpack_from(">i", body, pos)
            pos += 4 + max(length, 0)
        tuples.append(body[start:pos])
    return tuples


@st.composite
def copy_columns(draw) -> tuple[list[CopyColumn], int]:
    rows = draw(st.integers(0, 40))
    # Within the encoder's key: a bit per column and 12 per text column in 63
    # (more is refused, ValueError: readings tables have one text column).
    kinds = draw(
        st.lists(
            st.sampled_from([*_PACK, "boolean", "timestamptz", "text"]), min_size=1, max_size=8
        ).filter(lambda ks: len(ks) + 12 * ks.count("text") <= 63)
    )
    columns = []
    for kind in kinds:
        if kind == "text":
            labels = draw(st.lists(st.text(max_size=12), min_size=1, max_size=5))
            values = np.array(
                draw(st.lists(st.integers(0, len(labels) - 1), min_size=rows, max_size=rows)),
                dtype=np.int64,
            )
        elif kind in ("real", "double precision"):
            labels = []
            values = np.array(
                draw(
                    st.lists(
                        st.floats(allow_nan=False, allow_infinity=False, width=32),
                        min_size=rows,
                        max_size=rows,
                    )
                ),
                dtype=np.float64,
            )
        elif kind == "timestamptz":
            labels = []
            values = np.array(
                draw(st.lists(st.integers(0, 4_000_000_000_000), min_size=rows, max_size=rows)),
                dtype=np.int64,
            )
        else:
            labels = []
            bits = {"smallint": 15, "integer": 31, "bigint": 63, "boolean": 1}[kind]
            values = np.array(
                draw(
                    st.lists(
                        st.integers(-(2**bits), 2**bits - 1)
                        if kind != "boolean"
                        else st.integers(0, 1),
                        min_size=rows,
                        max_size=rows,
                    )
                ),
                dtype=np.int64,
            )
        null = None
        if draw(st.booleans()):
            null = np.array(draw(st.lists(st.booleans(), min_size=rows, max_size=rows)), dtype=bool)
        columns.append(CopyColumn(kind, values, null, labels))
    return columns, rows


@settings(max_examples=120, suppress_health_check=[HealthCheck.too_slow])
@given(copy_columns())
def test_copy_stream_holds_exactly_the_reference_tuples(case):
    columns, rows = case
    stream = encode_copy_binary(columns, rows)
    got = Counter(split_tuples(stream, len(columns)))
    assert got == Counter(reference_tuple(columns, r) for r in range(rows))


def test_copy_refuses_mismatched_lengths_and_unknown_types():
    with pytest.raises(ValueError, match="does not have 3 rows"):
        encode_copy_binary([CopyColumn("integer", np.arange(2))], 3)
    with pytest.raises(ValueError, match="unsupported type"):
        encode_copy_binary([CopyColumn("json", np.arange(2))], 2)
    assert encode_copy_binary([CopyColumn("integer", np.arange(0))], 0) == HEADER + TRAILER


def test_postgresql_reads_the_stream_as_the_column_types(db_conn):
    """The encoder's bytes through a real COPY, read back in every type the schema uses."""
    ts = np.array([NOW_MS, NOW_MS + 1, PG_EPOCH_MS - 1], dtype=np.int64)
    columns = [
        CopyColumn("timestamptz", ts),
        CopyColumn("text", np.array([1, 0, 1]), labels=["dev-a", "thiết-bị-b"]),
        CopyColumn("bigint", np.array([0, 2**62, 7])),
        CopyColumn("real", np.array([1.25, np.nan, -40.5]), np.array([False, True, False])),
        CopyColumn("integer", np.array([5.0, 100000.0, 0.0])),
        CopyColumn("smallint", np.array([4.0, 0.0, 1.0])),
        CopyColumn("boolean", np.array([1.0, 0.0, 1.0]), np.array([False, False, True])),
    ]
    with db_conn.transaction(), db_conn.cursor() as cur:
        cur.execute(
            "CREATE TEMP TABLE copy_probe (ts timestamptz, d text, s bigint, r real, "
            "i integer, e smallint, b boolean) ON COMMIT DROP"
        )
        with cur.copy("COPY copy_probe FROM STDIN (FORMAT BINARY)") as copy:
            copy.write(encode_copy_binary(columns, 3))
        got = cur.execute("SELECT * FROM copy_probe ORDER BY s").fetchall()
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    assert got == [
        (epoch + timedelta(milliseconds=NOW_MS), "thiết-bị-b", 0, 1.25, 5, 4, True),
        (epoch + timedelta(milliseconds=PG_EPOCH_MS - 1), "thiết-bị-b", 7, -40.5, 0, 1, None),
        (epoch + timedelta(milliseconds=NOW_MS + 1), "dev-a", 2**62, None, 100000, 0, False),
    ]


# --- build_rows ---------------------------------------------------------------------


def aq_block(rows: list[tuple[int, int, int, float | None]], device_type="air_quality"):
    """rows: (device_index, seq, ts_ms, pm25)."""
    return ReadingBlock(
        device_type=device_type,
        device_index=[r[0] for r in rows],
        seq=[r[1] for r in rows],
        ts_ms=[r[2] for r in rows],
        recv_ms=[r[2] + 1 for r in rows],
        values={"pm25": [r[3] for r in rows]},
    )


def batch_of(blocks, devices, gateway="gw-a", boots=None) -> Batch:
    return Batch(
        batch_id=batch_id(gateway, "b1", 1),
        gateway_id=gateway,
        boot_id="b1",
        sent_ms=NOW_MS,
        devices=devices,
        blocks=blocks,
        device_boot=boots or [],
    )


def test_rows_keep_good_readings_and_reject_the_rest_with_reasons():
    t = NOW_MS - 1000
    block = aq_block(
        [
            (0, 1, t, 10.0),
            (0, 2, t + 1, float("nan")),
            (1, 1, t, 12.0),  # dev-b belongs to another gateway
            (0, 3, t + 2, 2000.0),
            (0, 4, t - 40 * 86_400_000, 5.0),
            (2, 1, t, 1.0),  # dev-c is unknown
            (0, 5, t + 3, None),  # no value at all
            (0, 6, t + 4, 20.0),
        ]
    )
    rows = build_rows(
        batch_of([block], ["dev-a", "dev-b", "dev-c"], boots=["x1", None, None]),
        owners={"dev-a": "gw-a", "dev-b": "gw-b"},
        now_ms=NOW_MS,
    )
    assert [(r.device_id, r.seq, r.reason) for r in rows.rejects] == [
        ("dev-b", 1, NOT_OWNED),
        ("dev-c", 1, NOT_OWNED),
        ("dev-a", 2, "non_finite"),
        ("dev-a", 3, "out_of_range"),
        ("dev-a", 4, "ts_window"),
        ("dev-a", 5, "wrong_type"),
    ]
    table = rows.tables["air_quality"]
    assert table.seq.tolist() == [1, 6]
    assert table.ts_ms.tolist() == [t, t + 4]
    assert table.values["pm25"].tolist() == [10.0, 20.0]
    assert np.isnan(table.values["pm1"]).all()  # a metric the block did not carry
    assert set(table.values) == set(DEVICE_TYPES["air_quality"].metric_names)
    assert rows.devices == [DeviceSummary("dev-a", t + 4, 6, "x1", 2)]
    assert rows.readings == 2


def test_huge_seq_and_timestamps_are_rejected_before_numpy_sees_them():
    t = NOW_MS - 1000
    block = aq_block([(0, 2**64 - 1, t, 1.0), (0, 1, 2**70, 1.0), (0, 2, t, 3.0)])
    rows = build_rows(batch_of([block], ["dev-a"]), owners={"dev-a": "gw-a"}, now_ms=NOW_MS)
    assert [r.reason for r in rows.rejects] == ["out_of_range", "ts_window"]
    assert rows.tables["air_quality"].seq.tolist() == [2]


def test_summary_takes_the_newest_reading_by_time_then_seq():
    t = NOW_MS - 10_000
    block = aq_block([(0, 9, t, 1.0), (0, 3, t + 5, 1.0), (0, 4, t + 5, 1.0), (0, 1, t + 1, 1.0)])
    rows = build_rows(batch_of([block], ["dev-a"]), owners={"dev-a": "gw-a"}, now_ms=NOW_MS)
    assert rows.devices == [DeviceSummary("dev-a", t + 5, 4, None, 4)]


def test_two_blocks_of_one_type_become_one_table_and_one_summary_per_device():
    t = NOW_MS - 10_000
    b1 = aq_block([(0, 1, t, 1.0), (1, 1, t, 2.0)])
    b2 = aq_block([(1, 2, t + 9, 3.0), (0, 0, t - 5, 4.0)])
    rows = build_rows(
        batch_of([b1, b2], ["dev-a", "dev-b"], boots=["ba", "bb"]),
        owners={"dev-a": "gw-a", "dev-b": "gw-a"},
        now_ms=NOW_MS,
    )
    table = rows.tables["air_quality"]
    ids = [table.device_ids[i] for i in table.device]
    assert ids == ["dev-a", "dev-b", "dev-b", "dev-a"]
    assert rows.devices == [
        DeviceSummary("dev-a", t, 1, "ba", 2),
        DeviceSummary("dev-b", t + 9, 2, "bb", 2),
    ]


def test_merge_summaries_adds_counts_and_keeps_the_newest():
    merged = merge_summaries(
        [
            DeviceSummary("b", 5, 1, "boot2", 3),
            DeviceSummary("a", 1, 1, None, 1),
            DeviceSummary("b", 3, 9, "boot1", 2),
            DeviceSummary("b", 5, 2, None, 1),
        ]
    )
    assert merged == [DeviceSummary("a", 1, 1, None, 1), DeviceSummary("b", 5, 2, "boot2", 6)]


@st.composite
def batches(draw) -> tuple[Batch, dict[str, str | None]]:
    ndev = draw(st.integers(1, 4))
    devices = [f"dev-{i}" for i in range(ndev)]
    types = {d: draw(st.sampled_from(sorted(DEVICE_TYPES))) for d in devices}
    owners = {d: draw(st.sampled_from(["gw-a", "gw-a", "gw-b", None])) for d in devices}
    values = st.one_of(
        st.none(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(-5, 200_000).map(float),
        st.sampled_from([0.0, 1.0, 0.5]),
    )
    blocks = []
    for name in sorted(set(types.values())):
        members = [i for i, d in enumerate(devices) if types[d] == name]
        n = draw(st.integers(0, 12))
        metrics = draw(st.sets(st.sampled_from(DEVICE_TYPES[name].metric_names), max_size=3))
        blocks.append(
            ReadingBlock(
                device_type=name,
                device_index=[draw(st.sampled_from(members)) for _ in range(n)],
                seq=[draw(st.integers(0, 2**63 + 5)) for _ in range(n)],
                ts_ms=[NOW_MS - draw(st.integers(-400_000, 40 * 86_400_000)) for _ in range(n)],
                recv_ms=[NOW_MS] * n,
                values={m: [draw(values) for _ in range(n)] for m in metrics},
            )
        )
    return batch_of(blocks, devices), owners


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_every_reading_is_either_stored_as_sent_or_rejected_for_its_first_problem(case):
    batch, owners = case
    rows = build_rows(batch, owners=owners, now_ms=NOW_MS)
    expected_kept: list[tuple] = []
    expected_rejects: list[tuple] = []
    for block in batch.blocks:
        report = dict(check_block_rows(block, now_ms=NOW_MS))
        for row in range(block.row_count):
            device = batch.devices[block.device_index[row]]
            if owners.get(device) != "gw-a":
                expected_rejects.append((device, block.seq[row], NOT_OWNED))
            elif row in report:
                expected_rejects.append((device, block.seq[row], report[row].reason))
            else:
                values = tuple(
                    block.values.get(m, [None] * block.row_count)[row]
                    for m in DEVICE_TYPES[block.device_type].metric_names
                )
                expected_kept.append(
                    (block.device_type, device, block.seq[row], block.ts_ms[row], values)
                )
    assert Counter((r.device_id, r.seq, r.reason) for r in rows.rejects) == Counter(
        expected_rejects
    )
    kept = []
    for name, table in rows.tables.items():
        metrics = DEVICE_TYPES[name].metric_names
        for i in range(table.row_count):
            values = tuple(
                None if math.isnan(table.values[m][i]) else float(table.values[m][i])
                for m in metrics
            )
            kept.append(
                (
                    name,
                    table.device_ids[table.device[i]],
                    int(table.seq[i]),
                    int(table.ts_ms[i]),
                    values,
                )
            )
    assert Counter(kept) == Counter(expected_kept)
    assert sum(s.readings for s in rows.devices) == len(expected_kept)


def test_concat_rows_offsets_device_codes():
    t = NOW_MS - 10
    one = build_rows(
        batch_of([aq_block([(0, 1, t, 1.0)])], ["a"]), owners={"a": "gw-a"}, now_ms=NOW_MS
    )
    two = build_rows(
        batch_of([aq_block([(1, 1, t, 2.0)])], ["x", "b"]), owners={"b": "gw-a"}, now_ms=NOW_MS
    )
    both = concat_rows([one.tables["air_quality"], two.tables["air_quality"]])
    assert [both.device_ids[i] for i in both.device] == ["a", "b"]
    assert both.values["pm25"].tolist() == [1.0, 2.0]


# --- prepare_item (classify one message) ---------------------------------------------


def good_payload(gateway="gw-a") -> tuple[Batch, bytes]:
    batch = batch_of([aq_block([(0, 1, NOW_MS - 5, 1.0)])], ["dev-a"], gateway=gateway)
    return batch, encode_batch(batch)


TOPIC = "p/hub/v1/gw/gw-a/batch"


def test_a_good_batch_becomes_a_good_item_acked_under_its_id():
    batch, payload = good_payload()
    item = prepare_item(TOPIC, payload, prefix="p", now_ms=NOW_MS, owners={"dev-a": "gw-a"})
    assert isinstance(item, GoodBatch)
    assert item.rows.readings == 1
    assert ack_id(item) == ("gw-a", batch.batch_id, payload_digest(payload))


@pytest.mark.parametrize(
    ("topic", "payload", "reason", "acked"),
    [
        (TOPIC, b"\xc1", "malformed", False),
        (TOPIC, b"", "malformed", False),
        (TOPIC, msgspec.msgpack.encode({"batch_id": "gw-a:b1:7"}), "wrong_type", True),
        (TOPIC, msgspec.msgpack.encode({"batch_id": "gw-z:b1:7"}), "wrong_type", False),
        (TOPIC, good_payload("gw-b")[1], GATEWAY_MISMATCH, False),
        ("p/hub/v1/gw/GW!/batch", good_payload()[1], "bad_id", False),
        ("p/hub/v1/gw/gw-a/state", good_payload()[1], "bad_topic", False),
        ("other/hub/v1/gw/gw-a/batch", good_payload()[1], "bad_topic", False),
    ],
)
def test_poison_is_classified_with_its_reason(topic, payload, reason, acked):
    item = prepare_item(topic, payload, prefix="p", now_ms=NOW_MS, owners={})
    assert isinstance(item, PoisonBatch)
    assert item.reason == reason
    assert item.payload == payload
    assert item.key.startswith("poison:")
    assert (ack_id(item) is not None) is acked


def test_an_expired_batch_is_poison_but_acked_so_the_gateway_drops_it():
    batch, payload = good_payload()
    item = prepare_item(
        TOPIC, payload, prefix="p", now_ms=NOW_MS + 31 * 86_400_000, owners={"dev-a": "gw-a"}
    )
    assert isinstance(item, PoisonBatch)
    assert item.reason == "ts_window"
    assert ack_id(item) == ("gw-a", batch.batch_id, payload_digest(payload))


def test_poison_keys_differ_by_topic_and_payload():
    a = prepare_item(TOPIC, b"\xc1", prefix="p", now_ms=NOW_MS, owners={})
    b = prepare_item(TOPIC, b"\xc1\xc1", prefix="p", now_ms=NOW_MS, owners={})
    c = prepare_item("p/hub/v1/gw/gw-b/batch", b"\xc1", prefix="p", now_ms=NOW_MS, owners={})
    assert len({a.key, b.key, c.key}) == 3


@given(st.binary(max_size=300))
def test_any_payload_is_classified_never_raised(payload):
    try:
        item = prepare_item(TOPIC, payload, prefix="p", now_ms=NOW_MS, owners={})
    except InputError as exc:  # pragma: no cover - the assertion below explains
        pytest.fail(f"prepare_item raised {exc!r}")
    assert isinstance(item, GoodBatch | PoisonBatch)


# --- backoff -------------------------------------------------------------------------


@given(st.integers(1, 10_000), st.floats(0, 1, exclude_max=True))
def test_backoff_stays_between_half_the_minimum_and_the_cap(attempt, draw):
    delay = backoff_delay_s(attempt, min_s=0.5, max_s=15.0, draw=draw)
    assert 0.25 <= delay <= 15.0
    assert delay <= max(0.5 * 2.0 ** min(attempt - 1, 64), 0.25)


def test_backoff_ceiling_doubles_then_caps():
    tops = [backoff_delay_s(a, min_s=0.5, max_s=15.0, draw=0.999999) for a in range(1, 9)]
    assert [round(x, 2) for x in tops] == [0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0]
    with pytest.raises(ValueError, match="attempt"):
        backoff_delay_s(0, min_s=0.5, max_s=1.0, draw=0.1)
