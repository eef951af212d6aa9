"""Fault injection: what goes wrong with field devices, on purpose, counted.

A ``FaultPlan`` (frozen, every fault off by default) says how often each
fault happens; a ``FaultInjector`` wraps one device model and turns each
scheduled tick into the messages the faulty device really emits
(``emit(now_ms) -> list[Emission]``), applying:

- stuck value: one metric freezes at its current value for a while;
- spikes: single-sample outliers, in range or beyond the catalog's range
  (which the gateway must reject);
- dropout: messages lost for a while (the device keeps counting seq, so
  the gateway sees a gap of exactly the number dropped);
- reboot: seq back to 0 and a new boot id (the model's ``reboot``);
- clock skew: a constant offset, a drift (ppm) and jumps of up to
  ``clock_jump_max_ms`` either way for a while (an RTC that lost its NTP
  sync), sometimes beyond the gateway's 5-minute future window;
- malformed payloads (MQTT only): invalid JSON, wrong types, unknown metric
  names, a bare ``NaN`` token, a payload over the 4096-byte limit; each is
  built so that ``contracts.messages.decode_device_uplink`` fails with the
  error in ``EXPECTED_ERRORS``;
- flooding: ``flood_factor`` messages per tick for a while;
- serial line faults (``serial_chunks``): garbage bytes between frames,
  frames split across writes, corrupted checksums, as the list of byte
  chunks the serial transport writes;
- LoRaWAN faults (``lorawan_*``): drawn and applied by the simulated
  ChirpStack integration (``firmware_sim.chirpstack``), which owns the
  frames: repeated and out-of-order events, undecodable payloads, unknown
  DevEUIs, re-joins.
- Modbus line faults (drawn and applied by ``firmware_sim.modbusslaves``
  from this plan and the injector's rng): noise before an answer, slow
  answers past the gateway's timeout, wrong CRCs, silent (missing) slaves.

Every fault applied is counted in ``FaultCounters`` and named in the
``Emission``, so tests can compare what the gateway saw with what was
injected. Faults draw from their own Generator (stream ``"faults"`` of the
device), never the model's, so a plan with everything off yields exactly
the model's own messages.

Left to others: encoding serial frames and writing chunks (the serial
transport, with ``contracts`` frame codecs), publishing payloads (the MQTT
transport), pacing (``firmware_sim.fleet.schedule``) and reading the clock.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Annotated, Final, Literal, get_args

import msgspec
import numpy as np

from contracts.catalog import MetricKind
from contracts.errors import (
    FieldTypeError,
    InputError,
    MalformedPayloadError,
    PayloadTooLargeError,
    UnknownMetricError,
)
from contracts.frames import PMS5003_FRAME_BYTES, SDS011_FRAME_BYTES, SensorKind
from contracts.ids import DEFAULT_MAX_FUTURE_MS
from contracts.messages import (
    DEVICE_PAYLOAD_MAX_BYTES,
    DeviceUplink,
    Transport,
    encode_device_uplink,
)
from firmware_sim.models import DeviceModel, device_rng
from firmware_sim.signals import switch_probability

MalformedKind = Literal["invalid_json", "wrong_type", "unknown_metric", "nan_token", "oversized"]
MALFORMED_KINDS: Final[tuple[MalformedKind, ...]] = get_args(MalformedKind)

# What contracts.messages.decode_device_uplink raises for each kind (exact type).
EXPECTED_ERRORS: Final[dict[MalformedKind, type[InputError]]] = {
    "invalid_json": MalformedPayloadError,
    "wrong_type": FieldTypeError,
    "unknown_metric": UnknownMetricError,
    # JSON has no NaN; msgspec refuses the bare token as a syntax error.
    "nan_token": MalformedPayloadError,
    "oversized": PayloadTooLargeError,
}

SerialProtocol = SensorKind

Probability = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
RatePerHour = Annotated[float, msgspec.Meta(ge=0.0)]
Seconds = Annotated[float, msgspec.Meta(gt=0.0)]


class FaultPlan(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How often each fault happens to one device; everything is off by default.

    Episode faults (stuck, dropout, reboot, clock jump, flood) start at a rate
    per hour of simulated time; per-message faults (spike, malformed) and
    per-frame serial faults have a probability. Constraints are checked when
    a plan is loaded (``msgspec.convert``, the fleet description); a plan
    built in code is trusted like any struct.
    """

    stuck_per_h: RatePerHour = 0.0
    stuck_duration_s: Seconds = 600.0
    spike_probability: Probability = 0.0
    # Share of spikes placed beyond the metric's valid range (the rest are
    # in-range outliers in the upper half of the range).
    spike_out_of_range_share: Probability = 0.5
    dropout_per_h: RatePerHour = 0.0
    dropout_duration_s: Seconds = 120.0
    reboot_per_h: RatePerHour = 0.0
    # Device clock = true time + offset + drift * elapsed (+ a jump while one
    # lasts). Cheap RTCs drift 20-100 ppm (2-9 s a day) without NTP.
    clock_offset_ms: int = 0
    clock_drift_ppm: float = 0.0
    clock_jump_per_h: RatePerHour = 0.0
    # Jumps are uniform in [-max, +max]: with 15 minutes, one jump in three
    # lands beyond the gateway's 5-minute future window.
    clock_jump_max_ms: Annotated[int, msgspec.Meta(ge=1)] = 900_000
    clock_jump_duration_s: Seconds = 600.0
    malformed_probability: Probability = 0.0
    malformed_kinds: Annotated[tuple[MalformedKind, ...], msgspec.Meta(min_length=1)] = (
        MALFORMED_KINDS
    )
    flood_per_h: RatePerHour = 0.0
    # A runaway loop sending 10x: well past the gateway's default 5/s limit.
    flood_factor: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 10
    flood_duration_s: Seconds = 30.0
    # Serial only, per frame.
    garbage_probability: Probability = 0.0
    garbage_max_bytes: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 16
    split_probability: Probability = 0.0
    checksum_error_probability: Probability = 0.0
    # Commands (MQTT devices, ``firmware_sim.devicecontrol``), per command:
    # it fails with what such a device says ("printer out of paper", "flash
    # write failed"), or its final answer comes late, command_late_s after
    # the command's catalog timeout_s, when the gateway has given up on it.
    command_failure_probability: Probability = 0.0
    command_late_probability: Probability = 0.0
    command_late_s: Seconds = 10.0
    # LoRaWAN (firmware_sim.chirpstack, the simulated ChirpStack integration),
    # per uplink: ChirpStack publishes the event twice (same deduplicationId);
    # the frame arrives after the next one (out-of-order fCnt); the payload
    # does not decode (Cayenne LPP with an unknown type, or no decoded
    # object); an extra uplink from a DevEUI no gateway has (a neighbour's
    # device on a shared broker: the gateway, subscribed per DevEUI, never
    # sees it). And as an episode: the node joins again (a new DevAddr, fCnt
    # from 0), like a reboot.
    lorawan_duplicate_probability: Probability = 0.0
    lorawan_out_of_order_probability: Probability = 0.0
    lorawan_undecodable_probability: Probability = 0.0
    lorawan_unknown_eui_probability: Probability = 0.0
    lorawan_rejoin_per_h: RatePerHour = 0.0
    # Modbus slaves only (``firmware_sim.modbusslaves``). Per answer: noise
    # bytes on the line just before it (1 to garbage_max_bytes); an answer
    # later than the model's timeout_s (1.5 times it: the gateway has given
    # up); a wrong CRC. Per request: no answer at all (1.0: a slave missing
    # from the bus, never answering).
    modbus_noise_probability: Probability = 0.0
    modbus_slow_probability: Probability = 0.0
    modbus_crc_error_probability: Probability = 0.0
    modbus_silent_probability: Probability = 0.0


class FaultCounters(msgspec.Struct, kw_only=True):
    """What was injected, for comparison with what the gateway counted."""

    ticks: int = 0  # emit() calls
    messages: int = 0  # readings the device produced (each took a seq)
    sent: int = 0  # emissions returned (messages - dropped)
    stuck_episodes: int = 0
    stuck_samples: int = 0  # messages carrying a frozen value
    spikes: int = 0
    spikes_out_of_range: int = 0
    dropout_episodes: int = 0
    dropped: int = 0
    reboots: int = 0
    clock_jumps: int = 0
    skewed: int = 0  # messages whose ts differs from the true send time
    skewed_beyond_window: int = 0  # ts more than 5 minutes ahead of the send time
    malformed: dict[str, int] = msgspec.field(default_factory=dict)  # by kind
    flood_episodes: int = 0
    flood_extra: int = 0  # messages beyond one per tick
    garbage_runs: int = 0
    garbage_bytes: int = 0
    split_frames: int = 0
    corrupted_checksums: int = 0
    modbus_requests: int = 0  # requests addressed to the slave
    modbus_answers: int = 0  # answers written (good, slow, noisy or with a wrong CRC)
    modbus_noise: int = 0
    modbus_slow: int = 0
    modbus_crc_errors: int = 0
    modbus_silent: int = 0  # requests left unanswered

    @property
    def malformed_total(self) -> int:
        return sum(self.malformed.values())


class Emission(msgspec.Struct, frozen=True, kw_only=True):
    """One message a (possibly faulty) device sends."""

    at_ms: int  # when to send it (simulation time); >= the tick's now_ms
    # The reading as the device meant it: after value and clock faults,
    # before any malformation. Serial transports build frames from its metrics.
    uplink: DeviceUplink
    # MQTT: the bytes to publish on d/{device_id}/up. None for serial devices.
    payload: bytes | None
    faults: tuple[str, ...] = ()  # e.g. ("spike_out_of_range:pm25", "malformed:nan_token")
    malformed: MalformedKind | None = None


# --- serial line faults ---------------------------------------------------------------

# Frame layouts (contracts.frames): PMS5003 32 bytes from 0x42 0x4D, the
# checksum in bytes 30-31 (big-endian, so byte 31 is its low byte); SDS011 10
# bytes from 0xAA 0xC0, checksum in byte 8, tail 0xAB.
FRAME_LENGTH: Final[dict[SerialProtocol, int]] = {
    "pms5003": PMS5003_FRAME_BYTES,
    "sds011": SDS011_FRAME_BYTES,
}
CHECKSUM_BYTE: Final[dict[SerialProtocol, int]] = {"pms5003": 31, "sds011": 8}
FRAME_START: Final[dict[SerialProtocol, bytes]] = {"pms5003": b"\x42\x4d", "sds011": b"\xaa\xc0"}
# Garbage never contains a first start byte of either protocol, so the
# decoders in contracts.frames skip exactly the garbage (counted as garbage
# bytes) and still find every frame: the gateway's counts match ours.
_GARBAGE_ALPHABET: Final = np.array([b for b in range(256) if b not in (0x42, 0xAA)], np.uint8)


# What one frame carries (contracts.frames.to_metrics): the PMS5003 its three
# mass channels, the SDS011 PM2.5 and PM10. A serial device's readings and
# value faults are limited to these: nothing else reaches the gateway.
PROTOCOL_METRICS: Final[dict[SerialProtocol, tuple[str, ...]]] = {
    "pms5003": ("pm1", "pm25", "pm10"),
    "sds011": ("pm25", "pm10"),
}


class SerialWrite(msgspec.Struct, frozen=True, kw_only=True):
    """The chunks to write, in order, and what was done to the frames."""

    chunks: list[bytes]
    garbage_runs: int = 0
    garbage_bytes: int = 0
    split_frames: int = 0
    corrupted_checksums: int = 0


def serial_chunks(
    frames: Sequence[bytes], *, protocol: SerialProtocol, plan: FaultPlan, rng: np.random.Generator
) -> SerialWrite:
    """Turn encoded frames into the byte chunks a faulty serial line delivers.

    Per frame: garbage before it (``garbage_probability``, 1..garbage_max_bytes
    bytes), a corrupted checksum (``checksum_error_probability``: the checksum
    byte XOR a non-zero byte, so the sum never matches) and a split into 2-3
    writes (``split_probability``). With every probability 0 the chunks are the
    frames, unchanged. Raises ValueError for a frame that is not ``protocol``'s.

    A decoder from ``contracts.frames`` fed these chunks finds every frame
    that was not corrupted and counts exactly ``garbage_bytes`` of garbage
    plus, per corrupted checksum, one checksum error and that whole
    frame as garbage (the resync may, rarely, also trip over a start pair
    inside the corrupted frame's data).
    """
    length, start = FRAME_LENGTH[protocol], FRAME_START[protocol]
    chunks: list[bytes] = []
    garbage_runs = garbage_bytes = split_frames = corrupted = 0
    for original in frames:
        if len(original) != length or not original.startswith(start):
            raise ValueError(
                f"not a {protocol} frame: {original[:8].hex()}... ({len(original)} bytes)"
            )
        frame = original
        if plan.garbage_probability and rng.random() < plan.garbage_probability:
            size = int(rng.integers(1, plan.garbage_max_bytes + 1))
            chunks.append(rng.choice(_GARBAGE_ALPHABET, size).tobytes())
            garbage_runs += 1
            garbage_bytes += size
        if plan.checksum_error_probability and rng.random() < plan.checksum_error_probability:
            data = bytearray(frame)
            data[CHECKSUM_BYTE[protocol]] ^= int(rng.integers(1, 256))
            frame = bytes(data)
            corrupted += 1
        if plan.split_probability and rng.random() < plan.split_probability:
            pieces = int(rng.integers(2, 4))
            cuts = sorted(rng.choice(np.arange(1, length), pieces - 1, replace=False).tolist())
            bounds = [0, *cuts, length]
            chunks.extend(frame[a:b] for a, b in itertools.pairwise(bounds))
            split_frames += 1
        else:
            chunks.append(frame)
    return SerialWrite(
        chunks=chunks,
        garbage_runs=garbage_runs,
        garbage_bytes=garbage_bytes,
        split_frames=split_frames,
        corrupted_checksums=corrupted,
    )


# --- malformed MQTT payloads --------------------------------------------------------

_JSON: Final = msgspec.json.Encoder()
# A metric no catalog type has (a firmware typo); also the wrong-type variants.
UNKNOWN_METRIC_NAME: Final = "pm2_5"
# Ids are allow-listed lowercase and metric values are numbers: no payload
# contains this string but the one put there.
_NAN_PLACEHOLDER: Final = "__NaN__"


def malformed_payload(uplink: DeviceUplink, kind: MalformedKind, rng: np.random.Generator) -> bytes:
    """A payload from ``uplink`` that the gateway must refuse with ``EXPECTED_ERRORS[kind]``.

    ``uplink`` must be otherwise valid (ts in the window, values in range),
    so that the intended error is the first one the decoder meets; the
    injector builds malformed payloads from the model's own message for that
    reason.
    """
    document: dict[str, object] = {"seq": uplink.seq, "ts": uplink.ts_ms, "m": dict(uplink.metrics)}
    if uplink.boot is not None:
        document["boot"] = uplink.boot
    metrics = document["m"]
    assert isinstance(metrics, dict)  # noqa: S101 - narrowing for mypy
    names = sorted(metrics)
    name = names[int(rng.integers(len(names)))]
    if kind == "invalid_json":
        # Any proper prefix of a JSON object is invalid (the closing brace is
        # missing); a firmware buffer cut short looks like this.
        text = _JSON.encode(document)
        return text[: int(rng.integers(1, len(text)))]
    if kind == "wrong_type":
        variant = int(rng.integers(3))
        if variant == 0:
            document["seq"] = str(uplink.seq)  # a number as a string
        elif variant == 1:
            metrics[name] = str(metrics[name])
        else:
            metrics[name] = [metrics[name]]  # an array instead of a number
        return _JSON.encode(document)
    if kind == "unknown_metric":
        # Alone: the gateway keeps a reading's known metrics and refuses only
        # a reading with none (docs/devices.md), and this one must be refused.
        document["m"] = {UNKNOWN_METRIC_NAME: metrics[name]}
        return _JSON.encode(document)
    if kind == "nan_token":
        # A C firmware printing a float with %f writes NaN / nan bare.
        metrics[name] = _NAN_PLACEHOLDER
        return _JSON.encode(document).replace(b'"' + _NAN_PLACEHOLDER.encode() + b'"', b"NaN")
    # oversized: valid JSON with a debug field appended, past the size limit.
    document["debug"] = "x" * (DEVICE_PAYLOAD_MAX_BYTES + int(rng.integers(1, 1024)))
    return _JSON.encode(document)


# --- the injector ---------------------------------------------------------------------


_NO_EPISODES: Final = [1.0] * 5  # uniforms that start nothing


def _starts(rate_per_h: float, dt_s: float, u: float) -> bool:
    """Does an episode of ``rate_per_h`` start within ``dt_s``, given a uniform ``u``?"""
    return u < switch_probability(rate_per_h / 3600.0, dt_s)


def _spike_value(low: float, high: float, whole: bool, beyond: bool, u: float) -> float:
    width = high - low
    if beyond:
        # 5 % to 100 % of the range above the maximum: clearly impossible.
        value = high + width * (0.05 + 0.95 * u)
        return math.ceil(value) if whole else value
    value = low + width * (0.5 + 0.5 * u)  # an outlier in the upper half of the range
    return round(value) if whole else value


class FaultInjector:
    """One device with its faults: ``emit(now_ms)`` gives the messages of one tick.

    ``period_ms`` is the device's nominal reporting period (flood messages
    are spread over it). Serial devices get no malformed payloads (``payload``
    is None); their line faults go through ``serial_write``, and with a
    ``protocol`` their readings keep only the metrics its frame carries.
    """

    def __init__(
        self,
        model: DeviceModel,
        plan: FaultPlan,
        *,
        transport: Transport = "mqtt",
        protocol: SerialProtocol | None = None,
        period_ms: int = 1000,
        rng: np.random.Generator | None = None,
    ) -> None:
        self.model = model
        self.plan = plan
        self.transport = transport
        self.carried = PROTOCOL_METRICS[protocol] if transport == "serial" and protocol else None
        self.period_ms = period_ms
        self.rng = rng if rng is not None else device_rng(model.seed, model.device_id, "faults")
        self.counters = FaultCounters()
        self._limits = {m.name: m for m in model.device_type.metrics}
        self._last_ms: int | None = None
        self._first_ms: int | None = None
        self._stuck_until_ms = self._dropout_until_ms = self._flood_until_ms = 0
        self._jump_until_ms = 0
        self._jump_ms = 0
        self._stuck_pending = False
        self._stuck_metric: str | None = None
        self._stuck_value: float | None = None
        self._rebooted = False
        self._episodic = any(
            (
                plan.reboot_per_h,
                plan.stuck_per_h,
                plan.dropout_per_h,
                plan.flood_per_h,
                plan.clock_jump_per_h,
            )
        )

    def _update_episodes(self, now_ms: int, dt_s: float) -> None:
        plan, counters = self.plan, self.counters
        # One draw of five uniforms a tick when any episode fault is on (one
        # numpy call costs about as much as five Python comparisons), none
        # when all are off.
        u = self.rng.random(5).tolist() if self._episodic else _NO_EPISODES
        if _starts(plan.reboot_per_h, dt_s, u[0]):
            self.model.reboot(now_ms)
            counters.reboots += 1
            self._rebooted = True
        if now_ms >= self._stuck_until_ms:
            self._stuck_metric = self._stuck_value = None
            self._stuck_pending = False
            if _starts(plan.stuck_per_h, dt_s, u[1]):
                self._stuck_until_ms = now_ms + int(plan.stuck_duration_s * 1000)
                self._stuck_pending = True  # the metric is chosen from the next reading
                counters.stuck_episodes += 1
        if now_ms >= self._dropout_until_ms and _starts(plan.dropout_per_h, dt_s, u[2]):
            self._dropout_until_ms = now_ms + int(plan.dropout_duration_s * 1000)
            counters.dropout_episodes += 1
        if now_ms >= self._flood_until_ms and _starts(plan.flood_per_h, dt_s, u[3]):
            self._flood_until_ms = now_ms + int(plan.flood_duration_s * 1000)
            counters.flood_episodes += 1
        if now_ms >= self._jump_until_ms:
            self._jump_ms = 0
            if _starts(plan.clock_jump_per_h, dt_s, u[4]):
                self._jump_until_ms = now_ms + int(plan.clock_jump_duration_s * 1000)
                self._jump_ms = int(
                    self.rng.integers(-plan.clock_jump_max_ms, plan.clock_jump_max_ms + 1)
                )
                counters.clock_jumps += 1

    def note_reboot(self) -> None:
        """The model was rebooted from outside (a command): tag its next reading "reboot".

        Not counted in ``counters.reboots``, which counts injected reboots.
        """
        self._rebooted = True

    def _pick_stuck_metric(self, metrics: dict[str, float]) -> str:
        # A frozen float reading is the classic stuck sensor; a device that
        # reports only counters freezes a counter instead.
        names = sorted(metrics)
        floats = [n for n in names if self._limits[n].kind is MetricKind.FLOAT]
        names = floats or names
        return names[int(self.rng.integers(len(names)))]

    def clock_offset_ms(self, at_ms: int) -> int:
        """The device clock's error at true time ``at_ms``."""
        plan = self.plan
        elapsed_ms = at_ms - (self._first_ms if self._first_ms is not None else at_ms)
        drift = plan.clock_drift_ppm * 1e-6 * elapsed_ms
        return plan.clock_offset_ms + round(drift) + self._jump_ms

    def emit(self, now_ms: int) -> list[Emission]:
        """Step the device at one scheduled tick; return what it sends (none, one or many)."""
        if self._last_ms is None:
            dt_s = self.period_ms / 1000.0
            self._first_ms = now_ms
        else:
            dt_s = max(0, now_ms - self._last_ms) / 1000.0
        self._last_ms = now_ms
        self.counters.ticks += 1
        self._update_episodes(now_ms, dt_s)
        count = self.plan.flood_factor if now_ms < self._flood_until_ms else 1
        self.counters.flood_extra += count - 1
        emissions = []
        for i in range(count):
            emission = self._message(now_ms + i * self.period_ms // count, flood=count > 1)
            if emission is not None:
                emissions.append(emission)
        return emissions

    def _message(self, at_ms: int, *, flood: bool) -> Emission | None:
        plan, counters = self.plan, self.counters
        uplink = self.model.make_uplink(at_ms)
        counters.messages += 1
        if self.carried is not None:
            metrics = {name: uplink.metrics[name] for name in self.carried}
            uplink = DeviceUplink(
                seq=uplink.seq, ts_ms=uplink.ts_ms, metrics=metrics, boot=uplink.boot
            )
        if at_ms < self._dropout_until_ms:
            counters.dropped += 1
            return None
        faults: list[str] = ["flood"] if flood else []
        if self._rebooted:
            faults.append("reboot")
            self._rebooted = False
        counters.sent += 1
        # A malformed message carries no other fault: the decoder must meet
        # the malformation first for EXPECTED_ERRORS to hold.
        if (
            self.transport == "mqtt"
            and plan.malformed_probability
            and self.rng.random() < plan.malformed_probability
        ):
            kinds = plan.malformed_kinds
            kind = kinds[int(self.rng.integers(len(kinds)))]
            counters.malformed[kind] = counters.malformed.get(kind, 0) + 1
            faults.append(f"malformed:{kind}")
            return Emission(
                at_ms=at_ms,
                uplink=uplink,
                payload=malformed_payload(uplink, kind, self.rng),
                faults=tuple(faults),
                malformed=kind,
            )
        uplink = self._value_and_clock_faults(uplink, at_ms, faults)
        payload = encode_device_uplink(uplink) if self.transport == "mqtt" else None
        return Emission(at_ms=at_ms, uplink=uplink, payload=payload, faults=tuple(faults))

    def _value_and_clock_faults(
        self, uplink: DeviceUplink, at_ms: int, faults: list[str]
    ) -> DeviceUplink:
        plan, counters = self.plan, self.counters
        metrics = uplink.metrics
        changed = False
        if self._stuck_pending:
            self._stuck_pending = False
            self._stuck_metric = self._pick_stuck_metric(metrics)
            self._stuck_value = metrics[self._stuck_metric]  # the value it freezes at
        elif self._stuck_metric is not None and self._stuck_value is not None:
            name = self._stuck_metric
            metrics = {**metrics, name: self._stuck_value}
            changed = True
            counters.stuck_samples += 1
            faults.append(f"stuck:{name}")
        if plan.spike_probability and self.rng.random() < plan.spike_probability:
            u = self.rng.random(3).tolist()
            names = sorted(metrics)
            name = names[min(int(u[0] * len(names)), len(names) - 1)]
            metric = self._limits[name]
            whole = metric.kind is not MetricKind.FLOAT
            # Whole-number metrics with a handful of codes (BOOL, ENUM) have
            # no in-range value that is an outlier: their spikes go beyond.
            beyond = u[1] < plan.spike_out_of_range_share or (
                whole and metric.max - metric.min <= 10
            )
            metrics = {**metrics, name: _spike_value(metric.min, metric.max, whole, beyond, u[2])}
            changed = True
            counters.spikes += 1
            counters.spikes_out_of_range += beyond
            faults.append(f"spike_out_of_range:{name}" if beyond else f"spike:{name}")
        ts_ms = at_ms + self.clock_offset_ms(at_ms)
        if ts_ms != at_ms:
            changed = True
            counters.skewed += 1
            faults.append("skew")
            if ts_ms - at_ms > DEFAULT_MAX_FUTURE_MS:
                counters.skewed_beyond_window += 1
                faults.append("skew_beyond_window")
        if not changed:
            return uplink
        return DeviceUplink(seq=uplink.seq, ts_ms=ts_ms, metrics=metrics, boot=uplink.boot)

    def serial_write(self, frames: Sequence[bytes], protocol: SerialProtocol) -> list[bytes]:
        """``serial_chunks`` with this device's plan and rng; counts what it did."""
        result = serial_chunks(frames, protocol=protocol, plan=self.plan, rng=self.rng)
        counters = self.counters
        counters.garbage_runs += result.garbage_runs
        counters.garbage_bytes += result.garbage_bytes
        counters.split_frames += result.split_frames
        counters.corrupted_checksums += result.corrupted_checksums
        return result.chunks
