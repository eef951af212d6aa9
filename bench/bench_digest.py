"""What naming a batch by its payload digest costs, in ingest and in the gateway.

Ingest computes ``payload_digest`` of every batch it receives (once, when it
decodes it); the gateway, for every acked batch, reads the stored payload
back and computes it again before deleting the batch. This measures:

- ``payload_digest`` alone for a 100-row batch (the gateway's test size), a
  500-row batch (the default ``batch_max_rows``) and the 8 MiB maximum, next
  to ``decode_batch`` of the same payload (what ingest does anyway);
- ``Outbox.ack`` per batch, checking digests, against deleting the same
  batches by id alone (the old way), in a real SQLite outbox file.

    .venv/bin/python bench/bench_digest.py [--batches 2000] [--runs 5]

Medians of ``--runs``; prints a table and the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from contracts.ids import batch_id
from contracts.messages import (
    BATCH_MAX_BYTES,
    Batch,
    ReadingBlock,
    decode_batch,
    encode_batch,
    payload_digest,
)
from gateway.outbox import Outbox


def air_batch(rows: int) -> bytes:
    now_ms = time.time_ns() // 1_000_000
    block = ReadingBlock(
        device_type="air_quality",
        device_index=[i % 10 for i in range(rows)],
        seq=list(range(rows)),
        ts_ms=[now_ms - 60_000 + i for i in range(rows)],
        recv_ms=[now_ms - 60_000 + i + 5 for i in range(rows)],
        values={name: [12.5 + i % 7 for i in range(rows)] for name in ("pm1", "pm25", "pm10")},
    )
    batch = Batch(
        batch_id=batch_id("gw-bench", "boot1", rows),
        gateway_id="gw-bench",
        boot_id="boot1",
        sent_ms=now_ms,
        devices=[f"dev-{i}" for i in range(10)],
        blocks=[block],
    )
    return encode_batch(batch)


def per_call_us(fn: Callable[[], object], *, calls: int, runs: int) -> float:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(samples)


def outbox_ack_us(payload: bytes, batches: int, *, by_digest: bool, runs: int) -> float:
    samples = []
    digest = payload_digest(payload)
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            box = Outbox(Path(tmp) / "outbox.sqlite3", max_bytes=2**40, full_policy="refuse")
            ids = [batch_id("gw-bench", "boot1", n) for n in range(batches)]
            box.put([(bid, payload, 100) for bid in ids], now_ms=0)
            started = time.perf_counter()
            for start in range(0, batches, 64):  # ingest acks a commit group at a time
                part = ids[start : start + 64]
                if by_digest:
                    box.ack(part, [digest] * len(part))
                else:
                    _delete_by_id(box.path, part)
            samples.append((time.perf_counter() - started) / batches * 1e6)
            box.close()
    return statistics.median(samples)


def _delete_by_id(path: Path, ids: list[str]) -> None:
    """The old ack: DELETE by batch id only, in one transaction (its own connection)."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("BEGIN IMMEDIATE")
        for bid in ids:
            db.execute("DELETE FROM batches WHERE batch_id = ? RETURNING readings", (bid,))
        db.execute("COMMIT")
    finally:
        db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    now_ms = time.time_ns() // 1_000_000
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print(f"{'payload':>28} {'bytes':>9} {'digest µs':>10} {'decode µs':>10} {'digest/decode':>14}")
    sizes = [("100 rows", air_batch(100)), ("500 rows", air_batch(500))]
    sizes.append(("8 MiB (BATCH_MAX_BYTES)", os.urandom(BATCH_MAX_BYTES)))
    for name, payload in sizes:
        calls = 2000 if len(payload) < 1_000_000 else 10

        def digest_call(p: bytes = payload) -> object:
            return payload_digest(p)

        def decode_call(p: bytes = payload) -> object:
            return decode_batch(p, now_ms=now_ms)

        digest_us = per_call_us(digest_call, calls=calls, runs=args.runs)
        if len(payload) < 1_000_000:
            decode_us = per_call_us(decode_call, calls=calls, runs=args.runs)
            ratio = f"{digest_us / decode_us:.1%}"
            decode = f"{decode_us:.1f}"
        else:
            decode, ratio = "-", "-"
        print(f"{name:>28} {len(payload):>9} {digest_us:>10.1f} {decode:>10} {ratio:>14}")
    payload = air_batch(100)
    by_id = outbox_ack_us(payload, args.batches, by_digest=False, runs=args.runs)
    by_digest = outbox_ack_us(payload, args.batches, by_digest=True, runs=args.runs)
    print(
        f"gateway Outbox.ack of {args.batches} 100-row batches, per batch: "
        f"by id {by_id:.1f} µs, by id + digest {by_digest:.1f} µs"
    )


if __name__ == "__main__":
    main()
