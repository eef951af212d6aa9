"""A small PKI for the brokers' TLS listeners: a CA, server and client certificates.

Adapter over the ``cryptography`` library and the files of a PKI directory::

    ca.crt, ca.key                 the CA (its key 0600)
    server.crt, server.key         the central broker's certificate (names: hosts given)
    clients/{name}.crt, .key       client certificates (a gateway's: CN = its id)
    certs.json                     the register of issued/revoked certificates (0600)
    crl.pem                        the CA's signed revocation list (the brokers' crlfile)

Keys are ECDSA P-256: small enough for a gateway's flash, and every TLS 1.2
stack (Mosquitto's OpenSSL, Python's ssl) speaks it. Files holding keys are
written 0600; certificates 0644; the register and the CRL are replaced
atomically (a broker or a second command never reads half a file). Every
certificate issued here is recorded in the register; revoking one re-signs
the CRL. Handing the CRL to a running broker is the caller's business.
Library and file errors become PkiError.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import ipaddress
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from contracts.errors import PkiError
from contracts.ids import check_id
from devices import certs
from devices.certs import CertRecord, CertRegister

# A CA outlives the devices it vouches for (10 years); leaf certificates are
# renewed with the hardware's service interval (2 years).
CA_DAYS: Final = 3650
LEAF_DAYS: Final = 730
ORGANISATION: Final = "cityhub"
# A CRL's next_update. Only our own brokers read it, from a file we write, so
# a short interval buys no freshness (a revocation re-signs it at once); but
# OpenSSL refuses EVERY client certificate once next_update has passed
# (X509_V_ERR_CRL_HAS_EXPIRED, tested in tests/devices/test_pki_revocation.py).
# 90 days leaves two months of quiet and a month of warnings (`cityhub status`
# warns under certs.WARN_DAYS) before `cityhub pki crl` must have re-signed it.
CRL_DAYS: Final = 90


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync, rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_REGISTER_DECODER = msgspec.json.Decoder(CertRegister)


def _record(cert: x509.Certificate, name: str, kind: certs.Kind) -> CertRecord:
    return CertRecord(
        serial=certs.serial_hex(cert.serial_number),
        name=name,
        kind=kind,
        not_after=cert.not_valid_after_utc,
    )


def build_crl(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    revoked: list[CertRecord],
    *,
    now: dt.datetime,
    days: int = CRL_DAYS,
) -> x509.CertificateRevocationList:
    """The CA's CRL listing ``revoked`` (pure: no files), valid ``days`` from ``now``."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + dt.timedelta(days=days))
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    )
    for record in revoked:
        if record.revoked_at is None:
            continue
        entry = (
            x509.RevokedCertificateBuilder()
            .serial_number(int(record.serial, 16))
            .revocation_date(record.revoked_at)
        )
        if record.reason and record.reason != "unspecified":
            entry = entry.add_extension(
                x509.CRLReason(x509.ReasonFlags[record.reason]), critical=False
            )
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(ca_key, hashes.SHA256())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANISATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


class Pki:
    """The PKI directory ``root``; ``now`` is passed to every issuing call."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def ca(self) -> CertFiles:
        return CertFiles(self.root / "ca.crt", self.root / "ca.key")

    @property
    def server(self) -> CertFiles:
        return CertFiles(self.root / "server.crt", self.root / "server.key")

    def client(self, name: str) -> CertFiles:
        check_id(name, "client certificate name")
        return CertFiles(
            self.root / "clients" / f"{name}.crt", self.root / "clients" / f"{name}.key"
        )

    @property
    def register_path(self) -> Path:
        return self.root / "certs.json"

    @property
    def crl_path(self) -> Path:
        return self.root / "crl.pem"

    def has_ca(self) -> bool:
        return self.ca.cert.exists() and self.ca.key.exists()

    def create_ca(self, *, now: dt.datetime, common_name: str = "cityhub CA") -> CertFiles:
        """A new self-signed CA; refuses to replace an existing one (every cert would break)."""
        if self.has_ca():
            raise PkiError(f"a CA already exists in {self.root}; remove it to start over")
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        _write(self.ca.key, _key_pem(key), 0o600)
        _write(self.ca.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        self._save(certs.record_issued(CertRegister(), _record(cert, "ca", "ca")))
        self.write_crl(now=now)
        return self.ca

    def _load_ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        try:
            cert = x509.load_pem_x509_certificate(self.ca.cert.read_bytes())
            key = serialization.load_pem_private_key(self.ca.key.read_bytes(), password=None)
        except FileNotFoundError:
            raise PkiError(f"no CA in {self.root}: run `cityhub pki init`") from None
        except (ValueError, TypeError) as exc:
            raise PkiError(f"the CA in {self.root} is unreadable: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"the CA key in {self.root} is not an EC key")
        return cert, key

    def ca_pem(self) -> str:
        try:
            return self.ca.cert.read_text(encoding="ascii")
        except FileNotFoundError:
            raise PkiError(f"no CA in {self.root}: run `cityhub pki init`") from None

    def _issue(
        self,
        files: CertFiles,
        *,
        common_name: str,
        now: dt.datetime,
        server_names: list[str] | None,
        days: int = LEAF_DAYS,
    ) -> CertFiles:
        if not 0 < days <= CA_DAYS:
            raise PkiError(f"a certificate's validity must be 1..{CA_DAYS} days, not {days}")
        ca_cert, ca_key = self._load_ca()
        # Never past the CA's own end: a client would fail the chain from then on.
        not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
        )
        if server_names is not None:
            alt: list[x509.GeneralName] = []
            for name in server_names:
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(name)))
                except ValueError:
                    alt.append(x509.DNSName(name))
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
            usage = ExtendedKeyUsageOID.SERVER_AUTH
        else:
            usage = ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        kind: certs.Kind = "server" if server_names is not None else "client"
        with self._locked():
            register = certs.record_issued(
                self.register(), _record(cert, "server" if kind == "server" else common_name, kind)
            )
            _write(files.key, _key_pem(key), 0o600)
            _write(files.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
            self._save(register)
        return files

    def issue_server(
        self, hosts: list[str], *, now: dt.datetime, days: int = LEAF_DAYS
    ) -> CertFiles:
        """The broker's certificate, valid for ``hosts`` (names or IP addresses)."""
        if not hosts:
            raise PkiError("a server certificate needs at least one host name or address")
        return self._issue(
            self.server, common_name=hosts[0], now=now, server_names=hosts, days=days
        )

    def issue_client(self, name: str, *, now: dt.datetime, days: int = LEAF_DAYS) -> CertFiles:
        """A client certificate with CN ``name`` (a gateway id); a new key pair each time.

        The files of ``name`` are replaced (a bundle made next carries the new
        one); a certificate issued before stays valid until it expires or is
        revoked, so a gateway can switch over.
        """
        return self._issue(
            self.client(name), common_name=name, now=now, server_names=None, days=days
        )

    def renew_server(self, *, now: dt.datetime, days: int = LEAF_DAYS) -> CertFiles:
        """A new server certificate (new key) for the host names of the current one."""
        try:
            current = x509.load_pem_x509_certificate(self.server.cert.read_bytes())
        except FileNotFoundError:
            raise PkiError(
                f"no server certificate in {self.root}: run `cityhub pki init`"
            ) from None
        except ValueError as exc:
            raise PkiError(f"{self.server.cert} is unreadable: {exc}") from exc
        alt = current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        hosts = [*alt.get_values_for_type(x509.DNSName)]
        hosts += [str(ip) for ip in alt.get_values_for_type(x509.IPAddress)]
        return self.issue_server(hosts, now=now, days=days)

    # -- register and revocation -----------------------------------------------------

    def register(self) -> CertRegister:
        """The register; certificates issued before it existed are added from their files."""
        try:
            register = _REGISTER_DECODER.decode(self.register_path.read_bytes())
        except FileNotFoundError:
            register = CertRegister()
        except (OSError, msgspec.DecodeError) as exc:
            raise PkiError(f"{self.register_path} is unreadable: {exc}") from exc
        known = {r.serial for r in register.certs}
        found: list[tuple[Path, str, certs.Kind]] = [
            (self.ca.cert, "ca", "ca"),
            (self.server.cert, "server", "server"),
        ]
        clients = self.root / "clients"
        if clients.is_dir():
            found += [(p, p.stem, "client") for p in sorted(clients.glob("*.crt"))]
        for path, name, kind in found:
            try:
                cert = x509.load_pem_x509_certificate(path.read_bytes())
            except (OSError, ValueError):
                continue
            if certs.serial_hex(cert.serial_number) not in known:
                register = certs.record_issued(register, _record(cert, name, kind))
        return register

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer of the register at a time (two technicians, a timer and a command)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _save(self, register: CertRegister) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        _write(self.register_path, msgspec.json.format(msgspec.json.encode(register)), 0o600)

    def revoke(
        self,
        name: str,
        *,
        now: dt.datetime,
        reason: str = "unspecified",
        serial: str | None = None,
    ) -> tuple[list[CertRecord], list[CertRecord]]:
        """Revoke ``name``'s client certificates (or one serial); re-sign the CRL.

        Returns ``(revoked now, revoked before)``; the CRL is written only
        when something changed.
        """
        with self._locked():
            register, newly, already = certs.revoke(
                self.register(), name, now=now, reason=reason, serial=serial
            )
            if newly:
                self._save(register)
                self.write_crl(now=now, register=register)
        return newly, already

    def write_crl(
        self, *, now: dt.datetime, register: CertRegister | None = None, days: int = CRL_DAYS
    ) -> Path:
        """Sign and write ``crl.pem`` (0644: brokers read it) from the register's revocations."""
        ca_cert, ca_key = self._load_ca()
        register = self.register() if register is None else register
        crl = build_crl(ca_cert, ca_key, certs.revoked(register), now=now, days=days)
        _write(self.crl_path, crl.public_bytes(serialization.Encoding.PEM), 0o644)
        return self.crl_path

    def resign_crl(self, *, now: dt.datetime) -> Path:
        """``write_crl`` under the register's lock (a revoke at the same time is not lost)."""
        with self._locked():
            return self.write_crl(now=now)

    def crl_next_update(self) -> dt.datetime | None:
        """When the current CRL expires (None: no CRL written yet)."""
        try:
            crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise PkiError(f"{self.crl_path} is not a PEM CRL: {exc}") from exc
        return crl.next_update_utc


def describe_certificate(path: Path) -> tuple[str, str, dt.datetime]:
    """``(subject, issuer, not_valid_after)`` of a PEM certificate."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise PkiError(f"{path} does not exist") from None
    except ValueError as exc:
        raise PkiError(f"{path} is not a PEM certificate: {exc}") from exc
    return cert.subject.rfc4514_string(), cert.issuer.rfc4514_string(), cert.not_valid_after_utc
