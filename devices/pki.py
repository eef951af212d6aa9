"""A small PKI for the brokers' TLS listeners: a CA, server and client certificates.

Adapter over the ``cryptography`` library and the files of a PKI directory::

    ca.crt, ca.key                 the CA (its key 0600)
    server.crt, server.key         the central broker's certificate (names: hosts given)
    clients/{name}.crt, .key       client certificates (a gateway's: CN = its id)

Keys are ECDSA P-256: small enough for a gateway's flash, and every TLS 1.2
stack (Mosquitto's OpenSSL, Python's ssl) speaks it. Files holding keys are
written 0600; certificates 0644. Library and file errors become PkiError.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from contracts.errors import PkiError
from contracts.ids import check_id

# A CA outlives the devices it vouches for (10 years); leaf certificates are
# renewed with the hardware's service interval (2 years).
CA_DAYS: Final = 3650
LEAF_DAYS: Final = 730
ORGANISATION: Final = "cityhub"


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    path.chmod(mode)


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
    ) -> CertFiles:
        ca_cert, ca_key = self._load_ca()
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
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
        _write(files.key, _key_pem(key), 0o600)
        _write(files.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return files

    def issue_server(self, hosts: list[str], *, now: dt.datetime) -> CertFiles:
        """The broker's certificate, valid for ``hosts`` (names or IP addresses)."""
        if not hosts:
            raise PkiError("a server certificate needs at least one host name or address")
        return self._issue(self.server, common_name=hosts[0], now=now, server_names=hosts)

    def issue_client(self, name: str, *, now: dt.datetime) -> CertFiles:
        """A client certificate with CN ``name`` (a gateway id)."""
        return self._issue(self.client(name), common_name=name, now=now, server_names=None)


def describe_certificate(path: Path) -> tuple[str, str, dt.datetime]:
    """``(subject, issuer, not_valid_after)`` of a PEM certificate."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise PkiError(f"{path} does not exist") from None
    except ValueError as exc:
        raise PkiError(f"{path} is not a PEM certificate: {exc}") from exc
    return cert.subject.rfc4514_string(), cert.issuer.rfc4514_string(), cert.not_valid_after_utc
