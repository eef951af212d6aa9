"""Rate-limit repeated log lines: a few per key and window, sparse retry lines, drop tallies.

A stream of bad input from the field (the same reject reason thousands of
times a second) must not flood the log; the services' counters keep the
full count. ``admit`` is the pure rule (the window and ``now`` passed in);
``LogLimiter`` keeps one window per key for a caller that logs.
``should_log_attempt`` picks which retries of a long outage are logged.
``DropTally`` sums what a caller dropped per key and hands each key's sum
out at most once a span, so every drop is in some line and a flood makes
one line a key and span.
Which keys, which clock (milliseconds or seconds: ``span`` is in the
clock's units) and what is logged are the caller's business.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

# (start of the window, lines already let through in it)
Window = tuple[float, int]


def admit(window: Window | None, now: float, *, limit: int, span: float) -> tuple[Window, bool]:
    """The key's next window and whether one more line may be logged at ``now``.

    A window opens at the first line and lasts ``span``; in it the first
    ``limit`` lines pass. A key never seen (``None``) opens a window.
    """
    start, passed = (now, 0) if window is None else window
    if now - start >= span:
        start, passed = now, 0
    return (start, passed + 1), passed < limit


class LogLimiter:
    """One window per key (e.g. a reject reason): ``allow(key, now)`` before logging."""

    def __init__(self, *, limit: int, span: float) -> None:
        if limit < 0 or span <= 0:
            raise ValueError(f"need limit >= 0 and span > 0, got {limit}, {span}")
        self.limit = limit
        self.span = span
        self._windows: dict[str, Window] = {}

    def allow(self, key: str, now: float) -> bool:
        window, allowed = admit(self._windows.get(key), now, limit=self.limit, span=self.span)
        self._windows[key] = window
        return allowed


def should_log_attempt(attempt: int, *, every: int) -> bool:
    """Whether retry number ``attempt`` of an outage is logged: the first, then every ``every``th.

    A long outage then leaves a few lines that still show it goes on.
    """
    return attempt == 1 or attempt % every == 0


class DropTally:
    """Drops per key since that key's last line; a key's next line at most once per ``span``.

    ``add`` the drops as they are counted; ``due(now)`` returns the keys
    whose line may be written now, each with the drops since its previous
    line and when the first of them was added, and forgets them. A key's
    first drops are due at once; after a line, its drops wait until
    ``span`` has passed. ``due(now, flush=True)`` returns every key (the
    caller is stopping).
    """

    def __init__(self, *, span: float) -> None:
        if span <= 0:
            raise ValueError(f"need span > 0, got {span}")
        self.span = span
        self._pending: dict[str, tuple[int, float]] = {}  # key: (drops, since)
        self._logged: dict[str, float] = {}  # key: when its last line was due
        # No pending key is due before this: ``due`` is called for every
        # batch of input and returns at once while a flood's lines wait.
        self._next_due = math.inf

    def add(self, drops: Mapping[str, int], now: float) -> None:
        pending, logged = self._pending, self._logged
        for key, count in drops.items():
            if count <= 0:
                continue
            before = pending.get(key)
            if before is None:
                pending[key] = (count, now)
                last = logged.get(key)
                self._next_due = min(self._next_due, now if last is None else last + self.span)
            else:
                pending[key] = (before[0] + count, before[1])

    def due(self, now: float, *, flush: bool = False) -> list[tuple[str, int, float]]:
        if now < self._next_due and not flush:
            return []
        lines: list[tuple[str, int, float]] = []
        logged, span = self._logged, self.span
        next_due = math.inf
        for key, (count, since) in list(self._pending.items()):
            last = logged.get(key)
            if flush or last is None or now - last >= span:
                lines.append((key, count, since))
                logged[key] = now
                del self._pending[key]
            else:
                next_due = min(next_due, last + span)
        self._next_due = next_due
        return lines

    def forget(self, key: str) -> None:
        self._pending.pop(key, None)
        self._logged.pop(key, None)
