"""Ingest's command downlink on real servers: the dispatcher and the command report consumer.

A private PostgreSQL schema and topic prefix per test; commands are queued
as the CLI queues them (a ``commands`` row in state 'queued', its
``command_events`` row, a NOTIFY); ``CommandGateway`` plays a gateway's
central link: it reads its cmd and ack topics and publishes CommandReports,
resending them until acked as ``gateway.service`` does.
"""

from __future__ import annotations

import os
import secrets
import signal
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from cityhub.localstack.mosquitto import MosquittoServer
from contracts.commands import (
    CommandReport,
    CommandReports,
    GatewayCommands,
    decode_gateway_commands,
    encode_command_reports,
    make_report,
)
from contracts.messages import Ack, decode_ack
from contracts.schema import command_channel, command_state_channel
from contracts.settings import DatabaseSettings
from contracts.topics import ack_topic, command_report_topic, command_topic
from tests.plugins.gateway import broker_settings, client, now_ms, wait_for
from tests.plugins.ingest import (
    TcpProxy,
    ingest_in_thread,
    ingest_settings,
    proxied_url,
    start_ingest_process,
    write_config,
)


def new_command_id() -> str:
    return f"c-{secrets.token_hex(8)}"


def queue_command(
    conn: psycopg.Connection,
    schema: str,
    *,
    gateway_id: str,
    device_id: str = "aq-hk-01",
    age_s: float = 0.0,
    ttl_s: int = 600,
    notify: bool = True,
) -> str:
    """A command as the CLI queues it: row, 'queued' event and NOTIFY in one transaction."""
    command_id = new_command_id()
    with conn.transaction():
        conn.execute(
            f"""INSERT INTO {schema}.commands (command_id, device_id, gateway_id, device_type,
                name, args, ttl_s, created_at, expires_at, operator, state, state_at)
            VALUES (%s, %s, %s, 'air_quality', 'set_reporting_interval', '{{"interval_s": 60}}',
                %s, now() - make_interval(secs => %s),
                now() - make_interval(secs => %s) + make_interval(secs => %s),
                'Nguyễn Thị Lan', 'queued', now())""",
            (command_id, device_id, gateway_id, ttl_s, age_s, age_s, ttl_s),
        )
        conn.execute(
            f"INSERT INTO {schema}.command_events (command_id, state, ts, source) "
            "VALUES (%s, 'queued', now(), 'hub')",
            (command_id,),
        )
        if notify:
            conn.execute("SELECT pg_notify(%s, %s)", (command_channel(schema), command_id))
    return command_id


def command_row(conn: psycopg.Connection, schema: str, command_id: str) -> tuple:
    row = conn.execute(
        f"SELECT state, detail, answer, sends FROM {schema}.commands WHERE command_id = %s",
        (command_id,),
    ).fetchone()
    assert row is not None
    return tuple(row)


def events(conn: psycopg.Connection, schema: str, command_id: str) -> list[tuple[str, str]]:
    rows = conn.execute(
        f"SELECT state, source FROM {schema}.command_events WHERE command_id = %s "
        "ORDER BY ts, state",
        (command_id,),
    ).fetchall()
    return [(str(s), str(src)) for s, src in rows]


def rejects(conn: psycopg.Connection, schema: str) -> list[tuple[str | None, str]]:
    rows = conn.execute(
        f"SELECT gateway_id, reason FROM {schema}.rejects ORDER BY received_at, reason"
    ).fetchall()
    return [(gw, str(reason)) for gw, reason in rows]


class CommandGateway:
    """A gateway's central link for commands: what it was sent, what it was acked."""

    def __init__(self, server: MosquittoServer, *, gateway_id: str, prefix: str) -> None:
        self.gateway_id = gateway_id
        self.prefix = prefix
        self.lock = threading.Lock()
        self.received: list[tuple[float, GatewayCommands]] = []
        self.acks: list[Ack] = []
        self.unacked: dict[str, bytes] = {}  # report id -> the payload that carries it
        self._stop = threading.Event()
        self.client = client(server)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.subscribe(
            [(command_topic(gateway_id, prefix), 1), (ack_topic(gateway_id, prefix), 1)]
        )
        assert subscribed.wait(10)
        self._resender: threading.Thread | None = None

    def _on_message(self, _c, _u, message) -> None:
        now = time.monotonic()
        if message.topic.endswith("/cmd"):
            decoded = decode_gateway_commands(message.payload, gateway_id=self.gateway_id)
            with self.lock:
                self.received.append((now, decoded))
            return
        ack = decode_ack(message.payload, gateway_id=self.gateway_id)
        with self.lock:
            self.acks.append(ack)
            for report_id in ack.reports:
                self.unacked.pop(report_id, None)

    def sent_ids(self) -> list[str]:
        with self.lock:
            return [c.command_id for _, m in self.received for c in m.commands]

    def cancels(self) -> list[str]:
        with self.lock:
            return [c for _, m in self.received for c in m.cancel]

    def acked(self) -> list[str]:
        with self.lock:
            return [r for a in self.acks for r in a.reports]

    def publish(self, *reports: CommandReport, resend_s: float | None = None) -> bytes:
        """Publish reports in one message; with ``resend_s``, again until each is acked."""
        payload = encode_command_reports(
            CommandReports(gateway_id=self.gateway_id, ts_ms=now_ms(), reports=list(reports))
        )
        if resend_s is not None:
            with self.lock:
                for report in reports:
                    self.unacked[report.report_id] = payload
            if self._resender is None:
                self._resender = threading.Thread(
                    target=self._resend, args=(resend_s,), daemon=True
                )
                self._resender.start()
        self.publish_raw(payload)
        return payload

    def publish_raw(self, payload: bytes, gateway_id: str | None = None) -> None:
        topic = command_report_topic(gateway_id or self.gateway_id, self.prefix)
        self.client.publish(topic, payload, qos=1)

    def _resend(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            with self.lock:
                payloads = set(self.unacked.values())
            for payload in payloads:
                self.publish_raw(payload)

    def close(self) -> None:
        self._stop.set()
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def ids() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:6]
    return f"gw-{tag}", f"t{tag}"


def database(db_url: str, schema: str) -> DatabaseSettings:
    return DatabaseSettings(url=db_url, schema=schema, connect_timeout_s=2.0)


def test_a_notified_command_reaches_its_gateway_at_once_and_is_resent_until_sent(
    mqtt_server, db_conn, db_url, migrated, ids
):
    gw, prefix = ids
    gateway = CommandGateway(mqtt_server, gateway_id=gw, prefix=prefix)
    settings = ingest_settings(prefix, command_resend_s=2.0)
    try:
        with ingest_in_thread(
            settings=settings,
            broker=broker_settings(mqtt_server),
            database=database(db_url, migrated),
        ) as worker:
            assert worker.downlink is not None
            wait_for(lambda: worker.downlink.listener.connects >= 1, 10, "listening")
            time.sleep(0.3)  # the pass the new listener asked for is over
            queued_at = time.monotonic()
            command_id = queue_command(db_conn, migrated, gateway_id=gw)
            wait_for(lambda: command_id in gateway.sent_ids(), 5, "the command")
            first_at, first = gateway.received[0]
            assert first_at - queued_at < 1.0  # the NOTIFY, not the 2 s poll
            assert first.gateway_id == gw
            (command,) = first.commands
            assert (command.device_id, command.name, command.args, command.ttl_s) == (
                "aq-hk-01",
                "set_reporting_interval",
                {"interval_s": 60},
                600,
            )
            # No 'sent' report yet: sent again, unchanged, after command_resend_s.
            wait_for(lambda: gateway.sent_ids().count(command_id) >= 2, 6, "a resend")
            second_at, second = gateway.received[1]
            assert second.commands == [command]
            assert second_at - first_at >= 1.9
            # Then after twice as long: a gateway that is away is not flooded with copies.
            wait_for(lambda: gateway.sent_ids().count(command_id) >= 3, 8, "a second resend")
            third_at, third = gateway.received[2]
            assert third.commands == [command]
            assert third_at - second_at >= 3.8
            sent = make_report(command, command.device_id, "sent", now_ms())
            gateway.publish(sent)
            wait_for(lambda: sent.report_id in gateway.acked(), 5, "the report acked")
            sends = gateway.sent_ids().count(command_id)
            time.sleep(4.5)  # two more periods: nothing is sent any more
            assert gateway.sent_ids().count(command_id) == sends
            state, _, _, stored_sends = command_row(db_conn, migrated, command_id)
            assert (state, stored_sends) == ("sent", sends)
            assert events(db_conn, migrated, command_id) == [
                ("queued", "hub"),
                ("sent", "gateway"),
            ]
            assert worker.counters.commands_dispatched == sends
            assert worker.counters.command_reports_stored == 1
    finally:
        gateway.close()


def test_without_a_notification_the_poll_sends_it_within_command_resend_s(
    mqtt_server, db_conn, db_url, migrated, ids
):
    gw, prefix = ids
    gateway = CommandGateway(mqtt_server, gateway_id=gw, prefix=prefix)
    try:
        with ingest_in_thread(
            settings=ingest_settings(prefix, command_resend_s=1.0),
            broker=broker_settings(mqtt_server),
            database=database(db_url, migrated),
        ) as worker:
            assert worker.downlink is not None
            wait_for(lambda: worker.downlink.listener.connects >= 1, 10, "listening")
            queued_at = time.monotonic()
            command_id = queue_command(db_conn, migrated, gateway_id=gw, notify=False)
            wait_for(lambda: command_id in gateway.sent_ids(), 3, "the command, by the poll")
            assert gateway.received[0][0] - queued_at < 1.0 + 0.5
    finally:
        gateway.close()


def test_a_cancel_of_a_sent_command_goes_out_as_a_cancel_until_the_gateway_reports_it(
    mqtt_server, db_conn, db_url, migrated, ids
):
    gw, prefix = ids
    gateway = CommandGateway(mqtt_server, gateway_id=gw, prefix=prefix)
    command_id = queue_command(db_conn, migrated, gateway_id=gw, notify=False)
    db_conn.execute(
        f"""UPDATE {migrated}.commands SET state = 'sent', sends = 1,
            last_sent_at = now() - interval '1 minute'
        WHERE command_id = %s""",
        (command_id,),
    )
    try:
        with ingest_in_thread(
            settings=ingest_settings(prefix, command_resend_s=1.0),
            broker=broker_settings(mqtt_server),
            database=database(db_url, migrated),
        ):
            time.sleep(1.5)
            assert gateway.received == []  # a sent command is the gateway's now
            with db_conn.transaction():
                db_conn.execute(
                    f"""UPDATE {migrated}.commands SET cancel_requested_at = now(),
                        cancelled_by = 'Trần Văn Minh' WHERE command_id = %s""",
                    (command_id,),
                )
                db_conn.execute("SELECT pg_notify(%s, %s)", (command_channel(migrated), command_id))
            wait_for(lambda: command_id in gateway.cancels(), 5, "the cancel")
            assert gateway.sent_ids() == []  # never the command itself again
            wait_for(lambda: gateway.cancels().count(command_id) >= 2, 4, "the cancel again")
            cancelled = make_report(command_id, "aq-hk-01", "cancelled", now_ms())
            gateway.publish(cancelled)
            wait_for(lambda: cancelled.report_id in gateway.acked(), 5, "the report acked")
            count = gateway.cancels().count(command_id)
            time.sleep(2.5)
            assert gateway.cancels().count(command_id) == count
            assert command_row(db_conn, migrated, command_id)[0] == "cancelled"
    finally:
        gateway.close()


def listen(db_url: str, channel: str) -> psycopg.Connection:
    conn = psycopg.connect(db_url, autocommit=True)
    conn.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(channel)))
    return conn


def notified(conn: psycopg.Connection, timeout_s: float) -> list[str]:
    return [n.payload for n in conn.notifies(timeout=timeout_s)]


def test_a_queued_command_past_its_ttl_and_the_grace_expires_unsent(
    mqtt_server, db_conn, db_url, migrated, ids
):
    gw, prefix = ids
    gateway = CommandGateway(mqtt_server, gateway_id=gw, prefix=prefix)
    states = listen(db_url, command_state_channel(migrated))
    # Its ttl (10 min) ran out 10 min ago; a fresh one goes out as usual.
    stale = queue_command(db_conn, migrated, gateway_id=gw, age_s=1200, notify=False)
    # Within the grace: still sent (the gateway expires it itself).
    recent = queue_command(db_conn, migrated, gateway_id=gw, age_s=615, notify=False)
    try:
        with ingest_in_thread(
            settings=ingest_settings(prefix, command_resend_s=1.0),
            broker=broker_settings(mqtt_server),
            database=database(db_url, migrated),
        ):
            wait_for(lambda: recent in gateway.sent_ids(), 5, "the recent command")
            wait_for(lambda: command_row(db_conn, migrated, stale)[0] == "expired", 5, "expired")
            assert stale in notified(states, 2.0)
            time.sleep(1.5)
            assert stale not in gateway.sent_ids()
            state, detail, _, sends = command_row(db_conn, migrated, stale)
            assert (state, detail, sends) == ("expired", f"never reached {gw}", 0)
            assert events(db_conn, migrated, stale) == [("queued", "hub"), ("expired", "hub")]
    finally:
        states.close()
        gateway.close()


def test_reports_are_stored_once_move_a_command_forward_only_and_are_acked(
    mqtt_server, db_conn, db_url, migrated, ids
):
    gw, prefix = ids
    gateway = CommandGateway(mqtt_server, gateway_id=gw, prefix=prefix)
    states = listen(db_url, command_state_channel(migrated))
    done = queue_command(db_conn, migrated, gateway_id=gw, notify=False)
    late = queue_command(db_conn, migrated, gateway_id=gw, notify=False)
    t = now_ms()
    first = [
        make_report(done, "aq-hk-01", "sent", t),
        make_report(done, "aq-hk-01", "delivered", t + 10),
        make_report(done, "aq-hk-01", "succeeded", t + 20, detail="đã đặt / set", answer={"v": 2}),
        make_report(late, "aq-hk-01", "delivered", t + 30),
    ]
    try:
        with ingest_in_thread(
            settings=ingest_settings(prefix, command_resend_s=30.0),
            broker=broker_settings(mqtt_server),
            database=database(db_url, migrated),
        ) as worker:
            gateway.publish(*first)
            wait_for(lambda: len(gateway.acks) == 1, 5, "the ack")
            assert gateway.acks[0].reports == [r.report_id for r in first]
            assert gateway.acks[0].batch_ids == []
            assert command_row(db_conn, migrated, done)[:3] == (
                "succeeded",
                "đã đặt / set",
                {"v": 2},
            )
            assert set(notified(states, 2.0)) == {done, late}
            # The same message again: acked again, stored once, nobody notified.
            gateway.publish(*first)
            wait_for(lambda: len(gateway.acks) == 2, 5, "the second ack")
            assert gateway.acks[1].reports == gateway.acks[0].reports
            assert notified(states, 0.5) == []
            # A lower state arriving late, a final state after another: recorded
            # as events, the command does not move.
            gateway.publish(
                make_report(late, "aq-hk-01", "sent", t + 5),
                make_report(done, "aq-hk-01", "failed", t + 40, detail="no answer"),
            )
            wait_for(lambda: len(gateway.acks) == 3, 5, "the third ack")
            assert command_row(db_conn, migrated, done)[:2] == ("succeeded", "đã đặt / set")
            assert command_row(db_conn, migrated, late)[0] == "delivered"
            assert sorted(events(db_conn, migrated, done)) == [
                ("delivered", "gateway"),
                ("failed", "gateway"),
                ("queued", "hub"),
                ("sent", "gateway"),
                ("succeeded", "gateway"),
            ]
            assert sorted(events(db_conn, migrated, late)) == [
                ("delivered", "gateway"),
                ("queued", "hub"),
                ("sent", "gateway"),
            ]
            assert worker.counters.command_reports_stored == 6
            assert worker.counters.command_reports_refused == 0
    finally:
        states.close()
        gateway.close()


def test_reports_for_another_gateways_command_or_an_unknown_one_are_rejects_and_acked(
    mqtt_server, db_conn, db_url, migrated, ids
):
    gw, prefix = ids
    other = f"{gw}-b"
    gateway = CommandGateway(mqtt_server, gateway_id=gw, prefix=prefix)
    bystander = CommandGateway(mqtt_server, gateway_id=other, prefix=prefix)
    theirs = queue_command(db_conn, migrated, gateway_id=other, notify=False)
    mine = queue_command(db_conn, migrated, gateway_id=gw, notify=False)
    reports = [
        make_report(theirs, "aq-hk-01", "succeeded", now_ms()),
        make_report("c-ffffffffffffffff", "aq-hk-01", "failed", now_ms()),
        make_report(mine, "aq-hk-01", "sent", now_ms()),
    ]
    try:
        with ingest_in_thread(
            settings=ingest_settings(prefix, command_resend_s=30.0),
            broker=broker_settings(mqtt_server),
            database=database(db_url, migrated),
        ) as worker:
            gateway.publish(*reports)
            wait_for(lambda: len(gateway.acks) == 1, 5, "the ack")
            assert gateway.acks[0].reports == [r.report_id for r in reports]
            assert sorted(rejects(db_conn, migrated)) == [
                (gw, "command_not_owned"),
                (gw, "unknown_command"),
            ]
            assert command_row(db_conn, migrated, theirs)[0] == "queued"
            assert command_row(db_conn, migrated, mine)[0] == "sent"
            assert worker.counters.command_reports_refused == 2
            time.sleep(0.5)
            assert bystander.acks == []  # an ack goes to the gateway that sent the reports
    finally:
        gateway.close()
        bystander.close()


def test_oversized_malformed_and_misattributed_messages_are_rejects(
    mqtt_server, db_conn, db_url, migrated, ids
):
    gw, prefix = ids
    gateway = CommandGateway(mqtt_server, gateway_id=gw, prefix=prefix)
    mine = queue_command(db_conn, migrated, gateway_id=gw, notify=False)
    good = make_report(mine, "aq-hk-01", "sent", now_ms())
    try:
        with ingest_in_thread(
            settings=ingest_settings(prefix, command_resend_s=30.0),
            broker=broker_settings(mqtt_server),
            database=database(db_url, migrated),
        ) as worker:
            gateway.publish_raw(b"\xff{not json")
            # Over the 1 MiB limit, under the link's Maximum Packet Size.
            gateway.publish_raw(b" " * (1024 * 1024 + 1000) + b"{}")
            # Another gateway's reports published on this gateway's topic.
            gateway.publish_raw(
                encode_command_reports(
                    CommandReports(gateway_id=f"{gw}-b", ts_ms=now_ms(), reports=[good])
                )
            )
            gateway.publish(good)  # the link goes on after them
            wait_for(lambda: len(gateway.acks) == 1, 10, "the good report acked")
            assert gateway.acks[0].reports == [good.report_id]
            wait_for(lambda: len(rejects(db_conn, migrated)) == 3, 5, "three rejects")
            assert sorted(rejects(db_conn, migrated)) == [
                (gw, "gateway_mismatch"),
                (gw, "malformed"),
                (gw, "too_large"),
            ]
            raw_bytes = db_conn.execute(
                f"SELECT raw_bytes FROM {migrated}.rejects WHERE reason = 'too_large'"
            ).fetchone()
            assert raw_bytes == (1024 * 1024 + 1002,)
            assert worker.counters.command_reports_refused == 3
            assert worker.counters.rejects["malformed"] == 1
    finally:
        gateway.close()


@pytest.mark.slow
def test_a_worker_killed_between_receipt_and_commit_stores_the_reports_once_after_restart(
    mqtt_server, db_conn, db_url, migrated, ids, tmp_path: Path
):
    gw, prefix = ids
    port = int(db_url.rsplit(":", 1)[1].split("/", maxsplit=1)[0])
    proxy = TcpProxy(port)
    config = write_config(
        tmp_path / "ingest.toml",
        server=mqtt_server,
        db_url=proxied_url(db_url, proxy),
        schema=migrated,
        settings=ingest_settings(prefix, command_resend_s=30.0),
    )
    log = tmp_path / "ingest.log"
    gateway = CommandGateway(mqtt_server, gateway_id=gw, prefix=prefix)
    command_id = queue_command(db_conn, migrated, gateway_id=gw, notify=False)
    t = now_ms()
    reports = [
        make_report(command_id, "aq-hk-01", "sent", t),
        make_report(command_id, "aq-hk-01", "delivered", t + 1),
        make_report(command_id, "aq-hk-01", "succeeded", t + 2),
    ]
    proc = start_ingest_process(config, log)
    try:
        wait_for(lambda: "/cmdreport" in log.read_text(), 20, "the report subscription")
        proxy.cut()
        gateway.publish(*reports, resend_s=1.0)
        # Received, and its commit failed: the worker holds it, unacked.
        wait_for(lambda: "command reports not stored" in log.read_text(), 10, "a failed commit")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert gateway.acked() == []
        assert events(db_conn, migrated, command_id) == [("queued", "hub")]
        proxy.restore()
        proc = start_ingest_process(config, log)
        wait_for(lambda: len(gateway.acked()) >= 3, 30, "the reports acked after the restart")
        assert command_row(db_conn, migrated, command_id)[0] == "succeeded"
        assert sorted(events(db_conn, migrated, command_id)) == [
            ("delivered", "gateway"),
            ("queued", "hub"),
            ("sent", "gateway"),
            ("succeeded", "gateway"),
        ]
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        assert proc.returncode == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        gateway.close()
        proxy.close()
