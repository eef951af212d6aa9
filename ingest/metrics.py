"""Counters of one ingest worker, and Prometheus /metrics for them.

``IngestCounters`` is what the service counts (monotonic totals) plus the
latency samples of the current stats interval; ``serve_metrics`` exposes the
totals, commit latency and lag histograms on ``ingest.metrics_host`` (loopback
by default). Readings per second
is ``rate(cityhub_ingest_readings_total[1m])`` in Prometheus. Writing the
stats rows for Grafana is the service's business (it reads these counters).
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final

from adapters.metrics import (
    Family,
    MetricsAddress,
    MetricsExporter,
    MetricsServer,
    check_ports,
    counter,
    counters_by,
    gauge,
)

# Commit latency buckets: a small group commits in ~5 ms on loopback, a full
# one (32k rows) in ~0.15-0.3 s; the tail up to the 30 s commit timeout.
COMMIT_BUCKETS_S: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Lag (commit time - the gateway's sent_ms): gateways batch for ~0.2 s, so a
# live stream sits around 0.2-1 s; a drained backlog can be hours old.
LAG_BUCKETS_S: Final = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600, 86400)
# Latency samples kept per stats interval: at most one per commit, and a
# worker commits at most a few hundred times a second.
_SAMPLES_MAX: Final = 100_000


@dataclass
class IngestCounters:
    """Monotonic totals of one worker; read by /metrics and the stats rows."""

    received: int = 0  # batch messages taken from the broker
    batches: int = 0  # batches written for the first time
    replayed: int = 0  # batches (and poison) recognised as already committed
    poison: int = 0  # whole messages refused (new ones)
    readings: int = 0  # rows inserted
    duplicates: int = 0  # rows dropped by ON CONFLICT DO NOTHING
    rejects: Counter[str] = field(default_factory=Counter)  # rejects rows by reason
    commits: int = 0
    db_errors: int = 0  # failed database calls (each is retried after a backoff)
    db_timeouts: int = 0  # calls cut after commit_timeout_s
    acks_published: int = 0
    mqtt_acks: int = 0
    mqtt_acks_skipped: int = 0  # deliveries of an earlier connection
    states: int = 0  # gateway state messages stored
    states_rejected: int = 0  # gateway state messages refused (new ones)
    states_ignored: int = 0  # states of a revoked gateway, not its final one
    states_dropped: int = 0  # gateway state messages dropped from a full queue
    commands_dispatched: int = 0  # command ids sent to gateways (commands and cancels)
    command_reports_stored: int = 0  # command states stored for the first time
    command_reports_refused: int = 0  # reports (and whole report messages) refused
    commit_samples_s: deque[float] = field(default_factory=lambda: deque(maxlen=_SAMPLES_MAX))
    lag_samples_s: deque[float] = field(default_factory=lambda: deque(maxlen=_SAMPLES_MAX))
    lock: threading.Lock = field(default_factory=threading.Lock)


_TOTALS = {
    "received": "Batch messages taken from the broker",
    "batches": "Batches committed for the first time",
    "replayed": "Messages recognised as already committed (acked again, not rewritten)",
    "poison": "Messages refused as a whole and stored as rejects",
    "readings": "Readings inserted",
    "duplicates": "Readings dropped as already stored",
    "commits": "Database transactions committed",
    "db_errors": "Failed database calls, retried after a backoff",
    "db_timeouts": "Database calls cut after commit_timeout_s",
    "acks_published": "Ack messages published to gateways",
    "mqtt_acks": "Batch messages acked to the broker",
    "mqtt_acks_skipped": "Acks skipped because the message came on an earlier connection",
    "states": "Gateway state messages stored",
    "states_rejected": "Gateway state messages refused and stored as rejects",
    "states_ignored": "Gateway state messages of revoked gateways, ignored",
    "states_dropped": "Gateway state messages dropped while the database was behind",
    "commands_dispatched": "Commands and cancels sent to gateways (each resend counts)",
    "command_reports_stored": "Command states reported by gateways and stored",
    "command_reports_refused": "Command reports refused and stored as rejects",
}


class IngestMetrics:
    """Prometheus view of one worker: totals from the counters, two histograms."""

    def __init__(self, counters: IngestCounters, worker_id: str) -> None:
        self.counters = counters
        self.worker_id = worker_id
        self.exporter = MetricsExporter(
            prefix="cityhub_ingest",
            instance_label="worker",
            instance=worker_id,
            collect=self._families,
        )
        self.commit_seconds = self.exporter.histogram(
            "commit_seconds", "Database commit latency of a group of batches", COMMIT_BUCKETS_S
        )
        self.lag_seconds = self.exporter.histogram(
            "lag_seconds", "Commit time minus the gateway's sent time, per batch", LAG_BUCKETS_S
        )
        # Read at scrape time; the service points these at its own state.
        self.queue_depth: Callable[[], int] = lambda: 0
        self.broker_connected: Callable[[], bool] = lambda: False
        self.db_connected = False  # set by the committer after each attempt

    def observe_commit(self, seconds: float) -> None:
        self.commit_seconds.observe(seconds)
        with self.counters.lock:
            self.counters.commit_samples_s.append(seconds)

    def observe_lag(self, seconds: float) -> None:
        self.lag_seconds.observe(seconds)
        with self.counters.lock:
            self.counters.lag_samples_s.append(seconds)

    def _families(self) -> Iterator[Family]:
        c = self.counters
        for name, help_text in _TOTALS.items():
            yield counter(name, help_text, getattr(c, name))
        yield counters_by("rejects", "Rejects rows stored, by reason", c.rejects, label="reason")
        yield gauge("queue_messages", "Batch messages received, not acked", self.queue_depth())
        yield gauge("db_connected", "Last database call succeeded", int(self.db_connected))
        yield gauge("broker_connected", "Broker connection up", int(self.broker_connected()))


def serve_metrics(metrics: IngestMetrics, host: str, port: int) -> MetricsServer:
    """Serve /metrics on ``host``:``port`` in a daemon thread.

    An address that cannot be bound (port taken or privileged, host not this
    machine's) is a SettingsError naming the setting: the worker checks it
    before it connects anywhere.
    """
    return metrics.exporter.serve(MetricsAddress(host, port, section="ingest"))


def check_metrics_ports(host: str, first_port: int, count: int) -> None:
    """Raise SettingsError unless ``first_port`` .. ``first_port + count - 1`` can be bound now.

    The supervisor of several workers checks their ports before it starts
    any: a worker that found its port taken would only die and be restarted.
    A port taken between this check and the worker's start is still that
    worker's SettingsError.
    """
    check_ports(MetricsAddress(host, first_port, section="ingest"), count)
