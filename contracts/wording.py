"""English count phrases whose noun agrees with its number: "1 device", "2 devices".

Messages for people (the CLI's lines and table titles, the errors it shows)
put counts before English nouns; a bare ``f"{n} devices"`` reads "1 devices".
Callers give both forms, so irregular plurals ("entry", "entries") need no
rules here. Vietnamese nouns have no plural form: texts in Vietnamese keep
their number and noun as they are, and a bilingual text takes only its
English noun from ``choose_noun``.

Pure: no I/O, no locale; how a number is grouped is the caller's choice.
"""

from __future__ import annotations


def choose_noun(count: int, singular: str, plural: str) -> str:
    """``singular`` for exactly one, ``plural`` otherwise (English says "0 devices")."""
    return singular if count == 1 else plural


def count_noun(count: int, singular: str, plural: str, *, grouped: bool = False) -> str:
    """The number, then the noun that agrees with it: "1 device", "0 devices".

    ``grouped`` writes thousands with commas ("12,345 readings"), as the
    progress lines do.
    """
    number = f"{count:,}" if grouped else str(count)
    return f"{number} {choose_noun(count, singular, plural)}"
