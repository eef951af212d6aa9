"""Sites as data: the record, its checks, and the CSV and GeoJSON files it travels in.

A site is a place the hub has devices at: a service hall, a ward office, a
street monitoring point. It is in one of Hanoi's 126 wards and communes
(``contracts.geography``) and may keep the district it was in before 1 July
2025. ``site_from_fields`` turns the fields of one file row (strings, or
numbers from GeoJSON) into a ``Site`` or raises ``SiteFileError`` naming the
file, the row and the field; ``read_csv`` / ``read_geojson`` do that for a
whole file's text and refuse a file that is too big, has too many rows or
names a site twice. ``write_csv`` / ``write_geojson`` write files the readers
read back as they were.

This module is pure: opening hours are checked by the caller (their parser is
the simulator's), and storing sites is the registry's business.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import reprlib
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any, Final

import msgspec

from contracts.errors import GeographyError, InvalidIdError, SiteFileError
from contracts.geography import UNITS_BY_CODE, find_unit, former_district
from contracts.ids import check_id

SITE_KINDS: Final = ("service_hall", "ward_office", "street_monitor")

# Hanoi's extent with a margin of a few km (the city spans about 20.56-21.39 N,
# 105.28-106.02 E): a point outside is a typo or swapped coordinates.
HANOI_LAT: Final = (20.45, 21.50)
HANOI_LON: Final = (105.15, 106.15)

# A city has a few thousand sites at most; a file far beyond that is a mistake
# (or an attack on the command's memory), refused before parsing.
MAX_FILE_BYTES: Final = 8 * 1024 * 1024
MAX_SITES: Final = 20_000
MAX_TEXT_CHARS: Final = 300  # name, address, opening hours

# The columns of a site file, in the order export writes them. ``ward`` (a
# name) and ``ward_code`` are alternatives on import: one is enough, and both
# must name the same unit.
CSV_COLUMNS: Final = (
    "site_id",
    "name",
    "kind",
    "ward_code",
    "ward",
    "former_district",
    "address",
    "latitude",
    "longitude",
    "opening_hours",
)
_BIDI_CONTROLS: Final = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_REQUIRED: Final = ("site_id", "name", "kind", "latitude", "longitude")
# A code as a spreadsheet may leave it: "00070" or, leading zeros lost, "70".
_WARD_CODE_RE: Final = re.compile(r"[0-9]{1,5}")

# Values quoted in a refusal are shortened: a refusal names the problem, it
# does not echo a pasted blob (or a deeply nested list) back into the log.
_REPR: Final = reprlib.Repr()
_REPR.maxstring = 40
_REPR.maxother = 40


class Site(msgspec.Struct, frozen=True, kw_only=True):
    site_id: str
    name: str
    kind: str
    unit_code: str | None  # None only for a site stored before the geography
    former_district: str | None = None
    address: str = ""
    latitude: float
    longitude: float
    opening_hours: str = "24/7"

    @property
    def ward(self) -> str:
        """The current ward/commune's name, '' when the site has none recorded."""
        unit = UNITS_BY_CODE.get(self.unit_code or "")
        return unit.name if unit is not None else ""


def _text(fields: Mapping[str, Any], key: str) -> str:
    value = fields.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TypeError(f"{key}: expected text, got {type(value).__name__}")
    text = unicodedata.normalize("NFC", value.strip())
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"{key}: longer than {MAX_TEXT_CHARS} characters")
    # Cc: control characters (tabs, line breaks, NUL); Cs: lone surrogates, which
    # no UTF-8 file can hold, so a site with one could not be exported; the
    # bidirectional overrides and isolates make a name display as another.
    if any(unicodedata.category(c) in ("Cc", "Cs") or c in _BIDI_CONTROLS for c in text):
        raise ValueError(f"{key}: contains control characters")
    return text


def _degrees(fields: Mapping[str, Any], key: str) -> float:
    value = fields.get(key)
    if isinstance(value, bool) or value is None or value == "":
        raise TypeError(f"{key}: {_REPR.repr(value)} is not a number of degrees")
    try:
        number = float(value)
    # OverflowError: a JSON integer too large for a float (1 followed by 400 zeros).
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{key}: {_REPR.repr(value)} is not a number of degrees") from None
    if not math.isfinite(number):
        raise ValueError(f"{key}: {_REPR.repr(value)} is not a finite number")
    return number


def _coordinates(fields: Mapping[str, Any]) -> tuple[float, float]:
    latitude, longitude = _degrees(fields, "latitude"), _degrees(fields, "longitude")
    inside = _inside(latitude, HANOI_LAT) and _inside(longitude, HANOI_LON)
    if not inside:
        swapped = _inside(longitude, HANOI_LAT) and _inside(latitude, HANOI_LON)
        hint = " (latitude and longitude swapped?)" if swapped else ""
        raise ValueError(
            f"latitude {latitude}, longitude {longitude} is outside Hanoi"
            f" ({HANOI_LAT[0]}..{HANOI_LAT[1]} N, {HANOI_LON[0]}..{HANOI_LON[1]} E){hint}"
        )
    return latitude, longitude


def _inside(number: float, bounds: tuple[float, float]) -> bool:
    return bounds[0] <= number <= bounds[1]


def _unit_code(fields: Mapping[str, Any]) -> str:
    code, name = _text(fields, "ward_code"), _text(fields, "ward")
    if not code and not name:
        raise ValueError("ward: missing (the current ward or commune, name or ward_code)")
    if code and not _WARD_CODE_RE.fullmatch(code):
        raise ValueError(f"ward_code: {code!r} is not a code of five digits (00070); use ward")
    by_code = find_unit(code) if code else None
    by_name = find_unit(name) if name else None
    if by_code is not None and by_name is not None and by_code != by_name:
        raise ValueError(f"ward_code {by_code.code} is {by_code.name}, but ward says {name!r}")
    return (by_code or by_name or find_unit("")).code


def site_from_fields(fields: Mapping[str, Any], *, source: str, row: int | None) -> Site:
    """One site from the fields of a file row or a command's options; SiteFileError else."""
    try:
        return _site(fields)
    except (ValueError, TypeError, InvalidIdError, GeographyError) as exc:
        raise SiteFileError(source, row, str(exc)) from None


def _site(fields: Mapping[str, Any]) -> Site:
    # Blank (only spaces) is missing too: the text fields are stored stripped.
    missing = [
        k
        for k in _REQUIRED
        if fields.get(k) is None or (isinstance(fields[k], str) and not fields[k].strip())
    ]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    site_id = _text(fields, "site_id")
    check_id(site_id, "site_id")
    kind = _text(fields, "kind")
    if kind not in SITE_KINDS:
        raise ValueError(f"kind: {kind!r} is not one of {', '.join(SITE_KINDS)}")
    district = _text(fields, "former_district")
    latitude, longitude = _coordinates(fields)
    return Site(
        site_id=site_id,
        name=_text(fields, "name"),
        kind=kind,
        unit_code=_unit_code(fields),
        former_district=former_district(district) if district else None,
        address=_text(fields, "address"),
        latitude=latitude,
        longitude=longitude,
        opening_hours=_text(fields, "opening_hours") or "24/7",
    )


def _check_size(text: str, source: str) -> None:
    # Every character takes at least one byte: a text longer than the limit in
    # characters is refused without encoding it.
    if len(text) > MAX_FILE_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise SiteFileError(source, None, f"larger than {MAX_FILE_BYTES // 2**20} MiB")


def _checked_unique(sites: list[Site], rows: list[int], source: str) -> list[Site]:
    seen: dict[str, int] = {}
    for site, row in zip(sites, rows, strict=True):
        if site.site_id in seen:
            raise SiteFileError(
                source, row, f"site_id {site.site_id!r} is already in row {seen[site.site_id]}"
            )
        seen[site.site_id] = row
    return sites


def read_csv(text: str, *, source: str) -> list[Site]:
    """The sites of a CSV file (UTF-8, a header row of CSV_COLUMNS names, any order).

    Rows are numbered as a spreadsheet shows them: the header is row 1, and a
    quoted value that spans lines is still one row.
    """
    _check_size(text, source)
    reader = csv.reader(io.StringIO(text.removeprefix("\ufeff"), newline=""), strict=True)
    sites: list[Site] = []
    rows: list[int] = []
    row = 1  # the row being read; a blank line is a row, as a spreadsheet shows it
    try:
        header = next(reader, [])
        if not header:
            raise SiteFileError(source, None, "empty file: expected a header row")
        unknown = [h for h in header if h not in CSV_COLUMNS]
        if unknown:
            raise SiteFileError(
                source, 1, f"unknown columns {unknown} (known: {', '.join(CSV_COLUMNS)})"
            )
        repeated = sorted({h for h in header if header.count(h) > 1})
        if repeated:
            raise SiteFileError(source, 1, f"columns named twice: {', '.join(repeated)}")
        row += 1
        for values in reader:
            if values:
                if len(sites) >= MAX_SITES:
                    raise SiteFileError(source, row, f"more than {MAX_SITES} sites")
                if len(values) != len(header):
                    more = "more" if len(values) > len(header) else "fewer"
                    raise SiteFileError(
                        source,
                        row,
                        f"{more} values ({len(values)}) than columns ({len(header)})",
                    )
                record = dict(zip(header, values, strict=True))
                sites.append(site_from_fields(record, source=source, row=row))
                rows.append(row)
            row += 1
    except csv.Error as exc:
        raise SiteFileError(source, row, f"not valid CSV: {exc}") from None
    return _checked_unique(sites, rows, source)


def read_geojson(text: str, *, source: str) -> list[Site]:
    """The sites of a GeoJSON FeatureCollection of Points ([longitude, latitude], RFC 7946).

    Rows are features, numbered from 1; properties are CSV_COLUMNS less the
    coordinates.
    """
    _check_size(text, source)
    try:
        document = json.loads(text.removeprefix("\ufeff"))
    except (ValueError, RecursionError) as exc:
        raise SiteFileError(source, None, f"not valid JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("type") != "FeatureCollection":
        raise SiteFileError(source, None, "expected a GeoJSON FeatureCollection")
    features = document.get("features")
    if not isinstance(features, list):
        raise SiteFileError(source, None, "'features' is not a list")
    if len(features) > MAX_SITES:
        raise SiteFileError(source, None, f"more than {MAX_SITES} sites")
    sites: list[Site] = []
    for row, feature in enumerate(features, start=1):
        sites.append(_site_of_feature(feature, source=source, row=row))
    return _checked_unique(sites, list(range(1, len(sites) + 1)), source)


def _site_of_feature(feature: object, *, source: str, row: int) -> Site:
    if not isinstance(feature, dict) or feature.get("type") != "Feature":
        raise SiteFileError(source, row, "not a GeoJSON Feature")
    geometry = feature.get("geometry")
    if not isinstance(geometry, dict) or geometry.get("type") != "Point":
        raise SiteFileError(source, row, "geometry is not a Point")
    coordinates = geometry.get("coordinates")
    if not isinstance(coordinates, list) or len(coordinates) not in (2, 3):
        raise SiteFileError(source, row, "coordinates are not [longitude, latitude]")
    properties = feature.get("properties")
    if not isinstance(properties, dict):
        raise SiteFileError(source, row, "properties is not an object")
    unknown = [k for k in properties if k not in CSV_COLUMNS or k in ("latitude", "longitude")]
    if unknown:
        raise SiteFileError(source, row, f"unknown properties {unknown}")
    fields = {**properties, "longitude": coordinates[0], "latitude": coordinates[1]}
    return site_from_fields(fields, source=source, row=row)


def _row(site: Site) -> dict[str, str]:
    return {
        "site_id": site.site_id,
        "name": site.name,
        "kind": site.kind,
        "ward_code": site.unit_code or "",
        "ward": site.ward,
        "former_district": site.former_district or "",
        "address": site.address,
        "latitude": repr(site.latitude),
        "longitude": repr(site.longitude),
        "opening_hours": site.opening_hours,
    }


def write_csv(sites: Iterable[Site]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for site in sites:
        writer.writerow(_row(site))
    return out.getvalue()


def write_geojson(sites: Iterable[Site]) -> str:
    features = []
    for site in sites:
        properties: dict[str, str] = {
            k: v for k, v in _row(site).items() if k not in ("latitude", "longitude")
        }
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Point", "coordinates": [site.longitude, site.latitude]},
                "properties": properties,
            }
        )
    return json.dumps({"type": "FeatureCollection", "features": features}, ensure_ascii=False)
