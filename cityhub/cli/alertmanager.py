"""`cityhub alertmanager config`: write alertmanager.yml and its templates from a receivers file.

The checking and building is cityhub/alertmanager.py's; this command reads the
operator's file, writes the two files (0600 when they hold a password or a bot
token) and, with --check, says whether a written copy is still current.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cityhub.cli.context import reported_errors, state_of
from contracts.errors import ReceiversError

app = typer.Typer(
    help="Prometheus Alertmanager: its configuration for cityhub's alerts (receivers, routes).",
    no_args_is_help=True,
)

# Big enough for hundreds of receivers and ward routes; a larger file is a mistake.
MAX_RECEIVERS_BYTES = 1_000_000


def read_receivers(path: Path) -> str:
    """The receivers file's text; ReceiversError naming it if unreadable or too large."""
    try:
        if path.stat().st_size > MAX_RECEIVERS_BYTES:
            raise ReceiversError(str(path), None, f"larger than {MAX_RECEIVERS_BYTES} bytes")
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ReceiversError(str(path), None, f"cannot read: {exc}") from None


@app.command()
def config(
    ctx: typer.Context,
    receivers: Annotated[
        Path,
        typer.Option(
            "--receivers",
            help="The receivers file (TOML; deploy/alertmanager/receivers.example.toml).",
            dir_okay=False,
        ),
    ] = Path("receivers.toml"),
    out: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="alertmanager.yml to write; cityhub.tmpl is written beside it.",
            dir_okay=False,
        ),
    ] = Path("alertmanager.yml"),
    check: Annotated[
        bool,
        typer.Option("--check", help="Write nothing; exit 1 if either file differs."),
    ] = False,
) -> None:
    """Check the receivers file and write alertmanager.yml and cityhub.tmpl."""
    from cityhub.alertmanager import (
        TEMPLATE_NAME,
        TEMPLATE_PATH,
        build_config,
        has_secrets,
        parse_receivers,
        render_yaml,
    )

    state = state_of(ctx)
    with reported_errors(state):
        plan = parse_receivers(read_receivers(receivers), source=str(receivers))
        files = {
            out: render_yaml(build_config(plan), source=receivers.name),
            out.with_name(TEMPLATE_NAME): TEMPLATE_PATH.read_text(encoding="utf-8"),
        }
        if check:
            stale = [p for p, text in files.items() if _current(p) != text]
            for path in stale:
                state.err.print(f"out of date: {path}", highlight=False)
            if stale:
                state.err.print(f"run `cityhub alertmanager config --receivers {receivers}`")
                raise typer.Exit(1)
            state.console.print(f"{out} is up to date", highlight=False)
            return
        secret = has_secrets(plan)
        for path, text in files.items():
            _write(path, text, secret=secret and path == out)
            state.console.print(f"wrote {path}", highlight=False)
        if secret:
            state.console.print(f"{out} holds passwords or tokens: mode 0600", highlight=False)


def _current(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ReceiversError(str(path), None, f"cannot read: {exc}") from None


def _write(path: Path, text: str, *, secret: bool) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        if secret:
            tmp.chmod(0o600)
        tmp.replace(path)
    except OSError as exc:
        raise ReceiversError(str(path), None, f"cannot write: {exc}") from None
