"""Per-device reference for the rule semantics: plain Python, one device and one sample at a time.

``evaluate_device`` reads one device's samples as a list of ``(ts_ms, value)``
pairs and follows the definitions in ``alerts.evaluate``'s docstring
literally. ``evaluate_reference`` runs it over every device of a window and
returns the same ``Outcome`` as ``alerts.evaluate.evaluate``. Tests compare
the two on random inputs and the benchmark times both; the job never uses
this module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from alerts.evaluate import Outcome
from alerts.rules import (
    BAND_LOW_AQI,
    NO_TS,
    VN_AQI_METRIC,
    AllOf,
    AnyOf,
    AqiBand,
    Condition,
    Flatline,
    NoData,
    RateOfChange,
    Rule,
    Threshold,
    Window,
    ZScore,
)
from contracts.schema import SEVERITIES

Samples = list[tuple[int, float]]


@dataclass(frozen=True, slots=True)
class Device:
    """One device's row of a window, as Python values."""

    device_id: str
    site_id: str
    district: str
    ts_ms: Sequence[int]
    values: Mapping[str, Sequence[float]]
    last_seen_ms: int


def _beyond(x: float, op: str, level: float) -> bool:
    if math.isnan(x):
        return False
    if op == ">":
        return x > level
    if op == ">=":
        return x >= level
    if op == "<":
        return x < level
    return x <= level


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _samples(device: Device, metric: str, now_ms: int) -> Samples:
    """The samples that count, oldest first: timestamp set, not after now, value not NaN."""
    column = device.values.get(metric)
    if column is None:
        return []
    out: Samples = []
    for t, x in zip(device.ts_ms, column, strict=True):
        if t != NO_TS and t <= now_ms and not math.isnan(x):
            out.append((t, x))
    return out


def _since(samples: Samples, start_ms: int) -> Samples:
    return [(t, x) for t, x in samples if t >= start_ms]


def _threshold(c: Threshold, d: Device, now_ms: int, was: bool) -> tuple[bool, float]:
    samples = _samples(d, c.metric, now_ms)
    start = now_ms - _ms(c.for_s)
    anchor = None
    for t, x in samples:
        if t <= start:
            anchor = (t, x)
    recent = _since(samples, start)
    span = _since(samples, anchor[0]) if anchor is not None else recent
    held = math.nan
    if span:
        levels = [x for _, x in span]
        held = min(levels) if c.op in {">", ">="} else max(levels)
    raised = anchor is not None and bool(recent) and _beyond(held, c.op, c.threshold)
    if raised:
        return True, held
    if not was or not recent:
        return was, held
    clear_level = c.threshold if c.clear is None else c.clear
    still = _beyond(recent[-1][1], c.op, clear_level)
    return still, held


def _rate(c: RateOfChange, d: Device, now_ms: int, was: bool) -> tuple[bool, float]:
    recent = _since(_samples(d, c.metric, now_ms), now_ms - _ms(c.window_s))
    if len(recent) < 2:
        return was, math.nan
    (t0, x0), (t1, x1) = recent[0], recent[-1]
    if t1 == t0 or t1 - t0 < c.min_span_ms:
        return was, math.nan
    rate = (x1 - x0) * 60_000 / (t1 - t0)
    return _beyond(rate, c.op, c.threshold_per_min), rate


def _flatline(c: Flatline, d: Device, now_ms: int, was: bool) -> tuple[bool, float]:
    recent = _since(_samples(d, c.metric, now_ms), now_ms - _ms(c.window_s))
    if not recent:
        return was, math.nan
    levels = [x for _, x in recent]
    spread = max(levels) - min(levels)
    if spread > c.tolerance:
        return False, spread
    if len(recent) >= c.min_samples:
        return True, spread
    return was, spread


def _no_data(c: NoData, d: Device, now_ms: int, was: bool) -> tuple[bool, float]:
    last = d.last_seen_ms
    for t in d.ts_ms:
        if t != NO_TS and t <= now_ms and t > last:
            last = t
    if last == NO_TS:
        return was, math.nan
    silence_ms = now_ms - last
    return silence_ms > _ms(c.silence), silence_ms / 1000.0


def _zscore(c: ZScore, d: Device, now_ms: int, was: bool) -> tuple[bool, float]:
    recent = _since(_samples(d, c.metric, now_ms), now_ms - _ms(c.window_s))
    if not recent:
        return was, math.nan
    current = recent[-1][1]
    baseline = [x for _, x in recent[:-1]]
    if len(baseline) < c.min_samples:
        return was, math.nan
    mean = sum(baseline) / len(baseline)
    variance = sum((x - mean) ** 2 for x in baseline) / (len(baseline) - 1)
    sigma = max(math.sqrt(variance), c.min_std)
    if sigma <= 0:
        return was, math.nan
    z = (current - mean) / sigma
    return _beyond(z, c.op, c.threshold), z


def _aqi(c: AqiBand, d: Device, now_ms: int, was: bool) -> tuple[bool, float]:
    recent = _since(_samples(d, VN_AQI_METRIC, now_ms), now_ms - _ms(c.max_age_s))
    if not recent:
        return was, math.nan
    aqi = recent[-1][1]
    return aqi >= BAND_LOW_AQI[c.band], aqi


def _decide(c: Condition, d: Device, now_ms: int, was: bool) -> tuple[bool, float]:  # noqa: PLR0911 - one per kind
    if isinstance(c, AnyOf):
        results = [_decide(child, d, now_ms, was) for child in c.conditions]
        for on, value in results:
            if on:
                return True, value
        return False, results[0][1]
    if isinstance(c, AllOf):
        results = [_decide(child, d, now_ms, was) for child in c.conditions]
        for on, value in results:
            if not on:
                return False, value
        return True, results[0][1]
    if isinstance(c, Threshold):
        return _threshold(c, d, now_ms, was)
    if isinstance(c, RateOfChange):
        return _rate(c, d, now_ms, was)
    if isinstance(c, Flatline):
        return _flatline(c, d, now_ms, was)
    if isinstance(c, NoData):
        return _no_data(c, d, now_ms, was)
    if isinstance(c, ZScore):
        return _zscore(c, d, now_ms, was)
    return _aqi(c, d, now_ms, was)


def _severity(rule: Rule, value: float) -> int:
    c = rule.condition
    op = c.op if isinstance(c, Threshold | RateOfChange | ZScore) else ">"
    if isinstance(c, AqiBand):
        op = ">="
    severity = SEVERITIES.index(rule.severity)
    for step in rule.escalate:
        level = BAND_LOW_AQI[step.band] if step.band is not None else step.threshold
        if level is not None and _beyond(value, op, level):
            severity = min(severity, SEVERITIES.index(step.severity))
    return severity


def _in_scope(rule: Rule, d: Device) -> bool:
    return (
        (not rule.sites or d.site_id in rule.sites)
        and (not rule.districts or d.district in rule.districts)
        and (not rule.device_ids or d.device_id in rule.device_ids)
    )


def evaluate_device(
    rule: Rule, device: Device, *, now_ms: int, was_active: bool
) -> tuple[bool, float, int]:
    """``(active, value, severity index)`` of one device; severity -1 when not active."""
    if not _in_scope(rule, device):
        return False, math.nan, -1
    on, value = _decide(rule.condition, device, now_ms, was_active)
    return on, value, _severity(rule, value) if on else -1


def evaluate_reference(
    rule: Rule, window: Window, *, now_ms: int, was_active: NDArray[np.bool_]
) -> Outcome:
    """``evaluate_device`` for every device of ``window``, as an ``Outcome``."""
    ts_rows = window.ts_ms.tolist()
    value_rows = {metric: matrix.tolist() for metric, matrix in window.values.items()}
    last_seen = window.last_seen_ms.tolist()
    was = was_active.tolist()
    active, values, severities = [], [], []
    for i, device_id in enumerate(window.device_ids):
        device = Device(
            device_id=device_id,
            site_id=window.site_ids[i],
            district=window.districts[i],
            ts_ms=ts_rows[i],
            values={metric: rows[i] for metric, rows in value_rows.items()},
            last_seen_ms=last_seen[i],
        )
        on, value, severity = evaluate_device(rule, device, now_ms=now_ms, was_active=was[i])
        active.append(on)
        values.append(value)
        severities.append(severity)
    return Outcome(
        active=np.array(active, dtype=np.bool_),
        value=np.array(values, dtype=np.float64),
        severity=np.array(severities, dtype=np.int8),
    )
