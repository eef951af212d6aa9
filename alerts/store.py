"""Database adapter of the alerts job and of the `cityhub alerts` commands.

What it reads:

- the active devices of each type with their site and district, and each
  site's name and current ward/commune (for the alerts' texts);
- samples from ``readings_{type}``: per device, the rows after its cursor up
  to an evaluation time (optionally only the newest N): a LATERAL index scan
  of the key (device_id, ts, seq) per device (kept a nested loop, with a
  constant lower bound for chunk exclusion), the rows packed by the server
  into one bytea of fixed-width records (device index, time, a float8 per
  metric with NaN for NULL) that numpy reads in one call (bench/RESULTS.md
  compares this with COPY TO STDOUT and with row fetching);
- to rebuild the AQI job's state, the AQI pollutants' hourly means of
  finished hours from the hourly rollup ``readings_air_quality_1h``, and
  hourly sums from raw rows only for the hours the rollup does not hold;
- the job's state (``alert_jobs``) and the open alerts;
- the alerts to notify (``notify_rows``): given ones, or the active and the
  recently cleared, with their device, site, ward and former severities.

Outside the evaluations it records the notifier's last successful post and
last error in ``alert_jobs`` (``record_notified``, ``record_notify_error``)
for ``job_status``, and the Alertmanager silences of acknowledged alerts:
which to create or expire (``silences_due``), each id once it exists
(``set_silence``, conditional, so a command and the job racing keep one) and
gone once expired (``forget_silence``).

Operators' changes (``ack``, ``assign``, ``comment``) each write, in one
transaction, the alert, a transition or an ``alert_notes`` row, and an
``audit_log`` row (subject kind ``alert``).

What it writes, in one transaction per evaluation time (``evaluation``): the
open alerts are read ``FOR UPDATE`` first (an operator's ack waits for the
job, and the job never overwrites an ack it has not seen), then raises
(``ON CONFLICT`` on the one-active-per-(rule, device) index: a repeated
evaluation inserts nothing), escalations and clears (each conditional on the
state it was planned from), a transition row for each (``ON CONFLICT DO
NOTHING`` on (alert_id, ts, to_state)), AQI rows (upserts) and the
evaluation time itself. A crash before the commit leaves nothing of that
evaluation, so the restarted job runs it again.

The connection and its error map are ``adapters.database``'s: an
unreachable or failing server is ``DatabaseUnavailableError`` (retry), a
missing table ``SchemaError``, a refused row ``RefusedByDatabaseError``.
Unknown or already acknowledged alerts are ``AlertNotFoundError`` /
``AlreadyAcknowledgedError``; assigning a cleared and acknowledged one
``AlertClosedError``. One job id holds an advisory lock for as long
as its connection lives: a second job of the same id gets ``JobLockedError``
(retryable: it waits as a standby).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Final

import msgspec
import numpy as np
from numpy.typing import NDArray

from adapters.database import Connection, Database
from alerts.aqijob import DailyRow, HourlyRow
from alerts.lifecycle import (
    Change,
    Clear,
    Escalate,
    OpenAlert,
    Raise,
    ack_state,
    check_assignable,
)
from alerts.notify import NotifyRow
from alerts.window import NO_TS, DeviceSet, FloatArray, IntArray, Samples
from contracts.catalog import DEVICE_TYPES, MetricKind
from contracts.errors import AlertNotFoundError, JobLockedError, SchemaError
from contracts.schema import check_schema_name, readings_table, rollup_table

# PostgreSQL's binary timestamptz: microseconds since 2000-01-01 UTC.
PG_EPOCH_MS: Final = 946_684_800_000
_MS: Final = "timestamptz 'epoch' + {} * interval '1 millisecond'"
_MS_OF: Final = "(extract(epoch FROM {}) * 1000)::int8"
_HOUR_MS: Final = 3_600_000


class AlertRow(msgspec.Struct, frozen=True, kw_only=True):
    alert_id: int
    rule_id: str
    device_id: str
    site_id: str | None
    severity: str
    state: str
    value: float | None
    message: str
    raised_at: datetime
    cleared_at: datetime | None
    acked_at: datetime | None
    acked_by: str | None
    updated_at: datetime
    description: str = ""
    assignee: str | None = None
    silence_id: str | None = None  # the Alertmanager silence of its acknowledgement
    ack_comment: str | None = None


class NoteRow(msgspec.Struct, frozen=True, kw_only=True):
    """An operator's comment on an alert, or an assignment (``text``: the assignee)."""

    ts: datetime
    operator: str
    kind: str  # comment | assign
    text: str


class SilenceDue(msgspec.Struct, frozen=True, kw_only=True):
    """An acknowledged active alert whose silence is missing, with what the silence says."""

    alert_id: int
    rule_id: str
    device_id: str
    severity: str
    acked_by: str
    ack_comment: str | None
    acked_at_ms: int


class SitePlace(msgspec.Struct, frozen=True, kw_only=True):
    """What the rules' texts say about a site: its name and its current ward/commune."""

    name: str
    ward: str  # "" when the site has no unit yet


class JobStatus(msgspec.Struct, frozen=True, kw_only=True):
    """The job's stored state: its last evaluation and its notifier's last post and error."""

    job_id: str
    last_eval_at: datetime
    notified_at: datetime | None
    notify_error: str | None
    notify_error_at: datetime | None

    @property
    def alertmanager_reachable(self) -> bool | None:
        """Whether the last post succeeded; None before any post or error."""
        if self.notify_error_at is None:
            return None if self.notified_at is None else True
        return self.notified_at is not None and self.notified_at > self.notify_error_at


class TransitionRow(msgspec.Struct, frozen=True, kw_only=True):
    ts: datetime
    from_state: str | None
    to_state: str
    severity: str
    value: float | None
    note: str


class AlertFilter(msgspec.Struct, frozen=True, kw_only=True):
    states: tuple[str, ...] = ()
    severities: tuple[str, ...] = ()
    site_id: str | None = None
    rule_id: str | None = None
    device_id: str | None = None
    since: datetime | None = None
    limit: int = 100


_ALERT_COLUMNS: Final = (
    "alert_id, rule_id, device_id, site_id, severity, state, value, message, "
    "raised_at, cleared_at, acked_at, acked_by, updated_at, description, assignee, silence_id,"
    " ack_comment"
)


def _alert(row: Sequence[Any]) -> AlertRow:
    return AlertRow(
        alert_id=row[0],
        rule_id=row[1],
        device_id=row[2],
        site_id=row[3],
        severity=row[4],
        state=row[5],
        value=row[6],
        message=row[7],
        raised_at=row[8],
        cleared_at=row[9],
        acked_at=row[10],
        acked_by=row[11],
        updated_at=row[12],
        description=row[13],
        assignee=row[14],
        silence_id=row[15],
        ack_comment=row[16],
    )


def _metric_expr(device_type: str, metric: str) -> str:
    kind = DEVICE_TYPES[device_type].metric(metric).kind
    column = f"{metric}::int" if kind is MetricKind.BOOL else metric
    return f"coalesce({column}::float8, 'NaN'::float8)"


def record_dtype(metrics: Sequence[str]) -> np.dtype[Any]:
    """One fetched sample as the server packs it: int4 index, timestamptz, float8 per metric."""
    fields = [("i", ">i4"), ("ts", ">i8")] + [(f"m{k}", ">f8") for k in range(len(metrics))]
    return np.dtype(fields)


def parse_samples(data: bytes, metrics: Sequence[str]) -> Samples:
    """Samples from the packed records of ``fetch_samples`` (big-endian, fixed width)."""
    dtype = record_dtype(metrics)
    if len(data) % dtype.itemsize:
        raise SchemaError(f"unexpected sample records: {len(data)} bytes")
    records = np.frombuffer(data, dtype)
    return Samples(
        device_index=records["i"].astype(np.int64),
        # timestamptz travels as microseconds since 2000-01-01 UTC.
        ts_ms=records["ts"].astype(np.int64) // 1000 + PG_EPOCH_MS,
        values={m: records[f"m{k}"].astype(np.float64) for k, m in enumerate(metrics)},
    )


# The shared scan of recent rows starts at the cursor of this quantile of
# the devices (the 10 % furthest behind are read device by device, so one
# device that was away does not widen the scan for all), and never further
# back than RECENT_SPAN_MS before the newest cursor.
RECENT_QUANTILE: Final = 0.1
RECENT_SPAN_MS: Final = 120_000
# The shared scan pays when it serves at least this many devices.
RECENT_MIN_DEVICES: Final = 256


def _recent(since: IntArray) -> NDArray[np.bool_]:
    """Which cursors the shared scan of recent rows serves (see RECENT_QUANTILE)."""
    known = since >= 0
    if int(known.sum()) < RECENT_MIN_DEVICES:
        return np.zeros(len(since), bool)
    cursors = since[known]
    start = max(
        int(np.quantile(cursors, RECENT_QUANTILE, method="lower")),
        int(cursors.max()) - RECENT_SPAN_MS,
    )
    recent = known & (since >= start)
    return recent if int(recent.sum()) >= RECENT_MIN_DEVICES else np.zeros(len(since), bool)


def _joined(values: Sequence[object]) -> str:
    """A list as one comma-separated parameter (ids are allow-listed: no commas)."""
    return ",".join(map(str, values))


class AlertStore:
    """One database connection. Thread-safe: one call at a time."""

    def __init__(
        self,
        *,
        url: str,
        schema: str,
        job_id: str | None = None,
        connect_timeout_s: float = 5.0,
        os_user: str = "",
    ) -> None:
        self.url = url
        self.schema = check_schema_name(schema)
        self.job_id = job_id
        self.connect_timeout_s = connect_timeout_s
        # The OS user of the `cityhub alerts` command, for the audit log's os_user.
        self.os_user = os_user
        self._db = Database(
            url=url,
            schema=self.schema,
            application_name="cityhub-alerts",
            connect_timeout_s=connect_timeout_s,
            on_connect=None if job_id is None and not os_user else self._on_connect,
        )

    # -- connection ------------------------------------------------------------

    def interrupt(self) -> None:
        """Cut the connection under a call that hangs (any thread): the call fails at once."""
        self._db.interrupt()

    def _on_connect(self, conn: Connection[Any]) -> None:
        if self.os_user:
            conn.execute("SELECT set_config('cityhub.os_user', %s, false)", (self.os_user,))
        if self.job_id is not None:
            self._lock_job(conn)

    def _lock_job(self, conn: Connection[Any]) -> None:
        """Hold the job id's advisory lock for as long as the connection lives."""
        row = conn.execute(
            "SELECT pg_try_advisory_lock(hashtext('cityhub.alerts.' || %s || '.' || %s))",
            (self.schema, self.job_id),
        ).fetchone()
        if not (row and row[0]):
            raise JobLockedError(
                f"another alerts job {self.job_id!r} is running on schema {self.schema!r}"
            )

    def connect(self) -> None:
        self._db.connect()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> AlertStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the job's reads ----------------------------------------------------------

    def devices(self) -> dict[str, DeviceSet]:
        """Active devices by type, ordered by id, with their site and the site's district."""
        with self._db.session("devices") as conn:
            rows = conn.execute(
                f"""SELECT d.device_type, d.device_id, d.site_id, coalesce(s.district, '')
                FROM {self.schema}.devices d JOIN {self.schema}.sites s USING (site_id)
                WHERE d.status = 'active' ORDER BY d.device_type, d.device_id"""
            ).fetchall()
        grouped: dict[str, list[tuple[str, str, str]]] = {t: [] for t in DEVICE_TYPES}
        for device_type, device_id, site_id, district in rows:
            grouped.setdefault(device_type, []).append((device_id, site_id, district))
        return {
            t: DeviceSet(
                tuple(r[0] for r in items), tuple(r[1] for r in items), tuple(r[2] for r in items)
            )
            for t, items in grouped.items()
        }

    def site_places(self) -> dict[str, SitePlace]:
        """Every site's name and current ward/commune name, by site id."""
        with self._db.session("sites") as conn:
            rows = conn.execute(
                f"""SELECT s.site_id, s.name, coalesce(u.name, '')
                FROM {self.schema}.sites s
                LEFT JOIN {self.schema}.admin_units u USING (unit_code)"""
            ).fetchall()
        return {site_id: SitePlace(name=name, ward=ward) for site_id, name, ward in rows}

    def fetch_samples(
        self,
        *,
        device_type: str,
        metrics: Sequence[str],
        device_ids: Sequence[str],
        device_index: IntArray,
        since_ms: IntArray,
        upto_ms: int,
        newest: int | None = None,
    ) -> Samples:
        """Rows with since_ms[k] < ts <= upto_ms of each device (only its ``newest``, if given).

        ``device_index[k]`` is what the rows of ``device_ids[k]`` carry.
        """
        if not len(device_ids):
            return Samples(
                device_index=np.empty(0, np.int64),
                ts_ms=np.empty(0, np.int64),
                values={m: np.empty(0, np.float64) for m in metrics},
            )
        packed = " || ".join(
            ["int4send(c.i)", "timestamptz_send(r.ts)"]
            + [f"float8send({_metric_expr(device_type, m)})" for m in metrics]
        )
        since = np.where(since_ms == NO_TS, -1, since_ms)  # NO_TS: from 1970 (no reading is older)
        # Devices whose cursor is recent are read by one scan of the recent
        # rows (the data table's BRIN index on ts); the rest, and the newest
        # rows of a start-up, device by device along the key.
        recent = np.zeros(len(since), bool) if newest is not None else _recent(since)
        with self._db.session("fetch samples") as conn:
            # JIT compiling this plan (its estimated cost passes jit_above_cost
            # once hours are stored) costs more than running it.
            conn.execute("SET jit = off")
            data = b""
            if recent.any():
                data += self._fetch_recent(
                    conn,
                    device_type=device_type,
                    packed=packed,
                    device_index=device_index[recent],
                    device_ids=[d for d, r in zip(device_ids, recent.tolist(), strict=True) if r],
                    since=since[recent],
                    upto_ms=upto_ms,
                )
            if not recent.all():
                data += self._fetch_each(
                    conn,
                    device_type=device_type,
                    packed=packed,
                    device_index=device_index[~recent],
                    device_ids=[
                        d for d, r in zip(device_ids, recent.tolist(), strict=True) if not r
                    ],
                    since=since[~recent],
                    upto_ms=upto_ms,
                    newest=newest,
                )
        return parse_samples(data, metrics)

    def _fetch_recent(
        self,
        conn: Connection[Any],
        *,
        device_type: str,
        packed: str,
        device_index: IntArray,
        device_ids: Sequence[str],
        since: IntArray,
        upto_ms: int,
    ) -> bytes:
        """Packed rows with since[k] < ts <= upto_ms: one scan from the oldest cursor on.

        The scan of the rows after ``since.min()`` (recent by ``_recent``'s
        choice: a cycle or two of readings) is materialised first and joined
        to the devices by hash, so each device costs a hash probe, not an
        index descent per chunk.
        """
        sql = f"""WITH fresh AS MATERIALIZED (
                SELECT * FROM {self.schema}.{readings_table(device_type)} r
                WHERE r.ts > {_MS.format("%s")} AND r.ts <= {_MS.format("%s")})
            SELECT string_agg({packed}, ''::bytea)
            FROM unnest(string_to_array(%s, ',')::int4[], string_to_array(%s, ','),
                string_to_array(%s, ',')::int8[]) AS c (i, device_id, since_ms)
            JOIN fresh r ON r.device_id = c.device_id
            WHERE r.ts > {_MS.format("c.since_ms")}"""
        params = [
            int(since.min()),
            upto_ms,
            _joined(device_index.tolist()),
            _joined(device_ids),
            _joined(since.tolist()),
        ]
        row = conn.execute(sql, params, binary=True).fetchone()
        return bytes(row[0]) if row and row[0] is not None else b""

    def _fetch_each(
        self,
        conn: Connection[Any],
        *,
        device_type: str,
        packed: str,
        device_index: IntArray,
        device_ids: Sequence[str],
        since: IntArray,
        upto_ms: int,
        newest: int | None,
    ) -> bytes:
        """Packed rows with since[k] < ts <= upto_ms (only the ``newest``): per device."""
        # OFFSET 0 keeps the planner from flattening the LATERAL into a hash
        # join over every chunk up to upto_ms (a scan of all stored history);
        # the constant lower bound (the oldest cursor) lets it skip the
        # chunks no device needs.
        order = "ORDER BY r.ts DESC LIMIT %s" if newest is not None else "OFFSET 0"
        # One row holding every sample packed as fixed-width binary records:
        # numpy reads them in one call, with no Python object per row or value.
        # The per-device lists travel as single comma-separated strings, which
        # cost nothing to send next to psycopg dumping 10k-element arrays.
        sql = f"""SELECT string_agg({packed}, ''::bytea)
            FROM unnest(string_to_array(%s, ',')::int4[], string_to_array(%s, ','),
                string_to_array(%s, ',')::int8[]) AS c (i, device_id, since_ms)
            CROSS JOIN LATERAL (
                SELECT * FROM {self.schema}.{readings_table(device_type)} r
                WHERE r.device_id = c.device_id
                AND r.ts > {_MS.format("c.since_ms")} AND r.ts > {_MS.format("%s")}
                AND r.ts <= {_MS.format("%s")}
                {order}) r"""
        params: list[Any] = [
            _joined(device_index.tolist()),
            _joined(device_ids),
            _joined(since.tolist()),
            int(since.min()),
            upto_ms,
        ]
        if newest is not None:
            params.append(newest)
        row = conn.execute(sql, params, binary=True).fetchone()
        return bytes(row[0]) if row and row[0] is not None else b""

    def hourly_sums(
        self,
        *,
        metrics: Sequence[str],
        device_ids: Sequence[str],
        from_ms: int,
        upto_ms: int,
        before_ms: int | None = None,
    ) -> tuple[IntArray, IntArray, FloatArray, FloatArray]:
        """Air-quality (device index, hour number, counts (k, m), sums (k, m)) in the range.

        Hour number: whole hours since the Unix epoch; raw rows with
        from_ms <= ts <= upto_ms (and ts < before_ms, if given), read per
        device along the key (device_id, ts).
        """
        columns = "".join(f", count({m}), coalesce(sum({m}), 0)" for m in metrics)
        before = "" if before_ms is None else f"AND r.ts < {_MS.format('%s')}"
        params: list[Any] = [list(range(len(device_ids))), list(device_ids), from_ms, upto_ms]
        if before_ms is not None:
            params.append(before_ms)
        with self._db.session("hourly sums") as conn:
            rows = conn.execute(
                f"""SELECT c.i, floor(extract(epoch FROM r.ts) / 3600)::int8 AS hour{columns}
                    FROM unnest(%s::int4[], %s::text[]) AS c (i, device_id)
                    CROSS JOIN LATERAL (
                        SELECT * FROM {self.schema}.{readings_table("air_quality")} r
                        WHERE r.device_id = c.device_id
                        AND r.ts >= {_MS.format("%s")} AND r.ts <= {_MS.format("%s")}
                        {before}) r
                    GROUP BY 1, 2""",
                params,
            ).fetchall()
        m = len(metrics)
        if not rows:
            empty = np.empty((0, m), np.float64)
            return np.empty(0, np.int64), np.empty(0, np.int64), empty, empty.copy()
        table = np.array(rows, np.float64)
        counts = table[:, 2::2]
        sums = table[:, 3::2]
        return table[:, 0].astype(np.int64), table[:, 1].astype(np.int64), counts, sums

    def rollup_hourly_means(
        self,
        *,
        metrics: Sequence[str],
        device_ids: Sequence[str],
        from_hour: int,
        to_hour: int,
    ) -> tuple[IntArray, IntArray, FloatArray, FloatArray]:
        """Air-quality (device index, hour number, readings (k,), means (k, m)) from the rollup.

        The finished hours from_hour <= hour < to_hour that ``readings_air_quality_1h``
        holds (NaN: no value of that metric in the hour), packed by the server
        as fixed-width records like ``fetch_samples``. An hour it does not hold
        for a device has no row: not rolled up yet, or nothing was read.
        """
        m = len(metrics)
        packed = " || ".join(
            ["int4send(c.i)", "int8send(floor(extract(epoch FROM r.bucket) / 3600)::int8)"]
            + ["float8send(r.n::float8)"]
            + [f"float8send(coalesce({x}_avg::float8, 'NaN'::float8))" for x in metrics]
        )
        with self._db.session("hourly rollups") as conn:
            row = conn.execute(
                f"""SELECT string_agg({packed}, ''::bytea)
                    FROM unnest(string_to_array(%s, ',')::int4[], string_to_array(%s, ','))
                        AS c (i, device_id)
                    CROSS JOIN LATERAL (
                        SELECT * FROM {self.schema}.{rollup_table("air_quality")} r
                        WHERE r.device_id = c.device_id
                        AND r.bucket >= {_MS.format("%s")} AND r.bucket < {_MS.format("%s")}) r""",
                [
                    _joined(range(len(device_ids))),
                    _joined(device_ids),
                    from_hour * _HOUR_MS,
                    to_hour * _HOUR_MS,
                ],
                binary=True,
            ).fetchone()
        data = row[0] if row and row[0] is not None else b""
        fields = [("i", ">i4"), ("hour", ">i8"), ("n", ">f8")]
        dtype = np.dtype(fields + [(f"m{k}", ">f8") for k in range(m)])
        if len(data) % dtype.itemsize:
            raise SchemaError(f"unexpected rollup records: {len(data)} bytes")
        records = np.frombuffer(data, dtype)
        means = np.empty((len(records), m), np.float64)
        for k in range(m):
            means[:, k] = records[f"m{k}"]
        return (
            records["i"].astype(np.int64),
            records["hour"].astype(np.int64),
            records["n"].astype(np.float64),
            means,
        )

    def last_evaluation_ms(self) -> int | None:
        if self.job_id is None:
            raise ValueError("no job id")
        with self._db.session("job state") as conn:
            row = conn.execute(
                f"SELECT {_MS_OF.format('last_eval_at')} FROM {self.schema}.alert_jobs "
                "WHERE job_id = %s",
                (self.job_id,),
            ).fetchone()
        return None if row is None else int(row[0])

    # -- notifications ---------------------------------------------------------------

    def notify_rows(
        self, *, alert_ids: Sequence[int] | None = None, cleared_since_ms: int = 0
    ) -> list[NotifyRow]:
        """The alerts ``alert_ids``, or (None) every active one and those cleared since then.

        Each with its device's type and label, its site's name, ward/commune
        and former district, and the severities it held before its current
        one with the time each was left (an escalation's ``superseded``).
        """
        params: list[Any]
        if alert_ids is not None:
            if not alert_ids:
                return []
            condition, params = "a.alert_id = ANY(%s)", [list(alert_ids)]
        else:
            condition = (
                f"a.state IN ('active_unack', 'active_ack') OR a.cleared_at >= {_MS.format('%s')}"
            )
            params = [cleared_since_ms]
        with self._db.session("alerts to notify") as conn:
            rows = conn.execute(
                f"""SELECT a.alert_id, a.rule_id, a.device_id, a.severity, a.state, a.value,
                    a.message, {_MS_OF.format("a.raised_at")}, {_MS_OF.format("a.cleared_at")},
                    coalesce(d.device_type, ''), coalesce(d.label, ''), a.site_id,
                    coalesce(s.name, ''), s.unit_code, u.name, s.district
                FROM {self.schema}.alerts a
                LEFT JOIN {self.schema}.devices d ON d.device_id = a.device_id
                LEFT JOIN {self.schema}.sites s ON s.site_id = a.site_id
                LEFT JOIN {self.schema}.admin_units u ON u.unit_code = s.unit_code
                WHERE {condition} ORDER BY a.alert_id""",
                params,
            ).fetchall()
            ids = [r[0] for r in rows]
            # A severity ends where the next transition has another one.
            left = conn.execute(
                f"""SELECT alert_id, severity, {_MS_OF.format("max(next_ts)")} FROM (
                    SELECT alert_id, severity, lead(severity) OVER w AS next_severity,
                        lead(ts) OVER w AS next_ts
                    FROM {self.schema}.alert_transitions WHERE alert_id = ANY(%s)
                    WINDOW w AS (PARTITION BY alert_id
                        ORDER BY ts, CASE WHEN from_state IS NULL THEN 0 ELSE 1 END)) t
                WHERE next_severity IS NOT NULL AND next_severity <> severity
                GROUP BY alert_id, severity ORDER BY 1, 3""",
                (ids,),
            ).fetchall()
        superseded: dict[int, list[tuple[str, int]]] = {}
        for alert_id, severity, left_ms in left:
            superseded.setdefault(alert_id, []).append((severity, int(left_ms)))
        return [
            NotifyRow(
                alert_id=r[0],
                rule_id=r[1],
                device_id=r[2],
                severity=r[3],
                state=r[4],
                value=r[5],
                message=r[6],
                raised_at_ms=int(r[7]),
                cleared_at_ms=None if r[8] is None else int(r[8]),
                device_type=r[9],
                device_label=r[10],
                site_id=r[11],
                site_name=r[12],
                ward_code=r[13],
                ward=r[14],
                district=r[15],
                superseded=tuple((sev, ms) for sev, ms in superseded.get(r[0], ()) if sev != r[3]),
            )
            for r in rows
        ]

    def alert_counts(self) -> dict[tuple[str, str], int]:
        """Alerts by (state, severity)."""
        with self._db.session("alert counts") as conn:
            rows = conn.execute(
                f"SELECT state, severity, count(*) FROM {self.schema}.alerts GROUP BY 1, 2"
            ).fetchall()
        return {(r[0], r[1]): int(r[2]) for r in rows}

    def record_notified(self, at_ms: int) -> None:
        """Alertmanager took a post at ``at_ms`` (no-op before the job's first evaluation)."""
        with self._db.session("notified") as conn:
            conn.execute(
                f"UPDATE {self.schema}.alert_jobs SET notified_at = {_MS.format('%s')} "
                "WHERE job_id = %s",
                (at_ms, self.job_id),
            )

    def record_notify_error(self, at_ms: int, error: str) -> None:
        """A post failed at ``at_ms`` with ``error`` (no-op before the first evaluation)."""
        with self._db.session("notify error") as conn:
            conn.execute(
                f"UPDATE {self.schema}.alert_jobs SET notify_error = %s, "
                f"notify_error_at = {_MS.format('%s')} WHERE job_id = %s",
                (error[:500], at_ms, self.job_id),
            )

    def job_status(self, job_id: str) -> JobStatus | None:
        """The stored state of job ``job_id``; None if it never completed an evaluation."""
        with self._db.session("job status") as conn:
            row = conn.execute(
                f"""SELECT job_id, last_eval_at, notified_at, notify_error, notify_error_at
                FROM {self.schema}.alert_jobs WHERE job_id = %s""",
                (job_id,),
            ).fetchone()
        if row is None:
            return None
        return JobStatus(
            job_id=row[0],
            last_eval_at=row[1],
            notified_at=row[2],
            notify_error=row[3],
            notify_error_at=row[4],
        )

    # -- one evaluation ------------------------------------------------------------

    @contextmanager
    def evaluation(self, ts_ms: int) -> Iterator[Evaluation]:
        """One evaluation time's transaction: committed with the job's state, or not at all."""
        if self.job_id is None:
            raise ValueError("no job id")
        with self._db.session("evaluation") as conn, conn.transaction():
            yield Evaluation(conn, self.schema)
            conn.execute(
                f"""INSERT INTO {self.schema}.alert_jobs (job_id, last_eval_at)
                    VALUES (%s, {_MS.format("%s")})
                    ON CONFLICT (job_id) DO UPDATE SET
                        last_eval_at = greatest(alert_jobs.last_eval_at, EXCLUDED.last_eval_at),
                        updated_at = now()""",
                (self.job_id, ts_ms),
            )

    # -- operators' side ------------------------------------------------------------

    def list_alerts(self, where: AlertFilter) -> list[AlertRow]:
        clauses: list[str] = []
        params: list[Any] = []
        if where.states:
            clauses.append("state = ANY(%s)")
            params.append(list(where.states))
        if where.severities:
            clauses.append("severity = ANY(%s)")
            params.append(list(where.severities))
        for column, value in (
            ("site_id", where.site_id),
            ("rule_id", where.rule_id),
            ("device_id", where.device_id),
        ):
            if value is not None:
                clauses.append(f"{column} = %s")
                params.append(value)
        if where.since is not None:
            clauses.append("(raised_at >= %s OR updated_at >= %s)")
            params += [where.since, where.since]
        condition = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        params.append(where.limit)
        with self._db.session("list alerts") as conn:
            rows = conn.execute(
                f"SELECT {_ALERT_COLUMNS} FROM {self.schema}.alerts {condition} "
                "ORDER BY raised_at DESC, alert_id DESC LIMIT %s",
                params,
            ).fetchall()
        return [_alert(r) for r in rows]

    def alert(self, alert_id: int) -> tuple[AlertRow, list[TransitionRow]]:
        """An alert and its transitions, oldest first; AlertNotFoundError if there is none."""
        with self._db.session("show alert") as conn:
            row = conn.execute(
                f"SELECT {_ALERT_COLUMNS} FROM {self.schema}.alerts WHERE alert_id = %s",
                (alert_id,),
            ).fetchone()
            if row is None:
                raise AlertNotFoundError(f"no alert with id {alert_id}")
            transitions = conn.execute(
                f"""SELECT ts, from_state, to_state, severity, value, note
                FROM {self.schema}.alert_transitions WHERE alert_id = %s
                ORDER BY ts, CASE WHEN from_state IS NULL THEN 0 ELSE 1 END""",
                (alert_id,),
            ).fetchall()
        return _alert(row), [
            TransitionRow(
                ts=t[0], from_state=t[1], to_state=t[2], severity=t[3], value=t[4], note=t[5]
            )
            for t in transitions
        ]

    def ack(self, alert_id: int, *, by: str, now_ms: int, comment: str | None = None) -> AlertRow:
        """Acknowledge one alert; AlertNotFoundError / AlreadyAcknowledgedError otherwise.

        ``comment`` (checked by the caller) goes into the transition's note and
        ``ack_comment``, for the silence. The row returned keeps the silence of
        an earlier acknowledgement, if the job has not expired it yet.
        """
        with self._db.session("ack") as conn, conn.transaction():
            row = conn.execute(
                f"SELECT state, severity, value FROM {self.schema}.alerts "
                "WHERE alert_id = %s FOR UPDATE",
                (alert_id,),
            ).fetchone()
            if row is None:
                raise AlertNotFoundError(f"no alert with id {alert_id}")
            state, severity, value = row
            new_state = ack_state(alert_id, state)
            updated = conn.execute(
                f"""UPDATE {self.schema}.alerts SET state = %s,
                        acked_at = {_MS.format("%s")}, acked_by = %s, ack_comment = %s,
                        updated_at = now()
                    WHERE alert_id = %s RETURNING {_ALERT_COLUMNS}""",
                (new_state, now_ms, by, comment, alert_id),
            ).fetchone()
            note = f"acknowledged by {by}" if by else "acknowledged"
            conn.execute(
                f"""INSERT INTO {self.schema}.alert_transitions
                    (alert_id, ts, from_state, to_state, severity, value, note)
                    VALUES (%s, {_MS.format("%s")}, %s, %s, %s, %s, %s)
                    ON CONFLICT DO NOTHING""",
                (
                    alert_id,
                    now_ms,
                    state,
                    new_state,
                    severity,
                    value,
                    f"{note}: {comment}" if comment else note,
                ),
            )
            _audit(
                conn,
                self.schema,
                by,
                "alert.ack",
                alert_id=alert_id,
                detail={"state": new_state, "comment": comment},
            )
        if updated is None:  # pragma: no cover - the row is locked above
            raise AlertNotFoundError(f"no alert with id {alert_id}")
        return _alert(updated)

    def _note(
        self, alert_id: int, *, by: str, now_ms: int, kind: str, text: str, assign: bool
    ) -> AlertRow:
        with self._db.session(kind) as conn, conn.transaction():
            row = conn.execute(
                f"SELECT state FROM {self.schema}.alerts WHERE alert_id = %s FOR UPDATE",
                (alert_id,),
            ).fetchone()
            if row is None:
                raise AlertNotFoundError(f"no alert with id {alert_id}")
            if assign:
                check_assignable(alert_id, row[0])
                conn.execute(
                    f"""UPDATE {self.schema}.alerts SET assignee = %s, updated_at = now()
                    WHERE alert_id = %s""",
                    (text, alert_id),
                )
            conn.execute(
                f"""INSERT INTO {self.schema}.alert_notes (alert_id, ts, operator, kind, text)
                VALUES (%s, {_MS.format("%s")}, %s, %s, %s)""",
                (alert_id, now_ms, by, kind, text),
            )
            _audit(conn, self.schema, by, f"alert.{kind}", alert_id=alert_id, detail={kind: text})
            updated = conn.execute(
                f"SELECT {_ALERT_COLUMNS} FROM {self.schema}.alerts WHERE alert_id = %s",
                (alert_id,),
            ).fetchone()
        if updated is None:  # pragma: no cover - the row is locked above
            raise AlertNotFoundError(f"no alert with id {alert_id}")
        return _alert(updated)

    def assign(self, alert_id: int, *, to: str, by: str, now_ms: int) -> AlertRow:
        """Assign the alert to ``to`` (checked by the caller); AlertClosedError if cleared_ack."""
        return self._note(alert_id, by=by, now_ms=now_ms, kind="assign", text=to, assign=True)

    def comment(self, alert_id: int, *, text: str, by: str, now_ms: int) -> AlertRow:
        """Add ``by``'s comment ``text`` (checked by the caller) to the alert."""
        return self._note(alert_id, by=by, now_ms=now_ms, kind="comment", text=text, assign=False)

    def notes(self, alert_id: int) -> list[NoteRow]:
        """The alert's comments and assignments, oldest first."""
        with self._db.session("alert notes") as conn:
            rows = conn.execute(
                f"""SELECT ts, operator, kind, text FROM {self.schema}.alert_notes
                WHERE alert_id = %s ORDER BY ts, note_id""",
                (alert_id,),
            ).fetchall()
        return [NoteRow(ts=r[0], operator=r[1], kind=r[2], text=r[3]) for r in rows]

    # -- silences -------------------------------------------------------------------

    def silences_due(
        self, *, now_ms: int, silence_s: float, alert_ids: Sequence[int] | None = None
    ) -> tuple[list[SilenceDue], list[tuple[int, str]]]:
        """(silences to create, (alert id, silence id) to expire), among ``alert_ids`` or all.

        To create: ``active_ack`` alerts without a silence, acknowledged less
        than ``silence_s`` ago (an older one's silence would be over already).
        To expire: silences of alerts no longer ``active_ack`` (cleared, or
        escalated and waiting for a new acknowledgement).
        """
        condition, params = "TRUE", []
        if alert_ids is not None:
            if not alert_ids:
                return [], []
            condition, params = "alert_id = ANY(%s)", [list(alert_ids)]
        with self._db.session("silences due") as conn:
            missing = conn.execute(
                f"""SELECT alert_id, rule_id, device_id, severity, coalesce(acked_by, ''),
                    ack_comment, {_MS_OF.format("acked_at")}
                FROM {self.schema}.alerts
                WHERE {condition} AND state = 'active_ack' AND silence_id IS NULL
                    AND acked_at > {_MS.format("%s")}
                ORDER BY alert_id""",
                [*params, now_ms - round(silence_s * 1000)],
            ).fetchall()
            stale = conn.execute(
                f"""SELECT alert_id, silence_id FROM {self.schema}.alerts
                WHERE {condition} AND silence_id IS NOT NULL AND state <> 'active_ack'
                ORDER BY alert_id""",
                params,
            ).fetchall()
        create = [
            SilenceDue(
                alert_id=r[0],
                rule_id=r[1],
                device_id=r[2],
                severity=r[3],
                acked_by=r[4],
                ack_comment=r[5],
                acked_at_ms=int(r[6]),
            )
            for r in missing
        ]
        return create, [(int(r[0]), str(r[1])) for r in stale]

    def set_silence(self, alert_id: int, silence_id: str, *, replacing: str | None = None) -> bool:
        """Record the alert's silence if it is still ``active_ack`` with silence ``replacing``.

        False (nothing stored) when another silence was recorded meanwhile or
        the alert changed state: the caller expires the one it created.
        """
        with self._db.session("set silence") as conn:
            row = conn.execute(
                f"""UPDATE {self.schema}.alerts SET silence_id = %s
                WHERE alert_id = %s AND state = 'active_ack'
                    AND silence_id IS NOT DISTINCT FROM %s
                RETURNING alert_id""",
                (silence_id, alert_id, replacing),
            ).fetchone()
        return row is not None

    def forget_silence(self, alert_id: int, silence_id: str) -> None:
        """The alert's silence ``silence_id`` is expired: no silence is recorded any more."""
        with self._db.session("forget silence") as conn:
            conn.execute(
                f"""UPDATE {self.schema}.alerts SET silence_id = NULL
                WHERE alert_id = %s AND silence_id = %s""",
                (alert_id, silence_id),
            )


def _audit(
    conn: Connection[Any], schema: str, by: str, action: str, *, alert_id: int, detail: Any
) -> None:
    """An ``audit_log`` row for an operator's change to an alert (in the caller's transaction)."""
    conn.execute(
        f"""INSERT INTO {schema}.audit_log (operator, action, subject_kind, subject_id, detail)
        VALUES (%s, %s, 'alert', %s, %s::jsonb)""",
        (by, action, str(alert_id), json.dumps(detail, sort_keys=True, ensure_ascii=False)),
    )


# One alert_transitions row: alert id, time, from state, to state, severity, value, note.
_Transition = tuple[int, int, str | None, str, str, float | None, str]


class Evaluation:
    """Inside one evaluation's transaction: open alerts, changes, AQI rows."""

    def __init__(self, conn: Connection[Any], schema: str) -> None:
        self._conn = conn
        self._s = schema

    def open_alerts(self) -> dict[str, dict[str, OpenAlert]]:
        """Active alerts by rule, then device; locked until the evaluation commits."""
        rows = self._conn.execute(
            f"""SELECT alert_id, rule_id, device_id, state, severity FROM {self._s}.alerts
            WHERE state IN ('active_unack', 'active_ack') ORDER BY alert_id FOR UPDATE"""
        ).fetchall()
        result: dict[str, dict[str, OpenAlert]] = {}
        for alert_id, rule_id, device_id, state, severity in rows:
            result.setdefault(rule_id, {})[device_id] = OpenAlert(
                alert_id=alert_id,
                rule_id=rule_id,
                device_id=device_id,
                state=state,
                severity=severity,
            )
        return result

    def apply(self, changes: Sequence[Change]) -> dict[tuple[str, str], int]:
        """Store the changes and their transitions; returns (rule, device) -> id of new alerts."""
        raised, transitions = self._raise([c for c in changes if isinstance(c, Raise)])
        transitions += self._escalate([c for c in changes if isinstance(c, Escalate)])
        transitions += self._clear([c for c in changes if isinstance(c, Clear)])
        self._record(transitions)
        return raised

    def _raise(
        self, raises: Sequence[Raise]
    ) -> tuple[dict[tuple[str, str], int], list[_Transition]]:
        """New alerts; one already active for the (rule, device) makes its raise a no-op."""
        if not raises:
            return {}, []
        rows = self._conn.execute(
            f"""INSERT INTO {self._s}.alerts (rule_id, device_id, site_id, severity, state,
                value, message, description, raised_at)
            SELECT u.rule_id, u.device_id, u.site_id, u.severity, 'active_unack', u.value,
                u.message, u.description, {_MS.format("u.ts_ms")}
            FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::float8[],
                %s::text[], %s::text[], %s::int8[])
                AS u (rule_id, device_id, site_id, severity, value, message, description, ts_ms)
            ON CONFLICT (rule_id, device_id) WHERE state IN ('active_unack', 'active_ack')
            DO NOTHING
            RETURNING alert_id, rule_id, device_id""",
            (
                [c.rule_id for c in raises],
                [c.device_id for c in raises],
                [c.site_id for c in raises],
                [c.severity for c in raises],
                [c.value for c in raises],
                [c.message for c in raises],
                [c.description for c in raises],
                [c.ts_ms for c in raises],
            ),
        ).fetchall()
        raised = {(r[1], r[2]): int(r[0]) for r in rows}
        transitions: list[_Transition] = []
        for c in raises:
            alert_id = raised.get((c.rule_id, c.device_id))
            if alert_id is not None:
                transitions.append(
                    (alert_id, c.ts_ms, None, "active_unack", c.severity, c.value, "raised")
                )
        return raised, transitions

    def _escalate(self, escalations: Sequence[Escalate]) -> list[_Transition]:
        """Severity changes, each only if the alert is still in the state it was planned from."""
        if not escalations:
            return []
        done = {
            int(r[0])
            for r in self._conn.execute(
                f"""UPDATE {self._s}.alerts a SET severity = u.severity, state = u.to_state,
                    value = u.value, message = u.message, description = u.description,
                    acked_at = NULL, acked_by = NULL, ack_comment = NULL, updated_at = now()
                FROM unnest(%s::int8[], %s::text[], %s::text[], %s::text[], %s::float8[],
                    %s::text[], %s::text[])
                    AS u (alert_id, from_state, to_state, severity, value, message, description)
                WHERE a.alert_id = u.alert_id AND a.state = u.from_state
                RETURNING a.alert_id""",
                (
                    [c.alert_id for c in escalations],
                    [c.from_state for c in escalations],
                    [c.to_state for c in escalations],
                    [c.severity for c in escalations],
                    [c.value for c in escalations],
                    [c.message for c in escalations],
                    [c.description for c in escalations],
                ),
            ).fetchall()
        }
        return [
            (
                c.alert_id,
                c.ts_ms,
                c.from_state,
                c.to_state,
                c.severity,
                c.value,
                f"escalated {c.from_severity} -> {c.severity}",
            )
            for c in escalations
            if c.alert_id in done
        ]

    def _clear(self, clears: Sequence[Clear]) -> list[_Transition]:
        """Clears, each only if the alert is still in the state it was planned from."""
        if not clears:
            return []
        done = {
            int(r[0])
            for r in self._conn.execute(
                f"""UPDATE {self._s}.alerts a SET state = u.to_state,
                    cleared_at = {_MS.format("u.ts_ms")}, value = u.value, updated_at = now()
                FROM unnest(%s::int8[], %s::text[], %s::text[], %s::float8[], %s::int8[])
                    AS u (alert_id, from_state, to_state, value, ts_ms)
                WHERE a.alert_id = u.alert_id AND a.state = u.from_state
                RETURNING a.alert_id""",
                (
                    [c.alert_id for c in clears],
                    [c.from_state for c in clears],
                    [c.to_state for c in clears],
                    [c.value for c in clears],
                    [c.ts_ms for c in clears],
                ),
            ).fetchall()
        }
        return [
            (c.alert_id, c.ts_ms, c.from_state, c.to_state, c.severity, c.value, "cleared")
            for c in clears
            if c.alert_id in done
        ]

    def _record(self, transitions: Sequence[_Transition]) -> None:
        """A transition row for each change that applied (a repeated one is stored once)."""
        if not transitions:
            return
        columns = list(zip(*transitions, strict=True))
        self._conn.execute(
            f"""INSERT INTO {self._s}.alert_transitions
            (alert_id, ts, from_state, to_state, severity, value, note)
            SELECT u.alert_id, {_MS.format("u.ts_ms")}, u.from_state, u.to_state,
                u.severity, u.value, u.note
            FROM unnest(%s::int8[], %s::int8[], %s::text[], %s::text[], %s::text[],
                %s::float8[], %s::text[])
                AS u (alert_id, ts_ms, from_state, to_state, severity, value, note)
            ON CONFLICT DO NOTHING""",
            [list(c) for c in columns],
        )

    def write_aqi(self, hourly: Sequence[HourlyRow], daily: Sequence[DailyRow]) -> None:
        """Upsert hourly and daily AQI rows (recomputed hours replace what was there)."""
        if hourly:
            self._conn.execute(
                f"""INSERT INTO {self._s}.aqi_hourly (ts, device_id, site_id, vn_aqi, dominant,
                    band, aqi_pm25, aqi_pm10, aqi_no2, aqi_o3, nowcast_pm25, nowcast_pm10,
                    us_aqi_pm25)
                SELECT {_MS.format("u.ts_ms")}, u.device_id, u.site_id, u.vn_aqi, u.dominant,
                    u.band, u.aqi_pm25, u.aqi_pm10, u.aqi_no2, u.aqi_o3, u.nowcast_pm25,
                    u.nowcast_pm10, u.us_aqi_pm25
                FROM unnest(%s::int8[], %s::text[], %s::text[], %s::int4[], %s::text[],
                    %s::text[], %s::int4[], %s::int4[], %s::int4[], %s::int4[], %s::float4[],
                    %s::float4[], %s::int4[])
                    AS u (ts_ms, device_id, site_id, vn_aqi, dominant, band, aqi_pm25, aqi_pm10,
                    aqi_no2, aqi_o3, nowcast_pm25, nowcast_pm10, us_aqi_pm25)
                ON CONFLICT (device_id, ts) DO UPDATE SET site_id = EXCLUDED.site_id,
                    vn_aqi = EXCLUDED.vn_aqi, dominant = EXCLUDED.dominant,
                    band = EXCLUDED.band, aqi_pm25 = EXCLUDED.aqi_pm25,
                    aqi_pm10 = EXCLUDED.aqi_pm10, aqi_no2 = EXCLUDED.aqi_no2,
                    aqi_o3 = EXCLUDED.aqi_o3, nowcast_pm25 = EXCLUDED.nowcast_pm25,
                    nowcast_pm10 = EXCLUDED.nowcast_pm10, us_aqi_pm25 = EXCLUDED.us_aqi_pm25,
                    computed_at = now()""",
                _columns(hourly),
            )
        if daily:
            self._conn.execute(
                f"""INSERT INTO {self._s}.aqi_daily (day, device_id, site_id, vn_aqi, dominant,
                    band, aqi_pm25, aqi_pm10, aqi_no2, aqi_o3, us_aqi_pm25)
                SELECT date '0001-01-01' + (u.day_ordinal - 1), u.device_id, u.site_id,
                    u.vn_aqi, u.dominant, u.band, u.aqi_pm25, u.aqi_pm10, u.aqi_no2, u.aqi_o3,
                    u.us_aqi_pm25
                FROM unnest(%s::int4[], %s::text[], %s::text[], %s::int4[], %s::text[],
                    %s::text[], %s::int4[], %s::int4[], %s::int4[], %s::int4[], %s::int4[])
                    AS u (day_ordinal, device_id, site_id, vn_aqi, dominant, band, aqi_pm25,
                    aqi_pm10, aqi_no2, aqi_o3, us_aqi_pm25)
                ON CONFLICT (device_id, day) DO UPDATE SET site_id = EXCLUDED.site_id,
                    vn_aqi = EXCLUDED.vn_aqi, dominant = EXCLUDED.dominant,
                    band = EXCLUDED.band, aqi_pm25 = EXCLUDED.aqi_pm25,
                    aqi_pm10 = EXCLUDED.aqi_pm10, aqi_no2 = EXCLUDED.aqi_no2,
                    aqi_o3 = EXCLUDED.aqi_o3, us_aqi_pm25 = EXCLUDED.us_aqi_pm25,
                    computed_at = now()""",
                _columns(daily),
            )


def _columns(rows: Sequence[msgspec.Struct]) -> list[list[Any]]:
    """Struct rows as one list per field, in field order (for unnest)."""
    names = rows[0].__struct_fields__
    return [[getattr(r, n) for r in rows] for n in names]
