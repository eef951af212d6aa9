"""`python -m ingest --config FILE [--workers N]`: run the central ingest workers.

The broker and the database must be named in the settings (``[broker]`` host,
``[database]`` url); `cityhub ingest run` also fills them in from the
embedded default. Loads settings once, configures logging, hands over to
``ingest.workers.run_workers``.
"""

from __future__ import annotations

import argparse
import logging

from adapters.serve import start_service
from contracts.errors import HubError
from ingest.workers import LOG_FORMAT, run_workers

logger = logging.getLogger("ingest")


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: ingest.workers)"
    )


def main() -> None:
    startup = start_service(
        prog="python -m ingest",
        description=__doc__,
        service_logger=logger,
        required={
            "broker.host": lambda s: s.broker.host,
            "database.url": lambda s: s.database.url,
        },
        add_options=_add_options,
        text_format=LOG_FORMAT,
    )
    settings = startup.settings
    workers: int = settings.ingest.workers if startup.args.workers is None else startup.args.workers
    if workers < 1:
        startup.fail(f"--workers must be at least 1, got {workers}")
    try:
        run_workers(settings, workers=workers)
    except HubError as exc:
        startup.fail(exc, code=1)


if __name__ == "__main__":
    main()
