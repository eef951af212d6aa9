"""`cityhub db`: schema migrations, seed data, maintenance and status."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cityhub.cli.context import TIME_ZONE_NOTE, CliState, local_time, reported_errors, state_of
from contracts.errors import SettingsError
from contracts.schema import Edition
from contracts.wording import count_noun

app = typer.Typer(
    # Help is printed as written: ids, patterns and TOML sections have [ ] in them.
    rich_markup_mode=None,
    help="Database schema migrations, seed data and maintenance.",
    no_args_is_help=True,
)


def database_url(state: CliState) -> str:
    """database.url if set, else the embedded default's running server."""
    if state.settings.database.url:
        return state.settings.database.url
    # Imported here, as psycopg: installed with the central extra, not with the gateway one.
    from cityhub.localstack.stack import LocalStack

    stack = LocalStack(state_dir=state.state_dir, local=state.settings.local, is_root=state.is_root)
    return stack.database_url()


@app.command()
def migrate(
    ctx: typer.Context,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print the pending migrations and reconcile steps; change nothing. "
            "(In kê các bước sẽ chạy, không thay đổi gì.)",
        ),
    ] = False,
) -> None:
    """Bring the database to the catalog and settings (safe to run any number of times).

    First the numbered migrations not yet applied: the TimescaleDB extension,
    the metadata tables, one wide hypertable per device type, rejects, alerts
    and AQI tables, and hourly rollups (continuous aggregates with policies on
    the community edition, the project's own rollup tables and jobs on the
    Apache edition). Then the reconcile steps: a device type new in the
    catalog gets its hypertable, rollup and policies; a new metric its column
    (never dropped when a metric is removed); retention, compression and the
    chunk interval of new chunks follow the [storage] settings. Each step is
    printed; what this server cannot do is said.

    (Đưa cơ sở dữ liệu về đúng danh mục thiết bị và cấu hình: thêm bảng cho
    loại thiết bị mới, cột cho chỉ số mới, áp dụng chính sách lưu trữ.)
    """
    from cityhub import database

    state = state_of(ctx)
    settings = state.settings
    schema = settings.database.schema
    with reported_errors(state):
        url = database_url(state)
        with database.connect(url, timeout_s=settings.database.connect_timeout_s) as conn:
            if dry_run:
                plan = database.plan_migration(conn, schema=schema, storage=settings.storage)
            else:
                report = database.migrate(conn, schema=schema, storage=settings.storage)
    if dry_run:
        for m in plan.pending:
            state.console.print(f"would apply {m.version:>3}  {m.name}", markup=False)
        if plan.pending:
            state.console.print("reconcile steps are planned once these are applied")
        for step in plan.steps:
            state.console.print(f"would run  {step.summary}", markup=False)
        for note in plan.notes:
            state.console.print(f"note: {note}", markup=False)
        state.console.print(
            f"schema {schema!r} (dry run, nothing changed): "
            f"{count_noun(len(plan.pending), 'migration', 'migrations')} pending, "
            f"{count_noun(len(plan.steps), 'reconcile step', 'reconcile steps')}; "
            "TimescaleDB edition: "
            f"{plan.edition.value}"
        )
        return
    for m in report.applied:
        state.console.print(f"applied {m.version:>3}  {m.name}", markup=False)
    for step in report.steps:
        state.console.print(f"done     {step.summary}", markup=False)
    for note in report.notes:
        state.console.print(f"note: {note}", markup=False)
    if report.changed_types and report.already:
        state.console.print(
            f"note: device types new or changed: {', '.join(report.changed_types)}; running"
            " gateways learn them with their next config: `cityhub gateways publish-configs`",
            markup=False,
        )
    state.console.print(
        f"schema {schema!r}: {len(report.applied)} applied, "
        f"{report.already} already present, "
        f"{count_noun(len(report.steps), 'reconcile step', 'reconcile steps')}; "
        f"TimescaleDB edition: {report.edition.value}"
    )


@app.command()
def seed(ctx: typer.Context) -> None:
    """Load the Hanoi sites (service halls, ward offices, street monitors) into the sites table.

    Idempotent: existing sites are updated in place.
    """
    from cityhub import database

    state = state_of(ctx)
    settings = state.settings
    with reported_errors(state):
        sites = database.load_hanoi_sites()
        url = database_url(state)
        with database.connect(url, timeout_s=settings.database.connect_timeout_s) as conn:
            count = database.seed_sites(conn, schema=settings.database.schema, sites=sites)
    kinds: dict[str, int] = {}
    for site in sites:
        kinds[site.kind] = kinds.get(site.kind, 0) + 1
    detail = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
    state.console.print(f"seeded {count_noun(count, 'Hanoi site', 'Hanoi sites')} ({detail})")


@app.command()
def maintain(
    ctx: typer.Context,
    lookback_hours: Annotated[
        int, typer.Option(min=1, help="Recompute hourly rollups over this many past hours.")
    ] = 72,
) -> None:
    """Refresh hourly rollups and drop data past retention (Apache edition).

    On the community edition the server's own policies do this and the command
    only says so.
    """
    from cityhub import database

    state = state_of(ctx)
    settings = state.settings
    with reported_errors(state):
        url = database_url(state)
        with database.connect(url, timeout_s=settings.database.connect_timeout_s) as conn:
            report = database.maintain(
                conn,
                schema=settings.database.schema,
                now=datetime.now(UTC),
                lookback=timedelta(hours=lookback_hours),
            )
    if report.edition.value == "timescale":
        state.console.print("community edition: rollups and retention run as server policies")
    else:
        state.console.print(
            f"rollup rows written: {report.rollup_rows}; chunks dropped: {report.dropped_chunks}; "
            f"chunk indexes packed: {report.packed_indexes}"
        )


@app.command()
def status(ctx: typer.Context) -> None:
    """Show the TimescaleDB edition, the applied migrations and the policies in force.

    Each policy (chunk interval, retention, compression) is shown as the
    database has it beside the [storage] setting; `cityhub db migrate` makes
    them match. (Chính sách đang áp dụng so với cấu hình.)
    """
    from cityhub import database

    state = state_of(ctx)
    settings = state.settings
    with reported_errors(state):
        url = database_url(state)
        with database.connect(url, timeout_s=settings.database.connect_timeout_s) as conn:
            edition = database.detect_edition(conn)
            rows = database.applied_versions(conn, schema=settings.database.schema)
            if rows:
                policies, notes = database.policies_in_force(
                    conn, schema=settings.database.schema, storage=settings.storage
                )
    table = Table(title=f"schema {settings.database.schema!r} (TimescaleDB {edition.value})")
    for column in ("version", "migration", f"applied at ({TIME_ZONE_NOTE})"):
        table.add_column(column)
    for version, name, at in rows:
        table.add_row(str(version), name, local_time(at))
    state.console.print(table)
    if not rows:
        state.console.print("no migrations applied: run `cityhub db migrate`")
        return
    table = Table(title="policies: in force / setting (\\[storage])")
    for column in ("table", "policy", "in force", "setting", ""):
        table.add_column(column)
    for p in policies:
        differs = p.in_force is not None and p.in_force != p.setting.split(" (")[0]
        missing = p.in_force is None and edition is not Edition.APACHE
        flag = "differs: run `cityhub db migrate`" if differs or missing else ""
        table.add_row(p.table, p.policy, p.in_force or "none", p.setting, flag)
    state.console.print(table)
    for note in notes:
        state.console.print(f"note: {note}", markup=False)


@app.command("set-password")
def set_password(
    ctx: typer.Context,
    kind: Annotated[
        str,
        typer.Argument(
            help="Which service role: ingest, alerts, reader (Grafana) or technician "
            "(the role is {schema}_{kind})."
        ),
    ],
    password_file: Annotated[
        Path,
        typer.Option(
            "--password-file",
            help="File holding the password (a trailing newline is ignored); "
            "never given on the command line, where other users see it. "
            "(Tệp chứa mật khẩu.)",
            dir_okay=False,
        ),
    ],
) -> None:
    """Let a service role log in with a password (SCRAM-SHA-256).

    The role must exist: `cityhub db migrate` creates the four roles of the
    schema without login. Run it again to change the password. The password
    is turned into a SCRAM verifier here and only that is sent to the server.
    (Cho phép vai trò dịch vụ đăng nhập bằng mật khẩu.)
    """
    from cityhub import database
    from contracts.roles import ROLE_KINDS
    from contracts.settings import read_password_file

    state = state_of(ctx)
    settings = state.settings
    with reported_errors(state):
        if kind not in ROLE_KINDS:
            raise SettingsError("KIND", f"{kind!r} is not one of {', '.join(ROLE_KINDS)}")
        password = read_password_file(str(password_file), "--password-file")
        url = database_url(state)
        with database.connect(url, timeout_s=settings.database.connect_timeout_s) as conn:
            role = database.set_role_password(
                conn, schema=settings.database.schema, kind=kind, password=password
            )
    state.console.print(
        f"role {role}: đăng nhập được bằng mật khẩu mới / can log in with the new password",
        markup=False,
    )


@app.command()
def roles(ctx: typer.Context) -> None:
    """List the schema's service roles and whether each can log in.

    (Các vai trò dịch vụ của schema và vai trò nào đăng nhập được.)
    """
    from cityhub import database

    state = state_of(ctx)
    settings = state.settings
    schema = settings.database.schema
    with reported_errors(state):
        url = database_url(state)
        with database.connect(url, timeout_s=settings.database.connect_timeout_s) as conn:
            rows = database.service_roles(conn, schema=schema)
    table = Table(title=f"service roles of schema {schema!r}")
    for column in ("kind", "role", "exists", "login"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row.kind,
            row.role,
            "có / yes" if row.exists else "chưa có / missing: run `cityhub db migrate`",
            "có / yes" if row.can_login else "không / no: `cityhub db set-password`",
        )
    state.console.print(table)
