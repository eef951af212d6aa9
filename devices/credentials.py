"""Secrets for broker accounts and HTTP devices: generation and what the registry stores.

The registry never stores a clear secret: the broker keeps its own hash
(``devices.dynsec``), and the technician's bundle is the only place the
secret is written. The registry keeps an scrypt hash so that a bundle found
later can be checked against the account (``verify_secret``) and so that
rotation is recorded. An HTTP device's token is kept as its plain SHA-256
(``token_sha256``), which the gateway matches a request's token against.
Randomness comes from ``secrets``; nothing else here touches the outside
world.
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
# An HTTP device's bearer token: 32 bytes, 256 bits, checked by the gateway
# on every request against an unsalted hash, so it must be unguessable alone.
TOKEN_BYTES: Final = 32
# scrypt cost: n=2**14, r=8 takes ~30 ms and 16 MiB here, the interactive-login
# setting recommended for it; checks are rare (a technician's command).
_SCRYPT_N: Final = 2**14
_SCRYPT_R: Final = 8
_SCRYPT_P: Final = 1
_SALT_BYTES: Final = 16


def new_secret() -> str:
    return secrets.token_urlsafe(SECRET_BYTES)


def new_token() -> str:
    """An HTTP device's bearer token: TOKEN_BYTES random bytes, URL-safe base64 (43 chars)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_sha256(token: str) -> str:
    """What the registry and the gateway keep of a token: its SHA-256, lower-case hex.

    Unsalted on purpose: the gateway looks a presented token up by its hash
    on every request, and a 256-bit random token cannot be guessed from it.
    """
    return hashlib.sha256(token.encode("ascii")).hexdigest()


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
