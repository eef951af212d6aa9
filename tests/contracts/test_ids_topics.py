"""Ids, batch ids, timestamps and MQTT topics: table-driven and property-based tests."""

from __future__ import annotations

import contextlib
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contracts.errors import InvalidIdError, InvalidTopicError, TimestampWindowError
from contracts.ids import (
    BATCH_COUNTER_MAX,
    DEFAULT_MAX_FUTURE_MS,
    DEFAULT_MAX_PAST_MS,
    batch_id,
    check_id,
    check_timestamp,
    parse_batch_id,
)
from contracts.topics import (
    DEVICE_TOPIC_KINDS,
    GATEWAY_TOPIC_KINDS,
    ack_topic,
    batch_topic,
    check_prefix,
    config_topic,
    device_answer_topic,
    device_command_topic,
    device_status_filter,
    device_status_topic,
    device_uplink_filter,
    device_uplink_topic,
    gateway_filter,
    gateway_topic,
    ingest_batch_filter,
    parse_device_topic,
    parse_gateway_topic,
    state_topic,
)

NOW_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z

ids = st.from_regex(r"[a-z0-9][a-z0-9-]{0,63}", fullmatch=True)
_ALLOWED = set(string.ascii_lowercase + string.digits + "-")

prefix_levels = st.text(
    alphabet=st.characters(exclude_characters="/+#\x00$", exclude_categories=["Cs"]),
    min_size=1,
    max_size=8,
)
prefixes = st.lists(prefix_levels, max_size=3).map("/".join)


def _id_oracle(value: str) -> bool:
    """The allow-list spelled out without a regex."""
    return 1 <= len(value) <= 64 and value[0] != "-" and set(value) <= _ALLOWED


def _mqtt_matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic matching (single-level `+`, trailing `#`), shared-subscription aware."""
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2]
    f_levels, t_levels = topic_filter.split("/"), topic.split("/")
    for index, level in enumerate(f_levels):
        if level == "#":
            return True
        if index >= len(t_levels) or (level not in ("+", t_levels[index])):
            return False
    return len(f_levels) == len(t_levels)


# --- ids ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["a", "0", "gw-hn-001", "0123456789abcdef", "a" * 64, "a-", "9-9-9"]
)
def test_check_id_accepts_allow_listed(value):
    assert check_id(value) == value


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("", id="empty"),
        pytest.param("A", id="uppercase"),
        pytest.param("gw-HN", id="mixed-case"),
        pytest.param("-gw", id="leading-dash"),
        pytest.param("a" * 65, id="65-chars"),
        pytest.param("+", id="plus-wildcard"),
        pytest.param("#", id="hash-wildcard"),
        pytest.param("gw+1", id="embedded-plus"),
        pytest.param("a/b", id="slash"),
        pytest.param("abc\n", id="trailing-newline"),
        pytest.param("\nabc", id="leading-newline"),
        pytest.param("caf\u00e9", id="unicode-letter"),
        pytest.param("\uff41", id="fullwidth-a"),
        pytest.param("\u0661", id="arabic-digit"),
        pytest.param("a b", id="space"),
        pytest.param("a_b", id="underscore"),
        pytest.param("a.b", id="dot"),
        pytest.param("a:b", id="colon"),
        pytest.param("a\x00", id="nul"),
        pytest.param("$sys", id="dollar"),
    ],
)
def test_check_id_rejects(value):
    with pytest.raises(InvalidIdError) as info:
        check_id(value, "device_id")
    assert "device_id" in str(info.value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("value", [None, 5, b"abc", ["a"]])
def test_check_id_rejects_non_strings(value):
    with pytest.raises(InvalidIdError, match="must be a string"):
        check_id(value)


@given(ids)
def test_generated_ids_pass(value):
    assert check_id(value) == value


@given(st.text(max_size=70))
def test_check_id_agrees_with_oracle(value):
    if _id_oracle(value):
        assert check_id(value) == value
    else:
        with pytest.raises(InvalidIdError):
            check_id(value)


# --- batch ids ----------------------------------------------------------------


def test_batch_id_format():
    assert batch_id("gw-hn-001", "0123456789abcdef", 42) == "gw-hn-001:0123456789abcdef:42"
    assert parse_batch_id("gw-hn-001:0123456789abcdef:42") == ("gw-hn-001", "0123456789abcdef", 42)


@given(ids, ids, st.integers(0, BATCH_COUNTER_MAX))
def test_batch_id_round_trip(gateway_id, boot_id, counter):
    value = batch_id(gateway_id, boot_id, counter)
    assert parse_batch_id(value) == (gateway_id, boot_id, counter)


@pytest.mark.parametrize(
    ("gateway_id", "boot_id", "counter"),
    [
        pytest.param("GW", "boot", 1, id="bad-gateway"),
        pytest.param("gw", "bo/ot", 1, id="bad-boot"),
        pytest.param("gw", "", 1, id="empty-boot"),
        pytest.param("gw", "boot", -1, id="negative-counter"),
        pytest.param("gw", "boot", BATCH_COUNTER_MAX + 1, id="counter-over-int64"),
        pytest.param("gw", "boot", True, id="bool-counter"),
        pytest.param("gw", "boot", 1.0, id="float-counter"),
        pytest.param("gw", "boot", "1", id="str-counter"),
    ],
)
def test_batch_id_rejects(gateway_id, boot_id, counter):
    with pytest.raises(InvalidIdError):
        batch_id(gateway_id, boot_id, counter)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("gw:boot", id="two-parts"),
        pytest.param("gw:boot:1:2", id="four-parts"),
        pytest.param("gw:boot:", id="empty-counter"),
        pytest.param("gw::1", id="empty-boot"),
        pytest.param(":boot:1", id="empty-gateway"),
        pytest.param("gw:boot:-1", id="negative"),
        pytest.param("gw:boot:01", id="leading-zero"),
        pytest.param("gw:boot:1.0", id="decimal-point"),
        pytest.param("gw:boot:+1", id="plus-sign"),
        pytest.param("gw:boot: 1", id="space"),
        pytest.param("gw:boot:1\n", id="trailing-newline"),
        pytest.param("gw:boot:\u0661", id="arabic-digit"),
        pytest.param("GW:boot:1", id="uppercase-gateway"),
        pytest.param("gw:bo+ot:1", id="wildcard-boot"),
        pytest.param(f"gw:boot:{2**63}", id="counter-over-int64"),
        pytest.param("gw:boot:" + "9" * 5000, id="huge-counter"),
        pytest.param("", id="empty"),
    ],
)
def test_parse_batch_id_rejects(value):
    with pytest.raises(InvalidIdError):
        parse_batch_id(value)


def test_parse_batch_id_rejects_non_string():
    with pytest.raises(InvalidIdError, match="must be a string"):
        parse_batch_id(b"gw:boot:1")  # type: ignore[arg-type]


# --- timestamps ---------------------------------------------------------------


def test_default_window():
    assert DEFAULT_MAX_PAST_MS == 30 * 24 * 3600 * 1000
    assert DEFAULT_MAX_FUTURE_MS == 5 * 60 * 1000


@pytest.mark.parametrize(
    "ts_ms", [NOW_MS, NOW_MS - DEFAULT_MAX_PAST_MS, NOW_MS + DEFAULT_MAX_FUTURE_MS, NOW_MS - 1]
)
def test_check_timestamp_accepts_window_edges(ts_ms):
    assert check_timestamp(ts_ms, NOW_MS) == ts_ms


@pytest.mark.parametrize(
    ("ts_ms", "fragment"),
    [
        pytest.param(NOW_MS - DEFAULT_MAX_PAST_MS - 1, "in the past", id="1ms-too-old"),
        pytest.param(NOW_MS + DEFAULT_MAX_FUTURE_MS + 1, "in the future", id="1ms-too-new"),
        pytest.param(0, "in the past", id="epoch"),
        pytest.param(-1, "in the past", id="negative"),
        pytest.param(NOW_MS // 1000, "in the past", id="seconds-not-ms"),
        pytest.param(NOW_MS * 1000, "in the future", id="us-not-ms"),
        pytest.param(True, "integer milliseconds", id="bool"),
        pytest.param(float(NOW_MS), "integer milliseconds", id="float"),
        pytest.param(str(NOW_MS), "integer milliseconds", id="str"),
        pytest.param(None, "integer milliseconds", id="none"),
    ],
)
def test_check_timestamp_rejects(ts_ms, fragment):
    with pytest.raises(TimestampWindowError, match=fragment) as info:
        check_timestamp(ts_ms, NOW_MS, what="ts")
    assert str(info.value).startswith("ts ")


def test_check_timestamp_custom_window():
    assert check_timestamp(NOW_MS - 10, NOW_MS, max_past_ms=10, max_future_ms=0) == NOW_MS - 10
    with pytest.raises(TimestampWindowError):
        check_timestamp(NOW_MS - 11, NOW_MS, max_past_ms=10, max_future_ms=0)
    with pytest.raises(TimestampWindowError):
        check_timestamp(NOW_MS + 1, NOW_MS, max_past_ms=10, max_future_ms=0)


@given(st.integers(-(2**70), 2**70))
def test_check_timestamp_agrees_with_window(offset):
    ts_ms = NOW_MS + offset
    if -DEFAULT_MAX_PAST_MS <= offset <= DEFAULT_MAX_FUTURE_MS:
        assert check_timestamp(ts_ms, NOW_MS) == ts_ms
    else:
        with pytest.raises(TimestampWindowError):
            check_timestamp(ts_ms, NOW_MS)


# --- topics: builders -----------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda p: device_uplink_topic("aq-001", p), "d/aq-001/up"),
        (lambda p: device_status_topic("aq-001", p), "d/aq-001/status"),
        (lambda p: batch_topic("gw-1", p), "hub/v1/gw/gw-1/batch"),
        (lambda p: state_topic("gw-1", p), "hub/v1/gw/gw-1/state"),
        (lambda p: ack_topic("gw-1", p), "hub/v1/gw/gw-1/ack"),
        (lambda p: config_topic("gw-1", p), "hub/v1/gw/gw-1/config"),
        (lambda p: gateway_topic("gw-1", "batch", p), "hub/v1/gw/gw-1/batch"),
        (device_uplink_filter, "d/+/up"),
        (device_status_filter, "d/+/status"),
        (lambda p: gateway_filter("state", p), "hub/v1/gw/+/state"),
    ],
)
@pytest.mark.parametrize("prefix", ["", "t-1234", "test/run-7"])
def test_builders(build, expected, prefix):
    assert build(prefix) == (f"{prefix}/{expected}" if prefix else expected)


def test_builders_default_to_no_prefix():
    assert device_uplink_topic("aq-001") == "d/aq-001/up"
    assert batch_topic("gw-1") == "hub/v1/gw/gw-1/batch"


def test_ingest_batch_filter():
    assert ingest_batch_filter() == "$share/ingest/hub/v1/gw/+/batch"
    assert ingest_batch_filter("ingest-b", "t-9") == "$share/ingest-b/t-9/hub/v1/gw/+/batch"
    assert ingest_batch_filter(prefix="x/y") == "$share/ingest/x/y/hub/v1/gw/+/batch"


@pytest.mark.parametrize("group", ["", "a/b", "a+b", "#", "Ingest"])
def test_ingest_batch_filter_rejects_bad_group(group):
    with pytest.raises(InvalidIdError):
        ingest_batch_filter(group)


@pytest.mark.parametrize(
    "build",
    [
        device_uplink_topic,
        device_status_topic,
        batch_topic,
        state_topic,
        ack_topic,
        config_topic,
    ],
)
@pytest.mark.parametrize("bad_id", ["+", "#", "a/b", "", "Dev", "-x", "a\n", "a" * 65])
def test_builders_reject_bad_ids(build, bad_id):
    with pytest.raises(InvalidIdError):
        build(bad_id)


@pytest.mark.parametrize("kind", ["data", "", "+", "Batch"])
def test_gateway_topic_rejects_unknown_kind(kind):
    with pytest.raises(InvalidTopicError):
        gateway_topic("gw-1", kind)
    with pytest.raises(InvalidTopicError):
        gateway_filter(kind)


@pytest.mark.parametrize(
    "prefix", ["a+", "#", "a/#", "a//b", "/a", "a/", "/", "$SYS", "t/$share", "a\x00"]
)
def test_bad_prefix(prefix):
    with pytest.raises(InvalidTopicError):
        check_prefix(prefix)
    with pytest.raises(InvalidTopicError):
        device_uplink_topic("aq-1", prefix)
    with pytest.raises(InvalidTopicError):
        batch_topic("gw-1", prefix)
    with pytest.raises(InvalidTopicError):
        parse_device_topic(f"{prefix}/d/aq-1/up", prefix)


# --- topics: parsers ------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "prefix", "expected"),
    [
        ("d/aq-001/up", "", ("aq-001", "up")),
        ("d/aq-001/status", "", ("aq-001", "status")),
        ("t-1/d/k-9/up", "t-1", ("k-9", "up")),
        ("a/b/c/d/k-9/status", "a/b/c", ("k-9", "status")),
    ],
)
def test_parse_device_topic(topic, prefix, expected):
    assert parse_device_topic(topic, prefix) == expected


@pytest.mark.parametrize(
    ("topic", "prefix", "expected"),
    [
        ("hub/v1/gw/gw-1/batch", "", ("gw-1", "batch")),
        ("hub/v1/gw/gw-1/state", "", ("gw-1", "state")),
        ("hub/v1/gw/gw-1/ack", "", ("gw-1", "ack")),
        ("hub/v1/gw/gw-1/config", "", ("gw-1", "config")),
        ("t-1/hub/v1/gw/gw-1/batch", "t-1", ("gw-1", "batch")),
    ],
)
def test_parse_gateway_topic(topic, prefix, expected):
    assert parse_gateway_topic(topic, prefix) == expected


@pytest.mark.parametrize(
    ("topic", "prefix"),
    [
        pytest.param("", "", id="empty"),
        pytest.param("d", "", id="root-only"),
        pytest.param("d/aq-1", "", id="no-kind"),
        pytest.param("d/aq-1/up/extra", "", id="extra-level"),
        pytest.param("x/aq-1/up", "", id="wrong-root"),
        pytest.param("D/aq-1/up", "", id="uppercase-root"),
        pytest.param("d/aq-1/down", "", id="unknown-kind"),
        pytest.param("d/aq-1/", "", id="empty-kind"),
        pytest.param("/d/aq-1/up", "", id="leading-slash"),
        pytest.param("d/aq-1/up/", "", id="trailing-slash"),
        pytest.param("t-1/d/aq-1/up", "", id="prefixed-topic-without-prefix"),
        pytest.param("d/aq-1/up", "t-1", id="missing-prefix"),
        pytest.param("t-2/d/aq-1/up", "t-1", id="other-prefix"),
        pytest.param("t-10/d/aq-1/up", "t-1", id="prefix-is-not-a-level-prefix"),
        pytest.param("hub/v1/gw/gw-1/batch", "", id="gateway-topic"),
    ],
)
def test_parse_device_topic_rejects_shape(topic, prefix):
    with pytest.raises(InvalidTopicError):
        parse_device_topic(topic, prefix)


@pytest.mark.parametrize(
    ("topic", "prefix"),
    [
        pytest.param("", "", id="empty"),
        pytest.param("hub/v1/gw/gw-1", "", id="no-kind"),
        pytest.param("hub/v1/gw/gw-1/batch/x", "", id="extra-level"),
        pytest.param("hub/v2/gw/gw-1/batch", "", id="other-version"),
        pytest.param("hub/v1/gateway/gw-1/batch", "", id="wrong-level"),
        pytest.param("hub/v1/gw/gw-1/batches", "", id="unknown-kind"),
        pytest.param("hub/v1/gw/gw-1/up", "", id="device-kind"),
        pytest.param("d/gw-1/up", "", id="device-topic"),
        pytest.param("hub/v1/gw/gw-1/batch", "t-1", id="missing-prefix"),
        pytest.param("$share/ingest/hub/v1/gw/gw-1/batch", "", id="share-is-a-filter"),
    ],
)
def test_parse_gateway_topic_rejects_shape(topic, prefix):
    with pytest.raises(InvalidTopicError):
        parse_gateway_topic(topic, prefix)


@pytest.mark.parametrize("bad_id", ["+", "#", "Dev", "-x", "a b", "\u00e9", "a" * 65])
def test_parsers_reject_bad_ids(bad_id):
    with pytest.raises(InvalidIdError):
        parse_device_topic(f"d/{bad_id}/up")
    with pytest.raises(InvalidIdError):
        parse_gateway_topic(f"hub/v1/gw/{bad_id}/batch")


def test_parsers_reject_empty_id_as_topic_or_id():
    # "d//up" has an empty id level: an id error, raised while parsing the topic.
    with pytest.raises(InvalidIdError):
        parse_device_topic("d//up")
    with pytest.raises(InvalidIdError):
        parse_gateway_topic("hub/v1/gw//ack")


# --- topics: properties ---------------------------------------------------------


_DEVICE_BUILDERS = {
    "up": device_uplink_topic,
    "status": device_status_topic,
    "cmd": device_command_topic,
    "res": device_answer_topic,
}


@given(ids, st.sampled_from(DEVICE_TOPIC_KINDS), prefixes)
def test_device_topic_round_trip(device_id, kind, prefix):
    topic = _DEVICE_BUILDERS[kind](device_id, prefix)
    assert parse_device_topic(topic, prefix) == (device_id, kind)
    up, status = device_uplink_filter(prefix), device_status_filter(prefix)
    assert _mqtt_matches(up, topic) == (kind == "up")
    assert _mqtt_matches(status, topic) == (kind == "status")


@given(ids, st.sampled_from(GATEWAY_TOPIC_KINDS), prefixes)
def test_gateway_topic_round_trip(gateway_id, kind, prefix):
    topic = gateway_topic(gateway_id, kind, prefix)
    assert parse_gateway_topic(topic, prefix) == (gateway_id, kind)
    assert _mqtt_matches(gateway_filter(kind, prefix), topic)
    assert _mqtt_matches(ingest_batch_filter(prefix=prefix), topic) == (kind == "batch")


@given(ids, prefixes, prefixes)
def test_prefixes_keep_tests_apart(device_id, prefix, other_prefix):
    topic = device_uplink_topic(device_id, prefix)
    if prefix != other_prefix:
        assert not _mqtt_matches(device_uplink_filter(other_prefix), topic)
        with pytest.raises(InvalidTopicError):
            parse_device_topic(topic, other_prefix)


@given(st.text(max_size=80), prefixes)
def test_parsers_raise_only_topic_or_id_errors(topic, prefix):
    for parse in (parse_device_topic, parse_gateway_topic):
        with contextlib.suppress(InvalidTopicError, InvalidIdError):
            parse(topic, prefix)
