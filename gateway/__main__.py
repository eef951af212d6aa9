"""`python -m gateway --config FILE`: run one site gateway from a settings file.

The brokers must be named in the settings (``[broker]`` for the central one,
``[gateway.site_broker]`` for the site one); `cityhub gateway run` also fills
them in from the embedded default. Run by systemd (``Type=notify``), it tells
the service manager when it is ready and, with ``WatchdogSec=``, that it is
still healthy (``adapters.sdnotify``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from adapters.sdnotify import Notifier
from adapters.serve import start_service
from contracts.errors import HubError, SettingsError
from contracts.settings import default_state_dir
from gateway.service import Gateway, outbox_path, serve

logger = logging.getLogger("gateway")


def main() -> None:
    startup = start_service(
        prog="python -m gateway",
        description=__doc__,
        service_logger=logger,
        required={
            "broker.host": lambda s: s.broker.host,
            "gateway.site_broker.host": lambda s: s.gateway.site_broker.host,
        },
        # Every line of this process names its gateway (JSON logs: a field of its own).
        log_fields=lambda s: {"gateway_id": s.gateway.gateway_id},
    )
    settings = startup.settings
    state_dir = (
        Path(settings.local.state_dir)
        if settings.local.state_dir
        else default_state_dir(os.environ, is_root=os.geteuid() == 0)
    )
    try:
        notifier = Notifier.from_environ(os.environ)
        gateway = Gateway(
            settings=settings.gateway,
            central=settings.broker,
            site=settings.gateway.site_broker,
            outbox_path=outbox_path(settings.gateway, state_dir),
            notifier=notifier,
        )
    except HubError as exc:
        startup.fail(exc)
    try:
        asyncio.run(serve(gateway))
    except SettingsError as exc:
        # Raised at start-up, before any connection (a busy metrics port).
        startup.fail(exc)


if __name__ == "__main__":
    main()
