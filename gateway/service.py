"""The site gateway service: devices in, durable outbox, batches up, acks back.

Wiring (DESIGN.md sections 1, 3, 4):

- site broker (``SiteLink``): ``d/{id}/up`` and ``d/{id}/status`` of each
  configured MQTT device, handed over a socket read at a time on the event
  loop: topic -> configured device -> rate limit -> decode and check against
  the catalog -> tracking -> ``BatchBuilder``, which is cut into a batch at
  ``batch_max_rows``;
- serial ports (``SerialSource``): PMS5003 / SDS011 frames -> the same path;
- ``flusher`` task: writes cut (or, past ``batch_max_ms``, due) batches to the
  ``Outbox`` (fsynced, in a worker thread), then acknowledges the device
  messages they hold to the site broker: a message the gateway has not yet
  stored stays in its persistent session there and comes again after a crash.
  A full outbox under the ``refuse`` policy is backpressure: the batches it
  cannot take wait, their messages unacknowledged, until acks make room
  (serial readings, which cannot wait, are refused and counted meanwhile);
- ``sender`` task: publishes due outbox batches (new, or unacked past
  ``ack_timeout_s``) at QoS 1 to the central broker, at most
  ``max_inflight_batches`` without PUBACK; a PUBACK reason code >= 0x80
  keeps the batch and is counted;
- ack and config messages from the central broker: acks delete batches from
  the outbox; a newer config replaces the device list live;
- ``state`` task: the retained birth/state message (its Will is the death);
- ``expiry`` task: devices silent past ``no_data_timeout_s`` go offline.

Bad device input is never a crash: it is a WARNING (rate-limited), a counter
by reason, and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from adapters.loglimit import LogLimiter
from adapters.mqtt import MqttLink, Will, client_ssl_context
from adapters.serve import serve as run_service
from contracts.catalog import device_type
from contracts.errors import HubError, InputError, OutboxFullError
from contracts.messages import (
    Ack,
    Batch,
    DeviceConfig,
    GatewayConfig,
    GatewayState,
    GatewayStatus,
    decode_ack,
    decode_device_status,
    decode_device_uplink,
    decode_gateway_config,
    encode_batch,
    encode_gateway_config,
    encode_gateway_state,
)
from contracts.mqttcodec import Publish, TooLarge
from contracts.settings import BrokerSettings, GatewaySettings
from contracts.topics import (
    ack_topic,
    batch_topic,
    config_topic,
    device_status_topic,
    device_uplink_topic,
    parse_device_topic,
    state_topic,
)
from gateway.batching import BatchBuilder
from gateway.outbox import Outbox
from gateway.ratelimit import TokenBuckets
from gateway.sitelink import SITE_MAX_PACKET_BYTES, SiteLink
from gateway.tracking import DeviceTracker

logger = logging.getLogger(__name__)

VERSION = "0.1.0"
CONFIG_DOCUMENT = "gateway_config"
# How often the flusher looks at the builder: well under batch_max_ms so a
# batch leaves at most ~10% later than its age limit.
FLUSH_TICK_S = 0.02
# Log at most this many WARNINGs per reject reason per minute; counters keep the rest.
REJECT_LOG_PER_MINUTE = 5
# Maximum Packet Size the uplink announces in CONNECT: the broker discards
# (MQTT 5.0 section 3.1.2.11.4) any packet longer than this instead of sending
# it. What the uplink reads, acks and configs, is refused past contracts'
# CONTROL_MAX_BYTES (1 MiB) when decoded; 64 KiB more leaves room for the
# topic and properties, so only what would be refused anyway is dropped, and
# never read into memory (paho buffers a whole packet before handing it over).
UPLINK_MAX_PACKET_BYTES = 1024 * 1024 + 64 * 1024
# Batches the uplink may have in flight without a PUBACK, as far as paho is
# concerned: max_inflight_batches bounds them first.
UPLINK_MAX_INFLIGHT = 1000


def outbox_path(settings: GatewaySettings, state_dir: Path) -> Path:
    """gateway.outbox_path, else {state_dir}/gateway-{id}/outbox.sqlite3."""
    if settings.outbox_path:
        return Path(settings.outbox_path)
    return state_dir / f"gateway-{settings.gateway_id}" / "outbox.sqlite3"


async def serve(gateway: Gateway) -> None:
    """Run until SIGINT or SIGTERM, then stop cleanly (flush, death message)."""
    await run_service(gateway.run)


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class GatewayCounters:
    """Monotonic counters for the state message and /metrics."""

    received: int = 0
    accepted: int = 0
    rate_limited: int = 0
    rejects: Counter[str] = field(default_factory=Counter)
    # (device, reason) for configured devices; other ids count as "other", so
    # a stream of made-up ids cannot grow it without bound.
    device_rejects: Counter[tuple[str, str]] = field(default_factory=Counter)
    seq_gaps: int = 0
    duplicates: int = 0
    reboots: int = 0
    serial_frames: int = 0
    serial_checksum_errors: int = 0
    serial_length_errors: int = 0
    serial_garbage_bytes: int = 0
    serial_reconnects: int = 0
    batches_stored: int = 0
    readings_stored: int = 0
    batches_published: int = 0
    batches_resent: int = 0
    puback_refused: int = 0
    batches_acked: int = 0
    readings_acked: int = 0
    outbox_refused_readings: int = 0
    outbox_dropped_readings: int = 0
    configs_applied: int = 0


class Gateway:
    def __init__(
        self,
        *,
        settings: GatewaySettings,
        central: BrokerSettings,
        site: BrokerSettings,
        outbox_path: Path,
        clock: Callable[[], int] = wall_ms,
    ) -> None:
        if not settings.gateway_id:
            raise HubError("gateway.gateway_id is not set")
        self.settings = settings
        self.gateway_id = settings.gateway_id
        self.prefix = settings.topic_prefix
        self.clock = clock
        self.boot_id = secrets.token_hex(8)
        self.counters = GatewayCounters()
        self.outbox = Outbox(
            outbox_path,
            max_bytes=settings.outbox_max_bytes,
            full_policy=settings.outbox_full_policy,
        )
        self.birth = self.outbox.next_birth()
        self.connected_ms = clock()
        # One lock guards builder, buckets, tracker and the device map: the
        # site network thread, serial tasks and the flusher all touch them.
        self.lock = threading.Lock()
        self.builder = BatchBuilder(
            gateway_id=self.gateway_id,
            boot_id=self.boot_id,
            max_rows=settings.batch_max_rows,
            max_age_ms=settings.batch_max_ms,
        )
        self.buckets = TokenBuckets(
            default_rate_per_s=settings.device_rate_per_s, burst=settings.device_burst
        )
        self.tracker = DeviceTracker()
        self.config: GatewayConfig | None = None
        self.devices: dict[str, DeviceConfig] = {}
        self.serial_seq: dict[str, int] = {}
        self._inflight: dict[int, str] = {}
        # topic -> (device, is the status topic), for enabled MQTT devices.
        self._site_routes: dict[str, tuple[DeviceConfig, bool]] = {}
        # Packet ids of site messages handled but not yet acknowledged, and the
        # connection they arrived on; batches cut from the builder wait in
        # _ready with the acks they release, until the flusher stores them.
        # Under the refuse policy a full outbox keeps them there (and their
        # device messages unacknowledged) until acks from ingest make room.
        self._site_acks: list[int] = []
        self._acks_generation = 0
        self._ready: list[tuple[Batch | None, list[int], int]] = []
        # Cut a batch early when this many messages wait for their ack, so the
        # broker's in-flight window (Receive Maximum) never runs dry.
        self._ack_threshold = max(1, settings.site_receive_maximum // 2)
        # Since when (ms) the outbox has been too full to take the next ready
        # batch, and the serial readings refused since; None: not full.
        self._outbox_full_since_ms: int | None = None
        self._refused_this_episode = 0
        self._site_started = False
        self._site_task: asyncio.Task[None] | None = None
        self._flush_now: asyncio.Event | None = None
        self._reject_log = LogLimiter(limit=REJECT_LOG_PER_MINUTE, span=60_000)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake_sender: asyncio.Event | None = None
        self._config_changed: asyncio.Event | None = None
        self.central = MqttLink(
            name="uplink",
            host=central.host or "127.0.0.1",
            port=central.port,
            client_id=f"gw-{self.gateway_id}",
            username=central.username,
            password=central.password,
            tls=central.tls,
            ca_file=central.ca_file,
            cert_file=central.cert_file,
            key_file=central.key_file,
            will=Will(
                state_topic(self.gateway_id, self.prefix),
                self._state_payload("offline", will=True),
            ),
            subscriptions=[
                ack_topic(self.gateway_id, self.prefix),
                config_topic(self.gateway_id, self.prefix),
            ],
            max_packet_bytes=UPLINK_MAX_PACKET_BYTES,
            max_inflight=UPLINK_MAX_INFLIGHT,
            on_message=lambda message: self._on_central_message(
                message.topic, bytes(message.payload)
            ),
            on_connect=self._on_central_connect,
            on_disconnect=self._on_central_disconnect,
            on_publish=self._on_puback,
        )
        self.site = SiteLink(
            host=site.host or "127.0.0.1",
            port=site.port,
            client_id=f"gw-{self.gateway_id}-site",
            username=site.username,
            password=site.password,
            ssl_context=client_ssl_context(
                "site", ca_file=site.ca_file, cert_file=site.cert_file, key_file=site.key_file
            )
            if site.tls
            else None,
            session_expiry_s=settings.site_session_expiry_s,
            receive_maximum=settings.site_receive_maximum,
            on_messages=self._on_site_messages,
            on_connect=self._on_site_connect,
            on_subscribed=self.publish_state,
            on_refused=self._on_site_refused,
            on_too_large=self._on_site_too_large,
        )
        saved = self.outbox.load_document(CONFIG_DOCUMENT)
        if saved is not None:
            try:
                self.apply_config(decode_gateway_config(saved), persist=False)
            except InputError as exc:
                logger.warning("saved config unreadable, waiting for a new one: %s", exc)

    # -- state -----------------------------------------------------------------

    def _state_payload(
        self, status: GatewayStatus, readings_per_s: float = 0.0, *, will: bool = False
    ) -> bytes:
        depth = self.outbox.depth()
        c = self.counters
        return encode_gateway_state(
            GatewayState(
                gateway_id=self.gateway_id,
                status=status,
                birth=self.birth,
                boot_id=self.boot_id,
                version=VERSION,
                outbox_depth=depth.batches,
                ts_ms=self.clock(),
                outbox_readings=depth.readings,
                readings_per_s=round(readings_per_s, 1),
                received=c.received,
                accepted=c.accepted,
                rejected=sum(c.rejects.values()),
                rate_limited=c.rate_limited,
                serial_errors=c.serial_checksum_errors + c.serial_length_errors,
                devices_online=self.tracker.online_count(),
                batches_resent=c.batches_resent,
                puback_refused=c.puback_refused,
                # The Will (offline) is built before the site link exists.
                site_ready=status == "online" and self.site_ready(),
                will=will,
            )
        )

    def site_ready(self) -> bool:
        """Connected to the site broker, subscribed, and every subscription asked for answered."""
        site = self.site
        return (
            site.connected.is_set()
            and bool(site.granted_topics())
            and not site.subscriptions_pending()
        )

    def served_devices(self) -> set[str]:
        """MQTT devices whose uplink and status subscriptions the site broker has granted.

        A device is served only from then on: a message it publishes earlier
        reaches no subscription and no session, and is lost at the broker.
        """
        granted = self.site.granted_topics()
        with self.lock:
            routes = list(self._site_routes.items())
        topics_of: dict[str, int] = {}
        for topic, (device, _is_status) in routes:
            if topic in granted:
                topics_of[device.device_id] = topics_of.get(device.device_id, 0) + 1
        return {device_id for device_id, n in topics_of.items() if n == 2}

    def publish_state(self, readings_per_s: float = 0.0) -> None:
        if self.central.connected.is_set():
            self.central.publish(
                state_topic(self.gateway_id, self.prefix),
                self._state_payload("online", readings_per_s),
                retain=True,
            )

    # -- rejects -----------------------------------------------------------------

    def _reject(self, reason: str, device_id: str, detail: str) -> None:
        self.counters.rejects[reason] += 1
        known = device_id if device_id in self.devices else "other"
        self.counters.device_rejects[known, reason] += 1
        if self._reject_log.allow(reason, self.clock()):
            logger.warning("rejected reading from %s (%s): %s", device_id, reason, detail)

    # -- site side (event loop thread) --------------------------------------------

    def _device_topics(self, device_ids: set[str]) -> list[str]:
        topics = []
        for device_id in sorted(device_ids):
            topics.append(device_uplink_topic(device_id, self.prefix))
            topics.append(device_status_topic(device_id, self.prefix))
        return topics

    def _mqtt_device_ids(self) -> set[str]:
        return {d.device_id for d in self.devices.values() if d.transport == "mqtt"}

    def _on_site_connect(self) -> None:
        # One subscription per configured device, not d/+/up: sites may share a
        # broker, and a gateway must not see (or reject) its neighbours' devices.
        with self.lock:
            ids = self._mqtt_device_ids()
        self.site.subscribe(self._device_topics(ids))

    def _on_site_refused(self, refused: list[tuple[str, int]]) -> None:
        """A SUBACK refused some topics (event loop): log them by device."""
        for topic, code in refused:
            try:
                device_id, _kind = parse_device_topic(topic, self.prefix)
            except InputError:
                device_id = "?"
            logger.warning(
                "site broker refused the subscription %s of device %s: reason code 0x%02x",
                topic,
                device_id,
                code,
            )

    def _on_site_too_large(self, message: TooLarge) -> None:
        """A device message over the site link's limit, skipped unread (event loop).

        It is counted as a reject and acknowledged with the next batch like
        any other refused message; unacknowledged, the broker would send it
        again after every reconnect and hold up everything behind it.
        """
        generation = self.site.generation
        route = self._site_routes.get(message.topic)
        if route is not None:
            device_id = route[0].device_id
        else:
            try:
                device_id, _kind = parse_device_topic(message.topic, self.prefix)
            except InputError:
                device_id = "?"
        with self.lock:
            if generation != self._acks_generation:
                self._site_acks = []
                self._acks_generation = generation
            self.counters.received += 1
            if message.qos:
                self._site_acks.append(message.packet_id)
            self._reject(
                "too_large",
                device_id,
                f"{message.size_bytes} bytes on {message.topic[:100]!r}, "
                f"over the limit of {SITE_MAX_PACKET_BYTES}",
            )
        if self._flush_now is not None:
            self._flush_now.set()

    def _on_site_messages(self, publishes: list[Publish]) -> None:
        """Messages of one socket read, in order, on the event loop."""
        now = self.clock()
        generation = self.site.generation
        with self.lock:
            if generation != self._acks_generation:
                # Unacknowledged messages of a lost connection come again on
                # the new one; their packet ids mean nothing there.
                self._site_acks = []
                self._acks_generation = generation
            acks = self._site_acks
            max_rows = self.builder.max_rows
            self.counters.received += len(publishes)
            for topic, payload, qos, packet_id, _retain in publishes:
                if qos:
                    acks.append(packet_id)
                self._handle_site_message(topic, payload, now)
                if self.builder.rows >= max_rows or len(acks) >= self._ack_threshold:
                    self._cut(now)
                    acks = self._site_acks
            ready = bool(self._ready)
        if ready and self._flush_now is not None:
            self._flush_now.set()

    def _handle_site_message(self, topic: str, payload: bytes, now: int) -> None:
        """One device message (lock held): reject, count or add it to the builder."""
        route = self._site_routes.get(topic)
        if route is None:
            try:
                device_id, _kind = parse_device_topic(topic, self.prefix)
            except InputError as exc:
                self._reject(exc.reason, "?", str(exc))
                return
            self._reject("unknown_device", device_id, "not in this gateway's config")
            return
        device, is_status = route
        device_id = device.device_id
        if is_status:
            try:
                online = decode_device_status(payload) == "online"
            except InputError as exc:
                self._reject(exc.reason, device_id, str(exc))
                return
            if self.tracker.set_status(device_id, online=online, now_ms=now):
                logger.info("device %s is %s", device_id, "online" if online else "offline")
            return
        if not self.buckets.allow(device_id, now):
            self.counters.rate_limited += 1
            return
        try:
            uplink = decode_device_uplink(payload, device_type=device.device_type, now_ms=now)
        except InputError as exc:
            self._reject(exc.reason, device_id, str(exc))
            return
        self._accept(
            device,
            seq=uplink.seq,
            ts_ms=uplink.ts_ms,
            recv_ms=now,
            values=uplink.metrics,
            boot=uplink.boot,
        )

    def _cut(self, now: int) -> None:
        """Move the builder's rows and the acks they release to the flusher (lock held)."""
        batch = self.builder.take(now)
        if batch is not None or self._site_acks:
            self._ready.append((batch, self._site_acks, self._acks_generation))
            self._site_acks = []

    def _accept(
        self,
        device: DeviceConfig,
        *,
        seq: int,
        ts_ms: int,
        recv_ms: int,
        values: dict[str, float],
        boot: str | None,
    ) -> None:
        """Track and add one checked reading (lock held)."""
        obs = self.tracker.observe(device.device_id, seq=seq, boot=boot, now_ms=recv_ms)
        self.counters.seq_gaps += obs.gap
        self.counters.duplicates += obs.duplicate
        self.counters.reboots += obs.reboot
        # Duplicates still go up: ingest's unique key drops them, and the
        # seq alone cannot prove a repeat without a boot id.
        self.builder.add(
            device_id=device.device_id,
            device_type=device.device_type,
            seq=seq,
            ts_ms=ts_ms,
            recv_ms=recv_ms,
            values=values,
            boot=boot,
        )
        self.counters.accepted += 1

    def accept_serial_reading(self, device: DeviceConfig, values: dict[str, float]) -> None:
        """A decoded serial frame: seq and time are the gateway's (sensors have neither)."""
        now = self.clock()
        self.counters.received += 1
        dtype = device_type(device.device_type)
        try:
            checked = {name: dtype.metric(name).check(v) for name, v in values.items()}
        except InputError as exc:
            self._reject(exc.reason, device.device_id, str(exc))
            return
        with self.lock:
            if self._outbox_full_since_ms is not None:
                # A sensor cannot be asked to send again later: while the
                # outbox is full its readings are refused and counted.
                self.counters.outbox_refused_readings += 1
                self._refused_this_episode += 1
                return
            if not self.buckets.allow(device.device_id, now):
                self.counters.rate_limited += 1
                return
            seq = self.serial_seq.get(device.device_id, 0)
            self.serial_seq[device.device_id] = seq + 1
            self._accept(device, seq=seq, ts_ms=now, recv_ms=now, values=checked, boot=self.boot_id)
            if self.builder.rows >= self.builder.max_rows:
                self._cut(now)

    # -- central side (paho network thread) ---------------------------------------

    def _on_central_connect(self) -> None:
        self.connected_ms = self.clock()
        # Everything unacked is due again: what was in flight may be lost.
        self.outbox.reset_sent()
        self._inflight.clear()
        logger.info("uplink: connected to %s:%d", self.central.host, self.central.port)
        self.publish_state()
        self._wake()

    def _on_central_disconnect(self) -> None:
        self._inflight.clear()

    def _on_puback(self, mid: int, reason_code: int) -> None:
        batch_id = self._inflight.pop(mid, None)
        if batch_id is None:
            return
        if reason_code >= 0x80:
            # The batch stays in the outbox and is resent after ack_timeout_s.
            self.counters.puback_refused += 1
            logger.warning("broker refused batch %s: reason code 0x%02x", batch_id, reason_code)
        self._wake()

    def _on_central_message(self, topic: str, payload: bytes) -> None:
        if topic == ack_topic(self.gateway_id, self.prefix):
            try:
                ack: Ack = decode_ack(payload, gateway_id=self.gateway_id)
            except InputError as exc:
                logger.warning("malformed ack ignored: %s", exc)
                return
            acked = self.outbox.ack(ack.batch_ids, ack.digests)
            self.counters.batches_acked += acked.removed_batches
            self.counters.readings_acked += acked.removed_readings
            if acked.mismatched:
                # A refused or spoofed payload under a held batch id, or an
                # ingest that sends no digests: the held batches stay.
                logger.warning(
                    "ack names %d held batch ids with another payload%s: kept",
                    acked.mismatched,
                    "" if ack.digests else " (no digests: upgrade ingest first)",
                )
            self._wake()
        elif topic == config_topic(self.gateway_id, self.prefix):
            if not payload:
                return  # a cleared retained config
            try:
                config = decode_gateway_config(payload)
            except InputError as exc:
                logger.warning("malformed config ignored: %s", exc)
                return
            self.apply_config(config)

    def apply_config(self, config: GatewayConfig, *, persist: bool = True) -> None:
        """Replace the device list live; an older or foreign config is ignored.

        The applied config is kept in the outbox file, so a restarted gateway
        serves its devices before (or without) the central broker.
        """
        if config.gateway_id != self.gateway_id:
            logger.warning("config for gateway %s ignored", config.gateway_id)
            return
        if self.config is not None and config.version <= self.config.version:
            return
        with self.lock:
            removed = set(self.devices) - {d.device_id for d in config.devices}
            before = self._mqtt_device_ids()
            self.devices = {d.device_id: d for d in config.devices}
            after = self._mqtt_device_ids()
            for device_id in removed:
                self.buckets.forget(device_id)
                self.tracker.forget(device_id)
            for device in config.devices:
                self.buckets.set_rate(device.device_id, device.rate_limit_per_s)
            self._site_routes = self._routes(config.devices)
            self.config = config
            self.counters.configs_applied += 1
        if persist:
            self.outbox.save_document(CONFIG_DOCUMENT, encode_gateway_config(config))
        if self.site.connected.is_set():
            self.site.unsubscribe(self._device_topics(before - after))
            self.site.subscribe(self._device_topics(after - before))
        logger.info(
            "config version %d applied: %d devices (%d removed)",
            config.version,
            len(config.devices),
            len(removed),
        )
        if self._loop is not None and self._config_changed is not None:
            self._loop.call_soon_threadsafe(self._config_changed.set)
        self._start_site()

    def _routes(self, devices: list[DeviceConfig]) -> dict[str, tuple[DeviceConfig, bool]]:
        routes: dict[str, tuple[DeviceConfig, bool]] = {}
        for device in devices:
            if device.transport == "mqtt" and device.enabled:
                routes[device_uplink_topic(device.device_id, self.prefix)] = (device, False)
                routes[device_status_topic(device.device_id, self.prefix)] = (device, True)
        return routes

    def _start_site(self) -> None:
        """Connect to the site broker once a config says which devices are ours.

        Until then the broker keeps the devices' messages in the gateway's
        persistent session instead of the gateway refusing them as unknown.
        """
        with self.lock:
            if self._site_started or self.config is None or self._loop is None:
                return
            self._site_started = True
            loop = self._loop
        loop.call_soon_threadsafe(self._spawn_site)

    def _spawn_site(self) -> None:
        self._site_task = asyncio.get_running_loop().create_task(self.site.run(), name="site-link")

    def _wake(self) -> None:
        if self._loop is not None and self._wake_sender is not None:
            self._loop.call_soon_threadsafe(self._wake_sender.set)

    # -- tasks ---------------------------------------------------------------------

    async def _flusher(self, flush_now: asyncio.Event) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FLUSH_TICK_S):
                    await flush_now.wait()
            flush_now.clear()
            await self.flush(force=False)

    async def flush(self, *, force: bool) -> None:
        """Store cut (or due, or with force any) batches, then ack their device messages.

        Ready batches are stored oldest first. Under the ``refuse`` policy the
        first one the outbox cannot take, and every one after it, stays ready
        with its device messages unacknowledged: the site broker keeps those
        in the gateway's session (at most ``site_receive_maximum`` of them in
        flight) and stops sending more. They are stored when acks from
        ingest make room; nothing a device was acknowledged for is lost.
        """
        now = self.clock()
        with self.lock:
            if force or self.builder.due(now) or (self._site_acks and not self.builder.rows):
                self._cut(now)
            ready, self._ready = self._ready, []
        if not ready:
            return
        done, held, items = self._fitting(ready)
        if items:
            try:
                await self._store(items, now)
            except OutboxFullError:
                done, held = [], ready  # cannot happen with one writer; hold all
        if held:
            with self.lock:
                self._ready[:0] = held
        self._outbox_episode(full=bool(held), held=held, now=now)
        for _batch, acks, generation in done:
            # Rejected device messages are acknowledged with the batch cut
            # after them: they are counted, and holding them would stall the
            # site broker's in-flight window.
            self.site.ack(generation, acks)

    def _fitting(
        self, ready: list[tuple[Batch | None, list[int], int]]
    ) -> tuple[
        list[tuple[Batch | None, list[int], int]],
        list[tuple[Batch | None, list[int], int]],
        list[tuple[str, bytes, int]],
    ]:
        """Split ``ready`` into the leading entries the outbox takes now and the rest."""
        outbox = self.outbox
        refuse = outbox.full_policy == "refuse"
        items: list[tuple[str, bytes, int]] = []
        incoming = 0
        for i, (batch, _acks, _generation) in enumerate(ready):
            if batch is None:
                continue
            payload = encode_batch(batch)
            rows = sum(b.row_count for b in batch.blocks)
            if refuse and not outbox.fits(incoming + len(payload)):
                if items or outbox.depth().batches:
                    return ready[:i], ready[i:], items
                # Larger than the whole outbox: it can never fit, and holding
                # it would stop the site for good. Refused and counted.
                self.counters.outbox_refused_readings += rows
                logger.error(
                    "batch %s of %d bytes exceeds the whole outbox (%d bytes): "
                    "%d readings refused; raise gateway.outbox_max_bytes",
                    batch.batch_id,
                    len(payload),
                    outbox.max_bytes,
                    rows,
                )
                continue
            items.append((batch.batch_id, payload, rows))
            incoming += len(payload)
        return ready, [], items

    def _outbox_episode(
        self, *, full: bool, held: list[tuple[Batch | None, list[int], int]], now: int
    ) -> None:
        """Log a full outbox once when it starts (WARNING) and once when it ends (INFO)."""
        since = self._outbox_full_since_ms
        if full and since is None:
            self._outbox_full_since_ms = now
            depth = self.outbox.depth()
            logger.warning(
                "outbox full (%d of %d bytes): holding %d device messages unacknowledged "
                "at the site broker and refusing serial readings until ingest's acks make room",
                depth.bytes,
                self.outbox.max_bytes,
                sum(len(acks) for _b, acks, _g in held),
            )
        elif not full and since is not None:
            with self.lock:
                self._outbox_full_since_ms = None
                refused, self._refused_this_episode = self._refused_this_episode, 0
            logger.info(
                "outbox has room again after %.1f s: held device messages stored and "
                "acknowledged; %d serial readings were refused meanwhile",
                (now - since) / 1000,
                refused,
            )

    async def _store(self, items: list[tuple[str, bytes, int]], now: int) -> None:
        """Put batches into the outbox in one fsynced transaction."""
        result = await asyncio.to_thread(self.outbox.put, items, now)
        self.counters.batches_stored += result.stored_batches
        if result.dropped_readings:
            self.counters.outbox_dropped_readings += result.dropped_readings
            logger.warning(
                "outbox full: dropped the %d oldest readings (%d batches)",
                result.dropped_readings,
                result.dropped_batches,
            )
        self.counters.readings_stored += sum(rows for _, _, rows in items)
        self._wake()

    async def _sender(self, wake: asyncio.Event) -> None:
        resend_after_ms = int(self.settings.ack_timeout_s * 1000)
        topic = batch_topic(self.gateway_id, self.prefix)
        while True:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow the
            # task group's cancellation when the event fires at the same time.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await wake.wait()
            wake.clear()
            if not self.central.connected.is_set():
                continue
            room = self.settings.max_inflight_batches - len(self._inflight)
            if room <= 0:
                continue
            items = await asyncio.to_thread(
                self.outbox.due, self.clock(), resend_after_ms=resend_after_ms, limit=room
            )
            if not items:
                continue
            sent = []
            for item in items:
                if not self.central.connected.is_set():
                    break
                mid = self.central.publish(topic, item.payload, qos=1)
                self._inflight[mid] = item.batch_id
                sent.append(item.batch_id)
                self.counters.batches_published += 1
                self.counters.batches_resent += item.attempts > 0
            await asyncio.to_thread(self.outbox.mark_sent, sent, self.clock())
            if len(items) == room:
                wake.set()

    async def _state(self) -> None:
        last_ms, last_accepted = self.clock(), self.counters.accepted
        while True:
            await asyncio.sleep(self.settings.state_interval_s)
            now, accepted = self.clock(), self.counters.accepted
            rate = (accepted - last_accepted) * 1000 / max(1, now - last_ms)
            last_ms, last_accepted = now, accepted
            self.publish_state(rate)

    async def _expiry(self) -> None:
        timeout_ms = int(self.settings.no_data_timeout_s * 1000)
        while True:
            await asyncio.sleep(1.0)
            with self.lock:
                gone = self.tracker.expire(self.clock(), timeout_ms=timeout_ms)
            for device_id in gone:
                logger.info("device %s offline: no data for %.0f s", device_id, timeout_ms / 1000)

    async def _serial(self, changed: asyncio.Event) -> None:
        """Keep one reader task per configured serial device, following config changes."""
        tasks: dict[str, tuple[DeviceConfig, asyncio.Task[None]]] = {}
        async with asyncio.TaskGroup() as group:
            while True:
                wanted = {
                    d.device_id: d
                    for d in self.devices.values()
                    if d.transport == "serial" and d.enabled
                }
                for device_id, (device, task) in list(tasks.items()):
                    if wanted.get(device_id) != device:
                        task.cancel()
                        del tasks[device_id]
                for device_id, device in wanted.items():
                    if device_id not in tasks:
                        # Imported on first use: a site without serial sensors
                        # needs neither pyserial nor the frame codecs.
                        from gateway.serialport import SerialSource

                        source = SerialSource(device=device, gateway=self)
                        tasks[device_id] = (
                            device,
                            group.create_task(source.run(), name=f"serial[{device.port}]"),
                        )
                await changed.wait()
                changed.clear()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set (or cancelled); flush the builder on the way out."""
        self._loop = asyncio.get_running_loop()
        self._wake_sender = wake = asyncio.Event()
        self._config_changed = changed = asyncio.Event()
        self._flush_now = flush_now = asyncio.Event()
        logger.info(
            "gateway %s starting: boot %s, birth %d, outbox %d readings",
            self.gateway_id,
            self.boot_id,
            self.birth,
            self.outbox.depth().readings,
        )
        # The metrics port first: a port that cannot be bound is a settings
        # error, raised before any broker connection (and so any birth or Will).
        metrics_server = None
        if self.settings.metrics_port:
            from gateway.metrics import serve_metrics

            metrics_server = serve_metrics(self, self.settings.metrics_port)
        self.central.start()
        self._start_site()
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._flusher(flush_now), name="flusher")
                group.create_task(self._sender(wake), name="sender")
                group.create_task(self._state(), name="state")
                group.create_task(self._expiry(), name="expiry")
                group.create_task(self._serial(changed), name="serial")
                if stop is not None:
                    group.create_task(_raise_on(stop), name="stop")
        except* _Stop:
            pass
        finally:
            # Store what the builder holds and acknowledge it while the site
            # link is still up; then leave the site session cleanly.
            await self.flush(force=True)
            await self._stop_site()
            self.central.publish(
                state_topic(self.gateway_id, self.prefix),
                self._state_payload("offline"),
                retain=True,
            )
            self.central.stop()
            if metrics_server is not None:
                metrics_server.close()
            self.outbox.close()
            logger.info("gateway %s stopped", self.gateway_id)

    async def _stop_site(self) -> None:
        self.site.stop()
        task = self._site_task
        if task is None:
            return
        try:
            async with asyncio.timeout(2.0):
                await asyncio.shield(task)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _raise_on(stop: asyncio.Event) -> None:
    await stop.wait()
    raise _Stop


class _Stop(Exception):  # noqa: N818 - a control-flow signal for the task group, not an error
    """Raised inside the task group to end it when the stop event fires."""
