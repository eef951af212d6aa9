"""`python -m gateway --config FILE`: run one site gateway from a settings file.

The brokers must be named in the settings (``[broker]`` for the central one,
``[gateway.site_broker]`` for the site one); `cityhub gateway run` also fills
them in from the embedded default.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path

from contracts.errors import HubError, SettingsError
from contracts.settings import default_state_dir, describe_settings, load_settings
from gateway.service import Gateway, outbox_path, serve

logger = logging.getLogger("gateway")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m gateway", description=__doc__)
    parser.add_argument("--config", type=Path, help="settings file (TOML)")
    args = parser.parse_args()
    try:
        settings = load_settings(args.config, os.environ)
    except HubError as exc:
        parser.exit(2, f"error: {exc}\n")
    logging.basicConfig(
        # A long-running service logs its lifecycle (INFO) whatever the CLI default.
        level=min(getattr(logging, settings.log_level.upper(), logging.INFO), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if settings.broker.host is None or settings.gateway.site_broker.host is None:
        parser.exit(2, "error: set broker.host and gateway.site_broker.host\n")
    logger.info("settings: %s", describe_settings(settings))
    state_dir = (
        Path(settings.local.state_dir)
        if settings.local.state_dir
        else default_state_dir(os.environ, is_root=os.geteuid() == 0)
    )
    try:
        gateway = Gateway(
            settings=settings.gateway,
            central=settings.broker,
            site=settings.gateway.site_broker,
            outbox_path=outbox_path(settings.gateway, state_dir),
        )
    except HubError as exc:
        parser.exit(2, f"error: {exc}\n")
    try:
        asyncio.run(serve(gateway))
    except SettingsError as exc:
        # Raised at start-up, before any connection (a busy metrics port).
        parser.exit(2, f"error: {exc}\n")


if __name__ == "__main__":
    main()
