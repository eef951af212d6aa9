"""`cityhub devices`: register, list, show, move, replace, revoke and re-key devices.

Each changing command says what it changed, writes an audit row with the
operator's name and a config bundle (JSON and a QR code PNG, mode 0600):
an MQTT device's holds its broker account, an HTTP device's its token.
Mistakes are reported in one line and change nothing. The provisioning work
itself is ``devices.provisioning``; this module connects the database and
the brokers (the embedded ones unless settings name others).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Final

import msgspec
import typer
from rich.table import Table

from cityhub.cli.context import (
    TIME_ZONE_NOTE,
    CliState,
    local_time,
    reported_errors,
    required_operator,
    state_of,
)
from cityhub.cli.db import database_url
from cityhub.cli.gateway import embedded_broker
from contracts.errors import ConflictError, NotFoundError, SettingsError
from contracts.ids import ID_PATTERN
from contracts.wording import count_noun

if TYPE_CHECKING:
    from cityhub.cli.presence import DevicePresence
    from devices.provisioning import Outcome, Provisioner
    from devices.registry import DeviceRow, Registry

app = typer.Typer(
    # Help is printed as written: ids, patterns and TOML sections have [ ] in them.
    rich_markup_mode=None,
    help="Register and manage devices: credentials, config bundles, QR codes.",
    no_args_is_help=True,
)


# `devices show` lists the reject reasons of this many days, at most this many.
REJECTS_SHOWN_DAYS: Final = 7
REJECTS_SHOWN_MAX: Final = 10


class RejectSummary(msgspec.Struct, frozen=True, kw_only=True):
    """One reject reason of a device over the last REJECTS_SHOWN_DAYS days."""

    reason: str
    count: int
    last_seen: datetime
    gateways: str  # the gateways (or ingest) that refused, comma-separated
    detail: str  # the newest row's


def recent_rejects(registry: Registry, device_id: str) -> list[RejectSummary]:
    """A device's reject reasons, newest first: what its gateway and ingest refused.

    A gateway's report row counts many rejects (``count``, up to ``last_at``);
    ingest's own rows count one each, at ``received_at``.
    """
    from adapters.database import database_errors

    with database_errors("rejects", schema=registry.schema), registry.conn.cursor() as cur:
        cur.execute(
            f"""SELECT reason, sum(count)::bigint,
                    max(coalesce(last_at, received_at)) AS last_seen,
                    string_agg(DISTINCT coalesce(gateway_id, '-'), ','),
                    (array_agg(detail ORDER BY received_at DESC))[1]
                FROM {registry.schema}.rejects
                WHERE device_id = %s AND received_at > now() - make_interval(days => %s)
                GROUP BY reason ORDER BY last_seen DESC, reason LIMIT %s""",
            (device_id, REJECTS_SHOWN_DAYS, REJECTS_SHOWN_MAX),
        )
        rows = cur.fetchall()
    return [
        RejectSummary(reason=r[0], count=r[1], last_seen=r[2], gateways=r[3], detail=r[4])
        for r in rows
    ]


def rejects_table(rejects: list[RejectSummary]) -> Table:
    """Vietnamese labels first, English after, times in Hanoi's (the boards' convention)."""
    table = Table(
        title=f"Lỗi bị từ chối gần đây / recent rejects ({REJECTS_SHOWN_DAYS} ngày / days)"
    )
    for column, justify in (
        ("lý do / reason", "left"),
        ("số lần / count", "right"),
        (f"lần cuối / last seen ({TIME_ZONE_NOTE})", "left"),
        ("nơi từ chối / refused by", "left"),
        ("chi tiết / detail", "left"),
    ):
        table.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for r in rejects:
        table.add_row(
            r.reason,
            str(r.count),
            local_time(r.last_seen),
            r.gateways,
            r.detail,
        )
    return table


def bundle_dir(state: CliState) -> Path:
    configured = state.settings.provisioning.bundle_dir
    return Path(configured).expanduser() if configured else state.state_dir / "bundles"


def pki_dir(state: CliState) -> Path:
    configured = state.settings.provisioning.pki_dir
    return Path(configured).expanduser() if configured else state.state_dir / "pki"


@contextmanager
def registry_of(state: CliState) -> Iterator[Registry]:
    # Imported here: psycopg is installed with the central extra, not with the gateway one.
    from cityhub import database
    from devices.registry import Registry

    settings = state.settings
    url = database_url(state)
    with database.connect(
        url, timeout_s=settings.database.connect_timeout_s, os_user=state.os_user
    ) as conn:
        yield Registry(conn, schema=settings.database.schema)


@contextmanager
def provisioner(state: CliState) -> Iterator[Provisioner]:
    """The registry and both brokers' control connections (one if they are the same broker)."""
    from devices.brokerctl import BrokerControl
    from devices.pki import Pki
    from devices.provisioning import Endpoint, Provisioner

    settings = state.settings
    prov = settings.provisioning
    operator = required_operator(state, "provisioning")
    central = embedded_broker(state, settings.broker)
    site = embedded_broker(state, prov.site_broker)
    central_endpoint = Endpoint(
        host=prov.central_public_host or central.host or "127.0.0.1",
        port=prov.central_tls_port or prov.central_public_port or central.port,
        tls=prov.central_tls_port > 0,
    )
    site_endpoint = Endpoint(
        host=prov.site_public_host or site.host or "127.0.0.1",
        port=prov.site_public_port or site.port,
        tls=site.tls,
    )
    with registry_of(state) as registry, ExitStack() as stack:
        central_ctl = stack.enter_context(
            BrokerControl(name="central", broker=central, timeout_s=prov.control_timeout_s)
        )
        if (site.host, site.port) == (central.host, central.port):
            site_ctl = central_ctl
        else:
            site_ctl = stack.enter_context(
                BrokerControl(name="site", broker=site, timeout_s=prov.control_timeout_s)
            )
        yield Provisioner(
            registry=registry,
            operator=operator,
            central=central_ctl,
            site=site_ctl,
            central_endpoint=central_endpoint,
            site_endpoint=site_endpoint,
            bundle_dir=bundle_dir(state),
            pki=Pki(pki_dir(state)),
            prefix=prov.topic_prefix,
            gateway_http_url=prov.gateway_http_url,
        )


def show_outcome(state: CliState, outcome: Outcome, *, qr: bool) -> None:
    from devices.bundlefiles import qr_terminal

    for line in outcome.changes:
        state.console.print(f"  {line}", highlight=False, soft_wrap=True)
    if outcome.files is not None:
        state.console.print(f"  QR code (mode 0600): {outcome.files.png}", highlight=False)
        if outcome.files.settings is not None:
            state.console.print(
                f"  gateway settings (mode 0600): {outcome.files.settings}", highlight=False
            )
    if qr and outcome.bundle is not None:
        state.console.print(
            qr_terminal(outcome.bundle, columns=state.console.width),
            highlight=False,
            markup=False,
            soft_wrap=True,
        )


QrOption = Annotated[
    bool, typer.Option("--qr", help="Also draw the bundle's QR code in the terminal.")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@app.command()
def add(
    ctx: typer.Context,
    device_id: Annotated[str, typer.Argument(help=f"New device id, {ID_PATTERN} (a-z, 0-9, -).")],
    device_type: Annotated[
        str, typer.Option("--type", help="Device type: air_quality, kiosk, camera_counter, ...")
    ],
    site: Annotated[str, typer.Option(help="Site id the device is installed at.")],
    gateway: Annotated[str, typer.Option(help="Gateway id that serves it (at that site).")],
    transport: Annotated[
        str,
        typer.Option(
            help="mqtt (the device connects to the site broker), serial (a sensor on the"
            " gateway's serial port), modbus (a slave on an RS-485 bus the gateway polls),"
            " lorawan (through a ChirpStack network server) or http (the device posts"
            " to the gateway)."
        ),
    ] = "mqtt",
    port: Annotated[
        str | None,
        typer.Option(
            help="Serial and Modbus: /dev/ttyUSB0, socket://host:port or rfc2217://... A"
            " serial sensor has its port to itself; Modbus devices may share a bus (each"
            " with its own --slave-id, all at their models' line settings)."
        ),
    ] = None,
    protocol: Annotated[
        str | None, typer.Option(help="Serial only: frame protocol, pms5003 or sds011.")
    ] = None,
    slave_id: Annotated[
        int | None,
        typer.Option(help="Modbus only: the device's address on its bus, 1-247."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Modbus and LoRaWAN: the catalog model (its register map or payload codec),"
            " one of its type's; `cityhub catalog models` lists them."
        ),
    ] = None,
    poll_interval: Annotated[
        float | None,
        typer.Option(
            "--poll-interval",
            help="Modbus only: seconds between polls (default: the model's).",
        ),
    ] = None,
    dev_eui: Annotated[
        str | None,
        typer.Option(
            help="LoRaWAN only: the device's DevEUI, 16 hex digits (as registered in"
            " ChirpStack; separators and case do not matter)."
        ),
    ] = None,
    label: Annotated[str, typer.Option(help="Free text shown on boards.")] = "",
    location: Annotated[str, typer.Option(help="Where it is mounted (floor, counter).")] = "",
    hardware_id: Annotated[str, typer.Option(help="Serial number of the hardware.")] = "",
    qr: QrOption = False,
) -> None:
    """Register a device at a site and gateway; create its credential and bundle.

    An MQTT device gets an account on the site broker that may publish only
    under d/{its id}/; an HTTP device a bearer token and the gateway's URL
    (in its bundle only); a serial, Modbus or LoRaWAN device no credential
    (the LoRaWAN keys stay in ChirpStack). The gateway receives its new
    device list as its retained config and applies it live. A port, slave
    id or DevEUI another device of the gateway holds is refused, naming it.
    """
    state = state_of(ctx)
    with reported_errors(state), provisioner(state) as p:
        outcome = p.add_device(
            device_id,
            device_type=device_type,
            site_id=site,
            gateway_id=gateway,
            transport=transport,
            port=port,
            protocol=protocol,
            label=label,
            location=location,
            hardware_id=hardware_id,
            model=model,
            slave_id=slave_id,
            poll_interval_s=poll_interval,
            dev_eui=dev_eui,
        )
    show_outcome(state, outcome, qr=qr)


# What a device or gateway's status filter may say (the registry's CHECK).
STATUSES: Final = ("active", "revoked")
NEVER: Final = "chưa bao giờ / never"


def hanoi_time(ts: datetime | None) -> str:
    """A time as printed by the command line: Hanoi's wall clock, zone shown."""
    if ts is None:
        return NEVER
    return local_time(ts)


def online_label(online: bool) -> str:
    return "trực tuyến / online" if online else "ngoại tuyến / offline"


# The readings a gateway's outbox refused and dropped while full: totals
# since its outbox file was created, as its latest state said.
OUTBOX_LOST_COLUMN: Final = "từ chối / bỏ khi đầy (outbox refused / dropped)"


def outbox_lost(refused: int | None, dropped: int | None) -> str:
    """The readings a gateway's full outbox refused and dropped, as one cell ("-": no state)."""
    return "-" if refused is None or dropped is None else f"{refused:,} / {dropped:,}"


def check_choice(option: str, value: str | None, valid: Iterable[str]) -> None:
    """An unknown filter value is a mistake to report, not an empty result."""
    choices = sorted(valid)
    if value is not None and value not in choices:
        raise SettingsError(option, f"{value!r} is not one of {', '.join(choices)}")


def new_table(title: str, columns: Iterable[str]) -> Table:
    """A list table whose cells fold rather than lose characters: ids are never cut."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def print_table(state: CliState, table: Table, *, wide: bool) -> None:
    """``wide``: the table at its natural width, each id on one line, wider than the terminal."""
    if not wide:
        state.console.print(table)
        return
    from rich.console import Console
    from rich.measure import Measurement

    # Wide enough for any row of ours; rich measures the table's natural width in it.
    roomy = Console(width=100_000)
    natural = Measurement.get(roomy, roomy.options, table).maximum
    Console(width=max(natural, state.console.width), no_color=state.console.no_color).print(table)


def _device_table(
    rows: list[DeviceRow], presence: Mapping[str, DevicePresence], title: str
) -> Table:
    table = new_table(
        title,
        (
            "thiết bị / device",
            "loại / type",
            "điểm / site",
            "gateway",
            "transport",
            "cổng / port",
            "nhãn / label",
            "vị trí / location",
            "trạng thái / status",
            "kết nối / online",
            "lần cuối (giờ Hà Nội) / last seen",
        ),
    )
    for r in rows:
        status = r.status if r.enabled or r.status != "active" else "disabled"
        seen = presence.get(r.device_id)
        table.add_row(
            r.device_id,
            r.device_type,
            r.site_id,
            r.gateway_id or "-",
            r.transport,
            reached(r),
            r.label,
            r.location,
            status,
            online_label(seen is not None and seen.online),
            hanoi_time(seen.last_seen if seen else None),
        )
    return table


def reached(row: DeviceRow) -> str:
    """Where its gateway reaches a device: a port, a bus and slave, a DevEUI (never a token)."""
    if row.transport == "modbus":
        return f"{row.port} #{row.slave_id} ({row.model})"
    if row.transport == "lorawan":
        return f"{row.dev_eui} ({row.model})"
    return row.port or "-"


def transport_lines(row: DeviceRow, gateway_http_url: str) -> list[str]:
    """What `devices show` says of a Modbus, LoRaWAN or HTTP device beyond the table."""
    from contracts.catalog import current_catalog
    from devices.bundle import http_readings_url

    if row.transport == "modbus":
        model = current_catalog().modbus_models.get(str(row.model))
        if model is None:  # a model the installed catalog lost since
            return [f"Modbus: bus {row.port}, slave {row.slave_id}, model {row.model} (unknown)"]
        every = row.poll_interval_s or model.poll_interval_s
        whose = "" if row.poll_interval_s else " (the model's)"
        line = f"{model.baudrate} baud 8{model.parity}{model.stopbits}"
        text = (
            f"Modbus: bus {row.port} at {line}, slave {row.slave_id}, model {row.model},"
            f" polled every {every:g} s{whose}"
        )
        return [text]
    if row.transport == "lorawan":
        return [f"LoRaWAN: DevEUI {row.dev_eui}, model {row.model} (keys in ChirpStack)"]
    if row.transport == "http" and row.gateway_id is not None:
        url = http_readings_url(gateway_http_url, row.gateway_id, row.device_id)
        return [f"HTTP: posts to {url} with the bearer token of its bundle"]
    return []


def device_documents(
    rows: list[DeviceRow], presence: Mapping[str, DevicePresence]
) -> list[dict[str, object]]:
    """The rows as JSON objects with their ``online`` and ``last_seen`` (UTC, ISO 8601)."""
    documents: list[dict[str, object]] = []
    for r in rows:
        seen = presence.get(r.device_id)
        document: dict[str, object] = msgspec.to_builtins(r)
        # Not a secret, but nothing a person needs, and a token's only trace.
        document.pop("token_sha256", None)
        document["online"] = seen is not None and seen.online
        document["last_seen"] = seen.last_seen.isoformat() if seen and seen.last_seen else None
        documents.append(document)
    return documents


WideOption = Annotated[
    bool,
    typer.Option(
        "--wide", help="Print the table at its full width, each id on one line (may overflow)."
    ),
]


@app.command(name="list")
def list_(
    ctx: typer.Context,
    site: Annotated[str | None, typer.Option(help="Only this site.")] = None,
    gateway: Annotated[str | None, typer.Option(help="Only this gateway.")] = None,
    device_type: Annotated[
        str | None, typer.Option("--type", help="Only this type (one of the catalog's).")
    ] = None,
    status: Annotated[
        str | None, typer.Option(help="Only devices in this status: active or revoked.")
    ] = None,
    as_json: JsonOption = False,
    wide: WideOption = False,
) -> None:
    """List devices with whether each is online and when last seen (never their credentials).

    Online: seen within its type's offline_after_s (the catalog's). Last
    seen is Hanoi time (Asia/Ho_Chi_Minh) in the table, UTC in --json. An
    unknown --type or --status is an error naming the valid values.
    """
    from cityhub.cli.presence import device_presence, device_type_names

    state = state_of(ctx)
    with reported_errors(state), registry_of(state) as registry:
        check_choice("--status", status, STATUSES)
        if device_type is not None:
            check_choice("--type", device_type, device_type_names(registry.conn, registry.schema))
        rows = registry.devices(
            site_id=site, gateway_id=gateway, device_type=device_type, status=status
        )
        presence = device_presence(registry.conn, registry.schema)
    if as_json:
        state.console.print_json(msgspec.json.encode(device_documents(rows, presence)).decode())
        return
    print_table(
        state, _device_table(rows, presence, count_noun(len(rows), "device", "devices")), wide=wide
    )


@app.command()
def show(
    ctx: typer.Context,
    device_id: Annotated[str, typer.Argument(help="Device id.")],
    as_json: JsonOption = False,
) -> None:
    """Show one device, its broker accounts, recent audit entries and recent reject reasons.

    Rejects are what its gateway (malformed uplinks, out-of-range values,
    messages over the limits) and ingest refused over the last 7 days, by
    reason: how many, when last (Hanoi time) and the newest detail.
    """
    from cityhub.cli.presence import device_presence

    state = state_of(ctx)
    with reported_errors(state), registry_of(state) as registry:
        rows = registry.devices(device_id=device_id)
        if not rows:
            raise NotFoundError(f"device {device_id!r} is not registered")
        accounts = registry.credentials(device_id)
        audit = registry.audit_entries(subject_id=device_id, limit=10)
        rejects = recent_rejects(registry, device_id)
        presence = device_presence(registry.conn, registry.schema)
    if as_json:
        document = {
            "device": device_documents(rows, presence)[0],
            "credentials": accounts,
            "audit": audit,
            "rejects": rejects,
        }
        state.console.print_json(msgspec.json.encode(document).decode())
        return
    state.console.print(_device_table(rows, presence, f"device {device_id}"))
    for line in transport_lines(rows[0], state.settings.provisioning.gateway_http_url):
        state.console.print(f"  {line}", highlight=False, soft_wrap=True)
    for a in accounts:
        rotated = local_time(a.rotated_at) if a.rotated_at else "never"
        state.console.print(
            f"  {a.broker} broker account {a.username}: {a.status}, rotated {rotated}",
            highlight=False,
        )
    for e in audit:
        state.console.print(
            f"  {local_time(e.ts)}  {e.action:<16} by {e.operator}",
            highlight=False,
        )
    if rejects:
        state.console.print(rejects_table(rejects))
    else:
        state.console.print(
            f"  không có lỗi bị từ chối trong {REJECTS_SHOWN_DAYS} ngày qua / "
            f"no rejects in the last {REJECTS_SHOWN_DAYS} days",
            highlight=False,
        )


@app.command()
def move(
    ctx: typer.Context,
    device_id: Annotated[str, typer.Argument(help="Device id.")],
    gateway: Annotated[str, typer.Option(help="The gateway that serves it from now on.")],
    site: Annotated[
        str | None, typer.Option(help="The new site (default: the gateway's site).")
    ] = None,
) -> None:
    """Move a device to another gateway (and so, maybe, another site); both gateways are told."""
    state = state_of(ctx)
    with reported_errors(state), provisioner(state) as p:
        outcome = p.move_device(device_id, gateway_id=gateway, site_id=site)
    show_outcome(state, outcome, qr=False)


@app.command()
def replace(
    ctx: typer.Context,
    device_id: Annotated[str, typer.Argument(help="Device id (kept).")],
    hardware_id: Annotated[str, typer.Option(help="Serial number of the new hardware.")],
    port: Annotated[
        str | None,
        typer.Option(help="Serial and Modbus: the new hardware's port, if it changed."),
    ] = None,
    dev_eui: Annotated[
        str | None,
        typer.Option(help="LoRaWAN: the new hardware's DevEUI (register it in ChirpStack too)."),
    ] = None,
    qr: QrOption = False,
) -> None:
    """New hardware for a device: id, readings history and settings stay.

    An MQTT device's old secret and an HTTP device's old token stop working
    (the new ones are in the new bundle).
    """
    state = state_of(ctx)
    with reported_errors(state), provisioner(state) as p:
        outcome = p.replace_device(device_id, hardware_id=hardware_id, port=port, dev_eui=dev_eui)
    show_outcome(state, outcome, qr=qr)


@app.command()
def revoke(
    ctx: typer.Context, device_id: Annotated[str, typer.Argument(help="Device id.")]
) -> None:
    """Revoke a device for good: account deleted (sessions cut), gateway and ingest drop it."""
    state = state_of(ctx)
    with reported_errors(state), provisioner(state) as p:
        outcome = p.revoke_device(device_id)
    show_outcome(state, outcome, qr=False)


@app.command()
def disable(
    ctx: typer.Context, device_id: Annotated[str, typer.Argument(help="Device id.")]
) -> None:
    """Suspend a device: its account is refused and its gateway ignores it, until `enable`."""
    state = state_of(ctx)
    with reported_errors(state), provisioner(state) as p:
        outcome = p.set_device_enabled(device_id, enabled=False)
    show_outcome(state, outcome, qr=False)


@app.command()
def enable(
    ctx: typer.Context, device_id: Annotated[str, typer.Argument(help="Device id.")]
) -> None:
    """Resume a disabled device."""
    state = state_of(ctx)
    with reported_errors(state), provisioner(state) as p:
        outcome = p.set_device_enabled(device_id, enabled=True)
    show_outcome(state, outcome, qr=False)


@app.command(name="rotate-credentials")
def rotate_credentials(
    ctx: typer.Context,
    device_id: Annotated[str, typer.Argument(help="Device id.")],
    qr: QrOption = False,
) -> None:
    """Give an MQTT device a new secret, an HTTP device a new token, and a new bundle.

    An MQTT device's old secret stops working at once; an HTTP device's old
    token when its gateway applies the new config (seconds).
    """
    state = state_of(ctx)
    with reported_errors(state), provisioner(state) as p:
        outcome = p.rotate_device(device_id)
    show_outcome(state, outcome, qr=qr)


@app.command()
def qr(
    ctx: typer.Context,
    device_id: Annotated[str, typer.Argument(help="Device id.")],
) -> None:
    """Draw the QR code of a device's current bundle in the terminal (80 columns at most).

    A revoked device has no working bundle: asking for its QR code is an error.
    """
    from devices.bundle import decode_bundle
    from devices.bundlefiles import qr_terminal

    state = state_of(ctx)
    with reported_errors(state):
        with registry_of(state) as registry:
            rows = registry.devices(device_id=device_id)
        if rows and rows[0].status == "revoked":
            raise ConflictError(
                f"device {device_id!r} is revoked: its credentials no longer work, so it has"
                " no QR code"
            )
        path = bundle_dir(state) / f"device-{device_id}.json"
        try:
            bundle = decode_bundle(path.read_bytes())
        except FileNotFoundError:
            raise NotFoundError(
                f"no bundle for {device_id!r} in {path.parent}: `rotate-credentials` makes one"
            ) from None
        drawing = qr_terminal(bundle, columns=state.console.width)
    state.console.print(drawing, highlight=False, markup=False, soft_wrap=True)
