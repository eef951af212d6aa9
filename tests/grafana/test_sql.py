"""Every panel's SQL, expanded as Grafana's PostgreSQL datasource does, on a filled database.

One schema is filled once per session (tests/plugins/grafana.py: the simulated
Hanoi fleet through ingest's writer, rollups, the alerts job) and every
panel query of every board runs on it over the boards' default range (the
last 6 hours), read-only, with the template variables at "All": it must
return rows, and columns of the shape its panel type needs. A variable at
"All" takes every value its own query returns on that database, as Grafana
does, so a site added later (one without a ward, say) is in "All" too.
"""

from __future__ import annotations

import json
import re
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from cityhub.database import load_hanoi_sites, set_role_password
from contracts.catalog import SHIPPED_CATALOG
from contracts.geography import UNITS
from contracts.schema import online_sql
from grafana.boards import UNASSIGNED_TEXT, UNASSIGNED_UNIT
from grafana.macros import TimeRange, Variable, render_sql
from grafana.render import board_files
from grafana.sqlquery import POSTGRES_TYPE
from tests.plugins.database import drop_service_roles
from tests.plugins.grafana import BACKLOG_REFUSED_READINGS, FillReport, fill_schema

# psycopg type OIDs
TIMESTAMPTZ, TIMESTAMP, DATE = 1184, 1114, 1082
NUMERIC_TYPES = {20, 21, 23, 700, 701, 1700}  # int8, int2, int4, float4, float8, numeric
TEXT_TYPES = {25, 1043, 19}  # text, varchar, name


@dataclass(frozen=True)
class Filled:
    url: str
    schema: str
    report: FillReport


@pytest.fixture(scope="session")
def filled(pg_server) -> Iterator[Filled]:
    url = pg_server.url()
    schema = f"g_{uuid.uuid4().hex[:10]}"
    end_ms = int(time.time()) // 60 * 60_000
    with psycopg.connect(url, autocommit=True) as conn:
        report = fill_schema(conn, url, schema, end_ms=end_ms)
        yield Filled(url=url, schema=schema, report=report)
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        drop_service_roles(conn, schema)


@dataclass(frozen=True)
class PanelQuery:
    board: str
    panel_id: int
    panel_type: str
    title: str
    ref_id: str
    sql: str
    fmt: str

    def __str__(self) -> str:
        return f"{self.board}:{self.panel_id}{self.ref_id}"


def _panel_queries() -> list[PanelQuery]:
    queries = []
    for name, text in board_files().items():
        for panel in json.loads(text)["panels"]:
            for target in panel.get("targets", []):
                assert target["datasource"]["type"] == POSTGRES_TYPE
                queries.append(
                    PanelQuery(
                        board=name.removesuffix(".json"),
                        panel_id=panel["id"],
                        panel_type=panel["type"],
                        title=panel["title"],
                        ref_id=target["refId"],
                        sql=target["rawSql"],
                        fmt=target["format"],
                    )
                )
    return queries


def _variable_queries() -> dict[str, str]:
    found: dict[str, str] = {}
    for text in board_files().values():
        for variable in json.loads(text)["templating"]["list"]:
            found.setdefault(variable["name"], variable["query"])
    return found


PANEL_QUERIES = _panel_queries()
VARIABLES = _variable_queries()


def _time_range(report: FillReport) -> TimeRange:
    del report  # the boards' default range, up to now
    now = datetime.now(UTC)
    return TimeRange(now - timedelta(hours=6), now)


@pytest.fixture
def conn(filled: Filled) -> Iterator[psycopg.Connection]:
    with psycopg.connect(filled.url) as connection:
        connection.execute(f"SET search_path TO {filled.schema}, public")
        connection.execute("SET TRANSACTION READ ONLY")
        yield connection
        connection.rollback()


def _run(conn: psycopg.Connection, sql: str) -> tuple[list[tuple[str, int]], list[tuple]]:
    cur = conn.execute(sql)
    assert cur.description is not None
    columns = [(c.name, c.type_code) for c in cur.description]
    return columns, cur.fetchall()


def _all_values(conn: psycopg.Connection, name: str, variables: list[Variable], tr) -> Variable:
    """A variable at "All": every value its own query returns."""
    sql = render_sql(VARIABLES[name], time_range=tr, variables=variables)
    columns, rows = _run(conn, sql)
    names = [c for c, _ in columns]
    index = names.index("__value") if "__value" in names else 0
    values = tuple(str(row[index]) for row in rows)
    assert values, f"variable {name} has no values"
    return Variable(name=name, values=values, multi=True, include_all=True)


# Every variable, in dashboard order: each one's query sees those before it.
VARIABLE_ORDER = ("ward", "site", "device_type", "device")
HOAN_KIEM = next(u for u in UNITS if u.name == "Phường Hoàn Kiếm")


def _variables_at_all(conn: psycopg.Connection, tr: TimeRange, **chosen: str) -> list[Variable]:
    """Every variable at "All", except those in ``chosen`` (name -> one value)."""
    variables: list[Variable] = []
    for name in VARIABLE_ORDER:
        if name in chosen:
            variables.append(
                Variable(name=name, values=(chosen[name],), multi=True, include_all=True)
            )
        else:
            variables.append(_all_values(conn, name, variables, tr))
    return variables


@pytest.fixture
def all_variables(conn, filled) -> list[Variable]:
    return _variables_at_all(conn, _time_range(filled.report))


def test_the_fill_has_what_the_boards_show(filled: Filled) -> None:
    counts = filled.report.counts
    assert filled.report.readings > 10_000
    for table in (
        "alerts",
        "alert_transitions",
        "aqi_hourly",
        "aqi_daily",
        "rejects",
        "gateway_status",
        "gateway_status_history",
    ):
        assert counts[table] > 0, f"{table} is empty: {counts}"
    assert counts["gateway_status"] == 30  # one row per gateway, each site's


def test_variables_list_the_seeded_wards_sites_and_types(conn, filled, all_variables) -> None:
    by_name = {v.name: v for v in all_variables}
    seeded = {site.unit_code for site in load_hanoi_sites()}
    assert set(by_name["ward"].values) == seeded  # only units with a site, every site's unit
    assert HOAN_KIEM.code in seeded
    # Texts are the units' names, ordered by name (Grafana keeps the query's order).
    _, rows = _run(conn, render_sql(VARIABLES["ward"], time_range=_time_range(filled.report)))
    names = {u.code: u.name for u in UNITS}
    assert [text for text, _ in rows] == [names[code] for _, code in rows]
    ordered = conn.execute(
        "SELECT name FROM admin_units WHERE unit_code = ANY(%s) ORDER BY name", (list(seeded),)
    ).fetchall()
    assert [text for text, _ in rows] == [name for (name,) in ordered]
    assert len(by_name["site"].values) == 30
    assert set(by_name["device_type"].values) >= {"air_quality", "kiosk", "camera_counter"}


def _check_shape(query: PanelQuery, columns: list[tuple[str, int]]) -> None:
    names = [n for n, _ in columns]
    types = dict(columns)
    if query.fmt == "time_series":
        assert names[0] == "time", f"{query}: time series must start with time, got {names}"
        assert types["time"] in {TIMESTAMPTZ, TIMESTAMP}
        rest = columns[1:]
        texts = [n for n, t in rest if t in TEXT_TYPES]
        numbers = [n for n, t in rest if t in NUMERIC_TYPES]
        assert texts in ([], ["metric"]), f"{query}: text columns {texts}"
        assert numbers, f"{query}: no numeric column"
        assert len(texts) + len(numbers) == len(rest), f"{query}: odd columns {rest}"
        if texts:
            assert len(numbers) == 1, f"{query}: long format has one value column"
    if query.panel_type == "geomap":
        assert {"latitude", "longitude"} <= set(names), f"{query}: {names}"
        assert types["latitude"] in NUMERIC_TYPES
        assert types["longitude"] in NUMERIC_TYPES
    if query.panel_type in {"stat", "bargauge", "piechart"}:
        assert any(t in NUMERIC_TYPES for _, t in columns), f"{query}: nothing numeric"
    if query.panel_type in {"bargauge", "piechart"} and query.fmt == "table":
        assert any(t in TEXT_TYPES for _, t in columns), f"{query}: rows need a name column"


@pytest.mark.parametrize("query", PANEL_QUERIES, ids=str)
def test_panel_query_returns_rows_of_its_shape(conn, filled, all_variables, query) -> None:
    sql = render_sql(query.sql, time_range=_time_range(filled.report), variables=all_variables)
    assert "$" not in sql.replace("$fn$", ""), f"{query}: unexpanded: {sql}"
    columns, rows = _run(conn, sql)
    assert rows, f"{query} ({query.title}) returned no rows:\n{sql}"
    _check_shape(query, columns)
    if query.fmt == "time_series":
        times = [row[0] for row in rows]
        assert times == sorted(times), f"{query}: time series rows must be in time order"


@pytest.fixture
def reader_conn(filled: Filled) -> Iterator[psycopg.Connection]:
    """A connection as the schema's reader role (Grafana's login), with its own password."""
    password = secrets.token_urlsafe(18)
    with psycopg.connect(filled.url, autocommit=True) as owner:
        role = set_role_password(owner, schema=filled.schema, kind="reader", password=password)
    url = psycopg.conninfo.make_conninfo(filled.url, user=role, password=password)
    with psycopg.connect(url) as connection:
        assert connection.execute("SELECT session_user").fetchone() == (role,)
        connection.execute(f"SET search_path TO {filled.schema}, public")
        yield connection
        connection.rollback()


def test_every_panel_query_runs_as_the_reader_role_with_the_same_rows(
    conn, reader_conn, filled, all_variables
) -> None:
    """Grafana logs in as the reader role: each board's SQL needs nothing more than it has."""
    tr = _time_range(filled.report)
    reader_variables = _variables_at_all(reader_conn, tr)
    assert reader_variables == all_variables
    for query in PANEL_QUERIES:
        sql = render_sql(query.sql, time_range=tr, variables=all_variables)
        try:
            columns, rows = _run(reader_conn, sql)
        except psycopg.errors.InsufficientPrivilege as exc:
            pytest.fail(f"{query} ({query.title}) is refused to the reader role: {exc}\n{sql}")
        assert (columns, len(rows)) == (_run(conn, sql)[0], len(_run(conn, sql)[1])), query


def _rows(conn, query: PanelQuery, tr: TimeRange, variables) -> list[dict[str, object]]:
    columns, rows = _run(conn, render_sql(query.sql, time_range=tr, variables=variables))
    names = [n for n, _ in columns]
    return [dict(zip(names, row, strict=True)) for row in rows]


def test_ward_variable_filters_the_sites_and_their_panels(conn, filled) -> None:
    """One ward selected: its sites only, in the site variable, the map and the tables."""
    tr = _time_range(filled.report)
    variables = _variables_at_all(conn, tr, ward=HOAN_KIEM.code)
    mine = {s.site_id for s in load_hanoi_sites() if s.unit_code == HOAN_KIEM.code}
    assert len(mine) > 1
    site = next(v for v in variables if v.name == "site")
    assert set(site.values) == mine  # the site variable follows the ward

    site_map = next(q for q in PANEL_QUERIES if q.panel_type == "geomap" and q.ref_id == "A")
    rows = _rows(conn, site_map, tr, variables)
    assert {r["site_id"] for r in rows} == mine
    assert {r["ward"] for r in rows} == {HOAN_KIEM.name}
    assert {r["former_district"] for r in rows} == {"Hoàn Kiếm"}
    devices = _rows(conn, _panel("devices, last seen"), tr, variables)
    assert devices
    assert {r["Phường/Xã (ward/commune)"] for r in devices} == {HOAN_KIEM.name}
    attention = _rows(conn, _panel("sites needing attention"), tr, variables)
    assert {r["Phường/Xã (ward/commune)"] for r in attention} == {HOAN_KIEM.name}


def test_a_site_without_ward_or_district_is_in_all(filled) -> None:
    """A site stored before the geography (no unit, no former district) is not filtered out."""
    tr = _time_range(filled.report)
    with psycopg.connect(filled.url) as writable:
        writable.execute(f"SET search_path TO {filled.schema}, public")
        writable.execute(
            """INSERT INTO sites (site_id, name, kind, unit_code, district, latitude, longitude)
            VALUES ('old-site', 'Điểm cũ', 'ward_office', NULL, NULL, 21.03, 105.85)"""
        )
        writable.execute(
            """INSERT INTO devices (device_id, device_type, site_id, transport)
            VALUES ('kiosk-old-site-01', 'kiosk', 'old-site', 'mqtt')"""
        )
        variables = _variables_at_all(writable, tr)
        by_name = {v.name: v for v in variables}
        assert UNASSIGNED_UNIT in by_name["ward"].values
        assert "old-site" in by_name["site"].values
        _, ward_rows = _run(writable, render_sql(VARIABLES["ward"], time_range=tr))
        assert ward_rows[-1] == (UNASSIGNED_TEXT, UNASSIGNED_UNIT)  # listed last

        site_map = next(q for q in PANEL_QUERIES if q.panel_type == "geomap" and q.ref_id == "A")
        status = {r["site_id"]: r for r in _rows(writable, site_map, tr, variables)}
        assert status["old-site"]["ward"] == UNASSIGNED_TEXT
        assert status["old-site"]["former_district"] is None
        assert status["old-site"]["status"] == 2  # its kiosk never reported
        attention = _rows(writable, _panel("sites needing attention"), tr, variables)
        (old,) = [r for r in attention if r["Điểm (site)"] == "Điểm cũ"]
        assert old["Phường/Xã (ward/commune)"] == UNASSIGNED_TEXT
        assert old["Quận cũ (former district)"] is None
        assert old["Mất kết nối (offline)"] == 1
        assert len(attention) == 31  # every seeded site has devices too

        # Choosing a ward leaves it out; choosing "unassigned" shows it alone.
        one_ward = _variables_at_all(writable, tr, ward=HOAN_KIEM.code)
        assert "old-site" not in {r["site_id"] for r in _rows(writable, site_map, tr, one_ward)}
        unassigned = _variables_at_all(writable, tr, ward=UNASSIGNED_UNIT)
        assert [r["site_id"] for r in _rows(writable, site_map, tr, unassigned)] == ["old-site"]
        writable.rollback()


def test_the_silent_site_shows_offline_on_the_map(conn, filled, all_variables) -> None:
    site_map = next(q for q in PANEL_QUERIES if q.panel_type == "geomap" and q.ref_id == "A")
    sql = render_sql(site_map.sql, time_range=_time_range(filled.report), variables=all_variables)
    columns, rows = _run(conn, sql)
    names = [n for n, _ in columns]
    status = {row[names.index("site_id")]: row[names.index("status")] for row in rows}
    assert status["hk-ward-hang-bac"] == 2
    assert 0 in status.values()


def test_push_reads_the_transitions_and_plans_each_once(filled: Filled) -> None:
    from grafana.annotations import existing_keys, plan_annotations
    from grafana.push import read_transitions

    end = datetime.now(UTC) + timedelta(minutes=1)
    with psycopg.connect(filled.url, autocommit=True) as connection:
        transitions = read_transitions(
            connection, schema=filled.schema, start=end - timedelta(hours=8), end=end
        )
    assert len(transitions) == filled.report.counts["alert_transitions"]
    assert all(t.device_type for t in transitions)
    planned = plan_annotations(transitions, set())
    assert len(planned) == len(transitions)
    returned: list[dict[str, object]] = [{"tags": list(a.tags)} for a in planned]
    assert plan_annotations(transitions, existing_keys(returned)) == []


def _panel(title_part: str) -> PanelQuery:
    """A panel of the city boards (the drill-down boards repeat some titles)."""
    (query,) = [
        q for q in PANEL_QUERIES if title_part in q.title and q.board not in {"site", "device"}
    ]
    return query


def test_gateway_status_shows_the_silent_gateway_offline_and_the_backlog(
    conn, filled, all_variables
) -> None:
    from tests.plugins.grafana import BACKLOG_GATEWAY, SILENT_SITE

    tr = _time_range(filled.report)
    status = _panel("latest gateway status")
    columns, rows = _run(conn, render_sql(status.sql, time_range=tr, variables=all_variables))
    names = [n for n, _ in columns]
    by_gateway = {row[0]: dict(zip(names, row, strict=True)) for row in rows}
    assert len(by_gateway) == 30
    assert by_gateway[f"gw-{SILENT_SITE}"]["Trạng thái (status)"] == 2  # its Will: offline
    assert rows[0][0] == f"gw-{SILENT_SITE}"  # the worst first
    live = [g for g in by_gateway.values() if g["Trạng thái (status)"] in (0, 1)]
    assert len(live) == 29
    assert all(g["Bản tin/giây (readings/s)"] > 0 for g in live)
    # Readings lost to a full outbox: the backlog gateway's, from its latest state.
    refused = {g: r["Từ chối khi đầy (refused, outbox full)"] for g, r in by_gateway.items()}
    assert refused.pop(BACKLOG_GATEWAY) == BACKLOG_REFUSED_READINGS
    assert set(refused.values()) == {0}
    assert {r["Bỏ khi đầy (dropped, outbox full)"] for r in by_gateway.values()} == {0}

    depth = _panel("gateway outbox depth")
    _, series = _run(conn, render_sql(depth.sql, time_range=tr, variables=all_variables))
    peaks: dict[str, int] = {}
    for _, gateway_id, value in series:
        peaks[gateway_id] = max(peaks.get(gateway_id, 0), value)
    assert peaks[BACKLOG_GATEWAY] >= 29
    assert {g for g, peak in peaks.items() if peak > 0} == {BACKLOG_GATEWAY}


def test_gateway_panels_follow_the_ward_variable(conn, filled) -> None:
    tr = _time_range(filled.report)
    variables = _variables_at_all(conn, tr, ward=HOAN_KIEM.code)
    sites = {s.site_id for s in load_hanoi_sites() if s.unit_code == HOAN_KIEM.code}
    for title in ("latest gateway status", "gateway outbox depth"):
        query = _panel(title)
        _, rows = _run(conn, render_sql(query.sql, time_range=tr, variables=variables))
        index = 1 if query.fmt == "time_series" else 0
        assert {row[index] for row in rows} == {f"gw-{site}" for site in sites}, title


def test_rejects_by_device_sums_gateway_reports_with_ingest_rows(conn, filled) -> None:
    """A gateway's report row counts many rejects; unserved ids show whatever the site filter."""
    tr = _time_range(filled.report)
    variables = _variables_at_all(conn, tr, ward=HOAN_KIEM.code)
    query = _panel("rejects by device and reason")
    with psycopg.connect(filled.url) as writable:
        writable.execute(f"SET search_path TO {filled.schema}, public")
        device_id = writable.execute(
            "SELECT d.device_id FROM devices d JOIN sites s USING (site_id) "
            "WHERE s.unit_code = %s ORDER BY 1 LIMIT 1",
            (HOAN_KIEM.code,),
        ).fetchone()[0]
        gateway_id = writable.execute(
            "SELECT gateway_id FROM devices WHERE device_id = %s", (device_id,)
        ).fetchone()[0]
        writable.execute(
            """INSERT INTO rejects (received_at, gateway_id, device_id, reason, detail, count,
                first_at, last_at)
            VALUES (now() - interval '20 minutes', %(g)s, %(d)s, 'malformed_json', 'a', 4000,
                    now() - interval '30 minutes', now() - interval '21 minutes'),
                (now() - interval '10 minutes', %(g)s, %(d)s, 'malformed_json', 'b', 2,
                    now() - interval '19 minutes', now() - interval '11 minutes'),
                (now() - interval '10 minutes', %(g)s, 'stranger-1', 'unknown_device', 'c', 5,
                    now() - interval '15 minutes', now() - interval '12 minutes')""",
            {"g": gateway_id, "d": device_id},
        )
        columns, rows = _run(writable, render_sql(query.sql, time_range=tr, variables=variables))
        writable.rollback()
    names = [n for n, _ in columns]
    found = {(row[0], row[1]): dict(zip(names, row, strict=True)) for row in rows}
    mine = found[device_id, "malformed_json"]
    assert mine["Số lần (count)"] == 4002
    assert mine["Chi tiết (detail)"] == "b"  # the newest
    stranger = found["stranger-1", "unknown_device"]
    assert stranger["Số lần (count)"] == 5
    assert stranger["Loại (type)"] == "chưa đăng ký (not registered)"
    assert rows[0][0] == device_id  # the most rejects first


# --- the drill-down boards ----------------------------------------------------------

HALL = "hk-hall-quan"  # a service hall: kiosks, cameras, terminals, its gateway's backlog


def _board_panel(board: str, title_part: str) -> PanelQuery:
    (query,) = [q for q in PANEL_QUERIES if q.board == board and title_part in q.title]
    return query


def _drill_variables(conn, tr: TimeRange, *, site: str, device: str) -> list[Variable]:
    """As a link opens the boards: one site, one device (single values)."""
    variables = [v for v in _variables_at_all(conn, tr) if v.name not in {"site", "device"}]
    return [
        *variables,
        Variable(name="site", values=(site,)),
        Variable(name="device", values=(device,)),
    ]


def test_site_board_shows_one_site(conn, filled) -> None:
    tr = _time_range(filled.report)
    mine = dict(
        conn.execute(
            "SELECT device_id, device_type FROM devices WHERE site_id = %s", (HALL,)
        ).fetchall()
    )
    assert "kiosk" in mine.values()
    variables = _drill_variables(conn, tr, site=HALL, device="-")
    devices = _rows(conn, _board_panel("site", "devices"), tr, variables)
    assert {r["Thiết bị (device)"]: r["Loại (type)"] for r in devices} == mine
    assert {r["Trạng thái (status)"] for r in devices} == {"Trực tuyến (online)"}
    gateways = _rows(conn, _board_panel("site", "gateway status"), tr, variables)
    assert [r["Gateway"] for r in gateways] == [f"gw-{HALL}"]
    # The hall's gateway is the one whose outbox filled: what it refused shows.
    assert gateways[0]["Từ chối khi đầy (refused, outbox full)"] == BACKLOG_REFUSED_READINGS
    alerts = _rows(conn, _board_panel("site", "open alerts"), tr, variables)
    assert {r["Thiết bị (device)"] for r in alerts} <= set(mine)
    queue = _rows(conn, _board_panel("site", "queue length"), tr, variables)
    kiosks = {d for d, t in mine.items() if t == "kiosk"}
    assert {r["metric"] for r in queue} == kiosks
    assert _rows(conn, _board_panel("site", "PM2.5"), tr, variables) == []  # no monitor here
    rejects = _rows(conn, _board_panel("site", "rejects"), tr, variables)
    assert rejects  # its camera's out-of-range spikes (tests/plugins/grafana.py)
    assert {r["Thiết bị (device)"] for r in rejects} <= set(mine) | {"(không rõ / none)"}
    # The silent site: every device offline.
    silent = _drill_variables(conn, tr, site="hk-ward-hang-bac", device="-")
    statuses = _rows(conn, _board_panel("site", "devices"), tr, silent)
    assert statuses
    assert {r["Trạng thái (status)"] for r in statuses} == {"Mất kết nối (offline)"}


def test_device_board_shows_one_device_and_every_metric_of_its_type(conn, filled) -> None:
    tr = _time_range(filled.report)
    flaky = "kiosk-bd-hall-quan-01"  # drops out: no-data alerts
    variables = _drill_variables(conn, tr, site="-", device=flaky)
    (identity,) = _rows(conn, _board_panel("device", "identity"), tr, variables)
    assert identity["Loại (type)"] == "kiosk"
    assert identity["site_id"] == "bd-hall-quan"
    assert identity["Gateway"] == "gw-bd-hall-quan"
    assert identity["Mất kết nối sau (offline after, s)"] == 300
    metrics = {
        r["metric"] for r in _rows(conn, _board_panel("device", "every metric"), tr, variables)
    }
    kiosk = SHIPPED_CATALOG.types["kiosk"]
    assert {str(m).split(" (")[0] for m in metrics} == {m.name for m in kiosk.metrics}
    alerts = _rows(conn, _board_panel("device", "alerts"), tr, variables)
    assert alerts
    expected = conn.execute(
        "SELECT count(*) FROM alerts WHERE device_id = %s AND raised_at <= now()", (flaky,)
    ).fetchone()[0]
    assert len(alerts) == expected
    transitions = _rows(conn, _board_panel("device", "alert transitions"), tr, variables)
    assert len(transitions) >= len(alerts)
    # A monitor: the air-quality metrics, none of a kiosk's.
    monitor = "aq-cg-aq-luu-quang-vu-01"  # out-of-range spikes: rejects
    variables = _drill_variables(conn, tr, site="-", device=monitor)
    metrics = {
        r["metric"] for r in _rows(conn, _board_panel("device", "every metric"), tr, variables)
    }
    assert "pm25 (ug/m3)" in metrics
    assert not {str(m).split(" (")[0] for m in metrics} & {m.name for m in kiosk.metrics}
    rejects = _rows(conn, _board_panel("device", "rejects"), tr, variables)
    assert rejects
    assert {r["Gateway"] for r in rejects} == {"gw-cg-aq-luu-quang-vu"}


def test_online_is_the_types_offline_after_s_on_every_board(filled) -> None:
    """Seen 10 s inside a type's offline_after_s: online; 10 s outside: offline."""
    tr = _time_range(filled.report)
    kiosk, water = SHIPPED_CATALOG.types["kiosk"], SHIPPED_CATALOG.types["water_level"]
    assert kiosk.offline_after_s != water.offline_after_s
    with psycopg.connect(filled.url) as writable:
        writable.execute(f"SET search_path TO {filled.schema}, public")
        chosen = {}
        for device_type in (kiosk, water):
            ids = [
                row[0]
                for row in writable.execute(
                    "SELECT device_id FROM devices WHERE device_type = %s AND site_id <> %s "
                    "ORDER BY 1 LIMIT 2",
                    (device_type.name, "hk-ward-hang-bac"),
                ).fetchall()
            ]
            inside, outside = ids
            for device_id, age_s in (
                (inside, device_type.offline_after_s - 10),
                (outside, device_type.offline_after_s + 10),
            ):
                writable.execute(
                    "UPDATE device_state SET last_seen = now() - make_interval(secs => %s) "
                    "WHERE device_id = %s",
                    (age_s, device_id),
                )
            chosen[inside], chosen[outside] = True, False
        # online_sql itself, on those rows
        rows = writable.execute(
            f"SELECT ds.device_id, {online_sql('ds.last_seen', 'dt.offline_after_s')} "
            "FROM device_state ds JOIN devices d USING (device_id) "
            "JOIN device_types dt USING (device_type) WHERE ds.device_id = ANY(%s)",
            (list(chosen),),
        ).fetchall()
        assert dict(rows) == chosen
        words = {True: "Trực tuyến (online)", False: "Mất kết nối (offline)"}
        fleet = {
            r["Thiết bị (device)"]: r["Trạng thái (status)"]
            for r in _rows(
                writable, _panel("devices, last seen"), tr, _variables_at_all(writable, tr)
            )
        }
        for device_id, online in chosen.items():
            assert fleet[device_id] == words[online], device_id
            variables = _drill_variables(writable, tr, site="-", device=device_id)
            (identity,) = _rows(writable, _board_panel("device", "identity"), tr, variables)
            assert identity["Trạng thái (status)"] == words[online], device_id
            site_id = str(identity["site_id"])
            on_site = _rows(
                writable,
                _board_panel("site", "devices"),
                tr,
                _drill_variables(writable, tr, site=site_id, device="-"),
            )
            (row,) = [r for r in on_site if r["Thiết bị (device)"] == device_id]
            assert row["Trạng thái (status)"] == words[online], device_id
        writable.rollback()


def test_a_revoked_or_disabled_device_is_shown_so_not_by_its_last_reading(conn, filled) -> None:
    """Seen a moment ago, but provisioning cut its sessions: revoked, or disabled."""
    tr = _time_range(filled.report)
    with psycopg.connect(filled.url) as writable:
        writable.execute(f"SET search_path TO {filled.schema}, public")
        revoked, disabled, active = (
            r[0]
            for r in writable.execute(
                "SELECT device_id FROM devices WHERE site_id = %s ORDER BY 1 LIMIT 3", (HALL,)
            ).fetchall()
        )
        writable.execute(
            "UPDATE device_state SET last_seen = now() WHERE device_id = ANY(%s)",
            ([revoked, disabled, active],),
        )
        writable.execute(
            "UPDATE devices SET status = 'revoked', revoked_at = now() WHERE device_id = %s",
            (revoked,),
        )
        writable.execute("UPDATE devices SET enabled = false WHERE device_id = %s", (disabled,))
        words = {
            revoked: "Đã thu hồi (revoked)",
            disabled: "Tạm ngừng (disabled)",
            active: "Trực tuyến (online)",
        }
        on_site = {
            r["Thiết bị (device)"]: r["Trạng thái (status)"]
            for r in _rows(
                writable,
                _board_panel("site", "devices"),
                tr,
                _drill_variables(writable, tr, site=HALL, device="-"),
            )
        }
        for device_id, word in words.items():
            assert on_site[device_id] == word, device_id
            variables = _drill_variables(writable, tr, site="-", device=device_id)
            (identity,) = _rows(writable, _board_panel("device", "identity"), tr, variables)
            assert identity["Trạng thái (status)"] == word, device_id
        writable.rollback()


def test_data_links_read_fields_their_queries_return(conn, filled, all_variables) -> None:
    """${__data.fields.x} in a link names a column of its panel's query."""
    tr = _time_range(filled.report)
    fields = re.compile(r"\$\{__data\.fields\.(\w+)\}")
    checked = 0
    for name, text in board_files().items():
        for panel in json.loads(text)["panels"]:
            referenced = set(fields.findall(json.dumps(panel.get("fieldConfig", {}))))
            if not referenced:
                continue
            for target in panel["targets"]:
                sql = render_sql(target["rawSql"], time_range=tr, variables=all_variables)
                columns, _ = _run(conn, sql)
                assert referenced <= {c for c, _ in columns}, (name, panel["title"])
                checked += 1
    assert checked >= 6  # the map's two layers, attention, fleet devices, alerts x3, device
