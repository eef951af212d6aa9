"""Alertmanager payloads from stored alerts (``alerts.notify``) and the job's metrics: pure."""

from __future__ import annotations

from typing import Any

import pytest

from alerts.metrics import alerts_families
from alerts.notify import NotifyRow, alert_summary, postable_alerts, rfc3339
from alerts.service import JobCounters

T0 = 1_900_000_000_000  # 2030-03-17T17:46:40Z
BOARDS = "http://boards.example:3000/"


def row(**changes) -> NotifyRow:
    fields: dict[str, Any] = {
        "alert_id": 7,
        "rule_id": "t-queue",
        "device_id": "k1",
        "severity": "minor",
        "state": "active_unack",
        "value": 52.5,
        "message": "52 waiting at hk-hall (Hoàn Kiếm)",
        "raised_at_ms": T0,
        "cleared_at_ms": None,
        "device_type": "kiosk",
        "device_label": "Quầy 1 (counter 1)",
        "site_id": "hk-hall",
        "site_name": "Hoan Kiem hall",
        "ward_code": "00070",
        "ward": "Phường Hoàn Kiếm",
        "district": "Hoàn Kiếm",
    }
    return NotifyRow(**(fields | changes))


def test_rfc3339_is_utc_with_milliseconds():
    assert rfc3339(T0) == "2030-03-17T17:46:40.000Z"
    assert rfc3339(T0 + 1_234) == "2030-03-17T17:46:41.234Z"
    assert rfc3339(0) == "1970-01-01T00:00:00.000Z"


def test_firing_alert_labels_annotations_and_times():
    [alert] = postable_alerts([row()], T0 + 5_000, ends_after_s=240, boards_url=BOARDS)
    assert alert["labels"] == {
        "alertname": "t-queue",
        "rule_id": "t-queue",
        "severity": "minor",
        "device_type": "kiosk",
        "device_id": "k1",
        "site_id": "hk-hall",
        "ward": "Phường Hoàn Kiếm",
        "ward_code": "00070",
        "district": "Hoàn Kiếm",
    }
    link = "http://boards.example:3000/d/cityhub-device/?var-device=k1"
    assert alert["annotations"]["summary"] == "52 waiting at hk-hall (Hoàn Kiếm)"
    assert alert["annotations"]["value"] == "52.5"
    assert alert["annotations"]["alert_id"] == "7"
    assert alert["annotations"]["board_url"] == link
    assert "Quầy 1 (counter 1)" in alert["annotations"]["description"]
    assert "Phường Hoàn Kiếm" in alert["annotations"]["description"]
    assert alert["generatorURL"] == link
    assert alert["startsAt"] == "2030-03-17T17:46:40.000Z"
    # endsAt: now + 4 resend intervals (240 s), as Prometheus posts.
    assert alert["endsAt"] == rfc3339(T0 + 5_000 + 240_000)


@pytest.mark.parametrize("state", ["cleared_unack", "cleared_ack"])
def test_cleared_alert_is_resolved_at_its_clear_time(state):
    cleared = row(state=state, cleared_at_ms=T0 + 60_000)
    [alert] = postable_alerts([cleared], T0 + 600_000, ends_after_s=240, boards_url=BOARDS)
    assert alert["endsAt"] == rfc3339(T0 + 60_000)
    assert alert["labels"]["severity"] == "minor"


def test_acknowledged_alert_still_fires():
    [alert] = postable_alerts([row(state="active_ack")], T0, ends_after_s=60, boards_url=BOARDS)
    assert alert["endsAt"] == rfc3339(T0 + 60_000)


def test_identity_is_rule_and_device_not_alert_id():
    """Two stored alerts of the same rule and device (a re-raise) are one Alertmanager alert."""
    first, second = postable_alerts(
        [row(alert_id=1), row(alert_id=2, raised_at_ms=T0 + 10_000)],
        T0,
        ends_after_s=60,
        boards_url=BOARDS,
    )
    assert first["labels"] == second["labels"]
    assert "alert_id" not in first["labels"]
    assert first["annotations"]["alert_id"] != second["annotations"]["alert_id"]


def test_missing_place_labels_are_left_out():
    bare = row(site_id=None, ward=None, ward_code=None, district=None, site_name="")
    [alert] = postable_alerts([bare], T0, ends_after_s=60, boards_url=BOARDS)
    assert set(alert["labels"]) == {"alertname", "rule_id", "severity", "device_type", "device_id"}
    assert alert["annotations"]["description"].startswith("t-queue: kiosk k1 (Quầy 1")


def test_escalation_resolves_the_severity_it_left():
    escalated = row(severity="major", superseded=(("minor", T0 + 30_000),))
    firing, resolved = postable_alerts([escalated], T0 + 40_000, ends_after_s=60, boards_url=BOARDS)
    assert firing["labels"]["severity"] == "major"
    assert firing["endsAt"] == rfc3339(T0 + 100_000)
    assert resolved["labels"] == firing["labels"] | {"severity": "minor"}
    assert resolved["endsAt"] == rfc3339(T0 + 30_000)


def test_value_none_and_summary_source():
    silent = row(value=None, message="k1 silent for 90 s")
    [alert] = postable_alerts([silent], T0, ends_after_s=60, boards_url=BOARDS)
    assert alert["annotations"]["value"] == ""
    assert alert["annotations"]["summary"] == alert_summary(silent) == "k1 silent for 90 s"


def test_board_link_quotes_the_device_id_and_trims_the_slash():
    [alert] = postable_alerts(
        [row(device_id="aq-01")], T0, ends_after_s=60, boards_url="https://boards.hanoi.vn"
    )
    assert alert["generatorURL"] == "https://boards.hanoi.vn/d/cityhub-device/?var-device=aq-01"


def test_metrics_families_read_the_counters():
    counters = JobCounters(
        cycles=3,
        rule_evaluations=12,
        posts=2,
        notify_failures=1,
        last_post_ms=T0,
        alerts={("active_unack", "minor"): 4},
    )
    families = {f.name: f for f in alerts_families(counters, T0 / 1000 + 30)}
    assert families["cycles"].samples == [((), 3)]
    assert families["rules_evaluated"].samples == [((), 12)]
    assert families["notifications_posted"].samples == [((), 2)]
    assert families["notification_failures"].samples == [((), 1)]
    assert families["seconds_since_last_post"].samples == [((), 30.0)]
    by_state = dict(families["alerts"].samples)
    assert by_state[("active_unack", "minor")] == 4
    assert by_state[("cleared_ack", "critical")] == 0
    # Before the first post there is no age to report, nor a last cycle before the first.
    assert "seconds_since_last_post" not in {f.name for f in alerts_families(JobCounters(), 0)}
    assert "last_cycle_timestamp_seconds" not in {f.name for f in alerts_families(JobCounters(), 0)}
    ended = JobCounters(cycles=1, last_cycle_end_s=T0 / 1000)
    families = {f.name: f for f in alerts_families(ended, T0 / 1000 + 30)}
    assert families["last_cycle_timestamp_seconds"].samples == [((), T0 / 1000)]
