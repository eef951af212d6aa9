"""Modbus, LoRaWAN and HTTP devices in the registry: checks, configs, bundles, ACLs, commands.

Provisioning runs against the real registry (a schema of the test's own)
and the session broker; the gateway configs checked are the ones published
as retained messages. A refused request must leave the registry, the
broker and the bundle directory as they were.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import tomllib
import uuid
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cityhub import database
from contracts.errors import (
    CommandRefusedError,
    ConflictError,
    InvalidPortError,
    OutOfRangeError,
    SettingsError,
)
from contracts.messages import GatewayConfig, decode_gateway_config
from contracts.schema import migrations
from contracts.settings import StorageSettings
from contracts.topics import chirpstack_device_filter, chirpstack_event_topic, config_topic
from devices import credentials, dynsec
from devices.brokerctl import BrokerControl
from devices.bundle import decode_bundle
from devices.commands import CommandRegistry
from devices.validation import device_config
from tests.devices.test_devices import SITE, broker_has, cityhub, ok, snapshot
from tests.devices.test_security import NOT_AUTHORIZED, Probe

BUS = "socket://10.20.0.9:4001"


def _uid() -> str:
    return uuid.uuid4().hex[:8]


def _eui() -> str:
    return uuid.uuid4().hex[:16]


def _gateway(provisioner, site=SITE):
    gateway_id = f"gw-{_uid()}"
    outcome = provisioner.add_gateway(gateway_id, site_id=site)
    return gateway_id, decode_bundle(outcome.files.json.read_bytes())


def _modbus(provisioner, gateway_id, slave_id, *, port=BUS, model="vegapuls_c21", **extra):
    device_id = f"wl-{_uid()}"
    outcome = provisioner.add_device(
        device_id,
        device_type="water_level" if model == "vegapuls_c21" else "noise_meter",
        site_id=SITE,
        gateway_id=gateway_id,
        transport="modbus",
        port=port,
        slave_id=slave_id,
        model=model,
        **extra,
    )
    return device_id, outcome


def _lorawan(provisioner, gateway_id, dev_eui, *, model="lpp_air_quality"):
    device_id = f"aq-{_uid()}"
    outcome = provisioner.add_device(
        device_id,
        device_type="air_quality",
        site_id=SITE,
        gateway_id=gateway_id,
        transport="lorawan",
        model=model,
        dev_eui=dev_eui,
    )
    return device_id, outcome


def _http(provisioner, gateway_id):
    device_id = f"kiosk-{_uid()}"
    outcome = provisioner.add_device(
        device_id, device_type="kiosk", site_id=SITE, gateway_id=gateway_id, transport="http"
    )
    return device_id, outcome


def retained_config(broker_admin, gateway_id: str, prefix: str) -> GatewayConfig:
    """The gateway's config as the broker holds it (retained), as the gateway would read it."""
    got: list[bytes] = []
    arrived = threading.Event()
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"probe-{_uid()}", protocol=mqtt.MQTTv5
    )
    client.username_pw_set(broker_admin.username, broker_admin.password)

    def on_message(_c, _u, message):
        got.append(bytes(message.payload))
        arrived.set()

    client.on_message = on_message
    client.on_connect = lambda c, _u, _f, _r, _p: c.subscribe(config_topic(gateway_id, prefix), 1)
    client.connect("127.0.0.1", broker_admin.port)
    client.loop_start()
    try:
        assert arrived.wait(10), "no retained config"
    finally:
        client.disconnect()
        client.loop_stop()
    return decode_gateway_config(got[0])


# --- pure: the request checks ---------------------------------------------------------


def test_modbus_lorawan_and_http_requests_are_checked():
    modbus = device_config(
        device_id="wl-01",
        device_type="water_level",
        transport="modbus",
        port=BUS,
        protocol=None,
        label="",
        model="vegapuls_c21",
        slave_id=7,
    )
    assert (modbus.port, modbus.slave_id, modbus.model, modbus.poll_interval_s) == (
        BUS,
        7,
        "vegapuls_c21",
        None,
    )
    lorawan = device_config(
        device_id="aq-01",
        device_type="air_quality",
        transport="lorawan",
        port=None,
        protocol=None,
        label="",
        model="lpp_air_quality",
        dev_eui="70-B3-D5-7E-D0-05-A1-B2",
    )
    assert lorawan.dev_eui == "70b3d57ed005a1b2"
    base: dict[str, Any] = {
        "device_id": "wl-01",
        "device_type": "water_level",
        "transport": "modbus",
        "port": BUS,
        "protocol": None,
        "label": "",
        "model": "vegapuls_c21",
        "slave_id": 7,
    }
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"slave_id": 0}, OutOfRangeError, r"slave_id: 0 is outside \[1, 247\]"),
        ({"slave_id": 248}, OutOfRangeError, r"slave_id: 248 is outside \[1, 247\]"),
        ({"slave_id": None}, ConflictError, "a modbus device needs one"),
        ({"model": "sonbest_sm6365b"}, ConflictError, "is a noise_meter model, not water_level"),
        ({"model": "lpp_air_quality"}, ConflictError, "unknown Modbus model"),
        ({"port": None}, InvalidPortError, "a modbus device needs a port"),
        ({"poll_interval_s": 0.0}, OutOfRangeError, "poll_interval_s"),
        ({"transport": "lorawan", "port": None, "slave_id": None}, ConflictError, "dev_eui"),
        (
            {"transport": "http", "port": None, "slave_id": None, "model": None},
            ConflictError,
            "a http device needs one",
        ),
    ]
    for change, error, message in cases:
        with pytest.raises(error, match=message):
            device_config(**(base | change))
    lorawan_base = base | {"device_type": "air_quality", "transport": "lorawan", "port": None}
    lorawan_base |= {"slave_id": None, "model": "lpp_air_quality"}
    for bad in ("70b3d57ed005a1", "70b3d57ed005a1b2ff", "70b3d57ed005a1bz"):
        with pytest.raises(ConflictError, match="is not 16 lower-case hex digits"):
            device_config(**(lorawan_base | {"dev_eui": bad}))


def test_http_tokens_are_random_and_kept_as_their_hash():
    token = credentials.new_token()
    assert len(token) == 43  # 32 bytes, URL-safe base64 without padding
    assert credentials.new_token() != token
    digest = credentials.token_sha256(token)
    assert digest == hashlib.sha256(token.encode()).hexdigest()
    assert token not in digest


# --- Modbus: a shared bus -----------------------------------------------------------------


def test_modbus_devices_share_a_bus_with_their_own_slave_ids(
    provisioner, broker_admin, db_conn, seeded, topic_prefix, tmp_path
):
    gw, _ = _gateway(provisioner)
    first, outcome = _modbus(provisioner, gw, 1)
    assert f"Modbus bus {BUS}, slave 1, model vegapuls_c21" in "\n".join(outcome.changes)
    assert not broker_has(broker_admin, f"device.{first}")  # no broker account
    bundle = decode_bundle(outcome.files.json.read_bytes())
    assert (bundle.port, bundle.slave_id, bundle.model, bundle.broker) == (
        BUS,
        1,
        "vegapuls_c21",
        None,
    )
    assert (bundle.settings["baudrate"], bundle.settings["parity"]) == (9600, "N")
    assert bundle.settings["stopbits"] == 1
    assert bundle.settings["poll_interval_s"] == 10.0  # the model's
    second, outcome = _modbus(provisioner, gw, 2, poll_interval_s=2.5)
    assert decode_bundle(outcome.files.json.read_bytes()).settings["poll_interval_s"] == 2.5
    # The same slave id on another bus is another device.
    _modbus(provisioner, gw, 1, port="/dev/ttyUSB1")

    config = retained_config(broker_admin, gw, topic_prefix)
    on_bus = {d.device_id: d for d in config.devices if d.port == BUS}
    assert {(d.slave_id, d.model) for d in on_bus.values()} == {
        (1, "vegapuls_c21"),
        (2, "vegapuls_c21"),
    }
    assert on_bus[second].poll_interval_s == 2.5
    # The gateway learns the register map with the config.
    assert [m.name for m in config.modbus_models] == ["vegapuls_c21"]
    assert config.modbus_models[0].registers

    bundles = tmp_path / "bundles"
    before = snapshot(db_conn, seeded, bundles)
    with pytest.raises(ConflictError, match=f"slave id 1 is already device {first}'s on {BUS}"):
        _modbus(provisioner, gw, 1)
    with pytest.raises(ConflictError, match=f"port '{BUS}' is already device .*'s: a serial"):
        provisioner.add_device(
            f"aq-{_uid()}",
            device_type="air_quality",
            site_id=SITE,
            gateway_id=gw,
            transport="serial",
            port=BUS,
            protocol="pms5003",
        )
    with pytest.raises(ConflictError, match="is a noise_meter model, not water_level"):
        provisioner.add_device(
            f"wl-{_uid()}",
            device_type="water_level",
            site_id=SITE,
            gateway_id=gw,
            transport="modbus",
            port=BUS,
            slave_id=9,
            model="sonbest_sm6365b",
        )
    for bad in (0, 248):
        with pytest.raises(OutOfRangeError, match=f"slave_id: {bad} is outside"):
            _modbus(provisioner, gw, bad)
    assert snapshot(db_conn, seeded, bundles) == before
    assert retained_config(broker_admin, gw, topic_prefix).version == config.version


def test_a_serial_sensors_port_takes_no_modbus_device_nor_a_move_onto_it(
    provisioner, db_conn, seeded, tmp_path
):
    gw, _ = _gateway(provisioner)
    other, _ = _gateway(provisioner)
    sensor = f"aq-{_uid()}"
    provisioner.add_device(
        sensor,
        device_type="air_quality",
        site_id=SITE,
        gateway_id=gw,
        transport="serial",
        port=BUS,
        protocol="sds011",
    )
    with pytest.raises(ConflictError, match=f"is already device {sensor}'s: a serial sensor"):
        _modbus(provisioner, gw, 3)
    # A Modbus device on another gateway's same-named port is that gateway's bus.
    moving, _ = _modbus(provisioner, other, 3)
    before = snapshot(db_conn, seeded, tmp_path / "bundles")
    with pytest.raises(ConflictError, match=f"gateway {gw}: device"):
        provisioner.move_device(moving, gateway_id=gw)
    assert snapshot(db_conn, seeded, tmp_path / "bundles") == before


def test_replacing_a_modbus_device_can_move_it_to_another_port(provisioner, broker_admin):
    gw, _ = _gateway(provisioner)
    device, _ = _modbus(provisioner, gw, 4)
    outcome = provisioner.replace_device(device, hardware_id="SN-9", port="/dev/ttyUSB2")
    assert f"port {BUS} -> /dev/ttyUSB2" in "\n".join(outcome.changes)
    assert outcome.configs[0].devices[0].port == "/dev/ttyUSB2"
    with pytest.raises(ConflictError, match="it has no broker credential"):
        provisioner.rotate_device(device)


# --- LoRaWAN: DevEUIs, the gateway's site role, ChirpStack's account -----------------


def test_lorawan_devices_have_one_dev_eui_each(provisioner, broker_admin, topic_prefix):
    gw, _ = _gateway(provisioner)
    other_gw, _ = _gateway(provisioner)
    eui = _eui()
    device, outcome = _lorawan(provisioner, gw, eui.upper())
    bundle = decode_bundle(outcome.files.json.read_bytes())
    assert (bundle.dev_eui, bundle.model, bundle.broker, bundle.http) == (
        eui,
        "lpp_air_quality",
        None,
        None,
    )
    assert "key" not in json.dumps(json.loads(outcome.files.json.read_bytes())).lower()
    config = retained_config(broker_admin, gw, topic_prefix)
    assert [(d.device_id, d.dev_eui) for d in config.devices] == [(device, eui)]
    assert [m.name for m in config.lorawan_models] == ["lpp_air_quality"]

    with pytest.raises(ConflictError, match=f"DevEUI {eui} is already device {device}'s"):
        _lorawan(provisioner, other_gw, eui)
    with pytest.raises(ConflictError, match="is not 16 lower-case hex digits"):
        _lorawan(provisioner, gw, "70b3d57ed005a1")
    with pytest.raises(ConflictError, match="is a water_level model, not air_quality"):
        _lorawan(provisioner, gw, _eui(), model="object_water_level")
    # Once revoked, its DevEUI may go to new hardware under another id.
    provisioner.revoke_device(device)
    again, _ = _lorawan(provisioner, other_gw, eui)
    assert retained_config(broker_admin, gw, topic_prefix).devices == []
    assert [d.device_id for d in retained_config(broker_admin, other_gw, topic_prefix).devices] == [
        again
    ]


def test_chirpstack_publishes_events_only_and_each_gateway_reads_its_own_devices(
    provisioner, broker_admin, topic_prefix, tmp_path
):
    gw, gw_bundle = _gateway(provisioner)
    neighbour, neighbour_bundle = _gateway(provisioner)
    own_eui, theirs_eui = _eui(), _eui()
    _lorawan(provisioner, gw, own_eui)
    _lorawan(provisioner, neighbour, theirs_eui)

    outcome = provisioner.chirpstack_account(gw)
    text = "\n".join(outcome.changes)
    assert f"account chirpstack.{gw} created" in text
    settings_file = tmp_path / "bundles" / f"chirpstack-{gw}.toml"
    assert settings_file.stat().st_mode & 0o777 == 0o600
    section = tomllib.loads(settings_file.read_text())["integration"]["mqtt"]
    assert section["json"] is True
    assert section["username"] == section["client_id"] == f"chirpstack.{gw}"
    assert section["password"] not in text
    assert section["event_topic"] == (
        "application/{{application_id}}/device/{{dev_eui}}/event/{{event}}"
    )

    port = broker_admin.port
    chirpstack = Probe(port, section["username"], section["password"], section["client_id"])
    site = Probe(port, gw_bundle.site.username, gw_bundle.site.password, gw_bundle.site.client_id)
    other_site = Probe(
        port,
        neighbour_bundle.site.username,
        neighbour_bundle.site.password,
        neighbour_bundle.site.client_id,
    )
    try:
        assert chirpstack.accepted
        # Its own client id only: no one else may take its session.
        assert not Probe(port, section["username"], section["password"], f"x-{_uid()}").accepted
        assert site.subscribe(chirpstack_device_filter(own_eui)) == 1
        assert site.subscribe(chirpstack_device_filter(theirs_eui)) == NOT_AUTHORIZED
        assert site.subscribe("application/+/device/+/event/+") == NOT_AUTHORIZED
        assert site.subscribe("application/#") == NOT_AUTHORIZED
        assert other_site.subscribe(chirpstack_device_filter(theirs_eui)) == 1

        theirs = chirpstack_event_topic("7", theirs_eui, "up")
        own = chirpstack_event_topic("7", own_eui, "up")
        assert chirpstack.publish(theirs, b"neighbour") == 0
        assert chirpstack.publish(own, b"own") == 0
        for refused in (f"{topic_prefix}/d/x/up", "application/7/device/x/command/down", "x"):
            assert chirpstack.publish(refused) == NOT_AUTHORIZED, refused
        assert chirpstack.subscribe("application/#") == NOT_AUTHORIZED
        deadline = time.monotonic() + 5
        while len(site.messages) + len(other_site.messages) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert site.messages == [(own, b"own")]
        assert other_site.messages == [(theirs, b"neighbour")]

        # Again: a new secret; the old one stops at once.
        old = section["password"]
        outcome = provisioner.chirpstack_account(gw)
        assert f"new secret for chirpstack.{gw}" in "\n".join(outcome.changes)
        assert chirpstack.disconnected.wait(5)
        new = tomllib.loads(settings_file.read_text())["integration"]["mqtt"]["password"]
        assert new != old
        assert not Probe(port, section["username"], old, section["client_id"]).accepted
        assert Probe(port, section["username"], new, section["client_id"]).accepted
    finally:
        for probe in (chirpstack, site, other_site):
            probe.close()


def test_a_revoked_gateway_takes_its_chirpstack_account_with_it(provisioner, broker_admin):
    gw, _ = _gateway(provisioner)
    provisioner.chirpstack_account(gw)
    assert broker_has(broker_admin, f"chirpstack.{gw}")
    outcome = provisioner.revoke_gateway(gw)
    assert f"account chirpstack.{gw} deleted" in "\n".join(outcome.changes)
    assert not broker_has(broker_admin, f"chirpstack.{gw}")
    with pytest.raises(ConflictError, match="is revoked"):
        provisioner.chirpstack_account(gw)


# --- HTTP: a bearer token --------------------------------------------------------------


def test_http_device_gets_a_token_whose_hash_its_gateway_is_told(
    provisioner, broker_admin, db_conn, seeded, topic_prefix
):
    gw, _ = _gateway(provisioner)
    device, outcome = _http(provisioner, gw)
    assert not broker_has(broker_admin, f"device.{device}")
    raw = outcome.files.json.read_bytes()
    bundle = decode_bundle(raw)
    assert bundle.broker is None
    assert bundle.http.url == f"http://{gw}:8470/v1/devices/{device}/readings"
    assert bundle.http.format == "cityhub-uplink-json/1"
    token = bundle.http.token
    digest = hashlib.sha256(token.encode()).hexdigest()
    assert all(token not in line for line in outcome.changes)
    config = retained_config(broker_admin, gw, topic_prefix)
    assert [(d.device_id, d.token_sha256) for d in config.devices] == [(device, digest)]
    stored = db_conn.execute(
        f"SELECT token_sha256 FROM {seeded}.devices WHERE device_id = %s", (device,)
    ).fetchone()[0]
    assert stored == digest
    row = db_conn.execute(f"SELECT * FROM {seeded}.devices WHERE device_id = %s", (device,))
    assert token not in repr(row.fetchall())

    outcome = provisioner.rotate_device(device)
    new = decode_bundle(outcome.files.json.read_bytes()).http.token
    assert new != token
    rotated = retained_config(broker_admin, gw, topic_prefix)
    assert rotated.version > config.version
    assert [d.token_sha256 for d in rotated.devices] == [hashlib.sha256(new.encode()).hexdigest()]
    assert "stops working when its gateway applies the new config" in "\n".join(outcome.changes)

    # Moved to another gateway, it needs that gateway's address: a new bundle and token.
    other, _ = _gateway(provisioner)
    outcome = provisioner.move_device(device, gateway_id=other)
    moved = decode_bundle(outcome.files.json.read_bytes())
    assert moved.http.url == f"http://{other}:8470/v1/devices/{device}/readings"
    assert moved.http.token not in (token, new)
    assert retained_config(broker_admin, gw, topic_prefix).devices == []


def test_the_http_url_template_is_a_setting(provisioner, broker_admin):
    gw, _ = _gateway(provisioner)
    provisioner.gateway_http_url = "https://{gateway_id}.gw.example.vn/"
    device, outcome = _http(provisioner, gw)
    bundle = decode_bundle(outcome.files.json.read_bytes())
    assert bundle.http.url == f"https://{gw}.gw.example.vn/v1/devices/{device}/readings"
    provisioner.gateway_http_url = "http://{gateway}:8470"
    with pytest.raises(SettingsError, match=r"provisioning\.gateway_http_url"):
        _http(provisioner, gw)


# --- commands: what each transport can carry ------------------------------------------


def test_commands_follow_what_a_transport_and_a_modbus_model_carry(provisioner, db_conn, seeded):
    gw, _ = _gateway(provisioner)
    gauge, _ = _modbus(provisioner, gw, 5)
    node, _ = _lorawan(provisioner, gw, _eui())
    poster, _ = _http(provisioner, gw)
    commands = CommandRegistry(db_conn, schema=seeded)

    def ask(device, name, *args):
        return commands.ask(device, name, args, ttl_s=60, operator="Trần Văn Minh")

    # The catalog's water_level type has the command, the gauge's register map not.
    with pytest.raises(
        CommandRefusedError,
        match=r"the Modbus model vegapuls_c21 has no register for it \(its commands: "
        r"set_response_delay\)",
    ):
        ask(gauge, "set_reporting_interval", "interval_s=60")
    assert ask(gauge, "set_response_delay", "delay_ms=50").state == "queued"
    with pytest.raises(CommandRefusedError, match="LoRaWAN downlinks are not sent by cityhub yet"):
        ask(node, "set_reporting_interval", "interval_s=60")
    with pytest.raises(
        CommandRefusedError, match="an HTTP device cannot be reached by the gateway"
    ):
        ask(poster, "restart")
    queued = db_conn.execute(
        f"SELECT device_id FROM {seeded}.commands WHERE device_id = ANY(%s)",
        ([gauge, node, poster],),
    ).fetchall()
    assert queued == [(gauge,)]


# --- the migration, on a database that has devices ------------------------------------


def test_the_field_transport_migration_keeps_existing_devices(db_conn, seeded):
    s = seeded
    # The schema as migration 18 left it: undo 19.
    db_conn.execute(f"DROP INDEX {s}.devices_dev_eui_idx")
    for column in ("model", "slave_id", "poll_interval_s", "dev_eui", "token_sha256"):
        db_conn.execute(f"ALTER TABLE {s}.devices DROP COLUMN {column}")
    db_conn.execute(
        f"""ALTER TABLE {s}.devices DROP CONSTRAINT devices_transport_check,
            ADD CONSTRAINT devices_transport_check CHECK (transport IN ('serial', 'mqtt'))"""
    )
    db_conn.execute(f"DELETE FROM {s}.schema_migrations WHERE version = 19")
    db_conn.execute(
        f"INSERT INTO {s}.gateways (gateway_id, site_id) VALUES ('gw-old', %s)", (SITE,)
    )
    db_conn.execute(
        f"""INSERT INTO {s}.devices (device_id, device_type, site_id, gateway_id, transport,
            port, protocol, label) VALUES
            ('aq-old', 'air_quality', %s, 'gw-old', 'serial', '/dev/ttyUSB0', 'pms5003', 'a'),
            ('kiosk-old', 'kiosk', %s, 'gw-old', 'mqtt', NULL, NULL, 'k')""",
        (SITE, SITE),
    )
    before = db_conn.execute(f"SELECT * FROM {s}.devices ORDER BY device_id").fetchall()

    report = database.migrate(db_conn, schema=s, storage=StorageSettings())

    assert [m.version for m in report.applied] == [19]
    rows = db_conn.execute(
        f"""SELECT device_id, transport, port, model, slave_id, poll_interval_s, dev_eui,
            token_sha256 FROM {s}.devices ORDER BY device_id"""
    ).fetchall()
    assert rows == [
        ("aq-old", "serial", "/dev/ttyUSB0", None, None, None, None, None),
        ("kiosk-old", "mqtt", None, None, None, None, None, None),
    ]
    columns = len(before[0])
    assert [r[:columns] for r in db_conn.execute(f"SELECT * FROM {s}.devices ORDER BY 1")] == before
    # The new transports are accepted, and the database keeps a DevEUI to one active device.
    insert = (
        f"INSERT INTO {s}.devices (device_id, device_type, site_id, gateway_id, transport,"
        " model, dev_eui, status) VALUES (%s, 'air_quality', %s, 'gw-old', 'lorawan',"
        " 'lpp_air_quality', '70b3d57ed005a1b2', %s)"
    )
    db_conn.execute(insert, ("aq-lora-1", SITE, "revoked"))
    db_conn.execute(insert, ("aq-lora-2", SITE, "active"))
    with pytest.raises(Exception, match="devices_dev_eui_idx"):
        db_conn.execute(insert, ("aq-lora-3", SITE, "active"))
    with pytest.raises(Exception, match="devices_slave_id_check"):
        db_conn.execute(
            f"""INSERT INTO {s}.devices (device_id, device_type, site_id, transport, slave_id)
                VALUES ('wl-bad', 'water_level', %s, 'modbus', 0)""",
            (SITE,),
        )
    # The migrations before it are unchanged, and it is the 19th (later ones follow it).
    versions = [m.version for m in migrations(s, report.edition, StorageSettings())]
    assert versions[:19] == list(range(1, 20))


def test_register_fleet_stores_the_new_fields(db_conn, seeded):
    database.register_fleet(
        db_conn,
        schema=seeded,
        gateways=[("gw-sim", SITE)],
        devices=[
            database.DeviceRecord(
                device_id="wl-sim-1",
                device_type="water_level",
                site_id=SITE,
                gateway_id="gw-sim",
                transport="modbus",
                port="/dev/pts/9",
                model="vegapuls_c21",
                slave_id=1,
                poll_interval_s=1.0,
            ),
            database.DeviceRecord(
                device_id="aq-sim-1",
                device_type="air_quality",
                site_id=SITE,
                gateway_id="gw-sim",
                transport="lorawan",
                model="lpp_air_quality",
                dev_eui="00000000000000a1",
            ),
            database.DeviceRecord(
                device_id="kiosk-sim-1",
                device_type="kiosk",
                site_id=SITE,
                gateway_id="gw-sim",
                transport="http",
                token_sha256="ab" * 32,
            ),
        ],
    )
    rows = db_conn.execute(
        f"""SELECT device_id, model, slave_id, poll_interval_s, dev_eui, token_sha256
            FROM {seeded}.devices ORDER BY device_id"""
    ).fetchall()
    assert rows == [
        ("aq-sim-1", "lpp_air_quality", None, None, "00000000000000a1", None),
        ("kiosk-sim-1", None, None, None, None, "ab" * 32),
        ("wl-sim-1", "vegapuls_c21", 1, 1.0, None, None),
    ]


# --- the command line -------------------------------------------------------------------


@pytest.fixture
def env(db_url, seeded, mqtt_server, topic_prefix, tmp_path):
    """`python -m cityhub` on the test's schema, the session broker and the test's bundles."""
    admin = {"USERNAME": "cityhub-admin", "PASSWORD": mqtt_server.admin_password}
    broker = {"HOST": "127.0.0.1", "PORT": str(mqtt_server.port), **admin}
    return {
        "CITYHUB_DATABASE__URL": db_url,
        "CITYHUB_DATABASE__SCHEMA": seeded,
        **{f"CITYHUB_BROKER__{k}": v for k, v in broker.items()},
        **{f"CITYHUB_PROVISIONING__SITE_BROKER__{k}": v for k, v in broker.items()},
        "CITYHUB_PROVISIONING__TOPIC_PREFIX": topic_prefix,
        "CITYHUB_PROVISIONING__BUNDLE_DIR": str(tmp_path / "bundles"),
        "CITYHUB_LOCAL__STATE_DIR": str(tmp_path / "state"),
        "CITYHUB_OPERATOR": "Phạm Thu Hà",
    }


def test_devices_add_show_and_list_speak_of_buses_deveuis_and_tokens(env, tmp_path):
    gw, gauge, meter, node = f"gw-{_uid()}", f"wl-{_uid()}", f"nm-{_uid()}", f"aq-{_uid()}"
    ok("gateways", "add", gw, "--site", SITE, env=env)
    out = ok(
        "devices", "add", gauge, "--type", "water_level", "--site", SITE, "--gateway", gw,
        "--transport", "modbus", "--port", "/dev/ttyUSB3", "--slave-id", "1",
        "--model", "vegapuls_c21", "--poll-interval", "5", env=env,
    )  # fmt: skip
    assert "Modbus bus /dev/ttyUSB3, slave 1, model vegapuls_c21" in out
    refused = cityhub(
        "devices", "add", meter, "--type", "noise_meter", "--site", SITE, "--gateway", gw,
        "--transport", "modbus", "--port", "/dev/ttyUSB3", "--slave-id", "1",
        "--model", "sonbest_sm6365b", env=env,
    )  # fmt: skip
    assert refused.returncode == 1
    assert f"slave id 1 is already device {gauge}'s on /dev/ttyUSB3" in refused.stderr
    assert "Traceback" not in refused.stderr
    ok(
        "devices", "add", node, "--type", "air_quality", "--site", SITE, "--gateway", gw,
        "--transport", "lorawan", "--dev-eui", "70:B3:D5:7E:D0:05:A1:C3",
        "--model", "lpp_air_quality", env=env,
    )  # fmt: skip
    shown = ok("devices", "show", gauge, env=env)
    assert "Modbus: bus /dev/ttyUSB3 at 9600 baud 8N1, slave 1, model vegapuls_c21" in shown
    assert "polled every 5 s" in shown
    assert "LoRaWAN: DevEUI 70b3d57ed005a1c3" in ok("devices", "show", node, env=env)
    listed = {d["device_id"]: d for d in json.loads(ok("devices", "list", "--json", env=env))}
    assert (listed[gauge]["slave_id"], listed[gauge]["model"]) == (1, "vegapuls_c21")
    assert listed[node]["dev_eui"] == "70b3d57ed005a1c3"
    assert "token_sha256" not in listed[gauge]
    table = ok("devices", "list", "--gateway", gw, env=env)
    assert "/dev/ttyUSB3 #1 (vegapuls_c21)" in table

    poster = f"kiosk-{_uid()}"
    ok(
        "devices", "add", poster, "--type", "kiosk", "--site", SITE, "--gateway", gw,
        "--transport", "http", env={**env, "CITYHUB_PROVISIONING__GATEWAY_HTTP_URL":
                                    "http://10.20.0.1:8470"},
    )  # fmt: skip
    bundle = decode_bundle((tmp_path / "bundles" / f"device-{poster}.json").read_bytes())
    assert bundle.http.url == f"http://10.20.0.1:8470/v1/devices/{poster}/readings"
    listing = ok("devices", "list", "--json", env=env) + ok("devices", "show", poster, env=env)
    assert bundle.http.token not in listing
    assert hashlib.sha256(bundle.http.token.encode()).hexdigest() not in listing


def test_gateways_chirpstack_account_and_catalog_models(env, broker_admin, tmp_path):
    gw = f"gw-{_uid()}"
    ok("gateways", "add", gw, "--site", SITE, env=env)
    out = ok("gateways", "chirpstack-account", gw, env=env)
    assert f"site broker: account chirpstack.{gw} created" in out
    assert f"chirpstack-{gw}.toml" in out
    assert broker_has(broker_admin, f"chirpstack.{gw}")
    password = (tmp_path / "bundles" / f"chirpstack-{gw}.toml").read_text().split('password = "')[1]
    assert password.split('"')[0] not in out
    shown = ok("gateways", "show", gw, env=env)
    assert f"site broker account chirpstack.{gw}: active" in shown
    audit = json.loads(ok("audit", "--json", "--subject", gw, env=env))
    assert audit[0]["action"] == "gateway.chirpstack"

    models = ok("catalog", "models", env=env)
    for name in ("vegapuls_c21", "sonbest_sm6365b", "lpp_air_quality", "object_water_level"):
        assert name in models
    assert "VEGAPULS C 21" in models  # the register table's source


def test_role_of_a_chirpstack_account_is_brought_up_to_date(provisioner, broker_admin):
    """A role edited by hand (a wider topic) is put back by sync-broker and by the next run."""
    gw, _ = _gateway(provisioner)
    provisioner.chirpstack_account(gw)
    account = dynsec.chirpstack_account(gw)
    widen = [
        {
            "command": "addRoleACL",
            "rolename": account.role.rolename,
            "acltype": "publishClientSend",
            "topic": "#",
            "allow": True,
        }
    ]
    with BrokerControl(name="hand", broker=broker_admin) as control:
        control.run(widen)
    for bring_back in (provisioner.sync_broker, lambda: provisioner.chirpstack_account(gw)):
        outcome = bring_back()
        assert f"role {account.username} brought up to date" in "\n".join(outcome.changes)
        with BrokerControl(name="check", broker=broker_admin) as control:
            data = control.run(dynsec.get_role(account.role))[0]
            assert dynsec.role_acls(data) == account.role.acls
            control.run(widen)
