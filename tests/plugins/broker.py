"""Broker fixtures on the session's Mosquitto: its admin account, topic spaces, provisioning.

Each test gets a topic prefix of its own so tests on the shared broker never
see each other's messages. ``provisioner`` wires the real registry and the
broker's dynamic-security API. The broker itself comes from ``servers``, the
schema from ``database``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from cityhub.localstack.mosquitto import ADMIN_USER, MosquittoServer
from contracts.settings import BrokerSettings
from devices.brokerctl import BrokerControl
from devices.provisioning import Endpoint, Provisioner
from devices.registry import Registry


@pytest.fixture
def broker_admin(mqtt_server: MosquittoServer) -> BrokerSettings:
    """The session broker's admin account (dynamic-security control API included)."""
    return BrokerSettings(
        host="127.0.0.1",
        port=mqtt_server.port,
        username=ADMIN_USER,
        password=mqtt_server.admin_password,
    )


@pytest.fixture
def topic_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def provisioner(
    db_conn: psycopg.Connection,
    seeded: str,
    broker_admin: BrokerSettings,
    mqtt_server: MosquittoServer,
    topic_prefix: str,
    tmp_path: Path,
) -> Iterator[Provisioner]:
    """Provisioning with the real registry and the session broker, in a topic space of its own."""
    endpoint = Endpoint(host="127.0.0.1", port=mqtt_server.port)
    with BrokerControl(name="central", broker=broker_admin) as control:
        yield Provisioner(
            registry=Registry(db_conn, schema=seeded),
            operator="Nguyễn Thị Lan",
            central=control,
            site=control,
            central_endpoint=endpoint,
            site_endpoint=endpoint,
            bundle_dir=tmp_path / "bundles",
            prefix=topic_prefix,
        )
