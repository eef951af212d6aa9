"""LoRaWAN bridge throughput: ChirpStack uplink events -> gateway -> fsynced outbox -> ack,
beside MQTT device uplinks measured the same way in the same run.

Set up as ``bench_gateway.py`` does, each part in its own process on this
machine: a private Mosquitto (site and central broker at once), the gateway
(``python -m gateway``) and its acking ingest stand-in (``bench_gateway.ACKER``).
A raw-socket publisher plays ChirpStack's MQTT integration: uplink events as
ChirpStack marshals them to JSON (``contracts.chirpstack``: deviceInfo,
devAddr, fCnt, a 14-byte Cayenne LPP payload in base64, time) on
``application/{app}/device/{dev_eui}/event/up`` for devices of the
``lpp_air_quality`` model, QoS 1. The MQTT figures are ``bench_gateway``'s
kiosk readings (``bench_gateway.run_once``).

Drain runs queue the messages in the gateway's persistent site session while
it is stopped, then start it: what one gateway process can take. Live runs
start the publisher against the running gateway (all processes then share
the cores). Figures: readings acked per second from the first to the last
ack; the gateway's CPU seconds a run; and the gateway's own logic per
message with no network (the site link's hot path fed socket-read-sized
lists): medians of ``--runs``.

    .venv/bin/python bench/lorawan_bridge.py [--readings 100000] [--devices 100] [--runs 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_gateway import (
    logic_cost,
    run_once,
    start_acker,
    start_broker,
    start_gateway,
    stop,
    write_settings,
)

from cityhub.localstack.mosquitto import ADMIN_USER, MosquittoServer
from contracts import mqttcodec
from contracts.chirpstack import DeviceInfo, UplinkEvent, encode_event, encode_lpp
from contracts.messages import DeviceConfig, GatewayConfig
from contracts.settings import BrokerSettings
from contracts.topics import chirpstack_event_topic
from gateway.service import Gateway
from tests.plugins.gateway import (
    client,
    gateway_settings,
    now_ms,
    publish_config,
    wait_for,
    watch_states,
)
from tests.plugins.ingest import cpu_seconds

ROOT = Path(__file__).resolve().parents[1]
MODEL = "lpp_air_quality"
APP = "0f8d6a5e-5b7c-4d33-9a41-7c1b2e3f4a5b"

# Queues ChirpStack uplink events with pipelined QoS 1 PUBLISH packets on one
# socket (bench_gateway's publisher, with ChirpStack's topics and JSON).
PUBLISHER = textwrap.dedent(
    """
    import datetime, socket, sys, time
    sys.path.insert(0, sys.argv[1])
    from contracts import mqttcodec as mc
    from contracts.chirpstack import DeviceInfo, UplinkEvent, encode_event, encode_lpp
    from contracts.topics import chirpstack_event_topic
    port, user, password, app, eui_prefix, ndev, per_dev = sys.argv[2:9]
    ndev, per_dev = int(ndev), int(per_dev)
    s = socket.create_connection(("127.0.0.1", int(port)))
    s.sendall(mc.encode_connect(client_id="bench-chirpstack", keepalive_s=60,
                                clean_start=True, username=user, password=password))
    reader = mc.PacketReader()
    reader.feed(s.recv(1 << 16))
    window = 0
    def drain(until):
        global window
        while window > until:
            _pubs, controls = reader.feed(s.recv(1 << 16))
            for c in controls:
                if isinstance(c, mc.Puback):
                    if c.reason_code >= 0x80:
                        raise SystemExit(f"publish refused: {c}")
                    window -= 1
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
    base = time.time_ns() // 1_000_000 - 60_000
    pid = 0
    chunk = []
    for f_cnt in range(per_dev):
        data = encode_lpp([(1, "analog_input", 12.5 + f_cnt % 50), (2, "analog_input", 30.0),
                           (3, "temperature", 27.2), (4, "humidity", 61.5)])
        for d in range(ndev):
            eui = f"{eui_prefix}{d:010x}"
            event = UplinkEvent(
                deduplication_id=f"{eui}-{f_cnt}",
                time=epoch + datetime.timedelta(milliseconds=base + f_cnt),
                device_info=DeviceInfo(application_id=app, application_name="bench",
                                       device_name=f"node-{d}", dev_eui=eui),
                dev_addr=f"{d:08x}", adr=True, dr=5, f_cnt=f_cnt, f_port=1, data=data)
            pid = pid % 65535 + 1
            chunk.append(mc.encode_publish(chirpstack_event_topic(app, eui, "up"),
                                           encode_event(event), qos=1, packet_id=pid))
            if len(chunk) == 200:
                s.sendall(b"".join(chunk))
                window += len(chunk)
                chunk = []
                drain(800)
    s.sendall(b"".join(chunk))
    window += len(chunk)
    drain(0)
    s.sendall(mc.encode_disconnect())
    s.close()
    """
)


def lorawan_devices(tag: str, ndev: int) -> list[DeviceConfig]:
    return [
        DeviceConfig(
            device_id=f"{tag}-aq-{d:03d}",
            device_type="air_quality",
            transport="lorawan",
            model=MODEL,
            dev_eui=f"{tag}{d:010x}",
        )
        for d in range(ndev)
    ]


def lorawan_run(
    server: MosquittoServer, tmp: Path, readings: int, ndev: int, *, live: bool
) -> dict[str, float]:
    """One run, as ``bench_gateway.run_once`` does it, with ChirpStack's events."""
    tag = uuid.uuid4().hex[:6]
    gateway_id, prefix = f"gw-{tag}", f"b{tag}"
    settings = tmp / f"{gateway_id}.toml"
    write_settings(settings, server, gateway_id=gateway_id, prefix=prefix)
    control = client(server)
    publish_config(
        control,
        gateway_id=gateway_id,
        prefix=prefix,
        devices=lorawan_devices(tag, ndev),
        version=1,
    )
    states = watch_states(control, gateway_id=gateway_id, prefix=prefix)
    gateway = start_gateway(settings, tmp / f"{gateway_id}.log")
    wait_for(lambda: any(s.site_ready for s in states), 30, "gateway subscribed at the site broker")
    control.disconnect()
    publisher = [
        sys.executable,
        "-c",
        PUBLISHER,
        str(ROOT),
        str(server.port),
        ADMIN_USER,
        server.admin_password,
        APP,
        tag,
        str(ndev),
        str(readings // ndev),
    ]
    queue_s = math.nan
    if not live:
        stop(gateway)
        t0 = time.perf_counter()
        subprocess.run(publisher, check=True)
        queue_s = time.perf_counter() - t0
    acker = start_acker(server, prefix, gateway_id, readings=readings, ndev=ndev)
    started = time.time()
    if live:
        t0 = time.perf_counter()
        subprocess.run(publisher, check=True)
        queue_s = time.perf_counter() - t0
    else:
        gateway = start_gateway(settings, tmp / f"{gateway_id}.log")
    out, _ = acker.communicate(timeout=600)
    gateway_cpu_s = cpu_seconds(gateway.pid)
    stop(gateway)
    result = json.loads(out.strip().splitlines()[-1])
    if result["unique"] != readings:
        raise SystemExit(f"lost readings: {result['unique']} of {readings}")
    return {
        "first_to_last": (readings - result["first_rows"]) / (result["last"] - result["first"]),
        "start_to_last": readings / (result["last"] - started),
        "duplicates": result["deliveries"] - readings,
        "queue_rate": readings / queue_s,
        "gateway_cpu_s": gateway_cpu_s,
    }


def lorawan_logic_cost(tmp: Path, messages: int = 100_000, ndev: int = 100) -> float:
    """Seconds per ChirpStack event of the gateway's own logic, no network (as ``logic_cost``)."""
    tag = "bl0g1c"
    devices = lorawan_devices(tag, ndev)
    settings = gateway_settings(
        "gw-logic", "blogic", batch_max_rows=500, device_rate_per_s=1e9, device_burst=1e9
    )
    nowhere = BrokerSettings(host="127.0.0.1", port=1)
    gateway = Gateway(
        settings=settings, central=nowhere, site=nowhere, outbox_path=tmp / "lora.sqlite3"
    )
    gateway.apply_config(
        GatewayConfig(gateway_id="gw-logic", site_id="hk-hall-ubnd", version=1, devices=devices),
        persist=False,
    )
    base = now_ms() - 60_000
    chunks: list[list[mqttcodec.Publish]] = []
    chunk: list[mqttcodec.Publish] = []
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
    for i in range(messages):
        f_cnt, d = divmod(i, ndev)
        eui = str(devices[d].dev_eui)
        event = UplinkEvent(
            deduplication_id=f"{eui}-{f_cnt}",
            time=epoch + datetime.timedelta(milliseconds=base + f_cnt),
            device_info=DeviceInfo(application_id=APP, dev_eui=eui),
            dev_addr=f"{d:08x}",
            f_cnt=f_cnt,
            f_port=1,
            data=encode_lpp([(1, "analog_input", 12.5), (3, "temperature", 27.2)]),
        )
        topic = chirpstack_event_topic(APP, eui, "up")
        chunk.append((topic, encode_event(event), 1, i % 65535 + 1, False))
        # About one 64 KiB socket read of these ~300-byte messages.
        if len(chunk) == 200:
            chunks.append(chunk)
            chunk = []
    chunks.append(chunk)
    start = time.perf_counter()
    for part in chunks:
        gateway._on_site_messages(part)
        gateway.router.ready.clear()
    elapsed = time.perf_counter() - start
    if gateway.counters.lorawan_uplinks != messages:
        raise SystemExit(f"only {gateway.counters.lorawan_uplinks} of {messages} accepted")
    gateway.outbox.close()
    return elapsed / messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--readings", type=int, default=100_000)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    tmp, server = start_broker("cityhub-bench-")
    n, ndev = args.readings, args.devices
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    try:
        # Interleaved, so both transports see the same machine state.
        for _ in range(args.runs):
            for live in (False, True):
                mode = "live" if live else "drain"
                results.setdefault(("mqtt", mode), []).append(
                    run_once(server, tmp, n, ndev, live=live)
                )
                results.setdefault(("lorawan", mode), []).append(
                    lorawan_run(server, tmp, n, ndev, live=live)
                )
        logic = {
            "mqtt": statistics.median(logic_cost(tmp) for _ in range(3)),
            "lorawan": statistics.median(lorawan_logic_cost(tmp) for _ in range(3)),
        }
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    machine = f"{platform.platform()}, {os.cpu_count()} cores"
    print(f"machine: {machine}, Python {platform.python_version()}")
    print(f"{n:,} readings from {ndev} devices a run, {args.runs} runs per row")
    print(f"{'measure':<52} {'MQTT':>10} {'LoRaWAN':>10}  runs (MQTT | LoRaWAN)")
    for mode, key, label, digits in (
        ("drain", "first_to_last", "drain: readings/s acked, first to last ack", 0),
        ("drain", "start_to_last", "drain: readings/s acked, gateway start to last", 0),
        ("drain", "gateway_cpu_s", "drain: gateway CPU s a run", 2),
        ("drain", "duplicates", "drain: readings delivered twice", 0),
        ("live", "first_to_last", "live: readings/s acked, first to last ack", 0),
        ("live", "queue_rate", "live: publisher msgs/s (acked by the broker)", 0),
        ("live", "gateway_cpu_s", "live: gateway CPU s a run", 2),
    ):
        cells, listed = [], []
        for transport in ("mqtt", "lorawan"):
            values = [r[key] for r in results[transport, mode]]
            cells.append(f"{statistics.median(values):>10,.{digits}f}")
            listed.append(", ".join(f"{v:,.{digits}f}" for v in values))
        print(f"{label:<52} {' '.join(cells)}  {' | '.join(listed)}")
    print(
        f"{'gateway logic per message, no network (us)':<52}"
        f" {logic['mqtt'] * 1e6:>10.2f} {logic['lorawan'] * 1e6:>10.2f}"
    )


if __name__ == "__main__":
    main()
