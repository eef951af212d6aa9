"""`cityhub backup DIR` and `cityhub restore DIR`: the whole hub's state in one directory.

What a backup holds and how a restore proceeds is ``cityhub.backup``'s; this
module finds the sources and targets from the settings (the embedded stack's
state directory, or a deployment's URL and ``provisioning.dynsec_file``),
shows progress and prints the counts.
"""

from __future__ import annotations

from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from cityhub.cli.context import CliState, reported_errors, state_of
from cityhub.cli.db import database_url
from cityhub.cli.devices import pki_dir
from contracts.errors import SettingsError
from contracts.wording import count_noun

if TYPE_CHECKING:
    from collections.abc import Iterator

    from cityhub.backup import Step
    from cityhub.localstack.mosquitto import MosquittoServer

PassphraseOption = Annotated[
    Path | None,
    typer.Option(
        "--passphrase-file",
        help="File holding the passphrase that encrypts (backup) or decrypts (restore) the "
        "PKI's private keys, the CA key among them. Without it a backup leaves the keys out. "
        "(Tệp chứa mật khẩu mã hoá khoá riêng của CA.)",
        dir_okay=False,
        exists=True,
        readable=True,
    ),
]


def read_passphrase(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError("--passphrase-file", f"cannot read {path}: {exc}") from exc
    if not text:
        raise SettingsError("--passphrase-file", f"{path} is empty")
    return text.encode()


def settings_files(ctx: typer.Context, state: CliState) -> list[Path]:
    """The settings file in use: --config, else $CITYHUB_CONFIG; none with built-in defaults."""
    given = ctx.find_root().params.get("config")
    if isinstance(given, Path):
        return [given]
    named = state.environ.get("CITYHUB_CONFIG")
    return [Path(named)] if named else []


def embedded_broker(state: CliState) -> MosquittoServer | None:
    """The embedded broker when the settings name no broker host (the embedded default)."""
    if state.settings.broker.host is not None or state.settings.provisioning.dynsec_file:
        return None
    from cityhub.localstack.stack import LocalStack

    stack = LocalStack(state_dir=state.state_dir, local=state.settings.local, is_root=state.is_root)
    return stack.mosquitto()


def dynsec_file(state: CliState, broker: MosquittoServer | None) -> Path:
    configured = state.settings.provisioning.dynsec_file
    if configured:
        return Path(configured).expanduser()
    if broker is None:
        raise SettingsError(
            "provisioning.dynsec_file",
            "the broker is not the embedded one (broker.host is set): name its "
            "dynamic-security file (compose: the mosquitto-security volume's "
            "dynamic-security.json)",
        )
    return broker.dynsec_path


def pg_bindir(state: CliState) -> Path:
    """pg_dump / pg_restore: the embedded server's bindir, else the newest client programs.

    A machine that backs up a deployment's server needs only PostgreSQL's
    client package (no server, no TimescaleDB), of the server's major version
    or newer.
    """
    from cityhub.localstack.postgres import find_pg_bindir
    from contracts.errors import MissingDependencyError

    try:
        return find_pg_bindir(state.settings.local.pg_bindir)
    except MissingDependencyError:
        if state.settings.local.pg_bindir:
            return Path(state.settings.local.pg_bindir)
        clients = sorted(
            (p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "pg_dump").exists()),
            key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        )
        if not clients:
            raise
        return clients[-1]


@contextmanager
def progress(state: CliState, title: str) -> Iterator[Step]:
    """A spinner naming the step in progress; each finished step stays as a line."""
    current: list[str] = []
    with state.console.status(title) as status:

        def step(text: str) -> None:
            if current:
                state.console.print(f"  ✓ {current[-1]}", highlight=False, markup=False)
            current.append(text)
            status.update(f"{text} ...")

        yield step
    if current:
        state.console.print(f"  ✓ {current[-1]}", highlight=False, markup=False)


def backup(
    ctx: typer.Context,
    directory: Annotated[
        Path,
        typer.Argument(
            help="New (or empty) directory for the backup; created 0700, files 0600.",
            file_okay=False,
        ),
    ],
    passphrase_file: PassphraseOption = None,
) -> None:
    """Back up the database, the broker's accounts, the PKI and the settings into DIR.

    The database with TimescaleDB's logical procedure (pg_dump -Fc of the
    whole database, run as the role of database.url, which must read
    everything); the broker's dynamic-security file (the only copy of the
    device and gateway password hashes); the PKI directory, private keys
    encrypted with the passphrase or left out without one; the settings file;
    and manifest.json with versions, row counts and the sha256 of each file.

    (Sao lưu cơ sở dữ liệu, tài khoản broker, PKI và cấu hình vào thư mục DIR.)
    """
    from cityhub.backup import Sources, take_backup

    state = state_of(ctx)
    settings = state.settings
    with reported_errors(state):
        passphrase = read_passphrase(passphrase_file)
        broker = embedded_broker(state)
        sources = Sources(
            database_url=database_url(state),
            schema=settings.database.schema,
            pg_bindir=pg_bindir(state),
            dynsec_file=dynsec_file(state, broker),
            pki_dir=pki_dir(state),
            settings_files=settings_files(ctx, state),
            environ=state.environ,
        )
        with progress(state, f"backup into {directory}") as step:
            report = take_backup(
                directory, sources, passphrase=passphrase, now=datetime.now(UTC), step=step
            )
    manifest = report.manifest
    for note in report.notes:
        state.console.print(f"note: {note}", highlight=False, markup=False)
    if not manifest.keys_encrypted:
        state.err.print(
            "warning: no --passphrase-file: the CA key and the other private keys are NOT "
            "in this backup (khoá riêng không được sao lưu)",
            highlight=False,
            markup=False,
        )
    for what in manifest.omitted:
        state.console.print(f"left out: {what}", highlight=False, markup=False)
    total = sum(v for k, v in manifest.counts.items() if k.startswith("readings."))
    counted = ", ".join(
        count_noun(n, singular, plural)
        for n, singular, plural in (
            (total, "reading", "readings"),
            (manifest.counts.get("alerts", 0), "alert", "alerts"),
            (manifest.counts.get("devices", 0), "device", "devices"),
            (manifest.counts.get("gateways", 0), "gateway", "gateways"),
        )
    )
    files = count_noun(len(manifest.files), "file", "files")
    state.console.print(
        f"backup written: {directory} ({files} + {report.directory.name}/"
        f"manifest.json); {counted}; TimescaleDB {manifest.timescaledb_version}, "
        f"schema {manifest.schema!r} at "
        f"migration {manifest.migration}; dump {report.dump_bytes} bytes in "
        f"{report.dump_s:.1f} s",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


def restore(
    ctx: typer.Context,
    directory: Annotated[
        Path,
        typer.Argument(help="A backup directory made by `cityhub backup`.", file_okay=False),
    ],
    passphrase_file: PassphraseOption = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Overwrite a database that holds tables (it is dropped and created anew) and "
            "a PKI directory with another CA. (Ghi đè dữ liệu hiện có.)",
        ),
    ] = False,
) -> None:
    """Restore a backup made by `cityhub backup`: database, broker accounts, PKI, settings.

    First checks the manifest and every file's sha256 (an altered or
    incomplete backup is refused, naming the file), the TimescaleDB version
    (the target server must offer the backup's), the passphrase, and that the
    target database is empty (unless --force). Then recreates the database
    (CREATE EXTENSION timescaledb at the backup's version,
    timescaledb_pre_restore(), pg_restore, timescaledb_post_restore()), puts
    back the broker's accounts (the embedded broker is stopped meanwhile and
    started again; a deployment's broker must be stopped first), the PKI and
    the settings, and prints the row counts beside the backup's. Run
    `cityhub db migrate` afterwards: it makes the service roles' grants again.

    (Khôi phục bản sao lưu; kiểm tra toàn vẹn trước khi thay đổi bất cứ gì.)
    """
    from cityhub.backup import Targets, restore_backup

    state = state_of(ctx)
    settings = state.settings
    with reported_errors(state):
        passphrase = read_passphrase(passphrase_file)
        broker = embedded_broker(state)
        targets = Targets(
            database_url=database_url(state),
            schema=settings.database.schema,
            pg_bindir=pg_bindir(state),
            dynsec_file=dynsec_file(state, broker),
            broker=broker,
            pki_dir=pki_dir(state),
            environ=state.environ,
        )
        with progress(state, f"restore from {directory}") as step:
            report = restore_backup(
                directory, targets, passphrase=passphrase, force=force, step=step
            )
    manifest = report.manifest
    table = Table(title=f"rows: backup of {manifest.created_at_hanoi} / restored")
    for column in ("table", "backup", "restored", ""):
        table.add_column(column)
    for row in report.counts:
        table.add_row(
            row.name,
            "-" if row.backup is None else str(row.backup),
            "-" if row.restored is None else str(row.restored),
            "ok" if row.equal else "DIFFERS",
        )
    state.console.print(table)
    for note in report.notes:
        state.console.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)
    differing = [row.name for row in report.counts if not row.equal]
    if differing:
        state.err.print(
            f"error: counts differ from the backup's: {', '.join(differing)}",
            highlight=False,
            markup=False,
        )
        raise typer.Exit(1)
    state.console.print(
        f"restored: schema {manifest.schema!r} at migration {manifest.migration}, TimescaleDB "
        f"{manifest.timescaledb_version}, database in {report.restore_s:.1f} s; next: "
        "`cityhub db migrate` (service roles and grants)",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
