"""Device models: the state and readings of one simulated device of each catalog type.

One small class per device type in ``contracts.catalog`` (``AirQualityModel``,
``KioskModel``, ``CameraCounterModel``, ``ConferenceEndpointModel``,
``NoiseMeterModel``, ``WaterLevelModel``, ``SatisfactionTerminalModel``). A model
keeps what the firmware would keep (seq counter, boot id, boot time, paper
roll, printer state, queue, occupancy, ...), advances it to a ``now_ms`` it
is given with ``step(now_ms)`` and returns metric values named exactly as in
the catalog and always inside the catalog's valid ranges (clipped, whole
numbers for integer metrics, rounded to the sensor's resolution). A reading
may leave out a metric the device has no value for (a satisfaction
terminal's rating when nobody rated, a level sensor's depth without an echo).
``make_uplink(now_ms)`` wraps the next reading in a
``contracts.messages.DeviceUplink`` (seq +1 per message, ``boot`` = boot id).

Determinism: a model is fully determined by ``(seed, device_id)`` and the
times it is stepped at. Each device draws from its own numpy Generators,
seeded from the fleet seed and a BLAKE2 hash of the device id (never
Python's salted ``hash()``), with separate streams for the signals, the boot
ids and fault injection, so that a reboot or an enabled fault does not shift
the signal sequence.

Left to others: the signal shapes (``firmware_sim.signals``), breaking
things on purpose (``firmware_sim.faults``), choosing devices and their
sites (``firmware_sim.fleet``), encoding frames and talking to a broker or a
serial port (the transports), and reading the clock (whoever calls step).
"""

from __future__ import annotations

import abc
import hashlib
import math
from typing import ClassVar, Final, Literal

import msgspec
import numpy as np

from contracts import catalog
from contracts.catalog import PRINTER_STATUS_LABELS, DeviceType, MetricKind
from contracts.ids import check_id
from contracts.messages import DeviceUplink
from firmware_sim import signals
from firmware_sim.signals import (
    ALWAYS_OPEN,
    AirQualityParams,
    ConferenceParams,
    ConferenceState,
    FloodParams,
    FloodState,
    HallParams,
    NoiseParams,
    OpeningHours,
    QueueState,
    StreetParams,
)

RngStream = Literal["signal", "boot", "faults", "schedule", "commands"]


def device_rng(seed: int, device_id: str, stream: RngStream) -> np.random.Generator:
    """An independent Generator for one device and purpose, stable across runs and machines.

    ``seed`` must be >= 0 (numpy's SeedSequence takes non-negative entropy).
    """
    digest = hashlib.blake2b(f"{stream}\x00{device_id}".encode(), digest_size=16).digest()
    words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *words])))


PRINTER_OK: Final = PRINTER_STATUS_LABELS.index("ok")
PRINTER_PAPER_LOW: Final = PRINTER_STATUS_LABELS.index("paper_low")
PRINTER_PAPER_OUT: Final = PRINTER_STATUS_LABELS.index("paper_out")
PRINTER_JAM: Final = PRINTER_STATUS_LABELS.index("jam")

# The first reading of a model covers this much time (there is no previous one).
FIRST_STEP_S: Final = 1.0
# Devices have been running for a while when the simulation starts: their
# uptime at the first reading is drawn from [0, 7 days).
MAX_PRIOR_UPTIME_MS: Final = 7 * 86_400_000


class DeviceModel(abc.ABC):
    """Common state and behaviour: seq, boot id, uptime, clipping, uplinks."""

    device_type: ClassVar[DeviceType]
    # Decimals each float metric is rounded to (the sensor's resolution);
    # metrics not named keep 2 decimals.
    decimals: ClassVar[dict[str, int]] = {}

    def __init__(self, *, device_id: str, seed: int) -> None:
        self.device_id = check_id(device_id, "device_id")
        self.seed = seed
        self.rng = device_rng(seed, device_id, "signal")
        self._boot_rng = device_rng(seed, device_id, "boot")
        self.boot_id = self._new_boot_id()
        self._prior_uptime_ms = int(self._boot_rng.integers(0, MAX_PRIOR_UPTIME_MS))
        self.seq = 0  # seq of the next message
        self.boot_ms: int | None = None  # set at the first step (or a reboot)
        self.last_ms: int | None = None
        self.reboots = 0
        # name -> (low, high, whole number?, 10 ** decimals)
        self._limits: dict[str, tuple[float, float, bool, float]] = {
            m.name: (
                m.min,
                m.max,
                m.kind is not MetricKind.FLOAT,
                10.0 ** self.decimals.get(m.name, 2),
            )
            for m in self.device_type.metrics
        }

    def _new_boot_id(self) -> str:
        # 64 random bits as 16 lowercase hex digits: allow-listed and unique enough.
        return f"{int(self._boot_rng.integers(0, 2**63)):016x}"

    def uptime_s(self, now_ms: int) -> int:
        """Whole seconds since boot at ``now_ms`` (0 before the first step)."""
        if self.boot_ms is None:
            return 0
        return max(0, now_ms - self.boot_ms) // 1000

    def step(self, now_ms: int) -> dict[str, float]:
        """Advance to ``now_ms`` and return the reading, clipped into the catalog's ranges.

        A time before the last step advances nothing (zero-length interval).
        """
        if self.last_ms is None:
            dt_s = FIRST_STEP_S
            if self.boot_ms is None:
                self.boot_ms = now_ms - self._prior_uptime_ms
            self.last_ms = now_ms
        else:
            dt_s = max(0, now_ms - self.last_ms) / 1000.0
            self.last_ms = max(self.last_ms, now_ms)
        return self._clip(self._advance(now_ms, dt_s))

    def make_uplink(self, now_ms: int) -> DeviceUplink:
        """The next message: a reading at ``now_ms`` with the next seq and the boot id."""
        metrics = self.step(now_ms)
        message = DeviceUplink(seq=self.seq, ts_ms=now_ms, metrics=metrics, boot=self.boot_id)
        self.seq += 1
        return message

    def reboot(self, now_ms: int) -> None:
        """Restart the firmware: seq back to 0, a new boot id, uptime from ``now_ms``.

        The physical world (weather, queue, paper) carries on.
        """
        self.seq = 0
        self.boot_id = self._new_boot_id()
        self.boot_ms = now_ms
        self.reboots += 1

    def _clip(self, raw: dict[str, float]) -> dict[str, float]:
        # Not round(x, n): it costs ~1 us a call and this runs for every
        # metric of every reading. round(x * 10) / 10 is the double nearest
        # the decimal, so JSON still prints it short (12.3, not 12.300000001).
        out: dict[str, float] = {}
        for name, raw_value in raw.items():
            low, high, whole, scale = self._limits[name]
            # Not max(): max(nan, low) is nan, while this turns NaN into `low`.
            value = raw_value if raw_value >= low else low  # noqa: FURB136
            value = min(value, high)
            out[name] = round(value) if whole else round(value * scale) / scale
        return out

    @abc.abstractmethod
    def _advance(self, now_ms: int, dt_s: float) -> dict[str, float]:
        """Advance the state by ``dt_s`` seconds ending at ``now_ms``; return raw values."""


# --- air quality ----------------------------------------------------------------------


class AirQualityModel(DeviceModel):
    """Street or ward-office monitor: PM1/2.5/10, CO2, NO2, O3, temperature, humidity.

    The model always computes all of them; for a serial (PMS5003 / SDS011)
    device, ``FaultInjector`` with its ``protocol`` keeps only what the frame
    carries.
    """

    device_type = catalog.AIR_QUALITY
    # PMS5003 / SDS011 report 1 / 0.1 ug/m3; gas cells ~0.1 ug/m3; NDIR CO2
    # whole ppm; SHT3x 0.01 degC and 0.01 %RH (reported here to 0.1 %RH).
    decimals: ClassVar[dict[str, int]] = {
        "pm1": 1,
        "pm25": 1,
        "pm10": 1,
        "co2": 0,
        "no2": 1,
        "o3": 1,
        "temperature": 2,
        "humidity": 1,
    }

    def __init__(
        self, *, device_id: str, seed: int, params: AirQualityParams | None = None
    ) -> None:
        super().__init__(device_id=device_id, seed=seed)
        params = params or AirQualityParams()
        u = self.rng.random(2).tolist()
        # Each monitor gets its own fine fractions within Hanoi's ranges
        # (see AirQualityParams) unless the caller fixed them.
        self.params = msgspec.structs.replace(
            params,
            pm1_ratio=0.60 + 0.15 * u[0] if params.pm1_ratio is None else params.pm1_ratio,
            pm10_ratio=1.3 + 0.5 * u[1] if params.pm10_ratio is None else params.pm10_ratio,
        )
        self.weather = signals.start_weather(self.rng)

    def _advance(self, now_ms: int, dt_s: float) -> dict[str, float]:
        self.weather = signals.step_weather(self.weather, dt_s, self.rng)
        return signals.air_quality(now_ms, self.weather, self.params, self.rng)


# --- kiosk ----------------------------------------------------------------------------


class KioskParams(msgspec.Struct, frozen=True, kw_only=True):
    hours: OpeningHours = ALWAYS_OPEN
    hall: HallParams = HallParams()
    # An 80 m thermal roll and ~8 cm tickets: about 1,000 tickets a roll.
    tickets_per_roll: int = 1000
    # The printer's near-end sensor trips with about a tenth of the roll left.
    paper_low_pct: float = 10.0
    # Paper at the first reading; None: drawn from [20, 100) %.
    initial_paper_pct: float | None = None
    # Staff change the roll during opening hours: within ~20 minutes of
    # "paper out", at some point (~2 hours) after "paper low". Closed halls
    # wait for the next morning. math.inf: never.
    refill_after_out_mean_s: float = 1200.0
    refill_after_low_mean_s: float = 7200.0
    # The roll is changed exactly this long (open-hours time) after "paper out",
    # instead of at a random time: a run that must see the printer alert both
    # raised and cleared (`cityhub up`'s notification test). None: random.
    refill_after_out_s: float | None = None
    # Thermal kiosk printers jam rarely: about once every few thousand tickets;
    # staff clear it in ~10 minutes while the hall is open.
    jam_probability_per_ticket: float = 1.0 / 3000.0
    jam_clear_mean_s: float = 600.0


def _rate(mean_s: float) -> float:
    return 0.0 if math.isinf(mean_s) else 1.0 / mean_s


class KioskModel(DeviceModel):
    """Queue-ticket kiosk: tickets per interval, its queue, the paper roll and the printer."""

    device_type = catalog.KIOSK
    decimals: ClassVar[dict[str, int]] = {"paper_level": 1, "cpu_temperature": 1}

    def __init__(self, *, device_id: str, seed: int, params: KioskParams | None = None) -> None:
        super().__init__(device_id=device_id, seed=seed)
        self.params = params or KioskParams()
        first_pct = self.params.initial_paper_pct
        if first_pct is None:
            first_pct = 20.0 + 80.0 * float(self.rng.random())
        self.paper_tickets = round(first_pct / 100.0 * self.params.tickets_per_roll)
        self.jammed = False
        self.out_for_s = 0.0  # open-hours time out of paper (refill_after_out_s)
        self.queue = QueueState()
        # Staff (or the open_queue / close_queue commands) open and close the
        # ticket queue; closed, the kiosk shows ``notice`` and issues nothing.
        self.queue_open = True
        self.notice = ""
        self.tickets_total = 0
        self.refills = 0
        self.jams = 0

    @property
    def paper_pct(self) -> float:
        return 100.0 * self.paper_tickets / self.params.tickets_per_roll

    @property
    def printer_status(self) -> int:
        """Code into ``contracts.catalog.PRINTER_STATUS_LABELS``."""
        if self.jammed:
            return PRINTER_JAM
        if self.paper_tickets <= 0:
            return PRINTER_PAPER_OUT
        if self.paper_pct < self.params.paper_low_pct:
            return PRINTER_PAPER_LOW
        return PRINTER_OK

    def _staff(self, is_open: bool, dt_s: float) -> None:
        """Staff refill the roll and clear jams, only while the hall is open."""
        p = self.params
        if not is_open:
            return
        status = self.printer_status
        if status == PRINTER_JAM:
            if float(self.rng.random()) < signals.switch_probability(
                _rate(p.jam_clear_mean_s), dt_s
            ):
                self.jammed = False
            return
        if status == PRINTER_PAPER_OUT and p.refill_after_out_s is not None:
            self.out_for_s += dt_s
            if self.out_for_s >= p.refill_after_out_s:
                self.paper_tickets = p.tickets_per_roll
                self.refills += 1
                self.out_for_s = 0.0
            return
        if status == PRINTER_PAPER_OUT:
            refill_rate = _rate(p.refill_after_out_mean_s)
        elif status == PRINTER_PAPER_LOW:
            refill_rate = _rate(p.refill_after_low_mean_s)
        else:
            return
        if float(self.rng.random()) < signals.switch_probability(refill_rate, dt_s):
            self.paper_tickets = p.tickets_per_roll
            self.refills += 1

    def _advance(self, now_ms: int, dt_s: float) -> dict[str, float]:
        p = self.params
        lt = signals.hanoi_time(now_ms)
        is_open = p.hours.is_open_at(lt)
        self._staff(is_open, dt_s)
        arrivals = signals.poisson_count(
            signals.arrival_rate_per_h(lt, p.hours, p.hall), dt_s, self.rng
        )
        # Citizens who find the printer down or the queue closed get a number
        # from the desk instead (or come back tomorrow): they are not this
        # kiosk's tickets or queue. The queue already waiting is still served.
        issuing = self.queue_open and not self.jammed
        tickets = min(arrivals, self.paper_tickets) if issuing else 0
        if tickets:
            self.paper_tickets -= tickets
            self.tickets_total += tickets
            p_jam = 1.0 - (1.0 - p.jam_probability_per_ticket) ** tickets
            if float(self.rng.random()) < p_jam:
                self.jammed = True
                self.jams += 1
        self.queue = signals.step_queue(
            self.queue, arrivals=tickets, dt_s=dt_s, is_open=is_open, params=p.hall, rng=self.rng
        )
        # Indoors, partly air-conditioned: the room follows the outdoor
        # climate at a third of its swing around 24 degC; the SoC idles ~20 K
        # above the room and printing adds a few K.
        room_c = 24.0 + 0.3 * (signals.temperature_climate(lt) - 24.0)
        cpu_c = (
            room_c + 20.0 + 4.0 * min(tickets, 3) / 3.0 + 0.5 * float(self.rng.standard_normal())
        )
        return {
            "queue_length": self.queue.waiting,
            "tickets_issued": tickets,
            "paper_level": self.paper_pct,
            "printer_status": self.printer_status,
            "cpu_temperature": cpu_c,
            "uptime": self.uptime_s(now_ms),
        }


# --- camera counter -------------------------------------------------------------------

CameraMode = Literal["hall", "street"]


class CameraParams(msgspec.Struct, frozen=True, kw_only=True):
    # "hall": people in / out and occupancy at a service hall or office door;
    # "street": vehicles in / out on the road.
    mode: CameraMode = "street"
    hours: OpeningHours = ALWAYS_OPEN
    hall: HallParams = HallParams()
    # The door camera sees the citizens of this many kiosk queues.
    hall_queues: int = 2
    street: StreetParams = StreetParams()


class CameraCounterModel(DeviceModel):
    """Camera counter: people and occupancy at a hall door, or vehicles on a street.

    A hall camera reports ``people_in``, ``people_out`` and ``occupancy``; a
    street camera ``vehicles_in`` and ``vehicles_out`` (counts within the
    interval since the previous reading).
    """

    device_type = catalog.CAMERA_COUNTER

    def __init__(self, *, device_id: str, seed: int, params: CameraParams | None = None) -> None:
        super().__init__(device_id=device_id, seed=seed)
        self.params = params or CameraParams()
        # Hall mode: people inside now, by counting in and out since the last
        # reset (the reset_count command sets it).
        self.occupancy = 0

    def _advance(self, now_ms: int, dt_s: float) -> dict[str, float]:
        p = self.params
        if p.mode == "street":
            vehicles_in, vehicles_out = signals.vehicle_counts(now_ms, dt_s, p.street, self.rng)
            return {"vehicles_in": vehicles_in, "vehicles_out": vehicles_out}
        lt = signals.hanoi_time(now_ms)
        is_open = p.hours.is_open_at(lt)
        rate = signals.arrival_rate_per_h(lt, p.hours, p.hall)
        people_in = signals.poisson_count(
            rate * p.hall_queues * p.hall.people_per_citizen, dt_s, self.rng
        )
        self.occupancy, people_out = signals.step_occupancy(
            self.occupancy,
            entering=people_in,
            dt_s=dt_s,
            is_open=is_open,
            params=p.hall,
            rng=self.rng,
        )
        return {"people_in": people_in, "people_out": people_out, "occupancy": self.occupancy}


# --- conference endpoint --------------------------------------------------------------

# Vietnamese government office hours (see cityhub/data/hanoi_sites.toml).
OFFICE_HOURS: Final = signals.parse_opening_hours("Mon-Fri 08:00-12:00,13:00-17:00")


class ConferenceEndpointParams(msgspec.Struct, frozen=True, kw_only=True):
    office_hours: OpeningHours = OFFICE_HOURS
    conference: ConferenceParams = ConferenceParams()


class ConferenceEndpointModel(DeviceModel):
    """Commune-office conference endpoint: online, packet loss, jitter, CPU."""

    device_type = catalog.CONFERENCE_ENDPOINT
    decimals: ClassVar[dict[str, int]] = {"packet_loss": 2, "jitter": 1, "cpu": 1}

    def __init__(
        self, *, device_id: str, seed: int, params: ConferenceEndpointParams | None = None
    ) -> None:
        super().__init__(device_id=device_id, seed=seed)
        self.params = params or ConferenceEndpointParams()
        self.state = ConferenceState()

    def _advance(self, now_ms: int, dt_s: float) -> dict[str, float]:
        self.state, values = signals.step_conference(
            self.state,
            now_ms,
            dt_s,
            office_hours=self.params.office_hours,
            params=self.params.conference,
            rng=self.rng,
        )
        return values


# --- noise meter ----------------------------------------------------------------------


class NoiseMeterModel(DeviceModel):
    """Street noise meter: LAeq, LAmax and LA90 of each reporting interval."""

    device_type = catalog.SHIPPED_CATALOG.types["noise_meter"]
    # Class-2 meters display 0.1 dB.
    decimals: ClassVar[dict[str, int]] = {"laeq": 1, "lamax": 1, "la90": 1}

    def __init__(self, *, device_id: str, seed: int, params: NoiseParams | None = None) -> None:
        super().__init__(device_id=device_id, seed=seed)
        self.params = params or NoiseParams()
        # The correction calibrate_offset set, added to every level (dB).
        self.offset_db = 0.0

    def _advance(self, now_ms: int, dt_s: float) -> dict[str, float]:
        levels = signals.noise_levels(now_ms, dt_s, self.params, self.rng)
        if self.offset_db:
            # A meter reports within its range whatever it is told to add.
            levels = {k: min(130.0, max(30.0, v + self.offset_db)) for k, v in levels.items()}
        return levels


# --- water level ----------------------------------------------------------------------

WATER_TYPE: Final = catalog.SHIPPED_CATALOG.types["water_level"]
SENSOR_OK: Final = WATER_TYPE.metric("sensor_status").labels.index("ok")
SENSOR_NO_ECHO: Final = WATER_TYPE.metric("sensor_status").labels.index("no_echo")


class WaterLevelParams(msgspec.Struct, frozen=True, kw_only=True):
    flood: FloodParams = FloodParams()
    # Below this the road is wet, not flooded: the sensor's zero band.
    zero_band_cm: float = 0.5
    # Ultrasonic sensors lose their echo in heavy rain (drops scatter the
    # pulse): in rain above this intensity, this share of readings has none.
    no_echo_rain_mm_h: float = 40.0
    no_echo_share: float = 0.05
    # A lithium pack lasts about two years at one reading a minute: 0.14 %
    # a day. Charge at the first reading; None: drawn from [40, 100) %.
    battery_drain_pct_per_day: float = 0.14
    initial_battery_pct: float | None = None


class WaterLevelModel(DeviceModel):
    """Street flood sensor: water depth above the road, sensor state, battery."""

    # Milliseconds a gauge on a bus waits before answering (set_response_delay;
    # the VEGAPULS C 21's default is 50 ms).
    response_delay_ms = 50

    device_type = WATER_TYPE
    # 1 mm resolution (ultrasonic / radar level sensors).
    decimals: ClassVar[dict[str, int]] = {"water_depth": 1, "battery": 1}

    def __init__(
        self, *, device_id: str, seed: int, params: WaterLevelParams | None = None
    ) -> None:
        super().__init__(device_id=device_id, seed=seed)
        self.params = params or WaterLevelParams()
        first_pct = self.params.initial_battery_pct
        if first_pct is None:
            first_pct = 40.0 + 60.0 * float(self.rng.random())
        self.battery_pct = first_pct
        self.flood = FloodState()

    def _advance(self, now_ms: int, dt_s: float) -> dict[str, float]:
        p = self.params
        self.flood = signals.step_flood(self.flood, now_ms, dt_s, params=p.flood, rng=self.rng)
        self.battery_pct = max(0.0, self.battery_pct - p.battery_drain_pct_per_day * dt_s / 86_400)
        z, u = self.rng.standard_normal(), self.rng.random()
        values: dict[str, float] = {"battery": self.battery_pct}
        if self.flood.intensity_mm_h > p.no_echo_rain_mm_h and u < p.no_echo_share:
            values["sensor_status"] = SENSOR_NO_ECHO
            return values
        depth = self.flood.depth_cm
        # +-0.3 cm of ripple and sensor noise on standing water; a dry or
        # merely wet road reads 0.
        values["water_depth"] = depth + 0.3 * float(z) if depth >= p.zero_band_cm else 0.0
        values["sensor_status"] = SENSOR_OK
        return values


# --- satisfaction terminal ------------------------------------------------------------


class SatisfactionParams(msgspec.Struct, frozen=True, kw_only=True):
    hours: OpeningHours = ALWAYS_OPEN
    hall: HallParams = HallParams()
    counter: int = 1


class SatisfactionTerminalModel(DeviceModel):
    """Rating buttons at one counter: the counter number, and a rating when a citizen rated.

    The counter serves its share (1 / ``hall.counters``) of a kiosk queue's
    citizens; a reading carries the rating of the last citizen who rated
    since the previous reading, or only the counter when nobody did. At a
    period of a few seconds a counter (~10 citizens an hour) rarely has two.
    """

    device_type = catalog.SHIPPED_CATALOG.types["satisfaction_terminal"]

    def __init__(
        self, *, device_id: str, seed: int, params: SatisfactionParams | None = None
    ) -> None:
        super().__init__(device_id=device_id, seed=seed)
        self.params = params or SatisfactionParams()
        self.ratings = [0, 0, 0]  # by code, for tests and the curious

    def _advance(self, now_ms: int, dt_s: float) -> dict[str, float]:
        p = self.params
        lt = signals.hanoi_time(now_ms)
        rate = signals.arrival_rate_per_h(lt, p.hours, p.hall) / p.hall.counters
        rating = signals.draw_rating(rate, dt_s, self.rng)
        if rating is None:
            return {"counter": p.counter}
        self.ratings[rating] += 1
        return {"counter": p.counter, "rating": rating}


MODEL_CLASSES: Final[dict[str, type[DeviceModel]]] = {
    cls.device_type.name: cls
    for cls in (
        AirQualityModel,
        KioskModel,
        CameraCounterModel,
        ConferenceEndpointModel,
        NoiseMeterModel,
        WaterLevelModel,
        SatisfactionTerminalModel,
    )
}
