"""ingest.grouping.group_done: when a commit group leaves, pure and table-driven."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contracts.settings import IngestSettings
from ingest.grouping import group_done

SETTINGS = IngestSettings(max_batches_per_commit=8, max_rows_per_commit=4000, max_delay_ms=100)


@pytest.mark.parametrize(
    ("batches", "rows", "age_ms", "waiting", "committer_free", "done"),
    [
        (1, 500, 0, False, True, True),  # light load: one batch, committed at once
        (1, 500, 0, True, True, False),  # another waits: it joins first
        (1, 500, 0, False, False, False),  # a commit runs: wait for company
        (1, 500, 99, False, False, False),
        (1, 500, 100, False, False, True),  # the delay cap: ready for the next commit
        (3, 500, 5_000, True, False, False),  # a backlog fills groups past the delay
        (8, 500, 0, True, True, True),  # the batch cap
        (2, 4000, 0, True, False, True),  # the row cap
    ],
)
def test_group_done_table(
    batches: int, rows: int, age_ms: float, waiting: bool, committer_free: bool, done: bool
) -> None:
    assert (
        group_done(
            batches=batches,
            rows=rows,
            age_ms=age_ms,
            waiting=waiting,
            committer_free=committer_free,
            settings=SETTINGS,
        )
        is done
    )


@given(
    batches=st.integers(min_value=1, max_value=20),
    rows=st.integers(min_value=0, max_value=10_000),
    age_ms=st.floats(min_value=0, max_value=10_000, allow_nan=False),
    waiting=st.booleans(),
    committer_free=st.booleans(),
)
def test_group_done_properties(
    batches: int, rows: int, age_ms: float, waiting: bool, committer_free: bool
) -> None:
    done = group_done(
        batches=batches,
        rows=rows,
        age_ms=age_ms,
        waiting=waiting,
        committer_free=committer_free,
        settings=SETTINGS,
    )
    full = batches >= SETTINGS.max_batches_per_commit or rows >= SETTINGS.max_rows_per_commit
    if full:
        assert done  # a cap always closes the group
    elif waiting:
        assert not done  # what waits always joins
    else:
        # Nothing waits: leave for a free committer, else only at the delay cap.
        assert done is (committer_free or age_ms >= SETTINGS.max_delay_ms)
