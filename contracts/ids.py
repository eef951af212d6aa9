"""Identifier and timestamp checks shared by every wire contract.

Device, gateway, site and boot ids are allow-listed (``ID_PATTERN``) so that an
id can never carry an MQTT wildcard, a topic separator, SQL or shell syntax
into a topic, a table or a log line. Batch ids (``{gateway_id}:{boot_id}:{counter}``)
are built and parsed here, and timestamps (integer milliseconds UTC) are
checked against a window around a ``now_ms`` the caller passes in.

This module only checks form. Whether an id is *registered*, or belongs to a
given gateway, is the registry's and ingest's business; reading the clock is
the caller's.
"""

from __future__ import annotations

import re

from contracts.errors import InvalidIdError, TimestampWindowError

ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,63}$"
# re.fullmatch (not re.match): with `$` alone, "abc\n" would pass.
_ID_RE = re.compile(ID_PATTERN)

# The counter is a decimal without leading zeros, so each (gateway, boot, counter)
# has exactly one spelling; 19 digits and the bound below keep it inside a signed
# 64-bit integer (PostgreSQL bigint) should anyone store it as a number.
_COUNTER_RE = re.compile(r"^(0|[1-9][0-9]{0,18})$")
BATCH_COUNTER_MAX = 2**63 - 1

_MS_PER_DAY = 86_400_000
# A gateway's outbox may hold a long backlog after a site has been cut off
# (a weekend-long fibre cut or a broken central link waiting for a technician):
# 30 days of readings are still worth storing, older ones are more likely a
# device whose clock was never set (epoch 1970 or a factory default date).
DEFAULT_MAX_PAST_MS = 30 * _MS_PER_DAY
# Devices set their clocks by NTP or from the gateway; a few seconds to a couple
# of minutes of skew is normal for cheap RTCs, 5 minutes tolerates that while a
# reading "from tomorrow" is still refused.
DEFAULT_MAX_FUTURE_MS = 5 * 60_000


def is_valid_id(value: str) -> bool:
    """Whether ``value`` matches ``ID_PATTERN`` (the test alone, for hot paths)."""
    return _ID_RE.fullmatch(value) is not None


def check_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it matches ``ID_PATTERN``; raise InvalidIdError naming ``what``."""
    if not isinstance(value, str):
        raise InvalidIdError(f"{what} must be a string, got {type(value).__name__}")
    if _ID_RE.fullmatch(value) is None:
        raise InvalidIdError(f"{what} {value!r} does not match {ID_PATTERN}")
    return value


def _check_counter(counter: int) -> int:
    # bool is an int subclass; True is not a counter.
    if isinstance(counter, bool) or not isinstance(counter, int):
        raise InvalidIdError(f"batch counter must be an int, got {type(counter).__name__}")
    if not 0 <= counter <= BATCH_COUNTER_MAX:
        raise InvalidIdError(f"batch counter {counter} is outside [0, {BATCH_COUNTER_MAX}]")
    return counter


def batch_id(gateway_id: str, boot_id: str, counter: int) -> str:
    """The id of a batch: ``{gateway_id}:{boot_id}:{counter}``.

    It never repeats as long as the gateway draws a fresh random ``boot_id``
    at every start and increments ``counter`` for every batch of that boot.
    """
    check_id(gateway_id, "gateway_id")
    check_id(boot_id, "boot_id")
    _check_counter(counter)
    return f"{gateway_id}:{boot_id}:{counter}"


def parse_batch_id(value: str) -> tuple[str, str, int]:
    """Split a batch id into ``(gateway_id, boot_id, counter)``; raise InvalidIdError."""
    if not isinstance(value, str):
        raise InvalidIdError(f"batch_id must be a string, got {type(value).__name__}")
    parts = value.split(":")
    if len(parts) != 3:
        raise InvalidIdError(f"batch_id {value!r} is not gateway_id:boot_id:counter")
    gateway_id, boot_id, counter = parts
    check_id(gateway_id, f"gateway_id in batch_id {value!r}")
    check_id(boot_id, f"boot_id in batch_id {value!r}")
    if _COUNTER_RE.fullmatch(counter) is None:
        raise InvalidIdError(
            f"counter {counter!r} in batch_id {value!r} is not a decimal without leading zeros"
        )
    return gateway_id, boot_id, _check_counter(int(counter))


def check_timestamp(
    ts_ms: int,
    now_ms: int,
    *,
    max_past_ms: int = DEFAULT_MAX_PAST_MS,
    max_future_ms: int = DEFAULT_MAX_FUTURE_MS,
    what: str = "ts_ms",
) -> int:
    """Return ``ts_ms`` if it is an int within ``[now_ms - max_past_ms, now_ms + max_future_ms]``.

    Raise TimestampWindowError otherwise (also for bools, floats and other
    non-ints: timestamps are integer milliseconds UTC on every wire).
    """
    if isinstance(ts_ms, bool) or not isinstance(ts_ms, int):
        raise TimestampWindowError(
            f"{what} must be integer milliseconds, got {type(ts_ms).__name__} {ts_ms!r}"
        )
    earliest = now_ms - max_past_ms
    latest = now_ms + max_future_ms
    if ts_ms < earliest:
        raise TimestampWindowError(
            f"{what} {ts_ms} is {now_ms - ts_ms} ms in the past (limit {max_past_ms} ms)"
        )
    if ts_ms > latest:
        raise TimestampWindowError(
            f"{what} {ts_ms} is {ts_ms - now_ms} ms in the future (limit {max_future_ms} ms)"
        )
    return ts_ms
