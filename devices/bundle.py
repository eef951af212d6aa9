"""Config bundles: what a technician flashes into a device or installs on a gateway.

A bundle holds the broker address, the account and its secret, the topics
and the device's settings; an HTTP device's holds its endpoint and bearer
token instead, a Modbus or LoRaWAN device's its model, slave id or DevEUI.
It is built here as a msgspec struct and encoded as JSON; ``qr_payload``
is the compact form for a QR code (a gateway's certificates stay in the
file: they would not fit), and
``gateway_settings_toml`` is a settings file that `cityhub gateway run -c`
reads as it is. Writing the files (mode 0600) and drawing the QR code is
``devices.bundlefiles``' job.
"""

from __future__ import annotations

import json
from typing import Final, Literal

import msgspec

from contracts.catalog import modbus_model
from contracts.errors import SettingsError
from contracts.messages import DeviceConfig
from contracts.topics import (
    ack_topic,
    batch_topic,
    config_topic,
    device_answer_topic,
    device_command_topic,
    device_status_topic,
    device_uplink_topic,
    state_topic,
)

BUNDLE_FORMAT: Final = 1
# What an HTTP device posts: the device uplink JSON (contracts.messages.DeviceUplink).
HTTP_FORMAT: Final = "cityhub-uplink-json/1"
# Appended to provisioning.gateway_http_url: where one device posts its readings.
HTTP_READINGS_PATH: Final = "/v1/devices/{device_id}/readings"


class MqttAccess(msgspec.Struct, frozen=True, kw_only=True):
    """How to reach a broker and as whom (MQTT v5)."""

    host: str
    port: int
    tls: bool
    username: str
    password: str
    client_id: str


class HttpAccess(msgspec.Struct, frozen=True, kw_only=True):
    """How an HTTP device posts its readings: ``POST url`` with ``Authorization: Bearer token``.

    The body is one reading in ``format`` (the device uplink JSON of
    ``d/{id}/up``: ``{"seq": 7, "ts": 1767225600000, "m": {...}}``).
    """

    url: str
    token: str
    format: str = HTTP_FORMAT


class DeviceBundle(msgspec.Struct, frozen=True, kw_only=True):
    kind: Literal["device"] = "device"
    format: int = BUNDLE_FORMAT
    device_id: str
    device_type: str
    site_id: str
    gateway_id: str
    transport: str
    label: str
    location: str
    hardware_id: str
    # Serial devices: the gateway's port and the frame protocol; no account.
    port: str | None = None
    protocol: str | None = None
    # MQTT devices: the site broker, the device's account and its topics.
    broker: MqttAccess | None = None
    topics: dict[str, str] = msgspec.field(default_factory=dict)
    # Uplink QoS, the Will (status "offline", retained), the rate the gateway accepts.
    settings: dict[str, str | int | float | bool] = msgspec.field(default_factory=dict)
    issued_at: str
    issued_by: str
    # Appended. Modbus: the catalog model and the slave id (line settings and
    # poll interval in ``settings``); LoRaWAN: the model and the DevEUI (the
    # LoRaWAN keys are the network server's, never here); HTTP: the endpoint
    # and the device's bearer token.
    model: str | None = None
    slave_id: int | None = None
    dev_eui: str | None = None
    http: HttpAccess | None = None


class GatewayBundle(msgspec.Struct, frozen=True, kw_only=True):
    kind: Literal["gateway"] = "gateway"
    format: int = BUNDLE_FORMAT
    gateway_id: str
    site_id: str
    label: str
    location: str
    central: MqttAccess
    site: MqttAccess
    topic_prefix: str
    topics: dict[str, str]
    # PEM: the CA of the central broker's certificate and this gateway's
    # client certificate and key, when `cityhub pki` has made them.
    ca_pem: str = ""
    cert_pem: str = ""
    key_pem: str = ""
    issued_at: str
    issued_by: str


Bundle = DeviceBundle | GatewayBundle


def device_bundle(
    device: DeviceConfig,
    *,
    site_id: str,
    gateway_id: str,
    location: str,
    hardware_id: str,
    broker: MqttAccess | None,
    prefix: str,
    issued_at: str,
    issued_by: str,
    http: HttpAccess | None = None,
) -> DeviceBundle:
    """A device's bundle; ``broker`` (its site-broker account) only for MQTT devices.

    ``http`` (its endpoint and token) only for HTTP devices. A Modbus
    device's bundle says how to set it up for its bus: slave id, and the
    line settings and poll interval of its model (installed catalog).
    """
    topics: dict[str, str] = {}
    settings: dict[str, str | int | float | bool] = {"rate_limit_per_s": device.rate_limit_per_s}
    if device.transport == "modbus":
        model = modbus_model(str(device.model))
        settings |= {
            "baudrate": model.baudrate,
            "parity": model.parity,
            "stopbits": model.stopbits,
            "poll_interval_s": device.poll_interval_s or model.poll_interval_s,
            "timeout_s": model.timeout_s,
        }
    if broker is not None:
        topics = {
            "uplink": device_uplink_topic(device.device_id, prefix),
            "status": device_status_topic(device.device_id, prefix),
            # Commands arrive as MQTT v5 requests on "command"; the device answers
            # on the request's Response Topic, which is "answer".
            "command": device_command_topic(device.device_id, prefix),
            "answer": device_answer_topic(device.device_id, prefix),
        }
        settings |= {
            "qos": 1,
            "protocol": "mqtt5",
            "will_topic": topics["status"],
            "will_payload": "offline",
            "will_retain": True,
        }
    return DeviceBundle(
        device_id=device.device_id,
        device_type=device.device_type,
        site_id=site_id,
        gateway_id=gateway_id,
        transport=device.transport,
        label=device.label,
        location=location,
        hardware_id=hardware_id,
        port=device.port,
        protocol=device.protocol,
        broker=broker,
        topics=topics,
        settings=settings,
        issued_at=issued_at,
        issued_by=issued_by,
        model=device.model,
        slave_id=device.slave_id,
        dev_eui=device.dev_eui,
        http=http,
    )


def http_readings_url(template: str, gateway_id: str, device_id: str) -> str:
    """``provisioning.gateway_http_url`` for this gateway, and this device's readings path.

    SettingsError naming the key when the template is not an http(s) URL or
    has a placeholder other than ``{gateway_id}``.
    """
    try:
        base = template.format(gateway_id=gateway_id)
    except (KeyError, IndexError, ValueError) as exc:
        raise SettingsError(
            "provisioning.gateway_http_url",
            f"{template!r}: only {{gateway_id}} may be written in braces ({exc!r})",
        ) from None
    if not base.startswith(("http://", "https://")) or len(base.split("//", 1)[1]) == 0:
        raise SettingsError(
            "provisioning.gateway_http_url",
            f"{template!r} is not an http:// or https:// URL",
        )
    return base.rstrip("/") + HTTP_READINGS_PATH.format(device_id=device_id)


def gateway_bundle(
    *,
    gateway_id: str,
    site_id: str,
    label: str,
    location: str,
    central: MqttAccess,
    site: MqttAccess,
    prefix: str,
    ca_pem: str,
    cert_pem: str,
    key_pem: str,
    issued_at: str,
    issued_by: str,
) -> GatewayBundle:
    return GatewayBundle(
        gateway_id=gateway_id,
        site_id=site_id,
        label=label,
        location=location,
        central=central,
        site=site,
        topic_prefix=prefix,
        topics={
            "batch": batch_topic(gateway_id, prefix),
            "state": state_topic(gateway_id, prefix),
            "ack": ack_topic(gateway_id, prefix),
            "config": config_topic(gateway_id, prefix),
        },
        ca_pem=ca_pem,
        cert_pem=cert_pem,
        key_pem=key_pem,
        issued_at=issued_at,
        issued_by=issued_by,
    )


def encode_bundle(bundle: Bundle) -> bytes:
    """Indented JSON, readable by a person and by the device's flashing tool."""
    return msgspec.json.format(msgspec.json.encode(bundle), indent=2) + b"\n"


def decode_bundle(payload: bytes) -> Bundle:
    data = msgspec.json.decode(payload)
    if isinstance(data, dict) and data.get("kind") == "gateway":
        return msgspec.convert(data, GatewayBundle)
    return msgspec.convert(data, DeviceBundle)


def qr_payload(bundle: Bundle) -> str:
    """Compact JSON for the QR code: everything but certificates and empty fields.

    A device bundle is ~650 bytes, well inside a QR code's 2,953 (version 40,
    level L); certificates would not fit and stay in the bundle file.
    """
    data = msgspec.to_builtins(bundle)
    for key in ("ca_pem", "cert_pem", "key_pem"):
        data.pop(key, None)
    data = {k: v for k, v in data.items() if v not in (None, "", {}, [])}
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def _toml_str(value: str) -> str:
    # A JSON string with ASCII escapes is a valid TOML basic string.
    return json.dumps(value)


def _toml_broker(access: MqttAccess, ca_file: str, cert_file: str, key_file: str) -> list[str]:
    lines = [
        f"host = {_toml_str(access.host)}",
        f"port = {access.port}",
        f"username = {_toml_str(access.username)}",
        f"password = {_toml_str(access.password)}",
        f"tls = {'true' if access.tls else 'false'}",
    ]
    if access.tls:
        lines += [
            f"ca_file = {_toml_str(ca_file)}",
            f"cert_file = {_toml_str(cert_file)}",
            f"key_file = {_toml_str(key_file)}",
        ]
    return lines


def chirpstack_settings_toml(access: MqttAccess, *, gateway_id: str, issued_at: str) -> str:
    """The ``[integration.mqtt]`` section of ChirpStack v4's chirpstack.toml for a site broker.

    JSON events on ChirpStack's default event topic, at QoS 1 so that a
    gateway's persistent session queues what arrives while it restarts.
    """
    scheme = "ssl" if access.tls else "tcp"
    lines = [
        f"# ChirpStack -> site broker of cityhub gateway {gateway_id}, issued {issued_at}.",
        "# Merge into chirpstack.toml (the [integration] section enables it); keep it 0600.",
        "[integration]",
        'enabled = ["mqtt"]',
        "",
        "[integration.mqtt]",
        f"server = {_toml_str(f'{scheme}://{access.host}:{access.port}/')}",
        "json = true",
        'event_topic = "application/{{application_id}}/device/{{dev_eui}}/event/{{event}}"',
        "qos = 1",
        f"username = {_toml_str(access.username)}",
        f"password = {_toml_str(access.password)}",
        f"client_id = {_toml_str(access.client_id)}",
        "",
    ]
    return "\n".join(lines)


def gateway_settings_toml(
    bundle: GatewayBundle, *, ca_file: str = "", cert_file: str = "", key_file: str = ""
) -> str:
    """A settings file for `cityhub gateway run -c FILE` (holds secrets: keep it 0600)."""
    lines = [
        (
            f"# cityhub gateway {bundle.gateway_id} at site {bundle.site_id}, issued"
            f" {bundle.issued_at} by {bundle.issued_by}"
        ),
        "[broker]",
        *_toml_broker(bundle.central, ca_file, cert_file, key_file),
        "",
        "[gateway]",
        f"gateway_id = {_toml_str(bundle.gateway_id)}",
        f"site_id = {_toml_str(bundle.site_id)}",
        f"topic_prefix = {_toml_str(bundle.topic_prefix)}",
        "",
        "[gateway.site_broker]",
        *_toml_broker(bundle.site, ca_file, "", ""),
        "",
    ]
    return "\n".join(lines)
