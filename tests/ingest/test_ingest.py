"""Ingest against a real Mosquitto and a real PostgreSQL/TimescaleDB: tests play the gateways.

Each test has its own schema (``migrated``) and topic prefix; the worker runs
in a thread (``ingest_in_thread``) or as a real `python -m ingest` process.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest

from contracts.catalog import DEVICE_TYPES
from contracts.messages import GatewayState, encode_batch, encode_gateway_state
from contracts.settings import DatabaseSettings
from contracts.topics import state_topic
from ingest.prepare import poison_key
from tests.plugins.gateway import broker_settings, client, now_ms, wait_for
from tests.plugins.ingest import (
    GatewayPlayer,
    Ledger,
    assert_table_equals_ledger,
    ingest_in_thread,
    ingest_settings,
    make_batch,
    seed_registry,
)

pytestmark = pytest.mark.slow


def tag() -> str:
    return uuid.uuid4().hex[:6]


def devices_of(gateway_id: str, per_type: int = 2) -> list[tuple[str, str]]:
    return [
        (f"{gateway_id}-{t.replace('_', '')}-{i}", t) for t in DEVICE_TYPES for i in range(per_type)
    ]


def db(db_url: str, schema: str) -> DatabaseSettings:
    return DatabaseSettings(url=db_url, schema=schema)


def test_batches_are_stored_exactly_and_acked_after_commit(mqtt_server, db_conn, db_url, migrated):
    t = tag()
    gw = f"gw-{t}"
    devices = devices_of(gw)
    seed_registry(db_conn, migrated, {gw: devices})
    ledger = Ledger()
    player = GatewayPlayer(mqtt_server, gateway_id=gw, prefix=f"t{t}")
    try:
        with ingest_in_thread(
            settings=ingest_settings(f"t{t}"),
            broker=broker_settings(mqtt_server),
            database=db(db_url, migrated),
        ) as worker:
            batches = [
                make_batch(gw, n, devices, rows_per_device=10, start_seq=n * 10, ledger=ledger)
                for n in range(20)
            ]
            for batch in batches:
                player.send(batch)
            wait_for(lambda: player.acked == {b.batch_id for b in batches}, 20, "all acked")
            # Acked means committed: every acked batch is in ingested_batches.
            committed = {
                r[0] for r in db_conn.execute(f"SELECT batch_id FROM {migrated}.ingested_batches")
            }
            assert committed == player.acked
            assert worker.counters.readings == ledger.count() == 20 * 10 * len(devices)
            assert worker.counters.batches == 20
            assert worker.counters.rejects.total() == 0
        assert_table_equals_ledger(db_conn, migrated, ledger)
        state = db_conn.execute(
            f"SELECT device_id, last_seq, readings, boot_id FROM {migrated}.device_state "
            "ORDER BY device_id"
        ).fetchall()
        assert [(d, seq, n) for d, seq, n, _ in state] == sorted((d, 199, 200) for d, _ in devices)
        assert all(boot.startswith("devboot-") for *_, boot in state)
        assert player.sends == 20  # nothing was resent
    finally:
        player.close()


def test_a_replayed_batch_is_stored_once_and_acked_every_time(
    mqtt_server, db_conn, db_url, migrated
):
    t = tag()
    gw = f"gw-{t}"
    devices = devices_of(gw, per_type=1)
    seed_registry(db_conn, migrated, {gw: devices})
    ledger = Ledger()
    base = now_ms() - 3_600_000
    first = make_batch(gw, 1, devices, rows_per_device=20, base_ms=base, ledger=ledger)
    twice = make_batch(
        gw, 2, devices, rows_per_device=20, start_seq=20, base_ms=base, ledger=ledger
    )
    player = GatewayPlayer(mqtt_server, gateway_id=gw, prefix=f"t{t}")

    def acks_of(batch_id: str) -> int:
        with player.lock:
            return sum(ids.count(batch_id) for ids in player.ack_messages)

    try:
        with ingest_in_thread(
            settings=ingest_settings(f"t{t}"),
            broker=broker_settings(mqtt_server),
            database=db(db_url, migrated),
        ) as worker:
            payload = player.send(first)
            wait_for(lambda: acks_of(first.batch_id) == 1, 10, "first ack")
            # The gateway missed the ack and resends the batch, unchanged.
            player.publish_raw(payload)
            wait_for(lambda: acks_of(first.batch_id) == 2, 10, "ack of the resend")
            # Two copies in flight at once (a resend racing the original): one
            # ack names the id (once, if both land in one commit), both
            # messages are PUBACKed.
            second = encode_batch(twice)
            player.publish_raw(second)
            player.publish_raw(second)
            wait_for(
                lambda: worker.counters.mqtt_acks == 4 and twice.batch_id in player.acked,
                10,
                "both copies acked",
            )
            assert worker.counters.batches == 2
            assert worker.counters.replayed == 2
            assert worker.counters.readings == ledger.count()
            state_sql = f"SELECT sum(readings) FROM {migrated}.device_state"
            # A replay does not count twice.
            assert db_conn.execute(state_sql).fetchone()[0] == ledger.count()
            # The same readings under new batch ids (a gateway that lost its
            # outbox and batched them again), one with new readings too: the
            # unique key stores each reading once.
            rebatched = msgspec.structs.replace(first, batch_id=f"{gw}:boot2:1", boot_id="boot2")
            mixed = make_batch(
                gw,
                2,
                devices,
                rows_per_device=20,
                start_seq=30,
                boot_id="boot2",
                base_ms=base,
                ledger=ledger,
            )
            player.send(rebatched)
            player.send(mixed)
            wait_for(
                lambda: {rebatched.batch_id, mixed.batch_id} <= player.acked, 10, "re-batched acks"
            )
            # All 20 of the re-batched rows a device; seq 30..39 of the mixed one.
            assert worker.counters.duplicates == (20 + 10) * len(devices)
            assert worker.counters.readings == ledger.count()
        assert_table_equals_ledger(db_conn, migrated, ledger)
    finally:
        player.close()


def rejects(db_conn, schema: str) -> list[tuple]:
    return db_conn.execute(
        f"SELECT reason, gateway_id, device_id, batch_id, detail, raw FROM {schema}.rejects "
        "ORDER BY received_at, reason, device_id"
    ).fetchall()


def test_poison_is_stored_with_its_payload_acked_and_does_not_block_the_stream(
    mqtt_server, db_conn, db_url, migrated
):
    t = tag()
    gw = f"gw-{t}"
    devices = devices_of(gw, per_type=1)
    seed_registry(db_conn, migrated, {gw: devices})
    ledger = Ledger()
    player = GatewayPlayer(mqtt_server, gateway_id=gw, prefix=f"t{t}")
    garbage = b"\xc1 this is not msgpack"
    good_shape = make_batch(gw, 1, devices, rows_per_device=5)
    block = good_shape.blocks[0]
    # Columns of different lengths: decodable, refused by decode_batch.
    broken = msgspec.structs.replace(
        good_shape, blocks=[msgspec.structs.replace(block, seq=block.seq[:-1])]
    )
    # A batch that claims to come from another gateway.
    foreign = make_batch("gw-other", 1, devices, rows_per_device=5)
    good = make_batch(gw, 2, devices, rows_per_device=5, ledger=ledger)
    try:
        with ingest_in_thread(
            settings=ingest_settings(f"t{t}"),
            broker=broker_settings(mqtt_server),
            database=db(db_url, migrated),
        ) as worker:
            player.publish_raw(garbage)
            player.publish_raw(garbage)  # a redelivery: stored once
            player.publish_raw(encode_batch(broken), track_as=broken.batch_id)
            player.publish_raw(encode_batch(foreign))
            player.send(good)
            wait_for(lambda: {broken.batch_id, good.batch_id} <= player.acked, 10, "acks")
            wait_for(lambda: worker.counters.mqtt_acks == 5, 10, "all five messages acked")
            assert worker.counters.poison == 3
            assert worker.counters.replayed == 1
            assert dict(worker.counters.rejects) == {
                "malformed": 1,
                "inconsistent_batch": 1,
                "gateway_mismatch": 1,
            }
        assert_table_equals_ledger(db_conn, migrated, ledger)
        found = {r[0]: r for r in rejects(db_conn, migrated)}
        assert set(found) == {"malformed", "inconsistent_batch", "gateway_mismatch"}
        assert bytes(found["malformed"][5]) == garbage
        assert found["malformed"][3] is None  # no readable batch id
        assert bytes(found["inconsistent_batch"][5]) == encode_batch(broken)
        assert found["inconsistent_batch"][3] == broken.batch_id
        assert "seq has 4 rows" in found["inconsistent_batch"][4]
        assert found["gateway_mismatch"][1] == gw
        assert found["gateway_mismatch"][3] is None  # the other gateway's id is not acked
        # Only ids of this gateway were ever acked to it.
        assert player.acked == {broken.batch_id, good.batch_id}
        keys = {r[0] for r in db_conn.execute(f"SELECT batch_id FROM {migrated}.ingested_batches")}
        assert poison_key(f"t{t}/hub/v1/gw/{gw}/batch", garbage) in keys
        assert foreign.batch_id not in keys
    finally:
        player.close()


def test_readings_of_devices_the_gateway_does_not_own_are_rejected(
    mqtt_server, db_conn, db_url, migrated
):
    t = tag()
    gw, other = f"gw-{t}", f"gw-{t}-b"
    mine = [(f"{gw}-aq-1", "air_quality"), (f"{gw}-k-1", "kiosk")]
    theirs = [(f"{other}-aq-1", "air_quality")]
    late = (f"{gw}-aq-late", "air_quality")  # registered after ingest started
    seed_registry(db_conn, migrated, {gw: mine, other: theirs})
    ledger = Ledger()
    player = GatewayPlayer(mqtt_server, gateway_id=gw, prefix=f"t{t}")
    try:
        with ingest_in_thread(
            settings=ingest_settings(f"t{t}"),
            broker=broker_settings(mqtt_server),
            database=db(db_url, migrated),
        ) as worker:
            wait_for(lambda: len(worker.writer.owners) == 3, 10, "ownership map loaded")
            seed_registry(db_conn, migrated, {f"gw-{t}-c": []})
            db_conn.execute(
                f"INSERT INTO {migrated}.devices (device_id, device_type, site_id, gateway_id, "
                "transport) VALUES (%s, 'air_quality', 'hk-hall', %s, 'mqtt')",
                (late[0], gw),
            )
            mixed = make_batch(gw, 1, [*mine, *theirs, (f"{gw}-ghost", "kiosk")], rows_per_device=4)
            for block in mixed.blocks:
                for row, index in enumerate(block.device_index):
                    device = mixed.devices[index]
                    if device in dict(mine):
                        values = {m: c[row] for m, c in block.values.items()}
                        key = (device, block.ts_ms[row], block.seq[row])
                        ledger.add(block.device_type, key, values)
            player.send(mixed)
            newcomer = make_batch(gw, 2, [late], rows_per_device=3, ledger=ledger)
            player.send(newcomer)
            wait_for(lambda: player.acked == {mixed.batch_id, newcomer.batch_id}, 10, "acks")
            assert worker.counters.rejects == {"not_owned": 8}
        assert_table_equals_ledger(db_conn, migrated, ledger)
        found = rejects(db_conn, migrated)
        assert {(r[0], r[1], r[2], r[3]) for r in found} == {
            ("not_owned", gw, f"{other}-aq-1", mixed.batch_id),
            ("not_owned", gw, f"{gw}-ghost", mixed.batch_id),
        }
        assert len(found) == 8
        details = " ".join(r[4] for r in found)
        assert f"belongs to gateway {other!r}" in details
        assert "not registered to an active gateway" in details
        states = {r[0] for r in db_conn.execute(f"SELECT device_id FROM {migrated}.device_state")}
        assert states == {d for d, _ in mine} | {late[0]}
    finally:
        player.close()


def test_bad_readings_inside_a_good_batch_are_rejected_one_by_one(
    mqtt_server, db_conn, db_url, migrated
):
    t = tag()
    gw = f"gw-{t}"
    devices = [(f"{gw}-aq-1", "air_quality"), (f"{gw}-k-1", "kiosk")]
    seed_registry(db_conn, migrated, {gw: devices})
    batch = make_batch(gw, 1, devices, rows_per_device=10)
    aq, kiosk = batch.blocks
    pm25 = list(aq.values["pm25"])
    pm25[1] = float("nan")
    pm25[2] = 5000.0  # above the 1000 ug/m3 range
    ts = list(aq.ts_ms)
    ts[3] = now_ms() - 40 * 86_400_000  # older than the 30-day window
    queue_length = list(kiosk.values["queue_length"])
    queue_length[4] = 2.5  # an integer metric with a fraction
    empty = {name: list(column) for name, column in kiosk.values.items()}
    for column in empty.values():
        column[5] = None  # a row without any value
    empty["queue_length"] = queue_length
    aq_bad = msgspec.structs.replace(aq, values={**aq.values, "pm25": pm25}, ts_ms=ts)
    kiosk_bad = msgspec.structs.replace(kiosk, values=empty)
    batch = msgspec.structs.replace(batch, blocks=[aq_bad, kiosk_bad])
    ledger = Ledger()
    bad_rows = {
        ("air_quality", 1),
        ("air_quality", 2),
        ("air_quality", 3),
        ("kiosk", 4),
        ("kiosk", 5),
    }
    for block in batch.blocks:
        for row in range(block.row_count):
            if (block.device_type, row) in bad_rows:
                continue
            device = batch.devices[block.device_index[row]]
            values = {m: c[row] for m, c in block.values.items()}
            ledger.add(block.device_type, (device, block.ts_ms[row], block.seq[row]), values)
    player = GatewayPlayer(mqtt_server, gateway_id=gw, prefix=f"t{t}")
    try:
        with ingest_in_thread(
            settings=ingest_settings(f"t{t}"),
            broker=broker_settings(mqtt_server),
            database=db(db_url, migrated),
        ) as worker:
            player.send(batch)
            wait_for(lambda: batch.batch_id in player.acked, 10, "ack")
            assert worker.counters.readings == 15
        assert_table_equals_ledger(db_conn, migrated, ledger)
        found = [(r[0], r[2], r[3]) for r in rejects(db_conn, migrated)]
        assert sorted(found) == sorted(
            [
                ("non_finite", f"{gw}-aq-1", batch.batch_id),
                ("out_of_range", f"{gw}-aq-1", batch.batch_id),
                ("ts_window", f"{gw}-aq-1", batch.batch_id),
                ("out_of_range", f"{gw}-k-1", batch.batch_id),
                ("wrong_type", f"{gw}-k-1", batch.batch_id),
            ]
        )
        details = [r[4] for r in rejects(db_conn, migrated)]
        assert any(d.startswith("seq 1 ts_ms ") and "pm25" in d for d in details)
    finally:
        player.close()


def test_memory_stays_bounded_by_receive_maximum_while_the_database_is_down(
    mqtt_server, db_conn, db_url, migrated
):
    """The broker keeps at most queue_max_messages unacked messages at the worker."""
    from tests.plugins.ingest import TcpProxy, proxied_url

    t = tag()
    gw = f"gw-{t}"
    devices = devices_of(gw, per_type=1)
    seed_registry(db_conn, migrated, {gw: devices})
    ledger = Ledger()
    proxy = TcpProxy(int(db_url.rsplit(":", 1)[1].split("/")[0]))
    player = GatewayPlayer(mqtt_server, gateway_id=gw, prefix=f"t{t}", resend_after_s=60)
    window = 8
    try:
        with ingest_in_thread(
            settings=ingest_settings(f"t{t}", queue_max_messages=window, max_batches_per_commit=4),
            broker=broker_settings(mqtt_server),
            database=DatabaseSettings(
                url=proxied_url(db_url, proxy), schema=migrated, connect_timeout_s=1
            ),
        ) as worker:
            proxy.cut()
            batches = [
                make_batch(gw, n, devices, rows_per_device=5, start_seq=5 * n, ledger=ledger)
                for n in range(5 * window)
            ]
            for batch in batches:
                player.send(batch)
            wait_for(lambda: worker.counters.received == window, 10, "the window filled")
            time.sleep(1.0)
            assert worker.counters.received == window  # the broker holds the rest
            assert worker.deliveries.qsize() == 0
            assert not player.acked
            proxy.restore()
            wait_for(lambda: len(player.acked) == len(batches), 30, "all acked after restore")
            assert worker.counters.batches == len(batches)
        assert_table_equals_ledger(db_conn, migrated, ledger)
    finally:
        player.close()
        proxy.close()


def test_a_real_gateway_drains_its_outbox_into_the_database(
    mqtt_server, db_conn, db_url, migrated, tmp_path
):
    """gateway.service -> broker -> ingest: the gateway takes ingest's acks, empties its outbox."""
    from tests.plugins.gateway import (
        client,
        gateway_in_thread,
        gateway_settings,
        mqtt_devices,
        publish_config,
        publish_readings,
    )

    t = tag()
    gw, prefix = f"gw-{t}", f"t{t}"
    devices = mqtt_devices(prefix, 10)
    seed_registry(db_conn, migrated, {gw: [(d.device_id, d.device_type) for d in devices]})
    pub = client(mqtt_server)
    publish_config(pub, gateway_id=gw, prefix=prefix, devices=devices, version=1)
    broker = broker_settings(mqtt_server)
    try:
        with (
            ingest_in_thread(
                settings=ingest_settings(prefix), broker=broker, database=db(db_url, migrated)
            ) as worker,
            gateway_in_thread(
                settings=gateway_settings(gw, prefix),
                central=broker,
                site=broker,
                outbox=tmp_path / "outbox.sqlite3",
            ) as gateway,
        ):
            wait_for(lambda: len(gateway.devices) == 10, 10, "gateway config")
            sent = publish_readings(pub, prefix=prefix, devices=devices, per_device=50)
            wait_for(lambda: gateway.counters.readings_acked == len(sent), 20, "acked by ingest")
            wait_for(lambda: gateway.outbox.depth().readings == 0, 10, "outbox drained")
            assert worker.counters.readings == len(sent)
        stored = db_conn.execute(
            f"SELECT device_id, seq, (extract(epoch FROM ts) * 1000)::bigint "
            f"FROM {migrated}.readings_kiosk"
        ).fetchall()
        assert len(stored) == len(sent)
        assert {(d, int(s), int(ts)) for d, s, ts in stored} == sent
    finally:
        pub.disconnect()


# --- gateway states -------------------------------------------------------------------


def latest_state(db_conn, schema: str, gateway_id: str) -> dict[str, Any] | None:
    cur = db_conn.execute(
        "SELECT status, birth, boot_id, version, (extract(epoch FROM ts) * 1000)::bigint AS ts_ms,"
        " outbox_depth, outbox_readings, readings_per_s, received, accepted, rejected,"
        " rate_limited, serial_errors, devices_online, site_ready, outbox_refused_readings,"
        f" outbox_dropped_readings FROM {schema}.gateway_status WHERE gateway_id = %s",
        (gateway_id,),
    )
    row = cur.fetchone()
    if row is None:
        return None
    return dict(zip([c.name for c in cur.description], row, strict=True))


def history(db_conn, schema: str, gateway_id: str) -> list[tuple]:
    return db_conn.execute(
        "SELECT (extract(epoch FROM ts) * 1000)::bigint, status, outbox_depth, devices_online "
        f"FROM {schema}.gateway_status_history WHERE gateway_id = %s ORDER BY ts, status",
        (gateway_id,),
    ).fetchall()


def history_losses(db_conn, schema: str, gateway_id: str) -> set[tuple[int, int]]:
    """The (refused, dropped) readings in a gateway's state history."""
    rows = db_conn.execute(
        "SELECT outbox_refused_readings, outbox_dropped_readings "
        f"FROM {schema}.gateway_status_history WHERE gateway_id = %s",
        (gateway_id,),
    ).fetchall()
    return {(r[0], r[1]) for r in rows}


def outbox_with_losses(path: Path, *, refused: int, dropped: int) -> None:
    """An outbox file left by an earlier boot: readings refused and dropped, nothing held."""
    from contracts.messages import payload_digest
    from gateway.outbox import Outbox

    box = Outbox(path, max_bytes=100, full_policy="drop_oldest")
    box.put([("gw-old:boot:1", b"x" * 80, dropped)], now_ms=0)
    box.put([("gw-old:boot:2", b"y" * 80, 1)], now_ms=0)  # drops the first
    box.ack(["gw-old:boot:2"], [payload_digest(b"y" * 80)])
    box.count_refused(refused)
    box.close()


def publish_state(pub, prefix: str, payload: bytes, gateway_id: str, *, retain=False) -> None:
    info = pub.publish(state_topic(gateway_id, prefix), payload, qos=1, retain=retain)
    info.wait_for_publish(10)


def a_state(gateway_id: str, **fields) -> GatewayState:
    values: dict[str, Any] = {
        "gateway_id": gateway_id,
        "status": "online",
        "birth": 2,
        "boot_id": "boot-a",
        "version": "1.0.0",
        "outbox_depth": 0,
        "ts_ms": now_ms(),
        "devices_online": 4,
        "site_ready": True,
    }
    values.update(fields)
    return GatewayState(**values)


def test_a_real_gateway_state_is_stored_with_its_history_and_its_death(
    mqtt_server, db_conn, db_url, migrated, tmp_path
):
    """gateway.service -> broker -> ingest: the latest state per gateway and every state sent.

    The outbox file's totals of readings refused and dropped while full, left
    by an earlier boot, come with every state and are stored.
    """
    from tests.plugins.gateway import (
        gateway_in_thread,
        gateway_settings,
        mqtt_devices,
        publish_config,
        publish_readings,
    )

    t = tag()
    gw, prefix = f"gw-{t}", f"t{t}"
    devices = mqtt_devices(prefix, 5)
    seed_registry(db_conn, migrated, {gw: [(d.device_id, d.device_type) for d in devices]})
    pub = client(mqtt_server)
    publish_config(pub, gateway_id=gw, prefix=prefix, devices=devices, version=1)
    broker = broker_settings(mqtt_server)
    database = db(db_url, migrated)
    outbox_with_losses(tmp_path / "outbox.sqlite3", refused=7, dropped=5)
    try:
        with ingest_in_thread(
            settings=ingest_settings(prefix), broker=broker, database=database
        ) as worker:
            with gateway_in_thread(
                settings=gateway_settings(gw, prefix, state_interval_s=0.5),
                central=broker,
                site=broker,
                outbox=tmp_path / "outbox.sqlite3",
            ) as gateway:
                wait_for(lambda: len(gateway.devices) == 5, 10, "gateway config")
                sent = publish_readings(pub, prefix=prefix, devices=devices, per_device=20)
                wait_for(lambda: gateway.counters.readings_acked == len(sent), 20, "acked")

                def counted() -> bool:
                    row = latest_state(db_conn, migrated, gw)
                    return row is not None and row["accepted"] == len(sent)

                wait_for(counted, 10, "a stored state with every reading counted")
                row = latest_state(db_conn, migrated, gw)
                assert row["status"] == "online"
                assert row["birth"] == gateway.birth
                assert row["boot_id"] == gateway.boot_id
                assert row["devices_online"] == 5
                assert row["site_ready"] is True
                assert row["outbox_depth"] == gateway.outbox.depth().batches == 0
                assert (row["outbox_refused_readings"], row["outbox_dropped_readings"]) == (7, 5)
                birth = gateway.birth
            # A clean stop publishes the death with the final figures.
            wait_for(
                lambda: latest_state(db_conn, migrated, gw)["status"] == "offline",
                10,
                "the death stored",
            )
            assert latest_state(db_conn, migrated, gw)["birth"] == birth
            stored = worker.counters.states
            assert worker.counters.states_rejected == 0
        rows = history(db_conn, migrated, gw)
        assert len(rows) == stored  # every state received has its row, each once
        assert [r[1] for r in rows].count("offline") == 1
        assert rows[-1][1] == "offline"
        assert [r[0] for r in rows] == sorted(r[0] for r in rows)
        assert history_losses(db_conn, migrated, gw) == {(7, 5)}
        final = latest_state(db_conn, migrated, gw)

        # A worker started later receives the retained death: stored once, unchanged.
        with ingest_in_thread(
            settings=ingest_settings(prefix), broker=broker, database=database
        ) as again:
            wait_for(lambda: again.counters.states == 1, 10, "the retained state received")
        assert history(db_conn, migrated, gw) == rows
        assert latest_state(db_conn, migrated, gw) == final
    finally:
        pub.disconnect()


def test_a_state_replaces_the_stored_one_only_when_newer(mqtt_server, db_conn, db_url, migrated):
    t = tag()
    gw, prefix = f"gw-{t}", f"t{t}"
    pub = client(mqtt_server)
    base = now_ms() - 60_000
    # Retained before any worker runs: the worker catches up when it subscribes.
    publish_state(
        pub, prefix, encode_gateway_state(a_state(gw, ts_ms=base, outbox_depth=1)), gw, retain=True
    )
    try:
        with ingest_in_thread(
            settings=ingest_settings(prefix),
            broker=broker_settings(mqtt_server),
            database=db(db_url, migrated),
        ) as worker:
            wait_for(lambda: worker.counters.states == 1, 10, "the retained state")
            assert latest_state(db_conn, migrated, gw)["outbox_depth"] == 1

            def send(expected: int, **fields) -> Any:  # a row as latest_state returns it
                publish_state(pub, prefix, encode_gateway_state(a_state(gw, **fields)), gw)
                wait_for(lambda: worker.counters.states == expected, 10, f"state {expected}")
                return latest_state(db_conn, migrated, gw)

            row = send(2, ts_ms=base + 10_000, outbox_depth=7, outbox_readings=700)
            assert (row["ts_ms"], row["outbox_depth"], row["outbox_readings"]) == (
                base + 10_000,
                7,
                700,
            )
            # Late: an older state of the same session changes nothing.
            assert send(3, ts_ms=base + 5_000, outbox_depth=99) == row
            # The previous session's state, however recent its clock, changes nothing.
            assert send(4, birth=1, boot_id="boot-z", ts_ms=base + 50_000, outbox_depth=98) == row
            # The session's death Will carries its connect time: it ends the
            # session's "online" and keeps the newest figures.
            died = send(5, status="offline", ts_ms=base - 1_000, outbox_depth=0)
            assert died == {**row, "status": "offline"}
            # The Will again (a retained copy): nothing changes.
            assert send(6, status="offline", ts_ms=base - 1_000, outbox_depth=0) == died
            # Reconnected in the same session: online again with its next state.
            row = send(7, ts_ms=base + 20_000, outbox_depth=3, devices_online=2)
            assert (row["status"], row["ts_ms"], row["outbox_depth"]) == (
                "online",
                base + 20_000,
                3,
            )
            # A new session wins whatever its clock says.
            row = send(8, birth=3, boot_id="boot-b", ts_ms=base + 15_000, outbox_depth=4)
            assert (row["birth"], row["boot_id"], row["ts_ms"]) == (3, "boot-b", base + 15_000)
            assert worker.counters.states_rejected == 0
        # History keeps every distinct state; the repeated Will once.
        assert [(r[0] - base, r[1], r[2]) for r in history(db_conn, migrated, gw)] == [
            (-1_000, "offline", 0),
            (0, "online", 1),
            (5_000, "online", 99),
            (10_000, "online", 7),
            (15_000, "online", 4),
            (20_000, "online", 3),
            (50_000, "online", 98),
        ]
    finally:
        publish_state(pub, prefix, b"", gw, retain=True)  # clear the retained state
        pub.disconnect()


def test_malformed_states_are_rejects_and_do_not_stop_the_worker(
    mqtt_server, db_conn, db_url, migrated
):
    t = tag()
    gw, prefix = f"gw-{t}", f"t{t}"
    pub = client(mqtt_server)
    garbage = b"{not json"
    wrong_type = encode_gateway_state(a_state(gw)).replace(
        b'"outbox_depth":0', b'"outbox_depth":"x"'
    )
    negative = encode_gateway_state(a_state(gw, received=-5))
    foreign = encode_gateway_state(a_state("gw-other"))
    good = a_state(gw, outbox_depth=12)
    try:
        with ingest_in_thread(
            settings=ingest_settings(prefix),
            broker=broker_settings(mqtt_server),
            database=db(db_url, migrated),
        ) as worker:
            for payload in (garbage, garbage, wrong_type, negative, foreign):
                publish_state(pub, prefix, payload, gw)
            publish_state(pub, prefix, encode_gateway_state(good), gw)
            wait_for(lambda: worker.counters.states == 1, 10, "the good state after the bad")
            wait_for(lambda: worker.counters.states_rejected == 4, 10, "four rejects")
            assert dict(worker.counters.rejects) == {
                "malformed": 1,  # the same garbage twice: one reject
                "wrong_type": 1,
                "out_of_range": 1,
                "gateway_mismatch": 1,
            }
            assert latest_state(db_conn, migrated, gw)["outbox_depth"] == 12
        found = {
            r[0]: r
            for r in db_conn.execute(
                f"SELECT reason, gateway_id, batch_id, detail, raw FROM {migrated}.rejects"
            )
        }
        assert set(found) == {"malformed", "wrong_type", "out_of_range", "gateway_mismatch"}
        assert all(r[1] == gw and r[2] is None for r in found.values())
        assert bytes(found["malformed"][4]) == garbage
        assert bytes(found["out_of_range"][4]) == negative
        assert "received -5" in found["out_of_range"][3]
        assert "gw-other" in found["gateway_mismatch"][3]
        assert [r[1] for r in history(db_conn, migrated, gw)] == ["online"]
        assert latest_state(db_conn, migrated, "gw-other") is None
    finally:
        pub.disconnect()
