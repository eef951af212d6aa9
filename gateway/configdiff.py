"""Config diffs: an applied device list against a new one, as what to change.

Pure: device lists in, the devices to forget, the site subscriptions to add
and drop, the serial readers to stop and start, and the site routes (topic ->
device) out. Subscribing, opening ports and logging are the gateway shell's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from contracts.messages import DeviceConfig, GatewayConfig
from contracts.topics import (
    chirpstack_device_filter,
    device_answer_topic,
    device_status_topic,
    device_uplink_topic,
)

# topic -> (device, is the status topic), for enabled MQTT devices.
Routes = dict[str, tuple[DeviceConfig, bool]]


@dataclass(frozen=True, slots=True)
class ConfigDiff:
    removed: frozenset[str]  # device ids no longer configured
    subscribe: frozenset[str]  # MQTT device ids whose topics the site link now needs
    unsubscribe: frozenset[str]  # MQTT device ids whose topics it no longer needs
    # ChirpStack event filters of LoRaWAN devices (``lorawan_filters``) to add and drop.
    subscribe_filters: frozenset[str] = frozenset()
    unsubscribe_filters: frozenset[str] = frozenset()


def is_newer(current: GatewayConfig | None, config: GatewayConfig) -> bool:
    """True if ``config`` replaces ``current``: versions only ever increase."""
    return current is None or config.version > current.version


def mqtt_device_ids(devices: Iterable[DeviceConfig]) -> set[str]:
    return {d.device_id for d in devices if d.transport == "mqtt"}


def diff_config(old: Mapping[str, DeviceConfig], new: Iterable[DeviceConfig]) -> ConfigDiff:
    new = list(new)
    before = mqtt_device_ids(old.values())
    after = mqtt_device_ids(new)
    filters_before = set(lorawan_filters(old.values()))
    filters_after = set(lorawan_filters(new))
    return ConfigDiff(
        removed=frozenset(set(old) - {d.device_id for d in new}),
        subscribe=frozenset(after - before),
        unsubscribe=frozenset(before - after),
        subscribe_filters=frozenset(filters_after - filters_before),
        unsubscribe_filters=frozenset(filters_before - filters_after),
    )


def lorawan_filters(devices: Iterable[DeviceConfig]) -> list[str]:
    """ChirpStack's events of each enabled LoRaWAN device (``gateway.lorawan``), sorted."""
    return sorted(
        chirpstack_device_filter(d.dev_eui)
        for d in devices
        if d.transport == "lorawan" and d.enabled and d.dev_eui is not None
    )


def site_routes(devices: Iterable[DeviceConfig], prefix: str) -> Routes:
    """The uplink and status topics of each enabled MQTT device."""
    routes: Routes = {}
    for device in devices:
        if device.transport == "mqtt" and device.enabled:
            routes[device_uplink_topic(device.device_id, prefix)] = (device, False)
            routes[device_status_topic(device.device_id, prefix)] = (device, True)
    return routes


def device_topics(device_ids: Iterable[str], prefix: str) -> list[str]:
    """One uplink and one status subscription per device, in id order."""
    topics = []
    for device_id in sorted(device_ids):
        topics.append(device_uplink_topic(device_id, prefix))
        topics.append(device_status_topic(device_id, prefix))
    return topics


def answer_topics(device_ids: Iterable[str], prefix: str) -> list[str]:
    """One answer subscription (commands' responses) per device, in id order."""
    return [device_answer_topic(device_id, prefix) for device_id in sorted(device_ids)]


def served_device_ids(routes: Routes, granted: frozenset[str]) -> set[str]:
    """Devices both of whose topics the site broker has granted."""
    topics_of: dict[str, int] = {}
    for topic, (device, _is_status) in routes.items():
        if topic in granted:
            topics_of[device.device_id] = topics_of.get(device.device_id, 0) + 1
    return {device_id for device_id, n in topics_of.items() if n == 2}


def serial_changes(
    running: Mapping[str, DeviceConfig], devices: Iterable[DeviceConfig]
) -> tuple[list[str], list[DeviceConfig]]:
    """Serial readers to stop (ids) and to start: enabled serial devices, each as configured."""
    wanted = {d.device_id: d for d in devices if d.transport == "serial" and d.enabled}
    stop = [device_id for device_id, device in running.items() if wanted.get(device_id) != device]
    start = [
        device
        for device_id, device in wanted.items()
        if device_id not in running or device_id in stop
    ]
    return stop, start
