"""`cityhub broker`: the brokers' service accounts (ingest, simulated fleets, read-only views).

Services never connect as the admin account: each gets an account of its
own, ``{kind}.{instance}`` (``devices.dynsec.service_account``), made here
through the broker's dynamic-security control API with the admin account,
as `cityhub gateways chirpstack-account` makes ChirpStack's
(``devices.provisioning``, audited). The password comes from a file that
the service reads too (its ``password_file`` setting); it is written
nowhere else. The embedded default's broker makes its own service accounts
at start (``cityhub.localstack.mosquitto``); this command is for brokers
that run elsewhere.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated

import typer

from cityhub.cli.context import reported_errors, state_of
from cityhub.cli.devices import check_choice, provisioner, show_outcome
from contracts.settings import read_password_file
from devices.bundlefiles import write_secret_file
from devices.dynsec import SERVICE_KINDS

app = typer.Typer(
    # Help is printed as written: ids, patterns and TOML sections have [ ] in them.
    rich_markup_mode=None,
    help="Broker accounts of the services (ingest, sim, monitor): never the admin account.",
    no_args_is_help=True,
)

# 32 random bytes, URL-safe: as strong as the generated embedded passwords and
# free of characters that need quoting in a TOML file or an environment.
NEW_PASSWORD_BYTES = 32


@app.command(name="service-account")
def service_account(
    ctx: typer.Context,
    kind: Annotated[
        str,
        typer.Argument(
            help="ingest (central broker: batches, states, acks, commands), sim (site broker: "
            "a simulated fleet's device topics) or monitor (central broker: gateway states, "
            "read-only)."
        ),
    ],
    instance: Annotated[
        str, typer.Argument(help="Instance name (a-z, 0-9, -): the account is KIND.INSTANCE.")
    ],
    password_file: Annotated[
        Path,
        typer.Option(
            "--password-file",
            help="File holding the account's password (trailing newline ignored); the service "
            "reads the same file (its broker password_file setting).",
            dir_okay=False,
        ),
    ],
    new: Annotated[
        bool,
        typer.Option(
            "--new",
            help="First write a new random password into --password-file (mode 0600), "
            "replacing what it held.",
        ),
    ] = False,
) -> None:
    """Create a service's broker account, or give it the password of --password-file.

    Created with the role of its kind and nothing more: ingest may subscribe
    to its shared batch and command-report streams ($share/{ingest.share_group}/...)
    and to gateway states, and publish acks and commands; sim may publish
    d/+/up, d/+/status, d/+/res and ChirpStack events and subscribe to
    d/+/cmd; monitor may subscribe to gateway states. Run again (after
    changing the file, or with --new) to rotate: sessions with the old
    password are disconnected at once. Audited as broker.service_account.
    """
    state = state_of(ctx)
    with reported_errors(state):
        check_choice("KIND", kind, SERVICE_KINDS)
        if new:
            write_secret_file(
                password_file, (secrets.token_urlsafe(NEW_PASSWORD_BYTES) + "\n").encode()
            )
        password = read_password_file(str(password_file), "--password-file")
        share_group = state.settings.ingest.share_group
        with provisioner(state) as p:
            outcome = p.service_account(kind, instance, password, share_group=share_group)
    show_outcome(state, outcome, qr=False)
    state.console.print(
        f"  password file: {password_file} (give the service password_file = that path)",
        highlight=False,
        soft_wrap=True,
    )
