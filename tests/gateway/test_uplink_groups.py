"""The router's socket-read path (uplinks checked together) against messages one by one.

Two routers with one config get the same random socket reads: one the whole
read at once (from GROUP_MIN_MESSAGES messages on, its uplinks are checked
as a group), the other each message as a read of its own. Counters, events
(rejects with their reasons and details, status changes, in order), device
tracking, the rejects report and the cut batches must be the same.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from contracts.messages import DeviceConfig, DeviceUplink, GatewayConfig, encode_device_uplink
from contracts.mqttcodec import Publish
from contracts.settings import GatewaySettings
from contracts.topics import device_status_topic, device_uplink_topic
from gateway.counters import GatewayCounters
from gateway.routing import GROUP_MIN_MESSAGES, Router

NOW = 1_790_000_000_000
PREFIX = "t1"
SETTINGS = GatewaySettings(
    gateway_id="gw-hk",
    topic_prefix=PREFIX,
    batch_max_rows=25,
    batch_max_ms=200,
    site_receive_maximum=40,  # a batch is cut when 20 messages wait for their ack
    device_rate_per_s=5.0,
    device_burst=30.0,
)
# Device id -> (type, rate limit per s): k-slow runs out of tokens.
DEVICES = {
    "k-0": ("kiosk", 1000.0),
    "k-1": ("kiosk", 1000.0),
    "k-slow": ("kiosk", 2.0),
    "aq-0": ("air_quality", 1000.0),
    "st-0": ("satisfaction_terminal", 1000.0),
}
GOOD = {
    "kiosk": {"queue_length": 3.0, "paper_level": 50.5, "uptime": 100.0},
    "air_quality": {"pm25": 12.5, "pm10": 20.0, "temperature": -3.25},
    "satisfaction_terminal": {"rating": 2.0, "counter": 7.0},
}
# Bad uplinks, each as a JSON text with the seq (and TS, the time) to fill in: out of range, a
# fraction for a whole-number metric, NaN and infinity spelled out, an
# unknown metric (kept: the known ones are accepted), nothing but unknown
# metrics, a bool, seconds for ts, a bad boot, and no JSON at all.
BAD = (
    b'{"seq": %d, "ts": TS, "m": {"queue_length": -1}}',
    b'{"seq": %d, "ts": TS, "m": {"queue_length": 2.5}}',
    b'{"seq": %d, "ts": TS, "m": {"paper_level": NaN}}',
    b'{"seq": %d, "ts": TS, "m": {"paper_level": 1e999}}',
    b'{"seq": %d, "ts": TS, "m": {"queue_length": 1, "pm25": 3}}',
    b'{"seq": %d, "ts": TS, "m": {"pm25": 3}}',
    b'{"seq": %d, "ts": TS, "m": {"queue_length": true}}',
    b'{"seq": %d, "ts": 1790000000, "m": {"queue_length": 1}}',
    b'{"seq": %d, "ts": TS, "m": {"queue_length": 1}, "boot": "no boot!"}',
    b'{"seq": %d, "ts": TS, "m": {"queue_length": 1}',
)


def _bad(text: bytes, seq: int) -> bytes:
    return text.replace(b"TS", str(NOW).encode()) % seq


def _router() -> Router:
    router = Router(settings=SETTINGS, boot_id="b00t", counters=GatewayCounters())
    devices = [
        DeviceConfig(device_id=d, device_type=t, transport="mqtt", rate_limit_per_s=rate)
        for d, (t, rate) in DEVICES.items()
    ]
    config = GatewayConfig(gateway_id="gw-hk", version=1, site_id="s-1", devices=devices)
    assert router.apply_config(config) is not None
    return router


@st.composite
def messages(draw: st.DrawFn, seqs: dict[str, int]) -> Publish:
    kind = draw(st.sampled_from(["good"] * 8 + ["bad", "status", "unknown", "bad_topic"]))
    device_id = draw(st.sampled_from(sorted(DEVICES)))
    # Mostly the next seq; sometimes a repeat (a resend) or a jump (a gap).
    seq = seqs.get(device_id, 0) + draw(st.sampled_from([1, 1, 1, 0, 5]))
    seqs[device_id] = seq
    topic = device_uplink_topic(device_id, PREFIX)
    if kind == "good":
        values = dict(GOOD[DEVICES[device_id][0]])
        values[next(iter(values))] += draw(st.integers(0, 3))
        # Mostly live; sometimes a backlog reading (rate-limited by its timestamp).
        age_ms = draw(st.sampled_from([0, 0, 0, 30_000, 600_000 - 1000 * seq]))
        payload = encode_device_uplink(
            DeviceUplink(seq=seq, ts_ms=NOW - seq - age_ms, metrics=values)
        )
    elif kind == "bad":
        payload = _bad(draw(st.sampled_from(BAD)), seq)
    elif kind == "status":
        topic = device_status_topic(device_id, PREFIX)
        payload = draw(st.sampled_from([b"online", b"offline", b"maybe"]))
    elif kind == "unknown":
        topic = device_uplink_topic("k-9", PREFIX)
        payload = encode_device_uplink(DeviceUplink(seq=seq, ts_ms=NOW, metrics={"uptime": 1}))
    else:
        topic, payload = f"{PREFIX}/x/{device_id}/up", b"{}"
    return topic, payload, draw(st.sampled_from([0, 1])), draw(st.integers(1, 65535)), False


@st.composite
def reads(draw: st.DrawFn) -> list[list[Publish]]:
    seqs: dict[str, int] = {}
    sizes = draw(st.lists(st.sampled_from([1, 5, 16, 17, 40, 90]), min_size=1, max_size=4))
    return [draw(st.lists(messages(seqs), min_size=n, max_size=n)) for n in sizes]


def _counters(router: Router) -> tuple[object, ...]:
    c = router.counters
    return (
        c.received,
        c.accepted,
        c.rate_limited,
        dict(c.device_rate_limited),
        dict(c.rejects),
        dict(c.device_rejects),
        c.seq_gaps,
        c.duplicates,
        c.reboots,
    )


@settings(max_examples=150, deadline=None)
@given(reads())
def test_a_socket_read_is_handled_as_its_messages_one_by_one(socket_reads) -> None:
    grouped, single = _router(), _router()
    now = NOW
    for read in socket_reads:
        now += 137  # a refill for the slow device now and then
        grouped.site_messages(read, generation=1, now=now)
        for message in read:
            single.site_messages([message], generation=1, now=now)
        assert _counters(grouped) == _counters(single)
        assert grouped.take_events() == single.take_events()
        assert grouped.take_limited() == single.take_limited()
        assert grouped.ready == single.ready
        assert grouped.site_acks == single.site_acks
    assert grouped.take_ready(now, force=True) == single.take_ready(now, force=True)
    assert grouped.tracker.devices == single.tracker.devices
    assert grouped.report.take() == single.report.take()


def test_one_bad_uplink_in_a_large_read_is_rejected_alone() -> None:
    router = _router()
    topic = device_uplink_topic("k-0", PREFIX)
    read = [
        (
            topic,
            encode_device_uplink(DeviceUplink(seq=i, ts_ms=NOW, metrics=GOOD["kiosk"])),
            1,
            i,
            False,
        )
        for i in range(1, GROUP_MIN_MESSAGES + 1)
    ]
    read[3] = (topic, _bad(BAD[1], 4), 1, 4, False)
    router.site_messages(read, generation=1, now=NOW)
    assert router.counters.accepted == GROUP_MIN_MESSAGES - 1
    assert dict(router.counters.rejects) == {"out_of_range": 1}
