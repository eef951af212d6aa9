"""`python -m alerts --config FILE [--once]`: run the alerts job.

The database must be named in the settings (``[database]`` url); `cityhub
alerts run` also fills it in from the embedded default. Loads settings and
the rules once, configures logging, hands over to ``alerts.service.serve``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path

from alerts.service import AlertsJob, load_job_rules, serve
from contracts.errors import HubError
from contracts.settings import describe_settings, load_settings

logger = logging.getLogger("alerts")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m alerts", description=__doc__)
    parser.add_argument("--config", type=Path, help="settings file (TOML)")
    parser.add_argument("--once", action="store_true", help="run one cycle and exit")
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
    if settings.database.url is None:
        parser.exit(2, "error: set database.url\n")
    logger.info("settings: %s", describe_settings(settings))
    try:
        rules = load_job_rules(settings.alerts)
        job = AlertsJob(settings=settings.alerts, database=settings.database, rules=rules)
        asyncio.run(serve(job, once=args.once))
    except HubError as exc:
        parser.exit(1, f"error: {exc}\n")


if __name__ == "__main__":
    main()
