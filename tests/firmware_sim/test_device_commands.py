"""Simulated MQTT devices obey commands on a real broker: a request with a Response Topic and
Correlation Data on d/{id}/cmd, the answers on d/{id}/res, the effect in the readings."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import msgspec
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cityhub.localstack.mosquitto import MosquittoServer
from contracts.commands import (
    Command,
    DeviceAnswer,
    decode_device_answer,
    encode_command,
)
from contracts.messages import DeviceUplink
from contracts.settings import BrokerSettings
from contracts.topics import device_answer_topic, device_command_topic
from devices import dynsec
from devices.brokerctl import BrokerControl
from firmware_sim.faults import FaultPlan
from firmware_sim.fleet import DeviceSpec
from firmware_sim.models import (
    MODEL_CLASSES,
    CameraCounterModel,
    CameraParams,
    DeviceModel,
    KioskModel,
)
from firmware_sim.service import Credentials, Simulator
from tests.plugins.gateway import broker_settings, client, service_in_thread, wait_for

pytestmark = pytest.mark.slow

# 10x: a reading a second of simulated time is one every 100 ms; a kiosk's
# 3-8 s reboot takes under a second.
ACCELERATION = 10.0


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Seen:
    """What a watcher saw under one prefix: answers (with correlation), readings, statuses."""

    answers: dict[str, list[tuple[DeviceAnswer, bytes | None, str]]] = field(default_factory=dict)
    readings: dict[str, list[DeviceUplink]] = field(default_factory=dict)
    statuses: dict[str, list[bytes]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_message(self, _c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        device, kind = message.topic.split("/")[-2:]
        with self.lock:
            if kind == "res":
                correlation = getattr(message.properties, "CorrelationData", None)
                answer = decode_device_answer(bytes(message.payload))
                self.answers.setdefault(answer.command_id, []).append(
                    (answer, correlation, message.topic)
                )
            elif kind == "up":
                self.readings.setdefault(device, []).append(
                    msgspec.json.decode(message.payload, type=DeviceUplink)
                )
            elif kind == "status":
                self.statuses.setdefault(device, []).append(bytes(message.payload))

    def states(self, command_id: str) -> list[str]:
        with self.lock:
            return [a.state for a, _c, _t in self.answers.get(command_id, [])]

    def final(self, command_id: str) -> DeviceAnswer:
        with self.lock:
            return self.answers[command_id][-1][0]

    def ups(self, device_id: str) -> list[DeviceUplink]:
        with self.lock:
            return list(self.readings.get(device_id, []))


@dataclass
class Bench:
    sim: Simulator
    seen: Seen
    prefix: str
    sender: mqtt.Client

    def command(
        self,
        device_id: str,
        name: str,
        args: dict[str, object] | None = None,
        *,
        command_id: str | None = None,
        ttl_s: int = 600,
        created_ms: int | None = None,
        payload: bytes | None = None,
    ) -> str:
        """Publish a command as a gateway does (MQTT v5 request); return its id."""
        command_id = command_id or f"c-{uuid.uuid4().hex[:16]}"
        if payload is None:
            payload = encode_command(
                Command(
                    command_id=command_id,
                    device_id=device_id,
                    name=name,
                    args=args or {},  # type: ignore[arg-type]
                    ttl_s=ttl_s,
                    created_ms=created_ms if created_ms is not None else wall_ms(),
                )
            )
        properties = Properties(PacketTypes.PUBLISH)
        properties.ResponseTopic = device_answer_topic(device_id, self.prefix)
        properties.CorrelationData = command_id.encode()
        info = self.sender.publish(
            device_command_topic(device_id, self.prefix), payload, qos=1, properties=properties
        )
        info.wait_for_publish(5)
        return command_id

    def wait_answers(self, command_id: str, states: list[str], timeout_s: float = 10) -> None:
        wait_for(
            lambda: self.seen.states(command_id) == states,
            timeout_s,
            f"answers {states} to {command_id} (so far {self.seen.states(command_id)})",
        )


def spec(device_id: str, model: DeviceModel, plan: FaultPlan | None = None) -> DeviceSpec:
    return DeviceSpec(
        device_id=device_id,
        device_type=model.device_type.name,
        site_id="hk-test",
        transport="mqtt",
        protocol=None,
        faults=plan or FaultPlan(),
        model=model,
    )


@contextlib.contextmanager
def bench(
    mqtt_server: MosquittoServer,
    specs: list[DeviceSpec],
    *,
    prefix: str | None = None,
    credentials: Credentials | None = None,
) -> Iterator[Bench]:
    prefix = prefix or f"c{uuid.uuid4().hex[:8]}"
    seen = Seen()
    watcher = client(mqtt_server)
    watcher.on_message = seen.on_message
    watcher.subscribe(f"{prefix}/d/+/+", qos=1)
    sender = client(mqtt_server)
    sim = Simulator(
        devices=specs,
        site_broker=broker_settings(mqtt_server),
        topic_prefix=prefix,
        credentials=credentials,
        seed=3,
        time_acceleration=ACCELERATION,
        record=True,
    )
    try:
        with service_in_thread(sim.run, name="sim"):
            wait_for(
                lambda: all(len(seen.ups(s.device_id)) >= 2 for s in specs),
                10,
                "every device's first readings",
            )
            yield Bench(sim=sim, seen=seen, prefix=prefix, sender=sender)
    finally:
        watcher.disconnect()
        sender.disconnect()
        sim.close()


# Each periodic MQTT type with its smallest catalog interval.
INTERVALS = {
    "kiosk": 5,
    "camera_counter": 10,
    "conference_endpoint": 10,
    "noise_meter": 10,
    "water_level": 30,
}


def test_each_type_takes_a_new_reporting_interval_at_once(mqtt_server: MosquittoServer) -> None:
    specs = [
        spec(
            f"{t.replace('_', '')[:6]}-hk-01",
            MODEL_CLASSES[t](device_id=f"{t.replace('_', '')[:6]}-hk-01", seed=3),
        )
        for t in INTERVALS
    ]
    with bench(mqtt_server, specs) as b:
        ids = {}
        for s in specs:
            ids[s.device_id] = b.command(
                s.device_id,
                "set_reporting_interval",
                {"interval_s": INTERVALS[s.device_type]},
            )
        for s in specs:
            b.wait_answers(ids[s.device_id], ["delivered", "succeeded"])
            answers = b.seen.answers[ids[s.device_id]]
            # The correlation data echoed, on the request's response topic.
            assert {c for _a, c, _t in answers} == {ids[s.device_id].encode()}
            assert {t for _a, _c, t in answers} == {device_answer_topic(s.device_id, b.prefix)}
            assert answers[-1][0].answer == {"interval_s": INTERVALS[s.device_type]}
        # Readings now come one interval apart (simulated time): 30 s at 10x
        # is 3 s, so two gaps of the slowest take ~6 s.
        marks = {s.device_id: len(b.seen.ups(s.device_id)) for s in specs}
        wait_for(
            lambda: all(len(b.seen.ups(d)) >= marks[d] + 3 for d in marks),
            12,
            "three readings at the new interval",
        )
        for s in specs:
            ups = b.seen.ups(s.device_id)[marks[s.device_id] :]
            gaps = {later.ts_ms - earlier.ts_ms for earlier, later in itertools.pairwise(ups)}
            assert gaps == {INTERVALS[s.device_type] * 1000}, (s.device_id, gaps)


def test_kiosk_reboot_goes_offline_and_comes_back_with_a_new_boot(
    mqtt_server: MosquittoServer,
) -> None:
    kiosk = KioskModel(device_id="kiosk-hk-01", seed=3)
    with bench(mqtt_server, [spec("kiosk-hk-01", kiosk)]) as b:
        old_boot = kiosk.boot_id
        before = len(b.seen.ups("kiosk-hk-01"))
        command_id = b.command("kiosk-hk-01", "reboot")
        b.wait_answers(command_id, ["delivered", "succeeded"], timeout_s=10)
        final = b.seen.final(command_id)
        assert final.answer == {"boot": kiosk.boot_id}
        assert kiosk.boot_id != old_boot
        # Offline while it restarted, online again before it answered.
        statuses = b.seen.statuses["kiosk-hk-01"]
        assert statuses[-2:] == [b"offline", b"online"]
        wait_for(lambda: len(b.seen.ups("kiosk-hk-01")) >= before + 5, 5, "readings after")
        ups = b.seen.ups("kiosk-hk-01")
        old = [u for u in ups if u.boot == old_boot]
        new = [u for u in ups if u.boot == kiosk.boot_id]
        assert len(old) + len(new) == len(ups)
        assert [u.seq for u in old] == list(range(old[0].seq, old[0].seq + len(old)))
        assert [u.seq for u in new] == list(range(len(new)))  # seq from 0
        assert new[0].metrics["uptime"] < 5
        # The ledger: every reading handed over once, acknowledged, as seen.
        ledger = b.sim.ledger
        assert ledger is not None
        entries = [e for e in ledger.entries if e.device_id == "kiosk-hk-01"]
        assert all(e.acked_ms is not None for e in entries)
        keys = [e.key for e in entries]
        assert len(keys) == len(set(keys))
        seen_keys = {("kiosk-hk-01", u.seq, u.ts_ms) for u in b.seen.ups("kiosk-hk-01")}
        assert set(keys) <= seen_keys | {keys[-1]}  # the newest may be in flight


def test_camera_reset_count_restarts_the_count(mqtt_server: MosquittoServer) -> None:
    camera = CameraCounterModel(device_id="cam-hk-01", seed=3, params=CameraParams(mode="hall"))
    camera.occupancy = 3000
    with bench(mqtt_server, [spec("cam-hk-01", camera)]) as b:
        assert b.seen.ups("cam-hk-01")[-1].metrics["occupancy"] > 2000
        command_id = b.command("cam-hk-01", "reset_count")
        b.wait_answers(command_id, ["delivered", "succeeded"])
        mark = len(b.seen.ups("cam-hk-01"))
        wait_for(lambda: len(b.seen.ups("cam-hk-01")) > mark, 5, "a reading after the reset")
        # A second of a 24/7 hall: a few people in or out, not thousands.
        assert b.seen.ups("cam-hk-01")[mark].metrics["occupancy"] < 50


def test_conference_test_call_answers_with_figures(mqtt_server: MosquittoServer) -> None:
    endpoint = MODEL_CLASSES["conference_endpoint"](device_id="conf-hk-01", seed=3)
    with bench(mqtt_server, [spec("conf-hk-01", endpoint)]) as b:
        started = time.monotonic()
        command_id = b.command("conf-hk-01", "start_test_call", {"duration_s": 10})
        b.wait_answers(command_id, ["delivered", "succeeded"], timeout_s=10)
        # 10 s of call and 2-5 s of set-up, at 10x.
        assert time.monotonic() - started >= 1.1
        answer = b.seen.final(command_id).answer
        assert set(answer) == {"rtt_ms", "loss_pct", "jitter_ms", "duration_s"}


def test_kiosk_queue_and_printer(mqtt_server: MosquittoServer) -> None:
    kiosk = KioskModel(device_id="kiosk-hk-02", seed=3)
    with bench(mqtt_server, [spec("kiosk-hk-02", kiosk)]) as b:
        closed = b.command("kiosk-hk-02", "close_queue", {"message": "Hết giờ lấy số"})
        printed = b.command("kiosk-hk-02", "print_test_page")
        b.wait_answers(closed, ["delivered", "succeeded"])
        b.wait_answers(printed, ["delivered", "succeeded"])
        assert not kiosk.queue_open
        mark = len(b.seen.ups("kiosk-hk-02"))
        wait_for(lambda: len(b.seen.ups("kiosk-hk-02")) >= mark + 20, 5, "readings, queue closed")
        assert all(u.metrics["tickets_issued"] == 0 for u in b.seen.ups("kiosk-hk-02")[mark:])


def test_a_command_id_twice_is_carried_out_once_and_answered_twice(
    mqtt_server: MosquittoServer,
) -> None:
    kiosk = KioskModel(device_id="kiosk-hk-03", seed=3)
    with bench(mqtt_server, [spec("kiosk-hk-03", kiosk)]) as b:
        command_id = b.command("kiosk-hk-03", "print_test_page")
        b.wait_answers(command_id, ["delivered", "succeeded"])
        b.command("kiosk-hk-03", "print_test_page", command_id=command_id)
        b.wait_answers(command_id, ["delivered", "succeeded", "succeeded"])
        assert b.sim.commanded["kiosk-hk-03"].executed == 1
        assert b.seen.answers[command_id][1][0] == b.seen.answers[command_id][2][0]


def test_expired_and_malformed_commands_fail(mqtt_server: MosquittoServer) -> None:
    kiosk = KioskModel(device_id="kiosk-hk-04", seed=3)
    with bench(mqtt_server, [spec("kiosk-hk-04", kiosk)]) as b:
        expired = b.command("kiosk-hk-04", "close_queue", ttl_s=60, created_ms=wall_ms() - 61_000)
        b.wait_answers(expired, ["failed"])
        assert b.seen.final(expired).detail == "expired before it arrived"
        bad = "c-00000000000000ff"
        b.command("kiosk-hk-04", "", command_id=bad, payload=b'{"command_id": "%s"}' % bad.encode())
        b.wait_answers(bad, ["failed"])
        assert b.seen.final(bad).detail.startswith("refused: ")
        b.command("kiosk-hk-04", "", payload=b"\xff not json")
        time.sleep(0.5)  # nothing to answer: logged; the device carries on
        assert kiosk.queue_open
        mark = len(b.seen.ups("kiosk-hk-04"))
        wait_for(lambda: len(b.seen.ups("kiosk-hk-04")) > mark, 5, "readings go on")


def test_a_device_on_its_own_broker_account_takes_commands(
    mqtt_server: MosquittoServer, broker_admin: BrokerSettings
) -> None:
    """The dynamic-security ACLs a provisioned device gets let it read d/{id}/cmd and answer."""
    prefix = f"c{uuid.uuid4().hex[:8]}"
    device_id = f"kiosk-{uuid.uuid4().hex[:6]}"
    account = dynsec.device_account(device_id, prefix)
    password = uuid.uuid4().hex
    with BrokerControl(name="site", broker=broker_admin) as control:
        control.run(dynsec.create_account(account, password))
        try:
            kiosk = KioskModel(device_id=device_id, seed=3)
            with bench(
                mqtt_server,
                [spec(device_id, kiosk)],
                prefix=prefix,
                credentials=lambda _id: (account.username, password),
            ) as b:
                command_id = b.command(device_id, "set_reporting_interval", {"interval_s": 5})
                b.wait_answers(command_id, ["delivered", "succeeded"])
                assert b.seen.answers[command_id][0][1] == command_id.encode()
        finally:
            control.run(dynsec.delete_account(account))
