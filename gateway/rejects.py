"""Rejects per (device, reason) over one state interval, for the state message to carry.

Pure: the router adds each reject with the time and the payload it had; the
shell takes the period's entries when it publishes a state (``take``), which
starts the next period. Memory is bounded under a flood: at most
``max_keys`` (device, reason) keys of served devices and ``max_other_keys``
of ids the gateway does not serve per period; a reject beyond them is only
counted in ``dropped``. Each key keeps the detail and the head of the payload
(``sample_bytes``) of its first reject. Publishing is the shell's business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from contracts.messages import REJECT_DETAIL_MAX_CHARS, REJECT_SAMPLE_MAX_BYTES, RejectCount

# Keys per period: a site of a few hundred devices rarely has more than a few
# failing at once, each with one or two reasons; 64 served keys itemise that,
# and 16 keys of unserved ids show who is publishing where they should not
# (a misconfigured device, a flood of made-up ids) without letting made-up ids
# crowd the served devices out. 80 entries of ~1 KB of JSON keep a state small.
MAX_KEYS: Final = 64
MAX_OTHER_KEYS: Final = 16


@dataclass(slots=True)
class _Entry:
    count: int
    first_ms: int
    last_ms: int
    detail: str
    sample: bytes
    sample_of_bytes: int


class RejectAggregator:
    """Rejects counted per (device, reason) since the last ``take``."""

    def __init__(
        self,
        *,
        max_keys: int = MAX_KEYS,
        max_other_keys: int = MAX_OTHER_KEYS,
        sample_bytes: int = REJECT_SAMPLE_MAX_BYTES,
    ) -> None:
        self.max_keys = max_keys
        self.max_other_keys = max_other_keys
        self.sample_bytes = min(sample_bytes, REJECT_SAMPLE_MAX_BYTES)
        self._served: dict[tuple[str, str], _Entry] = {}
        self._other: dict[tuple[str, str], _Entry] = {}
        self.dropped = 0

    def add(  # noqa: PLR0917 - one reject's facts, all positional at the one call site
        self, device_id: str, reason: str, detail: str, payload: bytes, now_ms: int, served: bool
    ) -> None:
        """Count one reject; ``device_id`` "" when the topic named no valid id."""
        keys = self._served if served else self._other
        key = (device_id, reason)
        entry = keys.get(key)
        if entry is not None:
            entry.count += 1
            entry.last_ms = max(entry.last_ms, now_ms)
            return
        if len(keys) >= (self.max_keys if served else self.max_other_keys):
            self.dropped += 1
            return
        keys[key] = _Entry(
            count=1,
            first_ms=now_ms,
            last_ms=now_ms,
            detail=detail[:REJECT_DETAIL_MAX_CHARS],
            sample=bytes(payload[: self.sample_bytes]),
            sample_of_bytes=len(payload),
        )

    def __len__(self) -> int:
        return len(self._served) + len(self._other)

    def take(self) -> tuple[tuple[RejectCount, ...], int]:
        """The period's entries (served devices first) and dropped count; starts a new period."""
        entries = tuple(
            RejectCount(
                device_id=device_id,
                reason=reason,
                count=e.count,
                first_ms=e.first_ms,
                last_ms=e.last_ms,
                detail=e.detail,
                sample=e.sample,
                sample_of_bytes=e.sample_of_bytes,
            )
            for keys in (self._served, self._other)
            for (device_id, reason), e in keys.items()
        )
        dropped, self.dropped = self.dropped, 0
        self._served = {}
        self._other = {}
        return entries, dropped
