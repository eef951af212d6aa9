"""Config bundles: what a technician flashes into a device or installs on a gateway.

A bundle holds the broker address, the account and its secret, the topics
and the device's settings. It is built here as a msgspec struct and encoded
as JSON; ``qr_payload`` is the compact form for a QR code (a gateway's
certificates stay in the file: they would not fit), and
``gateway_settings_toml`` is a settings file that `cityhub gateway run -c`
reads as it is. Writing the files (mode 0600) and drawing the QR code is
``devices.bundlefiles``' job.
"""

from __future__ import annotations

import json
from typing import Final, Literal

import msgspec

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


class MqttAccess(msgspec.Struct, frozen=True, kw_only=True):
    """How to reach a broker and as whom (MQTT v5)."""

    host: str
    port: int
    tls: bool
    username: str
    password: str
    client_id: str


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
) -> DeviceBundle:
    """A device's bundle; ``broker`` (its site-broker account) only for MQTT devices."""
    topics: dict[str, str] = {}
    settings: dict[str, str | int | float | bool] = {"rate_limit_per_s": device.rate_limit_per_s}
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
    )


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
