"""The Hanoi seed sites (cityhub/data/hanoi_sites.toml) are well-formed and plausible.

Checks the file's own contract (ids, kinds, each site's current ward among
Hanoi's 126 and its former district among the 30, addresses written in the
new form, service halls in the required former districts, opening-hours
grammar, NFC Vietnamese text), that ``cityhub.database.load_hanoi_sites``
reads it whole, and cheap plausibility limits on the coordinates: inside
Hanoi, the central former districts inside the urban core, and no two sites
on top of each other. It does not check that a coordinate matches its address
or that a split ward was placed right; the file's header says how both were
estimated.
"""

from __future__ import annotations

import math
import re
import tomllib
import unicodedata
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest

from cityhub import database
from contracts.geography import FORMER_DISTRICTS, UNITS

SITES_PATH = Path(__file__).parents[2] / "cityhub" / "data" / "hanoi_sites.toml"

ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")  # the id allow-list of contracts/ids.py
KINDS = ("service_hall", "ward_office", "street_monitor")
MIN_SITES_PER_KIND = 8
FIELD_TYPES: dict[str, type] = {
    "id": str,
    "name": str,
    "ward": str,
    "former_district": str,
    "kind": str,
    "address": str,
    "latitude": float,
    "longitude": float,
    "opening_hours": str,
}
TEXT_FIELDS = ("name", "ward", "former_district", "address")

# (lat_min, lat_max, lon_min, lon_max), degrees WGS84.
HANOI_BOX = (20.53, 21.39, 105.28, 106.02)  # whole city after the 2008 expansion
CORE_BOX = (20.98, 21.06, 105.80, 105.88)  # the inner urban districts
CENTRAL_DISTRICTS = frozenset({"Hoàn Kiếm", "Ba Đình", "Đống Đa", "Hai Bà Trưng"})
REQUIRED_HALL_DISTRICTS = ("Long Biên", "Hoàn Kiếm", "Ba Đình", "Cầu Giấy", "Đống Đa", "Hà Đông")
# Hanoi's 126 wards and communes since 1 July 2025, by full name.
UNITS_BY_NAME = {unit.name: unit for unit in UNITS}
EXPECTED_SITES = 30

# Two real sites can share a street, not a spot: closer than this betrays a
# copied or made-up coordinate.
MIN_SEPARATION_M = 50.0
EARTH_MEAN_RADIUS_M = 6_371_008.8  # IUGG mean radius

WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
MINUTES_PER_DAY = 24 * 60
_RULE_RE = re.compile(r"(?P<first>[A-Z][a-z]{2})(?:-(?P<last>[A-Z][a-z]{2}))? (?P<ranges>\S+)")
_RANGE_RE = re.compile(r"(\d{2}):(\d{2})-(\d{2}):(\d{2})")


def _weekday(token: str) -> int:
    if token not in WEEKDAYS:
        raise ValueError(f"unknown day {token!r}; expected one of {WEEKDAYS}")
    return WEEKDAYS.index(token)


def _minute_of_day(hours: str, minutes: str) -> int:
    value = int(hours) * 60 + int(minutes)
    if int(minutes) > 59 or value > MINUTES_PER_DAY:
        raise ValueError(f"bad time {hours}:{minutes}")
    return value


def _parse_ranges(text: str) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for piece in text.split(","):
        match = _RANGE_RE.fullmatch(piece)
        if match is None:
            raise ValueError(f"bad time range {piece!r}; expected HH:MM-HH:MM")
        start = _minute_of_day(match[1], match[2])
        end = _minute_of_day(match[3], match[4])
        if start >= end:
            raise ValueError(f"time range {piece!r} ends before it starts")
        if spans and start <= spans[-1][1]:
            raise ValueError(f"time range {piece!r} overlaps or precedes the one before")
        spans.append((start, end))
    return spans


def parse_opening_hours(text: str) -> dict[int, list[tuple[int, int]]]:
    """Parse the file's opening-hours format (see its header).

    Returns {weekday (0 = Monday): [(start_minute, end_minute), ...]}; a day
    missing from the result is closed. Raises ValueError on anything else.
    """
    if text == "24/7":
        return {day: [(0, MINUTES_PER_DAY)] for day in range(len(WEEKDAYS))}
    week: dict[int, list[tuple[int, int]]] = {}
    for rule in text.split("; "):
        match = _RULE_RE.fullmatch(rule)
        if match is None:
            raise ValueError(f"bad rule {rule!r}; expected '<days> <ranges>'")
        first = _weekday(match["first"])
        last = _weekday(match["last"]) if match["last"] else first
        if last < first:
            raise ValueError(f"day span in {rule!r} runs backwards")
        spans = _parse_ranges(match["ranges"])
        for day in range(first, last + 1):
            if day in week:
                raise ValueError(f"{WEEKDAYS[day]} is named twice in {text!r}")
            week[day] = spans
    return week


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    d_phi = phi2 - phi1
    d_lambda = math.radians(lon2 - lon1)
    a = math.sin(d_phi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(d_lambda / 2) ** 2
    return 2 * EARTH_MEAN_RADIUS_M * math.asin(math.sqrt(a))


def _in_box(site: dict[str, Any], box: tuple[float, float, float, float]) -> bool:
    lat_min, lat_max, lon_min, lon_max = box
    return lat_min <= site["latitude"] <= lat_max and lon_min <= site["longitude"] <= lon_max


def _load_sites() -> list[dict[str, Any]]:
    with SITES_PATH.open("rb") as fh:
        sites: list[dict[str, Any]] = tomllib.load(fh)["site"]
    return sites


SITES = _load_sites()
CENTRAL_SITES = [site for site in SITES if site.get("former_district") in CENTRAL_DISTRICTS]


def _site_id(site: dict[str, Any]) -> str:
    return str(site.get("id", "<no id>"))


per_site = pytest.mark.parametrize("site", SITES, ids=_site_id)


# --- the opening-hours parser itself ------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24/7", {day: [(0, 1440)] for day in range(7)}),
        ("Sat 08:00-12:00", {5: [(480, 720)]}),
        (
            "Mon-Fri 08:00-12:00,13:00-17:00; Sat 08:00-12:00",
            {
                **{day: [(480, 720), (780, 1020)] for day in range(5)},
                5: [(480, 720)],
            },
        ),
        ("Mon 00:00-24:00", {0: [(0, 1440)]}),
    ],
)
def test_parser_accepts(text: str, expected: dict[int, list[tuple[int, int]]]) -> None:
    assert parse_opening_hours(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "24x7",
        "Mon-Fri",  # no ranges
        "mon-fri 08:00-12:00",  # day case
        "Mon-Fry 08:00-12:00",  # unknown day
        "Fri-Mon 08:00-12:00",  # span backwards
        "Mon-Fri 8:00-12:00",  # hours need two digits
        "Mon-Fri 08:00-12:60",
        "Mon-Fri 08:00-25:00",
        "Mon-Fri 12:00-08:00",  # ends before it starts
        "Mon-Fri 13:00-17:00,08:00-12:00",  # not ascending
        "Mon-Fri 08:00-12:00,11:00-17:00",  # overlap
        "Mon-Fri 08:00-12:00 13:00-17:00",  # wrong separator
        "Mon-Fri 08:00-12:00;Sat 08:00-12:00",  # rules need "; "
        "Mon-Fri 08:00-12:00; Fri 13:00-17:00",  # Friday twice
    ],
)
def test_parser_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_opening_hours(text)


# --- the file -------------------------------------------------------------------


def test_file_holds_thirty_sites() -> None:
    assert len(SITES) == EXPECTED_SITES


@per_site
def test_site_has_exactly_the_documented_fields(site: dict[str, Any]) -> None:
    assert set(site) == set(FIELD_TYPES)
    for field, expected_type in FIELD_TYPES.items():
        assert type(site[field]) is expected_type, field
    for field in TEXT_FIELDS:
        assert site[field].strip() == site[field] != ""


@per_site
def test_id_is_allow_listed(site: dict[str, Any]) -> None:
    assert ID_RE.fullmatch(site["id"])


def test_ids_are_unique() -> None:
    ids = [site["id"] for site in SITES]
    duplicates = sorted({site_id for site_id in ids if ids.count(site_id) > 1})
    assert not duplicates


@per_site
def test_kind_is_known(site: dict[str, Any]) -> None:
    assert site["kind"] in KINDS


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_has_enough_sites(kind: str) -> None:
    # The city's Public Administrative Service Centre counts as a service hall.
    assert sum(site["kind"] == kind for site in SITES) >= MIN_SITES_PER_KIND


@per_site
def test_ward_is_one_of_the_126_by_its_full_name(site: dict[str, Any]) -> None:
    assert site["ward"] in UNITS_BY_NAME


@per_site
def test_former_district_is_one_of_the_30_without_prefix(site: dict[str, Any]) -> None:
    assert site["former_district"] in FORMER_DISTRICTS


@per_site
def test_address_ends_with_the_sites_ward(site: dict[str, Any]) -> None:
    # The new form: "<street>, phường <ward>, Hà Nội" or "..., xã <commune>, Hà Nội";
    # no district, which no longer exists.
    unit = UNITS_BY_NAME[site["ward"]]
    assert site["address"].endswith(f", {unit.kind_vi} {unit.short_name}, Hà Nội")
    assert not re.search(r"\b(quận|huyện|thị xã)\b", site["address"], re.IGNORECASE)


@pytest.mark.parametrize("district", REQUIRED_HALL_DISTRICTS)
def test_required_former_district_has_a_service_hall(district: str) -> None:
    assert any(
        site["former_district"] == district and site["kind"] == "service_hall" for site in SITES
    )


def test_required_hall_districts_are_former_districts() -> None:
    assert set(REQUIRED_HALL_DISTRICTS) <= set(FORMER_DISTRICTS)
    assert set(FORMER_DISTRICTS) >= CENTRAL_DISTRICTS


def test_load_hanoi_sites_reads_every_site_with_its_unit() -> None:
    sites = database.load_hanoi_sites()
    assert len(sites) == EXPECTED_SITES
    assert [site.site_id for site in sites] == [site["id"] for site in SITES]
    for site, seed in zip(sites, SITES, strict=True):
        assert site.unit_code == UNITS_BY_NAME[seed["ward"]].code
        assert site.ward == seed["ward"]
        assert site.former_district == seed["former_district"]
        assert (site.latitude, site.longitude) == (seed["latitude"], seed["longitude"])


def test_city_service_centre_is_listed() -> None:
    names = {site["name"] for site in SITES if site["kind"] == "service_hall"}
    assert "Trung tâm Phục vụ hành chính công thành phố Hà Nội" in names


@per_site
def test_name_is_vietnamese_with_diacritics(site: dict[str, Any]) -> None:
    assert any(not char.isascii() for char in site["name"])


@per_site
def test_text_is_nfc(site: dict[str, Any]) -> None:
    for field in TEXT_FIELDS:
        assert unicodedata.is_normalized("NFC", site[field]), field


@per_site
def test_site_is_inside_hanoi(site: dict[str, Any]) -> None:
    assert _in_box(site, HANOI_BOX)


@pytest.mark.parametrize("site", CENTRAL_SITES, ids=_site_id)
def test_central_district_site_is_inside_urban_core(site: dict[str, Any]) -> None:
    assert _in_box(site, CORE_BOX)


def test_no_two_sites_share_a_spot() -> None:
    too_close = [
        (a["id"], b["id"], round(distance, 1))
        for a, b in combinations(SITES, 2)
        if (distance := haversine_m(a["latitude"], a["longitude"], b["latitude"], b["longitude"]))
        < MIN_SEPARATION_M
    ]
    assert not too_close


def test_haversine_matches_a_known_distance() -> None:
    # One degree of latitude is about 111.2 km on the mean sphere.
    assert haversine_m(21.0, 105.85, 22.0, 105.85) == pytest.approx(111_195, rel=1e-4)
    assert haversine_m(21.0, 105.85, 21.0, 105.85) == 0.0


@per_site
def test_opening_hours_parse(site: dict[str, Any]) -> None:
    week = parse_opening_hours(site["opening_hours"])
    if site["kind"] == "street_monitor":
        assert site["opening_hours"] == "24/7"
    else:
        # Offices keep government hours: open every weekday, never round the clock.
        assert set(range(5)) <= set(week)
        assert all(spans != [(0, MINUTES_PER_DAY)] for spans in week.values())
