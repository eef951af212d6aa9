"""Write the seed corpus of every target from the real encoders.

``python -m fuzz.seeds`` (re)writes ``fuzz/corpus/<target>/seed-*``: good
messages of every device type, frames of both sensors in a noisy stream,
MQTT packets of every kind a client reads, topics of every kind. The inputs
the fuzzer found and minimised live next to them (named by their hash) and
are left alone. Each seed starts with the choice byte(s) its target reads
(see ``fuzz.targets``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from contracts import catalog
from contracts.commands import (
    Command,
    CommandReports,
    DeviceAnswer,
    GatewayCommands,
    encode_command,
    encode_command_reports,
    encode_device_answer,
    encode_gateway_commands,
    make_report,
)
from contracts.frames import Pms5003Frame, Sds011Frame, encode_pms5003, encode_sds011
from contracts.ids import batch_id
from contracts.messages import (
    Ack,
    Batch,
    DeviceConfig,
    DeviceUplink,
    GatewayConfig,
    GatewayState,
    ReadingBlock,
    RejectCount,
    encode_ack,
    encode_batch,
    encode_device_status,
    encode_device_uplink,
    encode_gateway_config,
    encode_gateway_state,
    revoked_gateway_state,
)
from contracts.mqttcodec import (
    CONNACK,
    DISCONNECT,
    PINGRESP,
    PUBACK,
    SUBACK,
    UNSUBACK,
    encode_publish,
)
from contracts.topics import device_status_topic, device_uplink_topic, gateway_topic
from fuzz.targets import (
    BATCH_TOPICS,
    DEVICE_TYPE_NAMES,
    GATEWAY_ID,
    NOW_MS,
    PREFIXES,
    STATE_TOPICS,
)

CORPUS_DIR: Final = Path(__file__).parent / "corpus"
BOOT_ID: Final = "b0"


def _good_value(metric: catalog.Metric) -> float:
    if metric.kind is catalog.MetricKind.FLOAT:
        return (metric.min + metric.max) / 2
    return float(int(metric.min))


def _uplinks() -> Iterator[tuple[str, bytes]]:
    for index, name in enumerate(DEVICE_TYPE_NAMES[:-1]):
        dtype = catalog.DEVICE_TYPES[name]
        metrics = {m.name: _good_value(m) for m in dtype.metrics}
        uplink = DeviceUplink(seq=7, ts_ms=NOW_MS - 1000, metrics=metrics, boot="b1")
        yield name, bytes((index,)) + encode_device_uplink(uplink)
    yield "minimal", b"\x00" + b'{"seq":0,"ts":%d,"m":{"pm25":1}}' % NOW_MS
    # Paths mutation did not reach in a million inputs (coverage.py over the
    # corpus): nesting past the recursion limit, invalid UTF-8 in a key, a
    # float and an integer too large for a double.
    head = b'\x00{"seq":1,"ts":%d,"m":{"pm' % NOW_MS
    yield "deep", head + b'25":' + b"[" * 3000
    yield "bad-utf8", head + b'\xff5":1}}'
    yield "huge-float", head + b'25":1e999}}'
    yield "huge-int", head + b'25":1' + b"0" * 400 + b"}}"


def _batch(counter: int, *, rows: int, bad: bool = False) -> Batch:
    devices = [f"dev-{i}" for i in range(len(catalog.DEVICE_TYPES) + 2)]
    blocks = []
    for index, name in enumerate(sorted(catalog.DEVICE_TYPES)):
        dtype = catalog.DEVICE_TYPES[name]
        values: dict[str, list[float | None]] = {
            m.name: [_good_value(m)] * rows for m in dtype.metrics
        }
        if bad and rows:
            first = dtype.metrics[0]
            values[first.name][0] = float("nan")
            values[first.name][-1] = first.max * 2 + 1
        blocks.append(
            ReadingBlock(
                device_type=name,
                device_index=[index] * rows,
                seq=list(range(rows)),
                ts_ms=[NOW_MS - 1000 + i for i in range(rows)],
                recv_ms=[NOW_MS - 500 + i for i in range(rows)],
                values=values,
            )
        )
    return Batch(
        batch_id=batch_id(GATEWAY_ID, BOOT_ID, counter),
        gateway_id=GATEWAY_ID,
        boot_id=BOOT_ID,
        sent_ms=NOW_MS - 100,
        devices=devices,
        blocks=blocks,
        device_boot=[None, "b1", *([None] * (len(devices) - 2))],
    )


def _batches() -> Iterator[tuple[str, bytes]]:
    yield "one-row", encode_batch(_batch(1, rows=1))
    yield "rows", encode_batch(_batch(2, rows=5))
    yield "bad-rows", encode_batch(_batch(3, rows=4, bad=True))
    yield "empty", encode_batch(_batch(4, rows=0))


def _state(status: str = "online") -> GatewayState:
    return GatewayState(
        gateway_id=GATEWAY_ID,
        status="online" if status == "online" else "offline",
        birth=3,
        boot_id=BOOT_ID,
        version="1.4.0",
        outbox_depth=2,
        ts_ms=NOW_MS,
        outbox_readings=200,
        readings_per_s=12.5,
        received=1000,
        accepted=990,
        rejected=10,
        site_ready=True,
        # The periodic (online) state reports its rejects; the last one too.
        rejects=(
            RejectCount(
                device_id="aq-hk-01",
                reason="malformed",
                count=10,
                first_ms=NOW_MS - 9_000,
                last_ms=NOW_MS - 1_000,
                detail="expected ',' or '}'",
                sample=b'{"seq": 7, "ts": ',
                sample_of_bytes=17,
            ),
        )
        if status == "online"
        else (),
        rejects_dropped=1 if status == "online" else 0,
        # A full outbox's losses, totals kept in its file.
        outbox_refused_readings=7 if status == "online" else 0,
        outbox_dropped_readings=5 if status == "online" else 0,
    )


def _config() -> GatewayConfig:
    return GatewayConfig(
        gateway_id=GATEWAY_ID,
        version=4,
        site_id="site-a",
        devices=[
            DeviceConfig(
                device_id="aq-1",
                device_type="air_quality",
                transport="serial",
                port="/dev/ttyUSB0",
                protocol="pms5003",
            ),
            DeviceConfig(
                device_id="aq-2",
                device_type="air_quality",
                transport="serial",
                port="socket://127.0.0.1:7000",
                protocol="sds011",
            ),
            DeviceConfig(device_id="kiosk-1", device_type="kiosk", transport="mqtt", label="hall"),
        ],
    )


def _frames() -> Iterator[tuple[str, bytes]]:
    pms = encode_pms5003(
        Pms5003Frame(
            pm1_cf1=5, pm25_cf1=9, pm10_cf1=12, pm1_atm=5, pm25_atm=9, pm10_atm=12,
            n0_3=900, n0_5=300, n1_0=50, n2_5=5, n5_0=1, n10=0,
        )
    )  # fmt: skip
    sds = encode_sds011(Sds011Frame(pm25=12.3, pm10=45.6, device_id=0xA160))
    # Byte 0 picks the sensor (even PMS5003, odd SDS011), byte 1 the split point.
    yield "pms", b"\x00\x10" + pms + pms
    yield "pms-noise", b"\x00\x05" + b"\x42\x4d\x00\x1d" + pms[:-1] + b"\x00" + b"xx\x42" + pms
    yield "sds", b"\x01\x07" + sds + sds
    yield "sds-noise", b"\x01\x03" + b"\xaa\xc0\x00" + sds[:-1] + b"\x00" + sds + b"\xaa"
    # Command replies among data frames (the control protocol's sleep and
    # working-period examples), one cut short.
    sleep = bytes.fromhex("AA C5 06 01 00 00 A1 60 08 AB")
    period = bytes.fromhex("AA C5 08 01 01 00 A1 60 0B AB")
    yield "sds-replies", b"\x01\x0d" + sleep + sds + period[:6] + period + sds


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first, len(body))) + body


def _mqtt() -> Iterator[tuple[str, bytes]]:
    publish = encode_publish("d/aq-1/up", b'{"seq":1}', qos=1, packet_id=9)
    stream = b"".join(
        (
            _packet(CONNACK << 4, b"\x00\x00\x03\x21\x00\x10"),
            _packet(SUBACK << 4, b"\x00\x01\x00\x01\x01"),
            _packet(UNSUBACK << 4, b"\x00\x02\x00\x00"),
            _packet(PINGRESP << 4, b""),
            _packet(PUBACK << 4, b"\x00\x05\x10"),
            publish,
            encode_publish("hub/v1/gw/gw-1/ack", b"{}", qos=0),
            encode_publish(
                "d/aq-1/cmd",
                b"{}",
                qos=1,
                packet_id=3,
                response_topic="d/aq-1/res",
                correlation_data=b"c-1",
            ),
            # A PUBLISH with properties (message expiry) and a retained flag.
            _packet(0x33, b"\x00\x01t\x00\x01\x05\x02\x00\x00\x00\x3cpayload"),
            _packet(DISCONNECT << 4, b"\x8e\x05\x1f\x00\x02hi"),
        )
    )
    # Byte 0 even: a raw stream, split at byte 1 (bit 2: in reads of 1-16 bytes);
    # odd: a PUBLISH round trip.
    yield "stream", b"\x00\x11" + stream
    yield "stream-small-limit", b"\x02\x03" + stream
    yield "stream-small-reads", b"\x04\x03" + stream
    yield "publish", b"\x01\x00" + publish
    yield "roundtrip", b"\x01\x07d/aq-1/up\x00payload"


def _topics() -> Iterator[tuple[str, bytes]]:
    for index, prefix in enumerate(PREFIXES):
        yield f"up-{index}", bytes((index,)) + device_uplink_topic("aq-1", prefix).encode()
        yield f"status-{index}", bytes((index,)) + device_status_topic("aq-1", prefix).encode()
        yield (
            f"batch-{index}",
            bytes((index,)) + gateway_topic(GATEWAY_ID, "batch", prefix).encode(),
        )


def _patterns(size: int) -> list[tuple[str, bytes]]:
    return [
        ("zeros", bytes(size)),
        ("ones", b"\x01" * size),
        ("counting", bytes(i % 256 for i in range(size))),
        ("threes", b"\x03" * size),
    ]


def _command_seeds() -> dict[str, list[tuple[str, bytes]]]:
    interval = Command(
        command_id="c-0123456789abcdef",
        device_id="aq-1",
        name="set_reporting_interval",
        args={"interval_s": 60},
        ttl_s=600,
        created_ms=1,
    )
    reboot = Command(
        command_id="c-fedcba9876543210",
        device_id="kiosk-1",
        name="reboot",
        args={},
        ttl_s=60,
        created_ms=1,
    )
    reports = CommandReports(
        gateway_id=GATEWAY_ID,
        ts_ms=1,
        reports=[
            make_report(interval, "aq-1", "sent", 1),
            make_report(interval, "aq-1", "succeeded", 2, detail="ok", answer={"interval_s": 60}),
        ],
    )
    commands = GatewayCommands(
        gateway_id=GATEWAY_ID, ts_ms=1, commands=[interval, reboot], cancel=["c-1"]
    )
    answer = DeviceAnswer(command_id="c-1", state="failed", detail="out of paper")
    return {
        "command": [
            ("plain", b"\x00" + encode_command(interval)),
            ("typed", b"\x80" + encode_command(interval)),
            ("reboot", b"\x85" + encode_command(reboot)),
        ],
        "gateway_commands": [
            ("plain", b"\x00" + encode_gateway_commands(commands)),
            ("own", b"\x01" + encode_gateway_commands(commands)),
        ],
        "command_reports": [
            ("plain", b"\x00" + encode_command_reports(reports)),
            ("own", b"\x01" + encode_command_reports(reports)),
        ],
        "device_answer": [("failed", encode_device_answer(answer))],
    }


def seeds() -> dict[str, list[tuple[str, bytes]]]:
    """Target -> [(seed name, input)]."""
    batches = list(_batches())
    states = [
        ("online", encode_gateway_state(_state())),
        ("offline", encode_gateway_state(_state("offline"))),
        # What provisioning retains for a gateway it revoked.
        ("revoked", encode_gateway_state(revoked_gateway_state(GATEWAY_ID, birth=3, ts_ms=NOW_MS))),
    ]
    ack = encode_ack(Ack(batch_ids=[batch_id(GATEWAY_ID, BOOT_ID, n) for n in (1, 2)], ts_ms=1))
    return {
        "frames": list(_frames()),
        "mqtt": list(_mqtt()),
        "uplink": list(_uplinks()),
        "status": [(s, encode_device_status(s)) for s in ("online", "offline")],
        "batch": batches,
        "state": states,
        "ack": [("plain", b"\x00" + ack), ("own", b"\x01" + ack)],
        "config": [("config", encode_gateway_config(_config()))],
        **_command_seeds(),
        "ingest_batch": [
            (f"{name}-{t}", bytes((t,)) + payload)
            for name, payload in batches
            for t in range(len(BATCH_TOPICS))
        ],
        "ingest_state": [
            (f"{name}-{t}", bytes((t,)) + payload)
            for name, payload in states
            for t in range(len(STATE_TOPICS))
        ],
        "topics": list(_topics()),
        # Choices, not messages (see fuzz.targets._Choices): a few plain patterns.
        "batch_fields": _patterns(512),
        "state_fields": _patterns(32),
    }


def write_seeds(root: Path = CORPUS_DIR) -> int:
    """Write every seed under ``root``; return how many. Found inputs are left alone."""
    count = 0
    for target, found in seeds().items():
        directory = root / target
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in found:
            (directory / f"seed-{name}").write_bytes(data)
            count += 1
    return count


def main() -> None:
    count = write_seeds()
    sys.stdout.write(f"wrote {count} seeds under {CORPUS_DIR}\n")


if __name__ == "__main__":
    main()
