"""The gateway's /metrics text: names, labels and values read from its counters and gauges.

And where it listens: ``gateway.metrics_host``, loopback unless set.
"""

from __future__ import annotations

import errno
import socket
import urllib.error
import urllib.request

import pytest

from contracts.errors import SettingsError
from gateway.counters import GatewayCounters
from gateway.metrics import serve_metrics

GAUGES = {
    "outbox_readings": 7,
    "outbox_batches": 2,
    "outbox_bytes": 900,
    "devices_online": 3,
    "uplink_connected": 1,
    "command_reports_pending": 4,
    "commands_held": 2,
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
    counters.modbus_polls["noise-1", "ok"] += 5
    counters.modbus_polls["noise-1", "garbled"] += 2
    counters.modbus_reconnects = 3
    port = _free_port()
    server = serve_metrics(
        "127.0.0.1", port, gateway_id="gw-a", counters=counters, gauges=lambda: GAUGES
    )
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
    key = 'cityhub_gateway_modbus_polls_total{device="noise-1",gateway="gw-a",outcome="garbled"}'
    assert samples[key] == 2
    key = 'cityhub_gateway_modbus_polls_total{device="noise-1",gateway="gw-a",outcome="ok"}'
    assert samples[key] == 5
    assert samples['cityhub_gateway_modbus_reconnects_total{gateway="gw-a"}'] == 3
    for name, value in GAUGES.items():
        assert samples[f'cityhub_gateway_{name}{{gateway="gw-a"}}'] == value


def scrape(host: str, port: int) -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


def test_bound_to_another_address_it_answers_there_and_not_on_loopback(other_address):
    counters = GatewayCounters()
    counters.received = 5
    port = _free_port()
    server = serve_metrics(
        other_address, port, gateway_id="gw-b", counters=counters, gauges=lambda: GAUGES
    )
    try:
        assert 'cityhub_gateway_received_total{gateway="gw-b"} 5.0' in scrape(other_address, port)
        with pytest.raises(urllib.error.URLError) as refused:
            scrape("127.0.0.1", port)
    finally:
        server.close()
    assert isinstance(refused.value.reason, ConnectionRefusedError)


def test_an_address_not_of_this_machine_is_an_error_naming_the_host_key():
    # 198.51.100.0/24 (TEST-NET-2) is documentation space, on no interface.
    with pytest.raises(SettingsError) as info:
        serve_metrics(
            "198.51.100.254",
            _free_port(),
            gateway_id="gw-c",
            counters=GatewayCounters(),
            gauges=lambda: GAUGES,
        )
    assert info.value.key == "gateway.metrics_host"
    assert "198.51.100.254:" in info.value.problem
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.EADDRNOTAVAIL
