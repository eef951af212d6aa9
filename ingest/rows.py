"""From a decoded Batch to column arrays for COPY, rejects and device summaries.

``build_rows`` takes a batch that ``contracts.messages.decode_batch`` accepted
and the device -> gateway ownership map, and returns, per device type, the
rows to store as numpy columns (``TypeRows``), the readings that must not be
stored (``RejectedRow``: not owned by the sending gateway, or refused as
``check_sound_block_rows`` refuses them: NaN, out of range, out of the time
window, no value; ``ingest.screen`` finds the suspects in numpy and
``check_rows`` names their errors), and one ``DeviceSummary`` per device for
``device_state``.

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
from operator import attrgetter
from typing import Final

import numpy as np
from numpy.typing import NDArray

from contracts.catalog import DeviceType, device_type
from contracts.ids import DEFAULT_MAX_FUTURE_MS, DEFAULT_MAX_PAST_MS
from contracts.messages import Batch, ReadingBlock, check_rows
from ingest.screen import Screened, screen_block

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
    # decode_batch checked the block's columns: only its rows are checked here,
    # screened in numpy; contracts names the exact error of each suspect row.
    screened = screen_block(
        block, dtype, earliest_ms=now_ms - max_past_ms, latest_ms=now_ms + max_future_ms
    )
    report = check_rows(
        block,
        dtype,
        screened.suspects.tolist(),
        now_ms=now_ms,
        max_past_ms=max_past_ms,
        max_future_ms=max_future_ms,
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
    return _kept_rows(batch, block, dtype, screened, device, keep)


def _kept_rows(  # noqa: PLR0917 - the pieces _block_rows has in hand
    batch: Batch,
    block: ReadingBlock,
    dtype: DeviceType,
    screened: Screened,
    device: NDArray[np.int64],
    keep: NDArray[np.bool_],
) -> TypeRows:
    """The kept rows of a block as columns: the screen's arrays, masked where rows are dropped."""
    seq, ts, recv = screened.seq, screened.ts_ms, screened.recv_ms
    columns = {name: a for name, a in screened.values.items() if a is not None}
    if seq is None or ts is None or recv is None or len(columns) < len(screened.values):
        return _kept_rows_python(batch, block, dtype, device, keep)
    if not keep.all():
        device, seq, ts, recv = device[keep], seq[keep], ts[keep], recv[keep]
        columns = {name: column[keep] for name, column in columns.items()}
    count = len(seq)
    # A kept row's NaN is a None: a NaN reading is refused (see the module docstring).
    values = {
        m.name: columns[m.name] if m.name in columns else np.full(count, np.nan)
        for m in dtype.metrics
    }
    return TypeRows(
        device_type=dtype.name,
        device_ids=tuple(batch.devices),
        device=device,
        seq=seq,
        ts_ms=ts,
        recv_ms=recv,
        values=values,
    )


def _kept_rows_python(
    batch: Batch,
    block: ReadingBlock,
    dtype: DeviceType,
    device: NDArray[np.int64],
    keep: NDArray[np.bool_],
) -> TypeRows:
    """``_kept_rows`` of a block with a column numpy could not hold: picked in Python."""
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
    """Per device: readings, the newest reading (by time, then seq) and its boot id.

    One summary per device id, also where ``rows`` joins blocks whose label
    lists repeat a device (``concat_rows``).
    """
    if not rows.row_count:
        return []
    labels = rows.device_ids
    device = rows.device
    if len(set(labels)) != len(labels):
        first: dict[str, int] = {}
        code = [first.setdefault(label, i) for i, label in enumerate(labels)]
        device = np.asarray(code, dtype=np.int64)[device]
    # lexsort sorts by the last key first: device, then time, then seq; the
    # last row of each device's run is its newest reading.
    order = np.lexsort((rows.seq, rows.ts_ms, device))
    devices = device[order]
    newest = order[np.flatnonzero(np.append(devices[1:] != devices[:-1], True))]
    index = device[newest]
    counts = np.bincount(device)[index]
    return [
        DeviceSummary(
            device_id=labels[i],
            last_ts_ms=ts,
            last_seq=seq,
            boot_id=boots.get(labels[i]),
            readings=n,
        )
        for i, ts, seq, n in zip(
            index.tolist(),
            rows.ts_ms[newest].tolist(),
            rows.seq[newest].tolist(),
            counts.tolist(),
            strict=True,
        )
    ]


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
    is checked as ``check_sound_block_rows`` checks it; the first problem of a row is
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
    # One summary per device already (a device has one type): merge_summaries
    # would only sort them.
    summaries = [s for t in tables.values() for s in _summaries(t, boots)]
    summaries.sort(key=attrgetter("device_id"))
    return BatchRows(tables=tables, rejects=rejects, devices=summaries)


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
