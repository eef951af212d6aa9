"""The command downlink in the ingest worker that handles commands: dispatcher and reports.

``CommandDownlink`` is the shell around ``ingest.commanding`` (pure) and
``ingest.commandstore`` (SQL). It runs in one worker per host (worker 0, the
one that stores the gateways' states; ``ingest.workers``), as three named
tasks of the worker's task group:

- ``command-listener`` (a thread): LISTEN on ``command_channel(schema)`` on
  an autocommit connection of its own; each notification (the CLI queued or
  cancelled a command) and each new connection wakes the dispatcher. A
  database away is retried with the project's backoff;
- ``command-dispatcher``: one pass when woken, and at least every
  ``ingest.command_resend_s`` (the fallback: a lost notification costs at
  most that): the due commands go to their gateways as ``GatewayCommands``
  on ``hub/v1/gw/{gw}/cmd`` (QoS 1), again every ``command_resend_s`` until
  the gateway reports them ``sent``; queued commands past their ttl and
  the grace are expired. Nothing is taken while the broker is away;
- ``command-reports``: a shared subscription to
  ``$share/{group}/[prefix/]hub/v1/gw/+/cmdreport`` (its own connection,
  manual PUBACK); each message is stored in one transaction (retried while
  the database is away), THEN an ``Ack`` naming its report ids goes to the
  gateway that sent it (``ack_topic`` of the topic's gateway), THEN the
  PUBACK. A worker killed before the commit leaves the message unacked: the
  gateway resends it, and it is stored once.

Refused input (too large, malformed, another gateway's name, an unknown
command or another gateway's) is a WARNING (rate-limited), a rejects row
and a counter, and acked; a report refused for its command is named in the
Ack too, so the gateway stops resending it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import random
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Final, Protocol, TypeVar

from adapters.backoff import backoff_delay_s
from adapters.loglimit import should_log_attempt
from contracts.commands import GatewayCommands, encode_gateway_commands
from contracts.errors import (
    BrokerUnavailableError,
    DatabaseUnavailableError,
    SchemaError,
    SettingsError,
)
from contracts.messages import encode_ack
from contracts.schema import command_channel
from contracts.settings import BrokerSettings, IngestSettings
from contracts.topics import ack_topic, command_topic, ingest_report_filter
from ingest.commanding import (
    PoisonReports,
    ReportsItem,
    ReportsMessage,
    prepare_reports,
    report_ack,
)
from ingest.commandstore import CommandListener, CommandStore, DispatchOutcome, ReportsOutcome
from ingest.metrics import IngestCounters
from ingest.mqtt import BatchSubscriber, Delivery, client_id_for, report_packet_max_bytes
from ingest.prepare import internal_error

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# Command report messages received and not yet stored; also their link's
# Receive Maximum. Reports are rare (a few per command) and a message holds
# up to 256 of them.
REPORT_QUEUE_MAX: Final = 64
# How long a blocking wait (the report queue, the listener's connection)
# lasts before the stop flag is looked at again.
POLL_S: Final = 0.5
# Log a continuing database outage once, then every this many retries.
RETRY_LOG_EVERY: Final = 10


class DbCall(Protocol):
    """The worker's database call: ``fn`` in a thread, its connection cut if it hangs."""

    def __call__(
        self,
        what: str,
        fn: Callable[[], _T],
        *,
        interrupt: Callable[[], None] | None = None,
        executor: Executor | None = None,
    ) -> Awaitable[_T]: ...


class CommandDownlink:
    """The dispatcher, its listener and the report consumer of one ingest worker."""

    def __init__(
        self,
        *,
        settings: IngestSettings,
        broker: BrokerSettings,
        url: str,
        schema: str,
        worker_id: str,
        connect_timeout_s: float,
        counters: IngestCounters,
        clock: Callable[[], int],
        warn_reject: Callable[[str, str], None],
        db_call: DbCall,
    ) -> None:
        if broker.host is None:
            raise SettingsError("broker.host", "ingest needs the central broker's host")
        self.settings = settings
        self.prefix = settings.topic_prefix
        self.counters = counters
        self.clock = clock
        self._warn_reject = warn_reject
        self.reports: queue.Queue[Delivery] = queue.Queue(maxsize=REPORT_QUEUE_MAX)
        self.subscriber = BatchSubscriber(
            name="command reports",
            host=broker.host,
            port=broker.port,
            client_id=client_id_for(worker_id, "commands", broker.username),
            username=broker.username,
            password=broker.password,
            tls=broker.tls,
            topic_filter=ingest_report_filter(settings.share_group, self.prefix),
            receive_max=REPORT_QUEUE_MAX,
            max_packet_bytes=report_packet_max_bytes(),
            deliveries=self.reports,
        )
        # The same dead-client limits as the batch writer's connection: the
        # dispatcher's transactions lock command rows, which a host that
        # vanished mid-transaction must not keep from the others for hours.
        self.store = CommandStore(
            url=url,
            schema=schema,
            worker_id=worker_id,
            connect_timeout_s=connect_timeout_s,
            dead_client_s=settings.commit_timeout_s,
        )
        self.listener = CommandListener(
            url=url,
            channel=command_channel(schema),
            application_name=f"cityhub-ingest-{worker_id}-listen",
            connect_timeout_s=connect_timeout_s,
        )
        self.stopping = threading.Event()
        self._db_call = db_call
        # The store's calls run on a thread of their own, not asyncio's: a
        # reconnect hung on the database (up to connect_timeout_s, which
        # ``interrupt`` cannot cut) must not hold up the worker's stop, and the
        # loop waits for its own executor's threads at the end.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="command-store")
        self._random = random.Random()  # noqa: S311 - jitter, not security

    def start(self) -> None:
        self.subscriber.start()

    def create_tasks(self, group: asyncio.TaskGroup) -> None:
        """The downlink's three tasks, in the worker's task group."""
        wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        group.create_task(self._listener(loop, wake), name="command-listener")
        group.create_task(self._dispatcher(wake), name="command-dispatcher")
        group.create_task(self._consume_reports(), name="command-reports")

    async def stop(self) -> None:
        """Stop taking messages, cut and close the connections."""
        self.stopping.set()
        self.subscriber.stop()
        self.store.interrupt()
        # Closed after whatever call the store's thread is in; not waited for.
        self._executor.submit(self.store.close)
        self._executor.shutdown(wait=False)

    def _delay_s(self, attempt: int) -> float:
        s = self.settings
        return backoff_delay_s(
            attempt, min_s=s.retry_min_s, max_s=s.retry_max_s, draw=self._random.random()
        )

    # -- listener (a thread) ------------------------------------------------------------

    async def _listener(self, loop: asyncio.AbstractEventLoop, wake: asyncio.Event) -> None:
        """``_listen`` in a daemon thread of its own, ended by the stop flag.

        Not in asyncio's executor: a connect hung on the database (up to
        ``connect_timeout_s``) would hold up the worker's stop, since the loop
        waits for its executor's threads at the end. Left behind, the thread
        only ever wakes a dispatcher that is gone; what it raises ends the
        task, as it would in the executor.
        """
        ended: asyncio.Future[None] = loop.create_future()

        def settle(exc: BaseException | None) -> None:
            if ended.done():
                return  # the task was cancelled meanwhile (a stop)
            if exc is None:
                ended.set_result(None)
            else:
                ended.set_exception(exc)

        def run() -> None:
            error: BaseException | None = None
            try:
                self._listen(loop, wake)
            except Exception as exc:  # noqa: BLE001 - handed to the task, which raises it
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(settle, error)

        threading.Thread(target=run, name="command-listener", daemon=True).start()
        await ended

    def _listen(self, loop: asyncio.AbstractEventLoop, wake: asyncio.Event) -> None:
        """Wake the dispatcher on each NOTIFY and each new connection, until stopped."""
        attempt = 0
        try:
            while not self.stopping.is_set():
                try:
                    woke = self.listener.wait(POLL_S)
                except (DatabaseUnavailableError, SchemaError) as exc:
                    attempt += 1
                    delay = self._delay_s(attempt)
                    if should_log_attempt(attempt, every=RETRY_LOG_EVERY):
                        logger.warning(
                            "not listening for commands (attempt %d), retrying in %.1f s, "
                            "looking every %.1f s meanwhile: %s",
                            attempt,
                            delay,
                            self.settings.command_resend_s,
                            exc,
                        )
                    self.stopping.wait(delay)
                    continue
                if attempt:
                    logger.info("listening for commands again after %d retries", attempt)
                attempt = 0
                if woke:
                    loop.call_soon_threadsafe(wake.set)
        finally:
            self.listener.close()

    # -- dispatcher ----------------------------------------------------------------------

    def _publish(self, gateway_id: str, message: GatewayCommands) -> bool:
        """Hand one GatewayCommands to the broker link (QoS 1); whether it took it."""
        try:
            self.subscriber.publish(
                command_topic(gateway_id, self.prefix), encode_gateway_commands(message)
            )
        except BrokerUnavailableError as exc:
            logger.warning(
                "commands to %s not sent: %s", gateway_id, exc, extra={"gateway_id": gateway_id}
            )
            return False
        return True

    def dispatch(self) -> DispatchOutcome:
        """One dispatcher pass (runs in a thread)."""
        return self.store.dispatch(
            now_ms=self.clock(), resend_s=self.settings.command_resend_s, publish=self._publish
        )

    async def _dispatcher(self, wake: asyncio.Event) -> None:
        """A pass when woken, and at least every command_resend_s."""
        attempt = 0
        while True:
            try:
                async with asyncio.timeout(self.settings.command_resend_s):
                    await wake.wait()
            except TimeoutError:
                pass
            wake.clear()
            # Nothing is taken while the broker is away: a pass would only pile
            # copies up in the link's queue. The next period looks again.
            while self.subscriber.connected.is_set():
                try:
                    outcome = await self._db_call(
                        "dispatch",
                        self.dispatch,
                        interrupt=self.store.interrupt,
                        executor=self._executor,
                    )
                except (DatabaseUnavailableError, SchemaError) as exc:
                    attempt += 1
                    self.counters.db_errors += 1
                    delay = self._delay_s(attempt)
                    if should_log_attempt(attempt, every=RETRY_LOG_EVERY):
                        logger.warning(
                            "dispatching commands failed (attempt %d), retrying in %.1f s: %s",
                            attempt,
                            delay,
                            exc,
                        )
                    await asyncio.sleep(delay)
                    continue
                attempt = 0
                self._account_dispatch(outcome)
                if not outcome.full or outcome.unpublished:
                    break

    def _account_dispatch(self, outcome: DispatchOutcome) -> None:
        self.counters.commands_dispatched += outcome.sent
        for decided in outcome.decided:
            logger.info("command %s %s: %s", decided.command_id, decided.state, decided.detail)
        if outcome.sent:
            logger.debug("%d commands sent in %d messages", outcome.sent, outcome.messages)

    # -- reports ---------------------------------------------------------------------------

    def next_reports(self) -> tuple[Delivery, ReportsItem] | None:
        """A reports message and what it is; blocks up to POLL_S (runs in a thread)."""
        try:
            delivery = self.reports.get(timeout=POLL_S)
        except queue.Empty:
            return None
        try:
            item = prepare_reports(delivery.topic, delivery.payload, prefix=self.prefix)
        except Exception as exc:
            # As for batches: a decoding bug must not crash the worker.
            logger.exception("internal error preparing command reports on %s", delivery.topic)
            poison = internal_error(delivery.topic, delivery.payload, exc)
            item = PoisonReports(delivery.topic, None, poison.reason, poison.detail, poison.payload)
        return delivery, item

    async def _store_until_done(self, item: ReportsItem) -> ReportsOutcome:
        attempt = 0
        while True:
            try:
                outcome = await self._db_call(
                    "reports",
                    functools.partial(self.store.store_reports, item),
                    interrupt=self.store.interrupt,
                    executor=self._executor,
                )
            except (DatabaseUnavailableError, SchemaError) as exc:
                attempt += 1
                self.counters.db_errors += 1
                delay = self._delay_s(attempt)
                if should_log_attempt(attempt, every=RETRY_LOG_EVERY):
                    level = logging.ERROR if isinstance(exc, SchemaError) else logging.WARNING
                    logger.log(
                        level,
                        "command reports not stored (attempt %d), retrying in %.1f s: %s",
                        attempt,
                        delay,
                        exc,
                    )
                await asyncio.sleep(delay)
                continue
            if attempt:
                logger.info("database back: command reports stored after %d retries", attempt)
            return outcome

    def _account_reports(self, outcome: ReportsOutcome) -> None:
        c = self.counters
        c.command_reports_stored += len(outcome.stored)
        c.rejects.update(outcome.rejects)
        poison = outcome.poison
        if poison is not None:
            c.command_reports_refused += 1
            self._warn_reject(poison.reason, f"command reports on {poison.topic}: {poison.detail}")
        c.command_reports_refused += len(outcome.refused)
        for report in outcome.refused:
            self._warn_reject(report.reason, report.detail)

    def _acknowledge(self, delivery: Delivery, item: ReportsItem) -> None:
        """Stored: the Ack to the gateway that sent them first, then the broker's PUBACK."""
        if isinstance(item, ReportsMessage):
            ack = report_ack(item, now_ms=self.clock())
            if ack is not None:
                try:
                    self.subscriber.publish(
                        ack_topic(item.gateway_id, self.prefix), encode_ack(ack)
                    )
                    self.counters.acks_published += 1
                except BrokerUnavailableError as exc:
                    # Stored all the same: the gateway resends and is acked then.
                    logger.warning(
                        "ack of command reports to %s not sent: %s",
                        item.gateway_id,
                        exc,
                        extra={"gateway_id": item.gateway_id},
                    )
        self.subscriber.ack([delivery])

    async def _consume_reports(self) -> None:
        """Each reports message: stored, then acked to its gateway, then PUBACKed."""
        while True:
            taken = await asyncio.to_thread(self.next_reports)
            if taken is None:
                continue
            delivery, item = taken
            outcome = await self._store_until_done(item)
            self._account_reports(outcome)
            self._acknowledge(delivery, item)
