"""In-memory (devices x samples) windows of one device type, kept up to date incrementally.

``SampleBuffer`` holds, per device, its newest ``width`` samples right-aligned
(the newest in the last column; empty slots hold ``NO_TS`` and NaN): the
matrices the rules evaluate. ``append`` takes rows fetched since each
device's newest sample (``cursors``), in any order, and shifts them in with
one gather and one scatter over the affected rows only: no per-device loop,
no ``np.roll``. ``reindex`` follows the device list as
devices are registered, moved or revoked.

``evaluation_times`` is the job's clock: which evaluation times a cycle
runs, aligned to the interval, replaying missed ones after downtime.

Fetching rows and building the rules' ``Window`` are the job's business.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

NO_TS: Final = np.iinfo(np.int64).min

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class DeviceSet:
    """The active devices of one type, in a fixed order, with their site and district."""

    device_ids: tuple[str, ...]
    site_ids: tuple[str, ...]
    districts: tuple[str, ...]

    def __post_init__(self) -> None:
        if not len(self.device_ids) == len(self.site_ids) == len(self.districts):
            raise ValueError("device ids, site ids and districts differ in length")

    def __len__(self) -> int:
        return len(self.device_ids)


@dataclass(frozen=True)
class Samples:
    """Rows fetched from a readings table: device index into the buffer, time, metric values."""

    device_index: IntArray
    ts_ms: IntArray
    values: Mapping[str, FloatArray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ts_ms)

    def select(self, mask: BoolArray) -> Samples:
        return Samples(
            device_index=self.device_index[mask],
            ts_ms=self.ts_ms[mask],
            values={k: v[mask] for k, v in self.values.items()},
        )


class SampleBuffer:
    """The newest ``width`` samples of each device of one type, for the given metrics."""

    def __init__(self, *, device_type: str, metrics: Sequence[str], width: int) -> None:
        if width < 1:
            raise ValueError(f"window width must be at least 1, got {width}")
        self.device_type = device_type
        self.metrics = tuple(metrics)
        self.width = width
        self.devices = DeviceSet((), (), ())
        self.ts_ms: IntArray = np.full((0, width), NO_TS, np.int64)
        self.values: dict[str, FloatArray] = {
            m: np.full((0, width), np.nan, np.float64) for m in self.metrics
        }
        # Whether a device's history up to the job's base time has been read;
        # a device registered later is loaded on its own before its deltas.
        self.loaded: BoolArray = np.zeros(0, np.bool_)

    def __len__(self) -> int:
        return len(self.devices)

    @property
    def cursors(self) -> IntArray:
        """Each device's newest sample time (``NO_TS`` if none): fetch only rows after it."""
        return self.ts_ms[:, -1].copy()

    def reindex(self, devices: DeviceSet) -> None:
        """Follow a new device list: rows of kept devices move along, new devices start empty."""
        old = {d: i for i, d in enumerate(self.devices.device_ids)}
        n, w = len(devices), self.width
        ts = np.full((n, w), NO_TS, np.int64)
        values = {m: np.full((n, w), np.nan, np.float64) for m in self.metrics}
        loaded = np.zeros(n, np.bool_)
        pairs = [(i, old[d]) for i, d in enumerate(devices.device_ids) if d in old]
        if pairs:
            new_rows, old_rows = (np.array(x, np.int64) for x in zip(*pairs, strict=True))
            ts[new_rows] = self.ts_ms[old_rows]
            for m in self.metrics:
                values[m][new_rows] = self.values[m][old_rows]
            loaded[new_rows] = self.loaded[old_rows]
        self.devices, self.ts_ms, self.values, self.loaded = devices, ts, values, loaded

    def append(self, samples: Samples) -> IntArray:
        """Shift ``samples`` in (any order); rows not newer than a device's newest are dropped.

        Returns the indices of the devices that received samples.
        """
        n, w = len(self), self.width
        if not len(samples) or not n:
            return np.empty(0, np.int64)
        newer = samples.ts_ms > self.ts_ms[samples.device_index, -1]
        order = np.lexsort((samples.ts_ms[newer], samples.device_index[newer]))
        dev = samples.device_index[newer][order]
        ts = samples.ts_ms[newer][order]
        if not len(dev):
            return np.empty(0, np.int64)
        counts = np.bincount(dev, minlength=n)
        rows = np.flatnonzero(counts)
        # Shift each affected row left by its count of new samples: one slice
        # copy per distinct count (usually one: every device sent one reading);
        # when every row moves by the same count it is a plain memmove.
        shift = np.minimum(counts[rows], w)
        for s in np.unique(shift).tolist():
            selected = rows[shift == s]
            whole = len(selected) == n
            for matrix, empty in (
                (self.ts_ms, NO_TS),
                *((self.values[m], np.nan) for m in self.metrics),
            ):
                if whole:
                    matrix[:, : w - s] = matrix[:, s:]
                    matrix[:, w - s :] = empty
                else:
                    matrix[selected, : w - s] = matrix[selected, s:]
                    matrix[selected, w - s :] = empty
        # Then scatter the new samples into the freed right-hand columns: the
        # j-th of a device's k new samples (oldest first) lands in column
        # w - k + j; those that would fall off the left are the oldest.
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        rank = np.arange(len(dev)) - starts[dev]
        col = w - counts[dev] + rank
        fits = col >= 0
        dev_f, col_f = dev[fits], col[fits]
        self.ts_ms[dev_f, col_f] = ts[fits]
        for m in self.metrics:
            self.values[m][dev_f, col_f] = samples.values[m][newer][order][fits]
        return rows


def evaluation_times(
    last_eval_ms: int | None,
    now_ms: int,
    *,
    interval_ms: int,
    delay_ms: int,
    max_catchup_ms: int,
    max_steps: int,
) -> list[int]:
    """The evaluation times a cycle at ``now_ms`` runs, oldest first (possibly none).

    Times are multiples of ``interval_ms`` at least ``delay_ms`` old. Without
    a previous evaluation only the newest is run; after one, every later time
    is, from at most ``max_catchup_ms`` back, ``max_steps`` at a time.
    """
    if interval_ms <= 0 or max_steps < 1:
        raise ValueError("interval_ms and max_steps must be positive")
    newest = (now_ms - delay_ms) // interval_ms * interval_ms
    if last_eval_ms is None:
        return [newest]
    first = (last_eval_ms // interval_ms + 1) * interval_ms
    earliest = -(-(newest - max_catchup_ms) // interval_ms) * interval_ms
    first = max(first, earliest)
    if first > newest:
        return []
    last = min(newest, first + (max_steps - 1) * interval_ms)
    return list(range(first, last + 1, interval_ms))
