"""The embedded broker's TLS listener, with a real Mosquitto: what TLS it speaks, where.

TLS 1.2 with ECDHE and AEAD ciphers only, and TLS 1.3: a client that offers
only an old CBC-SHA1 suite is refused. With a TLS listener, the plain one
stays on 127.0.0.1: from another address (127.0.0.2 stands in for one, all of
127/8 being loopback on Linux) a gateway's account works only over TLS.
"""

from __future__ import annotations

import datetime as dt
import secrets
import socket
import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cityhub.localstack.mosquitto import ADMIN_USER, MosquittoServer, mqtt_connect_probe
from contracts.settings import BrokerSettings
from devices import dynsec
from devices.brokerctl import BrokerControl
from devices.pki import Pki
from tests.plugins.broker import (
    OLD_TLS12_CIPHER,
    make_pki,
    tls_connack,
    tls_handshake,
    tls_mosquitto,
)
from tests.plugins.servers import start_or_skip

OTHER = "127.0.0.2"

pytestmark = pytest.mark.slow


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki", now=dt.datetime.now(dt.UTC))


@pytest.fixture
def tls_broker(servers_dir: Path, pki: Pki, mosquitto_bin: str) -> Iterator[MosquittoServer]:
    server = start_or_skip(
        tls_mosquitto(servers_dir, pki, mosquitto_bin, name="ciphers"),
        "Mosquitto's dynamic-security plugin",
    )
    yield server
    server.stop()


def _tls_port(server: MosquittoServer) -> int:
    assert server.tls is not None
    return server.tls.port


def test_an_old_cbc_sha1_suite_is_refused_on_tls_1_2(tls_broker: MosquittoServer, pki: Pki):
    with pytest.raises(ssl.SSLError):
        tls_handshake(
            _tls_port(tls_broker), pki, version=ssl.TLSVersion.TLSv1_2, ciphers=OLD_TLS12_CIPHER
        )


def test_tls_1_2_agrees_on_an_aead_suite_and_tls_1_3_still_works(
    tls_broker: MosquittoServer, pki: Pki
):
    port = _tls_port(tls_broker)
    protocol, cipher = tls_handshake(port, pki, version=ssl.TLSVersion.TLSv1_2)
    assert protocol == "TLSv1.2"
    assert cipher.startswith("ECDHE-ECDSA-"), cipher
    assert "GCM" in cipher or "CHACHA20" in cipher, cipher
    for offered in ("ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305"):
        assert tls_handshake(port, pki, version=ssl.TLSVersion.TLSv1_2, ciphers=offered) == (
            "TLSv1.2",
            offered,
        )
    assert tls_handshake(port, pki)[0] == "TLSv1.3"
    assert tls_handshake(port, pki, version=ssl.TLSVersion.TLSv1_3)[0] == "TLSv1.3"


def test_the_listener_config_names_the_minimum_version_and_the_suites(
    tls_broker: MosquittoServer,
):
    lines = tls_broker.config_path.read_text(encoding="utf-8").splitlines()
    assert "tls_version tlsv1.2" in lines
    (ciphers,) = [line for line in lines if line.startswith("ciphers ")]
    for suite in ciphers.removeprefix("ciphers ").split(":"):
        assert suite.startswith("ECDHE-"), suite
        assert suite.endswith(("GCM-SHA256", "GCM-SHA384", "CHACHA20-POLY1305")), suite


def _tls_connack(
    host: str, port: int, pki: Pki, *, username: str, password: str, client_id: str
) -> int:
    """The CONNACK reason code of an MQTT v5 CONNECT over TLS with a client certificate."""
    files = pki.issue_client(client_id, now=dt.datetime.now(dt.UTC))
    context = ssl.create_default_context(cafile=str(pki.ca.cert))
    context.load_cert_chain(str(files.cert), str(files.key))
    context.check_hostname = False  # the server certificate names localhost and 127.0.0.1
    return tls_connack(
        host, port, context, username=username, password=password, client_id=client_id
    )


def test_with_tls_the_other_addresses_get_the_tls_listener_only(
    servers_dir: Path, pki: Pki, mosquitto_bin: str
):
    """Issue 20 item 4: a gateway elsewhere cannot use its password on the plain listener."""
    server = tls_mosquitto(servers_dir, pki, mosquitto_bin, name="bound")
    server.extra_hosts = (OTHER,)
    start_or_skip(server, "Mosquitto's dynamic-security plugin")
    try:
        tls_port = _tls_port(server)
        gateway_id = f"gw-{uuid.uuid4().hex[:8]}"
        account = dynsec.gateway_central_account(gateway_id)
        password = secrets.token_urlsafe(24)
        admin = BrokerSettings(
            host="127.0.0.1", port=server.port, username=ADMIN_USER, password=server.admin_password
        )
        with BrokerControl(name="central", broker=admin) as control:
            control.run(dynsec.create_account(account, password))
        # Nothing plain listens on the other address: the password cannot be tried there.
        with pytest.raises(ConnectionRefusedError), socket.create_connection((OTHER, server.port)):
            pass
        # There the gateway connects over TLS, with its certificate and account.
        assert (
            _tls_connack(
                OTHER,
                tls_port,
                pki,
                username=account.username,
                password=password,
                client_id=account.client_id,
            )
            == 0
        )
        # The TLS rules hold on every TLS listener.
        with pytest.raises(ssl.SSLError):
            tls_handshake(
                tls_port,
                pki,
                host=OTHER,
                version=ssl.TLSVersion.TLSv1_2,
                ciphers=OLD_TLS12_CIPHER,
            )
        # The services of this machine keep the plain listener on 127.0.0.1.
        ingest = server.service_broker("ingest")
        assert (
            mqtt_connect_probe(
                server.port,
                username=ingest.username,
                password=ingest.password,
                client_id=f"{ingest.username}-{uuid.uuid4().hex[:12]}",
            )
            == 0
        )
    finally:
        server.stop()
