"""Mosquitto's dynamic-security plugin: account names, ACL roles and control commands.

Pure: this module builds the JSON commands published to
``$CONTROL/dynamic-security/v1``, checks the broker's responses, and builds
the plugin's initial configuration document (the admin account) that the
embedded broker starts from. Sending commands is ``devices.brokerctl``'s job.

Accounts and what they may do (docs/architecture.md, section 8)::

    broker   username           client id     may
    site     device.{id}        {id}          publish {prefix/}d/{id}/# (uplink, status,
                                              answers on d/{id}/res), subscribe d/{id}/cmd
    site     gateway.{id}.site  gw-{id}-site  subscribe d/{dev}/up, d/{dev}/status and
                                              d/{dev}/res, receive d/{dev}/# and publish
                                              d/{dev}/cmd, for each of its MQTT devices;
                                              subscribe application/+/device/{eui}/event/+
                                              for each of its LoRaWAN devices
    site     chirpstack.{gw}    chirpstack.{gw}  publish application/+/device/+/event/+
                                              (ChirpStack's MQTT integration)
    central  gateway.{id}       gw-{id}       publish .../gw/{id}/batch, /state and
                                              /cmdreport, subscribe .../gw/{id}/ack,
                                              /config and /cmd
    central  ingest.{inst}      (none: see    subscribe $share/{group}/.../gw/+/batch and
                                below)        /cmdreport (shared), .../gw/+/state; publish
                                              .../gw/+/ack and .../gw/+/cmd
    central  monitor.{inst}     monitor.{inst}  subscribe .../gw/+/state (read-only views:
                                              `cityhub up`'s live view and summary)
    site     sim.{inst}         (none: each   publish {prefix/}d/+/up, d/+/status, d/+/res
                                device's id)  and ChirpStack's application/+/device/+/event/+,
                                              subscribe d/+/cmd (a simulated fleet)
    both     cityhub-admin      (any)         everything, and $CONTROL: provisioning only

Each account holds a role of the same name. Each account may connect with its
own client id only (the plugin's ``clientid``; any other id gets CONNACK 135,
"not authorized", so no account can resume or take over another client's
session). The admin account has no client id: provisioning chooses its own.

Two service accounts are not bound to one client id, because one id cannot
serve them. A simulated fleet connects as many devices, each with its
device id. Ingest opens up to three connections per worker (batches, states,
commands), N workers per host, on several hosts, each with an id of its own
(``ingest.mqtt``: a broker closes a connection when another CONNECTs with its
id, and two holders of one id kick each other off forever). What keeps other
accounts off ingest's ids: every other account but the admin is bound to its
own id, none of which can be an ingest id (ingest's ids start with its
account's username, ``ingest.{inst}-``, and a dot is never in a device or
gateway id, and ``chirpstack.``/``monitor.`` ids differ in their first word);
the unbound simulated fleet lives on a site broker (it shares the central one
only in the embedded one-broker default) and would have to guess a
48-bit random token that ingest publishes nowhere.


A gateway's site role lists its devices one by one and follows the registry
(``role_changes`` computes the ``addRoleACL``/``removeRoleACL`` commands that
bring a role to what the registry says). Changing a role does not end a
subscription made earlier, so the role also denies receiving anything under
``d/`` except its own devices' topics: a device moved away or revoked stops
reaching the old gateway even through a subscription its persistent session
still holds.

The plugin's default access denies every publish and subscription that no
role allows, so a device publishing under another id gets PUBACK reason code
135 (not authorized) and nothing is delivered. Removing, disabling an account
or changing its password disconnects its live sessions at once (verified on
Mosquitto 2.0.11: the client sees "Administrative action").
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Iterable
from typing import Any, Final, Literal

import msgspec

from contracts.errors import BrokerControlError, InvalidIdError, MalformedPayloadError
from contracts.ids import check_id
from contracts.topics import (
    DEFAULT_SHARE_GROUP,
    chirpstack_device_filter,
    config_topic,
    device_answer_topic,
    device_command_topic,
    device_status_topic,
    device_uplink_filter,
    device_uplink_topic,
    gateway_filter,
    gateway_topic,
    ingest_batch_filter,
    ingest_report_filter,
)
from contracts.wording import count_noun

CONTROL_TOPIC: Final = "$CONTROL/dynamic-security/v1"
# ChirpStack's event topics (contracts.topics): what its account may publish,
# and the space a gateway's site role receives nothing from but its own devices'.
CHIRPSTACK_EVENTS_PUBLISH: Final = "application/+/device/+/event/+"
CHIRPSTACK_EVENTS_ALL: Final = "application/#"
RESPONSE_TOPIC: Final = f"{CONTROL_TOPIC}/response"

# Mosquitto 2.0's PBKDF2-SHA512 parameters (what `mosquitto_ctrl dynsec init`
# writes): a 12-byte salt and 101 iterations; the plugin refuses other salt sizes.
PW_ITERATIONS: Final = 101
PW_SALT_BYTES: Final = 12

ADMIN_ROLE: Final = "cityhub-admin"
DEV_ANONYMOUS_ROLE: Final = "cityhub-dev-anonymous"
DEV_ANONYMOUS_GROUP: Final = "cityhub-dev-anonymous"

AclType = Literal[
    "publishClientSend",
    "publishClientReceive",
    "subscribeLiteral",
    "subscribePattern",
    "unsubscribeLiteral",
    "unsubscribePattern",
]
BrokerKind = Literal["site", "central"]


class AclRule(msgspec.Struct, frozen=True, kw_only=True):
    acltype: AclType
    topic: str
    allow: bool = True
    # Higher priorities are evaluated first (the plugin's rule); the first match decides.
    priority: int = 0


class Role(msgspec.Struct, frozen=True, kw_only=True):
    rolename: str
    acls: tuple[AclRule, ...]


class Account(msgspec.Struct, frozen=True, kw_only=True):
    """One broker account and the role that holds its ACL."""

    broker: BrokerKind
    username: str
    client_id: str
    role: Role


# --- names and roles ---------------------------------------------------------------
#
# Dots cannot appear in ids (contracts.ids), so "device.x" and "gateway.x"
# never collide with each other or with the admin account, even when the site
# and the central broker are one Mosquitto (the embedded default).


def device_username(device_id: str) -> str:
    return f"device.{check_id(device_id, 'device_id')}"


def gateway_username(gateway_id: str, broker: BrokerKind) -> str:
    name = f"gateway.{check_id(gateway_id, 'gateway_id')}"
    return name if broker == "central" else f"{name}.site"


def gateway_client_id(gateway_id: str, broker: BrokerKind) -> str:
    """The MQTT client id a gateway's account must use on each broker."""
    client_id = f"gw-{check_id(gateway_id, 'gateway_id')}"
    return client_id if broker == "central" else f"{client_id}-site"


def client_id_of(username: str) -> str | None:
    """The client id bound to a provisioned account's username (None for any other account)."""
    kind, _, rest = username.partition(".")
    gateway_id, _, site = rest.partition(".")
    try:
        if kind == "device" and rest:
            return check_id(rest, "device_id")
        if kind == "gateway" and site in ("", "site") and gateway_id:
            return gateway_client_id(gateway_id, "site" if site else "central")
    except InvalidIdError:
        return None
    return None


def device_account(device_id: str, prefix: str = "") -> Account:
    """A device publishes under ``d/{its id}/`` only and reads its own commands.

    Uplink, status, its Will and its answers (``d/{id}/res``) are under its
    own id; ``d/{id}/cmd`` is the one topic it may subscribe to, and only its
    gateway may publish there (``site_device_acls``).
    """
    own = device_uplink_topic(device_id, prefix).removesuffix("/up")
    username = device_username(device_id)
    return Account(
        broker="site",
        username=username,
        client_id=device_id,
        role=Role(
            rolename=username,
            acls=(
                AclRule(acltype="publishClientSend", topic=f"{own}/#"),
                AclRule(acltype="subscribeLiteral", topic=device_command_topic(device_id, prefix)),
            ),
        ),
    )


def gateway_central_account(gateway_id: str, prefix: str = "") -> Account:
    """A gateway sends batches, state and command reports; reads its ack, config and commands."""
    username = gateway_username(gateway_id, "central")
    acls = (
        AclRule(acltype="publishClientSend", topic=gateway_topic(gateway_id, "batch", prefix)),
        AclRule(acltype="publishClientSend", topic=gateway_topic(gateway_id, "state", prefix)),
        AclRule(acltype="publishClientSend", topic=gateway_topic(gateway_id, "cmdreport", prefix)),
        AclRule(acltype="subscribeLiteral", topic=gateway_topic(gateway_id, "ack", prefix)),
        AclRule(acltype="subscribeLiteral", topic=config_topic(gateway_id, prefix)),
        AclRule(acltype="subscribeLiteral", topic=gateway_topic(gateway_id, "cmd", prefix)),
    )
    return Account(
        broker="central",
        username=username,
        client_id=gateway_client_id(gateway_id, "central"),
        role=Role(rolename=username, acls=acls),
    )


def site_device_acls(device_id: str, prefix: str = "") -> tuple[AclRule, ...]:
    """What a gateway's site role holds for one of its devices: read it, answer-read, command it."""
    own = device_uplink_topic(device_id, prefix).removesuffix("/up")
    return (
        AclRule(acltype="subscribeLiteral", topic=device_uplink_topic(device_id, prefix)),
        AclRule(acltype="subscribeLiteral", topic=device_status_topic(device_id, prefix)),
        AclRule(acltype="subscribeLiteral", topic=device_answer_topic(device_id, prefix)),
        AclRule(acltype="publishClientReceive", topic=f"{own}/#", priority=1),
        AclRule(acltype="publishClientSend", topic=device_command_topic(device_id, prefix)),
    )


def site_lorawan_acls(dev_eui: str) -> tuple[AclRule, ...]:
    """What a gateway's site role holds for one of its LoRaWAN devices: its ChirpStack events.

    ``subscribeLiteral`` allows exactly the filter ``chirpstack_device_filter``
    (its ``+`` are the application id and the event, not wildcards the
    gateway may widen); the receive rule matches the events it covers.
    """
    events = chirpstack_device_filter(dev_eui)
    return (
        AclRule(acltype="subscribeLiteral", topic=events),
        AclRule(acltype="publishClientReceive", topic=events, priority=1),
    )


def gateway_site_account(
    gateway_id: str,
    prefix: str = "",
    device_ids: Iterable[str] = (),
    dev_euis: Iterable[str] = (),
) -> Account:
    """On the site broker a gateway reads its own devices and sends them their commands.

    MQTT devices by id (``device_ids``), LoRaWAN devices by DevEUI
    (``dev_euis``: their ChirpStack events, which carry no topic prefix).
    The lowest-priority rules deny receiving anything else under ``d/`` and
    under ``application/``.
    """
    username = gateway_username(gateway_id, "site")
    everything = device_uplink_filter(prefix).removesuffix("/+/up") + "/#"
    acls = [
        AclRule(acltype="publishClientReceive", topic=everything, allow=False),
        AclRule(acltype="publishClientReceive", topic=CHIRPSTACK_EVENTS_ALL, allow=False),
    ]
    for device_id in sorted(set(device_ids)):
        acls.extend(site_device_acls(device_id, prefix))
    for dev_eui in sorted(set(dev_euis)):
        acls.extend(site_lorawan_acls(dev_eui))
    return Account(
        broker="site",
        username=username,
        client_id=gateway_client_id(gateway_id, "site"),
        role=Role(rolename=username, acls=tuple(acls)),
    )


def gateway_accounts(gateway_id: str, prefix: str = "") -> tuple[Account, Account]:
    return gateway_central_account(gateway_id, prefix), gateway_site_account(gateway_id, prefix)


def chirpstack_username(gateway_id: str) -> str:
    """The account of the ChirpStack network server that feeds a gateway's site broker.

    Dotted like the others, and its client id is the same name: a dot is
    never in a device id, so it can never be a device's client id.
    """
    return f"chirpstack.{check_id(gateway_id, 'gateway_id')}"


def chirpstack_account(gateway_id: str) -> Account:
    """ChirpStack's MQTT integration publishes device events (JSON) and nothing else.

    ``application/{app}/device/{devEui}/event/{event}``: ChirpStack v4's
    default event topic, which has no room for our topic prefix. It may not
    subscribe (it sends no downlinks for cityhub) nor publish under ``d/``.
    """
    username = chirpstack_username(gateway_id)
    return Account(
        broker="site",
        username=username,
        client_id=username,
        role=Role(
            rolename=username,
            acls=(AclRule(acltype="publishClientSend", topic=CHIRPSTACK_EVENTS_PUBLISH),),
        ),
    )


# --- service accounts -------------------------------------------------------------

ServiceKind = Literal["ingest", "sim", "monitor"]
SERVICE_KINDS: Final[tuple[ServiceKind, ...]] = ("ingest", "sim", "monitor")
# Kinds whose account is bound to a client id (the username); the others
# connect with ids of their own (module docstring).
_BOUND_KINDS: Final = frozenset({"monitor"})


def service_username(kind: str, instance: str) -> str:
    """``{kind}.{instance}``: a dot is never in an id, so no device or gateway account has it."""
    if kind not in SERVICE_KINDS:
        raise InvalidIdError(f"service kind {kind!r} is not one of {', '.join(SERVICE_KINDS)}")
    return f"{kind}.{check_id(instance, 'service instance')}"


def _service_acls(kind: str, prefix: str, share_group: str) -> tuple[AclRule, ...]:
    if kind == "ingest":
        # Exactly the filters ingest subscribes (contracts.topics), compared as
        # strings (subscribeLiteral): the share group is part of them.
        return (
            AclRule(acltype="subscribeLiteral", topic=ingest_batch_filter(share_group, prefix)),
            AclRule(acltype="subscribeLiteral", topic=ingest_report_filter(share_group, prefix)),
            AclRule(acltype="subscribeLiteral", topic=gateway_filter("state", prefix)),
            AclRule(acltype="publishClientSend", topic=gateway_filter("ack", prefix)),
            AclRule(acltype="publishClientSend", topic=gateway_filter("cmd", prefix)),
        )
    if kind == "monitor":
        return (AclRule(acltype="subscribeLiteral", topic=gateway_filter("state", prefix)),)
    devices = device_uplink_filter(prefix).removesuffix("/up")
    return (
        AclRule(acltype="publishClientSend", topic=f"{devices}/up"),
        AclRule(acltype="publishClientSend", topic=f"{devices}/status"),
        AclRule(acltype="publishClientSend", topic=f"{devices}/res"),
        # The simulated fleet's LoRaWAN devices come through its simulated
        # ChirpStack integration (firmware_sim.chirpstack), on the same account.
        AclRule(acltype="publishClientSend", topic=CHIRPSTACK_EVENTS_PUBLISH),
        # Each device subscribes to its own d/{id}/cmd: a pattern, matched
        # against the filter each device sends.
        AclRule(acltype="subscribePattern", topic=f"{devices}/cmd"),
    )


def service_account(
    kind: str, instance: str, prefix: str = "", *, share_group: str = DEFAULT_SHARE_GROUP
) -> Account:
    """The account of a service: ``ingest`` and ``monitor`` (central), ``sim`` (site).

    ``share_group`` is ingest's ``share_group`` setting: its role allows
    that group's shared subscriptions and no other (a second group would
    receive a full copy of the stream, which no worker of this one should
    open by mistake). Only ``monitor`` is bound to a client id (its
    username); the module docstring says why the others cannot be and what
    keeps other accounts off ingest's ids.
    """
    username = service_username(kind, instance)
    return Account(
        broker="site" if kind == "sim" else "central",
        username=username,
        client_id=username if kind in _BOUND_KINDS else "",
        role=Role(rolename=username, acls=_service_acls(kind, prefix, share_group)),
    )


# --- control commands --------------------------------------------------------------

Command = dict[str, Any]


def _acl_dicts(role: Role) -> list[dict[str, Any]]:
    return [msgspec.to_builtins(rule) for rule in role.acls]


def create_account(account: Account, password: str) -> list[Command]:
    """Create the account's role, then the account holding it (in one control message)."""
    return [
        {
            "command": "createRole",
            "rolename": account.role.rolename,
            "acls": _acl_dicts(account.role),
        },
        {
            "command": "createClient",
            "username": account.username,
            "password": password,
            # An account with no client id (a service's, below) connects with any.
            **({"clientid": account.client_id} if account.client_id else {}),
            "roles": [{"rolename": account.role.rolename}],
        },
    ]


def delete_account(account: Account) -> list[Command]:
    """Delete the account (its sessions are disconnected) and its role."""
    return [
        {"command": "deleteClient", "username": account.username},
        {"command": "deleteRole", "rolename": account.role.rolename},
    ]


def set_password(account: Account, password: str) -> list[Command]:
    """New secret; the broker disconnects sessions that used the old one."""
    return [{"command": "setClientPassword", "username": account.username, "password": password}]


def disable_account(account: Account) -> list[Command]:
    return [{"command": "disableClient", "username": account.username}]


def enable_account(account: Account) -> list[Command]:
    return [{"command": "enableClient", "username": account.username}]


def get_account(account: Account) -> list[Command]:
    return [{"command": "getClient", "username": account.username}]


def set_client_id(account: Account) -> list[Command]:
    """Bind the account to its client id (the broker disconnects its live sessions)."""
    return [{"command": "setClientId", "username": account.username, "clientid": account.client_id}]


def get_role(role: Role) -> list[Command]:
    return [{"command": "getRole", "rolename": role.rolename}]


def _acl_key(acl: AclRule) -> tuple[str, str]:
    return acl.acltype, acl.topic


def _add_acl(rolename: str, acl: AclRule) -> Command:
    return {"command": "addRoleACL", "rolename": rolename, **msgspec.to_builtins(acl)}


def _remove_acl(rolename: str, acl: AclRule) -> Command:
    return {
        "command": "removeRoleACL",
        "rolename": rolename,
        "acltype": acl.acltype,
        "topic": acl.topic,
    }


def role_acls(data: dict[str, Any] | None) -> tuple[AclRule, ...]:
    """The ACLs in a ``getRole`` answer."""
    try:
        role = (data or {})["role"]
        return tuple(msgspec.convert(acl, AclRule) for acl in role.get("acls", []))
    except (KeyError, TypeError, AttributeError, msgspec.ValidationError) as exc:
        raise MalformedPayloadError(f"getRole answer: {exc}") from exc


def role_changes(
    current: tuple[AclRule, ...], desired: Role
) -> tuple[list[Command], list[Command]]:
    """Commands that turn ``current`` into ``desired``'s ACLs, and the commands that undo them.

    Both are empty when the role is already as desired, so a re-run sends nothing.
    """
    have = {_acl_key(acl): acl for acl in current}
    want = {_acl_key(acl): acl for acl in desired.acls}
    stale = [acl for key, acl in have.items() if want.get(key) != acl]
    missing = [acl for key, acl in want.items() if have.get(key) != acl]
    name = desired.rolename
    forward = [_remove_acl(name, acl) for acl in stale] + [_add_acl(name, a) for a in missing]
    undo = [_remove_acl(name, acl) for acl in missing] + [_add_acl(name, a) for a in stale]
    return forward, undo


_ENCODER: Final = msgspec.json.Encoder()


def encode_commands(commands: list[Command]) -> bytes:
    return _ENCODER.encode({"commands": commands})


class _Response(msgspec.Struct, frozen=True):
    command: str
    error: str | None = None
    data: dict[str, Any] | None = None


class _Responses(msgspec.Struct, frozen=True):
    responses: list[_Response]


_DECODER: Final = msgspec.json.Decoder(_Responses)


def decode_responses(payload: bytes) -> list[tuple[str, str | None, dict[str, Any] | None]]:
    """``(command, error or None, data or None)`` for each response in a control reply."""
    try:
        decoded = _DECODER.decode(payload)
    except msgspec.DecodeError as exc:
        raise MalformedPayloadError(f"dynamic-security response: {exc}") from exc
    return [(r.command, r.error, r.data) for r in decoded.responses]


def check_responses(
    commands: list[Command],
    responses: list[tuple[str, str | None, dict[str, Any] | None]],
    *,
    tolerated: frozenset[str] = frozenset(),
) -> list[dict[str, Any] | None]:
    """Raise BrokerControlError naming every command that failed (errors in ``tolerated`` pass).

    Returns each command's ``data`` (``getClient`` answers with one).
    """
    if len(responses) != len(commands):
        raise BrokerControlError(
            f"the broker answered {len(responses)} of"
            f" {count_noun(len(commands), 'control command', 'control commands')}"
        )
    failures = [
        f"{command['command']} {command.get('username') or command.get('rolename')}: {error}"
        for command, (_, error, _) in zip(commands, responses, strict=True)
        if error is not None and error not in tolerated
    ]
    if failures:
        raise BrokerControlError("the broker refused: " + "; ".join(failures))
    return [data for _, _, data in responses]


# --- the plugin's configuration file --------------------------------------------


def hash_password(password: str, salt: bytes | None = None) -> dict[str, Any]:
    """The ``password``/``salt``/``iterations`` fields of a client in the plugin's file."""
    salt = salt if salt is not None else secrets.token_bytes(PW_SALT_BYTES)
    if len(salt) != PW_SALT_BYTES:
        raise ValueError(f"salt must be {PW_SALT_BYTES} bytes")
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PW_ITERATIONS)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": PW_ITERATIONS,
    }


def _full_access_acls() -> list[dict[str, Any]]:
    acls: list[dict[str, Any]] = []
    # `#` does not match topics that start with `$` ($CONTROL, $SYS): name them.
    for topic in ("#", f"{CONTROL_TOPIC.rsplit('/', 1)[0]}/#", "$SYS/#"):
        acls.extend(
            {"acltype": acltype, "topic": topic, "allow": True}
            for acltype in (
                "publishClientSend",
                "publishClientReceive",
                "subscribePattern",
                "unsubscribePattern",
            )
        )
    return acls


def _with_client_id(client: dict[str, Any]) -> dict[str, Any]:
    client_id = client_id_of(str(client.get("username", "")))
    if client_id is None or client.get("clientid") == client_id:
        return client
    return {**client, "clientid": client_id}


def _with_command_acls(role: dict[str, Any]) -> dict[str, Any]:
    """A device's or gateway's role from before commands, with the rules commands need.

    Found by the rules such roles always held: a device's publish under
    ``…/d/{id}/#`` (-> subscribe ``…/d/{id}/cmd``), a site role's receive of
    ``…/d/{dev}/#`` (-> subscribe ``…/d/{dev}/res``, publish ``…/d/{dev}/cmd``),
    a central role's subscription to ``…/gw/{id}/config`` (-> subscribe
    ``…/cmd``, publish ``…/cmdreport``). A role that has them is unchanged.
    """
    name = str(role.get("rolename", ""))
    if client_id_of(name) is None:
        return role
    acls = list(role.get("acls", []))
    have = {(a.get("acltype"), a.get("topic")) for a in acls}
    wanted: list[tuple[str, str]] = []
    for acl in acls:
        kind, topic = acl.get("acltype"), str(acl.get("topic", ""))
        if not acl.get("allow", True) or not topic:
            continue
        if name.startswith("device.") and kind == "publishClientSend" and topic.endswith("/#"):
            wanted.append(("subscribeLiteral", topic[:-1] + "cmd"))
        elif name.endswith(".site") and kind == "publishClientReceive" and topic.endswith("/#"):
            wanted.append(("subscribeLiteral", topic[:-1] + "res"))
            wanted.append(("publishClientSend", topic[:-1] + "cmd"))
        elif kind == "subscribeLiteral" and topic.endswith("/config"):
            base = topic.removesuffix("config")
            wanted.append(("subscribeLiteral", base + "cmd"))
            wanted.append(("publishClientSend", base + "cmdreport"))
    added = [
        {"acltype": kind, "topic": topic, "priority": 0, "allow": True}
        for kind, topic in dict.fromkeys(wanted)
        if (kind, topic) not in have
    ]
    return {**role, "acls": acls + added} if added else role


def base_document(
    existing: dict[str, Any] | None,
    *,
    admin_username: str,
    admin_password: str,
    dev_mode: bool,
    services: Iterable[tuple[Account, str]] = (),
    salt: bytes | None = None,
) -> dict[str, Any]:
    """The plugin's file with the admin account (full access) and ``services`` made current.

    ``existing`` is the file as the broker last saved it: every provisioned
    account, role and group in it is kept; only the admin account and role,
    each of ``services`` (an account and its password: its role and client
    id as ``service_account`` made them) and the dev-mode anonymous group
    are (re)written. In dev mode anonymous
    clients get full access through the anonymous group; otherwise the group
    is removed (and the broker's ``allow_anonymous false`` keeps them out).
    Device and gateway accounts made before accounts were bound to their
    client ids get theirs (``client_id_of``), and roles made before commands
    get the rules commands need (``_with_command_acls``).
    """
    document = dict(existing or {})
    services = list(services)
    rewritten = {admin_username, *(account.username for account, _ in services)}
    clients = [
        _with_client_id(c)
        for c in document.get("clients", [])
        if c.get("username") not in rewritten
    ]
    clients.append(
        {
            "username": admin_username,
            "textName": "cityhub provisioning",
            **hash_password(admin_password, salt),
            "roles": [{"rolename": ADMIN_ROLE}],
        }
    )
    for account, password in services:
        clients.append(
            {
                "username": account.username,
                "textName": f"cityhub service {account.username}",
                **hash_password(password, salt),
                **({"clientid": account.client_id} if account.client_id else {}),
                "roles": [{"rolename": account.role.rolename}],
            }
        )
    base_roles = {ADMIN_ROLE, DEV_ANONYMOUS_ROLE, *(a.role.rolename for a, _ in services)}
    roles = [
        _with_command_acls(r)
        for r in document.get("roles", [])
        if r.get("rolename") not in base_roles
    ]
    roles.append({"rolename": ADMIN_ROLE, "acls": _full_access_acls()})
    roles.extend({"rolename": a.role.rolename, "acls": _acl_dicts(a.role)} for a, _ in services)
    groups = [g for g in document.get("groups", []) if g.get("groupname") != DEV_ANONYMOUS_GROUP]
    document.pop("anonymousGroup", None)
    if dev_mode:
        roles.append({"rolename": DEV_ANONYMOUS_ROLE, "acls": _full_access_acls()})
        groups.append(
            {"groupname": DEV_ANONYMOUS_GROUP, "roles": [{"rolename": DEV_ANONYMOUS_ROLE}]}
        )
        document["anonymousGroup"] = DEV_ANONYMOUS_GROUP
    document["clients"] = clients
    document["roles"] = roles
    document["groups"] = groups
    document["defaultACLAccess"] = {
        "publishClientSend": False,
        "publishClientReceive": True,
        "subscribe": False,
        "unsubscribe": True,
    }
    return document
