"""A private Mosquitto broker in a directory of its own.

The generated configuration turns authentication on through Mosquitto's
dynamic-security plugin (a generated ``cityhub-admin`` account with full
access, including the plugin's control API), persistence on with a snapshot
every second (AUTOSAVE_INTERVAL below), raises the
queue limits that would otherwise drop QoS 1 messages for a slow subscriber
(MAX_QUEUED_MESSAGES below), and listens on 127.0.0.1 only, optionally with a
second, TLS listener that requires a client certificate (TLS 1.2 with AEAD
ciphers only, or 1.3: TLS12_CIPHERS below), and optionally on
further addresses of this machine (``extra_hosts``, same port; with a TLS
listener, those addresses get the TLS listener only). Dev mode
(``local.dev_mode``) additionally lets anonymous local clients connect; it is
explicit in the config file so nobody mistakes it for production.

The services of the embedded default connect with service accounts, never
the admin one (``devices.dynsec``'s account table): ``ingest.local``,
``sim.local`` and ``monitor.local`` (EMBEDDED_SERVICES), each with a password
generated once and kept in ``{username}.password`` (0600) beside
``admin.password``; ``service_broker`` gives a service its settings.

The plugin keeps its accounts in ``security/dynamic-security.json`` (0600,
owned by the broker's user) and rewrites it at every change; a restart keeps
the accounts that `cityhub devices` and `cityhub gateways` made, and only
the admin account, the service accounts and the dev-mode anonymous group are
rewritten at start.
Per-device and per-gateway accounts are ``devices``' business; this module
only owns the broker process and its base configuration.

With a TLS listener, the plain listener is bound to 127.0.0.1 alone: a
gateway provisioned for TLS reaches the broker from elsewhere only through
the TLS listener, with its client certificate. Its password alone would still
be accepted on the plain listener by a process on this machine: accounts
cannot be tied to a listener here. Mosquitto 2.0's ``per_listener_settings
true`` with one dynamic-security plugin per listener does not separate them
(tried on 2.0.11: the two plugin instances share their accounts, each
listener accepting the other's), and ``use_identity_as_username`` on the TLS
listener skips the plugin's password, disabled-account and client-id checks.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import struct
import time
from dataclasses import dataclass
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
from contracts.errors import LocalServiceError, MissingDependencyError, ServiceStartError
from contracts.settings import BrokerSettings
from devices.dynsec import base_document, service_account, service_username

logger = logging.getLogger(__name__)

ADMIN_USER = "cityhub-admin"
# The service accounts the embedded broker writes at start, instance "local".
EMBEDDED_SERVICES = ("ingest", "sim", "monitor")
EMBEDDED_INSTANCE = "local"

# Where Debian, Ubuntu and a source install put the plugin.
DYNSEC_PLUGIN_GLOBS = (
    "/usr/lib/*/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/*/mosquitto_dynamic_security.so",
)

# Queue limits: the defaults (1000 messages) silently drop QoS 1 messages for
# a slow subscriber; a million 100-reading batches is hours of a city's
# backlog and bounded by max_queued_bytes (1 GiB) in memory.
MAX_QUEUED_MESSAGES = 1_000_000
MAX_QUEUED_BYTES = 1 << 30
# Larger than the biggest batch a gateway may send (contracts' BATCH_MAX_BYTES).
MAX_PACKET_BYTES = 16 << 20
# Persistence. Mosquitto keeps messages in memory and writes whole snapshots;
# a QoS 1 message it PUBACKed since the last snapshot is lost when it is
# killed (-9, power). A snapshot every second (Mosquitto compares whole
# seconds, so up to 2 s apart) bounds that window to the readings of the last
# 2 s, at the cost of writing the queue once a second. Saving after every
# change (autosave_on_changes) would narrow it to about one reading but writes
# the whole queue per message: ~3 MB/s at a site's rate with a 10-minute
# backlog, ten times that at 10x, and quadratic in a burst.
# bench/bench_broker_persistence.py measures both; README ("Broker persistence").
AUTOSAVE_ON_CHANGES = False
AUTOSAVE_INTERVAL = 1

# Every TLS listener the project writes (this module's and the compose
# broker's, deploy/mosquitto/mosquitto-init.py): TLS 1.2 at least (Mosquitto
# 2.0's tls_version is the minimum; 1.3 stays on with OpenSSL's AEAD-only
# suites) and, for TLS 1.2, forward-secret ECDHE key exchange with AEAD
# ciphers only. OpenSSL's default list also offers CBC suites with SHA-1 MACs
# (ECDHE-ECDSA-AES128-SHA, ...), which the cityhub PKI's ECDSA keys would
# otherwise negotiate with an old client. The RSA variants serve a server
# certificate with an RSA key that an operator brings.
TLS_MIN_VERSION = "tlsv1.2"
TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)


def find_dynsec_plugin() -> Path:
    """The dynamic-security plugin's shared object (package mosquitto, since 2.0)."""
    for pattern in DYNSEC_PLUGIN_GLOBS:
        found = sorted(Path("/").glob(pattern.lstrip("/")))
        if found:
            return found[0]
    raise MissingDependencyError(
        "mosquitto_dynamic_security.so not found (Mosquitto >= 2.0 ships it):"
        " run scripts/install-system-deps"
    )


@dataclass(frozen=True)
class TlsListener:
    """A TLS listener that requires a client certificate signed by ``ca_file``."""

    port: int
    ca_file: Path
    cert_file: Path
    key_file: Path
    # The CA's revocation list (``cityhub pki``'s crl.pem); the listener checks
    # client certificates against it when the file exists. None: no check.
    crl_file: Path | None = None


def mqtt_connect_probe(
    port: int,
    *,
    username: str | None,
    password: str | None,
    timeout_s: float = 2.0,
    client_id: str | None = None,
) -> int:
    """Send an MQTT 3.1.1 CONNECT and return the CONNACK return code (0 = accepted).

    A dependency-free readiness check: a listening socket is not yet a broker
    that authenticates.
    """

    def field(data: bytes) -> bytes:
        return struct.pack("!H", len(data)) + data

    flags = 0x02  # clean session
    payload = field((client_id or f"cityhub-probe-{secrets.token_hex(4)}").encode())
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
        tls: TlsListener | None = None,
        autosave_interval: int = AUTOSAVE_INTERVAL,
        autosave_on_changes: bool = AUTOSAVE_ON_CHANGES,
        extra_hosts: tuple[str, ...] = (),
    ) -> None:
        self.base_dir = base_dir
        self.port = port
        self.run_as = run_as
        self.dev_mode = dev_mode
        self.binary = binary
        self.start_timeout_s = start_timeout_s
        self.tls = tls
        self.autosave_interval = autosave_interval
        self.autosave_on_changes = autosave_on_changes
        # Further addresses of this machine to listen on (plain, same port; with
        # a TLS listener, the TLS listener instead: module docstring),
        # e.g. a veth pair's host side that another network namespace reaches.
        self.extra_hosts = extra_hosts

    @property
    def config_path(self) -> Path:
        return self.base_dir / "mosquitto.conf"

    @property
    def dynsec_path(self) -> Path:
        return self.base_dir / "security" / "dynamic-security.json"

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

    def service_broker_username(self, kind: str) -> str:
        """The username of this broker's service account of ``kind`` (EMBEDDED_SERVICES)."""
        return service_username(kind, EMBEDDED_INSTANCE)

    def service_password_path(self, kind: str) -> Path:
        """Where the password of a service account (EMBEDDED_SERVICES) is kept (0600)."""
        return self.base_dir / f"{self.service_broker_username(kind)}.password"

    def service_broker(self, kind: str) -> BrokerSettings:
        """Settings for a service of kind ``kind`` to reach this broker with its own account."""
        path = self.service_password_path(kind)
        try:
            password = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            # A broker started by a version without service accounts.
            raise LocalServiceError(
                f"{path}: {exc.strerror}; restart the embedded broker (`cityhub services down`,"
                " then `cityhub services up`) to create the service accounts"
            ) from exc
        return BrokerSettings(
            host=LOOPBACK,
            port=self.port,
            username=service_username(kind, EMBEDDED_INSTANCE),
            password=password,
            password_file=str(path),
        )

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
        for path in (
            self.admin_password_path,
            *(self.service_password_path(kind) for kind in EMBEDDED_SERVICES),
        ):
            if not path.exists():
                write_owned_file(path, secrets.token_urlsafe(24) + "\n", None)
        plugin = find_dynsec_plugin()
        make_owned_dir(self.dynsec_path.parent, self.run_as)
        existing = None
        if self.dynsec_path.exists():
            try:
                existing = json.loads(self.dynsec_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ServiceStartError(
                    f"{self.dynsec_path} is unreadable ({exc}); fix or remove it"
                ) from exc
        document = base_document(
            existing,
            admin_username=ADMIN_USER,
            admin_password=self.admin_password,
            dev_mode=self.dev_mode,
            services=[
                (
                    service_account(kind, EMBEDDED_INSTANCE),
                    self.service_password_path(kind).read_text(encoding="utf-8").strip(),
                )
                for kind in EMBEDDED_SERVICES
            ],
        )
        write_owned_file(self.dynsec_path, json.dumps(document, indent=1), self.run_as)
        mode = "DEV MODE: anonymous local clients allowed" if self.dev_mode else "authenticated"
        conf = [
            f"# generated by cityhub at every start; {mode}",
            "per_listener_settings false",
            f"allow_anonymous {'true' if self.dev_mode else 'false'}",
            f"plugin {plugin}",
            f"plugin_opt_config_file {self.dynsec_path}",
            "persistence true",
            f"persistence_location {self.base_dir / 'data'}/",
            # Changes (or seconds) between snapshots: AUTOSAVE_ON_CHANGES above.
            f"autosave_on_changes {'true' if self.autosave_on_changes else 'false'}",
            f"autosave_interval {self.autosave_interval}",
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
            # With TLS, the further addresses are the TLS listener's (module docstring).
            *(f"listener {self.port} {host}" for host in self.extra_hosts if self.tls is None),
            *self._tls_config(),
            "",
        ]
        write_owned_file(self.config_path, "\n".join(conf), self.run_as)

    def _tls_config(self) -> list[str]:
        """Copy the TLS files where the broker's user can read them; the listener's lines."""
        if self.tls is None:
            return []
        tls_dir = self.base_dir / "tls"
        make_owned_dir(tls_dir, self.run_as)
        copies = {}
        for name, source in (
            ("ca.crt", self.tls.ca_file),
            ("server.crt", self.tls.cert_file),
            ("server.key", self.tls.key_file),
        ):
            try:
                text = source.read_text(encoding="ascii")
            except OSError as exc:
                raise ServiceStartError(
                    f"TLS listener: cannot read {source} ({exc}); run `cityhub pki init`"
                ) from exc
            copies[name] = tls_dir / name
            write_owned_file(copies[name], text, self.run_as)
        settings = [
            f"cafile {copies['ca.crt']}",
            f"certfile {copies['server.crt']}",
            f"keyfile {copies['server.key']}",
            "require_certificate true",
            f"tls_version {TLS_MIN_VERSION}",
            f"ciphers {TLS12_CIPHERS}",
        ]
        if self._copy_crl():
            settings.append(f"crlfile {self.base_dir / 'tls' / 'crl.pem'}")
        # Each listener takes the settings that follow its line.
        return [
            line
            for host in (LOOPBACK, *self.extra_hosts)
            for line in (f"listener {self.tls.port} {host}", *settings)
        ]

    def _copy_crl(self) -> bool:
        """Copy the CRL beside the other TLS files; False when there is none to use."""
        if self.tls is None or self.tls.crl_file is None:
            return False
        try:
            text = self.tls.crl_file.read_text(encoding="ascii")
        except FileNotFoundError:
            logger.warning(
                "TLS listener: no CRL at %s, client certificates are not checked for"
                " revocation (`cityhub pki crl` writes one)",
                self.tls.crl_file,
            )
            return False
        except OSError as exc:
            raise ServiceStartError(
                f"TLS listener: cannot read {self.tls.crl_file} ({exc})"
            ) from exc
        write_owned_file(self.base_dir / "tls" / "crl.pem", text, self.run_as)
        return True

    def reload_crl(self) -> bool:
        """Hand a new CRL to the running broker: copy it, then SIGHUP (no restart).

        Mosquitto 2.0 reloads its listeners' certificates and CRL on SIGHUP;
        sessions already connected stay (their certificates are not checked
        again: the caller cuts a revoked one through the control API). Returns
        False when the broker is not running or its listener has no CRL line
        (that takes a restart, which writes the config anew).
        """
        pid = self.pid()
        if pid is None or self.tls is None:
            return False
        crl_line = f"crlfile {self.base_dir / 'tls' / 'crl.pem'}"
        try:
            configured = crl_line in self.config_path.read_text(encoding="utf-8").splitlines()
        except OSError:
            return False
        if not configured or not self._copy_crl():
            return False
        os.kill(pid, signal.SIGHUP)
        logger.info("Mosquitto (pid %d): CRL reloaded", pid)
        return True

    def start(self) -> int:
        if (pid := self.pid()) is not None:
            return pid
        require_free_port(self.port, "Mosquitto")
        if self.tls is not None:
            require_free_port(self.tls.port, "Mosquitto (TLS)")
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

    def stop(self, timeout_s: float = 15.0) -> None:
        pid = self.pid()
        if pid is not None:
            stop_process_group(
                pid, first_signal=signal.SIGTERM, timeout_s=timeout_s, what="Mosquitto"
            )
        self.pid_path.unlink(missing_ok=True)

    def running(self) -> bool:
        return self.pid() is not None
