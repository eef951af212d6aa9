"""The seven operator boards, built with grafana-foundation-sdk builders.

``build_boards()`` returns them by file name (``city-overview`` ...), five
city boards and two drill-down boards, ``site`` (uid ``cityhub-site``) and
``device`` (uid ``cityhub-device``; notifications link to
``/d/cityhub-device/?var-device=<id>``). Every
panel reads cityhub's TimescaleDB through the provisioned PostgreSQL
datasource with raw SQL (``grafana.sqlquery``). Table names are not
schema-qualified: the datasource's database role has ``search_path`` set to
cityhub's schema (deploy/timescaledb/init), and tests set it to theirs.

The queries name their tables through constants checked against the
schema's migrations (``grafana.tables``) and their metric columns through
the device catalog, so renaming a table or a metric fails this module's
import; ``tests/grafana/test_schema.py`` checks every other column a query
names against the schema.

Conventions every query follows, so the SQL can be checked outside Grafana
(``grafana.macros`` expands it the way the datasource does):

- time series queries return ``time`` first, then either numeric columns
  (wide) or ``metric`` text plus one numeric ``value`` (long);
- the Geomap's queries return ``latitude`` and ``longitude``;
- the template variables ``ward``, ``site`` and ``device_type`` are
  multi-value with "All" and are used as ``IN (${var:sqlstring})``; the
  drill-down boards' ``site`` and ``device`` hold one value, used the same way.

Links: every board links to every other (dashboard links keeping the time
range and passing, as ``${var:queryparam}``, each variable both boards
define, except several sites to the site board's one). Device id cells link
to the device board and site cells to the site board (the map's site names
too), with ``${__url_time_range}``; a site cell's link reads the row's
``site_id``, a column its table returns and hides.

The device board shows every metric of the device's type in one long-format
panel: the type is known only when the query runs, so its SQL is a UNION
ALL of every catalog type's metrics, each branch filtered by the device (the
other types' branches return nothing). One query, so the tests run it for
devices of two types and check the metrics it returns.

The location filter is the current ward or commune (``ward``: Hanoi's
two-tier geography since 1 July 2025, ``contracts.geography``), its values
unit codes, its texts unit names, listing only units that have a site. A
site stored before the geography has no unit: it is listed under
``UNASSIGNED_TEXT`` with the value ``UNASSIGNED_UNIT``, so "All" keeps it.
The former district is history, not a filter: tables show it next to the
ward ("Quận cũ (former district)"), and it may be NULL.

"Online" means a reading newer than the device type's ``offline_after_s``
(the catalog's, stored in ``device_types``), tested by
``contracts.schema.online_sql``: the same test as ``cityhub status`` and the
no-data rules. Gateways, which are no device type, are online by
``contracts.schema.gateway_online_sql`` (their last state says so and is
newer than ``GATEWAY_SILENT_AFTER_S``), the rule ``cityhub status`` uses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final, TypeVar

from grafana_foundation_sdk.builders import bargauge, geomap, piechart, stat, statetimeline, table
from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as board
from grafana_foundation_sdk.builders import timeseries as ts
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models import geomap as geomap_model

from contracts.catalog import (
    AIR_QUALITY,
    CAMERA_COUNTER,
    KIOSK,
    SHIPPED_CATALOG,
    DeviceType,
    MetricKind,
)
from contracts.commands import STATE_LABELS
from contracts.schema import (
    ALERT_STATES,
    SEVERITIES,
    gateway_online_sql,
    online_sql,
    readings_table,
    rollup_table,
)
from grafana import tables
from grafana.annotations import ALERT_TAG
from grafana.palette import (
    ALERT_STATE_LABELS,
    POLLUTANT_LABELS,
    PRINTER_STATUS,
    SEVERITY_COLOURS,
    SEVERITY_LABELS,
    TIMEZONE,
    VN_AQI_BANDS,
)
from grafana.sqlquery import Sql, datasource_ref

# The tables the boards read, checked against the schema's migrations on import.
SITES: Final = tables.table("sites")
ADMIN_UNITS: Final = tables.table("admin_units")
DEVICES: Final = tables.table("devices")
DEVICE_TYPES_TABLE: Final = tables.table("device_types")
DEVICE_STATE: Final = tables.table("device_state")
ALERTS: Final = tables.table("alerts")
ALERT_TRANSITIONS: Final = tables.table("alert_transitions")
AQI_HOURLY: Final = tables.table("aqi_hourly")
AQI_DAILY: Final = tables.table("aqi_daily")
GATEWAYS: Final = tables.table("gateways")
GATEWAY_STATUS: Final = tables.table("gateway_status")
GATEWAY_STATUS_HISTORY: Final = tables.table("gateway_status_history")
INGEST_STATS: Final = tables.table("ingest_stats")
INGESTED_BATCHES: Final = tables.table("ingested_batches")
REJECTS: Final = tables.table("rejects")
COMMANDS: Final = tables.table("commands")
AIR_QUALITY_READINGS: Final = tables.table(readings_table(AIR_QUALITY.name))
AIR_QUALITY_ROLLUP: Final = tables.table(rollup_table(AIR_QUALITY.name))
KIOSK_READINGS: Final = tables.table(readings_table(KIOSK.name))
CAMERA_READINGS: Final = tables.table(readings_table(CAMERA_COUNTER.name))
# Types defined only as catalog data: the boards name them through the shipped catalog.
NOISE_METER: Final = SHIPPED_CATALOG.types["noise_meter"]
WATER_LEVEL: Final = SHIPPED_CATALOG.types["water_level"]
SATISFACTION_TERMINAL: Final = SHIPPED_CATALOG.types["satisfaction_terminal"]
NOISE_READINGS: Final = tables.table(readings_table(NOISE_METER.name))
WATER_READINGS: Final = tables.table(readings_table(WATER_LEVEL.name))
RATING_READINGS: Final = tables.table(readings_table(SATISFACTION_TERMINAL.name))


def _metric(device_type: DeviceType, name: str) -> str:
    """A metric's column in its readings table: the catalog and the schema must both have it."""
    return tables.column(readings_table(device_type.name), device_type.metric(name).name)


def _rollup(device_type: DeviceType, name: str, aggregate: str) -> str:
    """A metric's hourly ``aggregate`` column (avg, min, max) in its rollup table."""
    return tables.column(
        rollup_table(device_type.name), f"{device_type.metric(name).name}_{aggregate}"
    )


PM25: Final = _metric(AIR_QUALITY, "pm25")
PM10: Final = _metric(AIR_QUALITY, "pm10")
QUEUE_LENGTH: Final = _metric(KIOSK, "queue_length")
TICKETS_ISSUED: Final = _metric(KIOSK, "tickets_issued")
PAPER_LEVEL: Final = _metric(KIOSK, "paper_level")
PRINTER_STATUS_CODE: Final = _metric(KIOSK, "printer_status")
PEOPLE_IN: Final = _metric(CAMERA_COUNTER, "people_in")
OCCUPANCY: Final = _metric(CAMERA_COUNTER, "occupancy")
LAEQ: Final = _metric(NOISE_METER, "laeq")
WATER_DEPTH: Final = _metric(WATER_LEVEL, "water_depth")
RATING: Final = _metric(SATISFACTION_TERMINAL, "rating")
RATING_LABELS: Final = SATISFACTION_TERMINAL.metric("rating").labels

# "Online" on every board: seen within the device type's offline_after_s, on
# a device_state alias `ds` and a device_types alias `dt` joined by type.
ONLINE: Final = online_sql("ds.last_seen", "dt.offline_after_s")
OFFLINE: Final = f"(ds.last_seen IS NULL OR NOT {ONLINE})"
# A revoked or disabled device (a devices alias `d`) is shown as such, not by
# its last reading: provisioning cut its sessions, whatever it sent just before.
DEVICE_STATUS: Final = f"""CASE
    WHEN d.status = 'revoked' THEN 'Đã thu hồi (revoked)'
    WHEN NOT d.enabled THEN 'Tạm ngừng (disabled)'
    WHEN ds.last_seen IS NULL THEN 'Chưa gửi (never)'
    WHEN {ONLINE} THEN 'Trực tuyến (online)'
    ELSE 'Mất kết nối (offline)'
  END"""
_TYPE_JOIN: Final = f"LEFT JOIN {DEVICE_TYPES_TABLE} dt ON dt.device_type = d.device_type"
ACTIVE_STATES: Final = "({})".format(
    ", ".join(f"'{state}'" for state in ALERT_STATES if state.startswith("active_"))
)

# The ward variable's value and text for sites with no unit: unit codes are
# five digits (the admin_units check), so this value is never a unit's.
UNASSIGNED_UNIT: Final = "none"
UNASSIGNED_TEXT: Final = "(chưa gán / unassigned)"
_UNIT_VALUE: Final = f"coalesce(s.unit_code, '{UNASSIGNED_UNIT}')"
# The current ward/commune's name, on a sites alias `s` joined to admin_units `u`.
WARD_NAME: Final = f"coalesce(u.name, '{UNASSIGNED_TEXT}')"
_UNIT_JOIN: Final = f"LEFT JOIN {ADMIN_UNITS} u ON u.unit_code = s.unit_code"

# Filters on a sites alias `s` and a devices alias `d`.
SITE_FILTER: Final = (
    f"{_UNIT_VALUE} IN (${{ward:sqlstring}}) AND s.site_id IN (${{site:sqlstring}})"
)
TYPE_FILTER: Final = "d.device_type IN (${device_type:sqlstring})"

Panel = cogbuilder.Builder[model.Panel]


# --- shared pieces -----------------------------------------------------------------


def _variable(
    name: str,
    label: str,
    sql: str,
    sort: model.VariableSort = model.VariableSort.ALPHABETICAL_CASE_INSENSITIVE_ASC,
    *,
    single: bool = False,
) -> board.QueryVariable:
    """A query variable: multi-value with "All", or ``single`` (Grafana starts on the first)."""
    variable = (
        board.QueryVariable(name)
        .label(label)
        .datasource(datasource_ref())
        .query(sql)
        .refresh(model.VariableRefresh.ON_DASHBOARD_LOAD)
        .sort(sort)
    )
    if single:
        return variable.multi(False).include_all(False)
    everything = model.VariableOption(selected=True, text="All", value="$__all")
    return variable.multi(True).include_all(True).current(everything)


def _variables(*, with_type: bool = True, single_site: bool = False) -> list[board.QueryVariable]:
    variables = [
        # Units with a site, by name in the database's collation (Grafana's
        # sort off, so it keeps that order), then the sites without a unit.
        _variable(
            "ward",
            "Phường/Xã (ward/commune)",
            f"SELECT {WARD_NAME} AS __text, {_UNIT_VALUE} AS __value\n"
            f"FROM {SITES} s\n{_UNIT_JOIN}\n"
            "GROUP BY u.name, s.unit_code\n"
            "ORDER BY s.unit_code IS NULL, u.name",
            model.VariableSort.DISABLED,
        ),
        _variable(
            "site",
            "Điểm (site)",
            f"SELECT s.name AS __text, s.site_id AS __value FROM {SITES} s "
            f"WHERE {_UNIT_VALUE} IN (${{ward:sqlstring}})",
            single=single_site,
        ),
    ]
    if with_type:
        variables.append(
            _variable(
                "device_type",
                "Loại thiết bị (device type)",
                f"SELECT device_type FROM {DEVICE_TYPES_TABLE}",
            )
        )
    return variables


def _thresholds(steps: Sequence[tuple[float | None, str]]) -> board.ThresholdsConfig:
    return (
        board.ThresholdsConfig()
        .mode(model.ThresholdsMode.ABSOLUTE)
        .steps([model.Threshold(value=v, color=c) for v, c in steps])
    )


def _aqi_thresholds() -> board.ThresholdsConfig:
    return _thresholds([(None if b.low == 0 else float(b.low), b.colour) for b in VN_AQI_BANDS])


def _aqi_mappings() -> list[model.ValueMapping]:
    """Each band's range shows its Vietnamese name under the number."""
    mappings: list[model.ValueMapping] = []
    highs = [b.low - 1 for b in VN_AQI_BANDS[1:]] + [500]
    for index, (band, high) in enumerate(zip(VN_AQI_BANDS, highs, strict=True)):
        mappings.append(
            model.RangeMap(
                options=model.DashboardRangeMapOptions(
                    from_val=float(band.low),
                    to=float(high),
                    result=model.ValueMappingResult(
                        text=f"${{__value.raw}} · {band.name_vi}", color=band.colour, index=index
                    ),
                )
            )
        )
    return mappings


def _by_thresholds() -> board.FieldColor:
    return board.FieldColor().mode(model.FieldColorModeId.THRESHOLDS)


def _fixed(colour: str) -> board.FieldColor:
    return board.FieldColor().mode(model.FieldColorModeId.FIXED).fixed_color(colour)


def _colour_override(colour: str) -> list[model.DynamicConfigValue]:
    return [model.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": colour})]


def _value_text(mapping: dict[str, tuple[str, str | None]]) -> list[model.ValueMapping]:
    return [
        model.ValueMap(
            options={
                key: model.ValueMappingResult(text=text, color=colour, index=i)
                for i, (key, (text, colour)) in enumerate(mapping.items())
            }
        )
    ]


def _legend_table() -> common_builders.VizLegendOptions:
    return (
        common_builders.VizLegendOptions()
        .display_mode(common.LegendDisplayMode.TABLE)
        .placement(common.LegendPlacement.RIGHT)
        .show_legend(True)
        .calcs(["lastNotNull", "max"])
    )


def _all_values() -> common_builders.ReduceDataOptions:
    return common_builders.ReduceDataOptions().values(True).calcs([])


def _last_value() -> common_builders.ReduceDataOptions:
    return common_builders.ReduceDataOptions().values(False).calcs(["lastNotNull"])


def _series(
    title: str, sql: str, *, unit: str = "short", height: int = 9, width: int = 12
) -> ts.Panel:
    return (
        ts.Panel()
        .title(title)
        .datasource(datasource_ref())
        .with_target(Sql(sql).time_series().ref_id("A"))
        .unit(unit)
        .height(height)
        .span(width)
        .legend(_legend_table())
        .line_width(1)
        .fill_opacity(10)
        .span_nulls(False)
    )


def _table(title: str, sql: str, *, height: int = 9, width: int = 12) -> table.Panel:
    return (
        table.Panel()
        .title(title)
        .datasource(datasource_ref())
        .with_target(Sql(sql).table().ref_id("A"))
        .height(height)
        .span(width)
    )


def _board(
    uid: str,
    title: str,
    tags: list[str],
    description: str,
    *,
    variables: Sequence[board.QueryVariable] | None = None,
    with_type: bool = True,
) -> board.Dashboard:
    if variables is None:
        variables = _variables(with_type=with_type)
    return (
        board.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(["cityhub", *tags])
        .timezone(TIMEZONE)
        .time("now-6h", "now")
        .refresh("1m")
        .editable()
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .variables(list(variables))
    )


def _alert_annotations(*extra_tags: str) -> board.AnnotationQuery:
    """Alert transitions that `cityhub grafana push` posted, found by their tags."""
    return (
        board.AnnotationQuery()
        .name("Chuyển trạng thái cảnh báo (alert transitions)")
        .datasource(model.DataSourceRef(type_val="grafana", uid="-- Grafana --"))
        .enable(True)
        .hide(False)
        .icon_color("red")
        .target(
            board.AnnotationTarget()
            .type("tags")
            .tags([ALERT_TAG, *extra_tags])
            .match_any(False)
            .limit(500)
        )
    )


def _numbered(dashboard: board.Dashboard, panels: Sequence[Panel]) -> board.Dashboard:
    """Add panels with ids 1, 2, ...: stable ids keep links and annotations pointing right."""
    for number, panel in enumerate(panels, start=1):
        built = panel.build()
        built.id_val = number
        dashboard.with_panel(_Built(built))
    return dashboard


# --- links between the boards ------------------------------------------------------

SITE_BOARD_UID: Final = "cityhub-site"
# Notifications link to /d/cityhub-device/?var-device=<id>: keep the uid and the variable.
DEVICE_BOARD_UID: Final = "cityhub-device"
# The column every table with a site cell returns (hidden), for the site board's link.
SITE_ID_FIELD: Final = "site_id"
DEVICE_FIELD: Final = "Thiết bị (device)"
SITE_FIELD: Final = "Điểm (site)"


def _data_link(title: str, uid: str, variable: str, value: str) -> dict[str, object]:
    """A cell's link to another board, for ``value``, in the dashboard's time range."""
    return {
        "title": title,
        "url": f"/d/{uid}/?var-{variable}={value}&${{__url_time_range}}",
        "targetBlank": False,
    }


def _device_link() -> model.DynamicConfigValue:
    return model.DynamicConfigValue(
        id_val="links",
        value=[
            _data_link("Xem thiết bị (device board)", DEVICE_BOARD_UID, "device", "${__value.raw}")
        ],
    )


def _site_link() -> model.DynamicConfigValue:
    return model.DynamicConfigValue(
        id_val="links",
        value=[
            _data_link(
                "Xem điểm (site board)",
                SITE_BOARD_UID,
                "site",
                f"${{__data.fields.{SITE_ID_FIELD}}}",
            )
        ],
    )


_P = TypeVar("_P", table.Panel, geomap.Panel)


def _linked(panel: _P, *, device: str | None = DEVICE_FIELD, site: str | None = SITE_FIELD) -> _P:
    """Device id cells link to the device board, site cells to the site board.

    A site cell's link reads the row's ``site_id``, which a table returns and
    hides (the map shows it in its tooltip).
    """
    if device is not None:
        panel.override_by_name(device, [_device_link()])
    if site is not None:
        panel.override_by_name(site, [_site_link()])
        if isinstance(panel, table.Panel):
            panel.override_by_name(
                SITE_ID_FIELD, [model.DynamicConfigValue(id_val="custom.hidden", value=True)]
            )
    return panel


def _variable_kinds(dashboard: model.Dashboard) -> dict[str, bool]:
    """A board's variables: name -> multi-value."""
    templating = dashboard.templating.list_val if dashboard.templating else None
    return {v.name: bool(v.multi) for v in templating or []}


def _link_boards(boards: Sequence[model.Dashboard]) -> None:
    """Every board links to every other, keeping the time range.

    A link carries each variable both boards define, unless it would pass
    several values to a single-value variable (a city board's sites to the
    site board). Grafana's ``includeVars`` passes every variable, even those
    the other board lacks, so the links name theirs (``${var:queryparam}``).
    """
    for source in boards:
        mine = _variable_kinds(source)
        links = []
        for target in boards:
            if target.uid == source.uid:
                continue
            theirs = _variable_kinds(target)
            shared = [n for n, multi in mine.items() if n in theirs and (theirs[n] or not multi)]
            query = "&".join(f"${{{name}:queryparam}}" for name in shared)
            links.append(
                model.DashboardLink(
                    title=target.title or "",
                    type_val=model.DashboardLinkType.LINK,
                    icon="dashboard",
                    tooltip=target.description or "",
                    url=f"/d/{target.uid}/" + (f"?{query}" if query else ""),
                    keep_time=True,
                )
            )
        source.links = links


class _Built(cogbuilder.Builder[model.Panel]):
    def __init__(self, panel: model.Panel) -> None:
        self._panel = panel

    def build(self) -> model.Panel:
        return self._panel


# --- city overview -----------------------------------------------------------------

_SITE_STATUS_SQL: Final = f"""SELECT s.site_id, s.name, {WARD_NAME} AS ward,
  s.district AS former_district, s.kind,
  s.latitude, s.longitude,
  count(d.device_id) AS devices,
  count(d.device_id) FILTER (WHERE {ONLINE}) AS online,
  coalesce(max(a.open_alerts), 0) AS open_alerts,
  CASE
    WHEN count(d.device_id) FILTER (WHERE {ONLINE}) < count(d.device_id) THEN 2
    WHEN coalesce(max(a.open_alerts), 0) > 0 THEN 1
    ELSE 0
  END AS status
FROM {SITES} s
{_UNIT_JOIN}
LEFT JOIN {DEVICES} d ON d.site_id = s.site_id AND d.status = 'active' AND {TYPE_FILTER}
{_TYPE_JOIN}
LEFT JOIN {DEVICE_STATE} ds ON ds.device_id = d.device_id
LEFT JOIN (
  SELECT site_id, count(*) AS open_alerts FROM {ALERTS}
  WHERE state IN {ACTIVE_STATES} GROUP BY site_id
) a ON a.site_id = s.site_id
WHERE {SITE_FILTER}
GROUP BY s.site_id, u.name
ORDER BY status DESC, s.name"""

_LATEST_AQI_SQL: Final = f"""SELECT DISTINCT ON (h.site_id)
  h.ts AS "time", h.site_id, s.name, {WARD_NAME} AS ward, s.district AS former_district,
  s.latitude, s.longitude, h.vn_aqi, h.band, h.dominant
FROM {AQI_HOURLY} h
JOIN {SITES} s ON s.site_id = h.site_id
{_UNIT_JOIN}
WHERE $__timeFilter(h.ts) AND {SITE_FILTER}
ORDER BY h.site_id, h.ts DESC"""


def _marker_layer(
    name: str, ref_id: str, colour_field: str, size: int
) -> common_builders.MapLayerOptions:
    return (
        common_builders.MapLayerOptions()
        .type("markers")
        .name(name)
        .config(
            {
                "showLegend": True,
                "style": {
                    "color": {"field": colour_field, "fixed": "dark-green"},
                    "size": {"fixed": size},
                    "symbol": {"fixed": "img/icons/marker/circle.svg", "mode": "fixed"},
                    "opacity": 0.85,
                },
            }
        )
        .location(
            common_builders.FrameGeometrySource()
            .mode(common.FrameGeometrySourceMode.COORDS)
            .latitude("latitude")
            .longitude("longitude")
        )
        .filter_data({"id": "byRefId", "options": ref_id})
        .tooltip(True)
    )


def _site_map() -> geomap.Panel:
    return _linked(
        geomap.Panel()
        .title("Bản đồ điểm giám sát Hà Nội (sites: status and VN_AQI)")
        .description(
            "Trạng thái mỗi điểm (xanh: bình thường, cam: có cảnh báo, đỏ: thiết bị mất kết nối) "
            "và VN_AQI giờ gần nhất của các trạm quan trắc."
        )
        .datasource(datasource_ref())
        .with_target(Sql(_SITE_STATUS_SQL).table().ref_id("A"))
        .with_target(Sql(_LATEST_AQI_SQL).table().ref_id("B"))
        .height(16)
        .span(16)
        .view(geomap.MapViewConfig().id("fit").all_layers(True).zoom(11).max_zoom(15))
        .controls(geomap.ControlsOptions().show_zoom(True).mouse_wheel_zoom(True).show_scale(True))
        .basemap(common_builders.MapLayerOptions().type("default").name("Nền (basemap)"))
        .layers(
            [
                _marker_layer("Trạng thái điểm (status)", "A", "status", 9),
                _marker_layer("VN_AQI", "B", "vn_aqi", 16),
            ]
        )
        .tooltip(geomap.TooltipOptions().mode(geomap_model.TooltipMode.DETAILS))
        .override_by_name("status", _site_status_colours())
        .override_by_name(
            "vn_aqi",
            [
                model.DynamicConfigValue(id_val="thresholds", value=_aqi_thresholds().build()),
                model.DynamicConfigValue(id_val="color", value={"mode": "thresholds"}),
            ],
        ),
        device=None,
        site="name",
    )


def _site_status_colours() -> list[model.DynamicConfigValue]:
    """The site map's ``status`` (0 ok, 1 alert, 2 a device offline) as text and colour."""
    names = _value_text(
        {
            "0": ("Bình thường (ok)", "green"),
            "1": ("Có cảnh báo (alert)", "orange"),
            "2": ("Thiết bị mất kết nối (offline)", "red"),
        }
    )
    return [
        model.DynamicConfigValue(id_val="mappings", value=names),
        model.DynamicConfigValue(
            id_val="thresholds",
            value={
                "mode": "absolute",
                "steps": [
                    {"value": None, "color": "green"},
                    {"value": 1, "color": "orange"},
                    {"value": 2, "color": "red"},
                ],
            },
        ),
        model.DynamicConfigValue(id_val="color", value={"mode": "thresholds"}),
    ]


_DEVICES_ONLINE_SQL: Final = f"""SELECT
  count(*) FILTER (WHERE {ONLINE}) AS "Trực tuyến (online)",
  count(*) FILTER (WHERE {OFFLINE}) AS "Mất kết nối (offline)",
  count(*) AS "Tổng (total)"
FROM {DEVICES} d
JOIN {SITES} s ON s.site_id = d.site_id
{_TYPE_JOIN}
LEFT JOIN {DEVICE_STATE} ds ON ds.device_id = d.device_id
WHERE d.status = 'active' AND {SITE_FILTER} AND {TYPE_FILTER}"""


def _devices_online(width: int = 8, height: int = 5) -> stat.Panel:
    return (
        stat.Panel()
        .title("Thiết bị trực tuyến (devices online)")
        .datasource(datasource_ref())
        .with_target(Sql(_DEVICES_ONLINE_SQL).table().ref_id("A"))
        .reduce_options(_last_value())
        .graph_mode(common.BigValueGraphMode.NONE)
        .color_mode(common.BigValueColorMode.VALUE)
        .color_scheme(_fixed("green"))
        .override_by_name("Mất kết nối (offline)", _colour_override("red"))
        .override_by_name("Tổng (total)", _colour_override("text"))
        .height(height)
        .span(width)
    )


def _open_alerts_sql(site_filter: bool = True) -> str:
    where = f" AND {SITE_FILTER}" if site_filter else ""
    values = ", ".join(f"('{s}', {i})" for i, s in enumerate(SEVERITIES))
    return f"""SELECT sev.severity, count(a.alert_id) AS alerts
FROM (VALUES {values}) AS sev (severity, rank)
LEFT JOIN (
  {ALERTS} a JOIN {SITES} s ON s.site_id = a.site_id
) ON a.severity = sev.severity AND a.state IN {ACTIVE_STATES}{where}
GROUP BY sev.severity, sev.rank
ORDER BY sev.rank"""


def _severity_mappings() -> list[model.ValueMapping]:
    return _value_text({s: (SEVERITY_LABELS[s], SEVERITY_COLOURS[s]) for s in SEVERITIES})


def _open_alerts(width: int = 8, height: int = 11) -> bargauge.Panel:
    return (
        bargauge.Panel()
        .title("Cảnh báo đang mở theo mức độ (open alerts by severity)")
        .datasource(datasource_ref())
        .with_target(Sql(_open_alerts_sql()).table().ref_id("A"))
        .reduce_options(_all_values())
        .display_mode(common.BarGaugeDisplayMode.BASIC)
        .orientation(common.VizOrientation.HORIZONTAL)
        .min(0)
        .color_scheme(_fixed("orange"))
        .height(height)
        .span(width)
        .mappings(_severity_mappings())
    )


_ATTENTION_SQL: Final = f"""SELECT s.name AS "Điểm (site)",
  {WARD_NAME} AS "Phường/Xã (ward/commune)", s.district AS "Quận cũ (former district)",
  count(d.device_id) FILTER (WHERE {OFFLINE}) AS "Mất kết nối (offline)",
  (SELECT count(*) FROM {ALERTS} a WHERE a.site_id = s.site_id AND a.state IN {ACTIVE_STATES})
    AS "Cảnh báo (alerts)",
  max(ds.last_seen) AS "Lần cuối (last seen)", s.site_id
FROM {SITES} s
{_UNIT_JOIN}
JOIN {DEVICES} d ON d.site_id = s.site_id AND d.status = 'active' AND {TYPE_FILTER}
{_TYPE_JOIN}
LEFT JOIN {DEVICE_STATE} ds ON ds.device_id = d.device_id
WHERE {SITE_FILTER}
GROUP BY s.site_id, u.name
ORDER BY 4 DESC, 5 DESC, s.name"""


def city_overview() -> board.Dashboard:
    dashboard = _board(
        "cityhub-city-overview",
        "Tổng quan thành phố · City overview",
        ["overview"],
        "Hà Nội: các điểm giám sát trên bản đồ, thiết bị trực tuyến và cảnh báo đang mở.",
    )
    return _numbered(
        dashboard,
        [
            _site_map(),
            _devices_online(),
            _open_alerts(),
            _linked(
                _table("Điểm cần chú ý (sites needing attention)", _ATTENTION_SQL, width=24),
                device=None,
            ),
        ],
    )


# --- air quality -------------------------------------------------------------------

_AQ_JOIN: Final = f"""JOIN {DEVICES} d ON d.device_id = r.device_id
JOIN {SITES} s ON s.site_id = d.site_id
WHERE $__timeFilter(r.ts) AND {SITE_FILTER}"""


def _pm_sql(metric: str) -> str:
    return f"""SELECT $__timeGroupAlias(r.ts, $__interval), s.name AS metric,
  avg(r.{metric}) AS value
FROM {AIR_QUALITY_READINGS} r
{_AQ_JOIN}
GROUP BY 1, 2
ORDER BY 1"""


def _pm_rollup_sql() -> str:
    pm25_avg, pm25_max = _rollup(AIR_QUALITY, "pm25", "avg"), _rollup(AIR_QUALITY, "pm25", "max")
    pm10_avg = _rollup(AIR_QUALITY, "pm10", "avg")
    return f"""SELECT r.bucket AS "time",
  avg(r.{pm25_avg}) AS "PM2.5 trung bình (mean)", max(r.{pm25_max}) AS "PM2.5 cao nhất (max)",
  avg(r.{pm10_avg}) AS "PM10 trung bình (mean)"
FROM {AIR_QUALITY_ROLLUP} r
JOIN {DEVICES} d ON d.device_id = r.device_id
JOIN {SITES} s ON s.site_id = d.site_id
WHERE $__timeFilter(r.bucket) AND {SITE_FILTER}
GROUP BY 1
ORDER BY 1"""


_AQI_NOW_SQL: Final = f"""SELECT DISTINCT ON (h.site_id) s.name AS station, h.vn_aqi
FROM {AQI_HOURLY} h
JOIN {SITES} s ON s.site_id = h.site_id
WHERE $__timeFilter(h.ts) AND {SITE_FILTER}
ORDER BY h.site_id, h.ts DESC"""

_AQI_HOURLY_SQL: Final = f"""SELECT h.ts AS "time", s.name AS metric, h.vn_aqi AS value
FROM {AQI_HOURLY} h
JOIN {SITES} s ON s.site_id = h.site_id
WHERE $__timeFilter(h.ts) AND {SITE_FILTER}
ORDER BY 1"""

# Days are Hanoi calendar days: the range's ends converted to local dates.
_AQI_DAILY_SQL: Final = f"""SELECT a.day AS "Ngày (day)", s.name AS "Trạm (station)",
  a.vn_aqi AS "VN_AQI", a.band AS "Mức (band)", a.dominant AS "Chất chủ đạo (dominant)",
  a.aqi_pm25 AS "AQI PM2.5", a.aqi_pm10 AS "AQI PM10", a.us_aqi_pm25 AS "US AQI PM2.5"
FROM {AQI_DAILY} a
JOIN {SITES} s ON s.site_id = a.site_id
WHERE a.day BETWEEN ($__timeFrom()::timestamptz AT TIME ZONE '{TIMEZONE}')::date
  AND ($__timeTo()::timestamptz AT TIME ZONE '{TIMEZONE}')::date
  AND {SITE_FILTER}
ORDER BY a.day DESC, a.vn_aqi DESC"""

_DOMINANT_SQL: Final = f"""SELECT h.dominant AS metric, count(*) AS hours
FROM {AQI_HOURLY} h
JOIN {SITES} s ON s.site_id = h.site_id
WHERE $__timeFilter(h.ts) AND {SITE_FILTER} AND h.dominant IS NOT NULL
GROUP BY 1
ORDER BY 2 DESC"""


def _pollutant_mappings() -> list[model.ValueMapping]:
    return _value_text({k: (v, None) for k, v in POLLUTANT_LABELS.items()})


def _aqi_now() -> bargauge.Panel:
    return (
        bargauge.Panel()
        .title("VN_AQI hiện tại theo trạm (VN_AQI now by station)")
        .datasource(datasource_ref())
        .with_target(Sql(_AQI_NOW_SQL).table().ref_id("A"))
        .reduce_options(_all_values())
        .display_mode(common.BarGaugeDisplayMode.BASIC)
        .orientation(common.VizOrientation.HORIZONTAL)
        .min(0)
        .max(300)
        .thresholds(_aqi_thresholds())
        .color_scheme(_by_thresholds())
        .mappings(_aqi_mappings())
        .height(12)
        .span(10)
    )


def _aqi_hourly() -> ts.Panel:
    return (
        _series("VN_AQI theo giờ (hourly VN_AQI, NowCast)", _AQI_HOURLY_SQL, height=12, width=14)
        .thresholds(_aqi_thresholds())
        .thresholds_style(
            common_builders.GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.AREA)
        )
        .min(0)
    )


def _dominant_pollutant() -> piechart.Panel:
    return (
        piechart.Panel()
        .title("Chất ô nhiễm chủ đạo (dominant pollutant, hours)")
        .datasource(datasource_ref())
        .with_target(Sql(_DOMINANT_SQL).table().ref_id("A"))
        .reduce_options(_all_values())
        .mappings(_pollutant_mappings())
        .height(10)
        .span(8)
    )


def _aqi_daily() -> table.Panel:
    return (
        _table("AQI ngày (daily VN_AQI)", _AQI_DAILY_SQL, height=10, width=16)
        .override_by_name(
            "VN_AQI",
            [
                model.DynamicConfigValue(id_val="thresholds", value=_aqi_thresholds().build()),
                model.DynamicConfigValue(id_val="color", value={"mode": "thresholds"}),
                model.DynamicConfigValue(
                    id_val="custom.cellOptions", value={"type": "color-background"}
                ),
            ],
        )
        .override_by_name(
            "Chất chủ đạo (dominant)",
            [model.DynamicConfigValue(id_val="mappings", value=_pollutant_mappings())],
        )
    )


# Street stations also carry a noise meter and a flood sensor. LAeq values
# are energy levels: the mean of an interval is 10 log10 of the mean power,
# not the mean of the decibels.
_NOISE_SQL: Final = f"""SELECT $__timeGroupAlias(r.ts, $__interval), s.name AS metric,
  10 * log(avg(power(10, r.{LAEQ} / 10))) AS value
FROM {NOISE_READINGS} r
{_AQ_JOIN}
GROUP BY 1, 2
ORDER BY 1"""

_WATER_SQL: Final = f"""SELECT $__timeGroupAlias(r.ts, $__interval), s.name AS metric,
  max(r.{WATER_DEPTH}) AS value
FROM {WATER_READINGS} r
{_AQ_JOIN}
GROUP BY 1, 2
ORDER BY 1"""


def _noise() -> ts.Panel:
    # QCVN 26:2010/BTNMT: 70 dBA by day in ordinary areas.
    return _series("Tiếng ồn LAeq (street noise, dBA)", _NOISE_SQL, unit="suffix: dBA").thresholds(
        _thresholds([(None, "green"), (70, "orange"), (80, "red")])
    )


def _water() -> ts.Panel:
    # The flooding rule's levels (alerts/data/rules.toml): 20, 50 and 80 cm.
    return (
        _series("Mức ngập (street flooding, cm)", _WATER_SQL, unit="suffix: cm")
        .min(0)
        .thresholds(_thresholds([(None, "green"), (20, "orange"), (50, "red"), (80, "purple")]))
    )


def air_quality() -> board.Dashboard:
    dashboard = _board(
        "cityhub-air-quality",
        "Chất lượng không khí · Air quality (VN_AQI)",
        ["air-quality", "vn-aqi"],
        "VN_AQI theo Quyết định 1459/QĐ-TCMT: giờ (NowCast) và ngày, PM2.5/PM10, "
        "chất ô nhiễm chủ đạo; tiếng ồn và mức ngập tại trạm đường phố.",
        with_type=False,
    ).annotation(_alert_annotations("air_quality"))
    return _numbered(
        dashboard,
        [
            _aqi_now(),
            _aqi_hourly(),
            _series("PM2.5 (µg/m³)", _pm_sql(PM25), unit="conμgm3"),
            _series("PM10 (µg/m³)", _pm_sql(PM10), unit="conμgm3"),
            _dominant_pollutant(),
            _aqi_daily(),
            _series(
                "PM trung bình giờ, dài hạn (hourly rollup, long ranges)",
                _pm_rollup_sql(),
                unit="conμgm3",
                width=24,
            ),
            _noise(),
            _water(),
        ],
    )


# --- service halls -----------------------------------------------------------------

_KIOSK_JOIN: Final = f"""JOIN {DEVICES} d ON d.device_id = r.device_id
JOIN {SITES} s ON s.site_id = d.site_id
WHERE $__timeFilter(r.ts) AND {SITE_FILTER}"""

# Each kiosk reports its hall's queue; a hall's queue is the mean over its kiosks.
# Camera counters in halls; street monitors count vehicles, not visitors.
_HALL_CAMERA_JOIN: Final = f"""JOIN {DEVICES} d ON d.device_id = r.device_id
JOIN {SITES} s ON s.site_id = d.site_id
WHERE $__timeFilter(r.ts) AND {SITE_FILTER} AND s.kind <> 'street_monitor'"""

_QUEUE_SQL: Final = f"""SELECT $__timeGroupAlias(r.ts, $__interval), s.name AS metric,
  avg(r.{QUEUE_LENGTH}) AS value
FROM {KIOSK_READINGS} r
{_KIOSK_JOIN}
GROUP BY 1, 2
ORDER BY 1"""

_TICKETS_SQL: Final = f"""SELECT $__timeGroupAlias(r.ts, '1h'), s.name AS metric,
  sum(r.{TICKETS_ISSUED}) AS value
FROM {KIOSK_READINGS} r
{_KIOSK_JOIN}
GROUP BY 1, 2
ORDER BY 1"""

_PEOPLE_SQL: Final = f"""SELECT $__timeGroupAlias(r.ts, $__interval), s.name AS metric,
  sum(r.{PEOPLE_IN}) AS value
FROM {CAMERA_READINGS} r
{_HALL_CAMERA_JOIN}
GROUP BY 1, 2
ORDER BY 1"""

_OCCUPANCY_SQL: Final = f"""SELECT $__timeGroupAlias(r.ts, $__interval), s.name AS metric,
  max(r.{OCCUPANCY}) AS value
FROM {CAMERA_READINGS} r
{_HALL_CAMERA_JOIN}
GROUP BY 1, 2
ORDER BY 1"""

_PAPER_SQL: Final = f"""SELECT DISTINCT ON (r.device_id) s.name || ' · ' || r.device_id AS kiosk,
  r.{PAPER_LEVEL}
FROM {KIOSK_READINGS} r
{_KIOSK_JOIN}
ORDER BY r.device_id, r.ts DESC"""

# The worst state of each kiosk's printer in each interval (codes grow with severity).
_PRINTER_SQL: Final = f"""SELECT $__timeGroupAlias(r.ts, $__interval), r.device_id AS metric,
  max(r.{PRINTER_STATUS_CODE}) AS value
FROM {KIOSK_READINGS} r
{_KIOSK_JOIN}
GROUP BY 1, 2
ORDER BY 1"""


def _printer_mappings() -> list[model.ValueMapping]:
    return _value_text({str(code): entry for code, entry in enumerate(PRINTER_STATUS)})


def _paper_levels() -> bargauge.Panel:
    return (
        bargauge.Panel()
        .title("Giấy in còn lại (kiosk paper level)")
        .datasource(datasource_ref())
        .with_target(Sql(_PAPER_SQL).table().ref_id("A"))
        .reduce_options(_all_values())
        .display_mode(common.BarGaugeDisplayMode.LCD)
        .orientation(common.VizOrientation.HORIZONTAL)
        .unit("percent")
        .min(0)
        .max(100)
        .thresholds(_thresholds([(None, "red"), (10.0, "orange"), (20.0, "green")]))
        .color_scheme(_by_thresholds())
        .height(12)
        .span(10)
    )


def _printer_states() -> statetimeline.Panel:
    return (
        statetimeline.Panel()
        .title("Trạng thái máy in vé (printer status)")
        .datasource(datasource_ref())
        .with_target(Sql(_PRINTER_SQL).time_series().ref_id("A"))
        .mappings(_printer_mappings())
        .color_scheme(_by_thresholds())
        .thresholds(_thresholds([(None, "green"), (1.0, "yellow"), (2.0, "red"), (4.0, "purple")]))
        .show_value(common.VisibilityMode.NEVER)
        .merge_values(True)
        .height(12)
        .span(14)
    )


# Every reading of a terminal carries its counter; only some carry a
# rating, so every terminal has a row even when nobody rated.
_RATINGS_SQL: Final = f"""SELECT s.name AS "Điểm (site)", r.device_id AS "Thiết bị (terminal)",
  count(r.{RATING}) AS "Lượt đánh giá (ratings)",
  count(*) FILTER (WHERE r.{RATING} = {RATING_LABELS.index("very_satisfied")})
    AS "Rất hài lòng (very satisfied)",
  count(*) FILTER (WHERE r.{RATING} = {RATING_LABELS.index("satisfied")})
    AS "Hài lòng (satisfied)",
  count(*) FILTER (WHERE r.{RATING} = {RATING_LABELS.index("not_satisfied")})
    AS "Không hài lòng (not satisfied)",
  round(100.0 * count(*) FILTER (WHERE r.{RATING} < {RATING_LABELS.index("not_satisfied")})
    / nullif(count(r.{RATING}), 0), 1) AS "Hài lòng trở lên (% satisfied)"
FROM {RATING_READINGS} r
{_KIOSK_JOIN}
GROUP BY 1, 2
ORDER BY 1, 2"""


def service_halls() -> board.Dashboard:
    dashboard = _board(
        "cityhub-service-halls",
        "Bộ phận một cửa · Service halls",
        ["service-halls", "kiosk"],
        "Hàng đợi, vé phát, lượt người vào, giấy in và máy in của ki-ốt lấy số; "
        "đánh giá mức độ hài lòng tại quầy.",
        with_type=False,
    ).annotation(_alert_annotations("kiosk"))
    tickets = _series("Vé phát mỗi giờ (tickets per hour)", _TICKETS_SQL, unit="none").draw_style(
        common.GraphDrawStyle.BARS
    )
    return _numbered(
        dashboard,
        [
            _series("Số người chờ (queue length)", _QUEUE_SQL, unit="none"),
            tickets,
            _series("Lượt người vào (people in, per interval)", _PEOPLE_SQL, unit="none"),
            _series("Số người trong sảnh (occupancy)", _OCCUPANCY_SQL, unit="none"),
            _paper_levels(),
            _printer_states(),
            _table("Đánh giá mức độ hài lòng (citizen ratings)", _RATINGS_SQL, width=24),
        ],
    )


# --- fleet health ------------------------------------------------------------------

_OFFLINE_COUNT_SQL: Final = _DEVICES_ONLINE_SQL

_DEVICES_SQL: Final = f"""SELECT d.device_id AS "Thiết bị (device)", d.device_type AS "Loại (type)",
  s.name AS "Điểm (site)", {WARD_NAME} AS "Phường/Xã (ward/commune)",
  s.district AS "Quận cũ (former district)", d.gateway_id AS "Gateway",
  ds.last_seen AS "Lần cuối (last seen)",
  extract(epoch FROM now() - ds.last_seen) AS "Im lặng (silent, s)",
  {DEVICE_STATUS} AS "Trạng thái (status)",
  ds.seq_gaps AS "Mất gói (seq gaps)", s.site_id
FROM {DEVICES} d
JOIN {SITES} s ON s.site_id = d.site_id
{_UNIT_JOIN}
{_TYPE_JOIN}
LEFT JOIN {DEVICE_STATE} ds ON ds.device_id = d.device_id
WHERE d.status = 'active' AND {SITE_FILTER} AND {TYPE_FILTER}
ORDER BY ds.last_seen ASC NULLS FIRST"""

# Readings per second over each interval, from the workers' stats rows.
_INGEST_RATE_SQL: Final = f"""SELECT $__timeGroupAlias(ts, $__interval),
  sum(readings) / ($__interval_ms / 1000.0) AS "Bản tin/giây (readings/s)",
  sum(rejects) / ($__interval_ms / 1000.0) AS "Bị loại/giây (rejects/s)",
  sum(duplicates) / ($__interval_ms / 1000.0) AS "Trùng/giây (duplicates/s)"
FROM {INGEST_STATS}
WHERE $__timeFilter(ts)
GROUP BY 1
ORDER BY 1"""

_INGEST_LAG_SQL: Final = f"""SELECT $__timeGroupAlias(ts, $__interval),
  max(lag_p95_ms) AS "Độ trễ p95 (lag p95)",
  max(commit_p95_ms) AS "Ghi p95 (commit p95)",
  max(queue_depth) AS "Hàng đợi (queue depth)"
FROM {INGEST_STATS}
WHERE $__timeFilter(ts)
GROUP BY 1
ORDER BY 1"""

# Batches each gateway delivered per interval. Gateways send a batch at least
# every 200 ms of traffic: a gap is an uplink down (the outbox filling), and a
# burst after it is the outbox draining. The outbox depth itself is what the
# gateways report in their state messages (gateway_status*, below).
_GATEWAY_BATCH_RATE_SQL: Final = f"""SELECT $__timeGroupAlias(b.committed_at, $__interval),
  b.gateway_id AS metric, count(*) AS value
FROM {INGESTED_BATCHES} b
JOIN {GATEWAYS} g ON g.gateway_id = b.gateway_id
JOIN {SITES} s ON s.site_id = g.site_id
WHERE $__timeFilter(b.committed_at)
  AND {SITE_FILTER}
GROUP BY 1, 2
ORDER BY 1"""

_GATEWAY_BATCHES_SQL: Final = f"""SELECT g.gateway_id AS "Gateway", s.name AS "Điểm (site)",
  max(b.committed_at) AS "Lô cuối (last batch)",
  count(b.batch_id) FILTER (WHERE b.committed_at > now() - interval '5 minutes')
    AS "Lô 5 phút (batches, 5 min)",
  coalesce(sum(b.readings) FILTER (WHERE b.committed_at > now() - interval '5 minutes'), 0)
    AS "Bản tin 5 phút (readings, 5 min)",
  count(b.batch_id) FILTER (WHERE $__timeFilter(b.committed_at)) AS "Lô trong khoảng (batches)",
  (SELECT max(extract(epoch FROM ds.updated_at - ds.last_seen))
    FROM {DEVICES} d JOIN {DEVICE_STATE} ds ON ds.device_id = d.device_id
    WHERE d.gateway_id = g.gateway_id) AS "Độ trễ giao nhận (delivery delay, s)"
FROM {GATEWAYS} g
JOIN {SITES} s ON s.site_id = g.site_id
LEFT JOIN {INGESTED_BATCHES} b ON b.gateway_id = g.gateway_id
WHERE g.status = 'active'
  AND {SITE_FILTER}
GROUP BY g.gateway_id, s.name
ORDER BY 3 ASC NULLS FIRST"""

_REJECTS_SQL: Final = f"""SELECT $__timeGroupAlias(r.received_at, $__interval), r.reason AS metric,
  sum(r.count) AS value
FROM {REJECTS} r
LEFT JOIN {GATEWAYS} g ON g.gateway_id = r.gateway_id
LEFT JOIN {SITES} s ON s.site_id = g.site_id
WHERE $__timeFilter(r.received_at)
  AND (s.site_id IS NULL
    OR ({SITE_FILTER}))
GROUP BY 1, 2
ORDER BY 1"""

# Gateways report their state every state_interval_s (10 s); ingest stores
# each one. Gateways not registered (or whose registration is gone) still
# show, under no site, as rejects do.
_GATEWAY_SITE_FILTER: Final = f"""(s.site_id IS NULL
    OR ({SITE_FILTER}))"""

# Batches waiting for ingest's ack in each gateway's outbox: the largest
# reported in each interval, so a short backlog is not averaged away.
_OUTBOX_DEPTH_SQL: Final = f"""SELECT $__timeGroupAlias(h.ts, $__interval), h.gateway_id AS metric,
  max(h.outbox_depth) AS value
FROM {GATEWAY_STATUS_HISTORY} h
LEFT JOIN {GATEWAYS} g ON g.gateway_id = h.gateway_id
LEFT JOIN {SITES} s ON s.site_id = g.site_id
WHERE $__timeFilter(h.ts) AND {_GATEWAY_SITE_FILTER}
GROUP BY 1, 2
ORDER BY 1"""

# The gateways' states carry the readings their outbox refused (under
# refuse) and dropped (under drop_oldest) while full: totals since each
# gateway's outbox file was created, so they survive its restarts; any
# number above 0 is readings lost at that gateway.
# A gateway that reported "online" but nothing for a while is silent
# (contracts.schema.gateway_online_sql, the rule `cityhub status` uses too).
_GATEWAY_STATE: Final = f"""CASE
    WHEN gs.gateway_id IS NULL THEN 3
    WHEN gs.status = 'offline' THEN 2
    WHEN NOT {gateway_online_sql("gs.status", "gs.ts")} THEN 1
    ELSE 0
  END"""
_GATEWAY_STATES: Final[dict[str, tuple[str, str | None]]] = {
    "0": ("Trực tuyến (online)", "green"),
    "1": ("Im lặng (silent)", "orange"),
    "2": ("Ngoại tuyến (offline)", "red"),
    "3": ("Chưa báo (never reported)", "purple"),
}

_GATEWAY_STATUS_SQL: Final = f"""SELECT coalesce(gs.gateway_id, g.gateway_id) AS "Gateway",
  s.name AS "Điểm (site)",
  {_GATEWAY_STATE} AS "Trạng thái (status)",
  gs.outbox_depth AS "Hàng đợi gửi (outbox, batches)",
  gs.outbox_readings AS "Hàng đợi gửi (outbox, readings)",
  gs.outbox_refused_readings AS "Từ chối khi đầy (refused, outbox full)",
  gs.outbox_dropped_readings AS "Bỏ khi đầy (dropped, outbox full)",
  gs.readings_per_s AS "Bản tin/giây (readings/s)",
  gs.devices_online AS "Thiết bị trực tuyến (devices online)",
  gs.version AS "Phiên bản (version)",
  gs.ts AS "Cập nhật (last update)"
FROM {GATEWAY_STATUS} gs
FULL JOIN {GATEWAYS} g ON g.gateway_id = gs.gateway_id
LEFT JOIN {SITES} s ON s.site_id = g.site_id
WHERE (g.status IS NULL OR g.status = 'active') AND {_GATEWAY_SITE_FILTER}
ORDER BY 3 DESC, 4 DESC NULLS LAST, 1"""

_REJECT_REASONS_SQL: Final = f"""SELECT r.reason AS metric, sum(r.count) AS rejects
FROM {REJECTS} r
WHERE $__timeFilter(r.received_at)
GROUP BY 1
ORDER BY 2 DESC"""

# What the gateways refused (their reports, a row per device and reason with a
# count) and what ingest refused (a row each), by device and reason. Ids no
# gateway serves (not registered, or registered elsewhere) are shown whatever
# the site filter, like the gateways without a site; rows without an id (a
# topic naming none, a gateway's overflow count) under "(không rõ / none)".
_REJECTS_BY_DEVICE_SQL: Final = f"""SELECT coalesce(r.device_id, '(không rõ / none)')
    AS "Thiết bị (device)",
  r.reason AS "Lý do (reason)", sum(r.count) AS "Số lần (count)",
  max(coalesce(r.last_at, r.received_at)) AS "Lần cuối (last seen)",
  coalesce(d.device_type, 'chưa đăng ký (not registered)') AS "Loại (type)",
  string_agg(DISTINCT coalesce(r.gateway_id, '-'), ', ') AS "Gateway",
  (array_agg(r.detail ORDER BY r.received_at DESC))[1] AS "Chi tiết (detail)"
FROM {REJECTS} r
LEFT JOIN {DEVICES} d ON d.device_id = r.device_id
LEFT JOIN {SITES} s ON s.site_id = d.site_id
WHERE $__timeFilter(r.received_at)
  AND (s.site_id IS NULL
    OR ({SITE_FILTER}))
GROUP BY 1, 2, 5
ORDER BY 3 DESC, 4 DESC
LIMIT 200"""


def _gateway_status(
    width: int = 24, height: int = 9, sql: str = _GATEWAY_STATUS_SQL
) -> table.Panel:
    return _table(
        "Trạng thái gateway (latest gateway status)",
        sql,
        width=width,
        height=height,
    ).override_by_name(
        "Trạng thái (status)",
        [
            model.DynamicConfigValue(id_val="mappings", value=_value_text(_GATEWAY_STATES)),
            model.DynamicConfigValue(id_val="custom.cellOptions", value={"type": "color-text"}),
        ],
    )


def _reject_reasons() -> piechart.Panel:
    return (
        piechart.Panel()
        .title("Lý do bị loại (rejects by reason)")
        .datasource(datasource_ref())
        .with_target(Sql(_REJECT_REASONS_SQL).table().ref_id("A"))
        .reduce_options(_all_values())
        .height(9)
        .span(8)
    )


def fleet_health() -> board.Dashboard:
    dashboard = _board(
        "cityhub-fleet-health",
        "Sức khỏe thiết bị · Fleet health",
        ["fleet", "ingest"],
        "Thiết bị trực tuyến và lần cuối gửi, gateway (trạng thái, hàng đợi gửi), "
        "tốc độ và độ trễ ghi dữ liệu, bản tin bị loại theo lý do.",
    )
    return _numbered(
        dashboard,
        [
            _devices_online(width=8, height=6),
            _table(
                "Gateway: lô dữ liệu nhận được (gateway batches)",
                _GATEWAY_BATCHES_SQL,
                height=6,
                width=16,
            ),
            _linked(
                _table(
                    "Thiết bị và lần cuối gửi (devices, last seen)",
                    _DEVICES_SQL,
                    width=24,
                    height=10,
                )
            ),
            _series("Tốc độ ghi (ingest rate)", _INGEST_RATE_SQL, unit="none"),
            _series("Độ trễ ghi (ingest lag and commit time)", _INGEST_LAG_SQL, unit="ms"),
            _series(
                "Lô nhận theo gateway (batches received per gateway)",
                _GATEWAY_BATCH_RATE_SQL,
                unit="none",
                width=24,
            ),
            _series(
                "Bản tin bị loại theo lý do (rejects by reason)",
                _REJECTS_SQL,
                unit="none",
                width=16,
            ).draw_style(common.GraphDrawStyle.BARS),
            _reject_reasons(),
            _table(
                "Bản tin bị loại theo thiết bị và lý do (rejects by device and reason)",
                _REJECTS_BY_DEVICE_SQL,
                width=24,
                height=10,
            ),
            _gateway_status(),
            _series(
                "Hàng đợi gửi của gateway (gateway outbox depth, batches)",
                _OUTBOX_DEPTH_SQL,
                unit="none",
                width=24,
            ),
        ],
    )


# --- alerts ------------------------------------------------------------------------

_ACTIVE_ALERTS_SQL: Final = f"""SELECT a.raised_at AS "Bắt đầu (raised)",
  a.severity AS "Mức độ (severity)",
  a.rule_id AS "Quy tắc (rule)", a.device_id AS "Thiết bị (device)", s.name AS "Điểm (site)",
  a.value AS "Giá trị (value)", a.message AS "Nội dung (message)", a.state AS "Trạng thái (state)",
  a.acked_by AS "Xác nhận bởi (acked by)", s.site_id
FROM {ALERTS} a
JOIN {DEVICES} d ON d.device_id = a.device_id
JOIN {SITES} s ON s.site_id = d.site_id
WHERE a.state IN {ACTIVE_STATES} AND {SITE_FILTER} AND {TYPE_FILTER}
ORDER BY array_position(ARRAY{list(SEVERITIES)}::text[], a.severity), a.raised_at DESC"""

_RAISED_SQL: Final = f"""SELECT $__timeGroupAlias(t.ts, $__interval), t.severity AS metric,
  count(*) AS value
FROM {ALERT_TRANSITIONS} t
JOIN {ALERTS} a ON a.alert_id = t.alert_id
JOIN {DEVICES} d ON d.device_id = a.device_id
JOIN {SITES} s ON s.site_id = d.site_id
WHERE $__timeFilter(t.ts) AND t.from_state IS NULL AND {SITE_FILTER} AND {TYPE_FILTER}
GROUP BY 1, 2
ORDER BY 1"""

_OPEN_OVER_TIME_SQL: Final = f"""SELECT b.t AS "time", sev.severity AS metric,
  count(a.alert_id) AS value
FROM generate_series(
  time_bucket('$__interval'::interval, $__timeFrom()::timestamptz),
  $__timeTo()::timestamptz, '$__interval'::interval) AS b (t)
CROSS JOIN unnest(ARRAY{list(SEVERITIES)}::text[]) AS sev (severity)
LEFT JOIN (
  {ALERTS} a JOIN {DEVICES} d ON d.device_id = a.device_id JOIN {SITES} s ON s.site_id = d.site_id
) ON a.severity = sev.severity AND a.raised_at <= b.t
  AND (a.cleared_at IS NULL OR a.cleared_at > b.t) AND {SITE_FILTER} AND {TYPE_FILTER}
GROUP BY 1, 2
ORDER BY 1"""

_HISTORY_SQL: Final = f"""SELECT a.raised_at AS "Bắt đầu (raised)",
  a.cleared_at AS "Kết thúc (cleared)",
  extract(epoch FROM coalesce(a.cleared_at, now()) - a.raised_at) AS "Thời lượng (duration)",
  a.severity AS "Mức độ (severity)", a.rule_id AS "Quy tắc (rule)",
  a.device_id AS "Thiết bị (device)", s.name AS "Điểm (site)", a.message AS "Nội dung (message)",
  a.state AS "Trạng thái (state)", s.site_id
FROM {ALERTS} a
JOIN {DEVICES} d ON d.device_id = a.device_id
JOIN {SITES} s ON s.site_id = d.site_id
WHERE (a.raised_at <= $__timeTo()::timestamptz)
  AND (a.cleared_at IS NULL OR a.cleared_at >= $__timeFrom()::timestamptz)
  AND {SITE_FILTER} AND {TYPE_FILTER}
ORDER BY a.raised_at DESC
LIMIT 500"""

_TRANSITIONS_SQL: Final = f"""SELECT t.ts AS "Thời điểm (time)", t.alert_id AS "Cảnh báo (alert)",
  a.rule_id AS "Quy tắc (rule)", a.device_id AS "Thiết bị (device)",
  coalesce(t.from_state, '') AS "Từ (from)", t.to_state AS "Sang (to)",
  t.severity AS "Mức độ (severity)", t.value AS "Giá trị (value)", t.note AS "Ghi chú (note)",
  s.name AS "Điểm (site)", s.site_id
FROM {ALERT_TRANSITIONS} t
JOIN {ALERTS} a ON a.alert_id = t.alert_id
JOIN {DEVICES} d ON d.device_id = a.device_id
JOIN {SITES} s ON s.site_id = d.site_id
WHERE $__timeFilter(t.ts) AND {SITE_FILTER} AND {TYPE_FILTER}
ORDER BY t.ts DESC
LIMIT 500"""


def _severity_cells() -> list[model.DynamicConfigValue]:
    return [
        model.DynamicConfigValue(id_val="mappings", value=_severity_mappings()),
        model.DynamicConfigValue(id_val="custom.cellOptions", value={"type": "color-text"}),
    ]


def _state_mappings() -> list[model.ValueMapping]:
    return _value_text({k: (v, None) for k, v in ALERT_STATE_LABELS.items()})


def _severity_series(title: str, sql: str) -> ts.Panel:
    panel = _series(title, sql, unit="none")
    for severity in SEVERITIES:
        panel = panel.override_by_name(
            severity,
            [
                *_colour_override(SEVERITY_COLOURS[severity]),
                model.DynamicConfigValue(id_val="displayName", value=SEVERITY_LABELS[severity]),
            ],
        )
    return panel


def _active_by_severity() -> stat.Panel:
    return (
        stat.Panel()
        .title("Đang mở theo mức độ (active by severity)")
        .datasource(datasource_ref())
        .with_target(Sql(_open_alerts_sql()).table().ref_id("A"))
        .reduce_options(_all_values())
        .graph_mode(common.BigValueGraphMode.NONE)
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .text_mode(common.BigValueTextMode.VALUE_AND_NAME)
        .color_scheme(_by_thresholds())
        .thresholds(_thresholds([(None, "green"), (1.0, "orange")]))
        .mappings(_severity_mappings())
        .height(5)
        .span(24)
    )


def _active_alerts() -> table.Panel:
    return _linked(
        _table("Cảnh báo đang mở (active alerts)", _ACTIVE_ALERTS_SQL, width=24, height=9)
        .override_by_name("Mức độ (severity)", _severity_cells())
        .override_by_name(
            "Trạng thái (state)",
            [model.DynamicConfigValue(id_val="mappings", value=_state_mappings())],
        )
    )


def _alert_history() -> table.Panel:
    return _linked(
        _table("Lịch sử cảnh báo (alert history)", _HISTORY_SQL, width=24, height=10)
        .override_by_name("Mức độ (severity)", _severity_cells())
        .override_by_name(
            "Thời lượng (duration)", [model.DynamicConfigValue(id_val="unit", value="s")]
        )
        .override_by_name(
            "Trạng thái (state)",
            [model.DynamicConfigValue(id_val="mappings", value=_state_mappings())],
        )
    )


def alerts() -> board.Dashboard:
    dashboard = _board(
        "cityhub-alerts",
        "Cảnh báo · Alerts",
        ["alerts"],
        "Cảnh báo đang mở theo mức độ, lịch sử, và các lần chuyển trạng thái "
        "(chú thích trên biểu đồ sau `cityhub grafana push`).",
    ).annotation(_alert_annotations())
    return _numbered(
        dashboard,
        [
            _active_by_severity(),
            _severity_series(
                "Cảnh báo đang mở theo thời gian (open alerts over time)", _OPEN_OVER_TIME_SQL
            ),
            _severity_series("Cảnh báo mới (alerts raised per interval)", _RAISED_SQL).draw_style(
                common.GraphDrawStyle.BARS
            ),
            _active_alerts(),
            _alert_history(),
            _linked(
                _table(
                    "Chuyển trạng thái (alert transitions)", _TRANSITIONS_SQL, width=24, height=10
                )
            ),
        ],
    )


# --- site --------------------------------------------------------------------------

# One site, chosen in the single-value `site` variable (`IN` all the same, so
# a link or a test may pass several).
ONE_SITE: Final = "IN (${site:sqlstring})"

_SITE_DEVICES_SQL: Final = f"""SELECT d.device_id AS "{DEVICE_FIELD}",
  d.device_type AS "Loại (type)", d.label AS "Nhãn (label)", d.gateway_id AS "Gateway",
  {DEVICE_STATUS} AS "Trạng thái (status)",
  ds.last_seen AS "Lần cuối (last seen)",
  extract(epoch FROM now() - ds.last_seen) AS "Im lặng (silent, s)",
  dt.offline_after_s AS "Mất kết nối sau (offline after, s)",
  d.status AS "Đăng ký (registration)"
FROM {DEVICES} d
{_TYPE_JOIN}
LEFT JOIN {DEVICE_STATE} ds ON ds.device_id = d.device_id
WHERE d.site_id {ONE_SITE}
ORDER BY d.status, {ONLINE} NULLS FIRST, d.device_id"""

_SITE_ALERTS_SQL: Final = f"""SELECT a.raised_at AS "Bắt đầu (raised)",
  a.severity AS "Mức độ (severity)", a.rule_id AS "Quy tắc (rule)",
  a.device_id AS "{DEVICE_FIELD}", a.value AS "Giá trị (value)",
  a.message AS "Nội dung (message)", a.state AS "Trạng thái (state)"
FROM {ALERTS} a
WHERE a.site_id {ONE_SITE} AND a.state IN {ACTIVE_STATES}
ORDER BY array_position(ARRAY{list(SEVERITIES)}::text[], a.severity), a.raised_at DESC"""

_SITE_GATEWAYS_SQL: Final = f"""SELECT g.gateway_id AS "Gateway",
  {_GATEWAY_STATE} AS "Trạng thái (status)",
  gs.outbox_depth AS "Hàng đợi gửi (outbox, batches)",
  gs.outbox_refused_readings AS "Từ chối khi đầy (refused, outbox full)",
  gs.outbox_dropped_readings AS "Bỏ khi đầy (dropped, outbox full)",
  gs.readings_per_s AS "Bản tin/giây (readings/s)",
  gs.devices_online AS "Thiết bị trực tuyến (devices online)",
  gs.version AS "Phiên bản (version)",
  gs.ts AS "Cập nhật (last update)"
FROM {GATEWAYS} g
LEFT JOIN {GATEWAY_STATUS} gs ON gs.gateway_id = g.gateway_id
WHERE g.site_id {ONE_SITE} AND g.status = 'active'
ORDER BY 2 DESC, 1"""

# What ingest and the site's gateways refused: rows of its devices, and the
# gateways' own rows (ids no gateway serves, overflow counts).
_SITE_REJECTS_SQL: Final = f"""SELECT r.received_at AS "Nhận lúc (received)",
  coalesce(r.device_id, '(không rõ / none)') AS "{DEVICE_FIELD}",
  r.gateway_id AS "Gateway", r.reason AS "Lý do (reason)", r.count AS "Số lần (count)",
  r.detail AS "Chi tiết (detail)"
FROM {REJECTS} r
LEFT JOIN {DEVICES} d ON d.device_id = r.device_id
LEFT JOIN {GATEWAYS} g ON g.gateway_id = r.gateway_id
WHERE $__timeFilter(r.received_at) AND (d.site_id {ONE_SITE} OR g.site_id {ONE_SITE})
ORDER BY r.received_at DESC
LIMIT 200"""


def _site_readings_sql(readings: str, value: str) -> str:
    """One series per device of the site: ``value`` aggregates readings alias ``r``."""
    return f"""SELECT $__timeGroupAlias(r.ts, $__interval), r.device_id AS metric,
  {value} AS value
FROM {readings} r
JOIN {DEVICES} d ON d.device_id = r.device_id
WHERE $__timeFilter(r.ts) AND d.site_id {ONE_SITE}
GROUP BY 1, 2
ORDER BY 1"""


def site() -> board.Dashboard:
    dashboard = _board(
        SITE_BOARD_UID,
        "Điểm giám sát · Site",
        ["site", "drill-down"],
        "Một điểm: thiết bị (trực tuyến, lần cuối gửi), cảnh báo đang mở, gateway, "
        "bản tin gần đây theo loại thiết bị, bản tin bị loại.",
        variables=_variables(with_type=False, single_site=True),
    ).annotation(_alert_annotations())
    devices = _linked(
        _table("Thiết bị của điểm (devices)", _SITE_DEVICES_SQL, width=24, height=9), site=None
    )
    open_alerts = _linked(
        _table("Cảnh báo đang mở (open alerts)", _SITE_ALERTS_SQL, width=24, height=7)
        .override_by_name("Mức độ (severity)", _severity_cells())
        .override_by_name(
            "Trạng thái (state)",
            [model.DynamicConfigValue(id_val="mappings", value=_state_mappings())],
        ),
        site=None,
    )
    # Each type's headline metric, a series per device; a panel stays empty
    # at a site without devices of its type.
    readings = [
        _series(
            "PM2.5 (µg/m³)",
            _site_readings_sql(AIR_QUALITY_READINGS, f"avg(r.{PM25})"),
            unit="conμgm3",
            width=8,
        ),
        _series(
            "Số người chờ (queue length)",
            _site_readings_sql(KIOSK_READINGS, f"avg(r.{QUEUE_LENGTH})"),
            unit="none",
            width=8,
        ),
        _series(
            "Số người trong sảnh (occupancy)",
            _site_readings_sql(CAMERA_READINGS, f"max(r.{OCCUPANCY})"),
            unit="none",
            width=8,
        ),
        _series(
            "Tiếng ồn LAeq (noise, dBA)",
            _site_readings_sql(NOISE_READINGS, f"10 * log(avg(power(10, r.{LAEQ} / 10)))"),
            unit="suffix: dBA",
        ),
        _series(
            "Mức ngập (flooding, cm)",
            _site_readings_sql(WATER_READINGS, f"max(r.{WATER_DEPTH})"),
            unit="suffix: cm",
        ),
    ]
    return _numbered(
        dashboard,
        [
            devices,
            open_alerts,
            _gateway_status(height=6, sql=_SITE_GATEWAYS_SQL),
            *readings,
            _linked(
                _table("Bản tin bị loại (recent rejects)", _SITE_REJECTS_SQL, width=24),
                site=None,
            ),
        ],
    )


# --- device ------------------------------------------------------------------------

# One device, chosen in the single-value `device` variable.
ONE_DEVICE: Final = "IN (${device:sqlstring})"

_DEVICE_VARIABLE_SQL: Final = f"""SELECT d.device_id || ' — '
    || coalesce(nullif(d.label, ''), d.device_type) || ' (' || s.name || ')' AS __text,
  d.device_id AS __value
FROM {DEVICES} d
JOIN {SITES} s ON s.site_id = d.site_id
ORDER BY d.device_id"""

_DEVICE_SQL: Final = f"""SELECT d.device_id AS "{DEVICE_FIELD}", d.device_type AS "Loại (type)",
  d.label AS "Nhãn (label)", s.name AS "{SITE_FIELD}",
  {WARD_NAME} AS "Phường/Xã (ward/commune)", d.gateway_id AS "Gateway",
  d.status AS "Đăng ký (registration)", {DEVICE_STATUS} AS "Trạng thái (status)",
  ds.last_seen AS "Lần cuối (last seen)",
  extract(epoch FROM now() - ds.last_seen) AS "Im lặng (silent, s)",
  dt.offline_after_s AS "Mất kết nối sau (offline after, s)",
  ds.seq_gaps AS "Mất gói (seq gaps)", s.site_id
FROM {DEVICES} d
JOIN {SITES} s ON s.site_id = d.site_id
{_UNIT_JOIN}
{_TYPE_JOIN}
LEFT JOIN {DEVICE_STATE} ds ON ds.device_id = d.device_id
WHERE d.device_id {ONE_DEVICE}"""


def _metric_label(device_type: DeviceType, name: str) -> str:
    metric = device_type.metric(name)
    label = f"{metric.name} ({metric.unit})" if metric.unit else metric.name
    return label.replace("'", "''")


def _device_metrics_sql() -> str:
    """Every metric of the device's type, whatever the type: one branch per catalog type.

    The device's type is known only when the query runs, so the query reads
    every type's readings table for the device (its index on device_id and
    ts makes the other types' branches empty and cheap) and returns the long
    format, a series per metric. Booleans are 0 / 1, enums their codes.
    """
    branches = []
    for index, device_type in enumerate(SHIPPED_CATALOG.types.values()):
        readings = tables.table(readings_table(device_type.name))
        alias = f"t{index}"
        for metric in device_type.metrics:
            column = _metric(device_type, metric.name)
            value = (
                f"{alias}.{column}::int" if metric.kind is MetricKind.BOOL else f"{alias}.{column}"
            )
            branches.append(
                f"SELECT {alias}.ts, '{_metric_label(device_type, metric.name)}', "
                f"{value}::float8\n  FROM {readings} {alias}\n"
                f"  WHERE {alias}.device_id {ONE_DEVICE} AND $__timeFilter({alias}.ts)"
            )
    union = "\n  UNION ALL ".join(branches)
    return f"""SELECT $__timeGroupAlias(r.ts, $__interval), r.metric, avg(r.value) AS value
FROM (
  {union}
) AS r (ts, metric, value)
WHERE r.value IS NOT NULL
GROUP BY 1, 2
ORDER BY 1"""


_DEVICE_ALERTS_SQL: Final = f"""SELECT a.raised_at AS "Bắt đầu (raised)",
  a.cleared_at AS "Kết thúc (cleared)",
  extract(epoch FROM coalesce(a.cleared_at, now()) - a.raised_at) AS "Thời lượng (duration)",
  a.severity AS "Mức độ (severity)", a.rule_id AS "Quy tắc (rule)",
  a.value AS "Giá trị (value)", a.message AS "Nội dung (message)",
  a.state AS "Trạng thái (state)"
FROM {ALERTS} a
WHERE a.device_id {ONE_DEVICE}
  AND (a.raised_at <= $__timeTo()::timestamptz)
  AND (a.cleared_at IS NULL OR a.cleared_at >= $__timeFrom()::timestamptz)
ORDER BY a.raised_at DESC
LIMIT 500"""

_DEVICE_TRANSITIONS_SQL: Final = f"""SELECT t.ts AS "Thời điểm (time)",
  t.alert_id AS "Cảnh báo (alert)",
  a.rule_id AS "Quy tắc (rule)", coalesce(t.from_state, '') AS "Từ (from)",
  t.to_state AS "Sang (to)", t.severity AS "Mức độ (severity)", t.value AS "Giá trị (value)",
  t.note AS "Ghi chú (note)"
FROM {ALERT_TRANSITIONS} t
JOIN {ALERTS} a ON a.alert_id = t.alert_id
WHERE $__timeFilter(t.ts) AND a.device_id {ONE_DEVICE}
ORDER BY t.ts DESC
LIMIT 500"""

_DEVICE_REJECTS_SQL: Final = f"""SELECT r.received_at AS "Nhận lúc (received)",
  r.gateway_id AS "Gateway", r.reason AS "Lý do (reason)", r.count AS "Số lần (count)",
  coalesce(r.last_at, r.received_at) AS "Lần cuối (last seen)", r.detail AS "Chi tiết (detail)"
FROM {REJECTS} r
WHERE $__timeFilter(r.received_at) AND r.device_id {ONE_DEVICE}
ORDER BY r.received_at DESC
LIMIT 200"""


# A device's commands: who asked what, where each is now, and the device's words.
_DEVICE_COMMANDS_SQL: Final = f"""SELECT c.created_at AS "Gửi lúc (asked)",
  c.name AS "Lệnh (command)", c.args::text AS "Tham số (args)",
  c.state AS "Trạng thái (state)", c.state_at AS "Lúc (at)",
  c.operator AS "Người gửi (operator)", c.detail AS "Chi tiết (detail)",
  c.command_id AS "Mã lệnh (command id)"
FROM {COMMANDS} c
WHERE $__timeFilter(c.created_at) AND c.device_id {ONE_DEVICE}
ORDER BY c.created_at DESC
LIMIT 200"""


def _command_state_mappings() -> list[model.ValueMapping]:
    colours = {
        "queued": "blue",
        "sent": "blue",
        "delivered": "purple",
        "succeeded": "green",
        "failed": "red",
        "expired": "orange",
        "cancelled": None,
    }
    return _value_text(
        {state: (f"{vi} / {en}", colours[state]) for state, (vi, en) in STATE_LABELS.items()}
    )


def device() -> board.Dashboard:
    variable = _variable(
        "device",
        "Thiết bị (device)",
        _DEVICE_VARIABLE_SQL,
        model.VariableSort.DISABLED,
        single=True,
    )
    dashboard = _board(
        DEVICE_BOARD_UID,
        "Thiết bị · Device",
        ["device", "drill-down"],
        "Một thiết bị: loại, điểm, gateway, trực tuyến, mọi chỉ số theo thời gian, "
        "cảnh báo và các lần chuyển trạng thái, bản tin bị loại, lệnh đã gửi.",
        variables=[variable],
    )
    identity = _linked(
        _table("Thiết bị (identity and state)", _DEVICE_SQL, width=24, height=5), device=None
    )
    history = (
        _table("Cảnh báo của thiết bị (alerts)", _DEVICE_ALERTS_SQL, width=24, height=8)
        .override_by_name("Mức độ (severity)", _severity_cells())
        .override_by_name(
            "Thời lượng (duration)", [model.DynamicConfigValue(id_val="unit", value="s")]
        )
        .override_by_name(
            "Trạng thái (state)",
            [model.DynamicConfigValue(id_val="mappings", value=_state_mappings())],
        )
    )
    return _numbered(
        dashboard,
        [
            identity,
            _series(
                "Mọi chỉ số của thiết bị (every metric of its type)",
                _device_metrics_sql(),
                width=24,
                height=12,
            ),
            history,
            _table(
                "Chuyển trạng thái (alert transitions)",
                _DEVICE_TRANSITIONS_SQL,
                width=24,
                height=8,
            ),
            _table("Bản tin bị loại (rejects)", _DEVICE_REJECTS_SQL, width=24, height=8),
            _table(
                "Lệnh gửi tới thiết bị (commands)", _DEVICE_COMMANDS_SQL, width=24, height=8
            ).override_by_name(
                "Trạng thái (state)",
                [model.DynamicConfigValue(id_val="mappings", value=_command_state_mappings())],
            ),
        ],
    )


BOARDS: Final[dict[str, Callable[[], board.Dashboard]]] = {
    "city-overview": city_overview,
    "air-quality": air_quality,
    "service-halls": service_halls,
    "fleet-health": fleet_health,
    "alerts": alerts,
    "site": site,
    "device": device,
}


def build_boards() -> dict[str, model.Dashboard]:
    """Every board, built and linked to the others, by file stem."""
    built = {name: make().build() for name, make in BOARDS.items()}
    _link_boards(list(built.values()))
    return built
