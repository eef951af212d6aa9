"""From a decoded Batch to column arrays for COPY, rejects and device summaries.

``build_rows`` takes a batch that ``contracts.messages.decode_batch`` accepted
and the device -> gateway ownership map, and returns, per device type, the
rows to store as numpy columns (``TypeRows``), the readings that must not be
stored (``RejectedRow``: not owned by the sending gateway, or refused by
``check_sound_block_rows``: NaN, out of range, out of the time window, no value),
and one ``DeviceSummary`` per device for ``device_state``.

Conventions of ``TypeRows``: timestamps stay integer Unix milliseconds (the
COPY encoder converts them); there is a column for every metric of the
device type, float64, with NaN where the reading has no value. NaN can mean
only "no value" there: a NaN *reading* is a reject and never reaches a
column. Device ids are codes into a label list (``device_ids``), so a
thousand rows of one device carry its id once.

Pure: time, settings and the ownership map come in as arguments; reading the
devices table, COPY and logging are the writer's and the service's business.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray

from contracts.catalog import device_type
from contracts.ids import DEFAULT_MAX_FUTURE_MS, DEFAULT_MAX_PAST_MS
from contracts.messages import Batch, ReadingBlock, check_sound_block_rows

NOT_OWNED: Final = "not_owned"


@dataclass(frozen=True, slots=True)
class RejectedRow:
    """One reading that is not stored, with the reason code and a detail for people."""

    device_id: str
    seq: int
    ts_ms: int
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class TypeRows:
    """The rows of one device type to store, column by column."""

    device_type: str
    device_ids: tuple[str, ...]  # labels for `device`
    device: NDArray[np.int64]  # index into device_ids, one per row
    seq: NDArray[np.int64]
    ts_ms: NDArray[np.int64]
    recv_ms: NDArray[np.int64]
    values: dict[str, NDArray[np.float64]]  # every metric of the type; NaN = no value

    @property
    def row_count(self) -> int:
        return len(self.seq)


@dataclass(frozen=True, slots=True)
class DeviceSummary:
    """What one batch (or group of batches) says about a device, for device_state."""

    device_id: str
    last_ts_ms: int  # the newest reading's time
    last_seq: int  # the newest reading's seq (ties on time: the highest seq)
    boot_id: str | None
    readings: int


@dataclass(frozen=True, slots=True)
class BatchRows:
    tables: dict[str, TypeRows]
    rejects: list[RejectedRow]
    devices: list[DeviceSummary]

    @property
    def readings(self) -> int:
        """Rows to store."""
        return sum(t.row_count for t in self.tables.values())


def _owner_detail(device_id: str, gateway_id: str, owner: str | None) -> str:
    if owner is None:
        return f"device {device_id!r} is not registered to an active gateway"
    return f"device {device_id!r} belongs to gateway {owner!r}, not {gateway_id!r}"


def _block_rows(
    batch: Batch,
    block: ReadingBlock,
    owned: NDArray[np.bool_],
    rejects: list[RejectedRow],
    *,
    now_ms: int,
    max_past_ms: int,
    max_future_ms: int,
    owners: Mapping[str, str | None],
) -> TypeRows:
    dtype = device_type(block.device_type)
    device = np.asarray(block.device_index, dtype=np.int64)
    keep = owned[device]
    for row in np.flatnonzero(~keep).tolist():
        device_id = batch.devices[block.device_index[row]]
        rejects.append(
            RejectedRow(
                device_id=device_id,
                seq=block.seq[row],
                ts_ms=block.ts_ms[row],
                reason=NOT_OWNED,
                detail=_owner_detail(device_id, batch.gateway_id, owners.get(device_id)),
            )
        )
    # decode_batch checked the block's columns: only its rows are checked here.
    report = check_sound_block_rows(
        block, dtype, now_ms=now_ms, max_past_ms=max_past_ms, max_future_ms=max_future_ms
    )
    for row, error in report:
        if keep[row]:
            keep[row] = False
            rejects.append(
                RejectedRow(
                    device_id=batch.devices[block.device_index[row]],
                    seq=block.seq[row],
                    ts_ms=block.ts_ms[row],
                    reason=error.reason,
                    detail=str(error),
                )
            )
    if keep.all():
        seq, ts, recv = block.seq, block.ts_ms, block.recv_ms
        columns = block.values
    else:
        # Refused rows may hold integers too large for int64 or values that
        # are not numbers: pick the kept rows in Python before numpy sees them.
        rows = np.flatnonzero(keep).tolist()
        device = device[keep]
        seq = [block.seq[r] for r in rows]
        ts = [block.ts_ms[r] for r in rows]
        recv = [block.recv_ms[r] for r in rows]
        columns = {name: [column[r] for r in rows] for name, column in block.values.items()}
    count = len(seq)
    values: dict[str, NDArray[np.float64]] = {}
    for metric in dtype.metrics:
        column = columns.get(metric.name)
        # float64 turns None into NaN: "no value" (see the module docstring).
        values[metric.name] = (
            np.full(count, np.nan) if column is None else np.asarray(column, dtype=np.float64)
        )
    return TypeRows(
        device_type=dtype.name,
        device_ids=tuple(batch.devices),
        device=device,
        seq=np.asarray(seq, dtype=np.int64),
        ts_ms=np.asarray(ts, dtype=np.int64),
        recv_ms=np.asarray(recv, dtype=np.int64),
        values=values,
    )


def _summaries(rows: TypeRows, boots: Mapping[str, str | None]) -> list[DeviceSummary]:
    """Per device: readings, the newest reading (by time, then seq) and its boot id."""
    if not rows.row_count:
        return []
    # lexsort sorts by the last key first: device, then time, then seq.
    order = np.lexsort((rows.seq, rows.ts_ms, rows.device))
    devices = rows.device[order]
    last = np.flatnonzero(np.append(devices[1:] != devices[:-1], True))
    counts = np.bincount(rows.device)
    result = []
    for position in last.tolist():
        row = int(order[position])
        index = int(rows.device[row])
        device_id = rows.device_ids[index]
        result.append(
            DeviceSummary(
                device_id=device_id,
                last_ts_ms=int(rows.ts_ms[row]),
                last_seq=int(rows.seq[row]),
                boot_id=boots.get(device_id),
                readings=int(counts[index]),
            )
        )
    return result


def build_rows(
    batch: Batch,
    *,
    owners: Mapping[str, str | None],
    now_ms: int,
    max_past_ms: int = DEFAULT_MAX_PAST_MS,
    max_future_ms: int = DEFAULT_MAX_FUTURE_MS,
) -> BatchRows:
    """Split a decoded batch into rows to store and rows to reject.

    ``owners`` maps a device id to the gateway it is registered to (None or
    absent: unknown or revoked); readings of a device that ``batch.gateway_id``
    does not own are rejects with reason ``not_owned``. Every other reading
    goes through ``check_sound_block_rows``; the first problem of a row is
    its reject reason. The batch's shape must have passed ``decode_batch``,
    which checked every block's columns; they are not checked again here.
    """
    owned = np.fromiter(
        (owners.get(d) == batch.gateway_id for d in batch.devices),
        dtype=np.bool_,
        count=len(batch.devices),
    )
    rejects: list[RejectedRow] = []
    parts: dict[str, list[TypeRows]] = {}
    for block in batch.blocks:
        if not block.row_count:
            continue
        rows = _block_rows(
            batch,
            block,
            owned,
            rejects,
            now_ms=now_ms,
            max_past_ms=max_past_ms,
            max_future_ms=max_future_ms,
            owners=owners,
        )
        parts.setdefault(rows.device_type, []).append(rows)
    tables = {name: concat_rows(found) for name, found in parts.items()}
    boots = dict(zip(batch.devices, batch.device_boot, strict=True)) if batch.device_boot else {}
    summaries = [s for t in tables.values() for s in _summaries(t, boots)]
    return BatchRows(tables=tables, rejects=rejects, devices=merge_summaries(summaries))


def concat_rows(parts: Sequence[TypeRows]) -> TypeRows:
    """One TypeRows of a device type from several (of one batch or of a commit group)."""
    if not parts:
        raise ValueError("concat_rows needs at least one part")
    if len(parts) == 1:
        return parts[0]
    name = parts[0].device_type
    if any(p.device_type != name for p in parts):
        raise ValueError("concat_rows: parts of different device types")
    labels: list[str] = []
    devices = []
    for part in parts:
        devices.append(part.device + len(labels))
        labels.extend(part.device_ids)
    return TypeRows(
        device_type=name,
        device_ids=tuple(labels),
        device=np.concatenate(devices),
        seq=np.concatenate([p.seq for p in parts]),
        ts_ms=np.concatenate([p.ts_ms for p in parts]),
        recv_ms=np.concatenate([p.recv_ms for p in parts]),
        values={m: np.concatenate([p.values[m] for p in parts]) for m in parts[0].values},
    )


def merge_summaries(summaries: Iterable[DeviceSummary]) -> list[DeviceSummary]:
    """One summary per device, sorted by device id (the order rows are locked in).

    The newest reading wins (time, then seq); counts add up; the boot id is
    the newest reading's, else any known one.
    """
    newest: dict[str, DeviceSummary] = {}
    counts: dict[str, int] = {}
    any_boot: dict[str, str] = {}
    for s in summaries:
        device = s.device_id
        counts[device] = counts.get(device, 0) + s.readings
        if s.boot_id is not None:
            any_boot.setdefault(device, s.boot_id)
        old = newest.get(device)
        if old is None or (s.last_ts_ms, s.last_seq) >= (old.last_ts_ms, old.last_seq):
            newest[device] = s
    merged = []
    for device in sorted(newest):
        s = newest[device]
        boot = s.boot_id if s.boot_id is not None else any_boot.get(device)
        if s.readings == counts[device] and boot == s.boot_id:
            merged.append(s)
        else:
            merged.append(
                DeviceSummary(
                    device_id=device,
                    last_ts_ms=s.last_ts_ms,
                    last_seq=s.last_seq,
                    boot_id=boot,
                    readings=counts[device],
                )
            )
    return merged
