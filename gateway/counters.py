"""The gateway's monotonic counters: one plain record the core and adapters add to.

The routing core, the serial, Modbus and outbox callbacks add to it; the state
message and the metrics adapter read it. Deciding what to count is theirs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class GatewayCounters:
    """Monotonic counters for the state message and /metrics."""

    received: int = 0
    accepted: int = 0
    rate_limited: int = 0
    # Readings dropped by the rate limit, per configured device (only
    # configured devices have a bucket, so the keys are bounded).
    device_rate_limited: Counter[str] = field(default_factory=Counter)
    rejects: Counter[str] = field(default_factory=Counter)
    # (device, reason) for configured devices; other ids count as "other", so
    # a stream of made-up ids cannot grow it without bound.
    device_rejects: Counter[tuple[str, str]] = field(default_factory=Counter)
    seq_gaps: int = 0
    duplicates: int = 0
    reboots: int = 0
    serial_frames: int = 0
    serial_checksum_errors: int = 0
    serial_length_errors: int = 0
    serial_garbage_bytes: int = 0
    serial_reconnects: int = 0
    # (device, outcome) of each Modbus poll: ok, no_answer, garbled (bytes
    # but no valid answer: CRC, noise, framing), exception (the slave's
    # exception response), invalid (an answer the register map cannot decode).
    modbus_polls: Counter[tuple[str, str]] = field(default_factory=Counter)
    modbus_reconnects: int = 0
    batches_stored: int = 0
    readings_stored: int = 0
    batches_published: int = 0
    batches_resent: int = 0
    puback_refused: int = 0
    batches_acked: int = 0
    readings_acked: int = 0
    outbox_refused_readings: int = 0
    outbox_dropped_readings: int = 0
    configs_applied: int = 0
    commands_received: int = 0
    commands_delivered: int = 0
    commands_succeeded: int = 0
    commands_failed: int = 0
    commands_expired: int = 0
    commands_cancelled: int = 0
    command_reports_published: int = 0
    command_reports_resent: int = 0
    command_reports_acked: int = 0
    # LoRaWAN (gateway.lorawan): uplinks accepted, exact repeats dropped,
    # fCnts below the session's highest, status and join events.
    lorawan_uplinks: int = 0
    lorawan_repeats: int = 0
    lorawan_out_of_order: int = 0
    lorawan_status: int = 0
    lorawan_joins: int = 0
