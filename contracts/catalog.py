"""The device catalog: device types, their metrics, units and valid ranges.

The catalog is the single description of what devices measure. The gateway
validates readings against it, ingest checks them again, the schema module
generates one wide hypertable per device type from it (a column per metric)
and the simulator draws its signals inside its ranges.

Valid ranges are *physical* ranges: what the sensor can report at all
(datasheet limits), not what is plausible on a given day; plausibility is the
alert rules' business. A value outside its range is a reject, not an alert.
"""

from __future__ import annotations

import enum
import math
from typing import Literal

import msgspec

from contracts.errors import (
    NonFiniteValueError,
    OutOfRangeError,
    UnknownDeviceTypeError,
    UnknownMetricError,
)


class MetricKind(enum.StrEnum):
    FLOAT = "float"
    INT = "int"
    BOOL = "bool"  # carried as 0 / 1 on the wire
    ENUM = "enum"  # small integer code; labels in Metric.labels


class Metric(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    unit: str
    kind: MetricKind
    min: float
    max: float
    description: str
    labels: tuple[str, ...] = ()  # ENUM only: labels[code]

    def check(self, value: float) -> float:
        """Return ``value`` if it is a finite number inside the valid range; raise otherwise."""
        if not math.isfinite(value):
            raise NonFiniteValueError(f"{self.name}: {value!r} is not a finite number")
        if not self.min <= value <= self.max:
            raise OutOfRangeError(
                f"{self.name}: {value!r} {self.unit} is outside [{self.min:g}, {self.max:g}]"
            )
        if self.kind is not MetricKind.FLOAT and value != int(value):
            raise OutOfRangeError(f"{self.name}: {value!r} is not a whole number")
        return value


class DeviceType(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    description: str
    transports: tuple[str, ...]  # "serial", "mqtt"
    metrics: tuple[Metric, ...]
    # An uplink naming a metric this type lacks (newer firmware, a vendor's
    # extra field): "report" stores the known metrics and reports each unknown
    # one (reason unknown_metric); "reject" refuses the whole reading.
    unknown_metrics: Literal["report", "reject"] = "report"

    def metric(self, name: str) -> Metric:
        for metric in self.metrics:
            if metric.name == name:
                return metric
        raise UnknownMetricError(f"device type {self.name!r} has no metric {name!r}")

    @property
    def metric_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.metrics)


def _m(  # noqa: PLR0917 - one catalog row; positional keeps the table readable
    name: str,
    unit: str,
    kind: MetricKind,
    lo: float,
    hi: float,
    description: str,
    labels: tuple[str, ...] = (),
) -> Metric:
    return Metric(
        name=name, unit=unit, kind=kind, min=lo, max=hi, description=description, labels=labels
    )


FLT, INT, BOOL, ENUM = MetricKind.FLOAT, MetricKind.INT, MetricKind.BOOL, MetricKind.ENUM

PRINTER_STATUS_LABELS = ("ok", "paper_low", "paper_out", "jam", "offline")

# Ranges, with their sources:
# - PM: Plantower PMS5003 effective range 0-500 ug/m3, maximum 1000 ug/m3;
#   Nova SDS011 0-999.9 ug/m3. PM10 is allowed to 2000 for heavier monitors.
# - CO2: NDIR sensors (SenseAir S8, SCD30) report 0-10000 ppm.
# - NO2 / O3: electrochemical cells on street monitors, 0-4000 / 0-2000 ug/m3.
# - Temperature / humidity: SHT3x/BME280-class, -40..85 degC, 0..100 %RH.
AIR_QUALITY = DeviceType(
    name="air_quality",
    description="Street or ward-office air-quality monitor (PMS5003 / SDS011 + gas cells)",
    transports=("serial", "mqtt"),
    metrics=(
        _m("pm1", "ug/m3", FLT, 0, 1000, "PM1.0 mass concentration"),
        _m("pm25", "ug/m3", FLT, 0, 1000, "PM2.5 mass concentration"),
        _m("pm10", "ug/m3", FLT, 0, 2000, "PM10 mass concentration"),
        _m("co2", "ppm", FLT, 0, 10000, "Carbon dioxide"),
        _m("no2", "ug/m3", FLT, 0, 4000, "Nitrogen dioxide"),
        _m("o3", "ug/m3", FLT, 0, 2000, "Ozone"),
        _m("temperature", "degC", FLT, -40, 85, "Air temperature"),
        _m("humidity", "%", FLT, 0, 100, "Relative humidity"),
    ),
)

# Kiosk: queue length bounded by a hall's capacity with margin; uptime up to
# ten years in seconds; CPU temperature within the SoC's junction limits.
KIOSK = DeviceType(
    name="kiosk",
    description="Queue-ticket kiosk in a one-stop-shop service hall",
    transports=("mqtt",),
    metrics=(
        _m("queue_length", "people", INT, 0, 5000, "Citizens waiting for a counter"),
        _m("tickets_issued", "tickets", INT, 0, 100000, "Tickets printed since the last reading"),
        _m("paper_level", "%", FLT, 0, 100, "Ticket paper roll remaining"),
        _m(
            "printer_status",
            "",
            ENUM,
            0,
            len(PRINTER_STATUS_LABELS) - 1,
            "Ticket printer state",
            PRINTER_STATUS_LABELS,
        ),
        _m("cpu_temperature", "degC", FLT, -20, 125, "Kiosk computer CPU temperature"),
        _m("uptime", "s", INT, 0, 10 * 365 * 86400, "Seconds since the kiosk booted"),
    ),
)

# Camera counter: counts per reporting interval; a street camera on a busy
# Hanoi road sees a few thousand motorbikes a minute at most.
CAMERA_COUNTER = DeviceType(
    name="camera_counter",
    description="Camera people/vehicle counter at a hall entrance or a street",
    transports=("mqtt",),
    metrics=(
        _m("people_in", "people", INT, 0, 100000, "People entering during the interval"),
        _m("people_out", "people", INT, 0, 100000, "People leaving during the interval"),
        _m("vehicles_in", "vehicles", INT, 0, 100000, "Vehicles inbound during the interval"),
        _m("vehicles_out", "vehicles", INT, 0, 100000, "Vehicles outbound during the interval"),
        _m("occupancy", "people", INT, 0, 100000, "People inside the counted area now"),
    ),
)

CONFERENCE_ENDPOINT = DeviceType(
    name="conference_endpoint",
    description="Video-conference endpoint connecting a commune office to the city",
    transports=("mqtt",),
    metrics=(
        _m("online", "", BOOL, 0, 1, "Endpoint registered with the conference service"),
        _m("packet_loss", "%", FLT, 0, 100, "Media packet loss"),
        _m("jitter", "ms", FLT, 0, 10000, "Media jitter"),
        _m("cpu", "%", FLT, 0, 100, "Endpoint CPU load"),
    ),
)

DEVICE_TYPES: dict[str, DeviceType] = {
    t.name: t for t in (AIR_QUALITY, KIOSK, CAMERA_COUNTER, CONFERENCE_ENDPOINT)
}


def device_type(name: str) -> DeviceType:
    """Look a device type up by name; raise UnknownDeviceTypeError if the catalog lacks it."""
    try:
        return DEVICE_TYPES[name]
    except KeyError:
        known = ", ".join(sorted(DEVICE_TYPES))
        raise UnknownDeviceTypeError(f"unknown device type {name!r} (known: {known})") from None
