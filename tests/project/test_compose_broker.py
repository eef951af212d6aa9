"""The compose broker's configuration, run by the Mosquitto installed here.

docker-compose.yml cannot run on this machine, but its broker configuration
and its init script can: mosquitto-init.py prepares a security directory the
way the mosquitto-init service does, and deploy/mosquitto/mosquitto.conf,
with the container's paths replaced by that directory's, starts a real
Mosquitto. Checked: authenticated only, the admin account works, the
service accounts of MQTT_SERVICE_ACCOUNTS are written from their password
files (a missing or empty file, or a malformed pair, stops the init), plain
MQTT listens on loopback and the internal network's address only, and the
TLS listener appears only with the certificates of `cityhub pki`, requiring a
client certificate signed by its CA, TLS 1.2 with AEAD suites or TLS 1.3.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cityhub.localstack.mosquitto import ADMIN_USER, find_dynsec_plugin, mqtt_connect_probe
from cityhub.localstack.procs import RunAs, free_port, stop_process_group, tcp_answers
from devices.pki import Pki
from tests.plugins.broker import OLD_TLS12_CIPHER, make_pki, tls_handshake
from tests.plugins.servers import IS_ROOT

ROOT = Path(__file__).resolve().parents[2]
INIT = ROOT / "deploy" / "mosquitto" / "mosquitto-init.py"
CONF = ROOT / "deploy" / "mosquitto" / "mosquitto.conf"
NOW = dt.datetime.now(dt.UTC)
# Stand-ins (all of 127/8 is loopback on Linux): the broker's address on the compose
# stack's internal network, and an address of another network (edge).
INTERNAL = "127.0.0.2"
ELSEWHERE = "127.0.0.3"


def _broker_user() -> RunAs | None:
    return RunAs.lookup("mosquitto") if IS_ROOT else None


def _secret(directory: Path, name: str, text: str | None = None) -> Path:
    """A password file as the compose secrets script writes them (0600, trailing newline)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text((text if text is not None else secrets.token_urlsafe(24)) + "\n")
    path.chmod(0o600)
    return path


def _run_init(security: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(INIT), str(security / "dynamic-security.json")],
        env={**os.environ, "MOSQUITTO_UID": str(os.geteuid()), **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )


def _prepare(
    base: Path, pki_dir: Path, tls_port: int, *, port: int, crl_file: Path | None = None
) -> tuple[str, str]:
    """Run mosquitto-init.py into base/security; return (broker config, admin password).

    With the service accounts ingest.compose and sim.compose, whose password
    files are base/secrets/mqtt_{kind}_password, and the plain listener on
    ``port`` at INTERNAL (the broker's address on the internal network).
    """
    base.mkdir(parents=True, exist_ok=True)
    base.chmod(0o755)
    security = base / "security"
    security.mkdir()
    data = base / "data"
    data.mkdir()
    user = _broker_user()
    if user is not None:
        for d in (security, data):
            os.chown(d, user.uid, user.gid)
    secret_dir = base / "secrets"
    admin_file = _secret(secret_dir, "mqtt_admin_password")
    password = admin_file.read_text().strip()
    services = " ".join(
        f"{kind}.compose={_secret(secret_dir, f'mqtt_{kind}_password')}"
        for kind in ("ingest", "sim")
    )
    env = {
        **os.environ,
        "MQTT_ADMIN_PASSWORD_FILE": str(admin_file),
        "MQTT_SERVICE_ACCOUNTS": services,
        "CITYHUB_PKI_DIR": str(pki_dir),
        "MQTT_CRL_FILE": str(crl_file) if crl_file else "",
        "MQTT_TLS_PORT": str(tls_port),
        "MQTT_PORT": str(port),
        "MQTT_INTERNAL_ADDRESS": INTERNAL,
        "MOSQUITTO_UID": str(user.uid if user else os.geteuid()),
        "MOSQUITTO_GID": str(user.gid if user else os.getegid()),
    }
    result = subprocess.run(
        [sys.executable, str(INIT), str(security / "dynamic-security.json")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "service accounts: ingest.compose, sim.compose" in result.stdout
    conf = CONF.read_text(encoding="utf-8")
    conf = conf.replace("/mosquitto/security", str(security))
    conf = conf.replace("/mosquitto/data/", f"{data}/")
    conf = conf.replace("/usr/lib/mosquitto_dynamic_security.so", str(find_dynsec_plugin()))
    conf = conf.replace("log_dest stdout", "log_dest stderr")
    return conf, password


def _start(base: Path, conf: str, port: int) -> subprocess.Popen[bytes]:
    conf_path = base / "mosquitto.conf"
    conf_path.write_text(conf.replace("listener 1883 127.0.0.1", f"listener {port} 127.0.0.1"))
    user = _broker_user()
    binary = shutil.which("mosquitto")
    if binary is None:
        pytest.skip("Mosquitto broker ('mosquitto') missing, run scripts/install-system-deps")
    with (base / "broker.log").open("wb") as log:
        proc = subprocess.Popen(
            [binary, "-c", str(conf_path)],
            user=user.uid if user else None,
            group=user.gid if user else None,
            extra_groups=[] if user else None,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 10
    while not tcp_answers(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            raise AssertionError((base / "broker.log").read_text())
        time.sleep(0.05)
    return proc


def _tls_connect(port: int, context: ssl.SSLContext) -> bytes:
    """A TLS handshake then an MQTT 3.1.1 CONNECT without credentials: the first bytes back."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"\x10\x0e\x00\x04MQTT\x04\x02\x00\x3c\x00\x02t1")
        return tls.recv(4)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki", now=NOW)


@pytest.fixture
def base(servers_dir: Path) -> Path:
    """A directory the broker's system user can reach (pytest's tmp_path is root's only)."""
    return servers_dir / f"compose-broker-{secrets.token_hex(4)}"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        stop_process_group(proc.pid, first_signal=signal.SIGTERM, timeout_s=10, what="broker")
    proc.wait(10)


def test_without_certificates_the_broker_is_plain_and_authenticated(tmp_path, base):
    empty = tmp_path / "pki"
    empty.mkdir()
    port, tls_port = free_port(), free_port()
    conf, password = _prepare(base, empty, tls_port, port=port)
    assert not (base / "security" / "conf.d" / "tls.conf").exists()
    proc = _start(base, conf, port)
    try:
        assert mqtt_connect_probe(port, username=ADMIN_USER, password=password) == 0
        assert mqtt_connect_probe(port, username=None, password=None) != 0
        assert mqtt_connect_probe(port, username=ADMIN_USER, password="wrong") != 0
        assert not tcp_answers(tls_port)
        # The service accounts, with the passwords of their files, and only those.
        for kind in ("ingest", "sim"):
            secret = (base / "secrets" / f"mqtt_{kind}_password").read_text().strip()
            username = f"{kind}.compose"
            assert mqtt_connect_probe(port, username=username, password=secret) == 0
            assert mqtt_connect_probe(port, username=username, password=password) != 0
        # They can do their work and nothing else (tests/devices/test_service_accounts.py
        # covers the roles): ingest may not publish a batch as a gateway.
        ingest_secret = (base / "secrets" / "mqtt_ingest_password").read_text().strip()
        assert _publish_refused(port, "ingest.compose", ingest_secret, "hub/v1/gw/gw-1/batch")
    finally:
        _stop(proc)


def test_plain_mqtt_listens_on_loopback_and_the_internal_address_only(tmp_path, base):
    """Issue 20 item 4: 1883 is not open on the broker's other networks (compose's edge)."""
    empty = tmp_path / "pki"
    empty.mkdir()
    port, tls_port = free_port(), free_port()
    conf, password = _prepare(base, empty, tls_port, port=port)
    plain = (base / "security" / "conf.d" / "plain.conf").read_text(encoding="utf-8")
    assert f"listener {port} {INTERNAL}" in plain.splitlines()
    proc = _start(base, conf, port)
    try:
        assert mqtt_connect_probe(port, username=ADMIN_USER, password=password) == 0
        with socket.create_connection((INTERNAL, port), timeout=5):
            pass
        with pytest.raises(ConnectionRefusedError), socket.create_connection((ELSEWHERE, port)):
            pass
    finally:
        _stop(proc)


def _publish_refused(port: int, username: str, password: str, topic: str) -> bool:
    """True if the broker refuses a QoS 1 publish of ``username`` to ``topic`` (PUBACK 135)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    codes: list[int] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.username_pw_set(username, password)
    client.on_publish = lambda _c, _u, _mid, rc, _p: codes.append(rc.value)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.publish(topic, b"x", qos=1).wait_for_publish(10)
        deadline = time.monotonic() + 10
        while not codes and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        client.disconnect()
        client.loop_stop()
    return codes == [135]


def test_service_accounts_are_written_and_kept_with_the_provisioned_ones(tmp_path):
    security = tmp_path / "security"
    security.mkdir()
    admin = _secret(tmp_path, "admin")
    ingest = _secret(tmp_path, "ingest")
    env = {
        "MQTT_ADMIN_PASSWORD_FILE": str(admin),
        "MQTT_SERVICE_ACCOUNTS": f"  ingest.compose={ingest}\n monitor.compose={ingest}  ",
    }
    first = _run_init(security, env)
    assert first.returncode == 0, first.stderr
    document = json.loads((security / "dynamic-security.json").read_text())
    clients = {c["username"]: c for c in document["clients"]}
    assert set(clients) == {ADMIN_USER, "ingest.compose", "monitor.compose"}
    assert ingest.read_text().strip() not in json.dumps(document)
    assert "clientid" not in clients["ingest.compose"]
    assert clients["monitor.compose"]["clientid"] == "monitor.compose"
    # A provisioned account survives a re-run; a service dropped from the list stays too
    # (removing an account is provisioning's business, not the init's).
    document["clients"].append({"username": "gateway.gw-1", "roles": []})
    (security / "dynamic-security.json").write_text(json.dumps(document))
    again = _run_init(security, {**env, "MQTT_SERVICE_ACCOUNTS": f"ingest.compose={ingest}"})
    assert again.returncode == 0, again.stderr
    names = [
        c["username"]
        for c in json.loads((security / "dynamic-security.json").read_text())["clients"]
    ]
    assert sorted(names) == sorted(
        [ADMIN_USER, "ingest.compose", "monitor.compose", "gateway.gw-1"]
    )


@pytest.mark.parametrize(
    ("admin_text", "problem"),
    [(None, "cannot read"), ("", "is empty"), ("short", "shorter than 16")],
)
def test_a_missing_or_empty_admin_password_file_is_a_clear_error(tmp_path, admin_text, problem):
    security = tmp_path / "security"
    security.mkdir()
    admin = tmp_path / "mqtt_admin_password"
    if admin_text is not None:
        _secret(tmp_path, admin.name, admin_text)
    result = _run_init(security, {"MQTT_ADMIN_PASSWORD_FILE": str(admin)})
    assert result.returncode != 0
    assert "MQTT_ADMIN_PASSWORD_FILE" in result.stderr
    assert problem in result.stderr
    assert not (security / "dynamic-security.json").exists()
    # The old variable is no longer read: a password in the environment is not enough.
    old = _run_init(security, {"MQTT_ADMIN_PASSWORD": secrets.token_urlsafe(24)})
    assert old.returncode != 0
    assert "MQTT_ADMIN_PASSWORD_FILE" in old.stderr


@pytest.mark.parametrize(
    ("pair", "problem"),
    [
        ("ingest.compose", "not USERNAME=PASSWORD_FILE"),
        ("ingest.compose=", "not USERNAME=PASSWORD_FILE"),
        ("=/run/secrets/x", "not USERNAME=PASSWORD_FILE"),
        ("ingest={file}", "not USERNAME=PASSWORD_FILE"),
        ("cityhub-admin={file}", "not USERNAME=PASSWORD_FILE"),
        ("admin.compose={file}", "not one of ingest, sim, monitor"),
        ("ingest.a.b={file}", "does not match"),
        ("ingest.COMPOSE={file}", "does not match"),
        ("ingest.compose={file} ingest.compose={file}", "listed twice"),
        ("ingest.compose={missing}", "cannot read"),
        ("ingest.compose={empty}", "is empty"),
    ],
)
def test_a_malformed_service_account_pair_is_refused(tmp_path, pair, problem):
    security = tmp_path / "security"
    security.mkdir()
    admin = _secret(tmp_path, "admin")
    spec = pair.format(
        file=_secret(tmp_path, "ok"),
        missing=tmp_path / "missing",
        empty=_secret(tmp_path, "empty", ""),
    )
    result = _run_init(
        security, {"MQTT_ADMIN_PASSWORD_FILE": str(admin), "MQTT_SERVICE_ACCOUNTS": spec}
    )
    assert result.returncode != 0
    assert problem in result.stderr, result.stderr
    assert not (security / "dynamic-security.json").exists()


def test_with_certificates_the_tls_listener_requires_a_client_certificate(base, pki):
    port, tls_port = free_port(), free_port()
    conf, password = _prepare(base, pki.root, tls_port, port=port)
    security = base / "security"
    assert (security / "conf.d" / "tls.conf").exists()
    for secret in ("tls/server.key", "dynamic-security.json"):
        assert (security / secret).stat().st_mode & 0o077 == 0, secret
    proc = _start(base, conf, port)
    try:
        assert mqtt_connect_probe(port, username=ADMIN_USER, password=password) == 0
        anonymous = ssl.create_default_context(cafile=str(pki.ca.cert))
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            _tls_connect(tls_port, anonymous)
        client = pki.issue_client("gw-compose", now=NOW)
        context = ssl.create_default_context(cafile=str(pki.ca.cert))
        context.load_cert_chain(str(client.cert), str(client.key))
        # Certificate accepted; the account is still required (CONNACK 5, not authorised).
        assert _tls_connect(tls_port, context)[:1] == b"\x20"
    finally:
        _stop(proc)


def test_the_tls_listener_refuses_an_old_cbc_suite_and_speaks_tls_1_3(base, pki):
    """Issue 20 item 4: TLS 1.2 with ECDHE and AEAD ciphers only, as the embedded broker."""
    port, tls_port = free_port(), free_port()
    conf, _ = _prepare(base, pki.root, tls_port, port=port)
    proc = _start(base, conf, port)
    try:
        with pytest.raises(ssl.SSLError):
            tls_handshake(tls_port, pki, version=ssl.TLSVersion.TLSv1_2, ciphers=OLD_TLS12_CIPHER)
        protocol, cipher = tls_handshake(tls_port, pki, version=ssl.TLSVersion.TLSv1_2)
        assert protocol == "TLSv1.2"
        assert cipher.startswith("ECDHE-"), cipher
        assert "GCM" in cipher or "CHACHA20" in cipher, cipher
        assert tls_handshake(tls_port, pki)[0] == "TLSv1.3"
    finally:
        _stop(proc)


def test_an_incomplete_pki_directory_is_an_error(tmp_path, pki):
    pki.server.key.unlink()
    security = tmp_path / "security"
    security.mkdir()
    result = subprocess.run(
        [sys.executable, str(INIT), str(security / "dynamic-security.json")],
        env={
            **os.environ,
            "MQTT_ADMIN_PASSWORD_FILE": str(_secret(tmp_path, "admin")),
            "CITYHUB_PKI_DIR": str(pki.root),
            "MOSQUITTO_UID": str(os.geteuid()),
        },
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "server.key" in result.stderr


def test_the_compose_broker_saves_as_often_as_the_embedded_one(tmp_path):
    """Issue 11 item 4: both brokers take a snapshot every second (README, persistence)."""
    from cityhub.localstack.mosquitto import MosquittoServer

    embedded = MosquittoServer(base_dir=tmp_path / "m", port=1, run_as=None, dev_mode=False)
    embedded.write_config()

    def autosave(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith("autosave")]

    expected = ["autosave_on_changes false", "autosave_interval 1"]
    assert autosave(CONF.read_text(encoding="utf-8")) == expected
    assert autosave(embedded.config_path.read_text(encoding="utf-8")) == expected


def _tls_refused(port: int, pki: Pki, name: str) -> bool:
    context = ssl.create_default_context(cafile=str(pki.ca.cert))
    files = pki.client(name)
    context.load_cert_chain(str(files.cert), str(files.key))
    try:
        _tls_connect(port, context)
    except (ssl.SSLError, ConnectionError):
        return True
    return False


def test_a_revoked_certificate_is_refused_after_init_and_sighup(base, pki):
    """The compose procedure after `cityhub pki revoke`: mosquitto-init again, then SIGHUP.

    As in compose, the CRL comes from the provisioning side's PKI volume
    (MQTT_CRL_FILE), not from the directory of the mounted certificates.
    """
    pki.issue_client("gw-keep", now=NOW)
    pki.issue_client("gw-gone", now=NOW)
    port, tls_port = free_port(), free_port()
    certificates = base / "pki-secrets"
    certificates.mkdir(parents=True)
    for name in ("ca.crt", "server.crt", "server.key"):
        shutil.copyfile(pki.root / name, certificates / name)
    conf, _ = _prepare(base, certificates, tls_port, port=port, crl_file=pki.root / "crl.pem")
    tls_conf = (base / "security" / "conf.d" / "tls.conf").read_text(encoding="utf-8")
    assert f"crlfile {base / 'security' / 'tls' / 'crl.pem'}" in tls_conf
    proc = _start(base, conf, port)
    try:
        assert not _tls_refused(tls_port, pki, "gw-gone")
        pki.revoke("gw-gone", now=NOW, reason="key_compromise")
        user = _broker_user()
        rerun = subprocess.run(
            [sys.executable, str(INIT), str(base / "security" / "dynamic-security.json")],
            env={
                **os.environ,
                "MQTT_ADMIN_PASSWORD_FILE": str(base / "secrets" / "mqtt_admin_password"),
                "CITYHUB_PKI_DIR": str(certificates),
                "MQTT_CRL_FILE": str(pki.root / "crl.pem"),
                "MQTT_TLS_PORT": str(tls_port),
                "MOSQUITTO_UID": str(user.uid if user else os.geteuid()),
                "MOSQUITTO_GID": str(user.gid if user else os.getegid()),
            },
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        assert rerun.returncode == 0, rerun.stderr
        os.kill(proc.pid, signal.SIGHUP)
        for _ in range(200):
            if _tls_refused(tls_port, pki, "gw-gone"):
                break
            time.sleep(0.05)
        assert _tls_refused(tls_port, pki, "gw-gone")
        assert not _tls_refused(tls_port, pki, "gw-keep")
        assert proc.poll() is None  # reloaded, not restarted
    finally:
        _stop(proc)
