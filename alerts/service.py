"""The alerts job: incremental windows, rule evaluation, alert lifecycle and AQI, on a clock.

Each cycle (``AlertsJob.run_cycle``):

1. reads the job's last completed evaluation time and chooses the
   evaluation times to run (``alerts.window.evaluation_times``): the newest
   multiple of ``interval_s`` that is ``evaluation_delay_s`` old, or, after
   downtime, every missed one from at most ``max_catchup_s`` back,
   ``catchup_steps_per_cycle`` at a time;
2. reloads the device list every ``devices_refresh_s``; a device not yet
   read (at start, or registered since) gets its newest ``window_samples``
   samples up to the time before the first evaluation (and, for air-quality
   monitors, the AQI ring's hours: the finished ones from the hourly
   rollups, only those not rolled up yet and the hour in progress from raw
   rows);
3. fetches, per device type, only the rows after each device's newest
   sample up to the last evaluation time (``AlertStore.fetch_samples``);
4. for each evaluation time, oldest first: shifts that time's rows into the
   (devices x samples) buffers and the hourly means; evaluates every rule
   over its type's window (``alerts.evaluate``); plans the alert changes
   (``alerts.lifecycle``); computes the AQI rows of the hours that changed
   (a finished hour at once; the hour in progress at a cycle's last
   evaluation time if that is a multiple of ``aqi_interval_s``;
   ``alerts.aqijob``); and stores all of it with the evaluation time in one
   transaction (``AlertStore.evaluation``).

The buffers hold data, not decisions: a failed transaction leaves them ahead
of the stored evaluation time, and the retried evaluation sees the same
samples (cursors only move forward). A restarted job rebuilds them from the
database and continues after the last stored evaluation time.

``serve`` runs cycles until SIGINT/SIGTERM, backing off while the database
is unavailable, and, with ``alerts.notify.alertmanager_url`` set, a
notifier task beside them (``Notifier``): after a cycle that changed alerts
it posts those alerts to Alertmanager at once, and every ``resend_s`` it
posts every active alert and those cleared in the last ``resolved_for_s``
(read from the database, so a restarted job or Alertmanager loses nothing;
``alerts.notify`` builds the payload). Posting runs in its own task and
thread: an Alertmanager that is down or hangs never holds up evaluation. Its
failures are counted, logged sparingly and answered with backoff; the last
successful post and the last error are stored in ``alert_jobs``. After each
post it looks after the silences of acknowledgements (``Notifier.sync_silences``):
it expires those of the alerts it posted that are no longer ``active_ack``
(cleared, or escalated), and on a full post also creates the silences that
`cityhub alerts ack` could not (Alertmanager unreachable at the time). With
``metrics_port`` set, /metrics serves the job's counters (``alerts.metrics``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Final

import msgspec
import numpy as np

from adapters.alertmanager import create_silence, expire_silence, post_alerts
from adapters.backoff import backoff_delay_s
from adapters.loglimit import LogLimiter, should_log_attempt
from adapters.serve import serve as run_service
from alerts.aqijob import (
    HOUR_MS,
    POLLUTANTS,
    SLOTS,
    DailyRow,
    HourlyMeans,
    HourlyRow,
    daily_rows,
    days_of,
    hourly_rows,
)
from alerts.evaluate import evaluate_all
from alerts.lifecycle import (
    Change,
    Clear,
    Escalate,
    OpenAlert,
    Raise,
    plan_changes,
    was_active,
)
from alerts.notify import postable_alerts, silence_for
from alerts.rules import (
    VN_AQI_METRIC,
    AlertTexts,
    NoData,
    Rule,
    Window,
    leaves,
    load_rules,
    lookback_ms,
    render_texts,
)
from alerts.store import AlertStore, SitePlace
from alerts.window import NO_TS, DeviceSet, SampleBuffer, Samples, evaluation_times
from contracts.errors import (
    AlertmanagerRefusedError,
    HubError,
    SchemaError,
    SettingsError,
    UnavailableError,
)
from contracts.schema import SEVERITIES
from contracts.settings import AlertsSettings, DatabaseSettings, NotifySettings

logger = logging.getLogger(__name__)

AQI_TYPE: Final = "air_quality"
# Log a continuing database outage once, then every this many retries.
RETRY_LOG_EVERY: Final = 10
# Firing alerts are posted with endsAt this many resend intervals ahead (Prometheus's factor).
ENDS_AFTER_RESENDS: Final = 4
# A failing notifier logs one line per kind of failure per 5 minutes; its counters keep all.
NOTIFY_LOG_SPAN_S: Final = 300.0


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def rule_paths(settings: AlertsSettings) -> list[Path]:
    """The operator's rule files: ``rules_path`` itself, or the *.toml files of a directory."""
    if not settings.rules_path:
        return []
    path = Path(settings.rules_path).expanduser()
    if path.is_dir():
        return sorted(path.glob("*.toml"))
    return [path]


def load_job_rules(settings: AlertsSettings) -> tuple[Rule, ...]:
    return load_rules(rule_paths(settings), include_defaults=settings.include_default_rules)


def rule_metrics(rules: Sequence[Rule]) -> dict[str, tuple[str, ...]]:
    """Per device type, the catalog metrics its rules read (``vn_aqi`` is derived, not read)."""
    metrics: dict[str, dict[str, None]] = {}
    for rule in rules:
        wanted = metrics.setdefault(rule.device_type, {})
        for leaf in leaves(rule.condition):
            metric = getattr(leaf, "metric", None)
            if isinstance(metric, str) and metric != VN_AQI_METRIC:
                wanted[metric] = None
    return {t: tuple(m) for t, m in metrics.items()}


def window_width(rules: Sequence[Rule], settings: AlertsSettings) -> int:
    """Samples per device for ``rules`` (of one type): their lookback at ``sample_period_s``.

    One interval more (a threshold's anchor is the sample before its span)
    and one sample more (both ends of the span count).
    """
    span_ms = max(lookback_ms(r) for r in rules) + round(settings.interval_s * 1000)
    samples = math.ceil(span_ms / (settings.sample_period_s * 1000)) + 1
    return max(2, min(settings.max_window_samples, samples))


def _needs_samples(rules: Sequence[Rule]) -> bool:
    return any(not isinstance(leaf, NoData) for r in rules for leaf in leaves(r.condition))


class CycleReport(msgspec.Struct, kw_only=True):
    """What one cycle did, with its timings."""

    evaluated: list[int] = msgspec.field(default_factory=list)  # evaluation times (ms)
    behind: bool = False  # more missed evaluation times remain
    rows: int = 0  # sample rows fetched
    raised: int = 0
    escalated: int = 0
    cleared: int = 0
    aqi_hourly: int = 0
    aqi_daily: int = 0
    load_s: float = 0.0  # device list and first loads of devices
    fetch_s: float = 0.0
    evaluate_s: float = 0.0  # buffers, rules, lifecycle and AQI arithmetic
    write_s: float = 0.0
    changed: list[int] = msgspec.field(default_factory=list)  # ids of alerts changed

    def count(self, changes: Sequence[Change]) -> None:
        for change in changes:
            if isinstance(change, Raise):
                self.raised += 1
            elif isinstance(change, Escalate):
                self.escalated += 1
            elif isinstance(change, Clear):
                self.cleared += 1


class JobCounters(msgspec.Struct, kw_only=True):
    """What the job did since it started, for /metrics (``alerts.metrics``)."""

    cycles: int = 0
    evaluations: int = 0
    rule_evaluations: int = 0
    raised: int = 0
    escalated: int = 0
    cleared: int = 0
    last_cycle_s: float = 0.0
    # (state, severity) -> alerts, counted after each cycle that evaluated.
    alerts: dict[tuple[str, str], int] = msgspec.field(default_factory=dict)
    posts: int = 0  # successful posts to Alertmanager
    alerts_posted: int = 0  # alerts in them
    notify_failures: int = 0
    last_post_ms: int | None = None
    # Wall-clock time (s since the epoch) the last cycle completed: a health
    # check sees a hung job by its age (`cityhub alerts health`).
    last_cycle_end_s: float | None = None


class Notifier:
    """Posts alerts to Alertmanager: the changed ones at once, all of them every ``resend_s``.

    ``add`` (from the cycle) queues changed alert ids; ``run`` (in a thread,
    one at a time) posts what is due. After a failed post nothing is posted
    until the backoff has passed, and the next post is a full one: it covers
    whatever changed meanwhile and an Alertmanager that restarted empty.
    """

    def __init__(
        self,
        *,
        store: AlertStore,
        settings: NotifySettings,
        counters: JobCounters,
        rng: random.Random | None = None,
    ) -> None:
        if settings.resend_s <= 0 or settings.timeout_s <= 0:
            raise SettingsError("alerts.notify", "resend_s and timeout_s must be positive")
        self.store = store
        self.settings = settings
        self.counters = counters
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self._lock = threading.Lock()  # the queue, shared with the cycles
        self._run_lock = threading.Lock()  # one run at a time
        self._pending: set[int] = set()
        self._full_due_ms = 0  # the first run posts everything
        self._retry_at_ms = 0
        self._attempt = 0
        self._limiter = LogLimiter(limit=1, span=NOTIFY_LOG_SPAN_S)

    def add(self, alert_ids: Sequence[int]) -> None:
        with self._lock:
            self._pending.update(alert_ids)

    def next_run_s(self, now_ms: int) -> float:
        """Seconds until a post is due with nothing new queued."""
        due = max(self._full_due_ms, self._retry_at_ms)
        return max(0.0, (due - now_ms) / 1000)

    def run(self, now_ms: int) -> int:
        """Post what is due at ``now_ms``; returns the alerts posted. Never raises a HubError."""
        with self._run_lock:
            return self._run(now_ms)

    def _run(self, now_ms: int) -> int:
        if now_ms < self._retry_at_ms:
            return 0
        s = self.settings
        full = now_ms >= self._full_due_ms
        with self._lock:
            pending = sorted(self._pending)
            self._pending.clear()
        if not full and not pending:
            return 0
        try:
            if full:
                since = now_ms - round(s.resolved_for_s * 1000)
                rows = self.store.notify_rows(cleared_since_ms=since)
            else:
                rows = self.store.notify_rows(alert_ids=pending)
            alerts = postable_alerts(
                rows,
                now_ms,
                ends_after_s=ENDS_AFTER_RESENDS * s.resend_s,
                boards_url=s.boards_url,
            )
            if alerts:
                post_alerts(s.alertmanager_url, alerts, s.timeout_s)
        except HubError as exc:
            self._failed(now_ms, exc, pending)
            return 0
        if full:
            self._full_due_ms = now_ms + round(s.resend_s * 1000)
        self.sync_silences(now_ms, None if full else pending)
        if not alerts:  # nothing sent: Alertmanager's state is as unknown as before
            return 0
        if self._attempt:
            logger.info("Alertmanager took a post again after %d failures", self._attempt)
        self._attempt = 0
        self.counters.posts += 1
        self.counters.alerts_posted += len(alerts)
        self.counters.last_post_ms = now_ms
        try:
            self.store.record_notified(now_ms)
        except HubError as exc:  # the database's own retry loop reports it
            logger.debug("could not record the post: %s", exc)
        return len(alerts)

    def sync_silences(self, now_ms: int, alert_ids: Sequence[int] | None = None) -> None:
        """Expire the silences of alerts no longer acknowledged and active; create missing ones.

        Among ``alert_ids``, or every alert (None). A failure is logged and
        left for the next full post. Never raises a HubError.
        """
        s = self.settings
        url = s.alertmanager_url
        try:
            create, expire = self.store.silences_due(
                now_ms=now_ms, silence_s=s.silence_s, alert_ids=alert_ids
            )
            for alert_id, silence_id in expire:
                expire_silence(url, silence_id, s.timeout_s)
                self.store.forget_silence(alert_id, silence_id)
                logger.info(
                    "expired silence %s of alert %d",
                    silence_id,
                    alert_id,
                    extra={"alert_id": alert_id},
                )
            for due in create:
                silence = silence_for(
                    rule_id=due.rule_id,
                    device_id=due.device_id,
                    severity=due.severity,
                    now_ms=now_ms,
                    ends_ms=due.acked_at_ms + round(s.silence_s * 1000),
                    created_by=due.acked_by,
                    comment=due.ack_comment,
                )
                silence_id = create_silence(url, silence, s.timeout_s)
                if not self.store.set_silence(due.alert_id, silence_id):
                    expire_silence(url, silence_id, s.timeout_s)  # changed meanwhile
                else:
                    logger.info(
                        "created silence %s of acknowledged alert %d",
                        silence_id,
                        due.alert_id,
                        extra={"alert_id": due.alert_id, "device_id": due.device_id},
                    )
        except HubError as exc:
            if self._limiter.allow(f"silence {type(exc).__name__}", time.monotonic()):
                logger.warning("could not sync the silences of acknowledged alerts: %s", exc)

    def _failed(self, now_ms: int, exc: HubError, pending: Sequence[int]) -> None:
        s = self.settings
        self.counters.notify_failures += 1
        self._attempt += 1
        if isinstance(exc, AlertmanagerRefusedError):
            # The same alerts would be refused again: wait for the next full post.
            self._retry_at_ms = now_ms + round(s.resend_s * 1000)
        else:
            delay_s = backoff_delay_s(
                self._attempt, min_s=s.retry_min_s, max_s=s.retry_max_s, draw=self._rng.random()
            )
            self._retry_at_ms = now_ms + round(delay_s * 1000)
        self._full_due_ms = self._retry_at_ms
        with self._lock:
            self._pending.update(pending)
        kind = type(exc).__name__
        if self._limiter.allow(kind, time.monotonic()):
            level = logging.ERROR if isinstance(exc, AlertmanagerRefusedError) else logging.WARNING
            logger.log(
                level,
                "notification failed (%d so far, next try in %.1f s): %s",
                self.counters.notify_failures,
                (self._retry_at_ms - now_ms) / 1000,
                exc,
            )
        try:
            self.store.record_notify_error(now_ms, str(exc))
        except HubError as db_exc:
            logger.debug("could not record the notification error: %s", db_exc)


class AlertsJob:
    """The job's state (buffers, hourly means, device lists) and one database connection."""

    def __init__(
        self,
        *,
        settings: AlertsSettings,
        database: DatabaseSettings,
        rules: Sequence[Rule],
    ) -> None:
        if database.url is None:
            raise SettingsError("database.url", "the alerts job needs the database URL")
        if settings.interval_s <= 0:
            raise SettingsError("alerts.interval_s", "must be positive")
        self.settings = settings
        self.rules = tuple(rules)
        self.store = AlertStore(
            url=database.url,
            schema=database.schema,
            job_id=settings.job_id,
            connect_timeout_s=database.connect_timeout_s,
        )
        self.interval_ms = round(settings.interval_s * 1000)
        self.aqi_interval_ms = max(1, round(settings.aqi_interval_s * 1000))
        self.buffers: dict[str, SampleBuffer] = {}
        metrics = rule_metrics(self.rules)
        for device_type, type_metrics in metrics.items():
            typed = [r for r in self.rules if r.device_type == device_type]
            width = window_width(typed, settings) if _needs_samples(typed) else 1
            self.buffers[device_type] = SampleBuffer(
                device_type=device_type, metrics=type_metrics, width=max(1, width)
            )
        self.means: HourlyMeans | None = None
        if settings.aqi:
            self.means = HourlyMeans(DeviceSet((), (), ()))
            self.buffers.setdefault(
                AQI_TYPE, SampleBuffer(device_type=AQI_TYPE, metrics=(), width=1)
            )
        self._pending_aqi: set[tuple[str, int]] = set()  # (device id, hour)
        self._devices_at_ms: int | None = None
        self.counters = JobCounters()
        self.notifier: Notifier | None = None
        if settings.notify.alertmanager_url:
            self.notifier = Notifier(
                store=self.store, settings=settings.notify, counters=self.counters
            )
        self.places: dict[str, SitePlace] = {}

    def close(self) -> None:
        self.store.close()

    def interrupt(self) -> None:
        """Cut a database call that hangs (any thread): the cycle fails and is retried."""
        self.store.interrupt()

    # -- loading ---------------------------------------------------------------------

    def _fetch_metrics(self, device_type: str) -> tuple[str, ...]:
        metrics = self.buffers[device_type].metrics
        if device_type == AQI_TYPE and self.means is not None:
            metrics = tuple(dict.fromkeys((*metrics, *POLLUTANTS)))
        return metrics

    def _refresh_devices(self, now_ms: int) -> None:
        due = self._devices_at_ms is None or (
            now_ms - self._devices_at_ms >= self.settings.devices_refresh_s * 1000
        )
        if not due:
            return
        devices = self.store.devices()
        self.places = self.store.site_places()
        for device_type, buffer in self.buffers.items():
            current = devices.get(device_type, DeviceSet((), (), ()))
            if current != buffer.devices:
                buffer.reindex(current)
                if device_type == AQI_TYPE and self.means is not None:
                    self.means.reindex(current)
        self._devices_at_ms = now_ms

    def _load_new_devices(self, base_ms: int) -> None:
        """Read the history up to ``base_ms`` of devices not read yet."""
        for device_type, buffer in self.buffers.items():
            fresh = np.flatnonzero(~buffer.loaded)
            if not len(fresh):
                continue
            ids = [buffer.devices.device_ids[i] for i in fresh.tolist()]
            samples = self.store.fetch_samples(
                device_type=device_type,
                metrics=buffer.metrics,
                device_ids=ids,
                device_index=fresh.astype(np.int64),
                since_ms=np.full(len(fresh), NO_TS, np.int64),
                upto_ms=base_ms,
                newest=buffer.width,
            )
            buffer.append(samples)
            if device_type == AQI_TYPE and self.means is not None:
                self._load_hourly_sums(fresh, ids, base_ms)
            buffer.loaded[fresh] = True
            logger.info("read the history of %d %s devices", len(fresh), device_type)

    def _load_hourly_sums(self, fresh: np.ndarray, ids: list[str], base_ms: int) -> None:
        """Fill the AQI ring of ``fresh`` devices with the SLOTS hours up to ``base_ms``.

        Finished hours come from the hourly rollup (a mean per device-hour,
        entered as ``n`` readings of that mean); the hours it does not hold
        for these devices (not rolled up yet: the rollups lag, or a gap) and
        the hour in progress are summed from raw rows, one range per run of
        such hours.
        """
        if self.means is None:
            return
        first_hour = base_ms // HOUR_MS - SLOTS + 1
        base_hour = base_ms // HOUR_MS
        index, hours, readings, means = self.store.rollup_hourly_means(
            metrics=POLLUTANTS, device_ids=ids, from_hour=first_hour, to_hour=base_hour
        )
        present = ~np.isnan(means)
        counts = np.where(present, readings[:, None], 0.0)
        self.means.add(fresh[index], hours, counts, np.where(present, means, 0.0) * counts)
        devices, all_hours = [fresh[index]], [hours]
        held = set(np.unique(hours).tolist())
        for start, stop in _runs([h for h in range(first_hour, base_hour + 1) if h not in held]):
            index, hours, counts, sums = self.store.hourly_sums(
                metrics=POLLUTANTS,
                device_ids=ids,
                from_ms=start * HOUR_MS,
                upto_ms=base_ms,
                before_ms=stop * HOUR_MS if stop <= base_hour else None,
            )
            self.means.add(fresh[index], hours, counts, sums)
            devices.append(fresh[index])
            all_hours.append(hours)
        # Their newest hour is recomputed (and so known to the rules) at the next cycle.
        newest = np.full(len(self.means.devices), -1, np.int64)
        np.maximum.at(newest, np.concatenate(devices), np.concatenate(all_hours))
        ids_all = self.means.devices.device_ids
        self._pending_aqi.update(
            (ids_all[d], int(newest[d])) for d in np.flatnonzero(newest >= 0).tolist()
        )

    # -- one cycle ------------------------------------------------------------------

    def run_cycle(self, now_ms: int) -> CycleReport:
        """Evaluate every due evaluation time up to ``now_ms`` (see the module docstring)."""
        started = time.perf_counter()
        report = self._run_cycle(now_ms)
        c = self.counters
        c.cycles += 1
        c.last_cycle_s = time.perf_counter() - started
        c.last_cycle_end_s = time.time()
        if report.evaluated:
            c.evaluations += len(report.evaluated)
            c.rule_evaluations += len(report.evaluated) * len(self.rules)
            c.raised += report.raised
            c.escalated += report.escalated
            c.cleared += report.cleared
            c.alerts = self.store.alert_counts()
        return report

    def _run_cycle(self, now_ms: int) -> CycleReport:
        report = CycleReport()
        started = time.perf_counter()
        s = self.settings
        last = self.store.last_evaluation_ms()
        times = evaluation_times(
            last,
            now_ms,
            interval_ms=self.interval_ms,
            delay_ms=round(s.evaluation_delay_s * 1000),
            max_catchup_ms=round(s.max_catchup_s * 1000),
            max_steps=s.catchup_steps_per_cycle,
        )
        if not times:
            return report
        if last is not None and times[0] > last + self.interval_ms:
            logger.warning(
                "skipping evaluations from %d to %d ms (beyond max_catchup_s %.0f s)",
                last + self.interval_ms,
                times[0] - self.interval_ms,
                s.max_catchup_s,
            )
        newest_due = (now_ms - round(s.evaluation_delay_s * 1000)) // self.interval_ms
        report.behind = times[-1] < newest_due * self.interval_ms
        self._refresh_devices(now_ms)
        self._load_new_devices(times[0] - self.interval_ms)
        report.load_s = time.perf_counter() - started

        started = time.perf_counter()
        fetched: dict[str, Samples] = {}
        for device_type, buffer in self.buffers.items():
            if not len(buffer):
                continue
            cursors = buffer.cursors
            fetched[device_type] = self.store.fetch_samples(
                device_type=device_type,
                metrics=self._fetch_metrics(device_type),
                device_ids=buffer.devices.device_ids,
                device_index=np.arange(len(buffer), dtype=np.int64),
                since_ms=cursors,
                upto_ms=times[-1],
            )
            report.rows += len(fetched[device_type])
        report.fetch_s = time.perf_counter() - started

        previous = times[0] - self.interval_ms
        for i, t in enumerate(times):
            step = {
                k: v.select((v.ts_ms > previous) & (v.ts_ms <= t)) if i else v.select(v.ts_ms <= t)
                for k, v in fetched.items()
            }
            self.evaluate_at(t, step, report=report, final=i == len(times) - 1)
            previous = t
        return report

    def evaluate_at(
        self,
        now_ms: int,
        samples: dict[str, Samples],
        *,
        report: CycleReport | None = None,
        final: bool = True,
    ) -> None:
        """One evaluation time: shift ``samples`` in, evaluate, store (one transaction).

        Safe to repeat for the same time: what was stored is found open and
        nothing is raised twice.
        """
        report = report if report is not None else CycleReport()
        started = time.perf_counter()
        for device_type, rows in samples.items():
            self.buffers[device_type].append(rows)
        aqi_due: set[tuple[str, int]] = set()
        if self.means is not None:
            if AQI_TYPE in samples:
                ids = self.means.devices.device_ids
                touched = self.means.add_samples(samples[AQI_TYPE])
                self._pending_aqi.update((ids[d], h) for d, h in touched)
            hour = now_ms // HOUR_MS
            in_progress = final and now_ms % self.aqi_interval_ms == 0
            aqi_due = {p for p in self._pending_aqi if in_progress or p[1] < hour}
        # Before the windows: the rules see the VN_AQI of the hours just computed.
        hourly, daily = self._aqi_rows(aqi_due)
        windows = self._windows(now_ms)
        report.evaluate_s += time.perf_counter() - started

        started = time.perf_counter()
        with self.store.evaluation(now_ms) as tx:
            open_alerts = tx.open_alerts()
            t0 = time.perf_counter()
            changes = self._plan(now_ms, windows, open_alerts)
            t1 = time.perf_counter()
            raised = tx.apply(changes)
            tx.write_aqi(hourly, daily)
        report.evaluate_s += t1 - t0
        report.write_s += time.perf_counter() - started - (t1 - t0)
        self._pending_aqi -= aqi_due
        report.evaluated.append(now_ms)
        report.count(changes)
        report.changed += raised.values()
        report.changed += [c.alert_id for c in changes if isinstance(c, Escalate | Clear)]
        report.aqi_hourly += len(hourly)
        report.aqi_daily += len(daily)

    def _windows(self, now_ms: int) -> dict[str, Window]:
        windows: dict[str, Window] = {}
        for device_type, buffer in self.buffers.items():
            values = dict(buffer.values)
            if device_type == AQI_TYPE and self.means is not None:
                latest = self.means.vn_aqi(now_ms // HOUR_MS)
                # The same value at every sample time: a read-only view, no copy.
                values[VN_AQI_METRIC] = np.broadcast_to(latest[:, None], buffer.ts_ms.shape)
            devices = buffer.devices
            windows[device_type] = Window(
                device_type=device_type,
                device_ids=devices.device_ids,
                site_ids=devices.site_ids,
                districts=devices.districts,
                ts_ms=buffer.ts_ms,
                values=values,
                # The newest sample up to this evaluation time (not device_state's
                # last_seen, which a replayed past evaluation must not see ahead of it).
                last_seen_ms=buffer.cursors,
            )
        return windows

    def _plan(
        self,
        now_ms: int,
        windows: dict[str, Window],
        open_alerts: dict[str, dict[str, OpenAlert]],
    ) -> list[Change]:
        was: dict[str, np.ndarray] = {}
        for rule in self.rules:
            window = windows.get(rule.device_type)
            if window is not None:
                was[rule.rule_id] = was_active(window.device_ids, open_alerts.get(rule.rule_id, {}))
        outcomes = evaluate_all(self.rules, windows, now_ms, was)
        changes: list[Change] = []
        for rule in self.rules:
            outcome = outcomes.get(rule.rule_id)
            if outcome is None:
                continue
            window = windows[rule.device_type]
            summary, description = _texts(
                rule, window, outcome.value, outcome.severity, self.places
            )
            changes += plan_changes(
                rule_id=rule.rule_id,
                device_ids=window.device_ids,
                site_ids=window.site_ids,
                open_by_device=open_alerts.get(rule.rule_id, {}),
                active=outcome.active,
                value=outcome.value,
                severity=outcome.severity,
                now_ms=now_ms,
                message=summary,
                description=description,
            )
        return changes

    def _aqi_rows(self, due: set[tuple[str, int]]) -> tuple[list[HourlyRow], list[DailyRow]]:
        if self.means is None or not due:
            return [], []
        index = {d: i for i, d in enumerate(self.means.devices.device_ids)}
        pairs = [(index[d], h) for d, h in due if d in index]
        hourly = hourly_rows(self.means, pairs)
        daily = daily_rows(self.means, days_of(pairs))
        return hourly, daily


def _runs(hours: Sequence[int]) -> list[tuple[int, int]]:
    """Ascending hour numbers as [start, stop) runs of consecutive hours."""
    runs: list[tuple[int, int]] = []
    for hour in hours:
        if runs and runs[-1][1] == hour:
            runs[-1] = (runs[-1][0], hour + 1)
        else:
            runs.append((hour, hour + 1))
    return runs


def _texts(
    rule: Rule,
    window: Window,
    values: np.ndarray,
    severities: np.ndarray,
    places: Mapping[str, SitePlace],
) -> tuple[Callable[[int], str], Callable[[int], str]]:
    """``plan_changes``' renderers of the summary and description, at each device's severity."""

    @functools.cache
    def texts(i: int) -> AlertTexts:
        severity = int(severities[i])
        site_id = window.site_ids[i]
        place = places.get(site_id)
        return render_texts(
            rule,
            device_id=window.device_ids[i],
            site_id=site_id,
            district=window.districts[i],
            value=float(values[i]),
            severity=SEVERITIES[severity] if severity >= 0 else rule.severity,
            site_name=place.name if place else None,
            ward=place.ward if place else None,
        )

    return (lambda i: texts(i).summary), (lambda i: texts(i).description)


async def run_job(
    job: AlertsJob,
    stop: asyncio.Event,
    *,
    once: bool = False,
    clock: Callable[[], int] = wall_ms,
) -> CycleReport | None:
    """Run cycles until ``stop`` is set (or one cycle with ``once``); returns the last report."""
    s = job.settings
    logger.info(
        "alerts job %s: %d rules, every %.1f s, schema %s",
        s.job_id,
        len(job.rules),
        s.interval_s,
        job.store.schema,
    )
    notifier = job.notifier
    wake = asyncio.Event()
    notify_task = None
    if notifier is not None:
        logger.info("notifying Alertmanager at %s", s.notify.alertmanager_url)
        notify_task = asyncio.create_task(_notify_loop(notifier, stop, wake, clock), name="notify")
    try:
        report = await _cycles(job, stop, wake, once=once, clock=clock)
    finally:
        if notify_task is not None:
            notify_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await notify_task
    if once and notifier is not None:  # this cycle's changes, before returning
        await asyncio.to_thread(notifier.run, clock())
    return report


async def _notify_loop(
    notifier: Notifier, stop: asyncio.Event, wake: asyncio.Event, clock: Callable[[], int]
) -> None:
    """Post when a cycle changed alerts (``wake``) or when a resend or retry is due."""
    while not stop.is_set():
        await asyncio.to_thread(notifier.run, clock())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), timeout=max(0.05, notifier.next_run_s(clock())))
        wake.clear()


async def _cycles(
    job: AlertsJob,
    stop: asyncio.Event,
    wake: asyncio.Event,
    *,
    once: bool,
    clock: Callable[[], int],
) -> CycleReport | None:
    s = job.settings
    rng = random.Random()  # noqa: S311 - jitter, not security
    attempt = 0
    report: CycleReport | None = None
    while not stop.is_set():
        try:
            report = await _bounded_cycle(job, clock())
        except (UnavailableError, SchemaError) as exc:
            if once:
                raise
            attempt += 1
            delay = backoff_delay_s(
                attempt, min_s=s.retry_min_s, max_s=s.retry_max_s, draw=rng.random()
            )
            if should_log_attempt(attempt, every=RETRY_LOG_EVERY):
                level = logging.ERROR if isinstance(exc, SchemaError) else logging.WARNING
                logger.log(
                    level, "cycle failed (attempt %d), retrying in %.1f s: %s", attempt, delay, exc
                )
            await _sleep_or_stop(stop, delay)
            continue
        if attempt:
            logger.info("database back after %d retries", attempt)
        attempt = 0
        if report.changed and job.notifier is not None:
            job.notifier.add(report.changed)
            wake.set()
        if report.evaluated:
            logger.info(
                "evaluated %d time(s) up to %d: %d rows, %d raised, %d escalated, %d cleared, "
                "%d hourly / %d daily AQI rows (fetch %.3f s, evaluate %.3f s, write %.3f s)",
                len(report.evaluated),
                report.evaluated[-1],
                report.rows,
                report.raised,
                report.escalated,
                report.cleared,
                report.aqi_hourly,
                report.aqi_daily,
                report.fetch_s,
                report.evaluate_s,
                report.write_s,
            )
        if once:
            break
        if report.behind:
            continue
        now = clock()
        delay_ms = round(s.evaluation_delay_s * 1000)
        next_ms = ((now - delay_ms) // job.interval_ms + 1) * job.interval_ms + delay_ms
        await _sleep_or_stop(stop, max(0.0, (next_ms - now) / 1000))
    return report


async def _bounded_cycle(job: AlertsJob, now_ms: int) -> CycleReport:
    """One cycle in a thread; past ``cycle_timeout_s`` its database connection is cut.

    The cut makes the hung call fail (DatabaseUnavailableError), so the cycle
    ends as failed and is retried with backoff; its transaction was never
    committed, so nothing of it is stored.
    """
    cycle = asyncio.ensure_future(asyncio.to_thread(job.run_cycle, now_ms))
    try:
        return await asyncio.wait_for(asyncio.shield(cycle), timeout=job.settings.cycle_timeout_s)
    except TimeoutError:
        logger.warning(
            "cycle still running after %.0f s: cutting its database connection",
            job.settings.cycle_timeout_s,
        )
        job.interrupt()
        return await cycle


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


async def serve(job: AlertsJob, *, once: bool = False) -> CycleReport | None:
    """Run until SIGINT or SIGTERM, then close the job's connection."""

    # The metrics port first: one that cannot be bound is a settings error at start.
    metrics_server = None
    if job.settings.metrics_port:
        from alerts.metrics import serve_metrics

        metrics_server = serve_metrics(
            job.settings.metrics_host,
            job.settings.metrics_port,
            job_id=job.settings.job_id,
            counters=job.counters,
        )

    async def main(stop: asyncio.Event) -> CycleReport | None:
        try:
            return await run_job(job, stop, once=once)
        finally:
            await asyncio.to_thread(job.close)
            if metrics_server is not None:
                metrics_server.close()
            logger.info("alerts job stopped")

    return await run_service(main)
