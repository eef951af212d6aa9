"""Checks of a technician's request before anything is written: ids, types, ports.

Pure: a request comes in, a ``DeviceConfig`` (what the gateway will be told)
comes out, or the most specific InputError naming the field. The device
rules themselves are ``contracts.messages.check_device_config``, the same
check the gateway runs on receipt; this module adds what only a request has
(labels, free text) and says the check's findings in a technician's terms: a
field the catalog does not allow contradicts it (ConflictError), a bad port
is an InvalidPortError. Whether the site, the gateway or the id exist in the
registry is the registry's check, made in the same transaction as the change.
"""

from __future__ import annotations

from typing import Final, cast

from contracts.errors import ConflictError, FieldTypeError, InvalidPortError, OutOfRangeError
from contracts.messages import DeviceConfig, Transport, check_device_config

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
) -> DeviceConfig:
    """The gateway's view of a device, every field checked; raise the first problem.

    A serial device needs a port and a frame protocol; an MQTT device has
    neither (it connects to the site broker with its own credential).
    """
    check_text(label, "label")
    config = DeviceConfig(
        device_id=device_id,
        device_type=device_type,
        # Checked below: check_device_config refuses anything but the two.
        transport=cast("Transport", transport),
        # A form leaves the fields it does not show empty.
        port=port or None,
        protocol=protocol or None,
        label=label,
        rate_limit_per_s=rate_limit_per_s,
        enabled=enabled,
    )
    try:
        return check_device_config(config, "device")
    except FieldTypeError as exc:
        if isinstance(exc.__cause__, InvalidPortError):
            raise InvalidPortError(str(exc)) from exc
        raise ConflictError(str(exc)) from exc
