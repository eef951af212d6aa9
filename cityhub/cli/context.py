"""What the root callback hands to every command: settings, start-up environment, clock.

Every time a command shows a person (tables, not ``--json``) is Hanoi's,
with the zone shown: ``local_time`` formats it, from ``HANOI_TZ``.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Final

import typer
from rich.console import Console
from rich.markup import escape

from contracts.errors import HubError, SettingsError
from contracts.settings import Settings, default_state_dir

# Vietnam has kept UTC+07:00, without daylight saving, since 1975: this is
# Asia/Ho_Chi_Minh without needing the tz database on the host.
HANOI_TZ: Final = timezone(timedelta(hours=7), "ICT")
TIME_FORMAT: Final = "%d/%m/%Y %H:%M:%S"
# Column headers say which clock the times are on.
TIME_ZONE_NOTE: Final = "giờ Hà Nội / Asia/Ho_Chi_Minh"


def local_time(moment: datetime | None, fmt: str = TIME_FORMAT) -> str:
    """``moment`` on Hanoi's clock, zone shown: "06/12/2026 14:05:09 +07"; "" for None.

    A naive ``moment`` is taken as UTC (what the database and the services store).
    """
    if moment is None:
        return ""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return f"{moment.astimezone(HANOI_TZ).strftime(fmt)} +07"


@dataclass(frozen=True)
class CliState:
    settings: Settings
    environ: dict[str, str]
    is_root: bool
    console: Console = field(default_factory=Console)
    err: Console = field(default_factory=lambda: Console(stderr=True))
    # The operating-system user the command runs as (``os_user_name``, taken
    # at start-up); the audit log records it beside the database login.
    os_user: str = ""

    @property
    def state_dir(self) -> Path:
        if self.settings.local.state_dir:
            return Path(self.settings.local.state_dir).expanduser()
        return default_state_dir(self.environ, is_root=self.is_root)


def state_of(ctx: typer.Context) -> CliState:
    state = ctx.find_root().obj
    if not isinstance(state, CliState):  # pragma: no cover - the root callback always sets it
        raise TypeError("cityhub CLI state missing")
    return state


def error_line(exc: BaseException) -> str:
    """``error: {exc}`` as rich markup, the error's own text printed as it is.

    Ids, patterns and TOML sections have [ ] in them, which rich would
    otherwise take for tags and drop.
    """
    return f"[red]error:[/red] {escape(str(exc))}"


def required_operator(state: CliState, records: str) -> str:
    """The ``operator`` setting, which a command that ``records`` who acted needs."""
    if not state.settings.operator.strip():
        raise SettingsError(
            "operator",
            f"{records} records who acted: set your name (CITYHUB_OPERATOR or"
            " `operator` in the settings file)",
        )
    return state.settings.operator


@contextmanager
def reported_errors(state: CliState, exit_code: int = 1) -> Iterator[None]:
    """Turn a HubError into a one-line message and a non-zero exit, without a traceback."""
    try:
        yield
    except HubError as exc:
        state.err.print(error_line(exc), highlight=False, soft_wrap=True)
        raise typer.Exit(exit_code) from None


def since_time(text: str, now: datetime, seconds: Callable[[str], float]) -> datetime:
    """A `--since` value: a duration before ``now`` (read by ``seconds``, the option's own
    duration rule) or an ISO date/time (UTC if it names no offset)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return now - timedelta(seconds=seconds(text))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def os_user_name() -> str:
    """The login name of this process's real user id (the password database's, not $USER).

    The environment can claim any name; the uid is the kernel's. A uid with
    no entry (a container's arbitrary uid) is shown as the number.
    """
    uid = os.getuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
