"""Provisioning: pure checks, ACLs and bundles; the `cityhub devices|gateways|audit` commands.

The command tests run `python -m cityhub` against the test database and the
session broker, and check after every mistake that nothing changed: the
registry rows, the audit log, the broker's accounts and the bundle directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
import segno

from contracts.errors import (
    BrokerControlError,
    ConflictError,
    InvalidIdError,
    InvalidPortError,
    MalformedPayloadError,
    UnknownDeviceTypeError,
)
from contracts.serialurl import check_port_url
from contracts.settings import load_settings
from devices import credentials, dynsec
from devices.brokerctl import BrokerControl
from devices.bundle import (
    MqttAccess,
    decode_bundle,
    device_bundle,
    encode_bundle,
    gateway_bundle,
    gateway_settings_toml,
    qr_payload,
)
from devices.validation import device_config

# --- pure: ports, requests, ACLs, commands, secrets, bundles -------------------------


@pytest.mark.parametrize(
    "port",
    [
        "/dev/ttyUSB0",
        "/dev/ttyAMA0",
        "/dev/serial/by-id/usb-FTDI_FT232R_USB_UART_A50285BI-if00-port0",
        "/dev/pts/7",
        "socket://10.20.0.5:4001",
        "socket://gw-hk.local:4001",
        "rfc2217://192.168.1.10:2217",
    ],
)
def test_port_urls_that_reach_a_serial_device(port):
    assert check_port_url(port) == port


@pytest.mark.parametrize(
    "port",
    [
        "",
        "ttyUSB0",
        "COM3",
        "/dev/tty USB0",
        "/dev/",
        "//dev/ttyUSB0",
        "http://10.0.0.1:80",
        "socket://10.0.0.1",
        "socket://:4001",
        "socket://host:99999",
        "/dev/ttyUSB0\n",
        "/dev/ttyUSB0;rm -rf /",
        "loop://",
    ],
)
def test_port_urls_refused(port):
    with pytest.raises(InvalidPortError):
        check_port_url(port)


def test_device_requests_are_checked_against_the_catalog():
    serial = device_config(
        device_id="aq-01",
        device_type="air_quality",
        transport="serial",
        port="/dev/ttyUSB0",
        protocol="pms5003",
        label="",
    )
    assert (serial.transport, serial.port, serial.protocol) == ("serial", "/dev/ttyUSB0", "pms5003")
    mqtt = device_config(
        device_id="kiosk-01",
        device_type="kiosk",
        transport="mqtt",
        port=None,
        protocol=None,
        label="",
    )
    assert mqtt.port is None
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"device_type": "toaster"}, UnknownDeviceTypeError, "not one of"),
        ({"device_type": "kiosk", "transport": "serial"}, ConflictError, "does not speak serial"),
        ({"protocol": None}, ConflictError, "needs one of"),
        ({"port": "COM3"}, InvalidPortError, "neither a device path"),
        ({"device_id": "AQ 01"}, InvalidIdError, "does not match"),
        ({"transport": "mqtt"}, InvalidPortError, "only serial and Modbus devices"),
    ]
    base = {
        "device_id": "aq-01",
        "device_type": "air_quality",
        "transport": "serial",
        "port": "/dev/ttyUSB0",
        "protocol": "pms5003",
        "label": "",
    }
    for change, error, message in cases:
        with pytest.raises(error, match=message):
            device_config(**(base | change))


def test_acl_roles_confine_devices_and_gateways():
    device = dynsec.device_account("kiosk-07", "t1")
    assert device.username == "device.kiosk-07"
    assert [(a.acltype, a.topic) for a in device.role.acls] == [
        ("publishClientSend", "t1/d/kiosk-07/#"),
        ("subscribeLiteral", "t1/d/kiosk-07/cmd"),
    ]
    central, site = dynsec.gateway_accounts("gw-hk", "")
    assert (central.broker, central.username, site.broker, site.username) == (
        "central",
        "gateway.gw-hk",
        "site",
        "gateway.gw-hk.site",
    )
    assert sorted((a.acltype, a.topic) for a in central.role.acls) == [
        ("publishClientSend", "hub/v1/gw/gw-hk/batch"),
        ("publishClientSend", "hub/v1/gw/gw-hk/cmdreport"),
        ("publishClientSend", "hub/v1/gw/gw-hk/state"),
        ("subscribeLiteral", "hub/v1/gw/gw-hk/ack"),
        ("subscribeLiteral", "hub/v1/gw/gw-hk/cmd"),
        ("subscribeLiteral", "hub/v1/gw/gw-hk/config"),
    ]
    assert (device.client_id, central.client_id, site.client_id) == (
        "kiosk-07",
        "gw-gw-hk",
        "gw-gw-hk-site",
    )
    # Before it has devices, a gateway's site role allows nothing and denies receiving
    # d/# and ChirpStack's application/#.
    assert [(a.acltype, a.topic, a.allow) for a in site.role.acls] == [
        ("publishClientReceive", "d/#", False),
        ("publishClientReceive", "application/#", False),
    ]
    site = dynsec.gateway_site_account("gw-hk", "t1", ["kiosk-07"], ["70b3d57ed005a1b2"])
    events = "application/+/device/70b3d57ed005a1b2/event/+"
    assert sorted((a.acltype, a.topic, a.allow, a.priority) for a in site.role.acls) == [
        ("publishClientReceive", "application/#", False, 0),
        ("publishClientReceive", events, True, 1),
        ("publishClientReceive", "t1/d/#", False, 0),
        ("publishClientReceive", "t1/d/kiosk-07/#", True, 1),
        ("publishClientSend", "t1/d/kiosk-07/cmd", True, 0),
        ("subscribeLiteral", events, True, 0),
        ("subscribeLiteral", "t1/d/kiosk-07/res", True, 0),
        ("subscribeLiteral", "t1/d/kiosk-07/status", True, 0),
        ("subscribeLiteral", "t1/d/kiosk-07/up", True, 0),
    ]
    with pytest.raises(InvalidIdError):
        dynsec.device_account("kiosk/#")
    # ChirpStack's account publishes device events only; its client id is no device's.
    chirpstack = dynsec.chirpstack_account("gw-hk")
    assert (chirpstack.broker, chirpstack.username, chirpstack.client_id) == (
        "site",
        "chirpstack.gw-hk",
        "chirpstack.gw-hk",
    )
    assert [(a.acltype, a.topic, a.allow) for a in chirpstack.role.acls] == [
        ("publishClientSend", "application/+/device/+/event/+", True)
    ]
    assert dynsec.client_id_of(chirpstack.username) is None


def test_client_ids_follow_from_usernames():
    assert dynsec.client_id_of("device.kiosk-07") == "kiosk-07"
    assert dynsec.client_id_of("gateway.gw-hk") == "gw-gw-hk"
    assert dynsec.client_id_of("gateway.gw-hk.site") == "gw-gw-hk-site"
    for other in ("cityhub-admin", "device.", "device.Bad/#", "gateway.gw-hk.other", "x.y"):
        assert dynsec.client_id_of(other) is None, other


def test_role_changes_bring_a_role_to_the_registry_and_undo():
    legacy = (dynsec.AclRule(acltype="subscribePattern", topic="d/+/up"),)
    one = dynsec.gateway_site_account("gw-hk", "", ["kiosk-1"]).role
    forward, undo = dynsec.role_changes(legacy, one)
    assert [(c["command"], c["topic"]) for c in forward] == [
        ("removeRoleACL", "d/+/up"),
        ("addRoleACL", "d/#"),
        ("addRoleACL", "application/#"),
        ("addRoleACL", "d/kiosk-1/up"),
        ("addRoleACL", "d/kiosk-1/status"),
        ("addRoleACL", "d/kiosk-1/res"),
        ("addRoleACL", "d/kiosk-1/#"),
        ("addRoleACL", "d/kiosk-1/cmd"),
    ]
    assert forward[1]["allow"] is forward[2]["allow"] is False
    assert forward[6]["priority"] == 1
    assert [c["command"] for c in undo] == ["removeRoleACL"] * 7 + ["addRoleACL"]
    # Already current: nothing to send (a re-run is free). A changed rule is replaced.
    assert dynsec.role_changes(one.acls, one) == ([], [])
    two = dynsec.gateway_site_account("gw-hk", "", ["kiosk-1", "kiosk-2"]).role
    forward, _ = dynsec.role_changes(one.acls, two)
    assert {c["topic"] for c in forward} == {
        "d/kiosk-2/up",
        "d/kiosk-2/status",
        "d/kiosk-2/res",
        "d/kiosk-2/#",
        "d/kiosk-2/cmd",
    }
    assert dynsec.role_acls({"role": {"acls": msgspec.to_builtins(list(one.acls))}}) == one.acls
    with pytest.raises(MalformedPayloadError):
        dynsec.role_acls({"role": {"acls": [{"acltype": "nonsense", "topic": 1}]}})


def test_control_commands_and_responses():
    account = dynsec.device_account("kiosk-07")
    commands = dynsec.create_account(account, "s3cret")
    assert [c["command"] for c in commands] == ["createRole", "createClient"]
    assert json.loads(dynsec.encode_commands(commands))["commands"][1]["roles"] == [
        {"rolename": "device.kiosk-07"}
    ]
    ok = dynsec.decode_responses(
        b'{"responses":[{"command":"createRole"},{"command":"createClient"}]}'
    )
    assert dynsec.check_responses(commands, ok) == [None, None]
    failed = dynsec.decode_responses(
        b'{"responses":[{"command":"createRole"},'
        b'{"command":"createClient","error":"Client already exists"}]}'
    )
    with pytest.raises(BrokerControlError, match=r"createClient device\.kiosk-07: Client already"):
        dynsec.check_responses(commands, failed)
    assert dynsec.check_responses(commands, failed, tolerated=frozenset({"Client already exists"}))


def test_plugin_password_hash_is_mosquittos_pbkdf2():
    salt = bytes(range(12))
    fields = dynsec.hash_password("xin chào", salt)
    expected = hashlib.pbkdf2_hmac("sha512", "xin chào".encode(), salt, 101)
    assert fields["iterations"] == 101
    assert fields["password"] == __import__("base64").b64encode(expected).decode()


def test_base_document_keeps_provisioned_accounts_and_sets_dev_mode():
    first = dynsec.base_document(None, admin_username="adm", admin_password="a", dev_mode=True)
    assert first["anonymousGroup"] == dynsec.DEV_ANONYMOUS_GROUP
    first["clients"].append({"username": "device.kiosk-1", "roles": []})
    second = dynsec.base_document(first, admin_username="adm", admin_password="b", dev_mode=False)
    assert "anonymousGroup" not in second
    assert [c["username"] for c in second["clients"]] == ["device.kiosk-1", "adm"]
    assert all(g["groupname"] != dynsec.DEV_ANONYMOUS_GROUP for g in second["groups"])
    assert second["defaultACLAccess"]["publishClientSend"] is False
    # Accounts made before client ids were bound get theirs; the admin account stays free.
    clients = {c["username"]: c.get("clientid") for c in second["clients"]}
    assert clients == {"device.kiosk-1": "kiosk-1", "adm": None}


def _pre_command_role(account: dynsec.Account) -> dict[str, object]:
    """The role as versions before commands wrote it: the same rules minus the command ones."""
    old = [
        msgspec.to_builtins(acl)
        for acl in account.role.acls
        if not acl.topic.endswith(("/cmd", "/res", "/cmdreport"))
    ]
    return {"rolename": account.role.rolename, "acls": old}


def _rules(role: dict[str, object]) -> set[tuple[str, str, bool]]:
    acls = role["acls"]
    assert isinstance(acls, list)
    return {(a["acltype"], a["topic"], a.get("allow", True)) for a in acls}


@pytest.mark.parametrize("prefix", ["", "t1"])
def test_base_document_gives_roles_from_before_commands_their_command_rules(prefix):
    accounts = [
        dynsec.device_account("kiosk-07", prefix),
        dynsec.gateway_central_account("gw-hk", prefix),
        dynsec.gateway_site_account("gw-hk", prefix, ["kiosk-07", "aq-01"]),
    ]
    existing = {"roles": [_pre_command_role(a) for a in accounts], "clients": []}
    document = dynsec.base_document(
        existing, admin_username="adm", admin_password="a", dev_mode=False
    )
    roles = {r["rolename"]: r for r in document["roles"]}
    for account in accounts:
        expected = {(a.acltype, a.topic, a.allow) for a in account.role.acls}
        assert _rules(roles[account.role.rolename]) == expected, account.username
    # Current roles are left as they are: a second start changes nothing.
    again = dynsec.base_document(document, admin_username="adm", admin_password="a", dev_mode=False)
    assert again["roles"] == document["roles"]


def test_secret_hashes_verify_and_never_contain_the_secret():
    secret = credentials.new_secret()
    assert len(secret) == 32
    stored = credentials.hash_secret(secret)
    assert secret not in stored
    assert credentials.verify_secret(secret, stored)
    assert not credentials.verify_secret(secret + "x", stored)
    assert not credentials.verify_secret(secret, "garbage")


def _access(password: str) -> MqttAccess:
    return MqttAccess(
        host="10.1.2.3", port=1883, tls=False, username="u", password=password, client_id="c"
    )


def test_bundles_round_trip_and_fit_a_qr_code():
    config = device_config(
        device_id="kiosk-07",
        device_type="kiosk",
        transport="mqtt",
        port=None,
        protocol=None,
        label="",
    )
    bundle = device_bundle(
        config,
        site_id="hk-hall-quan",
        gateway_id="gw-hk",
        location="Tầng 1, quầy 3",
        hardware_id="SN-0042",
        broker=_access("pw-123"),
        prefix="",
        issued_at="2026-01-01T00:00:00+00:00",
        issued_by="Lan",
    )
    assert decode_bundle(encode_bundle(bundle)) == bundle
    assert bundle.topics == {
        "uplink": "d/kiosk-07/up",
        "status": "d/kiosk-07/status",
        "command": "d/kiosk-07/cmd",
        "answer": "d/kiosk-07/res",
    }
    assert bundle.settings["will_topic"] == "d/kiosk-07/status"
    payload = qr_payload(bundle)
    assert json.loads(payload)["broker"]["password"] == "pw-123"
    segno.make(payload, error="l")  # raises if it does not fit
    gw = gateway_bundle(
        gateway_id="gw-hk",
        site_id="hk-hall-quan",
        label="",
        location="",
        central=_access("c-pw"),
        site=_access("s-pw"),
        prefix="p1",
        ca_pem="-----BEGIN CERTIFICATE-----\n" + "A" * 3000,
        cert_pem="",
        key_pem="",
        issued_at="2026-01-01T00:00:00+00:00",
        issued_by="Lan",
    )
    assert "ca_pem" not in qr_payload(gw)
    assert decode_bundle(encode_bundle(gw)) == gw


def test_gateway_settings_file_is_valid_settings(tmp_path):
    gw = gateway_bundle(
        gateway_id="gw-hk",
        site_id="hk-hall-quan",
        label="",
        location="",
        central=_access('c-"pw\\'),
        site=_access("s-pw"),
        prefix="p1",
        ca_pem="",
        cert_pem="",
        key_pem="",
        issued_at="2026-01-01T00:00:00+00:00",
        issued_by="Lan",
    )
    path = tmp_path / "gw.toml"
    path.write_text(gateway_settings_toml(gw))
    settings = load_settings(path, {})
    assert settings.broker.password == 'c-"pw\\'
    assert settings.gateway.site_broker.password == "s-pw"
    assert (settings.gateway.gateway_id, settings.gateway.topic_prefix) == ("gw-hk", "p1")


# --- the commands -------------------------------------------------------------------


SITE = "hk-hall-quan"
OTHER_SITE = "bd-hall-quan"


@pytest.fixture
def env(db_url, seeded, mqtt_server, topic_prefix, tmp_path):
    return {
        "CITYHUB_DATABASE__URL": db_url,
        "CITYHUB_DATABASE__SCHEMA": seeded,
        "CITYHUB_BROKER__HOST": "127.0.0.1",
        "CITYHUB_BROKER__PORT": str(mqtt_server.port),
        "CITYHUB_BROKER__USERNAME": "cityhub-admin",
        "CITYHUB_BROKER__PASSWORD": mqtt_server.admin_password,
        "CITYHUB_PROVISIONING__SITE_BROKER__HOST": "127.0.0.1",
        "CITYHUB_PROVISIONING__SITE_BROKER__PORT": str(mqtt_server.port),
        "CITYHUB_PROVISIONING__SITE_BROKER__USERNAME": "cityhub-admin",
        "CITYHUB_PROVISIONING__SITE_BROKER__PASSWORD": mqtt_server.admin_password,
        "CITYHUB_PROVISIONING__TOPIC_PREFIX": topic_prefix,
        "CITYHUB_PROVISIONING__BUNDLE_DIR": str(tmp_path / "bundles"),
        "CITYHUB_LOCAL__STATE_DIR": str(tmp_path / "state"),
        "CITYHUB_OPERATOR": "Phạm Thu Hà",
    }


def cityhub(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cityhub", *args],
        env={**os.environ, "COLUMNS": "250", **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def ok(*args: str, env: dict[str, str]) -> str:
    result = cityhub(*args, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _uid() -> str:
    return uuid.uuid4().hex[:8]


def snapshot(db_conn, schema: str, bundles: Path) -> dict[str, object]:
    """Everything a provisioning command may change on the registry side and on disk."""
    tables = {}
    for table, key in (
        ("gateways", "gateway_id"),
        ("devices", "device_id"),
        ("credentials", "username"),
        ("audit_log", "audit_id"),
    ):
        tables[table] = db_conn.execute(f"SELECT * FROM {schema}.{table} ORDER BY {key}").fetchall()
    files = (
        sorted(str(p.relative_to(bundles)) for p in bundles.rglob("*")) if bundles.exists() else []
    )
    return {"tables": tables, "files": files}


def broker_has(broker_admin, username: str) -> bool:
    with BrokerControl(name="check", broker=broker_admin) as control:
        data = control.run(
            [{"command": "getClient", "username": username}],
            tolerated=frozenset({"Client not found"}),
        )
    return data[0] is not None


def test_gateway_and_device_lifecycle(env, db_conn, seeded, broker_admin, tmp_path):
    gw, other_gw, device = f"gw-{_uid()}", f"gw-{_uid()}", f"kiosk-{_uid()}"
    bundles = tmp_path / "bundles"
    out = ok("gateways", "add", gw, "--site", SITE, "--label", "hall gateway", env=env)
    assert f"gateway {gw} registered at site {SITE}" in out
    assert f"central broker: account gateway.{gw} created" in out
    assert f"gateway {gw}: config version" in out
    ok("gateways", "add", other_gw, "--site", OTHER_SITE, env=env)

    out = ok(
        "devices", "add", device, "--type", "kiosk", "--site", SITE, "--gateway", gw,
        "--location", "Tầng 1, quầy 3", "--label", "kiosk 3", "--hardware-id", "SN-1", "--qr",
        env=env,
    )  # fmt: skip
    assert f"device {device} registered: kiosk at site {SITE}, gateway {gw}, MQTT" in out
    assert f"account device.{device} created" in out
    # Counts of one take the singular: the config, the gateway's ACL and the listing.
    assert re.search(rf"gateway {gw}: config version \d+ published \(1 device\)", out), out
    assert "may read the topics of 1 device, no others" in out
    listing = ok("devices", "list", "--gateway", gw, env=env)
    assert re.search(r"\b1 device\b(?!s)", listing), listing
    assert "█" in out or "▀" in out  # the QR code in the terminal
    bundle_path = bundles / f"device-{device}.json"
    for path in (bundle_path, bundles / f"device-{device}.png", bundles / f"gateway-{gw}.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(bundles.stat().st_mode) == 0o700
    bundle = decode_bundle(bundle_path.read_bytes())
    secret = bundle.broker.password
    assert broker_has(broker_admin, f"device.{device}")
    stored = db_conn.execute(
        f"SELECT secret_hash FROM {seeded}.credentials WHERE username = %s", (f"device.{device}",)
    ).fetchone()[0]
    assert secret not in stored
    assert credentials.verify_secret(secret, stored)

    gateway_secret = decode_bundle((bundles / f"gateway-{gw}.json").read_bytes()).central.password
    _listings_hide(env, device, gw, [secret, gateway_secret])
    _move_replace_rotate_revoke(env, broker_admin, bundles, device, gw, other_gw, secret)


def _listings_hide(env, device, gw, secrets):
    for listing in (
        ok("devices", "list", env=env),
        ok("devices", "list", "--json", env=env),
        ok("devices", "list", "--site", SITE, "--type", "kiosk", env=env),
        ok("devices", "show", device, env=env),
        ok("devices", "show", device, "--json", env=env),
        ok("gateways", "list", "--json", env=env),
        ok("gateways", "show", gw, "--json", env=env),
        ok("audit", "--json", env=env),
    ):
        for secret in secrets:
            assert secret not in listing
        assert "scrypt$" not in listing
    listed = json.loads(ok("devices", "list", "--json", "--gateway", gw, env=env))
    assert [(d["device_id"], d["location"], d["status"]) for d in listed] == [
        (device, "Tầng 1, quầy 3", "active")
    ]
    shown = json.loads(ok("gateways", "show", gw, "--json", env=env))
    assert shown["devices"] == [device]


def _move_replace_rotate_revoke(env, broker_admin, bundles, device, gw, other_gw, secret):
    bundle_path = bundles / f"device-{device}.json"
    out = ok("devices", "move", device, "--gateway", other_gw, env=env)
    assert f"site {SITE} -> {OTHER_SITE}, gateway {gw} -> {other_gw}" in out
    assert f"gateway {gw}: config version" in out  # both gateways are told
    assert f"gateway {other_gw}: config version" in out

    out = ok("devices", "replace", device, "--hardware-id", "SN-2", env=env)
    assert "hardware SN-1 -> SN-2; readings history kept" in out
    replaced = decode_bundle(bundle_path.read_bytes())
    assert replaced.hardware_id == "SN-2"
    assert replaced.broker.password != secret

    out = ok("devices", "rotate-credentials", device, env=env)
    assert "new secret" in out
    assert decode_bundle(bundle_path.read_bytes()).broker.password != replaced.broker.password

    out = ok("devices", "revoke", device, env=env)
    assert f"device {device} revoked" in out
    assert not broker_has(broker_admin, f"device.{device}")
    out = ok("gateways", "revoke", gw, env=env)
    assert "retained config cleared" in out
    assert not broker_has(broker_admin, f"gateway.{gw}")

    audit = json.loads(ok("audit", "--json", "--subject", device, env=env))
    assert [e["action"] for e in audit] == [
        "device.revoke",
        "device.rotate",
        "device.replace",
        "device.move",
        "device.add",
    ]
    assert {e["operator"] for e in audit} == {"Phạm Thu Hà"}
    assert audit[-1]["detail"]["location"] == "Tầng 1, quầy 3"
    table = ok("audit", "--limit", "3", env=env)
    assert "gateway.revoke" in table
    assert "Phạm Thu Hà" in table
    # The device's revocation (among the newest three) on Hanoi's clock (UTC+7), zone shown.
    revoked = datetime.fromisoformat(audit[0]["ts"]).astimezone(UTC) + timedelta(hours=7)
    assert f"{revoked:%d/%m/%Y %H:%M:%S} +07" in table


def test_serial_device_gets_no_broker_account(env, broker_admin, tmp_path):
    gw, device = f"gw-{_uid()}", f"aq-{_uid()}"
    ok("gateways", "add", gw, "--site", SITE, env=env)
    out = ok(
        "devices", "add", device, "--type", "air_quality", "--site", SITE, "--gateway", gw,
        "--transport", "serial", "--port", "socket://10.20.0.5:4001", "--protocol", "sds011",
        env=env,
    )  # fmt: skip
    assert "port socket://10.20.0.5:4001 (sds011)" in out
    assert "account" not in out
    assert not broker_has(broker_admin, f"device.{device}")
    bundle = decode_bundle((tmp_path / "bundles" / f"device-{device}.json").read_bytes())
    assert bundle.broker is None
    assert (bundle.port, bundle.protocol) == ("socket://10.20.0.5:4001", "sds011")
    refused = cityhub("devices", "rotate-credentials", device, env=env)
    assert refused.returncode == 1
    assert "serial device: it has no broker credential" in refused.stderr


MISTAKES = {
    "unknown site": (
        ["devices", "add", "{new}", "--type", "kiosk", "--site", "hk-nowhere", "--gateway", "{gw}"],
        "site 'hk-nowhere' is not registered",
    ),
    "site of another gateway": (
        ["devices", "add", "{new}", "--type", "kiosk", "--site", OTHER_SITE, "--gateway", "{gw}"],
        f"serves site '{SITE}', not '{OTHER_SITE}'",
    ),
    "unknown gateway": (
        ["devices", "add", "{new}", "--type", "kiosk", "--site", SITE, "--gateway", "gw-ghost"],
        "gateway 'gw-ghost' is not registered",
    ),
    "duplicate device id": (
        ["devices", "add", "{dev}", "--type", "kiosk", "--site", SITE, "--gateway", "{gw}"],
        "already exists",
    ),
    "duplicate gateway id": (["gateways", "add", "{gw}", "--site", SITE], "already exists"),
    "bad port URL": (
        [
            "devices",
            "add",
            "{new}",
            "--type",
            "air_quality",
            "--site",
            SITE,
            "--gateway",
            "{gw}",
            "--transport",
            "serial",
            "--port",
            "COM3",
            "--protocol",
            "pms5003",
        ],
        "neither a device path",
    ),
    "wrong type": (
        ["devices", "add", "{new}", "--type", "toaster", "--site", SITE, "--gateway", "{gw}"],
        "device type 'toaster' is not one of",
    ),
    "transport the type lacks": (
        [
            "devices",
            "add",
            "{new}",
            "--type",
            "kiosk",
            "--site",
            SITE,
            "--gateway",
            "{gw}",
            "--transport",
            "serial",
            "--port",
            "/dev/ttyUSB0",
            "--protocol",
            "pms5003",
        ],
        "does not speak serial",
    ),
    "bad id": (
        ["devices", "add", "Kiosk 1", "--type", "kiosk", "--site", SITE, "--gateway", "{gw}"],
        "does not match",
    ),
    "move to the same gateway": (["devices", "move", "{dev}", "--gateway", "{gw}"], "already on"),
    "move to a missing gateway": (
        ["devices", "move", "{dev}", "--gateway", "gw-ghost"],
        "not registered",
    ),
    "revoke unknown device": (["devices", "revoke", "kiosk-ghost"], "not registered"),
    "revoke gateway with devices": (
        ["gateways", "revoke", "{gw}"],
        "still serves 1 active device (kiosk-",
    ),
    "no operator": (
        ["devices", "add", "{new}", "--type", "kiosk", "--site", SITE, "--gateway", "{gw}"],
        "setting 'operator'",
    ),
}


@pytest.mark.parametrize("mistake", MISTAKES, ids=list(MISTAKES))
def test_mistakes_are_clear_errors_and_change_nothing(
    mistake, env, db_conn, seeded, broker_admin, tmp_path
):
    gw, dev, new = f"gw-{_uid()}", f"kiosk-{_uid()}", f"kiosk-{_uid()}"
    ok("gateways", "add", gw, "--site", SITE, env=env)
    ok("devices", "add", dev, "--type", "kiosk", "--site", SITE, "--gateway", gw, env=env)
    bundles = tmp_path / "bundles"
    dev_bundle = (bundles / f"device-{dev}.json").read_bytes()
    before = snapshot(db_conn, seeded, bundles)
    args, message = MISTAKES[mistake]
    run_env = {**env, "CITYHUB_OPERATOR": ""} if mistake == "no operator" else env
    result = cityhub(*(a.format(gw=gw, dev=dev, new=new) for a in args), env=run_env)
    assert result.returncode in (1, 2), result.stdout
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") <= 3
    assert snapshot(db_conn, seeded, bundles) == before
    assert (bundles / f"device-{dev}.json").read_bytes() == dev_bundle
    assert not broker_has(broker_admin, f"device.{new}")
    # The existing device's account is untouched: its bundle's secret still works.
    stored = db_conn.execute(
        f"SELECT secret_hash FROM {seeded}.credentials WHERE username = %s", (f"device.{dev}",)
    ).fetchone()[0]
    assert credentials.verify_secret(decode_bundle(dev_bundle).broker.password, stored)


def test_a_broker_that_refuses_changes_nothing(env, db_conn, seeded, tmp_path):
    gw = f"gw-{_uid()}"
    bundles = tmp_path / "bundles"
    before = snapshot(db_conn, seeded, bundles)
    wrong = {
        "CITYHUB_BROKER__PASSWORD": "wrong",
        "CITYHUB_PROVISIONING__SITE_BROKER__PASSWORD": "wrong",
    }
    result = cityhub("gateways", "add", gw, "--site", SITE, env={**env, **wrong})
    assert result.returncode == 1
    assert "refused the control account" in result.stderr
    assert "wrong" not in result.stderr
    assert snapshot(db_conn, seeded, bundles) == before


def test_audit_entries_are_plain_json(env):
    gw = f"gw-{_uid()}"
    ok("gateways", "add", gw, "--site", SITE, "--location", "mái nhà", env=env)
    entries = json.loads(ok("audit", "--json", "--action", "gateway.add", env=env))
    mine = [e for e in entries if e["subject_id"] == gw]
    assert len(mine) == 1
    assert mine[0]["subject_kind"] == "gateway"
    assert msgspec.json.decode(json.dumps(mine[0]["detail"]))["site_id"] == SITE


def test_gateways_sync_broker_binds_older_accounts_and_a_rerun_changes_nothing(env, broker_admin):
    gw, device = f"gw-{_uid()}", f"kiosk-{_uid()}"
    ok("gateways", "add", gw, "--site", SITE, env=env)
    ok("devices", "add", device, "--type", "kiosk", "--site", SITE, "--gateway", gw, env=env)
    # The device's account as it was made before accounts had a client id.
    with BrokerControl(name="legacy", broker=broker_admin) as control:
        control.run([{"command": "setClientId", "username": f"device.{device}"}])
    out = ok("gateways", "sync-broker", env=env)
    assert f"device.{device}" in out
    assert "bound to client id" in out
    with BrokerControl(name="check", broker=broker_admin) as control:
        data = control.run([{"command": "getClient", "username": f"device.{device}"}])
    assert data[0] is not None
    assert data[0]["client"]["clientid"] == device
    assert "already up to date" in ok("gateways", "sync-broker", env=env)
