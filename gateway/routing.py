"""The gateway's routing core: device messages in, batches and the acks they release out.

Pure: the caller passes the time, the site connection's generation and the
settings; nothing here does I/O, logs, or knows about threads. It decides
which device a site message belongs to (routes from the applied config),
decodes and checks it against the catalog, applies the per-device rate limit
(``gateway.ratelimit``: by the reading's own timestamp, so a backlog is not a
flood), tracks seq and liveness per device, and adds it to the
``BatchBuilder``; an
uplink that names metrics its type lacks keeps its known metrics and counts
each unknown one as an ``unknown_metric`` reject (unless the type's
``unknown_metrics`` is "reject": then the reading is rejected). It
keeps the site packet ids awaiting their ack per connection generation, and
the ready queue: batches cut from the builder, each with the packet ids it
releases, waiting for the shell to store them in the outbox. Rejects and
device status changes are counted and queued in ``events`` for the shell to
log, and aggregated per device and reason (``gateway.rejects``) for the
shell to report with the next state; readings the rate limit drops are
counted per device and tallied in ``limited`` for the shell to log;
storing, acknowledging, subscribing, publishing and logging are the shell's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from contracts.catalog import DEFAULT_OFFLINE_AFTER_S, DEVICE_TYPES, device_type
from contracts.errors import InputError, UnknownMetricError
from contracts.httpapi import HTTP_MAX_READINGS
from contracts.messages import (
    Batch,
    DeviceConfig,
    DeviceUplink,
    GatewayConfig,
    accept_device_uplinks,
    decode_device_status,
    decode_device_uplink,
    decode_device_uplink_tolerant,
    encode_batch,
)
from contracts.mqttcodec import Publish
from contracts.settings import GatewaySettings
from contracts.topics import parse_chirpstack_topic, parse_device_topic
from gateway.batching import BatchBuilder
from gateway.configdiff import ConfigDiff, Routes, diff_config, is_newer, site_routes
from gateway.counters import GatewayCounters
from gateway.lorawan import (
    STATUS_SEQ,
    LorawanBridge,
    LorawanJoin,
    LorawanStatus,
    LorawanUplink,
    Refused,
    unknown_device_id,
)
from gateway.ratelimit import TokenBuckets
from gateway.rejects import RejectAggregator
from gateway.tracking import DeviceTracker

# A cut batch (None: only acks), the site packet ids it releases, and the
# site connection generation they arrived on.
Ready = tuple[Batch | None, list[int], int]


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: str
    device_id: str
    detail: str


@dataclass(frozen=True, slots=True)
class HttpIntake:
    """What became of the readings of one HTTP request, in body order."""

    accepted: int = 0  # taken from the first on: added, or repeats of readings taken before
    duplicates: int = 0  # of those, repeats (not added again)
    rejected: tuple[tuple[int, str, str], ...] = ()  # (index, reason, detail)
    retry_after_ms: int = 0  # > 0: the rate limit stopped it at index accepted + rejects
    outbox_full: bool = False  # nothing looked at: the outbox takes nothing now
    waits: bool = False  # answered once ``released`` names its request id


# Recent (seq, ts) per HTTP device, to know a request sent again after its
# answer was lost: a device resends at most its unanswered requests, a
# few arrays of HTTP_MAX_READINGS, in order.
HTTP_RECENT_KEYS = 4 * HTTP_MAX_READINGS

# A socket read with at least this many messages has its uplinks checked
# together (``contracts.messages.accept_device_uplinks``); a smaller one goes
# one by one, which is faster below about 16 readings of a type (measured:
# 8 readings 1.02x the one-by-one time, 16 readings 0.78x, 100 readings 0.57x).
GROUP_MIN_MESSAGES: Final = 16
# What a socket read's message is, before it is handled in order: an uplink
# of this device, or anything else (None).
Planned = DeviceConfig | None


@dataclass(frozen=True, slots=True)
class StatusChanged:
    device_id: str
    online: bool


@dataclass(frozen=True, slots=True)
class Joined:
    """A LoRaWAN device joined: a new session (``gateway.lorawan``)."""

    device_id: str
    dev_addr: str


Event = Rejected | StatusChanged | Joined


@dataclass(frozen=True, slots=True)
class Fitting:
    """Ready entries split by what the outbox can take now."""

    done: list[Ready]  # stored now (their acks released after the store)
    held: list[Ready]  # wait, their device messages unacknowledged
    items: list[tuple[str, bytes, int]]  # (batch id, payload, readings) to store
    too_large: list[tuple[str, int, int]]  # (batch id, bytes, readings): larger than it all


def fit_ready(ready: list[Ready], *, room_bytes: int | None, outbox_empty: bool) -> Fitting:
    """Split ``ready`` into the leading entries the outbox takes now and the rest.

    ``room_bytes`` is what the outbox has left under the ``refuse`` policy
    (None: ``drop_oldest``, which always takes them). A batch larger than
    the whole, empty outbox can never fit, and holding it would stop the
    site for good: it goes to ``too_large``, to be refused and counted.
    """
    items: list[tuple[str, bytes, int]] = []
    too_large: list[tuple[str, int, int]] = []
    incoming = 0
    for i, (batch, _acks, _generation) in enumerate(ready):
        if batch is None:
            continue
        payload = encode_batch(batch)
        rows = sum(b.row_count for b in batch.blocks)
        if room_bytes is not None and incoming + len(payload) > room_bytes:
            if items or not outbox_empty:
                return Fitting(ready[:i], ready[i:], items, too_large)
            too_large.append((batch.batch_id, len(payload), rows))
            continue
        items.append((batch.batch_id, payload, rows))
        incoming += len(payload)
    return Fitting(ready, [], items, too_large)


def _offline_after_s(type_name: str) -> float:
    """A type's offline_after_s; a type this gateway has not learnt gets the default."""
    dtype = DEVICE_TYPES.get(type_name)
    return dtype.offline_after_s if dtype is not None else DEFAULT_OFFLINE_AFTER_S


class Router:
    """Routing, per-device state, ack generations and the ready queue of one gateway boot."""

    def __init__(
        self,
        *,
        settings: GatewaySettings,
        boot_id: str,
        counters: GatewayCounters,
    ) -> None:
        self.gateway_id = settings.gateway_id
        self.prefix = settings.topic_prefix
        self.boot_id = boot_id
        self.counters = counters
        self.builder = BatchBuilder(
            gateway_id=settings.gateway_id,
            boot_id=boot_id,
            max_rows=settings.batch_max_rows,
            max_age_ms=settings.batch_max_ms,
        )
        self.buckets = TokenBuckets(
            default_rate_per_s=settings.device_rate_per_s,
            burst=settings.device_burst,
            backlog_max_ms=int(settings.device_backlog_max_s * 1000),
        )
        # Readings the rate limit dropped per device since the shell last took them.
        self.limited: Counter[str] = Counter()
        self.tracker = DeviceTracker()
        self.lorawan = LorawanBridge(counters=counters)
        # Rejects per (device, reason) since the last state that carried them.
        self.report = RejectAggregator()
        self.config: GatewayConfig | None = None
        self.devices: dict[str, DeviceConfig] = {}
        self.routes: Routes = {}
        self.serial_seq: dict[str, int] = {}
        # Packet ids of site messages handled but not yet acknowledged, and the
        # connection they arrived on; batches cut from the builder wait in
        # ready with the acks they release, until the shell stores them.
        # Under the refuse policy a full outbox keeps them there (and their
        # device messages unacknowledged) until acks from ingest make room.
        self.site_acks: list[int] = []
        self.acks_generation = 0
        self.ready: list[Ready] = []
        # Cut a batch early when this many messages wait for their ack, so the
        # broker's in-flight window (Receive Maximum) never runs dry.
        self.ack_threshold = max(1, settings.site_receive_maximum // 2)
        # Since when (ms) the outbox has been too full to take the next ready
        # batch, and the serial readings refused since; None: not full.
        self.outbox_full_since_ms: int | None = None
        self.refused_this_episode = 0
        self.events: list[Event] = []
        # HTTP requests waiting for their readings' store: ids since the last
        # cut, then by the number of the cut (ready entry) that releases them.
        self.http_waiting: list[int] = []
        self.http_cuts: dict[int, list[int]] = {}
        self.cuts = 0  # ready entries appended since boot
        self.cuts_done = 0  # ... and stored (or refused) by the shell
        self.http_recent: dict[str, dict[tuple[int, int], None]] = {}

    # -- config --------------------------------------------------------------------

    def apply_config(self, config: GatewayConfig) -> ConfigDiff | None:
        """Take a newer config's devices; None if ``config`` is not newer."""
        if not is_newer(self.config, config):
            return None
        diff = diff_config(self.devices, config.devices)
        self.devices = {d.device_id: d for d in config.devices}
        for device_id in diff.removed:
            self.buckets.forget(device_id)
            self.tracker.forget(device_id)
            self.http_recent.pop(device_id, None)
        for device in config.devices:
            self.buckets.set_rate(device.device_id, device.rate_limit_per_s)
        self.routes = site_routes(config.devices, self.prefix)
        self.lorawan.configure(config.devices)
        self.config = config
        self.counters.configs_applied += 1
        return diff

    # -- rejects -----------------------------------------------------------------

    def reject(self, reason: str, device_id: str, detail: str, payload: bytes, now: int) -> None:
        """Count a reject, queue it for the log and add it to the period's report.

        ``device_id`` is "?" when the topic names no valid id; an id the
        gateway does not serve counts as "other" in the counters, by its id
        (within the report's cap) in the report.
        """
        self.counters.rejects[reason] += 1
        served = device_id in self.devices
        self.counters.device_rejects[device_id if served else "other", reason] += 1
        self.report.add("" if device_id == "?" else device_id, reason, detail, payload, now, served)
        self.events.append(Rejected(reason, device_id, detail))

    def take_events(self) -> list[Event]:
        events, self.events = self.events, []
        return events

    def rate_limited(self, device_id: str, readings: int = 1) -> None:
        """Count readings of ``device_id`` the rate limit dropped; tally them for the log."""
        counters = self.counters
        counters.rate_limited += readings
        counters.device_rate_limited[device_id] += readings
        self.limited[device_id] += readings

    def take_limited(self) -> Counter[str]:
        """Readings dropped by the rate limit per device since the last call."""
        limited, self.limited = self.limited, Counter()
        return limited

    # -- site messages ---------------------------------------------------------------

    def _generation(self, generation: int) -> list[int]:
        if generation != self.acks_generation:
            # Unacknowledged messages of a lost connection come again on
            # the new one; their packet ids mean nothing there.
            self.site_acks = []
            self.acks_generation = generation
        return self.site_acks

    def device_of(self, topic: str) -> str:
        """The device id a site topic names ("?" if none)."""
        route = self.routes.get(topic)
        if route is not None:
            return route[0].device_id
        chirpstack = parse_chirpstack_topic(topic)
        if chirpstack is not None:
            device = self.lorawan.by_eui.get(chirpstack[1])
            return device.device_id if device is not None else unknown_device_id(chirpstack[1])
        try:
            device_id, _kind = parse_device_topic(topic, self.prefix)
        except InputError:
            return "?"
        return device_id

    def site_refused(
        self, *, topic: str, qos: int, packet_id: int, generation: int, detail: str, now: int
    ) -> None:
        """A site message refused unread (too large): counted, acked with the next batch."""
        acks = self._generation(generation)
        self.counters.received += 1
        if qos:
            acks.append(packet_id)
        self.reject("too_large", self.device_of(topic), detail, b"", now)

    def site_messages(self, publishes: list[Publish], *, generation: int, now: int) -> bool:
        """Messages of one socket read, in order; True if a batch is ready to store."""
        acks = self._generation(generation)
        builder = self.builder
        max_rows = builder.max_rows
        ack_threshold = self.ack_threshold
        self.counters.received += len(publishes)
        if len(publishes) < GROUP_MIN_MESSAGES:
            for topic, payload, qos, packet_id, _retain in publishes:
                if qos:
                    acks.append(packet_id)
                self._site_message(topic, payload, now)
                if builder.rows >= max_rows or len(acks) >= ack_threshold:
                    self.cut(now)
                    acks = self.site_acks
            return bool(self.ready)
        plan, checked = self._check_uplinks(publishes, now)
        allow, accept = self.buckets.allow, self._accept
        for (topic, payload, qos, packet_id, _retain), device in zip(publishes, plan, strict=True):
            if qos:
                acks.append(packet_id)
            if device is None:
                self._site_message(topic, payload, now)
            elif (uplink := next(checked[device.device_type])) is None:
                self._device_uplink(device, payload, now)
            # _accept_uplink written out: this loop runs for every reading of a busy site.
            elif allow(device.device_id, now, uplink.ts_ms):
                accept(
                    device,
                    seq=uplink.seq,
                    ts_ms=uplink.ts_ms,
                    recv_ms=now,
                    values=uplink.metrics,
                    boot=uplink.boot,
                )
            else:
                self.rate_limited(device.device_id)
            if builder.rows >= max_rows or len(acks) >= ack_threshold:
                self.cut(now)
                acks = self.site_acks
        return bool(self.ready)

    def _check_uplinks(
        self, publishes: list[Publish], now: int
    ) -> tuple[list[Planned], dict[str, Iterator[DeviceUplink | None]]]:
        """Route a socket read's messages, then check its uplinks type by type.

        Returns, per message, its device if it is an uplink, None for
        anything else (a status, a LoRaWAN event, a topic not served:
        ``_site_message`` handles those); and per device type, the results
        of ``accept_device_uplinks`` for its uplinks in message order. A
        route does not depend on what the messages before did, and the
        checks are pure, so taking them first changes nothing: what is
        accepted, rate-limited, rejected and counted, and in which order, is
        decided in ``site_messages`` as one by one.
        """
        routes = self.routes
        plan: list[Planned] = []
        payloads: dict[str, list[bytes]] = {}
        for topic, payload, _qos, _packet_id, _retain in publishes:
            route = routes.get(topic)
            if route is None or route[1]:
                plan.append(None)
                continue
            device = route[0]
            plan.append(device)
            of_type = payloads.get(device.device_type)
            if of_type is None:
                payloads[device.device_type] = [payload]
            else:
                of_type.append(payload)
        checked = {
            name: iter(accept_device_uplinks(of_type, device_type=name, now_ms=now))
            for name, of_type in payloads.items()
        }
        return plan, checked

    def _site_message(self, topic: str, payload: bytes, now: int) -> None:
        """One device message: reject, count or add it to the builder."""
        route = self.routes.get(topic)
        if route is None:
            if topic.startswith("application/"):
                self._lorawan_event(topic, payload, now)
                return
            try:
                device_id, _kind = parse_device_topic(topic, self.prefix)
            except InputError as exc:
                self.reject(exc.reason, "?", str(exc), payload, now)
                return
            self.reject("unknown_device", device_id, "not in this gateway's config", payload, now)
            return
        device, is_status = route
        device_id = device.device_id
        if is_status:
            try:
                online = decode_device_status(payload) == "online"
            except InputError as exc:
                self.reject(exc.reason, device_id, str(exc), payload, now)
                return
            if self.tracker.set_status(device_id, online=online, now_ms=now):
                self.events.append(StatusChanged(device_id, online))
            return
        self._device_uplink(device, payload, now)

    def _device_uplink(self, device: DeviceConfig, payload: bytes, now: int) -> None:
        """An uplink: decoded and checked, then rejected, rate-limited or accepted."""
        uplink: DeviceUplink | None
        try:
            uplink = decode_device_uplink(payload, device_type=device.device_type, now_ms=now)
        except UnknownMetricError:
            uplink = self._tolerate_unknown(device.device_id, device.device_type, payload, now)
        except InputError as exc:
            self.reject(exc.reason, device.device_id, str(exc), payload, now)
            uplink = None
        if uplink is not None:
            self._accept_uplink(device, uplink, now)

    def _accept_uplink(self, device: DeviceConfig, uplink: DeviceUplink, now: int) -> None:
        """A checked uplink: accepted if its device has a token for its timestamp."""
        if not self.buckets.allow(device.device_id, now, uplink.ts_ms):
            self.rate_limited(device.device_id)
            return
        self._accept(
            device,
            seq=uplink.seq,
            ts_ms=uplink.ts_ms,
            recv_ms=now,
            values=uplink.metrics,
            boot=uplink.boot,
        )

    def _lorawan_event(self, topic: str, payload: bytes, now: int) -> None:
        """A ChirpStack event: a reading, liveness, a join, a repeat or a reject."""
        result = self.lorawan.event(topic, payload, now)
        if isinstance(result, Refused):
            self.reject(result.reason, result.device_id, result.detail, payload, now)
            return
        device = result.device
        if isinstance(result, LorawanUplink):
            if not self.buckets.allow(device.device_id, now, result.ts_ms):
                self.rate_limited(device.device_id)
                return
            self._accept(
                device,
                seq=result.seq,
                ts_ms=result.ts_ms,
                recv_ms=now,
                values=result.values,
                boot=result.boot,
            )
        elif isinstance(result, LorawanStatus):
            if self.tracker.set_status(device.device_id, online=True, now_ms=now):
                self.events.append(StatusChanged(device.device_id, True))
            if result.values:
                # Not a frame: no fCnt for the tracker to follow (gateway.lorawan).
                self.builder.add(
                    device_id=device.device_id,
                    device_type=device.device_type,
                    seq=STATUS_SEQ,
                    ts_ms=result.ts_ms,
                    recv_ms=now,
                    values=result.values,
                    boot=result.boot,
                )
                self.counters.accepted += 1
        elif isinstance(result, LorawanJoin):
            self.events.append(Joined(device.device_id, result.dev_addr))

    def _tolerate_unknown(
        self, device_id: str, device_type: str, payload: bytes, now: int
    ) -> DeviceUplink | None:
        """An uplink naming metrics its type lacks: its known metrics, each unknown one reported.

        None (and the reading rejected) if the type rejects such readings,
        none of its metrics is known, or another check fails.
        """
        try:
            uplink, unknown = decode_device_uplink_tolerant(
                payload, device_type=device_type, now_ms=now
            )
        except InputError as exc:
            self.reject(exc.reason, device_id, str(exc), payload, now)
            return None
        for name in unknown:
            self.reject(
                "unknown_metric",
                device_id,
                f"m.{name!r}: not a metric of {device_type}; the reading's known metrics are kept",
                payload,
                now,
            )
        return uplink

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
        """Track and add one checked reading."""
        obs = self.tracker.observe(device.device_id, seq=seq, boot=boot, now_ms=recv_ms)
        counters = self.counters
        counters.seq_gaps += obs.gap
        counters.duplicates += obs.duplicate
        counters.reboots += obs.reboot
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
        counters.accepted += 1

    # -- serial readings ---------------------------------------------------------------

    def serial_reading(self, device: DeviceConfig, values: dict[str, float], now: int) -> None:
        """A decoded serial frame: seq and time are the gateway's (sensors have neither)."""
        self.counters.received += 1
        dtype = device_type(device.device_type)
        try:
            checked = {name: dtype.metric(name).check(v) for name, v in values.items()}
        except InputError as exc:
            self.reject(exc.reason, device.device_id, str(exc), b"", now)
            return
        if self.outbox_full_since_ms is not None:
            # A sensor cannot be asked to send again later: while the
            # outbox is full its readings are refused and counted.
            self.counters.outbox_refused_readings += 1
            self.refused_this_episode += 1
            return
        if not self.buckets.allow(device.device_id, now):
            self.rate_limited(device.device_id)
            return
        seq = self.serial_seq.get(device.device_id, 0)
        self.serial_seq[device.device_id] = seq + 1
        self._accept(device, seq=seq, ts_ms=now, recv_ms=now, values=checked, boot=self.boot_id)
        if self.builder.rows >= self.builder.max_rows:
            self.cut(now)

    # -- ready queue -----------------------------------------------------------------

    def cut(self, now: int) -> None:
        """Move the builder's rows and the acks they release to the ready queue."""
        batch = self.builder.take(now)
        if batch is not None or self.site_acks or self.http_waiting:
            self.ready.append((batch, self.site_acks, self.acks_generation))
            self.site_acks = []
            self.cuts += 1
            if self.http_waiting:
                self.http_cuts[self.cuts] = self.http_waiting
                self.http_waiting = []

    def take_ready(self, now: int, *, force: bool, idle: bool = False) -> list[Ready]:
        """The ready queue, after cutting the builder if it is due (or ``force``).

        ``idle``: the shell has nothing more waiting to add (the site socket
        reads are handled), so the builder's rows go now rather than at its caps.
        """
        # HTTP requests wait for this cut: it is made at once, so their
        # answers take one fsync, not batch_max_ms.
        if (
            force
            or self.builder.due(now, idle=idle)
            or (self.site_acks and not self.builder.rows)
            or self.http_waiting
        ):
            self.cut(now)
        ready, self.ready = self.ready, []
        return ready

    def hold(self, held: list[Ready]) -> None:
        """Put entries the outbox could not take back at the head of the queue."""
        self.ready[:0] = held

    def outbox_full(self, now: int) -> bool:
        """The outbox refused a ready batch; True if that starts a full episode."""
        if self.outbox_full_since_ms is not None:
            return False
        self.outbox_full_since_ms = now
        return True

    def outbox_has_room(self) -> tuple[int, int] | None:
        """The outbox took everything: (full since ms, readings refused) if an episode ends."""
        since = self.outbox_full_since_ms
        if since is None:
            return None
        refused = self.refused_this_episode
        self.outbox_full_since_ms = None
        self.refused_this_episode = 0
        return since, refused

    # -- liveness ----------------------------------------------------------------------

    def expire(self, now: int, *, override_ms: int = 0) -> list[str]:
        """Devices silent past their type's ``offline_after_s`` go offline (all past
        ``override_ms`` instead, when it is set): the definition the centre uses too.
        """
        if override_ms > 0:
            return self.tracker.expire(now, timeout_ms=override_ms)
        timeouts = {
            device_id: int(_offline_after_s(device.device_type) * 1000)
            for device_id, device in self.devices.items()
        }
        return self.tracker.expire(
            now, timeout_ms=int(DEFAULT_OFFLINE_AFTER_S * 1000), timeouts_ms=timeouts
        )

    # -- HTTP readings -------------------------------------------------------------------

    def http_readings(
        self, device: DeviceConfig, payloads: list[bytes], *, request_id: int, now: int
    ) -> HttpIntake:
        """The uplinks of one HTTP request of ``device`` (authenticated), in order.

        Each is decoded and checked as an MQTT uplink is, then takes a token
        of the device's bucket for its timestamp; the first without a token
        stops the request (it and the rest are left to the device to send
        again). A repeat of a recent
        reading (same seq and ts: the device did not get the answer) is not
        added again. If any was taken, ``request_id`` waits for the next cut.
        """
        if self.outbox_full_since_ms is not None:
            return HttpIntake(outbox_full=True)
        device_id = device.device_id
        self.counters.received += len(payloads)
        recent = self.http_recent.setdefault(device_id, {})
        accepted = duplicates = retry_after_ms = 0
        rejected: list[tuple[int, str, str]] = []
        for index, payload in enumerate(payloads):
            uplink = self._http_uplink(device, payload, now)
            if uplink is None:
                event = self.events[-1]
                assert isinstance(event, Rejected)  # noqa: S101 - _http_uplink queued it
                rejected.append((index, event.reason, event.detail))
                continue
            if not self.buckets.allow(device_id, now, uplink.ts_ms):
                self.rate_limited(device_id, len(payloads) - index)
                retry_after_ms = max(1, self.buckets.retry_after_ms(device_id, now, uplink.ts_ms))
                break
            accepted += 1
            key = (uplink.seq, uplink.ts_ms)
            if key in recent:
                duplicates += 1
                self.counters.duplicates += 1
                continue
            recent[key] = None
            if len(recent) > HTTP_RECENT_KEYS:
                del recent[next(iter(recent))]
            self._accept(
                device,
                seq=uplink.seq,
                ts_ms=uplink.ts_ms,
                recv_ms=now,
                values=uplink.metrics,
                boot=uplink.boot,
            )
            if self.builder.rows >= self.builder.max_rows:
                self.cut(now)
        if accepted:
            self.http_waiting.append(request_id)
        return HttpIntake(
            accepted=accepted,
            duplicates=duplicates,
            rejected=tuple(rejected),
            retry_after_ms=retry_after_ms,
            waits=bool(accepted),
        )

    def _http_uplink(self, device: DeviceConfig, payload: bytes, now: int) -> DeviceUplink | None:
        """One checked uplink, or None after queueing its reject (the last event)."""
        try:
            return decode_device_uplink(payload, device_type=device.device_type, now_ms=now)
        except UnknownMetricError:
            return self._tolerate_unknown(device.device_id, device.device_type, payload, now)
        except InputError as exc:
            self.reject(exc.reason, device.device_id, str(exc), payload, now)
            return None

    def released(self, done: list[Ready], refused: frozenset[str]) -> list[tuple[int, bool]]:
        """The HTTP requests that ``done`` answers, each with whether its readings are stored.

        ``done`` is the head of the ready queue, which the shell has just
        stored; batches whose ids are in ``refused`` were too large for the
        outbox. A refused batch's devices forget their recent readings, so
        that the requests they send again are taken again.
        """
        answers: list[tuple[int, bool]] = []
        for batch, _acks, _generation in done:
            self.cuts_done += 1
            request_ids = self.http_cuts.pop(self.cuts_done, None)
            if not request_ids:
                continue
            stored = batch is None or batch.batch_id not in refused
            if not stored and batch is not None:
                for device_id in batch.devices:
                    self.http_recent.pop(device_id, None)
            answers.extend((request_id, stored) for request_id in request_ids)
        return answers

    def http_unanswered(self) -> list[int]:
        """Every HTTP request still waiting (the gateway is stopping); none waits after this."""
        waiting = [i for ids in self.http_cuts.values() for i in ids] + self.http_waiting
        self.http_cuts.clear()
        self.http_waiting = []
        return waiting
