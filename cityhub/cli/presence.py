"""Which devices and gateways are online now, each by its one rule in ``contracts.schema``.

A device is online when seen within its type's ``offline_after_s``
(``online_sql``); a gateway when its latest state says online and is recent
(``gateway_online_sql``). A revoked or disabled one is never online: its
sessions were cut when the registry said so, whatever it sent just before.
The list commands and `cityhub status` ask here; how the answers are
printed is theirs.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from adapters.database import Connection, database_errors
from contracts.schema import gateway_online_sql, online_sql


class DevicePresence(msgspec.Struct, frozen=True, kw_only=True):
    device_id: str
    site_id: str
    device_type: str
    status: str  # the registry's: active or revoked
    enabled: bool
    online: bool
    last_seen: datetime | None  # None: never seen


class GatewayPresence(msgspec.Struct, frozen=True, kw_only=True):
    gateway_id: str
    site_id: str
    status: str  # the registry's: active or revoked
    online: bool
    reported: str | None  # its latest state's status, None: never reported
    last_state: datetime | None  # the time of its latest state
    age_s: float | None  # how long ago that was
    outbox_depth: int | None  # batches waiting for an ack, as it last said
    readings_per_s: float | None
    # Readings its outbox refused and dropped while full, totals as it last said.
    outbox_refused_readings: int | None = None
    outbox_dropped_readings: int | None = None


def device_presence(conn: Connection[Any], schema: str) -> dict[str, DevicePresence]:
    """Every registered device's presence, by id."""
    online = online_sql("ds.last_seen", "t.offline_after_s")
    with database_errors("device presence", schema=schema), conn.cursor() as cur:
        cur.execute(
            f"""SELECT d.device_id, d.site_id, d.device_type, d.status, d.enabled,
                    coalesce({online} AND d.status = 'active' AND d.enabled, false),
                    ds.last_seen
                FROM {schema}.devices d
                JOIN {schema}.device_types t ON t.device_type = d.device_type
                LEFT JOIN {schema}.device_state ds ON ds.device_id = d.device_id"""
        )
        rows = cur.fetchall()
    return {
        r[0]: DevicePresence(
            device_id=r[0],
            site_id=r[1],
            device_type=r[2],
            status=r[3],
            enabled=r[4],
            online=r[5],
            last_seen=r[6],
        )
        for r in rows
    }


def gateway_presence(conn: Connection[Any], schema: str) -> dict[str, GatewayPresence]:
    """Every registered gateway's presence, by id."""
    online = gateway_online_sql("gs.status", "gs.ts")
    with database_errors("gateway presence", schema=schema), conn.cursor() as cur:
        cur.execute(
            f"""SELECT g.gateway_id, g.site_id, g.status,
                    coalesce({online} AND g.status = 'active', false),
                    gs.status, gs.ts,
                    extract(epoch FROM now() - gs.ts)::float8, gs.outbox_depth,
                    gs.readings_per_s, gs.outbox_refused_readings, gs.outbox_dropped_readings
                FROM {schema}.gateways g
                LEFT JOIN {schema}.gateway_status gs ON gs.gateway_id = g.gateway_id"""
        )
        rows = cur.fetchall()
    return {
        r[0]: GatewayPresence(
            gateway_id=r[0],
            site_id=r[1],
            status=r[2],
            online=r[3],
            reported=r[4],
            last_state=r[5],
            age_s=r[6],
            outbox_depth=r[7],
            readings_per_s=r[8],
            outbox_refused_readings=r[9],
            outbox_dropped_readings=r[10],
        )
        for r in rows
    }


def device_type_names(conn: Connection[Any], schema: str) -> list[str]:
    """The device types the database knows (migrate writes the catalog's)."""
    with database_errors("device types", schema=schema), conn.cursor() as cur:
        cur.execute(f"SELECT device_type FROM {schema}.device_types ORDER BY device_type")
        return [r[0] for r in cur.fetchall()]
