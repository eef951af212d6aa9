"""Site records and their files (contracts.sites): one row's checks, the CSV and GeoJSON
readers' refusals, and write -> read round trips.

Every refusal must be a SiteFileError naming the file and, where there is one,
the row, so that an operator can find the line to fix. Table-driven and
property-based, no fixtures: the module is pure.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts.errors import ProvisioningError, SiteFileError
from contracts.geography import FORMER_DISTRICTS, UNITS, UNITS_BY_CODE
from contracts.sites import (
    CSV_COLUMNS,
    HANOI_LAT,
    HANOI_LON,
    MAX_FILE_BYTES,
    MAX_SITES,
    MAX_TEXT_CHARS,
    SITE_KINDS,
    Site,
    read_csv,
    read_geojson,
    site_from_fields,
    write_csv,
    write_geojson,
)

HOAN_KIEM = UNITS_BY_CODE["00070"]

# One good row: the Hàng Đậu air-quality station.
GOOD: dict[str, Any] = {
    "site_id": "hk-aq-hang-dau",
    "name": "Trạm quan trắc không khí Hàng Đậu",
    "kind": "street_monitor",
    "ward": "Phường Hoàn Kiếm",
    "latitude": "21.0427",
    "longitude": "105.8473",
}
HEADER = ",".join(GOOD)
GOOD_LINE = ",".join(GOOD.values())


_DROP: Any = object()


def _fields(**changes: Any) -> dict[str, Any]:
    fields = {**GOOD, **changes}
    return {k: v for k, v in fields.items() if v is not _DROP}


def _refusal(fields: dict[str, Any], row: int | None = 7) -> SiteFileError:
    with pytest.raises(SiteFileError) as info:
        site_from_fields(fields, source="sites.csv", row=row)
    return info.value


def _csv_refusal(text: str) -> SiteFileError:
    with pytest.raises(SiteFileError) as info:
        read_csv(text, source="sites.csv")
    return info.value


def _geojson_refusal(text: str) -> SiteFileError:
    with pytest.raises(SiteFileError) as info:
        read_geojson(text, source="sites.geojson")
    return info.value


def _feature(**properties: Any) -> dict[str, Any]:
    return {
        "type": "Feature",
        "geometry": {"type": "Point", "coordinates": [105.8473, 21.0427]},
        "properties": {k: v for k, v in GOOD.items() if k not in ("latitude", "longitude")}
        | properties,
    }


def _collection(*features: object) -> str:
    return json.dumps({"type": "FeatureCollection", "features": list(features)})


# --- one row ------------------------------------------------------------------------


def test_site_from_fields_happy_path() -> None:
    site = site_from_fields(
        _fields(
            name="  Trạm quan trắc không khí Hàng Đậu ",
            former_district="Quận Hoàn Kiếm",
            address="Phố Hàng Đậu, phường Hoàn Kiếm, Hà Nội",
        ),
        source="sites.csv",
        row=2,
    )
    assert site == Site(
        site_id="hk-aq-hang-dau",
        name="Trạm quan trắc không khí Hàng Đậu",  # stripped
        kind="street_monitor",
        unit_code="00070",
        former_district="Hoàn Kiếm",  # as stored: no prefix
        address="Phố Hàng Đậu, phường Hoàn Kiếm, Hà Nội",
        latitude=21.0427,
        longitude=105.8473,
        opening_hours="24/7",  # the default
    )
    assert site.ward == "Phường Hoàn Kiếm"


@pytest.mark.parametrize(
    "changes",
    [
        {"ward": _DROP, "ward_code": "00070"},
        {"ward": _DROP, "ward_code": "70"},  # leading zeros lost by a spreadsheet
        {"ward": "hoan kiem", "ward_code": "00070"},  # both, agreeing
        {"latitude": 21.0427, "longitude": 105.8473},  # numbers, as GeoJSON gives them
        {"latitude": 21, "longitude": 106},  # ints
    ],
)
def test_site_from_fields_accepts_other_spellings(changes: dict[str, Any]) -> None:
    site = site_from_fields(_fields(**changes), source="sites.csv", row=2)
    assert site.unit_code == HOAN_KIEM.code
    assert HANOI_LAT[0] <= site.latitude <= HANOI_LAT[1]


def test_text_is_stored_nfc() -> None:
    site = site_from_fields(_fields(name="Tra\u0323m Hàng Đậu"), source="s", row=2)
    assert site.name == "Trạm Hàng Đậu"


@pytest.mark.parametrize(
    ("changes", "in_message"),
    [
        ({"site_id": _DROP}, "missing site_id"),
        ({"name": ""}, "missing name"),
        ({"name": "   "}, "missing name"),  # blank is missing, not an empty name
        ({"kind": None}, "missing kind"),
        ({"latitude": _DROP, "longitude": ""}, "missing latitude, longitude"),
        ({"ward": _DROP}, "ward: missing"),
        ({"ward": ""}, "ward: missing"),
        # Spoofed or malformed ids: '/', '+' and '#' are MQTT topic separators and
        # wildcards, and ids are lower case, at most 64 characters.
        ({"site_id": "hk/aq-hang-dau"}, "site_id 'hk/aq-hang-dau' does not match"),
        ({"site_id": "hk-aq-+"}, "does not match"),
        ({"site_id": "hk-aq-#"}, "does not match"),
        ({"site_id": "HK-aq-hang-dau"}, "does not match"),
        ({"site_id": "a" * 65}, "does not match"),
        ({"site_id": "-hk"}, "does not match"),
        ({"kind": "kiosk"}, "kind: 'kiosk' is not one of service_hall"),
        ({"kind": "Street_Monitor"}, "is not one of"),
        ({"ward": "Phường Ngọc Hà", "ward_code": "00070"}, "ward_code 00070 is Phường Hoàn Kiếm"),
        ({"ward": _DROP, "ward_code": "99999"}, "not the code of one of Hanoi's 126"),
        ({"ward": _DROP, "ward_code": "Hoàn Kiếm"}, "ward_code: 'Hoàn Kiếm' is not a code"),
        ({"ward": "Quận Hoàn Kiếm"}, "not one of Hanoi's 126 wards/communes"),
        ({"former_district": "Ngọc Hà"}, "not one of Hanoi's 30 former districts"),
        ({"latitude": "105.8473", "longitude": "21.0427"}, "(latitude and longitude swapped?)"),
        ({"latitude": "10.82", "longitude": "106.63"}, "outside Hanoi"),  # Ho Chi Minh City
        ({"latitude": "nan"}, "latitude: 'nan' is not a finite number"),
        ({"longitude": "inf"}, "longitude: 'inf' is not a finite number"),
        ({"latitude": math.nan}, "not a finite number"),
        ({"longitude": -math.inf}, "not a finite number"),
        ({"latitude": "21,0427"}, "latitude: '21,0427' is not a number of degrees"),  # comma
        ({"latitude": True}, "latitude: True is not a number of degrees"),
        ({"longitude": False}, "longitude: False is not a number of degrees"),
        ({"latitude": [21.0]}, "is not a number of degrees"),
        ({"latitude": 10**400}, "is not a number of degrees"),  # too large for a float
        ({"name": 42}, "name: expected text, got int"),
        ({"name": ["Trạm"]}, "name: expected text, got list"),
        ({"address": {"street": "Hàng Đậu"}}, "address: expected text, got dict"),
        ({"name": "Trạm\x00Hàng Đậu"}, "name: contains control characters"),
        ({"name": "Trạm\x1b[31m"}, "name: contains control characters"),  # terminal escape
        ({"address": "Phố Hàng Đậu\nHà Nội"}, "address: contains control characters"),
        ({"address": "Phố \ud800"}, "address: contains control characters"),  # lone surrogate
        ({"name": "x" * (MAX_TEXT_CHARS + 1)}, f"name: longer than {MAX_TEXT_CHARS}"),
        ({"address": "x" * 100_000}, f"address: longer than {MAX_TEXT_CHARS}"),
        ({"opening_hours": "y" * (MAX_TEXT_CHARS + 1)}, "opening_hours: longer than"),
    ],
)
def test_site_from_fields_refuses_naming_the_row(changes: dict[str, Any], in_message: str) -> None:
    error = _refusal(_fields(**changes), row=7)
    assert error.source == "sites.csv"
    assert error.row == 7
    assert str(error).startswith("sites.csv, row 7: ")
    assert in_message in str(error)
    assert isinstance(error, ProvisioningError)  # poison, not retryable


def test_swap_hint_only_when_swapping_fits() -> None:
    assert "swapped" not in str(_refusal(_fields(latitude="48.85", longitude="2.35")))


def test_refusal_quotes_values_shortened() -> None:
    error = _refusal(_fields(latitude="1" * 10_000 + "x"))
    assert "not a number of degrees" in str(error)
    assert len(str(error)) < 200


def test_refusal_without_a_row_names_the_source() -> None:
    error = _refusal(_fields(kind="kiosk"), row=None)
    assert error.row is None
    assert str(error).startswith("sites.csv: kind:")


# --- CSV ------------------------------------------------------------------------------


def test_csv_header_only_is_no_sites() -> None:
    assert read_csv(HEADER + "\n", source="sites.csv") == []
    assert read_csv(",".join(CSV_COLUMNS), source="sites.csv") == []


def test_csv_empty_file_is_refused() -> None:
    error = _csv_refusal("")
    assert error.row is None
    assert "empty file" in str(error)


def test_csv_reads_a_row_with_bom_crlf_and_columns_in_any_order() -> None:
    header = "longitude,latitude,ward,kind,name,site_id"
    line = ",".join(GOOD[k] for k in header.split(","))
    sites = read_csv(f"\ufeff{header}\r\n{line}\r\n", source="sites.csv")
    assert [s.site_id for s in sites] == ["hk-aq-hang-dau"]
    assert sites[0].name == GOOD["name"]  # no '\r' left on any value
    assert sites[0].longitude == 105.8473


def test_csv_quoted_commas_in_an_address() -> None:
    text = f'{HEADER},address\n{GOOD_LINE},"Phố Hàng Đậu, phường Hoàn Kiếm, Hà Nội"\n'
    (site,) = read_csv(text, source="sites.csv")
    assert site.address == "Phố Hàng Đậu, phường Hoàn Kiếm, Hà Nội"


def test_csv_quoted_line_break_is_refused_at_the_row_it_starts() -> None:
    # A line break inside quotes is one spreadsheet row spanning two lines; the
    # address refuses it (control character) naming that row, not its last line.
    text = f'{HEADER},address\n{GOOD_LINE},"Phố Hàng Đậu\r\nHà Nội"\n'
    error = _csv_refusal(text)
    assert error.row == 2
    assert "address: contains control characters" in str(error)


def test_csv_blank_lines_are_counted_as_rows() -> None:
    bad = GOOD_LINE.replace("street_monitor", "kiosk")
    error = _csv_refusal(f"{HEADER}\n{GOOD_LINE.replace('hang-dau', 'x')}\n\n{bad}\n")
    assert error.row == 4  # header 1, good 2, blank 3


def test_csv_unknown_column() -> None:
    error = _csv_refusal(f"{HEADER},district\n{GOOD_LINE},Hoàn Kiếm\n")
    assert error.row == 1
    assert "unknown columns ['district']" in str(error)


def test_csv_repeated_column() -> None:
    error = _csv_refusal(f"{HEADER},name\n{GOOD_LINE},Trạm\n")
    assert error.row == 1
    assert "columns named twice: name" in str(error)


def test_csv_more_values_than_columns() -> None:
    error = _csv_refusal(f"{HEADER}\n{GOOD_LINE}\n{GOOD_LINE},extra\n")
    assert error.row == 3
    assert "more values (7) than columns (6)" in str(error)


def test_csv_fewer_values_than_columns() -> None:
    short = GOOD_LINE.rsplit(",", 1)[0]
    error = _csv_refusal(f"{HEADER}\n{short}\n")
    assert error.row == 2
    assert "fewer values (5) than columns (6)" in str(error)


def test_csv_malformed_quoting() -> None:
    error = _csv_refusal(f'{HEADER}\n{GOOD_LINE}\nx,"a"b,c\n')
    assert error.row == 3
    assert "not valid CSV" in str(error)


def test_csv_duplicate_site_id_names_both_rows() -> None:
    other = GOOD_LINE.replace("hk-aq-hang-dau", "hk-aq-2")
    error = _csv_refusal(f"{HEADER}\n{GOOD_LINE}\n{other}\n{GOOD_LINE}\n")
    assert error.row == 4
    assert "site_id 'hk-aq-hang-dau' is already in row 2" in str(error)


def test_csv_row_refusal_names_its_row() -> None:
    bad = GOOD_LINE.replace("hk-aq-hang-dau", "hk/aq")
    error = _csv_refusal(f"{HEADER}\n{GOOD_LINE.replace('hang-dau', 'x')}\n{bad}\n")
    assert (error.source, error.row) == ("sites.csv", 3)
    assert "site_id 'hk/aq' does not match" in str(error)


@pytest.mark.parametrize(
    "text",
    [
        "x" * (MAX_FILE_BYTES + 1),
        # Under the limit in characters, over it in UTF-8 bytes.
        "Đ" * (MAX_FILE_BYTES // 2 + 1),
    ],
)
def test_oversized_file_is_refused_before_parsing(text: str) -> None:
    # Neither text is a CSV or JSON file: refused for its size, not its content.
    for error in (_csv_refusal(text), _geojson_refusal(text)):
        assert error.row is None
        assert "larger than 8 MiB" in str(error)


def test_file_at_the_size_limit_is_parsed() -> None:
    head = f"{HEADER}\n{GOOD_LINE}\n"
    text = head + "\n" * (MAX_FILE_BYTES - len(head.encode()))  # blank lines to the limit
    assert len(text.encode()) == MAX_FILE_BYTES
    assert len(read_csv(text, source="sites.csv")) == 1


def test_csv_more_than_max_sites_rows() -> None:
    rows = "".join(
        f"s-{i},Trạm {i},street_monitor,00070,21.03,105.85\n" for i in range(MAX_SITES + 1)
    )
    header = "site_id,name,kind,ward_code,latitude,longitude\n"
    error = _csv_refusal(header + rows)
    assert error.row == MAX_SITES + 2
    assert f"more than {MAX_SITES} sites" in str(error)
    # One fewer row is a full file, and is read.
    last = rows.rindex("s-")
    assert len(read_csv(header + rows[:last], source="sites.csv")) == MAX_SITES


# --- GeoJSON --------------------------------------------------------------------------


def test_geojson_happy_path() -> None:
    (site,) = read_geojson(_collection(_feature()), source="sites.geojson")
    assert (site.site_id, site.unit_code) == ("hk-aq-hang-dau", "00070")
    assert (site.latitude, site.longitude) == (21.0427, 105.8473)  # [lon, lat] in the file


def test_geojson_with_elevation_and_bom() -> None:
    feature = _feature()
    feature["geometry"]["coordinates"] = [105.8473, 21.0427, 12.0]
    (site,) = read_geojson("\ufeff" + _collection(feature), source="sites.geojson")
    assert site.latitude == 21.0427


@pytest.mark.parametrize(
    ("text", "in_message"),
    [
        ("", "not valid JSON"),
        ("{", "not valid JSON"),
        ("site_id,name\n", "not valid JSON"),
        ("[]", "expected a GeoJSON FeatureCollection"),
        ('{"type": "Feature"}', "expected a GeoJSON FeatureCollection"),
        ('{"type": "FeatureCollection"}', "'features' is not a list"),
        ('{"type": "FeatureCollection", "features": {}}', "'features' is not a list"),
    ],
)
def test_geojson_document_refused(text: str, in_message: str) -> None:
    error = _geojson_refusal(text)
    assert error.row is None
    assert in_message in str(error)


def _with_geometry(geometry: object) -> dict[str, Any]:
    feature = _feature()
    feature["geometry"] = geometry
    return feature


@pytest.mark.parametrize(
    ("feature", "in_message"),
    [
        ("not a feature", "not a GeoJSON Feature"),
        ({**_feature(), "type": "Point"}, "not a GeoJSON Feature"),
        (_with_geometry(None), "geometry is not a Point"),
        (
            _with_geometry({"type": "LineString", "coordinates": [[105.84, 21.04]] * 2}),
            "geometry is not a Point",
        ),
        (
            _with_geometry({"type": "Polygon", "coordinates": [[[105.84, 21.04]] * 4]}),
            "geometry is not a Point",
        ),
        (_with_geometry({"type": "Point", "coordinates": [105.84]}), "not [longitude, latitude]"),
        (
            _with_geometry({"type": "Point", "coordinates": [105.84, 21.04, 0, 0]}),
            "not [longitude, latitude]",
        ),
        (_with_geometry({"type": "Point", "coordinates": "105.84,21.04"}), "not [longitude"),
        (
            _with_geometry({"type": "Point", "coordinates": [21.0427, 105.8473]}),
            "(latitude and longitude swapped?)",
        ),
        (
            _with_geometry({"type": "Point", "coordinates": [10**400, 21.0427]}),
            "longitude: 1000000000",
        ),
        ({**_feature(), "properties": None}, "properties is not an object"),
        (_feature(district="Hoàn Kiếm"), "unknown properties ['district']"),
        (_feature(latitude=21.04), "unknown properties ['latitude']"),  # only in geometry
        (_feature(name=7), "name: expected text, got int"),
    ],
)
def test_geojson_feature_refused_naming_its_row(feature: object, in_message: str) -> None:
    other = _feature(site_id="hk-aq-2")
    error = _geojson_refusal(_collection(other, feature))
    assert error.row == 2
    assert in_message in str(error)


def test_geojson_duplicate_site_id_names_both_features() -> None:
    error = _geojson_refusal(_collection(_feature(), _feature(site_id="x"), _feature()))
    assert error.row == 3
    assert "already in row 1" in str(error)


def test_geojson_more_than_max_sites_features() -> None:
    error = _geojson_refusal(_collection(*([{}] * (MAX_SITES + 1))))
    assert f"more than {MAX_SITES} sites" in str(error)


@pytest.mark.parametrize("depth", [50, 900, 100_000])
def test_deeply_nested_json_is_a_site_file_error(depth: int) -> None:
    nested = "[" * depth + "]" * depth
    documents = [
        nested,
        '{"type": "FeatureCollection", "features": ' + nested + "}",
        _collection(_feature()).replace('"street_monitor"', nested),
        _collection(_feature()).replace("105.8473", nested),
    ]
    for text in documents:
        error = _geojson_refusal(text)
        assert len(str(error)) < 400


# --- round trips ----------------------------------------------------------------------

# Text a site may hold: no control characters, lone surrogates or bidirectional
# overrides and isolates (which the record refuses).
_TEXT = st.text(
    st.characters(
        exclude_categories=("Cc", "Cs"),
        exclude_characters="\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069",
    ),
    max_size=40,
)
_IDS = st.from_regex(r"[a-z0-9][a-z0-9-]{0,63}", fullmatch=True)


@st.composite
def _sites(draw: st.DrawFn) -> Site:
    unit = draw(st.sampled_from(UNITS))
    fields = {
        "site_id": draw(_IDS),
        "name": draw(_TEXT.filter(str.strip)),
        "kind": draw(st.sampled_from(SITE_KINDS)),
        "ward_code": unit.code,
        "former_district": draw(st.sampled_from(("", *FORMER_DISTRICTS))),
        "address": draw(_TEXT),
        "latitude": draw(st.floats(*HANOI_LAT)),
        "longitude": draw(st.floats(*HANOI_LON)),
        "opening_hours": draw(st.sampled_from(("", "24/7", "Mon-Fri 08:00-12:00"))),
    }
    return site_from_fields(fields, source="drawn", row=None)


_SITE_LISTS = st.lists(_sites(), max_size=8, unique_by=lambda s: s.site_id)


@settings(max_examples=200)
@given(_SITE_LISTS)
def test_csv_round_trip(sites: list[Site]) -> None:
    assert read_csv(write_csv(sites), source="export.csv") == sites


@settings(max_examples=200)
@given(_SITE_LISTS)
def test_geojson_round_trip(sites: list[Site]) -> None:
    assert read_geojson(write_geojson(sites), source="export.geojson") == sites


def test_written_csv_has_the_documented_columns() -> None:
    site = site_from_fields(_fields(), source="s", row=None)
    header, line = write_csv([site]).splitlines()
    assert tuple(header.split(",")) == CSV_COLUMNS
    assert "00070,Phường Hoàn Kiếm" in line


def test_written_geojson_is_rfc7946_longitude_first() -> None:
    site = site_from_fields(_fields(), source="s", row=None)
    document = json.loads(write_geojson([site]))
    (feature,) = document["features"]
    assert feature["geometry"] == {"type": "Point", "coordinates": [105.8473, 21.0427]}
    assert feature["properties"]["ward"] == "Phường Hoàn Kiếm"
    assert "latitude" not in feature["properties"]


@pytest.mark.parametrize("mark", ["\u202e", "\u2066", "\u202a"])
def test_a_name_with_bidirectional_overrides_is_refused(mark: str) -> None:
    fields = {
        "site_id": "s1",
        "name": f"UBND {mark}gnoC hnahT",
        "kind": "ward_office",
        "ward": "Giảng Võ",
        "latitude": 21.03,
        "longitude": 105.82,
    }
    with pytest.raises(SiteFileError, match="control characters"):
        site_from_fields(fields, source="f.csv", row=2)
