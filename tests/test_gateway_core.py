"""Gateway pure core (batching, rate limits) and the SQLite outbox, including kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts.errors import FieldTypeError, InvalidPortError, OutboxFullError
from contracts.ids import parse_batch_id
from contracts.messages import (
    DeviceConfig,
    GatewayConfig,
    check_gateway_config,
    decode_batch,
    encode_batch,
    payload_digest,
)
from contracts.serialurl import check_port_url
from devices.validation import device_config
from gateway.batching import BatchBuilder
from gateway.outbox import Outbox
from gateway.ratelimit import TokenBuckets

NOW = 1_790_000_000_000


def builder(**kw) -> BatchBuilder:
    args = {"gateway_id": "gw-hk", "boot_id": "b00t", "max_rows": 3, "max_age_ms": 200}
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


def test_outbox_refuse_policy_counts_and_stores_nothing(tmp_path):
    box = Outbox(tmp_path / "o.sqlite3", max_bytes=250, full_policy="refuse")
    box.put([("a:b:0", b"x" * 200, 20)], NOW)
    with pytest.raises(OutboxFullError, match="refused 7 readings"):
        box.put([("a:b:1", b"y" * 100, 7)], NOW)
    assert box.depth().batches == 1
    assert box.counter("refused_readings") == 7


def test_outbox_drop_oldest_policy_counts_what_it_drops(tmp_path):
    box = Outbox(tmp_path / "o.sqlite3", max_bytes=250, full_policy="drop_oldest")
    box.put([("a:b:0", b"x" * 100, 10), ("a:b:1", b"x" * 100, 11)], NOW)
    result = box.put([("a:b:2", b"y" * 100, 12)], NOW)
    assert (result.dropped_batches, result.dropped_readings) == (1, 10)
    assert [i.batch_id for i in box.due(NOW, resend_after_ms=0, limit=9)] == ["a:b:1", "a:b:2"]
    assert box.counter("dropped_readings") == 10
    assert box.depth().bytes == 200


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
