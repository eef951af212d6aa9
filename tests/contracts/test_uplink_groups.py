"""accept_device_uplinks, the uplink checks of one socket read, against the one-by-one path.

Random groups of payloads (valid readings, values out of range, NaN and
infinity spelled in JSON, non-whole values of whole-number metrics, unknown
metrics, metric names that vary between readings, bad seq, ts and boot,
payloads too large or not JSON) must get exactly the answers that checking
them one at a time gives.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contracts import messages
from contracts.catalog import DEVICE_TYPES, Metric, MetricKind
from contracts.errors import InputError
from contracts.ids import DEFAULT_MAX_FUTURE_MS, DEFAULT_MAX_PAST_MS
from contracts.messages import SEQ_MAX, accept_device_uplinks, decode_device_uplink

NOW = 1_790_000_000_000
# Small enough that a reading with a few padded metrics passes it.
MAX_BYTES = 400
TYPES = ("kiosk", "air_quality", "satisfaction_terminal", "no_such_type")
# Metric kinds by name (the three types above share no metric name).
DEFAULT_KINDS = {m.name: m.kind for name in TYPES[:3] for m in DEVICE_TYPES[name].metrics}


def _one_by_one(payloads: list[bytes], device_type: str) -> list[messages.DeviceUplink | None]:
    return [
        # The one-by-one reference the group path must equal.
        messages._accept_uplink(
            payload, device_type, NOW, MAX_BYTES, DEFAULT_MAX_PAST_MS, DEFAULT_MAX_FUTURE_MS
        )
        for payload in payloads
    ]


def _good_value(kind: MetricKind, low: float, high: float) -> st.SearchStrategy[str]:
    if kind is MetricKind.FLOAT:
        return st.floats(low, high).map(repr)
    return st.integers(int(low), int(high)).map(str)


# JSON spellings of a bad metric value: NaN and infinities (not JSON, or past
# the float range), whole-number metrics given a fraction, a bool, a string,
# null, an integer past a float's range, values just outside a range.
BAD_VALUES = st.sampled_from(
    [
        "NaN",
        "Infinity",
        "-Infinity",
        "1e999",
        "-1e999",
        "2.5",
        "0.5",
        "true",
        '"12"',
        "null",
        "1" + "0" * 400,
        "-0.000001",
        "1e9",
        "-41",
        "[1]",
    ]
)


# Faults of a reading's seq, ts or boot: the field's bad JSON values.
HEAD_FAULTS = {
    "seq": ["-1", str(SEQ_MAX + 1), "1.5", '"7"'],
    "ts": [str(NOW // 1000), str(NOW + 10**9), "0", "-5"],
    "boot": ['""', '"bad boot!"', json.dumps("x" * 200)],
}
# Payloads that are no reading at all.
NOT_READINGS = {
    "json": [b"{]", b"", b"null", b"[]", b'{"seq": 1}', b"{" * 600],
    "bytes": [b'{"seq": 1, "ts": %d, "m": {"\xff": 1}}' % NOW],
}
METRIC_FAULTS = ("value", "non_whole", "unknown", "empty", "large")
FAULTS = (*METRIC_FAULTS, *HEAD_FAULTS, *NOT_READINGS)


def _break_metrics(
    draw: st.DrawFn, fault: str, fields: dict[str, str], metrics: list[Metric]
) -> dict[str, str]:
    if fault == "value":
        return fields | {draw(st.sampled_from(metrics)).name: draw(BAD_VALUES)}
    whole = [name for name in fields if DEFAULT_KINDS[name] is not MetricKind.FLOAT]
    if fault == "non_whole" and whole:
        return fields | {whole[0]: draw(st.sampled_from(["2.5", "0.5", "1.000001"]))}
    if fault == "empty":
        return {}
    if fault == "large":
        return fields | {"pad": json.dumps("x" * MAX_BYTES)}
    return fields | {"no_such_metric": "1.0"}  # unknown, or non_whole without a whole metric


@st.composite
def readings(
    draw: st.DrawFn, device_type: str, *, names: tuple[str, ...] = (), fault: str | None = None
) -> bytes:
    """One payload: a valid reading, or one with ``fault`` ("any": one of FAULTS).

    Its metrics are ``names`` (in any order) if given, else any of its type's.
    """
    dtype = DEVICE_TYPES.get(device_type) or DEVICE_TYPES["kiosk"]
    metrics = list(dtype.metrics)
    if names:
        chosen = draw(st.permutations([m for m in metrics if m.name in names]))
    else:
        chosen = draw(st.lists(st.sampled_from(metrics), min_size=1, unique=True))
    fields = {m.name: draw(_good_value(m.kind, m.min, m.max)) for m in chosen}
    head = {
        "seq": str(draw(st.integers(0, 1000))),
        "ts": str(NOW - draw(st.integers(0, 60_000))),
        "boot": draw(st.sampled_from([None, '"b00t-1"', '"b00t-2"'])),
    }
    if fault == "any":
        fault = draw(st.sampled_from(FAULTS))
    if fault in NOT_READINGS:
        return draw(st.sampled_from(NOT_READINGS[fault]))
    if fault in HEAD_FAULTS:
        head[fault] = draw(st.sampled_from(HEAD_FAULTS[fault]))
    elif fault is not None:
        fields = _break_metrics(draw, fault, fields, metrics)
    parts = [f'"{key}": {value}' for key, value in head.items() if value is not None]
    parts.append('"m": {' + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}")
    return ("{" + ", ".join(draw(st.permutations(parts))) + "}").encode()


def _shapes(device_type: str) -> st.SearchStrategy[tuple[str, ...]]:
    """The metric names a group's readings share, or () for any."""
    dtype = DEVICE_TYPES.get(device_type) or DEVICE_TYPES["kiosk"]
    shared = st.lists(st.sampled_from(dtype.metric_names), min_size=1, unique=True).map(tuple)
    return st.one_of(st.just(()), shared)


@st.composite
def groups(draw: st.DrawFn) -> tuple[str, list[bytes]]:
    """Good readings of one type with none, one, a few or many bad ones among them.

    The readings have the same metrics (as one firmware sends them), or any.
    """
    device_type = draw(st.sampled_from(TYPES))
    names = draw(_shapes(device_type))
    payloads = draw(st.lists(readings(device_type, names=names), max_size=40))
    bad = draw(st.sampled_from([0, 1, 1, 2, 20]))
    for _ in range(bad):
        index = draw(st.integers(0, len(payloads)))
        payloads.insert(index, draw(readings(device_type, names=names, fault="any")))
    return device_type, payloads


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(groups())
def test_group_checks_answer_as_one_by_one(group: tuple[str, list[bytes]]) -> None:
    device_type, payloads = group
    result = accept_device_uplinks(
        payloads, device_type=device_type, now_ms=NOW, max_bytes=MAX_BYTES
    )
    assert result == _one_by_one(payloads, device_type)
    for payload, uplink in zip(payloads, result, strict=True):
        if uplink is not None:
            assert (
                decode_device_uplink(
                    payload, device_type=device_type, now_ms=NOW, max_bytes=MAX_BYTES
                )
                == uplink
            )


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(TYPES[:3]), st.data())
def test_a_group_of_good_readings_is_accepted_whole(device_type: str, data: st.DataObject) -> None:
    names = data.draw(_shapes(device_type))
    payloads = data.draw(st.lists(readings(device_type, names=names), min_size=16, max_size=60))
    result = accept_device_uplinks(
        payloads, device_type=device_type, now_ms=NOW, max_bytes=MAX_BYTES
    )
    assert None not in result
    assert result == _one_by_one(payloads, device_type)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
@pytest.mark.parametrize("fault", FAULTS)
def test_each_fault_alone_in_a_large_group_is_found(fault: str, data: st.DataObject) -> None:
    device_type = data.draw(st.sampled_from(TYPES[:3]))
    names = data.draw(_shapes(device_type))
    payloads = data.draw(st.lists(readings(device_type, names=names), min_size=16, max_size=40))
    at = data.draw(st.integers(0, len(payloads)))
    payloads.insert(at, data.draw(readings(device_type, names=names, fault=fault)))
    result = accept_device_uplinks(
        payloads, device_type=device_type, now_ms=NOW, max_bytes=MAX_BYTES
    )
    assert result == _one_by_one(payloads, device_type)
    # The others are accepted (the faulty one mostly not: -0.000001 is a fine temperature).
    assert [i for i, u in enumerate(result) if u is None and i != at] == []


@pytest.mark.parametrize("bad", [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999"])
def test_one_bad_value_in_a_large_group_is_found(bad: bytes) -> None:
    good = [
        b'{"seq": %d, "ts": %d, "m": {"queue_length": 3, "paper_level": 50.5}}' % (i, NOW)
        for i in range(30)
    ]
    payloads = [*good[:17], good[17].replace(b"50.5", bad), *good[18:]]
    result = accept_device_uplinks(payloads, device_type="kiosk", now_ms=NOW)
    assert [i for i, u in enumerate(result) if u is None] == [17]
    with pytest.raises(InputError):
        decode_device_uplink(payloads[17], device_type="kiosk", now_ms=NOW)
