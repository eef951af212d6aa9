"""`cityhub sim run` as a user runs it: a fleet on a real broker, registered in the database."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cityhub.cli.main import app
from cityhub.cli.sim import parse_http_urls
from cityhub.localstack.mosquitto import ADMIN_USER
from contracts.errors import SettingsError


def test_sim_run_register_puts_the_fleet_in_the_registry(mqtt_server, db_url, db_conn, seeded):
    env = {
        "CITYHUB_DATABASE__URL": db_url,
        "CITYHUB_DATABASE__SCHEMA": seeded,
        "CITYHUB_GATEWAY__SITE_BROKER__HOST": "127.0.0.1",
        "CITYHUB_GATEWAY__SITE_BROKER__PORT": str(mqtt_server.port),
        "CITYHUB_GATEWAY__SITE_BROKER__USERNAME": ADMIN_USER,
        "CITYHUB_GATEWAY__SITE_BROKER__PASSWORD": mqtt_server.admin_password,
        "COLUMNS": "200",
    }
    args = ["sim", "run", "--sites", "hk-hall-quan", "--for", "2s", "--no-publish-configs"]
    result = CliRunner().invoke(app, [*args, "--register"], env=env)
    assert result.exit_code == 0, result.output
    assert "simulating" in result.output
    devices = db_conn.execute(
        f"SELECT device_id, gateway_id, site_id, status FROM {seeded}.devices ORDER BY device_id"
    ).fetchall()
    assert devices, "no device registered"
    assert {(gw, site, status) for _, gw, site, status in devices} == {
        ("gw-hk-hall-quan", "hk-hall-quan", "active")
    }
    gateways = db_conn.execute(f"SELECT gateway_id, site_id FROM {seeded}.gateways").fetchall()
    assert gateways == [("gw-hk-hall-quan", "hk-hall-quan")]
    # Running it again registers the same fleet: nothing doubles, nothing fails.
    again = CliRunner().invoke(app, [*args, "--register"], env=env)
    assert again.exit_code == 0, again.output
    count = db_conn.execute(f"SELECT count(*) FROM {seeded}.devices").fetchone()
    assert count == (len(devices),)


def test_sim_run_without_register_leaves_the_registry_alone(mqtt_server, db_url, db_conn, seeded):
    env = {
        "CITYHUB_DATABASE__URL": db_url,
        "CITYHUB_DATABASE__SCHEMA": seeded,
        "CITYHUB_GATEWAY__SITE_BROKER__HOST": "127.0.0.1",
        "CITYHUB_GATEWAY__SITE_BROKER__PORT": str(mqtt_server.port),
        "CITYHUB_GATEWAY__SITE_BROKER__USERNAME": ADMIN_USER,
        "CITYHUB_GATEWAY__SITE_BROKER__PASSWORD": mqtt_server.admin_password,
    }
    args = ["sim", "run", "--sites", "hk-hall-quan", "--for", "1s", "--no-publish-configs"]
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    assert db_conn.execute(f"SELECT count(*) FROM {seeded}.devices").fetchone() == (0,)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("hk-hall-quan", "not SITE="),
        ("hk-hall-quan=ftp://x", "not SITE="),
        ("nowhere=http://127.0.0.1:8470", "not a simulated site"),
    ],
)
def test_http_urls_name_simulated_sites_and_http_addresses(value, problem):
    sites = {"hk-hall-quan", "bd-hall-quan"}
    assert parse_http_urls(["hk-hall-quan=http://127.0.0.1:8470/"], sites) == {
        "hk-hall-quan": "http://127.0.0.1:8470"
    }
    with pytest.raises(SettingsError, match=problem):
        parse_http_urls([value], sites)
