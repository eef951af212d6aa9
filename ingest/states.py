"""From a decoded GatewayState to the row ingest stores in ``gateway_status``.

``state_row`` checks what ``contracts.messages.check_gateway_state`` leaves
open because the database needs it: every counter fits a bigint, the time
fits a timestamptz, the rate is finite and not negative. ``in_lock_order``
orders a group of rows for the upserts.

Which stored row a state replaces (the newest by birth, then time, with a
death ending its session's "online") is decided in SQL by the writer, where
the stored row is; receiving, writing and logging are the service's and the
writer's business.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from contracts.errors import FieldTypeError, NonFiniteValueError, OutOfRangeError
from contracts.messages import SEQ_MAX, GatewayState

# 9999-12-31T23:59:59.999Z: PostgreSQL's timestamptz goes further (year
# 294276), but no clock that reads past this is telling the time.
TS_MAX_MS: Final = 253_402_300_799_999
# A software version such as "1.4.0+git.0123abcd" is ~20 characters; 64 leaves
# room for a longer build tag and keeps a board's table column readable.
VERSION_MAX_CHARS: Final = 64


@dataclass(frozen=True, slots=True)
class StateRow:
    """One state message as stored: a row of ``gateway_status`` (and of its history)."""

    gateway_id: str
    status: str
    birth: int
    boot_id: str
    version: str
    ts_ms: int
    outbox_depth: int
    outbox_readings: int
    readings_per_s: float
    received: int
    accepted: int
    rejected: int
    rate_limited: int
    serial_errors: int
    devices_online: int
    site_ready: bool
    # A death Will: ts_ms is when ingest received it, and a retained copy
    # seen again (after a restart) must not move a stored death.
    will: bool = False
    retained: bool = False


_COUNTERS: Final = (
    "outbox_readings",
    "received",
    "accepted",
    "rejected",
    "rate_limited",
    "serial_errors",
    "devices_online",
)


def state_row(
    state: GatewayState, *, received_ms: int | None = None, retained: bool = False
) -> StateRow:
    """The row for a state ``decode_gateway_state`` accepted.

    A Will (``state.will``) is built at connect and published by the broker
    when the link dies, so its own ``ts_ms`` is the connect time: the row
    takes ``received_ms``, when it was noticed, instead. ``retained`` says
    it came from the broker's store, not live; the writer then keeps a
    death of the same birth that is already stored, with its time.

    Raises OutOfRangeError for a counter outside [0, 2**63) or a time past
    TS_MAX_MS, NonFiniteValueError / OutOfRangeError for a rate that is not a
    finite, non-negative number, FieldTypeError for a version that is longer
    than VERSION_MAX_CHARS or not printable.
    """
    if len(state.version) > VERSION_MAX_CHARS or not state.version.isprintable():
        raise FieldTypeError(
            f"version {state.version[:VERSION_MAX_CHARS]!r}: at most {VERSION_MAX_CHARS} "
            "printable characters"
        )
    for name in _COUNTERS:
        value = getattr(state, name)
        if not 0 <= value <= SEQ_MAX:
            raise OutOfRangeError(f"{name} {value} is outside [0, {SEQ_MAX}]")
    if state.ts_ms > TS_MAX_MS:
        raise OutOfRangeError(f"ts_ms {state.ts_ms} is after the year 9999")
    if not math.isfinite(state.readings_per_s):
        raise NonFiniteValueError(f"readings_per_s: {state.readings_per_s!r}")
    if state.readings_per_s < 0:
        raise OutOfRangeError(f"readings_per_s {state.readings_per_s!r} is negative")
    return StateRow(
        gateway_id=state.gateway_id,
        status=state.status,
        birth=state.birth,
        boot_id=state.boot_id,
        version=state.version,
        ts_ms=received_ms if state.will and received_ms is not None else state.ts_ms,
        outbox_depth=state.outbox_depth,
        outbox_readings=state.outbox_readings,
        readings_per_s=state.readings_per_s,
        received=state.received,
        accepted=state.accepted,
        rejected=state.rejected,
        rate_limited=state.rate_limited,
        serial_errors=state.serial_errors,
        devices_online=state.devices_online,
        site_ready=state.site_ready,
        will=state.will,
        retained=retained,
    )


def in_lock_order(rows: Iterable[StateRow]) -> list[StateRow]:
    """Rows by gateway id, each gateway's in arrival order (a stable sort).

    Upserts must see one gateway's states in the order they came (the
    outcome depends on it), and every transaction must lock gateways in the
    same order so that two writers never wait on each other in a circle.
    """
    return sorted(rows, key=lambda row: row.gateway_id)
