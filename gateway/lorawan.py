"""The gateway's LoRaWAN bridge: ChirpStack's integration events -> readings of configured devices.

Decision: the bridge is part of the gateway. ChirpStack v4's MQTT
integration is pointed at the site's broker, and the gateway reads its
events there through the same ``SiteLink`` as its MQTT devices
(``application/+/device/{dev_eui}/event/+`` for each configured LoRaWAN
device, ``contracts.topics.chirpstack_device_filter``). LoRaWAN uplinks so
get exactly the MQTT devices' discipline: acknowledged to the broker only
once the batch holding them is fsynced in the outbox, the per-device rate
limit, the catalog's checks, the same outbox and delivery; and there is no
second service to run, configure or watch.

Pure: the router (``gateway.routing``) hands each event over with the time
and gets back what it is:

- ``event/up``: a ``LorawanUplink`` reading, seq = fCnt, ts = the event's
  ``time`` (the gateway's now if it has none), boot = the session's DevAddr,
  so a re-join (a new DevAddr, fCnt from 0) is a reboot for the
  ``DeviceTracker``, not a gap; metrics by the device's catalog model
  (``contracts.chirpstack.uplink_metrics``), checked against the catalog. An
  exact repeat of a frame seen lately (same deduplicationId, or same DevAddr
  and fCnt), refused or not, is a ``LorawanRepeat``, dropped and counted; one older than
  that still carries the same seq and ts, so ingest's unique key on
  (device, ts, seq) drops it. An fCnt below the session's highest that was
  not seen is counted as out of order (and stored);
- ``event/status``: a ``LorawanStatus``: the device is alive; with the
  battery level as a ``battery`` reading (seq 0, ts the event's) if its type
  has that metric and the event carries one;
- ``event/join``: a ``LorawanJoin`` (logged by the shell, counted);
- anything else (a DevEUI not configured, an event that does not decode, a
  payload its model does not fit, a value out of the catalog's range): a
  ``Refused`` with the reason, for the router to count as a reject.

Subscribing, acknowledging, storing and logging are the shell's and the
router's.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from contracts.catalog import current_catalog, device_type
from contracts.chirpstack import (
    UplinkEvent,
    decode_join_event,
    decode_status_event,
    decode_uplink_event,
    event_time_ms,
    uplink_metrics,
)
from contracts.errors import InputError, InvalidIdError
from contracts.ids import check_timestamp
from contracts.messages import DEV_EUI_RE, DeviceConfig
from contracts.topics import parse_chirpstack_topic
from gateway.counters import GatewayCounters

# Frames remembered per device to spot an exact repeat: ChirpStack publishes
# an event again only when its QoS 1 PUBLISH was not acknowledged, which
# happens within the broker's in-flight window, a handful of events; under
# LoRaWAN's duty cycle (a frame a minute or slower) 16 frames are a quarter
# of an hour of one device's traffic.
RECENT_FRAMES: Final = 16
# Status events carry the battery as this metric, if the device's type has it.
BATTERY_METRIC: Final = "battery"
# The seq of a status event's battery reading: status events have no frame
# counter, and a constant makes a repeated status event the same row.
STATUS_SEQ: Final = 0


@dataclass(frozen=True, slots=True)
class LorawanUplink:
    device: DeviceConfig
    seq: int
    ts_ms: int
    boot: str | None
    values: dict[str, float]


@dataclass(frozen=True, slots=True)
class LorawanStatus:
    device: DeviceConfig
    ts_ms: int
    boot: str | None
    values: dict[str, float]  # the battery, or nothing


@dataclass(frozen=True, slots=True)
class LorawanJoin:
    device: DeviceConfig
    dev_addr: str


@dataclass(frozen=True, slots=True)
class LorawanRepeat:
    device: DeviceConfig


@dataclass(frozen=True, slots=True)
class Refused:
    reason: str
    device_id: str  # "?" when the topic names no DevEUI
    detail: str


LorawanResult = LorawanUplink | LorawanStatus | LorawanJoin | LorawanRepeat | Refused


@dataclass(slots=True)
class _Session:
    """What the bridge remembers of one device: its session and recent frames."""

    dev_addr: str | None = None
    top_f_cnt: int | None = None
    dedup_ids: deque[str] = field(default_factory=lambda: deque(maxlen=RECENT_FRAMES))
    frames: deque[tuple[str | None, int]] = field(
        default_factory=lambda: deque(maxlen=RECENT_FRAMES)
    )


def unknown_device_id(dev_eui: str) -> str:
    """The id a reject of an unconfigured DevEUI is reported under (an allow-listed id)."""
    return f"eui-{dev_eui}" if DEV_EUI_RE.fullmatch(dev_eui) else "?"


class LorawanBridge:
    """DevEUI -> device, per-device session state, and the events' meaning."""

    def __init__(self, *, counters: GatewayCounters) -> None:
        self.counters = counters
        self.by_eui: dict[str, DeviceConfig] = {}
        self.sessions: dict[str, _Session] = {}

    def configure(self, devices: Iterable[DeviceConfig]) -> None:
        """Serve the enabled LoRaWAN devices of an applied config; forget the others."""
        self.by_eui = {
            d.dev_eui: d
            for d in devices
            if d.transport == "lorawan" and d.enabled and d.dev_eui is not None
        }
        served = {d.device_id for d in self.by_eui.values()}
        for device_id in set(self.sessions) - served:
            del self.sessions[device_id]

    def event(self, topic: str, payload: bytes, now_ms: int) -> LorawanResult:
        parsed = parse_chirpstack_topic(topic)
        if parsed is None:
            return Refused("bad_topic", "?", f"topic {topic[:100]!r} is not a ChirpStack event")
        _application, dev_eui, kind = parsed
        device = self.by_eui.get(dev_eui)
        if device is None:
            return Refused(
                "unknown_device",
                unknown_device_id(dev_eui),
                f"DevEUI {dev_eui[:32]!r} ({kind} event) is not in this gateway's config",
            )
        handler = {"up": self._uplink, "status": self._status, "join": self._join}.get(kind)
        if handler is None:
            return Refused(
                "bad_topic", device.device_id, f"ChirpStack event {kind[:32]!r} is not read here"
            )
        try:
            return handler(device, payload, now_ms)
        except InputError as exc:
            return Refused(exc.reason, device.device_id, f"{kind} event: {exc}")

    def _session(self, device_id: str) -> _Session:
        session = self.sessions.get(device_id)
        if session is None:
            session = self.sessions[device_id] = _Session()
        return session

    @staticmethod
    def _check_eui(device: DeviceConfig, named: str) -> None:
        # The topic routes; an event naming another device would be misfiled.
        if named and named.lower() != device.dev_eui:
            raise InvalidIdError(
                f"deviceInfo.devEui {named[:32]!r} is not the topic's {device.dev_eui}"
            )

    def _uplink(self, device: DeviceConfig, payload: bytes, now_ms: int) -> LorawanResult:
        event = decode_uplink_event(payload)
        self._check_eui(device, event.device_info.dev_eui)
        session = self._session(device.device_id)
        dev_addr = event.dev_addr.lower() if event.dev_addr else None
        frame = (dev_addr, event.f_cnt)
        dedup_id = event.deduplication_id
        if (dedup_id and dedup_id in session.dedup_ids) or frame in session.frames:
            self.counters.lorawan_repeats += 1
            return LorawanRepeat(device)
        # Remembered before its checks: a repeat of a refused frame is a
        # repeat too, not a second reject.
        if dedup_id:
            session.dedup_ids.append(dedup_id)
        session.frames.append(frame)
        values = self._checked(device, event)
        ts_ms = event_time_ms(event.time)
        ts_ms = now_ms if ts_ms is None else check_timestamp(ts_ms, now_ms, what="time")
        if dev_addr != session.dev_addr:
            session.dev_addr, session.top_f_cnt = dev_addr, None
        top = session.top_f_cnt
        if top is not None and event.f_cnt < top:
            self.counters.lorawan_out_of_order += 1
        else:
            session.top_f_cnt = event.f_cnt
        self.counters.lorawan_uplinks += 1
        return LorawanUplink(device, seq=event.f_cnt, ts_ms=ts_ms, boot=dev_addr, values=values)

    @staticmethod
    def _checked(device: DeviceConfig, event: UplinkEvent) -> dict[str, float]:
        try:
            model = current_catalog().lorawan_models[str(device.model)]
        except KeyError:
            raise InputError(f"model {device.model!r} is not in this gateway's catalog") from None
        dtype = device_type(device.device_type)
        values = uplink_metrics(event, model)
        return {name: dtype.metric(name).check(value) for name, value in values.items()}

    def _status(self, device: DeviceConfig, payload: bytes, now_ms: int) -> LorawanStatus:
        event = decode_status_event(payload)
        self._check_eui(device, event.device_info.dev_eui)
        ts_ms = event_time_ms(event.time)
        ts_ms = now_ms if ts_ms is None else check_timestamp(ts_ms, now_ms, what="time")
        values: dict[str, float] = {}
        level = event.battery_level
        dtype = device_type(device.device_type)
        if (
            level is not None
            and not event.battery_level_unavailable
            and not event.external_power_source
            and any(m.name == BATTERY_METRIC for m in dtype.metrics)
        ):
            values[BATTERY_METRIC] = dtype.metric(BATTERY_METRIC).check(level)
        self.counters.lorawan_status += 1
        session = self.sessions.get(device.device_id)
        return LorawanStatus(
            device, ts_ms=ts_ms, boot=session.dev_addr if session else None, values=values
        )

    def _join(self, device: DeviceConfig, payload: bytes, _now_ms: int) -> LorawanJoin:
        event = decode_join_event(payload)
        self._check_eui(device, event.device_info.dev_eui)
        self.counters.lorawan_joins += 1
        return LorawanJoin(device, dev_addr=(event.dev_addr or "").lower())
