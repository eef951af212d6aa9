"""The embedded default: a private broker and database under one state directory.

Layout of the state directory (``local.state_dir``)::

    stack.json            ports in use, written at `up` (0600)
    postgres.password     generated database password (0600)
    postgres/             the cluster, owned by the user PostgreSQL runs as
    mosquitto/            broker config, dynamic-security accounts, persistence, log
    pki/                  CA and certificates from `cityhub pki` (the TLS listener's)
    alertmanager/         `cityhub up`'s Alertmanager: config, templates, storage, log
                          (cityhub/localstack/alertmanager.py; `up` starts and stops it)

``up`` is idempotent (a running server is left alone, a stale pid file from a
killed server is ignored), ``down`` stops both and leaves no process behind.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from cityhub.localstack.mosquitto import MosquittoServer, TlsListener
from cityhub.localstack.postgres import PostgresServer, find_pg_bindir
from cityhub.localstack.procs import make_owned_dir, run_as_for, write_owned_file
from contracts.errors import LocalServiceError
from contracts.settings import LocalSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    running: bool
    pid: int | None
    port: int
    url: str  # password masked
    log: Path


class LocalStack:
    def __init__(
        self,
        *,
        state_dir: Path,
        local: LocalSettings,
        is_root: bool,
        durable: bool = True,
        pki_dir: Path | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.pki_dir = pki_dir or state_dir / "pki"
        self.local = local
        self.is_root = is_root
        self.durable = durable
        recorded = self._recorded_ports()
        self.pg_port = recorded.get("postgres", local.pg_port)
        self.mqtt_port = recorded.get("mosquitto", local.mqtt_port)

    @property
    def stack_file(self) -> Path:
        return self.state_dir / "stack.json"

    def _recorded_ports(self) -> dict[str, int]:
        try:
            data = json.loads(self.stack_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return {k: int(v) for k, v in data.get("ports", {}).items()}

    def postgres(self) -> PostgresServer:
        return PostgresServer(
            base_dir=self.state_dir / "postgres",
            port=self.pg_port,
            bindir=find_pg_bindir(self.local.pg_bindir),
            run_as=run_as_for("postgres", is_root=self.is_root),
            password_file=self.state_dir / "postgres.password",
            durable=self.durable,
            start_timeout_s=self.local.start_timeout_s,
        )

    def mosquitto(self) -> MosquittoServer:
        tls = None
        if self.local.mqtt_tls_port:
            tls = TlsListener(
                port=self.local.mqtt_tls_port,
                ca_file=self.pki_dir / "ca.crt",
                cert_file=self.pki_dir / "server.crt",
                key_file=self.pki_dir / "server.key",
                crl_file=self.pki_dir / "crl.pem",
            )
        return MosquittoServer(
            tls=tls,
            base_dir=self.state_dir / "mosquitto",
            port=self.mqtt_port,
            run_as=run_as_for("mosquitto", is_root=self.is_root),
            dev_mode=self.local.dev_mode,
            binary=self.local.mosquitto_bin,
            start_timeout_s=self.local.start_timeout_s,
        )

    def up(self) -> list[ServiceStatus]:
        """Start whatever is not running; on failure stop what this call started."""
        # Root keeps the state dir traversable so the servers' users reach their folders.
        make_owned_dir(self.state_dir, None, mode=0o755 if self.is_root else 0o700)
        if not (self.postgres().running() or self.mosquitto().running()):
            # Nothing runs: take the configured ports, not ones recorded by an earlier run.
            self.pg_port, self.mqtt_port = self.local.pg_port, self.local.mqtt_port
        write_owned_file(
            self.stack_file,
            json.dumps({"ports": {"postgres": self.pg_port, "mosquitto": self.mqtt_port}}),
            None,
        )
        started: list[PostgresServer | MosquittoServer] = []
        try:
            for server in (self.postgres(), self.mosquitto()):
                if not server.running():
                    server.start()
                    started.append(server)
        except BaseException:
            for server in reversed(started):
                server.stop()
            raise
        return self.status()

    def down(self) -> list[ServiceStatus]:
        errors: list[str] = []
        for server in (self.mosquitto(), self.postgres()):
            try:
                server.stop()
            except LocalServiceError as exc:
                errors.append(str(exc))
        if errors:
            raise LocalServiceError("; ".join(errors))
        return self.status()

    def status(self) -> list[ServiceStatus]:
        pg, mq = self.postgres(), self.mosquitto()
        pg_pid, mq_pid = pg.pid(), mq.pid()
        return [
            ServiceStatus(
                name="postgres",
                running=pg_pid is not None,
                pid=pg_pid,
                port=pg.port,
                url=pg.url(with_password=False),
                log=pg.log_path,
            ),
            ServiceStatus(
                name="mosquitto",
                running=mq_pid is not None,
                pid=mq_pid,
                port=mq.port,
                url=mq.url(with_password=False),
                log=mq.log_path,
            ),
        ]

    def database_url(self) -> str:
        pg = self.postgres()
        if not pg.running():
            raise LocalServiceError(
                f"the embedded database in {self.state_dir} is not running and no "
                "database.url is set: run `cityhub services up` or set CITYHUB_DATABASE__URL"
            )
        return pg.url()

    def broker_url(self) -> str:
        mq = self.mosquitto()
        if not mq.running():
            raise LocalServiceError(
                f"the embedded broker in {self.state_dir} is not running and no broker.host "
                "is set: run `cityhub services up`"
            )
        return mq.url()
