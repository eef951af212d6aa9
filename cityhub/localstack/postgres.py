"""A private PostgreSQL server with TimescaleDB preloaded, in a directory of its own.

``PostgresServer`` runs initdb once, writes its settings into ``cityhub.conf``
(included from postgresql.conf, rewritten at every start so ports can change),
starts the postmaster detached, waits until it accepts connections and
creates the application database. Migrations are left to ``cityhub db``.

Clients connect over TCP on 127.0.0.1 (and on ``extra_listen`` addresses,
from their networks) with a generated password (scram-sha-256); the Unix
socket inside the server's 0700 directory is trusted for its owner only.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import secrets
import signal
import subprocess
import time
from pathlib import Path

from adapters.database import connect, sql
from cityhub.localstack.procs import (
    LOOPBACK,
    RunAs,
    check_reachable,
    make_owned_dir,
    pid_alive,
    pid_runs,
    require_free_port,
    run_checked,
    spawn_daemon,
    stop_process_group,
    with_log_tail,
    write_owned_file,
)
from contracts.errors import DatabaseUnavailableError, MissingDependencyError, ServiceStartError

logger = logging.getLogger(__name__)

DB_USER = "cityhub"
DB_NAME = "cityhub"
MIN_PG_MAJOR = 15
# Lines of pg_hba.conf below this one are cityhub's, rewritten at every start.
_HBA_MARKER = "# cityhub: extra listeners (rewritten at every start)"


def find_pg_bindir(configured: str = "") -> Path:
    """The bin directory of a PostgreSQL >= 15 that has TimescaleDB installed.

    Debian and Ubuntu install each major version under /usr/lib/postgresql/N;
    the newest one with the extension wins.
    """
    candidates = (
        [Path(configured)]
        if configured
        else sorted(
            Path("/usr/lib/postgresql").glob("*/bin"),
            key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
            reverse=True,
        )
    )
    seen: list[str] = []
    for bindir in candidates:
        if not (bindir / "postgres").exists():
            seen.append(f"{bindir}: no postgres binary")
            continue
        major = pg_major(bindir)
        if major < MIN_PG_MAJOR:
            seen.append(f"{bindir}: PostgreSQL {major} is older than {MIN_PG_MAJOR}")
            continue
        if not timescaledb_installed(bindir, major):
            seen.append(f"{bindir}: TimescaleDB extension not installed")
            continue
        return bindir
    detail = "; ".join(seen) or "no PostgreSQL under /usr/lib/postgresql"
    raise MissingDependencyError(
        f"no usable PostgreSQL with TimescaleDB ({detail}); run scripts/install-system-deps"
    )


def pg_major(bindir: Path) -> int:
    out = subprocess.run(
        [str(bindir / "postgres"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"(\d+)(?:\.\d+)?", out)
    if match is None:
        raise MissingDependencyError(f"cannot read the version of {bindir / 'postgres'}: {out!r}")
    return int(match.group(1))


def timescaledb_installed(bindir: Path, major: int) -> bool:
    pg_config = bindir / "pg_config"
    if pg_config.exists():
        sharedir = subprocess.run(
            [str(pg_config), "--sharedir"], capture_output=True, text=True, check=True
        ).stdout.strip()
    else:
        sharedir = f"/usr/share/postgresql/{major}"
    return (Path(sharedir) / "extension" / "timescaledb.control").exists()


class PostgresServer:
    """One private PostgreSQL cluster under ``base_dir`` (data, socket, log)."""

    def __init__(
        self,
        *,
        base_dir: Path,
        port: int,
        bindir: Path,
        run_as: RunAs | None,
        password_file: Path,
        durable: bool = True,
        start_timeout_s: float = 60.0,
        extra_listen: tuple[str, ...] = (),
    ) -> None:
        self.base_dir = base_dir
        self.port = port
        self.bindir = bindir
        self.run_as = run_as
        self.password_file = password_file
        # durable=False turns fsync off: a killed server still loses nothing
        # (the OS keeps the page cache), only a machine crash would. Tests use it.
        self.durable = durable
        self.start_timeout_s = start_timeout_s
        # Further addresses of this machine to listen on, as interfaces
        # ("10.203.5.1/30": the address and the network whose clients may log
        # in over it with a password), e.g. a veth pair's host side.
        self.extra_listen = tuple(ipaddress.IPv4Interface(i) for i in extra_listen)

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base_dir / "run"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "postgres.log"

    @property
    def password(self) -> str:
        return self.password_file.read_text(encoding="utf-8").strip()

    def url(self, dbname: str = DB_NAME, *, with_password: bool = True) -> str:
        secret = self.password if with_password else "***"
        return f"postgresql://{DB_USER}:{secret}@{LOOPBACK}:{self.port}/{dbname}"

    def pid(self) -> int | None:
        """The running postmaster's pid, or None (a stale postmaster.pid counts as none)."""
        pidfile = self.data_dir / "postmaster.pid"
        try:
            first = pidfile.read_text().splitlines()[0]
        except (OSError, IndexError):
            return None
        pid = int(first) if first.strip().isdigit() else 0
        return pid if pid and pid_runs(pid, "postgres") else None

    def initialised(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def init(self) -> None:
        """initdb once: UTF-8, C.UTF-8 collation, superuser ``cityhub``, generated password."""
        check_reachable(self.base_dir.parent, self.run_as)
        make_owned_dir(self.base_dir, self.run_as)
        make_owned_dir(self.socket_dir, self.run_as)
        if self.initialised():
            return
        if not self.password_file.exists():
            write_owned_file(self.password_file, secrets.token_urlsafe(24) + "\n", None)
        pwfile = self.base_dir / "initdb.pw"
        write_owned_file(pwfile, self.password + "\n", self.run_as)
        argv = [
            str(self.bindir / "initdb"),
            "--pgdata",
            str(self.data_dir),
            "--username",
            DB_USER,
            "--pwfile",
            str(pwfile),
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C.UTF-8",
        ]
        if not self.durable:
            argv.append("--no-sync")
        try:
            logger.info("initdb %s", self.data_dir)
            run_checked(argv, self.run_as, what="initdb")
        finally:
            pwfile.unlink(missing_ok=True)
        conf = self.data_dir / "postgresql.conf"
        with conf.open("a", encoding="utf-8") as handle:
            handle.write("\ninclude_if_exists = 'cityhub.conf'\n")

    def _write_conf(self) -> None:
        lines = {
            "port": str(self.port),
            "listen_addresses": "'" + ",".join([LOOPBACK, *self._extra_addresses()]) + "'",
            "unix_socket_directories": f"'{self.socket_dir}'",
            "shared_preload_libraries": "'timescaledb'",
            "timescaledb.telemetry_level": "off",
            # Ingest workers, the alert job, the boards and tests share one server.
            "max_connections": "200",
            "fsync": "on" if self.durable else "off",
            "full_page_writes": "on" if self.durable else "off",
            "logging_collector": "off",
            "log_min_messages": "warning",
            "timezone": "'UTC'",
        }
        text = "# written by cityhub at every start\n" + "".join(
            f"{key} = {value}\n" for key, value in lines.items()
        )
        write_owned_file(self.data_dir / "cityhub.conf", text, self.run_as)
        self._write_hba()

    def _extra_addresses(self) -> list[str]:
        return [str(interface.ip) for interface in self.extra_listen]

    def _write_hba(self) -> None:
        """initdb's pg_hba.conf plus password logins from the extra listeners' networks.

        PostgreSQL 15 has no include in pg_hba.conf, so the lines below a
        marker are rewritten at every start.
        """
        path = self.data_dir / "pg_hba.conf"
        kept = path.read_text(encoding="utf-8").split(_HBA_MARKER)[0].rstrip("\n")
        lines = [f"host all all {i.network} scram-sha-256" for i in self.extra_listen]
        text = kept + "\n" + (f"{_HBA_MARKER}\n" + "\n".join(lines) + "\n" if lines else "")
        if text != path.read_text(encoding="utf-8"):
            write_owned_file(path, text, self.run_as, mode=0o600)

    def start(self) -> int:
        """Start the postmaster (initdb first if needed) and wait until it answers."""
        if (pid := self.pid()) is not None:
            return pid
        require_free_port(self.port, "PostgreSQL")
        self._remove_stale_lock()
        self.init()
        self._write_conf()
        spawned = spawn_daemon(
            [str(self.bindir / "postgres"), "-D", str(self.data_dir)],
            self.run_as,
            log_path=self.log_path,
            cwd=self.base_dir,
        )
        self.wait_ready(spawned)
        self.create_database()
        pid = self.pid()
        if pid is None:
            raise ServiceStartError(self._failure("PostgreSQL exited after start"))
        logger.info("PostgreSQL up on port %d (pid %d)", self.port, pid)
        return pid

    def _remove_stale_lock(self) -> None:
        """Drop lock files left by a killed server whose pid is dead or a zombie.

        PostgreSQL itself only checks that the pid in postmaster.pid (and in the
        socket's lock file) exists, so a killed postmaster that is not yet
        reaped would block the restart. Its shared-memory check still protects
        against backends that outlived the postmaster.
        """
        if self.pid() is not None:
            return
        locks = [self.data_dir / "postmaster.pid", *self.socket_dir.glob(".s.PGSQL.*.lock")]
        for lock in locks:
            if lock.exists():
                logger.warning("removing stale lock file %s", lock)
                lock.unlink()

    def _failure(self, what: str) -> str:
        return with_log_tail(what, self.log_path)

    def wait_ready(self, spawned_pid: int) -> None:
        """Poll until a connection succeeds; fail at once if the postmaster died."""
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            try:
                with connect(self.url("postgres"), timeout_s=2):
                    return
            except DatabaseUnavailableError:
                if not pid_alive(spawned_pid):
                    raise ServiceStartError(
                        self._failure("PostgreSQL exited during start")
                    ) from None
            time.sleep(0.1)
        raise ServiceStartError(self._failure(f"PostgreSQL did not answer on port {self.port}"))

    def create_database(self, dbname: str = DB_NAME) -> None:
        with connect(self.url("postgres")) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,))
            if exists.fetchone() is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))

    def stop(self, timeout_s: float = 30.0) -> None:
        """Fast shutdown (SIGINT: roll back sessions, checkpoint), SIGKILL if it hangs."""
        pid = self.pid()
        if pid is None:
            return
        stop_process_group(pid, first_signal=signal.SIGINT, timeout_s=timeout_s, what="PostgreSQL")

    def running(self) -> bool:
        pid = self.pid()
        return pid is not None and pid_alive(pid)

    def clone_from(self, primary: PostgresServer) -> None:
        """Make this (not yet initialised) server a streaming replica of ``primary``.

        ``pg_basebackup -R`` copies the primary's data directory, with its
        ``cityhub.conf``, which ``start`` rewrites with this server's own
        settings, and writes ``standby.signal`` and ``primary_conninfo``.
        initdb's pg_hba.conf already lets the superuser replicate over
        127.0.0.1, and PostgreSQL's defaults (wal_level replica,
        max_wal_senders 10) are enough for a replica. Both servers must share
        ``password_file``: the copy has the primary's accounts.
        """
        check_reachable(self.base_dir.parent, self.run_as)
        make_owned_dir(self.base_dir, self.run_as)
        make_owned_dir(self.socket_dir, self.run_as)
        if self.initialised():
            raise ServiceStartError(f"{self.data_dir} is initialised already: not a new replica")
        argv = [
            str(self.bindir / "pg_basebackup"),
            "--pgdata",
            str(self.data_dir),
            "--dbname",
            primary.url("postgres"),
            "--write-recovery-conf",
            "--wal-method=stream",
            "--checkpoint=fast",
        ]
        if not self.durable:
            argv.append("--no-sync")
        logger.info("pg_basebackup from port %d into %s", primary.port, self.data_dir)
        run_checked(argv, self.run_as, what="pg_basebackup")

    def promote(self, timeout_s: float = 30.0) -> None:
        """Promote this replica to a primary and wait until it accepts writes."""
        with connect(self.url("postgres"), timeout_s=2) as conn:
            row = conn.execute(
                "SELECT pg_promote(wait => true, wait_seconds => %s)", (round(timeout_s),)
            ).fetchone()
        if row is None or not row[0]:
            raise ServiceStartError(self._failure(f"PostgreSQL on port {self.port} not promoted"))
        logger.info("PostgreSQL on port %d promoted to primary", self.port)
