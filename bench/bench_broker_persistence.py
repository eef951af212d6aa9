"""Broker persistence: readings lost per kill -9 with the gateway away, and what saving costs.

The scene (issue 11, defect 4): a gateway's site session is persistent and
its gateway is away, so the devices' QoS 1 readings queue in the broker.
The broker PUBACKs each one, then is killed with -9 and restarted, and the
gateway comes back: every reading the broker acknowledged but had not yet
written to its snapshot is gone.

Per run, on a private Mosquitto with the given autosave settings:

1. the gateway's session subscribes to ``d/+/up`` (QoS 1, clean start off,
   no expiry) and disconnects;
2. a backlog of ``--backlog-s`` seconds of readings is published at once and
   flushed to disk (SIGUSR1), so each snapshot in the measured phase carries a
   realistic queue;
3. readings are published at the site's rate for ``--seconds``, each
   waiting for its PUBACK; the broker's CPU time (utime + stime) and bytes
   written (``/proc/<pid>/io`` write_bytes) are taken over this phase;
4. right after the last PUBACK the broker is killed with -9 and restarted;
   a sentinel is published; the gateway's session reconnects and reads until
   the sentinel: lost = acknowledged readings that never arrive.

A site's real rate (assumed): a service hall with 50 devices sending one
reading each per 10 s (kiosks, counters, conference endpoints), plus 10 air
sensors every 60 s: 5.17 messages/s of ~120 bytes. ``--scale 10`` is ten
times that. Runs as root (the broker as the mosquitto user) or as a user
that may run mosquitto.

    .venv/bin/python bench/bench_broker_persistence.py [--seconds 20] [--backlog-s 600]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cityhub.localstack.mosquitto import ADMIN_USER, MosquittoServer
from cityhub.localstack.procs import free_port, run_as_for, with_log_tail
from contracts.errors import PortInUseError

DEVICES_10S = 50
AIR_SENSORS_60S = 10
SITE_RATE = DEVICES_10S / 10 + AIR_SENSORS_60S / 60  # messages/s
GATEWAY_ID = "gw-bench-site"
SENTINEL_TOPIC = "d/sentinel/up"

SETTINGS = {
    "old: every 10 s": (10, False),
    "new: every 1 s": (1, False),
    "every 10 changes": (10, True),
    "every change": (1, True),
}


def _client(server: MosquittoServer, client_id: str) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.username_pw_set(ADMIN_USER, server.admin_password)
    client.max_inflight_messages_set(1000)
    return client


class Gateway:
    """The gateway's persistent site session: subscribe once, come back later and drain."""

    def __init__(self, server: MosquittoServer) -> None:
        self.server = server
        self.received: set[bytes] = set()
        self.done = threading.Event()
        self.ready = threading.Event()

    def _connect(self, clean_start: bool) -> mqtt.Client:
        client = _client(self.server, GATEWAY_ID)
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600  # as the gateway (site_session_expiry_s)
        client.on_connect = lambda *_a: self.ready.set()
        client.on_subscribe = lambda *_a: self.ready.set()
        client.on_message = self._on_message
        client.connect("127.0.0.1", self.server.port, clean_start=clean_start, properties=props)
        client.loop_start()
        return client

    def _on_message(self, _c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        if message.topic == SENTINEL_TOPIC:
            self.done.set()
        else:
            self.received.add(bytes(message.payload))

    def subscribe_and_leave(self) -> None:
        client = self._connect(clean_start=False)
        if not self.ready.wait(10):
            raise RuntimeError("no CONNACK")
        self.ready.clear()
        client.subscribe("d/+/up", qos=1)
        if not self.ready.wait(10):
            raise RuntimeError("no SUBACK")
        client.disconnect()
        client.loop_stop()

    def come_back(self, timeout_s: float = 60.0) -> None:
        client = self._connect(clean_start=False)
        finished = self.done.wait(timeout_s)
        client.disconnect()
        client.loop_stop()
        if not finished:
            raise RuntimeError("the sentinel never arrived")


class Devices:
    def __init__(self, server: MosquittoServer) -> None:
        self.client = _client(server, "bench-devices")
        # paho calls on_publish holding its own lock: record mids only, match them later.
        self.acked_mids: list[int] = []
        self.payloads: list[tuple[int, bytes]] = []
        self.client.on_publish = self._on_publish
        self.client.connect("127.0.0.1", server.port)
        self.client.loop_start()

    def _on_publish(
        self, _c: mqtt.Client, _u: object, mid: int, reason: object, _p: object
    ) -> None:
        if not getattr(reason, "is_failure", False):
            self.acked_mids.append(mid)

    def acked(self) -> set[bytes]:
        """Payloads the broker acknowledged (mids are unique while under 65,535 a run)."""
        mids = set(self.acked_mids)
        return {payload for mid, payload in self.payloads if mid in mids}

    def publish(self, phase: str, seq: int) -> mqtt.MQTTMessageInfo:
        device = seq % (DEVICES_10S + AIR_SENSORS_60S)
        payload = json.dumps(
            {"phase": phase, "seq": seq, "ts": time.time_ns() // 1_000_000, "m": {"v": seq}}
        ).encode()
        info = self.client.publish(f"d/dev-{device}/up", payload, qos=1)
        self.payloads.append((info.mid, payload))
        return info

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _proc_cost(pid: int) -> tuple[float, int]:
    """(CPU seconds, bytes written to storage) of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return cpu_s, int(io["write_bytes"])


def _restart(server: MosquittoServer, timeout_s: float = 10.0) -> None:
    """Start again once the killed broker's port is free."""
    deadline = time.monotonic() + timeout_s
    while server.running():  # start() would take the dying process for a live one
        if time.monotonic() > deadline:
            raise RuntimeError("the killed broker is still running")
        time.sleep(0.01)
    while True:
        try:
            server.start()
        except PortInUseError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
        else:
            return


def run_once(
    base: Path, *, interval: int, on_changes: bool, rate: float, seconds: float, backlog_s: float
) -> dict[str, float]:
    server = MosquittoServer(
        base_dir=base / f"m-{time.monotonic_ns()}",
        port=free_port(),
        run_as=run_as_for("mosquitto", is_root=os.geteuid() == 0),
        dev_mode=False,
        autosave_interval=interval,
        autosave_on_changes=on_changes,
    )
    pid = server.start()
    try:
        gateway = Gateway(server)
        gateway.subscribe_and_leave()
        devices = Devices(server)
        # The backlog as one burst (a device fleet reconnecting, a replay): what saving
        # costs when many messages arrive at once.
        burst0 = time.monotonic()
        _, burst_written0 = _proc_cost(pid)
        backlog = [devices.publish("backlog", i) for i in range(int(backlog_s * rate))]
        for info in backlog:
            info.wait_for_publish(30)
        burst_s = time.monotonic() - burst0
        burst_written = _proc_cost(pid)[1] - burst_written0
        os.kill(pid, signal.SIGUSR1)  # write the snapshot now: the backlog is on disk
        time.sleep(1.0)
        cpu0, written0 = _proc_cost(pid)
        start = time.monotonic()
        count = int(seconds * rate)
        for seq in range(count):
            delay = start + seq / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            devices.publish("live", seq).wait_for_publish(10)
        elapsed = time.monotonic() - start
        cpu1, written1 = _proc_cost(pid)
        os.kill(pid, signal.SIGKILL)
        devices.close()
        acked = devices.acked()
        _restart(server)
        sentinel = _client(server, "bench-sentinel")
        sentinel.connect("127.0.0.1", server.port)
        sentinel.loop_start()
        sentinel.publish(SENTINEL_TOPIC, b"end", qos=1).wait_for_publish(10)
        sentinel.disconnect()
        sentinel.loop_stop()
        try:
            gateway.come_back()
        except (OSError, RuntimeError) as exc:
            raise RuntimeError(
                with_log_tail(f"the gateway did not drain: {exc}", server.log_path)
            ) from exc
        live_acked = {p for p in acked if b'"live"' in p}
        return {
            "acked": len(live_acked),
            "lost": len(live_acked - gateway.received),
            "backlog_lost": len((acked - live_acked) - gateway.received),
            "cpu_pct": 100 * (cpu1 - cpu0) / elapsed,
            "write_kib_s": (written1 - written0) / 1024 / elapsed,
            "burst_msgs_s": len(backlog) / burst_s,
            "burst_mib": burst_written / (1 << 20),
        }
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="measured phase per run")
    parser.add_argument("--backlog-s", type=float, default=600.0, help="queue before the phase")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--scales", default="1,10")
    args = parser.parse_args()
    print(
        f"# {platform.node()} {platform.machine()} {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, site rate {SITE_RATE:.2f} msg/s"
    )
    print(
        "| settings | rate (msg/s) | queued before | acked | lost per kill -9 | broker CPU % "
        "| broker writes KiB/s | backlog burst: msgs/s accepted, MiB written |"
    )
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="cityhub-bench-") as tmp:
        base = Path(tmp)
        base.chmod(0o755)
        for scale in (float(s) for s in args.scales.split(",")):
            rate = SITE_RATE * scale
            for name, (interval, on_changes) in SETTINGS.items():
                results = [
                    run_once(
                        base,
                        interval=interval,
                        on_changes=on_changes,
                        rate=rate,
                        seconds=args.seconds,
                        backlog_s=args.backlog_s,
                    )
                    for _ in range(args.runs)
                ]

                def med(key: str, results: list[dict[str, float]] = results) -> float:
                    return statistics.median(r[key] for r in results)

                lost = " / ".join(str(int(r["lost"])) for r in results)
                print(
                    f"| {name} | {rate:.1f} | {int(args.backlog_s * rate)} | {med('acked'):.0f}"
                    f" | {lost} | {med('cpu_pct'):.1f} | {med('write_kib_s'):.0f}"
                    f" | {med('burst_msgs_s'):.0f}, {med('burst_mib'):.0f} |",
                    flush=True,
                )
                if any(r["backlog_lost"] for r in results):
                    print(f"  ! backlog readings lost: {[r['backlog_lost'] for r in results]}")
    sys.exit(0)


if __name__ == "__main__":
    main()
