"""From a checked GatewayState to the row ingest stores in ``gateway_status``.

``state_row`` builds the row (with the rejects the gateway reported) of a
state that ``contracts.messages`` ``decode_gateway_state`` accepted (its
check already bounds every value to what the columns hold) and times a
Will by its arrival. ``in_lock_order`` orders a group of rows for the
upserts.

Which stored row a state replaces (the newest by birth, then time, with a
death ending its session's "online") is decided in SQL by the writer, where
the stored row is; receiving, writing and logging are the service's and the
writer's business.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from contracts.messages import GatewayState, RejectCount


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
    # The rejects the gateway counted over the interval before this state,
    # stored in ``rejects`` at the state's time, and those it could not itemise.
    rejects: tuple[RejectCount, ...] = ()
    rejects_dropped: int = 0
    # Readings the outbox refused and dropped while full, the file's totals.
    outbox_refused_readings: int = 0
    outbox_dropped_readings: int = 0
    # Provisioning's final state of a revoked gateway (``GatewayState.revoked``).
    revoked: bool = False


def state_row(
    state: GatewayState, *, received_ms: int | None = None, retained: bool = False
) -> StateRow:
    """The row for a state ``decode_gateway_state`` (``check_gateway_state``) accepted.

    A Will (``state.will``) is built at connect and published by the broker
    when the link dies, so its own ``ts_ms`` is the connect time: the row
    takes ``received_ms``, when it was noticed, instead. ``retained`` says
    it came from the broker's store, not live; the writer then keeps a
    death of the same birth that is already stored, with its time.
    """
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
        rejects=state.rejects,
        rejects_dropped=state.rejects_dropped,
        outbox_refused_readings=state.outbox_refused_readings,
        outbox_dropped_readings=state.outbox_dropped_readings,
        revoked=state.revoked,
    )


def in_lock_order(rows: Iterable[StateRow]) -> list[StateRow]:
    """Rows by gateway id, each gateway's in arrival order (a stable sort).

    Upserts must see one gateway's states in the order they came (the
    outcome depends on it), and every transaction must lock gateways in the
    same order so that two writers never wait on each other in a circle.
    """
    return sorted(rows, key=lambda row: row.gateway_id)
