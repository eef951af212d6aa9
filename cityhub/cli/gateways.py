"""`cityhub gateways`: register, list, show, revoke and re-key site gateways.

A gateway gets an account on the central broker (publish its batches and
state, read its own ack and config) and one on the site broker (read its
devices' topics), a bundle with both and a settings file for
`cityhub gateway run -c`, and its retained config. `chirpstack-account`
gives the ChirpStack network server that serves its LoRaWAN devices an
account on its site broker.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated

import msgspec
import typer
from rich.table import Table

from cityhub.cli.context import local_time, reported_errors, state_of
from cityhub.cli.devices import (
    OUTBOX_LOST_COLUMN,
    STATUSES,
    JsonOption,
    QrOption,
    WideOption,
    check_choice,
    hanoi_time,
    new_table,
    online_label,
    outbox_lost,
    print_table,
    provisioner,
    registry_of,
    show_outcome,
)
from contracts.errors import NotFoundError
from contracts.ids import ID_PATTERN
from contracts.wording import count_noun

if TYPE_CHECKING:
    from cityhub.cli.presence import GatewayPresence
    from devices.registry import GatewayRow

app = typer.Typer(
    # Help is printed as written: ids, patterns and TOML sections have [ ] in them.
    rich_markup_mode=None,
    help="Register and manage site gateways: broker accounts, bundles, configs.",
    no_args_is_help=True,
)


def _table(rows: list[GatewayRow], presence: Mapping[str, GatewayPresence], title: str) -> Table:
    table = new_table(
        title,
        (
            "gateway",
            "điểm / site",
            "nhãn / label",
            "vị trí / location",
            "thiết bị / devices",
            "config",
            "trạng thái / status",
            "kết nối / online",
            "hàng đợi / outbox",
            OUTBOX_LOST_COLUMN,
            "trạng thái cuối (giờ Hà Nội) / last state",
        ),
    )
    for r in rows:
        p = presence.get(r.gateway_id)
        depth = p.outbox_depth if p else None
        table.add_row(
            r.gateway_id,
            r.site_id,
            r.label,
            r.location,
            str(r.devices),
            str(r.config_version),
            r.status,
            online_label(p is not None and p.online),
            "-" if depth is None else str(depth),
            outbox_lost(
                p.outbox_refused_readings if p else None, p.outbox_dropped_readings if p else None
            ),
            hanoi_time(p.last_state if p else None),
        )
    return table


def gateway_documents(
    rows: list[GatewayRow], presence: Mapping[str, GatewayPresence]
) -> list[dict[str, object]]:
    """The rows as JSON objects with ``online``, ``last_seen`` (UTC), ``outbox_depth``
    and the readings the outbox refused and dropped while full (None: never reported)."""
    documents: list[dict[str, object]] = []
    for r in rows:
        p = presence.get(r.gateway_id)
        document: dict[str, object] = msgspec.to_builtins(r)
        document["online"] = p is not None and p.online
        document["last_seen"] = p.last_state.isoformat() if p and p.last_state else None
        document["outbox_depth"] = p.outbox_depth if p else None
        document["outbox_refused_readings"] = p.outbox_refused_readings if p else None
        document["outbox_dropped_readings"] = p.outbox_dropped_readings if p else None
        documents.append(document)
    return documents


@app.command()
def add(
    ctx: typer.Context,
    gateway_id: Annotated[str, typer.Argument(help=f"New gateway id, {ID_PATTERN} (a-z, 0-9, -).")],
    site: Annotated[str, typer.Option(help="Site id the gateway serves.")],
    label: Annotated[str, typer.Option(help="Free text.")] = "",
    location: Annotated[str, typer.Option(help="Where it is mounted.")] = "",
    qr: QrOption = False,
) -> None:
    """Register a gateway at a site; create its broker accounts, bundle and empty config."""
    state = state_of(ctx)
    with reported_errors(state), provisioner(state) as p:
        outcome = p.add_gateway(gateway_id, site_id=site, label=label, location=location)
    show_outcome(state, outcome, qr=qr)


@app.command(name="list")
def list_(
    ctx: typer.Context,
    site: Annotated[str | None, typer.Option(help="Only this site.")] = None,
    status: Annotated[str | None, typer.Option(help="Only active or revoked.")] = None,
    as_json: JsonOption = False,
    wide: WideOption = False,
) -> None:
    """List gateways: active devices, online or not, outbox and last state (no credentials).

    Online: its latest state says online and is under 5 minutes old. The
    last state's time is Hanoi time (Asia/Ho_Chi_Minh) in the table, UTC in
    --json. An unknown --status is an error naming the valid values.
    """
    from cityhub.cli.presence import gateway_presence

    state = state_of(ctx)
    with reported_errors(state), registry_of(state) as registry:
        check_choice("--status", status, STATUSES)
        rows = registry.gateways(site_id=site, status=status)
        presence = gateway_presence(registry.conn, registry.schema)
    if as_json:
        state.console.print_json(msgspec.json.encode(gateway_documents(rows, presence)).decode())
        return
    print_table(
        state, _table(rows, presence, count_noun(len(rows), "gateway", "gateways")), wide=wide
    )


@app.command()
def show(
    ctx: typer.Context,
    gateway_id: Annotated[str, typer.Argument(help="Gateway id.")],
    as_json: JsonOption = False,
) -> None:
    """Show one gateway, its devices, its broker accounts and recent audit entries."""
    from cityhub.cli.presence import gateway_presence

    state = state_of(ctx)
    with reported_errors(state), registry_of(state) as registry:
        rows = registry.gateways(gateway_id=gateway_id)
        if not rows:
            raise NotFoundError(f"gateway {gateway_id!r} is not registered")
        devices = registry.devices(gateway_id=gateway_id, status="active")
        accounts = registry.credentials(gateway_id)
        audit = registry.audit_entries(subject_id=gateway_id, limit=10)
        presence = gateway_presence(registry.conn, registry.schema)
    if as_json:
        document = {
            "gateway": gateway_documents(rows, presence)[0],
            "devices": [d.device_id for d in devices],
            "credentials": accounts,
            "audit": audit,
        }
        state.console.print_json(msgspec.json.encode(document).decode())
        return
    state.console.print(_table(rows, presence, f"gateway {gateway_id}"))
    state.console.print(
        f"  devices: {', '.join(d.device_id for d in devices) or '(none)'}",
        highlight=False,
        soft_wrap=True,
    )
    for a in accounts:
        state.console.print(f"  {a.broker} broker account {a.username}: {a.status}")
    for e in audit:
        state.console.print(
            f"  {local_time(e.ts)}  {e.action:<16} by {e.operator}",
            highlight=False,
        )


@app.command()
def revoke(
    ctx: typer.Context, gateway_id: Annotated[str, typer.Argument(help="Gateway id.")]
) -> None:
    """Revoke a gateway with no active devices: accounts deleted (sessions cut), config cleared."""
    state = state_of(ctx)
    with reported_errors(state), provisioner(state) as p:
        outcome = p.revoke_gateway(gateway_id)
    show_outcome(state, outcome, qr=False)


@app.command(name="rotate-credentials")
def rotate_credentials(
    ctx: typer.Context,
    gateway_id: Annotated[str, typer.Argument(help="Gateway id.")],
    qr: QrOption = False,
) -> None:
    """New secrets (and client certificate, with TLS) for a gateway; old ones stop at once."""
    state = state_of(ctx)
    with reported_errors(state), provisioner(state) as p:
        outcome = p.rotate_gateway(gateway_id)
    show_outcome(state, outcome, qr=qr)


@app.command(name="chirpstack-account")
def chirpstack_account(
    ctx: typer.Context,
    gateway_id: Annotated[
        str, typer.Argument(help="Gateway id whose site broker ChirpStack feeds.")
    ],
) -> None:
    """Create (or rotate) the site-broker account of the ChirpStack that serves a gateway.

    ChirpStack v4's MQTT integration publishes its devices' events (JSON) on
    application/{app}/device/{devEui}/event/{event}; this account
    (chirpstack.{gateway}, client id the same) may publish there and
    nowhere else. Its secret is written once, into chirpstack-{gateway}.toml
    in the bundle directory (mode 0600): the [integration.mqtt] section to
    merge into ChirpStack's chirpstack.toml. Running it again gives a new
    secret (the old one stops at once). The gateway reads the events of its
    LoRaWAN devices only (`cityhub devices add --transport lorawan`).
    """
    state = state_of(ctx)
    with reported_errors(state), provisioner(state) as p:
        outcome = p.chirpstack_account(gateway_id)
    show_outcome(state, outcome, qr=False)


@app.command(name="sync-broker")
def sync_broker(ctx: typer.Context) -> None:
    """Bring every active gateway's and device's broker account to what the registry says.

    For accounts made by an earlier version: binds each account to its
    client id (its live session is cut once, and it reconnects), rewrites
    each gateway's site role (its own devices only, their commands and
    answers) and gives gateways' central roles and devices' roles the rules
    commands need (hub/v1/gw/{id}/cmd and /cmdreport, d/{id}/cmd). Run it
    once after upgrading. An up-to-date broker is not changed, so it is safe
    to re-run.
    """
    state = state_of(ctx)
    with reported_errors(state), provisioner(state) as p:
        outcome = p.sync_broker()
    if not outcome.changes:
        state.console.print("broker accounts already up to date; nothing changed")
        return
    show_outcome(state, outcome, qr=False)


@app.command(name="publish-configs")
def publish_configs(
    ctx: typer.Context,
    gateway_ids: Annotated[
        list[str] | None, typer.Argument(help="Gateway ids (default: every active gateway).")
    ] = None,
) -> None:
    """Publish a new config version to gateways, with the catalog entries of their devices' types.

    Run it after `cityhub db migrate` has taken a catalog that changed a
    type a gateway serves (a metric added, a range changed): the gateways
    apply the new config live and validate readings against the new entries.
    """
    state = state_of(ctx)
    with reported_errors(state), provisioner(state) as p:
        outcome = p.publish_configs(gateway_ids or None)
    if not outcome.changes:
        state.console.print("no active gateways; nothing published")
        return
    show_outcome(state, outcome, qr=False)
