"""`cityhub services up|status|down` with real servers, run as the real command."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cityhub.localstack.mosquitto import ADMIN_USER, MosquittoServer, mqtt_connect_probe
from cityhub.localstack.procs import free_port, port_is_free
from tests.plugins.servers import kill_everything_under, processes_under

pytestmark = pytest.mark.slow


@pytest.fixture
def state_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="cityhub-state-"))
    path.chmod(0o755)
    yield path
    # Whatever a failed test left running must not outlive it.
    kill_everything_under(path)
    shutil.rmtree(path, ignore_errors=True)


def cityhub(state_dir: Path, *args: str, pg_port: int, mqtt_port: int, dev: bool = True):
    env = {
        **os.environ,
        "CITYHUB_LOCAL__STATE_DIR": str(state_dir),
        "CITYHUB_LOCAL__PG_PORT": str(pg_port),
        "CITYHUB_LOCAL__MQTT_PORT": str(mqtt_port),
        "CITYHUB_LOCAL__DEV_MODE": "true" if dev else "false",
        "COLUMNS": "200",
    }
    return subprocess.run(
        [sys.executable, "-m", "cityhub", "services", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.usefixtures("pg_bindir", "mosquitto_bin")  # skipped without the servers
def test_up_status_down_round_trip(state_dir):
    pg_port, mqtt_port = free_port(), free_port()
    up = cityhub(state_dir, "up", pg_port=pg_port, mqtt_port=mqtt_port)
    assert up.returncode == 0, up.stderr
    assert up.stdout.count("running") == 2
    # URLs are printed with the password masked.
    assert f"postgresql://cityhub:***@127.0.0.1:{pg_port}/cityhub" in up.stdout
    password = (state_dir / "postgres.password").read_text().strip()
    assert password not in up.stdout

    status = cityhub(state_dir, "status", pg_port=pg_port, mqtt_port=mqtt_port)
    assert status.returncode == 0

    # Both servers really answer: SQL with TimescaleDB preloaded, MQTT with the admin account.
    url = f"postgresql://cityhub:{password}@127.0.0.1:{pg_port}/cityhub"
    with psycopg.connect(url) as conn:
        libs = conn.execute("SHOW shared_preload_libraries").fetchone()
        assert libs == ("timescaledb",)
    admin = (state_dir / "mosquitto" / "admin.password").read_text().strip()
    assert mqtt_connect_probe(mqtt_port, username=ADMIN_USER, password=admin) == 0
    # Dev mode: an anonymous local client is let in.
    assert mqtt_connect_probe(mqtt_port, username=None, password=None) == 0

    # A second `up` is a no-op on running servers.
    again = cityhub(state_dir, "up", pg_port=pg_port, mqtt_port=mqtt_port)
    assert again.returncode == 0, again.stderr

    for secret in ("postgres.password", "stack.json", "mosquitto/admin.password"):
        assert stat.S_IMODE((state_dir / secret).stat().st_mode) == 0o600, secret
    # The service accounts: named with their password files, never their passwords.
    for username in ("ingest.local", "sim.local", "monitor.local"):
        path = state_dir / "mosquitto" / f"{username}.password"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, username
        assert username in up.stdout
        assert f"password_file = {path}" in up.stdout
        assert path.read_text().strip() not in up.stdout + status.stdout
        secret = path.read_text().strip()
        # monitor.local is bound to its username as client id; the others take any.
        for password, accepted in ((secret, True), (admin, False)):
            code = mqtt_connect_probe(
                mqtt_port, username=username, password=password, client_id=username
            )
            assert (code == 0) is accepted, (username, code)
    monitor = (state_dir / "mosquitto" / "monitor.local.password").read_text().strip()
    assert mqtt_connect_probe(mqtt_port, username="monitor.local", password=monitor) != 0
    for secret in ("mosquitto/security/dynamic-security.json",):
        assert stat.S_IMODE((state_dir / secret).stat().st_mode) == 0o600, secret

    down = cityhub(state_dir, "down", pg_port=pg_port, mqtt_port=mqtt_port)
    assert down.returncode == 0, down.stderr
    assert processes_under(state_dir) == []
    assert port_is_free(pg_port)
    assert port_is_free(mqtt_port)
    stopped = cityhub(state_dir, "status", pg_port=pg_port, mqtt_port=mqtt_port)
    assert stopped.returncode == 3
    assert stopped.stdout.count("stopped") == 2


@pytest.mark.usefixtures("pg_bindir", "mosquitto_bin")  # skipped without the servers
def test_port_already_taken_is_a_clear_error_and_leaves_nothing_running(state_dir):
    pg_port, mqtt_port = free_port(), free_port()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", mqtt_port))
        squatter.listen()
        up = cityhub(state_dir, "up", pg_port=pg_port, mqtt_port=mqtt_port)
    assert up.returncode == 1
    assert f"port {mqtt_port} for Mosquitto is already in use" in up.stderr
    assert "Traceback" not in up.stderr
    # PostgreSQL had started first; the failed `up` stopped it again.
    assert processes_under(state_dir) == []
    assert port_is_free(pg_port)


@pytest.mark.usefixtures("pg_bindir", "mosquitto_bin")  # skipped without the servers
def test_stale_state_dir_after_kill_is_recovered(state_dir):
    pg_port, mqtt_port = free_port(), free_port()
    assert cityhub(state_dir, "up", pg_port=pg_port, mqtt_port=mqtt_port).returncode == 0
    password = (state_dir / "postgres.password").read_text().strip()
    url = f"postgresql://cityhub:{password}@127.0.0.1:{pg_port}/cityhub"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE survivor (x int)")
        conn.execute("INSERT INTO survivor VALUES (42)")

    # kill -9 everything: postmaster.pid and mosquitto.pid are left behind, stale.
    kill_everything_under(state_dir)
    assert (state_dir / "postgres" / "data" / "postmaster.pid").exists()
    assert (state_dir / "mosquitto" / "mosquitto.pid").exists()
    stopped = cityhub(state_dir, "status", pg_port=pg_port, mqtt_port=mqtt_port)
    assert stopped.returncode == 3

    up = cityhub(state_dir, "up", pg_port=pg_port, mqtt_port=mqtt_port)
    assert up.returncode == 0, up.stderr + up.stdout
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT x FROM survivor").fetchall() == [(42,)]
    assert cityhub(state_dir, "down", pg_port=pg_port, mqtt_port=mqtt_port).returncode == 0
    assert processes_under(state_dir) == []


def test_database_commands_without_a_running_database_say_what_to_do(state_dir):
    env = {
        **os.environ,
        "CITYHUB_LOCAL__STATE_DIR": str(state_dir),
        "CITYHUB_LOCAL__PG_PORT": str(free_port()),
    }
    env.pop("CITYHUB_DATABASE__URL", None)
    result = subprocess.run(
        [sys.executable, "-m", "cityhub", "db", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "cityhub services up" in result.stderr


def test_authenticated_broker_refuses_anonymous_and_wrong_passwords(mqtt_server: MosquittoServer):
    port = mqtt_server.port
    assert mqtt_connect_probe(port, username=None, password=None) != 0
    assert mqtt_connect_probe(port, username=ADMIN_USER, password="wrong") != 0
    assert mqtt_connect_probe(port, username=ADMIN_USER, password=mqtt_server.admin_password) == 0


def test_broker_delivers_mqtt5_qos1_messages(mqtt_server: MosquittoServer):
    received: list[bytes] = []
    subscribed = threading.Event()
    got = threading.Event()

    def client(name: str) -> mqtt.Client:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
        c.username_pw_set(ADMIN_USER, mqtt_server.admin_password)
        return c

    sub = client("t-sub")
    sub.on_subscribe = lambda *_: subscribed.set()

    def on_message(_c, _u, message):
        received.append(message.payload)
        got.set()

    sub.on_message = on_message
    sub.connect("127.0.0.1", mqtt_server.port)
    sub.subscribe("t/roundtrip", qos=1)
    sub.loop_start()
    try:
        assert subscribed.wait(10)
        pub = client("t-pub")
        pub.connect("127.0.0.1", mqtt_server.port)
        pub.loop_start()
        props = Properties(PacketTypes.PUBLISH)
        props.MessageExpiryInterval = 60
        info = pub.publish("t/roundtrip", b"xin chao", qos=1, properties=props)
        info.wait_for_publish(10)
        assert info.is_published()
        assert got.wait(10)
        assert received == [b"xin chao"]
        pub.disconnect()
        pub.loop_stop()
    finally:
        sub.disconnect()
        sub.loop_stop()


# Issue 11 item 4: what a kill -9 of the broker may cost readings queued for an
# absent gateway. The documented bound (README, "Broker persistence"): the
# readings acknowledged in the last 2 s before the kill (a snapshot every
# second; Mosquitto compares whole seconds). The devices here publish at ten
# times a service hall's rate (52 readings/s) for 4 s after a snapshot: the
# old 10 s interval loses all 208, the bound allows 104.
RATE_PER_S = 52
WINDOW_S = 2
PUBLISH_S = 4


class _AwayGateway:
    """A persistent site session like the gateway's (clean start off, an hour's expiry)."""

    def __init__(self, server: MosquittoServer) -> None:
        self.server = server
        self.received: list[bytes] = []
        self.sentinel_seen = threading.Event()
        self.ready = threading.Event()

    def connect(self) -> mqtt.Client:
        gw = _admin_client(self.server, "gw-away-site")
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        gw.on_connect = lambda *_: self.ready.set()
        gw.on_subscribe = lambda *_: self.ready.set()
        gw.on_message = self._on_message
        self.ready.clear()
        gw.connect("127.0.0.1", self.server.port, clean_start=False, properties=props)
        gw.loop_start()
        assert self.ready.wait(10)
        return gw

    def _on_message(self, _c, _u, message) -> None:
        if message.topic == "d/sentinel/up":
            self.sentinel_seen.set()
        else:
            self.received.append(bytes(message.payload))

    def subscribe_and_leave(self) -> None:
        gw = self.connect()
        self.ready.clear()
        gw.subscribe("d/+/up", qos=1)
        assert self.ready.wait(10)
        gw.disconnect()
        gw.loop_stop()


def _admin_client(server: MosquittoServer, name: str) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
    c.username_pw_set(ADMIN_USER, server.admin_password)
    return c


def _publish_acked(server: MosquittoServer, client_id: str, messages: list[tuple[str, bytes]]):
    client = _admin_client(server, client_id)
    client.connect("127.0.0.1", server.port)
    client.loop_start()
    for topic, payload in messages:
        info = client.publish(topic, payload, qos=1)
        info.wait_for_publish(10)
        assert info.is_published()
    return client


def _saves(server: MosquittoServer) -> int:
    return server.log_path.read_text(encoding="utf-8").count("Saving in-memory database")


def _await_save(server: MosquittoServer) -> None:
    """Until the broker starts a snapshot after this call (its log says so)."""
    before = _saves(server)
    for _ in range(600):
        if _saves(server) > before:
            return
        threading.Event().wait(0.05)
    raise AssertionError("the broker wrote no snapshot in 30 s")


def test_broker_kill_with_the_gateway_away_loses_at_most_the_bound(
    killable_broker: MosquittoServer,
):
    server = killable_broker
    gateway = _AwayGateway(server)
    gateway.subscribe_and_leave()
    _await_save(server)  # the gateway's session is in a snapshot; the window starts now

    device = _admin_client(server, "kiosk-away")
    device.connect("127.0.0.1", server.port)
    device.loop_start()
    acked: list[tuple[bytes, int]] = []  # (reading, snapshots started when it was acked)
    start = time.monotonic()
    for seq in range(RATE_PER_S * PUBLISH_S):
        # Paced like a fleet of devices (load, not a wait for something to happen).
        threading.Event().wait(max(0.0, start + seq / RATE_PER_S - time.monotonic()))
        payload = f'{{"seq": {seq}}}'.encode()
        info = device.publish(f"d/kiosk-{seq % 5}/up", payload, qos=1)
        info.wait_for_publish(10)
        assert info.is_published()
        acked.append((payload, _saves(server)))
    pid = server.pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # right after the last PUBACK
    device.loop_stop()
    final_saves = _saves(server)
    for _ in range(200):  # until the killed broker is gone and its port free
        if not server.running() and port_is_free(server.port):
            break
        threading.Event().wait(0.05)
    server.start()

    _publish_acked(server, "sentinel", [("d/sentinel/up", b"end")]).disconnect()
    gw = gateway.connect()
    try:
        assert gateway.sentinel_seen.wait(30), "the gateway's session did not survive the restart"
    finally:
        gw.disconnect()
        gw.loop_stop()
    lost = [(p, saves) for p, saves in acked if p not in gateway.received]
    # A snapshot that started after a reading was acknowledged holds it; of two such,
    # the first finished (the kill may cut the last one short).
    assert all(saves >= final_saves - 1 for _, saves in lost), lost[:5]
    assert len(lost) <= RATE_PER_S * WINDOW_S, f"{len(lost)} of {len(acked)} readings lost"
