"""What a simulated particulate sensor puts on its serial line for one reading.

Pure: a reading's metrics in, one encoded PMS5003 or SDS011 frame out
(codecs in ``contracts.frames``). The fields a reading does not carry are
derived the way the sensors relate them:

- PMS5003: the CF=1 channels equal the atmospheric ones below 30 ug/m3 and
  run about 1.5x higher in heavy pollution (Plantower's two calibrations
  diverge there); particle counts per 0.1 L scale with PM2.5 with the
  typical urban size distribution (about 70% of counted particles below
  0.5 um, a few per 0.1 L above 10 um).
- SDS011: the device id is a stable 16-bit number from the device id.
"""

from __future__ import annotations

import hashlib
from typing import Final

from contracts.frames import Pms5003Frame, Sds011Frame, encode_pms5003, encode_sds011
from firmware_sim.faults import SerialProtocol

# Particles per 0.1 L per ug/m3 of PM2.5 in each size bin (beyond 0.3, 0.5,
# 1.0, 2.5, 5.0, 10 um): typical of urban aerosol readings from PMS5003 units.
_COUNTS_PER_UG: Final = (150.0, 45.0, 8.0, 1.0, 0.3, 0.05)
_CF1_KNEE_UG: Final = 30.0


def _cf1(atm: float) -> int:
    if atm <= _CF1_KNEE_UG:
        return round(atm)
    return round(_CF1_KNEE_UG + (atm - _CF1_KNEE_UG) * 1.5)


def pms5003_frame(metrics: dict[str, float]) -> bytes:
    pm1 = metrics.get("pm1", 0.0)
    pm25 = metrics.get("pm25", 0.0)
    pm10 = metrics.get("pm10", 0.0)
    counts = [round(pm25 * k) for k in _COUNTS_PER_UG]
    return encode_pms5003(
        Pms5003Frame(
            pm1_cf1=_cf1(pm1),
            pm25_cf1=_cf1(pm25),
            pm10_cf1=_cf1(pm10),
            pm1_atm=round(pm1),
            pm25_atm=round(pm25),
            pm10_atm=round(pm10),
            n0_3=counts[0],
            n0_5=counts[1],
            n1_0=counts[2],
            n2_5=counts[3],
            n5_0=counts[4],
            n10=counts[5],
        )
    )


def sds011_id(device_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(device_id.encode(), digest_size=2).digest(), "big")


def sds011_frame(metrics: dict[str, float], device_id: str) -> bytes:
    return encode_sds011(
        Sds011Frame(
            pm25=metrics.get("pm25", 0.0),
            pm10=metrics.get("pm10", 0.0),
            device_id=sds011_id(device_id),
        )
    )


def frame_for(protocol: SerialProtocol, metrics: dict[str, float], device_id: str) -> bytes:
    if protocol == "pms5003":
        return pms5003_frame(metrics)
    return sds011_frame(metrics, device_id)
