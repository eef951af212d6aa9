"""A worker that vanishes mid-commit does not hold its batches' locks for the other workers.

Worker A commits a batch through a TcpProxy; its transaction has claimed the
batch id when the link goes silent (the proxy hangs: no FIN, no RST, as
behind a partition). Worker B then commits the same batch, resent by its
gateway. Without the server-side limits (``server_dead_client_settings``)
B waits on A's row lock until the server's TCP keepalive notices A, two
hours by default; with them A's backend gives up after ``dead_client_s``
and B commits the batch, once.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

import psycopg
import pytest

from contracts.messages import encode_batch
from contracts.schema import readings_table
from contracts.topics import batch_topic
from ingest.prepare import GoodBatch, prepare_item
from ingest.writer import BatchWriter, CommitOutcome, server_dead_client_settings
from tests.plugins.gateway import now_ms, wait_for
from tests.plugins.ingest import (
    Ledger,
    TcpProxy,
    assert_table_equals_ledger,
    make_batch,
    proxied_url,
    seed_registry,
)

pytestmark = pytest.mark.slow

DEAD_CLIENT_S = 2.0


def test_server_limits_follow_the_dead_client_time():
    limits = server_dead_client_settings(6.0)
    assert limits["idle_in_transaction_session_timeout"] == "6000ms"
    assert limits["tcp_user_timeout"] == "6000ms"
    # First probe after a third, two more a third apart: gone within the time.
    assert (limits["tcp_keepalives_idle"], limits["tcp_keepalives_interval"]) == ("2", "2")
    assert limits["tcp_keepalives_count"] == "2"
    # Never 0, which would mean "no limit" to PostgreSQL.
    tiny = server_dead_client_settings(0.1)
    assert tiny["idle_in_transaction_session_timeout"] == "100ms"
    assert tiny["tcp_keepalives_idle"] == "1"


def test_a_worker_cut_off_mid_commit_releases_its_batch_to_the_other(
    db_conn: psycopg.Connection[Any], db_url: str, migrated: str
) -> None:
    t = uuid.uuid4().hex[:6]
    gw, prefix = f"gw-{t}", f"t{t}"
    devices = [(f"{gw}-aq-{i}", "air_quality") for i in range(3)]
    seed_registry(db_conn, migrated, {gw: devices})
    ledger = Ledger()
    batch = make_batch(gw, 1, devices, rows_per_device=5, ledger=ledger)
    item = prepare_item(
        batch_topic(gw, prefix),
        encode_batch(batch),
        prefix=prefix,
        now_ms=now_ms(),
        owners=dict.fromkeys((d for d, _ in devices), gw),
    )
    assert isinstance(item, GoodBatch)
    first_key = next(iter(ledger.rows["air_quality"]))

    proxy = TcpProxy(int(db_url.rsplit(":", 1)[1].split("/", maxsplit=1)[0]))
    worker_a = BatchWriter(
        url=proxied_url(db_url, proxy),
        schema=migrated,
        worker_id=f"a-{t}",
        dead_client_s=DEAD_CLIENT_S,
    )
    worker_b = BatchWriter(
        url=db_url, schema=migrated, worker_id=f"b-{t}", dead_client_s=DEAD_CLIENT_S
    )
    results: dict[str, object] = {}

    def commit(name: str, writer: BatchWriter) -> None:
        try:
            results[name] = writer.commit([item])
        except Exception as exc:  # noqa: BLE001 - handed to the test
            results[name] = exc

    blocker = psycopg.connect(db_url)
    try:
        # A row with the key of one of the batch's readings, uncommitted: A's
        # commit claims the batch id, then waits at that reading.
        device_id, ts_ms, seq = first_key
        blocker.execute(
            f"INSERT INTO {migrated}.{readings_table('air_quality')} (device_id, ts, seq, recv_ts) "
            "VALUES (%s, to_timestamp(%s / 1000.0), %s, now())",
            (device_id, ts_ms, seq),
        )
        a = threading.Thread(target=commit, args=("a", worker_a), daemon=True)
        a.start()
        wait_for(
            lambda: waiting_on_lock(db_conn, f"cityhub-ingest-a-{t}"), 20, "A waits at the reading"
        )
        proxy.hang()  # A's host is gone: nothing more passes either way
        blocker.rollback()  # A's statement completes, its answer never reaches A
        # A's backend now waits for A's next statement (or has given up already).
        wait_for(
            lambda: not waiting_on_lock(db_conn, f"cityhub-ingest-a-{t}"), 20, "A's statement done"
        )
        b = threading.Thread(target=commit, args=("b", worker_b), daemon=True)
        b.start()
        b.join(30 * DEAD_CLIENT_S)
        assert not b.is_alive(), "worker B still waits on the vanished worker's locks"
        outcome = results["b"]
        assert isinstance(outcome, CommitOutcome), outcome
        assert [i.key for i in outcome.written] == [item.key]  # B stored it: A never did
    finally:
        blocker.close()
        proxy.close()  # A's call fails now, whatever it was waiting for
        worker_b.close()
    a.join(30)
    assert isinstance(results.get("a"), Exception), results.get("a")
    worker_a.close()
    assert_table_equals_ledger(db_conn, migrated, ledger)


def waiting_on_lock(conn: psycopg.Connection[Any], application_name: str) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
        "AND wait_event_type = 'Lock'",
        (application_name,),
    ).fetchone()
    return row is not None and row[0] > 0


def test_the_command_stores_connection_carries_the_same_limits(db_url, migrated):
    """The dispatcher's transactions lock command rows: its connection gets the limits too."""
    from ingest.commandstore import CommandStore

    limited = CommandStore(url=db_url, schema=migrated, worker_id="t-limits", dead_client_s=6.0)
    plain = CommandStore(url=db_url, schema=migrated, worker_id="t-plain")
    try:
        with limited._db.session("reading its settings") as conn:
            shown = conn.execute(
                "SELECT current_setting('idle_in_transaction_session_timeout'),"
                " current_setting('tcp_user_timeout')"
            ).fetchone()
        assert shown == ("6s", "6000")  # tcp_user_timeout shows plain milliseconds
        with plain._db.session("reading its settings") as conn:
            assert conn.execute(
                "SELECT current_setting('idle_in_transaction_session_timeout')"
            ).fetchone() == ("0",)
    finally:
        limited.close()
        plain.close()
