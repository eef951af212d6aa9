"""A device's backlog is stored whole; a flood beside it is limited, counted and logged.

Real parts: a gateway and an ingest worker in threads, the private Mosquitto
and TimescaleDB, the gateway at the site defaults (5 readings a second, a
burst of 20). At the same time:
- one device sends the 10 minutes of readings it buffered through an outage
  (one a second, oldest first) in one burst, then carries on live;
- another sends 1,000 readings a second for 3 s, each stamped as it is sent;
- two calm devices send a reading a second.
The whole backlog and every calm reading are in the database; the flood got
its burst and its rate, every drop is counted for its device and is in the
gateway's WARNING lines.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
import uuid

import pytest

from contracts.schema import readings_table
from contracts.settings import DatabaseSettings
from contracts.topics import device_uplink_topic
from gateway.counters import GatewayCounters
from tests.plugins.gateway import (
    broker_settings,
    client,
    gateway_in_thread,
    gateway_settings,
    kiosk_uplink,
    mqtt_devices,
    now_ms,
    publish_config,
    wait_for,
)
from tests.plugins.ingest import ingest_in_thread, ingest_settings, seed_registry

pytestmark = pytest.mark.slow

RATE, BURST = 5.0, 20.0
BACKLOG_S = 600
FLOOD_PER_S, FLOOD_S = 1000, 3.0
LIMIT_LINE = re.compile(r"rate limit: device (\S+) sent faster .*: (\d+) dropped")


def _flood(server, topic: str, sent: list[tuple[int, int]], started: threading.Event) -> None:
    """FLOOD_PER_S readings a second for FLOOD_S, each stamped when it is sent."""
    pub = client(server)
    try:
        started.set()
        begin = time.monotonic()
        seq = 0
        while (elapsed := time.monotonic() - begin) < FLOOD_S:
            due = int(elapsed * FLOOD_PER_S)
            infos = []
            while seq < due:
                ts = now_ms()
                infos.append(pub.publish(topic, kiosk_uplink(seq, ts), qos=1))
                sent.append((seq, ts))
                seq += 1
            for info in infos:
                info.wait_for_publish(10)
            time.sleep(0.005)
    finally:
        pub.disconnect()


def test_a_backlog_is_stored_whole_while_a_flood_is_limited(
    mqtt_server, db_conn, db_url, migrated, tmp_path, caplog
):
    caplog.set_level(logging.WARNING, logger="gateway.service")
    tag = uuid.uuid4().hex[:6]
    gateway_id, prefix = f"gw-{tag}", f"t{tag}"
    back, flood, *calm = mqtt_devices(prefix, 4)
    seed_registry(
        db_conn, migrated, {gateway_id: [(d.device_id, "kiosk") for d in (back, flood, *calm)]}
    )
    broker = broker_settings(mqtt_server)
    pub = client(mqtt_server)
    publish_config(
        pub, gateway_id=gateway_id, prefix=prefix, devices=[back, flood, *calm], version=1
    )
    settings = gateway_settings(
        gateway_id, prefix, device_rate_per_s=RATE, device_burst=BURST, batch_max_rows=500
    )
    table = f"{migrated}.{readings_table('kiosk')}"

    def stored(device_id: str) -> set[tuple[int, int]]:
        rows = db_conn.execute(
            f"SELECT seq, (extract(epoch FROM ts) * 1000)::bigint FROM {table}"
            " WHERE device_id = %s",
            (device_id,),
        ).fetchall()
        return {(seq, ts) for seq, ts in rows}

    expected: dict[str, set[tuple[int, int]]] = {back.device_id: set()}
    flooded: list[tuple[int, int]] = []
    try:
        with (
            ingest_in_thread(
                settings=ingest_settings(prefix),
                broker=broker,
                database=DatabaseSettings(url=db_url, schema=migrated),
            ),
            gateway_in_thread(
                settings=settings, central=broker, site=broker, outbox=tmp_path / "o.sqlite3"
            ) as gw,
        ):
            wait_for(lambda: len(gw.served_devices()) == 4, 10, "devices served")
            started = threading.Event()
            flooder = threading.Thread(
                target=_flood,
                args=(mqtt_server, device_uplink_topic(flood.device_id, prefix), flooded, started),
            )
            flooder.start()
            started.wait(10)
            # The backlog: ten minutes of readings, one a second, oldest first, at once.
            begin = time.monotonic()
            back_topic = device_uplink_topic(back.device_id, prefix)
            t0 = now_ms()
            infos = []
            for i in range(BACKLOG_S):
                ts = t0 - BACKLOG_S * 1000 + i * 1000
                infos.append(pub.publish(back_topic, kiosk_uplink(i, ts), qos=1))
                expected[back.device_id].add((i, ts))
            for info in infos:
                info.wait_for_publish(10)
            backlog = set(expected[back.device_id])
            wait_for(lambda: stored(back.device_id) >= backlog, 30, "the backlog stored")
            backlog_stored_s = time.monotonic() - begin
            # Then each device live, a reading a second, while the flood goes on.
            for second in range(3):
                for device in (back, *calm):
                    seq, ts = BACKLOG_S + second, now_ms()
                    pub.publish(
                        device_uplink_topic(device.device_id, prefix),
                        kiosk_uplink(seq, ts),
                        qos=1,
                    ).wait_for_publish(10)
                    expected.setdefault(device.device_id, set()).add((seq, ts))
                time.sleep(1.0)
            flooder.join(30)
            total = BACKLOG_S + 9 + len(flooded)
            wait_for(lambda: gw.counters.received >= total, 30, "every message received")
            wait_for(
                lambda: all(stored(d) == readings for d, readings in expected.items()),
                60,
                "the backlog and the calm readings stored",
            )
            wait_for(lambda: gw.counters.readings_acked == gw.counters.accepted, 30, "all acked")
            counters = gw.counters
    finally:
        pub.disconnect()
    dropped, lines = _check_flood(
        counters, flooded, stored(flood.device_id), flood.device_id, caplog
    )
    calm_sent = sum(len(expected[d.device_id]) for d in calm)
    # The figures the closing note of this work cites (pytest -s shows them).
    sys.stdout.write(
        f"\nbacklog: {BACKLOG_S} readings sent at once, all in the database"
        f" {backlog_stored_s:.2f} s after the first was sent, 3 live ones after them too;"
        f" flood: {len(flooded)} sent in {FLOOD_S:.0f} s, {len(flooded) - dropped} stored,"
        f" {dropped} dropped, counted and logged in {lines} lines;"
        f" calm: {calm_sent} of {calm_sent} stored\n"
    )


def _check_flood(
    counters: GatewayCounters,
    flooded: list[tuple[int, int]],
    flood_stored: set[tuple[int, int]],
    flood_id: str,
    caplog: pytest.LogCaptureFixture,
) -> tuple[int, int]:
    """The flood got its burst and its rate; every drop counted and logged: (drops, lines)."""
    assert flood_stored <= set(flooded)
    dropped = len(flooded) - len(flood_stored)
    # The burst, then the rate over the flood's 3 s (and the few ms until its
    # last reading was handled).
    assert BURST <= len(flood_stored) <= BURST + RATE * (FLOOD_S + 2), len(flood_stored)
    assert counters.rate_limited == dropped
    assert dict(counters.device_rate_limited) == {flood_id: dropped}
    # Every drop is in a WARNING line (the first at once, the rest at the
    # stop): the lines name only the flood, and their counts add up.
    lines = [
        LIMIT_LINE.search(r.getMessage())
        for r in caplog.records
        if r.levelno == logging.WARNING and r.getMessage().startswith("rate limit:")
    ]
    assert lines
    assert all(m is not None and m[1] == flood_id for m in lines)
    assert sum(int(m[2]) for m in lines if m is not None) == dropped
    return dropped, len(lines)
