"""Prometheus /metrics for the gateway: the service's counters, read at scrape time.

It reads a ``GatewayCounters`` record and a ``gauges`` callback passed in,
and knows nothing else of the gateway.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from contracts.errors import SettingsError
from gateway.counters import GatewayCounters

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

_COUNTERS = {
    "received": "Device messages and serial frames received",
    "accepted": "Readings accepted into batches",
    "rate_limited": "Readings dropped by the per-device rate limit",
    "seq_gaps": "Readings missing according to device sequence numbers",
    "duplicates": "Readings whose seq was not newer than the last",
    "reboots": "Device reboots seen",
    "serial_frames": "Serial frames decoded",
    "serial_checksum_errors": "Serial frames with a bad checksum",
    "serial_length_errors": "Serial frames with a bad length",
    "serial_garbage_bytes": "Serial bytes skipped while resynchronising",
    "serial_reconnects": "Serial port reopenings",
    "batches_stored": "Batches written to the outbox",
    "readings_stored": "Readings written to the outbox",
    "batches_published": "Batch publishes (first sends and resends)",
    "batches_resent": "Batch resends after a missing ack",
    "puback_refused": "Batch publishes refused by the broker (reason code >= 0x80)",
    "batches_acked": "Batches acked by ingest",
    "readings_acked": "Readings acked by ingest",
    "outbox_refused_readings": "Serial readings refused while the outbox was full",
    "outbox_dropped_readings": "Oldest readings dropped because the outbox was full",
    "configs_applied": "Config versions applied",
}


_GAUGES = {
    "outbox_readings": "Readings waiting in the outbox",
    "outbox_batches": "Batches waiting in the outbox",
    "outbox_bytes": "Payload bytes in the outbox",
    "devices_online": "Devices online",
    "uplink_connected": "Uplink up",
}


class GatewayCollector(Collector):
    def __init__(
        self,
        *,
        gateway_id: str,
        counters: GatewayCounters,
        gauges: Callable[[], Mapping[str, int]],
    ) -> None:
        self.gateway_id = gateway_id
        self.counters = counters
        self.gauges = gauges

    def collect(self) -> Iterator[Metric]:
        counters = self.counters
        labels = ["gateway"]
        gw = [self.gateway_id]
        for name, help_text in _COUNTERS.items():
            family = CounterMetricFamily(f"cityhub_gateway_{name}", help_text, labels=labels)
            family.add_metric(gw, getattr(counters, name))
            yield family
        rejects = CounterMetricFamily(
            "cityhub_gateway_rejects", "Rejected device input by reason", labels=[*labels, "reason"]
        )
        for reason, count in sorted(counters.rejects.items()):
            rejects.add_metric([*gw, reason], count)
        yield rejects
        by_device = CounterMetricFamily(
            "cityhub_gateway_device_rejects",
            "Rejected device input by configured device and reason (other: unknown ids)",
            labels=[*labels, "device", "reason"],
        )
        for (device, reason), count in sorted(counters.device_rejects.items()):
            by_device.add_metric([*gw, device, reason], count)
        yield by_device
        values = self.gauges()
        for name, help_text in _GAUGES.items():
            gauge = GaugeMetricFamily(f"cityhub_gateway_{name}", help_text, labels=labels)
            gauge.add_metric(gw, values[name])
            yield gauge


def serve_metrics(
    port: int,
    *,
    gateway_id: str,
    counters: GatewayCounters,
    gauges: Callable[[], Mapping[str, int]],
) -> WSGIServer:
    """Serve /metrics on 127.0.0.1:``port`` in a daemon thread.

    A port that cannot be bound (taken, or privileged) is a SettingsError
    naming the setting: the service checks it before it connects anywhere.
    """
    registry = CollectorRegistry()
    registry.register(GatewayCollector(gateway_id=gateway_id, counters=counters, gauges=gauges))
    try:
        server, _thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise SettingsError(
            "gateway.metrics_port", f"cannot listen on 127.0.0.1:{port}: {reason}"
        ) from exc
    return server
