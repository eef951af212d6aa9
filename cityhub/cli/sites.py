"""`cityhub sites`: add, list, show, import and export sites; list Hanoi's wards and communes.

A site is placed in one of Hanoi's 126 wards and communes (since 1 July 2025)
and may keep its former district. Adding or importing writes an audit row per
site added or changed, with the operator's name, like the device commands;
mistakes are reported in one line and change nothing (an import is stored
whole or not at all). The record, its checks and its CSV and GeoJSON forms
are ``contracts.sites``; the place names are ``contracts.geography``; the
rows are the registry's (``devices.registry``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
import typer
from rich.table import Table

from cityhub.cli.context import CliState, local_time, reported_errors, required_operator, state_of
from cityhub.cli.devices import JsonOption, registry_of
from contracts.errors import NotFoundError, SettingsError, SiteFileError
from contracts.geography import UNITS, find_unit, fold
from contracts.sites import (
    MAX_FILE_BYTES,
    SITE_KINDS,
    Site,
    read_csv,
    read_geojson,
    site_from_fields,
    write_csv,
    write_geojson,
)
from contracts.wording import count_noun

if TYPE_CHECKING:
    from devices.registry import ImportResult, SiteRow

app = typer.Typer(
    # Help is printed as written: ids, patterns and TOML sections have [ ] in them.
    rich_markup_mode=None,
    help=(
        "Sites (service halls, ward offices, street monitors) in Hanoi's wards and communes: "
        "add, list, show, import and export (CSV, GeoJSON)."
    ),
    no_args_is_help=True,
)

FileFormat = Literal["csv", "geojson"]
FormatOption = Annotated[
    str | None,
    typer.Option(
        "--format", help="csv or geojson (default: from the file name's suffix, else csv)."
    ),
]


def _check_hours(sites: list[Site], source: str) -> None:
    # The simulator's parser is the one that reads the hours; it needs numpy,
    # which the central install has.
    from firmware_sim.signals import parse_opening_hours

    for site in sites:
        try:
            parse_opening_hours(site.opening_hours)
        except SettingsError as exc:
            raise SiteFileError(
                source, None, f"site {site.site_id!r}: opening_hours: {exc.problem}"
            ) from None


def _format_of(path: Path | None, given: str | None) -> FileFormat:
    name = (given or (path.suffix.lstrip(".") if path is not None else "") or "csv").lower()
    if name == "json":
        name = "geojson"
    if name not in ("csv", "geojson"):
        raise SiteFileError(str(path or "-"), None, f"unknown format {name!r} (csv or geojson)")
    return "csv" if name == "csv" else "geojson"


def _store(state: CliState, sites: list[Site], *, update: bool, action: str) -> ImportResult:
    operator = required_operator(state, "changing sites")
    with registry_of(state) as registry:
        return registry.store_sites(sites, operator=operator, update=update, action=action)


def _report(state: CliState, result: ImportResult) -> None:
    for verb, ids in (
        ("added", result.added),
        ("updated", result.updated),
        ("unchanged", result.unchanged),
    ):
        if ids:
            shown = ", ".join(ids[:10]) + (f", ... ({len(ids) - 10} more)" if len(ids) > 10 else "")
            state.console.print(f"  {verb} {len(ids)}: {shown}", highlight=False, soft_wrap=True)
    if not (result.added or result.updated or result.unchanged):
        state.console.print("  no sites in the file", highlight=False)


@app.command()
def add(
    ctx: typer.Context,
    site_id: Annotated[str, typer.Argument(help="New site id (a-z, 0-9, -).")],
    name: Annotated[str, typer.Option(help="Name in Vietnamese, as citizens know it.")],
    kind: Annotated[str, typer.Option(help=f"One of: {', '.join(SITE_KINDS)}.")],
    ward: Annotated[
        str,
        typer.Option(
            help="Current ward or commune (phường/xã): name ('Hoàn Kiếm', 'Xã Sóc Sơn') or code."
        ),
    ],
    latitude: Annotated[float, typer.Option(help="WGS84 degrees north (Hanoi: 20.5-21.4).")],
    longitude: Annotated[float, typer.Option(help="WGS84 degrees east (Hanoi: 105.2-106.1).")],
    former_district: Annotated[
        str, typer.Option(help="District before 1 July 2025, for history ('Ba Đình').")
    ] = "",
    address: Annotated[str, typer.Option(help="Street address in Vietnamese.")] = "",
    opening_hours: Annotated[
        str,
        typer.Option(
            help="'24/7' or rules such as 'Mon-Fri 08:00-12:00,13:00-17:00; Sat 08:00-12:00'."
        ),
    ] = "24/7",
) -> None:
    """Register a site in its current ward or commune; the audit log records who did."""
    state = state_of(ctx)
    with reported_errors(state):
        site = site_from_fields(
            {
                "site_id": site_id,
                "name": name,
                "kind": kind,
                "ward": ward,
                "former_district": former_district,
                "address": address,
                "latitude": latitude,
                "longitude": longitude,
                "opening_hours": opening_hours,
            },
            source="cityhub sites add",
            row=None,
        )
        _check_hours([site], "cityhub sites add")
        result = _store(state, [site], update=False, action="site.add")
    if result.unchanged:
        state.console.print(f"site {site_id} is already registered with these values")
        return
    state.console.print(
        f"  added site {site_id} in {site.ward} ({site.unit_code})", highlight=False
    )


def _table(rows: list[SiteRow], title: str) -> Table:
    table = Table(title=title)
    for column in (
        "site",
        "tên / name",
        "loại / kind",
        "phường/xã (ward/commune)",
        "quận cũ (former district)",
        "gateways",
        "devices",
    ):
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(
            r.site.site_id,
            r.site.name,
            r.site.kind,
            r.ward or "(chưa gán / unassigned)",
            r.site.former_district or "",
            str(r.gateways),
            str(r.devices),
        )
    return table


def _row_json(row: SiteRow) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(row.site)
    out.update(
        ward=row.ward,
        gateways=row.gateways,
        devices=row.devices,
        created_at=row.created_at.isoformat(),
        updated_at=row.updated_at.isoformat(),
    )
    return out


@app.command(name="list")
def list_(
    ctx: typer.Context,
    ward: Annotated[str | None, typer.Option(help="Only sites in this ward/commune.")] = None,
    kind: Annotated[str | None, typer.Option(help=f"Only {', '.join(SITE_KINDS)}.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List sites by ward/commune, with their numbers of gateways and active devices."""
    state = state_of(ctx)
    with reported_errors(state):
        unit = find_unit(ward).code if ward is not None else None
        if kind is not None and kind not in SITE_KINDS:
            raise SiteFileError("--kind", None, f"{kind!r} is not one of {', '.join(SITE_KINDS)}")
        with registry_of(state) as registry:
            rows = registry.site_rows(unit_code=unit, kind=kind)
    if as_json:
        state.console.print_json(msgspec.json.encode([_row_json(r) for r in rows]).decode())
        return
    state.console.print(_table(rows, count_noun(len(rows), "site", "sites")))


@app.command()
def show(
    ctx: typer.Context,
    site_id: Annotated[str, typer.Argument(help="Site id.")],
    as_json: JsonOption = False,
) -> None:
    """Show one site: its place, address, opening hours and what is installed there."""
    state = state_of(ctx)
    with reported_errors(state), registry_of(state) as registry:
        rows = registry.site_rows(site_id=site_id)
        if not rows:
            raise NotFoundError(f"site {site_id!r} is not registered (`cityhub sites list`)")
    row = rows[0]
    if as_json:
        state.console.print_json(msgspec.json.encode(_row_json(row)).decode())
        return
    site = row.site
    table = Table(title=f"site {site.site_id}", show_header=False)
    table.add_column("field")
    table.add_column("value", overflow="fold")
    for label, value in (
        ("tên / name", site.name),
        ("loại / kind", site.kind),
        ("phường/xã (ward/commune)", f"{row.ward} ({site.unit_code})" if row.ward else "-"),
        ("quận cũ (former district)", site.former_district or "-"),
        ("địa chỉ / address", site.address or "-"),
        ("toạ độ / coordinates", f"{site.latitude}, {site.longitude}"),
        ("giờ mở cửa / opening hours", site.opening_hours),
        ("gateways / devices", f"{row.gateways} / {row.devices}"),
        ("cập nhật / updated", local_time(row.updated_at)),
    ):
        table.add_row(label, value)
    state.console.print(table)


@app.command(name="import")
def import_(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="CSV or GeoJSON file ('-' for standard input).")],
    file_format: FormatOption = None,
    update: Annotated[
        bool,
        typer.Option("--update", help="Change sites already registered with other values."),
    ] = False,
) -> None:
    """Add the sites of a CSV or GeoJSON file (the columns `export` writes), all or none.

    A site already registered with the same values is left alone; with other
    values it is refused unless --update. Each site added or changed gets an
    audit row.
    """
    state = state_of(ctx)
    with reported_errors(state):
        source = "<stdin>" if str(path) == "-" else str(path)
        fmt = _format_of(None if source == "<stdin>" else path, file_format)
        text = _read_text(path, source)
        sites = read_csv(text, source=source) if fmt == "csv" else read_geojson(text, source=source)
        _check_hours(sites, source)
        result = _store(state, sites, update=update, action="site.import")
    _report(state, result)


def _read_text(path: Path, source: str) -> str:
    """A file's text, refused unread when too big, and refused when not UTF-8."""
    try:
        if source == "<stdin>":
            data = sys.stdin.buffer.read(MAX_FILE_BYTES + 1)
        else:
            with path.open("rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise SiteFileError(source, None, f"cannot be read: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise SiteFileError(source, None, f"larger than {MAX_FILE_BYTES // 2**20} MiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SiteFileError(
            source, None, f"not UTF-8 (byte {exc.start}): save it as UTF-8"
        ) from None


@app.command()
def export(
    ctx: typer.Context,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="File to write (default: standard output)."),
    ] = None,
    file_format: FormatOption = None,
) -> None:
    """Write every site as CSV or GeoJSON, in the form `import` reads back."""
    state = state_of(ctx)
    with reported_errors(state):
        fmt = _format_of(output, file_format)
        with registry_of(state) as registry:
            sites = [r.site for r in registry.site_rows()]
        text = write_csv(sites) if fmt == "csv" else write_geojson(sites) + "\n"
        if output is None:
            sys.stdout.write(text)
            sys.stdout.flush()
            return
        try:
            output.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise SiteFileError(str(output), None, f"cannot be written: {exc.strerror}") from None
    state.err.print(f"wrote {count_noun(len(sites), 'site', 'sites')} to {output}", highlight=False)


@app.command()
def units(
    ctx: typer.Context,
    kind: Annotated[
        str | None, typer.Option(help="Only 'ward' (phường) or 'commune' (xã).")
    ] = None,
    search: Annotated[
        str | None, typer.Option(help="Only names containing this (diacritics optional).")
    ] = None,
) -> None:
    """List Hanoi's 126 wards and communes since 1 July 2025, with their codes."""
    state = state_of(ctx)
    if kind not in (None, "ward", "commune"):
        state.err.print(f"[red]error:[/red] --kind {kind!r} is not 'ward' or 'commune'")
        raise typer.Exit(1)
    key = fold(search) if search else ""
    shown = [
        u for u in UNITS if (kind is None or u.kind == kind) and (not key or key in fold(u.name))
    ]
    table = Table(title=f"{len(shown)} of Hanoi's {len(UNITS)} wards and communes (phường/xã)")
    for column in ("code", "tên / name", "loại / kind"):
        table.add_column(column)
    for u in sorted(shown, key=lambda u: fold(u.short_name)):
        table.add_row(u.code, u.name, f"{u.kind_vi} / {u.kind}")
    state.console.print(table)
