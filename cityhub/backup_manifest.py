"""The manifest of a backup directory, and the checks a restore makes against it (pure).

A backup directory holds ``manifest.json`` and the files it lists, each with
its sha256: the database dump, the broker's dynamic-security file, the PKI
directory (private keys encrypted with a passphrase, or left out), the
settings files. The manifest also records what was backed up (versions of
cityhub, PostgreSQL and TimescaleDB, the schema and its last migration) and
row counts, which a restore prints beside the counts it finds afterwards.

This module encodes and decodes the manifest, checks file digests and
versions, compares counts, and sorts pg_dump's expected warnings from the
others; reading files, hashing them and running
pg_dump are ``cityhub.backup``'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import PurePosixPath
from typing import Final
from urllib.parse import unquote, urlsplit, urlunsplit

import msgspec

from contracts.errors import BackupError

MANIFEST_NAME: Final = "manifest.json"
# Bumped when a field changes meaning; a restore refuses a format it does not know.
FORMAT: Final = 1
# Asia/Ho_Chi_Minh: UTC+07:00 without daylight saving since 1975.
HANOI_TZ: Final = timezone(timedelta(hours=7), "ICT")

DUMP_FILE: Final = "database.dump"
DYNSEC_FILE: Final = "broker/dynamic-security.json"
PKI_DIR: Final = "pki"
SETTINGS_DIR: Final = "settings"
# A private key in the backup is stored PKCS#8-encrypted under this suffix.
ENCRYPTED_SUFFIX: Final = ".encrypted"


class Manifest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    format: int
    created_at_utc: str
    created_at_hanoi: str
    cityhub_version: str
    postgresql_version: str
    postgresql_major: int
    timescaledb_version: str
    timescaledb_edition: str
    database: str
    schema: str
    migration: int
    # Relative path in the backup directory -> sha256 (hex) of its bytes.
    files: dict[str, str]
    # "readings.{type}", "alerts", "devices", ... -> rows at backup time.
    counts: dict[str, int]
    # True: the PKI's private keys are in the backup, encrypted; False: left out.
    keys_encrypted: bool
    # What the backup left out, in words (shown by restore).
    omitted: list[str] = msgspec.field(default_factory=list)
    # settings/{name} -> the path the file had when it was backed up.
    settings_paths: dict[str, str] = msgspec.field(default_factory=dict)
    # Where the dynamic-security file was read from.
    dynsec_source: str = ""


_encoder = msgspec.json.Encoder(order="sorted")
_decoder = msgspec.json.Decoder(Manifest)


def created_at(now: datetime) -> tuple[str, str]:
    """``now`` as ISO 8601 in UTC and on Hanoi's clock (Asia/Ho_Chi_Minh)."""
    return (
        now.astimezone(UTC).isoformat(timespec="seconds"),
        now.astimezone(HANOI_TZ).isoformat(timespec="seconds") + " (Asia/Ho_Chi_Minh)",
    )


def encode_manifest(manifest: Manifest) -> bytes:
    return msgspec.json.format(_encoder.encode(manifest), indent=2) + b"\n"


def check_relative_path(name: str) -> str:
    """``name`` if it is a plain relative path inside the backup directory; else BackupError.

    A manifest is input: one naming ``/etc/shadow`` or ``../x`` must not make
    a restore read or write outside the directory.
    """
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\\" in name or "\0" in name:
        raise BackupError(f"{MANIFEST_NAME}: {name!r} is not a path inside the backup directory")
    return name


def decode_manifest(data: bytes) -> Manifest:
    """The manifest, or BackupError saying what is wrong with it."""
    try:
        manifest = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise BackupError(f"{MANIFEST_NAME} is not a cityhub backup manifest: {exc}") from None
    if manifest.format != FORMAT:
        raise BackupError(
            f"{MANIFEST_NAME}: backup format {manifest.format}, this cityhub reads format {FORMAT}"
        )
    for name in manifest.files:
        check_relative_path(name)
    if DUMP_FILE not in manifest.files:
        raise BackupError(f"{MANIFEST_NAME} lists no {DUMP_FILE}: not a complete backup")
    check_settings_paths(manifest)
    return manifest


def check_settings_paths(manifest: Manifest) -> None:
    """Refuse settings destinations a restore must not write.

    A restore puts each settings file back at its recorded path, so the
    manifest (which anyone who can write the backup can edit) must not make
    it write anywhere else: only absolute ``*.toml`` paths of files the
    backup holds under ``settings/``.
    """
    for relative, original in manifest.settings_paths.items():
        if not relative.startswith(f"{SETTINGS_DIR}/") or relative not in manifest.files:
            raise BackupError(f"{MANIFEST_NAME}: settings entry {relative!r} is not in the backup")
        path = PurePosixPath(original)
        if not path.is_absolute() or path.suffix != ".toml" or ".." in path.parts:
            raise BackupError(
                f"{MANIFEST_NAME}: settings file {relative} would be restored to {original!r}, "
                "which is not an absolute path of a .toml file"
            )


def check_digests(manifest: Manifest, found: Mapping[str, str | None]) -> None:
    """Refuse unless every listed file was ``found`` with the listed sha256 (None: missing).

    The first problem names its file; every missing or altered file is listed.
    """
    missing = sorted(name for name in manifest.files if found.get(name) is None)
    altered = sorted(
        name
        for name, digest in manifest.files.items()
        if found.get(name) is not None and found[name] != digest
    )
    problems = [f"{name} is missing" for name in missing] + [
        f"{name} does not match its sha256 in {MANIFEST_NAME} (altered or damaged)"
        for name in altered
    ]
    if problems:
        raise BackupError(
            "the backup is incomplete or altered, nothing was restored: " + "; ".join(problems)
        )


def check_timescaledb(backup_version: str, available: Sequence[str], default: str | None) -> None:
    """Refuse unless the target server can create the extension at the backup's version.

    TimescaleDB's logical restore needs the same extension version on both
    sides (upgrade after restoring, never during).
    """
    if backup_version in available:
        return
    offered = ", ".join(sorted(available)) or "none"
    raise BackupError(
        f"the backup was made with TimescaleDB {backup_version}; this server offers "
        f"TimescaleDB {default or 'none'} (installable versions: {offered}). Restore on a "
        f"server with TimescaleDB {backup_version} installed, then upgrade with "
        "ALTER EXTENSION timescaledb UPDATE"
    )


def check_client_major(backup_major: int, client_major: int, tool: str) -> None:
    """pg_restore reads archives of its own major version and older ones only."""
    if client_major < backup_major:
        raise BackupError(
            f"the dump comes from PostgreSQL {backup_major}; {tool} here is PostgreSQL "
            f"{client_major}, which cannot read it: install PostgreSQL {backup_major} or newer"
        )


@dataclass(frozen=True)
class CountRow:
    name: str
    backup: int | None
    restored: int | None

    @property
    def equal(self) -> bool:
        return self.backup == self.restored


def compare_counts(backup: Mapping[str, int], restored: Mapping[str, int]) -> list[CountRow]:
    """One row per count of either side, in name order."""
    return [
        CountRow(name=name, backup=backup.get(name), restored=restored.get(name))
        for name in sorted(set(backup) | set(restored))
    ]


# TimescaleDB's catalog tables reference each other; pg_dump warns about each
# (a warning, a "detail:" naming the table, "hint:" lines). Expected: the
# documented procedure restores them with timescaledb_pre_restore() in force.
CATALOG_CYCLE_TABLES: Final = frozenset({"hypertable", "chunk", "continuous_agg"})


def split_dump_warnings(lines: Sequence[str]) -> tuple[list[str], list[str]]:
    """pg_dump's stderr lines as (expected with TimescaleDB's catalog, everything else)."""
    expected: list[str] = []
    other: list[str] = []
    skipping = False
    for index, line in enumerate(lines):
        if "circular foreign-key constraints" in line:
            detail = lines[index + 1] if index + 1 < len(lines) else ""
            skipping = detail.rpartition("detail:")[2].strip() in CATALOG_CYCLE_TABLES
        elif "detail:" not in line and "hint:" not in line:
            skipping = False
        (expected if skipping else other).append(line)
    return expected, other


def split_password(url: str) -> tuple[str, str | None]:
    """A database URL without its password, and the password (percent-decoded).

    The password goes to pg_dump / pg_restore through PGPASSWORD, not on the
    command line, where any local user could read it in the process list.
    A key=value connection string is returned as it is.
    """
    parts = urlsplit(url)
    if not parts.scheme.startswith("postgres") or parts.password is None:
        return url, None
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    netloc = f"{user}@{hosts}" if user else hosts
    return urlunsplit(parts._replace(netloc=netloc)), unquote(parts.password)


def with_database(url: str, dbname: str) -> str:
    """``url`` naming database ``dbname`` instead of its own."""
    parts = urlsplit(url)
    if not parts.scheme.startswith("postgres"):
        raise BackupError("database.url must be a postgresql:// URL for backup and restore")
    return urlunsplit(parts._replace(path=f"/{dbname}"))


def database_name(url: str) -> str:
    """The database a postgresql:// URL names (libpq's default: the user's name)."""
    parts = urlsplit(url)
    name = unquote(parts.path.lstrip("/"))
    return name or unquote(parts.username or "")
