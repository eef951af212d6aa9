"""`cityhub backup` / `cityhub restore`: files, pg_dump / pg_restore and the broker's accounts.

A backup is a directory (0700, files 0600) written by ``take_backup``:

    manifest.json                  versions, counts, sha256 of every file (written last)
    database.dump                  pg_dump --format=custom of the whole database
    broker/dynamic-security.json   the broker's accounts, roles and password hashes
    pki/...                        certificates; private keys PKCS#8-encrypted with the
                                   passphrase (``*.key.encrypted``), or left out without one
    settings/{name}                the settings file(s), secrets included

The database follows TimescaleDB's logical backup procedure: ``pg_dump -Fc``
of the database; restore into a new database with ``CREATE EXTENSION
timescaledb`` at the backup's version, ``timescaledb_pre_restore()``,
``pg_restore``, ``timescaledb_post_restore()``. pg_dump's notices about
circular foreign keys in TimescaleDB's catalog tables (``hypertable``,
``chunk``) are expected and only logged: the restore, with its pre/post
calls, loads the catalog correctly.

The dynamic-security file is the only place the password hashes live (the
broker's control API never returns them), so devices and gateways keep
their passwords only if the file itself is restored. The broker rewrites it
at every change: it is read until two reads agree, before and after the
dump, and a change between them is reported.

``restore_backup`` checks the manifest and every file's sha256 before it
changes anything, then the TimescaleDB versions, the passphrase and the
target's emptiness, and only then drops and recreates the database. The
embedded broker is stopped while its file is replaced and started again; a
deployment's broker must be stopped by the operator (the command says so).
Pure checks are in ``cityhub.backup_manifest``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives import serialization

from adapters.database import Connection, database_errors, sql
from cityhub import database
from cityhub.backup_manifest import (
    DUMP_FILE,
    DYNSEC_FILE,
    ENCRYPTED_SUFFIX,
    FORMAT,
    MANIFEST_NAME,
    PKI_DIR,
    SETTINGS_DIR,
    CountRow,
    Manifest,
    check_client_major,
    check_digests,
    check_relative_path,
    check_timescaledb,
    compare_counts,
    created_at,
    database_name,
    decode_manifest,
    encode_manifest,
    split_dump_warnings,
    split_password,
    with_database,
)
from cityhub.localstack.mosquitto import MosquittoServer
from cityhub.localstack.procs import make_owned_dir, write_owned_file
from contracts.catalog import DEVICE_TYPES
from contracts.errors import BackupError
from contracts.schema import check_schema_name, readings_table
from contracts.wording import count_noun

logger = logging.getLogger(__name__)

# Tables whose row counts the manifest records besides each type's readings.
COUNTED_TABLES: Final = (
    "sites",
    "gateways",
    "devices",
    "credentials",
    "alerts",
    "alert_transitions",
    "audit_log",
)
# The broker rewrites its file at each change (a few ms); reads 50 ms apart,
# up to 100 times, give it 5 s to settle before the backup gives up.
STABLE_READ_ATTEMPTS: Final = 100
STABLE_READ_PAUSE_S: Final = 0.05
# Schemas that are PostgreSQL's or TimescaleDB's own: an empty target has only these.
_SYSTEM_SCHEMA_SQL: Final = r"""n.nspname NOT IN ('pg_catalog', 'information_schema')
    AND n.nspname NOT LIKE 'pg\_%' AND n.nspname NOT LIKE '\_timescaledb%'
    AND n.nspname NOT LIKE 'timescaledb\_%'"""

Step = Callable[[str], None]


def cityhub_version() -> str:
    try:
        return metadata.version("cityhub")
    except metadata.PackageNotFoundError:
        return "unknown"


def hash_file(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` (parents 0700) readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    path.chmod(mode)


def read_stable(path: Path) -> bytes:
    """The file's bytes once two reads in a row agree and parse as JSON."""
    previous: bytes | None = None
    for _ in range(STABLE_READ_ATTEMPTS):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BackupError(
                f"the broker's dynamic-security file {path} does not exist: set "
                "provisioning.dynsec_file to the file the broker uses"
            ) from None
        except OSError as exc:
            raise BackupError(f"cannot read the dynamic-security file {path}: {exc}") from exc
        if data == previous:
            try:
                json.loads(data)
            except ValueError:
                pass
            else:
                return data
        previous = data
        time.sleep(STABLE_READ_PAUSE_S)
    raise BackupError(f"{path} kept changing or is not JSON; try again when provisioning is quiet")


def encrypt_key(pem: bytes, passphrase: bytes, name: str) -> bytes:
    """A PEM private key re-encoded as encrypted PKCS#8 (cryptography's best available)."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise BackupError(f"{name} is not an unencrypted PEM private key: {exc}") from exc
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase),
    )


def decrypt_key(data: bytes, passphrase: bytes, name: str) -> bytes:
    """The unencrypted PKCS#8 PEM of an encrypted key from a backup."""
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except (ValueError, TypeError) as exc:
        raise BackupError(
            f"cannot decrypt {name}: wrong passphrase, or the file is damaged ({exc})"
        ) from exc
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# -- the database ------------------------------------------------------------------


@dataclass(frozen=True)
class DatabaseFacts:
    postgresql_version: str
    postgresql_major: int
    timescaledb_version: str
    edition: str
    migration: int


def database_facts(conn: Connection[Any], schema: str) -> DatabaseFacts:
    """Versions of the server and the extension, and the schema's last migration."""
    s = check_schema_name(schema)
    edition = database.detect_edition(conn)
    with database_errors("reading the database's versions", schema=s):
        version, number = conn.execute(
            "SELECT current_setting('server_version'), current_setting('server_version_num')"
        ).fetchone() or ("", "0")
        row = conn.execute(
            "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'"
        ).fetchone()
    if row is None:
        raise BackupError("the database has no TimescaleDB extension: nothing cityhub made in it")
    applied = database.applied_versions(conn, schema=s)
    if not applied:
        raise BackupError(f"schema {s!r} is not migrated: nothing to back up")
    return DatabaseFacts(
        postgresql_version=str(version),
        postgresql_major=int(number) // 10000,
        timescaledb_version=str(row[0]),
        edition=edition.value,
        migration=max(v for v, _, _ in applied),
    )


def row_counts(conn: Connection[Any], schema: str) -> dict[str, int]:
    """Rows of each type's readings table and of the registry and alert tables that exist."""
    s = check_schema_name(schema)
    tables = {f"readings.{name}": readings_table(name) for name in DEVICE_TYPES}
    tables.update({name: name for name in COUNTED_TABLES})
    counts: dict[str, int] = {}
    with database_errors("counting rows", schema=s):
        for label, table in sorted(tables.items()):
            exists = conn.execute("SELECT to_regclass(%s)", (f"{s}.{table}",)).fetchone()
            if exists is None or exists[0] is None:
                continue
            row = conn.execute(
                sql.SQL("SELECT count(*) FROM {}.{}").format(
                    sql.Identifier(s), sql.Identifier(table)
                )
            ).fetchone()
            counts[label] = int(row[0]) if row else 0
    return counts


def _tool(bindir: Path, name: str) -> Path:
    path = bindir / name
    if not path.exists():
        raise BackupError(
            f"{name} not found in {bindir} (PostgreSQL's client programs: Debian package "
            "postgresql-client; local.pg_bindir names another directory)"
        )
    return path


def _tool_major(bindir: Path, name: str) -> int:
    """The PostgreSQL major version of a client program ("pg_restore (PostgreSQL) 15.20")."""
    path = _tool(bindir, name)
    try:
        out = subprocess.run(
            [str(path), "--version"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise BackupError(f"cannot run {path} --version: {exc}") from exc
    match = re.search(r"\)\s*(\d+)", out)
    if match is None:
        raise BackupError(f"cannot read the version of {path}: {out!r}")
    return int(match.group(1))


def _run_tool(
    argv: list[str], *, password: str | None, environ: Mapping[str, str], what: str
) -> list[str]:
    """Run pg_dump / pg_restore; its stderr lines, or BackupError with their tail."""
    env = dict(environ)
    env.pop("PGPASSWORD", None)
    if password is not None:
        env["PGPASSWORD"] = password
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise BackupError(f"{what}: cannot run {argv[0]}: {exc}") from exc
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    if done.returncode != 0:
        tail = "; ".join(lines[-6:]) or f"exit status {done.returncode}"
        raise BackupError(f"{what} failed: {tail}")
    return lines


# -- taking a backup -----------------------------------------------------------------


@dataclass(frozen=True)
class Sources:
    """What a backup reads: the database, the broker's file, the PKI and settings files."""

    database_url: str
    schema: str
    pg_bindir: Path
    dynsec_file: Path
    pki_dir: Path
    settings_files: list[Path]
    environ: Mapping[str, str]


@dataclass(frozen=True)
class BackupReport:
    manifest: Manifest
    directory: Path
    notes: list[str] = field(default_factory=list)
    dump_bytes: int = 0
    dump_s: float = 0.0


def _prepare_directory(target: Path) -> None:
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise BackupError(f"{target} exists and is not an empty directory: name a new one")
    target.mkdir(parents=True, exist_ok=True, mode=0o700)
    target.chmod(0o700)


def _backup_pki(
    pki_dir: Path, target: Path, passphrase: bytes | None, files: dict[str, str]
) -> list[str]:
    """Copy certificates; private keys encrypted, or left out without a passphrase."""
    omitted: list[str] = []
    if not pki_dir.is_dir():
        return [f"no PKI directory at {pki_dir}"]
    for source in sorted(p for p in pki_dir.rglob("*") if p.is_file()):
        relative = f"{PKI_DIR}/{source.relative_to(pki_dir).as_posix()}"
        data = source.read_bytes()
        if source.suffix == ".key":
            if passphrase is None:
                omitted.append(f"{relative} (no --passphrase-file: private keys are left out)")
                continue
            data = encrypt_key(data, passphrase, str(source))
            relative += ENCRYPTED_SUFFIX
        _write_private(target / relative, data)
        files[relative] = hash_file(target / relative)
    return omitted


def _dump_database(
    sources: Sources, dump: Path, step: Step
) -> tuple[DatabaseFacts, dict[str, int], list[str], float]:
    """Versions, row counts and pg_dump, all in one snapshot; pg_dump's stderr and seconds.

    The counts and the dump see one exported snapshot: rows ingest commits
    meanwhile are in neither, so a restore's counts match exactly.
    """
    url, password = split_password(sources.database_url)
    with database.connect(sources.database_url) as conn:
        facts = database_facts(conn, sources.schema)
        with database_errors("exporting a snapshot for pg_dump", refused_as=BackupError):
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            row = conn.execute("SELECT pg_export_snapshot()").fetchone()
        snapshot = str(row[0]) if row else ""
        counts = row_counts(conn, sources.schema)
        step("pg_dump: the database (TimescaleDB's logical backup)")
        started = time.monotonic()
        lines = _run_tool(
            [
                str(_tool(sources.pg_bindir, "pg_dump")),
                "--format=custom",
                "--no-password",
                f"--snapshot={snapshot}",
                f"--file={dump}",
                f"--dbname={url}",
            ],
            password=password,
            environ=sources.environ,
            what="pg_dump",
        )
        dump_s = time.monotonic() - started
        with database_errors("ending the snapshot"):
            conn.execute("COMMIT")
    return facts, counts, lines, dump_s


def take_backup(
    target: Path,
    sources: Sources,
    *,
    passphrase: bytes | None,
    now: datetime,
    step: Step,
) -> BackupReport:
    """Write a complete backup into ``target`` (a new or empty directory); manifest last."""
    _prepare_directory(target)
    files: dict[str, str] = {}
    notes: list[str] = []
    step("reading versions and row counts")
    accounts_before = read_stable(sources.dynsec_file)
    dump = target / DUMP_FILE
    facts, counts, lines, dump_s = _dump_database(sources, dump, step)
    dump.chmod(0o600)
    expected, other = split_dump_warnings(lines)
    for line in expected:
        logger.info("pg_dump (expected with TimescaleDB's catalog): %s", line)
    notes += [f"pg_dump: {line}" for line in other]
    step("sha256 of the dump")
    files[DUMP_FILE] = hash_file(dump)

    step("the broker's accounts (dynamic-security file)")
    accounts = read_stable(sources.dynsec_file)
    if accounts != accounts_before:
        notes.append(
            "broker accounts changed while the database was dumped (someone provisioned): "
            "the file taken after the dump is kept; take another backup when provisioning is "
            "quiet if registry and accounts must match exactly"
        )
    _write_private(target / DYNSEC_FILE, accounts)
    files[DYNSEC_FILE] = hash_file(target / DYNSEC_FILE)

    step("PKI")
    omitted = _backup_pki(sources.pki_dir, target, passphrase, files)

    step("settings")
    settings_paths: dict[str, str] = {}
    for source in sources.settings_files:
        relative = f"{SETTINGS_DIR}/{source.name}"
        check_relative_path(relative)
        if relative in settings_paths:
            raise BackupError(f"two settings files are named {source.name}")
        try:
            _write_private(target / relative, source.read_bytes())
        except OSError as exc:
            raise BackupError(f"cannot read the settings file {source}: {exc}") from exc
        files[relative] = hash_file(target / relative)
        settings_paths[relative] = str(source.resolve())
    if not sources.settings_files:
        omitted.append("settings: none in use (built-in defaults and CITYHUB_* variables)")

    utc, hanoi = created_at(now)
    manifest = Manifest(
        format=FORMAT,
        created_at_utc=utc,
        created_at_hanoi=hanoi,
        cityhub_version=cityhub_version(),
        postgresql_version=facts.postgresql_version,
        postgresql_major=facts.postgresql_major,
        timescaledb_version=facts.timescaledb_version,
        timescaledb_edition=facts.edition,
        database=database_name(sources.database_url),
        schema=sources.schema,
        migration=facts.migration,
        files=files,
        counts=counts,
        keys_encrypted=passphrase is not None,
        omitted=omitted,
        settings_paths=settings_paths,
        dynsec_source=str(sources.dynsec_file),
    )
    _write_private(target / MANIFEST_NAME, encode_manifest(manifest))
    return BackupReport(
        manifest=manifest,
        directory=target,
        notes=notes,
        dump_bytes=dump.stat().st_size,
        dump_s=dump_s,
    )


# -- restoring -----------------------------------------------------------------------


def verify_backup(directory: Path) -> Manifest:
    """The manifest, once every file it lists is present with its sha256; else BackupError."""
    try:
        data = (directory / MANIFEST_NAME).read_bytes()
    except FileNotFoundError:
        raise BackupError(
            f"{directory / MANIFEST_NAME} is missing: not a backup, or one that did not finish"
        ) from None
    except OSError as exc:
        raise BackupError(f"cannot read {directory / MANIFEST_NAME}: {exc}") from exc
    manifest = decode_manifest(data)
    found: dict[str, str | None] = {}
    for name in manifest.files:
        path = directory / name
        found[name] = hash_file(path) if path.is_file() else None
    check_digests(manifest, found)
    return manifest


@dataclass(frozen=True)
class Targets:
    """Where a restore puts things; ``broker`` is the embedded one (None: a deployment's)."""

    database_url: str
    schema: str
    pg_bindir: Path
    dynsec_file: Path
    broker: MosquittoServer | None
    pki_dir: Path
    environ: Mapping[str, str]


@dataclass(frozen=True)
class RestoreReport:
    manifest: Manifest
    counts: list[CountRow]
    notes: list[str] = field(default_factory=list)
    restore_s: float = 0.0


def _decrypted_keys(
    directory: Path, manifest: Manifest, passphrase: bytes | None
) -> dict[str, bytes]:
    """Every PKI file of the backup by its target path relative to the PKI dir, keys decrypted."""
    out: dict[str, bytes] = {}
    prefix = f"{PKI_DIR}/"
    encrypted = [n for n in manifest.files if n.startswith(prefix) and n.endswith(ENCRYPTED_SUFFIX)]
    if encrypted and passphrase is None:
        raise BackupError(
            f"the backup's private keys ({', '.join(sorted(encrypted))}) are encrypted: "
            "give the passphrase with --passphrase-file"
        )
    for name in sorted(manifest.files):
        if not name.startswith(prefix):
            continue
        data = (directory / name).read_bytes()
        relative = name.removeprefix(prefix)
        if name.endswith(ENCRYPTED_SUFFIX) and passphrase is not None:  # None: refused above
            data = decrypt_key(data, passphrase, name)
            relative = relative.removesuffix(ENCRYPTED_SUFFIX)
        out[relative] = data
    return out


def _check_pki_target(pki_dir: Path, files: Mapping[str, bytes], *, force: bool) -> None:
    """A different CA already in the target's PKI dir is kept unless ``force``."""
    current = pki_dir / "ca.crt"
    wanted = files.get("ca.crt")
    if wanted is None or force or not current.exists() or current.read_bytes() == wanted:
        return
    raise BackupError(
        f"{pki_dir} holds another CA than the backup's; certificates it signed would stop "
        "working: restore with --force to replace it"
    )


def _user_tables(conn: Connection[Any]) -> dict[str, int]:
    with database_errors("inspecting the target database"):
        rows = conn.execute(
            f"""SELECT n.nspname, count(*) FROM pg_class c
                JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE c.relkind IN ('r', 'p', 'v', 'm') AND {_SYSTEM_SCHEMA_SQL}
                GROUP BY n.nspname ORDER BY n.nspname"""
        ).fetchall()
    return {str(name): int(n) for name, n in rows}


def _check_target_database(targets: Targets, manifest: Manifest, *, force: bool) -> bool:
    """Check versions and emptiness; True when the target database exists."""
    dbname = database_name(targets.database_url)
    with (
        database.connect(with_database(targets.database_url, "postgres")) as conn,
        database_errors("inspecting the target server"),
    ):
        available = [
            str(r[0])
            for r in conn.execute(
                "SELECT version FROM pg_available_extension_versions WHERE name = 'timescaledb'"
            ).fetchall()
        ]
        row = conn.execute(
            "SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb'"
        ).fetchone()
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone()
    check_timescaledb(manifest.timescaledb_version, available, str(row[0]) if row else None)
    if exists is None:
        return False
    with database.connect(targets.database_url) as conn:
        tables = _user_tables(conn)
    if tables and not force:
        held = ", ".join(
            f"{count_noun(n, 'table', 'tables')} in schema {s!r}" for s, n in tables.items()
        )
        raise BackupError(
            f"database {dbname!r} is not empty ({held}): restore refuses to overwrite "
            "it; --force drops the database and restores the backup into a new one"
        )
    return True


def _restore_database(
    directory: Path, manifest: Manifest, targets: Targets, *, step: Step
) -> list[str]:
    """Recreate the database, then TimescaleDB's pre_restore, pg_restore, post_restore."""
    dbname = database_name(targets.database_url)
    step(f"a new database {dbname!r} with TimescaleDB {manifest.timescaledb_version}")
    with (
        database.connect(with_database(targets.database_url, "postgres")) as conn,
        database_errors(f"recreating database {dbname!r}", refused_as=BackupError),
    ):
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    with (
        database.connect(targets.database_url) as conn,
        database_errors("preparing the restore", refused_as=BackupError),
    ):
        conn.execute(
            sql.SQL("CREATE EXTENSION timescaledb VERSION {}").format(
                sql.Literal(manifest.timescaledb_version)
            )
        )
        conn.execute("SELECT timescaledb_pre_restore()")
    step("pg_restore: the database")
    url, password = split_password(targets.database_url)
    try:
        lines = _run_tool(
            [
                str(_tool(targets.pg_bindir, "pg_restore")),
                "--no-password",
                # Roles are the server's, not the database's: the restoring role
                # owns everything; `cityhub db migrate` makes the service roles'
                # grants again.
                "--no-owner",
                "--no-privileges",
                "--exit-on-error",
                f"--dbname={url}",
                str(directory / DUMP_FILE),
            ],
            password=password,
            environ=targets.environ,
            what="pg_restore",
        )
    except BackupError as exc:
        raise BackupError(
            f"{exc}. Database {dbname!r} is only partly restored (TimescaleDB still in restore "
            "mode): restore an intact backup with --force"
        ) from exc
    with (
        database.connect(targets.database_url) as conn,
        database_errors("finishing the restore", refused_as=BackupError),
    ):
        conn.execute("SELECT timescaledb_post_restore()")
    return [f"pg_restore: {line}" for line in lines]


def _restore_broker(directory: Path, targets: Targets, *, step: Step) -> list[str]:
    """Put the dynamic-security file back; the embedded broker is stopped meanwhile."""
    data = (directory / DYNSEC_FILE).read_text(encoding="utf-8")
    server = targets.broker
    if server is None:
        step(f"broker accounts into {targets.dynsec_file}")
        owner = None
        if targets.dynsec_file.exists():
            info = targets.dynsec_file.stat()
            owner = (info.st_uid, info.st_gid)
        _write_private(targets.dynsec_file, data.encode())
        if owner is not None:
            os.chown(targets.dynsec_file, *owner)
        return [
            (
                f"broker accounts written to {targets.dynsec_file}: the broker must have been "
                "stopped (a running broker overwrites the file at its next change); start it "
                "now (compose: `docker compose start mosquitto`)"
            )
        ]
    running = server.running()
    if running:
        step("stopping the embedded broker")
        server.stop()
    step("broker accounts")
    make_owned_dir(server.base_dir, None, mode=0o755 if server.run_as else 0o700)
    make_owned_dir(server.dynsec_path.parent, server.run_as)
    write_owned_file(server.dynsec_path, data, server.run_as)
    if running:
        step("starting the embedded broker")
        server.start()
        return ["embedded broker restarted with the backup's accounts"]
    return ["embedded broker was stopped: it uses the backup's accounts at `cityhub services up`"]


def _restore_pki(pki_dir: Path, files: Mapping[str, bytes]) -> None:
    pki_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    pki_dir.chmod(0o700)
    for relative, data in files.items():
        check_relative_path(relative)
        mode = 0o600 if relative.endswith(".key") else 0o644
        _write_private(pki_dir / relative, data, mode)


def _restore_settings(directory: Path, manifest: Manifest) -> list[str]:
    """Each settings file back at its path; an existing different file is kept, the copy beside."""
    notes = []
    for relative, original in sorted(manifest.settings_paths.items()):
        data = (directory / relative).read_bytes()
        path = Path(original)
        if path.exists() and path.read_bytes() != data:
            beside = path.with_name(path.name + ".from-backup")
            _write_private(beside, data)
            notes.append(f"{path} exists and differs: kept; the backup's copy is {beside}")
        elif not path.exists():
            _write_private(path, data)
            notes.append(f"settings restored to {path}")
    return notes


def restore_backup(
    directory: Path,
    targets: Targets,
    *,
    passphrase: bytes | None,
    force: bool,
    step: Step,
) -> RestoreReport:
    """Check everything first, then database, broker accounts, PKI, settings; compare counts."""
    step("checking the manifest and every file's sha256")
    manifest = verify_backup(directory)
    check_client_major(
        manifest.postgresql_major,
        _tool_major(targets.pg_bindir, "pg_restore"),
        str(targets.pg_bindir / "pg_restore"),
    )
    pki_files = _decrypted_keys(directory, manifest, passphrase)
    _check_pki_target(targets.pki_dir, pki_files, force=force)
    step("checking the target database")
    _check_target_database(targets, manifest, force=force)
    started = time.monotonic()
    notes = _restore_database(directory, manifest, targets, step=step)
    restore_s = time.monotonic() - started
    notes += _restore_broker(directory, targets, step=step)
    step("PKI")
    _restore_pki(targets.pki_dir, pki_files)
    step("settings")
    notes += _restore_settings(directory, manifest)
    notes += [f"not in the backup: {what}" for what in manifest.omitted]
    if manifest.schema != targets.schema:
        notes.append(
            f"the backup's schema is {manifest.schema!r}, the settings name {targets.schema!r}: "
            f"set database.schema = {manifest.schema!r}"
        )
    step("counting rows")
    with database.connect(targets.database_url) as conn:
        restored = row_counts(conn, manifest.schema)
    return RestoreReport(
        manifest=manifest,
        counts=compare_counts(manifest.counts, restored),
        notes=notes,
        restore_s=restore_s,
    )
