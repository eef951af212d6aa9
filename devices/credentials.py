"""Secrets for broker accounts: generation and the salted hash the registry stores.

The registry never stores a clear secret: the broker keeps its own hash
(``devices.dynsec``), and the technician's bundle is the only place the
secret is written. The registry keeps an scrypt hash so that a bundle found
later can be checked against the account (``verify_secret``) and so that
rotation is recorded. Randomness comes from ``secrets``; nothing else here
touches the outside world.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from typing import Final

# 24 random bytes: 192 bits, 32 URL-safe characters that survive a QR code,
# a TOML file and a shell command line unquoted.
SECRET_BYTES: Final = 24
# scrypt cost: n=2**14, r=8 takes ~30 ms and 16 MiB here, the interactive-login
# setting recommended for it; checks are rare (a technician's command).
_SCRYPT_N: Final = 2**14
_SCRYPT_R: Final = 8
_SCRYPT_P: Final = 1
_SALT_BYTES: Final = 16


def new_secret() -> str:
    return secrets.token_urlsafe(SECRET_BYTES)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def hash_secret(secret: str, salt: bytes | None = None) -> str:
    """``scrypt$n$r$p$salt$hash`` (base64 salt and hash)."""
    salt = salt if salt is not None else secrets.token_bytes(_SALT_BYTES)
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P)
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_secret(secret: str, stored: str) -> bool:
    """Whether ``secret`` is the one ``stored`` was made from (constant-time compare)."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(
            secret.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p)
        )
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)
