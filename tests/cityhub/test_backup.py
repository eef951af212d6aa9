"""`cityhub backup` and `cityhub restore` between two embedded stacks, as the real command.

A source stack (private PostgreSQL + Mosquitto, authentication on) gets a
gateway and a device provisioned through the CLI (real broker accounts),
readings through ingest's writer and an alert through the alerts store;
`cityhub backup` copies it; a second stack with a new data directory and a
new broker gets `cityhub restore`. The device and the gateway then connect
to the new broker with the passwords of their original bundles. Hostile
backups (altered, incomplete, escaping paths, another TimescaleDB version, a
wrong passphrase, a truncated dump) are refused before anything changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.enums import CallbackAPIVersion

from alerts.lifecycle import Raise
from alerts.store import AlertStore
from cityhub.localstack.mosquitto import ADMIN_USER
from cityhub.localstack.procs import free_port
from contracts.messages import encode_batch
from contracts.topics import batch_topic
from gateway.batching import BatchBuilder
from ingest.prepare import prepare_item
from ingest.writer import BatchWriter
from tests.plugins.servers import kill_everything_under

pytestmark = pytest.mark.slow

SITE = "hn-hall-pvhcc-vo-chi-cong"
GATEWAY = "gw-backup-1"
DEVICE = "aq-backup-1"
PASSPHRASE = "mật khẩu sao lưu: correct horse battery staple"
READINGS = 500
# A fixed, recent-enough start so every reading is inside ingest's time window.
START_MS = 1_796_000_000_000


@dataclass
class Stack:
    """One embedded stack under its own state directory, driven through the CLI."""

    state_dir: Path
    env: dict[str, str] = field(default_factory=dict)

    def run(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cityhub", *args],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    def ok(self, *args: str) -> str:
        done = self.run(*args)
        assert done.returncode == 0, f"cityhub {' '.join(args)}: {done.stdout}\n{done.stderr}"
        return done.stdout

    @property
    def db_url(self) -> str:
        password = (self.state_dir / "postgres.password").read_text().strip()
        port = self.env["CITYHUB_LOCAL__PG_PORT"]
        return f"postgresql://cityhub:{password}@127.0.0.1:{port}/cityhub"

    @property
    def mqtt_port(self) -> int:
        return int(self.env["CITYHUB_LOCAL__MQTT_PORT"])

    @property
    def admin_password(self) -> str:
        return (self.state_dir / "mosquitto" / "admin.password").read_text().strip()


def new_stack(prefix: str, operator: str) -> Stack:
    state_dir = Path(tempfile.mkdtemp(prefix=prefix))
    state_dir.chmod(0o755)  # the servers' users reach their folders through it
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("CITYHUB_") and key != "PGPASSWORD"
    }
    env.update(
        CITYHUB_LOCAL__STATE_DIR=str(state_dir),
        CITYHUB_LOCAL__PG_PORT=str(free_port()),
        CITYHUB_LOCAL__MQTT_PORT=str(free_port()),
        # Authentication on: a device gets in with its own password or not at all.
        CITYHUB_LOCAL__DEV_MODE="false",
        CITYHUB_OPERATOR=operator,
        COLUMNS="200",
    )
    return Stack(state_dir=state_dir, env=env)


def stop(stack: Stack) -> None:
    stack.run("services", "down")
    kill_everything_under(stack.state_dir)
    shutil.rmtree(stack.state_dir, ignore_errors=True)


def write_readings(url: str) -> None:
    """READINGS air-quality readings of DEVICE through ingest's own writer."""
    builder = BatchBuilder(gateway_id=GATEWAY, boot_id="b1", max_rows=100_000, max_age_ms=60_000)
    for seq in range(READINGS):
        ts_ms = START_MS + seq * 1000
        builder.add(
            device_id=DEVICE,
            device_type="air_quality",
            seq=seq,
            ts_ms=ts_ms,
            recv_ms=ts_ms + 100,
            values={"pm25": 10.0 + seq % 50, "temperature": 25.5},
        )
    now_ms = START_MS + READINGS * 1000
    batch = builder.take(now_ms)
    assert batch is not None
    writer = BatchWriter(url=url, schema="cityhub", worker_id="w0")
    try:
        writer.refresh_owners()
        item = prepare_item(
            batch_topic(GATEWAY),
            encode_batch(batch),
            prefix="",
            now_ms=now_ms,
            owners=writer.owners,
        )
        outcome = writer.commit([item])
    finally:
        writer.close()
    assert outcome.readings == READINGS


def raise_alert(url: str) -> None:
    with (
        AlertStore(url=url, schema="cityhub", job_id="backup-test") as store,
        store.evaluation(START_MS + 60_000) as evaluation,
    ):
        raised = evaluation.apply(
            [
                Raise(
                    rule_id="pm25-high",
                    device_id=DEVICE,
                    site_id=SITE,
                    severity="major",
                    value=59.0,
                    message="PM2.5 cao (high)",
                    ts_ms=START_MS + 60_000,
                )
            ]
        )
    assert raised


def snapshot(url: str) -> dict[str, Any]:
    """What must come back equal: readings per type, alerts, registry and audit rows."""
    with psycopg.connect(url) as conn:
        return {
            "readings": conn.execute(
                "SELECT device_id, seq, ts, pm25 FROM cityhub.readings_air_quality ORDER BY seq"
            ).fetchall(),
            "alerts": conn.execute(
                "SELECT rule_id, device_id, severity, state, value FROM cityhub.alerts"
            ).fetchall(),
            "gateways": conn.execute(
                "SELECT gateway_id, site_id, status FROM cityhub.gateways ORDER BY 1"
            ).fetchall(),
            "devices": conn.execute(
                "SELECT device_id, device_type, gateway_id, status FROM cityhub.devices ORDER BY 1"
            ).fetchall(),
            "credentials": conn.execute(
                "SELECT broker, username FROM cityhub.credentials ORDER BY 1, 2"
            ).fetchall(),
            "audit": conn.execute(
                "SELECT audit_id, ts, operator, action, subject_id, detail "
                "FROM cityhub.audit_log ORDER BY audit_id"
            ).fetchall(),
        }


@dataclass
class Restored:
    source: Stack
    target: Stack
    backup_dir: Path
    settings_file: Path
    settings_text: str
    before: dict[str, Any]
    backup_out: str
    restore_out: str
    bundles: dict[str, dict[str, Any]]
    passphrase_file: Path


@pytest.fixture(scope="module")
def restored(
    pg_bindir: Path, mosquitto_bin: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Restored]:
    """A provisioned source stack, its backup, and a fresh stack restored from it."""
    work = tmp_path_factory.mktemp("backup")
    source = new_stack("cityhub-backup-a-", "Nguyễn Thị Lan")
    target = new_stack("cityhub-backup-b-", "Trần Văn Bình")
    try:
        settings_file = work / "settings" / "cityhub.toml"
        settings_file.parent.mkdir()
        settings_text = 'operator = "Nguyễn Thị Lan"\nlog_level = "WARNING"\n'
        settings_file.write_text(settings_text, encoding="utf-8")
        source.env["CITYHUB_CONFIG"] = str(settings_file)
        for args in (
            ("services", "up"),
            ("db", "migrate"),
            ("db", "seed"),
            ("pki", "init"),
            ("gateways", "add", GATEWAY, "--site", SITE),
            (
                "devices",
                "add",
                DEVICE,
                "--type",
                "air_quality",
                "--site",
                SITE,
                "--gateway",
                GATEWAY,
            ),
        ):
            source.ok(*args)
        write_readings(source.db_url)
        raise_alert(source.db_url)
        bundles = {
            name: json.loads((source.state_dir / "bundles" / f"{name}.json").read_text())
            for name in (f"device-{DEVICE}", f"gateway-{GATEWAY}")
        }
        before = snapshot(source.db_url)
        passphrase_file = work / "passphrase"
        passphrase_file.write_text(PASSPHRASE + "\n", encoding="utf-8")
        backup_dir = work / "backup-1"
        backup_out = source.ok("backup", str(backup_dir), "--passphrase-file", str(passphrase_file))
        # A fresh machine: the settings file is gone with the old one.
        settings_file.unlink()
        target.ok("services", "up")
        restore_out = target.ok(
            "restore", str(backup_dir), "--passphrase-file", str(passphrase_file)
        )
        yield Restored(
            source=source,
            target=target,
            backup_dir=backup_dir,
            settings_file=settings_file,
            settings_text=settings_text,
            before=before,
            backup_out=backup_out,
            restore_out=restore_out,
            bundles=bundles,
            passphrase_file=passphrase_file,
        )
    finally:
        stop(source)
        stop(target)


def mqtt_publish(port: int, broker: dict[str, Any], topic: str | None) -> tuple[int, int | None]:
    """Connect as a bundle's account, publish one QoS 1 message to ``topic`` if given.

    The CONNACK reason code, and the PUBACK's (None when refused or not published).
    """
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=broker["client_id"], protocol=mqtt.MQTTv5
    )
    client.username_pw_set(broker["username"], broker["password"])
    connected = threading.Event()
    acked = threading.Event()
    result: dict[str, Any] = {}

    def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        result["connack"] = reason.value
        connected.set()

    def on_publish(_c: Any, _u: Any, _mid: Any, reason: Any, _p: Any) -> None:
        result["puback"] = reason.value
        acked.set()

    client.on_connect = on_connect
    client.on_publish = on_publish
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        assert connected.wait(10), "no CONNACK"
        if result["connack"] != 0 or topic is None:
            return int(result["connack"]), None
        client.publish(topic, b'{"seq": 1, "ts": 1796000000000, "m": {"pm25": 12.0}}', qos=1)
        assert acked.wait(10), "no PUBACK"
        return 0, int(result["puback"])
    finally:
        client.disconnect()
        client.loop_stop()


def receive_one(port: int, password: str, topic: str, publish: Callable[[], None]) -> bytes:
    """The admin account subscribes to ``topic``, ``publish()`` runs, the message arrives."""
    got: list[bytes] = []
    arrived = threading.Event()
    subscribed = threading.Event()
    admin = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="backup-test-admin")
    admin.username_pw_set(ADMIN_USER, password)
    admin.on_subscribe = lambda *_a: subscribed.set()

    def on_message(_c: Any, _u: Any, message: Any) -> None:
        got.append(message.payload)
        arrived.set()

    admin.on_message = on_message
    admin.on_connect = lambda c, *_a: c.subscribe(topic, qos=1)
    admin.connect("127.0.0.1", port)
    admin.loop_start()
    try:
        assert subscribed.wait(10)
        publish()
        assert arrived.wait(10), f"nothing arrived on {topic}"
    finally:
        admin.disconnect()
        admin.loop_stop()
    return got[0]


def test_restore_on_a_fresh_stack_brings_back_data_accounts_pki_and_settings(
    restored: Restored,
):
    # Every row: readings, alerts, registry, credentials and audit records.
    after = snapshot(restored.target.db_url)
    assert len(restored.before["readings"]) == READINGS
    assert len(restored.before["alerts"]) == 1
    assert after == restored.before
    assert "DIFFERS" not in restored.restore_out
    assert "readings.air_quality" in restored.restore_out

    # The device gets in to the NEW broker with its ORIGINAL bundle's password...
    device = restored.bundles[f"device-{DEVICE}"]["broker"]
    topic = f"d/{DEVICE}/up"
    sent: list[tuple[int, int | None]] = []
    payload = receive_one(
        restored.target.mqtt_port,
        restored.target.admin_password,
        topic,
        lambda: sent.append(mqtt_publish(restored.target.mqtt_port, device, topic)),
    )
    assert sent == [(0, 0)]
    assert b"pm25" in payload
    # ... its ACL came back too (no other device's topic), and a wrong password stays out.
    port = restored.target.mqtt_port
    assert mqtt_publish(port, device, "d/another-device/up") == (0, 135)  # not authorised
    # Mosquitto's dynamic security answers a bad password "not authorised" (135).
    assert mqtt_publish(port, {**device, "password": "sai"}, topic) == (135, None)
    # The gateway's accounts on both brokers (here one broker) work as well.
    gateway = restored.bundles[f"gateway-{GATEWAY}"]
    # 16: accepted, "no matching subscribers" (nobody listens to the state topic here).
    assert mqtt_publish(port, gateway["central"], f"hub/v1/gw/{GATEWAY}/state") == (0, 16)
    assert mqtt_publish(port, gateway["site"], None) == (0, None)

    # The CA came back with its key: the new stack issues a client certificate it signed.
    restored.target.ok("pki", "client", "gw-after-restore")
    pki = restored.target.state_dir / "pki"
    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    issued = x509.load_pem_x509_certificate((pki / "clients" / "gw-after-restore.crt").read_bytes())
    ca_key = ca.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    issued.verify_directly_issued_by(ca)
    assert (pki / "ca.crt").read_bytes() == (
        restored.source.state_dir / "pki" / "ca.crt"
    ).read_bytes()
    assert stat.S_IMODE((pki / "ca.key").stat().st_mode) == 0o600

    # The settings file is back where it was, readable by its owner only.
    assert restored.settings_file.read_text(encoding="utf-8") == restored.settings_text
    assert stat.S_IMODE(restored.settings_file.stat().st_mode) == 0o600

    # A migrate after the restore finds everything in place.
    out = restored.target.ok("db", "migrate")
    assert "0 applied" in out


def test_the_backup_is_private_and_holds_no_key_in_clear(restored: Restored):
    directory = restored.backup_dir
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    files = [p for p in directory.rglob("*") if p.is_file()]
    assert {p.relative_to(directory).as_posix() for p in files} >= {
        "manifest.json",
        "database.dump",
        "broker/dynamic-security.json",
        "pki/ca.crt",
        "pki/ca.key.encrypted",
        "settings/cityhub.toml",
    }
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert b"BEGIN PRIVATE KEY" not in path.read_bytes(), path
        assert b"BEGIN EC PRIVATE KEY" not in path.read_bytes(), path
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["counts"]["readings.air_quality"] == READINGS
    assert manifest["counts"]["alerts"] == 1
    assert manifest["counts"]["devices"] == 1
    assert manifest["counts"]["gateways"] == 1
    assert " readings, 1 alert, 1 device, 1 gateway; " in restored.backup_out
    assert manifest["timescaledb_version"]
    assert manifest["migration"] > 0
    assert manifest["created_at_hanoi"].endswith("+07:00 (Asia/Ho_Chi_Minh)")
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((directory / name).read_bytes()).hexdigest() == digest
    # pg_dump's warnings about TimescaleDB's own catalog are not shown as problems.
    assert "circular" not in restored.backup_out


def test_a_backup_without_passphrase_leaves_the_keys_out_and_says_so(
    restored: Restored, tmp_path: Path
):
    directory = tmp_path / "no-keys"
    done = restored.target.run("backup", str(directory))
    assert done.returncode == 0, done.stderr
    assert "NOT" in done.stderr
    assert "ca.key" in done.stdout
    names = {p.name for p in directory.rglob("*")}
    assert "ca.crt" in names
    assert not any(".key" in name for name in names)
    assert json.loads((directory / "manifest.json").read_text())["keys_encrypted"] is False
    # A second backup into the same directory is refused rather than mixed in.
    again = restored.target.run("backup", str(directory))
    assert again.returncode == 1
    assert "not an empty directory" in again.stderr


def copy_of(restored: Restored, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(restored.backup_dir, copy)
    return copy


def rewrite_manifest(directory: Path, **changes: Any) -> None:
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def refused(restored: Restored, directory: Path, *extra: str) -> str:
    """Restore ``directory`` onto the restored stack with --force: must fail, change nothing."""
    before = snapshot(restored.target.db_url)
    done = restored.target.run(
        "restore", str(directory), "--passphrase-file", str(restored.passphrase_file), *extra
    )
    assert done.returncode == 1, done.stdout
    assert snapshot(restored.target.db_url) == before
    return done.stderr


def test_an_altered_file_is_refused_naming_it(restored: Restored, tmp_path: Path):
    copy = copy_of(restored, tmp_path)
    accounts = copy / "broker" / "dynamic-security.json"
    accounts.write_bytes(accounts.read_bytes().replace(b"device.", b"devicE.", 1))
    err = refused(restored, copy, "--force")
    assert "broker/dynamic-security.json does not match its sha256" in err


def test_a_missing_file_or_manifest_is_refused_naming_it(restored: Restored, tmp_path: Path):
    copy = copy_of(restored, tmp_path)
    (copy / "pki" / "ca.crt").unlink()
    assert "pki/ca.crt is missing" in refused(restored, copy, "--force")
    (copy / "manifest.json").unlink()
    assert "manifest.json is missing" in refused(restored, copy, "--force")


def test_a_manifest_pointing_outside_the_backup_is_refused(restored: Restored, tmp_path: Path):
    copy = copy_of(restored, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    outside = "../../../etc/passwd"
    manifest["files"][outside] = hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert "is not a path inside the backup directory" in refused(restored, copy, "--force")


def test_another_timescaledb_version_is_refused_naming_both(restored: Restored, tmp_path: Path):
    copy = copy_of(restored, tmp_path)
    real = json.loads((copy / "manifest.json").read_text())["timescaledb_version"]
    rewrite_manifest(copy, timescaledb_version="2.99.1")
    err = refused(restored, copy, "--force")
    assert "TimescaleDB 2.99.1" in err
    assert f"TimescaleDB {real}" in err


def test_a_wrong_or_missing_passphrase_is_refused(restored: Restored, tmp_path: Path):
    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase\n")
    before = snapshot(restored.target.db_url)
    done = restored.target.run(
        "restore", str(restored.backup_dir), "--force", "--passphrase-file", str(wrong)
    )
    assert done.returncode == 1
    assert "cannot decrypt pki/ca.key.encrypted: wrong passphrase" in done.stderr
    done = restored.target.run("restore", str(restored.backup_dir), "--force")
    assert done.returncode == 1
    assert "give the passphrase with --passphrase-file" in done.stderr
    assert snapshot(restored.target.db_url) == before


def test_a_database_with_data_is_not_overwritten_without_force(restored: Restored):
    err = refused(restored, restored.backup_dir)
    assert "is not empty" in err
    assert re.search(r"is not empty \(\d+ tables? in schema '\w+'", err), err
    assert "--force" in err


def test_a_truncated_dump_is_a_clear_error(restored: Restored, tmp_path: Path):
    # The dump is cut short but its digest matches (as if it was cut before hashing):
    # pg_restore's own failure must come out plainly, into a scratch database.
    copy = copy_of(restored, tmp_path)
    dump = copy / "database.dump"
    dump.write_bytes(dump.read_bytes()[: dump.stat().st_size // 2])
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["database.dump"] = hashlib.sha256(dump.read_bytes()).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    scratch = restored.target.db_url.rsplit("/", 1)[0] + "/scratch"
    done = restored.target.run(
        "restore",
        str(copy),
        "--passphrase-file",
        str(restored.passphrase_file),
        env={"CITYHUB_DATABASE__URL": scratch},
    )
    assert done.returncode == 1, done.stdout
    assert "pg_restore failed" in done.stderr
    assert "partly restored" in done.stderr
    assert "Traceback" not in done.stderr


def test_missing_client_programs_are_a_clear_error(restored: Restored, tmp_path: Path):
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {"CITYHUB_LOCAL__PG_BINDIR": str(empty), "CITYHUB_DATABASE__URL": restored.target.db_url}
    done = restored.target.run("backup", str(tmp_path / "b"), env=env)
    assert done.returncode == 1
    assert f"pg_dump not found in {empty}" in done.stderr
    done = restored.target.run(
        "restore",
        str(restored.backup_dir),
        "--passphrase-file",
        str(restored.passphrase_file),
        env=env,
    )
    assert done.returncode == 1
    assert f"pg_restore not found in {empty}" in done.stderr


def test_counts_and_dump_agree_while_ingest_keeps_writing(restored: Restored, tmp_path: Path):
    """The manifest's counts come from the dump's own snapshot, not from a moment before it."""
    commits = 0
    stop_writing = threading.Event()

    def keep_writing() -> None:
        nonlocal commits
        writer = BatchWriter(url=restored.source.db_url, schema="cityhub", worker_id="w1")
        try:
            writer.refresh_owners()
            seq = 1_000_000
            while not stop_writing.is_set():
                builder = BatchBuilder(
                    gateway_id=GATEWAY, boot_id=f"live{seq}", max_rows=1000, max_age_ms=60_000
                )
                for _ in range(50):
                    ts_ms = START_MS + seq * 1000
                    builder.add(
                        device_id=DEVICE,
                        device_type="air_quality",
                        seq=seq,
                        ts_ms=ts_ms,
                        recv_ms=ts_ms,
                        values={"pm25": 20.0},
                    )
                    seq += 1
                now_ms = START_MS + seq * 1000
                batch = builder.take(now_ms)
                assert batch is not None
                item = prepare_item(
                    batch_topic(GATEWAY),
                    encode_batch(batch),
                    prefix="",
                    now_ms=now_ms,
                    owners=writer.owners,
                )
                assert writer.commit([item]).readings == 50
                commits += 1
        finally:
            writer.close()

    pool = ThreadPoolExecutor(1, thread_name_prefix="live-ingest")
    writing = pool.submit(keep_writing)
    try:
        directory = tmp_path / "live"
        done = restored.source.run(
            "backup",
            str(directory),
            "--passphrase-file",
            str(restored.passphrase_file),
            env={"CITYHUB_CONFIG": ""},
        )
        assert done.returncode == 0, done.stderr
        after_backup = commits
        while commits < after_backup + 3 and not writing.done():
            threading.Event().wait(0.01)
    finally:
        stop_writing.set()
        pool.shutdown(wait=True)
    writing.result()  # the writer's own failure, if any
    counted = json.loads((directory / "manifest.json").read_text())["counts"]
    with psycopg.connect(restored.source.db_url) as conn:
        row = conn.execute("SELECT count(*) FROM cityhub.readings_air_quality").fetchone()
    assert row is not None
    assert row[0] > counted["readings.air_quality"]  # writes landed after the snapshot
    # Restored into a scratch database: the counts must equal the manifest's exactly.
    scratch = restored.target.db_url.rsplit("/", 1)[0] + "/live"
    done = restored.target.run(
        "restore",
        str(directory),
        "--force",
        "--passphrase-file",
        str(restored.passphrase_file),
        env={"CITYHUB_DATABASE__URL": scratch},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "DIFFERS" not in done.stdout
