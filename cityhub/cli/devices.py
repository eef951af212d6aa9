"""`cityhub devices`: register, list, show, move, replace, revoke and re-key devices.

Each changing command says what it changed, writes an audit row with the
operator's name and, for MQTT devices, a config bundle (JSON and a QR code
PNG, mode 0600). Mistakes are reported in one line and change nothing. The
provisioning work itself is ``devices.provisioning``; this module connects the
database and the brokers (the embedded ones unless settings name others).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Final

import msgspec
import typer
from rich.table import Table

from cityhub.cli.context import TIME_ZONE_NOTE, CliState, local_time, reported_errors, state_of
from cityhub.cli.db import database_url
from cityhub.cli.gateway import embedded_broker
from contracts.errors import NotFoundError, SettingsError

if TYPE_CHECKING:
    from devices.provisioning import Outcome, Provisioner
    from devices.registry import DeviceRow, Registry

app = typer.Typer(
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
    with database.connect(url, timeout_s=settings.database.connect_timeout_s) as conn:
        yield Registry(conn, schema=settings.database.schema)


@contextmanager
def provisioner(state: CliState) -> Iterator[Provisioner]:
    """The registry and both brokers' control connections (one if they are the same broker)."""
    from devices.brokerctl import BrokerControl
    from devices.pki import Pki
    from devices.provisioning import Endpoint, Provisioner

    settings = state.settings
    prov = settings.provisioning
    if not settings.operator.strip():
        raise SettingsError(
            "operator",
            "provisioning records who acted: set your name (CITYHUB_OPERATOR or"
            " `operator` in the settings file)",
        )
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
            operator=settings.operator,
            central=central_ctl,
            site=site_ctl,
            central_endpoint=central_endpoint,
            site_endpoint=site_endpoint,
            bundle_dir=bundle_dir(state),
            pki=Pki(pki_dir(state)),
            prefix=prov.topic_prefix,
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
        state.console.print(qr_terminal(outcome.bundle), highlight=False, markup=False)


QrOption = Annotated[
    bool, typer.Option("--qr", help="Also draw the bundle's QR code in the terminal.")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@app.command()
def add(
    ctx: typer.Context,
    device_id: Annotated[str, typer.Argument(help="New device id (a-z, 0-9, -).")],
    device_type: Annotated[
        str, typer.Option("--type", help="Device type: air_quality, kiosk, camera_counter, ...")
    ],
    site: Annotated[str, typer.Option(help="Site id the device is installed at.")],
    gateway: Annotated[str, typer.Option(help="Gateway id that serves it (at that site).")],
    transport: Annotated[
        str, typer.Option(help="mqtt (the device connects to the site broker) or serial.")
    ] = "mqtt",
    port: Annotated[
        str | None,
        typer.Option(help="Serial only: /dev/ttyUSB0, socket://host:port or rfc2217://..."),
    ] = None,
    protocol: Annotated[
        str | None, typer.Option(help="Serial only: frame protocol, pms5003 or sds011.")
    ] = None,
    label: Annotated[str, typer.Option(help="Free text shown on boards.")] = "",
    location: Annotated[str, typer.Option(help="Where it is mounted (floor, counter).")] = "",
    hardware_id: Annotated[str, typer.Option(help="Serial number of the hardware.")] = "",
    qr: QrOption = False,
) -> None:
    """Register a device at a site and gateway; create its broker account and bundle.

    An MQTT device gets an account on the site broker that may publish only
    under d/{its id}/; the gateway receives its new device list as its
    retained config and applies it live.
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
        )
    show_outcome(state, outcome, qr=qr)


def _device_table(rows: list[DeviceRow], title: str) -> Table:
    table = Table(title=title)
    for column in (
        "device",
        "type",
        "site",
        "gateway",
        "transport",
        "port",
        "label",
        "location",
        "status",
    ):
        table.add_column(column)
    for r in rows:
        status = r.status if r.enabled or r.status != "active" else "disabled"
        table.add_row(
            r.device_id,
            r.device_type,
            r.site_id,
            r.gateway_id or "-",
            r.transport,
            r.port or "-",
            r.label,
            r.location,
            status,
        )
    return table


@app.command(name="list")
def list_(
    ctx: typer.Context,
    site: Annotated[str | None, typer.Option(help="Only this site.")] = None,
    gateway: Annotated[str | None, typer.Option(help="Only this gateway.")] = None,
    device_type: Annotated[str | None, typer.Option("--type", help="Only this type.")] = None,
    status: Annotated[
        str | None, typer.Option(help="Only devices in this status: active or revoked.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """List devices (never their credentials)."""
    state = state_of(ctx)
    with reported_errors(state), registry_of(state) as registry:
        rows = registry.devices(
            site_id=site, gateway_id=gateway, device_type=device_type, status=status
        )
    if as_json:
        state.console.print_json(msgspec.json.encode(rows).decode())
        return
    state.console.print(_device_table(rows, f"{len(rows)} devices"))


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
    state = state_of(ctx)
    with reported_errors(state), registry_of(state) as registry:
        rows = registry.devices(device_id=device_id)
        if not rows:
            raise NotFoundError(f"device {device_id!r} is not registered")
        accounts = registry.credentials(device_id)
        audit = registry.audit_entries(subject_id=device_id, limit=10)
        rejects = recent_rejects(registry, device_id)
    if as_json:
        document = {
            "device": rows[0],
            "credentials": accounts,
            "audit": audit,
            "rejects": rejects,
        }
        state.console.print_json(msgspec.json.encode(document).decode())
        return
    state.console.print(_device_table(rows, f"device {device_id}"))
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
        str | None, typer.Option(help="Serial only: the new hardware's port, if it changed.")
    ] = None,
    qr: QrOption = False,
) -> None:
    """New hardware for a device: id, readings history and settings stay; the old secret dies."""
    state = state_of(ctx)
    with reported_errors(state), provisioner(state) as p:
        outcome = p.replace_device(device_id, hardware_id=hardware_id, port=port)
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
    """Give an MQTT device a new secret and bundle; the old secret stops working at once."""
    state = state_of(ctx)
    with reported_errors(state), provisioner(state) as p:
        outcome = p.rotate_device(device_id)
    show_outcome(state, outcome, qr=qr)


@app.command()
def qr(
    ctx: typer.Context,
    device_id: Annotated[str, typer.Argument(help="Device id.")],
) -> None:
    """Draw the QR code of a device's current bundle in the terminal."""
    from devices.bundle import decode_bundle
    from devices.bundlefiles import qr_terminal

    state = state_of(ctx)
    with reported_errors(state):
        path = bundle_dir(state) / f"device-{device_id}.json"
        try:
            bundle = decode_bundle(path.read_bytes())
        except FileNotFoundError:
            raise NotFoundError(
                f"no bundle for {device_id!r} in {path.parent}: `rotate-credentials` makes one"
            ) from None
    state.console.print(qr_terminal(bundle), highlight=False, markup=False)
