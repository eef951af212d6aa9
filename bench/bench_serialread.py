"""The gateway's serial read path, per read: ``SerialSource``'s loop from bytes to metrics.

Runs ``SerialSource._read`` (decode, the per-read counts callback, metrics per
frame) over a stream of sensor frames cut in 64-byte reads (what a read of a
9600-baud line returns; see bench_frames.py), served by an in-memory reader
so that only the gateway's own code is timed. Cases: a PMS5003, an SDS011
without ``on_replies`` (the frame path as before commands), an SDS011 with
``on_replies`` (``FrameDecoder.feed_all``), and the same with one command
reply in the stream every 100 frames (far more than a sensor sends: one per
command). Best of ``--runs`` runs of ``--reads`` reads each; microseconds
per read. Prints a table; recording it in bench/RESULTS.md is left to whoever
runs it. Runs on a checkout whose ``SerialSource`` has no ``on_replies``
too (those cases are then skipped), for a before/after comparison.

    .venv/bin/python bench/bench_serialread.py [--reads N] [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import logging
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contracts.frames import (
    Pms5003Frame,
    Sds011Frame,
    Sds011Reply,
    SensorKind,
    encode_pms5003,
    encode_sds011,
    encode_sds011_reply,
)
from gateway.serialport import SerialSource

READ_BYTES = 64
REPLY_EVERY = 100


class ChunkReader:
    """A reader that returns the next chunk per read, then b"" (the port closed)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = iter(chunks)

    async def read(self, _n: int) -> bytes:
        return next(self._chunks, b"")


def stream(kind: SensorKind, frames: int, *, replies: bool, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    parts = []
    for i in range(frames):
        if kind == "pms5003":
            pm = [rng.randrange(0, 500) for _ in range(6)]
            parts.append(
                encode_pms5003(
                    Pms5003Frame(
                        pm1_cf1=pm[0],
                        pm25_cf1=pm[1],
                        pm10_cf1=pm[2],
                        pm1_atm=pm[3],
                        pm25_atm=pm[4],
                        pm10_atm=pm[5],
                        n0_3=0,
                        n0_5=0,
                        n1_0=0,
                        n2_5=0,
                        n5_0=0,
                        n10=0,
                    )
                )
            )
        else:
            parts.append(
                encode_sds011(
                    Sds011Frame(
                        pm25=rng.randrange(0, 5000) / 10,
                        pm10=rng.randrange(0, 5000) / 10,
                        device_id=0xA160,
                    )
                )
            )
            if replies and i % REPLY_EVERY == 0:
                reply = Sds011Reply(command=8, data=bytes((1, 5, 0)), device_id=0xA160)
                parts.append(encode_sds011_reply(reply))
    return b"".join(parts)


def has_on_replies() -> bool:
    return "on_replies" in inspect.signature(SerialSource.__init__).parameters


def time_reads(kind: SensorKind, chunks: list[bytes], *, with_replies: bool) -> tuple[float, int]:
    metrics = [0]
    replies = [0]

    def on_metrics(_m: dict[str, float]) -> None:
        metrics[0] += 1

    def on_replies(found: list[Sds011Reply]) -> None:
        replies[0] += len(found)

    options: dict[str, Any] = {}
    if with_replies:
        options["on_replies"] = on_replies
    source = SerialSource(
        port="bench",
        protocol=kind,
        name="bench",
        on_metrics=on_metrics,
        on_decoded=lambda *_counts: None,
        on_reopen=lambda: None,
        **options,
    )
    reader: Any = ChunkReader(chunks)
    start = time.perf_counter()
    asyncio.run(source._read(reader))  # the loop under test, without a port
    elapsed = time.perf_counter() - start
    return elapsed, metrics[0] + replies[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    # Each run ends with the port "closed" warning: not news here.
    logging.getLogger("gateway.serialport").setLevel(logging.ERROR)
    cases: list[tuple[str, SensorKind, bool, bool]] = [
        ("PMS5003", "pms5003", False, False),
        ("SDS011, no on_replies", "sds011", False, False),
    ]
    if has_on_replies():
        cases += [
            ("SDS011, on_replies", "sds011", True, False),
            (f"SDS011, on_replies, a reply per {REPLY_EVERY} frames", "sds011", True, True),
        ]
    print(
        f"python {platform.python_version()}, {platform.machine()}, "
        f"{os.cpu_count()} cpus; {args.reads} reads of {READ_BYTES} bytes, best of {args.runs}"
    )
    print("| case | us a read | items a read |")
    print("|---|---|---|")
    for label, kind, with_replies, replies in cases:
        frame_bytes = 32 if kind == "pms5003" else 10
        data = stream(kind, args.reads * READ_BYTES // frame_bytes + 1, replies=replies)
        chunks = [data[i : i + READ_BYTES] for i in range(0, len(data), READ_BYTES)]
        chunks = chunks[: args.reads]
        best = min(time_reads(kind, chunks, with_replies=with_replies) for _ in range(args.runs))
        print(f"| {label} | {best[0] / len(chunks) * 1e6:.2f} | {best[1] / len(chunks):.2f} |")


if __name__ == "__main__":
    main()
