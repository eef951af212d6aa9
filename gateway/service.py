"""The site gateway service: devices in, durable outbox, batches up, acks back.

Wiring (docs/architecture.md, sections 1, 3 and 5):

- site broker (``SiteLink``): ``d/{id}/up`` and ``d/{id}/status`` of each
  configured MQTT device, handed over a socket read at a time on the event
  loop: topic -> configured device -> decode and check against the catalog
  -> rate limit (``gateway.ratelimit``: a backlog by its readings'
  timestamps) -> tracking -> ``BatchBuilder``, which is cut into a batch at
  ``batch_max_rows``;
- serial ports (``SerialSource``): PMS5003 / SDS011 frames -> the same path;
- LoRaWAN devices: ChirpStack's MQTT integration publishes their events on
  the same site broker; the site link subscribes each configured DevEUI's
  (``gateway.lorawan``: the bridge is part of the gateway) and they take
  the MQTT devices' path, fCnt as seq and the session's DevAddr as boot;
- Modbus buses (``gateway.modbuspoller.BusPoller``, one task per port): each
  slave polled at its interval, its registers decoded -> the same path;
- HTTP devices (``gateway.httpserver``, when ``http_port`` is set): POSTed
  uplinks -> the same path, each request answered once the flusher has
  stored its readings;
- ``flusher`` task: writes cut batches, and what the builder holds as soon
  as the socket reads before it are handled (``batch_max_rows`` and
  ``batch_max_ms`` only cap a batch under load, when readings pile up during
  the previous fsync), to the
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
- ack and config messages from the central broker, handed from paho's
  network thread to the event loop (``uplink-inbox`` task), so the outbox is
  written by the event loop's worker threads only: acks delete batches from
  the outbox; a newer config replaces the device list live, after the
  device types it carries are installed (a type defined after the gateway
  was installed needs no upgrade);
- ``state`` task: the retained birth/state message (its Will is the death),
  each periodic one carrying the rejects counted since the previous one and
  the outbox file's totals of readings refused and dropped while it was full
  (the flusher adds each refusal to the file, so they survive restarts);
- ``expiry`` task: devices silent past their type's ``offline_after_s`` (or
  ``no_data_timeout_s`` when set) go offline;
- ``commands`` and ``command-reports`` tasks (``gateway.downlink``): commands
  from the central broker's command topic are held in the outbox file,
  published to their MQTT devices when online (each device's answers come on
  ``d/{id}/res``, routed off the reading path by topic), and the states they
  reach reported back until ingest's acks name them;
- ``watchdog`` task, under systemd (``adapters.sdnotify``; READY=1 once the
  outbox is open and the links started, STOPPING=1 at the end): WATCHDOG=1
  every half ``WATCHDOG_USEC``, each only after the outbox's write lock was
  taken and let go in time, from the event loop itself, so a blocked loop
  or a stuck outbox stops the pings and systemd restarts the gateway.

The decisions are the pure ``gateway.routing.Router`` (routing, per-device
state, ack generations, the ready queue) and ``gateway.configdiff`` (what a
new config changes); this shell does the I/O around them and logs.

Bad device input is never a crash: it is a WARNING (rate-limited), a counter
by reason, and dropped. Readings over a device's rate are dropped, counted
(in total and per device) and logged: a WARNING at a device's first drop,
then at most one a minute with the number dropped since the last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import msgspec

from adapters.loglimit import DropTally, LogLimiter
from adapters.mqtt import MqttLink, Will, client_ssl_context
from adapters.sdnotify import Notifier
from adapters.serve import serve as run_service
from contracts.catalog import current_catalog, merge_models, merge_types, use_catalog
from contracts.errors import HubError, InputError, OutboxFullError
from contracts.frames import SensorKind
from contracts.messages import (
    Ack,
    DeviceConfig,
    GatewayConfig,
    GatewayState,
    GatewayStatus,
    RejectCount,
    check_device_config,
    check_gateway_config,
    decode_ack,
    decode_gateway_config,
    encode_gateway_config,
    encode_gateway_state,
)
from contracts.mqttcodec import Publish, TooLarge
from contracts.settings import BrokerSettings, GatewaySettings
from contracts.topics import (
    ack_topic,
    batch_topic,
    command_topic,
    config_topic,
    parse_device_topic,
    state_topic,
)
from gateway.batching import BatchBuilder
from gateway.configdiff import (
    ConfigDiff,
    answer_topics,
    device_topics,
    lorawan_filters,
    mqtt_device_ids,
    serial_changes,
    served_device_ids,
)
from gateway.counters import GatewayCounters
from gateway.downlink import CommandDownlink
from gateway.outbox import Outbox
from gateway.routing import Fitting, Joined, Ready, Rejected, Router, StatusChanged, fit_ready
from gateway.sitelink import SITE_MAX_PACKET_BYTES, SiteLink
from gateway.tracking import DeviceTracker

if TYPE_CHECKING:
    # aiohttp is loaded only by a gateway that serves HTTP devices.
    from gateway.httpserver import HttpEndpoint

__all__ = ["Gateway", "GatewayCounters", "outbox_path", "serve"]

logger = logging.getLogger(__name__)

VERSION = "0.1.0"
CONFIG_DOCUMENT = "gateway_config"
# How often the flusher looks at the builder unwoken: serial and Modbus
# readings, which do not wake it, leave within this (a sensor sends ~1/s).
FLUSH_TICK_S = 0.02
# Batches leave as soon as nothing more waits, but a fast disk fsyncs in well
# under a millisecond: a steady trickle of 2,000 readings/s would then make
# hundreds of batches of 2-3 readings a second, each an fsync, a message and
# an outbox row to send and ack. 5 ms between commits caps that at 200 a
# second (10+ readings a batch at 2,000/s) for at most 5 ms more latency; a
# slower disk's own fsync time exceeds it and sets the pace instead.
FLUSH_MIN_INTERVAL_S = 0.005
# Log at most this many WARNINGs per reject reason per minute; counters keep the rest.
REJECT_LOG_PER_MINUTE = 5
# A device's readings dropped by the rate limit: its first drop is logged at
# once, then one WARNING a minute at most, each with the count since the
# last (a flood makes a line a minute; every drop is in some line).
RATE_LIMIT_LOG_SPAN_MS = 60_000
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
# Device answers to commands arrive on d/{id}/res (contracts.topics).
_ANSWER_SUFFIX = "/res"


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


@dataclass(frozen=True, slots=True)
class _CentralMessage:
    """What paho's network thread hands to the event loop (None topic: a new connection)."""

    topic: str | None
    payload: bytes = b""


class Gateway:
    def __init__(
        self,
        *,
        settings: GatewaySettings,
        central: BrokerSettings,
        site: BrokerSettings,
        outbox_path: Path,
        clock: Callable[[], int] = wall_ms,
        notifier: Notifier | None = None,
    ) -> None:
        if not settings.gateway_id:
            raise HubError("gateway.gateway_id is not set")
        self.settings = settings
        self.gateway_id = settings.gateway_id
        self.prefix = settings.topic_prefix
        self.clock = clock
        self.notifier = notifier or Notifier()
        self.boot_id = secrets.token_hex(8)
        self.counters = GatewayCounters()
        # This boot's outbox_refused_readings already added to the outbox file.
        self._refused_saved = 0
        self.outbox = Outbox(
            outbox_path,
            max_bytes=settings.outbox_max_bytes,
            full_policy=settings.outbox_full_policy,
        )
        self.birth = self.outbox.next_birth()
        self.connected_ms = clock()
        self.router = Router(settings=settings, boot_id=self.boot_id, counters=self.counters)
        # One lock guards the router: the event loop and callers in other
        # threads (a test feeding serial readings, /metrics) both reach it.
        self.lock = threading.Lock()
        self._inflight: dict[int, str] = {}
        self._reject_log = LogLimiter(limit=REJECT_LOG_PER_MINUTE, span=60_000)
        self._limited_log = DropTally(span=RATE_LIMIT_LOG_SPAN_MS)
        self._init_tasks()
        self.central = self._uplink(central)
        self.site = self._site_link(site)
        self.downlink = CommandDownlink(
            gateway_id=self.gateway_id,
            prefix=self.prefix,
            outbox=self.outbox,
            site=self.site,
            central=self.central,
            counters=self.counters,
            clock=clock,
            devices=lambda: self.router.devices,
            configured=lambda: self.router.config is not None,
            online=self._online,
            reject=self._reject,
            ack_timeout_s=settings.ack_timeout_s,
        )
        self._restore_config()

    def _init_tasks(self) -> None:
        """Event-loop objects, created by ``run`` once the loop exists."""
        self._site_started = False
        self._site_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_now: asyncio.Event | None = None
        self._wake_sender: asyncio.Event | None = None
        self._config_changed: asyncio.Event | None = None
        self._modbus_changed: asyncio.Event | None = None
        self._central_inbox: asyncio.Queue[_CentralMessage] | None = None
        self.http: HttpEndpoint | None = None

    def _uplink(self, central: BrokerSettings) -> MqttLink:
        return MqttLink(
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
                command_topic(self.gateway_id, self.prefix),
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

    def _site_link(self, site: BrokerSettings) -> SiteLink:
        return SiteLink(
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
            session_expiry_s=self.settings.site_session_expiry_s,
            receive_maximum=self.settings.site_receive_maximum,
            on_messages=self._on_site_messages,
            on_connect=self._on_site_connect,
            on_subscribed=self.publish_state,
            on_refused=self._on_site_refused,
            on_too_large=self._on_site_too_large,
            on_puback=self._on_site_puback,
        )

    def _restore_config(self) -> None:
        """Serve the devices of the config kept in the outbox file, before any broker."""
        saved = self.outbox.load_document(CONFIG_DOCUMENT)
        if saved is not None:
            try:
                self.apply_config(self.receive_config(saved), persist=False)
            except InputError as exc:
                logger.warning("saved config unreadable, waiting for a new one: %s", exc)

    # -- the core's state, for callers and tests ----------------------------------

    @property
    def builder(self) -> BatchBuilder:
        return self.router.builder

    @property
    def tracker(self) -> DeviceTracker:
        return self.router.tracker

    @property
    def config(self) -> GatewayConfig | None:
        return self.router.config

    @property
    def devices(self) -> dict[str, DeviceConfig]:
        return self.router.devices

    # -- state -----------------------------------------------------------------

    def _state_payload(
        self,
        status: GatewayStatus,
        readings_per_s: float = 0.0,
        *,
        will: bool = False,
        report: bool = False,
    ) -> bytes:
        """The state message; with ``report``, it carries (and takes) the period's rejects."""
        depth = self.outbox.depth()
        totals = self.outbox.totals()
        c = self.counters
        rejects: tuple[RejectCount, ...] = ()
        dropped = 0
        if report:
            with self.lock:
                rejects, dropped = self.router.report.take()
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
                serial_errors=c.serial_checksum_errors
                + c.serial_length_errors
                + sum(n for (_d, outcome), n in c.modbus_polls.items() if outcome != "ok"),
                devices_online=self.tracker.online_count(),
                batches_resent=c.batches_resent,
                puback_refused=c.puback_refused,
                # The Will (offline) is built before the site link exists.
                site_ready=status == "online" and self.site_ready(),
                will=will,
                rejects=rejects,
                rejects_dropped=dropped,
                outbox_refused_readings=totals.refused_readings,
                outbox_dropped_readings=totals.dropped_readings,
            )
        )

    def site_ready(self) -> bool:
        """Connected to the site broker, subscribed, and every subscription asked for answered.

        A gateway none of whose devices reach it through the site broker (a
        street cabinet with a serial sensor and a Modbus bus) asks for no
        subscription: connected is ready.
        """
        site = self.site
        if not site.connected.is_set() or site.subscriptions_pending():
            return False
        if site.granted_topics():
            return True
        with self.lock:
            devices = list(self.router.devices.values())
        return not mqtt_device_ids(devices) and not lorawan_filters(devices)

    def served_devices(self) -> set[str]:
        """MQTT devices whose uplink and status subscriptions the site broker has granted.

        A device is served only from then on: a message it publishes earlier
        reaches no subscription and no session, and is lost at the broker.
        """
        return served_device_ids(self.router.routes, self.site.granted_topics())

    def publish_state(self, readings_per_s: float = 0.0, *, report: bool = False) -> None:
        """Publish the retained state if connected; ``report``: with the period's rejects.

        Only the periodic state (and the last one at a stop) reports rejects,
        so states that carry them are at least ``state_interval_s`` apart:
        ingest recognises a state it has already stored by its time.
        """
        if self.central.connected.is_set():
            self.central.publish(
                state_topic(self.gateway_id, self.prefix),
                self._state_payload("online", readings_per_s, report=report),
                retain=True,
            )

    # -- the core's events --------------------------------------------------------

    def _log_events(self, *, flush: bool = False) -> None:
        """Log what the router queued: rejects (at most REJECT_LOG_PER_MINUTE per reason)
        and the readings the rate limit dropped (``RATE_LIMIT_LOG_SPAN_MS``; ``flush``: all now).
        """
        with self.lock:
            events = self.router.take_events()
            limited = self.router.take_limited() if self.router.limited else None
        now = self.clock()
        if limited:
            self._limited_log.add(limited, now)
        for device_id, dropped, since_ms in self._limited_log.due(now, flush=flush):
            logger.warning(
                "rate limit: device %s sent faster than %g readings a second (burst %g):"
                " %d dropped in the last %.1f s",
                device_id,
                self.router.buckets.rate_of(device_id),
                self.settings.device_burst,
                dropped,
                max(0, now - since_ms) / 1000,
                extra={"device_id": device_id},
            )
        for event in events:
            if isinstance(event, Rejected):
                if self._reject_log.allow(event.reason, now):
                    logger.warning(
                        "rejected reading from %s (%s): %s",
                        event.device_id,
                        event.reason,
                        event.detail,
                        extra={"device_id": event.device_id},
                    )
            elif isinstance(event, Joined):
                logger.info(
                    "LoRaWAN device %s joined: DevAddr %s",
                    event.device_id,
                    event.dev_addr,
                    extra={"device_id": event.device_id},
                )
            else:
                logger.info(
                    "device %s is %s",
                    event.device_id,
                    "online" if event.online else "offline",
                    extra={"device_id": event.device_id},
                )

    # -- site side (event loop thread) --------------------------------------------

    def _on_site_connect(self) -> None:
        # One subscription per configured device, not d/+/up: sites may share a
        # broker, and a gateway must not see (or reject) its neighbours' devices.
        with self.lock:
            ids = mqtt_device_ids(self.router.devices.values())
            filters = lorawan_filters(self.router.devices.values())
        self.site.subscribe(self._site_topics(ids) + filters)

    def _on_site_puback(self, packet_id: int, reason_code: int) -> None:
        # Only commands are published on the site link.
        self.downlink.on_puback(packet_id, reason_code)

    def _site_topics(self, device_ids: set[str] | frozenset[str]) -> list[str]:
        """Each MQTT device's uplink, status and (commands') answer topics."""
        return device_topics(device_ids, self.prefix) + answer_topics(device_ids, self.prefix)

    def _online(self, device_id: str) -> bool:
        """The tracker's view: its status says online, or a reading within its timeout."""
        with self.lock:
            track = self.router.tracker.devices.get(device_id)
            return track is not None and track.online

    def _reject(self, reason: str, device_id: str, detail: str, payload: bytes) -> None:
        """Count a reject of the command path as the reading path counts its own.

        It reaches the counters, /metrics and the state message's rejects.
        """
        with self.lock:
            self.router.reject(reason, device_id, detail, payload, self.clock())
            # The downlink logged it in its own words (an answer, not a reading).
            self.router.events.pop()

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
                extra={"device_id": device_id},
            )

    def _on_site_too_large(self, message: TooLarge) -> None:
        """A device message over the site link's limit, skipped unread (event loop).

        It is counted as a reject and acknowledged with the next batch like
        any other refused message; unacknowledged, the broker would send it
        again after every reconnect and hold up everything behind it.
        """
        with self.lock:
            self.router.site_refused(
                topic=message.topic,
                qos=message.qos,
                packet_id=message.packet_id,
                generation=self.site.generation,
                detail=f"{message.size_bytes} bytes on {message.topic[:100]!r}, "
                f"over the limit of {SITE_MAX_PACKET_BYTES}",
                now=self.clock(),
            )
        self._log_events()
        if self._flush_now is not None:
            self._flush_now.set()

    def _on_site_messages(self, publishes: list[Publish]) -> None:
        """Messages of one socket read, in order, on the event loop.

        Answers to commands (``.../res``) go to the downlink, the rest to the router.
        """
        answers = [p for p in publishes if p[0].endswith(_ANSWER_SUFFIX)]
        if answers:
            self.downlink.on_answers(answers, self.site.generation)
            publishes = [p for p in publishes if not p[0].endswith(_ANSWER_SUFFIX)]
            if not publishes:
                return
        now = self.clock()
        with self.lock:
            self.router.site_messages(publishes, generation=self.site.generation, now=now)
        if self.router.events or self.router.limited:
            if any(isinstance(e, StatusChanged) and e.online for e in self.router.events):
                self.downlink.wake()
            self._log_events()
        # Wake the flusher even for rows short of a batch: they leave as soon
        # as the reads queued with this one are handled (adaptive batching).
        if self._flush_now is not None:
            self._flush_now.set()

    def accept_serial_reading(self, device: DeviceConfig, values: dict[str, float]) -> None:
        """A decoded serial frame: seq and time are the gateway's (sensors have neither)."""
        now = self.clock()
        with self.lock:
            self.router.serial_reading(device, values, now)
        if self.router.events or self.router.limited:
            self._log_events()

    # -- central side: paho's network thread hands over to the event loop -----------

    def _hand_over(self, message: _CentralMessage) -> None:
        """Queue ``message`` for the event loop (paho thread); dropped once the loop is gone.

        A dropped ack costs a resend that ingest's unique key absorbs; a
        dropped config comes again, retained, on the next connection.
        """
        loop, inbox = self._loop, self._central_inbox
        if loop is None or inbox is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop has closed
            loop.call_soon_threadsafe(inbox.put_nowait, message)

    def _on_central_connect(self) -> None:
        self.connected_ms = self.clock()
        self._inflight.clear()
        logger.info("uplink: connected to %s:%d", self.central.host, self.central.port)
        self._hand_over(_CentralMessage(None))

    def _on_central_disconnect(self) -> None:
        self._inflight.clear()

    def _on_puback(self, mid: int, reason_code: int) -> None:
        batch_id = self._inflight.pop(mid, None)
        if batch_id is None:
            return
        if reason_code >= 0x80:
            # The batch stays in the outbox and is resent after ack_timeout_s.
            self.counters.puback_refused += 1
            logger.warning(
                "broker refused batch %s: reason code 0x%02x",
                batch_id,
                reason_code,
                extra={"batch_id": batch_id},
            )
        self._wake()

    def _on_central_message(self, topic: str, payload: bytes) -> None:
        self._hand_over(_CentralMessage(topic, payload))

    async def _central(self, inbox: asyncio.Queue[_CentralMessage]) -> None:
        """Apply what the uplink received, in order, writing the outbox in a worker thread."""
        while True:
            message = await inbox.get()
            await self._central_message(message)

    async def _central_message(self, message: _CentralMessage) -> None:
        if message.topic is None:
            # Everything unacked is due again: what was in flight may be lost.
            # (The link subscribes to the ack and config topics itself on every connect.)
            await asyncio.to_thread(self.outbox.reset_sent)
            await asyncio.to_thread(self.outbox.reset_reports_sent)
            self.downlink.wake_reports()
            self.publish_state()
            self._wake()
        elif message.topic == ack_topic(self.gateway_id, self.prefix):
            try:
                ack = decode_ack(message.payload, gateway_id=self.gateway_id)
            except InputError as exc:
                logger.warning("malformed ack ignored: %s", exc)
                return
            await asyncio.to_thread(self._apply_ack, ack)
        elif message.topic == command_topic(self.gateway_id, self.prefix):
            self.downlink.on_commands(message.payload)
        elif message.topic == config_topic(self.gateway_id, self.prefix):
            if not message.payload:
                return  # a cleared retained config
            try:
                config = self.receive_config(message.payload)
            except InputError as exc:
                logger.warning("malformed config ignored: %s", exc)
                return
            if self.apply_config(config, persist=False):
                await asyncio.to_thread(
                    self.outbox.save_document, CONFIG_DOCUMENT, encode_gateway_config(config)
                )

    def _apply_ack(self, ack: Ack) -> None:
        """Delete the acked batches from the outbox (blocking: a worker thread)."""
        acked = self.outbox.ack(ack.batch_ids, ack.digests)
        self.counters.command_reports_acked += self.outbox.ack_reports(ack.reports)
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

    def receive_config(self, payload: bytes) -> GatewayConfig:
        """Decode a config, install the device types it carries, then check its devices.

        A type this gateway lacks, or knows with fewer metrics, is taken from
        the config (``contracts.catalog.merge_types``); one that contradicts
        what the gateway knows (a metric's kind or unit, a serial protocol it
        has no code for) is refused with a WARNING, and the config's devices
        of that type are left out. InputError if the rest is malformed.
        """
        config = decode_gateway_config(payload, check=False)
        installed = current_catalog()
        merged, refused = merge_types(
            installed, config.types, source=f"gateway config version {config.version}"
        )
        merged = merge_models(
            merged,
            config.modbus_models,
            config.lorawan_models,
            source=f"gateway config version {config.version}",
        )
        if merged is not installed:
            use_catalog(merged)
            learned = [n for n, t in merged.types.items() if installed.types.get(n) is not t]
            logger.info(
                "config version %d: device types installed: %s", config.version, ", ".join(learned)
            )
        for name, exc in refused.items():
            logger.warning(
                "config version %d: device type %s refused, its %d devices left out: %s",
                config.version,
                name,
                sum(d.device_type == name for d in config.devices),
                exc,
            )
        if refused:
            kept = [d for d in config.devices if d.device_type not in refused]
            config = msgspec.structs.replace(config, devices=kept)
        return check_gateway_config(config)

    def apply_config(self, config: GatewayConfig, *, persist: bool = True) -> bool:
        """Replace the device list live; an older or foreign config is ignored (False).

        The applied config is kept in the outbox file, so a restarted gateway
        serves its devices before (or without) the central broker.
        """
        if config.gateway_id != self.gateway_id:
            logger.warning("config for gateway %s ignored", config.gateway_id)
            return False
        with self.lock:
            diff = self.router.apply_config(config)
        if diff is None:
            return False
        if persist:
            self.outbox.save_document(CONFIG_DOCUMENT, encode_gateway_config(config))
        self._follow_config(config, diff)
        return True

    def _follow_config(self, config: GatewayConfig, diff: ConfigDiff) -> None:
        """Subscriptions and serial readers follow an applied config."""
        if self.site.connected.is_set():
            self.site.unsubscribe(
                self._site_topics(diff.unsubscribe) + sorted(diff.unsubscribe_filters)
            )
            self.site.subscribe(self._site_topics(diff.subscribe) + sorted(diff.subscribe_filters))
        logger.info(
            "config version %d applied: %d devices (%d removed)",
            config.version,
            len(config.devices),
            len(diff.removed),
        )
        if self._loop is not None and self._config_changed is not None:
            self._loop.call_soon_threadsafe(self._config_changed.set)
        if self._loop is not None and self._modbus_changed is not None:
            self._loop.call_soon_threadsafe(self._modbus_changed.set)
        self._start_site()

    def _start_site(self) -> None:
        """Connect to the site broker once a config says which devices are ours.

        Until then the broker keeps the devices' messages in the gateway's
        persistent session instead of the gateway refusing them as unknown.
        """
        with self.lock:
            if self._site_started or self.router.config is None or self._loop is None:
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
            # The loop handled every socket read that was waiting before this
            # task ran: nothing more is waiting, so the builder's rows go now.
            # Readings that arrive during the fsync make the next batch.
            started_s, stored = time.monotonic(), self.counters.batches_stored
            await self.flush(force=False, idle=True)
            if self.counters.batches_stored != stored:
                # At most one outbox commit per FLUSH_MIN_INTERVAL_S, however
                # fast the disk: readings arriving meanwhile join the next one.
                rest_s = started_s + FLUSH_MIN_INTERVAL_S - time.monotonic()
                if rest_s > 0:
                    await asyncio.sleep(rest_s)

    async def flush(self, *, force: bool, idle: bool = False) -> None:
        """Store cut (or due, or with force any) batches, then ack their device messages.

        Ready batches are stored oldest first. Under the ``refuse`` policy the
        first one the outbox cannot take, and every one after it, stays ready
        with its device messages unacknowledged: the site broker keeps those
        in the gateway's session (at most ``site_receive_maximum`` of them in
        flight) and stops sending more. They are stored when acks from
        ingest make room; nothing a device was acknowledged for is lost.
        Readings refused (serial ones while full, batches too large for the
        outbox) are added to the outbox file's total.
        """
        now = self.clock()
        with self.lock:
            ready = self.router.take_ready(now, force=force, idle=idle)
        if not ready:
            await self._save_refused()
            return
        fitting = self._fitting(ready)
        done, held, items = fitting.done, fitting.held, fitting.items
        if items:
            try:
                await self._store(items, now)
            except OutboxFullError:
                done, held = [], ready  # cannot happen with one writer; hold all
        if held:
            with self.lock:
                self.router.hold(held)
        self._outbox_episode(full=bool(held), held=held, now=now)
        for _batch, acks, generation in done:
            # Rejected device messages are acknowledged with the batch cut
            # after them: they are counted, and holding them would stall the
            # site broker's in-flight window.
            self.site.ack(generation, acks)
        if self.http is not None:
            with self.lock:
                answers = self.router.released(
                    done, frozenset(batch_id for batch_id, _b, _r in fitting.too_large)
                )
            self.http.release(answers)
        await self._save_refused()

    def _fitting(self, ready: list[Ready]) -> Fitting:
        """What of ``ready`` the outbox takes now; batches larger than all of it are refused."""
        outbox = self.outbox
        depth = outbox.depth()
        room = outbox.max_bytes - depth.bytes if outbox.full_policy == "refuse" else None
        fitting = fit_ready(ready, room_bytes=room, outbox_empty=not depth.batches)
        for batch_id, size_bytes, rows in fitting.too_large:
            self.counters.outbox_refused_readings += rows
            logger.error(
                "batch %s of %d bytes exceeds the whole outbox (%d bytes): "
                "%d readings refused; raise gateway.outbox_max_bytes",
                batch_id,
                size_bytes,
                outbox.max_bytes,
                rows,
            )
        return fitting

    def _outbox_episode(self, *, full: bool, held: list[Ready], now: int) -> None:
        """Log a full outbox once when it starts (WARNING) and once when it ends (INFO)."""
        with self.lock:
            started = self.router.outbox_full(now) if full else False
            ended = None if full else self.router.outbox_has_room()
        if started:
            depth = self.outbox.depth()
            logger.warning(
                "outbox full (%d of %d bytes): holding %d device messages unacknowledged "
                "at the site broker and refusing serial readings until ingest's acks make room",
                depth.bytes,
                self.outbox.max_bytes,
                sum(len(acks) for _b, acks, _g in held),
            )
        elif ended is not None:
            since, refused = ended
            logger.info(
                "outbox has room again after %.1f s: held device messages stored and "
                "acknowledged; %d serial readings were refused meanwhile",
                (now - since) / 1000,
                refused,
            )

    async def _save_refused(self) -> None:
        """Add the readings refused since the last call to the outbox file's total.

        The routing core counts a refused serial reading in memory (no I/O
        there); each flush (the flusher's every tick, the last one at stop)
        brings the count to the file, so the state's total survives restarts.
        """
        pending = self.counters.outbox_refused_readings - self._refused_saved
        if pending <= 0:
            return
        # Taken first: a flusher cancelled at stop leaves the worker thread to
        # finish the write, and the last flush must not add it again.
        self._refused_saved += pending
        try:
            await asyncio.to_thread(self.outbox.count_refused, pending)
        except HubError:
            self._refused_saved -= pending
            raise

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
            self.publish_state(rate, report=True)

    def _status_line(self) -> str:
        """systemd's STATUS=: one short line for `systemctl status`."""
        uplink = "connected" if self.central.connected.is_set() else "disconnected"
        return (
            f"uplink {uplink}, outbox {self.outbox.depth().readings} readings, "
            f"{self.tracker.online_count()} devices online"
        )

    async def _watchdog(self) -> None:
        """WATCHDOG=1 every half interval, only after the outbox probe finished in time.

        This task runs on the event loop it vouches for: a blocked loop sends
        nothing, and so does an outbox whose write lock cannot be taken
        within the half interval (a hung disk, another writer holding it).
        One probe at a time: a stuck one is waited for, not joined by more
        threads.
        """
        half_s = self.notifier.watchdog_s / 2
        probe: asyncio.Task[None] | None = None
        healthy = True
        while half_s > 0:
            await asyncio.sleep(half_s)
            if probe is None or probe.done():
                probe = asyncio.create_task(
                    asyncio.to_thread(self.outbox.check_writable), name="watchdog-probe"
                )
            try:
                async with asyncio.timeout(half_s):
                    await asyncio.shield(probe)
            except (TimeoutError, HubError) as exc:
                if healthy:
                    logger.warning(
                        "watchdog: outbox not writable (%s): no pings until it is",
                        exc or f"no answer within {half_s:.1f} s",
                    )
                healthy = False
                continue
            if not healthy:
                logger.info("watchdog: outbox writable again, pinging")
                healthy = True
            self.notifier.notify(WATCHDOG="1", STATUS=self._status_line())

    async def _expiry(self) -> None:
        override_ms = int(self.settings.no_data_timeout_s * 1000)
        while True:
            await asyncio.sleep(1.0)
            with self.lock:
                gone = self.router.expire(self.clock(), override_ms=override_ms)
            # Rate-limit lines held back by their span are written once due.
            self._log_events()
            for device_id in gone:
                logger.info(
                    "device %s offline: no data within its timeout",
                    device_id,
                    extra={"device_id": device_id},
                )

    async def _serial(self, changed: asyncio.Event) -> None:
        """Keep one reader task per configured serial device, following config changes."""
        tasks: dict[str, tuple[DeviceConfig, asyncio.Task[None]]] = {}
        async with asyncio.TaskGroup() as group:
            while True:
                running = {device_id: device for device_id, (device, _t) in tasks.items()}
                stop, start = serial_changes(running, self.router.devices.values())
                for device_id in stop:
                    tasks.pop(device_id)[1].cancel()
                for device in start:
                    tasks[device.device_id] = (
                        device,
                        group.create_task(
                            self._serial_source(device), name=f"serial[{device.port}]"
                        ),
                    )
                await changed.wait()
                changed.clear()

    async def _serial_source(self, device: DeviceConfig) -> None:
        """Read one serial device; its frames and decoder counts come back through callbacks."""
        # Imported on first use: a site without serial sensors needs neither
        # pyserial nor the frame codecs.
        from gateway.serialport import SerialSource

        # The config was checked on receipt; a serial device has a port and a protocol.
        check_device_config(device)
        counters = self.counters

        def decoded(frames: int, checksum_errors: int, length_errors: int, garbage: int) -> None:
            counters.serial_frames += frames
            counters.serial_checksum_errors += checksum_errors
            counters.serial_length_errors += length_errors
            counters.serial_garbage_bytes += garbage

        def reopened() -> None:
            counters.serial_reconnects += 1

        device_id = device.device_id
        source = SerialSource(
            port=cast("str", device.port),
            protocol=cast("SensorKind", device.protocol),
            name=device_id,
            on_metrics=lambda values: self.accept_serial_reading(device, values),
            on_decoded=decoded,
            on_reopen=reopened,
            on_replies=lambda replies: self.downlink.on_serial_replies(device_id, replies),
        )
        # Commands are written to the port while its source runs.
        self.downlink.attach_serial(device_id, source)
        try:
            await source.run()
        finally:
            self.downlink.detach_serial(device_id, source)

    async def _modbus(self, changed: asyncio.Event) -> None:
        """Keep one poller task per Modbus bus (port), following config changes."""
        # Imported on first use: a site without Modbus devices needs no pymodbus.
        from gateway.modbuspoller import BusPoller
        from gateway.polling import Bus, bus_changes

        tasks: dict[str, tuple[Bus, BusPoller, asyncio.Task[None]]] = {}
        async with asyncio.TaskGroup() as group:
            while True:
                running = {port: bus for port, (bus, _p, _t) in tasks.items()}
                stop, start = bus_changes(running, self.router.devices.values())
                for port in stop:
                    bus, poller, task = tasks.pop(port)
                    task.cancel()
                    for device in bus:
                        self.downlink.detach_modbus(device.device_id, poller)
                for port, bus in start.items():
                    try:
                        poller = BusPoller(
                            port=port,
                            devices=bus,
                            counters=self.counters,
                            on_reading=self.accept_serial_reading,
                            on_status=self._modbus_status,
                            on_reject=lambda reason, device_id, detail: self._reject(
                                reason, device_id, detail, b""
                            ),
                        )
                    except HubError as exc:  # a model gone from the catalog since the check
                        logger.error("modbus %s not polled: %s", port, exc)  # noqa: TRY400 - one line
                        continue
                    for device in bus:
                        self.downlink.attach_modbus(device.device_id, poller)
                    tasks[port] = (
                        bus,
                        poller,
                        group.create_task(poller.run(), name=f"modbus[{port}]"),
                    )
                await changed.wait()
                changed.clear()

    def _modbus_status(self, device: DeviceConfig, online: bool, detail: str) -> None:
        """A slave failed OFFLINE_AFTER_FAILURES polls in a row, or answers again: logged once."""
        with self.lock:
            changed = self.router.tracker.set_status(
                device.device_id, online=online, now_ms=self.clock()
            )
        if changed and online:
            logger.info(
                "device %s online: it answers on %s again",
                device.device_id,
                device.port,
                extra={"device_id": device.device_id},
            )
            self.downlink.wake()
        elif changed:
            logger.info(
                "device %s offline: its last polls on %s got no answer (%s)",
                device.device_id,
                device.port,
                detail,
                extra={"device_id": device.device_id},
            )

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set (or cancelled); flush the builder on the way out."""
        self._loop = asyncio.get_running_loop()
        self._wake_sender = wake = asyncio.Event()
        self._config_changed = changed = asyncio.Event()
        self._modbus_changed = modbus_changed = asyncio.Event()
        self._flush_now = flush_now = asyncio.Event()
        inbox: asyncio.Queue[_CentralMessage] = asyncio.Queue()
        self._central_inbox = inbox
        logger.info(
            "gateway %s starting: boot %s, birth %d, outbox %d readings",
            self.gateway_id,
            self.boot_id,
            self.birth,
            self.outbox.depth().readings,
        )
        # The metrics address first: one that cannot be bound is a settings
        # error, raised before any broker connection (and so any birth or Will).
        metrics_server = None
        if self.settings.metrics_port:
            from gateway.metrics import serve_metrics

            metrics_server = serve_metrics(
                self.settings.metrics_host,
                self.settings.metrics_port,
                gateway_id=self.gateway_id,
                counters=self.counters,
                gauges=self._gauges,
            )
        if self.settings.http_port:
            self.http = await self._http_endpoint()
        self.central.start()
        self._start_site()
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._flusher(flush_now), name="flusher")
                group.create_task(self._sender(wake), name="sender")
                group.create_task(self._central(inbox), name="uplink-inbox")
                group.create_task(self._state(), name="state")
                group.create_task(self._expiry(), name="expiry")
                group.create_task(self._serial(changed), name="serial")
                group.create_task(self._modbus(modbus_changed), name="modbus")
                group.create_task(self.downlink.run(), name="commands")
                group.create_task(self.downlink.send_reports(), name="command-reports")
                group.create_task(self._watchdog(), name="watchdog")
                # The outbox is open and the links started: systemd may start what
                # comes after the gateway (Type=notify).
                self.notifier.notify(READY="1", STATUS=self._status_line())
                if stop is not None:
                    group.create_task(_raise_on(stop), name="stop")
        except* _Stop:
            pass
        finally:
            self.notifier.notify(STOPPING="1", STATUS="stopping: flushing the outbox")
            # Store what the builder holds and acknowledge it while the site
            # link is still up (and answer the HTTP requests waiting for it,
            # the others 503); then leave the site session cleanly.
            if self.http is not None:
                self.http.refuse_new()
            await self.flush(force=True)
            if self.http is not None:
                await self.http.stop()
            await self._stop_site()
            self.central.publish(
                state_topic(self.gateway_id, self.prefix),
                self._state_payload("offline", report=True),
                retain=True,
            )
            self.central.stop()
            await self._drain_central(inbox)
            if metrics_server is not None:
                metrics_server.close()
            self.outbox.close()
            logger.info("gateway %s stopped", self.gateway_id)

    async def _http_endpoint(self) -> HttpEndpoint:
        """Listen for HTTP devices; the address is checked before any broker connection."""
        from gateway.httpserver import HttpEndpoint

        def flush_soon() -> None:
            if self._flush_now is not None:
                self._flush_now.set()

        endpoint = HttpEndpoint(
            settings=self.settings,
            router=self.router,
            lock=self.lock,
            clock=self.clock,
            flush_soon=flush_soon,
            log_events=self._log_events,
        )
        await endpoint.start()
        return endpoint

    async def _drain_central(self, inbox: asyncio.Queue[_CentralMessage]) -> None:
        """Apply the acks and config the uplink handed over before it stopped."""
        await asyncio.sleep(0)  # let hand-overs already scheduled reach the queue
        self._central_inbox = None
        while not inbox.empty():
            message = inbox.get_nowait()
            if message.topic is not None:
                await self._central_message(message)

    def _gauges(self) -> dict[str, int]:
        """Values for /metrics, read at scrape time (metrics thread)."""
        depth = self.outbox.depth()
        return {
            "outbox_readings": depth.readings,
            "outbox_batches": depth.batches,
            "outbox_bytes": depth.bytes,
            "devices_online": self.tracker.online_count(),
            "uplink_connected": int(self.central.connected.is_set()),
            "command_reports_pending": self.outbox.reports_pending(),
            "commands_held": sum(not h.final for h in list(self.downlink.held.values())),
        }

    async def _stop_site(self) -> None:
        """Leave the site session; then log every rate-limit drop not yet in a line."""
        self.site.stop()
        task = self._site_task
        if task is not None:
            try:
                async with asyncio.timeout(2.0):
                    await asyncio.shield(task)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._log_events(flush=True)


async def _raise_on(stop: asyncio.Event) -> None:
    await stop.wait()
    raise _Stop


class _Stop(Exception):  # noqa: N818 - a control-flow signal for the task group, not an error
    """Raised inside the task group to end it when the stop event fires."""
