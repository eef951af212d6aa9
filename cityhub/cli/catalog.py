"""`cityhub catalog`: list, show and check the device catalog and its models; uplink schemas.

The catalog is the shipped one (contracts/data/catalog.toml) plus the files
of the ``catalog.paths`` setting. These commands read those files themselves
(the root callback leaves them to it), so that a refused file is reported
here as a one-line error with exit status 1 rather than stopping start-up.
Loading and checking are ``contracts.catalog``'s; the schemas are
``contracts.uplinkschema``'s, and ``schemas`` writes them as the files of
docs/schemas/ (or, with ``--check``, says which are not current).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cityhub.cli.context import CliState, reported_errors, state_of
from contracts.catalog import (
    ArgKind,
    Catalog,
    CommandArg,
    DeviceType,
    describe_changes,
    read_catalog,
)
from contracts.errors import UnknownDeviceTypeError
from contracts.uplinkschema import SCHEMA_DIR, schema_files, uplink_json_schema
from contracts.wording import count_noun

app = typer.Typer(
    # Help is printed as written: ids, patterns and TOML sections have [ ] in them.
    rich_markup_mode=None,
    help=(
        "The device catalog (device types, metrics, units, valid ranges): list, show, "
        "check operators' files, print a type's uplink JSON Schema."
    ),
    no_args_is_help=True,
)


def _configured(state: CliState) -> Catalog:
    """The shipped catalog plus the files of ``catalog.paths``."""
    return read_catalog(state.settings.catalog.path_list)


def _type_of(catalog: Catalog, name: str) -> DeviceType:
    try:
        return catalog.types[name]
    except KeyError:
        known = ", ".join(sorted(catalog.types))
        raise UnknownDeviceTypeError(f"unknown device type {name!r} (known: {known})") from None


def _number(value: float) -> str:
    """A range bound as written in the catalog: 315360000, not 3.1536e+08."""
    return str(int(value)) if value == int(value) else f"{value:g}"


@app.command(name="list")
def list_types(ctx: typer.Context) -> None:
    """List the device types: metrics, transports, serial protocols, description."""
    state = state_of(ctx)
    with reported_errors(state):
        catalog = _configured(state)
    table = Table(title=f"Device types ({len(catalog.types)})")
    table.add_column("type", no_wrap=True)
    for column in ("metrics", "transports", "serial protocols", "description"):
        table.add_column(column)
    for dtype in catalog.types.values():
        table.add_row(
            dtype.name,
            str(len(dtype.metrics)),
            ", ".join(dtype.transports),
            ", ".join(dtype.serial_protocols),
            dtype.description,
        )
    state.console.print(table)
    state.console.print(f"sources: {', '.join(catalog.sources)}", highlight=False)


@app.command()
def show(
    ctx: typer.Context,
    device_type: Annotated[str, typer.Argument(help="Device type, e.g. air_quality.")],
) -> None:
    """Show a device type's metrics (unit, kind, range, labels) and the commands it accepts."""
    state = state_of(ctx)
    with reported_errors(state):
        dtype = _type_of(_configured(state), device_type)
    title = f"{dtype.name}: {dtype.description}"
    caption = (
        f"transports: {', '.join(dtype.transports)}; offline after"
        f" {_number(dtype.offline_after_s)} s without a reading"
    )
    table = Table(title=title, caption=caption)
    table.add_column("metric", no_wrap=True)
    for column in ("unit", "kind", "min", "max", "description"):
        table.add_column(column)
    for m in dtype.metrics:
        description = m.description
        if m.labels:
            codes = ", ".join(f"{code}={label}" for code, label in enumerate(m.labels))
            description += f" ({codes})"
        table.add_row(m.name, m.unit, m.kind.value, _number(m.min), _number(m.max), description)
    state.console.print(table)
    if not dtype.commands:
        state.console.print(f"{dtype.name}: no commands", highlight=False)
        return
    commands = Table(title=f"{dtype.name}: commands ({len(dtype.commands)})")
    commands.add_column("command", no_wrap=True)
    for column in ("args", "timeout", "serial protocols", "description"):
        commands.add_column(column)
    for c in dtype.commands:
        commands.add_row(
            c.name,
            "\n".join(_describe_arg(a) for a in c.args) or "-",
            f"{_number(c.timeout_s)} s",
            ", ".join(c.protocols) or ("- (MQTT only)" if dtype.serial_protocols else "-"),
            c.description,
        )
    state.console.print(commands)


@app.command()
def models(ctx: typer.Context) -> None:
    """List the Modbus and LoRaWAN device models: type, what they speak, where they come from.

    A Modbus model is a register map (line settings, poll interval, the
    commands its writable registers carry); a LoRaWAN model a payload codec
    (cayenne_lpp: the raw payload decoded here; object: ChirpStack's decoded
    object). `cityhub devices add --model NAME` names one of its type.
    """
    state = state_of(ctx)
    with reported_errors(state):
        catalog = _configured(state)
    table = Table(title=f"Modbus models ({len(catalog.modbus_models)})")
    for column in ("model", "type", "line", "poll", "registers", "commands"):
        table.add_column(column, overflow="fold", no_wrap=column == "model")
    for m in catalog.modbus_models.values():
        table.add_row(
            m.name,
            m.device_type,
            f"{m.baudrate} 8{m.parity}{m.stopbits}",
            f"{_number(m.poll_interval_s)} s",
            str(len(m.registers)),
            ", ".join(m.commands) or "-",
        )
    state.console.print(table)
    for m in catalog.modbus_models.values():
        state.console.print(f"  {m.name}: {m.source or '-'}", highlight=False, soft_wrap=True)
    table = Table(title=f"LoRaWAN models ({len(catalog.lorawan_models)})")
    for column in ("model", "type", "codec", "metrics", "description"):
        table.add_column(column, overflow="fold", no_wrap=column == "model")
    for p in catalog.lorawan_models.values():
        table.add_row(
            p.name, p.device_type, p.codec, ", ".join(f.metric for f in p.fields), p.description
        )
    state.console.print(table)
    for p in catalog.lorawan_models.values():
        state.console.print(f"  {p.name}: {p.source or '-'}", highlight=False, soft_wrap=True)


def _describe_arg(arg: CommandArg) -> str:
    """An arg in a cell: ``interval_s: int 10..200``, ``mode: enum active|query``."""
    if arg.kind in {ArgKind.INT, ArgKind.FLOAT} and arg.min is not None and arg.max is not None:
        bounds = f" {_number(arg.min)}..{_number(arg.max)}"
    elif arg.kind is ArgKind.ENUM:
        bounds = f" {'|'.join(arg.labels)}"
    elif arg.kind is ArgKind.STRING:
        bounds = f" <={arg.max_length} chars"
    else:
        bounds = ""
    if isinstance(arg.default, bool):
        tail = f", default {str(arg.default).lower()}"
    elif arg.default is not None:
        tail = f", default {arg.default}"
    elif not arg.required:
        tail = ", optional"
    else:
        tail = ""
    return f"{arg.name}: {arg.kind.value}{bounds}{tail}"


@app.command()
def check(
    ctx: typer.Context,
    file: Annotated[
        Path | None,
        typer.Argument(help="A catalog file (TOML) to check on top of the configured ones."),
    ] = None,
) -> None:
    """Check the shipped catalog, the configured files and FILE; print what FILE adds.

    Exit status 0 when everything is accepted, 1 with a one-line reason
    (file, type, key) when something is refused.
    """
    state = state_of(ctx)
    with reported_errors(state):
        configured = _configured(state)
        catalog = read_catalog([file], base=configured) if file is not None else configured
    if file is None:
        state.console.print(
            f"ok: {count_noun(len(catalog.types), 'device type', 'device types')}"
            f" from {', '.join(catalog.sources)}",
            highlight=False,
        )
        return
    changes = describe_changes(configured, catalog)
    counted = (
        count_noun(len(changes), "addition or change", "additions or changes")
        if changes
        else "no additions or changes"
    )
    state.console.print(f"ok: {file}: {counted}", highlight=False)
    for line in changes:
        state.console.print(f"  {line}", highlight=False)


@app.command()
def schema(
    ctx: typer.Context,
    device_type: Annotated[str, typer.Argument(help="Device type, e.g. air_quality.")],
) -> None:
    """Print the JSON Schema (draft 2020-12) of the type's uplink on d/{device}/up."""
    state = state_of(ctx)
    with reported_errors(state):
        dtype = _type_of(_configured(state), device_type)
    typer.echo(json.dumps(uplink_json_schema(dtype), indent=2, ensure_ascii=False))


@app.command()
def schemas(
    ctx: typer.Context,
    directory: Annotated[
        Path, typer.Option("--dir", help="Where to write them.", file_okay=False)
    ] = SCHEMA_DIR,
    check: Annotated[
        bool, typer.Option("--check", help="Write nothing; exit 1 if a file is not current.")
    ] = False,
) -> None:
    """Write every type's uplink JSON Schema into a directory (docs/schemas/ by default).

    Ghi JSON Schema của bản tin mỗi loại thiết bị vào thư mục (mặc định docs/schemas/).
    """
    state = state_of(ctx)
    with reported_errors(state):
        _configured(state)  # a refused operator file is reported, not written out
    wanted = schema_files()
    present = {p.name for p in directory.glob("*.schema.json")} if directory.is_dir() else set()
    stale = sorted(
        name
        for name, text in wanted.items()
        if not (directory / name).is_file() or (directory / name).read_text("utf-8") != text
    )
    extra = sorted(present - set(wanted))
    if check:
        for name in [*stale, *extra]:
            state.console.print(f"{directory / name}: not current", highlight=False)
        if stale or extra:
            raise typer.Exit(1)
        state.console.print(
            f"ok: {directory}: {count_noun(len(wanted), 'schema', 'schemas')} current",
            highlight=False,
        )
        return
    directory.mkdir(parents=True, exist_ok=True)
    for name in stale:
        (directory / name).write_text(wanted[name], "utf-8")
    for name in extra:
        (directory / name).unlink()
    state.console.print(
        f"{directory}: {len(stale)} written, {len(extra)} removed, {len(wanted)} in all",
        highlight=False,
    )
