"""Checks of a technician's request before anything is written: ids, types, ports.

Pure: a request comes in, a ``DeviceConfig`` (what the gateway will be told)
comes out, or the most specific InputError naming the field. The device
rules themselves are ``contracts.messages.check_device_config``, the same
check the gateway runs on receipt; this module adds what only a request has
(labels, free text) and says the check's findings in a technician's terms: a
field the catalog does not allow contradicts it (ConflictError), a bad port
is an InvalidPortError, two devices of a gateway that may not share a port,
a slave id or a DevEUI conflict (ConflictError naming both). Whether the
site, the gateway or the id exist in the registry is the registry's
check, made in the same transaction as the change.
"""

from __future__ import annotations

import re
from typing import Final, cast

from contracts.errors import (
    ConflictError,
    FieldTypeError,
    InvalidIdError,
    InvalidPortError,
    OutOfRangeError,
)
from contracts.messages import (
    DeviceConfig,
    GatewayConfig,
    Transport,
    check_device_config,
    check_shared_ports,
)

# Free text (labels, locations) ends up in a table and a bundle; 200
# characters hold "Tầng 2, quầy 14, cạnh cửa sổ phía đông" with room to spare.
TEXT_MAX_CHARS: Final = 200


def check_text(value: str, what: str) -> str:
    """Labels and locations: printable, at most TEXT_MAX_CHARS."""
    if len(value) > TEXT_MAX_CHARS or not value.isprintable():
        raise OutOfRangeError(f"{what} must be printable and at most {TEXT_MAX_CHARS} characters")
    return value


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
    model: str | None = None,
    slave_id: int | None = None,
    poll_interval_s: float | None = None,
    dev_eui: str | None = None,
    token_sha256: str | None = None,
) -> DeviceConfig:
    """The gateway's view of a device, every field checked; raise the first problem.

    A serial device needs a port and a frame protocol; an MQTT device has
    neither (it connects to the site broker with its own credential); a
    Modbus device a port (its bus), a slave id and a model of its type; a
    LoRaWAN device a DevEUI (any case; stored lower-case, as ChirpStack
    writes it) and a model; an HTTP device its token's hash.
    """
    check_text(label, "label")
    config = DeviceConfig(
        device_id=device_id,
        device_type=device_type,
        # Checked below: check_device_config refuses anything but the five.
        transport=cast("Transport", transport),
        # A form leaves the fields it does not show empty.
        port=port or None,
        protocol=protocol or None,
        label=label,
        rate_limit_per_s=rate_limit_per_s,
        enabled=enabled,
        model=model or None,
        slave_id=slave_id,
        poll_interval_s=poll_interval_s,
        # A DevEUI is printed on the device's label in either case, often with separators.
        dev_eui=_dev_eui(dev_eui),
        token_sha256=token_sha256 or None,
    )
    try:
        return check_device_config(config, "device")
    except FieldTypeError as exc:
        if isinstance(exc.__cause__, InvalidPortError):
            raise InvalidPortError(str(exc)) from exc
        raise ConflictError(str(exc)) from exc


def _dev_eui(value: str | None) -> str | None:
    """``70-B3-D5-7E-D0-05-A1-B2`` or ``70B3D57ED005A1B2`` as ChirpStack writes it."""
    if not value:
        return None
    compact = value.strip().lower()
    for separator in ("-", ":", " "):
        compact = compact.replace(separator, "")
    return compact


def shared_port_conflict(config: GatewayConfig, changed: str | None = None) -> None:
    """A gateway's devices that may not share what they share, as a ConflictError naming both.

    ``contracts.messages.check_shared_ports`` finds it (a serial sensor's
    port taken, a slave id twice on a bus, a bus at two line settings, a
    DevEUI twice) and names devices by their index in the config; this says
    it with their ids. ``changed``, the device a command adds or moves, is
    checked last, so the message says what it takes from whom.
    """
    devices = sorted(config.devices, key=lambda d: d.device_id == changed)
    try:
        check_shared_ports(devices)
    except InvalidIdError as exc:
        ids = [d.device_id for d in devices]

        def field(match: re.Match[str]) -> str:
            return f"device {ids[int(match[1])]}: {match[2].replace('_', ' ')}"

        def owner(match: re.Match[str]) -> str:
            return f"device {ids[int(match[1])]}'s"

        text = re.sub(r"devices\[(\d+)\]\.(\w+)", field, str(exc))
        text = re.sub(r"devices\[(\d+)\]'s(?: \([a-z0-9-]+\))?", owner, text)
        raise ConflictError(f"gateway {config.gateway_id}: {text}") from exc
