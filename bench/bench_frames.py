"""Serial frame decoding rate, against what a sensor's serial line can deliver.

For each sensor, builds a stream of 100,000 frames with random values, about
5% garbage bytes between frames (bursts of half a frame after one frame in
ten, drawn from all 256 byte values, so false starts occur) and 1% of frames
corrupted (one data byte flipped: a checksum error). Decodes it with
``FrameDecoder`` fed in 64-byte chunks (what a serial read returns; the
chunks are cut before timing) and fed the whole stream at once; median of 5
runs each. Prints a table; recording it in bench/RESULTS.md is left to whoever
runs it.

Columns: good frames decoded per second of one core, stream MB/s, that rate
divided by the most frames a 9600-baud 8N1 line can carry (30/s PMS5003,
96/s SDS011; i.e. saturated lines one core keeps up with), and divided by
what a sensor really sends (~1 frame/s; i.e. sensors one core keeps up with).

    .venv/bin/python bench/bench_frames.py [--frames N] [--runs N]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time
from collections.abc import Callable

from contracts.frames import (
    PMS5003_FRAME_BYTES,
    PMS5003_LINE_FRAMES_PER_S,
    SDS011_FRAME_BYTES,
    SDS011_LINE_FRAMES_PER_S,
    SENSOR_FRAMES_PER_S,
    FrameDecoder,
    Pms5003Frame,
    Sds011Frame,
    SensorKind,
    encode_pms5003,
    encode_sds011,
)

# A serial read returns what the driver has buffered; at 960 bytes/s and a
# read loop that wakes every few tens of ms, 64 bytes is a typical size.
CHUNK_BYTES = 64
GARBAGE_EVERY = 10  # a garbage burst after one frame in ten ...
CORRUPT_EVERY = 100  # ... and one frame in a hundred corrupted


def pms_frame(rng: random.Random) -> bytes:
    pm = [rng.randrange(0, 500) for _ in range(6)]
    counts = [rng.randrange(0, 20000) for _ in range(6)]
    return encode_pms5003(
        Pms5003Frame(
            pm1_cf1=pm[0],
            pm25_cf1=pm[1],
            pm10_cf1=pm[2],
            pm1_atm=pm[3],
            pm25_atm=pm[4],
            pm10_atm=pm[5],
            n0_3=counts[0],
            n0_5=counts[1],
            n1_0=counts[2],
            n2_5=counts[3],
            n5_0=counts[4],
            n10=counts[5],
        )
    )


def sds_frame(rng: random.Random) -> bytes:
    return encode_sds011(
        Sds011Frame(
            pm25=rng.randrange(0, 9999) / 10,
            pm10=rng.randrange(0, 9999) / 10,
            device_id=rng.randrange(0, 0x10000),
        )
    )


def build_stream(
    make: Callable[[random.Random], bytes], frame_bytes: int, frames: int, rng: random.Random
) -> tuple[bytes, int, int]:
    """The stream, the number of good frames in it and its garbage bytes."""
    parts: list[bytes] = []
    good = garbage = 0
    for i in range(frames):
        raw = bytearray(make(rng))
        if i % CORRUPT_EVERY == CORRUPT_EVERY - 1:
            raw[5] ^= 0x5A  # a data byte in both layouts
        else:
            good += 1
        parts.append(bytes(raw))
        if rng.randrange(GARBAGE_EVERY) == 0:
            burst = rng.randbytes(frame_bytes // 2)
            garbage += len(burst)
            parts.append(burst)
    return b"".join(parts), good, garbage


def median_s(run: Callable[[], FrameDecoder], runs: int, expected: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        decoder = run()
        times.append(time.perf_counter() - t0)
        if decoder.frames != expected:
            raise SystemExit(f"decoded {decoder.frames} frames, expected {expected}")
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    print(f"machine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs")
    print(f"python:  {platform.python_implementation()} {platform.python_version()}")
    print(
        f"stream:  {args.frames:,} frames, garbage bursts after 1 in {GARBAGE_EVERY}, "
        f"1 in {CORRUPT_EVERY} corrupted; median of {args.runs} runs"
    )
    print()
    header = (
        "| sensor  | feed          | stream MB | garbage | frames/s  | MB/s  "
        "| x line max (frames/s) | x sensor rate (1/s) |"
    )
    print(header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")
    rng = random.Random(1)
    sensors: list[tuple[SensorKind, Callable[[random.Random], bytes], int, int]] = [
        ("pms5003", pms_frame, PMS5003_FRAME_BYTES, PMS5003_LINE_FRAMES_PER_S),
        ("sds011", sds_frame, SDS011_FRAME_BYTES, SDS011_LINE_FRAMES_PER_S),
    ]
    for kind, make, frame_bytes, line_rate in sensors:
        data, good, garbage = build_stream(make, frame_bytes, args.frames, rng)
        chunks = [data[i : i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)]

        def chunked(kind: SensorKind = kind, chunks: list[bytes] = chunks) -> FrameDecoder:
            decoder = FrameDecoder(kind)
            for chunk in chunks:
                decoder.feed(chunk)
            return decoder

        def whole(kind: SensorKind = kind, data: bytes = data) -> FrameDecoder:
            decoder = FrameDecoder(kind)
            decoder.feed(data)
            return decoder

        for label, run in ((f"{CHUNK_BYTES}-byte reads", chunked), ("one buffer", whole)):
            seconds = median_s(run, args.runs, good)
            rate = good / seconds
            mb_per_s = len(data) / seconds / 1e6
            print(
                f"| {kind:<7} | {label:<13} | {len(data) / 1e6:>9.2f} "
                f"| {garbage / len(data):>7.1%} | {rate:>9,.0f} | {mb_per_s:>5.1f} "
                f"| {rate / line_rate:>21,.0f} | {rate / SENSOR_FRAMES_PER_S:>19,.0f} |"
            )
    print()
    print(
        f"line max: 9600 baud 8N1 = 960 bytes/s = {PMS5003_LINE_FRAMES_PER_S} PMS5003 "
        f"or {SDS011_LINE_FRAMES_PER_S} SDS011 frames/s; the sensors send ~1 frame/s."
    )


if __name__ == "__main__":
    main()
