"""The simulated fleet: which devices exist, at which sites, with which faults, and when they send.

A ``FleetDescription`` (msgspec, loadable from TOML with
``parse_fleet_description``) names the seed, the time acceleration, the sites
(ids from the seed file, and/or explicit ``[[site]]`` tables), how many
devices of each type each kind of site gets, and the fault plan (defaults
plus per-device overrides). ``build_fleet`` turns it into ``DeviceSpec``s:
deterministic, allow-listed device ids (``aq-{site}-01``,
``kiosk-{site}-01``, ``cam-{site}-01``, ``conf-{site}-01``, ``noise-{site}-01``,
``water-{site}-01``, ``rating-{site}-01``), type, site,
transport (by default air quality over serial, PMS5003 or SDS011; a street
station's noise meter and flood gauge on one Modbus RTU bus, with a second
air monitor and flood sensor on LoRaWAN; one rating terminal per service
hall posting over HTTP; the rest MQTT: ``FleetDescription.transports``),
fault plan and a ready device model. ``send_phases_ms`` and ``schedule`` spread
2,000 devices' sends over the period instead of firing all in the same
millisecond; ``sim_time_ms`` / ``wall_time_ms`` map between wall-clock and
accelerated simulation time.

Pure: the caller reads the seed file and the fleet TOML (``tomllib``) and
passes the parsed documents; ports, brokers and clocks are the transports'.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Final, Literal, TypeVar

import msgspec
import numpy as np
from numpy.typing import NDArray

from contracts.catalog import current_catalog
from contracts.catalog import device_type as device_type_entry
from contracts.errors import InvalidIdError, SettingsError
from contracts.ids import check_id
from contracts.messages import DeviceConfig, Transport
from firmware_sim.faults import FaultInjector, FaultPlan, SerialProtocol
from firmware_sim.models import (
    OFFICE_HOURS,
    AirQualityModel,
    CameraCounterModel,
    CameraParams,
    ConferenceEndpointModel,
    ConferenceEndpointParams,
    DeviceModel,
    KioskModel,
    KioskParams,
    NoiseMeterModel,
    SatisfactionParams,
    SatisfactionTerminalModel,
    WaterLevelModel,
)
from firmware_sim.signals import AirQualityParams, parse_opening_hours

SiteKind = Literal["service_hall", "ward_office", "street_monitor"]
_T = TypeVar("_T")
SERIAL_PROTOCOLS: Final[tuple[SerialProtocol, ...]] = ("pms5003", "sds011")

# Device id prefixes, in catalog order (the order devices are built in).
ID_PREFIX: Final = {
    "air_quality": "aq",
    "kiosk": "kiosk",
    "camera_counter": "cam",
    "conference_endpoint": "conf",
    "noise_meter": "noise",
    "water_level": "water",
    "satisfaction_terminal": "rating",
}


class SiteInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What the simulator needs of a seed-file site; the file's other keys are ignored."""

    id: str
    kind: SiteKind
    opening_hours: str = "24/7"


class _SiteFile(msgspec.Struct, frozen=True):
    site: list[SiteInfo]


Count = Annotated[int, msgspec.Meta(ge=0, le=999)]


class DeviceCounts(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Devices of each type at one site."""

    air_quality: Count = 0
    kiosk: Count = 0
    camera_counter: Count = 0
    conference_endpoint: Count = 0
    noise_meter: Count = 0
    water_level: Count = 0
    satisfaction_terminal: Count = 0


# A one-stop shop: two ticket kiosks, a door counter and rating terminals at
# two of its counters. A ward office: an air monitor in the yard, one kiosk,
# a door counter and the conference endpoint for city meetings. A street
# station: the monitor, a traffic camera, a noise meter and a flood sensor.
DEFAULT_DEVICES: Final[dict[SiteKind, DeviceCounts]] = {
    "service_hall": DeviceCounts(kiosk=2, camera_counter=1, satisfaction_terminal=2),
    "ward_office": DeviceCounts(air_quality=1, kiosk=1, camera_counter=1, conference_endpoint=1),
    "street_monitor": DeviceCounts(air_quality=1, camera_counter=1, noise_meter=1, water_level=1),
}


# Which transports a type's devices at a kind of site use: device number n
# takes the n-th entry (the last one repeats). A type not named: serial for
# air quality, MQTT for the rest. A street station's noise meter and flood
# gauge share one RS-485 bus (Modbus RTU, the way roadside cabinets are
# wired); a second air monitor and a second flood sensor further along the
# street report over LoRaWAN (battery nodes without a cable to the cabinet);
# a hall's second rating terminal can only POST over HTTP.
DEFAULT_TRANSPORTS: Final[dict[SiteKind, dict[str, list[Transport]]]] = {
    "street_monitor": {
        "air_quality": ["serial", "lorawan"],
        "noise_meter": ["modbus"],
        "water_level": ["modbus", "lorawan"],
    },
    "service_hall": {"satisfaction_terminal": ["mqtt", "http"]},
}
DEFAULT_DEVICES["street_monitor"] = DeviceCounts(
    air_quality=2, camera_counter=1, noise_meter=1, water_level=2
)


Percent = Annotated[float, msgspec.Meta(ge=0.0, le=100.0)]
NonNegativeSeconds = Annotated[float, msgspec.Meta(ge=0.0)]


class KioskOverride(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A kiosk's own paper and printer (``KioskParams`` fields; unset: the defaults)."""

    initial_paper_pct: Percent | None = None
    paper_low_pct: Percent | None = None
    refill_after_out_mean_s: NonNegativeSeconds | None = None
    refill_after_low_mean_s: NonNegativeSeconds | None = None
    refill_after_out_s: NonNegativeSeconds | None = None
    jam_probability_per_ticket: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None

    def apply(self, params: KioskParams) -> KioskParams:
        changes = {
            name: getattr(self, name)
            for name in self.__struct_fields__
            if getattr(self, name) is not None
        }
        return msgspec.structs.replace(params, **changes)


# The standard fleet's faults: readings clean, but a field device now and
# then fails a command (a kiosk out of paper, a flash write that fails) or
# answers after the gateway has given up: 2 % each, which a week of
# operation at a few commands a day per site shows. A fleet file's
# ``[faults]`` table replaces this plan as a whole (its unnamed keys are 0).
STANDARD_FAULTS: Final = FaultPlan(command_failure_probability=0.02, command_late_probability=0.02)


class FleetDescription(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A simulated fleet, as written in TOML (every key optional).

    ``devices`` replaces the defaults as a whole: a site kind it does not name
    gets no devices. ``faults`` is every device's ``FaultPlan`` (default:
    ``STANDARD_FAULTS``; a ``[faults]`` table starts from all-off), including
    the command knobs ``command_failure_probability``,
    ``command_late_probability`` and ``command_late_s``. ``overrides`` maps
    a device id to FaultPlan fields that replace the default plan's for that
    device; ``kiosks`` maps a kiosk's id to its paper and printer
    (``KioskOverride``), e.g. a roll that is empty from the start.
    """

    seed: Annotated[int, msgspec.Meta(ge=0)] = 0
    # Simulated milliseconds per wall-clock millisecond.
    time_acceleration: Annotated[float, msgspec.Meta(gt=0.0)] = 1.0
    # Nominal reporting period of every device, in simulated time.
    period_ms: Annotated[int, msgspec.Meta(ge=1)] = 1000
    # Seed-site ids to simulate; empty: every site passed to build_fleet.
    sites: list[str] = msgspec.field(default_factory=list)
    # Explicit sites, written like the seed file's [[site]] tables.
    site: list[SiteInfo] = msgspec.field(default_factory=list)
    devices: dict[SiteKind, DeviceCounts] = msgspec.field(
        default_factory=lambda: dict(DEFAULT_DEVICES)
    )
    # Per site kind and type, the transports of its devices in number order
    # (DEFAULT_TRANSPORTS); replaces the defaults as a whole.
    transports: dict[SiteKind, dict[str, list[Transport]]] = msgspec.field(
        default_factory=lambda: {k: dict(v) for k, v in DEFAULT_TRANSPORTS.items()}
    )
    faults: FaultPlan = STANDARD_FAULTS
    overrides: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    kiosks: dict[str, KioskOverride] = msgspec.field(default_factory=dict)

    def fault_plan(self, device_id: str) -> FaultPlan:
        """The default plan with ``device_id``'s overrides applied; SettingsError if invalid."""
        override = self.overrides.get(device_id)
        if not override:
            return self.faults
        merged = {**msgspec.to_builtins(self.faults), **override}
        return _convert(merged, FaultPlan, f"fleet.overrides.{device_id}")


# msgspec ends a validation message with " - at `$.a.b`" (or " - at `key` in
# `$.a`" for a bad dict key; a dict value's key shows as `[...]`).
_PATH_RE: Final = re.compile(r" - at `(?:key` in `)?\$\.?(?P<path>[^`]*)`$")


def _convert(document: Any, kind: type[_T], key: str) -> _T:
    """msgspec.convert, with validation errors as SettingsError naming the key."""
    try:
        return msgspec.convert(document, kind)
    except msgspec.ValidationError as exc:
        message = str(exc)
        match = _PATH_RE.search(message)
        if match is not None:
            message = message[: match.start()]
            key = f"{key}.{match['path']}" if match["path"] else key
        raise SettingsError(key, message) from None


def parse_sites(document: Mapping[str, Any]) -> list[SiteInfo]:
    """The sites of a parsed seed file (``tomllib.loads`` of hanoi_sites.toml)."""
    sites = _convert(document, _SiteFile, "site").site
    for index, site in enumerate(sites):
        _check_id(site.id, f"site[{index}].id")
    return sites


def parse_fleet_description(document: Mapping[str, Any]) -> FleetDescription:
    """A FleetDescription from parsed TOML; SettingsError names the first bad key."""
    description = _convert(document, FleetDescription, "fleet")
    for index, site in enumerate(description.site):
        _check_id(site.id, f"fleet.site[{index}].id")
        _check_hours(site, f"fleet.site[{index}].opening_hours")
    for device_id in description.overrides:
        _check_id(device_id, f"fleet.overrides.{device_id}")
        description.fault_plan(device_id)
    for device_id in description.kiosks:
        _check_id(device_id, f"fleet.kiosks.{device_id}")
    return description


def _check_id(value: str, key: str) -> None:
    try:
        check_id(value, key)
    except InvalidIdError as exc:
        raise SettingsError(key, str(exc)) from None


def _check_hours(site: SiteInfo, key: str) -> None:
    try:
        parse_opening_hours(site.opening_hours)
    except SettingsError as exc:
        raise SettingsError(key, exc.problem) from None


class DeviceSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One simulated device: identity, placement, transport, faults and its model."""

    device_id: str
    device_type: str
    site_id: str
    transport: Transport
    protocol: SerialProtocol | None  # serial only
    faults: FaultPlan
    model: DeviceModel
    # Modbus and LoRaWAN: the catalog model the device is (its register map,
    # its payload codec); Modbus: its slave id on the site's bus; LoRaWAN:
    # its DevEUI; HTTP: its bearer token (a simulator's token, derived from
    # the seed: nothing to keep secret).
    catalog_model: str | None = None
    slave_id: int | None = None
    dev_eui: str | None = None
    http_token: str | None = None

    def injector(self, *, period_ms: int = 1000) -> FaultInjector:
        """The model behind its fault plan, as the transports drive it."""
        return FaultInjector(self.model, self.faults, transport=self.transport, period_ms=period_ms)

    def device_config(self, *, port: str | None = None) -> DeviceConfig:
        """The gateway's view of this device (``port``: the serial URL or Modbus bus)."""
        token = self.http_token
        return DeviceConfig(
            device_id=self.device_id,
            device_type=self.device_type,
            transport=self.transport,
            port=port if self.transport in ("serial", "modbus") else None,
            protocol=self.protocol,
            label=f"simulated {self.device_type} at {self.site_id}",
            model=self.catalog_model,
            slave_id=self.slave_id,
            dev_eui=self.dev_eui,
            token_sha256=hashlib.sha256(token.encode()).hexdigest() if token else None,
        )


def _stable_hash(*parts: str | int) -> int:
    text = "\x00".join(str(p) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _make_model(
    device_type: str,
    device_id: str,
    seed: int,
    site: SiteInfo,
    number: int,
    *,
    kiosk: KioskOverride | None = None,
) -> DeviceModel:
    hours = parse_opening_hours(site.opening_hours)
    street = site.kind == "street_monitor"
    if device_type == "air_quality":
        # A kerbside station (1.0) against a monitor in an office yard set
        # back from the road: less PM, much less fresh traffic exhaust.
        params = (
            AirQualityParams() if street else AirQualityParams(pm_scale=0.85, traffic_scale=0.7)
        )
        return AirQualityModel(device_id=device_id, seed=seed, params=params)
    if device_type == "kiosk":
        paper = KioskParams(hours=hours)
        return KioskModel(
            device_id=device_id, seed=seed, params=kiosk.apply(paper) if kiosk else paper
        )
    if device_type == "camera_counter":
        camera = CameraParams(mode="street" if street else "hall", hours=hours)
        return CameraCounterModel(device_id=device_id, seed=seed, params=camera)
    if device_type == "conference_endpoint":
        office = OFFICE_HOURS if site.opening_hours == "24/7" else hours
        return ConferenceEndpointModel(
            device_id=device_id, seed=seed, params=ConferenceEndpointParams(office_hours=office)
        )
    if device_type in {"noise_meter", "water_level"}:
        # One street is like another to them: the city's traffic and rain.
        plain = NoiseMeterModel if device_type == "noise_meter" else WaterLevelModel
        return plain(device_id=device_id, seed=seed)
    if device_type == "satisfaction_terminal":
        # The terminal's number is its counter's (quầy 1, 2, ...).
        rating = SatisfactionParams(hours=hours, counter=number)
        return SatisfactionTerminalModel(device_id=device_id, seed=seed, params=rating)
    raise SettingsError("fleet.devices", f"no model for device type {device_type!r}")


def build_fleet(description: FleetDescription, sites: Sequence[SiteInfo]) -> list[DeviceSpec]:
    """The fleet's devices, in site order then catalog order; the same description, the same fleet.

    ``sites`` are the seed sites (``parse_sites``); ``description.sites``
    selects among them and ``description.site`` adds explicit ones. Raises
    SettingsError for an unknown or repeated site id, a device id over the
    allow-list's 64 characters, or an override naming no device.
    """
    known = {site.id: site for site in sites}
    if description.sites:
        missing = [site_id for site_id in description.sites if site_id not in known]
        if missing:
            raise SettingsError("fleet.sites", f"unknown site ids: {', '.join(missing)}")
        chosen = [known[site_id] for site_id in description.sites]
    else:
        chosen = list(sites)
    chosen.extend(description.site)
    seen: set[str] = set()
    for site in chosen:
        if site.id in seen:
            raise SettingsError("fleet.site", f"site {site.id!r} is named twice")
        seen.add(site.id)

    specs: list[DeviceSpec] = []
    # Slave ids handed out on each site's Modbus bus, 1 upwards.
    bus_slaves: dict[str, int] = {}
    for site in chosen:
        counts = description.devices.get(site.kind, DeviceCounts())
        for device_type, prefix in ID_PREFIX.items():
            for number in range(1, int(getattr(counts, device_type)) + 1):
                device_id = f"{prefix}-{site.id}-{number:02d}"
                _check_id(device_id, f"device id for site {site.id!r}")
                transport = _transport(description, site.kind, device_type, number)
                protocol = (
                    SERIAL_PROTOCOLS[_stable_hash(device_id) % len(SERIAL_PROTOCOLS)]
                    if transport == "serial"
                    else None
                )
                slave_id = None
                if transport == "modbus":
                    bus_slaves[site.id] = slave_id = bus_slaves.get(site.id, 0) + 1
                specs.append(
                    DeviceSpec(
                        device_id=device_id,
                        device_type=device_type,
                        site_id=site.id,
                        transport=transport,
                        protocol=protocol,
                        catalog_model=_catalog_model(transport, device_type),
                        slave_id=slave_id,
                        dev_eui=f"{_stable_hash(description.seed, device_id):016x}"
                        if transport == "lorawan"
                        else None,
                        http_token=hashlib.blake2b(
                            f"{description.seed}/{device_id}".encode(), digest_size=24
                        ).hexdigest()
                        if transport == "http"
                        else None,
                        faults=description.fault_plan(device_id),
                        model=_make_model(
                            device_type,
                            device_id,
                            description.seed,
                            site,
                            number,
                            kiosk=description.kiosks.get(device_id),
                        ),
                    )
                )
    unused = set(description.overrides) - {spec.device_id for spec in specs}
    if unused:
        raise SettingsError("fleet.overrides", f"no such devices: {', '.join(sorted(unused))}")
    kiosks = {spec.device_id for spec in specs if spec.device_type == "kiosk"}
    if unknown := set(description.kiosks) - kiosks:
        raise SettingsError("fleet.kiosks", f"no such kiosks: {', '.join(sorted(unknown))}")
    return specs


def _transport(
    description: FleetDescription, kind: SiteKind, device_type: str, number: int
) -> Transport:
    """Device ``number`` (1-based) of a type at a kind of site: its transport."""
    choices = description.transports.get(kind, {}).get(device_type)
    if not choices:
        return "serial" if device_type == "air_quality" else "mqtt"
    transport = choices[min(number, len(choices)) - 1]
    offered = device_type_entry(device_type).transports
    if transport not in offered:
        raise SettingsError(
            f"fleet.transports.{kind}.{device_type}",
            f"a {device_type} device does not speak {transport} (its transports:"
            f" {', '.join(offered)})",
        )
    return transport


def _catalog_model(transport: Transport, device_type: str) -> str | None:
    """The first catalog model of the type for a Modbus or LoRaWAN device; SettingsError if none."""
    if transport not in ("modbus", "lorawan"):
        return None
    catalog = current_catalog()
    models = catalog.modbus_models if transport == "modbus" else catalog.lorawan_models
    for name, model in models.items():
        if model.device_type == device_type:
            return name
    raise SettingsError(
        "fleet.transports", f"the catalog has no {transport} model of type {device_type!r}"
    )


# --- timing -------------------------------------------------------------------------


def send_phases_ms(
    device_ids: Sequence[str], *, seed: int, period_ms: int = 1000
) -> NDArray[np.int64]:
    """Each device's fixed offset within the period, in [0, period_ms).

    From a hash of (seed, device id): stable, and uniform enough that 2,000
    devices at 1 s put ~2 sends in each millisecond instead of 2,000 in one.
    """
    return np.array(
        [_stable_hash(seed, device_id) % period_ms for device_id in device_ids], dtype=np.int64
    )


def schedule(
    phases_ms: NDArray[np.int64],
    *,
    after_ms: int,
    period_ms: int | NDArray[np.int64] = 1000,
    jitter_ms: int = 0,
    rng: np.random.Generator | None = None,
) -> NDArray[np.int64]:
    """Each device's next send time strictly after ``after_ms``.

    The next point ``phase + k * period`` of the device's grid, plus a jitter
    drawn from [0, jitter_ms] (a firmware loop is never exact). The jitter does
    not accumulate: the grid stays fixed. ``rng`` is required when
    ``jitter_ms`` > 0.
    """
    steps = (after_ms - phases_ms) // period_ms + 1
    times = phases_ms + steps * period_ms
    if jitter_ms > 0:
        if rng is None:
            raise ValueError("schedule: jitter_ms > 0 needs an rng")
        times = times + rng.integers(0, jitter_ms + 1, size=times.shape)
    return times.astype(np.int64)


def sim_time_ms(
    wall_ms: int, *, wall_start_ms: int, sim_start_ms: int, time_acceleration: float
) -> int:
    """Simulated time at wall-clock ``wall_ms`` when the simulation runs ``time_acceleration``x."""
    return sim_start_ms + round((wall_ms - wall_start_ms) * time_acceleration)


def wall_time_ms(
    sim_ms: int, *, wall_start_ms: int, sim_start_ms: int, time_acceleration: float
) -> int:
    """Wall-clock time at which simulated time reaches ``sim_ms`` (the inverse of sim_time_ms)."""
    return wall_start_ms + round((sim_ms - sim_start_ms) / time_acceleration)
