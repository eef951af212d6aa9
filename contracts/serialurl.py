"""The one rule for a serial port URL, used by provisioning and the gateway.

Pure: a string comes in and is returned, or ``InvalidPortError`` names what is
wrong with it. A port is one of

- a device path: ``/dev/ttyUSB0``, ``/dev/serial/by-id/...``, a pty such as
  ``/dev/pts/7`` (absolute, printable, no spaces, no empty segment);
- a network serial port pyserial opens: ``socket://host:port`` (a TCP
  bridge) or ``rfc2217://host:port`` (a telnet-controlled port).

pyserial's other schemes (``loop://``, ``spy://``, ``hwgrep://``, ``alt://``)
are test and lookup helpers that name no particular device: a config that
uses one cannot say which sensor it reads, so they are refused. Whether the
port exists or opens is the serial adapter's to find out.
"""

from __future__ import annotations

import re
from typing import Final

from contracts.errors import InvalidPortError

# Schemes that name one reachable endpoint, host:port.
SERIAL_URL_SCHEMES: Final = ("socket", "rfc2217")
# A device path: absolute, printable, no spaces (udev names never have them).
_PATH_RE: Final = re.compile(r"^/[A-Za-z0-9._/+:@-]+$")
_URL_RE: Final = re.compile(r"^(?P<scheme>[a-z0-9]+)://(?P<rest>[^\s]+)$")
_TCP_PORT_MAX: Final = 65535


def check_port_url(port: str) -> str:
    """Return ``port`` if it is a device path or ``socket://`` / ``rfc2217://host:port``."""
    if not isinstance(port, str) or not port:
        raise InvalidPortError("port: a serial device needs a port (a /dev path or a URL)")
    if port.startswith("/"):
        if _PATH_RE.fullmatch(port) is None or "//" in port or port.endswith("/"):
            raise InvalidPortError(f"port {port!r} is not a device path like /dev/ttyUSB0")
        return port
    match = _URL_RE.fullmatch(port)
    if match is None:
        raise InvalidPortError(
            f"port {port!r} is neither a device path (/dev/ttyUSB0) nor a serial URL"
            " (socket://host:port, rfc2217://host:port)"
        )
    scheme = match.group("scheme")
    if scheme not in SERIAL_URL_SCHEMES:
        raise InvalidPortError(
            f"port {port!r}: scheme {scheme!r} is not one of {', '.join(SERIAL_URL_SCHEMES)}"
        )
    hostport = match.group("rest").split("?", 1)[0]
    host, sep, number = hostport.rpartition(":")
    if not sep or not host or not number.isdigit() or not 0 < int(number) <= _TCP_PORT_MAX:
        raise InvalidPortError(f"port {port!r}: {scheme}:// needs host:port")
    return port
