"""Batch building: accepted readings in, columnar ``Batch`` structs out.

Pure: the caller passes the time and whether anything more is waiting to be
added, and ``due`` says when to flush: at once when nothing more is waiting
(adaptive batching: under load readings pile up while the previous batch is
fsynced, so batches grow by themselves), else at ``max_rows`` or
``max_age_ms``, which only cap a batch under load. This
module owns the layout of ``contracts.messages.Batch`` (devices referenced by index,
one block per device type, one column per metric present) and the batch id
counter of one gateway boot. Writing batches to the outbox is the caller's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from contracts.ids import batch_id
from contracts.messages import Batch, ReadingBlock


@dataclass
class _BlockRows:
    device_index: list[int] = field(default_factory=list)
    seq: list[int] = field(default_factory=list)
    ts_ms: list[int] = field(default_factory=list)
    recv_ms: list[int] = field(default_factory=list)
    values: list[dict[str, float]] = field(default_factory=list)


class BatchBuilder:
    """Accumulates readings until nothing more waits (or a cap is hit), then yields a Batch."""

    def __init__(
        self, *, gateway_id: str, boot_id: str, max_rows: int, max_age_ms: int, counter: int = 0
    ) -> None:
        if max_rows < 1 or max_age_ms < 0:
            raise ValueError("max_rows must be >= 1 and max_age_ms >= 0")
        self.gateway_id = gateway_id
        self.boot_id = boot_id
        self.max_rows = max_rows
        self.max_age_ms = max_age_ms
        self.counter = counter
        self._reset()

    def _reset(self) -> None:
        self._devices: dict[str, int] = {}
        self._device_boot: list[str | None] = []
        self._blocks: dict[str, _BlockRows] = {}
        self._rows = 0
        self._first_ms: int | None = None

    @property
    def rows(self) -> int:
        return self._rows

    def add(
        self,
        *,
        device_id: str,
        device_type: str,
        seq: int,
        ts_ms: int,
        recv_ms: int,
        values: dict[str, float],
        boot: str | None = None,
    ) -> None:
        index = self._devices.get(device_id)
        if index is None:
            index = self._devices[device_id] = len(self._devices)
            self._device_boot.append(boot)
        elif boot is not None:
            self._device_boot[index] = boot
        block = self._blocks.get(device_type)
        if block is None:
            block = self._blocks[device_type] = _BlockRows()
        block.device_index.append(index)
        block.seq.append(seq)
        block.ts_ms.append(ts_ms)
        block.recv_ms.append(recv_ms)
        block.values.append(values)
        if self._first_ms is None:
            self._first_ms = recv_ms
        self._rows += 1

    def due(self, now_ms: int, *, idle: bool = False) -> bool:
        """Holding rows while ``idle`` (nothing more waits), full, or older than ``max_age_ms``."""
        if self._first_ms is None:
            return False
        return idle or self._rows >= self.max_rows or now_ms - self._first_ms >= self.max_age_ms

    def take(self, now_ms: int) -> Batch | None:
        """The accumulated rows as one Batch (None if empty); starts a new batch."""
        if not self._rows:
            return None
        blocks = []
        for device_type, rows in self._blocks.items():
            names = sorted({name for row in rows.values for name in row})
            values = {name: [row.get(name) for row in rows.values] for name in names}
            blocks.append(
                ReadingBlock(
                    device_type=device_type,
                    device_index=rows.device_index,
                    seq=rows.seq,
                    ts_ms=rows.ts_ms,
                    recv_ms=rows.recv_ms,
                    values=values,
                )
            )
        boots = self._device_boot if any(b is not None for b in self._device_boot) else []
        batch = Batch(
            batch_id=batch_id(self.gateway_id, self.boot_id, self.counter),
            gateway_id=self.gateway_id,
            boot_id=self.boot_id,
            sent_ms=now_ms,
            devices=list(self._devices),
            blocks=blocks,
            device_boot=boots,
        )
        self.counter += 1
        self._reset()
        return batch
