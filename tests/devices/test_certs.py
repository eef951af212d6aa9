"""The certificate register's pure rules: issue, revoke, expiry windows, CRL building."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from contracts.errors import ConflictError, NotFoundError, ProvisioningError
from devices import certs
from devices.certs import CertRecord, CertRegister
from devices.pki import build_crl

NOW = dt.datetime(2026, 12, 6, 8, 0, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)


def rec(serial: str, name: str, *, days: float, kind: certs.Kind = "client", **kw) -> CertRecord:
    return CertRecord(serial=serial, name=name, kind=kind, not_after=NOW + days * DAY, **kw)


REGISTER = CertRegister(
    certs=(
        rec("1", "ca", kind="ca", days=3000),
        rec("2", "server", kind="server", days=700),
        rec("a1", "gw-a", days=10),  # old, expiring
        rec("a2", "gw-a", days=700),  # renewed
        rec("b1", "gw-b", days=20),
        rec("c1", "gw-c", days=-1),  # expired
        rec("d1", "gw-d", days=5, revoked_at=NOW - DAY, reason="key_compromise"),
        rec("e1", "gw-e", days=40),
    )
)


def test_record_issued_refuses_a_repeated_serial():
    register = certs.record_issued(CertRegister(), rec("ff", "gw-x", days=1))
    assert [r.serial for r in register.certs] == ["ff"]
    with pytest.raises(ConflictError, match="already registered"):
        certs.record_issued(register, rec("ff", "gw-y", days=1))


@pytest.mark.parametrize(
    ("name", "serial", "revoked_now", "revoked_before"),
    [
        ("gw-a", None, ["a1", "a2"], []),  # every certificate of the name
        ("gw-a", "a1", ["a1"], []),  # only the old one, after a renewal
        ("gw-a", "00A1", ["a1"], []),  # serials as printed: case, leading zeros
        ("gw-d", None, [], ["d1"]),  # repeated: nothing changes
        ("gw-c", None, ["c1"], []),  # expired certificates are listed too
    ],
)
def test_revoke(name, serial, revoked_now, revoked_before):
    register, newly, already = certs.revoke(
        REGISTER, name, now=NOW, reason="superseded", serial=serial
    )
    assert [r.serial for r in newly] == revoked_now
    assert [r.serial for r in already] == revoked_before
    assert all(r.revoked_at == NOW and r.reason == "superseded" for r in newly)
    # Everything else is as it was; order kept.
    assert [r.serial for r in register.certs] == [r.serial for r in REGISTER.certs]
    untouched = {r.serial for r in REGISTER.certs} - set(revoked_now)
    before = {r.serial: r for r in REGISTER.certs}
    assert all(r == before[r.serial] for r in register.certs if r.serial in untouched)


@pytest.mark.parametrize(
    ("name", "serial", "error", "match"),
    [
        ("gw-nobody", None, NotFoundError, "no client certificate issued to 'gw-nobody'"),
        ("gw-a", "b1", NotFoundError, "with serial b1"),  # another gateway's serial
        ("ca", None, ConflictError, "the CA is never revoked"),
        ("server", None, ConflictError, "renew --server"),
    ],
)
def test_revoke_refuses(name, serial, error, match):
    with pytest.raises(error, match=match):
        certs.revoke(REGISTER, name, now=NOW, serial=serial)


def test_revoke_refuses_an_unknown_reason():
    with pytest.raises(ProvisioningError, match="unknown reason"):
        certs.revoke(REGISTER, "gw-a", now=NOW, reason="because")


@pytest.mark.parametrize(
    ("within_days", "expected"),
    [
        (0, []),
        (15, []),  # gw-a's newest (a2) is far off: renewed already
        (30, ["gw-b"]),
        (45, ["gw-b", "gw-e"]),  # never the expired gw-c or the revoked gw-d
        (800, ["gw-a", "gw-b", "gw-e"]),
    ],
)
def test_expiring_clients(within_days, expected):
    got = certs.expiring_clients(REGISTER, now=NOW, within=within_days * DAY)
    assert got == expected


def test_soonest_and_days_left():
    assert [r.serial for r in certs.soonest(REGISTER, now=NOW, count=2)] == ["a1", "b1"]
    assert certs.days_left(REGISTER.certs[2], NOW) == pytest.approx(10)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("30d", 30 * DAY), ("30", 30 * DAY), ("12h", dt.timedelta(hours=12)), (" 7D ", 7 * DAY)],
)
def test_parse_window(text, expected):
    assert certs.parse_window(text) == expected


@pytest.mark.parametrize("text", ["", "d", "-5d", "0", "nan", "inf", "1e9d", "30m", "x" * 10_000])
def test_parse_window_refuses(text):
    with pytest.raises(ProvisioningError):
        certs.parse_window(text)


def _ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + 365 * DAY)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def test_build_crl_lists_revoked_serials_only_and_its_window():
    cert, key = _ca()
    register, _, _ = certs.revoke(REGISTER, "gw-b", now=NOW)
    crl = build_crl(cert, key, certs.revoked(register), now=NOW, days=90)
    assert crl.is_signature_valid(key.public_key())
    assert sorted(e.serial_number for e in crl) == [0xB1, 0xD1]
    assert crl.next_update_utc == NOW + 90 * DAY
    assert crl.last_update_utc < NOW
    d1 = crl.get_revoked_certificate_by_serial_number(0xD1)
    assert d1 is not None
    assert d1.revocation_date_utc == NOW - DAY
    b1 = crl.get_revoked_certificate_by_serial_number(0xB1)
    assert b1 is not None
    # "unspecified" is written as no reason at all (RFC 5280 5.3.1).
    with pytest.raises(x509.ExtensionNotFound):
        b1.extensions.get_extension_for_class(x509.CRLReason)
    # An empty CRL is still a signed, valid list.
    empty = build_crl(cert, key, [], now=NOW)
    assert len(empty) == 0
    assert empty.is_signature_valid(key.public_key())


@pytest.mark.parametrize(
    ("crl_days", "warned", "expired"),
    [
        (60, ["gw-a", "gw-b"], []),
        (10, ["CRL", "gw-a", "gw-b"], []),
        (-1, ["gw-a", "gw-b"], ["CRL"]),
    ],
)
def test_certificate_status(crl_days, warned, expired):
    from cityhub.cli.status import certificate_status

    # Soonest live clients only: gw-c has expired and gw-d is revoked, so they are not listed.
    got = certificate_status(REGISTER, NOW + crl_days * DAY, now=NOW)
    assert [c.name for c in got.lines] == ["CA", "server", "CRL", "gw-a", "gw-b", "gw-e"]
    assert [w.split(":")[0] for w in got.warnings] == warned
    assert [e.split(":")[0] for e in got.expired] == expired
