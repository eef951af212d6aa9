"""Checks of a technician's request before anything is written: ids, types, ports.

Pure: a request comes in, a ``DeviceConfig`` (what the gateway will be told)
comes out, or the most specific InputError naming the field. Whether the
site, the gateway or the id exist in the registry is the registry's check,
made in the same transaction as the change.
"""

from __future__ import annotations

import math
import re
from typing import Final

from contracts import catalog
from contracts.errors import (
    ConflictError,
    InvalidPortError,
    OutOfRangeError,
    UnknownDeviceTypeError,
)
from contracts.ids import check_id
from contracts.messages import (
    SERIAL_PROTOCOLS,
    DeviceConfig,
    GatewayConfig,
    Transport,
    check_gateway_config,
)

# pyserial URL schemes that reach a serial device: a TCP bridge, RFC 2217
# (telnet-controlled ports), and the loop/spy/hwgrep helpers.
SERIAL_SCHEMES: Final = ("socket", "rfc2217", "loop", "spy", "hwgrep", "alt")
# A device path: absolute, printable, no spaces (udev names never have them).
_PATH_RE: Final = re.compile(r"^/[A-Za-z0-9._/+:@-]+$")
_URL_RE: Final = re.compile(r"^(?P<scheme>[a-z0-9]+)://(?P<rest>[^\s]+)$")
# Free text (labels, locations) ends up in a table and a bundle; 200
# characters hold "Tầng 2, quầy 14, cạnh cửa sổ phía đông" with room to spare.
TEXT_MAX_CHARS: Final = 200


def check_port_url(port: str) -> str:
    """Return ``port`` if it is a device path (/dev/ttyUSB0) or a pyserial URL; else raise."""
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
    if scheme not in SERIAL_SCHEMES:
        raise InvalidPortError(
            f"port {port!r}: scheme {scheme!r} is not one of {', '.join(SERIAL_SCHEMES)}"
        )
    if scheme in ("socket", "rfc2217"):
        hostport = match.group("rest").split("?", 1)[0]
        host, sep, number = hostport.rpartition(":")
        if not sep or not host or not number.isdigit() or not 0 < int(number) < 65536:
            raise InvalidPortError(f"port {port!r}: {scheme}:// needs host:port")
    return port


def check_text(value: str, what: str) -> str:
    """Labels and locations: printable, at most TEXT_MAX_CHARS."""
    if len(value) > TEXT_MAX_CHARS or not value.isprintable():
        raise OutOfRangeError(f"{what} must be printable and at most {TEXT_MAX_CHARS} characters")
    return value


def check_transport(device_type: str, transport: str) -> Transport:
    try:
        dtype = catalog.device_type(device_type)
    except UnknownDeviceTypeError:
        known = ", ".join(sorted(catalog.DEVICE_TYPES))
        raise UnknownDeviceTypeError(f"device type {device_type!r} is not one of {known}") from None
    if transport not in ("serial", "mqtt"):
        raise ConflictError(f"transport {transport!r} is not 'serial' or 'mqtt'")
    if transport not in dtype.transports:
        raise ConflictError(
            f"a {device_type} device does not speak {transport}"
            f" (its transports: {', '.join(dtype.transports)})"
        )
    return "serial" if transport == "serial" else "mqtt"


def device_config(
    *,
    device_id: str,
    device_type: str,
    transport: str,
    port: str | None,
    protocol: str | None,
    label: str,
    rate_limit_per_s: float = 5.0,
    enabled: bool = True,
) -> DeviceConfig:
    """The gateway's view of a device, every field checked; raise the first problem.

    A serial device needs a port and a frame protocol; an MQTT device has
    neither (it connects to the site broker with its own credential).
    """
    check_id(device_id, "device id")
    checked_transport = check_transport(device_type, transport)
    check_text(label, "label")
    if checked_transport == "serial":
        check_port_url(port or "")
        if protocol not in SERIAL_PROTOCOLS:
            raise ConflictError(
                f"protocol {protocol!r}: a serial device needs one of {', '.join(SERIAL_PROTOCOLS)}"
            )
    else:
        if port:
            raise InvalidPortError(f"port {port!r}: only serial devices have a port")
        if protocol:
            raise ConflictError(f"protocol {protocol!r}: only serial devices have a protocol")
        port = protocol = None
    if not math.isfinite(rate_limit_per_s) or rate_limit_per_s <= 0:
        raise OutOfRangeError(f"rate limit {rate_limit_per_s!r} must be a positive number")
    config = DeviceConfig(
        device_id=device_id,
        device_type=device_type,
        transport=checked_transport,
        port=port,
        protocol=protocol,
        label=label,
        rate_limit_per_s=rate_limit_per_s,
        enabled=enabled,
    )
    # The same checks the gateway runs on receipt: a config that passes here
    # is one the gateway accepts.

    check_gateway_config(
        GatewayConfig(gateway_id="check", version=0, site_id="check", devices=[config])
    )
    return config
