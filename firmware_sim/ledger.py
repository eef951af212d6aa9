"""The simulator's ledger: every reading it handed over, and whether the other side took it.

An MQTT device's reading enters the ledger when its QoS 1 PUBLISH is sent
and is marked acknowledged, with the wall-clock time, when the site
broker's PUBACK arrives: from then on the system owes it to the database.
A PUBLISH whose PUBACK never came (the connection broke, the broker hung)
stays unacknowledged: the system may store it or not, and either is
correct. aiomqtt does not expose the PUBACK's reason code, so a refused
publish counts as acknowledged: it then shows up as lost, never hidden.

A serial sensor has no acknowledgement and no sequence number or clock
that reaches the database (the gateway stamps seq and time): its readings
are recorded as written to the line, and ``reconcile`` compares them by
count per device. A Modbus slave is counted the same way: a reading is a
poll it answered with a good frame (one it answered late, or behind noise,
may or may not have been taken: it is recorded unacknowledged).

``reconcile`` is pure: it takes the ledger and what the database holds for
the run's devices (keys of stored rows, rejects with their reason) and
returns the accounting: stored once, rejected with a reason, lost,
duplicated, stored without an acknowledgement. Reading the database is the
caller's business.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

import msgspec

from contracts.messages import Transport

# Fault tags (firmware_sim.faults.Emission.faults) that make the gateway
# refuse a reading at the edge: it never reaches the database, and the
# gateway counts it (GatewayState.rejected / rate_limited).
# A flood's readings are partly refused by the per-device rate limit.
GATEWAY_REFUSES: Final = ("spike_out_of_range", "skew_beyond_window", "flood")
# Transports whose readings the gateway stamps itself: matched by count per device.
COUNTED_TRANSPORTS: Final = ("serial", "modbus")


class LedgerEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One reading as its device sent it."""

    device_id: str
    transport: Transport
    seq: int
    ts_ms: int
    # Wall-clock ms of the PUBACK (MQTT) or of the write to the line (serial);
    # None: sent, never acknowledged.
    acked_ms: int | None
    faults: tuple[str, ...] = ()

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.device_id, self.seq, self.ts_ms)


@dataclass
class Ledger:
    """Appended to by the simulator's device tasks (one event loop: no lock needed)."""

    entries: list[LedgerEntry] = field(default_factory=list)

    def add(self, entry: LedgerEntry) -> None:
        self.entries.append(entry)

    def acknowledged(self) -> list[LedgerEntry]:
        return [e for e in self.entries if e.acked_ms is not None]

    def devices(self) -> set[str]:
        return {e.device_id for e in self.entries}

    def min_ts_ms(self) -> int | None:
        return min((e.ts_ms for e in self.entries), default=None)


@dataclass(frozen=True)
class StoredRow:
    """A row of a readings table: the key the database holds."""

    device_id: str
    seq: int
    ts_ms: int


@dataclass(frozen=True)
class RejectedRow:
    """A rejects row of one reading (device, seq, ts parsed from its detail)."""

    device_id: str
    seq: int | None
    ts_ms: int | None
    reason: str


@dataclass
class Reconciliation:
    """What became of the ledger's readings."""

    acknowledged: int = 0  # MQTT readings PUBACKed plus serial readings written
    stored: int = 0  # acknowledged readings found exactly once in a readings table
    rejected: Counter[str] = field(default_factory=Counter)  # by reason, exactly once
    refused_at_gateway: Counter[str] = field(default_factory=Counter)  # by injected fault
    lost: list[LedgerEntry] = field(default_factory=list)  # MQTT, by key
    serial_lost: Counter[str] = field(default_factory=Counter)  # serial, by device, by count
    duplicates: int = 0  # readings found more than once (stored and/or rejected)
    unacked_sent: int = 0  # PUBLISHes never acknowledged
    unacked_stored: int = 0  # of those, stored or rejected anyway (allowed)
    foreign_rows: int = 0  # rows of these devices in the window that match no ledger entry

    @property
    def lost_total(self) -> int:
        return len(self.lost) + sum(self.serial_lost.values())

    @property
    def ok(self) -> bool:
        return self.lost_total == 0 and self.duplicates == 0


def _refusal(entry: LedgerEntry) -> str | None:
    for tag in entry.faults:
        name = tag.split(":", 1)[0]
        if name in GATEWAY_REFUSES:
            return name
    return None


@dataclass
class _Sorted:
    """The ledger split by what can be matched how."""

    acked: dict[tuple[str, int, int], LedgerEntry] = field(default_factory=dict)
    unacked: set[tuple[str, int, int]] = field(default_factory=set)
    serial_written: Counter[str] = field(default_factory=Counter)
    # Serial ticks whose bytes a full pty partly dropped: which frame is unknown.
    serial_unsure: Counter[str] = field(default_factory=Counter)
    seen: Counter[tuple[str, int, int]] = field(default_factory=Counter)
    reasons: dict[tuple[str, int, int], str] = field(default_factory=dict)
    serial_seen: Counter[str] = field(default_factory=Counter)
    serial_rejected: Counter[str] = field(default_factory=Counter)

    def is_serial(self, device_id: str) -> bool:
        return device_id in self.serial_written or device_id in self.serial_unsure

    def is_known(self, key: tuple[str, int, int]) -> bool:
        return key in self.acked or key in self.unacked


def _sort(entries: Iterable[LedgerEntry], result: Reconciliation) -> _Sorted:
    book = _Sorted()
    for entry in entries:
        if entry.acked_ms is None:
            result.unacked_sent += 1
            if entry.transport in COUNTED_TRANSPORTS:
                book.serial_unsure[entry.device_id] += 1
            else:
                book.unacked.add(entry.key)
            continue
        result.acknowledged += 1
        if entry.transport in COUNTED_TRANSPORTS:
            book.serial_written[entry.device_id] += 1
        else:
            book.acked[entry.key] = entry
    return book


def _match(book: _Sorted, stored: Iterable[StoredRow], rejected: Iterable[RejectedRow]) -> int:
    """Count what the database holds of each entry; return rows matching no entry."""
    foreign = 0
    for row in stored:
        key = (row.device_id, row.seq, row.ts_ms)
        if book.is_serial(row.device_id):
            book.serial_seen[row.device_id] += 1
        elif book.is_known(key):
            book.seen[key] += 1
        else:
            foreign += 1
    for reject in rejected:
        if book.is_serial(reject.device_id):
            book.serial_seen[reject.device_id] += 1
            book.serial_rejected[reject.reason] += 1
        elif reject.seq is not None and reject.ts_ms is not None:
            key = (reject.device_id, reject.seq, reject.ts_ms)
            if book.is_known(key):
                book.seen[key] += 1
                book.reasons[key] = reject.reason
            else:
                foreign += 1
        else:
            foreign += 1
    return foreign


def reconcile(
    entries: Iterable[LedgerEntry],
    stored: Iterable[StoredRow],
    rejected: Iterable[RejectedRow],
) -> Reconciliation:
    """Account for every ledger entry against the database's rows of the run.

    ``stored`` and ``rejected`` must be limited to the run's devices and time
    window (the caller's query); serial devices' rows are matched by count.
    """
    result = Reconciliation()
    book = _sort(entries, result)
    result.foreign_rows = _match(book, stored, rejected)
    for key, entry in book.acked.items():
        count = book.seen.get(key, 0)
        if count == 0:
            refusal = _refusal(entry)
            if refusal is None:
                result.lost.append(entry)
            else:
                result.refused_at_gateway[refusal] += 1
            continue
        result.duplicates += count - 1
        if key in book.reasons:
            result.rejected[book.reasons[key]] += 1
        else:
            result.stored += 1
    for key in book.unacked:
        count = book.seen.get(key, 0)
        result.unacked_stored += min(count, 1)
        result.duplicates += max(0, count - 1)
    _count_serial(book, result)
    return result


def _count_serial(book: _Sorted, result: Reconciliation) -> None:
    result.rejected.update(book.serial_rejected)
    for device_id in book.serial_written.keys() | book.serial_unsure.keys():
        written, unsure = book.serial_written[device_id], book.serial_unsure[device_id]
        arrived = book.serial_seen.get(device_id, 0)
        if arrived < written:
            result.serial_lost[device_id] = written - arrived
        result.duplicates += max(0, arrived - written - unsure)
        result.unacked_stored += min(max(0, arrived - written), unsure)
        result.stored += min(arrived, written)
    result.stored -= sum(book.serial_rejected.values())
