"""Certificate revocation and renewal against a real Mosquitto TLS listener with a CRL.

Each gateway has its own dynamic-security account, as provisioning makes
them, and its own client certificate. What is checked: a revoked certificate
is refused at the TLS handshake after the CRL is handed over with SIGHUP
(no restart), while another gateway's session stays the same connection; a
session already connected with the revoked certificate is NOT cut by the CRL
alone (Mosquitto checks certificates at handshake only), so revocation cuts
it through the control API; a renewed certificate connects; an expired CRL
and a CRL signed by another CA (same name) make the listener refuse every
client.
"""

from __future__ import annotations

import datetime as dt
import secrets
import socket
import ssl
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.enums import CallbackAPIVersion

from cityhub.localstack.mosquitto import ADMIN_USER, MosquittoServer, TlsListener
from cityhub.localstack.procs import free_port, run_as_for
from contracts.settings import BrokerSettings
from contracts.topics import gateway_topic
from devices import dynsec
from devices.brokerctl import BrokerControl
from devices.certs import CertRecord
from devices.pki import Pki, build_crl
from tests.plugins.servers import IS_ROOT

NOW = dt.datetime.now(dt.UTC)
# Generous: 2 shared cores; these bound a wait, they are never asserted as durations.
WAIT_S = 20


@pytest.fixture
def pki(tmp_path) -> Pki:
    pki = Pki(tmp_path / "pki")
    pki.create_ca(now=NOW)
    pki.issue_server(["localhost", "127.0.0.1"], now=NOW)
    return pki


def _broker(servers_dir, pki: Pki, mosquitto_bin: str) -> MosquittoServer:
    return MosquittoServer(
        base_dir=servers_dir / f"mosquitto-crl-{uuid.uuid4().hex[:6]}",
        port=free_port(),
        run_as=run_as_for("mosquitto", is_root=IS_ROOT),
        dev_mode=False,
        binary=mosquitto_bin,
        tls=TlsListener(
            port=free_port(),
            ca_file=pki.ca.cert,
            cert_file=pki.server.cert,
            key_file=pki.server.key,
            crl_file=pki.crl_path,
        ),
    )


@pytest.fixture
def broker(servers_dir, pki, mosquitto_bin) -> Iterator[MosquittoServer]:
    server = _broker(servers_dir, pki, mosquitto_bin)
    server.start()
    yield server
    server.stop()
    # Shown with a failure's captured output.
    sys.stdout.write(server.log_path.read_text(encoding="utf-8")[-4000:])


@pytest.fixture
def control(broker) -> Iterator[BrokerControl]:
    settings = BrokerSettings(
        host="127.0.0.1", port=broker.port, username=ADMIN_USER, password=broker.admin_password
    )
    with BrokerControl(name="central", broker=settings) as ctl:
        yield ctl


@dataclass
class Gateway:
    """A gateway's account and certificate, and a paho session that never reconnects by itself."""

    gateway_id: str
    password: str
    pki: Pki
    port: int
    connects: int = 0
    disconnects: int = 0
    connected: threading.Event = field(default_factory=threading.Event)
    gone: threading.Event = field(default_factory=threading.Event)
    client: mqtt.Client | None = None

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki.ca.cert))
        files = self.pki.client(self.gateway_id)
        context.load_cert_chain(str(files.cert), str(files.key))
        return context

    def start(self) -> None:
        assert self.attempt(), f"{self.gateway_id} did not connect"

    def attempt(self) -> bool:
        """Connect once; True on CONNACK success, False once the broker cut the attempt."""
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=dynsec.gateway_client_id(self.gateway_id, "central"),
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=False,
        )
        client.username_pw_set(dynsec.gateway_username(self.gateway_id, "central"), self.password)
        client.tls_set_context(self.context())

        def on_connect(_c, _u, _f, reason, _p):
            if reason.value == 0:
                self.connects += 1
                self.connected.set()

        def on_disconnect(*_args):
            self.disconnects += 1
            self.gone.set()

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.connect("127.0.0.1", self.port)
        client.loop_start()
        self.client = client
        for _ in range(WAIT_S * 20):
            if self.connected.wait(0.05) or self.gone.is_set():
                break
        return self.connected.is_set()

    def publish_acked(self) -> None:
        """A QoS 1 publish on its own state topic, PUBACKed: the session is alive."""
        assert self.client is not None
        info = self.client.publish(gateway_topic(self.gateway_id, "state"), b"alive", qos=1)
        info.wait_for_publish(WAIT_S)
        assert info.is_published()

    def stop(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()


def _gateway(control: BrokerControl, pki: Pki, broker: MosquittoServer, name: str) -> Gateway:
    password = secrets.token_urlsafe(16)
    control.run(dynsec.create_account(dynsec.gateway_central_account(name), password))
    pki.issue_client(name, now=NOW)
    return Gateway(gateway_id=name, password=password, pki=pki, port=broker.tls.port)


def _handshake(port: int, pki: Pki, name: str) -> None:
    """A bare TLS handshake with ``name``'s files (TLS 1.2: the server's verdict comes in it)."""
    context = ssl.create_default_context(cafile=str(pki.ca.cert))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    files = pki.client(name)
    context.load_cert_chain(str(files.cert), str(files.key))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as raw,
        context.wrap_socket(raw, server_hostname="localhost"),
    ):
        pass


def _refused(port: int, pki: Pki, name: str) -> bool:
    try:
        _handshake(port, pki, name)
    except (ssl.SSLError, ConnectionError):
        return True
    return False


def test_revoked_certificate_is_refused_and_its_session_cut_others_stay(pki, broker, control):
    port = broker.tls.port
    a, b = (_gateway(control, pki, broker, n) for n in ("gw-rev-a", "gw-rev-b"))
    c = _gateway(control, pki, broker, "gw-rev-c")
    again: Gateway | None = None
    a.start()
    b.start()
    b_client = b.client
    try:
        newly, already = pki.revoke("gw-rev-a", now=NOW, reason="key_compromise")
        assert [r.name for r in newly] == ["gw-rev-a"]
        assert not already
        assert broker.reload_crl(), "the broker did not take the new CRL"
        # SIGHUP is asynchronous: wait until a new handshake with A's certificate fails.
        for _ in range(200):
            if _refused(port, pki, "gw-rev-a"):
                break
            threading.Event().wait(0.05)
        assert _refused(port, pki, "gw-rev-a")
        # The CRL alone does not cut a live session: Mosquitto checks at handshake only.
        a.publish_acked()
        assert a.disconnects == 0
        # So revocation cuts it through the control API.
        assert control.cut_sessions(dynsec.gateway_central_account("gw-rev-a"))
        assert a.gone.wait(WAIT_S), "the revoked gateway's session was not cut"
        # B: the same connection object, never disconnected, still acked.
        b.publish_acked()
        assert (b.client is b_client, b.connects, b.disconnects) == (True, 1, 0)
        # A third gateway, connecting now, gets in.
        assert not _refused(port, pki, "gw-rev-c")
        c.start()
        c.publish_acked()
        # A cannot come back with its old certificate (its account is enabled again).
        again = Gateway(gateway_id="gw-rev-a", password=a.password, pki=pki, port=port)
        assert not again.attempt()
        assert again.gone.is_set()
    finally:
        for g in (a, b, c, again):
            if g is not None:
                g.stop()


def test_renewed_certificate_connects_and_the_old_one_still_does(pki, broker, control):
    old = _gateway(control, pki, broker, "gw-renew")
    old_pem = pki.client("gw-renew").cert.read_bytes()
    old.start()
    try:
        pki.issue_client("gw-renew", now=NOW)
        assert pki.client("gw-renew").cert.read_bytes() != old_pem
        new = Gateway(gateway_id="gw-renew", password=old.password, pki=pki, port=old.port)
        # Until it is revoked, the old certificate still passes a handshake (switch-over).
        serial = x509.load_pem_x509_certificate(old_pem).serial_number
        assert not _refused(old.port, pki, "gw-renew")
        old.stop()
        new.start()
        new.publish_acked()
        new.stop()
        newly, _ = pki.revoke("gw-renew", now=NOW, serial=f"{serial:x}", reason="superseded")
        assert [int(r.serial, 16) for r in newly] == [serial]
        assert broker.reload_crl()
        # Only the old serial is revoked: the renewed certificate keeps connecting.
        for _ in range(40):
            assert not _refused(old.port, pki, "gw-renew")
    finally:
        old.stop()


@pytest.mark.parametrize("tamper", ["expired", "other_ca"])
def test_an_expired_or_forged_crl_refuses_every_client(
    tamper, servers_dir, pki, mosquitto_bin, tmp_path
):
    pki.issue_client("gw-crl", now=NOW)
    if tamper == "expired":
        # next_update 10 days ago.
        pki.write_crl(now=NOW - dt.timedelta(days=100))
    else:
        # Same CA name, another key: only the signature tells it apart.
        rogue = Pki(tmp_path / "rogue")
        rogue.create_ca(now=NOW)
        ca = x509.load_pem_x509_certificate(rogue.ca.cert.read_bytes())
        key = serialization.load_pem_private_key(rogue.ca.key.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        crl = build_crl(ca, key, [], now=NOW)
        pki.crl_path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    server = _broker(servers_dir, pki, mosquitto_bin)
    server.start()
    try:
        assert _refused(server.tls.port, pki, "gw-crl")
        # A good CRL again, handed over with SIGHUP: the same client gets in.
        pki.write_crl(now=NOW)
        assert server.reload_crl()
        for _ in range(200):
            if not _refused(server.tls.port, pki, "gw-crl"):
                break
            threading.Event().wait(0.05)
        assert not _refused(server.tls.port, pki, "gw-crl")
    finally:
        server.stop()


def test_crl_lists_the_revoked_serials_with_reasons(pki):
    pki.issue_client("gw-x", now=NOW)
    pki.issue_client("gw-y", now=NOW)
    pki.revoke("gw-x", now=NOW, reason="key_compromise")
    crl = x509.load_pem_x509_crl(pki.crl_path.read_bytes())
    ca = x509.load_pem_x509_certificate(pki.ca.cert.read_bytes())
    public_key = ca.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert crl.is_signature_valid(public_key)
    register = pki.register()
    x = next(r for r in register.certs if r.name == "gw-x")
    entry = crl.get_revoked_certificate_by_serial_number(int(x.serial, 16))
    assert entry is not None
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason is x509.ReasonFlags.key_compromise
    y = next(r for r in register.certs if r.name == "gw-y")
    assert crl.get_revoked_certificate_by_serial_number(int(y.serial, 16)) is None
    assert isinstance(x, CertRecord)
