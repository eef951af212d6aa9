"""Prometheus /metrics for the gateway: the service's counters, read at scrape time.

It reads a ``GatewayCounters`` record and a ``gauges`` callback passed in,
and knows nothing else of the gateway. The names and labels here are what
Grafana boards read; serving them is ``adapters.metrics``'s business.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from adapters.metrics import (
    Family,
    MetricsAddress,
    MetricsExporter,
    MetricsServer,
    counter,
    counters_by,
    gauge,
)
from gateway.counters import GatewayCounters

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
    "modbus_reconnects": "Modbus bus reopenings (after a failure, or a port that would not open)",
    "batches_stored": "Batches written to the outbox",
    "readings_stored": "Readings written to the outbox",
    "batches_published": "Batch publishes (first sends and resends)",
    "batches_resent": "Batch resends after a missing ack",
    "puback_refused": "Batch publishes refused by the broker (reason code >= 0x80)",
    "batches_acked": "Batches acked by ingest",
    "readings_acked": "Readings acked by ingest",
    "outbox_refused_readings": (
        "Readings refused because the outbox was full (serial ones while full, "
        "batches larger than it)"
    ),
    "outbox_dropped_readings": "Oldest readings dropped because the outbox was full",
    "configs_applied": "Config versions applied",
    "commands_received": "Commands received from the centre (copies included)",
    "commands_delivered": "Commands handed to their device (first publish or frame)",
    "commands_succeeded": "Commands their device carried out",
    "commands_failed": "Commands failed (refused, no answer, the device said so)",
    "commands_expired": "Commands whose ttl passed before they reached the device",
    "commands_cancelled": "Commands cancelled before they reached the device",
    "command_reports_published": "Command reports published (first sends and resends)",
    "command_reports_resent": "Command report resends after a missing ack",
    "command_reports_acked": "Command reports acked by ingest",
    "lorawan_uplinks": "LoRaWAN uplinks (ChirpStack up events) accepted",
    "lorawan_repeats": "LoRaWAN uplinks dropped as exact repeats of a recent frame",
    "lorawan_out_of_order": "LoRaWAN uplinks whose fCnt was below the session's highest",
    "lorawan_status": "LoRaWAN status events read",
    "lorawan_joins": "LoRaWAN joins (a new session)",
}


_GAUGES = {
    "outbox_readings": "Readings waiting in the outbox",
    "outbox_batches": "Batches waiting in the outbox",
    "outbox_bytes": "Payload bytes in the outbox",
    "devices_online": "Devices online",
    "uplink_connected": "Uplink up",
    "command_reports_pending": "Command reports waiting for ingest's ack",
    "commands_held": "Commands held and not yet final",
}


def gateway_families(
    counters: GatewayCounters, gauges: Callable[[], Mapping[str, int]]
) -> Iterator[Family]:
    for name, help_text in _COUNTERS.items():
        yield counter(name, help_text, getattr(counters, name))
    yield counters_by(
        "rejects", "Rejected device input by reason", counters.rejects, label="reason"
    )
    yield Family(
        "counter",
        "device_rejects",
        "Rejected device input by configured device and reason (other: unknown ids)",
        [((device, reason), n) for (device, reason), n in sorted(counters.device_rejects.items())],
        labels=("device", "reason"),
    )
    yield counters_by(
        "device_rate_limited",
        "Readings dropped by the rate limit, by configured device",
        counters.device_rate_limited,
        label="device",
    )
    yield Family(
        "counter",
        "modbus_polls",
        "Modbus polls by device and outcome (ok, no_answer, garbled, exception, invalid)",
        [((device, outcome), n) for (device, outcome), n in sorted(counters.modbus_polls.items())],
        labels=("device", "outcome"),
    )
    values = gauges()
    for name, help_text in _GAUGES.items():
        yield gauge(name, help_text, values[name])


def serve_metrics(
    host: str,
    port: int,
    *,
    gateway_id: str,
    counters: GatewayCounters,
    gauges: Callable[[], Mapping[str, int]],
) -> MetricsServer:
    """Serve /metrics on ``host``:``port`` in a daemon thread.

    An address that cannot be bound (port taken or privileged, host not this
    machine's) is a SettingsError naming the setting: the service checks it
    before it connects anywhere.
    """
    exporter = MetricsExporter(
        prefix="cityhub_gateway",
        instance_label="gateway",
        instance=gateway_id,
        collect=lambda: gateway_families(counters, gauges),
    )
    return exporter.serve(MetricsAddress(host, port, section="gateway"))
