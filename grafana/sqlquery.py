"""A grafana-foundation-sdk query type for Grafana's PostgreSQL datasource (raw SQL).

The SDK ships types for Prometheus, Loki and other datasources but none for
the SQL ones, and documents how to add a query type of one's own: a
``Dataquery`` variant with ``to_json`` / ``from_json``, a builder, and a
runtime registration so that decoding a dashboard's JSON turns the targets
of this datasource back into ``SqlQuery`` values. ``from_json`` refuses keys
it does not know, so decoding a board is a real check of its targets.
"""

from __future__ import annotations

from typing import Any, Final, Literal, Self

from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import runtime as cogruntime
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.models.dashboard import DataSourceRef

# Grafana's plugin id of the built-in PostgreSQL datasource (since Grafana 10.2).
POSTGRES_TYPE: Final = "grafana-postgresql-datasource"
# The uid the provisioning file gives cityhub's datasource.
DATASOURCE_UID: Final = "cityhub-timescaledb"

Format = Literal["time_series", "table"]
_KEYS: Final = frozenset(
    {"refId", "datasource", "rawSql", "format", "rawQuery", "editorMode", "hide"}
)


def datasource_ref() -> DataSourceRef:
    return DataSourceRef(type_val=POSTGRES_TYPE, uid=DATASOURCE_UID)


class SqlQuery(cogvariants.Dataquery):
    """One raw-SQL target of a panel."""

    def __init__(
        self,
        *,
        raw_sql: str = "",
        format_val: Format = "table",
        ref_id: str | None = None,
        datasource: DataSourceRef | None = None,
        hide: bool | None = None,
    ) -> None:
        self.raw_sql = raw_sql
        self.format_val: Format = format_val
        self.ref_id = ref_id
        self.datasource = datasource
        self.hide = hide

    def to_json(self) -> dict[str, object]:
        payload: dict[str, object] = {
            "rawSql": self.raw_sql,
            "format": self.format_val,
            "rawQuery": True,
            "editorMode": "code",
        }
        if self.ref_id is not None:
            payload["refId"] = self.ref_id
        if self.datasource is not None:
            payload["datasource"] = self.datasource
        if self.hide is not None:
            payload["hide"] = self.hide
        return payload

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Self:
        unknown = set(data) - _KEYS
        if unknown:
            raise ValueError(f"SQL query has unknown keys: {', '.join(sorted(unknown))}")
        if data.get("format", "table") not in {"time_series", "table"}:
            raise ValueError(f"SQL query format {data.get('format')!r} is not time_series/table")
        if data.get("rawQuery", True) is not True or data.get("editorMode", "code") != "code":
            raise ValueError("SQL queries are raw SQL in the code editor")
        datasource = data.get("datasource")
        return cls(
            raw_sql=str(data.get("rawSql", "")),
            format_val=data.get("format", "table"),
            ref_id=data.get("refId"),
            datasource=DataSourceRef.from_json(datasource) if datasource is not None else None,
            hide=data.get("hide"),
        )


def sql_query_variant() -> cogruntime.DataqueryConfig:
    return cogruntime.DataqueryConfig(identifier=POSTGRES_TYPE, from_json_hook=SqlQuery.from_json)


def register_sql_query() -> None:
    """Let the SDK decode this datasource's targets as SqlQuery (idempotent)."""
    cogruntime.register_dataquery_variant(sql_query_variant())


class Sql(cogbuilder.Builder[SqlQuery]):
    """Builder: ``Sql("SELECT ...").time_series().ref_id("A")``."""

    def __init__(self, raw_sql: str) -> None:
        self._internal = SqlQuery(raw_sql=raw_sql, datasource=datasource_ref())

    def build(self) -> SqlQuery:
        return self._internal

    def ref_id(self, ref_id: str) -> Self:
        self._internal.ref_id = ref_id
        return self

    def time_series(self) -> Self:
        self._internal.format_val = "time_series"
        return self

    def table(self) -> Self:
        self._internal.format_val = "table"
        return self
