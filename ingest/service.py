"""The ingest worker: shared batch subscription in, one transaction per group, acks out.

Wiring (docs/architecture.md, sections 1, 3 and 5):

- ``BatchSubscriber`` (paho network thread): batch messages from the shared
  subscription go onto a hand-over queue of ``queue_max_messages``, unacked;
  the same number is sent as MQTT v5 Receive Maximum. A full queue blocks
  the network thread (TCP backpressure), so memory stays bounded under any
  backlog: at most that queue plus three commit groups of messages;
- ``collector`` task (in a worker thread): takes messages off the queue until
  none is waiting and the committer is free (``ingest.grouping``: under load
  the group grows while a commit runs, capped by ``max_batches_per_commit``
  / ``max_rows_per_commit`` and ``max_delay_ms``), and prepares each one
  (``ingest.prepare``): topic -> gateway, ``decode_batch``, the payload's
  gateway must be the topic's, rows built against the ownership map
  (``ingest.rows``); anything refused is a ``PoisonBatch``;
- ``committer`` task: batches refused for a device type or metric the
  worker lacks prepared again after it reads the types' catalog entries
  from the database (at most every TYPES_RELOAD_S: a type added by `cityhub
  db migrate` needs no restart), the ownership map brought up to date and
  the batches it changes prepared again (``ingest.ownership``), ``BatchWriter.commit``
  of the group in one transaction (retried with jittered, capped backoff
  while the database is unavailable; a call that hangs past
  ``commit_timeout_s`` is cut); THEN an ``Ack`` with the group's batch ids,
  each with its payload's digest, to each gateway's ack topic
  (``ingest.acks``); THEN the MQTT PUBACKs.
  While the database is down nothing is acked: the broker holds the rest,
  and the gateways keep every batch in their outboxes until acked;
- ``stats`` task: a row in ``{schema}.ingest_stats`` every
  ``stats_interval_s``; ``prune`` task: forgets old batch ids;
- ``states`` task, in the worker that stores gateway states: the retained
  state messages of every gateway (outbox depth, readings/s, counters,
  online/offline) into ``gateway_status`` (the latest per gateway) and
  ``gateway_status_history``, in small transactions of their own;
- ``command-listener``, ``command-dispatcher`` and ``command-reports``, in
  the same worker as ``states``: the command downlink (``ingest.downlink``):
  queued commands out to their gateways, the states they report in;
- optional Prometheus /metrics (``ingest.metrics``).

Gateway states take a different road from batches. One worker per host
(``store_states``; ``ingest.workers`` picks worker 0) holds a plain, not a
shared, subscription to ``[prefix/]hub/v1/gw/+/state`` on a connection of
its own (``ingest.mqtt.StateSubscriber``), because:

- an MQTT v5 broker sends no retained messages to a shared subscription,
  and a death Will is published once: a Will that went out while no
  worker was subscribed would be lost for good, and the gateway shown
  online. A plain subscription receives every gateway's retained state at
  each (re)subscribe, so the table catches up after any ingest restart;
- one subscriber sees each gateway's states in the order the broker
  forwarded them, so the Will and the states around it are not reordered
  between workers;
- a connection of its own never waits behind the batch stream's
  backpressure (a full batch queue blocks that network thread), and state
  writes never enter a batch commit.

States are rare (one per gateway per ``state_interval_s``, 10 s): one
worker handles thousands of gateways with a transaction every
STATE_DELAY_S. Workers on several hosts each store the same states:
history rows are keyed, so each state is stored once, and a state replaces
the latest row only when newer (``BatchWriter.write_states``), so a repeat
changes nothing. (One interleaving is off for a while: a host that stores a
Will after another host stored the next state of the reconnected session
shows the gateway offline until its following state.) While that worker
restarts, states are not stored (the retained ones arrive when it is back);
the boards treat a gateway whose last state is old as silent.

The collector works on group N+1 while the committer waits for the database
on group N: decoding overlaps the database's work.

Bad input is never a crash: a WARNING (rate-limited per reason), a rejects
row, a counter, and an ack so the gateway stops resending it.

This module is the shell: threads, tasks, queues, retries, logging and
counters. What a message becomes, which acks a group earns and when a batch
is built again are computed by the pure modules named above.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Final, TypeVar

import numpy as np

from adapters.backoff import backoff_delay_s
from adapters.loglimit import LogLimiter, should_log_attempt
from adapters.metrics import MetricsServer
from adapters.serve import serve as run_service
from contracts.catalog import current_catalog, decode_device_type, merge_types, use_catalog
from contracts.errors import (
    BrokerUnavailableError,
    CatalogError,
    DatabaseUnavailableError,
    RefusedByDatabaseError,
    SchemaError,
    SettingsError,
    UnknownDeviceTypeError,
    UnknownMetricError,
)
from contracts.messages import encode_ack
from contracts.settings import BrokerSettings, DatabaseSettings, IngestSettings
from contracts.topics import ack_topic, gateway_filter, ingest_batch_filter
from ingest.acks import build_acks
from ingest.downlink import CommandDownlink
from ingest.grouping import group_done
from ingest.metrics import IngestCounters, IngestMetrics, serve_metrics
from ingest.mqtt import (
    BatchSubscriber,
    Delivery,
    StateMessage,
    StateSubscriber,
    client_id_for,
)
from ingest.ownership import rebuild_if_changed, suspect_devices
from ingest.prepare import (
    GoodBatch,
    PoisonBatch,
    StateItem,
    WriteItem,
    internal_error,
    prepare_item,
    prepare_state,
    readings_of,
    refused,
)
from ingest.writer import BatchWriter, CommitOutcome, StateOutcome, StatsRow

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# How long the collector waits for a first message before looking at the stop
# flag again: shutdown reacts within this.
IDLE_POLL_S: Final = 0.2
# While a commit runs and no message waits, the collector looks at the queue
# and the committer this often: a group leaves at most this long after the
# committer is free; 2 ms is noise next to a commit's few milliseconds.
COLLECT_POLL_S: Final = 0.002
# Log at most this many WARNINGs per reject reason per minute; counters keep the rest.
REJECT_LOG_PER_MINUTE: Final = 5
# Log a continuing database outage once, then every this many retries.
RETRY_LOG_EVERY: Final = 10
# On stop, how long to wait for prepared groups to commit and be acked
# (bounded further by commit_timeout_s): a commit takes well under a second,
# and what is not committed by then is redelivered (broker, gateway resend).
STOP_GRACE_S: Final = 5.0
# State messages waiting to be stored: 10,000 is 100 s of a 1,000-gateway
# fleet at one state each per 10 s, ~4 MB of ~400-byte messages. It fills
# only while the database is away; the oldest go first (each gateway's
# newest state is what matters, and the retained ones come again at the
# next subscribe).
STATE_QUEUE_MAX: Final = 10_000
# States arriving within this of the first one are stored in one
# transaction: at most two small transactions a second, whatever the fleet.
STATE_DELAY_S: Final = 0.5
# A batch of a device type (or with a metric) this worker does not know reads
# the types' catalog entries from the database, at most this often: a type
# added by `cityhub db migrate` is learnt on its first batch, and a gateway
# sending an undefined type costs one small query a second, not one per batch.
# Short, because a batch refused meanwhile is a reject: a second type changed
# by a migrate just after another type was learnt must not wait long.
TYPES_RELOAD_S: Final = 1.0
_UNKNOWN_SHAPE_REASONS: Final = frozenset(
    {UnknownDeviceTypeError.reason, UnknownMetricError.reason}
)


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Pending:
    """A delivery and what it became; the item may be rebuilt or turned to poison at commit."""

    delivery: Delivery
    item: WriteItem


class _Stop(Exception):  # noqa: N818 - a control-flow signal for the task group, not an error
    """Raised inside the task group to end it when the stop event fires."""


class Ingest:
    """One ingest worker: its MQTT client, its database connection, its tasks."""

    def __init__(
        self,
        *,
        settings: IngestSettings,
        broker: BrokerSettings,
        database: DatabaseSettings,
        worker_id: str,
        metrics_port: int = 0,
        store_states: bool = True,
        handle_commands: bool = True,
        clock: Callable[[], int] = wall_ms,
    ) -> None:
        if database.url is None:
            raise SettingsError("database.url", "ingest needs the database URL")
        if broker.host is None:
            raise SettingsError("broker.host", "ingest needs the central broker's host")
        self.settings = settings
        self.worker_id = worker_id
        self.prefix = settings.topic_prefix
        self.clock = clock
        self.metrics_port = metrics_port
        self.counters = IngestCounters()
        self.metrics = IngestMetrics(self.counters, worker_id)
        # What bounds memory: the broker may overshoot Receive Maximum
        # (ingest.mqtt), so a full queue blocks paho's network thread, which
        # stops reading the socket. Besides the queue, the collector, the
        # prepared slot and the committer hold a group each.
        self.deliveries: queue.Queue[Delivery] = queue.Queue(maxsize=settings.queue_max_messages)
        self.subscriber = BatchSubscriber(
            host=broker.host,
            port=broker.port,
            client_id=client_id_for(worker_id, username=broker.username),
            username=broker.username,
            password=broker.password,
            tls=broker.tls,
            topic_filter=ingest_batch_filter(settings.share_group, self.prefix),
            receive_max=settings.queue_max_messages,
            deliveries=self.deliveries,
        )
        self.state_messages: queue.Queue[StateMessage] = queue.Queue(maxsize=STATE_QUEUE_MAX)
        self.state_subscriber: StateSubscriber | None = None
        if store_states:
            self.state_subscriber = StateSubscriber(
                host=broker.host,
                port=broker.port,
                client_id=client_id_for(worker_id, "states", broker.username),
                username=broker.username,
                password=broker.password,
                tls=broker.tls,
                topic_filter=gateway_filter("state", self.prefix),
                messages=self.state_messages,
            )
        self.writer = BatchWriter(
            url=database.url,
            schema=database.schema,
            worker_id=worker_id,
            connect_timeout_s=database.connect_timeout_s,
            ownership_refresh_s=settings.ownership_refresh_s,
            # A worker that vanishes mid-commit must not hold its batches'
            # locks longer than it would wait for a commit itself.
            dead_client_s=settings.commit_timeout_s,
        )
        # Commands to devices, in the worker that stores states (one per host).
        self.downlink: CommandDownlink | None = None
        if handle_commands:
            self.downlink = CommandDownlink(
                settings=settings,
                broker=broker,
                url=database.url,
                schema=database.schema,
                worker_id=worker_id,
                connect_timeout_s=database.connect_timeout_s,
                counters=self.counters,
                clock=clock,
                warn_reject=self._warn_reject,
                db_call=self.db_call,
            )
        self.metrics.queue_depth = self._outstanding
        self.metrics.broker_connected = self.subscriber.connected.is_set
        self._stopping = threading.Event()
        # Set by the committer when it waits for a group with none prepared,
        # cleared by the collector when it hands one over (ingest.grouping).
        self._committer_free = threading.Event()
        self._reject_log = LogLimiter(limit=REJECT_LOG_PER_MINUTE, span=60.0)
        self._random = random.Random()  # noqa: S311 - jitter, not security
        self._types_loaded_s: float | None = None  # monotonic; see _learn_types

    # -- collector (runs in a worker thread) ---------------------------------------

    def _prepare(self, delivery: Delivery) -> Pending:
        self.counters.received += 1
        return Pending(delivery=delivery, item=self._prepare_item(delivery))

    def _prepare_item(self, delivery: Delivery) -> WriteItem:
        try:
            item = prepare_item(
                delivery.topic,
                delivery.payload,
                prefix=self.prefix,
                now_ms=self.clock(),
                owners=self.writer.owners,
            )
        except Exception as exc:
            # A bug in decoding must not become a poison pill that crashes
            # every worker it is redelivered to: the raw payload is kept in
            # rejects (whole up to REJECT_RAW_MAX_BYTES, so a batch of the
            # default size can be replayed from there once fixed) and acked.
            logger.exception("internal error preparing a message on %s", delivery.topic)
            item = internal_error(delivery.topic, delivery.payload, exc)
        return item

    def collect(self) -> list[Pending] | None:
        """One group: blocks up to IDLE_POLL_S for a first message, then fills it adaptively.

        What is waiting joins the group; once nothing is, the group goes to
        a free committer at once, or, while a commit runs, keeps taking
        messages until the committer is free or a cap is hit
        (``ingest.grouping.group_done``).
        """
        s = self.settings
        try:
            first = self.deliveries.get(timeout=IDLE_POLL_S)
        except queue.Empty:
            return None
        group = [self._prepare(first)]
        rows = readings_of(group[0].item)
        while True:
            waiting = not self.deliveries.empty()
            if group_done(
                batches=len(group),
                rows=rows,
                age_ms=(time.monotonic() - first.received_s) * 1000,
                waiting=waiting,
                committer_free=self._committer_free.is_set(),
                settings=s,
            ):
                break
            try:
                # Nothing waiting and the committer busy: look again soon.
                delivery = (
                    self.deliveries.get_nowait()
                    if waiting
                    else self.deliveries.get(timeout=COLLECT_POLL_S)
                )
            except queue.Empty:
                continue
            group.append(self._prepare(delivery))
            rows += readings_of(group[-1].item)
        # The group takes the committer's slot: the next one waits for the
        # committer to ask again, growing meanwhile.
        self._committer_free.clear()
        return group

    async def _collector(self, groups: asyncio.Queue[list[Pending]]) -> None:
        while not self._stopping.is_set():
            group = await asyncio.to_thread(self.collect)
            if group is not None:
                await groups.put(group)

    # -- committer -------------------------------------------------------------------

    def commit_group(self, group: list[Pending]) -> CommitOutcome:
        """Refresh ownership if needed, rebuild affected rows, commit (runs in a thread)."""
        self._learn_types(group)
        self._rebuild_for_ownership(group)
        try:
            return self.writer.commit([p.item for p in group])
        except RefusedByDatabaseError as exc:
            logger.warning(
                "database refused a group of %d batches (%s); one by one", len(group), exc
            )
        return self._commit_one_by_one(group)

    def _learn_types(self, group: list[Pending]) -> None:
        """Batches refused for a type or metric this worker lacks: learn it, prepare them again.

        The entries come from the database (``cityhub db migrate`` records
        them), at most once per TYPES_RELOAD_S, merged onto the installed
        catalog by ``contracts.catalog.merge_types``. A type still unknown
        after that stays a reject.
        """
        unknown = [
            index
            for index, pending in enumerate(group)
            if isinstance(pending.item, PoisonBatch)
            and pending.item.reason in _UNKNOWN_SHAPE_REASONS
        ]
        now = time.monotonic()
        if not unknown or (
            self._types_loaded_s is not None and now - self._types_loaded_s < TYPES_RELOAD_S
        ):
            return
        rows = self.writer.read_type_entries()
        self._types_loaded_s = now
        entries = []
        for name, text in rows:
            try:
                entries.append(decode_device_type(text, f"device_types.entry of {name}"))
            except CatalogError as exc:
                logger.warning("device type %s not learnt: %s", name, exc)
        installed = current_catalog()
        merged, refused_types = merge_types(installed, entries, source="the database's catalog")
        for name, problem in refused_types.items():
            logger.warning("device type %s not learnt: %s", name, problem)
        if merged is installed:
            return
        use_catalog(merged)
        learned = [n for n, t in merged.types.items() if installed.types.get(n) is not t]
        logger.info("device types learnt from the database: %s", ", ".join(learned))
        for index in unknown:
            group[index] = Pending(
                delivery=group[index].delivery, item=self._prepare_item(group[index].delivery)
            )

    def _rebuild_for_ownership(self, group: list[Pending]) -> None:
        """Bring the ownership map up to date for the group, and rebuild what it changes."""
        self.writer.refresh_owners(suspect_devices(p.item for p in group))
        owners = self.writer.owners
        now_ms = self.clock()
        for p in group:
            p.item = rebuild_if_changed(p.item, owners, prefix=self.prefix, now_ms=now_ms)

    def _commit_one_by_one(self, group: list[Pending]) -> CommitOutcome:
        """Each item in a transaction of its own; one the database refuses becomes poison."""
        total = CommitOutcome()
        for p in group:
            try:
                outcome = self.writer.commit([p.item])
            except RefusedByDatabaseError as exc:
                if isinstance(p.item, PoisonBatch):
                    # Storing a reject was refused: the schema is wrong, not the
                    # input. Retried with backoff (logged as an ERROR) rather
                    # than crashing on every redelivery.
                    raise SchemaError(f"the rejects table refused a row: {exc}") from exc
                p.item = refused(p.item, exc)
                outcome = self.writer.commit([p.item])
            total.written += outcome.written
            total.replayed += outcome.replayed
            total.readings += outcome.readings
            total.duplicates += outcome.duplicates
            total.rejects.update(outcome.rejects)
        return total

    async def db_call(
        self,
        what: str,
        fn: Callable[[], _T],
        *,
        interrupt: Callable[[], None] | None = None,
        executor: Executor | None = None,
    ) -> _T:
        """Run a blocking database call in a thread; cut the connection if it hangs.

        ``interrupt`` cuts the connection ``fn`` uses (the batch writer's by
        default); ``executor`` runs it (asyncio's own by default).
        """
        loop = asyncio.get_running_loop()

        async def call() -> _T:
            return await loop.run_in_executor(executor, fn)

        task = asyncio.create_task(call(), name=f"db[{what}]")
        done, _ = await asyncio.wait({task}, timeout=self.settings.commit_timeout_s)
        if not done:
            self.counters.db_timeouts += 1
            logger.warning(
                "database %s took over %.1f s: cutting the connection",
                what,
                self.settings.commit_timeout_s,
            )
            (interrupt or self.writer.interrupt)()
        return await task

    async def _commit_until_done(self, group: list[Pending]) -> CommitOutcome:
        s = self.settings
        attempt = 0
        while True:
            started = time.monotonic()
            try:
                outcome = await self.db_call("commit", lambda: self.commit_group(group))
            except (DatabaseUnavailableError, SchemaError) as exc:
                attempt += 1
                self.counters.db_errors += 1
                self.metrics.db_connected = False
                delay = backoff_delay_s(
                    attempt, min_s=s.retry_min_s, max_s=s.retry_max_s, draw=self._random.random()
                )
                if should_log_attempt(attempt, every=RETRY_LOG_EVERY):
                    level = logging.ERROR if isinstance(exc, SchemaError) else logging.WARNING
                    logger.log(
                        level,
                        "commit of %d batches failed (attempt %d), retrying in %.1f s: %s",
                        len(group),
                        attempt,
                        delay,
                        exc,
                    )
                await asyncio.sleep(delay)
                continue
            self.metrics.db_connected = True
            self.metrics.observe_commit(time.monotonic() - started)
            if attempt:
                logger.info("database back: committed after %d retries", attempt)
            return outcome

    def _account(self, outcome: CommitOutcome) -> None:
        c = self.counters
        now_ms = self.clock()
        c.commits += 1
        c.readings += outcome.readings
        c.duplicates += outcome.duplicates
        c.replayed += len(outcome.replayed)
        c.rejects.update(outcome.rejects)
        for item in outcome.written:
            if isinstance(item, GoodBatch):
                c.batches += 1
                self.metrics.observe_lag(max(0, now_ms - item.sent_ms) / 1000)
                batch = {"gateway_id": item.gateway_id, "batch_id": item.batch_id}
                for r in item.rows.rejects:
                    self._warn_reject(
                        r.reason,
                        f"{r.device_id} seq {r.seq}: {r.detail}",
                        {**batch, "device_id": r.device_id},
                    )
            else:
                c.poison += 1
                ids = {"gateway_id": item.gateway_id, "batch_id": item.batch_id}
                self._warn_reject(
                    item.reason,
                    f"message on {item.topic}: {item.detail}",
                    {name: value for name, value in ids.items() if value is not None},
                )

    def _warn_reject(self, reason: str, detail: str, ids: Mapping[str, str] | None = None) -> None:
        """A rate-limited WARNING; ``ids`` (gateway, batch, device) become fields of JSON lines."""
        if self._reject_log.allow(reason, time.monotonic()):
            logger.warning("rejected (%s): %s", reason, detail[:500], extra=ids)

    def _acknowledge(self, group: list[Pending]) -> None:
        """Committed: the app acks to the gateways first, then the broker's PUBACKs."""
        for gateway_id, ack in build_acks((p.item for p in group), now_ms=self.clock()):
            try:
                self.subscriber.publish(ack_topic(gateway_id, self.prefix), encode_ack(ack))
            except BrokerUnavailableError as exc:
                # Committed all the same: the gateway resends and is acked then.
                logger.warning(
                    "ack to %s not sent: %s", gateway_id, exc, extra={"gateway_id": gateway_id}
                )
                continue
            self.counters.acks_published += 1
        acked = self.subscriber.ack(p.delivery for p in group)
        self.counters.mqtt_acks += acked
        self.counters.mqtt_acks_skipped += len(group) - acked

    async def _committer(self, groups: asyncio.Queue[list[Pending]]) -> None:
        while True:
            if groups.empty():
                self._committer_free.set()
            group = await groups.get()
            try:
                outcome = await self._commit_until_done(group)
                self._account(outcome)
                self._acknowledge(group)
            finally:
                groups.task_done()

    # -- gateway states ------------------------------------------------------------------

    def _prepare_state(self, message: StateMessage) -> StateItem:
        try:
            return prepare_state(
                message.topic,
                message.payload,
                prefix=self.prefix,
                received_ms=message.received_ms or self.clock(),
                retained=message.retained,
            )
        except Exception as exc:
            # As for batches: a decoding bug must not crash the worker.
            logger.exception("internal error preparing a state on %s", message.topic)
            return internal_error(message.topic, message.payload, exc)

    def collect_states(self) -> list[StateItem]:
        """The states of one transaction: blocks up to IDLE_POLL_S for a first one (a thread)."""
        try:
            first = self.state_messages.get(timeout=IDLE_POLL_S)
        except queue.Empty:
            return []
        items = [self._prepare_state(first)]
        deadline = time.monotonic() + STATE_DELAY_S
        while not self._stopping.is_set():
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                break
            try:
                message = self.state_messages.get(timeout=min(timeout, IDLE_POLL_S))
            except queue.Empty:
                continue
            items.append(self._prepare_state(message))
        while True:
            try:
                items.append(self._prepare_state(self.state_messages.get_nowait()))
            except queue.Empty:
                return items

    def write_states(self, items: list[StateItem]) -> StateOutcome:
        """Store a group of states; one by one if the database refuses the group (a thread)."""
        try:
            return self.writer.write_states(items)
        except RefusedByDatabaseError as exc:
            logger.warning(
                "database refused a group of %d states (%s); one by one", len(items), exc
            )
        return self._write_states_one_by_one(items)

    def _write_states_one_by_one(self, items: list[StateItem]) -> StateOutcome:
        """Each state in a transaction of its own; one the database refuses becomes poison."""
        total = StateOutcome()
        for item in items:
            try:
                outcome = self.writer.write_states([item])
            except RefusedByDatabaseError as exc:
                if isinstance(item, PoisonBatch):
                    raise SchemaError(f"the rejects table refused a row: {exc}") from exc
                outcome = self.writer.write_states([refused(item, exc)])
            total.stored += outcome.stored
            total.history += outcome.history
            total.refused += outcome.refused
            total.rejects.update(outcome.rejects)
            total.ignored += outcome.ignored
        return total

    def _account_states(self, outcome: StateOutcome) -> None:
        c = self.counters
        c.states += len(outcome.stored)
        c.states_rejected += len(outcome.refused)
        c.states_ignored += len(outcome.ignored)
        c.rejects.update(outcome.rejects)
        for item in outcome.refused:
            self._warn_reject(item.reason, f"state on {item.topic}: {item.detail}")
        for state in outcome.ignored:
            logger.warning(
                "state %s of revoked gateway %s ignored (birth %d)",
                state.row.status,
                state.row.gateway_id,
                state.row.birth,
            )

    async def _states(self) -> None:
        s = self.settings
        attempt = 0
        items: list[StateItem] = []
        while True:
            if self.state_subscriber is not None:
                self.counters.states_dropped = self.state_subscriber.dropped
            if not items:
                items = await asyncio.to_thread(self.collect_states)
                if not items:
                    continue
            try:
                outcome = await self.db_call("states", functools.partial(self.write_states, items))
            except (DatabaseUnavailableError, SchemaError) as exc:
                # Kept and retried; meanwhile new states wait in the queue
                # (the committer reports the outage).
                attempt += 1
                delay = backoff_delay_s(
                    attempt, min_s=s.retry_min_s, max_s=s.retry_max_s, draw=self._random.random()
                )
                logger.debug("%d states not stored, retrying in %.1f s: %s", len(items), delay, exc)
                await asyncio.sleep(delay)
                continue
            attempt = 0
            items = []
            self._account_states(outcome)

    # -- housekeeping ------------------------------------------------------------------

    def stats_row(self, since: IngestCounters, interval_s: float) -> StatsRow:
        """The counts since ``since`` (a copy of earlier counters) and this interval's latencies."""
        c = self.counters
        with c.lock:
            commit_ms = np.array(c.commit_samples_s) * 1000
            lag_ms = np.array(c.lag_samples_s) * 1000
            c.commit_samples_s.clear()
            c.lag_samples_s.clear()

        def pct(samples: np.ndarray, q: float) -> float | None:
            return float(np.percentile(samples, q)) if len(samples) else None

        return StatsRow(
            worker_id=self.worker_id,
            ts_ms=self.clock(),
            interval_s=interval_s,
            readings=c.readings - since.readings,
            duplicates=c.duplicates - since.duplicates,
            batches=c.batches - since.batches,
            replayed=c.replayed - since.replayed,
            poison=c.poison - since.poison,
            rejects=c.rejects.total() - since.rejects.total(),
            commits=c.commits - since.commits,
            commit_p50_ms=pct(commit_ms, 50),
            commit_p95_ms=pct(commit_ms, 95),
            lag_p95_ms=pct(lag_ms, 95),
            queue_depth=self._outstanding(),
        )

    def _outstanding(self) -> int:
        c = self.counters
        return c.received - c.mqtt_acks - c.mqtt_acks_skipped + self.deliveries.qsize()

    def _snapshot(self) -> IngestCounters:
        c = self.counters
        snap = IngestCounters(
            readings=c.readings,
            duplicates=c.duplicates,
            batches=c.batches,
            replayed=c.replayed,
            poison=c.poison,
            commits=c.commits,
        )
        snap.rejects.update(c.rejects)
        return snap

    async def _stats(self) -> None:
        interval = self.settings.stats_interval_s
        if interval <= 0:
            return
        last, last_s = self._snapshot(), time.monotonic()
        while True:
            await asyncio.sleep(interval)
            now_s = time.monotonic()
            row = self.stats_row(last, now_s - last_s)
            snap = self._snapshot()
            try:
                await self.db_call("stats", functools.partial(self.writer.write_stats, row))
            except (DatabaseUnavailableError, SchemaError) as exc:
                # The counts carry over into the next row.
                logger.debug("stats row not written: %s", exc)
                continue
            last, last_s = snap, now_s

    async def _prune(self) -> None:
        retention_s = self.settings.ingested_retention_h * 3600
        # Often enough that the table holds at most ~1/4 more than the retention.
        period_s = max(60.0, min(3600.0, retention_s / 4))
        while True:
            await asyncio.sleep(period_s)
            try:
                pruned = await self.db_call(
                    "prune", lambda: self.writer.prune_ingested(retention_s)
                )
            except (DatabaseUnavailableError, SchemaError) as exc:
                logger.debug("pruning batch ids postponed: %s", exc)
                continue
            if pruned:
                logger.info("forgot %d batch ids older than %.0f h", pruned, retention_s / 3600)

    # -- lifecycle ------------------------------------------------------------------

    async def _stop_when(
        self,
        stop: asyncio.Event,
        collector: asyncio.Task[None],
        groups: asyncio.Queue[list[Pending]],
    ) -> None:
        """On stop: take no more messages, commit and ack what is prepared, then end."""
        await stop.wait()
        self._stopping.set()
        logger.info("stopping: committing what was taken, taking nothing more")
        try:
            async with asyncio.timeout(min(self.settings.commit_timeout_s, STOP_GRACE_S)):
                await collector
                await groups.join()
        except TimeoutError:
            logger.warning(
                "stopped with batches uncommitted; the broker and gateways redeliver them"
            )
        raise _Stop

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set (or cancelled)."""
        logger.info(
            "ingest worker %s starting: %s, schema %s",
            self.worker_id,
            self.subscriber.topic_filter,
            self.writer.schema,
        )
        # The metrics address first: one that cannot be bound is a settings
        # error, raised before any broker connection.
        metrics_server: MetricsServer | None = None
        if self.metrics_port:
            metrics_server = serve_metrics(
                self.metrics, self.settings.metrics_host, self.metrics_port
            )
        self.subscriber.start()
        if self.state_subscriber is not None:
            self.state_subscriber.start()
        if self.downlink is not None:
            self.downlink.start()
        try:
            # The ownership map before the first batch, if the database answers.
            await self.db_call("ownership", self.writer.refresh_owners)
            self.metrics.db_connected = True
        except (DatabaseUnavailableError, SchemaError) as exc:
            logger.warning("database not ready at start (%s); retrying with the first batch", exc)
        groups: asyncio.Queue[list[Pending]] = asyncio.Queue(maxsize=1)
        try:
            async with asyncio.TaskGroup() as group:
                collector = group.create_task(self._collector(groups), name="collector")
                group.create_task(self._committer(groups), name="committer")
                group.create_task(self._stats(), name="stats")
                group.create_task(self._prune(), name="prune")
                if self.state_subscriber is not None:
                    group.create_task(self._states(), name="states")
                if self.downlink is not None:
                    self.downlink.create_tasks(group)
                if stop is not None:
                    group.create_task(self._stop_when(stop, collector, groups), name="stop")
        except* _Stop:
            pass
        finally:
            self._stopping.set()
            self.subscriber.stop()
            if self.state_subscriber is not None:
                self.state_subscriber.stop()
            if self.downlink is not None:
                await self.downlink.stop()
            # A call still hung on the database (its task was cancelled, its
            # thread was not) would hold the writer's lock forever.
            self.writer.interrupt()
            await asyncio.to_thread(self.writer.close)
            if metrics_server is not None:
                metrics_server.close()
            logger.info("ingest worker %s stopped", self.worker_id)


async def serve(ingest: Ingest, *, parent_pid: int | None = None) -> None:
    """Run until SIGINT or SIGTERM (or the parent process dies), then stop cleanly."""
    await run_service(ingest.run, parent_pid=parent_pid)
