"""A client whose sessions provisioning cuts is shown offline (and revoked or disabled) everywhere.

Mosquitto's dynamic-security plugin disconnects a deleted or disabled
account's clients without publishing their Will, so nothing but provisioning
itself says they went: these tests revoke a running gateway (with its bundle's
accounts, a real ingest storing its states) and disable and revoke devices
whose retained status says "online", and look at the retained topics, the
database and what the list commands read.
"""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
import pytest
from typer.testing import CliRunner

from cityhub.cli.main import app
from cityhub.cli.presence import device_presence, gateway_presence
from cityhub.localstack.mosquitto import MosquittoServer
from contracts.messages import (
    GatewayState,
    decode_gateway_state,
    encode_device_status,
    encode_gateway_state,
)
from contracts.settings import BrokerSettings, DatabaseSettings
from contracts.topics import device_status_topic, state_topic
from devices.bundle import decode_bundle
from devices.provisioning import Provisioner
from tests.plugins.gateway import (
    broker_settings,
    client,
    gateway_in_thread,
    gateway_settings,
    now_ms,
    wait_for,
)
from tests.plugins.ingest import ingest_in_thread, ingest_settings

pytestmark = pytest.mark.slow

SITE = "hk-hall-quan"


class Retained:
    """The latest message on each of some topics, as an admin subscriber receives them."""

    def __init__(self, server: MosquittoServer, *topics: str) -> None:
        self.lock = threading.Lock()
        self.latest: dict[str, bytes] = {}
        self.client = client(server)
        self.client.on_message = self._on_message
        for topic in topics:
            self.client.subscribe(topic, qos=1)

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.latest[message.topic] = bytes(message.payload)

    def get(self, topic: str) -> bytes | None:
        with self.lock:
            return self.latest.get(topic)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def retained_now(server: MosquittoServer, topic: str) -> bytes | None:
    """What the broker keeps on ``topic`` now, as a new subscriber gets it."""
    watcher = Retained(server, topic)
    try:
        wait_for(lambda: watcher.get(topic) is not None, 3, f"the retained message on {topic}")
        return watcher.get(topic)
    except AssertionError:
        return None
    finally:
        watcher.close()


def _access(access: Any) -> BrokerSettings:
    return BrokerSettings(
        host=access.host, port=access.port, username=access.username, password=access.password
    )


def stored_status(conn: psycopg.Connection, schema: str, gateway_id: str) -> str | None:
    row = conn.execute(
        f"SELECT status FROM {schema}.gateway_status WHERE gateway_id = %s", (gateway_id,)
    ).fetchone()
    return None if row is None else str(row[0])


def test_a_revoked_running_gateway_is_offline_and_revoked_everywhere(
    provisioner: Provisioner,
    mqtt_server: MosquittoServer,
    db_conn: psycopg.Connection,
    db_url: str,
    topic_prefix: str,
    tmp_path: Any,
) -> None:
    schema = provisioner.registry.schema
    gateway_id = f"gw-{uuid.uuid4().hex[:8]}"
    bundle = decode_bundle(
        provisioner.add_gateway(gateway_id, site_id=SITE).files.json.read_bytes()
    )
    topic = state_topic(gateway_id, topic_prefix)
    admin = broker_settings(mqtt_server)
    with ingest_in_thread(
        settings=ingest_settings(topic_prefix),
        broker=admin,
        database=DatabaseSettings(url=db_url, schema=schema),
    ) as worker:
        with gateway_in_thread(
            settings=gateway_settings(gateway_id, topic_prefix, site_id=SITE),
            central=_access(bundle.central),
            site=_access(bundle.site),
            outbox=tmp_path / "outbox.sqlite3",
        ) as gateway:
            wait_for(
                lambda: stored_status(db_conn, schema, gateway_id) == "online",
                10,
                "the gateway stored online",
            )
            assert gateway_presence(db_conn, schema)[gateway_id].online
            birth = gateway.birth

            provisioner.revoke_gateway(gateway_id)

            # Its last "online" is no longer what the broker keeps, nor what is stored.
            def retained_offline() -> bool:
                payload = retained_now(mqtt_server, topic)
                return payload is not None and decode_gateway_state(payload).status == "offline"

            wait_for(retained_offline, 5, "the retained state offline")
            state = decode_gateway_state(retained_now(mqtt_server, topic) or b"")
            assert state.revoked
            assert state.birth == birth
            wait_for(
                lambda: stored_status(db_conn, schema, gateway_id) == "offline",
                5,
                "gateway_status offline",
            )
            presence = gateway_presence(db_conn, schema)[gateway_id]
            assert (presence.status, presence.online) == ("revoked", False)
            env = {"CITYHUB_DATABASE__URL": db_url, "CITYHUB_DATABASE__SCHEMA": schema}
            shown = CliRunner().invoke(app, ["gateways", "show", gateway_id, "--json"], env=env)
            assert shown.exit_code == 0, shown.output
            document = json.loads(shown.stdout)["gateway"]
            assert (document["status"], document["online"]) == ("revoked", False)

        # A late or replayed "online" of the revoked gateway (its account is gone,
        # so only a copy can arrive) does not bring it back.
        states_before = worker.counters.states
        replay = GatewayState(
            gateway_id=gateway_id,
            status="online",
            birth=birth + 1,
            boot_id="replayed",
            version="1.0.0",
            outbox_depth=0,
            ts_ms=now_ms(),
        )
        pub = client(mqtt_server)
        try:
            pub.publish(topic, encode_gateway_state(replay), qos=1).wait_for_publish(5)
            wait_for(lambda: worker.counters.states_ignored > 0, 5, "the replay ignored")
        finally:
            pub.disconnect()
            pub.loop_stop()
        assert worker.counters.states == states_before
        assert stored_status(db_conn, schema, gateway_id) == "offline"
        assert not gateway_presence(db_conn, schema)[gateway_id].online


def test_a_disabled_or_revoked_device_is_offline_on_its_retained_status_and_in_presence(
    provisioner: Provisioner,
    mqtt_server: MosquittoServer,
    db_conn: psycopg.Connection,
    topic_prefix: str,
) -> None:
    schema = provisioner.registry.schema
    gateway_id = f"gw-{uuid.uuid4().hex[:8]}"
    provisioner.add_gateway(gateway_id, site_id=SITE)
    devices = [f"kiosk-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    pub = client(mqtt_server)
    try:
        for device_id in devices:
            provisioner.add_device(
                device_id,
                device_type="kiosk",
                site_id=SITE,
                gateway_id=gateway_id,
                transport="mqtt",
            )
            # What the device's own birth left on the broker, and a recent reading.
            pub.publish(
                device_status_topic(device_id, topic_prefix),
                encode_device_status("online"),
                qos=1,
                retain=True,
            ).wait_for_publish(5)
            db_conn.execute(
                f"INSERT INTO {schema}.device_state (device_id, last_seen, last_seq)"
                " VALUES (%s, now(), 1)",
                (device_id,),
            )
        assert all(device_presence(db_conn, schema)[d].online for d in devices)
        disabled, revoked = devices

        provisioner.set_device_enabled(disabled, enabled=False)
        provisioner.revoke_device(revoked)

        for device_id in devices:
            assert retained_now(mqtt_server, device_status_topic(device_id, topic_prefix)) == (
                b"offline"
            )
        presence = device_presence(db_conn, schema)
        assert (presence[disabled].enabled, presence[disabled].online) == (False, False)
        assert (presence[revoked].status, presence[revoked].online) == ("revoked", False)

        # Enabled again, it is online as soon as it is seen again (its own birth).
        provisioner.set_device_enabled(disabled, enabled=True)
        assert device_presence(db_conn, schema)[disabled].online
    finally:
        for device_id in devices:
            pub.publish(
                device_status_topic(device_id, topic_prefix), b"", qos=1, retain=True
            ).wait_for_publish(5)
        pub.disconnect()
        pub.loop_stop()
