"""Running a service process: start-up wiring, stop signals, an orderly end.

``start_service`` is what each service's ``__main__`` does first: parse the
shared options (``--config`` plus the service's own), load the settings once,
configure logging once, refuse to start without the settings the service
needs, log the (masked) settings. Logging itself (text or JSON lines) is
``adapters.logs``'. ``serve`` runs a service's main coroutine
with an ``asyncio.Event`` that SIGINT or SIGTERM set (and, for a worker
process, the death of its supervisor); the coroutine stops cleanly when the
event is set. ``stop_signals`` is the same for a synchronous supervisor
loop. This is the one module that imports ``signal``.

What a service does, and how it stops (flush, death message, closing its
connections), is the service's business.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Final, NoReturn, TypeVar

from adapters.logs import TEXT_FORMAT, add_log_fields, configure_logging
from contracts.errors import HubError
from contracts.settings import Settings, describe_settings, load_settings

logger = logging.getLogger(__name__)

T = TypeVar("T")

STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)
# How often a worker looks whether its supervisor is still there.
PARENT_POLL_S: Final = 1.0


@dataclass(frozen=True)
class Startup:
    """What ``start_service`` found: the options and the settings, loaded once."""

    parser: argparse.ArgumentParser
    args: argparse.Namespace
    settings: Settings

    def fail(self, problem: object, *, code: int = 2) -> NoReturn:
        """Exit with ``error: problem`` on stderr (2: bad settings or options)."""
        self.parser.exit(code, f"error: {problem}\n")


def start_service(
    *,
    prog: str,
    description: str | None,
    service_logger: logging.Logger,
    required: Mapping[str, Callable[[Settings], object]],
    add_options: Callable[[argparse.ArgumentParser], None] | None = None,
    text_format: str = TEXT_FORMAT,
    log_fields: Callable[[Settings], Mapping[str, str]] | None = None,
) -> Startup:
    """Parse the options, load settings, configure logging; exit 2 when something is missing.

    ``required`` maps setting names to getters; when any getter returns None
    the process exits naming all of them ("set broker.host and database.url").
    The service's log lines carry ``service`` = the name of ``service_logger``
    (gateway, ingest, alerts); ``text_format`` is the line format of
    ``log_format = "text"``; ``log_fields`` gives more fields every line
    carries, from the settings (the gateway's own id), from the first line on.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", type=Path, help="settings file (TOML)")
    if add_options is not None:
        add_options(parser)
    args = parser.parse_args()
    try:
        settings = load_settings(args.config, os.environ)
    except HubError as exc:
        parser.exit(2, f"error: {exc}\n")
    configure_logging(
        log_level_of(settings),
        log_format=settings.log_format,
        service=service_logger.name,
        text_format=text_format,
    )
    if log_fields is not None:
        add_log_fields(**log_fields(settings))
    startup = Startup(parser=parser, args=args, settings=settings)
    if any(get(settings) is None for get in required.values()):
        startup.fail(f"set {' and '.join(required)}")
    service_logger.info("settings: %s", describe_settings(settings))
    return startup


def log_level_of(settings: Settings) -> int:
    """The settings' log level, but at least INFO: a long-running service logs its lifecycle."""
    return min(getattr(logging, settings.log_level.upper(), logging.INFO), logging.INFO)


async def serve(
    main: Callable[[asyncio.Event], Awaitable[T]], *, parent_pid: int | None = None
) -> T:
    """Run ``main(stop)`` until it returns; SIGINT, SIGTERM (or the parent's death) set ``stop``.

    With ``parent_pid`` the process also stops when that process is gone (it
    is then adopted, so its parent pid changes): a worker whose supervisor
    was killed does not run on alone.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    watcher: asyncio.Task[None] | None = None
    if parent_pid is not None:
        watcher = asyncio.create_task(
            _watch_parent(parent_pid, stop), name=f"parent-watch[{parent_pid}]"
        )
    try:
        return await main(stop)
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


async def _watch_parent(parent_pid: int, stop: asyncio.Event) -> None:
    while os.getppid() == parent_pid:
        await asyncio.sleep(PARENT_POLL_S)
    logger.warning("supervisor %d is gone: stopping", parent_pid)
    stop.set()


@contextlib.contextmanager
def stop_signals(on_signal: Callable[[int], None]) -> Iterator[None]:
    """Call ``on_signal(signum)`` on SIGINT or SIGTERM inside the block (a synchronous loop).

    The previous handlers come back when the block ends.
    """

    def handler(signum: int, _frame: FrameType | None) -> None:
        on_signal(signum)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
