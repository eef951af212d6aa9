"""The alerts job's cycle: delta fetch + rule evaluation + alert and AQI writes, for a fleet.

Starts a private PostgreSQL/TimescaleDB (fsync on, as deployed), migrates a
schema and registers ``--devices`` devices split evenly over the four device
types (one site per 100 devices, in six districts), with ``--history-min``
minutes of readings at one reading per 10 s already stored. The job runs the
shipped rules plus one bench rule (kiosk queue > 40 for 20 s, clear at 25)
that a rotating tenth of the kiosks trips, so every cycle raises and clears
alerts, and computes the VN_AQI of the air-quality monitors.

Measured, in the same run:

- start-up: the job's first cycle (device list, each device's newest window
  samples and the AQI ring's hourly sums, then one evaluation);
- ``--cycles`` steady cycles: before each, one new reading per device (10 s
  later) is COPYed in; the cycle (``AlertsJob.run_cycle``) is timed whole and
  by part: delta fetch, evaluation (buffers, rules, lifecycle, AQI), writes;
- the delta fetch alone both ways: ``COPY (SELECT ...) TO STDOUT (FORMAT
  BINARY)`` parsed by numpy (what the job uses) against the same SELECT
  fetched with psycopg's binary protocol into Python tuples.

Medians; prints a table and the machine.

    .venv/bin/python bench/bench_alerts_job.py [--devices 10000] [--cycles 7]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import psycopg

from alerts.rules import load_rules
from alerts.service import AlertsJob
from alerts.store import _MS, _metric_expr
from cityhub import database
from cityhub.localstack.postgres import PostgresServer, find_pg_bindir
from cityhub.localstack.procs import free_port, run_as_for
from contracts.catalog import DEVICE_TYPES, MetricKind
from contracts.schema import readings_table
from contracts.settings import AlertsSettings, DatabaseSettings, StorageSettings
from ingest.copyformat import CopyColumn, encode_copy_binary

SCHEMA = "bench"
PERIOD_MS = 10_000
DISTRICTS = ("Ba Đình", "Hoàn Kiếm", "Đống Đa", "Cầu Giấy", "Hai Bà Trưng", "Long Biên")
BENCH_RULE = """
[[rule]]
rule_id = "bench-queue"
name = "Queue long (bench)"
device_type = "kiosk"
severity = "minor"
message = "{value:.0f} waiting at {site_id}"
escalate = [{ severity = "major", threshold = 80 }]
condition.kind = "threshold"
condition.metric = "queue_length"
condition.op = ">"
condition.threshold = 40
condition.clear = 25
condition.for_s = 20
"""
# A kiosk is busy (queue 60) in cycles where (index + cycle) % BUSY_EVERY < BUSY_FOR.
BUSY_EVERY, BUSY_FOR = 50, 5


def fleet(devices: int, types: list[str] | None = None) -> dict[str, list[str]]:
    """``devices`` split evenly over ``types`` (default: every catalog type)."""
    types = types or list(DEVICE_TYPES)
    per_type = devices // len(types)
    return {t: [f"{t.replace('_', '')}-{i:05d}" for i in range(per_type)] for t in types}


def register(conn: psycopg.Connection, devices: dict[str, list[str]]) -> None:
    total = sum(len(v) for v in devices.values())
    sites = [f"site-{i:04d}" for i in range(max(1, total // 100))]
    with conn.cursor() as cur:
        cur.executemany(
            f"INSERT INTO {SCHEMA}.sites (site_id, name, district, kind, latitude, longitude) "
            "VALUES (%s, %s, %s, 'street_monitor', 21.03, 105.83)",
            [(s, s, DISTRICTS[i % len(DISTRICTS)]) for i, s in enumerate(sites)],
        )
        rows = [
            (d, t, sites[(k * 7 + i) % len(sites)])
            for k, (t, ids) in enumerate(devices.items())
            for i, d in enumerate(ids)
        ]
        cur.executemany(
            f"INSERT INTO {SCHEMA}.devices (device_id, device_type, site_id, transport) "
            "VALUES (%s, %s, %s, 'mqtt')",
            rows,
        )


def values_for(
    device_type: str, n: int, cycle: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """One reading per device: calm, plausible values; a rotating tenth of kiosks busy."""
    out: dict[str, np.ndarray] = {}
    for m in DEVICE_TYPES[device_type].metrics:
        if m.kind is MetricKind.FLOAT:
            mid = m.min + (m.max - m.min) * 0.05
            out[m.name] = np.round(mid + rng.normal(0, max(1.0, mid * 0.05), n), 1).clip(
                m.min, m.max
            )
        elif m.kind is MetricKind.BOOL:
            out[m.name] = np.ones(n)
        elif m.kind is MetricKind.ENUM:
            out[m.name] = np.zeros(n)
        else:
            out[m.name] = rng.integers(1, 30, n).astype(np.float64)
    if device_type == "kiosk":
        busy = (np.arange(n) + cycle) % BUSY_EVERY < BUSY_FOR
        out["queue_length"] = np.where(busy, 60.0, out["queue_length"])
        out["paper_level"] = np.full(n, 60.0)
        out["cpu_temperature"] = np.round(50 + rng.normal(0, 0.3, n), 1)
    if device_type == "camera_counter":
        out["occupancy"] = rng.integers(0, 200, n).astype(np.float64)
        out["vehicles_in"] = rng.integers(50, 400, n).astype(np.float64)
    if device_type == "conference_endpoint":
        out["packet_loss"] = np.round(rng.uniform(0, 1, n), 2)
    if device_type == "air_quality":
        out["pm25"] = np.round(35 + rng.normal(0, 4, n), 1).clip(0, None)
    return out


def copy_readings(
    conn: psycopg.Connection,
    devices: dict[str, list[str]],
    times_ms: list[int],
    rng: np.random.Generator,
    first_cycle: int,
) -> int:
    rows = 0
    for device_type, ids in devices.items():
        dtype = DEVICE_TYPES[device_type]
        n = len(ids)
        parts = []
        for k, t in enumerate(times_ms):
            values = values_for(device_type, n, first_cycle + k, rng)
            parts.append((np.full(n, t, np.int64), values))
        ts = np.concatenate([p[0] for p in parts])
        count = len(ts)
        codes = np.tile(np.arange(n), len(times_ms))
        sql_types = {MetricKind.FLOAT: "real", MetricKind.INT: "integer"}
        sql_types |= {MetricKind.BOOL: "boolean", MetricKind.ENUM: "smallint"}
        columns = [
            CopyColumn("timestamptz", ts),
            CopyColumn("text", codes, labels=ids),
            CopyColumn("bigint", ts // 1000),
            CopyColumn("timestamptz", ts),
        ]
        columns += [
            CopyColumn(sql_types[m.kind], np.concatenate([p[1][m.name] for p in parts]))
            for m in dtype.metrics
        ]
        names = ", ".join(m.name for m in dtype.metrics)
        with (
            conn.cursor() as cur,
            cur.copy(
                f"COPY {SCHEMA}.{readings_table(device_type)} (ts, device_id, seq, recv_ts, "
                f"{names}) FROM STDIN (FORMAT BINARY)"
            ) as copy,
        ):
            copy.write(encode_copy_binary(columns, count))
        rows += count
    return rows


def _delta_select(job: AlertsJob, device_type: str) -> str:
    metrics = job._fetch_metrics(device_type)
    columns = "".join(f", {_metric_expr(device_type, m)}" for m in metrics)
    return f"""SELECT c.i, r.ts{columns}
        FROM unnest(%s::int4[], %s::text[], %s::int8[]) AS c (i, device_id, since_ms)
        CROSS JOIN LATERAL (
            SELECT * FROM {SCHEMA}.{readings_table(device_type)} r
            WHERE r.device_id = c.device_id
            AND r.ts > {_MS.format("c.since_ms")} AND r.ts <= {_MS.format("%s")}) r"""


def _delta_params(job: AlertsJob, device_type: str, upto_ms: int) -> list[object]:
    buffer = job.buffers[device_type]
    since = buffer.cursors - PERIOD_MS
    return [list(range(len(buffer))), list(buffer.devices.device_ids), since.tolist(), upto_ms]


def fetch_tuples(conn: psycopg.Connection, job: AlertsJob, upto_ms: int) -> tuple[int, float]:
    """The delta as a plain SELECT: psycopg binary rows -> tuples -> numpy."""
    started = time.perf_counter()
    total = 0
    for device_type in job.buffers:
        with conn.cursor(binary=True) as cur:
            cur.execute(_delta_select(job, device_type), _delta_params(job, device_type, upto_ms))
            rows = cur.fetchall()
        if not rows:  # a catalog type with no devices in this run
            continue
        index = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        ts = np.fromiter((r[1].timestamp() * 1000 for r in rows), np.float64, len(rows))
        values = np.array([r[2:] for r in rows], np.float64).reshape(len(rows), -1)
        total += len(index) + 0 * (len(ts) + values.size)
    return total, time.perf_counter() - started


def fetch_copy(conn: psycopg.Connection, job: AlertsJob, upto_ms: int) -> tuple[int, float]:
    """The delta as COPY (SELECT ...) TO STDOUT (FORMAT BINARY), parsed by numpy."""
    started = time.perf_counter()
    total = 0
    for device_type in job.buffers:
        metrics = job._fetch_metrics(device_type)
        buf = bytearray()
        with (
            conn.cursor() as cur,
            cur.copy(
                f"COPY ({_delta_select(job, device_type)}) TO STDOUT (FORMAT BINARY)",
                _delta_params(job, device_type, upto_ms),
            ) as copy,
        ):
            for chunk in copy:
                buf += chunk
        fields = [("n", ">i2"), ("li", ">i4"), ("i", ">i4"), ("lt", ">i4"), ("ts", ">i8")]
        fields += [x for k in range(len(metrics)) for x in ((f"l{k}", ">i4"), (f"m{k}", ">f8"))]
        dtype = np.dtype(fields)
        records = np.frombuffer(
            bytes(buf), dtype, count=(len(buf) - 21) // dtype.itemsize, offset=19
        )
        total += len(records)
    return total, time.perf_counter() - started


def fetch_packed(job: AlertsJob, upto_ms: int) -> tuple[int, float]:
    """What the job does: one bytea of packed records per type, read by numpy."""
    started = time.perf_counter()
    total = 0
    for device_type, buffer in job.buffers.items():
        samples = job.store.fetch_samples(
            device_type=device_type,
            metrics=job._fetch_metrics(device_type),
            device_ids=buffer.devices.device_ids,
            device_index=np.arange(len(buffer), dtype=np.int64),
            since_ms=buffer.cursors - PERIOD_MS,
            upto_ms=upto_ms,
        )
        total += len(samples)
    return total, time.perf_counter() - started


def start_job(url: str, tmp: Path, now_ms: int) -> tuple[AlertsJob, float]:
    """The job with the shipped rules and the bench rule, after its start-up cycle."""
    rule_file = tmp / "bench_rules.toml"
    rule_file.write_text(BENCH_RULE, encoding="utf-8")
    settings = AlertsSettings(evaluation_delay_s=0.0, devices_refresh_s=3600.0)
    job = AlertsJob(
        settings=settings,
        database=DatabaseSettings(url=url, schema=SCHEMA),
        rules=load_rules([rule_file]),
    )
    widths = {t: b.width for t, b in job.buffers.items()}
    print(f"rules: {len(job.rules)}; window widths (samples): {widths}")
    started = time.perf_counter()
    first = job.run_cycle(now_ms)
    startup_s = time.perf_counter() - started
    print(
        f"start-up cycle: {startup_s:.2f} s (load {first.load_s:.2f} s, "
        f"fetch {first.fetch_s:.2f} s, evaluate {first.evaluate_s:.2f} s, "
        f"{first.raised} raised)"
    )
    return job, startup_s


def run(args: argparse.Namespace, pg: PostgresServer, tmp: Path) -> None:
    url = pg.url()
    conn = psycopg.connect(url, autocommit=True)
    database.migrate(conn, schema=SCHEMA, storage=StorageSettings())
    devices = fleet(args.devices, args.types.split(",") if args.types else None)
    register(conn, devices)
    rng = np.random.default_rng(11)
    now_ms = time.time_ns() // 1_000_000 // PERIOD_MS * PERIOD_MS
    history = [now_ms - k * PERIOD_MS for k in range(args.history_min * 6, -1, -1)]
    started = time.perf_counter()
    rows = copy_readings(conn, devices, history, rng, -len(history))
    print(f"history: {rows:,} readings in {time.perf_counter() - started:.1f} s")
    conn.execute(f"ANALYZE {SCHEMA}.readings_kiosk")

    job, startup_s = start_job(url, tmp, now_ms)

    totals, fetches, evals, writes, changes, aqi = [], [], [], [], [], []
    fetch_packed_s, fetch_copy_s, fetch_tuple_s = [], [], []
    aqi_cycles = []
    for cycle in range(1, args.cycles + 1):
        t = now_ms + cycle * PERIOD_MS
        copy_readings(conn, devices, [t], rng, cycle)
        started = time.perf_counter()
        report = job.run_cycle(t)
        totals.append(time.perf_counter() - started)
        if report.evaluated != [t]:
            raise SystemExit(f"cycle {cycle} evaluated {report.evaluated}, expected [{t}]")
        fetches.append(report.fetch_s)
        evals.append(report.evaluate_s)
        writes.append(report.write_s)
        changes.append(report.raised + report.escalated + report.cleared)
        aqi.append(report.aqi_hourly + report.aqi_daily)
        if aqi[-1]:
            aqi_cycles.append(totals[-1])
        print(
            f"cycle {cycle}: {totals[-1]:.3f} s  rows {report.rows:,}  fetch "
            f"{report.fetch_s:.3f}  evaluate {report.evaluate_s:.3f}  write {report.write_s:.3f}"
            f"  raised {report.raised} escalated {report.escalated} cleared {report.cleared}"
            f"  AQI rows {aqi[-1]}"
        )
        # The same delta (the last reading of each device) fetched three ways.
        n, s = fetch_packed(job, t)
        fetch_packed_s.append(s)
        m, s = fetch_copy(conn, job, t)
        fetch_copy_s.append(s)
        k, s = fetch_tuples(conn, job, t)
        fetch_tuple_s.append(s)
        if not n == m == k:
            raise SystemExit(f"the three fetches disagree: {n}, {m}, {k} rows")
    job.close()
    open_alerts = conn.execute(
        f"SELECT count(*) FROM {SCHEMA}.alerts WHERE state LIKE 'active%%'"
    ).fetchone()
    conn.close()

    print_table(
        job=job,
        devices=devices,
        open_alerts=open_alerts[0] if open_alerts else 0,
        startup_s=startup_s,
        series={
            "totals": totals,
            "fetches": fetches,
            "evals": evals,
            "writes": writes,
            "changes": changes,
            "aqi": aqi,
            "aqi_cycles": aqi_cycles,
            "fetch_packed": fetch_packed_s,
            "fetch_copy": fetch_copy_s,
            "fetch_tuple": fetch_tuple_s,
        },
    )


def print_table(
    *,
    job: AlertsJob,
    devices: dict[str, list[str]],
    open_alerts: int,
    startup_s: float,
    series: dict[str, list[Any]],
) -> None:
    med = statistics.median
    totals, aqi, changes = series["totals"], series["aqi"], series["changes"]
    print()
    print(f"devices: {sum(len(v) for v in devices.values()):,} ({len(devices)} types); ")
    print(f"open alerts at the end: {open_alerts}")
    print("| measure | median | runs |")
    print("|---|---|---|")
    print(f"| start-up cycle (rebuild windows + AQI ring, 1 evaluation) | {startup_s:.2f} s | 1 |")
    quiet = [x for x, a in zip(totals, aqi, strict=True) if not a]
    for name, values in (
        ("whole cycle (delta fetch + evaluation + writes)", totals),
        ("whole cycle, without the AQI pass", quiet),
        ("whole cycle, with the AQI pass (every 60 s)", series["aqi_cycles"]),
        ("delta fetch (packed records -> numpy, all types)", series["fetches"]),
        (f"evaluation (buffers, {len(job.rules)} rules, lifecycle, AQI rows)", series["evals"]),
        ("writes (one transaction: open alerts, changes, AQI, job state)", series["writes"]),
        (
            "delta fetch alone: one bytea of packed records -> numpy (the job)",
            series["fetch_packed"],
        ),
        ("delta fetch alone: COPY TO STDOUT binary -> numpy", series["fetch_copy"]),
        ("delta fetch alone: SELECT, binary rows -> tuples -> numpy", series["fetch_tuple"]),
    ):
        if not values:
            continue
        runs = " / ".join(f"{x:.3f}" for x in values)
        print(f"| {name} | {med(values) * 1000:.0f} ms | {runs} |")
    print(f"| alert changes per cycle | {med(changes):.0f} | {changes} |")
    print(f"| AQI rows per cycle | {med(aqi):.0f} | {aqi} |")
    print(
        f"\nmachine: {platform.platform()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, numpy {np.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--cycles", type=int, default=7)
    parser.add_argument("--history-min", type=int, default=30)
    parser.add_argument(
        "--types",
        default="",
        help="comma-separated device types to simulate (default: all; before the catalog "
        "had seven, all meant air_quality,kiosk,camera_counter,conference_endpoint)",
    )
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cityhub-bench-alerts-"))
    tmp.chmod(0o755)
    is_root = os.geteuid() == 0
    pg = PostgresServer(
        base_dir=tmp / "postgres",
        port=free_port(),
        bindir=find_pg_bindir(),
        run_as=run_as_for("postgres", is_root=is_root),
        password_file=tmp / "postgres.password",
        durable=True,
    )
    pg.start()
    try:
        run(args, pg, tmp)
    finally:
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
