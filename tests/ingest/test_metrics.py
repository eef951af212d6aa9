"""Where an ingest worker's /metrics listens: ``ingest.metrics_host``, ports from metrics_port."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

import pytest

from contracts.errors import SettingsError
from ingest.metrics import IngestCounters, IngestMetrics, check_metrics_ports, serve_metrics


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def scrape(host: str, port: int) -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


def test_bound_to_another_address_it_answers_there_and_not_on_loopback(other_address):
    counters = IngestCounters()
    counters.readings = 42
    port = free_port(other_address)
    server = serve_metrics(IngestMetrics(counters, "hub-0"), other_address, port)
    try:
        assert 'cityhub_ingest_readings_total{worker="hub-0"} 42.0' in scrape(other_address, port)
        with pytest.raises(urllib.error.URLError) as refused:
            scrape("127.0.0.1", port)
    finally:
        server.close()
    assert isinstance(refused.value.reason, ConnectionRefusedError)


def test_the_supervisor_checks_the_workers_ports_on_the_configured_address(other_address):
    with socket.socket() as held:
        held.bind((other_address, 0))
        held.listen()
        taken = held.getsockname()[1]
        # Worker 1's port is taken on that address: the check names it.
        with pytest.raises(SettingsError) as info:
            check_metrics_ports(other_address, taken - 1, 2)
    assert info.value.key == "ingest.metrics_port"
    assert f"{other_address}:{taken}:" in info.value.problem


def test_an_address_not_of_this_machine_is_an_error_naming_the_host_key():
    # 198.51.100.0/24 (TEST-NET-2) is documentation space, on no interface.
    with pytest.raises(SettingsError) as info:
        check_metrics_ports("198.51.100.254", free_port("127.0.0.1"), 2)
    assert info.value.key == "ingest.metrics_host"
    with pytest.raises(SettingsError) as info:
        serve_metrics(
            IngestMetrics(IngestCounters(), "hub-0"), "198.51.100.254", free_port("127.0.0.1")
        )
    assert info.value.key == "ingest.metrics_host"
    assert "cannot listen on 198.51.100.254:" in info.value.problem
