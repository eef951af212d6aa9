"""`cityhub pki` certificates and the central broker's TLS listener, with a real Mosquitto.

The listener requires a client certificate signed by the project's CA (and,
as everywhere, an account): plain TCP, a certificate from another CA and no
certificate are refused; a gateway with its bundle's certificate connects.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from adapters.mqtt import MqttLink, client_ssl_context
from cityhub.localstack.mosquitto import (
    ADMIN_USER,
    mqtt_connect_probe,
)
from contracts.errors import PkiError
from contracts.settings import BrokerSettings, load_settings
from devices.brokerctl import BrokerControl
from devices.bundle import decode_bundle
from devices.pki import Pki
from devices.provisioning import Endpoint, Provisioner
from devices.registry import Registry
from gateway.sitelink import SiteLink
from tests.plugins.broker import make_pki, tls_connack, tls_mosquitto

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture
def pki(tmp_path) -> Pki:
    return make_pki(tmp_path / "pki", now=NOW)


@pytest.fixture
def tls_broker(servers_dir, pki, mosquitto_bin):
    server = tls_mosquitto(servers_dir, pki, mosquitto_bin, name="tls")
    server.start()
    yield server
    server.stop()


def _context(pki: Pki, cert=None, key=None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca.cert))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


def _connect(port: int, context: ssl.SSLContext, password: str) -> int:
    """The admin's CONNACK reason code over TLS; ConnectionError if the broker cut the session."""
    return tls_connack("127.0.0.1", port, context, username=ADMIN_USER, password=password)


def test_ca_server_and_client_certificates(pki, tmp_path):
    client = pki.issue_client("gw-hk-01", now=NOW)
    for key in (pki.ca.key, pki.server.key, client.key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    ca = x509.load_pem_x509_certificate(pki.ca.cert.read_bytes())
    leaf = x509.load_pem_x509_certificate(client.cert.read_bytes())
    leaf.verify_directly_issued_by(ca)
    assert leaf.subject.rfc4514_string() == "CN=gw-hk-01,O=cityhub"
    usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    server = x509.load_pem_x509_certificate(pki.server.cert.read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    with pytest.raises(PkiError, match="already exists"):
        pki.create_ca(now=NOW)
    with pytest.raises(PkiError, match="cityhub pki init"):
        Pki(tmp_path / "none").issue_client("gw-x", now=NOW)


def test_plain_tcp_to_the_tls_port_is_refused(tls_broker):
    with pytest.raises((ConnectionError, OSError)):
        mqtt_connect_probe(
            tls_broker.tls.port, username=ADMIN_USER, password=tls_broker.admin_password
        )
    # The plain listener still answers (local services use it).
    assert (
        mqtt_connect_probe(tls_broker.port, username=ADMIN_USER, password=tls_broker.admin_password)
        == 0
    )


def test_certificate_from_an_unknown_ca_is_refused(tls_broker, pki, tmp_path):
    rogue = Pki(tmp_path / "rogue")
    rogue.create_ca(now=NOW, common_name="rogue CA")
    forged = rogue.issue_client("gw-hk-01", now=NOW)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        _connect(
            tls_broker.tls.port, _context(pki, forged.cert, forged.key), tls_broker.admin_password
        )
    # No certificate at all is refused too.
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        _connect(tls_broker.tls.port, _context(pki), tls_broker.admin_password)


def test_valid_client_certificate_connects(tls_broker, pki):
    good = pki.issue_client("gw-hk-01", now=NOW)
    context = _context(pki, good.cert, good.key)
    assert _connect(tls_broker.tls.port, context, tls_broker.admin_password) == 0
    # The certificate is not enough: the account's password is still checked.
    assert _connect(tls_broker.tls.port, _context(pki, good.cert, good.key), "wrong") != 0


def test_a_server_certificate_for_another_name_is_not_trusted(tls_broker, pki):
    good = pki.issue_client("gw-hk-01", now=NOW)
    context = _context(pki, good.cert, good.key)
    with (
        socket.create_connection(("127.0.0.1", tls_broker.tls.port), timeout=5) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        context.wrap_socket(raw, server_hostname="broker.example.org")


@contextlib.contextmanager
def _tls_provisioner(
    tls_broker, pki, db_conn, schema, tmp_path, topic_prefix
) -> Iterator[Provisioner]:
    """Provisioning with the admin account, gateway bundles for the broker's TLS listener."""
    admin_settings = BrokerSettings(
        host="127.0.0.1",
        port=tls_broker.port,
        username=ADMIN_USER,
        password=tls_broker.admin_password,
    )
    with BrokerControl(name="central", broker=admin_settings) as control:
        yield Provisioner(
            registry=Registry(db_conn, schema=schema),
            operator="Trần Văn Minh",
            central=control,
            site=control,
            central_endpoint=Endpoint(host="localhost", port=tls_broker.tls.port, tls=True),
            site_endpoint=Endpoint(host="127.0.0.1", port=tls_broker.port),
            bundle_dir=tmp_path / "bundles",
            pki=pki,
            prefix=topic_prefix,
        )


def test_gateway_connects_over_tls_with_its_bundle(
    tls_broker, pki, db_conn, seeded, tmp_path, topic_prefix
):
    with _tls_provisioner(tls_broker, pki, db_conn, seeded, tmp_path, topic_prefix) as provisioner:
        gateway_id = f"gw-{uuid.uuid4().hex[:8]}"
        outcome = provisioner.add_gateway(gateway_id, site_id="hk-hall-quan")
    bundle = decode_bundle(outcome.files.json.read_bytes())
    assert bundle.central.tls
    assert bundle.ca_pem.startswith("-----BEGIN CERTIFICATE-----")
    assert "PRIVATE KEY" in bundle.key_pem
    # The settings file the bundle came with is what `cityhub gateway run -c` reads.
    settings = load_settings(outcome.files.settings, {})
    assert settings.gateway.gateway_id == gateway_id
    central = settings.broker
    assert (central.tls, central.port) == (True, tls_broker.tls.port)
    for path in (outcome.files.settings, central.key_file, outcome.files.json):
        assert stat.S_IMODE(Path(cast(str, path)).stat().st_mode) == 0o600, path
    connected = threading.Event()
    link = MqttLink(
        name="uplink",
        host=cast(str, central.host),
        port=central.port,
        client_id=bundle.central.client_id,
        username=central.username,
        password=central.password,
        tls=True,
        ca_file=central.ca_file,
        cert_file=central.cert_file,
        key_file=central.key_file,
        on_message=lambda _message: None,
        on_connect=connected.set,
    )
    link.start()
    try:
        assert connected.wait(10), "the gateway did not connect over TLS with its bundle"
    finally:
        link.stop()


def test_rotating_and_revoking_a_gateway_revoke_its_certificates(
    tls_broker, pki, db_conn, seeded, tmp_path, topic_prefix
):
    """rotate-credentials supersedes the old certificate, revoke ends the last one: the
    CRL lists them, so the broker refuses the certificates as it refuses the secrets."""
    from cryptography import x509

    pki.write_crl(now=dt.datetime.now(dt.UTC))
    gateway_id = f"gw-{uuid.uuid4().hex[:8]}"

    def serials() -> dict[str, str | None]:
        return {r.serial: r.reason for r in pki.register().certs if r.name == gateway_id}

    def listed() -> set[str]:
        crl = x509.load_pem_x509_crl(pki.crl_path.read_bytes())
        return {format(r.serial_number, "x") for r in crl}

    with _tls_provisioner(tls_broker, pki, db_conn, seeded, tmp_path, topic_prefix) as provisioner:
        provisioner.add_gateway(gateway_id, site_id="hk-hall-quan")
        (first,) = serials()
        rotated = provisioner.rotate_gateway(gateway_id)
        assert any(f"serial {first}" in c and "superseded" in c for c in rotated.changes)
        (second,) = set(serials()) - {first}
        assert serials() == {first: "superseded", second: None}
        assert listed() == {first}
        revoked = provisioner.revoke_gateway(gateway_id)
        assert any(f"serial {second}" in c for c in revoked.changes)
        assert serials() == {first: "superseded", second: "cessation_of_operation"}
        assert listed() == {first, second}


def test_pki_commands(tmp_path):
    env = {**os.environ, "CITYHUB_LOCAL__STATE_DIR": str(tmp_path / "state"), "COLUMNS": "200"}

    def cityhub(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cityhub", "pki", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    made = cityhub("init", "--host", "hub.hanoi.example", "--host", "10.8.0.1")
    assert made.returncode == 0, made.stderr
    assert "CA created" in made.stdout
    pki = Pki(tmp_path / "state" / "pki")
    assert stat.S_IMODE(pki.ca.key.stat().st_mode) == 0o600
    assert stat.S_IMODE(pki.root.stat().st_mode) == 0o700
    shown = cityhub("show")
    assert "CN=hub.hanoi.example" in shown.stdout
    again = cityhub("init")
    assert again.returncode == 1
    assert "a CA already exists" in again.stderr
    client = cityhub("client", "gw-hk-01")
    assert client.returncode == 0, client.stderr
    assert stat.S_IMODE(pki.client("gw-hk-01").key.stat().st_mode) == 0o600


def test_gateway_site_link_connects_over_tls(tls_broker, pki):
    """The site side of a gateway (its own MQTT codec) speaks TLS with the same files."""
    client_files = pki.issue_client("gw-hk-site", now=NOW)
    subscribed = threading.Event()

    async def run() -> None:
        link = SiteLink(
            host="localhost",
            port=tls_broker.tls.port,
            client_id=f"gw-{uuid.uuid4().hex[:6]}-site",
            username=ADMIN_USER,
            password=tls_broker.admin_password,
            ssl_context=client_ssl_context(
                "site",
                ca_file=str(pki.ca.cert),
                cert_file=str(client_files.cert),
                key_file=str(client_files.key),
            ),
            on_messages=lambda _publishes: None,
            on_connect=lambda: link.subscribe(["d/x/up"]),
            on_subscribed=subscribed.set,
        )
        task = asyncio.create_task(link.run())
        try:
            async with asyncio.timeout(10):
                while not subscribed.is_set():
                    await asyncio.sleep(0.05)
        finally:
            link.stop()
            await asyncio.wait_for(task, 5)

    asyncio.run(run())
    assert subscribed.is_set()
