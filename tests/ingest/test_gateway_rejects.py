"""Rejects reach the centre: a gateway reports them, ingest stores them, the CLI lists them.

A gateway on the session Mosquitto gets malformed uplinks from a device it
serves and uplinks from ids it no longer serves (queued in its site session
while it was away, then removed from its config); its periodic states carry
them, aggregated per device and reason; ingest stores them in ``rejects``
once, however often a state comes; `cityhub devices show` lists them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from cityhub.cli.context import HANOI_TZ as HANOI
from contracts.messages import (
    GatewayConfig,
    GatewayState,
    RejectCount,
    encode_gateway_config,
    encode_gateway_state,
)
from contracts.settings import DatabaseSettings
from contracts.topics import device_uplink_topic, state_topic
from gateway.outbox import Outbox
from gateway.rejects import MAX_OTHER_KEYS
from gateway.service import CONFIG_DOCUMENT
from ingest.writer import REPORT_OVERFLOW_REASON
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

GONE = 40  # devices removed from the gateway's config: more than MAX_OTHER_KEYS


def reject_rows(db_conn, schema: str, gateway_id: str) -> list[tuple]:
    return db_conn.execute(
        "SELECT received_at, device_id, reason, count, first_at, last_at, raw, raw_bytes, detail "
        f"FROM {schema}.rejects WHERE gateway_id = %s AND batch_id IS NULL "
        "ORDER BY received_at, device_id, reason",
        (gateway_id,),
    ).fetchall()


def total(rows, device_id: str | None = None, reason: str | None = None) -> int:
    return sum(
        r[3]
        for r in rows
        if (device_id is None or r[1] == device_id) and (reason is None or r[2] == reason)
    )


def leave_uplinks_of_removed_devices(pub, *, settings, broker, outbox, served, gone) -> None:
    """Uplinks of ids the gateway no longer serves, waiting in its site session.

    Run 1 serves every device, so its site session subscribes to all of
    them. While it is away, each device of ``gone`` publishes once (queued in
    that session), and the config that removes them is kept where the
    gateway restores it from, before any broker: the next run gets them as
    uplinks from ids it does not serve.
    """
    gw, prefix = settings.gateway_id, settings.topic_prefix
    publish_config(pub, gateway_id=gw, prefix=prefix, devices=served + gone, version=1)
    with gateway_in_thread(settings=settings, central=broker, site=broker, outbox=outbox) as g:
        wait_for(lambda: len(g.devices) == len(served) + len(gone), 10, "config 1 applied")
        wait_for(g.site_ready, 10, "subscribed to every device")
    for d in gone:
        pub.publish(
            device_uplink_topic(d.device_id, prefix), kiosk_uplink(1, now_ms()), qos=1
        ).wait_for_publish(10)
    config = GatewayConfig(gateway_id=gw, version=2, site_id="hk-hall-ubnd", devices=served)
    box = Outbox(
        outbox, max_bytes=settings.outbox_max_bytes, full_policy=settings.outbox_full_policy
    )
    box.save_document(CONFIG_DOCUMENT, encode_gateway_config(config))
    box.close()
    publish_config(pub, gateway_id=gw, prefix=prefix, devices=served, version=2)


def test_gateway_rejects_are_stored_bounded_and_listed(
    mqtt_server, db_conn, db_url, migrated, tmp_path
):
    t = uuid.uuid4().hex[:6]
    gw, prefix = f"gw-{t}", f"t{t}"
    served = mqtt_devices(prefix, 2)
    gone = mqtt_devices(f"{prefix}-gone", GONE)
    seed_registry(db_conn, migrated, {gw: [(d.device_id, d.device_type) for d in served]})
    pub = client(mqtt_server)
    broker = broker_settings(mqtt_server)
    settings = gateway_settings(gw, prefix)
    outbox = tmp_path / "outbox.sqlite3"
    try:
        leave_uplinks_of_removed_devices(
            pub, settings=settings, broker=broker, outbox=outbox, served=served, gone=gone
        )
        bad = served[0].device_id
        with (
            ingest_in_thread(
                settings=ingest_settings(prefix),
                broker=broker,
                database=DatabaseSettings(url=db_url, schema=migrated),
            ),
            gateway_in_thread(settings=settings, central=broker, site=broker, outbox=outbox) as g,
        ):
            assert len(g.devices) == 2
            for i in range(5):
                pub.publish(
                    device_uplink_topic(bad, prefix), b'{"seq": ' + str(i).encode(), qos=1
                ).wait_for_publish(10)
            wait_for(
                lambda: total(reject_rows(db_conn, migrated, gw)) == GONE + 5,
                30,
                "every reject counted at the centre",
            )
            assert g.counters.device_rejects["other", "unknown_device"] == GONE
        rows = reject_rows(db_conn, migrated, gw)
    finally:
        pub.disconnect()

    # The served device: one reason, five rejects, the first one's payload head.
    mine = [r for r in rows if r[1] == bad]
    assert {r[2] for r in mine} == {"malformed"}
    assert total(rows, bad) == 5
    first = min(mine, key=lambda r: r[4])
    assert first[6] == b'{"seq": 0'
    assert first[7] == len(b'{"seq": 0')
    assert all(r[4] <= r[5] <= r[0] for r in mine)
    # Unserved ids are kept by id, at most MAX_OTHER_KEYS per state; the rest
    # are counted in an overflow row, so nothing goes uncounted.
    unserved = [r for r in rows if r[2] == "unknown_device"]
    assert {r[1] for r in unserved} <= {d.device_id for d in gone}
    per_state: dict[object, int] = {}
    for r in unserved:
        per_state[r[0]] = per_state.get(r[0], 0) + 1
    assert max(per_state.values()) <= MAX_OTHER_KEYS
    overflow = total(rows, reason=REPORT_OVERFLOW_REASON)
    assert overflow > 0
    assert total(rows, reason="unknown_device") + overflow == GONE
    assert all(r[1] is None for r in rows if r[2] == REPORT_OVERFLOW_REASON)

    # `cityhub devices show` lists the device's reject reasons, in Hanoi time.
    env = {"CITYHUB_DATABASE__URL": db_url, "CITYHUB_DATABASE__SCHEMA": migrated}
    shown = devices_show(bad, env)
    assert "recent rejects" in shown
    assert "số lần / count" in shown
    line = next(li for li in shown.splitlines() if "malformed" in li)
    assert " 5 " in line
    last = max(r[5] for r in mine)
    assert last.astimezone(HANOI).strftime("%d/%m/%Y %H:%M:%S") in line
    assert "no rejects in the last 7 days" in devices_show(served[1].device_id, env)


def devices_show(device_id: str, env: dict[str, str]) -> str:
    return subprocess.run(
        [sys.executable, "-m", "cityhub", "devices", "show", device_id],
        env={**os.environ, "COLUMNS": "250", **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout


def test_a_state_received_again_stores_its_rejects_once(mqtt_server, db_conn, db_url, migrated):
    t = uuid.uuid4().hex[:6]
    gw, prefix = f"gw-{t}", f"t{t}"
    ts = now_ms()
    state = GatewayState(
        gateway_id=gw,
        status="online",
        birth=1,
        boot_id="b00t",
        version="1.0",
        outbox_depth=0,
        ts_ms=ts,
        rejects=(
            RejectCount(
                device_id="k-1", reason="malformed", count=3, first_ms=ts - 900, last_ms=ts - 10
            ),
            RejectCount(device_id="", reason="bad_topic", count=1, first_ms=ts, last_ms=ts),
        ),
        rejects_dropped=7,
    )
    payload = encode_gateway_state(state)
    pub = client(mqtt_server)
    broker = broker_settings(mqtt_server)
    database = DatabaseSettings(url=db_url, schema=migrated)
    topic = state_topic(gw, prefix)
    try:
        with ingest_in_thread(
            settings=ingest_settings(prefix), broker=broker, database=database
        ) as worker:
            pub.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
            pub.publish(topic, payload, qos=1).wait_for_publish(10)
            wait_for(lambda: worker.counters.states >= 2, 20, "both copies stored")
        # A restarted ingest gets the retained copy again: nothing new.
        with ingest_in_thread(
            settings=ingest_settings(prefix), broker=broker, database=database
        ) as again:
            wait_for(lambda: again.counters.states >= 1, 20, "the retained state again")
        rows = reject_rows(db_conn, migrated, gw)
    finally:
        pub.publish(topic, b"", qos=1, retain=True).wait_for_publish(10)
        pub.disconnect()
    assert [(r[1], r[2], r[3]) for r in rows] == [
        ("k-1", "malformed", 3),
        (None, "bad_topic", 1),
        (None, REPORT_OVERFLOW_REASON, 7),
    ]
    assert int(rows[0][0].timestamp() * 1000) == ts
