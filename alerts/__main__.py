"""`python -m alerts --config FILE [--once]`: run the alerts job.

The database must be named in the settings (``[database]`` url); `cityhub
alerts run` also fills it in from the embedded default. Loads settings and
the rules once, configures logging, hands over to ``alerts.service.serve``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from adapters.serve import start_service
from alerts.service import AlertsJob, load_job_rules, serve
from contracts.errors import HubError

logger = logging.getLogger("alerts")


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--once", action="store_true", help="run one cycle and exit")


def main() -> None:
    startup = start_service(
        prog="python -m alerts",
        description=__doc__,
        service_logger=logger,
        required={"database.url": lambda s: s.database.url},
        add_options=_add_options,
    )
    settings = startup.settings
    try:
        rules = load_job_rules(settings.alerts)
        job = AlertsJob(settings=settings.alerts, database=settings.database, rules=rules)
        asyncio.run(serve(job, once=startup.args.once))
    except HubError as exc:
        startup.fail(exc, code=1)


if __name__ == "__main__":
    main()
