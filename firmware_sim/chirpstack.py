"""A simulated ChirpStack v4 network server's MQTT integration, for the fleet's LoRaWAN devices.

The real path is radio -> LoRa gateway -> ChirpStack -> its MQTT integration
-> the site broker; cityhub's gateway reads the last hop (``gateway.lorawan``:
the bridge is part of the gateway, reading ChirpStack's events from the site
broker through its SiteLink). This module plays ChirpStack: one aiomqtt
client (ChirpStack's integration connects once) publishes, at QoS 1, the
JSON events (``contracts.chirpstack``, protobuf's JSON mapping) of every
LoRaWAN device of the fleet on
``application/{application_id}/device/{dev_eui}/event/{join|up|status}``:

- a join per device at start, and again after a re-join or a reboot, with a
  new DevAddr (the session; the frame counter starts again at 0);
- an uplink per reading at the device's ticks (the device model's values
  after the fault plan's value faults), fCnt = the model's seq in the
  session, time = the send time: Cayenne LPP bytes in ``data`` for a
  ``cayenne_lpp`` model, ChirpStack's decoded ``object`` for an ``object``
  one (values LPP cannot carry are clamped to its range and counted);
- a status event every ``STATUS_EVERY_UPLINKS`` uplinks, with the battery
  level when the model has a ``battery`` metric;
- the plan's LoRaWAN faults (``FaultPlan.lorawan_*``): an event published
  twice, a frame held back behind the next one, an undecodable payload, an
  uplink from an unknown DevEUI, a re-join.

Ledger (``firmware_sim.ledger``): each uplink PUBACKed by the site broker is
a reading handed over, seq = fCnt, ts = the event's time in ms (a repeat is
the same reading); a status event with a battery level is one too, seq 0
(the gateway's ``STATUS_SEQ``). Undecodable payloads and unknown DevEUIs are
refused by design and left out. The application id is a UUID per site,
derived from the seed.

Building the events is pure (module functions); ``ChirpStackIntegration``
owns the connection and the clock it is given.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import heapq
import logging
import random
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

import aiomqtt
import msgspec

from adapters.backoff import backoff_delay_s
from contracts.catalog import current_catalog
from contracts.chirpstack import (
    DeviceInfo,
    JoinEvent,
    StatusEvent,
    UplinkEvent,
    encode_event,
    encode_lpp,
)
from contracts.lorawanmodels import LPP_TYPES, LorawanModel
from contracts.messages import DeviceUplink
from contracts.settings import BrokerSettings
from contracts.topics import chirpstack_event_topic
from firmware_sim.faults import Emission, FaultInjector
from firmware_sim.fleet import DeviceSpec
from firmware_sim.ledger import Ledger, LedgerEntry
from firmware_sim.signals import switch_probability

logger = logging.getLogger(__name__)

# ChirpStack asks a device for its status (DevStatusReq) as often as its
# device profile says, once a day by default; every 10th uplink lets a run
# of minutes show a few.
STATUS_EVERY_UPLINKS: Final = 10
# The LoRaWAN data rate and port the simulated nodes use (AS923 DR5, SF7).
DATA_RATE: Final = 5
F_PORT: Final = 1
BATTERY_METRIC: Final = "battery"
RECONNECT_MIN_S: Final = 0.5
RECONNECT_MAX_S: Final = 10.0
# An LPP type code no catalog knows (GPS, 0x88): what an undecodable payload carries.
_UNKNOWN_LPP: Final = b"\x09\x88\x00"
_EPOCH: Final = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def _digest(*parts: object, size: int) -> bytes:
    text = "\x00".join(str(p) for p in parts)
    return hashlib.blake2b(text.encode(), digest_size=size).digest()


def application_id(seed: int, site_id: str) -> str:
    """The site's ChirpStack application: a UUID (version 4 layout) derived from the seed."""
    return str(uuid.UUID(bytes=_digest(seed, "application", site_id, size=16), version=4))


def session_dev_addr(seed: int, device_id: str, boot: str | None) -> str:
    """The DevAddr of a device's session (its boot): 8 hex digits."""
    return _digest(seed, "devaddr", device_id, boot, size=4).hex()


def stranger_eui(seed: int, device_id: str) -> str:
    """A DevEUI no gateway serves: the neighbour whose events a fault publishes."""
    return _digest(seed, "stranger", device_id, size=8).hex()


class ChirpStackCounters(msgspec.Struct, kw_only=True):
    """What the simulated integration published, and the faults it applied."""

    joins: int = 0
    uplinks: int = 0  # uplink events PUBACKed (repeats not counted)
    status: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    undecodable: int = 0
    unknown_eui: int = 0
    rejoins: int = 0  # joins of a device that had joined before (a re-join or a reboot)
    lpp_clamped: int = 0  # values LPP could not carry, sent at its limit
    publish_failures: int = 0


def _lpp_limit(name: str) -> tuple[float, float]:
    _code, size, resolution, signed = LPP_TYPES[name]
    bits = 8 * size
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    return low * resolution, high * resolution


def frame_payload(
    model: LorawanModel, metrics: Mapping[str, float]
) -> tuple[bytes, dict[str, float] | None, int]:
    """(data, object, values clamped) of an uplink carrying ``metrics`` by ``model``.

    The inverse of ``contracts.chirpstack.uplink_metrics``: raw = (value -
    offset) / scale. A Cayenne value beyond its type's range goes at the limit.
    """
    if model.codec == "object":
        obj = {
            str(f.key): (metrics[f.metric] - f.offset) / f.scale
            for f in model.fields
            if f.metric in metrics
        }
        return b"", obj, 0
    items = []
    clamped = 0
    for f in model.fields:
        if f.metric not in metrics or f.channel is None or f.lpp_type is None:
            continue
        low, high = _lpp_limit(f.lpp_type)
        raw = (metrics[f.metric] - f.offset) / f.scale
        if not low <= raw <= high:
            raw = min(max(raw, low), high)
            clamped += 1
        items.append((f.channel, f.lpp_type, raw))
    return encode_lpp(items), None, clamped


def _info(app: str, dev_eui: str, spec: DeviceSpec) -> DeviceInfo:
    return DeviceInfo(
        application_id=app,
        application_name=f"cityhub-{spec.site_id}",
        device_profile_name=str(spec.catalog_model),
        device_name=spec.device_id,
        dev_eui=dev_eui,
    )


def _event_time(ts_ms: int) -> datetime.datetime:
    """An event's time: ``ts_ms`` exactly (no float on the way)."""
    return _EPOCH + datetime.timedelta(milliseconds=ts_ms)


class _Node:
    """One LoRaWAN device as ChirpStack sees it: its session and frame counter."""

    def __init__(self, spec: DeviceSpec, model: LorawanModel, injector: FaultInjector) -> None:
        self.spec = spec
        self.model = model
        self.injector = injector
        self.boot: str | None = None
        self.dev_addr = ""
        self.uplinks = 0
        # Out of order: a frame held back, sent after the next one.
        self.held: tuple[bytes, LedgerEntry | None, DeviceUplink | None] | None = None


class ChirpStackIntegration:
    """Publishes the LoRaWAN devices' events like ChirpStack's MQTT integration."""

    def __init__(
        self,
        *,
        devices: list[DeviceSpec],
        broker: BrokerSettings,
        credentials: tuple[str | None, str | None],
        seed: int,
        injector: Callable[[DeviceSpec], FaultInjector],
        next_tick: Callable[[DeviceSpec, int], int],
        sim_now: Callable[[], int],
        sleep_until_sim: Callable[[int], Awaitable[None]],
        wall_ms: Callable[[], int],
        ledger: Ledger | None,
        sent: list[tuple[str, DeviceUplink]] | None = None,
        published: Counter[str],
    ) -> None:
        self.broker = broker
        self.credentials = credentials
        self.seed = seed
        self.next_tick = next_tick
        self.sim_now = sim_now
        self.sleep_until_sim = sleep_until_sim
        self.wall_ms = wall_ms
        self.ledger = ledger
        # Each uplink PUBACKed, as the hub stores it (seq = fCnt, ts = the event time).
        self.sent = sent
        self.published = published
        self.counters = ChirpStackCounters()
        models = current_catalog().lorawan_models
        self.nodes = [
            _Node(spec, models[str(spec.catalog_model)], injector(spec)) for spec in devices
        ]
        self.apps = {spec.site_id: application_id(seed, spec.site_id) for spec in devices}
        # The LoRaWAN faults draw from a stream of their own: the injector's
        # draws (and so the readings) are those of the same device on MQTT.
        self.rng = {
            n.spec.device_id: random.Random(_digest(seed, "lorawan", n.spec.device_id, size=8))  # noqa: S311 - simulation, not security
            for n in self.nodes
        }

    def _topic(self, node: _Node, event: str, dev_eui: str | None = None) -> str:
        spec = node.spec
        return chirpstack_event_topic(self.apps[spec.site_id], dev_eui or str(spec.dev_eui), event)

    async def run(self) -> None:
        """Connect, publish until cancelled; reconnect with backoff when the broker goes."""
        failures = 0
        username, password = self.credentials
        while True:
            try:
                async with aiomqtt.Client(
                    self.broker.host or "127.0.0.1",
                    self.broker.port,
                    identifier=f"chirpstack-{_digest(self.seed, 'client', size=4).hex()}",
                    username=username,
                    password=password,
                    protocol=aiomqtt.ProtocolVersion.V5,
                    keepalive=30,
                ) as client:
                    failures = 0
                    await self._publish_all(client)
            except aiomqtt.MqttError as exc:
                self.counters.publish_failures += 1
                failures += 1
                delay = backoff_delay_s(
                    failures,
                    min_s=RECONNECT_MIN_S,
                    max_s=RECONNECT_MAX_S,
                    draw=random.random(),  # noqa: S311 - jitter, not security
                )
                logger.warning("chirpstack: %s; reconnecting in %.1f s", exc, delay)
                await asyncio.sleep(delay)

    async def _publish_all(self, client: aiomqtt.Client) -> None:
        now = self.sim_now()
        queue = [(self.next_tick(n.spec, now), i) for i, n in enumerate(self.nodes)]
        heapq.heapify(queue)
        while queue:
            tick, index = heapq.heappop(queue)
            node = self.nodes[index]
            await self.sleep_until_sim(tick)
            self._maybe_rejoin(node, tick)
            for emission in node.injector.emit(tick):
                await self.sleep_until_sim(emission.at_ms)
                await self._frame(client, node, emission)
            heapq.heappush(queue, (self.next_tick(node.spec, tick), index))

    def _maybe_rejoin(self, node: _Node, tick: int) -> None:
        rate = node.spec.faults.lorawan_rejoin_per_h
        period_s = node.injector.period_ms / 1000
        if rate and self.rng[node.spec.device_id].random() < switch_probability(
            rate / 3600.0, period_s
        ):
            node.spec.model.reboot(tick)
            node.injector.note_reboot()

    async def _publish(self, client: aiomqtt.Client, topic: str, payload: bytes) -> None:
        try:
            await client.publish(topic, payload, qos=1)
        except aiomqtt.MqttError:
            self.counters.publish_failures += 1
            raise

    async def _frame(self, client: aiomqtt.Client, node: _Node, emission: Emission) -> None:
        spec, plan = node.spec, node.spec.faults
        rng = self.rng[spec.device_id]
        uplink = emission.uplink
        if uplink.boot != node.boot:
            # A new session: ChirpStack publishes the join before its first uplink.
            self.counters.rejoins += node.boot is not None
            node.boot = uplink.boot
            node.dev_addr = session_dev_addr(self.seed, spec.device_id, uplink.boot)
            join = JoinEvent(
                deduplication_id=str(
                    uuid.UUID(bytes=_digest(spec.device_id, node.dev_addr, size=16))
                ),
                time=_event_time(emission.at_ms),
                device_info=_info(self.apps[spec.site_id], str(spec.dev_eui), spec),
                dev_addr=node.dev_addr,
            )
            await self._publish(client, self._topic(node, "join"), encode_event(join))
            self.counters.joins += 1
        data, obj, clamped = frame_payload(node.model, uplink.metrics)
        self.counters.lpp_clamped += clamped
        undecodable = bool(
            plan.lorawan_undecodable_probability
            and rng.random() < plan.lorawan_undecodable_probability
        )
        if undecodable:
            # Cayenne: a type no catalog knows; object: the profile's codec failed.
            data, obj = (data + _UNKNOWN_LPP, None) if obj is None else (b"\x7f", None)
            self.counters.undecodable += 1
        ts_ms = emission.at_ms
        event = UplinkEvent(
            deduplication_id=str(
                uuid.UUID(bytes=_digest(spec.device_id, node.dev_addr, uplink.seq, size=16))
            ),
            time=_event_time(ts_ms),
            device_info=_info(self.apps[spec.site_id], str(spec.dev_eui), spec),
            dev_addr=node.dev_addr,
            adr=True,
            dr=DATA_RATE,
            f_cnt=uplink.seq,
            f_port=F_PORT,
            data=data,
            object=obj,
        )
        payload = encode_event(event)
        # ChirpStack's time has no device clock in it: skew tags do not apply.
        faults = tuple(f for f in emission.faults if not f.startswith("skew"))
        entry: LedgerEntry | None = LedgerEntry(
            device_id=spec.device_id,
            transport="lorawan",
            seq=uplink.seq,
            ts_ms=ts_ms,
            acked_ms=None,
            faults=faults,
        )
        reading: DeviceUplink | None = DeviceUplink(
            seq=uplink.seq, ts_ms=ts_ms, metrics=uplink.metrics, boot=node.dev_addr
        )
        if (
            not undecodable
            and node.held is None
            and plan.lorawan_out_of_order_probability
            and rng.random() < plan.lorawan_out_of_order_probability
        ):
            node.held = (payload, entry, reading)
            self.counters.out_of_order += 1
            return
        if undecodable:
            entry = reading = None
        await self._uplink(client, node, payload, entry, reading)
        if node.held is not None:
            held, node.held = node.held, None
            await self._uplink(client, node, *held)
        if plan.lorawan_unknown_eui_probability and (
            rng.random() < plan.lorawan_unknown_eui_probability
        ):
            stranger = stranger_eui(self.seed, spec.device_id)
            await self._publish(client, self._topic(node, "up", stranger), payload)
            self.counters.unknown_eui += 1
        node.uplinks += 1
        if node.uplinks % STATUS_EVERY_UPLINKS == 0:
            await self._status(client, node, ts_ms + 1, uplink.metrics)

    async def _uplink(
        self,
        client: aiomqtt.Client,
        node: _Node,
        payload: bytes,
        entry: LedgerEntry | None,
        reading: DeviceUplink | None,
    ) -> None:
        """Publish one uplink (twice, by the plan); ledger it unless it is refused by design."""
        plan = node.spec.faults
        copies = 1
        if plan.lorawan_duplicate_probability and (
            self.rng[node.spec.device_id].random() < plan.lorawan_duplicate_probability
        ):
            copies = 2
            self.counters.duplicates += 1
        topic = self._topic(node, "up")
        try:
            for _ in range(copies):
                await self._publish(client, topic, payload)
        except aiomqtt.MqttError:
            self._record(entry, acked=False)
            raise
        self._record(entry, acked=True)
        if self.sent is not None and reading is not None:
            self.sent.append((node.spec.device_id, reading))
        self.counters.uplinks += 1
        self.published[node.spec.device_type] += 1

    async def _status(
        self, client: aiomqtt.Client, node: _Node, ts_ms: int, metrics: Mapping[str, float]
    ) -> None:
        spec = node.spec
        battery = metrics.get(BATTERY_METRIC)
        if not battery:
            # ChirpStack never reports 0 %: DevStatusAns's 0 means external power.
            battery = None
        event = StatusEvent(
            deduplication_id=str(
                uuid.UUID(bytes=_digest(spec.device_id, "status", ts_ms, size=16))
            ),
            time=_event_time(ts_ms),
            device_info=_info(self.apps[spec.site_id], str(spec.dev_eui), spec),
            margin=7,
            battery_level=battery,
            battery_level_unavailable=battery is None,
        )
        entry = (
            LedgerEntry(
                device_id=spec.device_id, transport="lorawan", seq=0, ts_ms=ts_ms, acked_ms=None
            )
            if battery is not None
            else None
        )
        try:
            await self._publish(client, self._topic(node, "status"), encode_event(event))
        except aiomqtt.MqttError:
            self._record(entry, acked=False)
            raise
        self._record(entry, acked=True)
        self.counters.status += 1

    def _record(self, entry: LedgerEntry | None, *, acked: bool) -> None:
        if self.ledger is None or entry is None:
            return
        if acked:
            entry = msgspec.structs.replace(entry, acked_ms=self.wall_ms())
        self.ledger.add(entry)
