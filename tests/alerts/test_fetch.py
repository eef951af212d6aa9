"""The alerts job's delta fetch: the shared scan of recent rows against the per-device read.

Real PostgreSQL with TimescaleDB: ``fetch_samples`` serves devices whose
cursor is recent with one scan of the recent rows, and the others device by
device; whatever the split, it must return exactly the rows the per-device
read returns, no more (rows at or before a cursor, rows after ``upto``) and
no fewer (a late reading, a device seen for the first time).
"""

from __future__ import annotations

import numpy as np
import psycopg
import pytest

from alerts.store import RECENT_MIN_DEVICES, AlertStore, _metric_expr, _recent, parse_samples
from alerts.window import NO_TS, Samples
from contracts.schema import readings_table

S = 1000
T0 = 1_790_000_000_000
METRICS = ("queue_length", "paper_level")


def _sorted(samples: Samples) -> tuple[np.ndarray, ...]:
    order = np.lexsort((samples.ts_ms, samples.device_index))
    return (
        samples.device_index[order],
        samples.ts_ms[order],
        *(samples.values[m][order] for m in METRICS),
    )


@pytest.fixture
def kiosks(db_conn: psycopg.Connection, migrated: str) -> list[str]:
    devices = [f"k-{n:04d}" for n in range(RECENT_MIN_DEVICES + 150)]
    db_conn.execute(
        f"""INSERT INTO {migrated}.sites (site_id, name, district, kind, latitude, longitude)
        VALUES ('hk-hall', 'Hoan Kiem hall', 'Hoàn Kiếm', 'service_hall', 21.03, 105.85)"""
    )
    db_conn.execute(
        f"""INSERT INTO {migrated}.devices (device_id, device_type, site_id, transport)
        SELECT d, 'kiosk', 'hk-hall', 'mqtt' FROM unnest(%s::text[]) AS d""",
        (devices,),
    )
    # Every device a reading every 10 s for 2 minutes; device k-0007 also
    # one late reading (stored now, timestamped between two of its others).
    db_conn.execute(
        f"""INSERT INTO {migrated}.{readings_table("kiosk")}
            (ts, device_id, seq, recv_ts, queue_length, paper_level)
        SELECT to_timestamp((%s + k * 10000) / 1000.0), d, k, now(), k, n %% 100
        FROM unnest(%s::text[]) WITH ORDINALITY AS u (d, n), generate_series(0, 12) AS k""",
        (T0, devices),
    )
    db_conn.execute(
        f"""INSERT INTO {migrated}.{readings_table("kiosk")}
            (ts, device_id, seq, recv_ts, queue_length, paper_level)
        VALUES (to_timestamp(%s / 1000.0), 'k-0007', 1000, now(), 999, 9)""",
        (T0 + 95 * S,),
    )
    return devices


def test_the_shared_scan_returns_exactly_the_per_device_rows(
    db_url: str, migrated: str, kiosks: list[str]
) -> None:
    n = len(kiosks)
    since = np.full(n, T0 + 100 * S, np.int64)  # most devices: up to date to 100 s
    since[:20] = T0 + 10 * S  # far behind: read device by device
    since[20:25] = NO_TS  # never seen
    since[7] = T0 + 90 * S  # k-0007: before its late reading
    since[30] = T0 + 120 * S  # up to date: nothing new
    since[100:200] = T0 + 80 * S  # a little behind: the shared scan starts here
    assert 0 < int(_recent(np.where(since == NO_TS, -1, since)).sum()) < n
    store = AlertStore(url=db_url, schema=migrated)
    try:
        got = store.fetch_samples(
            device_type="kiosk",
            metrics=METRICS,
            device_ids=kiosks,
            device_index=np.arange(n, dtype=np.int64),
            since_ms=since,
            upto_ms=T0 + 110 * S,
        )
        packed = " || ".join(
            ["int4send(c.i)", "timestamptz_send(r.ts)"]
            + [f"float8send({_metric_expr('kiosk', m)})" for m in METRICS]
        )
        with store._db.session("reference") as conn:
            reference = parse_samples(
                store._fetch_each(
                    conn,
                    device_type="kiosk",
                    packed=packed,
                    device_index=np.arange(n, dtype=np.int64),
                    device_ids=kiosks,
                    since=np.where(since == NO_TS, -1, since),
                    upto_ms=T0 + 110 * S,
                    newest=None,
                ),
                METRICS,
            )
    finally:
        store.close()
    for mine, theirs in zip(_sorted(got), _sorted(reference), strict=True):
        np.testing.assert_array_equal(mine, theirs)
    # The late reading of k-0007 and a never-seen device's whole history are in.
    assert (T0 + 95 * S) in got.ts_ms[got.device_index == 7].tolist()
    assert len(got.ts_ms[got.device_index == 20]) == 12  # 0 s .. 110 s
    assert not len(got.ts_ms[got.device_index == 30])
    assert got.ts_ms.max() <= T0 + 110 * S
