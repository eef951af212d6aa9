"""The private servers' extra listeners: reachable there, pg_hba.conf's block rewritten, not grown.

127.0.0.2 stands in for another address of this machine (all of 127/8 is
loopback on Linux). The namespaced hosts that really need the listeners are
tests/system/test_ingest_partition.py's.
"""

from __future__ import annotations

import re
import socket
import uuid
from pathlib import Path

import psycopg
import pytest

from cityhub.localstack.postgres import PostgresServer
from cityhub.localstack.procs import free_port, run_as_for
from tests.plugins.servers import IS_ROOT, mosquitto_server, start_or_skip

pytestmark = pytest.mark.slow

OTHER = "127.0.0.2"
MARKER = "# cityhub: extra listeners"


def test_the_broker_listens_on_its_extra_addresses_too(servers_dir: Path, mosquitto_bin: str):
    server = mosquitto_server(
        servers_dir / f"mosquitto-extra-{uuid.uuid4().hex[:6]}", binary=mosquitto_bin
    )
    server.extra_hosts = (OTHER,)
    start_or_skip(server, "Mosquitto's dynamic-security plugin")
    try:
        assert f"listener {server.port} {OTHER}" in server.config_path.read_text()
        with socket.create_connection((OTHER, server.port), timeout=5):
            pass
    finally:
        server.stop()


def test_the_database_listens_on_its_extra_addresses_and_keeps_one_hba_block(
    servers_dir: Path, pg_bindir: Path
):
    base = servers_dir / f"postgres-extra-{uuid.uuid4().hex[:6]}"

    def server(extra: tuple[str, ...]) -> PostgresServer:
        return PostgresServer(
            base_dir=base,
            port=free_port(),
            bindir=pg_bindir,
            run_as=run_as_for("postgres", is_root=IS_ROOT),
            password_file=base.with_suffix(".password"),
            durable=False,
            extra_listen=extra,
        )

    first = start_or_skip(server((f"{OTHER}/32", "10.203.77.1/30")), "PostgreSQL with TimescaleDB")
    hba = first.data_dir / "pg_hba.conf"
    try:
        url = first.url().replace("@127.0.0.1:", f"@{OTHER}:")
        with psycopg.connect(url, connect_timeout=5) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        text = hba.read_text()
        assert text.count(MARKER) == 1
        assert "host all all 10.203.77.0/30 scram-sha-256" in text
    finally:
        first.stop()
    again = start_or_skip(server((f"{OTHER}/32",)), "PostgreSQL with TimescaleDB")
    try:
        text = hba.read_text()
        assert text.count(MARKER) == 1
        assert "10.203.77.0/30" not in text  # a listener dropped takes its line along
    finally:
        again.stop()
    none = start_or_skip(server(()), "PostgreSQL with TimescaleDB")
    try:
        assert MARKER not in hba.read_text()
        # initdb's own lines stay.
        assert re.search(
            r"^host\s+all\s+all\s+127\.0\.0\.1/32\s+scram-sha-256$", hba.read_text(), re.MULTILINE
        )
    finally:
        none.stop()
