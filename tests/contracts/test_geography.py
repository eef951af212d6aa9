"""Hanoi's 126 wards and communes (contracts.geography): the data file's contents and
what find_unit / former_district accept from an operator and refuse.

Table-driven, no fixtures: the module is pure.
"""

from __future__ import annotations

import unicodedata
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contracts.errors import GeographyError, HubError
from contracts.geography import (
    FORMER_DISTRICTS,
    MAX_QUERY_CHARS,
    UNIT_CODE_PATTERN,
    UNITS,
    UNITS_BY_CODE,
    AdminUnit,
    find_unit,
    fold,
    former_district,
)

VAN_MIEU = next(u for u in UNITS if u.short_name == "Văn Miếu - Quốc Tử Giám")

# --- the data ---------------------------------------------------------------------


def test_hanoi_has_126_units_51_wards_75_communes() -> None:
    # Resolution 1656/NQ-UBTVQH15, Article 1.
    assert len(UNITS) == 126
    assert Counter(u.kind for u in UNITS) == {"ward": 51, "commune": 75}


def test_codes_are_unique_and_five_digits() -> None:
    codes = [u.code for u in UNITS]
    assert len(set(codes)) == len(codes)
    assert all(UNIT_CODE_PATTERN.fullmatch(c) for c in codes)
    assert set(UNITS_BY_CODE) == set(codes)


def test_names_are_unique_even_without_prefix_or_diacritics() -> None:
    assert len({u.name for u in UNITS}) == 126
    # A unit must be findable by its short name alone.
    assert len({fold(u.short_name) for u in UNITS}) == 126


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.code)
def test_name_carries_its_kind_and_is_nfc(unit: AdminUnit) -> None:
    prefix = "Phường " if unit.kind == "ward" else "Xã "
    assert unit.name.startswith(prefix)
    assert unit.short_name == unit.name.removeprefix(prefix) != ""
    assert unicodedata.is_normalized("NFC", unit.name)
    assert unit.name == unit.name.strip()


def test_thirty_former_districts_without_prefix() -> None:
    assert len(FORMER_DISTRICTS) == 30
    assert len(set(FORMER_DISTRICTS)) == 30
    for name in FORMER_DISTRICTS:
        assert not name.lower().startswith(("quận ", "huyện ", "thị xã ")), name
        assert unicodedata.is_normalized("NFC", name)
    assert {"Ba Đình", "Hoàn Kiếm", "Sơn Tây", "Ứng Hòa", "Mê Linh"} <= set(FORMER_DISTRICTS)


def test_fold_drops_case_diacritics_and_punctuation() -> None:
    assert fold("Phường Văn Miếu - Quốc Tử Giám") == "phuong van mieu quoc tu giam"
    assert fold("ĐỐNG ĐA") == fold("dong da") == "dong da"
    assert fold(unicodedata.normalize("NFD", "Hoàn Kiếm")) == "hoan kiem"


# --- find_unit ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("00070", "00070"),  # the code
        ("70", "00070"),  # leading zeros lost by a spreadsheet
        ("  00004 ", "00004"),
        ("Phường Hoàn Kiếm", "00070"),  # full name
        ("Hoàn Kiếm", "00070"),  # short name
        ("hoan kiem", "00070"),  # no diacritics
        ("HOAN KIEM", "00070"),
        ("phuong hoan kiem", "00070"),
        ("  Hoàn Kiếm\t", "00070"),  # surrounding spaces
        (unicodedata.normalize("NFD", "Phường Hoàn Kiếm"), "00070"),  # NFD (macOS) input
        ("van mieu quoc tu giam", VAN_MIEU.code),  # punctuation optional
        ("Phường Văn Miếu \u2013 Quốc Tử Giám", VAN_MIEU.code),  # an en dash for the hyphen
        ("Xã Sóc Sơn", "00376"),
        ("soc son", "00376"),
        ("Phường Sơn Tây", "09574"),
    ],
)
def test_find_unit_accepts(query: str, code: str) -> None:
    assert find_unit(query).code == code


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.code)
def test_every_unit_is_found_by_code_name_short_name_and_folded(unit: AdminUnit) -> None:
    for query in (unit.code, unit.name, unit.short_name, fold(unit.short_name)):
        assert find_unit(query) == unit, query


@pytest.mark.parametrize(
    ("query", "in_message"),
    [
        ("", "no ward or commune given"),
        ("   ", "no ward or commune given"),
        ("Hà Nội", "not one of Hanoi's 126 wards/communes"),
        ("26734", "not the code of one of Hanoi's 126"),  # a Ho Chi Minh City ward's code
        ("00000", "not the code"),
        ("000070", "not the code"),  # six digits, even with zeros in front
        ("100700", "not the code"),
        ("Phường Ngọc Hà Mới", "not one of Hanoi's 126"),
    ],
)
def test_find_unit_refuses(query: str, in_message: str) -> None:
    with pytest.raises(GeographyError) as info:
        find_unit(query)
    assert in_message in str(info.value)
    assert isinstance(info.value, HubError)


@pytest.mark.parametrize(
    ("query", "suggested"),
    [
        ("Kiếm", "Phường Hoàn Kiếm"),  # part of a name
        ("hoan kim", "Phường Hoàn Kiếm"),  # a typo
        ("Phường Sóc Sơn", "Xã Sóc Sơn"),  # the wrong prefix
        ("Ngoc Haa", "Phường Ngọc Hà"),
    ],
)
def test_unknown_name_suggests_close_names(query: str, suggested: str) -> None:
    with pytest.raises(GeographyError, match="did you mean") as info:
        find_unit(query)
    assert suggested in str(info.value)


def test_nonsense_gets_no_suggestion() -> None:
    with pytest.raises(GeographyError) as info:
        find_unit("zzzz qqqq")
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize("length", [MAX_QUERY_CHARS + 1, 10_000_000])
def test_very_long_query_is_refused_before_any_work(length: int) -> None:
    # Refused on its length alone: the refusal is short and quotes the query
    # shortened, whatever its size.
    with pytest.raises(GeographyError, match="too long") as info:
        find_unit("Hoàn Kiếm " * (length // 10) + "x" * (length % 10))
    assert len(str(info.value)) < 200
    with pytest.raises(GeographyError, match="too long") as info:
        former_district("a" * length)
    assert len(str(info.value)) < 200


def test_longest_name_is_within_the_query_limit() -> None:
    assert max(len(u.name) for u in UNITS) < MAX_QUERY_CHARS
    assert find_unit(" " * 10 + max((u.name for u in UNITS), key=len)).name


@given(st.text(max_size=MAX_QUERY_CHARS))
def test_find_unit_returns_a_unit_or_refuses(query: str) -> None:
    try:
        unit = find_unit(query)
    except GeographyError:
        return
    assert unit in UNITS


# --- former_district ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("Ba Đình", "Ba Đình"),
        ("Quận Ba Đình", "Ba Đình"),
        ("quận ba đình", "Ba Đình"),
        ("ba dinh", "Ba Đình"),
        ("Quan Ba Dinh", "Ba Đình"),  # prefix and name both without diacritics
        ("Huyện Sóc Sơn", "Sóc Sơn"),
        ("huyen soc son", "Sóc Sơn"),
        ("Thị xã Sơn Tây", "Sơn Tây"),
        ("thi xa son tay", "Sơn Tây"),
        ("  Hoàn Kiếm ", "Hoàn Kiếm"),  # also a ward's name now, but a district before
        (unicodedata.normalize("NFD", "Quận Đống Đa"), "Đống Đa"),
        ("Ung Hoa", "Ứng Hòa"),
    ],
)
def test_former_district_accepts(query: str, expected: str) -> None:
    assert former_district(query) == expected


@pytest.mark.parametrize("name", FORMER_DISTRICTS)
def test_every_former_district_is_found_by_its_own_name(name: str) -> None:
    assert former_district(name) == name
    assert former_district(fold(name)) == name


@pytest.mark.parametrize("query", ["Ngọc Hà", "Phường Ngọc Hà", "Giảng Võ"])
def test_a_post_2025_ward_is_not_a_former_district(query: str) -> None:
    with pytest.raises(GeographyError, match="not one of Hanoi's 30 former districts") as info:
        former_district(query)
    # The refusal says what the name is now.
    assert "is a ward since 1 July 2025" in str(info.value)


@pytest.mark.parametrize("query", ["", "Quận", "Quận Hà Nội", "Huyện Từ Liêm", "Phường Ba Đình"])
def test_former_district_refuses(query: str) -> None:
    with pytest.raises(GeographyError, match="former districts"):
        former_district(query)
