"""The alert lifecycle: from one rule's outcome over a window and its open alerts, the changes.

States (``contracts.schema.ALERT_STATES``)::

    (none) --raise--> active_unack --ack--> active_ack
                         |    ^                 |
                   clear |    +--- escalate ----+   (a worse severity needs a new ack)
                         v                      v clear
                    cleared_unack --ack--> cleared_ack

- one active alert per (rule, device): raised when the outcome turns active
  and no alert of the rule is active for the device;
- escalated when the outcome's severity is worse (a lower index into
  ``SEVERITIES``) than the alert's; the alert keeps its worst severity while
  it stays active, so a milder outcome changes nothing;
- auto-cleared when the outcome is no longer active; an acknowledged alert
  clears to ``cleared_ack``, an unacknowledged one to ``cleared_unack``,
  which still waits for an operator;
- acknowledged by an operator (``ack_state``) in either unacknowledged
  state; acknowledging twice is an error;
- assigned to someone (``check_assignable``) in any state but
  ``cleared_ack``, which leaves nobody anything to do; commented on in any
  state. Comments, ack comments and assignees are one line of at most
  ``MAX_NOTE_CHARS`` (``check_note``).

Every change carries its time and the outcome's value; storing changes (and
their transitions) is ``alerts.store``'s job. Pure: no I/O, no clock.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from typing import Final

import msgspec
import numpy as np
import numpy.typing as npt

from contracts.errors import AlertClosedError, AlreadyAcknowledgedError, InvalidNoteError
from contracts.schema import SEVERITIES

ACTIVE_STATES: Final = ("active_unack", "active_ack")
_CLEARED_FROM: Final = {"active_unack": "cleared_unack", "active_ack": "cleared_ack"}
_ACKED_FROM: Final = {"active_unack": "active_ack", "cleared_unack": "cleared_ack"}
# A comment is a line for the next shift, not a report: 1000 characters is
# about 150 words, and what Alertmanager shows of a silence's comment whole.
MAX_NOTE_CHARS: Final = 1000


class OpenAlert(msgspec.Struct, frozen=True, kw_only=True):
    """An active alert as stored: what the lifecycle needs to decide its next change."""

    alert_id: int
    rule_id: str
    device_id: str
    state: str
    severity: str


class Raise(msgspec.Struct, frozen=True, kw_only=True):
    rule_id: str
    device_id: str
    site_id: str | None
    severity: str
    value: float | None
    message: str
    ts_ms: int
    description: str = ""


class Escalate(msgspec.Struct, frozen=True, kw_only=True):
    alert_id: int
    from_state: str
    to_state: str
    from_severity: str
    severity: str
    value: float | None
    message: str
    ts_ms: int
    description: str = ""


class Clear(msgspec.Struct, frozen=True, kw_only=True):
    alert_id: int
    from_state: str
    to_state: str
    severity: str
    value: float | None
    ts_ms: int


Change = Raise | Escalate | Clear


def severity_index(name: str) -> int:
    """Position in SEVERITIES: 0 is the worst (critical)."""
    return SEVERITIES.index(name)


def _value(x: float) -> float | None:
    return x if math.isfinite(x) else None


def was_active(
    device_ids: Sequence[str], open_by_device: Mapping[str, OpenAlert]
) -> npt.NDArray[np.bool_]:
    """(n,) whether each device has an active alert of the rule (for hysteresis)."""
    if not open_by_device:
        return np.zeros(len(device_ids), np.bool_)
    return np.fromiter((d in open_by_device for d in device_ids), np.bool_, len(device_ids))


def plan_changes(
    *,
    rule_id: str,
    device_ids: Sequence[str],
    site_ids: Sequence[str | None],
    open_by_device: Mapping[str, OpenAlert],
    active: npt.NDArray[np.bool_],
    value: npt.NDArray[np.float64],
    severity: npt.NDArray[np.int8],
    now_ms: int,
    message: Callable[[int], str],
    description: Callable[[int], str] | None = None,
) -> list[Change]:
    """One rule's changes at ``now_ms`` from its outcome (arrays over ``device_ids``).

    ``open_by_device``: the rule's active alerts by device id. ``message(i)``
    and ``description(i)`` render the rule's summary and description for
    device ``i`` (at the severity of that moment: an escalation re-renders
    both). Devices absent from ``device_ids`` (revoked, or of another type)
    keep their alerts as they are.
    """
    opened = was_active(device_ids, open_by_device)

    def describe(i: int) -> str:
        return "" if description is None else description(i)

    changes: list[Change] = [
        Raise(
            rule_id=rule_id,
            device_id=device_ids[i],
            site_id=site_ids[i],
            severity=SEVERITIES[int(severity[i])],
            value=_value(float(value[i])),
            message=message(i),
            ts_ms=now_ms,
            description=describe(i),
        )
        for i in np.flatnonzero(active & ~opened).tolist()
    ]
    for i in np.flatnonzero(active & opened).tolist():
        alert = open_by_device[device_ids[i]]
        new = int(severity[i])
        if 0 <= new < severity_index(alert.severity):
            changes.append(
                Escalate(
                    alert_id=alert.alert_id,
                    from_state=alert.state,
                    to_state="active_unack",
                    from_severity=alert.severity,
                    severity=SEVERITIES[new],
                    value=_value(float(value[i])),
                    message=message(i),
                    ts_ms=now_ms,
                    description=describe(i),
                )
            )
    for i in np.flatnonzero(~active & opened).tolist():
        alert = open_by_device[device_ids[i]]
        changes.append(
            Clear(
                alert_id=alert.alert_id,
                from_state=alert.state,
                to_state=_CLEARED_FROM[alert.state],
                severity=alert.severity,
                value=_value(float(value[i])),
                ts_ms=now_ms,
            )
        )
    return changes


def apply_changes(
    open_by_device: Mapping[str, OpenAlert],
    changes: Sequence[Change],
    raised_ids: Mapping[str, int],
) -> dict[str, OpenAlert]:
    """The rule's active alerts after ``changes``; ``raised_ids``: device -> id of new alerts."""
    result = dict(open_by_device)
    by_id = {a.alert_id: d for d, a in result.items()}
    for change in changes:
        if isinstance(change, Raise):
            alert_id = raised_ids.get(change.device_id)
            if alert_id is not None:
                result[change.device_id] = OpenAlert(
                    alert_id=alert_id,
                    rule_id=change.rule_id,
                    device_id=change.device_id,
                    state="active_unack",
                    severity=change.severity,
                )
        elif isinstance(change, Escalate):
            device = by_id[change.alert_id]
            result[device] = msgspec.structs.replace(
                result[device], state=change.to_state, severity=change.severity
            )
        else:
            result.pop(by_id[change.alert_id], None)
    return result


def ack_state(alert_id: int, state: str) -> str:
    """The state an operator's acknowledgement moves an alert in ``state`` to."""
    try:
        return _ACKED_FROM[state]
    except KeyError:
        if state in ("active_ack", "cleared_ack"):
            raise AlreadyAcknowledgedError(
                f"alert {alert_id} is already acknowledged ({state})"
            ) from None
        raise ValueError(f"alert {alert_id}: unknown state {state!r}") from None


def check_note(text: str, what: str = "comment") -> str:
    """``text`` stripped, if it can be stored as an operator's ``what``; InvalidNoteError if not.

    One line: no control characters (newlines, tabs, escapes), which would
    break the command's tables and the receivers' one-line texts.
    """
    stripped = text.strip()
    if not stripped:
        raise InvalidNoteError(f"the {what} is empty")
    if len(stripped) > MAX_NOTE_CHARS:
        raise InvalidNoteError(
            f"the {what} is {len(stripped)} characters long, over {MAX_NOTE_CHARS}"
        )
    for ch in stripped:
        if unicodedata.category(ch) == "Cc":
            raise InvalidNoteError(
                f"the {what} has a control character (U+{ord(ch):04X}): write one line"
            )
    return stripped


def check_assignable(alert_id: int, state: str) -> None:
    """AlertClosedError if an alert in ``state`` cannot be assigned (cleared and acknowledged)."""
    if state == "cleared_ack":
        raise AlertClosedError(
            f"alert {alert_id} is cleared and acknowledged (cleared_ack): nothing to assign"
        )
