"""Alert rule evaluation: the vectorised numpy path against the per-device reference loop.

Builds windows for a fleet of ``--devices`` devices split evenly over the
four device types, ``--samples`` samples each (one a minute, as the real
devices report; right-aligned, with empty leading slots, 2% NaN gaps, a few
silent devices and the derived ``vn_aqi`` for air-quality monitors), and
evaluates the shipped default rule set once per run:

- numpy: ``evaluate_all`` over the full windows, median of ``--runs``;
- reference: ``evaluate_reference`` rule by rule over the first
  ``--ref-devices`` devices (the same share of each type), median of
  ``--ref-runs``, then scaled linearly to the full fleet (it is a loop over
  devices, so its time is linear in their number).

Building the windows is not timed (the job keeps them between evaluations).
The two paths are also compared on the subset; the table says how many
(rule, device) results differ (expected: 0). Prints a table; recording it
in bench/RESULTS.md is left to whoever runs it.

    .venv/bin/python bench/bench_alerts.py [--devices N] [--samples W] [--runs N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np

from alerts.evaluate import Outcome, evaluate_all
from alerts.reference import evaluate_reference
from alerts.rules import NO_TS, VN_AQI_METRIC, Rule, Window, load_rules
from contracts.catalog import DEVICE_TYPES

NOW_MS = 1_764_000_000_000
PERIOD_MS = 60_000  # one sample a minute
GAP_SHARE = 0.02  # missing values
SILENT_SHARE = 0.01  # devices whose last sample is an hour old
SHORT_SHARE = 0.05  # devices with fewer samples than the window holds (new, or rebooted)
ACTIVE_SHARE = 0.05  # open alerts going in, so the hysteresis path runs too


def signal(  # noqa: PLR0911 - one return per metric family
    metric: str, shape: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """Plausible values for each metric; enough spread that every rule fires somewhere."""
    n, w = shape
    walk = np.cumsum(rng.normal(0, 1, shape), axis=1)
    level = rng.uniform(0, 1, (n, 1))
    match metric:
        case "pm25" | "pm1" | "pm10":
            return np.round(np.maximum(0, 20 + 250 * level**3 + 5 * walk))
        case "paper_level":
            return np.clip(np.round(100 * level - 0.2 * np.arange(w), 1), 0, 100)
        case "printer_status":
            return np.where(rng.random((n, 1)) < 0.03, 3.0, 0.0) * np.ones(shape)
        case "queue_length":
            return np.maximum(0, np.round(60 * level + 3 * walk))
        case "online":
            return np.where(rng.random((n, 1)) < 0.02, 0.0, 1.0) * np.ones(shape)
        case "packet_loss" | "cpu" | "humidity":
            return np.clip(10 * level**2 + 0.5 * walk, 0, 100)
        case "occupancy" | "vehicles_in":
            stuck = rng.random((n, 1)) < 0.02
            return np.where(stuck, 37.0, rng.poisson(30, shape).astype(np.float64))
        case _:
            return 40 + 10 * level + walk


def build_window(device_type: str, n: int, w: int, rng: np.random.Generator) -> Window:
    ts = NOW_MS - (w - 1 - np.arange(w, dtype=np.int64)) * PERIOD_MS
    ts = np.broadcast_to(ts - rng.integers(0, PERIOD_MS, (n, 1)), (n, w)).copy()
    short = rng.random(n) < SHORT_SHARE
    empty_slots = np.where(short, rng.integers(1, w + 1, n), 0)
    ts[np.arange(w)[None, :] < empty_slots[:, None]] = NO_TS
    silent = rng.random(n) < SILENT_SHARE
    ts[silent] = np.where(ts[silent] != NO_TS, ts[silent] - 3_600_000, NO_TS)
    missing = ts == NO_TS
    values = {}
    for metric in DEVICE_TYPES[device_type].metric_names:
        v = signal(metric, (n, w), rng)
        v[missing | (rng.random((n, w)) < GAP_SHARE)] = np.nan
        values[metric] = v.astype(np.float64)
    if device_type == "air_quality":
        aqi = rng.integers(20, 350, (n, 1)).astype(np.float64)
        values[VN_AQI_METRIC] = np.where(missing, np.nan, aqi)
    last_seen = np.where(missing.all(axis=1), NO_TS, ts.max(axis=1)).astype(np.int64)
    return Window(
        device_type=device_type,
        device_ids=tuple(f"{device_type[:4]}-{i}" for i in range(n)),
        site_ids=tuple(f"site-{i % 500}" for i in range(n)),
        districts=tuple(f"district-{i % 30}" for i in range(n)),
        ts_ms=ts,
        values=values,
        last_seen_ms=last_seen,
    )


def first(window: Window, n: int) -> Window:
    return window.select(np.arange(min(n, window.n_devices)))


def median_s(fn: Callable[[], object], runs: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def reference_all(
    rules: tuple[Rule, ...], windows: dict[str, Window], was: dict[str, np.ndarray]
) -> dict[str, Outcome]:
    return {
        r.rule_id: evaluate_reference(
            r, windows[r.device_type], now_ms=NOW_MS, was_active=was[r.rule_id]
        )
        for r in rules
    }


def differences(a: dict[str, Outcome], b: dict[str, Outcome]) -> int:
    count = 0
    for rule_id, x in a.items():
        y = b[rule_id]
        same_value = np.isclose(x.value, y.value, rtol=1e-9, equal_nan=True)
        count += int(((x.active != y.active) | (x.severity != y.severity) | ~same_value).sum())
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--samples", type=int, default=60)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--ref-devices", type=int, default=5_000)
    parser.add_argument("--ref-runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    rules = load_rules()
    per_type = args.devices // len(DEVICE_TYPES)
    ref_per_type = args.ref_devices // len(DEVICE_TYPES)
    windows = {t: build_window(t, per_type, args.samples, rng) for t in DEVICE_TYPES}
    was = {r.rule_id: rng.random(per_type) < ACTIVE_SHARE for r in rules}
    devices = per_type * len(DEVICE_TYPES)
    ref_windows = {t: first(w, ref_per_type) for t, w in windows.items()}
    ref_was = {k: v[:ref_per_type] for k, v in was.items()}
    ref_devices = ref_per_type * len(DEVICE_TYPES)

    evaluate_all(rules, windows, NOW_MS, was)  # warm-up: imports, first allocations
    fast_s, fast_runs = median_s(lambda: evaluate_all(rules, windows, NOW_MS, was), args.runs)
    ref_s, ref_runs = median_s(lambda: reference_all(rules, ref_windows, ref_was), args.ref_runs)
    ref_full_s = ref_s * devices / ref_devices
    outcomes = evaluate_all(rules, windows, NOW_MS, was)
    diff = differences(
        evaluate_all(rules, ref_windows, NOW_MS, ref_was),
        reference_all(rules, ref_windows, ref_was),
    )
    fired = sum(int(o.active.sum()) for o in outcomes.values())

    print(
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, numpy {np.__version__}"
    )
    print(
        f"{len(rules)} default rules; {devices:,} devices ({per_type:,} per type) "
        f"x {args.samples} samples; {fired:,} (rule, device) alerts active"
    )
    print()
    print("| path | devices timed | runs (s) | median (s) | us per device | full fleet (s) |")
    print("|---|---|---|---|---|---|")
    runs = " / ".join(f"{t:.3f}" for t in fast_runs)
    print(
        f"| numpy `evaluate_all` | {devices:,} | {runs} | {fast_s:.3f} "
        f"| {fast_s / devices * 1e6:.2f} | {fast_s:.3f} |"
    )
    runs = " / ".join(f"{t:.3f}" for t in ref_runs)
    scale = devices / ref_devices
    print(
        f"| per-device reference | {ref_devices:,} | {runs} | {ref_s:.3f} "
        f"| {ref_s / ref_devices * 1e6:.1f} | {ref_full_s:.1f} (scaled x{scale:g}) |"
    )
    print()
    print(f"speed-up (same run): {ref_full_s / fast_s:.0f}x  (target: at least 50x)")
    print(f"results that differ between the two paths on the timed subset: {diff}")


if __name__ == "__main__":
    main()
