"""Bytes a reading takes on disk, per device type: the wide layout beside the keyed one.

For every device type of the catalog, the same readings are stored twice on
one private PostgreSQL + TimescaleDB server:

- old: ``readings_{type}`` made by the statements of migration 2 (device id
  as text, ``recv_ts`` timestamptz, key (device_id, ts, seq));
- new: ``readings_{type}_data`` as migration 22 makes it (integer device key,
  receive time as an int4 delay after ``ts``, key (device_key, ts, seq)),
  in a schema migrated to the latest version.

Readings come from ``--devices`` devices every ``--interval-s`` seconds,
interleaved as real traffic arrives (each round in a shuffled device order),
``--rows`` a type. Two fills: every metric filled, and a third of the values
empty (NULL, spread over metrics and rows). After VACUUM ANALYZE, bytes per
row and per stored metric value are ``hypertable_detailed_size`` (heap +
indexes + TOAST, all chunks) over the rows and the non-NULL values, for
the new layout also after ``cityhub db maintain`` packed the key index of
the chunks past their range ("packed", ``pack_closed_chunks``). The
``device_keys`` table (one row per device, shared by all types) is left out:
it grows with the fleet, not with the readings.

Sizes do not depend on the machine's speed: one run is enough.

    .venv/bin/python bench/bench_storage.py [--rows 200000] [--devices 1000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg
from bench_ingest import database_machine

from cityhub import database
from cityhub.localstack.postgres import PostgresServer, find_pg_bindir
from cityhub.localstack.procs import free_port, run_as_for
from contracts.catalog import DEVICE_TYPES, DeviceType, MetricKind
from contracts.schema import readings_data_table, readings_statements, readings_table
from contracts.settings import StorageSettings

OLD, NEW = "bench_old", "bench_new"
T0_MS = 1_790_000_000_000  # 2026-09-21: any fixed time; values do not depend on it

# A random value of each kind, in SQL, for the generated readings.
VALUE_SQL: dict[MetricKind, str] = {
    MetricKind.FLOAT: "(random() * 100)::real",
    MetricKind.INT: "(random() * 1000)::integer",
    MetricKind.ENUM: "(random() * 4)::smallint",
    MetricKind.BOOL: "random() < 0.5",
}


@dataclass(frozen=True)
class Size:
    rows: int
    values: int
    heap_bytes: int
    index_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.heap_bytes + self.index_bytes


def device_ids(dtype: DeviceType, devices: int) -> list[str]:
    """Ids shaped like the fleet's (type prefix, ward, number): about 12 characters."""
    prefix = "".join(word[0] for word in dtype.name.split("_"))
    return [f"{prefix}-hk-{i:04d}" for i in range(devices)]


def _metric_values(dtype: DeviceType, *, third_empty: bool) -> list[str]:
    """Each metric's value expression; with ``third_empty``, NULL for a third of (row, metric)."""
    out = []
    for i, metric in enumerate(dtype.metrics):
        value = VALUE_SQL[metric.kind]
        if third_empty:
            value = f"CASE WHEN (g.step + d.n + {i}) %% 3 = 0 THEN NULL ELSE {value} END"
        out.append(value)
    return out


def _generated(dtype: DeviceType, rounds: int, *, third_empty: bool) -> str:
    """The readings as a SELECT (device_id, step, ts, seq, metrics, delay_ms), in arrival order.

    The device ids and the interval are the parameters ``ids`` and ``interval_ms``.
    """
    values = ", ".join(
        f"{v} AS {m.name}"
        for v, m in zip(_metric_values(dtype, third_empty=third_empty), dtype.metrics, strict=True)
    )
    return f"""SELECT d.device_id, g.step,
            to_timestamp(({T0_MS} + g.step * %(interval_ms)s + d.n) / 1000.0) AS ts,
            g.step::bigint AS seq, {values}, (random() * 2000)::integer AS delay_ms
        FROM generate_series(0, {rounds - 1}) AS g (step)
        CROSS JOIN unnest(%(ids)s::text[]) WITH ORDINALITY AS d (device_id, n)
        ORDER BY g.step, md5(g.step::text || d.device_id)"""


def load_old(
    conn: psycopg.Connection, dtype: DeviceType, query: str, params: dict[str, object]
) -> None:
    table = f"{OLD}.{readings_table(dtype.name)}"
    metrics = ", ".join(dtype.metric_names)
    conn.execute(
        f"INSERT INTO {table} (ts, device_id, seq, recv_ts, {metrics}) "
        f"SELECT x.ts, x.device_id, x.seq, x.ts + x.delay_ms * INTERVAL '1 millisecond', "
        f"{', '.join(f'x.{m}' for m in dtype.metric_names)} FROM ({query}) x",
        params,
    )


def load_new(
    conn: psycopg.Connection, dtype: DeviceType, query: str, params: dict[str, object]
) -> None:
    table = f"{NEW}.{readings_data_table(dtype.name)}"
    metrics = ", ".join(dtype.metric_names)
    conn.execute(
        f"INSERT INTO {table} (ts, seq, device_key, recv_delay_ms, {metrics}) "
        f"SELECT x.ts, x.seq, k.device_key, x.delay_ms, "
        f"{', '.join(f'x.{m}' for m in dtype.metric_names)} FROM ({query}) x "
        f"JOIN {NEW}.device_keys k ON k.device_id = x.device_id ORDER BY x.step",
        params,
    )


def measure(conn: psycopg.Connection, table: str, dtype: DeviceType) -> Size:
    conn.execute(f"VACUUM (ANALYZE) {table}")
    counted = ", ".join(f"count({m})" for m in dtype.metric_names)
    row = conn.execute(f"SELECT count(*), {counted} FROM {table}").fetchone() or (0,)
    heap, index, toast, _total = conn.execute(
        "SELECT table_bytes, index_bytes, toast_bytes, total_bytes "
        "FROM hypertable_detailed_size(%s::regclass)",
        (table,),
    ).fetchone() or (0, 0, 0, 0)
    return Size(
        rows=int(row[0]),
        values=sum(int(v) for v in row[1:]),
        heap_bytes=int(heap) + int(toast),
        index_bytes=int(index),
    )


def run_type(
    conn: psycopg.Connection, dtype: DeviceType, args: argparse.Namespace
) -> dict[tuple[str, bool], Size]:
    ids = device_ids(dtype, args.devices)
    conn.execute(
        f"INSERT INTO {NEW}.device_keys (device_id) SELECT unnest(%s::text[]) "
        "ON CONFLICT DO NOTHING",
        (ids,),
    )
    rounds = -(-args.rows // args.devices)
    params: dict[str, object] = {"ids": ids, "interval_ms": int(args.interval_s * 1000)}
    sizes = {}
    for third_empty in (False, True):
        query = _generated(dtype, rounds, third_empty=third_empty)
        old, new = f"{OLD}.{readings_table(dtype.name)}", f"{NEW}.{readings_data_table(dtype.name)}"
        for table in (old, new):
            conn.execute(f"TRUNCATE {table}")
        load_old(conn, dtype, query, params)
        load_new(conn, dtype, query, params)
        sizes["old", third_empty] = measure(conn, old, dtype)
        sizes["new", third_empty] = measure(conn, new, dtype)
        # `cityhub db maintain` packs the key index of chunks past their range.
        database.pack_closed_chunks(conn, schema=NEW, now=datetime.now(UTC) + timedelta(days=3650))
        sizes["packed", third_empty] = measure(conn, new, dtype)
        conn.execute(f"ALTER INDEX {NEW}.{readings_data_table(dtype.name)}_pkey RESET (fillfactor)")
    return sizes


def report(results: dict[str, dict[tuple[str, bool], Size]], args: argparse.Namespace) -> None:
    print()
    print(
        f"{args.rows:,} readings a type from {args.devices} devices every {args.interval_s:g} s, "
        "interleaved; bytes = heap + indexes + TOAST after VACUUM"
    )
    print()
    print(
        "| type | metrics | fill | B/row (heap + index): old | new | new, packed "
        "| B/value: old | new | new, packed |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, sizes in results.items():
        for third_empty in (False, True):
            layouts = [sizes[k, third_empty] for k in ("old", "new", "packed")]
            fill = "a third empty" if third_empty else "all filled"
            per_row = " | ".join(
                f"{x.total_bytes / x.rows:.1f} ({x.heap_bytes / x.rows:.1f} + "
                f"{x.index_bytes / x.rows:.1f})"
                for x in layouts
            )
            per_value = " | ".join(f"{x.total_bytes / x.values:.1f}" for x in layouts)
            print(
                f"| {name} | {len(DEVICE_TYPES[name].metrics)} | {fill} | {per_row} | {per_value} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="readings a type (>= 200k)")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--interval-s", type=float, default=30.0)
    parser.add_argument("--types", nargs="*", default=list(DEVICE_TYPES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp:
        base = Path(tmp)
        base.chmod(0o755)
        pg = PostgresServer(
            base_dir=base / "postgres",
            port=free_port(),
            bindir=find_pg_bindir(),
            run_as=run_as_for("postgres", is_root=os.geteuid() == 0),
            password_file=base / "postgres.password",
            durable=False,
        )
        pg.start()
        try:
            with psycopg.connect(pg.url(), autocommit=True) as conn:
                storage = StorageSettings()
                database.migrate(conn, schema=NEW, storage=storage)
                conn.execute(f"CREATE SCHEMA {OLD}")
                for name in args.types:
                    for statement in readings_statements(OLD, DEVICE_TYPES[name], storage):
                        conn.execute(statement)
                results = {}
                for name in args.types:
                    results[name] = run_type(conn, DEVICE_TYPES[name], args)
                    print(f"measured {name}", file=sys.stderr, flush=True)
                report(results, args)
                print(f"\nmachine: {database_machine(conn)}")
        finally:
            pg.stop()


if __name__ == "__main__":
    main()
