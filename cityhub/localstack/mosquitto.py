"""A private Mosquitto broker in a directory of its own.

The generated configuration turns authentication on (a password file with a
generated ``cityhub-admin`` account and an ACL file), persistence on, raises
the queue limits that would otherwise drop QoS 1 messages for a slow
subscriber (DESIGN.md section 4), and listens on 127.0.0.1 only. Dev mode
(``local.dev_mode``) additionally lets anonymous local clients connect; it is
explicit in the config file so nobody mistakes it for production.

Per-device and per-gateway credentials are the registry's business; this
module only owns the broker process and its base configuration.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import secrets
import signal
import socket
import struct
import time
from pathlib import Path

from cityhub.localstack.procs import (
    LOOPBACK,
    RunAs,
    check_reachable,
    make_owned_dir,
    pid_alive,
    pid_runs,
    require_free_port,
    spawn_daemon,
    stop_process_group,
    with_log_tail,
    write_owned_file,
)
from contracts.errors import ServiceStartError

logger = logging.getLogger(__name__)

ADMIN_USER = "cityhub-admin"

# Mosquitto 2.0's password hash: PBKDF2-HMAC-SHA512, 12-byte salt, 101
# iterations (mosquitto_passwd's defaults), written as $7$iter$salt$hash.
_PW_ITERATIONS = 101
_PW_SALT_BYTES = 12

# Queue limits: the defaults (1000 messages) silently drop QoS 1 messages for
# a slow subscriber; a million 100-reading batches is hours of a city's
# backlog and bounded by max_queued_bytes (1 GiB) in memory.
MAX_QUEUED_MESSAGES = 1_000_000
MAX_QUEUED_BYTES = 1 << 30
# Larger than the biggest batch a gateway may send (contracts' BATCH_MAX_BYTES).
MAX_PACKET_BYTES = 16 << 20


def hash_password(password: str, salt: bytes | None = None) -> str:
    """A password-file line's hash part, as mosquitto_passwd writes it."""
    salt = salt if salt is not None else secrets.token_bytes(_PW_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _PW_ITERATIONS)
    b64 = base64.b64encode
    return f"$7${_PW_ITERATIONS}${b64(salt).decode()}${b64(digest).decode()}"


def mqtt_connect_probe(
    port: int, *, username: str | None, password: str | None, timeout_s: float = 2.0
) -> int:
    """Send an MQTT 3.1.1 CONNECT and return the CONNACK return code (0 = accepted).

    A dependency-free readiness check: a listening socket is not yet a broker
    that authenticates.
    """

    def field(data: bytes) -> bytes:
        return struct.pack("!H", len(data)) + data

    flags = 0x02  # clean session
    payload = field(b"cityhub-probe-" + secrets.token_hex(4).encode())
    if username is not None:
        flags |= 0x80
        payload += field(username.encode())
        if password is not None:
            flags |= 0x40
            payload += field(password.encode())
    variable = field(b"MQTT") + bytes([4, flags]) + struct.pack("!H", 10)
    body = variable + payload
    remaining = b""
    length = len(body)
    while True:
        byte, length = length % 128, length // 128
        remaining += bytes([byte | (0x80 if length else 0)])
        if not length:
            break
    with socket.create_connection((LOOPBACK, port), timeout=timeout_s) as sock:
        sock.sendall(b"\x10" + remaining + body)
        connack = b""
        while len(connack) < 4:
            chunk = sock.recv(4 - len(connack))
            if not chunk:
                raise ConnectionError("broker closed the connection before CONNACK")
            connack += chunk
        sock.sendall(b"\xe0\x00")  # DISCONNECT
    if connack[0] != 0x20:
        raise ConnectionError(f"unexpected reply to CONNECT: {connack!r}")
    return connack[3]


class MosquittoServer:
    """One private broker under ``base_dir`` (config, password/ACL files, persistence)."""

    def __init__(
        self,
        *,
        base_dir: Path,
        port: int,
        run_as: RunAs | None,
        dev_mode: bool,
        binary: str = "mosquitto",
        start_timeout_s: float = 30.0,
    ) -> None:
        self.base_dir = base_dir
        self.port = port
        self.run_as = run_as
        self.dev_mode = dev_mode
        self.binary = binary
        self.start_timeout_s = start_timeout_s

    @property
    def config_path(self) -> Path:
        return self.base_dir / "mosquitto.conf"

    @property
    def passwd_path(self) -> Path:
        return self.base_dir / "passwd"

    @property
    def acl_path(self) -> Path:
        return self.base_dir / "acl"

    @property
    def admin_password_path(self) -> Path:
        return self.base_dir / "admin.password"

    @property
    def pid_path(self) -> Path:
        return self.base_dir / "mosquitto.pid"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "mosquitto.log"

    @property
    def admin_password(self) -> str:
        return self.admin_password_path.read_text(encoding="utf-8").strip()

    def url(self, *, with_password: bool = True) -> str:
        secret = self.admin_password if with_password else "***"
        return f"mqtt://{ADMIN_USER}:{secret}@{LOOPBACK}:{self.port}"

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid_runs(pid, Path(self.binary).name) else None

    def write_config(self) -> None:
        """(Re)write config, password and ACL files; keep the admin password once made."""
        check_reachable(self.base_dir.parent, self.run_as)
        make_owned_dir(self.base_dir, None, mode=0o755 if self.run_as else 0o700)
        make_owned_dir(self.base_dir / "data", self.run_as)
        if not self.admin_password_path.exists():
            write_owned_file(self.admin_password_path, secrets.token_urlsafe(24) + "\n", None)
        write_owned_file(
            self.passwd_path, f"{ADMIN_USER}:{hash_password(self.admin_password)}\n", self.run_as
        )
        acl = [
            "# generated by cityhub",
            "# Lines before the first 'user' apply to anonymous clients, which only",
            "# dev mode admits (allow_anonymous below).",
            "topic readwrite #",
            f"user {ADMIN_USER}",
            "topic readwrite #",
            "topic read $SYS/#",
        ]
        write_owned_file(self.acl_path, "\n".join(acl) + "\n", self.run_as)
        mode = "DEV MODE: anonymous local clients allowed" if self.dev_mode else "authenticated"
        conf = [
            f"# generated by cityhub at every start; {mode}",
            "per_listener_settings false",
            f"allow_anonymous {'true' if self.dev_mode else 'false'}",
            f"password_file {self.passwd_path}",
            f"acl_file {self.acl_path}",
            "persistence true",
            f"persistence_location {self.base_dir / 'data'}/",
            # Seconds between snapshots; the outbox + ack protocol covers the gap.
            "autosave_interval 10",
            f"max_queued_messages {MAX_QUEUED_MESSAGES}",
            f"max_queued_bytes {MAX_QUEUED_BYTES}",
            # QoS 1 messages in flight to one client: the default 20 (100 before)
            # held a draining gateway to 8.3k msgs/s here; 1000 gave 8.8-10k.
            "max_inflight_messages 1000",
            f"max_packet_size {MAX_PACKET_BYTES}",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            f"listener {self.port} {LOOPBACK}",
            "",
        ]
        write_owned_file(self.config_path, "\n".join(conf), self.run_as)

    def start(self) -> int:
        if (pid := self.pid()) is not None:
            return pid
        require_free_port(self.port, "Mosquitto")
        self.write_config()
        pid = spawn_daemon(
            [self.binary, "-c", str(self.config_path)],
            self.run_as,
            log_path=self.log_path,
            cwd=self.base_dir,
        )
        write_owned_file(self.pid_path, f"{pid}\n", None, mode=0o644)
        self.wait_ready(pid)
        logger.info("Mosquitto up on port %d (pid %d)", self.port, pid)
        return pid

    def wait_ready(self, pid: int) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                raise ServiceStartError(self._failure("Mosquitto exited during start"))
            try:
                code = mqtt_connect_probe(
                    self.port, username=ADMIN_USER, password=self.admin_password
                )
            except OSError:
                time.sleep(0.05)
                continue
            if code != 0:
                raise ServiceStartError(
                    self._failure(f"Mosquitto refused the admin account (CONNACK {code})")
                )
            return
        raise ServiceStartError(self._failure(f"Mosquitto did not answer on port {self.port}"))

    def _failure(self, what: str) -> str:
        return with_log_tail(what, self.log_path)

    def reload(self) -> None:
        """Re-read password and ACL files without a restart (SIGHUP)."""
        pid = self.pid()
        if pid is not None:
            import os

            os.kill(pid, signal.SIGHUP)

    def stop(self, timeout_s: float = 15.0) -> None:
        pid = self.pid()
        if pid is not None:
            stop_process_group(
                pid, first_signal=signal.SIGTERM, timeout_s=timeout_s, what="Mosquitto"
            )
        self.pid_path.unlink(missing_ok=True)

    def running(self) -> bool:
        return self.pid() is not None
