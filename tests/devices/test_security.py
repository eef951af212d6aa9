"""Broker security with real Mosquitto and real clients: ACLs, refusals, revoke and rotate live.

Accounts are made by ``devices.provisioning`` through the dynamic-security
control API of the session broker; every test uses ids and a topic prefix of
its own.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
import uuid

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from contracts.errors import ConflictError
from contracts.messages import decode_gateway_config
from contracts.topics import (
    ack_topic,
    batch_topic,
    command_report_topic,
    command_topic,
    config_topic,
    device_answer_topic,
    device_command_topic,
    device_status_topic,
    device_uplink_topic,
)
from devices import dynsec
from devices.brokerctl import BrokerControl
from devices.bundle import decode_bundle

NOT_AUTHORIZED = 135  # MQTT v5 reason code 0x87
BAD_CREDENTIALS = 134  # 0x86 "Bad user name or password"


class Probe:
    """A paho MQTT v5 client that records what the broker says to it."""

    def __init__(
        self,
        port: int,
        username: str | None,
        password: str | None,
        client_id: str,
        *,
        clean_start: bool = True,
    ):
        self.connack = threading.Event()
        self.disconnected = threading.Event()
        self.reason: int | None = None
        self.disconnect_reason: str | None = None
        self.acks: dict[int, int] = {}
        self.subacks: list[list[int]] = []
        self.messages: list[tuple[str, bytes]] = []
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if username is not None:
            client.username_pw_set(username, password)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = lambda _c, _u, mid, rc, _p: self.acks.__setitem__(mid, rc.value)
        client.on_subscribe = lambda _c, _u, _m, codes, _p: self.subacks.append(
            [c.value for c in codes]
        )
        client.on_message = lambda _c, _u, m: self.messages.append((m.topic, bytes(m.payload)))
        self.client = client
        client.connect("127.0.0.1", port, clean_start=clean_start)
        client.loop_start()
        assert self.connack.wait(10), "no CONNACK"

    def _on_connect(self, client, _u, _f, reason, _p):
        self.reason = reason.value
        self.connack.set()
        if reason.is_failure:
            client.disconnect()

    def _on_disconnect(self, _c, _u, _f, reason, _p):
        self.disconnect_reason = str(reason)
        self.disconnected.set()

    @property
    def accepted(self) -> bool:
        return self.reason == 0

    def publish(self, topic: str, payload: bytes = b"x") -> int:
        info = self.client.publish(topic, payload, qos=1)
        deadline = time.monotonic() + 10
        while info.mid not in self.acks and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.acks[info.mid]

    def subscribe(self, topic: str) -> int:
        before = len(self.subacks)
        self.client.subscribe(topic, qos=1)
        deadline = time.monotonic() + 10
        while len(self.subacks) == before and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.subacks[-1][0]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def probes():
    made: list[Probe] = []

    def make(port, username, password, client_id=None, *, clean_start=True):
        probe = Probe(
            port,
            username,
            password,
            client_id or f"probe-{uuid.uuid4().hex[:8]}",
            clean_start=clean_start,
        )
        made.append(probe)
        return probe

    yield make
    for probe in made:
        probe.close()


def _uid() -> str:
    return uuid.uuid4().hex[:8]


def _gateway(provisioner, site="hk-hall-quan"):
    gateway_id = f"gw-{_uid()}"
    outcome = provisioner.add_gateway(gateway_id, site_id=site, label="test")
    return gateway_id, decode_bundle(outcome.files.json.read_bytes())


def _mqtt_device(provisioner, gateway_id, site="hk-hall-quan"):
    device_id = f"kiosk-{_uid()}"
    outcome = provisioner.add_device(
        device_id, device_type="kiosk", site_id=site, gateway_id=gateway_id, transport="mqtt"
    )
    return device_id, decode_bundle(outcome.files.json.read_bytes())


def test_device_cannot_publish_as_another_device(provisioner, broker_admin, probes, topic_prefix):
    gateway_id, _ = _gateway(provisioner)
    a_id, a = _mqtt_device(provisioner, gateway_id)
    b_id, _b = _mqtt_device(provisioner, gateway_id)
    port = broker_admin.port
    watcher = probes(port, broker_admin.username, broker_admin.password)
    assert watcher.subscribe(f"{topic_prefix}/d/#") == 1

    device_a = probes(port, a.broker.username, a.broker.password, a.broker.client_id)
    assert device_a.accepted
    assert device_a.publish(device_uplink_topic(b_id, topic_prefix), b"forged") == NOT_AUTHORIZED
    assert device_a.publish(f"{topic_prefix}/hub/v1/gw/{gateway_id}/batch") == NOT_AUTHORIZED
    assert device_a.publish(a.topics["uplink"], b"genuine") == 0
    # The genuine message went out after the broker had answered the forged ones:
    # once it is here, a forged message that had passed would be here too.
    _wait_for_message(watcher, (device_uplink_topic(a_id, topic_prefix), b"genuine"))
    assert watcher.messages == [(device_uplink_topic(a_id, topic_prefix), b"genuine")]
    # A device subscribes to nothing: it cannot read other devices' data.
    assert device_a.subscribe(f"{topic_prefix}/d/#") == NOT_AUTHORIZED


def test_gateway_is_confined_to_its_own_topics(provisioner, broker_admin, probes, topic_prefix):
    gw_id, gw = _gateway(provisioner)
    other_id, _other = _gateway(provisioner)
    port = broker_admin.port
    central = probes(port, gw.central.username, gw.central.password, gw.central.client_id)
    assert central.accepted
    # 16: accepted, "no matching subscribers".
    assert central.publish(batch_topic(gw_id, topic_prefix)) in (0, 16)
    assert central.publish(batch_topic(other_id, topic_prefix)) == NOT_AUTHORIZED
    # It may not forge its own acks or config either: those come from ingest and the registry.
    assert central.publish(ack_topic(gw_id, topic_prefix)) == NOT_AUTHORIZED
    assert central.publish(config_topic(gw_id, topic_prefix)) == NOT_AUTHORIZED
    assert central.subscribe(ack_topic(gw_id, topic_prefix)) == 1
    assert central.subscribe(ack_topic(other_id, topic_prefix)) == NOT_AUTHORIZED
    assert central.subscribe(f"{topic_prefix}/hub/v1/gw/+/batch") == NOT_AUTHORIZED
    # Its retained config (empty device list) was published at registration.
    assert central.subscribe(config_topic(gw_id, topic_prefix)) == 1
    deadline = time.monotonic() + 5
    while not central.messages and time.monotonic() < deadline:
        time.sleep(0.02)
    config = decode_gateway_config(central.messages[0][1])
    assert (config.gateway_id, config.devices) == (gw_id, [])

    site = probes(port, gw.site.username, gw.site.password, gw.site.client_id)
    assert site.subscribe(f"{topic_prefix}/d/+/up") == NOT_AUTHORIZED
    assert site.publish(f"{topic_prefix}/d/someone/up") == NOT_AUTHORIZED
    assert site.subscribe(f"{topic_prefix}/hub/v1/gw/+/batch") == NOT_AUTHORIZED


def test_only_the_device_reads_its_commands_and_only_its_gateway_sends_them(
    provisioner, broker_admin, probes, topic_prefix
):
    gw_id, gw = _gateway(provisioner)
    other_gw_id, other_gw = _gateway(provisioner)
    a_id, a = _mqtt_device(provisioner, gw_id)
    _b_id, b = _mqtt_device(provisioner, gw_id)
    port = broker_admin.port
    assert (a.topics["command"], a.topics["answer"]) == (
        device_command_topic(a_id, topic_prefix),
        device_answer_topic(a_id, topic_prefix),
    )
    device_a = probes(port, a.broker.username, a.broker.password, a.broker.client_id)
    device_b = probes(port, b.broker.username, b.broker.password, b.broker.client_id)
    # A device reads its own commands, not another's, nor every device's.
    assert device_a.subscribe(a.topics["command"]) == 1
    assert device_a.subscribe(b.topics["command"]) == NOT_AUTHORIZED
    assert device_a.subscribe(f"{topic_prefix}/d/+/cmd") == NOT_AUTHORIZED
    # A device cannot command another device, nor answer for it.
    assert device_b.publish(a.topics["command"], b"{}") == NOT_AUTHORIZED
    assert device_b.publish(a.topics["answer"], b"{}") == NOT_AUTHORIZED
    # Its gateway sends its commands and reads its answers; another gateway does neither.
    site = probes(port, gw.site.username, gw.site.password, gw.site.client_id)
    assert site.subscribe(a.topics["answer"]) == 1
    assert site.publish(a.topics["command"], b'{"probe":1}') == 0
    deadline = time.monotonic() + 5
    while not device_a.messages and time.monotonic() < deadline:
        time.sleep(0.02)
    assert device_a.messages == [(a.topics["command"], b'{"probe":1}')]
    assert site.publish(a.topics["answer"], b"{}") == NOT_AUTHORIZED
    stranger = probes(port, other_gw.site.username, other_gw.site.password, other_gw.site.client_id)
    assert stranger.publish(a.topics["command"], b"{}") == NOT_AUTHORIZED
    assert stranger.subscribe(a.topics["answer"]) == NOT_AUTHORIZED
    # On the central broker a gateway reads only its own commands and reports only its own.
    central = probes(port, gw.central.username, gw.central.password, gw.central.client_id)
    assert central.subscribe(command_topic(gw_id, topic_prefix)) == 1
    assert central.subscribe(command_topic(other_gw_id, topic_prefix)) == NOT_AUTHORIZED
    assert central.publish(command_report_topic(gw_id, topic_prefix)) in (0, 16)
    assert central.publish(command_report_topic(other_gw_id, topic_prefix)) == NOT_AUTHORIZED
    # It may not forge its own commands: those come from ingest.
    assert central.publish(command_topic(gw_id, topic_prefix)) == NOT_AUTHORIZED


def test_wrong_password_and_unknown_and_anonymous_are_refused(provisioner, broker_admin, probes):
    gateway_id, _ = _gateway(provisioner)
    _device_id, bundle = _mqtt_device(provisioner, gateway_id)
    port = broker_admin.port
    own_id = bundle.broker.client_id
    assert not probes(port, bundle.broker.username, bundle.broker.password + "x", own_id).accepted
    assert not probes(port, "device.nobody", "whatever").accepted
    assert not probes(port, None, None).accepted
    assert probes(port, bundle.broker.username, bundle.broker.password, own_id).accepted


def test_rotate_cuts_live_sessions_and_only_the_new_secret_works(
    provisioner, broker_admin, probes, mqtt_server
):
    pid = mqtt_server.pid()
    gateway_id, _ = _gateway(provisioner)
    device_id, old = _mqtt_device(provisioner, gateway_id)
    port = broker_admin.port
    live = probes(port, old.broker.username, old.broker.password, old.broker.client_id)
    assert live.accepted
    outcome = provisioner.rotate_device(device_id)
    new = decode_bundle(outcome.files.json.read_bytes())
    assert new.broker.password != old.broker.password
    assert live.disconnected.wait(5), "the session with the old secret was not cut"
    assert "Administrative action" in live.disconnect_reason
    live.client.loop_stop()  # paho would reconnect with the old secret and be refused
    assert not probes(port, old.broker.username, old.broker.password, old.broker.client_id).accepted
    assert probes(port, new.broker.username, new.broker.password, new.broker.client_id).accepted
    assert mqtt_server.pid() == pid  # no broker restart


def test_revoke_and_disable_cut_live_sessions(provisioner, broker_admin, probes, mqtt_server):
    pid = mqtt_server.pid()
    gateway_id, gw = _gateway(provisioner)
    revoked_id, revoked = _mqtt_device(provisioner, gateway_id)
    disabled_id, disabled = _mqtt_device(provisioner, gateway_id)
    port = broker_admin.port
    live_revoked = probes(
        port, revoked.broker.username, revoked.broker.password, revoked.broker.client_id
    )
    live_disabled = probes(
        port, disabled.broker.username, disabled.broker.password, disabled.broker.client_id
    )
    assert live_revoked.accepted
    assert live_disabled.accepted

    provisioner.revoke_device(revoked_id)
    assert live_revoked.disconnected.wait(5)
    live_revoked.client.loop_stop()
    assert not probes(port, revoked.broker.username, revoked.broker.password).accepted

    outcome = provisioner.set_device_enabled(disabled_id, enabled=False)
    assert live_disabled.disconnected.wait(5)
    live_disabled.client.loop_stop()
    assert not probes(port, disabled.broker.username, disabled.broker.password).accepted
    # The gateway's config lists the disabled device as disabled, the revoked one not at all.
    config = outcome.configs[-1]
    assert {d.device_id: d.enabled for d in config.devices} == {disabled_id: False}

    provisioner.set_device_enabled(disabled_id, enabled=True)
    assert probes(
        port, disabled.broker.username, disabled.broker.password, disabled.broker.client_id
    ).accepted

    # A gateway is revoked only once it serves no active device.
    with pytest.raises(
        ConflictError, match=r"still serves 1 active device \(kiosk-.*: move or revoke it first"
    ):
        provisioner.revoke_gateway(gateway_id)
    provisioner.revoke_device(disabled_id)
    live_gateway = probes(port, gw.central.username, gw.central.password, gw.central.client_id)
    assert live_gateway.accepted
    provisioner.revoke_gateway(gateway_id)
    assert live_gateway.disconnected.wait(5)
    live_gateway.client.loop_stop()
    assert not probes(port, gw.central.username, gw.central.password).accepted
    assert mqtt_server.pid() == pid


@pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="mosquitto-clients missing")
def test_mosquitto_pub_with_the_bundle_works_as_the_bundle_says(
    provisioner, broker_admin, probes, topic_prefix
):
    gateway_id, _ = _gateway(provisioner)
    device_id, bundle = _mqtt_device(provisioner, gateway_id)
    watcher = probes(broker_admin.port, broker_admin.username, broker_admin.password)
    assert watcher.subscribe(f"{topic_prefix}/d/#") == 1
    b = bundle.broker

    def pub(topic: str, message: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                shutil.which("mosquitto_pub") or "mosquitto_pub",
                "-V",
                "mqttv5",
                "-h",
                b.host,
                "-p",
                str(b.port),
                "-u",
                b.username,
                "-P",
                b.password,
                "-i",
                b.client_id,
                "-q",
                str(bundle.settings["qos"]),
                "-t",
                topic,
                "-m",
                message,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    payload = '{"seq": 1, "ts": 1767225600000, "m": {"queue_len": 3}}'
    ok = pub(bundle.topics["uplink"], payload)
    assert ok.returncode == 0, ok.stderr
    forged = pub(device_uplink_topic("someone-else", topic_prefix), payload)
    # mosquitto_pub reports the PUBACK's reason code (it still exits 0).
    assert "Publish 1 failed: Not authorized" in forged.stderr
    _wait_for_sentinel(watcher, topic_prefix)
    assert watcher.messages == [(bundle.topics["uplink"], payload.encode())]
    assert bundle.topics["uplink"] == device_uplink_topic(device_id, topic_prefix)


def _wait_for_message(probe: Probe, message: tuple[str, bytes]) -> None:
    deadline = time.monotonic() + 10
    while message not in probe.messages and time.monotonic() < deadline:
        time.sleep(0.02)
    assert message in probe.messages, f"{message} never arrived"


def _wait_for_sentinel(watcher: Probe, topic_prefix: str) -> None:
    """Until a marker the watcher publishes after everything before it has come back.

    The broker delivers to one subscriber in the order it accepted the
    messages: once the marker is here, anything published earlier that is
    missing was never delivered. The marker is taken out of the record again.
    """
    marker = (f"{topic_prefix}/d/sentinel-{_uid()}/up", b"sentinel")
    assert watcher.publish(*marker) == 0
    _wait_for_message(watcher, marker)
    watcher.messages.remove(marker)


# --- issue 11 item 2: an account connects with its own client id only ---------------


def test_each_account_connects_only_with_its_own_client_id(
    provisioner, broker_admin, probes, topic_prefix
):
    gw_id, gw = _gateway(provisioner)
    _other_id, other = _gateway(provisioner)
    _a_id, a = _mqtt_device(provisioner, gw_id)
    b_id, b = _mqtt_device(provisioner, gw_id)
    port = broker_admin.port
    # Each account with the id its bundle names is accepted.
    site = probes(port, gw.site.username, gw.site.password, gw.site.client_id, clean_start=False)
    assert site.accepted
    assert site.subscribe(b.topics["uplink"]) == 1
    central = probes(port, gw.central.username, gw.central.password, gw.central.client_id)
    assert central.accepted
    device_b = probes(port, b.broker.username, b.broker.password, b.broker.client_id)
    assert device_b.accepted

    a_user, a_pw = a.broker.username, a.broker.password
    attempts = {
        "device creds, the gateway's site id": (a_user, a_pw, gw.site.client_id),
        "device A's creds, device B's id": (a_user, a_pw, b.broker.client_id),
        "gateway creds, another gateway's id": (
            gw.central.username,
            gw.central.password,
            other.central.client_id,
        ),
        "site creds, the central id": (gw.site.username, gw.site.password, gw.central.client_id),
        "device creds, a made-up id": (a_user, a_pw, f"x-{_uid()}"),
    }
    for what, (username, password, client_id) in attempts.items():
        intruder = probes(port, username, password, client_id, clean_start=False)
        assert intruder.reason == NOT_AUTHORIZED, what
        intruder.client.loop_stop()  # paho would retry

    # Nobody was kicked and the gateway kept its session: B's next reading reaches the
    # site subscriber (a takeover's DISCONNECT would have come first on the same socket).
    assert device_b.publish(b.topics["uplink"], b"sentinel") == 0
    _wait_for_message(site, (b.topics["uplink"], b"sentinel"))
    assert not site.disconnected.is_set()
    assert not device_b.disconnected.is_set()
    assert not central.disconnected.is_set()
    assert b.topics["uplink"] == device_uplink_topic(b_id, topic_prefix)


# --- issue 11 item 3: a gateway's site account reads its own devices only ------------


def test_site_account_reads_only_its_own_devices(provisioner, broker_admin, probes, topic_prefix):
    gw_id, gw = _gateway(provisioner)
    neighbour_id, _neighbour = _gateway(provisioner)
    own_id, own = _mqtt_device(provisioner, gw_id)
    theirs_id, theirs = _mqtt_device(provisioner, neighbour_id)
    port = broker_admin.port
    site = probes(port, gw.site.username, gw.site.password, gw.site.client_id)
    for refused in (
        f"{topic_prefix}/d/+/up",
        f"{topic_prefix}/d/+/status",
        f"{topic_prefix}/d/#",
        "#",
        device_uplink_topic(theirs_id, topic_prefix),
        device_status_topic(theirs_id, topic_prefix),
    ):
        assert site.subscribe(refused) == NOT_AUTHORIZED, refused
    assert site.subscribe(device_uplink_topic(own_id, topic_prefix)) == 1
    assert site.subscribe(device_status_topic(own_id, topic_prefix)) == 1

    neighbour_device = probes(port, theirs.broker.username, theirs.broker.password, theirs_id)
    own_device = probes(port, own.broker.username, own.broker.password, own_id)
    assert neighbour_device.publish(theirs.topics["uplink"], b"neighbour") in (0, 16)
    assert own_device.publish(own.topics["uplink"], b"sentinel") == 0
    _wait_for_message(site, (own.topics["uplink"], b"sentinel"))
    assert site.messages == [(own.topics["uplink"], b"sentinel")]


def _site_topics(broker_admin, gateway_id: str) -> set[str]:
    role = dynsec.gateway_site_account(gateway_id).role
    with BrokerControl(name="site", broker=broker_admin) as control:
        data = control.run(dynsec.get_role(role))[0]
    return {acl.topic for acl in dynsec.role_acls(data) if acl.allow}


def test_site_permissions_follow_move_and_revoke(provisioner, broker_admin, probes, topic_prefix):
    gw1_id, gw1 = _gateway(provisioner)
    gw2_id, gw2 = _gateway(provisioner)
    moved_id, moved = _mqtt_device(provisioner, gw1_id)
    stay1_id, stay1 = _mqtt_device(provisioner, gw1_id)
    stay2_id, stay2 = _mqtt_device(provisioner, gw2_id)
    port = broker_admin.port
    site1 = probes(port, gw1.site.username, gw1.site.password, gw1.site.client_id)
    site2 = probes(port, gw2.site.username, gw2.site.password, gw2.site.client_id)
    assert site1.subscribe(moved.topics["uplink"]) == 1
    assert site1.subscribe(stay1.topics["uplink"]) == 1
    assert site2.subscribe(moved.topics["uplink"]) == NOT_AUTHORIZED
    assert site2.subscribe(stay2.topics["uplink"]) == 1
    device = probes(port, moved.broker.username, moved.broker.password, moved_id)
    sentinel1 = probes(port, stay1.broker.username, stay1.broker.password, stay1_id)
    sentinel2 = probes(port, stay2.broker.username, stay2.broker.password, stay2_id)

    provisioner.move_device(moved_id, gateway_id=gw2_id)
    # site1 still holds its subscription (a gateway offline would keep it in its
    # session), but the moved device's readings no longer reach it.
    assert device.publish(moved.topics["uplink"], b"after-move") in (0, 16)
    assert sentinel1.publish(stay1.topics["uplink"], b"sentinel1") == 0
    _wait_for_message(site1, (stay1.topics["uplink"], b"sentinel1"))
    assert site1.messages == [(stay1.topics["uplink"], b"sentinel1")]
    assert site1.subscribe(moved.topics["uplink"]) == NOT_AUTHORIZED
    assert site2.subscribe(moved.topics["uplink"]) == 1
    assert device.publish(moved.topics["uplink"], b"to-gw2") == 0
    _wait_for_message(site2, (moved.topics["uplink"], b"to-gw2"))
    assert moved.topics["uplink"] not in _site_topics(broker_admin, gw1_id)

    provisioner.revoke_device(moved_id)
    assert site2.subscribe(moved.topics["uplink"]) == NOT_AUTHORIZED
    assert _site_topics(broker_admin, gw2_id) == {
        stay2.topics["uplink"],
        stay2.topics["status"],
        f"{stay2.topics['uplink'].removesuffix('/up')}/#",
        f"{stay2.topics['uplink'].removesuffix('/up')}/cmd",
        f"{stay2.topics['uplink'].removesuffix('/up')}/res",
    }
    assert sentinel2.publish(stay2.topics["uplink"], b"sentinel2") == 0
    _wait_for_message(site2, (stay2.topics["uplink"], b"sentinel2"))

    provisioner.revoke_device(stay1_id)
    provisioner.revoke_gateway(gw1_id)
    site1.client.loop_stop()
    assert not probes(port, gw1.site.username, gw1.site.password, gw1.site.client_id).accepted


def test_accounts_made_before_are_brought_up_to_date_and_a_rerun_changes_nothing(
    provisioner, broker_admin, probes, topic_prefix
):
    gw_id, gw = _gateway(provisioner)
    device_id, device = _mqtt_device(provisioner, gw_id)
    site_role = dynsec.gateway_site_account(gw_id, topic_prefix, [device_id]).role
    # Roll the broker back to the accounts this project made before: no client ids, and
    # a site role that may subscribe to every device.
    legacy = [
        {"command": "setClientId", "username": name}
        for name in (device.broker.username, gw.site.username, gw.central.username)
    ]
    legacy += [
        {"command": "removeRoleACL", "rolename": site_role.rolename, **acl}
        for acl in ({"acltype": a.acltype, "topic": a.topic} for a in site_role.acls)
    ]
    legacy.append(
        {
            "command": "addRoleACL",
            "rolename": site_role.rolename,
            "acltype": "subscribePattern",
            "topic": f"{topic_prefix}/d/+/up",
            "allow": True,
        }
    )
    with BrokerControl(name="site", broker=broker_admin) as control:
        control.run(legacy)
    port = broker_admin.port
    before = probes(port, device.broker.username, device.broker.password, gw.site.client_id)
    assert before.accepted  # the hole, as it was
    before.close()

    outcome = provisioner.sync_broker()
    assert sum("bound to client id" in change for change in outcome.changes) == 3
    intruder = probes(port, device.broker.username, device.broker.password, gw.site.client_id)
    assert intruder.reason == NOT_AUTHORIZED
    intruder.client.loop_stop()
    site = probes(port, gw.site.username, gw.site.password, gw.site.client_id)
    assert site.subscribe(f"{topic_prefix}/d/+/up") == NOT_AUTHORIZED
    assert site.subscribe(device.topics["uplink"]) == 1
    assert provisioner.sync_broker().changes == []


def test_roles_made_before_commands_learn_them_and_a_rerun_changes_nothing(
    provisioner, broker_admin, probes, topic_prefix
):
    gw_id, gw = _gateway(provisioner)
    device_id, device = _mqtt_device(provisioner, gw_id)
    assert device.topics["command"] == device_command_topic(device_id, topic_prefix)
    central_role = dynsec.gateway_central_account(gw_id, topic_prefix).role
    device_role = dynsec.device_account(device_id, topic_prefix).role
    # Roll the broker back to the roles made before commands: a device that may not
    # read d/{id}/cmd, a gateway that may neither read its commands nor report on them.
    made_before = [
        (central_role.rolename, "subscribeLiteral", command_topic(gw_id, topic_prefix)),
        (central_role.rolename, "publishClientSend", command_report_topic(gw_id, topic_prefix)),
        (device_role.rolename, "subscribeLiteral", device.topics["command"]),
    ]
    with BrokerControl(name="site", broker=broker_admin) as control:
        control.run(
            [
                {"command": "removeRoleACL", "rolename": name, "acltype": kind, "topic": topic}
                for name, kind, topic in made_before
            ]
        )
    port = broker_admin.port
    before = probes(port, device.broker.username, device.broker.password, device_id)
    assert before.subscribe(device.topics["command"]) == NOT_AUTHORIZED
    before.close()

    outcome = provisioner.sync_broker()
    changed = [c for c in outcome.changes if "brought up to date" in c]
    assert len(changed) == 2, outcome.changes
    assert any(central_role.rolename in c and "/cmdreport" in c for c in changed)
    assert any(device_role.rolename in c and device.topics["command"] in c for c in changed)
    after = probes(port, device.broker.username, device.broker.password, device_id)
    assert after.subscribe(device.topics["command"]) == 1
    central = probes(port, gw.central.username, gw.central.password, gw.central.client_id)
    assert central.subscribe(command_topic(gw_id, topic_prefix)) == 1
    assert central.publish(command_report_topic(gw_id, topic_prefix)) in (0, 16)
    audited = provisioner.registry.audit_entries(action="device.sync")
    assert [e.subject_id for e in audited] == [device_id]
    assert provisioner.sync_broker().changes == []
