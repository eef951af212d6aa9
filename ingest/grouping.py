"""When a commit group is complete: adaptive grouping of batch messages.

Pure: the collector passes what the group holds, how long its first message
has waited, whether another message is waiting in the delivery queue and
whether the committer is free; ``group_done`` answers. A group goes to the
committer as soon as nothing more is waiting and the committer is free, so
at light load a batch is committed one transaction after it arrives. While
a commit runs, messages pile up and the group grows by itself;
``max_batches_per_commit`` / ``max_rows_per_commit`` cap it, and
``max_delay_ms`` caps how long its first message waits for a busy committer
(the group then waits, prepared, in the committer's slot). Taking messages
off the queue, preparing and committing them is the shell's.
"""

from __future__ import annotations

from contracts.settings import IngestSettings

__all__ = ["group_done"]


def group_done(
    *,
    batches: int,
    rows: int,
    age_ms: float,
    waiting: bool,
    committer_free: bool,
    settings: IngestSettings,
) -> bool:
    """True: the group is complete; False: take the waiting message, or wait for one.

    ``age_ms`` is how long the group's first message has been received;
    ``waiting``: another message is in the delivery queue now.
    """
    if batches >= settings.max_batches_per_commit or rows >= settings.max_rows_per_commit:
        return True
    if waiting:
        # Whatever already waits joins, even past max_delay_ms: a backlog
        # fills groups (one transaction amortised over many batches).
        return False
    return committer_free or age_ms >= settings.max_delay_ms
