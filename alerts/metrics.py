"""Prometheus /metrics for the alerts job: its counters, read at scrape time.

It reads a ``JobCounters`` record and knows nothing else of the job. The
names here are what Grafana boards and Prometheus rules read; serving them
is ``adapters.metrics``'s business.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from adapters.metrics import Family, MetricsAddress, MetricsExporter, MetricsServer, counter, gauge
from contracts.schema import ALERT_STATES, SEVERITIES

if TYPE_CHECKING:
    from alerts.service import JobCounters


def alerts_families(counters: JobCounters, now_s: float) -> Iterator[Family]:
    c = counters
    yield counter("cycles", "Cycles run", c.cycles)
    yield gauge("cycle_seconds", "Duration of the last cycle", c.last_cycle_s)
    if c.last_cycle_end_s is not None:
        yield gauge(
            "last_cycle_timestamp_seconds",
            "When the last cycle completed (seconds since the epoch)",
            c.last_cycle_end_s,
        )
    yield counter("evaluations", "Evaluation times evaluated", c.evaluations)
    yield counter(
        "rules_evaluated", "Rules evaluated (rules x evaluation times)", c.rule_evaluations
    )
    yield counter("raised", "Alerts raised", c.raised)
    yield counter("escalated", "Alerts escalated", c.escalated)
    yield counter("cleared", "Alerts cleared", c.cleared)
    yield Family(
        "gauge",
        "alerts",
        "Stored alerts by state and severity (after the last cycle that evaluated)",
        [
            ((state, severity), c.alerts.get((state, severity), 0))
            for state in ALERT_STATES
            for severity in SEVERITIES
        ],
        labels=("state", "severity"),
    )
    yield counter("notifications_posted", "Successful posts to Alertmanager", c.posts)
    yield counter("notified_alerts", "Alerts in successful posts to Alertmanager", c.alerts_posted)
    yield counter("notification_failures", "Failed posts to Alertmanager", c.notify_failures)
    if c.last_post_ms is not None:
        yield gauge(
            "seconds_since_last_post",
            "Seconds since the last successful post to Alertmanager",
            max(0.0, now_s - c.last_post_ms / 1000),
        )


def serve_metrics(host: str, port: int, *, job_id: str, counters: JobCounters) -> MetricsServer:
    """Serve /metrics on ``host``:``port``; SettingsError naming the setting if unbindable."""
    exporter = MetricsExporter(
        prefix="cityhub_alerts",
        instance_label="job",
        instance=job_id,
        collect=lambda: alerts_families(counters, time.time()),
    )
    return exporter.serve(MetricsAddress(host=host, port=port, section="alerts"))
