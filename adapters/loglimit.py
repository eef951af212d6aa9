"""Rate-limit repeated log lines: a few per key and window, and a retry loop's sparse lines.

A stream of bad input from the field (the same reject reason thousands of
times a second) must not flood the log; the services' counters keep the
full count. ``admit`` is the pure rule (the window and ``now`` passed in);
``LogLimiter`` keeps one window per key for a caller that logs.
``should_log_attempt`` picks which retries of a long outage are logged.
Which keys, which clock (milliseconds or seconds: ``span`` is in the
clock's units) and what is logged are the caller's business.
"""

from __future__ import annotations

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
