"""`python -m ingest --config FILE [--workers N]`: run the central ingest workers.

The broker and the database must be named in the settings (``[broker]`` host,
``[database]`` url); `cityhub ingest run` also fills them in from the
embedded default. Loads settings once, configures logging, hands over to
``ingest.workers.run_workers``.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from contracts.errors import HubError
from contracts.settings import describe_settings, load_settings
from ingest.workers import LOG_FORMAT, run_workers

logger = logging.getLogger("ingest")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m ingest", description=__doc__)
    parser.add_argument("--config", type=Path, help="settings file (TOML)")
    parser.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: ingest.workers)"
    )
    args = parser.parse_args()
    try:
        settings = load_settings(args.config, os.environ)
    except HubError as exc:
        parser.exit(2, f"error: {exc}\n")
    logging.basicConfig(
        # A long-running service logs its lifecycle (INFO) whatever the CLI default.
        level=min(getattr(logging, settings.log_level.upper(), logging.INFO), logging.INFO),
        format=LOG_FORMAT,
    )
    if settings.broker.host is None or settings.database.url is None:
        parser.exit(2, "error: set broker.host and database.url\n")
    workers = settings.ingest.workers if args.workers is None else args.workers
    if workers < 1:
        parser.exit(2, f"error: --workers must be at least 1, got {workers}\n")
    logger.info("settings: %s", describe_settings(settings))
    try:
        run_workers(settings, workers=workers)
    except HubError as exc:
        parser.exit(1, f"error: {exc}\n")


if __name__ == "__main__":
    main()
