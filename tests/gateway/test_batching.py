"""BatchBuilder.due and Router.take_ready under adaptive batching: pure, no fixtures."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contracts.messages import DeviceConfig, DeviceUplink, GatewayConfig, encode_device_uplink
from contracts.settings import GatewaySettings
from contracts.topics import device_uplink_topic
from gateway.batching import BatchBuilder
from gateway.counters import GatewayCounters
from gateway.routing import Router

NOW = 1_790_000_000_000
MAX_ROWS = 5
MAX_AGE_MS = 200


def builder_with(rows: int, *, first_ms: int = NOW) -> BatchBuilder:
    b = BatchBuilder(gateway_id="gw-1", boot_id="b00t", max_rows=MAX_ROWS, max_age_ms=MAX_AGE_MS)
    for seq in range(rows):
        b.add(
            device_id=f"k-{seq % 2}",
            device_type="kiosk",
            seq=seq,
            ts_ms=first_ms + seq,
            recv_ms=first_ms,
            values={"uptime": float(seq)},
        )
    return b


@pytest.mark.parametrize(
    ("rows", "age_ms", "idle", "due"),
    [
        (0, 0, False, False),  # empty: never due
        (0, 10_000, True, False),
        (1, 0, True, True),  # nothing more waits: the one reading goes at once
        (1, 0, False, False),  # more waits, under both caps: keep building
        (1, MAX_AGE_MS - 1, False, False),
        (1, MAX_AGE_MS, False, True),  # the age cap
        (MAX_ROWS - 1, 0, False, False),
        (MAX_ROWS, 0, False, True),  # the size cap
        (MAX_ROWS, 0, True, True),
    ],
)
def test_due_table(rows: int, age_ms: int, idle: bool, due: bool) -> None:
    assert builder_with(rows).due(NOW + age_ms, idle=idle) is due


@given(
    rows=st.integers(min_value=0, max_value=2 * MAX_ROWS),
    age_ms=st.integers(min_value=0, max_value=3 * MAX_AGE_MS),
    idle=st.booleans(),
)
def test_due_is_idle_or_a_cap_and_never_empty(rows: int, age_ms: int, idle: bool) -> None:
    b = builder_with(rows)
    expected = rows > 0 and (idle or rows >= MAX_ROWS or age_ms >= MAX_AGE_MS)
    assert b.due(NOW + age_ms, idle=idle) is expected
    # Idle only ever makes a batch leave sooner, never later.
    assert b.due(NOW + age_ms, idle=True) >= b.due(NOW + age_ms, idle=False)


def _router() -> Router:
    settings = GatewaySettings(
        gateway_id="gw-1",
        topic_prefix="t1",
        batch_max_rows=MAX_ROWS,
        batch_max_ms=MAX_AGE_MS,
        device_rate_per_s=1e6,
        device_burst=1e6,
    )
    r = Router(settings=settings, boot_id="b00t", counters=GatewayCounters())
    device = DeviceConfig(device_id="k-1", device_type="kiosk", transport="mqtt")
    r.apply_config(GatewayConfig(gateway_id="gw-1", version=1, site_id="s-1", devices=[device]))
    return r


def _uplink(seq: int) -> bytes:
    return encode_device_uplink(DeviceUplink(seq=seq, ts_ms=NOW, metrics={"uptime": seq}))


def test_take_ready_cuts_a_partial_batch_only_when_idle() -> None:
    r = _router()
    topic = device_uplink_topic("k-1", "t1")
    r.site_messages([(topic, _uplink(s), 1, s + 1, False) for s in range(2)], generation=1, now=NOW)
    assert r.take_ready(NOW, force=False, idle=False) == []  # more waits: under the caps
    (ready,) = r.take_ready(NOW, force=False, idle=True)
    batch, acks, generation = ready
    assert batch is not None
    assert sum(b.row_count for b in batch.blocks) == 2
    assert (acks, generation) == ([1, 2], 1)
    assert r.take_ready(NOW, force=False, idle=True) == []  # nothing left
