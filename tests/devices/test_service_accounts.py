"""Service accounts (issue 17): each service does what it must on a real broker, nothing more.

Accounts are made the way an operator makes them, through provisioning and
the session broker's dynamic-security control API (`cityhub broker
service-account`), in a topic prefix of each test's own; the role builders
and the plugin's file are checked without a broker.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from contracts.errors import InvalidIdError, SettingsError
from contracts.ids import check_id
from contracts.settings import load_settings
from contracts.topics import (
    ack_topic,
    batch_topic,
    command_report_topic,
    command_topic,
    config_topic,
    device_command_topic,
    device_status_topic,
    device_uplink_topic,
    gateway_filter,
    ingest_batch_filter,
    ingest_report_filter,
    state_topic,
)
from devices import dynsec
from devices.bundle import decode_bundle
from devices.registry import Registry
from ingest.mqtt import client_id_for
from tests.devices.test_security import NOT_AUTHORIZED, Probe

ROOT = Path(__file__).resolve().parents[2]
# PUBACK 16: accepted, "no matching subscribers" (nobody listens in these tests).
DELIVERED = (0, 16)


def _uid() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture
def probes():
    """MQTT v5 clients (test_security's Probe), closed at the end of the test."""
    made: list[Probe] = []

    def make(port, username, password, client_id=None):
        probe = Probe(port, username, password, client_id or f"probe-{_uid()}")
        made.append(probe)
        return probe

    yield make
    for probe in made:
        probe.close()


# --- pure: names, roles, the plugin's file ----------------------------------------


def test_service_accounts_are_named_kind_dot_instance_and_only_monitor_is_bound():
    ingest = dynsec.service_account("ingest", "compose")
    sim = dynsec.service_account("sim", "compose")
    monitor = dynsec.service_account("monitor", "compose")
    assert (ingest.username, ingest.broker, ingest.client_id) == ("ingest.compose", "central", "")
    assert (sim.username, sim.broker, sim.client_id) == ("sim.compose", "site", "")
    assert (monitor.username, monitor.client_id) == ("monitor.compose", "monitor.compose")
    assert ingest.role.rolename == ingest.username
    # An unbound account is created without a client id (any id connects).
    create = dynsec.create_account(ingest, "pw")[1]
    assert "clientid" not in create
    assert dynsec.create_account(monitor, "pw")[1]["clientid"] == "monitor.compose"


@pytest.mark.parametrize(
    ("kind", "instance"),
    [
        ("admin", "x"),  # not a service kind
        ("cityhub-admin", "x"),
        ("ingest", "a.b"),  # a dot would let one instance's name pass for another's
        ("ingest", ""),
        ("ingest", "UPPER"),
        ("ingest", "x" * 65),
        ("sim", "a/b"),
        ("sim", "+"),
    ],
)
def test_bad_kinds_and_instances_are_refused(kind, instance):
    with pytest.raises(InvalidIdError):
        dynsec.service_account(kind, instance)


def test_ingest_role_is_exactly_its_subscriptions_and_publishes():
    role = dynsec.service_account("ingest", "a", "p-1", share_group="grp").role
    assert {(r.acltype, r.topic, r.allow) for r in role.acls} == {
        ("subscribeLiteral", "$share/grp/p-1/hub/v1/gw/+/batch", True),
        ("subscribeLiteral", "$share/grp/p-1/hub/v1/gw/+/cmdreport", True),
        ("subscribeLiteral", "p-1/hub/v1/gw/+/state", True),
        ("publishClientSend", "p-1/hub/v1/gw/+/ack", True),
        ("publishClientSend", "p-1/hub/v1/gw/+/cmd", True),
    }
    # The filters are the ones ingest subscribes to (contracts.topics).
    literal = {r.topic for r in role.acls if r.acltype == "subscribeLiteral"}
    assert ingest_batch_filter("grp", "p-1") in literal
    assert ingest_report_filter("grp", "p-1") in literal
    assert gateway_filter("state", "p-1") in literal


def test_ingest_client_ids_can_never_be_a_bound_accounts_id():
    ids = {client_id_for("host-0", role, "ingest.compose") for role in ("", "states", "commands")}
    assert len(ids) == 3
    for client_id in ids:
        assert client_id.startswith("ingest.compose-host-0-")
        # A device's client id is its id; a dot is never in one.
        with pytest.raises(InvalidIdError):
            check_id(client_id)
        assert dynsec.client_id_of(f"device.{client_id}") is None
    # Without a service account (the admin, a dev broker) the old shape stays.
    assert client_id_for("host-0").startswith("ingest-host-0-")


def test_base_document_writes_service_accounts_and_keeps_the_others():
    first = dynsec.base_document(
        None,
        admin_username="adm",
        admin_password="a",
        dev_mode=False,
        services=[(dynsec.service_account("ingest", "local"), "pw1")],
    )
    device = dynsec.device_account("kiosk-1")
    first["clients"].append({"username": device.username, "clientid": "kiosk-1", "roles": []})
    first["roles"].append({"rolename": device.username, "acls": []})
    second = dynsec.base_document(
        first,
        admin_username="adm",
        admin_password="a",
        dev_mode=False,
        services=[
            (dynsec.service_account("ingest", "local"), "pw2"),
            (dynsec.service_account("monitor", "local"), "pw3"),
        ],
        salt=b"\0" * dynsec.PW_SALT_BYTES,
    )
    clients = {c["username"]: c for c in second["clients"]}
    assert set(clients) == {"adm", "device.kiosk-1", "ingest.local", "monitor.local"}
    assert [c["username"] for c in second["clients"]].count("ingest.local") == 1
    assert (
        clients["ingest.local"]["password"]
        == (dynsec.hash_password("pw2", b"\0" * dynsec.PW_SALT_BYTES)["password"])
    )
    assert "clientid" not in clients["ingest.local"]
    assert clients["monitor.local"]["clientid"] == "monitor.local"
    roles = {r["rolename"]: r for r in second["roles"]}
    assert [r["rolename"] for r in second["roles"]].count("ingest.local") == 1
    assert {a["topic"] for a in roles["monitor.local"]["acls"]} == {"hub/v1/gw/+/state"}
    assert "device.kiosk-1" in roles


# --- real broker ------------------------------------------------------------------


def _service(provisioner, kind: str, password: str | None = None) -> tuple[str, str]:
    username = f"{kind}.{_uid()}"
    password = password or f"pw-{uuid.uuid4().hex}"
    provisioner.service_account(kind, username.split(".", 1)[1], password)
    return username, password


def test_ingest_account_does_its_work_and_nothing_else(
    provisioner, broker_admin, probes, topic_prefix
):
    username, password = _service(provisioner, "ingest")
    port, p, gw = broker_admin.port, topic_prefix, "gw-x1"
    ingest = probes(port, username, password, client_id_for("w0", "", username))
    assert ingest.accepted
    assert ingest.subscribe(ingest_batch_filter("ingest", p)) == 1
    assert ingest.subscribe(ingest_report_filter("ingest", p)) == 1
    assert ingest.subscribe(gateway_filter("state", p)) == 1
    assert ingest.publish(ack_topic(gw, p)) in DELIVERED
    assert ingest.publish(command_topic(gw, p)) in DELIVERED
    # Refused: acting as a gateway, reading devices, the control API, configs,
    # another share group (a full second copy of the stream), any other prefix.
    assert ingest.publish(batch_topic(gw, p)) == NOT_AUTHORIZED
    assert ingest.publish(state_topic(gw, p)) == NOT_AUTHORIZED
    assert ingest.publish(command_report_topic(gw, p)) == NOT_AUTHORIZED
    assert ingest.publish(config_topic(gw, p)) == NOT_AUTHORIZED
    assert ingest.publish(dynsec.CONTROL_TOPIC, b'{"commands":[]}') == NOT_AUTHORIZED
    assert ingest.publish(device_uplink_topic("kiosk-1", p)) == NOT_AUTHORIZED
    assert ingest.subscribe(f"{p}/d/#") == NOT_AUTHORIZED
    assert ingest.subscribe("#") == NOT_AUTHORIZED
    assert ingest.subscribe(dynsec.RESPONSE_TOPIC) == NOT_AUTHORIZED
    assert ingest.subscribe(gateway_filter("batch", p)) == NOT_AUTHORIZED
    assert ingest.subscribe(gateway_filter("config", p)) == NOT_AUTHORIZED
    assert ingest.subscribe(ingest_batch_filter("other", p)) == NOT_AUTHORIZED
    assert ingest.subscribe(ingest_batch_filter("ingest", "")) == NOT_AUTHORIZED
    # A wrong password and no password are refused (Mosquitto 2.0.11's
    # dynamic security answers 135, not authorized).
    assert not probes(port, username, password + "x").accepted
    assert not probes(port, username, "").accepted
    assert not probes(port, username, None).accepted


def test_no_device_or_gateway_account_takes_an_ingest_client_id(
    provisioner, broker_admin, probes, topic_prefix
):
    username, password = _service(provisioner, "ingest")
    port = broker_admin.port
    ingest_id = client_id_for("w0", "states", username)
    ingest = probes(port, username, password, ingest_id)
    assert ingest.accepted
    gateway_id = f"gw-{_uid()}"
    gw = decode_bundle(
        provisioner.add_gateway(
            gateway_id, site_id="hk-hall-quan", label="t"
        ).files.json.read_bytes()
    )
    device_id = f"kiosk-{_uid()}"
    dev = decode_bundle(
        provisioner.add_device(
            device_id,
            device_type="kiosk",
            site_id="hk-hall-quan",
            gateway_id=gateway_id,
            transport="mqtt",
        ).files.json.read_bytes()
    )
    for account in (gw.central, gw.site, dev.broker):
        intruder = probes(port, account.username, account.password, ingest_id)
        assert intruder.reason == NOT_AUTHORIZED, account.username
    # The refused intruders did not take the session over.
    time.sleep(0.3)
    assert not ingest.disconnected.is_set()
    assert ingest.subscribe(gateway_filter("state", topic_prefix)) == 1


def test_sim_account_publishes_device_topics_only(provisioner, broker_admin, probes, topic_prefix):
    username, password = _service(provisioner, "sim")
    port, p = broker_admin.port, topic_prefix
    device = probes(port, username, password, f"kiosk-{_uid()}")
    assert device.accepted
    assert device.publish(device_uplink_topic("kiosk-1", p)) in DELIVERED
    assert device.publish(device_status_topic("kiosk-1", p)) in DELIVERED
    assert device.publish(f"{p}/d/kiosk-1/res") in DELIVERED
    assert device.publish("application/app-1/device/70b3d57ed005a1c3/event/up") in DELIVERED
    assert device.subscribe(device_command_topic("kiosk-1", p)) == 1
    assert device.publish(batch_topic("gw-x", p)) == NOT_AUTHORIZED
    assert device.publish(state_topic("gw-x", p)) == NOT_AUTHORIZED
    assert device.publish(device_command_topic("kiosk-1", p)) == NOT_AUTHORIZED
    assert device.publish(dynsec.CONTROL_TOPIC, b'{"commands":[]}') == NOT_AUTHORIZED
    assert device.subscribe(f"{p}/d/#") == NOT_AUTHORIZED
    assert device.subscribe(f"{p}/d/+/up") == NOT_AUTHORIZED
    assert device.subscribe(f"{p}/hub/#") == NOT_AUTHORIZED


def test_monitor_account_reads_gateway_states_with_its_own_client_id_only(
    provisioner, broker_admin, probes, topic_prefix
):
    username, password = _service(provisioner, "monitor")
    port, p = broker_admin.port, topic_prefix
    assert probes(port, username, password, "someone-else").reason == NOT_AUTHORIZED
    monitor = probes(port, username, password, username)
    assert monitor.accepted
    assert monitor.subscribe(gateway_filter("state", p)) == 1
    assert monitor.subscribe(gateway_filter("batch", p)) == NOT_AUTHORIZED
    assert monitor.subscribe(f"{p}/d/#") == NOT_AUTHORIZED
    assert monitor.publish(state_topic("gw-x", p)) == NOT_AUTHORIZED
    assert monitor.publish(ack_topic("gw-x", p)) == NOT_AUTHORIZED


def test_running_it_again_rotates_the_password_and_is_audited(
    provisioner, broker_admin, probes, db_conn, seeded
):
    username, old = _service(provisioner, "ingest")
    port = broker_admin.port
    live = probes(port, username, old)
    assert live.accepted
    new = f"pw-{uuid.uuid4().hex}"
    outcome = provisioner.service_account("ingest", username.split(".", 1)[1], new)
    assert any("new password" in line for line in outcome.changes)
    assert not any(old in line or new in line for line in outcome.changes)
    assert live.disconnected.wait(10)
    assert not probes(port, username, old).accepted
    assert probes(port, username, new).accepted
    entries = Registry(db_conn, schema=seeded).audit_entries(
        subject_id=username, action="broker.service_account"
    )
    assert [e.detail["rotated"] for e in entries] == [True, False]
    assert {e.detail["service_kind"] for e in entries} == {"ingest"}
    assert {e.subject_kind for e in entries} == {"service"}
    assert all(old not in str(e.detail) and new not in str(e.detail) for e in entries)


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cityhub", *args],
        env={**os.environ, "COLUMNS": "200", **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )


def test_broker_service_account_command_with_password_files(
    db_url, seeded, mqtt_server, topic_prefix, tmp_path, probes
):
    admin_file = tmp_path / "admin.password"
    admin_file.write_text(mqtt_server.admin_password + "\n")
    broker = {
        "HOST": "127.0.0.1",
        "PORT": str(mqtt_server.port),
        "USERNAME": "cityhub-admin",
        # The admin password through the settings' password_file, as compose gives it.
        "PASSWORD_FILE": str(admin_file),
    }
    env = {
        "CITYHUB_DATABASE__URL": db_url,
        "CITYHUB_DATABASE__SCHEMA": seeded,
        **{f"CITYHUB_BROKER__{k}": v for k, v in broker.items()},
        **{f"CITYHUB_PROVISIONING__SITE_BROKER__{k}": v for k, v in broker.items()},
        "CITYHUB_PROVISIONING__TOPIC_PREFIX": topic_prefix,
        "CITYHUB_LOCAL__STATE_DIR": str(tmp_path / "state"),
        "CITYHUB_OPERATOR": "Phạm Thu Hà",
    }
    instance = f"t-{_uid()}"
    secret = tmp_path / "secrets" / "mqtt_sim_password"
    made = _cli(
        "broker",
        "service-account",
        "sim",
        instance,
        "--password-file",
        str(secret),
        "--new",
        env=env,
    )
    assert made.returncode == 0, made.stderr
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    password = secret.read_text().strip()
    assert len(password) >= 32
    assert password not in made.stdout + made.stderr
    assert f"sim.{instance} created" in made.stdout
    # The service reads the same file through its settings.
    settings = load_settings(
        None,
        {
            "CITYHUB_GATEWAY__SITE_BROKER__USERNAME": f"sim.{instance}",
            "CITYHUB_GATEWAY__SITE_BROKER__PASSWORD_FILE": str(secret),
        },
        install_catalog=False,
    )
    assert settings.gateway.site_broker.password == password
    sim = probes(mqtt_server.port, f"sim.{instance}", settings.gateway.site_broker.password)
    assert sim.publish(device_uplink_topic("kiosk-1", topic_prefix)) in DELIVERED
    # Hostile input: an unknown kind, a missing or empty password file.
    refused = _cli(
        "broker", "service-account", "admin", instance, "--password-file", str(secret), env=env
    )
    assert refused.returncode != 0
    assert "KIND" in refused.stderr
    missing = _cli(
        "broker",
        "service-account",
        "sim",
        instance,
        "--password-file",
        str(tmp_path / "nope"),
        env=env,
    )
    assert missing.returncode != 0
    assert "--password-file" in missing.stderr
    empty = tmp_path / "empty"
    empty.write_text("\n")
    blank = _cli(
        "broker", "service-account", "sim", instance, "--password-file", str(empty), env=env
    )
    assert blank.returncode != 0
    assert "empty" in blank.stderr
    # The first password still works: nothing was changed by the refusals.
    assert probes(mqtt_server.port, f"sim.{instance}", password).accepted


@pytest.mark.parametrize("key", ["broker", "gateway.site_broker", "provisioning.site_broker"])
def test_a_missing_or_empty_password_file_is_a_settings_error_naming_the_key(key, tmp_path):
    env_key = "CITYHUB_" + key.upper().replace(".", "__") + "__PASSWORD_FILE"
    with pytest.raises(SettingsError) as missing:
        load_settings(None, {env_key: str(tmp_path / "absent")}, install_catalog=False)
    assert missing.value.key == f"{key}.password_file"
    (tmp_path / "empty").write_text("")
    with pytest.raises(SettingsError) as empty:
        load_settings(None, {env_key: str(tmp_path / "empty")}, install_catalog=False)
    assert empty.value.key == f"{key}.password_file"
    (tmp_path / "ok").write_text("s3cret\n")
    settings = load_settings(None, {env_key: str(tmp_path / "ok")}, install_catalog=False)
    broker = (
        settings.broker
        if key == "broker"
        else (
            settings.gateway.site_broker
            if key.startswith("gateway")
            else settings.provisioning.site_broker
        )
    )
    assert broker.password == "s3cret"
