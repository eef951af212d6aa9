"""A vendor's device built from docs/devices.md alone, against the real system.

The test plays a vendor: it takes the shell blocks of docs/devices.md (the
setup that reads a device bundle with jq, and the `mosquitto_pub` example of
each device type) and runs them as they are, with only the bundle's file
name filled in; no payload is built by project code. The devices are
provisioned on the session broker (accounts of their own, bound client ids),
a real gateway runs with its bundle's accounts, a real ingest process stores
into the private TimescaleDB. Every type's example must end up as a row with
every metric filled; the unknown-metric example must be stored with its known
metric and reported, and the seconds example rejected with the hint, as the
page says.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from contracts import catalog
from contracts.schema import readings_table
from contracts.settings import BrokerSettings
from devices.bundle import decode_bundle
from tests.plugins.gateway import gateway_in_thread, gateway_settings, wait_for
from tests.plugins.ingest import ingest_subscribed

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("mosquitto_pub") is None or shutil.which("jq") is None,
        reason="the doc's examples need mosquitto_pub (mosquitto-clients) and jq on PATH",
    ),
]

DOC = Path(__file__).resolve().parents[2] / "docs" / "devices.md"
SITE = "hk-hall-quan"
_SH_BLOCK = re.compile(r"^```sh\n(.*?)^```", re.MULTILINE | re.DOTALL)
_BUNDLE_LINE = re.compile(r"^BUNDLE=.*$", re.MULTILINE)


def doc_blocks() -> dict[str, str]:
    """The doc's shell blocks by their first line's comment (``# kiosk``, ``# setup``)."""
    blocks: dict[str, str] = {}
    for match in _SH_BLOCK.finditer(DOC.read_text("utf-8")):
        first, _, body = match.group(1).partition("\n")
        assert first.startswith("# "), f"a shell block without its title comment: {first!r}"
        blocks[first.removeprefix("# ")] = body
    return blocks


def run_example(blocks: dict[str, str], title: str, bundle: Path) -> None:
    """Run the setup block, pointed at ``bundle``, then the example titled ``title``."""
    setup = _BUNDLE_LINE.sub(f"BUNDLE={bundle.name}", blocks["setup"])
    assert "mosquitto_pub" in blocks[title]
    bash = shutil.which("bash")
    assert bash is not None
    done = subprocess.run(
        [bash, "-euo", "pipefail", "-c", setup + blocks[title]],
        cwd=bundle.parent,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, f"{title}: {done.stderr}"


def _broker(access) -> BrokerSettings:
    return BrokerSettings(
        host=access.host, port=access.port, username=access.username, password=access.password
    )


def rows(conn, schema: str, device_type: str, device_id: str) -> dict[int, dict[str, object]]:
    """The stored readings of a device: seq -> metric columns."""
    names = catalog.device_type(device_type).metric_names
    found = conn.execute(
        f"SELECT seq, {', '.join(names)} FROM {schema}.{readings_table(device_type)} "
        "WHERE device_id = %s",
        (device_id,),
    ).fetchall()
    return {int(row[0]): dict(zip(names, row[1:], strict=True)) for row in found}


def test_a_device_built_from_the_docs_is_stored(
    provisioner, mqtt_server, db_conn, db_url, seeded, topic_prefix, tmp_path, caplog
):
    caplog.set_level(logging.WARNING, logger="gateway")
    blocks = doc_blocks()
    types = sorted(catalog.DEVICE_TYPES)
    assert {t for t in types if t in blocks} == set(types), "an example per device type"

    tag = uuid.uuid4().hex[:6]
    gateway_id = f"gw-{tag}"
    gw = decode_bundle(provisioner.add_gateway(gateway_id, site_id=SITE).files.json.read_bytes())
    with ingest_subscribed(
        tmp_path, server=mqtt_server, db_url=db_url, schema=seeded, prefix=topic_prefix
    ):
        with gateway_in_thread(
            settings=gateway_settings(gateway_id, topic_prefix, site_id=SITE),
            central=_broker(gw.central),
            site=_broker(gw.site),
            outbox=tmp_path / "outbox.sqlite3",
        ) as gateway:
            bundles: dict[str, tuple[str, Path]] = {}
            for device_type in types:
                device_id = f"{device_type.replace('_', '-')[:12]}-{tag}"
                outcome = provisioner.add_device(
                    device_id,
                    device_type=device_type,
                    site_id=SITE,
                    gateway_id=gateway_id,
                    transport="mqtt",
                )
                bundles[device_type] = (device_id, outcome.files.json)
            wait_for(
                lambda: {d for d, _ in bundles.values()} <= gateway.served_devices(),
                15,
                "every new device served",
            )

            for device_type in types:
                run_example(blocks, device_type, bundles[device_type][1])
            kiosk_id, kiosk_bundle = bundles["kiosk"]
            run_example(blocks, "status", kiosk_bundle)
            unknown = next(t for t in blocks if t.startswith("kiosk, accepted"))
            seconds = next(t for t in blocks if t.startswith("kiosk, rejected"))
            run_example(blocks, unknown, kiosk_bundle)
            run_example(blocks, seconds, kiosk_bundle)

            device_rejects = gateway.counters.device_rejects
            wait_for(
                lambda: (
                    device_rejects[kiosk_id, "ts_window"] == 1
                    and device_rejects[kiosk_id, "unknown_metric"] == 1
                ),
                15,
                "the seconds and unknown-metric examples counted",
            )
            wait_for(
                lambda: (
                    gateway.counters.accepted == len(types) + 1
                    and gateway.outbox.depth().readings == 0
                    and gateway.builder.rows == 0
                ),
                30,
                "every accepted reading stored and acked",
            )
            assert gateway.tracker.devices[kiosk_id].online
            # The gateway logs what its router queued after counting it: wait for the line.
            wait_for(
                lambda: any(
                    "ts_window" in r.getMessage() and "looks like seconds" in r.getMessage()
                    for r in caplog.records
                ),
                15,
                "the seconds example logged with its hint",
            )
        assert set(gateway.counters.rejects) == {"ts_window", "unknown_metric"}

        for device_type, (device_id, _bundle) in bundles.items():
            stored = rows(db_conn, seeded, device_type, device_id)
            extra = {2} if device_type == "kiosk" else set()
            assert set(stored) == {1} | extra, device_type  # the seconds reading (seq 3) is not
            assert None not in stored[1].values(), f"{device_type}: {stored[1]}"
        kiosk_rows = rows(db_conn, seeded, "kiosk", kiosk_id)
        assert kiosk_rows[2]["queue_length"] == 7
        assert [k for k, v in kiosk_rows[2].items() if v is not None] == ["queue_length"]


def test_a_device_built_from_the_docs_answers_a_command(
    provisioner, mqtt_server, db_conn, db_url, seeded, topic_prefix, tmp_path
):
    """The doc's command block (mosquitto_sub for one request, mosquitto_pub for its answer)
    takes a command an operator queued, through ingest's dispatcher and a real gateway."""
    from devices.commands import CommandRegistry

    blocks = doc_blocks()
    tag = uuid.uuid4().hex[:6]
    gateway_id, device_id = f"gw-{tag}", f"kiosk-{tag}"
    gw = decode_bundle(provisioner.add_gateway(gateway_id, site_id=SITE).files.json.read_bytes())
    bundle = provisioner.add_device(
        device_id, device_type="kiosk", site_id=SITE, gateway_id=gateway_id, transport="mqtt"
    ).files.json
    with (
        ingest_subscribed(
            tmp_path, server=mqtt_server, db_url=db_url, schema=seeded, prefix=topic_prefix
        ),
        gateway_in_thread(
            settings=gateway_settings(gateway_id, topic_prefix, site_id=SITE),
            central=_broker(gw.central),
            site=_broker(gw.site),
            outbox=tmp_path / "outbox.sqlite3",
        ) as gateway,
    ):
        wait_for(lambda: device_id in gateway.served_devices(), 15, "the device served")
        run_example(blocks, "status", bundle)  # online: the gateway may send it commands
        wait_for(lambda: gateway.tracker.devices[device_id].online, 15, "the device online")
        setup = _BUNDLE_LINE.sub(f"BUNDLE={bundle.name}", blocks["setup"])
        bash = shutil.which("bash")
        assert bash is not None
        device = subprocess.Popen(
            [bash, "-euo", "pipefail", "-c", setup + blocks["command"]],
            cwd=bundle.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            time.sleep(1.5)  # mosquitto_sub connected and subscribed (a clean session)
            registry = CommandRegistry(db_conn, schema=seeded)
            command = registry.ask(device_id, "print_test_page", [], ttl_s=120, operator="docs")
            _out, err = device.communicate(timeout=60)
        finally:
            if device.poll() is None:
                device.kill()
        assert device.returncode == 0, err

        def final() -> tuple[str, str] | None:
            row = db_conn.execute(
                f"SELECT state, detail FROM {seeded}.commands WHERE command_id = %s",
                (command.command_id,),
            ).fetchone()
            return (row[0], row[1]) if row is not None and row[0] == "succeeded" else None

        wait_for(lambda: final() is not None, 20, "the answer stored centrally")
    assert final() == ("succeeded", "carried out by hand")
