"""The gateway's command decisions: what a message, an answer or the clock changes.

Pure: the held commands, the device list, the devices' online-ness and
``now_ms`` in; ``Change`` values out, each the new record of one command and
the report (``contracts.commands.CommandReport``) its new state owes the
centre, if any. The shell (``gateway.service``) stores each change and its
report in one fsynced transaction, then does what it implies (publish the
command to the device, count, log).

A held command's ``state`` is a ``contracts.commands.CommandState`` or
``delivering``, the gateway's own step between ``sent`` and ``delivered``:
the command has been handed to the device (published, or its frame written)
and no answer has come yet. The centre hears ``sent`` for it. A command is
kept once by its id: a copy that comes again changes nothing (its current
report is queued again, in case the centre missed it); a final command stays
as a tombstone until a day past its expiry (``prunable``), so a late copy is
still recognised. A cancel for an id the gateway has never held leaves a
tombstone too (``device_id`` UNKNOWN_DEVICE): the command, if it comes
later, is refused as cancelled.

Delivery itself (MQTT, serial), the store and the clock are not this
module's business.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Final

from contracts.catalog import DeviceType
from contracts.commands import (
    COMMAND_TTL_MAX_S,
    FINAL_STATES,
    Command,
    CommandReport,
    CommandState,
    DeviceAnswer,
    GatewayCommands,
    advances,
    check_command_message,
    make_report,
)
from contracts.errors import CommandRefusedError, InputError, UnknownCommandError
from contracts.messages import DeviceConfig

# Handed to the device, no answer yet: the centre hears "sent".
DELIVERING: Final = "delivering"
# The device a cancel tombstone names: the cancel came for an id never held.
UNKNOWN_DEVICE: Final = "unknown"
# Final commands are kept this long past their expiry to recognise late copies:
# the centre resends a command for at most its ttl (a day at most).
TOMBSTONE_KEEP_MS: Final = 86_400_000

_ACTIVE: Final = frozenset({CommandState.SENT, DELIVERING, CommandState.DELIVERED})
# MQTT Reason Code names a site broker may give a refused PUBLISH (MQTT 5.0 3.4.2.1).
_PUBACK_REASONS: Final = {
    0x80: "unspecified error",
    0x83: "implementation specific error",
    0x87: "not authorized",
    0x90: "topic name invalid",
    0x91: "packet identifier in use",
    0x97: "quota exceeded",
    0x99: "payload format invalid",
}


@dataclass(frozen=True, slots=True)
class Held:
    """One command the gateway holds (or remembers, when final)."""

    command_id: str
    device_id: str
    # None: the tombstone of a cancel for a command never held.
    command: Command | None
    state: str
    expires_ms: int
    delivered_ms: int | None = None  # last handed to the device
    deadline_ms: int | None = None  # no final answer by then: failed

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


@dataclass(frozen=True, slots=True)
class Change:
    """A command's new record and the report it owes the centre (None: nothing to say)."""

    held: Held
    report: CommandReport | None


def public_state(state: str) -> str:
    """The state the centre knows for a held state: ``delivering`` is still ``sent``."""
    return CommandState.SENT if state == DELIVERING else state


def _finish(held: Held, state: str, now_ms: int, detail: str) -> Change:
    done = replace(held, state=state, deadline_ms=None)
    return Change(done, make_report(held.command_id, held.device_id, state, now_ms, detail=detail))


def _refuse(command: Command, state: str, now_ms: int, detail: str) -> Change:
    """A command the gateway will not deliver, kept as a final tombstone."""
    held = Held(
        command_id=command.command_id,
        device_id=command.device_id,
        command=command,
        state=state,
        expires_ms=command.expires_ms,
    )
    return Change(held, make_report(command, command.device_id, state, now_ms, detail=detail))


def _admit(
    command: Command,
    *,
    devices: Mapping[str, DeviceConfig],
    types: Mapping[str, DeviceType],
    gateway_id: str,
    now_ms: int,
) -> Change:
    """A command new to the gateway: held as ``sent``, or refused with its reason."""
    device = devices.get(command.device_id)
    if device is None or not device.enabled:
        return _refuse(
            command,
            CommandState.FAILED,
            now_ms,
            f"device {command.device_id} is not served by gateway {gateway_id}",
        )
    if now_ms >= command.expires_ms:
        return _refuse(
            command, CommandState.EXPIRED, now_ms, "its ttl passed before it reached the gateway"
        )
    dtype = types.get(device.device_type)
    if dtype is None:
        return _refuse(
            command,
            CommandState.FAILED,
            now_ms,
            f"device type {device.device_type} is unknown to gateway {gateway_id}",
        )
    try:
        checked = check_command_message(command, dtype)
    except (CommandRefusedError, InputError) as exc:
        return _refuse(command, CommandState.FAILED, now_ms, str(exc))
    held = Held(
        command_id=checked.command_id,
        device_id=checked.device_id,
        command=checked,
        state=CommandState.SENT,
        expires_ms=checked.expires_ms,
    )
    return Change(held, make_report(checked, checked.device_id, CommandState.SENT, now_ms))


def again(held: Held, now_ms: int, device_id: str | None = None) -> Change:
    """A copy of a held command: nothing changes; its current state's report is due again.

    The store keeps one report per id, so a report not yet acked is not
    doubled; one acked long ago is sent again, for a centre that lost it.
    ``device_id``: the copy's, for a cancel tombstone that did not know it.
    """
    state = public_state(held.state)
    device = device_id or held.device_id
    return Change(held, make_report(held.command_id, device, state, now_ms))


def receive_commands(
    message: GatewayCommands,
    *,
    held: Mapping[str, Held],
    devices: Mapping[str, DeviceConfig],
    types: Mapping[str, DeviceType],
    gateway_id: str,
    now_ms: int,
) -> list[Change]:
    """What a (checked) GatewayCommands changes: its commands first, then its cancels.

    A command already held (by id) is ``again``; one for a device this gateway
    does not serve is failed; one past its expiry expired; one whose args the
    device's catalog type refuses failed with the refusal; the rest are held
    as ``sent``. A cancel cancels a held command not yet handed to its device,
    leaves one already handed (or final) alone, and leaves a cancelled
    tombstone for an id never held.
    """
    seen = dict(held)
    changes: list[Change] = []
    for command in message.commands:
        current = seen.get(command.command_id)
        if current is not None:
            # A cancel tombstone learns the device from the late command.
            change = again(current, now_ms, command.device_id)
        else:
            change = _admit(
                command, devices=devices, types=types, gateway_id=gateway_id, now_ms=now_ms
            )
        seen[command.command_id] = change.held
        changes.append(change)
    for command_id in message.cancel:
        cancelled = cancel(seen.get(command_id), command_id, now_ms)
        if cancelled is not None:
            seen[command_id] = cancelled.held
            changes.append(cancelled)
    return changes


def cancel(current: Held | None, command_id: str, now_ms: int) -> Change | None:
    """A cancel for ``command_id``: cancelled if not yet handed to the device, else None."""
    detail = "cancelled by an operator before it reached the device"
    if current is None:
        tombstone = Held(
            command_id=command_id,
            device_id=UNKNOWN_DEVICE,
            command=None,
            state=CommandState.SENT,
            expires_ms=now_ms + COMMAND_TTL_MAX_S * 1000,
        )
        return _finish(
            tombstone, CommandState.CANCELLED, now_ms, detail + " (the gateway never held it)"
        )
    if current.state != CommandState.SENT:
        return None  # handed to the device already, or final: the outcome comes as usual
    return _finish(current, CommandState.CANCELLED, now_ms, detail)


def deliverable(held: Iterable[Held], *, online: Container[str], now_ms: int) -> list[Held]:
    """Held commands to hand to their device now: ``sent``, unexpired, the device online."""
    return [
        h
        for h in held
        if h.state == CommandState.SENT and now_ms < h.expires_ms and h.device_id in online
    ]


def start_delivery(held: Held, *, timeout_s: float, now_ms: int) -> Change:
    """Handed (again) to the device: ``delivering`` (or still ``delivered``), a new deadline.

    No report: the centre learns ``delivered`` from the device's answer.
    """
    state = DELIVERING if held.state == CommandState.SENT else held.state
    started = replace(
        held, state=state, delivered_ms=now_ms, deadline_ms=now_ms + round(timeout_s * 1000)
    )
    return Change(started, None)


def sweep(
    held: Iterable[Held], *, devices: Mapping[str, DeviceConfig], gateway_id: str, now_ms: int
) -> list[Change]:
    """What the clock and the device list decide.

    ``sent`` past its expiry: expired, the device stayed offline; ``sent`` for
    a device no longer served: failed; handed to the device with no final
    answer by its deadline: failed.
    """
    changes = []
    for h in held:
        if h.state == CommandState.SENT:
            device = devices.get(h.device_id)
            if device is None or not device.enabled:
                changes.append(
                    _finish(
                        h,
                        CommandState.FAILED,
                        now_ms,
                        f"device {h.device_id} is no longer served by gateway {gateway_id}",
                    )
                )
            elif now_ms >= h.expires_ms:
                changes.append(
                    _finish(h, CommandState.EXPIRED, now_ms, "the device stayed offline")
                )
        elif (
            h.state in (DELIVERING, CommandState.DELIVERED)
            and h.deadline_ms is not None
            and now_ms >= h.deadline_ms
        ):
            waited_s = (h.deadline_ms - (h.delivered_ms or h.deadline_ms)) / 1000
            changes.append(
                _finish(
                    h,
                    CommandState.FAILED,
                    now_ms,
                    f"no answer from the device within {waited_s:g} s",
                )
            )
    return changes


def receive_answer(
    current: Held | None, *, device_id: str, answer: DeviceAnswer, now_ms: int
) -> Change | None:
    """A device's (checked) answer: the change it makes, or None if it changes nothing.

    Raises UnknownCommandError for an id not held, or held for another device.
    An answer that does not advance the command (a repeat after a
    redelivery, ``delivered`` after the final state) changes nothing.
    """
    if current is None or current.device_id != device_id or current.command is None:
        raise UnknownCommandError(
            f"answer from {device_id} for command {answer.command_id!r}: "
            "not a command this gateway holds for that device"
        )
    if not advances(public_state(current.state), answer.state):
        return None
    if answer.state == CommandState.DELIVERED:
        updated = replace(current, state=CommandState.DELIVERED)
    else:
        updated = replace(current, state=answer.state, deadline_ms=None)
    report = make_report(
        current.command_id,
        current.device_id,
        answer.state,
        now_ms,
        detail=answer.detail,
        answer=answer.answer,
    )
    return Change(updated, report)


def refused_by_broker(current: Held | None, reason_code: int, now_ms: int) -> Change | None:
    """The site broker refused the command's PUBLISH (reason code >= 0x80): failed."""
    if current is None or current.state not in (DELIVERING, CommandState.DELIVERED):
        return None
    name = _PUBACK_REASONS.get(reason_code, "refused")
    return _finish(
        current,
        CommandState.FAILED,
        now_ms,
        f"the site broker refused the command: reason code 0x{reason_code:02x} ({name})",
    )


def fail(current: Held, detail: str, now_ms: int) -> Change | None:
    """Fail a command not yet final (serial delivery that cannot be done, interrupted)."""
    if current.final:
        return None
    return _finish(current, CommandState.FAILED, now_ms, detail)


def interrupted(held: Iterable[Held], *, serial: Container[str], now_ms: int) -> list[Change]:
    """After a restart: serial commands found handed to the sensor cannot be answered now."""
    detail = "interrupted: the gateway restarted before the sensor answered"
    return [
        _finish(h, CommandState.FAILED, now_ms, detail)
        for h in held
        if h.state in (DELIVERING, CommandState.DELIVERED) and h.device_id in serial
    ]


def redeliverable(held: Iterable[Held], *, published: Container[str]) -> list[Held]:
    """Commands handed to an MQTT device but not published since this gateway started.

    After a restart each is published again unchanged: the device keeps each
    command id once and answers again.
    """
    return [
        h
        for h in held
        if h.state in (DELIVERING, CommandState.DELIVERED) and h.command_id not in published
    ]


def prunable(held: Iterable[Held], now_ms: int) -> list[str]:
    """Final commands a day past their expiry: no copy of them can come any more."""
    return [h.command_id for h in held if h.final and now_ms > h.expires_ms + TOMBSTONE_KEEP_MS]


def is_active(held: Held) -> bool:
    return held.state in _ACTIVE
