"""`cityhub status`: the fleet at a glance for a shift, from the database alone.

Reads what the services store (gateway states, device state, ingest's
stats rows, the alerts job's state and open alerts), judges it with
``problems`` (pure: the figures and the rules' numbers in, the problems
out) and prints one screen or one JSON document. Whether a device or a
gateway is online is ``cityhub.cli.presence``'s answer; the services
themselves are not contacted.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import msgspec
import typer
from rich.markup import escape

from cityhub.cli.context import CliState, reported_errors, state_of
from cityhub.cli.devices import (
    OUTBOX_LOST_COLUMN,
    JsonOption,
    hanoi_time,
    new_table,
    outbox_lost,
    pki_dir,
    registry_of,
)
from contracts.schema import SEVERITIES
from contracts.wording import choose_noun
from devices import certs

if TYPE_CHECKING:
    # psycopg comes with the central extra; a gateway-only install runs `cityhub`
    # too, so the database adapter is imported where a query runs.
    from adapters.database import Connection

# Ingest's workers write a stats row every 10 s (stats_interval_s): five
# minutes is 30 rows per worker, enough to smooth a quiet spell, short
# enough that a stall shows within a shift's glance.
INGEST_WINDOW_S: Final = 300
# The alerts job stores a cycle every interval_s (10 s); a catch-up or a
# device-list reload can delay one by a few intervals, six missed in a row
# (a minute at 10 s) means it has stopped.
ALERTS_STALE_INTERVALS: Final = 6
# Offline devices listed (worst first); the rest are counted.
OFFLINE_LISTED_MAX: Final = 20
# Exit code when something is down (1 is a usage or database error).
EXIT_DOWN: Final = 3
# Client certificates listed by expiry (the rest are `cityhub pki list`'s).
SOONEST_CERTS: Final = 3


class GatewayLine(msgspec.Struct, frozen=True, kw_only=True):
    gateway_id: str
    site_id: str
    online: bool
    reported: str | None  # its latest state's status; None: never reported
    last_state: datetime | None
    age_s: float | None
    outbox_depth: int | None
    readings_per_s: float | None
    # Readings its outbox refused and dropped while full (totals; None: never reported).
    outbox_refused_readings: int | None = None
    outbox_dropped_readings: int | None = None


class SiteDevices(msgspec.Struct, frozen=True, kw_only=True):
    site_id: str
    online: int
    offline: int


class OfflineDevice(msgspec.Struct, frozen=True, kw_only=True):
    device_id: str
    site_id: str
    device_type: str
    last_seen: datetime | None  # None: never seen


class Ingest(msgspec.Struct, frozen=True, kw_only=True):
    window_s: int
    readings: int  # stored over the window
    readings_per_s: float
    lag_p95_ms: float | None  # the worst worker's, over the window
    queue_depth: int | None  # summed over the workers' latest rows
    last_stats_at: datetime | None  # newest stats row, of any worker, ever
    gateways_readings_per_s: float  # what the online gateways say they send


class AlertJob(msgspec.Struct, frozen=True, kw_only=True):
    job_id: str
    last_eval_at: datetime
    updated_at: datetime
    age_s: float


class Alertmanager(msgspec.Struct, frozen=True, kw_only=True):
    state: str  # reachable, unreachable or unknown
    notified_at: datetime | None = None
    error: str | None = None
    error_at: datetime | None = None


class CertExpiry(msgspec.Struct, frozen=True, kw_only=True):
    name: str  # "CA", "server", "CRL" or a client's name
    expires: datetime
    days_left: float


class Certificates(msgspec.Struct, frozen=True, kw_only=True):
    """The PKI's expiry dates: CA, server, the CRL's next update, the soonest clients."""

    lines: list[CertExpiry]
    warnings: list[str]  # under certs.WARN_DAYS left
    expired: list[str]  # past: the TLS listener refuses clients (a problem)


def certificate_status(
    register: certs.CertRegister, crl_next_update: datetime | None, *, now: datetime
) -> Certificates:
    """Expiry of the CA, the server certificate, the CRL and the soonest client certificates."""
    lines: list[CertExpiry] = []
    for kind, label in (("ca", "CA"), ("server", "server")):
        newest = max(
            (r for r in register.certs if r.kind == kind and r.revoked_at is None),
            key=lambda r: r.not_after,
            default=None,
        )
        if newest is not None:
            lines.append(
                CertExpiry(
                    name=label,
                    expires=newest.not_after,
                    days_left=certs.days_left(newest, now),
                )
            )
    if crl_next_update is not None:
        lines.append(
            CertExpiry(
                name="CRL",
                expires=crl_next_update,
                days_left=(crl_next_update - now).total_seconds() / 86400,
            )
        )
    lines += [
        CertExpiry(name=r.name, expires=r.not_after, days_left=certs.days_left(r, now))
        for r in certs.soonest(register, now=now, count=SOONEST_CERTS)
    ]
    expired = [f"{c.name}: đã hết hạn / expired" for c in lines if c.days_left <= 0]
    warnings = [_expiry_warning(c) for c in lines if 0 < c.days_left < certs.WARN_DAYS]
    return Certificates(lines=lines, warnings=warnings, expired=expired)


def _expiry_warning(cert: CertExpiry) -> str:
    days = round(cert.days_left)  # the whole days that the certificates line shows
    return f"{cert.name}: còn / {days} ngày / {choose_noun(days, 'day', 'days')} left"


class FleetStatus(msgspec.Struct, frozen=True, kw_only=True):
    checked_at: datetime
    gateways: list[GatewayLine]
    sites: list[SiteDevices]
    devices_online: int
    devices_offline: int
    offline_devices: list[OfflineDevice]  # the OFFLINE_LISTED_MAX worst
    ingest: Ingest
    alert_jobs: list[AlertJob]  # newest first
    alerts_stale_after_s: float
    open_alerts: dict[str, int]  # by severity, every severity present
    alertmanager: Alertmanager
    problems: list[str] = []
    certificates: Certificates | None = None  # None: no PKI


def problems(status: FleetStatus) -> list[str]:
    """What is down, one line each (empty: all well). The rules are the help's."""
    found: list[str] = []
    for g in status.gateways:
        if g.online:
            continue
        if g.reported is None:
            found.append(f"gateway {g.gateway_id} has never reported")
        elif g.reported == "offline":
            found.append(f"gateway {g.gateway_id} is offline")
        else:
            found.append(f"gateway {g.gateway_id} is silent ({g.age_s or 0:.0f} s)")
    if not status.alert_jobs:
        found.append("the alerts job has never completed a cycle")
    elif status.alert_jobs[0].age_s > status.alerts_stale_after_s:
        job = status.alert_jobs[0]
        found.append(
            f"the alerts job's last cycle is {job.age_s:.0f} s old"
            f" (over {status.alerts_stale_after_s:.0f} s)"
        )
    ingest = status.ingest
    if ingest.readings == 0 and ingest.gateways_readings_per_s > 0:
        found.append(
            f"ingest stored no readings in {ingest.window_s} s while gateways send"
            f" {ingest.gateways_readings_per_s:.1f}/s"
        )
    if status.alertmanager.state == "unreachable":
        found.append(f"Alertmanager unreachable: {status.alertmanager.error}")
    if status.certificates is not None:
        found += [f"certificate {e}" for e in status.certificates.expired]
    return found


def _ingest(conn: Connection[Any], schema: str, gateways_rate: float) -> Ingest:
    from adapters.database import database_errors

    with database_errors("ingest stats", schema=schema), conn.cursor() as cur:
        cur.execute(
            f"""SELECT coalesce(sum(readings), 0)::bigint, max(lag_p95_ms)::float8
                FROM {schema}.ingest_stats
                WHERE ts > now() - make_interval(secs => %s)""",
            (INGEST_WINDOW_S,),
        )
        readings, lag = cur.fetchone() or (0, None)
        cur.execute(
            f"""SELECT sum(queue_depth)::bigint, max(ts) FROM (
                    SELECT DISTINCT ON (worker_id) worker_id, queue_depth, ts
                    FROM {schema}.ingest_stats
                    WHERE ts > now() - make_interval(secs => %s)
                    ORDER BY worker_id, ts DESC) AS latest""",
            (INGEST_WINDOW_S,),
        )
        queue, _ = cur.fetchone() or (None, None)
        cur.execute(f"SELECT max(ts) FROM {schema}.ingest_stats")
        row = cur.fetchone()
    return Ingest(
        window_s=INGEST_WINDOW_S,
        readings=readings,
        readings_per_s=readings / INGEST_WINDOW_S,
        lag_p95_ms=lag,
        queue_depth=queue,
        last_stats_at=row[0] if row else None,
        gateways_readings_per_s=gateways_rate,
    )


def _alert_jobs(conn: Connection[Any], schema: str) -> list[AlertJob]:
    from adapters.database import database_errors

    with database_errors("alerts job state", schema=schema), conn.cursor() as cur:
        cur.execute(
            f"""SELECT job_id, last_eval_at, updated_at,
                    extract(epoch FROM now() - updated_at)::float8
                FROM {schema}.alert_jobs ORDER BY updated_at DESC"""
        )
        return [
            AlertJob(job_id=r[0], last_eval_at=r[1], updated_at=r[2], age_s=r[3])
            for r in cur.fetchall()
        ]


def _open_alerts(conn: Connection[Any], schema: str) -> dict[str, int]:
    from adapters.database import database_errors

    with database_errors("open alerts", schema=schema), conn.cursor() as cur:
        cur.execute(
            f"""SELECT severity, count(*) FROM {schema}.alerts
                WHERE state IN ('active_unack', 'active_ack') GROUP BY severity"""
        )
        counted = dict(cur.fetchall())
    return {severity: int(counted.get(severity, 0)) for severity in SEVERITIES}


# The columns the alerts job's Alertmanager notifier adds to alert_jobs
# (migration 15); a database without them says nothing about Alertmanager.
_NOTIFIER_COLUMNS: Final = ("notified_at", "notify_error", "notify_error_at")


def _alertmanager(conn: Connection[Any], schema: str) -> Alertmanager:
    from adapters.database import database_errors

    with database_errors("Alertmanager state", schema=schema), conn.cursor() as cur:
        cur.execute(
            """SELECT count(*) FROM information_schema.columns
                WHERE table_schema = %s AND table_name = 'alert_jobs'
                AND column_name = ANY(%s)""",
            (schema, list(_NOTIFIER_COLUMNS)),
        )
        row = cur.fetchone()
        if row is None or row[0] != len(_NOTIFIER_COLUMNS):
            return Alertmanager(state="unknown")
        cur.execute(
            f"""SELECT notified_at, notify_error, notify_error_at FROM {schema}.alert_jobs
                ORDER BY greatest(notified_at, notify_error_at) DESC NULLS LAST LIMIT 1"""
        )
        last = cur.fetchone()
    if last is None or (last[0] is None and last[2] is None):
        return Alertmanager(state="unknown")
    notified_at, error, error_at = last
    failing = error_at is not None and (notified_at is None or error_at > notified_at)
    return Alertmanager(
        state="unreachable" if failing else "reachable",
        notified_at=notified_at,
        error=error,
        error_at=error_at,
    )


def collect(conn: Connection[Any], schema: str, *, alerts_interval_s: float) -> FleetStatus:
    """Everything the status screen shows, read now, judged by ``problems``."""
    from adapters.database import database_errors
    from cityhub.cli.presence import device_presence, gateway_presence

    gateways = [
        GatewayLine(
            gateway_id=g.gateway_id,
            site_id=g.site_id,
            online=g.online,
            reported=g.reported,
            last_state=g.last_state,
            age_s=g.age_s,
            outbox_depth=g.outbox_depth,
            readings_per_s=g.readings_per_s,
            outbox_refused_readings=g.outbox_refused_readings,
            outbox_dropped_readings=g.outbox_dropped_readings,
        )
        for g in sorted(
            gateway_presence(conn, schema).values(), key=lambda g: (g.site_id, g.gateway_id)
        )
        if g.status == "active"
    ]
    devices = [
        d for d in device_presence(conn, schema).values() if d.status == "active" and d.enabled
    ]
    per_site: dict[str, list[int]] = {}
    for d in devices:
        counts = per_site.setdefault(d.site_id, [0, 0])
        counts[0 if d.online else 1] += 1
    offline = sorted(
        (d for d in devices if not d.online),
        # Never seen first, then the longest silent.
        key=lambda d: (
            d.last_seen is not None,
            d.last_seen or datetime.min.replace(tzinfo=UTC),
            d.device_id,
        ),
    )
    with database_errors("clock", schema=schema), conn.cursor() as cur:
        cur.execute("SELECT now()")
        clock = cur.fetchone()
    status = FleetStatus(
        checked_at=clock[0] if clock else datetime.now(UTC),
        gateways=gateways,
        sites=[
            SiteDevices(site_id=site, online=counts[0], offline=counts[1])
            for site, counts in sorted(per_site.items())
        ],
        devices_online=sum(1 for d in devices if d.online),
        devices_offline=len(offline),
        offline_devices=[
            OfflineDevice(
                device_id=d.device_id,
                site_id=d.site_id,
                device_type=d.device_type,
                last_seen=d.last_seen,
            )
            for d in offline[:OFFLINE_LISTED_MAX]
        ],
        ingest=_ingest(conn, schema, sum(g.readings_per_s or 0.0 for g in gateways if g.online)),
        alert_jobs=_alert_jobs(conn, schema),
        alerts_stale_after_s=ALERTS_STALE_INTERVALS * alerts_interval_s,
        open_alerts=_open_alerts(conn, schema),
        alertmanager=_alertmanager(conn, schema),
    )
    return msgspec.structs.replace(status, problems=problems(status))


def _age(age_s: float | None) -> str:
    return "-" if age_s is None else f"{age_s:.0f} s"


def _print(state: CliState, status: FleetStatus) -> None:
    out = state.console

    def line(text: str) -> None:
        out.print(escape(text), highlight=False, soft_wrap=True)

    line(f"Trạng thái hệ thống / fleet status — {hanoi_time(status.checked_at)} (giờ Hà Nội)")
    up = sum(1 for g in status.gateways if g.online)
    gateways = new_table(
        f"Gateway: {up} trực tuyến / online, {len(status.gateways) - up} ngoại tuyến / offline",
        (
            "gateway",
            "điểm / site",
            "kết nối / online",
            "hàng đợi / outbox",
            OUTBOX_LOST_COLUMN,
            "tuổi trạng thái / state age",
            "trạng thái cuối / last state",
        ),
    )
    for g in status.gateways:
        gateways.add_row(
            g.gateway_id,
            g.site_id,
            "trực tuyến / online" if g.online else f"ngoại tuyến / {g.reported or 'never'}",
            "-" if g.outbox_depth is None else str(g.outbox_depth),
            outbox_lost(g.outbox_refused_readings, g.outbox_dropped_readings),
            _age(g.age_s),
            hanoi_time(g.last_state),
        )
    out.print(gateways)
    sites = new_table(
        f"Thiết bị / devices: {status.devices_online} trực tuyến / online,"
        f" {status.devices_offline} ngoại tuyến / offline",
        ("điểm / site", "trực tuyến / online", "ngoại tuyến / offline"),
    )
    for s in status.sites:
        sites.add_row(s.site_id, str(s.online), str(s.offline))
    out.print(sites)
    if status.offline_devices:
        offline = new_table(
            f"Ngoại tuyến lâu nhất / longest offline ({len(status.offline_devices)}"
            f" / {status.devices_offline})",
            ("thiết bị / device", "điểm / site", "loại / type", "lần cuối / last seen"),
        )
        for d in status.offline_devices:
            offline.add_row(d.device_id, d.site_id, d.device_type, hanoi_time(d.last_seen))
        out.print(offline)
    i = status.ingest
    lag = "-" if i.lag_p95_ms is None else f"{i.lag_p95_ms:.0f} ms"
    line(
        f"Ingest: {i.readings_per_s:.1f} bản tin/giây / readings/s over {i.window_s} s"
        f" (gateway báo / gateways say {i.gateways_readings_per_s:.1f}/s), độ trễ p95 / lag"
        f" p95 {lag}, hàng đợi / queue {i.queue_depth if i.queue_depth is not None else '-'},"
        f" thống kê cuối / last stats {hanoi_time(i.last_stats_at)}"
    )
    if status.alert_jobs:
        job = status.alert_jobs[0]
        line(
            f"Cảnh báo / alerts job {job.job_id}: chu kỳ cuối / last cycle"
            f" {hanoi_time(job.updated_at)} ({job.age_s:.0f} s), đánh giá đến / evaluated to"
            f" {hanoi_time(job.last_eval_at)}"
        )
    else:
        line("Cảnh báo / alerts job: chưa chạy / never ran")
    counts = ", ".join(f"{sev} {n}" for sev, n in status.open_alerts.items())
    line(f"Cảnh báo đang mở / open alerts: {counts}")
    am = status.alertmanager
    labels = {
        "reachable": "liên lạc được / reachable",
        "unreachable": "không liên lạc được / unreachable",
        "unknown": "không rõ / unknown",
    }
    detail = f" ({am.error})" if am.state == "unreachable" and am.error else ""
    line(f"Alertmanager: {labels[am.state]}{detail}")
    if status.certificates is not None:
        _print_certificates(state, status.certificates)
    if status.problems:
        state.err.print("[red]Sự cố / problems:[/red]", highlight=False)
        for p in status.problems:
            state.err.print(f"  - {escape(p)}", highlight=False, soft_wrap=True)
    else:
        line("Mọi thứ ổn / all well")


def _print_certificates(state: CliState, certificates: Certificates) -> None:
    expiry = ", ".join(
        f"{c.name} {hanoi_time(c.expires)} ({c.days_left:.0f} d)" for c in certificates.lines
    )
    state.console.print(
        f"Chứng chỉ / certificates: {escape(expiry)}", highlight=False, soft_wrap=True
    )
    for warning in certificates.warnings:
        state.console.print(
            f"[yellow]  sắp hết hạn / expiring: {escape(warning)}[/yellow]", highlight=False
        )


def _certificates(state: CliState, now: datetime) -> Certificates | None:
    """The PKI's expiry summary; None when this host has no CA (nothing shown)."""
    from devices.pki import Pki

    pki = Pki(pki_dir(state))
    if not pki.has_ca():
        return None
    return certificate_status(pki.register(), pki.crl_next_update(), now=now)


def status(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """The fleet at a glance: gateways, devices per site, ingest, the alerts job, open alerts.

    Gateways online or not (online: their latest state says so and is under
    5 minutes old) with outbox depth and the age of their last state;
    devices online per site (seen within their type's offline_after_s) and
    the longest offline (20 at most); ingest's readings/s and p95 lag over
    the last 5 minutes; the alerts job's last cycle; open alerts by
    severity; whether Alertmanager takes the job's posts (unknown when the
    database does not record it). Times are Hanoi time (Asia/Ho_Chi_Minh);
    --json prints one document, times in UTC.

    Exit codes: 0 all well; 1 a usage or database error; 3 something is
    down: an active gateway offline, silent or never reported, the alerts
    job's last cycle older than 6 of its intervals (or none), ingest storing
    nothing for 5 minutes while online gateways report readings, or
    Alertmanager's last post failed, or the CA, the server certificate or
    the CRL has expired (the TLS listener then refuses every gateway).
    Offline devices alone are not "down" (the alert rules cover them).

    With a PKI (`cityhub pki init`), one line gives the expiry of the CA,
    the server certificate, the CRL's next update and the 3 client
    certificates that expire first; under 30 days left is a warning.
    """
    state = state_of(ctx)
    with reported_errors(state), registry_of(state) as registry:
        report = collect(
            registry.conn,
            registry.schema,
            alerts_interval_s=state.settings.alerts.interval_s,
        )
        certificates = _certificates(state, report.checked_at)
        if certificates is not None:
            report = msgspec.structs.replace(report, certificates=certificates)
            report = msgspec.structs.replace(report, problems=problems(report))
    if as_json:
        state.console.print_json(msgspec.json.encode(report).decode())
    else:
        _print(state, report)
    if report.problems:
        raise typer.Exit(EXIT_DOWN)
