"""systemd's notify protocol: READY, WATCHDOG, STOPPING and STATUS datagrams to the service manager.

A unit with ``Type=notify`` hands its process ``NOTIFY_SOCKET`` (a path, or
an abstract socket name starting with ``@``), and with ``WatchdogSec=`` also
``WATCHDOG_USEC`` (and ``WATCHDOG_PID``). ``Notifier.from_environ`` reads
them once at start-up; ``notify`` sends one datagram of ``KEY=value`` lines.
Without ``NOTIFY_SOCKET`` (run by hand, in a container, in tests) every call
does nothing. No library: the protocol is a datagram on an AF_UNIX socket.

When the service is healthy enough to say ``WATCHDOG=1`` is the service's
business: a ping sent from a thread of its own would keep a hung service
alive, so the ping belongs in the loop whose health it vouches for.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from contracts.errors import SettingsError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Notifier:
    """Where the notifications go (None: nowhere) and the watchdog interval (0: none)."""

    address: str | None = None
    watchdog_s: float = 0.0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Notifier:
        """Read ``NOTIFY_SOCKET`` and ``WATCHDOG_USEC`` (for this process, per ``WATCHDOG_PID``)."""
        address = environ.get("NOTIFY_SOCKET") or None
        watchdog_s = 0.0
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        if usec and (not pid or pid == str(os.getpid())):
            try:
                watchdog_s = int(usec) / 1e6
            except ValueError as exc:
                raise SettingsError("WATCHDOG_USEC", f"{usec!r} is not microseconds") from exc
            if watchdog_s <= 0:
                raise SettingsError("WATCHDOG_USEC", f"{usec!r} is not positive")
        return cls(address=address, watchdog_s=watchdog_s)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str) -> None:
        """Send ``KEY=value`` lines (``notify(READY="1", STATUS="...")``) in one datagram.

        A service manager that is gone is logged, not raised: the service
        itself goes on (systemd then restarts it when the watchdog fires).
        """
        if self.address is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        address = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(address)
                sock.sendall(message)
        except OSError as exc:
            logger.warning("notify socket %s: %s", self.address, exc)
