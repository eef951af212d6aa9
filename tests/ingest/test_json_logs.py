"""JSON logs of a real ``python -m ingest`` process receiving malformed and foreign batches.

Every line the process writes must parse as one JSON object naming the
service; the reject lines carry the sending gateway, the batch and the
device as fields of their own (``log_format = "json"``).
"""

from __future__ import annotations

import json
import signal
import uuid
from pathlib import Path

import pytest

from contracts.messages import encode_batch
from contracts.topics import batch_topic
from tests.plugins.gateway import client, wait_for
from tests.plugins.ingest import (
    ingest_settings,
    make_batch,
    seed_registry,
    start_ingest_process,
    write_config,
)

pytestmark = pytest.mark.slow


def test_rejects_are_json_lines_with_their_ids(mqtt_server, db_conn, db_url, migrated, tmp_path):
    t = uuid.uuid4().hex[:6]
    gw, prefix = f"gw-{t}", f"t{t}"
    seed_registry(db_conn, migrated, {gw: [(f"{gw}-kiosk", "kiosk")]})
    config = write_config(
        tmp_path / "ingest.toml",
        server=mqtt_server,
        db_url=db_url,
        schema=migrated,
        settings=ingest_settings(prefix),
    )
    config.write_text('log_format = "json"\n' + config.read_text(encoding="utf-8"))
    log = tmp_path / "ingest.log"
    proc = start_ingest_process(config, log)
    pub = client(mqtt_server)
    stranger = f"{gw}-stranger"  # a device this gateway does not own
    try:
        wait_for(lambda: "subscribed to" in log.read_text(encoding="utf-8"), 30, "subscribed")
        pub.publish(batch_topic(gw, prefix), b"\x92 not msgpack", qos=1).wait_for_publish(10)
        foreign = make_batch(gw, 1, [(stranger, "kiosk")], rows_per_device=1)
        pub.publish(batch_topic(gw, prefix), encode_batch(foreign), qos=1).wait_for_publish(10)
        wait_for(
            lambda: log.read_text(encoding="utf-8").count("rejected (") >= 2, 30, "two rejects"
        )
    finally:
        pub.disconnect()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    lines = parse(log)
    assert all(line["service"] == "ingest" for line in lines)
    rejects = [line for line in lines if str(line["message"]).startswith("rejected (")]
    poison = [line for line in rejects if "device_id" not in line]
    rows = [line for line in rejects if "device_id" in line]
    assert len(poison) == 1
    assert poison[0]["gateway_id"] == gw
    assert "batch_id" not in poison[0]  # unreadable payload: no batch id to name
    assert len(rows) == 1
    assert rows[0]["gateway_id"] == gw
    assert rows[0]["batch_id"] == foreign.batch_id
    assert rows[0]["device_id"] == stranger
    assert rows[0]["level"] == "WARNING"


def parse(log: Path) -> list[dict[str, object]]:
    """Every line as JSON: a line that is not (a stray print, a traceback) fails the test."""
    return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
