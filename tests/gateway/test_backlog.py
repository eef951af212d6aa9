"""A device's backlog is not a flood: the rate limit by the readings' own timestamps.

Pure tests of ``gateway.ratelimit`` and of the router's use of it, at the
defaults a site runs with (5 readings a second, a burst of 20): a backlog
sent at once passes whole, however it is split into socket reads; a flood
with current timestamps, a backlog sent twice, one sent newest first and
made-up timestamps are limited; another device is not touched.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from contracts.messages import DeviceConfig, DeviceUplink, GatewayConfig, encode_device_uplink
from contracts.settings import GatewaySettings
from contracts.topics import device_uplink_topic
from gateway.counters import GatewayCounters
from gateway.ratelimit import TokenBuckets
from gateway.routing import GROUP_MIN_MESSAGES, Router

NOW = 1_790_000_000_000
PREFIX = "t1"
RATE, BURST = 5.0, 20.0
DAY_MS = 86_400_000
SETTINGS = GatewaySettings(gateway_id="gw-hk", topic_prefix=PREFIX, batch_max_rows=500)


def buckets(backlog_max_ms: int = DAY_MS) -> TokenBuckets:
    return TokenBuckets(default_rate_per_s=RATE, burst=BURST, backlog_max_ms=backlog_max_ms)


def allowed(b: TokenBuckets, device: str, now_ms: int, stamps: list[int]) -> int:
    return sum(b.allow(device, now_ms, ts) for ts in stamps)


# -- the buckets ---------------------------------------------------------------------


def test_ten_minutes_of_readings_sent_at_once_pass_whole():
    b = buckets()
    backlog = [NOW - 600_000 + i * 1000 for i in range(600)]  # one a second, oldest first
    assert allowed(b, "k-1", NOW, backlog) == 600


def test_a_backlog_at_the_rate_itself_passes_and_a_denser_one_is_cut_to_the_rate():
    b = buckets()
    at_rate = [NOW - 600_000 + i * 200 for i in range(2000)]  # 5 a second
    assert allowed(b, "k-1", NOW, at_rate) == 2000
    b = buckets()
    twice = [NOW - 600_000 + i * 100 for i in range(2000)]  # 10 a second, 200 s of readings
    passed = allowed(b, "k-1", NOW, twice)
    assert BURST + 200 * RATE - 1 <= passed <= BURST + 200 * RATE


def test_a_flood_with_current_timestamps_gets_the_burst_then_the_rate():
    b = buckets()
    passed = 0
    for i in range(3000):  # 1,000 a second for 3 s, each stamped as it is sent
        now = NOW + i
        passed += b.allow("k-1", now, now)
    assert BURST + 3 * RATE - 1 <= passed <= BURST + 3 * RATE
    # The same flood stamped 30 s in the past (a slow clock, or a flood
    # posing as a backlog): its timestamps advance 1 ms a reading, so it is
    # held to the same.
    b = buckets()
    passed = sum(b.allow("k-1", NOW + i, NOW + i - 30_000) for i in range(3000))
    assert BURST + 3 * RATE - 1 <= passed <= BURST + 3 * RATE


def test_a_backlog_sent_again_or_newest_first_is_limited():
    backlog = [NOW - 660_000 + i * 1000 for i in range(600)]  # the last a minute old
    b = buckets()
    assert allowed(b, "k-1", NOW, backlog) == 600
    assert allowed(b, "k-1", NOW + 1, backlog) <= BURST  # nothing new in reading time
    b = buckets()
    assert allowed(b, "k-1", NOW, backlog[::-1]) == BURST


def test_live_readings_sent_during_a_backlog_take_nothing_from_it():
    b = buckets()
    passed = 0
    for i in range(600):
        now = NOW + i * 10  # the backlog over 6 s, a live reading a second among it
        passed += b.allow("k-1", now, NOW - 600_000 + i * 1000)
        if i % 100 == 0:
            passed += b.allow("k-1", now, now)
    assert passed == 606


def test_made_up_old_timestamps_pass_at_most_the_backlog_window_once():
    window_ms = 3_600_000
    b = buckets(backlog_max_ms=window_ms)
    # A reading a minute for the last 30 days, all sent now: each far enough
    # from the one before to refill the bucket, but only the last hour of
    # reading time refills it.
    stamps = [NOW - 30 * DAY_MS + i * 60_000 for i in range(30 * 24 * 60)]
    passed = allowed(b, "k-1", NOW, stamps)
    assert 60 <= passed <= BURST + 60
    # Once its clock has caught up, it gets the rate, whatever the timestamps.
    later = NOW + 10_000
    again = allowed(b, "k-1", later, [NOW - 5 * DAY_MS + i * 200 for i in range(1000)])
    assert again <= RATE * 10 + BURST


def test_another_device_is_not_touched():
    b = buckets()
    for i in range(3000):
        b.allow("flood", NOW + i, NOW + i)
    assert allowed(b, "calm", NOW + 3000, [NOW + 3000 - 60_000 + i * 1000 for i in range(60)]) == 60
    assert sum(b.allow("calm", NOW + 3000 + i * 1000, NOW + 3000 + i * 1000) for i in range(5)) == 5


def test_retry_after_a_refused_backlog_reading():
    b = buckets()
    ts = NOW - 600_000
    assert allowed(b, "k-1", NOW, [ts] * 30) == BURST  # the same timestamp: no refill
    wait_ms = b.retry_after_ms("k-1", NOW, ts)
    assert wait_ms == 200  # one token at 5 a second
    assert not b.allow("k-1", NOW + wait_ms - 1, ts)
    assert b.allow("k-1", NOW + wait_ms + 1, ts)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2000), st.integers(-3 * DAY_MS, 5 * 60_000)),
        min_size=1,
        max_size=300,
    ),
    st.integers(0, 2 * DAY_MS),
)
def test_what_passes_is_bounded_by_the_window_and_the_elapsed_time(calls, window_ms):
    """Whatever the timestamps: at most two bursts, the window's readings, and twice the rate."""
    b = buckets(backlog_max_ms=window_ms)
    now, passed = NOW, 0
    for step_ms, offset_ms in calls:
        now += step_ms
        passed += b.allow("k-1", now, now + offset_ms)
    elapsed_ms = now - NOW
    bound = 2 * BURST + RATE * (window_ms + 2 * elapsed_ms) / 1000
    assert passed <= bound + 1e-6


# -- the router ---------------------------------------------------------------------


def router(*device_ids: str) -> Router:
    r = Router(settings=SETTINGS, boot_id="b00t", counters=GatewayCounters())
    devices = [DeviceConfig(device_id=d, device_type="kiosk", transport="mqtt") for d in device_ids]
    assert r.apply_config(
        GatewayConfig(gateway_id="gw-hk", version=1, site_id="s-1", devices=devices)
    )
    return r


def uplink(device_id: str, seq: int, ts_ms: int) -> tuple[str, bytes, int, int, bool]:
    payload = encode_device_uplink(
        DeviceUplink(seq=seq, ts_ms=ts_ms, metrics={"queue_length": 3.0, "uptime": seq})
    )
    return (device_uplink_topic(device_id, PREFIX), payload, 1, seq + 1, False)


def rows_of(r: Router) -> dict[str, int]:
    r.cut(NOW)
    rows: dict[str, int] = {}
    for batch, _acks, _generation in r.ready:
        if batch is not None:
            for block in batch.blocks:
                for index in block.device_index:
                    device_id = batch.devices[index]
                    rows[device_id] = rows.get(device_id, 0) + 1
    return rows


def test_the_router_takes_a_whole_backlog_in_one_read_and_in_reads_of_one():
    backlog = [uplink("k-1", i, NOW - 600_000 + i * 1000) for i in range(600)]
    assert len(backlog) >= GROUP_MIN_MESSAGES
    grouped = router("k-1")
    grouped.site_messages(backlog, generation=1, now=NOW)
    single = router("k-1")
    for message in backlog:
        single.site_messages([message], generation=1, now=NOW)
    for r in (grouped, single):
        assert (r.counters.accepted, r.counters.rate_limited) == (600, 0)
        assert rows_of(r) == {"k-1": 600}
        assert not r.take_limited()


def test_the_router_limits_a_flood_counts_it_per_device_and_tallies_it_for_the_log():
    r = router("flood", "calm")
    for ms in range(0, 3000, 10):  # 1,000 a second for 3 s, read 10 at a time
        now = NOW + ms
        read = [uplink("flood", ms + i, now) for i in range(10)]
        if ms % 1000 == 0:
            read.append(uplink("calm", ms, now))
        r.site_messages(read, generation=1, now=now)
    flooded = r.counters.accepted - 3
    assert BURST + 3 * RATE - 1 <= flooded <= BURST + 3 * RATE
    assert r.counters.rate_limited == 3000 - flooded
    assert r.counters.device_rate_limited == {"flood": 3000 - flooded}
    assert r.take_limited() == {"flood": 3000 - flooded}
    assert not r.take_limited()
    assert rows_of(r) == {"flood": flooded, "calm": 3}
