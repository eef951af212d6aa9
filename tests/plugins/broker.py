"""Broker fixtures on the session's Mosquitto: its admin account, topic spaces, provisioning.

Each test gets a topic prefix of its own so tests on the shared broker never
see each other's messages. ``provisioner`` wires the real registry and the
broker's dynamic-security API. The broker itself comes from ``servers``, the
schema from ``database``.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cityhub.localstack.mosquitto import ADMIN_USER, MosquittoServer, TlsListener
from cityhub.localstack.procs import free_port, run_as_for
from contracts.settings import BrokerSettings
from devices.brokerctl import BrokerControl
from devices.pki import Pki
from devices.provisioning import Endpoint, Provisioner
from devices.registry import Registry
from tests.plugins.servers import IS_ROOT


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


def make_pki(root: Path, *, now: dt.datetime) -> Pki:
    """A CA and a server certificate for localhost and 127.0.0.1 under ``root``."""
    pki = Pki(root)
    pki.create_ca(now=now)
    pki.issue_server(["localhost", "127.0.0.1"], now=now)
    return pki


def tls_mosquitto(
    servers_dir: Path, pki: Pki, binary: str, *, name: str, crl: bool = False
) -> MosquittoServer:
    """A private authenticated broker (not started) with a TLS listener of ``pki``'s
    certificates requiring a client certificate; ``crl``: it checks ``pki``'s CRL."""
    return MosquittoServer(
        base_dir=servers_dir / f"mosquitto-{name}-{uuid.uuid4().hex[:6]}",
        port=free_port(),
        run_as=run_as_for("mosquitto", is_root=IS_ROOT),
        dev_mode=False,
        binary=binary,
        tls=TlsListener(
            port=free_port(),
            ca_file=pki.ca.cert,
            cert_file=pki.server.cert,
            key_file=pki.server.key,
            crl_file=pki.crl_path if crl else None,
        ),
    )


# What a TLS 1.2 client from before AEAD offers: CBC with an HMAC-SHA1 (the
# ECDSA one: the cityhub PKI's keys are ECDSA P-256).
OLD_TLS12_CIPHER = "ECDHE-ECDSA-AES128-SHA"


def tls_handshake(
    port: int,
    pki: Pki,
    *,
    host: str = "127.0.0.1",
    version: ssl.TLSVersion | None = None,
    ciphers: str | None = None,
) -> tuple[str, str]:
    """A TLS handshake with a client certificate of ``pki``: (protocol, cipher) it agreed.

    ``version`` pins the protocol, ``ciphers`` the TLS 1.2 suites offered; a
    refused handshake raises ``ssl.SSLError`` (or ``OSError`` when cut).
    """
    context = ssl.create_default_context(cafile=str(pki.ca.cert))
    client = pki.issue_client(f"tls-{uuid.uuid4().hex[:6]}", now=dt.datetime.now(dt.UTC))
    context.load_cert_chain(str(client.cert), str(client.key))
    if version is not None:
        context.minimum_version = context.maximum_version = version
    if ciphers is not None:
        context.set_ciphers(ciphers)
    with (
        socket.create_connection((host, port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        protocol, cipher = tls.version(), tls.cipher()
    assert protocol is not None
    assert cipher is not None
    return protocol, cipher[0]


def tls_connack(
    host: str,
    port: int,
    context: ssl.SSLContext,
    *,
    username: str,
    password: str,
    client_id: str | None = None,
) -> int:
    """The CONNACK reason code of an MQTT v5 CONNECT over TLS with ``context``.

    ConnectionError if the broker closed the TLS connection before a CONNACK
    (a certificate it refused after the handshake).
    """
    done = threading.Event()
    codes: list[int] = []
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id or f"tls-{uuid.uuid4().hex[:6]}",
        protocol=mqtt.MQTTv5,
    )
    client.username_pw_set(username, password)
    client.tls_set_context(context)

    def on_connect(_c: object, _u: object, _f: object, reason: object, _p: object) -> None:
        codes.append(getattr(reason, "value", -1))
        done.set()

    client.on_connect = on_connect
    client.on_disconnect = lambda *_: done.set()
    client.connect(host, port)
    try:
        client.loop_start()
        assert done.wait(10), "neither CONNACK nor disconnect over TLS"
    finally:
        client.disconnect()
        client.loop_stop()
    if not codes:
        raise ConnectionError("the broker closed the TLS connection before CONNACK")
    return codes[0]
