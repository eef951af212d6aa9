"""Gateway pure core (routing, config diffs, batching, rate limits, the one device-config
check) and the SQLite outbox, including kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts.catalog import DEVICE_TYPES
from contracts.errors import FieldTypeError, InvalidPortError, OutboxFullError
from contracts.ids import parse_batch_id
from contracts.messages import (
    DeviceConfig,
    DeviceUplink,
    GatewayConfig,
    check_gateway_config,
    decode_batch,
    encode_batch,
    encode_device_uplink,
    payload_digest,
)
from contracts.serialurl import check_port_url
from contracts.settings import GatewaySettings
from contracts.topics import device_status_topic, device_uplink_topic
from devices.validation import device_config
from gateway.batching import BatchBuilder
from gateway.configdiff import (
    device_topics,
    diff_config,
    serial_changes,
    served_device_ids,
    site_routes,
)
from gateway.counters import GatewayCounters
from gateway.outbox import Outbox, OutboxTotals
from gateway.ratelimit import TokenBuckets
from gateway.routing import Rejected, Router, StatusChanged, fit_ready

NOW = 1_790_000_000_000


def builder(**kw) -> BatchBuilder:
    args: dict[str, Any] = {
        "gateway_id": "gw-hk",
        "boot_id": "b00t",
        "max_rows": 3,
        "max_age_ms": 200,
    }
    return BatchBuilder(**(args | kw))


def test_batch_builder_groups_by_type_and_indexes_devices():
    b = builder(max_rows=10)
    b.add(
        device_id="aq-1",
        device_type="air_quality",
        seq=1,
        ts_ms=NOW,
        recv_ms=NOW,
        values={"pm25": 30.0, "pm10": 50.0},
        boot="x1",
    )
    b.add(
        device_id="kiosk-1",
        device_type="kiosk",
        seq=7,
        ts_ms=NOW + 1,
        recv_ms=NOW + 2,
        values={"queue_length": 4},
    )
    b.add(
        device_id="aq-1",
        device_type="air_quality",
        seq=2,
        ts_ms=NOW + 1000,
        recv_ms=NOW + 1000,
        values={"pm25": 31.0},
    )
    batch = b.take(NOW + 1000)
    assert batch is not None
    decoded = decode_batch(encode_batch(batch), now_ms=NOW + 1000)
    assert decoded == batch
    assert batch.devices == ["aq-1", "kiosk-1"]
    assert batch.device_boot == ["x1", None]
    air = next(x for x in batch.blocks if x.device_type == "air_quality")
    assert air.device_index == [0, 0]
    assert air.seq == [1, 2]
    assert air.values == {"pm10": [50.0, None], "pm25": [30.0, 31.0]}
    assert parse_batch_id(batch.batch_id) == ("gw-hk", "b00t", 0)
    # The next batch gets the next counter; an empty builder yields nothing.
    assert b.take(NOW) is None
    b.add(
        device_id="aq-1",
        device_type="air_quality",
        seq=3,
        ts_ms=NOW,
        recv_ms=NOW,
        values={"pm25": 1.0},
    )
    assert parse_batch_id(b.take(NOW).batch_id)[2] == 1


def test_batch_builder_is_due_on_size_or_age():
    b = builder(max_rows=2, max_age_ms=200)
    assert not b.due(NOW)
    b.add(device_id="a", device_type="kiosk", seq=1, ts_ms=NOW, recv_ms=NOW, values={"uptime": 1})
    assert not b.due(NOW + 199)
    assert b.due(NOW + 200)
    b.add(device_id="a", device_type="kiosk", seq=2, ts_ms=NOW, recv_ms=NOW, values={"uptime": 2})
    assert b.due(NOW)


def test_token_bucket_throttles_a_flooding_device_but_not_the_others():
    buckets = TokenBuckets(default_rate_per_s=5, burst=10)
    flood = sum(buckets.allow("flooder", NOW + i) for i in range(1000))  # 1000 msgs in 1 s
    calm = sum(buckets.allow("calm", NOW + i * 1000) for i in range(5))  # 1 msg/s
    assert flood == 10 + 4  # the burst, then 5/s for the ~1 s that passed
    assert calm == 5
    buckets.set_rate("flooder", 1000)
    assert buckets.allow("flooder", NOW + 2000)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=5000), min_size=1, max_size=200))
def test_token_bucket_never_exceeds_rate_plus_burst(offsets):
    buckets = TokenBuckets(default_rate_per_s=5, burst=10)
    times = sorted(NOW + o for o in offsets)
    allowed = sum(buckets.allow("d", t) for t in times)
    span_s = (times[-1] - times[0]) / 1000
    assert allowed <= 10 + 5 * span_s + 1e-9


def test_outbox_put_due_ack(tmp_path):
    box = Outbox(tmp_path / "o.sqlite3", max_bytes=1 << 20, full_policy="refuse")
    box.put([("gw:b:0", b"x" * 100, 10), ("gw:b:1", b"y" * 50, 5)], NOW)
    assert box.depth().batches == 2
    assert box.depth().readings == 15
    due = box.due(NOW, resend_after_ms=1000, limit=10)
    assert [i.batch_id for i in due] == ["gw:b:0", "gw:b:1"]
    box.mark_sent(["gw:b:0", "gw:b:1"], NOW)
    assert box.due(NOW + 999, resend_after_ms=1000, limit=10) == []
    # Unacked after the timeout: due again, unchanged.
    again = box.due(NOW + 1000, resend_after_ms=1000, limit=10)
    assert [(i.batch_id, i.payload, i.attempts) for i in again] == [
        ("gw:b:0", b"x" * 100, 1),
        ("gw:b:1", b"y" * 50, 1),
    ]
    acked = box.ack(["gw:b:1", "unknown"], [payload_digest(b"y" * 50), payload_digest(b"z")])
    assert acked.removed_readings == 5
    assert box.depth().readings == 10
    # A duplicate put of a known batch id stores nothing new.
    assert box.put([("gw:b:0", b"x" * 100, 10)], NOW).stored_batches == 0
    assert box.depth().batches == 1
    box.close()
    reopened = Outbox(tmp_path / "o.sqlite3", max_bytes=1 << 20, full_policy="refuse")
    assert [i.batch_id for i in reopened.due(NOW + 5000, resend_after_ms=1, limit=10)] == ["gw:b:0"]
    assert reopened.depth().batches == 1
    reopened.close()


def test_outbox_refuse_policy_stores_nothing_and_counts_each_refused_reading_once(tmp_path):
    """A refused put is held and tried again: only what the gateway gives up counts, once."""
    path = tmp_path / "o.sqlite3"
    box = Outbox(path, max_bytes=250, full_policy="refuse")
    box.put([("a:b:0", b"x" * 200, 20)], NOW)
    for _ in range(2):  # the held batch, tried again before an ack made room
        with pytest.raises(OutboxFullError, match="refused 7 readings"):
            box.put([("a:b:1", b"y" * 100, 7)], NOW)
    assert box.depth().batches == 1
    assert box.counter("refused_readings") == 0
    box.ack(["a:b:0"], [payload_digest(b"x" * 200)])
    assert box.put([("a:b:1", b"y" * 100, 7)], NOW).stored_batches == 1
    # Two serial readings given up while it was full, then a batch too large for it.
    box.count_refused(2)
    box.count_refused(0)
    box.count_refused(3)
    assert box.counter("refused_readings") == 5
    assert box.totals() == OutboxTotals(refused_readings=5, dropped_readings=0)
    box.close()
    reopened = Outbox(path, max_bytes=250, full_policy="refuse")
    assert reopened.totals() == OutboxTotals(refused_readings=5, dropped_readings=0)
    reopened.close()


def test_outbox_drop_oldest_policy_counts_what_it_drops(tmp_path):
    box = Outbox(tmp_path / "o.sqlite3", max_bytes=250, full_policy="drop_oldest")
    box.put([("a:b:0", b"x" * 100, 10), ("a:b:1", b"x" * 100, 11)], NOW)
    result = box.put([("a:b:2", b"y" * 100, 12)], NOW)
    assert (result.dropped_batches, result.dropped_readings) == (1, 10)
    assert [i.batch_id for i in box.due(NOW, resend_after_ms=0, limit=9)] == ["a:b:1", "a:b:2"]
    assert box.counter("dropped_readings") == 10
    assert box.totals() == OutboxTotals(refused_readings=0, dropped_readings=10)
    assert box.depth().bytes == 200
    box.close()
    reopened = Outbox(tmp_path / "o.sqlite3", max_bytes=250, full_policy="drop_oldest")
    assert reopened.totals() == OutboxTotals(refused_readings=0, dropped_readings=10)
    reopened.close()


def test_birth_counter_increases_across_restarts(tmp_path):
    path = tmp_path / "o.sqlite3"
    births = []
    for _ in range(2):
        box = Outbox(path, max_bytes=100, full_policy="refuse")
        births.append(box.next_birth())
        box.close()
    assert births[1] == births[0] + 1


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from gateway.outbox import Outbox
    box = Outbox(Path(sys.argv[1]), max_bytes=1 << 30, full_policy="refuse")
    i = 0
    while True:
        items = [(f"gw:boot:{i + k}", bytes(300), 100) for k in range(5)]
        box.put(items, 0)
        for bid, _, _ in items:
            sys.stdout.write(bid + "\\n")
        sys.stdout.flush()
        i += 5
    """
)


def test_outbox_survives_kill_9_mid_write(tmp_path):
    path = tmp_path / "outbox.sqlite3"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    committed = []
    for line in proc.stdout:
        committed.append(line.strip())
        if len(committed) >= 500:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    # Every batch whose put() returned before the kill is there, exactly once.
    box = Outbox(path, max_bytes=1 << 30, full_policy="refuse")
    stored = [i.batch_id for i in box.due(0, resend_after_ms=0, limit=1_000_000)]
    assert set(committed) <= set(stored)
    assert len(stored) == len(set(stored))
    assert box.depth().batches == len(stored)
    box.close()


# --- one device-config check: provisioning and the gateway agree --------------------

PORTS = [
    ("/dev/ttyUSB0", True),
    ("/dev/serial/by-id/usb-FTDI_FT232R_USB_UART_A50285BI-if00-port0", True),
    ("/dev/pts/7", True),
    ("socket://127.0.0.1:7001", True),
    ("socket://gw-hk.local:4001", True),
    ("rfc2217://192.168.1.10:2217", True),
    ("", False),
    ("ttyUSB0", False),
    ("COM3", False),
    ("/dev/", False),
    ("//dev/ttyUSB0", False),
    ("/dev/tty USB0", False),
    ("/dev/ttyUSB0\n", False),
    ("socket://", False),
    ("socket://10.0.0.1", False),
    ("socket://:4001", False),
    ("socket://host:0", False),
    ("socket://host:65536", False),
    ("loop://", False),
    ("loop://x", False),
    ("spy:///dev/ttyUSB0", False),
    ("http://10.0.0.1:80", False),
]


@pytest.mark.parametrize(("port", "good"), PORTS)
def test_one_port_rule_for_provisioning_and_the_gateway(port, good):
    device = DeviceConfig(
        device_id="aq-1",
        device_type="air_quality",
        transport="serial",
        port=port,
        protocol="pms5003",
    )
    config = GatewayConfig(gateway_id="gw-hk", version=1, site_id="s-1", devices=[device])
    if good:
        assert check_port_url(port) == port
        assert check_gateway_config(config) == config
        assert (
            device_config(
                device_id="aq-1",
                device_type="air_quality",
                transport="serial",
                port=port,
                protocol="pms5003",
                label="",
            )
            == device
        )
        return
    with pytest.raises(InvalidPortError):
        check_port_url(port)
    with pytest.raises(FieldTypeError, match=r"devices\[0\]\.port") as info:
        check_gateway_config(config)
    assert isinstance(info.value.__cause__, InvalidPortError)
    with pytest.raises(InvalidPortError):
        device_config(
            device_id="aq-1",
            device_type="air_quality",
            transport="serial",
            port=port,
            protocol="pms5003",
            label="",
        )


# --- config diffs -------------------------------------------------------------------


def mqtt(device_id: str, *, enabled: bool = True, rate: float = 5.0) -> DeviceConfig:
    return DeviceConfig(
        device_id=device_id,
        device_type="kiosk",
        transport="mqtt",
        enabled=enabled,
        rate_limit_per_s=rate,
    )


def serial_dev(device_id: str, port: str = "/dev/ttyUSB0", *, enabled: bool = True):
    return DeviceConfig(
        device_id=device_id,
        device_type="air_quality",
        transport="serial",
        port=port,
        protocol="pms5003",
        enabled=enabled,
    )


@pytest.mark.parametrize(
    ("old", "new", "removed", "subscribe", "unsubscribe"),
    [
        ([], [mqtt("k-1")], set(), {"k-1"}, set()),
        ([mqtt("k-1")], [], {"k-1"}, set(), {"k-1"}),
        ([mqtt("k-1")], [mqtt("k-1", rate=9.0)], set(), set(), set()),
        ([mqtt("k-1")], [mqtt("k-2")], {"k-1"}, {"k-2"}, {"k-1"}),
        # A disabled MQTT device keeps its subscription: its messages are
        # answered (as unknown) instead of piling up in the session.
        ([mqtt("k-1")], [mqtt("k-1", enabled=False)], set(), set(), set()),
        ([serial_dev("aq-1")], [serial_dev("aq-1", "/dev/ttyUSB1")], set(), set(), set()),
        ([serial_dev("aq-1"), mqtt("k-1")], [mqtt("k-1")], {"aq-1"}, set(), set()),
    ],
)
def test_diff_config(old, new, removed, subscribe, unsubscribe):
    diff = diff_config({d.device_id: d for d in old}, new)
    assert (diff.removed, diff.subscribe, diff.unsubscribe) == (removed, subscribe, unsubscribe)


@pytest.mark.parametrize(
    ("running", "devices", "stop", "start"),
    [
        ([], [serial_dev("aq-1"), mqtt("k-1")], [], ["aq-1"]),
        ([serial_dev("aq-1")], [serial_dev("aq-1")], [], []),
        ([serial_dev("aq-1")], [serial_dev("aq-1", "/dev/ttyUSB1")], ["aq-1"], ["aq-1"]),
        ([serial_dev("aq-1")], [serial_dev("aq-1", enabled=False)], ["aq-1"], []),
        ([serial_dev("aq-1")], [], ["aq-1"], []),
    ],
)
def test_serial_changes(running, devices, stop, start):
    stopped, started = serial_changes({d.device_id: d for d in running}, devices)
    assert stopped == stop
    assert [d.device_id for d in started] == start
    assert all(d in devices for d in started)


def test_routes_and_served_devices():
    routes = site_routes([mqtt("k-1"), mqtt("k-2", enabled=False), serial_dev("aq-1")], "t1")
    assert sorted(routes) == sorted(device_topics({"k-1"}, "t1"))
    assert all(device.device_id == "k-1" for device, _ in routes.values())
    assert sorted(is_status for _, is_status in routes.values()) == [False, True]
    uplink, status = device_topics({"k-1"}, "t1")
    assert served_device_ids(routes, frozenset({uplink})) == set()
    assert served_device_ids(routes, frozenset({uplink, status})) == {"k-1"}


# --- routing core -------------------------------------------------------------------

PREFIX = "t1"
ROUTER_SETTINGS = GatewaySettings(
    gateway_id="gw-hk",
    topic_prefix=PREFIX,
    batch_max_rows=4,
    batch_max_ms=200,
    site_receive_maximum=6,  # a batch is cut when 3 messages wait for their ack
    device_rate_per_s=1e6,
    device_burst=1e6,
)


def router(*devices: DeviceConfig, settings: GatewaySettings = ROUTER_SETTINGS) -> Router:
    r = Router(settings=settings, boot_id="b00t", counters=GatewayCounters())
    config = GatewayConfig(
        gateway_id="gw-hk", version=1, site_id="s-1", devices=list(devices) or [mqtt("k-1")]
    )
    assert r.apply_config(config) is not None
    return r


def uplink(seq: int, **metrics: float) -> bytes:
    return encode_device_uplink(
        DeviceUplink(seq=seq, ts_ms=NOW, metrics=metrics or {"queue_length": 3.0})
    )


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        (device_uplink_topic("k-9", PREFIX), uplink(1), "unknown_device"),
        ("t1/x/k-1/up", uplink(1), "bad_topic"),
        (device_uplink_topic("k-1", PREFIX), b"{]", "malformed"),
        (device_uplink_topic("k-1", PREFIX), uplink(1, paper_level=-5.0), "out_of_range"),
        (device_uplink_topic("k-1", PREFIX), uplink(1, pm25=1.0), "unknown_metric"),
        (device_status_topic("k-1", PREFIX), b"maybe", "malformed"),
        (device_status_topic("k-1", PREFIX), b"online", None),
        (device_uplink_topic("k-1", PREFIX), uplink(1), None),
    ],
)
def test_router_rejects_by_reason(topic, payload, reason):
    r = router()
    r.site_messages([(topic, payload, 1, 7, False)], generation=1, now=NOW)
    events = r.take_events()
    if reason is None:
        assert not r.counters.rejects
        assert r.counters.accepted == topic.endswith("/up")
        return
    assert [type(e) for e in events] == [Rejected]
    assert events[0].reason == reason
    assert r.counters.rejects == {reason: 1}
    assert r.counters.accepted == 0
    assert r.site_acks == [7]  # a rejected message is acknowledged with the next batch


def test_router_status_changes_are_events_once():
    r = router()
    status = device_status_topic("k-1", PREFIX)
    msgs = [(status, b"online", 1, 1, False), (status, b"online", 1, 2, False)]
    r.site_messages(msgs, generation=1, now=NOW)
    assert r.take_events() == [StatusChanged("k-1", online=True)]
    r.site_messages([(status, b"offline", 1, 3, False)], generation=1, now=NOW)
    assert r.take_events() == [StatusChanged("k-1", online=False)]


def test_router_rate_limit_is_counted_not_rejected():
    settings = msgspec.structs.replace(ROUTER_SETTINGS, device_rate_per_s=1.0, device_burst=1.0)
    r = router(mqtt("k-1", rate=1.0), settings=settings)
    topic = device_uplink_topic("k-1", PREFIX)
    r.site_messages([(topic, uplink(i), 1, i + 1, False) for i in range(3)], generation=1, now=NOW)
    assert (r.counters.accepted, r.counters.rate_limited) == (1, 2)
    assert not r.counters.rejects


# One socket read: (device index, qos) per message; a list of reads per connection.
reads = st.lists(
    st.lists(st.tuples(st.integers(0, 2), st.sampled_from([0, 1])), max_size=12), max_size=6
)


@settings(max_examples=150, deadline=None)
@given(st.lists(reads, min_size=1, max_size=3))
def test_router_releases_each_packet_id_once_on_its_connection(connections):
    r = router(mqtt("k-0"), mqtt("k-1"), mqtt("k-2"))
    released: list[tuple[int, int]] = []
    expected: list[tuple[int, int]] = []
    seq = 0
    rows = 0
    for generation, socket_reads in enumerate(connections, start=1):
        packet_id = 0
        for read in socket_reads:
            publishes = []
            for device, qos in read:
                packet_id += 1
                seq += 1
                topic = device_uplink_topic(f"k-{device}", PREFIX)
                publishes.append((topic, uplink(seq), qos, packet_id, False))
                if qos:
                    expected.append((generation, packet_id))
            r.site_messages(publishes, generation=generation, now=NOW)
        # The connection is lost: what it has not released is gone with it.
        for batch, acks, gen in r.take_ready(NOW, force=True):
            assert gen == generation
            released += [(gen, a) for a in acks]
            rows += sum(b.row_count for b in batch.blocks) if batch else 0
        expected = [(g, p) for g, p in expected if (g, p) in released or g != generation]
    assert released == expected
    assert rows == r.counters.accepted == seq
    assert r.counters.received == seq


def test_router_ready_queue_cut_hold_and_due():
    r = router()
    topic = device_uplink_topic("k-1", PREFIX)
    r.site_messages([(topic, uplink(1), 1, 1, False)], generation=1, now=NOW)
    assert r.take_ready(NOW + 10, force=False) == []  # neither full nor due
    ready = r.take_ready(NOW + 200, force=False)  # due: batch_max_ms
    assert [(len(acks), gen) for _b, acks, gen in ready] == [(1, 1)]
    r.hold(ready)
    r.site_messages([(topic, uplink(2), 1, 2, False)], generation=1, now=NOW)
    again = r.take_ready(NOW, force=True)
    assert again[0] is ready[0]  # held entries stay first
    assert [acks for _b, acks, _g in again] == [[1], [2]]


def test_router_refuses_serial_readings_while_the_outbox_is_full():
    sensor = serial_dev("aq-1")
    r = router(sensor)
    assert r.outbox_full(NOW) is True
    assert r.outbox_full(NOW + 1) is False  # the episode has started already
    r.serial_reading(sensor, {"pm25": 12.0}, NOW)
    r.serial_reading(sensor, {"pm25": 12.0}, NOW)
    assert (r.counters.outbox_refused_readings, r.counters.accepted) == (2, 0)
    assert r.outbox_has_room() == (NOW, 2)
    assert r.outbox_has_room() is None
    r.serial_reading(sensor, {"pm25": 12.0}, NOW)
    r.serial_reading(sensor, {"pm25": -1.0}, NOW)
    assert r.counters.accepted == 1
    assert r.counters.rejects == {"out_of_range": 1}


def test_router_applies_only_newer_configs_and_forgets_removed_devices():
    r = router(mqtt("k-1"), mqtt("k-2"))
    r.site_messages(
        [(device_uplink_topic("k-2", PREFIX), uplink(1), 0, 0, False)], generation=1, now=NOW
    )
    assert "k-2" in r.tracker.devices
    same = GatewayConfig(gateway_id="gw-hk", version=1, site_id="s-1", devices=[])
    assert r.apply_config(same) is None
    newer = GatewayConfig(gateway_id="gw-hk", version=2, site_id="s-1", devices=[mqtt("k-1")])
    diff = r.apply_config(newer)
    assert diff is not None
    assert diff.removed == {"k-2"}
    assert "k-2" not in r.tracker.devices
    assert set(r.devices) == {"k-1"}
    assert r.counters.configs_applied == 2


def ready_batches(*rows: int) -> list:
    """One ready entry per count of rows (0: an entry with acks only)."""
    b = builder(max_rows=1000)
    ready = []
    for i, n in enumerate(rows):
        for seq in range(n):
            b.add(
                device_id="aq-1",
                device_type="air_quality",
                seq=seq,
                ts_ms=NOW,
                recv_ms=NOW,
                values={"pm25": 1.0},
            )
        ready.append((b.take(NOW), [i], 1))
    return ready


def payload_sizes(ready) -> list[int]:
    return [len(encode_batch(batch)) for batch, _, _ in ready if batch is not None]


@pytest.mark.parametrize(
    ("rows", "room", "empty", "done", "too_large"),
    [
        ((3, 0, 3), None, False, 3, 0),  # drop_oldest takes everything
        ((3, 0, 3), "all", False, 3, 0),
        # The second batch waits, with all after it; the acks-only entry
        # between them goes with the first.
        ((3, 0, 3), "first", False, 2, 0),
        ((3, 3), "none", False, 0, 0),  # not empty: acks will make room
        ((3, 3), "none", True, 2, 2),  # empty: they can never fit
    ],
)
def test_fit_ready(rows, room, empty, done, too_large):
    ready = ready_batches(*rows)
    sizes = payload_sizes(ready)
    room_bytes = {None: None, "all": sum(sizes), "first": sizes[0], "none": 10}[room]
    fitting = fit_ready(ready, room_bytes=room_bytes, outbox_empty=empty)
    assert len(fitting.done) == done
    assert fitting.done + fitting.held == ready
    assert len(fitting.too_large) == too_large
    refused = {batch_id for batch_id, _, _ in fitting.too_large}
    assert [item[0] for item in fitting.items] == [
        batch.batch_id
        for batch, _, _ in fitting.done
        if batch is not None and batch.batch_id not in refused
    ]
    assert sum(len(payload) for _, payload, _ in fitting.items) <= (room_bytes or 1 << 30)


def test_router_marks_devices_offline_after_their_type_offline_after_s():
    kiosk = mqtt("k-1")
    gauge = msgspec.structs.replace(mqtt("wl-1"), device_type="water_level")
    r = router(kiosk, gauge)
    r.site_messages(
        [
            (device_uplink_topic("k-1", PREFIX), uplink(1), 1, 1, False),
            (device_uplink_topic("wl-1", PREFIX), uplink(1, water_depth=3.0), 1, 2, False),
        ],
        generation=1,
        now=NOW,
    )
    assert r.tracker.online_count() == 2
    kiosk_s = DEVICE_TYPES["kiosk"].offline_after_s
    gauge_s = DEVICE_TYPES["water_level"].offline_after_s
    assert kiosk_s < gauge_s
    assert r.expire(NOW + int(kiosk_s * 1000) - 1) == []
    assert r.expire(NOW + int(kiosk_s * 1000)) == ["k-1"]
    assert r.expire(NOW + int(gauge_s * 1000) - 1) == []
    assert r.expire(NOW + int(gauge_s * 1000)) == ["wl-1"]


def test_router_offline_override_applies_to_every_device():
    r = router(mqtt("k-1"), msgspec.structs.replace(mqtt("wl-1"), device_type="water_level"))
    r.site_messages(
        [
            (device_uplink_topic("k-1", PREFIX), uplink(1), 1, 1, False),
            (device_uplink_topic("wl-1", PREFIX), uplink(1, water_depth=3.0), 1, 2, False),
        ],
        generation=1,
        now=NOW,
    )
    assert sorted(r.expire(NOW + 90_000, override_ms=90_000)) == ["k-1", "wl-1"]
