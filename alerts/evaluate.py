"""Vectorised rule evaluation: one rule over one device type's window, all devices at once.

``evaluate(rule, window, now_ms=..., was_active=...)`` returns an ``Outcome``:
per device, whether the rule's alert is active, the value that decided and the
current severity. ``evaluate_all`` does it for a rule set, sharing the masks
that several rules of one device type need. Every step is a numpy operation
on the (devices x samples) matrices; there is no per-device Python loop.
``alerts.reference`` computes the same thing one device at a time, for tests.

Samples. A sample counts for a metric when its timestamp is set (not
``NO_TS``), not after ``now_ms``, and its value is not NaN; NaN gaps are
skipped, never filled. "In range" of a duration D means a timestamp in
``[now_ms - D, now_ms]``, both ends included. "Latest" is the last counting
sample in column order (rows are in time order). Durations are converted to
integer milliseconds with ``duration_ms``.

Conditions (``raise``: start or keep the alert; ``clear``: end an active one):

- threshold (metric, op, threshold, for_s, clear): the anchor is the latest
  sample at or before ``now - for_s``. The held level is the least extreme
  value from the anchor's time to now (the minimum for ``>``/``>=``, the
  maximum for ``<``/``<=``): under sample-and-hold, the level the metric has
  kept through all of ``[now - for_s, now]``. It raises when an anchor exists,
  at least one sample is in range, and ``held op threshold``. It clears when
  the latest sample in range no longer meets ``op clear`` (``clear`` defaults
  to ``threshold``; it lies on the near side of it, so between the two the
  alert holds). Value: the held level (over the in-range samples when there
  is no anchor).
- rate_of_change (metric, op, threshold_per_min, window_s, min_span_s): the
  change from the first to the latest sample in range over the time between
  them, in metric units per minute; decided only when that time is at least
  ``min_span_s`` (default half of ``window_s``) and not zero. Raises when
  ``rate op threshold_per_min``.
- flatline (metric, window_s, min_samples, tolerance): the spread (max - min)
  of the samples in range. Raises when there are at least ``min_samples`` of
  them and ``spread <= tolerance``; clears when ``spread > tolerance``.
- no_data (silence_s): the last time the device was seen is the later of
  ``last_seen_ms`` and its newest window timestamp not after now. Raises when
  ``now - last > silence_s`` (strictly); a device never seen does not raise.
  Value: the silence in seconds.
- zscore (metric, op, threshold, window_s, min_samples, min_std): the latest
  sample in range against the device's own baseline, the other samples in
  range: ``z = (latest - mean) / max(std, min_std)`` with the sample standard
  deviation (n - 1). Needs ``min_samples`` baseline samples and a non-zero
  denominator (a perfectly flat baseline gives no z unless ``min_std`` is
  set). Raises when ``z op threshold``. Value: z.
- aqi_band (band, max_age_s): the latest ``vn_aqi`` in range of ``max_age_s``.
  Raises when it is at or above the band's lowest AQI. Value: the AQI.

Apart from threshold's ``clear``, a condition clears when it can be computed
and does not raise; when it cannot be computed (no samples in range, too few
samples, no baseline), nothing is decided: an inactive alert stays inactive
and an active one stays active. A window with no samples in range therefore
never fires (no_data aside) and never clears an alert.

Hysteresis. Each leaf is *on* where ``raise | (was_active & ~clear)``; the
rule's alert is active where its condition tree is on and the device is in
the rule's scope. ``any_of`` is on where any child is on, ``all_of`` where
all are; an active ``any_of`` thus ends when every child clears, an active
``all_of`` when one does.

Values. A leaf's value is computed wherever it can be (NaN elsewhere). An
``any_of`` takes the value of its first child that is on, or of its first
child when none is; an ``all_of`` takes its first child's value when on, or
the first child that is off otherwise. Outside the scope the value is NaN.

Severity. Where active: the rule's severity, or the most severe escalation
step whose level the value meets (``value op level``, with the condition's
op; ``>=`` for aqi_band, ``>`` for no_data). Escalation is only allowed on a
single condition, so the severity of a tree is the rule's severity. The
severity follows the value down as well as up; whether to record a lower
severity is the job's choice. -1 where not active.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from alerts.rules import (
    BAND_LOW_AQI,
    NO_TS,
    UPPER_OPS,
    VN_AQI_METRIC,
    AllOf,
    AnyOf,
    AqiBand,
    Condition,
    Flatline,
    NoData,
    Op,
    RateOfChange,
    Rule,
    Threshold,
    Window,
    ZScore,
    duration_ms,
    escalation_levels,
    scope_mask,
)

_MS_PER_MIN = 60_000
BoolArray = NDArray[np.bool_]
FloatArray = NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Outcome:
    """Per device of the window: alert active, the value that decided, severity index."""

    active: BoolArray
    value: FloatArray
    severity: NDArray[np.int8]  # index into contracts.schema.SEVERITIES; -1 where not active


class _Frame:
    """One window at one ``now``, with the masks that several conditions share.

    ``first`` drops the window's columns left of it (``recent``): rows are
    in time order, so a span's samples all lie right of the first column
    that any row has one in, and a condition over a span reads only those.
    """

    __slots__ = (
        "_recent",
        "_since",
        "_valid",
        "first",
        "now_ms",
        "present",
        "rows",
        "ts",
        "window",
    )

    def __init__(self, window: Window, now_ms: int, first: int = 0) -> None:
        self.window = window
        self.now_ms = now_ms
        self.first = first
        self.ts = window.ts_ms[:, first:] if first else window.ts_ms
        self.present: BoolArray = (self.ts != NO_TS) & (self.ts <= now_ms)
        self.rows = np.arange(window.n_devices)
        self._valid: dict[str, BoolArray] = {}
        self._since: dict[int, BoolArray] = {}
        self._recent: dict[int, _Frame] = {}

    def recent(self, span_ms: int) -> _Frame:
        """This frame from the first column holding a timestamp at or after ``now - span``."""
        start = self.now_ms - span_ms
        ts = self.ts
        lo, hi = 0, ts.shape[1] - 1  # keep one column: an empty one has no argmax
        while lo < hi:  # a column holds one if any row does: monotone, as rows are sorted
            mid = (lo + hi) // 2
            if (ts[:, mid] >= start).any():
                hi = mid
            else:
                lo = mid + 1
        return self.columns_from(self.first + lo)

    def columns_from(self, first: int) -> _Frame:
        """This frame from the window's column ``first`` on (itself if it starts there or later)."""
        if first <= self.first:
            return self
        frame = self._recent.get(first)
        if frame is None:
            frame = _Frame(self.window, self.now_ms, first)
            self._recent[first] = frame
        return frame

    def values(self, metric: str) -> FloatArray:
        try:
            values = self.window.values[metric]
            return values[:, self.first :] if self.first else values
        except KeyError:
            if metric == VN_AQI_METRIC:
                return np.full(self.ts.shape, np.nan)
            raise ValueError(
                f"the {self.window.device_type} window has no metric {metric!r}"
            ) from None

    def valid(self, metric: str) -> BoolArray:
        mask = self._valid.get(metric)
        if mask is None:
            mask = self.present & ~np.isnan(self.values(metric))
            self._valid[metric] = mask
        return mask

    def in_range(self, metric: str, span_ms: int) -> BoolArray:
        start = self.now_ms - span_ms
        since = self._since.get(start)
        if since is None:
            since = self.ts >= start
            self._since[start] = since
        return self.valid(metric) & since

    def latest(self, values: FloatArray, mask: BoolArray) -> tuple[FloatArray, BoolArray]:
        """The value in the last column of each row where ``mask`` is set, and whether any is."""
        has: BoolArray = np.asarray(mask.any(axis=1), dtype=np.bool_)
        last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
        picked = values[self.rows, last]
        return np.where(has, picked, np.nan), has


@dataclass(frozen=True, slots=True)
class _State:
    on: BoolArray
    value: FloatArray


def _meets(values: FloatArray, op: Op, level: float) -> BoolArray:
    """``values op level`` elementwise; False where NaN."""
    if op == ">":
        return values > level
    if op == ">=":
        return values >= level
    if op == "<":
        return values < level
    return values <= level


def _hold(raised: BoolArray, cleared: BoolArray, was: BoolArray) -> BoolArray:
    return raised | (was & ~cleared)


def _threshold(c: Threshold, f: _Frame, was: BoolArray) -> _State:
    """Over the columns from the one before the span's first: they hold most rows' anchors.

    Rows without an anchor there are computed again over every column.
    """
    near = f.recent(duration_ms(c.for_s))
    if near is f:
        return _threshold_over(c, f, was)[0]
    near = f.columns_from(near.first - 1)
    state, has_anchor = _threshold_over(c, near, was)
    rows = np.flatnonzero(~has_anchor)
    if rows.size:
        whole, _ = _threshold_over(c, _Frame(f.window.select(rows), f.now_ms, f.first), was[rows])
        state.on[rows] = whole.on
        state.value[rows] = whole.value
    return state


def _threshold_over(c: Threshold, f: _Frame, was: BoolArray) -> tuple[_State, BoolArray]:
    """The threshold over the frame's columns, and whether each row has an anchor in them."""
    v = f.values(c.metric)
    valid = f.valid(c.metric)
    start = f.now_ms - duration_ms(c.for_s)
    in_range = f.in_range(c.metric, duration_ms(c.for_s))
    has_in_range = in_range.any(axis=1)
    anchor_ts = np.where(valid & (f.ts <= start), f.ts, NO_TS).max(axis=1)
    has_anchor = anchor_ts != NO_TS
    lower = np.where(has_anchor, anchor_ts, start)
    span = valid & (f.ts >= lower[:, None])
    if c.op in UPPER_OPS:
        held = np.where(span, v, np.inf).min(axis=1)
    else:
        held = np.where(span, v, -np.inf).max(axis=1)
    held = np.where(has_anchor | has_in_range, held, np.nan)
    raised = has_anchor & has_in_range & _meets(held, c.op, c.threshold)
    if not was.any():
        return _State(raised, held), has_anchor
    latest, _ = f.latest(v, in_range)
    clear_level = c.threshold if c.clear is None else c.clear
    cleared = has_in_range & ~_meets(latest, c.op, clear_level)
    return _State(_hold(raised, cleared, was), held), has_anchor


def _rate_of_change(c: RateOfChange, f: _Frame, was: BoolArray) -> _State:
    f = f.recent(duration_ms(c.window_s))
    v = f.values(c.metric)
    in_range = f.in_range(c.metric, duration_ms(c.window_s))
    has = in_range.any(axis=1)
    first = np.argmax(in_range, axis=1)
    last = in_range.shape[1] - 1 - np.argmax(in_range[:, ::-1], axis=1)
    dt_ms = np.where(has, f.ts[f.rows, last], 0) - np.where(has, f.ts[f.rows, first], 0)
    ok = (dt_ms > 0) & (dt_ms >= c.min_span_ms)
    dv = v[f.rows, last] - v[f.rows, first]
    rate = np.where(ok, dv * _MS_PER_MIN / np.where(ok, dt_ms, 1), np.nan)
    raised = _meets(rate, c.op, c.threshold_per_min)
    return _State(_hold(raised, ok & ~raised, was), rate)


def _flatline(c: Flatline, f: _Frame, was: BoolArray) -> _State:
    f = f.recent(duration_ms(c.window_s))
    v = f.values(c.metric)
    in_range = f.in_range(c.metric, duration_ms(c.window_s))
    count = in_range.sum(axis=1)
    spread = np.where(in_range, v, -np.inf).max(axis=1) - np.where(in_range, v, np.inf).min(axis=1)
    spread = np.where(count > 0, spread, np.nan)
    raised = (count >= c.min_samples) & (spread <= c.tolerance)
    cleared = spread > c.tolerance
    return _State(_hold(raised, cleared, was), spread)


def _no_data(c: NoData, f: _Frame, was: BoolArray) -> _State:
    newest = np.where(f.present, f.ts, NO_TS).max(axis=1)
    last = np.maximum(newest, f.window.last_seen_ms)
    seen = last != NO_TS
    silence_ms = f.now_ms - np.where(seen, last, f.now_ms)
    raised = seen & (silence_ms > duration_ms(c.silence))
    value = np.where(seen, silence_ms / 1000.0, np.nan)
    return _State(_hold(raised, seen & ~raised, was), value)


def _zscore(c: ZScore, f: _Frame, was: BoolArray) -> _State:
    f = f.recent(duration_ms(c.window_s))
    v = f.values(c.metric)
    in_range = f.in_range(c.metric, duration_ms(c.window_s))
    current, has = f.latest(v, in_range)
    last = in_range.shape[1] - 1 - np.argmax(in_range[:, ::-1], axis=1)
    baseline = in_range.copy()
    baseline[f.rows, last] = False  # rows without samples had nothing to remove
    count = baseline.sum(axis=1)
    mean = np.where(baseline, v, 0.0).sum(axis=1) / np.maximum(count, 1)
    deviation = np.where(baseline, v - mean[:, None], 0.0)
    variance = (deviation * deviation).sum(axis=1) / np.maximum(count - 1, 1)
    sigma = np.maximum(np.sqrt(variance), c.min_std)
    ok = has & (count >= c.min_samples) & (sigma > 0)
    z = np.where(ok, (current - mean) / np.where(ok, sigma, 1.0), np.nan)
    raised = _meets(z, c.op, c.threshold)
    return _State(_hold(raised, ok & ~raised, was), z)


def _aqi_band(c: AqiBand, f: _Frame, was: BoolArray) -> _State:
    f = f.recent(duration_ms(c.max_age_s))
    in_range = f.in_range(VN_AQI_METRIC, duration_ms(c.max_age_s))
    aqi, has = f.latest(f.values(VN_AQI_METRIC), in_range)
    raised = aqi >= BAND_LOW_AQI[c.band]
    return _State(_hold(raised, has & ~raised, was), aqi)


def _any_of(c: AnyOf, f: _Frame, was: BoolArray) -> _State:
    states = [_condition(child, f, was) for child in c.conditions]
    on = np.logical_or.reduce([s.on for s in states])
    value = states[0].value
    for s in reversed(states):  # the first child that is on wins
        value = np.where(s.on, s.value, value)
    return _State(on, np.where(on, value, states[0].value))


def _all_of(c: AllOf, f: _Frame, was: BoolArray) -> _State:
    states = [_condition(child, f, was) for child in c.conditions]
    on = np.logical_and.reduce([s.on for s in states])
    value = states[0].value
    for s in reversed(states):  # the first child that is off decides
        value = np.where(s.on, value, s.value)
    return _State(on, np.where(on, states[0].value, value))


def _condition(c: Condition, f: _Frame, was: BoolArray) -> _State:  # noqa: PLR0911 - one per kind
    match c:
        case Threshold():
            return _threshold(c, f, was)
        case RateOfChange():
            return _rate_of_change(c, f, was)
        case Flatline():
            return _flatline(c, f, was)
        case NoData():
            return _no_data(c, f, was)
        case ZScore():
            return _zscore(c, f, was)
        case AqiBand():
            return _aqi_band(c, f, was)
        case AnyOf():
            return _any_of(c, f, was)
        case AllOf():
            return _all_of(c, f, was)


def _severity(rule: Rule, state: _State) -> NDArray[np.int8]:
    severity = np.full(state.on.shape, rule.severity_index, dtype=np.int8)
    op, steps = escalation_levels(rule)
    for index, level in steps:  # ordered from the least to the most severe
        severity[_meets(state.value, op, level)] = index
    severity[~state.on] = -1
    return severity


def _inactive(n: int) -> Outcome:
    return Outcome(
        active=np.zeros(n, dtype=np.bool_),
        value=np.full(n, np.nan),
        severity=np.full(n, -1, dtype=np.int8),
    )


def _evaluate(rule: Rule, frame: _Frame, was_active: BoolArray) -> Outcome:
    window = frame.window
    n = window.n_devices
    if was_active.shape != (n,):
        raise ValueError(f"was_active must have shape ({n},), got {was_active.shape}")
    was = was_active.astype(np.bool_, copy=False)
    in_scope = scope_mask(rule, window)
    if in_scope.all():
        state = _condition(rule.condition, frame, was)
        return Outcome(active=state.on, value=state.value, severity=_severity(rule, state))
    rows = np.flatnonzero(in_scope)
    if rows.size == 0:
        return _inactive(n)
    sub = _Frame(window.select(rows), frame.now_ms)
    state = _condition(rule.condition, sub, was[rows])
    outcome = _inactive(n)
    outcome.active[rows] = state.on
    outcome.value[rows] = state.value
    outcome.severity[rows] = _severity(rule, state)
    return outcome


def evaluate(rule: Rule, window: Window, *, now_ms: int, was_active: BoolArray) -> Outcome:
    """Evaluate one rule over every device of ``window`` (see the module docstring)."""
    return _evaluate(rule, _Frame(window, now_ms), was_active)


def evaluate_all(
    rules: Iterable[Rule],
    windows: Mapping[str, Window],
    now_ms: int,
    was_active: Mapping[str, BoolArray] | None = None,
) -> dict[str, Outcome]:
    """Evaluate each rule over the window of its device type, by ``rule_id``.

    ``was_active`` maps a rule id to its open alerts (all False when absent).
    Rules whose device type has no window are left out of the result.
    """
    frames = {name: _Frame(window, now_ms) for name, window in windows.items()}
    active = was_active or {}
    outcomes: dict[str, Outcome] = {}
    for rule in rules:
        frame = frames.get(rule.device_type)
        if frame is None:
            continue
        was = active.get(rule.rule_id)
        if was is None:
            was = np.zeros(frame.window.n_devices, dtype=np.bool_)
        outcomes[rule.rule_id] = _evaluate(rule, frame, was)
    return outcomes
