"""Writes bundles to files readable by their owner only, with their QR codes.

For a bundle named ``{kind}-{id}`` in the bundle directory (0700)::

    {kind}-{id}.json     the bundle (devices.bundle), 0600
    {kind}-{id}.png      its QR code, 0600 (it holds the secret too)
    gateway-{id}.toml    gateways only: settings for `cityhub gateway run -c`
    gateway-{id}/        gateways only: ca.crt, client.crt, client.key when TLS is set up

Files are created with mode 0600 from the start (no window in which another
user could open them). QR codes come from ``segno`` (no other dependencies).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import segno

from devices.bundle import (
    Bundle,
    GatewayBundle,
    encode_bundle,
    gateway_settings_toml,
    qr_payload,
)

# PNG modules of 4 pixels: ~300 px for a device bundle, readable by a phone
# camera at arm's length from a laptop screen or an A6 print.
QR_SCALE = 4


@dataclass(frozen=True)
class BundleFiles:
    json: Path
    png: Path
    settings: Path | None = None


def write_secret_file(path: Path, data: bytes) -> None:
    """Create or replace ``path`` with mode 0600 from the first byte."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    tmp.chmod(0o600)
    tmp.replace(path)


def _qr(bundle: Bundle) -> segno.QRCode:
    return segno.make(qr_payload(bundle), error="l", micro=False)


def qr_terminal(bundle: Bundle) -> str:
    """The QR code drawn with block characters, for a terminal."""
    out = io.StringIO()
    _qr(bundle).terminal(out=out, compact=True, border=2)
    return out.getvalue()


def write_bundle(directory: Path, bundle: Bundle) -> BundleFiles:
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    if isinstance(bundle, GatewayBundle):
        name = f"gateway-{bundle.gateway_id}"
    else:
        name = f"device-{bundle.device_id}"
    json_path = directory / f"{name}.json"
    png_path = directory / f"{name}.png"
    write_secret_file(json_path, encode_bundle(bundle))
    png = io.BytesIO()
    _qr(bundle).save(png, kind="png", scale=QR_SCALE, border=4)
    write_secret_file(png_path, png.getvalue())
    settings: Path | None = None
    if isinstance(bundle, GatewayBundle):
        ca_file = cert_file = key_file = ""
        if bundle.ca_pem:
            tls_dir = directory / name
            tls_dir.mkdir(exist_ok=True)
            tls_dir.chmod(0o700)
            ca, cert, key = tls_dir / "ca.crt", tls_dir / "client.crt", tls_dir / "client.key"
            write_secret_file(ca, bundle.ca_pem.encode())
            ca_file = str(ca)
            if bundle.cert_pem and bundle.key_pem:
                write_secret_file(cert, bundle.cert_pem.encode())
                write_secret_file(key, bundle.key_pem.encode())
                cert_file, key_file = str(cert), str(key)
        settings = directory / f"{name}.toml"
        text = gateway_settings_toml(
            bundle, ca_file=ca_file, cert_file=cert_file, key_file=key_file
        )
        write_secret_file(settings, text.encode())
    return BundleFiles(json=json_path, png=png_path, settings=settings)
