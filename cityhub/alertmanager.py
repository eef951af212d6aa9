"""Alertmanager configuration for cityhub's alerts: a receivers file in, alertmanager.yml out.

The operator writes who is told (receivers: email, a webhook, Telegram) and
which severities and wards go to whom in a small TOML file; this module checks
it (every refusal names the file and the key) and builds the Alertmanager 0.25
configuration: routes by severity and by ward/commune, grouping per site,
inhibition of a device's alerts while it is offline, and the Vietnamese
message templates (``cityhub/data/cityhub.tmpl``). It is pure: text in,
text out; reading and writing the files is the `cityhub alertmanager` command's
job, and what the alerts job posts (labels, annotations) is the alerts
service's.

The receivers file::

    default_receiver = "ops-email"          # optional: alerts no route takes

    [[receiver]]
    name = "ops-email"
    kind = "email"                          # email | webhook | telegram
    to = ["noc@example.vn"]
    from = "cityhub@example.vn"
    smarthost = "smtp.example.vn:587"
    auth_username = "cityhub"               # optional, with auth_password
    auth_password = "change-me"
    require_tls = true                      # default true
    send_resolved = true                    # default true, every kind

    [severity]                              # all four, [] for none
    critical = ["ops-email"]
    major = ["ops-email"]
    minor = []
    warning = []

    [[route]]                               # optional, per ward/commune
    ward = "Phường Hoàn Kiếm"               # name or 5-digit code
    receivers = ["hk-zalo"]
    severities = ["critical", "major"]      # optional, default all four

    [timing.major]                          # optional, any severity, any key
    group_wait = "30s"                      # Alertmanager durations: 30s, 5m, 4h
    group_interval = "5m"
    repeat_interval = "4h"
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from contracts.errors import GeographyError, ReceiversError
from contracts.geography import find_unit
from contracts.schema import SEVERITIES

TEMPLATE_PATH = Path(__file__).parent / "data" / "cityhub.tmpl"
TEMPLATE_NAME = TEMPLATE_PATH.name

# The root receiver when the file names no default_receiver: Alertmanager needs
# one, and a receiver with no integrations drops what reaches it. Only an alert
# whose severity is none of the four gets there (every severity has a route).
UNROUTED = "cityhub-unrouted"

# The only receiver of a configuration that sends nothing (`cityhub up` without
# a receivers file): alerts are in Alertmanager's UI and API, told to nobody.
NULL_RECEIVER = "cityhub-null"

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
_SMARTHOST_RE = re.compile(r"^[^\s:]+:[0-9]{1,5}$")
_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+$")

# One notification per site and rule: a power cut at a service hall takes all
# its kiosks offline at once, and the technician who goes there wants one
# message listing them, not one per kiosk; different rules stay separate
# messages (a printer fault is another job than a long queue), and different
# sites are different trips. The severity routes split groups by severity.
GROUP_BY = ("site_id", "alertname")


@dataclass(frozen=True)
class Timing:
    """How Alertmanager paces one severity's notifications."""

    group_wait: str
    group_interval: str
    repeat_interval: str


# Critical and major page quickly: 10 s / 30 s of group_wait is enough to
# gather the other devices of a site that fail in the same second (one power
# cut) without delaying the page. Minor and warning are batched: 5 / 10 minutes
# collect a ward's morning of PM2.5 warnings into one message. Repeats: a
# critical alert still firing is said again every hour until someone acts; a
# warning once a day is a reminder, not noise.
TIMINGS: Mapping[str, Timing] = {
    "critical": Timing("10s", "1m", "1h"),
    "major": Timing("30s", "5m", "4h"),
    "minor": Timing("5m", "30m", "12h"),
    "warning": Timing("10m", "1h", "24h"),
}

# Offline rules: rule_id ending in "-offline" (the no_data rules, and a future
# gateway-offline), plus conference-endpoint-down, whose condition is no_data or
# the endpoint reporting itself offline: while a device is silent its other
# alerts (stuck counters, packet loss) are consequences, not news.
OFFLINE_RULES_RE = ".+-offline|conference-endpoint-down"
GATEWAY_OFFLINE_RULE = "gateway-offline"

_KIND_KEYS: Mapping[str, frozenset[str]] = {
    "email": frozenset(
        {"to", "from", "smarthost", "auth_username", "auth_password", "require_tls"}
    ),
    "webhook": frozenset({"url"}),
    "telegram": frozenset({"bot_token", "chat_id"}),
}
_COMMON_KEYS = frozenset({"name", "kind", "send_resolved"})
_TOP_KEYS = frozenset({"default_receiver", "receiver", "severity", "route", "timing"})
_TIMING_KEYS = frozenset({"group_wait", "group_interval", "repeat_interval"})
# Alertmanager's durations as people write them: a number and a unit, or several (1h30m).
_DURATION_RE = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")
_ROUTE_KEYS = frozenset({"ward", "receivers", "severities"})
_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass(frozen=True)
class Receiver:
    name: str
    kind: str
    send_resolved: bool
    options: Mapping[str, Any]


@dataclass(frozen=True)
class WardRoute:
    ward_code: str
    ward: str
    receivers: tuple[str, ...]
    severities: tuple[str, ...]


@dataclass(frozen=True)
class Receivers:
    """A checked receivers file."""

    receivers: tuple[Receiver, ...]
    by_severity: Mapping[str, tuple[str, ...]]
    ward_routes: tuple[WardRoute, ...]
    default_receiver: str | None
    # TIMINGS with the file's [timing.<severity>] keys applied.
    timings: Mapping[str, Timing] = field(default_factory=lambda: dict(TIMINGS))


class _Refusal:
    """Builds the one-line errors: "<file>: key '<where>': <what>"."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __call__(self, where: str, what: str) -> ReceiversError:
        return ReceiversError(self.source, where or None, what)


def _str(value: object, where: str, refuse: _Refusal) -> str:
    if not isinstance(value, str) or not value.strip():
        raise refuse(where, "must be a non-empty string")
    return value


def _str_list(value: object, where: str, refuse: _Refusal) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise refuse(where, "must be a list of non-empty strings")
    return tuple(value)


def _unknown(table: Mapping[str, object], allowed: frozenset[str], where: str, r: _Refusal) -> None:
    for key in table:
        if key not in allowed:
            raise r(f"{where}{key}", f"unknown key (known: {', '.join(sorted(allowed))})")


def _parse_receiver(i: int, table: object, refuse: _Refusal) -> Receiver:
    if not isinstance(table, dict):
        raise refuse(f"receiver[{i}]", "must be a table ([[receiver]])")
    name = table.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise refuse(f"receiver[{i}].name", "required: lower-case letters, digits and '-'")
    where = f'receiver "{name}".'
    kind = table.get("kind")
    if not isinstance(kind, str) or kind not in _KIND_KEYS:
        raise refuse(f"{where}kind", f"must be one of {', '.join(_KIND_KEYS)}")
    _unknown(table, _COMMON_KEYS | _KIND_KEYS[kind], where, refuse)
    send_resolved = table.get("send_resolved", True)
    if not isinstance(send_resolved, bool):
        raise refuse(f"{where}send_resolved", "must be true or false")
    options: dict[str, Any]
    if kind == "email":
        options = _email_options(table, where, refuse)
    elif kind == "webhook":
        options = {"url": _webhook_url(table.get("url"), f"{where}url", refuse)}
    else:
        chat_id = table.get("chat_id")
        # A bool is an int to Python; a chat id never is one.
        if not isinstance(chat_id, int) or isinstance(chat_id, bool):
            raise refuse(f"{where}chat_id", "required: the chat's number (groups are negative)")
        options = {
            "bot_token": _str(table.get("bot_token"), f"{where}bot_token", refuse),
            "chat_id": chat_id,
        }
    return Receiver(name=name, kind=kind, send_resolved=send_resolved, options=options)


def _email_options(table: Mapping[str, object], where: str, refuse: _Refusal) -> dict[str, Any]:
    to_value = table.get("to")
    to = (to_value,) if isinstance(to_value, str) else _str_list(to_value, f"{where}to", refuse)
    for address in to:
        if not _EMAIL_RE.match(address):
            raise refuse(f"{where}to", f"{address!r} is not an e-mail address")
    sender = _str(table.get("from"), f"{where}from", refuse)
    if not _EMAIL_RE.match(sender):
        raise refuse(f"{where}from", f"{sender!r} is not an e-mail address")
    smarthost = _str(table.get("smarthost"), f"{where}smarthost", refuse)
    if not _SMARTHOST_RE.match(smarthost):
        raise refuse(f"{where}smarthost", f"{smarthost!r} must be host:port")
    options: dict[str, Any] = {"to": ", ".join(to), "from": sender, "smarthost": smarthost}
    username, password = table.get("auth_username"), table.get("auth_password")
    if (username is None) != (password is None):
        raise refuse(f"{where}auth_password", "auth_username and auth_password go together")
    if username is not None:
        options["auth_username"] = _str(username, f"{where}auth_username", refuse)
        options["auth_password"] = _str(password, f"{where}auth_password", refuse)
    require_tls = table.get("require_tls", True)
    if not isinstance(require_tls, bool):
        raise refuse(f"{where}require_tls", "must be true or false")
    options["require_tls"] = require_tls
    return options


def _webhook_url(value: object, where: str, refuse: _Refusal) -> str:
    """An https URL, or http to this machine only (a chat bridge beside Alertmanager):
    the alerts name places and devices, and a bridge's URL often carries its token.
    """
    url = _str(value, where, refuse)
    parts = urlsplit(url)
    if not parts.hostname:
        raise refuse(where, f"{url!r} is not a URL")
    if parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in _LOOPBACK_HOSTS):
        return url
    raise refuse(where, f"{url!r} must be https:// (http:// only to localhost)")


def _parse_route(i: int, table: object, names: frozenset[str], refuse: _Refusal) -> WardRoute:
    where = f"route[{i}]."
    if not isinstance(table, dict):
        raise refuse(f"route[{i}]", "must be a table ([[route]])")
    _unknown(table, _ROUTE_KEYS, where, refuse)
    query = table.get("ward")
    if isinstance(query, int) and not isinstance(query, bool):
        query = f"{query:05d}"
    query = _str(query, f"{where}ward", refuse)
    try:
        unit = find_unit(query)
    except GeographyError as exc:
        raise refuse(f"{where}ward", str(exc)) from None
    receivers = _known(table.get("receivers"), names, f"{where}receivers", refuse)
    if not receivers:
        raise refuse(f"{where}receivers", "names no receiver")
    severities = _str_list(table.get("severities", list(SEVERITIES)), f"{where}severities", refuse)
    for severity in severities:
        if severity not in SEVERITIES:
            raise refuse(f"{where}severities", f"{severity!r} is none of {', '.join(SEVERITIES)}")
    return WardRoute(
        ward_code=unit.code, ward=unit.name, receivers=receivers, severities=severities
    )


def _known(value: object, names: frozenset[str], where: str, refuse: _Refusal) -> tuple[str, ...]:
    listed = _str_list(value, where, refuse) if value != [] else ()
    for name in listed:
        if name not in names:
            raise refuse(where, f"no receiver is named {name!r}")
    return listed


def _parse_timings(value: object, refuse: _Refusal) -> dict[str, Timing]:
    """TIMINGS with the [timing.<severity>] tables' keys in their place."""
    if not isinstance(value, dict):
        raise refuse("timing", "must be a table of severities ([timing.major])")
    _unknown(value, frozenset(SEVERITIES), "timing.", refuse)
    timings = dict(TIMINGS)
    for level, table in value.items():
        if not isinstance(table, dict):
            raise refuse(f"timing.{level}", "must be a table ([timing.major])")
        _unknown(table, _TIMING_KEYS, f"timing.{level}.", refuse)
        for key, duration in table.items():
            if not isinstance(duration, str) or not _DURATION_RE.match(duration):
                raise refuse(f"timing.{level}.{key}", 'must be a duration such as "30s" or "5m"')
        timings[level] = replace(TIMINGS[level], **{str(k): str(v) for k, v in table.items()})
    return timings


def parse_receivers(text: str, *, source: str) -> Receivers:
    """Check a receivers file's text; ReceiversError naming ``source`` and the key if bad."""
    refuse = _Refusal(source)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise refuse("", f"not valid TOML: {exc}") from None
    _unknown(data, _TOP_KEYS, "", refuse)
    tables = data.get("receiver", [])
    if not isinstance(tables, list) or not tables:
        raise refuse("receiver", "at least one [[receiver]] table is required")
    receivers = tuple(_parse_receiver(i, t, refuse) for i, t in enumerate(tables))
    names = frozenset(r.name for r in receivers)
    if len(names) != len(receivers) or UNROUTED in names:
        raise refuse("receiver", f"receiver names must be unique and not {UNROUTED!r}")
    severity = data.get("severity")
    if not isinstance(severity, dict):
        raise refuse("severity", "a [severity] table is required (critical, major, minor, warning)")
    _unknown(severity, frozenset(SEVERITIES), "severity.", refuse)
    by_severity: dict[str, tuple[str, ...]] = {}
    for level in SEVERITIES:
        if level not in severity:
            raise refuse(f"severity.{level}", "missing (write [] to send this severity nowhere)")
        by_severity[level] = _known(severity[level], names, f"severity.{level}", refuse)
    routes = data.get("route", [])
    if not isinstance(routes, list):
        raise refuse("route", "must be [[route]] tables")
    ward_routes = tuple(_parse_route(i, t, names, refuse) for i, t in enumerate(routes))
    default = data.get("default_receiver")
    if default is not None:
        (default,) = _known([default], names, "default_receiver", refuse)
    timings = _parse_timings(data.get("timing", {}), refuse)
    return Receivers(
        receivers=receivers,
        by_severity=by_severity,
        ward_routes=ward_routes,
        default_receiver=default,
        timings=timings,
    )


def _integration(receiver: Receiver) -> tuple[str, dict[str, Any]]:
    """The receiver's Alertmanager block, with cityhub's templates wired in."""
    base: dict[str, Any] = {"send_resolved": receiver.send_resolved}
    if receiver.kind == "email":
        return "email_configs", {
            **base,
            **receiver.options,
            "headers": {"Subject": '{{ template "cityhub.title" . }}'},
            "text": '{{ template "cityhub.body" . }}',
            "html": '{{ template "cityhub.email.html" . }}',
        }
    if receiver.kind == "webhook":
        # The webhook gets Alertmanager's JSON (every label and annotation); a
        # Zalo or other chat bridge formats it itself.
        return "webhook_configs", {**base, **receiver.options}
    # Plain text: Telegram's HTML mode would need every "<" in a message escaped.
    return "telegram_configs", {
        **base,
        **receiver.options,
        "message": '{{ template "cityhub.message" . }}',
        "parse_mode": "",
    }


def _severity_route(
    level: str, receiver: str, matchers: Sequence[str], timings: Mapping[str, Timing]
) -> dict[str, Any]:
    """A route for one receiver and severity, paced for that severity; `continue` so
    the routes after it (other receivers, the severity routes) see the alert too.
    """
    timing = timings[level]
    return {
        "receiver": receiver,
        "matchers": [*matchers, f'severity="{level}"'],
        "continue": True,
        "group_wait": timing.group_wait,
        "group_interval": timing.group_interval,
        "repeat_interval": timing.repeat_interval,
    }


def build_config(plan: Receivers) -> dict[str, Any]:
    """The alertmanager.yml content for ``plan`` (the template file sits beside it)."""
    routes: list[dict[str, Any]] = []
    # Ward routes first, each with `continue` so the severity routes below still
    # see the alert: a ward's own people are told in addition to the operations
    # centre, never instead of it.
    # One route per ward, receiver and severity rather than a ward route with
    # severity children: a parent whose children all miss takes the alert
    # itself, which would send a ward the severities it left out.
    for ward_route in plan.ward_routes:
        matcher = f'ward_code="{ward_route.ward_code}"'
        routes.extend(
            _severity_route(level, name, [matcher], plan.timings)
            for name in ward_route.receivers
            for level in ward_route.severities
        )
    for level in SEVERITIES:
        routes.extend(
            _severity_route(level, name, [], plan.timings) for name in plan.by_severity[level]
        )
    receivers: list[dict[str, Any]] = [] if plan.default_receiver else [{"name": UNROUTED}]
    for receiver in plan.receivers:
        key, block = _integration(receiver)
        receivers.append({"name": receiver.name, key: [block]})
    return {
        "templates": [TEMPLATE_NAME],
        "route": {
            "receiver": plan.default_receiver or UNROUTED,
            "group_by": list(GROUP_BY),
            # Only alerts of no known severity stay at the root: batched.
            "group_wait": TIMINGS["minor"].group_wait,
            "group_interval": TIMINGS["minor"].group_interval,
            "repeat_interval": TIMINGS["minor"].repeat_interval,
            "routes": routes,
        },
        "inhibit_rules": [
            # A device that is offline raises nothing else worth a message.
            {
                "source_matchers": [f'alertname=~"{OFFLINE_RULES_RE}"'],
                "target_matchers": [f'alertname!~"{OFFLINE_RULES_RE}"'],
                "equal": ["device_id"],
            },
            # A site's gateway offline: its devices fall silent behind it. Device
            # alerts carry no gateway_id, so the site is the finest label both
            # sides share; another gateway's offline alert at the site still goes.
            {
                "source_matchers": [f'alertname="{GATEWAY_OFFLINE_RULE}"'],
                "target_matchers": [f'alertname!="{GATEWAY_OFFLINE_RULE}"'],
                "equal": ["site_id"],
            },
        ],
        "receivers": receivers,
    }


def null_config() -> dict[str, Any]:
    """A configuration whose only receiver has no integrations: alerts are kept and shown
    (Alertmanager's UI and API, grouped as the real routes group them), sent nowhere.
    """
    return {
        "route": {"receiver": NULL_RECEIVER, "group_by": list(GROUP_BY)},
        "receivers": [{"name": NULL_RECEIVER}],
    }


def _scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.isprintable() and "'" not in value:
        return f"'{value}'"  # single-quoted YAML: no escapes at all
    if isinstance(value, str):
        # A JSON string is a YAML double-quoted scalar; characters YAML will not
        # read raw (controls, DEL, line and paragraph separators) are escaped too.
        return "".join(
            c if c.isprintable() else f"\\U{ord(c):08x}"
            for c in json.dumps(value, ensure_ascii=False)
        )
    raise TypeError(f"no YAML form for {value!r}")


def _yaml_lines(value: object, indent: str) -> list[str]:
    lines: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                if isinstance(item, list) and not any(isinstance(v, dict) for v in item):
                    lines.append(f"{indent}{key}: [{', '.join(_scalar(v) for v in item)}]")
                else:
                    lines.append(f"{indent}{key}:")
                    lines.extend(_yaml_lines(item, indent + "  "))
            elif isinstance(item, dict | list):
                lines.append(f"{indent}{key}: {'{}' if isinstance(item, dict) else '[]'}")
            else:
                lines.append(f"{indent}{key}: {_scalar(item)}")
    elif isinstance(value, list):
        for item in value:
            inner = _yaml_lines(item, indent + "  ")
            if isinstance(item, dict) and inner:
                lines.append(f"{indent}- {inner[0].lstrip()}")
                lines.extend(inner[1:])
            else:
                lines.append(f"{indent}- {_scalar(item)}")
    return lines


def render_yaml(config: Mapping[str, Any], *, source: str) -> str:
    """alertmanager.yml's text: a header, then ``config`` as block YAML, every string quoted."""
    header = [
        f"# Generated by `cityhub alertmanager config` from {source}: edit that file and",
        "# regenerate rather than editing this one. Alertmanager 0.25; templates: "
        + TEMPLATE_NAME
        + ".",
    ]
    return "\n".join([*header, *_yaml_lines(dict(config), "")]) + "\n"


def has_secrets(plan: Receivers) -> bool:
    """Whether the generated file will hold a password or a bot token (then: mode 0600)."""
    return any("auth_password" in r.options or "bot_token" in r.options for r in plan.receivers)
