"""`cityhub pki`: a CA and certificates for the central broker's TLS listener and gateways.

Files go to ``provisioning.pki_dir`` (default ``{state_dir}/pki``); keys are
0600. The embedded broker gets a TLS listener (client certificate required)
when ``local.mqtt_tls_port`` is set; gateway bundles carry the CA and a
client certificate when ``provisioning.central_tls_port`` is set.

Revocation: ``revoke`` records the certificate in the register, re-signs
``crl.pem``, makes the embedded broker re-read it (SIGHUP) and cuts the
gateway's live session through the control API; ``renew`` issues new
certificates and refreshes the gateway's bundle; ``crl`` re-signs the CRL
before it expires; ``list`` shows them all.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import msgspec
import typer

from cityhub.cli.context import CliState, reported_errors, state_of
from cityhub.cli.devices import bundle_dir, hanoi_time, new_table, pki_dir
from contracts.errors import NotFoundError

if TYPE_CHECKING:
    from devices.pki import Pki

app = typer.Typer(
    # Help is printed as written: ids, patterns and TOML sections have [ ] in them.
    rich_markup_mode=None,
    help="Certificates: a CA, the broker's server certificate, client certificates.",
    no_args_is_help=True,
)


@app.command()
def init(
    ctx: typer.Context,
    host: Annotated[
        list[str] | None,
        typer.Option(help="Name or address clients use for the broker (repeatable)."),
    ] = None,
) -> None:
    """Create the CA and the central broker's server certificate (default hosts: localhost)."""
    from devices.pki import Pki

    state = state_of(ctx)
    pki = Pki(pki_dir(state))
    now = datetime.now(UTC)
    with reported_errors(state):
        ca = pki.create_ca(now=now)
        server = pki.issue_server(host or ["localhost", "127.0.0.1"], now=now)
    state.console.print(f"CA created: {ca.cert} (key {ca.key}, mode 0600)", highlight=False)
    state.console.print(
        f"server certificate for {', '.join(host or ['localhost', '127.0.0.1'])}: {server.cert}",
        highlight=False,
    )


@app.command()
def server(
    ctx: typer.Context,
    host: Annotated[list[str], typer.Option(help="Name or address of the broker (repeatable).")],
) -> None:
    """Issue a new server certificate for the broker (e.g. for new host names)."""
    from devices.pki import Pki

    state = state_of(ctx)
    with reported_errors(state):
        files = Pki(pki_dir(state)).issue_server(host, now=datetime.now(UTC))
    state.console.print(f"server certificate for {', '.join(host)}: {files.cert}", highlight=False)


@app.command()
def client(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Client name (a gateway id), the certificate's CN.")],
) -> None:
    """Issue a client certificate (gateway bundles get theirs automatically with TLS on)."""
    from devices.pki import Pki

    state = state_of(ctx)
    with reported_errors(state):
        files = Pki(pki_dir(state)).issue_client(name, now=datetime.now(UTC))
    state.console.print(
        f"client certificate {files.cert} (key {files.key}, mode 0600)", highlight=False
    )


@app.command()
def show(ctx: typer.Context) -> None:
    """Show the CA and server certificate: subject, issuer, expiry."""
    from devices.pki import Pki, describe_certificate

    state = state_of(ctx)
    pki = Pki(pki_dir(state))
    with reported_errors(state):
        for label, path in (("CA", pki.ca.cert), ("server", pki.server.cert)):
            subject, issuer, expires = describe_certificate(path)
            state.console.print(
                f"{label}: {subject} (issuer {issuer}), expires {expires:%Y-%m-%d}, {path}",
                highlight=False,
                soft_wrap=True,
            )


ReasonOption = Annotated[
    str,
    typer.Option(
        help="RFC 5280 reason: unspecified, key_compromise, affiliation_changed, superseded,"
        " cessation_of_operation."
    ),
]
OfflineOption = Annotated[
    bool,
    typer.Option(
        "--offline",
        help="Only write the register and crl.pem; hand the CRL to the brokers yourself.",
    ),
]


def _hand_over(state: CliState, pki: Pki, name: str) -> None:
    """The embedded broker reloads the CRL (SIGHUP); the gateway's live sessions are cut."""
    from cityhub.cli.gateway import embedded_broker
    from cityhub.cli.services import stack_of
    from devices import dynsec
    from devices.brokerctl import BrokerControl

    out = state.console
    embedded = stack_of(state).mosquitto() if state.settings.local.mqtt_tls_port else None
    if embedded is not None and embedded.reload_crl():
        out.print("  broker nhúng đã nạp CRL mới / embedded broker reloaded the CRL (SIGHUP)")
    elif embedded is not None and embedded.running():
        out.print(
            "  [yellow]broker nhúng chạy không có CRL / the embedded broker was started without"
            " a CRL: restart it (`cityhub services down`, `cityhub services up`)[/yellow]",
            highlight=False,
        )
    else:
        out.print(
            f"  broker khác / another broker: copy {pki.crl_path} to it and send it SIGHUP"
            " (compose: `docker compose run --rm mosquitto-init`,"
            " then `docker compose kill -s HUP mosquitto`)",
            highlight=False,
            soft_wrap=True,
        )
    settings = state.settings
    account = dynsec.gateway_central_account(name, settings.provisioning.topic_prefix)
    central = embedded_broker(state, settings.broker)
    with BrokerControl(
        name="central", broker=central, timeout_s=settings.provisioning.control_timeout_s
    ) as control:
        found = control.cut_sessions(account)
    if found:
        out.print(
            f"  phiên đang kết nối của {account.username} đã bị ngắt / live sessions cut"
            " (its certificate is refused when it reconnects)",
            highlight=False,
        )
    else:
        out.print(f"  không có tài khoản broker / no broker account {account.username}")


@app.command()
def revoke(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Client name (a gateway id) whose certificates go.")],
    reason: ReasonOption = "unspecified",
    serial: Annotated[
        str | None,
        typer.Option(help="Revoke only this serial (hex, as `cityhub pki list` shows it)."),
    ] = None,
    offline: OfflineOption = False,
) -> None:
    """Revoke a client certificate: CRL re-signed, the broker refuses it, its session is cut.

    Every live certificate issued to NAME is revoked (or only --serial, e.g. the
    old one after a renewal). crl.pem is signed again; the embedded broker
    re-reads it on SIGHUP (no restart: other gateways stay connected); the
    gateway's central account is disabled and enabled again, which cuts its live
    session (Mosquitto checks certificates only at the handshake) and leaves the
    account usable by a renewed certificate. Running it again is harmless.
    """
    from devices.pki import Pki

    state = state_of(ctx)
    pki = Pki(pki_dir(state))
    now = datetime.now(UTC)
    with reported_errors(state):
        newly, already = pki.revoke(name, now=now, reason=reason, serial=serial)
        for record in newly:
            state.console.print(
                f"đã thu hồi / revoked: {name} serial {record.serial} ({record.reason})",
                highlight=False,
            )
        for record in already:
            state.console.print(
                f"đã thu hồi trước đó / already revoked: {name} serial {record.serial}"
                f" ({hanoi_time(record.revoked_at)})",
                highlight=False,
            )
        state.console.print(
            f"CRL: {pki.crl_path}, hết hạn / next update {hanoi_time(pki.crl_next_update())}",
            highlight=False,
        )
        if not offline:
            _hand_over(state, pki, name)


@app.command()
def crl(
    ctx: typer.Context,
    offline: OfflineOption = False,
) -> None:
    """Sign crl.pem again (next update in 90 days) and hand it to the embedded broker.

    A broker refuses EVERY client certificate once its CRL's next update has
    passed: run this from a monthly timer (`cityhub status` warns 30 days before).
    """
    from cityhub.cli.services import stack_of
    from devices.pki import Pki

    state = state_of(ctx)
    pki = Pki(pki_dir(state))
    with reported_errors(state):
        path = pki.resign_crl(now=datetime.now(UTC))
        state.console.print(
            f"CRL: {path}, hết hạn / next update {hanoi_time(pki.crl_next_update())}",
            highlight=False,
        )
        tls_port = state.settings.local.mqtt_tls_port
        if not offline and tls_port and stack_of(state).mosquitto().reload_crl():
            state.console.print("broker nhúng đã nạp CRL / embedded broker reloaded it")


def _refresh_bundle(state: CliState, name: str, pki: Pki) -> Path | None:
    """Put ``name``'s renewed certificate and key into its gateway bundle, if it has one."""
    from devices.bundle import GatewayBundle, decode_bundle
    from devices.bundlefiles import write_bundle

    directory = bundle_dir(state)
    path = directory / f"gateway-{name}.json"
    try:
        bundle = decode_bundle(path.read_bytes())
    except FileNotFoundError:
        return None
    if not isinstance(bundle, GatewayBundle) or not bundle.ca_pem:
        return None
    files = pki.client(name)
    renewed = msgspec.structs.replace(
        bundle,
        ca_pem=pki.ca_pem(),
        cert_pem=files.cert.read_text(encoding="ascii"),
        key_pem=files.key.read_text(encoding="ascii"),
    )
    return write_bundle(directory, renewed).json


@app.command()
def renew(
    ctx: typer.Context,
    names: Annotated[
        list[str] | None, typer.Argument(help="Client names (gateway ids) to renew.")
    ] = None,
    days: Annotated[int, typer.Option(help="Validity of the new certificates, days.")] = 730,
    server: Annotated[
        bool, typer.Option("--server", help="Renew the broker's server certificate.")
    ] = False,
    expiring_within: Annotated[
        str | None,
        typer.Option(help="Renew every live client certificate expiring within (30d, 12h)."),
    ] = None,
) -> None:
    """Issue new certificates (new key pair, new serial) for the same names.

    The previous certificate stays valid until it expires or is revoked, so a
    gateway can switch over; revoke it afterwards with
    `cityhub pki revoke NAME --serial OLD --reason superseded`. A gateway's
    bundle (bundles/gateway-NAME.json, its settings and TLS files) gets the new
    certificate and key; its passwords do not change. --server: the broker's
    certificate for the same host names (the broker needs a restart).
    """
    from devices import certs
    from devices.pki import Pki

    state = state_of(ctx)
    pki = Pki(pki_dir(state))
    now = datetime.now(UTC)
    with reported_errors(state):
        targets = list(names or [])
        if expiring_within is not None:
            window = certs.parse_window(expiring_within)
            targets += certs.expiring_clients(pki.register(), now=now, within=window)
        if not targets and not server:
            state.console.print("không có chứng chỉ nào cần gia hạn / nothing to renew")
            return
        issued = {r.name for r in pki.register().certs if r.kind == "client"}
        for name in dict.fromkeys(targets):
            if name not in issued:
                raise NotFoundError(f"no client certificate issued to {name!r}")
            files = pki.issue_client(name, now=now, days=days)
            bundle = _refresh_bundle(state, name, pki)
            state.console.print(
                f"đã gia hạn / renewed: {name} -> {files.cert}"
                + (f", bundle {bundle}" if bundle else ""),
                highlight=False,
            )
        if server:
            files = pki.renew_server(now=now, days=days)
            state.console.print(
                f"đã gia hạn / renewed: server -> {files.cert} (restart the broker)",
                highlight=False,
            )


@app.command(name="list")
def list_(ctx: typer.Context) -> None:
    """Every certificate issued here: kind, name, serial, expiry, days left, state."""
    from devices import certs
    from devices.pki import Pki

    state = state_of(ctx)
    pki = Pki(pki_dir(state))
    now = datetime.now(UTC)
    with reported_errors(state):
        register = pki.register()
        next_update = pki.crl_next_update()
    table = new_table(
        f"Chứng chỉ / certificates ({pki.root})",
        ("loại / kind", "tên / name", "serial", "hết hạn / expires", "còn / days", "trạng thái"),
    )
    for r in sorted(register.certs, key=lambda r: (r.kind, r.name, r.not_after)):
        left = certs.days_left(r, now)
        if r.revoked_at is not None:
            label = f"[red]thu hồi / revoked {hanoi_time(r.revoked_at)} ({r.reason})[/red]"
        elif left <= 0:
            label = "[red]hết hạn / expired[/red]"
        elif left < certs.WARN_DAYS:
            label = "[yellow]sắp hết hạn / expiring[/yellow]"
        else:
            label = "hợp lệ / valid"
        table.add_row(r.kind, r.name, r.serial, hanoi_time(r.not_after), f"{left:.0f}", label)
    state.console.print(table)
    state.console.print(
        f"CRL: {pki.crl_path}, hết hạn / next update {hanoi_time(next_update)}", highlight=False
    )
