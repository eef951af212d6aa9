"""The technicians' commands: registry, broker accounts, gateway configs and bundles together.

Each command runs in one registry transaction, in this order: check the
request (``devices.validation``, then the registry's rows, locked), write the
rows and the audit entry, change the broker accounts, write the bundle,
publish the affected gateways' retained configs (and, for a client whose
sessions a revoke or disable cut, its retained status: offline), commit. A
mistake is found before anything is written, and a failure later on rolls
the transaction back and undoes the broker accounts made so far, so a
refused command leaves the registry, the brokers and the bundle directory as
they were.

What is left to the caller: connecting the database and the brokers
(``Registry``, ``BrokerControl``), and showing ``Outcome`` to a person.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

from contracts.errors import (
    AlreadyExistsError,
    ConflictError,
    HubError,
    NotFoundError,
    SettingsError,
)
from contracts.ids import check_id
from contracts.messages import (
    DeviceConfig,
    GatewayConfig,
    check_device_config,
    encode_device_status,
    encode_gateway_config,
    encode_gateway_state,
    revoked_gateway_state,
)
from contracts.settings import ProvisioningSettings
from contracts.topics import DEFAULT_SHARE_GROUP, config_topic, device_status_topic, state_topic
from contracts.wording import choose_noun, count_noun
from devices import credentials, dynsec
from devices.brokerctl import BrokerControl
from devices.bundle import (
    Bundle,
    HttpAccess,
    MqttAccess,
    chirpstack_settings_toml,
    device_bundle,
    gateway_bundle,
    http_readings_url,
)
from devices.bundlefiles import BundleFiles, write_bundle, write_secret_file
from devices.pki import Pki
from devices.registry import DeviceRow, GatewayRow, Registry, RegistryTx
from devices.validation import check_text, device_config

logger = logging.getLogger(__name__)

DEFAULT_GATEWAY_HTTP_URL: Final = ProvisioningSettings().gateway_http_url
# Transports whose devices the gateway's site role names: MQTT devices' topics,
# LoRaWAN devices' ChirpStack events.
_SITE_BROKER_TRANSPORTS: Final = frozenset({"mqtt", "lorawan"})


def _reached(config: DeviceConfig) -> str:
    """How the gateway reaches a device, for the technician."""
    if config.transport == "serial":
        return f"port {config.port} ({config.protocol})"
    if config.transport == "modbus":
        return f"Modbus bus {config.port}, slave {config.slave_id}, model {config.model}"
    if config.transport == "lorawan":
        return f"LoRaWAN DevEUI {config.dev_eui}, model {config.model}"
    if config.transport == "http":
        return "HTTP"
    return "MQTT"


def _transport_detail(config: DeviceConfig) -> dict[str, object]:
    """The audit row's fields of a transport that has more than a port (no token hash)."""
    fields = ("model", "slave_id", "poll_interval_s", "dev_eui")
    return {name: getattr(config, name) for name in fields if getattr(config, name) is not None}


def _config_fields(row: DeviceRow) -> dict[str, Any]:
    """A row's ``device_config`` arguments, to check a change to it."""
    return {
        "device_id": row.device_id,
        "device_type": row.device_type,
        "transport": row.transport,
        "port": row.port,
        "protocol": row.protocol,
        "label": row.label,
        "enabled": row.enabled,
        "model": row.model,
        "slave_id": row.slave_id,
        "poll_interval_s": row.poll_interval_s,
        "dev_eui": row.dev_eui,
        "token_sha256": row.token_sha256,
    }


@dataclass(frozen=True)
class Endpoint:
    """A broker as devices and gateways reach it (written into bundles)."""

    host: str
    port: int
    tls: bool = False


@dataclass
class Outcome:
    """What a command changed, for the person who ran it (never a secret)."""

    changes: list[str] = field(default_factory=list)
    bundle: Bundle | None = None
    files: BundleFiles | None = None
    configs: list[GatewayConfig] = field(default_factory=list)


# What may already be undone when an undo runs (a re-run, a concurrent change).
_UNDO_TOLERATED = frozenset(
    {"Client not found", "Role not found", "ACL not found", "ACL with this topic already exists"}
)


class _Undo:
    """Broker changes to take back if the command fails before its commit."""

    def __init__(self) -> None:
        self.steps: list[tuple[BrokerControl, list[dynsec.Command]]] = []
        self.files: list[Path] = []

    def run(self) -> None:
        for control, commands in reversed(self.steps):
            try:
                control.run(commands, tolerated=_UNDO_TOLERATED)
            except HubError:
                logger.exception("could not undo %s on %r", commands, control)
        for path in self.files:
            with suppress(OSError):
                path.unlink()


def _check_serves(gateway: GatewayRow, site_id: str) -> None:
    """A device is placed on a gateway of its own site only."""
    if gateway.site_id != site_id:
        raise ConflictError(
            f"gateway {gateway.gateway_id!r} serves site {gateway.site_id!r}, not {site_id!r}"
        )


def create_account(
    control: BrokerControl, account: dynsec.Account, secret: str, undo: _Undo | None = None
) -> None:
    """Create ``account`` (and its role) with ``secret``; ``undo`` deletes it again."""
    control.run(dynsec.create_account(account, secret))
    if undo is not None:
        undo.steps.append((control, dynsec.delete_account(account)))


def bind_client_id(control: BrokerControl, account: dynsec.Account) -> list[str]:
    """Bind an account made before client ids were bound (a no-op once it is)."""
    data = control.run(dynsec.get_account(account))[0] or {}
    client = data.get("client")
    if isinstance(client, dict) and client.get("clientid") == account.client_id:
        return []
    control.run(dynsec.set_client_id(account))
    bound = f"{account.broker} broker: account {account.username} bound to client id"
    return [f"{bound} {account.client_id}"]


def sync_role(
    control: BrokerControl, account: dynsec.Account, undo: _Undo | None = None
) -> list[str]:
    """Bring an account's role to the ACLs this version gives it (a no-op once it has them)."""
    data = control.run(dynsec.get_role(account.role))[0]
    forward, back = dynsec.role_changes(dynsec.role_acls(data), account.role)
    if not forward:
        return []
    control.run(forward)
    if undo is not None:
        undo.steps.append((control, back))
    topics = ", ".join(sorted({c["topic"] for c in forward if c["command"] == "addRoleACL"}))
    role = f"{account.broker} broker: role {account.role.rolename}"
    return [f"{role} brought up to date ({topics or 'stale rules removed'})"]


def put_account(
    control: BrokerControl, account: dynsec.Account, secret: str, undo: _Undo | None = None
) -> tuple[bool, list[str]]:
    """Create ``account``, or make an existing one current and give it ``secret``.

    Current: its role's ACLs and its client id (when it has one) as this
    version builds them. A new secret disconnects the sessions that used the
    old one. Returns whether it was created, and what changed.
    """
    exists = control.run(dynsec.get_account(account), tolerated=frozenset({"Client not found"}))[0]
    if exists is None:
        create_account(control, account, secret, undo)
        return True, []
    changes = sync_role(control, account, undo)
    if account.client_id:
        changes += bind_client_id(control, account)
    control.run(dynsec.set_password(account, secret))
    return False, changes


class Provisioner:
    def __init__(
        self,
        *,
        registry: Registry,
        operator: str,
        central: BrokerControl,
        site: BrokerControl,
        central_endpoint: Endpoint,
        site_endpoint: Endpoint,
        bundle_dir: Path,
        pki: Pki | None = None,
        prefix: str = "",
        gateway_http_url: str = DEFAULT_GATEWAY_HTTP_URL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not operator.strip():
            raise SettingsError(
                "operator",
                "provisioning records who acted: set your name (CITYHUB_OPERATOR or"
                " `operator` in the settings file)",
            )
        self.registry = registry
        self.operator = operator.strip()
        self.central = central
        self.site = site
        self.central_endpoint = central_endpoint
        self.site_endpoint = site_endpoint
        self.bundle_dir = bundle_dir
        self.pki = pki
        self.prefix = prefix
        self.gateway_http_url = gateway_http_url
        self.clock = clock

    # -- shared steps -------------------------------------------------------------

    def _control(self, broker: dynsec.BrokerKind) -> BrokerControl:
        return self.central if broker == "central" else self.site

    def _issued_at(self) -> str:
        return datetime.fromtimestamp(self.clock(), UTC).isoformat(timespec="seconds")

    @contextmanager
    def _command(self) -> Iterator[tuple[RegistryTx, _Undo]]:
        undo = _Undo()
        try:
            with self.registry.transaction() as tx:
                yield tx, undo
        except BaseException:
            undo.run()
            raise

    def _create(self, undo: _Undo, account: dynsec.Account, secret: str) -> None:
        create_account(self._control(account.broker), account, secret, undo)

    def _bind_client_id(self, account: dynsec.Account, out: Outcome) -> None:
        """Bind an account made before client ids were bound (a no-op once it is)."""
        out.changes += bind_client_id(self._control(account.broker), account)

    def _sync_gateway(self, tx: RegistryTx, undo: _Undo, gateway_id: str, out: Outcome) -> None:
        """Bring a gateway's site role to the registry's devices and bind its client ids.

        Idempotent: a gateway already up to date costs two reads and no change.
        """
        devices = tx.active_mqtt_devices_of(gateway_id)
        euis = tx.active_lorawan_euis_of(gateway_id)
        account = dynsec.gateway_site_account(gateway_id, self.prefix, devices, euis)
        data = self.site.run(dynsec.get_role(account.role))[0]
        forward, back = dynsec.role_changes(dynsec.role_acls(data), account.role)
        if forward:
            self.site.run(forward)
            undo.steps.append((self.site, back))
            lorawan = (
                " and the ChirpStack events of "
                + count_noun(len(euis), "LoRaWAN device", "LoRaWAN devices")
                if euis
                else ""
            )
            out.changes.append(
                f"site broker: {account.username} may read the topics of"
                f" {count_noun(len(devices), 'device', 'devices')}{lorawan}, no others"
            )
        for gateway_account in dynsec.gateway_accounts(gateway_id, self.prefix):
            self._bind_client_id(gateway_account, out)

    def _sync_role(self, undo: _Undo, account: dynsec.Account, out: Outcome) -> None:
        """Bring an account's role to the ACLs this version gives it (a no-op once it has them)."""
        out.changes += sync_role(self._control(account.broker), account, undo)

    def sync_broker(self) -> Outcome:
        """Bring every active account on the brokers to what the registry says.

        For brokers whose accounts were made by an earlier version: binds each
        account to its client id, rewrites each gateway's site role (its
        devices only, their commands and answers), and gives each gateway's
        central role and each device's role the rules they lack (commands:
        ``hub/v1/gw/{id}/cmd`` and ``/cmdreport``, ``d/{id}/cmd``), and a
        gateway's ChirpStack account its one rule. Safe to re-run; an
        up-to-date broker is not changed.
        """
        out = Outcome()
        with self._command() as (tx, undo):
            for gateway_id in tx.active_gateway_ids():
                before = len(out.changes)
                self._sync_gateway(tx, undo, gateway_id, out)
                central = dynsec.gateway_central_account(gateway_id, self.prefix)
                self._sync_role(undo, central, out)
                chirpstack = dynsec.chirpstack_account(gateway_id)
                if tx.credential_status("site", chirpstack.username) == "active":
                    self._sync_role(undo, chirpstack, out)
                    self._bind_client_id(chirpstack, out)
                if len(out.changes) > before:
                    self._audit(tx, "gateway.sync", "gateway", gateway_id)
            for device_id in tx.active_mqtt_devices_of():
                before = len(out.changes)
                account = dynsec.device_account(device_id, self.prefix)
                self._bind_client_id(account, out)
                self._sync_role(undo, account, out)
                if len(out.changes) > before:
                    self._audit(tx, "device.sync", "device", device_id)
        return out

    def publish_configs(self, gateway_ids: list[str] | None = None) -> Outcome:
        """Publish a new config version to the gateways (every active one by default).

        A config carries the catalog entries of its devices' types: after
        ``cityhub db migrate`` with a catalog that changed a type (a metric
        added, a range widened), this is how running gateways learn it.
        """
        out = Outcome()
        with self._command() as (tx, _undo):
            active = tx.active_gateway_ids()
            wanted = active if gateway_ids is None else gateway_ids
            for gateway_id in wanted:
                self._active_gateway(tx, gateway_id)
            self._publish_configs(tx, list(wanted), out)
            for gateway_id in wanted:
                self._audit(tx, "gateway.publish", "gateway", gateway_id)
        return out

    def _audit(self, tx: RegistryTx, action: str, kind: str, subject: str, **detail: Any) -> None:
        tx.audit(
            operator=self.operator,
            action=action,
            subject_kind=kind,
            subject_id=subject,
            detail=detail,
        )

    def _publish_configs(
        self, tx: RegistryTx, gateway_ids: list[str], out: Outcome, changed: str | None = None
    ) -> None:
        """``changed``: the device the command adds or moves (named first in a conflict)."""
        now_s = int(self.clock())
        for gateway_id in dict.fromkeys(gateway_ids):
            config = tx.next_config(gateway_id, now_s=now_s, changed=changed)
            self.central.publish_retained(
                config_topic(gateway_id, self.prefix), encode_gateway_config(config)
            )
            out.configs.append(config)
            out.changes.append(
                f"gateway {gateway_id}: config version {config.version} published"
                f" ({count_noun(len(config.devices), 'device', 'devices')})"
            )

    def _write(self, undo: _Undo, bundle: Bundle, out: Outcome) -> None:
        files = write_bundle(self.bundle_dir, bundle)
        undo.files.extend(p for p in (files.json, files.png, files.settings) if p is not None)
        out.bundle, out.files = bundle, files
        out.changes.append(f"bundle written (mode 0600): {files.json}")

    def _gateway(self, tx: RegistryTx, gateway_id: str) -> GatewayRow:
        row = tx.gateway(check_id(gateway_id, "gateway id"), lock=True)
        if row is None:
            raise NotFoundError(f"gateway {gateway_id!r} is not registered")
        return row

    def _active_gateway(self, tx: RegistryTx, gateway_id: str) -> GatewayRow:
        row = self._gateway(tx, gateway_id)
        if row.status != "active":
            raise ConflictError(f"gateway {gateway_id!r} is revoked")
        return row

    def _device(self, tx: RegistryTx, device_id: str) -> DeviceRow:
        row = tx.device(check_id(device_id, "device id"), lock=True)
        if row is None:
            raise NotFoundError(f"device {device_id!r} is not registered")
        return row

    def _active_device(self, tx: RegistryTx, device_id: str) -> DeviceRow:
        row = self._device(tx, device_id)
        if row.status != "active":
            raise ConflictError(f"device {device_id!r} is revoked")
        return row

    # -- gateways -------------------------------------------------------------------

    def _gateway_bundle(self, row: GatewayRow, central_secret: str, site_secret: str) -> Bundle:
        ca_pem = cert_pem = key_pem = ""
        endpoint = self.central_endpoint
        if endpoint.tls:
            if self.pki is None:
                raise SettingsError(
                    "provisioning.central_tls_port", "TLS bundles need a PKI: `cityhub pki init`"
                )
            ca_pem = self.pki.ca_pem()
            files = self.pki.issue_client(
                row.gateway_id, now=datetime.fromtimestamp(self.clock(), UTC)
            )
            cert_pem = files.cert.read_text(encoding="ascii")
            key_pem = files.key.read_text(encoding="ascii")
        return gateway_bundle(
            gateway_id=row.gateway_id,
            site_id=row.site_id,
            label=row.label,
            location=row.location,
            central=MqttAccess(
                host=endpoint.host,
                port=endpoint.port,
                tls=endpoint.tls,
                username=dynsec.gateway_username(row.gateway_id, "central"),
                password=central_secret,
                client_id=dynsec.gateway_client_id(row.gateway_id, "central"),
            ),
            site=MqttAccess(
                host=self.site_endpoint.host,
                port=self.site_endpoint.port,
                tls=self.site_endpoint.tls,
                username=dynsec.gateway_username(row.gateway_id, "site"),
                password=site_secret,
                client_id=dynsec.gateway_client_id(row.gateway_id, "site"),
            ),
            prefix=self.prefix,
            ca_pem=ca_pem,
            cert_pem=cert_pem,
            key_pem=key_pem,
            issued_at=self._issued_at(),
            issued_by=self.operator,
        )

    def add_gateway(
        self, gateway_id: str, *, site_id: str, label: str = "", location: str = ""
    ) -> Outcome:
        check_id(gateway_id, "gateway id")
        check_id(site_id, "site id")
        check_text(label, "label")
        check_text(location, "location")
        out = Outcome()
        with self._command() as (tx, undo):
            tx.require_site(site_id)
            existing = tx.gateway(gateway_id)
            if existing is not None:
                state = " (revoked)" if existing.status == "revoked" else ""
                raise AlreadyExistsError(
                    f"gateway {gateway_id!r} already exists{state} at site {existing.site_id!r}"
                )
            tx.insert_gateway(
                gateway_id=gateway_id, site_id=site_id, label=label, location=location
            )
            out.changes.append(f"gateway {gateway_id} registered at site {site_id}")
            secrets = {}
            for account in dynsec.gateway_accounts(gateway_id, self.prefix):
                secret = secrets[account.broker] = credentials.new_secret()
                tx.put_credential(
                    broker=account.broker,
                    username=account.username,
                    owner_kind="gateway",
                    owner_id=gateway_id,
                    secret_hash=credentials.hash_secret(secret),
                )
                self._create(undo, account, secret)
                out.changes.append(f"{account.broker} broker: account {account.username} created")
            self._audit(tx, "gateway.add", "gateway", gateway_id, site_id=site_id, label=label)
            row = self._gateway(tx, gateway_id)
            self._write(undo, self._gateway_bundle(row, secrets["central"], secrets["site"]), out)
            self._publish_configs(tx, [gateway_id], out)
        return out

    def _live_certificates(self, gateway_id: str) -> list[str]:
        """Serials of the gateway's client certificates not revoked (none without a PKI)."""
        if self.pki is None or not self.pki.has_ca():
            return []
        return [
            r.serial
            for r in self.pki.register().certs
            if r.name == gateway_id and r.kind == "client" and r.revoked_at is None
        ]

    def _revoke_certificates(
        self, gateway_id: str, serials: list[str], reason: str, out: Outcome
    ) -> None:
        """Revoke ``serials`` of the gateway's certificates and re-sign the CRL.

        The brokers learn of it from the CRL (`cityhub pki crl` hands it to the
        embedded broker; compose re-runs mosquitto-init); the gateway's accounts
        already refuse its old secrets.
        """
        if self.pki is None or not serials:
            return
        now = datetime.fromtimestamp(self.clock(), UTC)
        for serial in serials:
            newly, _ = self.pki.revoke(gateway_id, now=now, reason=reason, serial=serial)
            for record in newly:
                out.changes.append(
                    f"certificate serial {record.serial} of {gateway_id} revoked ({reason});"
                    f" CRL re-signed: {self.pki.crl_path}"
                )

    def rotate_gateway(self, gateway_id: str) -> Outcome:
        out = Outcome()
        with self._command() as (tx, undo):
            row = self._active_gateway(tx, gateway_id)
            # Its certificates so far: superseded once the new bundle is made.
            old_certificates = self._live_certificates(gateway_id)
            secrets = {}
            for account in dynsec.gateway_accounts(gateway_id, self.prefix):
                secret = secrets[account.broker] = credentials.new_secret()
                tx.put_credential(
                    broker=account.broker,
                    username=account.username,
                    owner_kind="gateway",
                    owner_id=gateway_id,
                    secret_hash=credentials.hash_secret(secret),
                )
            self._audit(tx, "gateway.rotate", "gateway", gateway_id)
            self._write(undo, self._gateway_bundle(row, secrets["central"], secrets["site"]), out)
            self._sync_gateway(tx, undo, gateway_id, out)
            for account in dynsec.gateway_accounts(gateway_id, self.prefix):
                self._control(account.broker).run(
                    dynsec.set_password(account, secrets[account.broker])
                )
                out.changes.append(
                    f"{account.broker} broker: new secret for {account.username}"
                    " (sessions with the old one disconnected)"
                )
            if self.central_endpoint.tls:
                self._revoke_certificates(gateway_id, old_certificates, "superseded", out)
        return out

    def revoke_gateway(self, gateway_id: str) -> Outcome:
        out = Outcome()
        with self._command() as (tx, _undo):
            self._active_gateway(tx, gateway_id)
            devices = tx.active_devices_of(gateway_id)
            if devices:
                raise ConflictError(
                    f"gateway {gateway_id!r} still serves"
                    f" {count_noun(len(devices), 'active device', 'active devices')}"
                    f" ({', '.join(devices[:5])}{', ...' if len(devices) > 5 else ''}):"
                    f" move or revoke {choose_noun(len(devices), 'it', 'them')} first"
                )
            tx.set_gateway_status(gateway_id, "revoked")
            self._audit(tx, "gateway.revoke", "gateway", gateway_id)
            for account in dynsec.gateway_accounts(gateway_id, self.prefix):
                tx.set_credential_status(account.broker, account.username, "revoked")
                self._control(account.broker).run(
                    dynsec.delete_account(account), tolerated=frozenset({"Client not found"})
                )
                out.changes.append(
                    f"{account.broker} broker: account {account.username} deleted"
                    " (its sessions disconnected)"
                )
            self._delete_chirpstack_account(tx, gateway_id, out)
            self._revoke_certificates(
                gateway_id, self._live_certificates(gateway_id), "cessation_of_operation", out
            )
            # An empty retained message removes the gateway's config from the broker.
            self.central.publish_retained(config_topic(gateway_id, self.prefix), b"")
            out.changes.append(f"gateway {gateway_id} revoked; its retained config cleared")
            self._publish_revoked_state(tx, gateway_id, out)
        return out

    def _publish_revoked_state(self, tx: RegistryTx, gateway_id: str, out: Outcome) -> None:
        """Retain the revoked gateway's final state, offline, in place of its last "online".

        The broker cut its sessions without publishing its Will (Mosquitto
        kicks a deleted account's clients Will-less), and it can never
        connect again to publish anything: without this its last retained
        "online" would stand for good. Ingest stores it as the gateway's
        final state and ignores any other state of a revoked gateway.
        """
        state = revoked_gateway_state(
            gateway_id, birth=tx.gateway_birth(gateway_id), ts_ms=int(self.clock() * 1000)
        )
        self.central.publish_retained(
            state_topic(gateway_id, self.prefix), encode_gateway_state(state)
        )
        out.changes.append(f"central broker: gateway {gateway_id} retained state set offline")

    def _publish_device_offline(self, device_id: str, out: Outcome) -> None:
        """Retain ``offline`` on an MQTT device's status topic, whose sessions were just cut.

        The broker disconnects a disabled or deleted account's clients
        without publishing their Will, so the device's own birth ("online")
        would stay retained. When a disabled device is enabled again, its
        next connection publishes "online" itself.
        """
        self.site.publish_retained(
            device_status_topic(device_id, self.prefix), encode_device_status("offline")
        )
        out.changes.append(f"site broker: device {device_id} retained status set offline")

    def chirpstack_account(self, gateway_id: str) -> Outcome:
        """Create (or give a new secret to) the site-broker account of a gateway's ChirpStack.

        The account (``dynsec.chirpstack_account``) may publish ChirpStack's
        device events and nothing else. Its secret is written once, into
        ``chirpstack-{gateway}.toml`` in the bundle directory (mode 0600):
        the ``[integration.mqtt]`` section of ChirpStack's chirpstack.toml.
        Re-running it rotates the secret: the old one stops at once.
        """
        out = Outcome()
        with self._command() as (tx, undo):
            self._active_gateway(tx, gateway_id)
            account = dynsec.chirpstack_account(gateway_id)
            secret = credentials.new_secret()
            known = tx.credential_status("site", account.username)
            tx.put_credential(
                broker="site",
                username=account.username,
                owner_kind="gateway",
                owner_id=gateway_id,
                secret_hash=credentials.hash_secret(secret),
            )
            path = self.bundle_dir / f"chirpstack-{gateway_id}.toml"
            access = MqttAccess(
                host=self.site_endpoint.host,
                port=self.site_endpoint.port,
                tls=self.site_endpoint.tls,
                username=account.username,
                password=secret,
                client_id=account.client_id,
            )
            self.bundle_dir.mkdir(parents=True, exist_ok=True)
            self.bundle_dir.chmod(0o700)
            write_secret_file(
                path,
                chirpstack_settings_toml(
                    access, gateway_id=gateway_id, issued_at=self._issued_at()
                ).encode(),
            )
            if known is None:
                undo.files.append(path)
            created, changes = put_account(self.site, account, secret, undo)
            self._audit(
                tx,
                "gateway.chirpstack",
                "gateway",
                gateway_id,
                username=account.username,
                rotated=not created,
            )
            out.changes += changes
            if created:
                out.changes.append(
                    f"site broker: account {account.username} created (client id"
                    f" {account.client_id}; may publish {dynsec.CHIRPSTACK_EVENTS_PUBLISH} only)"
                )
            else:
                out.changes.append(
                    f"site broker: new secret for {account.username}"
                    " (sessions with the old one disconnected)"
                )
            out.changes.append(
                f"ChirpStack settings written (mode 0600): {path} (its [integration.mqtt]"
                " section for chirpstack.toml; the secret is written nowhere else)"
            )
        return out

    def service_account(
        self, kind: str, instance: str, secret: str, *, share_group: str = DEFAULT_SHARE_GROUP
    ) -> Outcome:
        """Create (or give ``secret`` to) a service's account: ``dynsec.service_account``.

        ``ingest`` and ``monitor`` accounts go on the central broker, ``sim``
        on the site broker, in this provisioner's topic prefix. The secret is
        the caller's (a password file the service reads); it is written
        nowhere here. Audited as ``broker.service_account``, subject kind
        ``service`` (the account has no registry row).
        """
        account = dynsec.service_account(kind, instance, self.prefix, share_group=share_group)
        out = Outcome()
        with self._command() as (tx, undo):
            created, changes = put_account(self._control(account.broker), account, secret, undo)
            self._audit(
                tx,
                "broker.service_account",
                "service",
                account.username,
                service_kind=kind,
                broker=account.broker,
                rotated=not created,
            )
            out.changes += changes
            bound = f"client id {account.client_id}" if account.client_id else "no fixed client id"
            verb = "created" if created else "given the new password (old sessions disconnected)"
            out.changes.append(
                f"{account.broker} broker: account {account.username} {verb} ({bound})"
            )
            out.changes.extend(
                f"  may {rule.acltype} {rule.topic}" for rule in account.role.acls if rule.allow
            )
        return out

    def _delete_chirpstack_account(self, tx: RegistryTx, gateway_id: str, out: Outcome) -> None:
        """A revoked gateway's ChirpStack account goes with it (if it had one)."""
        account = dynsec.chirpstack_account(gateway_id)
        if tx.credential_status("site", account.username) in (None, "revoked"):
            return
        tx.set_credential_status("site", account.username, "revoked")
        self.site.run(dynsec.delete_account(account), tolerated=frozenset({"Client not found"}))
        out.changes.append(
            f"site broker: account {account.username} deleted (its sessions disconnected)"
        )

    # -- devices --------------------------------------------------------------------

    def _device_bundle(
        self, row: DeviceRow, secret: str | None, token: str | None = None
    ) -> Bundle:
        """``secret``: an MQTT device's broker secret; ``token``: an HTTP device's bearer token."""
        config = check_device_config(row.config())
        http = None
        if token is not None:
            http = HttpAccess(
                url=http_readings_url(self.gateway_http_url, row.gateway_id or "", row.device_id),
                token=token,
            )
        broker = None
        if secret is not None:
            broker = MqttAccess(
                host=self.site_endpoint.host,
                port=self.site_endpoint.port,
                tls=self.site_endpoint.tls,
                username=dynsec.device_username(row.device_id),
                password=secret,
                client_id=dynsec.device_account(row.device_id).client_id,
            )
        return device_bundle(
            config,
            site_id=row.site_id,
            gateway_id=row.gateway_id or "",
            location=row.location,
            hardware_id=row.hardware_id,
            broker=broker,
            prefix=self.prefix,
            issued_at=self._issued_at(),
            issued_by=self.operator,
            http=http,
        )

    def _new_device_secret(self, tx: RegistryTx, device_id: str) -> str:
        secret = credentials.new_secret()
        account = dynsec.device_account(device_id, self.prefix)
        tx.put_credential(
            broker="site",
            username=account.username,
            owner_kind="device",
            owner_id=device_id,
            secret_hash=credentials.hash_secret(secret),
        )
        return secret

    def _register_device(
        self,
        tx: RegistryTx,
        config: DeviceConfig,
        *,
        site_id: str,
        gateway_id: str,
        location: str,
        hardware_id: str,
        out: Outcome,
    ) -> None:
        """Insert a new device's row, after checking where it goes and that its id is new."""
        device_id = config.device_id
        self._check_new_device(tx, device_id, site_id=site_id, gateway_id=gateway_id)
        tx.insert_device(
            config,
            site_id=site_id,
            gateway_id=gateway_id,
            location=location,
            hardware_id=hardware_id,
        )
        out.changes.append(
            f"device {device_id} registered: {config.device_type} at site {site_id},"
            f" gateway {gateway_id}, {_reached(config)}"
        )

    def _check_new_device(
        self, tx: RegistryTx, device_id: str, *, site_id: str, gateway_id: str
    ) -> None:
        """The site exists, the gateway is active and serves it, and the id was never used."""
        tx.require_site(site_id)
        _check_serves(self._active_gateway(tx, gateway_id), site_id)
        existing = tx.device(device_id)
        if existing is not None:
            state = " (revoked; ids are never reused)" if existing.status == "revoked" else ""
            raise AlreadyExistsError(
                f"device {device_id!r} already exists{state} at site {existing.site_id!r}"
            )

    def _create_device_account(
        self, tx: RegistryTx, undo: _Undo, device_id: str, out: Outcome
    ) -> str:
        """A new MQTT device's site-broker account (registered and created); its secret."""
        secret = self._new_device_secret(tx, device_id)
        account = dynsec.device_account(device_id, self.prefix)
        self._create(undo, account, secret)
        out.changes.append(
            f"site broker: account {account.username} created"
            f" (may publish {account.role.acls[0].topic} only)"
        )
        return secret

    def add_device(
        self,
        device_id: str,
        *,
        device_type: str,
        site_id: str,
        gateway_id: str,
        transport: str,
        port: str | None = None,
        protocol: str | None = None,
        label: str = "",
        location: str = "",
        hardware_id: str = "",
        model: str | None = None,
        slave_id: int | None = None,
        poll_interval_s: float | None = None,
        dev_eui: str | None = None,
    ) -> Outcome:
        """Register a device; an MQTT one gets a broker account, an HTTP one a token.

        Modbus and LoRaWAN devices have no credential of ours: the bus is
        the gateway's, and the LoRaWAN keys are the network server's. Refused
        (ConflictError, naming both devices) when the gateway's devices may
        not share what this one would share with them: a serial sensor's
        port, a slave id on a bus, a bus at other line settings, a DevEUI.
        """
        check_id(site_id, "site id")
        check_id(gateway_id, "gateway id")
        check_text(location, "location")
        check_text(hardware_id, "hardware id")
        token = credentials.new_token() if transport == "http" else None
        config = device_config(
            device_id=device_id,
            device_type=device_type,
            transport=transport,
            port=port,
            protocol=protocol,
            label=label,
            model=model,
            slave_id=slave_id,
            poll_interval_s=poll_interval_s,
            dev_eui=dev_eui,
            token_sha256=credentials.token_sha256(token) if token is not None else None,
        )
        out = Outcome()
        with self._command() as (tx, undo):
            if config.dev_eui is not None:
                self._check_dev_eui_free(tx, config.dev_eui)
            self._register_device(
                tx,
                config,
                site_id=site_id,
                gateway_id=gateway_id,
                location=location,
                hardware_id=hardware_id,
                out=out,
            )
            secret = None
            if config.transport == "mqtt":
                secret = self._create_device_account(tx, undo, device_id, out)
            self._audit(
                tx,
                "device.add",
                "device",
                device_id,
                device_type=device_type,
                site_id=site_id,
                gateway_id=gateway_id,
                transport=config.transport,
                port=config.port,
                label=label,
                location=location,
                hardware_id=hardware_id,
                **_transport_detail(config),
            )
            if token is not None:
                out.changes.append(f"device {device_id}: bearer token issued (in its bundle only)")
            row = self._device(tx, device_id)
            self._write(undo, self._device_bundle(row, secret, token), out)
            # The site role allows the new topics before the config tells the gateway to subscribe.
            self._sync_gateway(tx, undo, gateway_id, out)
            self._publish_configs(tx, [gateway_id], out, changed=device_id)
        return out

    def move_device(
        self, device_id: str, *, gateway_id: str, site_id: str | None = None
    ) -> Outcome:
        out = Outcome()
        with self._command() as (tx, undo):
            row = self._active_device(tx, device_id)
            gateway = self._active_gateway(tx, gateway_id)
            if site_id is not None:
                tx.require_site(check_id(site_id, "site id"))
                _check_serves(gateway, site_id)
            if row.gateway_id == gateway_id:
                raise ConflictError(f"device {device_id!r} is already on gateway {gateway_id!r}")
            tx.update_device(device_id, site_id=gateway.site_id, gateway_id=gateway_id)
            out.changes.append(
                f"device {device_id} moved: site {row.site_id} -> {gateway.site_id},"
                f" gateway {row.gateway_id} -> {gateway_id}"
            )
            self._audit(
                tx,
                "device.move",
                "device",
                device_id,
                from_site=row.site_id,
                from_gateway=row.gateway_id,
                to_site=gateway.site_id,
                to_gateway=gateway_id,
            )
            affected = [g for g in (row.gateway_id, gateway_id) if g is not None]
            if row.transport in _SITE_BROKER_TRANSPORTS:
                for affected_id in affected:
                    self._sync_gateway(tx, undo, affected_id, out)
            token = None
            if row.transport == "http":
                # The device must learn its new gateway's address: a new bundle,
                # and with it a new token (the registry keeps only the old one's hash).
                token = self._new_device_token(tx, device_id, out)
            self._publish_configs(tx, affected, out, changed=device_id)
            if token is not None:
                self._write(
                    undo, self._device_bundle(self._device(tx, device_id), None, token), out
                )
        return out

    def replace_device(
        self,
        device_id: str,
        *,
        hardware_id: str,
        port: str | None = None,
        dev_eui: str | None = None,
    ) -> Outcome:
        """New hardware under the same logical device: its id, history and settings stay.

        An MQTT device's old secret and an HTTP device's old token stop
        working (new ones in the new bundle); a serial or Modbus device may
        move to another port, a LoRaWAN device takes the new hardware's DevEUI.
        """
        check_text(hardware_id, "hardware id")
        out = Outcome()
        with self._command() as (tx, undo):
            row = self._active_device(tx, device_id)
            if port is not None and row.transport not in ("serial", "modbus"):
                raise ConflictError(
                    f"device {device_id!r} is a {row.transport} device: it has no port"
                )
            if dev_eui is not None and row.transport != "lorawan":
                raise ConflictError(
                    f"device {device_id!r} is a {row.transport} device: it has no DevEUI"
                )
            checked = device_config(
                **{
                    **_config_fields(row),
                    "port": port if port is not None else row.port,
                    "dev_eui": dev_eui if dev_eui is not None else row.dev_eui,
                }
            )
            changes: dict[str, object] = {"hardware_id": hardware_id}
            said = ""
            if port is not None:
                changes["port"] = port
                said += f", port {row.port} -> {port}"
            if dev_eui is not None and checked.dev_eui != row.dev_eui:
                self._check_dev_eui_free(tx, str(checked.dev_eui))
                changes["dev_eui"] = checked.dev_eui
                said += f", DevEUI {row.dev_eui} -> {checked.dev_eui}"
            tx.update_device(device_id, **changes)
            out.changes.append(
                f"device {device_id}: hardware {row.hardware_id or '(none)'} -> {hardware_id}"
                + said
                + "; readings history kept"
            )
            secret = token = None
            if row.transport == "mqtt":
                secret = self._new_device_secret(tx, device_id)
            if row.transport == "http":
                token = self._new_device_token(tx, device_id, out)
            self._audit(
                tx,
                "device.replace",
                "device",
                device_id,
                old_hardware_id=row.hardware_id,
                new_hardware_id=hardware_id,
                port=port,
                **({"dev_eui": checked.dev_eui} if dev_eui is not None else {}),
            )
            self._write(undo, self._device_bundle(self._device(tx, device_id), secret, token), out)
            if secret is not None:
                account = dynsec.device_account(device_id, self.prefix)
                self._bind_client_id(account, out)
                if row.gateway_id is not None:
                    self._sync_gateway(tx, undo, row.gateway_id, out)
                self.site.run(dynsec.set_password(account, secret))
                out.changes.append(
                    f"site broker: new secret for {account.username}"
                    " (the old hardware's sessions disconnected)"
                )
            if "dev_eui" in changes and row.gateway_id is not None:
                self._sync_gateway(tx, undo, row.gateway_id, out)
            if (len(changes) > 1 or token is not None) and row.gateway_id is not None:
                self._publish_configs(tx, [row.gateway_id], out, changed=device_id)
        return out

    def rotate_device(self, device_id: str) -> Outcome:
        """A new broker secret (MQTT) or bearer token (HTTP); the old one stops working.

        An MQTT device's old secret at once (the broker cuts its sessions);
        an HTTP device's old token when its gateway applies the config
        published here. Serial, Modbus and LoRaWAN devices have no credential.
        """
        out = Outcome()
        with self._command() as (tx, undo):
            row = self._active_device(tx, device_id)
            if row.transport == "http":
                token = self._new_device_token(tx, device_id, out)
                self._audit(tx, "device.rotate", "device", device_id)
                self._write(
                    undo, self._device_bundle(self._device(tx, device_id), None, token), out
                )
                if row.gateway_id is not None:
                    self._publish_configs(tx, [row.gateway_id], out)
                return out
            if row.transport != "mqtt":
                keys = " (its LoRaWAN keys are the network server's)"
                raise ConflictError(
                    f"device {device_id!r} is a {row.transport} device: it has no broker"
                    f" credential{keys if row.transport == 'lorawan' else ''}"
                )
            secret = self._new_device_secret(tx, device_id)
            self._audit(tx, "device.rotate", "device", device_id)
            self._write(undo, self._device_bundle(row, secret), out)
            account = dynsec.device_account(device_id, self.prefix)
            self._bind_client_id(account, out)
            self.site.run(dynsec.set_password(account, secret))
            out.changes.append(
                f"site broker: new secret for {account.username}"
                " (sessions with the old one disconnected)"
            )
        return out

    def _new_device_token(self, tx: RegistryTx, device_id: str, out: Outcome) -> str:
        """A new bearer token for an HTTP device; only its hash is stored (and published)."""
        token = credentials.new_token()
        tx.update_device(device_id, token_sha256=credentials.token_sha256(token))
        out.changes.append(
            f"device {device_id}: new bearer token (in its bundle only); the old one stops"
            " working when its gateway applies the new config"
        )
        return token

    def _check_dev_eui_free(self, tx: RegistryTx, dev_eui: str) -> None:
        owner = tx.device_with_dev_eui(dev_eui)
        if owner is not None:
            raise ConflictError(
                f"DevEUI {dev_eui} is already device {owner}'s (a DevEUI names one device on"
                " the network server; revoke or replace that one first)"
            )

    def set_device_enabled(self, device_id: str, *, enabled: bool) -> Outcome:
        """Suspend a device (its credential refused, the gateway ignores it) or resume it."""
        out = Outcome()
        verb = "enable" if enabled else "disable"
        with self._command() as (tx, _undo):
            row = self._active_device(tx, device_id)
            if row.enabled == enabled:
                raise ConflictError(f"device {device_id!r} is already {verb}d")
            tx.update_device(device_id, enabled=enabled)
            self._audit(tx, f"device.{verb}", "device", device_id)
            out.changes.append(f"device {device_id} {verb}d")
            if row.transport == "mqtt":
                account = dynsec.device_account(device_id, self.prefix)
                status: Literal["active", "disabled"] = "active" if enabled else "disabled"
                tx.set_credential_status("site", account.username, status)
                commands = dynsec.enable_account if enabled else dynsec.disable_account
                self.site.run(commands(account))
                out.changes.append(f"site broker: account {account.username} {verb}d")
                if not enabled:
                    self._publish_device_offline(device_id, out)
            if row.gateway_id is not None:
                self._publish_configs(tx, [row.gateway_id], out)
        return out

    def revoke_device(self, device_id: str) -> Outcome:
        out = Outcome()
        with self._command() as (tx, undo):
            row = self._active_device(tx, device_id)
            tx.revoke_device(device_id)
            out.changes.append(
                f"device {device_id} revoked (ingest refuses its readings; history kept)"
            )
            self._audit(tx, "device.revoke", "device", device_id, gateway_id=row.gateway_id)
            if row.gateway_id is not None:
                if row.transport in _SITE_BROKER_TRANSPORTS:
                    self._sync_gateway(tx, undo, row.gateway_id, out)
                self._publish_configs(tx, [row.gateway_id], out)
            if row.transport == "mqtt":
                account = dynsec.device_account(device_id, self.prefix)
                tx.set_credential_status("site", account.username, "revoked")
                self.site.run(
                    dynsec.delete_account(account), tolerated=frozenset({"Client not found"})
                )
                out.changes.append(
                    f"site broker: account {account.username} deleted (its sessions disconnected)"
                )
                self._publish_device_offline(device_id, out)
        return out
