"""`cityhub soak`: the fault schedule (pure) and a short soak of the whole system."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest

from cityhub.cli.soak import classify
from cityhub.localstack.procs import free_port
from cityhub.soak.schedule import (
    FAULT_KINDS,
    LINK_FAULTS,
    make_schedule,
    parse_schedule,
    schedule_toml,
)
from contracts.errors import SettingsError
from contracts.messages import Transport
from firmware_sim.ledger import Ledger, LedgerEntry, StoredRow, reconcile
from tests.plugins.servers import kill_everything_under, processes_under

GATEWAYS = ["gw-a", "gw-b", "gw-c", "gw-d"]


@pytest.mark.parametrize("seed", range(8))
def test_a_three_minute_schedule_has_every_fault_kind_and_no_broker_fault_during_a_cut(seed):
    schedule = make_schedule(seed=seed, duration_s=180, gateways=GATEWAYS, workers=2)
    assert {f.kind for f in schedule.fault} == set(FAULT_KINDS)
    cuts = [f for f in schedule.fault if f.kind in LINK_FAULTS]
    assert len({f.target for f in cuts}) == len(cuts)  # never the same gateway twice at once
    long = make_schedule(seed=seed, duration_s=1800, gateways=GATEWAYS, workers=2)
    small = {f.target for f in long.fault if f.kind == "outbox_full"}
    assert len(small) == 1  # one gateway has the small outbox ...
    assert not small & {f.target for f in long.fault if f.kind == "cut_uplink"}  # ... alone
    for fault in schedule.fault:
        assert fault.end_s <= schedule.duration_s
        if fault.kind in {"kill_broker", "hang_broker"}:
            assert all(not (c.at_s <= fault.at_s < c.end_s + 15) for c in cuts)


def test_an_oversized_schedule_is_refused_and_a_repeated_fault_is_kept():
    fault = {"at_s": 1, "kind": "kill_db", "duration_s": 1}
    with pytest.raises(SettingsError, match="at most 10000"):
        parse_schedule({"duration_s": 60, "fault": [fault] * 10_001}, gateways=GATEWAYS, workers=2)
    twice = parse_schedule(
        {"duration_s": 60, "fault": [fault, fault]}, gateways=GATEWAYS, workers=2
    )
    assert len(twice.fault) == 2


def test_a_schedule_is_reproducible_and_round_trips_through_toml():
    first = make_schedule(seed=3, duration_s=600, gateways=GATEWAYS, workers=2)
    assert first == make_schedule(seed=3, duration_s=600, gateways=GATEWAYS, workers=2)
    assert first != make_schedule(seed=4, duration_s=600, gateways=GATEWAYS, workers=2)
    document = tomllib.loads(schedule_toml(first))
    assert parse_schedule(document, gateways=GATEWAYS, workers=2) == first


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ({"at_s": 1, "kind": "kill_gateway", "target": "gw-x"}, "not one of"),
        ({"at_s": 1, "kind": "hang_ingest_worker", "target": "2"}, "worker index below 2"),
        ({"at_s": 1, "kind": "hang_ingest_worker", "target": "-1"}, "worker index below 2"),
        ({"at_s": 50, "kind": "kill_db", "duration_s": 20}, "within 0..duration_s"),
        ({"at_s": -1, "kind": "kill_db"}, "within 0..duration_s"),
        ({"at_s": 1, "kind": "reboot_city"}, "Invalid enum value"),
        ({"at_s": 1, "kind": "kill_db", "when": "now"}, "unknown field"),
        ({"at_s": "soon", "kind": "kill_db"}, "Expected `float`"),
    ],
)
def test_a_bad_schedule_file_names_the_fault_and_the_problem(fault, message):
    with pytest.raises(SettingsError, match=message):
        parse_schedule({"duration_s": 60, "fault": [fault]}, gateways=GATEWAYS, workers=2)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.usefixtures("pg_bindir", "mosquitto_bin")  # skipped without the servers
def test_a_short_soak_applies_every_fault_and_loses_nothing():
    state_dir = Path(tempfile.mkdtemp(prefix="cityhub-soak-"))
    state_dir.chmod(0o755)
    env = {
        **os.environ,
        "CITYHUB_LOCAL__STATE_DIR": str(state_dir),
        "CITYHUB_LOCAL__PG_PORT": str(free_port()),
        "CITYHUB_LOCAL__MQTT_PORT": str(free_port()),
        "COLUMNS": "200",
    }
    # Broker kills come only once the gateways are online and caught up; a
    # reading lost in the broker's save window fails the run like any other.
    argv = [sys.executable, "-m", "cityhub", "soak", "--for", "3m", "--seed", "1"]
    argv += ["--drain-timeout", "3m"]
    try:
        result = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=840, check=False
        )
        out = result.stdout + result.stderr
        report = json.loads((state_dir / "soak" / "report.json").read_text())
        done = {e["kind"] for e in report["timeline"] if "FAILED" not in e["note"]}
        assert done == set(FAULT_KINDS), out[-4000:]
        assert report["drained"], out[-4000:]
        assert report["duplicates"] == 0, out[-4000:]
        assert report["acknowledged"] > 1000, out[-4000:]
        assert not report["serial_lost"], out[-4000:]
        assert report["broker_crash_window"] == [], out[-4000:]
        assert report["lost"] == [], out[-4000:]
        assert result.returncode == 0, out[-4000:]
        assert processes_under(state_dir) == []
    finally:
        kill_everything_under(state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)


def _entry(device_id: str, transport: Transport, seq: int, acked_ms: int) -> LedgerEntry:
    return LedgerEntry(
        device_id=device_id, transport=transport, seq=seq, ts_ms=seq, acked_ms=acked_ms
    )


def test_losses_in_a_crash_window_are_counted_apart_and_the_rest_stay_losses():
    mqtt = [_entry("kiosk-a", "mqtt", i, 10_000 + 1000 * i) for i in range(10)]
    serial = [_entry("aq-a", "serial", i, 10_000 + 1000 * i) for i in range(10)]
    ledger = Ledger(entries=[*mqtt, *serial])
    # kiosk-a: seq 2 and 3 missing; aq-a: three serial readings missing.
    stored = [StoredRow("kiosk-a", i, i) for i in range(10) if i not in {2, 3}]
    stored += [StoredRow("aq-a", 100 + i, 1) for i in range(7)]
    result = reconcile(ledger.entries, stored, [])
    outcome = classify(
        result,
        drained=True,
        broker_kills_ms=[12_500],  # acked at 12,000 is within 1 s before; 13,000 is after
        window_ms=1000,
        gateway_down_ms={"gw-a": [(14_000, 15_000)]},  # two serial readings in the window
        gateway_of={"aq-a": "gw-a", "kiosk-a": "gw-a"},
        ledger=ledger,
    )
    assert [e.seq for e in outcome.broker_window] == [2]
    assert [e.seq for e in outcome.lost] == [3]
    assert dict(outcome.serial_in_crash) == {"aq-a": 2}
    assert dict(outcome.serial_lost) == {"aq-a": 1}
