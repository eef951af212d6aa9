"""A device type defined only in an operator's file reaches its table with nothing restarted.

The operator's part runs as the `cityhub` command in child processes (so this
process, where the gateway runs, keeps the shipped catalog and must learn the
type from its config): ``catalog check``, ``db migrate`` and ``devices add``
with ``catalog.paths`` naming the file that docs/devices.md shows. Ingest runs
as a process started before the type existed, on a database that already
holds readings; the device publishes the doc's `mosquitto_pub` example.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from contracts.catalog import DEVICE_TYPES, SHIPPED_CATALOG, use_catalog
from contracts.schema import readings_table
from devices.bundle import decode_bundle
from tests.plugins.gateway import gateway_in_thread, gateway_settings, wait_for
from tests.plugins.ingest import ingest_subscribed
from tests.system.test_vendor_device import DOC, _broker, doc_blocks, run_example

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("mosquitto_pub") is None or shutil.which("jq") is None,
        reason="the doc's examples need mosquitto_pub (mosquitto-clients) and jq on PATH",
    ),
]

SITE = "hk-hall-quan"
_TOML_BLOCK = re.compile(r"^```toml\n# rain-gauge\.toml\n(.*?)^```", re.MULTILINE | re.DOTALL)


@pytest.fixture
def restore_catalog():
    """The gateway runs in this process and installs what it learns: undo it after."""
    yield
    use_catalog(SHIPPED_CATALOG)


def cityhub(*args: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "cityhub", *args],
        env={**os.environ, "COLUMNS": "250", **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"cityhub {' '.join(args)}: {done.stdout}{done.stderr}"
    return done.stdout


def test_a_new_type_from_a_file_is_stored_without_a_restart(
    mqtt_server, db_conn, db_url, seeded, topic_prefix, tmp_path, restore_catalog
):
    tag = uuid.uuid4().hex[:6]
    gateway_id, kiosk_id, gauge_id = f"gw-{tag}", f"kiosk-{tag}", f"rain-{tag}"
    bundles = tmp_path / "bundles"
    env = {
        "CITYHUB_DATABASE__URL": db_url,
        "CITYHUB_DATABASE__SCHEMA": seeded,
        "CITYHUB_BROKER__HOST": "127.0.0.1",
        "CITYHUB_BROKER__PORT": str(mqtt_server.port),
        "CITYHUB_BROKER__USERNAME": "cityhub-admin",
        "CITYHUB_BROKER__PASSWORD": mqtt_server.admin_password,
        "CITYHUB_PROVISIONING__SITE_BROKER__HOST": "127.0.0.1",
        "CITYHUB_PROVISIONING__SITE_BROKER__PORT": str(mqtt_server.port),
        "CITYHUB_PROVISIONING__SITE_BROKER__USERNAME": "cityhub-admin",
        "CITYHUB_PROVISIONING__SITE_BROKER__PASSWORD": mqtt_server.admin_password,
        "CITYHUB_PROVISIONING__TOPIC_PREFIX": topic_prefix,
        "CITYHUB_PROVISIONING__BUNDLE_DIR": str(bundles),
        "CITYHUB_LOCAL__STATE_DIR": str(tmp_path / "state"),
        "CITYHUB_OPERATOR": "Trần Văn Minh",
    }
    blocks = doc_blocks()
    cityhub("gateways", "add", gateway_id, "--site", SITE, env=env)
    cityhub(
        "devices", "add", kiosk_id, "--type", "kiosk", "--site", SITE, "--gateway", gateway_id,
        env=env,
    )  # fmt: skip
    gw = decode_bundle((bundles / f"gateway-{gateway_id}.json").read_bytes())
    log = tmp_path / "ingest.log"
    with ingest_subscribed(
        tmp_path, server=mqtt_server, db_url=db_url, schema=seeded, prefix=topic_prefix
    ) as ingest:
        with gateway_in_thread(
            settings=gateway_settings(gateway_id, topic_prefix, site_id=SITE),
            central=_broker(gw.central),
            site=_broker(gw.site),
            outbox=tmp_path / "outbox.sqlite3",
        ) as gateway:
            boot_id = gateway.boot_id
            # The database already holds data: a kiosk reading, stored.
            wait_for(lambda: kiosk_id in gateway.served_devices(), 15, "the kiosk served")
            run_example(blocks, "kiosk", bundles / f"device-{kiosk_id}.json")
            kiosk_table = f"{seeded}.{readings_table('kiosk')}"
            wait_for(
                lambda: db_conn.execute(f"SELECT count(*) FROM {kiosk_table}").fetchone()[0] == 1,
                30,
                "the kiosk reading stored",
            )

            # The operator's file, as docs/devices.md shows it.
            match = _TOML_BLOCK.search(DOC.read_text("utf-8"))
            assert match is not None, "docs/devices.md shows rain-gauge.toml"
            catalog_file = tmp_path / "rain-gauge.toml"
            catalog_file.write_text(match.group(1), encoding="utf-8")
            assert "rain_gauge" not in SHIPPED_CATALOG.types
            assert "new type rain_gauge" in cityhub("catalog", "check", str(catalog_file), env=env)
            with_file = {**env, "CITYHUB_CATALOG__PATHS": str(catalog_file)}
            cityhub("db", "migrate", env=with_file)
            cityhub(
                "devices", "add", gauge_id, "--type", "rain_gauge", "--site", SITE,
                "--gateway", gateway_id, env=with_file,
            )  # fmt: skip

            # The gateway learns the type from its config, not from this process.
            wait_for(lambda: gauge_id in gateway.served_devices(), 15, "the rain gauge served")
            assert DEVICE_TYPES["rain_gauge"].metric_names == ("rain_mm", "battery_pct")
            run_example(blocks, "rain_gauge", bundles / f"device-{gauge_id}.json")
            gauge_table = f"{seeded}.{readings_table('rain_gauge')}"
            wait_for(
                lambda: db_conn.execute(f"SELECT count(*) FROM {gauge_table}").fetchone()[0] == 1,
                30,
                "the rain gauge reading stored",
            )
            row = db_conn.execute(
                f"SELECT device_id, seq, rain_mm, battery_pct FROM {gauge_table}"
            ).fetchone()
            assert row == (gauge_id, 1, 4.2, 87)
            assert gateway.counters.rejects.total() == 0

            _a_metric_added_to_a_served_type_is_stored(
                env=env,
                catalog_file=catalog_file,
                gateway_id=gateway_id,
                kiosk_bundle=bundles / f"device-{kiosk_id}.json",
                blocks=blocks,
                query=lambda sql: db_conn.execute(sql).fetchall(),
                kiosk_table=kiosk_table,
            )
            assert gateway.boot_id == boot_id
            assert gateway.counters.rejects.total() == 0
        assert ingest.poll() is None, "ingest kept running"
        assert "device types learnt from the database: rain_gauge" in log.read_text()
        rejects = db_conn.execute(
            f"SELECT count(*) FROM {seeded}.rejects WHERE device_id = %s OR gateway_id = %s",
            (gauge_id, gateway_id),
        ).fetchone()[0]
        assert rejects == 0


def _a_metric_added_to_a_served_type_is_stored(
    *,
    env: dict[str, str],
    catalog_file: Path,
    gateway_id: str,
    kiosk_bundle: Path,
    blocks: dict[str, str],
    query: Callable[[str], list[tuple[object, ...]]],
    kiosk_table: str,
) -> None:
    """A metric added to a type the gateway already serves: migrate says gateways hold
    the old entry, `gateways publish-configs` gives them the new one, and ingest learns
    it from the database.
    """
    catalog_dir = catalog_file.parent / "catalog.d"
    catalog_dir.mkdir()
    shutil.copy(catalog_file, catalog_dir / catalog_file.name)
    door_file = catalog_dir / "kiosk-door.toml"
    door_file.write_text(
        '[types.kiosk]\nmetrics = [{ name = "door_open", unit = "", kind = "bool",'
        ' description = "Service door open" }]\n',
        encoding="utf-8",
    )
    with_both = {**env, "CITYHUB_CATALOG__PATHS": str(catalog_dir)}
    migrated = cityhub("db", "migrate", env=with_both)
    assert "device types new or changed: kiosk;" in migrated
    assert "gateways publish-configs" in migrated
    assert "door_open" not in DEVICE_TYPES["kiosk"].metric_names
    published = cityhub("gateways", "publish-configs", gateway_id, env=with_both)
    assert f"gateway {gateway_id}: config version" in published
    wait_for(
        lambda: "door_open" in DEVICE_TYPES["kiosk"].metric_names,
        15,
        "the gateway learnt kiosk's new metric",
    )
    with_door = {
        **blocks,
        "kiosk": blocks["kiosk"]
        .replace('"seq":1', '"seq":2')
        .replace('"uptime":86400', '"uptime":86410,"door_open":1'),
    }
    run_example(with_door, "kiosk", kiosk_bundle)
    wait_for(
        lambda: query(f"SELECT door_open FROM {kiosk_table} WHERE seq = 2") == [(True,)],
        30,
        "the kiosk reading with its new metric stored",
    )
