"""Per-device liveness and sequence tracking at the gateway.

Pure: the caller passes the time. For each device it keeps the last seq and
boot id, counts gaps (missing seq numbers), duplicates and reboots (a new boot
id, or seq going back), and decides online/offline from the device's Will
(``d/{id}/status``) and from a no-data timeout. Publishing the result is the
caller's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(slots=True)
class DeviceTrack:
    last_seq: int | None = None
    boot: str | None = None
    last_seen_ms: int | None = None
    online: bool = False
    gaps: int = 0
    duplicates: int = 0
    reboots: int = 0


@dataclass(frozen=True, slots=True)
class Observation:
    gap: int  # readings missing between the previous seq and this one
    duplicate: bool  # seq not newer than the last one in the same boot
    reboot: bool
    came_online: bool


# The observation of almost every reading: the next seq of a device already online.
_IN_ORDER = Observation(gap=0, duplicate=False, reboot=False, came_online=False)


class DeviceTracker:
    def __init__(self) -> None:
        self.devices: dict[str, DeviceTrack] = {}

    def track(self, device_id: str) -> DeviceTrack:
        track = self.devices.get(device_id)
        if track is None:
            track = self.devices[device_id] = DeviceTrack()
        return track

    def observe(self, device_id: str, *, seq: int, boot: str | None, now_ms: int) -> Observation:
        track = self.devices.get(device_id) or self.track(device_id)
        reboot = duplicate = False
        gap = 0
        if track.last_seq is not None:
            if boot is not None and track.boot is not None and boot != track.boot:
                reboot = True
            elif seq <= track.last_seq:
                # Without a boot id a seq going back far is a reboot; a small step
                # back or a repeat is a duplicate delivery (QoS 1 resend).
                reboot = boot is None and seq < track.last_seq - 1 and seq <= 1
                duplicate = not reboot
            else:
                gap = seq - track.last_seq - 1
        if reboot:
            track.reboots += 1
        track.gaps += gap
        track.duplicates += duplicate
        came_online = not track.online
        if not duplicate:
            track.last_seq = seq
            if boot is not None:
                track.boot = boot
        track.last_seen_ms = now_ms
        track.online = True
        if not (gap or duplicate or reboot or came_online):
            return _IN_ORDER
        return Observation(gap=gap, duplicate=duplicate, reboot=reboot, came_online=came_online)

    def set_status(self, device_id: str, *, online: bool, now_ms: int) -> bool:
        """Apply a Will/birth status; True if it changed."""
        track = self.track(device_id)
        changed = track.online != online
        track.online = online
        if online:
            track.last_seen_ms = now_ms
        return changed

    def expire(
        self, now_ms: int, *, timeout_ms: int, timeouts_ms: Mapping[str, int] | None = None
    ) -> list[str]:
        """Mark devices silent for their timeout offline; return the ones that just went.

        A device's timeout is ``timeouts_ms[device_id]`` when given, else ``timeout_ms``.
        """
        gone = []
        per_device = timeouts_ms or {}
        for device_id, track in self.devices.items():
            limit = per_device.get(device_id, timeout_ms)
            silent = track.last_seen_ms is not None and now_ms - track.last_seen_ms >= limit
            if track.online and silent:
                track.online = False
                gone.append(device_id)
        return gone

    def forget(self, device_id: str) -> None:
        self.devices.pop(device_id, None)

    def online_count(self) -> int:
        return sum(1 for t in self.devices.values() if t.online)
