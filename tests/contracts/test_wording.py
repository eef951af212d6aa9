"""English count phrases: the noun agrees with its number."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contracts.wording import choose_noun, count_noun


@pytest.mark.parametrize(
    ("count", "singular", "plural", "grouped", "expected"),
    [
        (1, "device", "devices", False, "1 device"),
        (0, "device", "devices", False, "0 devices"),
        (2, "device", "devices", False, "2 devices"),
        (1, "entry", "entries", False, "1 entry"),
        (3, "entry", "entries", False, "3 entries"),
        (1, "batch", "batches", False, "1 batch"),
        (11, "reading", "readings", False, "11 readings"),
        (21, "reading", "readings", False, "21 readings"),
        (1, "active device", "active devices", False, "1 active device"),
        (1234, "reading", "readings", False, "1234 readings"),
        (1234, "reading", "readings", True, "1,234 readings"),
        (1, "reading", "readings", True, "1 reading"),
        (-1, "day", "days", False, "-1 days"),
    ],
)
def test_count_noun(count, singular, plural, grouped, expected):
    assert count_noun(count, singular, plural, grouped=grouped) == expected


@given(st.integers())
def test_only_one_takes_the_singular(count):
    noun = choose_noun(count, "file", "files")
    assert noun == ("file" if count == 1 else "files")
    assert count_noun(count, "file", "files") == f"{count} {noun}"
