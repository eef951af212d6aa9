"""`cityhub gateways`: register, list, show, revoke and re-key site gateways.

A gateway gets an account on the central broker (publish its batches and
state, read its own ack and config) and one on the site broker (read its
devices' topics), a bundle with both and a settings file for
`cityhub gateway run -c`, and its retained config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import msgspec
import typer
from rich.table import Table

from cityhub.cli.context import local_time, reported_errors, state_of
from cityhub.cli.devices import JsonOption, QrOption, provisioner, registry_of, show_outcome
from contracts.errors import NotFoundError

if TYPE_CHECKING:
    from devices.registry import GatewayRow

app = typer.Typer(
    help="Register and manage site gateways: broker accounts, bundles, configs.",
    no_args_is_help=True,
)


def _table(rows: list[GatewayRow], title: str) -> Table:
    table = Table(title=title)
    for column in ("gateway", "site", "label", "location", "devices", "config", "status"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r.gateway_id,
            r.site_id,
            r.label,
            r.location,
            str(r.devices),
            str(r.config_version),
            r.status,
        )
    return table


@app.command()
def add(
    ctx: typer.Context,
    gateway_id: Annotated[str, typer.Argument(help="New gateway id (a-z, 0-9, -).")],
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
) -> None:
    """List gateways with their number of active devices (never their credentials)."""
    state = state_of(ctx)
    with reported_errors(state), registry_of(state) as registry:
        rows = registry.gateways(site_id=site, status=status)
    if as_json:
        state.console.print_json(msgspec.json.encode(rows).decode())
        return
    state.console.print(_table(rows, f"{len(rows)} gateways"))


@app.command()
def show(
    ctx: typer.Context,
    gateway_id: Annotated[str, typer.Argument(help="Gateway id.")],
    as_json: JsonOption = False,
) -> None:
    """Show one gateway, its devices, its broker accounts and recent audit entries."""
    state = state_of(ctx)
    with reported_errors(state), registry_of(state) as registry:
        rows = registry.gateways(gateway_id=gateway_id)
        if not rows:
            raise NotFoundError(f"gateway {gateway_id!r} is not registered")
        devices = registry.devices(gateway_id=gateway_id, status="active")
        accounts = registry.credentials(gateway_id)
        audit = registry.audit_entries(subject_id=gateway_id, limit=10)
    if as_json:
        document = {
            "gateway": rows[0],
            "devices": [d.device_id for d in devices],
            "credentials": accounts,
            "audit": audit,
        }
        state.console.print_json(msgspec.json.encode(document).decode())
        return
    state.console.print(_table(rows, f"gateway {gateway_id}"))
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


@app.command(name="sync-broker")
def sync_broker(ctx: typer.Context) -> None:
    """Bring every active gateway's and device's broker account to what the registry says.

    For accounts made before accounts were bound to their client ids and a
    gateway's site account listed its own devices only: binds each account to
    its client id (its live session is cut once, and it reconnects) and
    rewrites each gateway's site role. An up-to-date broker is not changed, so
    it is safe to re-run.
    """
    state = state_of(ctx)
    with reported_errors(state), provisioner(state) as p:
        outcome = p.sync_broker()
    if not outcome.changes:
        state.console.print("broker accounts already up to date; nothing changed")
        return
    show_outcome(state, outcome, qr=False)
