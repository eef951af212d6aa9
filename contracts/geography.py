"""Hanoi's administrative geography since 1 July 2025: its 126 wards and communes.

Since that date Hanoi has two tiers of local government: the city and its
126 commune-level units (51 wards, phường, and 75 communes, xã) of Resolution
1656/NQ-UBTVQH15. Every site records the unit it is in now (by its
five-digit code of the General Statistics Office) and may keep, for history,
the district (quận, huyện, thị xã) it was in before; districts no longer
exist. The list is package data (``contracts/data/hanoi_units.toml``), which
cites its sources.

``UNITS`` is the list; ``find_unit`` and ``former_district`` turn what an
operator types (a code, a full name, a name without its prefix, with or
without diacritics) into the one unit or district it means, or raise
``GeographyError`` saying what matched and what did not. This module is
pure: storing units and sites is the database's business.
"""

from __future__ import annotations

import difflib
import re
import reprlib
import tomllib
import unicodedata
from importlib import resources
from typing import Final, Literal

import msgspec

from contracts.errors import GeographyError

UnitKind = Literal["ward", "commune"]

# A unit's name starts with its kind; a former district's with one of these.
_UNIT_PREFIXES: Final = ("phường ", "xã ")
_DISTRICT_PREFIXES: Final = ("quận ", "huyện ", "thị xã ")
# The same prefixes once folded ("Quan Ba Dinh", "thi xa Son Tay").
_FOLDED_DISTRICT_PREFIXES: Final = ("quan ", "huyen ", "thi xa ")
UNIT_CODE_PATTERN: Final = re.compile(r"^[0-9]{5}$")
# The longest name, "Phường Văn Miếu - Quốc Tử Giám", has 30 characters; a
# query several times that long names nothing and is refused before any work.
MAX_QUERY_CHARS: Final = 100

_REPR: Final = reprlib.Repr()
_REPR.maxstring = 60


class AdminUnit(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    code: str  # five digits, the General Statistics Office's
    name: str  # "Phường Hoàn Kiếm", "Xã Sóc Sơn"
    kind: UnitKind

    @property
    def short_name(self) -> str:
        """The name without its prefix: "Hoàn Kiếm"."""
        return _strip_prefix(self.name, _UNIT_PREFIXES)

    @property
    def kind_vi(self) -> str:
        return "phường" if self.kind == "ward" else "xã"


class _UnitsFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    former_districts: list[str]
    unit: list[AdminUnit]


def _strip_prefix(name: str, prefixes: tuple[str, ...]) -> str:
    lowered = name.lower()
    for prefix in prefixes:
        if lowered.startswith(prefix):
            return name[len(prefix) :]
    return name


def fold(text: str) -> str:
    """Lower case without diacritics or punctuation: "Phường Văn Miếu - Quốc Tử Giám"
    and "van mieu quoc tu giam" fold alike (the prefix is for the caller to drop).
    """
    decomposed = unicodedata.normalize("NFD", text.replace("đ", "d").replace("Đ", "D"))
    bare = "".join(c for c in decomposed if unicodedata.category(c) != "Mn")
    return " ".join(re.sub(r"[^0-9a-z]+", " ", bare.lower()).split())


def _load() -> _UnitsFile:
    text = resources.files("contracts").joinpath("data/hanoi_units.toml").read_text("utf-8")
    data = msgspec.convert(tomllib.loads(text), _UnitsFile)
    codes = [u.code for u in data.unit]
    bad = [c for c in codes if not UNIT_CODE_PATTERN.match(c)]
    if bad or len(set(codes)) != len(codes):
        raise GeographyError(f"hanoi_units.toml: malformed or repeated codes {bad or codes}")
    return data


_DATA: Final = _load()
UNITS: Final[tuple[AdminUnit, ...]] = tuple(_DATA.unit)
UNITS_BY_CODE: Final[dict[str, AdminUnit]] = {u.code: u for u in UNITS}
# The 30 district-level units abolished on 1 July 2025, without their prefix
# ("Ba Đình", "Sơn Tây"): no two share a name once it is dropped.
FORMER_DISTRICTS: Final[tuple[str, ...]] = tuple(
    _strip_prefix(d, _DISTRICT_PREFIXES) for d in _DATA.former_districts
)


def _unit_keys(unit: AdminUnit) -> tuple[str, ...]:
    return (fold(unit.name), fold(unit.short_name))


# Folded name and folded short name -> the units they name, built once: a site
# file resolves a ward for each of its (up to 20,000) rows.
def _index_units() -> dict[str, list[AdminUnit]]:
    index: dict[str, list[AdminUnit]] = {}
    for unit in UNITS:
        for key in dict.fromkeys(_unit_keys(unit)):
            index.setdefault(key, []).append(unit)
    return index


_UNITS_BY_KEY: Final = _index_units()
_FOLDED_NAMES: Final[dict[str, str]] = {fold(u.name): u.name for u in UNITS}
_FOLDED_SHORT_NAMES: Final[dict[str, str]] = {fold(u.short_name): u.name for u in UNITS}
_FOLDED_DISTRICTS: Final[dict[str, str]] = {fold(d): d for d in FORMER_DISTRICTS}


def _checked_query(query: str, what: str) -> str:
    if len(query) > MAX_QUERY_CHARS:
        raise GeographyError(
            f"{_REPR.repr(query)} is too long ({len(query)} characters) to be {what}"
        )
    return unicodedata.normalize("NFC", query.strip())


def _close_names(key: str) -> list[str]:
    """Up to five unit names that ``key`` (folded) may have meant: those containing it,
    then those spelled nearly alike ("hoan kim" for "Hoàn Kiếm").
    """
    bare = key.removeprefix("phuong ").removeprefix("xa ")  # "Phường Sóc Sơn" for "Xã Sóc Sơn"
    close = [_FOLDED_SHORT_NAMES[bare]] if bare in _FOLDED_SHORT_NAMES else []
    close.extend(name for folded, name in _FOLDED_NAMES.items() if key and key in folded)
    close.extend(
        _FOLDED_SHORT_NAMES[near]
        for near in difflib.get_close_matches(key, _FOLDED_SHORT_NAMES, n=5, cutoff=0.75)
    )
    close.extend(
        _FOLDED_NAMES[near]
        for near in difflib.get_close_matches(key, _FOLDED_NAMES, n=5, cutoff=0.75)
    )
    return list(dict.fromkeys(close))[:5]


def find_unit(query: str) -> AdminUnit:
    """The ward or commune that ``query`` names: its code, its name with or without its
    prefix, diacritics optional ("00070", "Phường Hoàn Kiếm", "hoan kiem").

    A name that two units share once the prefix is dropped must be given whole;
    that, no match, or a code that is not Hanoi's raises GeographyError.
    """
    text = _checked_query(query, "a ward or commune")
    if not text:
        raise GeographyError("no ward or commune given (a name such as 'Hoàn Kiếm' or a code)")
    if text.isdigit():
        unit = UNITS_BY_CODE.get(text.zfill(5)) if len(text) <= 5 else None
        if unit is None:
            raise GeographyError(f"{query!r} is not the code of one of Hanoi's 126 wards/communes")
        return unit
    key = fold(text)
    matches = _UNITS_BY_KEY.get(key, [])
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        names = ", ".join(f"{u.name} ({u.code})" for u in matches)
        raise GeographyError(f"{query!r} names more than one unit: {names}; give the full name")
    close = _close_names(key)
    hint = f" (did you mean: {', '.join(close)}?)" if close else ""
    raise GeographyError(
        f"{query!r} is not one of Hanoi's 126 wards/communes since 1 July 2025{hint};"
        " `cityhub sites units` lists them"
    )


def former_district(query: str) -> str:
    """The former district ``query`` names, as stored ("Ba Đình"), prefix and diacritics
    optional ("Quận Ba Đình", "quan ba dinh"); GeographyError if it names none of the 30.
    """
    key = fold(_checked_query(query, "a former district"))
    for prefix in _FOLDED_DISTRICT_PREFIXES:
        if key.startswith(prefix):
            key = key.removeprefix(prefix)
            break
    name = _FOLDED_DISTRICTS.get(key)
    if name is not None:
        return name
    unit = _UNITS_BY_KEY.get(fold(query))
    hint = (
        f"; {unit[0].name} is a {unit[0].kind} since 1 July 2025: give it as the site's ward"
        if unit is not None and len(unit) == 1
        else ""
    )
    raise GeographyError(
        f"{query!r} is not one of Hanoi's 30 former districts ({', '.join(FORMER_DISTRICTS)}){hint}"
    )
