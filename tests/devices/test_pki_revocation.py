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
import os
import secrets
import socket
import ssl
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.enums import CallbackAPIVersion

from cityhub.localstack.mosquitto import ADMIN_USER, MosquittoServer
from contracts.settings import BrokerSettings
from contracts.topics import gateway_topic
from devices import dynsec
from devices.brokerctl import BrokerControl
from devices.bundle import GatewayBundle, MqttAccess, decode_bundle, gateway_bundle
from devices.bundlefiles import write_bundle
from devices.certs import CertRecord
from devices.pki import Pki, build_crl
from tests.plugins.broker import make_pki, tls_mosquitto

NOW = dt.datetime.now(dt.UTC)
# Generous: 2 shared cores; these bound a wait, they are never asserted as durations.
WAIT_S = 20


@pytest.fixture
def pki(tmp_path) -> Pki:
    return make_pki(tmp_path / "pki", now=NOW)


def _broker(servers_dir, pki: Pki, mosquitto_bin: str) -> MosquittoServer:
    return tls_mosquitto(servers_dir, pki, mosquitto_bin, name="crl", crl=True)


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


def _cityhub(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cityhub", "pki", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _access(name: str, password: str) -> MqttAccess:
    return MqttAccess(
        host="localhost", port=8883, tls=True, username=name, password=password, client_id=name
    )


@pytest.fixture
def cli_pki(tmp_path) -> tuple[dict[str, str], Pki, str]:
    """A state dir with a PKI, gw-one and gw-two, and gw-one's bundle; (env, pki, old cert)."""
    env = {**os.environ, "CITYHUB_LOCAL__STATE_DIR": str(tmp_path / "state"), "COLUMNS": "250"}
    assert _cityhub(env, "init").returncode == 0
    pki = Pki(tmp_path / "state" / "pki")
    assert stat.S_IMODE(pki.register_path.stat().st_mode) == 0o600
    assert x509.load_pem_x509_crl(pki.crl_path.read_bytes()).next_update_utc is not None
    for name in ("gw-one", "gw-two"):
        assert _cityhub(env, "client", name).returncode == 0
    # A gateway bundle made earlier (as `cityhub gateways add` writes it).
    files = pki.client("gw-one")
    old_cert = files.cert.read_text(encoding="ascii")
    bundle = gateway_bundle(
        gateway_id="gw-one",
        site_id="hk-hall",
        label="",
        location="",
        central=_access("gateway.gw-one", "central-secret"),
        site=_access("gateway.gw-one.site", "site-secret"),
        prefix="",
        ca_pem=pki.ca_pem(),
        cert_pem=old_cert,
        key_pem=files.key.read_text(encoding="ascii"),
        issued_at="2026-12-06T08:00:00Z",
        issued_by="Trần Văn Minh",
    )
    write_bundle(tmp_path / "state" / "bundles", bundle)
    return env, pki, old_cert


def test_pki_revoke_command(cli_pki):
    env, pki, _ = cli_pki
    unknown = _cityhub(env, "revoke", "gw-nobody", "--offline")
    assert unknown.returncode == 1
    assert "no client certificate issued to 'gw-nobody'" in unknown.stderr
    for protected in ("ca", "server"):
        refused = _cityhub(env, "revoke", protected, "--offline")
        assert refused.returncode == 1
        assert "is not a client certificate" in refused.stderr
    bad_reason = _cityhub(env, "revoke", "gw-two", "--reason", "whim", "--offline")
    assert bad_reason.returncode == 1
    assert "unknown reason" in bad_reason.stderr
    crl_before = pki.crl_path.read_bytes()
    first = _cityhub(env, "revoke", "gw-two", "--reason", "key_compromise", "--offline")
    assert first.returncode == 0, first.stderr
    assert "revoked: gw-two" in first.stdout
    crl_after = pki.crl_path.read_bytes()
    assert crl_after != crl_before
    again = _cityhub(env, "revoke", "gw-two", "--offline")
    assert again.returncode == 0, again.stderr
    assert "already revoked: gw-two" in again.stdout
    assert pki.crl_path.read_bytes() == crl_after  # nothing to re-sign


def test_pki_renew_and_list_commands(cli_pki, tmp_path):
    env, pki, old_cert = cli_pki
    assert _cityhub(env, "revoke", "gw-two", "--offline").returncode == 0
    # Renewal: only live certificates in the window; the bundle gets the new files.
    nothing = _cityhub(env, "renew", "--expiring-within", "30d")
    assert "nothing to renew" in nothing.stdout
    renewed = _cityhub(env, "renew", "--expiring-within", "800d")
    assert renewed.returncode == 0, renewed.stderr
    assert "renewed: gw-one" in renewed.stdout
    assert "gw-two" not in renewed.stdout  # revoked: not brought back by a sweep
    refreshed = decode_bundle((tmp_path / "state" / "bundles" / "gateway-gw-one.json").read_bytes())
    assert refreshed.cert_pem == pki.client("gw-one").cert.read_text(encoding="ascii")
    assert refreshed.cert_pem != old_cert
    assert isinstance(refreshed, GatewayBundle)
    assert refreshed.central.password == "central-secret"  # secrets unchanged
    tls_copy = tmp_path / "state" / "bundles" / "gateway-gw-one" / "client.crt"
    assert tls_copy.read_text(encoding="ascii") == refreshed.cert_pem
    assert _cityhub(env, "renew", "gw-nobody").returncode == 1
    server = _cityhub(env, "renew", "--server", "--days", "90")
    assert server.returncode == 0, server.stderr
    names = x509.load_pem_x509_certificate(pki.server.cert.read_bytes()).extensions
    alt = names.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in alt.get_values_for_type(x509.DNSName)
    listed = _cityhub(env, "list")
    assert listed.returncode == 0, listed.stderr
    rows = [line for line in listed.stdout.splitlines() if "gw-" in line]
    assert sum("gw-one" in line for line in rows) == 2  # old and renewed
    assert any("gw-two" in line and "revoked" in line for line in rows)
    assert "CRL:" in listed.stdout
    assert _cityhub(env, "renew", "--expiring-within", "soon").returncode == 1


def test_revoke_command_cuts_the_session_of_a_real_broker(pki, broker, control):
    a = _gateway(control, pki, broker, "gw-cli-a")
    b = _gateway(control, pki, broker, "gw-cli-b")
    a.start()
    b.start()
    env = {
        **os.environ,
        "CITYHUB_PROVISIONING__PKI_DIR": str(pki.root),
        "CITYHUB_BROKER__HOST": "127.0.0.1",
        "CITYHUB_BROKER__PORT": str(broker.port),
        "CITYHUB_BROKER__USERNAME": ADMIN_USER,
        "CITYHUB_BROKER__PASSWORD": broker.admin_password,
        "COLUMNS": "250",
    }
    try:
        done = _cityhub(env, "revoke", "gw-cli-a")
        assert done.returncode == 0, done.stderr
        assert "live sessions cut" in done.stdout
        assert "another broker" in done.stdout  # not the embedded one: the hint
        assert a.gone.wait(WAIT_S)
        # The operator's part for a broker that is not embedded: the CRL and SIGHUP.
        assert broker.reload_crl()
        for _ in range(200):
            if _refused(broker.tls.port, pki, "gw-cli-a"):
                break
            threading.Event().wait(0.05)
        assert _refused(broker.tls.port, pki, "gw-cli-a")
        b.publish_acked()
        assert (b.connects, b.disconnects) == (1, 0)
    finally:
        a.stop()
        b.stop()


def test_concurrent_issues_and_revokes_lose_no_record(pki):
    """The register is read, changed and written under a lock: no writer loses another's."""
    errors: list[BaseException] = []

    def issue(worker: int) -> None:
        try:
            for n in range(5):
                pki.issue_client(f"gw-{worker}-{n}", now=NOW)
                if n % 2:
                    pki.revoke(f"gw-{worker}-{n}", now=NOW)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=issue, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S * 3)
    assert not errors
    register = pki.register_path.read_bytes()
    records = Pki(pki.root).register().certs
    assert len([r for r in records if r.kind == "client"]) == 40, register[:500]
    revoked_serials = {int(r.serial, 16) for r in records if r.revoked_at is not None}
    assert len(revoked_serials) == 16
    crl = x509.load_pem_x509_crl(pki.crl_path.read_bytes())
    assert {e.serial_number for e in crl} == revoked_serials


def test_crl_command_resigns_an_expiring_crl(cli_pki):
    env, pki, _ = cli_pki
    pki.write_crl(now=NOW - dt.timedelta(days=100))
    stale = pki.crl_next_update()
    assert stale is not None
    assert stale < NOW
    done = _cityhub(env, "crl", "--offline")
    assert done.returncode == 0, done.stderr
    fresh = pki.crl_next_update()
    assert fresh is not None
    assert fresh > NOW + dt.timedelta(days=80)
