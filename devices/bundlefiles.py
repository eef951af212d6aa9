"""Writes bundles to files readable by their owner only, with their QR codes.

For a bundle named ``{kind}-{id}`` in the bundle directory (0700)::

    {kind}-{id}.json     the bundle (devices.bundle), 0600
    {kind}-{id}.png      its QR code, 0600 (it holds the secret too)
    gateway-{id}.toml    gateways only: settings for `cityhub gateway run -c`
    gateway-{id}/        gateways only: ca.crt, client.crt, client.key when TLS is set up

``install_gateway_bundle`` is the other end, on the gateway's board: a
gateway bundle becomes ``gateway.toml`` (and ``tls/``) in the directory the
gateway's systemd unit reads (/etc/cityhub), readable by the service's group.

Files are created with mode 0600 from the start (no window in which another
user could open them). QR codes come from ``segno`` (no other dependencies).
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from contracts.errors import SettingsError
from devices.bundle import (
    Bundle,
    GatewayBundle,
    decode_bundle,
    encode_bundle,
    gateway_settings_toml,
    qr_payload,
)

if TYPE_CHECKING:
    import segno

# PNG modules of 4 pixels: ~300 px for a device bundle, readable by a phone
# camera at arm's length from a laptop screen or an A6 print.
QR_SCALE = 4
# The terminal drawing, one module per column, fits at least the narrowest
# terminal a technician's laptop opens (80 columns).
QR_TERMINAL_COLUMNS = 80


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
    # Imported here: a gateway board installing its bundle has no segno (central extra).
    import segno

    return segno.make(qr_payload(bundle), error="l", micro=False)


def half_blocks(matrix: Sequence[Sequence[int]], border: int) -> str:
    """A module matrix (1 dark) as text, two module rows per line, one module per column.

    Light modules are drawn (``█ ▀ ▄``) and dark ones left blank, for the
    light-on-dark terminals technicians use; phone scanners read the inverted
    code. An odd last row is paired with the light quiet zone below.
    """
    rows = _light_rows(matrix, border)
    if len(rows) % 2:
        rows.append([1] * len(rows[0]))
    glyphs = {(0, 0): " ", (1, 0): "\u2580", (0, 1): "\u2584", (1, 1): "\u2588"}
    return "".join(
        "".join(glyphs[pair] for pair in zip(top, bottom, strict=True)) + "\n"
        for top, bottom in zip(rows[::2], rows[1::2], strict=True)
    )


# Quadrant blocks: one character draws 2x2 modules, bits (top-left,
# top-right, bottom-left, bottom-right) with 1 a light (drawn) module.
QUADRANTS: Final = {
    (0, 0, 0, 0): " ", (1, 0, 0, 0): "\u2598", (0, 1, 0, 0): "\u259d", (0, 0, 1, 0): "\u2596",
    (0, 0, 0, 1): "\u2597", (1, 1, 0, 0): "\u2580", (0, 0, 1, 1): "\u2584", (1, 0, 1, 0): "\u258c",
    (0, 1, 0, 1): "\u2590", (1, 0, 0, 1): "\u259a", (0, 1, 1, 0): "\u259e", (1, 1, 1, 0): "\u259b",
    (1, 1, 0, 1): "\u259c", (1, 0, 1, 1): "\u2599", (0, 1, 1, 1): "\u259f", (1, 1, 1, 1): "\u2588",
}  # fmt: skip


def _light_rows(matrix: Sequence[Sequence[int]], border: int) -> list[list[int]]:
    """The code inverted (1: a light module, drawn) inside a light quiet zone."""
    size = len(matrix[0]) if matrix else 0
    light = [1] * (size + 2 * border)
    rows = [light] * border
    rows += [[1] * border + [1 - m for m in row] + [1] * border for row in matrix]
    rows += [light] * border
    return rows


def quadrant_blocks(matrix: Sequence[Sequence[int]], border: int) -> str:
    """A module matrix as text, 2x2 modules per character (half the width of half blocks).

    Modules come out twice as tall as wide (a character cell is about 1:2);
    a scanner reads the code through the same perspective correction that
    takes a tilted phone. Odd rows and columns are padded with light modules.
    """
    rows = _light_rows(matrix, border)
    width = len(rows[0]) if rows else 0
    if width % 2:
        rows = [[*row, 1] for row in rows]
    if len(rows) % 2:
        rows.append([1] * len(rows[0]))
    return "".join(
        "".join(
            QUADRANTS[(top[x], top[x + 1], bottom[x], bottom[x + 1])] for x in range(0, len(top), 2)
        )
        + "\n"
        for top, bottom in zip(rows[::2], rows[1::2], strict=True)
    )


def qr_terminal(bundle: Bundle, *, columns: int = QR_TERMINAL_COLUMNS) -> str:
    """The QR code drawn in the terminal, ``columns`` wide at most.

    Half blocks (one module per column, square modules) when they fit with
    a quiet zone of 1 to 4 modules; else quadrant blocks (two modules per
    column): a device bundle (~600 bytes, version 16-18, 81-89 modules)
    needs 83 columns or more in half blocks and 45 in quadrants, so it fits
    an 80-column terminal. Narrower than that, the line says to widen the
    terminal or scan the PNG.
    """
    qr = _qr(bundle)
    size = len(qr.matrix)
    border = min(4, (columns - size) // 2)
    if border >= 1:
        return half_blocks(qr.matrix, border)
    border = min(4, (2 * columns - size) // 2)
    if border >= 1:
        return quadrant_blocks(qr.matrix, border)
    return (
        f"QR code of {size}x{size} modules: too wide for {columns} columns"
        f" (it needs {(size + 3) // 2}); widen the terminal or scan its PNG file\n"
    )


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


def install_gateway_bundle(
    bundle_file: Path, config_dir: Path, *, group: str = "", installed_dir: Path | None = None
) -> list[Path]:
    """Write ``gateway.toml`` (and ``tls/``) for the bundle's gateway into ``config_dir``.

    The settings name the TLS files under ``installed_dir`` (default
    ``config_dir``): where ``config_dir`` is on the running machine when it
    is written into an image's root.

    Files are 0600 from the first byte; with ``group`` they then become
    0640 (directory 0750) owned by that group, so the service's user reads
    them but cannot change them. A second install replaces the files (a
    rotated secret). Returns the files written.
    """
    try:
        bundle = decode_bundle(bundle_file.read_bytes())
    except (OSError, ValueError) as exc:  # msgspec's errors are ValueErrors
        raise SettingsError(str(bundle_file), f"not a readable bundle: {exc}") from exc
    if not isinstance(bundle, GatewayBundle):
        raise SettingsError(str(bundle_file), "a device bundle, not a gateway's")
    config_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    ca_file = cert_file = key_file = ""
    if bundle.ca_pem:
        tls_dir = config_dir / "tls"
        tls_dir.mkdir(mode=0o700, exist_ok=True)
        _share(tls_dir, group, 0o750)
        ca = tls_dir / "ca.crt"
        write_secret_file(ca, bundle.ca_pem.encode())
        written.append(ca)
        seen = (installed_dir or config_dir) / "tls"
        ca_file = str(seen / ca.name)
        if bundle.cert_pem and bundle.key_pem:
            cert, key = tls_dir / "client.crt", tls_dir / "client.key"
            write_secret_file(cert, bundle.cert_pem.encode())
            write_secret_file(key, bundle.key_pem.encode())
            written += [cert, key]
            cert_file, key_file = str(seen / cert.name), str(seen / key.name)
    settings = config_dir / "gateway.toml"
    text = gateway_settings_toml(bundle, ca_file=ca_file, cert_file=cert_file, key_file=key_file)
    write_secret_file(settings, text.encode())
    written.append(settings)
    for path in written:
        _share(path, group, 0o640)
    return written


def _share(path: Path, group: str, mode: int) -> None:
    """Give ``path`` to ``group`` with ``mode``; no group: leave it owner-only."""
    if not group:
        return
    try:
        # A number is a gid: an image's root (install-gateway --root) has
        # groups this machine does not know by name.
        shutil.chown(path, group=int(group) if group.isdigit() else group)
    except (LookupError, PermissionError) as exc:
        raise SettingsError("--group", f"cannot give {path} to group {group!r}: {exc}") from exc
    path.chmod(mode)
