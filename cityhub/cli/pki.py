"""`cityhub pki`: a CA and certificates for the central broker's TLS listener and gateways.

Files go to ``provisioning.pki_dir`` (default ``{state_dir}/pki``); keys are
0600. The embedded broker gets a TLS listener (client certificate required)
when ``local.mqtt_tls_port`` is set; gateway bundles carry the CA and a
client certificate when ``provisioning.central_tls_port`` is set.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer

from cityhub.cli.context import reported_errors, state_of
from cityhub.cli.devices import pki_dir

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
