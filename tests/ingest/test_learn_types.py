"""A running ingest worker learns a device type that `db migrate` recorded after it started."""

from __future__ import annotations

import uuid

import pytest

from cityhub import database
from contracts.catalog import DEVICE_TYPES, SHIPPED_CATALOG, load_catalog, use_catalog
from contracts.ids import batch_id
from contracts.messages import Batch, ReadingBlock
from contracts.settings import DatabaseSettings, StorageSettings
from tests.contracts.test_received_types import WATER_LEVEL_TOML
from tests.plugins.gateway import broker_settings, now_ms, wait_for
from tests.plugins.ingest import GatewayPlayer, ingest_in_thread, ingest_settings, seed_registry

pytestmark = pytest.mark.slow


@pytest.fixture
def restore_catalog():
    """The worker runs in this process and installs what it learns: undo it after."""
    yield
    use_catalog(SHIPPED_CATALOG)


def one_reading(gateway_id: str, counter: int, device_id: str, device_type: str, values) -> Batch:
    ts = now_ms() - 60_000 + counter
    return Batch(
        batch_id=batch_id(gateway_id, "boot1", counter),
        gateway_id=gateway_id,
        boot_id="boot1",
        sent_ms=now_ms(),
        devices=[device_id],
        blocks=[
            ReadingBlock(
                device_type=device_type,
                device_index=[0],
                seq=[counter],
                ts_ms=[ts],
                recv_ms=[ts + 5],
                values={name: [value] for name, value in values.items()},
            )
        ],
    )


def test_a_type_migrated_after_start_is_learnt_and_an_undefined_one_stays_a_reject(
    mqtt_server, db_conn, db_url, migrated, restore_catalog
):
    tag = uuid.uuid4().hex[:6]
    gw, gauge, rogue = f"gw-{tag}", f"wl-{tag}", f"rogue-{tag}"
    player = GatewayPlayer(mqtt_server, gateway_id=gw, prefix=f"t{tag}")
    try:
        with ingest_in_thread(
            settings=ingest_settings(f"t{tag}"),
            broker=broker_settings(mqtt_server),
            database=DatabaseSettings(url=db_url, schema=migrated),
        ) as worker:
            reads = []
            read_type_entries = worker.writer.read_type_entries

            def counted():
                reads.append(1)
                return read_type_entries()

            worker.writer.read_type_entries = counted  # type: ignore[method-assign]
            # `cityhub db migrate` with an operator's file, in another process:
            # the catalog is passed, not installed here.
            extended = load_catalog([("water.toml", WATER_LEVEL_TOML)])
            database.migrate(
                db_conn, schema=migrated, storage=StorageSettings(), catalog=extended.types
            )
            seed_registry(db_conn, migrated, {gw: [(gauge, "river_gauge"), (rogue, "kiosk")]})
            assert "river_gauge" not in DEVICE_TYPES

            first = one_reading(gw, 1, gauge, "river_gauge", {"level_cm": 31.5, "battery_pct": 90})
            player.send(first)
            wait_for(lambda: first.batch_id in player.acked, 20, "the water level batch acked")
            assert DEVICE_TYPES["river_gauge"] == extended.types["river_gauge"]
            stored = db_conn.execute(
                f"SELECT device_id, level_cm, battery_pct FROM {migrated}.readings_river_gauge"
            ).fetchall()
            assert stored == [(gauge, 31.5, 90)]

            # A type nobody defined: still a reject, and no second read within
            # TYPES_RELOAD_S however many such batches come.
            undefined = [one_reading(gw, n, rogue, "hail_sensor", {"hail_mm": 3.0}) for n in (2, 3)]
            for batch in undefined:
                player.send(batch)
            wait_for(
                lambda: {b.batch_id for b in undefined} <= player.acked, 20, "the rejects acked"
            )
            assert worker.counters.rejects["unknown_device_type"] == 2
            assert len(reads) == 1
    finally:
        player.close()
    reasons = db_conn.execute(
        f"SELECT reason FROM {migrated}.rejects WHERE gateway_id = %s", (gw,)
    ).fetchall()
    assert reasons == [("unknown_device_type",), ("unknown_device_type",)]
