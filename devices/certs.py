"""The register of issued and revoked certificates: pure updates and expiry windows.

A PKI directory keeps one record per certificate it issued (serial, name,
kind, not_after, and revoked_at/reason once revoked); ``devices.pki`` reads
and writes the file and builds the CRL from the revoked records. This module
only computes: it takes the records and ``now`` and returns new records or
answers, with no I/O.
"""

from __future__ import annotations

import datetime as dt
from typing import Final, Literal

import msgspec

from contracts.errors import ConflictError, NotFoundError, ProvisioningError

Kind = Literal["ca", "server", "client"]

# RFC 5280 reason codes a technician may give (x509.ReasonFlags' names);
# the others (certificate_hold, remove_from_crl, ca/aa_compromise) do not
# apply to a gateway's certificate.
REASONS: Final = (
    "unspecified",
    "key_compromise",
    "affiliation_changed",
    "superseded",
    "cessation_of_operation",
)
# `cityhub status` and `cityhub pki list` warn when a certificate (or the
# CRL) has fewer days left than this: a month leaves time to reach a
# gateway in the field.
WARN_DAYS: Final = 30


class CertRecord(msgspec.Struct, frozen=True, kw_only=True):
    serial: str  # lower-case hex, no leading zeros
    name: str  # a client's CN (gateway id); "ca" / "server" for those
    kind: Kind
    not_after: dt.datetime
    revoked_at: dt.datetime | None = None
    reason: str | None = None


class CertRegister(msgspec.Struct, frozen=True, kw_only=True):
    version: int = 1
    certs: tuple[CertRecord, ...] = ()


def serial_hex(serial: int) -> str:
    return f"{serial:x}"


def record_issued(register: CertRegister, record: CertRecord) -> CertRegister:
    """Add a newly issued certificate (a serial already present is a conflict)."""
    if any(r.serial == record.serial for r in register.certs):
        raise ConflictError(f"certificate serial {record.serial} is already registered")
    return msgspec.structs.replace(register, certs=(*register.certs, record))


def revoke(
    register: CertRegister,
    name: str,
    *,
    now: dt.datetime,
    reason: str = "unspecified",
    serial: str | None = None,
) -> tuple[CertRegister, list[CertRecord], list[CertRecord]]:
    """Revoke every client certificate of ``name`` (or the one ``serial``).

    Returns the new register, the records revoked now and those that already
    were (a repeated revoke changes nothing). The CA and the server
    certificate are refused: revoking the CA would refuse every client, and
    the server's certificate is not checked against the CRL by anyone.
    """
    if reason not in REASONS:
        raise ProvisioningError(f"unknown reason {reason!r}: one of {', '.join(REASONS)}")
    mine = [r for r in register.certs if r.name == name and r.kind == "client"]
    if serial is not None:
        mine = [r for r in mine if r.serial == serial.lower().lstrip("0")]
    if not mine:
        if name in ("ca", "server") or any(
            r.kind != "client" and r.name == name for r in register.certs
        ):
            raise ConflictError(
                f"{name!r} is not a client certificate: the CA is never revoked (make a new"
                " PKI and re-issue every certificate), the server's certificate is replaced"
                " with `cityhub pki renew --server`"
            )
        which = f" with serial {serial}" if serial is not None else ""
        raise NotFoundError(f"no client certificate issued to {name!r}{which}")
    already = [r for r in mine if r.revoked_at is not None]
    now_revoked = [
        msgspec.structs.replace(r, revoked_at=now, reason=reason)
        for r in mine
        if r.revoked_at is None
    ]
    changed = {r.serial: r for r in now_revoked}
    certs = tuple(changed.get(r.serial, r) for r in register.certs)
    return msgspec.structs.replace(register, certs=certs), now_revoked, already


def revoked(register: CertRegister) -> list[CertRecord]:
    return [r for r in register.certs if r.revoked_at is not None]


def days_left(record: CertRecord, now: dt.datetime) -> float:
    return (record.not_after - now).total_seconds() / 86400


def live(record: CertRecord, now: dt.datetime) -> bool:
    return record.revoked_at is None and record.not_after > now


def expiring_clients(
    register: CertRegister, *, now: dt.datetime, within: dt.timedelta
) -> list[str]:
    """Names whose newest live client certificate expires within ``within`` (sorted).

    A name renewed already (a newer certificate beyond the window) is not
    listed; a name whose certificates are all expired or revoked is not
    either: renewing would bring back a gateway someone stopped.
    """
    newest: dict[str, CertRecord] = {}
    for r in register.certs:
        if r.kind != "client" or not live(r, now):
            continue
        if r.name not in newest or r.not_after > newest[r.name].not_after:
            newest[r.name] = r
    return sorted(n for n, r in newest.items() if r.not_after - now <= within)


def soonest(register: CertRegister, *, now: dt.datetime, count: int) -> list[CertRecord]:
    """The ``count`` live client certificates that expire first."""
    alive = [r for r in register.certs if r.kind == "client" and live(r, now)]
    return sorted(alive, key=lambda r: (r.not_after, r.name))[:count]


def parse_window(text: str) -> dt.timedelta:
    """``30d``, ``12h`` or a bare number of days as a window."""
    units = {"d": 86400, "h": 3600}
    raw = text.strip().lower()
    unit = raw[-1:] if raw[-1:] in units else "d"
    number = raw[:-1] if raw[-1:] in units else raw
    try:
        value = float(number)
    except ValueError:
        raise ProvisioningError(f"not a window: {text!r} (e.g. 30d or 12h)") from None
    if not 0 < value <= 3650 * (24 if unit == "h" else 1):
        raise ProvisioningError(f"window out of range: {text!r}")
    return dt.timedelta(seconds=value * units[unit])
