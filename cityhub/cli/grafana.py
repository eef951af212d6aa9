"""`cityhub grafana`: generate the boards' JSON, push boards and alert annotations to a Grafana."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cityhub.cli.context import CliState, reported_errors, state_of
from contracts.errors import SettingsError
from contracts.wording import count_noun

if TYPE_CHECKING:
    from grafana.push import GrafanaPush

app = typer.Typer(
    # Help is printed as written: ids, patterns and TOML sections have [ ] in them.
    rich_markup_mode=None,
    help="Grafana boards as code: generate grafana/dashboards/*.json, push boards and annotations.",
    no_args_is_help=True,
)


@app.command()
def build(
    ctx: typer.Context,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Directory for the JSON files (default: the package's grafana/dashboards)."
        ),
    ] = None,
    check: Annotated[
        bool,
        typer.Option("--check", help="Write nothing; exit 1 if any file differs from the code."),
    ] = False,
) -> None:
    """Generate the seven boards from code (grafana-foundation-sdk) into JSON files."""
    from grafana.render import DASHBOARDS_DIR, stale_files, write_boards

    state = state_of(ctx)
    directory = out or DASHBOARDS_DIR
    if check:
        stale = stale_files(directory)
        for name in stale:
            state.err.print(f"out of date: {directory / name}")
        if stale:
            state.err.print("run `cityhub grafana build` and commit the result")
            raise typer.Exit(1)
        state.console.print(f"boards in {directory} are up to date")
        return
    changed = write_boards(directory)
    for name in changed:
        state.console.print(f"wrote {directory / name}")
    state.console.print(
        f"{count_noun(len(changed), 'board file', 'board files')} changed in {directory}"
    )


@app.command()
def push(
    ctx: typer.Context,
    url: Annotated[
        str,
        typer.Option(envvar="GRAFANA_URL", help="Grafana's base URL, e.g. http://localhost:3000."),
    ],
    token: Annotated[
        str,
        typer.Option(
            envvar="GRAFANA_TOKEN",
            help="A service-account token with the Editor role.",
            show_default=False,
        ),
    ],
    since: Annotated[
        str, typer.Option(help="Post alert transitions from this far back (10m, 6h, 7d).")
    ] = "24h",
    folder: Annotated[str, typer.Option(help="Folder uid for the boards.")] = "cityhub",
    boards: Annotated[bool, typer.Option(help="Upload the boards.")] = True,
    annotations: Annotated[
        bool, typer.Option(help="Post alert transitions as annotations.")
    ] = True,
) -> None:
    """Upload the boards through Grafana's HTTP API and post alert transitions as annotations.

    Boards are overwritten by uid in the given folder. Transitions already
    posted (recognised by their tags) are not posted again, so running this
    on a schedule is safe.
    """
    from grafana.macros import parse_interval
    from grafana.push import GrafanaPush

    state = state_of(ctx)
    with reported_errors(state):
        try:
            lookback_s = parse_interval(since)
        except ValueError:
            raise SettingsError("--since", f"{since!r} is not a duration like 6h or 7d") from None
        grafana = GrafanaPush(url=url, token=token)
        version = grafana.version()
        state.console.print(f"Grafana {version} at {url}")
        if boards:
            _push_boards(state, grafana, folder)
        if annotations:
            _push_annotations(state, grafana, lookback_s)


def _push_boards(state: CliState, grafana: GrafanaPush, folder: str) -> None:
    """Upload every board into ``folder`` (made if missing), overwriting by uid."""
    import json

    from grafana.push import FOLDER_TITLE
    from grafana.render import board_files

    grafana.ensure_folder(folder, FOLDER_TITLE)
    for name, text in board_files().items():
        path = grafana.upload_board(json.loads(text), folder_uid=folder)
        state.console.print(f"board {name}: {path}")


def _push_annotations(state: CliState, grafana: GrafanaPush, lookback_s: float) -> None:
    """Post the alert transitions of the last ``lookback_s`` that are not posted yet."""
    from cityhub import database
    from cityhub.cli.db import database_url
    from grafana.annotations import plan_annotations
    from grafana.push import read_transitions

    settings = state.settings
    end = datetime.now(UTC)
    start = end - timedelta(seconds=lookback_s)
    with database.connect(
        database_url(state), timeout_s=settings.database.connect_timeout_s
    ) as conn:
        transitions = read_transitions(conn, schema=settings.database.schema, start=start, end=end)
    have = grafana.annotation_keys(round(start.timestamp() * 1000), round(end.timestamp() * 1000))
    posted = grafana.post_annotations(plan_annotations(transitions, have))
    state.console.print(
        f"alert transitions: {len(transitions)} since {start:%Y-%m-%d %H:%M} UTC, "
        f"{posted} posted, {len(transitions) - posted} already there"
    )
