"""The gateway's /metrics text: names, labels and values read from its counters and gauges."""

from __future__ import annotations

import socket
import urllib.request

from gateway.counters import GatewayCounters
from gateway.metrics import serve_metrics

GAUGES = {
    "outbox_readings": 7,
    "outbox_batches": 2,
    "outbox_bytes": 900,
    "devices_online": 3,
    "uplink_connected": 1,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_counters_rejects_and_gauges_are_served_under_their_names():
    counters = GatewayCounters()
    counters.received = 12
    counters.rejects["too_large"] += 2
    counters.rejects["bad_payload"] += 1
    counters.device_rejects["aq-1", "bad_payload"] += 1
    port = _free_port()
    server = serve_metrics(port, gateway_id="gw-a", counters=counters, gauges=lambda: GAUGES)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            samples = {
                line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in reply.read().decode().splitlines()
                if line.startswith("cityhub_gateway_")
            }
    finally:
        server.close()
    assert samples['cityhub_gateway_received_total{gateway="gw-a"}'] == 12
    assert samples['cityhub_gateway_rejects_total{gateway="gw-a",reason="too_large"}'] == 2
    assert samples['cityhub_gateway_rejects_total{gateway="gw-a",reason="bad_payload"}'] == 1
    key = 'cityhub_gateway_device_rejects_total{device="aq-1",gateway="gw-a",reason="bad_payload"}'
    assert samples[key] == 1
    for name, value in GAUGES.items():
        assert samples[f'cityhub_gateway_{name}{{gateway="gw-a"}}'] == value
