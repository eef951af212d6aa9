"""Worker processes: N ingest workers, a dead one restarted, all stopped on a signal.

``run_workers(settings, workers=N)`` is what ``python -m ingest`` and
``cityhub ingest run`` call with loaded settings. One worker runs in the
calling process; more run as child processes (``spawn``: each gets a fresh
interpreter, its own MQTT client ids (``ingest.mqtt.client_id_for``: worker id, process
id and a random token, so two supervisors on one host never share one), its own
database connection and, if enabled, /metrics on ``metrics_host`` port
``metrics_port + index``); worker 0 also stores the gateways' states
(``ingest.service`` says why one) and runs the command downlink
(``ingest.downlink``).
The supervisor restarts a worker that dies (kill -9, a crash) with a capped
backoff, forwards SIGTERM/SIGINT as SIGTERM to the workers and waits for them;
a worker whose supervisor is gone stops by itself. What a worker does is
``ingest.service``'s business.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import os
import random
import re
import socket
import sys
import threading
import time
from multiprocessing.process import BaseProcess
from typing import Final

from adapters.backoff import backoff_delay_s
from adapters.logs import configure_logging
from adapters.serve import stop_signals
from contracts.catalog import read_catalog, use_catalog
from contracts.errors import CatalogError, SettingsError
from contracts.settings import Settings
from ingest.metrics import check_metrics_ports
from ingest.service import Ingest, serve

logger = logging.getLogger(__name__)

# A worker that dies is restarted after a backoff from this long, doubling per
# quick death (a crash loop must not spin), capped at 30 s.
RESTART_MIN_S: Final = 1.0
RESTART_MAX_S: Final = 30.0
# A worker that ran this long before dying was healthy: its restart delay resets.
HEALTHY_RUN_S: Final = 60.0
# Supervisor poll interval for dead workers and signals.
POLL_S: Final = 0.5
# A worker stops within its drain grace (ingest.service.STOP_GRACE_S, 5 s)
# plus closing its connections; past this the supervisor kills it.
STOP_TIMEOUT_S: Final = 15.0
LOG_FORMAT: Final = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


def worker_id_for(index: int, host: str | None = None) -> str:
    """``{host}-{index}``, the host name folded into the id alphabet (stats rows, client id)."""
    name = re.sub(r"[^a-z0-9-]+", "-", (host or socket.gethostname()).lower()).strip("-")
    return f"{name[:40] or 'host'}-{index}"


def build_worker(settings: Settings, index: int) -> Ingest:
    port = settings.ingest.metrics_port
    return Ingest(
        settings=settings.ingest,
        broker=settings.broker,
        database=settings.database,
        worker_id=worker_id_for(index),
        metrics_port=port + index if port else 0,
        store_states=index == 0,
        handle_commands=index == 0,
    )


def _worker_process(settings: Settings, index: int, log_level: int, parent_pid: int) -> None:
    """Entry point of a spawned worker: a fresh interpreter, so it sets up its own logging.

    It installs the operators' catalog files itself too: a spawned interpreter
    starts with the shipped catalog only.
    """
    configure_logging(
        log_level, log_format=settings.log_format, service="ingest", text_format=LOG_FORMAT
    )
    try:
        use_catalog(read_catalog(settings.catalog.path_list))
        asyncio.run(serve(build_worker(settings, index), parent_pid=parent_pid))
    except (SettingsError, CatalogError) as exc:
        # Its metrics port was taken, or a catalog file changed, after the
        # supervisor checked them.
        logger.error("worker %d: %s", index, exc)  # noqa: TRY400 - one line, not a traceback
        sys.exit(2)


def run_workers(settings: Settings, *, workers: int) -> None:
    """Run ``workers`` ingest workers until SIGINT or SIGTERM."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers == 1:
        asyncio.run(serve(build_worker(settings, 0)))
        return
    if settings.ingest.metrics_port:
        check_metrics_ports(settings.ingest.metrics_host, settings.ingest.metrics_port, workers)
    _Supervisor(settings, workers).run()


class _Supervisor:
    def __init__(self, settings: Settings, workers: int) -> None:
        self.settings = settings
        self.workers = workers
        self.context = multiprocessing.get_context("spawn")
        self.stop = threading.Event()
        self.procs: dict[int, BaseProcess] = {}
        self.started_s: dict[int, float] = {}
        self.deaths: dict[int, int] = {}  # quick deaths in a row, per worker
        self.restart_at: dict[int, float] = {}

    def _on_signal(self, signum: int) -> None:
        logger.info("signal %d: stopping %d workers", signum, self.workers)
        self.stop.set()

    def _start(self, index: int) -> None:
        proc = self.context.Process(
            target=_worker_process,
            args=(self.settings, index, logging.getLogger().getEffectiveLevel(), os.getpid()),
            name=f"ingest-{index}",
        )
        proc.start()
        self.procs[index] = proc
        self.started_s[index] = time.monotonic()
        logger.info("worker %d started (pid %s)", index, proc.pid)

    def _reap(self) -> None:
        now = time.monotonic()
        for index, proc in list(self.procs.items()):
            if proc.is_alive():
                continue
            proc.join()
            del self.procs[index]
            ran_s = now - self.started_s[index]
            deaths = 1 if ran_s >= HEALTHY_RUN_S else self.deaths.get(index, 0) + 1
            self.deaths[index] = deaths
            delay = backoff_delay_s(
                deaths,
                min_s=RESTART_MIN_S,
                max_s=RESTART_MAX_S,
                draw=random.random(),  # noqa: S311 - jitter, not security
            )
            self.restart_at[index] = now + delay
            logger.warning(
                "worker %d (pid %s) exited with code %s after %.0f s; restarting in %.0f s",
                index,
                proc.pid,
                proc.exitcode,
                ran_s,
                delay,
            )
        for index, at in list(self.restart_at.items()):
            if now >= at:
                del self.restart_at[index]
                self._start(index)

    def run(self) -> None:
        with stop_signals(self._on_signal):
            try:
                for index in range(self.workers):
                    self._start(index)
                while not self.stop.is_set():
                    sentinels = [p.sentinel for p in self.procs.values()]
                    multiprocessing.connection.wait(sentinels, timeout=POLL_S)
                    if not self.stop.is_set():
                        self._reap()
            finally:
                self._stop_all()

    def _stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.is_alive():
                proc.terminate()  # SIGTERM: the worker commits what it holds and acks
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for index, proc in self.procs.items():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                logger.error("worker %d (pid %s) did not stop: killing it", index, proc.pid)
                proc.kill()
                proc.join()
        logger.info("all workers stopped")
