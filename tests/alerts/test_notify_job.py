"""The alerts job notifying a real Alertmanager: webhook and email receivers, restarts, outages.

Readings are placed around the wall clock (Alertmanager compares startsAt
and endsAt with its own time), a couple of minutes back so that a clear is
in the past too. Alertmanager groups for 1 s (``tests/plugins/alertmanager``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from email.message import Message

import pytest

from adapters.alertmanager import post_alerts
from alerts.service import AlertsJob, run_job, wall_ms
from cityhub.localstack.procs import free_port
from contracts.errors import AlertmanagerRefusedError, AlertmanagerUnavailableError
from contracts.settings import NotifySettings
from tests.alerts.test_job import KIOSK_RULES, S, alerts_of, make_job, put_series, seed_devices
from tests.plugins.alertmanager import wait_for

RESEND_S = 1.0


def notify_settings(url: str) -> NotifySettings:
    return NotifySettings(
        alertmanager_url=url,
        resend_s=RESEND_S,
        timeout_s=1.0,
        retry_min_s=0.2,
        retry_max_s=1.0,
        boards_url="http://boards.test:3000",
    )


@pytest.fixture
def kiosk_site(db_conn, migrated):
    """k1 and k2 at hk-hall, which is in a ward; returns (schema, ward code, ward name)."""
    seed_devices(db_conn, migrated, [("k1", "kiosk", "hk-hall"), ("k2", "kiosk", "hk-hall")])
    code, name = db_conn.execute(
        f"SELECT unit_code, name FROM {migrated}.admin_units ORDER BY unit_code LIMIT 1"
    ).fetchone()
    db_conn.execute(
        f"UPDATE {migrated}.sites SET unit_code = %s WHERE site_id = 'hk-hall'", (code,)
    )
    db_conn.execute(f"UPDATE {migrated}.devices SET label = 'Quầy 1' WHERE device_id = 'k1'")
    return migrated, code, name


def past_base() -> int:
    """An evaluation time two minutes ago, on the 10 s grid."""
    return (wall_ms() // (10 * S)) * 10 * S - 120 * S


def firing(webhook) -> list[dict]:
    return [b for b in webhook.received() if b["status"] == "firing"]


def raise_k1(db_conn, schema: str, job: AlertsJob, base: int) -> int:
    """k1's queue above the threshold for a minute: the job raises t-queue at ``base``."""
    put_series(db_conn, schema, "kiosk", "k1", base - 60 * S, base, queue_length=50)
    put_series(db_conn, schema, "kiosk", "k2", base - 60 * S, base, queue_length=5)
    report = job.run_cycle(base)
    assert report.raised == 1
    assert len(report.changed) == 1
    return report.changed[0]


def test_raise_notifies_once_with_labels_and_clear_resolves(
    db_conn, db_url, kiosk_site, alertmanager, webhook, tmp_path
):
    schema, ward_code, ward = kiosk_site
    job = make_job(db_url, schema, KIOSK_RULES, tmp_path, notify=notify_settings(alertmanager.url))
    assert job.notifier is not None
    try:
        base = past_base()
        alert_id = raise_k1(db_conn, schema, job, base)
        job.notifier.add([alert_id])
        assert job.notifier.run(wall_ms()) == 1
        [body] = wait_for(lambda: firing(webhook), 10, "the firing notification")
        [alert] = body["alerts"]
        assert alert["labels"] == {
            "alertname": "t-queue",
            "rule_id": "t-queue",
            "severity": "minor",
            "device_type": "kiosk",
            "device_id": "k1",
            "site_id": "hk-hall",
            "ward": ward,
            "ward_code": ward_code,
            "district": "Hoàn Kiếm",
        }
        message = alerts_of(db_conn, schema)[0][9]
        assert alert["annotations"]["summary"] == message
        assert alert["annotations"]["alert_id"] == str(alert_id)
        assert alert["generatorURL"] == "http://boards.test:3000/d/cityhub-device/?var-device=k1"

        # Resends (same rule and device: the same Alertmanager alert) notify nobody again.
        for _ in range(3):
            time.sleep(RESEND_S)
            assert job.notifier.run(wall_ms()) == 1
        time.sleep(2.5)  # more than group_interval: a duplicate would have arrived
        assert len(webhook.received()) == 1
        assert job.counters.posts == 4
        assert job.counters.notify_failures == 0

        put_series(db_conn, schema, "kiosk", "k1", base + 10 * S, base + 60 * S, queue_length=10)
        report = job.run_cycle(base + 60 * S)
        assert report.cleared == 1
        assert report.changed == [alert_id]
        job.notifier.add(report.changed)
        assert job.notifier.run(wall_ms()) == 1
        resolved = wait_for(
            lambda: [b for b in webhook.received() if b["status"] == "resolved"],
            10,
            "the resolved notification",
        )
        assert resolved[0]["alerts"][0]["labels"]["device_id"] == "k1"
        assert resolved[0]["alerts"][0]["endsAt"].startswith(
            time.strftime("%Y-%m-%dT%H:%M", time.gmtime((base + 10 * S) / 1000))
        )
        status = job.store.job_status("alerts")
        assert status is not None
        assert status.alertmanager_reachable is True
    finally:
        job.close()


@contextmanager
def running(job: AlertsJob) -> Iterator[None]:
    """``run_job`` on the wall clock in a thread of its own, stopped on leaving."""
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    errors: list[BaseException] = []

    def main() -> None:
        try:
            loop.run_until_complete(run_job(job, stop))
        except BaseException as exc:  # noqa: BLE001 - handed to the test below
            errors.append(exc)

    thread = threading.Thread(target=main, name="alerts-job", daemon=True)
    thread.start()
    try:
        yield
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=15)
        loop.close()
    assert not thread.is_alive()
    assert not errors, errors


def test_restarted_alertmanager_gets_the_firing_alert_again(
    db_conn, db_url, kiosk_site, alertmanager, webhook, tmp_path
):
    schema, _, _ = kiosk_site
    # Readings a minute into the future too: the wall-clock cycles keep the alert active.
    now = wall_ms()
    put_series(db_conn, schema, "kiosk", "k1", now - 60 * S, now + 60 * S, queue_length=50)
    job = make_job(
        db_url, schema, KIOSK_RULES, tmp_path, interval_s=1.0,
        notify=notify_settings(alertmanager.url),
    )  # fmt: skip
    try:
        with running(job):
            wait_for(lambda: firing(webhook), 10, "the first notification")
            assert [a["labels"]["device_id"] for a in alertmanager.alerts()] == ["k1"]
            alertmanager.kill()
            alertmanager.start(keep_storage=False)
            restarted = time.monotonic()
            wait_for(
                lambda: [a for a in alertmanager.alerts() if a["labels"]["device_id"] == "k1"],
                RESEND_S + 2.0,
                "the re-posted alert",
            )
            assert time.monotonic() - restarted < RESEND_S + 2.0
            # The restarted Alertmanager lost its notification log: it notifies again.
            wait_for(lambda: len(firing(webhook)) == 2, 10, "the second notification")
        assert len(alerts_of(db_conn, schema)) == 1
    finally:
        job.close()


def test_alertmanager_down_never_stops_evaluation(db_conn, db_url, kiosk_site, tmp_path):
    schema, _, _ = kiosk_site
    now = wall_ms()
    put_series(db_conn, schema, "kiosk", "k1", now - 60 * S, now + 60 * S, queue_length=50)
    nobody = f"http://127.0.0.1:{free_port()}"
    job = make_job(
        db_url, schema, KIOSK_RULES, tmp_path, interval_s=1.0, notify=notify_settings(nobody)
    )
    try:
        with running(job):
            wait_for(lambda: job.counters.notify_failures >= 2, 10, "failed posts")
            evaluated = job.counters.evaluations
            wait_for(lambda: job.counters.evaluations >= evaluated + 2, 10, "more evaluations")
        assert job.counters.posts == 0
        [alert] = alerts_of(db_conn, schema)
        assert alert[3] == "active_unack"
        status = job.store.job_status("alerts")
        assert status is not None
        assert status.alertmanager_reachable is False
        assert status.notified_at is None
        assert "unreachable" in (status.notify_error or "")
    finally:
        job.close()


def _text(message: Message) -> str:
    parts = message.walk() if message.is_multipart() else [message]
    texts = []
    for part in parts:
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes):
            texts.append(payload.decode(part.get_content_charset() or "utf-8", "replace"))
    return "\n".join(texts)


def test_email_arrives_with_the_summary(
    db_conn, db_url, kiosk_site, mailing_alertmanager, smtp_sink, tmp_path
):
    schema, _, _ = kiosk_site
    job = make_job(
        db_url, schema, KIOSK_RULES, tmp_path, notify=notify_settings(mailing_alertmanager.url)
    )
    assert job.notifier is not None
    try:
        alert_id = raise_k1(db_conn, schema, job, past_base())
        job.notifier.add([alert_id])
        job.notifier.run(wall_ms())
        [mail] = wait_for(lambda: list(smtp_sink.messages), 15, "the email")
        assert mail["To"] == "ops@cityhub.test"
        summary = alerts_of(db_conn, schema)[0][9]
        assert summary in _text(mail)
    finally:
        job.close()


def test_adapter_maps_refusals_and_outages(alertmanager):
    with pytest.raises(AlertmanagerRefusedError, match="400"):
        post_alerts(alertmanager.url, [{"labels": {}, "annotations": {}}], 2.0)
    with pytest.raises(AlertmanagerUnavailableError, match="unreachable"):
        post_alerts(f"http://127.0.0.1:{free_port()}", [], 2.0)
    post_alerts(alertmanager.url, [{"labels": {"alertname": "x"}}], 2.0)
    assert [a["labels"] for a in alertmanager.alerts()] == [{"alertname": "x"}]
