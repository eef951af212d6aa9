"""The compose broker's configuration, run by the Mosquitto installed here.

docker-compose.yml cannot run on this machine, but its broker configuration
and its init script can: mosquitto-init.py prepares a security directory the
way the mosquitto-init service does, and deploy/mosquitto/mosquitto.conf,
with the container's paths replaced by that directory's, starts a real
Mosquitto. Checked: authenticated only, the admin account works, and the TLS
listener appears only with the certificates of `cityhub pki`, requiring a
client certificate signed by its CA.
"""

from __future__ import annotations

import datetime as dt
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
from tests.plugins.servers import IS_ROOT

ROOT = Path(__file__).resolve().parents[2]
INIT = ROOT / "deploy" / "mosquitto" / "mosquitto-init.py"
CONF = ROOT / "deploy" / "mosquitto" / "mosquitto.conf"
NOW = dt.datetime.now(dt.UTC)


def _broker_user() -> RunAs | None:
    return RunAs.lookup("mosquitto") if IS_ROOT else None


def _prepare(base: Path, pki_dir: Path, tls_port: int) -> tuple[str, str]:
    """Run mosquitto-init.py into base/security; return (broker config, admin password)."""
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
    password = secrets.token_urlsafe(24)
    env = {
        **os.environ,
        "MQTT_ADMIN_PASSWORD": password,
        "CITYHUB_PKI_DIR": str(pki_dir),
        "MQTT_TLS_PORT": str(tls_port),
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
    conf = CONF.read_text(encoding="utf-8")
    conf = conf.replace("/mosquitto/security", str(security))
    conf = conf.replace("/mosquitto/data/", f"{data}/")
    conf = conf.replace("/usr/lib/mosquitto_dynamic_security.so", str(find_dynsec_plugin()))
    conf = conf.replace("log_dest stdout", "log_dest stderr")
    return conf, password


def _start(base: Path, conf: str, port: int) -> subprocess.Popen[bytes]:
    conf_path = base / "mosquitto.conf"
    conf_path.write_text(conf.replace("listener 1883", f"listener {port} 127.0.0.1"))
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
    pki = Pki(tmp_path / "pki")
    pki.create_ca(now=NOW)
    pki.issue_server(["localhost", "127.0.0.1"], now=NOW)
    return pki


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
    conf, password = _prepare(base, empty, tls_port)
    assert not (base / "security" / "conf.d" / "tls.conf").exists()
    proc = _start(base, conf, port)
    try:
        assert mqtt_connect_probe(port, username=ADMIN_USER, password=password) == 0
        assert mqtt_connect_probe(port, username=None, password=None) != 0
        assert mqtt_connect_probe(port, username=ADMIN_USER, password="wrong") != 0
        assert not tcp_answers(tls_port)
    finally:
        _stop(proc)


def test_with_certificates_the_tls_listener_requires_a_client_certificate(base, pki):
    port, tls_port = free_port(), free_port()
    conf, password = _prepare(base, pki.root, tls_port)
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


def test_an_incomplete_pki_directory_is_an_error(tmp_path, pki):
    pki.server.key.unlink()
    security = tmp_path / "security"
    security.mkdir()
    result = subprocess.run(
        [sys.executable, str(INIT), str(security / "dynamic-security.json")],
        env={
            **os.environ,
            "MQTT_ADMIN_PASSWORD": secrets.token_urlsafe(24),
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
    """The compose procedure after `cityhub pki revoke`: mosquitto-init again, then SIGHUP."""
    pki.issue_client("gw-keep", now=NOW)
    pki.issue_client("gw-gone", now=NOW)
    port, tls_port = free_port(), free_port()
    conf, password = _prepare(base, pki.root, tls_port)
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
                "MQTT_ADMIN_PASSWORD": password,
                "CITYHUB_PKI_DIR": str(pki.root),
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
