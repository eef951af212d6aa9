"""Alertmanager v2 alerts from stored alerts: labels, annotations, times. Pure.

``postable_alerts(rows, now_ms, ...)`` turns the alerts to announce (the
active ones and the recently cleared ones, each with its device, site and
ward as ``NotifyRow``) into the JSON list that Alertmanager's
``POST /api/v2/alerts`` takes:

- labels identify the alert to Alertmanager: ``alertname`` (the rule id),
  ``rule_id``, ``severity``, ``device_type``, ``device_id``, ``site_id``,
  ``ward`` and ``ward_code`` (the site's current ward/commune) and
  ``district`` (the former district, when the site has one). No alert id: a
  re-post of the same (rule, device) must be the same Alertmanager alert;
- annotations say what happened: ``summary`` (``alert_summary``, the one
  place the text comes from), ``description``, ``value``, ``alert_id`` and
  ``board_url`` (the device's board);
- ``startsAt`` is when the alert was raised; ``endsAt`` is ``now`` plus
  ``ends_after_s`` while it fires (Prometheus posts 4 resend intervals
  ahead, so an alert nobody re-posts ends by itself), and the clear time
  once cleared (Alertmanager then reports it resolved).

An escalated alert's severity label changes, which to Alertmanager is a new
alert: each severity it held before (``NotifyRow.superseded``, with the time
it was left) is posted as resolved beside it, so the old one does not fire
on until its endsAt.

``silence_for(...)`` is the Alertmanager silence of an acknowledged alert:
matchers on ``rule_id``, ``device_id`` and ``severity`` (an escalation is a
new severity, which needs a new acknowledgement: the old silence must not
hide it), from ``now`` to the acknowledgement plus ``silence_s``, by the
operator, with their comment or ``DEFAULT_SILENCE_COMMENT``.

What to post when, and the posting itself, are the job's, the commands' and
``adapters.alertmanager``'s business.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import quote

import msgspec

# The device board (grafana) and its device variable.
DEVICE_BOARD_UID: Final = "cityhub-device"
ACTIVE_STATES: Final = frozenset({"active_unack", "active_ack"})
DEFAULT_SILENCE_COMMENT: Final = "Đã xác nhận / acknowledged in cityhub"


class NotifyRow(msgspec.Struct, frozen=True, kw_only=True):
    """A stored alert with what its notification says about the device and the place."""

    alert_id: int
    rule_id: str
    device_id: str
    severity: str
    state: str
    value: float | None
    message: str
    raised_at_ms: int
    cleared_at_ms: int | None
    device_type: str
    device_label: str = ""
    site_id: str | None = None
    site_name: str = ""
    ward_code: str | None = None
    ward: str | None = None
    district: str | None = None
    # Severities the alert held before its current one: (severity, left at ms).
    superseded: tuple[tuple[str, int], ...] = ()


def rfc3339(ms: int) -> str:
    """UTC time with milliseconds, as Alertmanager's API writes it: 2030-03-17T17:46:40.000Z."""
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def board_url(boards_url: str, device_id: str) -> str:
    """The device's board, with its ``device`` variable set."""
    return f"{boards_url.rstrip('/')}/d/{DEVICE_BOARD_UID}/?var-device={quote(device_id)}"


def alert_summary(row: NotifyRow) -> str:
    """The notification's one-line text: the alert's stored message."""
    return row.message


def _value_text(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


def alert_description(row: NotifyRow) -> str:
    """Rule, device, place and value in one line, for receivers that show more than the summary."""
    device = f"{row.device_id} ({row.device_label})" if row.device_label else row.device_id
    place = ", ".join(p for p in (row.site_name or row.site_id or "", row.ward or "") if p)
    parts = [f"{row.rule_id}: {row.device_type} {device}"]
    if place:
        parts.append(f"at {place}")
    if row.value is not None:
        parts.append(f"value {_value_text(row.value)}")
    return " ".join(parts) + f" [{row.severity}, {row.state}]"


def alert_labels(row: NotifyRow, severity: str | None = None) -> dict[str, str]:
    """The labels: what identifies the alert to Alertmanager (no alert id)."""
    labels = {
        "alertname": row.rule_id,
        "rule_id": row.rule_id,
        "severity": severity or row.severity,
        "device_type": row.device_type,
        "device_id": row.device_id,
    }
    optional = {
        "site_id": row.site_id,
        "ward": row.ward,
        "ward_code": row.ward_code,
        "district": row.district,
    }
    labels.update({k: v for k, v in optional.items() if v})
    return labels


def postable_alerts(
    rows: Sequence[NotifyRow], now_ms: int, *, ends_after_s: float, boards_url: str
) -> list[dict[str, Any]]:
    """The v2 ``postableAlerts`` for ``rows`` at ``now_ms`` (see the module docstring)."""
    alerts: list[dict[str, Any]] = []
    firing_ends = rfc3339(now_ms + round(ends_after_s * 1000))
    for row in rows:
        link = board_url(boards_url, row.device_id)
        annotations = {
            "summary": alert_summary(row),
            "description": alert_description(row),
            "value": _value_text(row.value),
            "alert_id": str(row.alert_id),
            "board_url": link,
        }
        active = row.state in ACTIVE_STATES or row.cleared_at_ms is None
        ends = firing_ends if active else rfc3339(row.cleared_at_ms or now_ms)
        alerts.append(
            {
                "labels": alert_labels(row),
                "annotations": annotations,
                "startsAt": rfc3339(row.raised_at_ms),
                "endsAt": ends,
                "generatorURL": link,
            }
        )
        for severity, left_ms in row.superseded:
            if severity == row.severity:
                continue
            alerts.append(
                {
                    "labels": alert_labels(row, severity),
                    "annotations": annotations,
                    "startsAt": rfc3339(row.raised_at_ms),
                    "endsAt": rfc3339(max(left_ms, row.raised_at_ms)),
                    "generatorURL": link,
                }
            )
    return alerts


def silence_for(
    *,
    rule_id: str,
    device_id: str,
    severity: str,
    now_ms: int,
    ends_ms: int,
    created_by: str,
    comment: str | None,
) -> dict[str, Any]:
    """The v2 ``postableSilence`` of one acknowledged alert (see the module docstring)."""
    matchers = [
        {"name": name, "value": value, "isRegex": False, "isEqual": True}
        for name, value in (("rule_id", rule_id), ("device_id", device_id), ("severity", severity))
    ]
    return {
        "matchers": matchers,
        "startsAt": rfc3339(now_ms),
        "endsAt": rfc3339(ends_ms),
        "createdBy": created_by,
        "comment": comment or DEFAULT_SILENCE_COMMENT,
    }
