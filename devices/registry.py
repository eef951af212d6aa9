"""The registry adapter: sites, gateways, devices, credentials and the audit log in PostgreSQL.

Every provisioning command runs in one ``Registry.transaction()``: it reads
and locks the rows it changes, writes them and its audit row, and commits
only when the broker side has succeeded too, so a refused request changes
nothing. Database errors are translated by ``adapters.database``: an
unreachable server is DatabaseUnavailableError, a schema without the
provisioning tables SchemaError, a constraint the checks above missed
RefusedByDatabaseError. Opening the connection is the caller's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Literal, cast

import msgspec

from adapters.database import Connection, Cursor, database_errors, dict_row
from contracts.catalog import DEVICE_TYPES, current_catalog
from contracts.errors import AlreadyExistsError, ConflictError, InputError, NotFoundError
from contracts.messages import DeviceConfig, GatewayConfig, Transport, check_gateway_config
from contracts.schema import check_schema_name
from contracts.sites import Site
from devices.validation import shared_port_conflict

Status = Literal["active", "revoked"]
CredentialStatus = Literal["active", "disabled", "revoked"]


class GatewayRow(msgspec.Struct, frozen=True, kw_only=True):
    gateway_id: str
    site_id: str
    label: str
    location: str
    status: str
    config_version: int
    created_at: datetime
    revoked_at: datetime | None
    devices: int = 0


class DeviceRow(msgspec.Struct, frozen=True, kw_only=True):
    device_id: str
    device_type: str
    site_id: str
    gateway_id: str | None
    transport: str
    port: str | None
    protocol: str | None
    label: str
    location: str
    hardware_id: str
    enabled: bool
    status: str
    created_at: datetime
    revoked_at: datetime | None
    # Modbus, LoRaWAN and HTTP devices (``DeviceConfig``'s fields of the same names).
    model: str | None = None
    slave_id: int | None = None
    poll_interval_s: float | None = None
    dev_eui: str | None = None
    token_sha256: str | None = None

    def config(self) -> DeviceConfig:
        """What its gateway is told about it (unchecked: the row was checked when written)."""
        return DeviceConfig(
            device_id=self.device_id,
            device_type=self.device_type,
            transport=cast("Transport", self.transport),
            port=self.port,
            protocol=self.protocol,
            label=self.label,
            enabled=self.enabled,
            model=self.model,
            slave_id=self.slave_id,
            poll_interval_s=self.poll_interval_s,
            dev_eui=self.dev_eui,
            token_sha256=self.token_sha256,
        )


class SiteRow(msgspec.Struct, frozen=True, kw_only=True):
    """A site as stored, with its ward/commune's name and what is installed there."""

    site: Site
    ward: str  # the unit's name, '' when the site has none recorded
    created_at: datetime
    updated_at: datetime
    gateways: int = 0
    devices: int = 0  # active ones


class ImportResult(msgspec.Struct, frozen=True, kw_only=True):
    added: list[str]
    updated: list[str]
    unchanged: list[str]


class CredentialRow(msgspec.Struct, frozen=True, kw_only=True):
    """A broker account as the registry knows it: never its secret, nor the secret's hash."""

    broker: str
    username: str
    owner_kind: str
    owner_id: str
    status: str
    created_at: datetime
    rotated_at: datetime | None
    revoked_at: datetime | None


class AuditEntry(msgspec.Struct, frozen=True, kw_only=True):
    audit_id: int
    ts: datetime
    operator: str
    action: str
    subject_kind: str
    subject_id: str
    detail: dict[str, Any]
    # The database login that wrote the row and the OS user of the command
    # (NULL for rows from before these were recorded, or a writer that did not say).
    db_user: str | None = None
    os_user: str | None = None


_GATEWAY_COLUMNS = (
    "g.gateway_id, g.site_id, g.label, g.location, g.status, g.config_version, "
    "g.created_at, g.revoked_at"
)
_DEVICE_COLUMNS = (
    "device_id, device_type, site_id, gateway_id, transport, port, protocol, label, "
    "location, hardware_id, enabled, status, created_at, revoked_at, model, slave_id, "
    "poll_interval_s, dev_eui, token_sha256"
)
_SITE_COLUMNS = (
    "s.site_id, s.name, s.kind, s.unit_code, s.district, s.address, s.latitude, s.longitude,"
    " s.opening_hours"
)


def _site(row: dict[str, Any]) -> Site:
    return Site(
        site_id=row["site_id"],
        name=row["name"],
        kind=row["kind"],
        unit_code=row["unit_code"],
        former_district=row["district"],
        address=row["address"],
        latitude=row["latitude"],
        longitude=row["longitude"],
        opening_hours=row["opening_hours"],
    )


_CREDENTIAL_COLUMNS = (
    "broker, username, owner_kind, owner_id, status, created_at, rotated_at, revoked_at"
)


class RegistryTx:
    """The operations of one transaction (``Registry.transaction``)."""

    def __init__(self, cur: Cursor[dict[str, Any]], schema: str) -> None:
        self.cur = cur
        self.s = schema

    # -- reads ----------------------------------------------------------------------

    def require_site(self, site_id: str) -> None:
        self.cur.execute(f"SELECT 1 FROM {self.s}.sites WHERE site_id = %s", (site_id,))
        if self.cur.fetchone() is None:
            raise NotFoundError(
                f"site {site_id!r} is not registered (`cityhub sites list` lists them,"
                " `cityhub sites add` adds one)"
            )

    def sites(self, site_ids: list[str], *, lock: bool = False) -> dict[str, Site]:
        """The stored sites among ``site_ids``, by id."""
        self.cur.execute(
            f"SELECT {_SITE_COLUMNS} FROM {self.s}.sites s WHERE s.site_id = ANY(%s)"
            + (" FOR UPDATE" if lock else ""),
            (site_ids,),
        )
        return {r["site_id"]: _site(r) for r in self.cur.fetchall()}

    def write_site(self, site: Site, *, new: bool) -> None:
        values = (
            site.name,
            site.kind,
            site.unit_code,
            site.former_district,
            site.address,
            site.latitude,
            site.longitude,
            site.opening_hours,
            site.site_id,
        )
        if new:
            self.cur.execute(
                f"""INSERT INTO {self.s}.sites (name, kind, unit_code, district, address,
                    latitude, longitude, opening_hours, site_id)
                    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)""",
                values,
            )
        else:
            self.cur.execute(
                f"""UPDATE {self.s}.sites SET name = %s, kind = %s, unit_code = %s,
                    district = %s, address = %s, latitude = %s, longitude = %s,
                    opening_hours = %s, updated_at = now() WHERE site_id = %s""",
                values,
            )

    def gateway(self, gateway_id: str, *, lock: bool = False) -> GatewayRow | None:
        self.cur.execute(
            f"SELECT {_GATEWAY_COLUMNS} FROM {self.s}.gateways g WHERE g.gateway_id = %s"
            + (" FOR UPDATE" if lock else ""),
            (gateway_id,),
        )
        row = self.cur.fetchone()
        return None if row is None else msgspec.convert(row, GatewayRow)

    def device(self, device_id: str, *, lock: bool = False) -> DeviceRow | None:
        self.cur.execute(
            f"SELECT {_DEVICE_COLUMNS} FROM {self.s}.devices WHERE device_id = %s"
            + (" FOR UPDATE" if lock else ""),
            (device_id,),
        )
        row = self.cur.fetchone()
        return None if row is None else msgspec.convert(row, DeviceRow)

    def active_devices_of(self, gateway_id: str) -> list[str]:
        self.cur.execute(
            f"SELECT device_id FROM {self.s}.devices WHERE gateway_id = %s AND status = 'active'"
            " ORDER BY device_id",
            (gateway_id,),
        )
        return [str(r["device_id"]) for r in self.cur.fetchall()]

    def active_mqtt_devices_of(self, gateway_id: str | None = None) -> list[str]:
        """Active MQTT devices (of one gateway, or of all): the ones with a broker account."""
        self.cur.execute(
            f"SELECT device_id FROM {self.s}.devices WHERE status = 'active'"
            " AND transport = 'mqtt' AND (%s::text IS NULL OR gateway_id = %s)"
            " ORDER BY device_id",
            (gateway_id, gateway_id),
        )
        return [str(r["device_id"]) for r in self.cur.fetchall()]

    def active_lorawan_euis_of(self, gateway_id: str) -> list[str]:
        """The DevEUIs of a gateway's active LoRaWAN devices: the events its site role reads."""
        self.cur.execute(
            f"SELECT dev_eui FROM {self.s}.devices WHERE status = 'active'"
            " AND transport = 'lorawan' AND gateway_id = %s ORDER BY dev_eui",
            (gateway_id,),
        )
        return [str(r["dev_eui"]) for r in self.cur.fetchall()]

    def device_with_dev_eui(self, dev_eui: str) -> str | None:
        """The active device that has this DevEUI, if any."""
        self.cur.execute(
            f"SELECT device_id FROM {self.s}.devices WHERE status = 'active' AND dev_eui = %s",
            (dev_eui,),
        )
        row = self.cur.fetchone()
        return None if row is None else str(row["device_id"])

    def active_gateway_ids(self) -> list[str]:
        self.cur.execute(
            f"SELECT gateway_id FROM {self.s}.gateways WHERE status = 'active' ORDER BY gateway_id"
        )
        return [str(r["gateway_id"]) for r in self.cur.fetchall()]

    def gateway_birth(self, gateway_id: str) -> int:
        """The birth of the gateway's latest state that ingest stored; 0 if none."""
        self.cur.execute(
            f"SELECT birth FROM {self.s}.gateway_status WHERE gateway_id = %s", (gateway_id,)
        )
        row = self.cur.fetchone()
        return 0 if row is None else int(row["birth"])

    # -- writes ---------------------------------------------------------------------

    def insert_gateway(self, *, gateway_id: str, site_id: str, label: str, location: str) -> None:
        self.cur.execute(
            f"INSERT INTO {self.s}.gateways (gateway_id, site_id, label, location)"
            " VALUES (%s, %s, %s, %s)",
            (gateway_id, site_id, label, location),
        )

    def set_gateway_status(self, gateway_id: str, status: Status) -> None:
        self.cur.execute(
            f"UPDATE {self.s}.gateways SET status = %s,"
            " revoked_at = CASE WHEN %s = 'revoked' THEN now() END WHERE gateway_id = %s",
            (status, status, gateway_id),
        )

    def insert_device(
        self,
        device: DeviceConfig,
        *,
        site_id: str,
        gateway_id: str,
        location: str,
        hardware_id: str,
    ) -> None:
        self.cur.execute(
            f"""INSERT INTO {self.s}.devices (device_id, device_type, site_id, gateway_id,
                transport, port, protocol, label, location, hardware_id, enabled, model,
                slave_id, poll_interval_s, dev_eui, token_sha256)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""",
            (
                device.device_id,
                device.device_type,
                site_id,
                gateway_id,
                device.transport,
                device.port,
                device.protocol,
                device.label,
                location,
                hardware_id,
                device.enabled,
                device.model,
                device.slave_id,
                device.poll_interval_s,
                device.dev_eui,
                device.token_sha256,
            ),
        )

    def update_device(self, device_id: str, **fields: object) -> None:
        allowed = {
            "site_id",
            "gateway_id",
            "port",
            "protocol",
            "hardware_id",
            "enabled",
            "token_sha256",
        }
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"update_device: unknown fields {sorted(unknown)}")
        assignments = ", ".join(f"{name} = %s" for name in fields)
        self.cur.execute(
            f"UPDATE {self.s}.devices SET {assignments} WHERE device_id = %s",
            (*fields.values(), device_id),
        )

    def revoke_device(self, device_id: str) -> None:
        self.cur.execute(
            f"UPDATE {self.s}.devices SET status = 'revoked', revoked_at = now()"
            " WHERE device_id = %s",
            (device_id,),
        )

    def put_credential(
        self, *, broker: str, username: str, owner_kind: str, owner_id: str, secret_hash: str
    ) -> None:
        """A new account, or a new secret for a known one (rotation or replacement)."""
        self.cur.execute(
            f"""INSERT INTO {self.s}.credentials
                (broker, username, owner_kind, owner_id, secret_hash)
                VALUES (%s, %s, %s, %s, %s)
                ON CONFLICT (broker, username) DO UPDATE SET secret_hash = EXCLUDED.secret_hash,
                status = 'active', rotated_at = now(), revoked_at = NULL""",
            (broker, username, owner_kind, owner_id, secret_hash),
        )

    def credential_status(self, broker: str, username: str) -> str | None:
        """An account's status in the registry; None if it was never made."""
        self.cur.execute(
            f"SELECT status FROM {self.s}.credentials WHERE broker = %s AND username = %s",
            (broker, username),
        )
        row = self.cur.fetchone()
        return None if row is None else str(row["status"])

    def set_credential_status(self, broker: str, username: str, status: CredentialStatus) -> None:
        self.cur.execute(
            f"UPDATE {self.s}.credentials SET status = %s,"
            " revoked_at = CASE WHEN %s = 'revoked' THEN now() ELSE revoked_at END"
            " WHERE broker = %s AND username = %s",
            (status, status, broker, username),
        )

    def next_config(
        self, gateway_id: str, *, now_s: int, changed: str | None = None
    ) -> GatewayConfig:
        """Bump the gateway's config version and build its config from the active devices.

        The version is at least the current Unix time in seconds, so it is
        newer than a config an earlier tool published with a time-based version.
        The config is checked as the gateway will check it: ConflictError if
        it would be refused, naming the devices (``changed`` is the device
        the caller's command adds or moves: named as the one that conflicts).
        """
        self.cur.execute(
            f"""UPDATE {self.s}.gateways SET config_version = greatest(config_version + 1, %s)
                WHERE gateway_id = %s RETURNING site_id, config_version""",
            (now_s, gateway_id),
        )
        row = self.cur.fetchone()
        if row is None:
            raise NotFoundError(f"gateway {gateway_id!r} is not registered")
        self.cur.execute(
            f"""SELECT {_DEVICE_COLUMNS} FROM {self.s}.devices
                WHERE gateway_id = %s AND status = 'active' ORDER BY device_id""",
            (gateway_id,),
        )
        devices = [msgspec.convert(d, DeviceRow).config() for d in self.cur.fetchall()]
        # The catalog entries of the devices' types travel with the config: a
        # gateway installed before a type was defined learns it from here; so
        # do the Modbus and LoRaWAN models they name.
        used = {d.device_type for d in devices}
        installed = current_catalog()
        modbus = {d.model for d in devices if d.transport == "modbus"}
        lorawan = {d.model for d in devices if d.transport == "lorawan"}
        config = GatewayConfig(
            gateway_id=gateway_id,
            version=int(row["config_version"]),
            site_id=str(row["site_id"]),
            devices=devices,
            types=tuple(t for name, t in DEVICE_TYPES.items() if name in used),
            modbus_models=tuple(m for n, m in installed.modbus_models.items() if n in modbus),
            lorawan_models=tuple(m for n, m in installed.lorawan_models.items() if n in lorawan),
        )
        # Refused here, in the transaction of the change that caused it: a
        # gateway would refuse the config as a whole and keep its old one.
        shared_port_conflict(config, changed)
        try:
            return check_gateway_config(config)
        except InputError as exc:
            raise ConflictError(f"gateway {gateway_id}'s config would be refused: {exc}") from exc

    def audit(
        self,
        *,
        operator: str,
        action: str,
        subject_kind: str,
        subject_id: str,
        detail: dict[str, Any],
    ) -> None:
        self.cur.execute(
            f"""INSERT INTO {self.s}.audit_log (operator, action, subject_kind, subject_id, detail)
                VALUES (%s, %s, %s, %s, %s::jsonb)""",
            (operator, action, subject_kind, subject_id, json.dumps(detail, sort_keys=True)),
        )


class Registry:
    """The registry tables in ``schema`` over one connection (autocommit outside transactions)."""

    def __init__(self, conn: Connection[Any], *, schema: str) -> None:
        self.conn = conn
        self.schema = check_schema_name(schema)

    @contextmanager
    def transaction(self) -> Iterator[RegistryTx]:
        with (
            database_errors("registry", schema=self.schema),
            self.conn.transaction(),
            self.conn.cursor(row_factory=dict_row) as cur,
        ):
            yield RegistryTx(cur, self.schema)

    def _query(
        self, sql: str, params: tuple[object, ...] | dict[str, object]
    ) -> list[dict[str, Any]]:
        with (
            database_errors("registry", schema=self.schema),
            self.conn.cursor(row_factory=dict_row) as cur,
        ):
            cur.execute(sql, params)
            return list(cur.fetchall())

    def site_rows(
        self, *, site_id: str | None = None, unit_code: str | None = None, kind: str | None = None
    ) -> list[SiteRow]:
        """Sites ordered by ward and id, with their numbers of gateways and active devices."""
        rows = self._query(
            f"""SELECT {_SITE_COLUMNS}, coalesce(u.name, '') AS ward, s.created_at, s.updated_at,
                    (SELECT count(*) FROM {self.schema}.gateways g
                        WHERE g.site_id = s.site_id AND g.status = 'active') AS gateways,
                    (SELECT count(*) FROM {self.schema}.devices d
                        WHERE d.site_id = s.site_id AND d.status = 'active') AS devices
                FROM {self.schema}.sites s
                LEFT JOIN {self.schema}.admin_units u USING (unit_code)
                WHERE (%(site)s::text IS NULL OR s.site_id = %(site)s)
                  AND (%(unit)s::text IS NULL OR s.unit_code = %(unit)s)
                  AND (%(kind)s::text IS NULL OR s.kind = %(kind)s)
                ORDER BY coalesce(u.name, ''), s.site_id""",
            {"site": site_id, "unit": unit_code, "kind": kind},
        )
        return [
            SiteRow(
                site=_site(r),
                ward=r["ward"],
                created_at=r["created_at"],
                updated_at=r["updated_at"],
                gateways=r["gateways"],
                devices=r["devices"],
            )
            for r in rows
        ]

    def store_sites(
        self, sites: list[Site], *, operator: str, update: bool, action: str
    ) -> ImportResult:
        """Add ``sites`` (and change the stored ones if ``update``) in one transaction.

        A site already stored with other values is refused, naming it, unless
        ``update``; one stored with the same values is left alone. Each site
        added or changed gets an audit row (``action``, the values before and
        after). Either every site is stored or none is.
        """
        added: list[str] = []
        updated: list[str] = []
        unchanged: list[str] = []
        with self.transaction() as tx:
            stored = tx.sites([x.site_id for x in sites], lock=True)
            for site in sites:
                before = stored.get(site.site_id)
                if before == site:
                    unchanged.append(site.site_id)
                    continue
                if before is not None and not update:
                    raise AlreadyExistsError(
                        f"site {site.site_id!r} is already registered with other values"
                        " (add --update to change it; `cityhub sites show` shows it)"
                    )
                tx.write_site(site, new=before is None)
                (added if before is None else updated).append(site.site_id)
                after: dict[str, Any] = msgspec.to_builtins(site)
                detail = after
                if before is not None:
                    was: dict[str, Any] = msgspec.to_builtins(before)
                    detail = {k: f"{was[k]} -> {v}" for k, v in after.items() if was[k] != v}
                tx.audit(
                    operator=operator,
                    action=action,
                    subject_kind="site",
                    subject_id=site.site_id,
                    detail=detail,
                )
        return ImportResult(added=added, updated=updated, unchanged=unchanged)

    def devices(
        self,
        *,
        device_id: str | None = None,
        site_id: str | None = None,
        gateway_id: str | None = None,
        device_type: str | None = None,
        status: str | None = None,
    ) -> list[DeviceRow]:
        rows = self._query(
            f"""SELECT {_DEVICE_COLUMNS} FROM {self.schema}.devices
                WHERE (%s::text IS NULL OR device_id = %s)
                AND (%s::text IS NULL OR site_id = %s)
                AND (%s::text IS NULL OR gateway_id = %s)
                AND (%s::text IS NULL OR device_type = %s)
                AND (%s::text IS NULL OR status = %s)
                ORDER BY site_id, device_id""",
            (
                *(device_id, device_id),
                *(site_id, site_id),
                *(gateway_id, gateway_id),
                *(device_type, device_type),
                *(status, status),
            ),
        )
        return [msgspec.convert(r, DeviceRow) for r in rows]

    def gateways(
        self,
        *,
        gateway_id: str | None = None,
        site_id: str | None = None,
        status: str | None = None,
    ) -> list[GatewayRow]:
        rows = self._query(
            f"""SELECT {_GATEWAY_COLUMNS}, count(d.device_id) FILTER (WHERE d.status = 'active')
                AS devices
                FROM {self.schema}.gateways g LEFT JOIN {self.schema}.devices d
                ON d.gateway_id = g.gateway_id
                WHERE (%s::text IS NULL OR g.gateway_id = %s)
                AND (%s::text IS NULL OR g.site_id = %s)
                AND (%s::text IS NULL OR g.status = %s)
                GROUP BY g.gateway_id ORDER BY g.site_id, g.gateway_id""",
            (gateway_id, gateway_id, site_id, site_id, status, status),
        )
        return [msgspec.convert(r, GatewayRow) for r in rows]

    def credentials(self, owner_id: str) -> list[CredentialRow]:
        rows = self._query(
            f"SELECT {_CREDENTIAL_COLUMNS} FROM {self.schema}.credentials WHERE owner_id = %s"
            " ORDER BY broker, username",
            (owner_id,),
        )
        return [msgspec.convert(r, CredentialRow) for r in rows]

    def audit_entries(
        self, *, subject_id: str | None = None, action: str | None = None, limit: int = 50
    ) -> list[AuditEntry]:
        """The newest ``limit`` entries, newest first."""
        rows = self._query(
            f"""SELECT audit_id, ts, operator, action, subject_kind, subject_id, detail,
                    db_user, os_user
                FROM {self.schema}.audit_log
                WHERE (%s::text IS NULL OR subject_id = %s)
                AND (%s::text IS NULL OR action = %s)
                ORDER BY audit_id DESC LIMIT %s""",
            (subject_id, subject_id, action, action, limit),
        )
        return [msgspec.convert(r, AuditEntry) for r in rows]
