"""The gateway's command downlink against a real Mosquitto: centre -> gateway -> device -> reports.

The tests play the centre (the broker's admin client publishes GatewayCommands
on the gateway's command topic, reads its reports and acks them as ingest
will) and an MQTT v5 device (paho: it answers on the request's Response Topic
with its Correlation Data, and keeps each command id once).
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cityhub.localstack.mosquitto import ADMIN_USER, MosquittoServer
from contracts.commands import (
    Command,
    CommandReport,
    DeviceAnswer,
    GatewayCommands,
    decode_command,
    decode_command_reports,
    encode_device_answer,
    encode_gateway_commands,
)
from contracts.frames import SensorKind
from contracts.messages import DEVICE_ONLINE, Ack, encode_ack
from contracts.topics import (
    ack_topic,
    command_report_topic,
    command_topic,
    device_answer_topic,
    device_command_topic,
    device_status_topic,
)
from devices import dynsec
from devices.brokerctl import BrokerControl
from tests.gateway.test_faults import gateway_config_file, start_gateway_process
from tests.plugins.gateway import (
    broker_settings,
    client,
    gateway_in_thread,
    gateway_settings,
    mqtt_devices,
    now_ms,
    publish_config,
    wait_for,
)

pytestmark = pytest.mark.slow


def command_id() -> str:
    return f"c-{uuid.uuid4().hex[:16]}"


def kiosk_command(device_id: str, *, ttl_s: int = 600, name: str = "open_queue") -> Command:
    return Command(
        command_id=command_id(),
        device_id=device_id,
        name=name,
        args={},
        ttl_s=ttl_s,
        created_ms=now_ms(),
    )


class Centre:
    """The centre's side: sends commands, records reports in arrival order, acks when told."""

    def __init__(self, server: MosquittoServer, *, gateway_id: str, prefix: str) -> None:
        self.gateway_id = gateway_id
        self.prefix = prefix
        self.acking = False
        self.lock = threading.Lock()
        self.reports: list[CommandReport] = []
        self.subscribed = threading.Event()
        self.client = client(server)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.subscribe(command_report_topic(gateway_id, prefix), qos=1)
        assert self.subscribed.wait(10)

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        reports = decode_command_reports(bytes(message.payload), gateway_id=self.gateway_id)
        with self.lock:
            self.reports.extend(reports.reports)
        if self.acking:
            self.ack([r.report_id for r in reports.reports])

    def send(self, commands: list[Command], cancel: list[str]) -> None:
        message = GatewayCommands(
            gateway_id=self.gateway_id, ts_ms=now_ms(), commands=commands, cancel=list(cancel)
        )
        info = self.client.publish(
            command_topic(self.gateway_id, self.prefix), encode_gateway_commands(message), qos=1
        )
        info.wait_for_publish(10)

    def ack(self, report_ids: list[str]) -> None:
        ack = Ack(batch_ids=[], ts_ms=now_ms(), reports=report_ids)
        self.client.publish(ack_topic(self.gateway_id, self.prefix), encode_ack(ack), qos=1)

    def ids(self) -> list[str]:
        with self.lock:
            return [r.report_id for r in self.reports]

    def states(self, cid: str) -> list[str]:
        """The states reported for ``cid``, each once, in the order first seen."""
        with self.lock:
            return list(dict.fromkeys(r.state for r in self.reports if r.command_id == cid))

    def report(self, cid: str, state: str) -> CommandReport:
        with self.lock:
            return next(r for r in self.reports if r.report_id == f"{cid}.{state}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Device:
    """An MQTT v5 device: answers delivered then succeeded, a command id seen before once again."""

    def __init__(self, server: MosquittoServer, device_id: str, prefix: str) -> None:
        self.device_id = device_id
        self.prefix = prefix
        self.answering = True
        self.received: list[tuple[Command, str, bytes]] = []
        self.outcomes: dict[str, str] = {}
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"dev-{device_id}", protocol=mqtt.MQTTv5
        )
        self.client.username_pw_set(ADMIN_USER, server.admin_password)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.connect("127.0.0.1", server.port)
        self.client.loop_start()
        self.client.subscribe(device_command_topic(device_id, prefix), qos=1)
        assert self.subscribed.wait(10)

    def online(self) -> None:
        self.client.publish(
            device_status_topic(self.device_id, self.prefix), DEVICE_ONLINE, qos=1, retain=True
        ).wait_for_publish(10)

    def _answer(self, response_topic: str, correlation: bytes, answer: DeviceAnswer) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = correlation
        self.client.publish(response_topic, encode_device_answer(answer), qos=1, properties=props)

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        command = decode_command(bytes(message.payload))
        response_topic = message.properties.ResponseTopic
        correlation = message.properties.CorrelationData
        with self.lock:
            self.received.append((command, response_topic, correlation))
            if not self.answering:
                return
            known = self.outcomes.get(command.command_id)
            self.outcomes[command.command_id] = "succeeded"
        cid = command.command_id
        if known is not None:  # seen before: not run again, its outcome said again
            self._answer(response_topic, correlation, DeviceAnswer(command_id=cid, state=known))
            return
        self._answer(response_topic, correlation, DeviceAnswer(command_id=cid, state="delivered"))
        self._answer(
            response_topic,
            correlation,
            DeviceAnswer(
                command_id=cid, state="succeeded", detail="queue opened", answer={"queue": 0}
            ),
        )

    def got(self, cid: str) -> int:
        with self.lock:
            return sum(c.command_id == cid for c, _t, _d in self.received)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _setup(mqtt_server, ids, n_devices=1):
    gateway_id, prefix = ids
    devices = mqtt_devices(prefix, n_devices)
    pub = client(mqtt_server)
    publish_config(pub, gateway_id=gateway_id, prefix=prefix, devices=devices, version=1)
    return gateway_id, prefix, devices, pub


def test_a_command_reaches_its_device_once_and_its_reports_stay_until_acked(
    mqtt_server, tmp_path, ids
):
    gateway_id, prefix, devices, pub = _setup(mqtt_server, ids)
    device_id = devices[0].device_id
    centre = Centre(mqtt_server, gateway_id=gateway_id, prefix=prefix)
    device = Device(mqtt_server, device_id, prefix)
    device.online()
    server = broker_settings(mqtt_server)
    with gateway_in_thread(
        settings=gateway_settings(gateway_id, prefix),
        central=server,
        site=server,
        outbox=tmp_path / "outbox.sqlite3",
    ) as gw:
        cmd = kiosk_command(device_id)
        cid = cmd.command_id
        centre.send([cmd], [])
        wait_for(lambda: "succeeded" in centre.states(cid), 15, "the final report")
        assert centre.states(cid) == ["sent", "delivered", "succeeded"]
        final = centre.report(cid, "succeeded")
        assert (final.detail, final.answer, final.device_id) == (
            "queue opened",
            {"queue": 0},
            device_id,
        )
        (got, response_topic, correlation) = device.received[0]
        assert got == cmd
        assert response_topic == device_answer_topic(device_id, prefix)
        assert correlation == cid.encode()

        # Unacked, the reports come again after ack_timeout_s (2 s here).
        wait_for(lambda: centre.ids().count(f"{cid}.succeeded") >= 2, 10, "a resend")
        assert gw.outbox.reports_pending() == 3
        centre.ack([f"{cid}.sent", f"{cid}.delivered", f"{cid}.succeeded"])
        wait_for(lambda: gw.outbox.reports_pending() == 0, 10, "reports acked")
        seen = len(centre.ids())
        time.sleep(2.5)
        assert len(centre.ids()) == seen  # acked: not sent again

        # The same command again (the centre resending it): the device does not get it twice.
        centre.acking = True
        centre.send([cmd], [])
        wait_for(lambda: len(centre.ids()) > seen, 10, "the current state reported again")
        assert centre.ids()[seen] == f"{cid}.succeeded"
        time.sleep(0.5)
        assert device.got(cid) == 1
        assert gw.counters.commands_received == 2
        assert gw.counters.commands_delivered == 1
        assert gw.counters.commands_succeeded == 1

        # A malformed message from the centre is a counted reject, and nothing else.
        pub.publish(command_topic(gateway_id, prefix), b"{not json", qos=1)
        wait_for(lambda: gw.counters.rejects["malformed"] == 1, 10, "the malformed commands")
        assert gw.counters.commands_received == 2
    centre.close()
    device.close()
    pub.disconnect()


def test_commands_wait_for_an_offline_device_expire_or_are_cancelled_meanwhile(
    mqtt_server, tmp_path, ids
):
    gateway_id, prefix, devices, pub = _setup(mqtt_server, ids)
    device_id = devices[0].device_id
    centre = Centre(mqtt_server, gateway_id=gateway_id, prefix=prefix)
    centre.acking = True
    device = Device(mqtt_server, device_id, prefix)  # connected, but no status: offline
    server = broker_settings(mqtt_server)
    with gateway_in_thread(
        settings=gateway_settings(gateway_id, prefix),
        central=server,
        site=server,
        outbox=tmp_path / "outbox.sqlite3",
    ) as gw:
        waits, expires, cancelled = (
            kiosk_command(device_id),
            kiosk_command(device_id, ttl_s=2),
            kiosk_command(device_id),
        )
        centre.send([waits, expires, cancelled], [])
        wait_for(lambda: len(centre.ids()) >= 3, 10, "three commands held")
        centre.send([], [cancelled.command_id])
        wait_for(lambda: "cancelled" in centre.states(cancelled.command_id), 10, "cancelled")
        wait_for(lambda: "expired" in centre.states(expires.command_id), 10, "expired")
        assert centre.report(expires.command_id, "expired").detail == "the device stayed offline"
        assert centre.states(waits.command_id) == ["sent"]
        assert device.received == []

        device.online()
        wait_for(lambda: "succeeded" in centre.states(waits.command_id), 10, "delivered online")
        assert [c.command_id for c, _t, _d in device.received] == [waits.command_id]
        # A cancel once it reached the device changes nothing.
        centre.send([], [waits.command_id])
        time.sleep(0.5)
        assert centre.states(waits.command_id) == ["sent", "delivered", "succeeded"]
        assert gw.counters.commands_expired == 1
        assert gw.counters.commands_cancelled == 1
    centre.close()
    device.close()
    pub.disconnect()


def _device_account_client(mqtt_server: MosquittoServer, device_id: str, prefix: str, published):
    """Device ``device_id`` with its own broker account (dynamic security: its ACL applies)."""
    account = dynsec.device_account(device_id, prefix)
    password = uuid.uuid4().hex
    with BrokerControl(name="site", broker=broker_settings(mqtt_server)) as control:
        control.run(dynsec.create_account(account, password))
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=account.client_id, protocol=mqtt.MQTTv5)
    c.username_pw_set(account.username, password)
    c.on_publish = lambda _c, _u, mid, reason, _p: published.append((mid, reason.value))
    c.connect("127.0.0.1", mqtt_server.port)
    c.loop_start()
    return c, account


def test_an_answer_naming_another_devices_command_is_refused_or_rejected(
    mqtt_server, tmp_path, ids
):
    """Device b may publish under d/b/ only (broker ACL); an answer there naming a's command
    is rejected by the gateway."""
    gateway_id, prefix, devices, pub = _setup(mqtt_server, ids, n_devices=2)
    a, b = devices[0].device_id, devices[1].device_id
    centre = Centre(mqtt_server, gateway_id=gateway_id, prefix=prefix)
    device = Device(mqtt_server, a, prefix)
    device.answering = False
    device.online()
    published: list[tuple[int, int]] = []
    other, account = _device_account_client(mqtt_server, b, prefix, published)
    server = broker_settings(mqtt_server)
    try:
        with gateway_in_thread(
            settings=gateway_settings(gateway_id, prefix),
            central=server,
            site=server,
            outbox=tmp_path / "outbox.sqlite3",
        ) as gw:
            cmd = kiosk_command(a)
            centre.send([cmd], [])
            wait_for(lambda: device.got(cmd.command_id) == 1, 10, "the command at its device")
            forged = encode_device_answer(
                DeviceAnswer(command_id=cmd.command_id, state="succeeded")
            )
            # On a's answer topic: the broker's ACL keeps it from the gateway.
            other.publish(device_answer_topic(a, prefix), forged, qos=1)
            wait_for(lambda: len(published) == 1, 10, "the broker's PUBACK")
            # On its own: the gateway refuses an answer for a command b was not given.
            other.publish(device_answer_topic(b, prefix), forged, qos=1)
            pub.publish(device_answer_topic(a, prefix), b"{not json", qos=1)
            wait_for(lambda: gw.counters.rejects["unknown_command"] == 1, 10, "the forged answer")
            wait_for(lambda: gw.counters.rejects["malformed"] == 1, 10, "the malformed answer")
            assert gw.counters.device_rejects[b, "unknown_command"] == 1
            time.sleep(0.5)
            assert gw.counters.rejects["unknown_command"] == 1  # the one on a's topic never came
            assert centre.states(cmd.command_id) == ["sent"]
            assert gw.downlink.held[cmd.command_id].state == "delivering"

            # Oversized: refused unread as too_large, the command untouched.
            big = b'{"command_id":"' + cmd.command_id.encode() + b'","detail":"' + b"x" * 5000
            pub.publish(device_answer_topic(a, prefix), big + b'","state":"succeeded"}', qos=1)
            wait_for(lambda: gw.counters.rejects["too_large"] == 1, 10, "the oversized answer")
            assert gw.downlink.held[cmd.command_id].state == "delivering"
            # The real answer, then the same again and a late 'delivered': the command is
            # final once, reported once, and the repeats are neither rejects nor reports.
            real = DeviceAnswer(command_id=cmd.command_id, state="succeeded", detail="ok")
            pub.publish(device_answer_topic(a, prefix), encode_device_answer(real), qos=1)
            wait_for(lambda: "succeeded" in centre.states(cmd.command_id), 10, "the answer")
            late = DeviceAnswer(command_id=cmd.command_id, state="delivered")
            for answer in (real, late):
                pub.publish(device_answer_topic(a, prefix), encode_device_answer(answer), qos=1)
            time.sleep(1.0)
            assert centre.states(cmd.command_id) == ["sent", "succeeded"]
            assert gw.downlink.held[cmd.command_id].state == "succeeded"
            assert sum(gw.counters.rejects.values()) == 3  # unknown_command, malformed, too_large
            assert gw.counters.commands_succeeded == 1
    finally:
        other.disconnect()
        other.loop_stop()
        with BrokerControl(name="site", broker=broker_settings(mqtt_server)) as control:
            control.run(dynsec.delete_account(account))
        centre.close()
        device.close()
        pub.disconnect()


def test_gateway_kill_9_while_a_command_is_at_its_device_publishes_it_again(mqtt_server, tmp_path):
    tag = uuid.uuid4().hex[:6]
    gateway_id, prefix = f"gw-{tag}", f"t{tag}"
    config = tmp_path / "gateway.toml"
    gateway_config_file(
        config, mqtt_server, gateway_id=gateway_id, prefix=prefix, ack_timeout_s=2.0
    )
    devices = mqtt_devices(prefix, 1)
    device_id = devices[0].device_id
    pub = client(mqtt_server)
    publish_config(pub, gateway_id=gateway_id, prefix=prefix, devices=devices, version=1)
    centre = Centre(mqtt_server, gateway_id=gateway_id, prefix=prefix)
    centre.acking = True
    device = Device(mqtt_server, device_id, prefix)
    device.answering = False  # it takes the command and is still working on it at the kill
    device.online()
    log = tmp_path / "gateway.log"
    proc = start_gateway_process(config, log)
    try:
        cmd = kiosk_command(device_id)
        cid = cmd.command_id
        # The centre resends a command until it is reported held, as its dispatcher does.
        deadline = time.monotonic() + 20
        while device.got(cid) == 0 and time.monotonic() < deadline:
            centre.send([cmd], [])
            time.sleep(1.0)
        assert device.got(cid) == 1, log.read_text()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)

        device.answering = True
        proc = start_gateway_process(config, log)
        wait_for(lambda: "succeeded" in centre.states(cid), 20, "the final report after restart")
        assert device.got(cid) == 2
        assert [c.command_id for c, _t, _d in device.received] == [cid, cid]
        assert device.received[1][0] == cmd
        time.sleep(1.0)
        assert centre.ids().count(f"{cid}.succeeded") == 1
        assert centre.states(cid) == ["sent", "delivered", "succeeded"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        centre.close()
        device.close()
        pub.disconnect()
    assert proc.returncode == 0, log.read_text()[-2000:]


class _SimulatedSensor:
    """A simulated SDS011 on a pty, run by firmware_sim in a thread of its own."""

    def __init__(self, protocol: SensorKind) -> None:
        from contracts.settings import BrokerSettings
        from firmware_sim.service import Simulator
        from tests.gateway.test_serialsend import ACCELERATION, serial_spec

        self.spec = serial_spec(protocol)
        self.sim = Simulator(
            devices=[self.spec], site_broker=BrokerSettings(port=0), time_acceleration=ACCELERATION
        )
        self.port = self.sim.ports[self.spec.device_id]
        self._ready = threading.Event()
        self._loop: Any = None
        self._stop: Any = None
        self._thread = threading.Thread(target=self._run, name="sim", daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _run(self) -> None:
        import asyncio

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._ready.set()
            await self.sim.run(self._stop)

        asyncio.run(main())

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        self.sim.close()


def test_a_serial_sensor_put_to_sleep_stops_its_frames_and_wakes_on_command(
    mqtt_server, tmp_path, ids
):
    """Centre -> gateway -> SDS011 frames on a pty -> its 0xC5 replies -> reports."""
    from contracts.messages import DeviceConfig

    gateway_id, prefix = ids
    sensor = _SimulatedSensor("sds011")
    device_id = sensor.spec.device_id
    device = DeviceConfig(
        device_id=device_id,
        device_type="air_quality",
        transport="serial",
        port=sensor.port,
        protocol="sds011",
    )
    pub = client(mqtt_server)
    publish_config(pub, gateway_id=gateway_id, prefix=prefix, devices=[device], version=1)
    centre = Centre(mqtt_server, gateway_id=gateway_id, prefix=prefix)
    centre.acking = True
    server = broker_settings(mqtt_server)

    def command(name: str, **args: int | str) -> Command:
        return Command(
            command_id=command_id(),
            device_id=device_id,
            name=name,
            args=dict(args),
            ttl_s=600,
            created_ms=now_ms(),
        )

    def run(cmd: Command, *, delivered: bool = True) -> CommandReport:
        centre.send([cmd], [])
        wait_for(
            lambda: any(s in centre.states(cmd.command_id) for s in ("succeeded", "failed")),
            15,
            f"{cmd.name}'s final report",
        )
        states = centre.states(cmd.command_id)
        assert states[:-1] == (["sent", "delivered"] if delivered else ["sent"]), states
        return centre.report(cmd.command_id, states[-1])

    def frames_within(gw: Any, seconds: float) -> int:
        before = gw.counters.serial_frames
        time.sleep(seconds)
        return gw.counters.serial_frames - before

    try:
        with gateway_in_thread(
            settings=gateway_settings(gateway_id, prefix),
            central=server,
            site=server,
            outbox=tmp_path / "outbox.sqlite3",
        ) as gw:
            wait_for(lambda: gw.counters.serial_frames >= 10, 15, "frames from the sensor")
            sleep = run(command("sleep"))
            assert (sleep.state, sleep.answer) == ("succeeded", {"working": False})
            assert "confirmed" in sleep.detail
            time.sleep(0.3)  # frames already on the line when it fell asleep
            assert frames_within(gw, 1.5) == 0
            # Asleep, it sends nothing, and still takes the command that wakes it.
            wake = run(command("wake"))
            assert (wake.state, wake.answer) == ("succeeded", {"working": True})
            assert frames_within(gw, 1.0) >= 20
            period = run(command("set_working_period", minutes=5))
            assert (period.state, period.answer) == ("succeeded", {"working_period_min": 5})
            # A command the catalog gives the type but not the SDS011's frames.
            refused = run(command("set_reporting_interval", interval_s=60), delivered=False)
            assert refused.state == "failed"
            assert "sds011 cannot take it" in refused.detail
            assert gw.counters.commands_succeeded == 3
            assert gw.counters.commands_failed == 1
    finally:
        sensor.close()
        centre.close()
        pub.disconnect()
