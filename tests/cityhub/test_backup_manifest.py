"""The backup manifest's pure checks: paths, digests, versions, URLs, pg_dump's warnings."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from cityhub.backup_manifest import (
    FORMAT,
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
from contracts.errors import BackupError


def manifest(**changes: object) -> Manifest:
    base = Manifest(
        format=FORMAT,
        created_at_utc="2026-12-06T15:00:00+00:00",
        created_at_hanoi="2026-12-06T22:00:00+07:00 (Asia/Ho_Chi_Minh)",
        cityhub_version="0.1.0",
        postgresql_version="15.20",
        postgresql_major=15,
        timescaledb_version="2.19.3",
        timescaledb_edition="apache",
        database="cityhub",
        schema="cityhub",
        migration=19,
        files={"database.dump": "aa", "pki/ca.crt": "bb"},
        counts={"devices": 1},
        keys_encrypted=True,
    )
    return msgspec.structs.replace(base, **changes)


def test_manifest_round_trips_and_shows_both_clocks():
    utc, hanoi = created_at(datetime(2026, 12, 6, 15, 30, tzinfo=UTC))
    assert utc == "2026-12-06T15:30:00+00:00"
    assert hanoi == "2026-12-06T22:30:00+07:00 (Asia/Ho_Chi_Minh)"
    m = manifest()
    assert decode_manifest(encode_manifest(m)) == m


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"", "not a cityhub backup manifest"),
        (b"[]", "not a cityhub backup manifest"),
        (b'{"format": 1}', "not a cityhub backup manifest"),
        (encode_manifest(manifest(format=FORMAT + 1)), f"backup format {FORMAT + 1}"),
        (encode_manifest(manifest(files={"pki/ca.crt": "bb"})), "lists no database.dump"),
        (encode_manifest(manifest(files={"database.dump": "a", "../x": "b"})), "'../x'"),
        (encode_manifest(manifest(files={"database.dump": "a", "/etc/shadow": "b"})), "shadow"),
    ],
)
def test_a_bad_or_hostile_manifest_is_refused(data: bytes, says: str):
    with pytest.raises(BackupError) as info:
        decode_manifest(data)
    assert says in str(info.value)


@pytest.mark.parametrize("name", ["", "/abs", "a/../../b", "..", "a\\b", "a\0b"])
def test_paths_outside_the_backup_are_refused(name: str):
    with pytest.raises(BackupError):
        check_relative_path(name)
    assert check_relative_path("pki/clients/gw-1.crt") == "pki/clients/gw-1.crt"


def test_digests_name_every_missing_and_altered_file():
    m = manifest(files={"database.dump": "aa", "pki/ca.crt": "bb", "settings/x.toml": "cc"})
    check_digests(m, {"database.dump": "aa", "pki/ca.crt": "bb", "settings/x.toml": "cc"})
    with pytest.raises(BackupError) as info:
        check_digests(m, {"database.dump": "aa", "pki/ca.crt": "XX", "settings/x.toml": None})
    text = str(info.value)
    assert "settings/x.toml is missing" in text
    assert "pki/ca.crt does not match its sha256" in text
    assert "database.dump" not in text


def test_timescaledb_and_postgresql_versions_must_fit():
    check_timescaledb("2.19.3", ["2.19.3", "2.20.0"], "2.20.0")
    with pytest.raises(BackupError) as info:
        check_timescaledb("2.19.3", ["2.21.0"], "2.21.0")
    assert "TimescaleDB 2.19.3" in str(info.value)
    assert "TimescaleDB 2.21.0" in str(info.value)
    check_client_major(15, 16, "pg_restore")
    with pytest.raises(BackupError, match="PostgreSQL 16"):
        check_client_major(16, 15, "pg_restore")


def test_counts_are_compared_on_both_sides():
    rows = compare_counts({"alerts": 2, "devices": 1}, {"alerts": 2, "sites": 3})
    assert [(r.name, r.backup, r.restored, r.equal) for r in rows] == [
        ("alerts", 2, 2, True),
        ("devices", 1, None, False),
        ("sites", None, 3, False),
    ]


@pytest.mark.parametrize(
    ("url", "bare", "password"),
    [
        ("postgresql://u:p%40ss@h:5432/db", "postgresql://u@h:5432/db", "p@ss"),
        ("postgresql://u@h/db", "postgresql://u@h/db", None),
        ("postgres://u:x:y@h/db?sslmode=require", "postgres://u@h/db?sslmode=require", "x:y"),
        ("host=h dbname=db", "host=h dbname=db", None),
    ],
)
def test_the_password_leaves_the_url(url: str, bare: str, password: str | None):
    assert split_password(url) == (bare, password)


def test_database_names_in_urls():
    assert database_name("postgresql://u:p@h:1/city%20hub") == "city hub"
    assert database_name("postgresql://u:p@h:1") == "u"
    assert with_database("postgresql://u:p@h:1/cityhub?x=1", "postgres") == (
        "postgresql://u:p@h:1/postgres?x=1"
    )
    with pytest.raises(BackupError):
        with_database("host=h dbname=db", "postgres")


def test_only_timescaledb_catalog_cycles_are_expected_from_pg_dump():
    lines = [
        "pg_dump: warning: there are circular foreign-key constraints on this table:",
        "pg_dump: detail: hypertable",
        "pg_dump: hint: You might not be able to restore the dump without using ...",
        "pg_dump: warning: there are circular foreign-key constraints on this table:",
        "pg_dump: detail: my_table",
        "pg_dump: hint: You might not be able to restore the dump without using ...",
        "pg_dump: warning: there are circular foreign-key constraints on this table:",
        "pg_dump: detail: continuous_agg",
        "pg_dump: warning: something else",
    ]
    expected, other = split_dump_warnings(lines)
    assert expected == lines[0:3] + lines[6:8]
    assert other == lines[3:6] + lines[8:]


@pytest.mark.parametrize(
    ("relative", "original"),
    [
        ("settings/x.toml", "/etc/cron.d/evil"),
        ("settings/x.toml", "relative/x.toml"),
        ("settings/x.toml", "/srv/../etc/x.toml"),
        ("settings/other.toml", "/srv/cityhub/x.toml"),  # not among the backup's files
        ("pki/ca.crt", "/srv/cityhub/x.toml"),
    ],
)
def test_settings_are_restored_only_to_toml_files(relative: str, original: str):
    files = {"database.dump": "aa", "pki/ca.crt": "bb", "settings/x.toml": "cc"}
    good = manifest(files=files, settings_paths={"settings/x.toml": "/srv/cityhub/x.toml"})
    assert decode_manifest(encode_manifest(good)) == good
    hostile = manifest(files=files, settings_paths={relative: original})
    with pytest.raises(BackupError, match="settings"):
        decode_manifest(encode_manifest(hostile))
