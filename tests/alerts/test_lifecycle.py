"""The alert lifecycle as a pure function: table-driven, no database."""

from __future__ import annotations

import numpy as np
import pytest

from alerts.lifecycle import (
    Clear,
    Escalate,
    OpenAlert,
    Raise,
    ack_state,
    apply_changes,
    plan_changes,
    was_active,
)
from contracts.errors import AlreadyAcknowledgedError

NOW = 1_900_000_000_000
SEV = {"critical": 0, "major": 1, "minor": 2, "warning": 3, None: -1}


def open_alert(state: str, severity: str, alert_id: int = 7) -> OpenAlert:
    return OpenAlert(alert_id=alert_id, rule_id="r", device_id="d1", state=state, severity=severity)


def plan(open_state: tuple[str, str] | None, active: bool, severity: str | None, value: float):
    opened = {} if open_state is None else {"d1": open_alert(*open_state)}
    return plan_changes(
        rule_id="r",
        device_ids=["d1"],
        site_ids=["s1"],
        open_by_device=opened,
        active=np.array([active]),
        value=np.array([value]),
        severity=np.array([SEV[severity]], np.int8),
        now_ms=NOW,
        message=lambda i: f"msg {i}",
    )


@pytest.mark.parametrize(
    ("open_state", "active", "severity", "value", "expected"),
    [
        # nothing open, inactive: nothing
        (None, False, None, 1.0, []),
        # nothing open, active: raised unacknowledged at its severity and value
        (
            None,
            True,
            "minor",
            50.0,
            [
                Raise(
                    rule_id="r",
                    device_id="d1",
                    site_id="s1",
                    severity="minor",
                    value=50.0,
                    message="msg 0",
                    ts_ms=NOW,
                )
            ],
        ),
        # a NaN value is stored as NULL
        (
            None,
            True,
            "warning",
            float("nan"),
            [
                Raise(
                    rule_id="r",
                    device_id="d1",
                    site_id="s1",
                    severity="warning",
                    value=None,
                    message="msg 0",
                    ts_ms=NOW,
                )
            ],
        ),
        # open and still active at the same or a milder severity: nothing
        (("active_unack", "minor"), True, "minor", 55.0, []),
        (("active_ack", "major"), True, "minor", 55.0, []),
        # worse severity: escalated, and an acknowledged alert needs a new ack
        (
            ("active_unack", "minor"),
            True,
            "major",
            90.0,
            [
                Escalate(
                    alert_id=7,
                    from_state="active_unack",
                    to_state="active_unack",
                    from_severity="minor",
                    severity="major",
                    value=90.0,
                    message="msg 0",
                    ts_ms=NOW,
                )
            ],
        ),
        (
            ("active_ack", "major"),
            True,
            "critical",
            300.0,
            [
                Escalate(
                    alert_id=7,
                    from_state="active_ack",
                    to_state="active_unack",
                    from_severity="major",
                    severity="critical",
                    value=300.0,
                    message="msg 0",
                    ts_ms=NOW,
                )
            ],
        ),
        # condition ended: auto-cleared, keeping the acknowledgement
        (
            ("active_unack", "major"),
            False,
            None,
            10.0,
            [
                Clear(
                    alert_id=7,
                    from_state="active_unack",
                    to_state="cleared_unack",
                    severity="major",
                    value=10.0,
                    ts_ms=NOW,
                )
            ],
        ),
        (
            ("active_ack", "minor"),
            False,
            None,
            10.0,
            [
                Clear(
                    alert_id=7,
                    from_state="active_ack",
                    to_state="cleared_ack",
                    severity="minor",
                    value=10.0,
                    ts_ms=NOW,
                )
            ],
        ),
    ],
)
def test_plan_changes(open_state, active, severity, value, expected):
    assert plan(open_state, active, severity, value) == expected


@pytest.mark.parametrize(
    ("state", "expected"),
    [("active_unack", "active_ack"), ("cleared_unack", "cleared_ack")],
)
def test_ack_moves_unacknowledged_states(state, expected):
    assert ack_state(1, state) == expected


@pytest.mark.parametrize("state", ["active_ack", "cleared_ack"])
def test_ack_twice_is_an_error(state):
    with pytest.raises(AlreadyAcknowledgedError, match="alert 3 is already acknowledged"):
        ack_state(3, state)


def test_many_devices_at_once_and_devices_outside_the_window_are_left_alone():
    opened = {
        "a": open_alert("active_unack", "minor", 1),
        "b": open_alert("active_ack", "minor", 2),
        "gone": open_alert("active_unack", "minor", 3),  # revoked: not in the window
    }
    changes = plan_changes(
        rule_id="r",
        device_ids=["a", "b", "c", "d"],
        site_ids=["s", "s", "s", None],
        open_by_device=opened,
        active=np.array([True, False, True, False]),
        value=np.array([1.0, 2.0, 3.0, 4.0]),
        severity=np.array([2, -1, 3, -1], np.int8),
        now_ms=NOW,
        message=str,
    )
    assert [type(c).__name__ for c in changes] == ["Raise", "Clear"]
    assert changes[0].device_id == "c"
    assert changes[1].alert_id == 2
    after = apply_changes(opened, changes, {"c": 9})
    assert sorted((d, a.alert_id, a.state) for d, a in after.items()) == [
        ("a", 1, "active_unack"),
        ("c", 9, "active_unack"),
        ("gone", 3, "active_unack"),
    ]
    assert was_active(["a", "b", "c"], after).tolist() == [True, False, True]
