"""Settings: TOML + CITYHUB_* environment, errors that name the key, masked secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from contracts.errors import SettingsError
from contracts.settings import (
    Settings,
    default_state_dir,
    describe_settings,
    load_settings,
    mask_secrets,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cityhub.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_file_or_environment():
    settings = load_settings(None, {})
    assert settings == Settings()
    assert settings.database.schema == "cityhub"
    assert settings.local.dev_mode is False
    assert settings.ingest.command_resend_s == 5.0


def test_file_and_environment_merge_with_environment_winning(tmp_path):
    path = write(
        tmp_path,
        '[database]\nurl = "postgresql://a@db/x"\nschema = "hub"\n[local]\npg_port = 6000\n',
    )
    env = {
        "CITYHUB_LOCAL__PG_PORT": "6001",
        "CITYHUB_LOCAL__DEV_MODE": "true",
        "CITYHUB_BROKER__PASSWORD": "1234",  # stays a string: the field is a str
        "UNRELATED": "x",
    }
    settings = load_settings(path, env)
    assert settings.database.url == "postgresql://a@db/x"
    assert settings.database.schema == "hub"
    assert settings.local.pg_port == 6001
    assert settings.local.dev_mode is True
    assert settings.broker.password == "1234"


def test_config_file_named_by_environment(tmp_path):
    path = write(tmp_path, 'operator = "Nguyễn Văn An"\n')
    assert load_settings(None, {"CITYHUB_CONFIG": str(path)}).operator == "Nguyễn Văn An"


@pytest.mark.parametrize(
    ("toml", "env", "key"),
    [
        ('[local]\npg_port = "abc"\n', {}, "local.pg_port"),
        ("[local]\npg_prot = 5\n", {}, "local.pg_prot"),
        ("[nosuch]\nx = 1\n", {}, "nosuch"),
        ("[database]\nschema = 7\n", {}, "database.schema"),
        ("local = 3\n", {}, "local"),
        ("", {"CITYHUB_LOCAL__PG_PORT": "fifty"}, "CITYHUB_LOCAL__PG_PORT"),
        ("", {"CITYHUB_LOCAL__DEV_MODE": "perhaps"}, "CITYHUB_LOCAL__DEV_MODE"),
        ("", {"CITYHUB_DATABSE__URL": "x"}, "CITYHUB_DATABSE__URL"),
        ("", {"CITYHUB_LOCAL": "x"}, "CITYHUB_LOCAL"),
        ("[ingest]\ncommand_resend_s = 0\n", {}, "ingest.command_resend_s"),
        ("[ingest]\ncommand_resend_s = -1.5\n", {}, "ingest.command_resend_s"),
        ("", {"CITYHUB_INGEST__COMMAND_RESEND_S": "0"}, "CITYHUB_INGEST__COMMAND_RESEND_S"),
    ],
)
def test_errors_name_the_key(tmp_path, toml, env, key):
    with pytest.raises(SettingsError) as info:
        load_settings(write(tmp_path, toml), env)
    assert info.value.key == key
    assert repr(key) in str(info.value)


def test_missing_file_and_bad_toml_are_settings_errors(tmp_path):
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", {})
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(write(tmp_path, "[database\n"), {})


def test_settings_are_frozen():
    settings = load_settings(None, {})
    with pytest.raises(AttributeError):
        settings.operator = "x"  # type: ignore[misc]


def test_secrets_are_masked_when_described():
    settings = load_settings(
        None,
        {
            "CITYHUB_DATABASE__URL": "postgresql://hub:s3cr3t@db:5432/cityhub",
            "CITYHUB_BROKER__PASSWORD": "hunter2",
        },
    )
    text = repr(describe_settings(settings))
    assert "s3cr3t" not in text
    assert "hunter2" not in text
    assert "postgresql://hub:***@db:5432/cityhub" in text
    assert mask_secrets("mqtt://u:p@h:1 and nothing") == "mqtt://u:***@h:1 and nothing"


def test_default_state_dir():
    assert default_state_dir({}, is_root=True) == Path("/var/lib/cityhub")
    assert default_state_dir({"HOME": "/home/an"}, is_root=False) == Path(
        "/home/an/.local/state/cityhub"
    )
    assert default_state_dir({"XDG_STATE_HOME": "/x"}, is_root=False) == Path("/x/cityhub")


def test_metrics_hosts_default_to_loopback_and_take_ip_literals(tmp_path):
    assert Settings().gateway.metrics_host == "127.0.0.1"
    assert Settings().ingest.metrics_host == "127.0.0.1"
    path = write(tmp_path, '[gateway]\nmetrics_host = "0.0.0.0"\n[ingest]\nmetrics_host = "::"\n')
    settings = load_settings(path, {"CITYHUB_INGEST__METRICS_HOST": "fd00::2"})
    assert settings.gateway.metrics_host == "0.0.0.0"  # noqa: S104 - the value under test
    assert settings.ingest.metrics_host == "fd00::2"


@pytest.mark.parametrize(
    ("toml", "env", "key"),
    [
        ('[gateway]\nmetrics_host = "prometheus.local"\n', {}, "gateway.metrics_host"),
        ('[ingest]\nmetrics_host = "localhost"\n', {}, "ingest.metrics_host"),
        ('[ingest]\nmetrics_host = ""\n', {}, "ingest.metrics_host"),
        ("", {"CITYHUB_GATEWAY__METRICS_HOST": "10.0.0.300"}, "gateway.metrics_host"),
        ("", {"CITYHUB_INGEST__METRICS_HOST": "0.0.0.0:9101"}, "ingest.metrics_host"),
    ],
)
def test_a_metrics_host_that_is_not_an_ip_address_is_refused_naming_the_key(
    tmp_path, toml, env, key
):
    with pytest.raises(SettingsError) as info:
        load_settings(write(tmp_path, toml), env)
    assert info.value.key == key
    assert "not an IP address" in info.value.problem


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        (
            "postgresql://hub:s3cr3t@db1:5432,db2:5432/cityhub?target_session_attrs=read-write",
            "postgresql://hub:***@db1:5432,db2:5432/cityhub?target_session_attrs=read-write",
        ),
        (
            "host=db1,db2 port=5432,5433 user=hub password=s3cr3t dbname=cityhub",
            "host=db1,db2 port=5432,5433 user=hub password=*** dbname=cityhub",
        ),
        (
            r"host=db1,db2 password = 'a b\' s3cr3t' dbname=cityhub",
            "host=db1,db2 password = *** dbname=cityhub",
        ),
        (
            "postgresql://db1,db2/cityhub?user=hub&password=s3cr3t&target_session_attrs=read-write",
            "postgresql://db1,db2/cityhub?user=hub&password=***&target_session_attrs=read-write",
        ),
        # A key that only starts like the password's is not one.
        ("password_file=/run/secrets/db", "password_file=/run/secrets/db"),
    ],
)
def test_mask_secrets_masks_multi_host_and_key_value_passwords(text, masked):
    assert mask_secrets(text) == masked
    assert "s3cr3t" not in repr(
        describe_settings(load_settings(None, {"CITYHUB_DATABASE__URL": text}))
    )
