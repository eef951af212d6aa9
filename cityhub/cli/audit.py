"""`cityhub audit`: the provisioning actions recorded in the registry, newest first."""

from __future__ import annotations

from typing import Annotated

import msgspec
import typer
from rich.table import Table

from cityhub.cli.context import TIME_ZONE_NOTE, local_time, reported_errors, state_of
from cityhub.cli.devices import JsonOption, registry_of
from contracts.wording import count_noun


def audit(
    ctx: typer.Context,
    subject: Annotated[
        str | None, typer.Option(help="Only entries about this device or gateway id.")
    ] = None,
    action: Annotated[
        str | None, typer.Option(help="Only this action (device.add, gateway.revoke, ...).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many entries.")] = 50,
    as_json: JsonOption = False,
) -> None:
    """Show the audit log of provisioning actions: what, which device, when, by whom.

    "by" is the database login that wrote the entry (recorded by the
    database itself) and the OS user the command ran as; "operator" is the
    name the operator gave (CITYHUB_OPERATOR), kept as a comment. Entries
    from before these were recorded show "trước khi ghi nhận / before
    recorded". (Nhật ký thao tác: ai, lúc nào, trên thiết bị nào.)
    """
    state = state_of(ctx)
    with reported_errors(state), registry_of(state) as registry:
        entries = registry.audit_entries(subject_id=subject, action=action, limit=limit)
    if as_json:
        state.console.print_json(msgspec.json.encode(entries).decode())
        return
    table = Table(title=f"audit log ({count_noun(len(entries), 'entry', 'entries')}, newest first)")
    columns = (
        f"when ({TIME_ZONE_NOTE})",
        "db login / OS user",
        "operator",
        "action",
        "subject",
        "detail",
    )
    for column in columns:
        table.add_column(column)
    for e in entries:
        detail = ", ".join(f"{k}={v}" for k, v in sorted(e.detail.items()) if v not in (None, ""))
        table.add_row(
            local_time(e.ts),
            _actor(e.db_user, e.os_user),
            e.operator,
            e.action,
            f"{e.subject_kind} {e.subject_id}",
            detail,
        )
    state.console.print(table)


BEFORE_RECORDED = "trước khi ghi nhận / before recorded"


def _actor(db_user: str | None, os_user: str | None) -> str:
    """``db login / OS user``; entries from before migration 20 have neither."""
    if db_user is None:
        return BEFORE_RECORDED
    return f"{db_user} / {os_user or '?'}"
