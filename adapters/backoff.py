"""Retry delays: exponential backoff with full jitter, capped; the one formula of every retry loop.

While a broker, a database or a serial port is away, every client retries;
without jitter they would retry in lockstep and hit a recovering server
together. "Full jitter" (a delay drawn uniformly from [0, cap]) spreads them
best for the fewest retries (the AWS architecture blog's comparison of
jitter schemes). A floor of half the minimum keeps a loop from retrying in a
tight loop when the draw is near zero.

Pure: the caller passes the attempt number and a random draw in [0, 1)
(``random.random()``, or a fixed number where a loop must be
deterministic); sleeping, counting attempts and resetting them after a
healthy spell are the caller's business, as are each loop's ``min_s`` and
``max_s``.
"""

from __future__ import annotations


def backoff_delay_s(attempt: int, *, min_s: float, max_s: float, draw: float) -> float:
    """Delay before retry number ``attempt`` (1 for the first retry).

    The ceiling doubles from ``min_s`` with each attempt up to ``max_s``; the
    delay is ``draw`` of the way between ``min_s / 2`` and that ceiling.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    if not 0 < min_s <= max_s:
        raise ValueError(f"need 0 < min_s <= max_s, got {min_s}, {max_s}")
    if not 0.0 <= draw < 1.0:
        raise ValueError(f"draw must be in [0, 1), got {draw}")
    # 2**attempt overflows a float past ~1024; the cap is reached long before.
    ceiling = min(max_s, min_s * 2.0 ** min(attempt - 1, 64))
    floor = min_s / 2
    return floor + draw * (ceiling - floor)
