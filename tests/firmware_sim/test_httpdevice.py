"""Simulated HTTP devices: how answers settle readings, and the devices against a real gateway."""

from __future__ import annotations

import contextlib
import uuid

import pytest

from cityhub.localstack.procs import free_port
from contracts.httpapi import HTTP_BODY_MAX_BYTES, HTTP_MAX_READINGS, HttpAnswer
from firmware_sim.fleet import DeviceCounts, FleetDescription, SiteInfo, build_fleet
from firmware_sim.httpdevice import Settlement, pack, settle
from firmware_sim.service import Simulator
from tests.plugins.gateway import (
    FakeIngest,
    broker_settings,
    client,
    gateway_in_thread,
    gateway_settings,
    publish_config,
    service_in_thread,
    wait_for,
)


@pytest.mark.parametrize(
    ("status", "answer", "sent", "retry_after", "expected"),
    [
        (200, HttpAnswer(accepted=3), 3, None, Settlement(acknowledged=(0, 1, 2))),
        (201, None, 1, None, Settlement(acknowledged=(0,))),
        # One refused reading alone; beside others, the others are stored.
        (400, HttpAnswer(error="ts_window"), 1, None, Settlement(refused=(0,))),
        (
            400,
            HttpAnswer(accepted=2, error="out_of_range", rejected=((1, "out_of_range"),)),
            3,
            None,
            Settlement(acknowledged=(0, 2), refused=(1,)),
        ),
        # The rate limit: the first taken are settled, the rest wait Retry-After.
        (
            429,
            HttpAnswer(accepted=2, error="rate_limited"),
            5,
            "3",
            Settlement(acknowledged=(0, 1), retry_after_s=3.0),
        ),
        (429, HttpAnswer(error="rate_limited"), 5, "1", Settlement(retry_after_s=1.0)),
        (503, HttpAnswer(error="outbox_full"), 2, "10", Settlement(retry_after_s=10.0)),
        # Not yet configured at the gateway, or a proxy's page: try again later.
        (401, HttpAnswer(error="unauthorized"), 2, None, Settlement()),
        (502, None, 2, None, Settlement()),
        # A lone reading that can never pass.
        (413, None, 1, None, Settlement(refused=(0,))),
        (413, None, 4, None, Settlement()),
    ],
)
def test_an_answer_settles_the_head_of_the_request(status, answer, sent, retry_after, expected):
    assert settle(status, answer, sent, retry_after) == expected


def test_pack_fills_a_body_within_both_limits():
    small = [b"x" * 60] * 50
    assert pack(small) == HTTP_MAX_READINGS
    large = [b"x" * 1000] * 10
    count = pack(large)
    assert len(b"[" + b",".join(large[:count]) + b"]") <= HTTP_BODY_MAX_BYTES
    assert pack(large[: count + 1]) == count
    assert pack([b"x" * 9000]) == 1  # alone, the gateway answers 413


def hall_fleet(tag: str):
    description = FleetDescription(
        seed=11,
        site=[SiteInfo(id=f"{tag}-hall", kind="service_hall", opening_hours="24/7")],
        devices={"service_hall": DeviceCounts(satisfaction_terminal=3)},
    )
    specs = build_fleet(description, [])
    assert sorted(s.transport for s in specs) == ["http", "http", "mqtt"]
    return specs


@pytest.mark.slow
@pytest.mark.parametrize("gateway_late", [False, True], ids=["gateway-up", "gateway-late"])
def test_http_devices_deliver_exactly_what_was_acknowledged(mqtt_server, tmp_path, gateway_late):
    """Every reading acknowledged to an HTTP device arrives; with the gateway down at
    first, the devices keep their backlog and send it (arrays, Retry-After) once it is up."""
    tag = f"s{uuid.uuid4().hex[:5]}"
    gateway_id = f"gw-{tag}"
    specs = hall_fleet(tag)
    port = free_port()
    sim = Simulator(
        devices=specs,
        site_broker=broker_settings(mqtt_server),
        topic_prefix=tag,
        seed=11,
        record=True,
        http_endpoints={f"{tag}-hall": f"http://127.0.0.1:{port}"},
    )
    http_ids = {s.device_id for s in specs if s.transport == "http"}
    pub = client(mqtt_server)
    devices = [s.device_config() for s in specs]
    publish_config(pub, gateway_id=gateway_id, prefix=tag, devices=devices, version=1)
    ingest = FakeIngest(mqtt_server, gateway_id=gateway_id, prefix=tag)
    ingest.acking = True
    broker = broker_settings(mqtt_server)
    # A small burst: the backlog meets the rate limit and its Retry-After.
    settings = gateway_settings(gateway_id, tag, http_port=port, device_burst=2.0)
    with contextlib.ExitStack() as stack:
        if gateway_late:
            stack.enter_context(service_in_thread(sim.run, name="sim"))
            wait_for(lambda: len(sim.injectors) == len(specs), 10, "devices running")
            wait_for(
                lambda: all(sim.injectors[d].counters.sent >= 4 for d in http_ids),
                15,
                "a backlog of 4 readings each",
            )
        gw = stack.enter_context(
            gateway_in_thread(
                settings=settings, central=broker, site=broker, outbox=tmp_path / "o.sqlite3"
            )
        )
        if not gateway_late:
            wait_for(lambda: len(gw.devices) == len(specs), 10, "config applied")
            stack.enter_context(service_in_thread(sim.run, name="sim"))
        assert sim.ledger is not None
        ledger = sim.ledger

        def http_acked() -> set[tuple[str, int, int]]:
            return {e.key for e in ledger.acknowledged() if e.device_id in http_ids}

        wait_for(lambda: len(http_acked()) >= 12, 30, "readings acknowledged over HTTP")
        if gateway_late:
            assert gw.counters.rate_limited > 0
    assert sim.ledger is not None
    acked = http_acked()
    wait_for(lambda: acked <= ingest.readings, 20, "every acknowledged reading at the hub")
    # Nothing arrives that the devices did not send (unacknowledged ones may arrive).
    sent = {e.key for e in sim.ledger.entries if e.device_id in http_ids}
    assert {r for r in ingest.readings if r[0] in http_ids} <= sent
    assert sim.stats.posted["satisfaction_terminal"] == len(acked)
    pub.disconnect()
    ingest.close()


@pytest.mark.slow
def test_without_an_endpoint_http_devices_sit_out_and_the_rest_runs(mqtt_server, caplog):
    tag = f"s{uuid.uuid4().hex[:5]}"
    specs = hall_fleet(tag)
    sim = Simulator(
        devices=specs, site_broker=broker_settings(mqtt_server), topic_prefix=tag, seed=11
    )
    with service_in_thread(sim.run, name="sim"):
        wait_for(lambda: sim.stats.total() >= 2, 10, "the MQTT terminal's readings")
    assert set(sim.injectors) == {s.device_id for s in specs if s.transport == "mqtt"}
    assert sum(sim.stats.posted.values()) == 0
    assert "no HTTP endpoint for site" in caplog.text
