"""Ingest's command downlink before any server: what is sent, expired, refused, acked."""

from __future__ import annotations

import dataclasses

import msgspec
import pytest

from contracts.commands import (
    COMMANDS_PER_MESSAGE_MAX,
    GATEWAY_COMMANDS_MAX_BYTES,
    CommandReports,
    decode_gateway_commands,
    encode_command_reports,
    encode_gateway_commands,
    make_report,
)
from contracts.messages import check_ack, encode_ack
from contracts.topics import batch_topic, command_report_topic
from ingest.commanding import (
    COMMAND_EXPIRY_GRACE_S,
    COMMAND_NOT_OWNED,
    UNKNOWN_COMMAND,
    CommandRow,
    PoisonReports,
    ReportsMessage,
    StoredCommand,
    is_expired,
    plan_dispatch,
    prepare_reports,
    refuse_report,
    report_ack,
    sent_ids,
)
from ingest.prepare import GATEWAY_MISMATCH

NOW_MS = 1_767_225_600_000
TTL_S = 600


def row(command_id: str = "c-0000000000000001", **change: object) -> CommandRow:
    base = CommandRow(
        command_id=command_id,
        device_id="aq-hk-01",
        gateway_id="gw-hk-1",
        name="set_reporting_interval",
        args={"interval_s": 60},
        ttl_s=TTL_S,
        created_ms=NOW_MS - 1000,
        expires_ms=NOW_MS - 1000 + TTL_S * 1000,
        state="queued",
    )
    return dataclasses.replace(base, **change)  # type: ignore[arg-type]


# --- dispatch ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "expires_ms", "now_ms", "expired"),
    [
        ("queued", NOW_MS, NOW_MS, False),
        ("queued", NOW_MS, NOW_MS + COMMAND_EXPIRY_GRACE_S * 1000, False),  # the grace
        ("queued", NOW_MS, NOW_MS + COMMAND_EXPIRY_GRACE_S * 1000 + 1, True),
        ("sent", NOW_MS, NOW_MS + 3_600_000, False),  # the gateway expires what it holds
    ],
)
def test_a_queued_command_expires_after_its_ttl_and_the_grace(
    state, expires_ms, now_ms, expired
) -> None:
    assert is_expired(row(state=state, expires_ms=expires_ms), now_ms=now_ms) is expired


def test_queued_commands_go_to_their_gateways_in_order_cancels_as_ids() -> None:
    rows = [
        row("c-0000000000000001"),
        row("c-0000000000000002", gateway_id="gw-hk-2", device_id="aq-hk-09"),
        row("c-0000000000000003"),
        row("c-0000000000000004", state="sent", cancel_requested=True),
        row("c-0000000000000005", cancel_requested=True),  # queued: a cancel, not a command
    ]
    plan = plan_dispatch(rows, now_ms=NOW_MS)
    assert plan.decided == []
    assert [(gw, sent_ids(m)) for gw, m in plan.messages] == [
        (
            "gw-hk-1",
            [
                "c-0000000000000001",
                "c-0000000000000003",
                "c-0000000000000004",
                "c-0000000000000005",
            ],
        ),
        ("gw-hk-2", ["c-0000000000000002"]),
    ]
    gw, message = plan.messages[0]
    assert message.cancel == ["c-0000000000000004", "c-0000000000000005"]
    # What the gateway reads back: its own message, the command as the row says.
    decoded = decode_gateway_commands(encode_gateway_commands(message), gateway_id=gw)
    command = decoded.commands[0]
    assert (command.device_id, command.name, command.args) == (
        "aq-hk-01",
        "set_reporting_interval",
        {"interval_s": 60},
    )
    assert (command.created_ms, command.ttl_s, decoded.ts_ms) == (NOW_MS - 1000, TTL_S, NOW_MS)


def test_expired_commands_are_not_sent_and_say_which_gateway_they_never_reached() -> None:
    late = NOW_MS + COMMAND_EXPIRY_GRACE_S * 1000 + 1
    plan = plan_dispatch(
        [row("c-0000000000000001"), row("c-0000000000000002", expires_ms=NOW_MS)], now_ms=late
    )
    assert [(d.command_id, d.state, d.detail) for d in plan.decided] == [
        ("c-0000000000000002", "expired", "never reached gw-hk-1")
    ]
    assert [sent_ids(m) for _, m in plan.messages] == [["c-0000000000000001"]]


@pytest.mark.parametrize(
    "change",
    [
        {"args": {"interval_s": [1, 2]}},  # not an arg value
        {"args": ["interval_s"]},  # not an object
        {"name": "Reboot!"},
        {"ttl_s": 0},
        {"device_id": "bad id"},
    ],
)
def test_a_row_the_gateway_would_refuse_fails_alone(change) -> None:
    plan = plan_dispatch(
        [row("c-0000000000000001", **change), row("c-0000000000000002")], now_ms=NOW_MS
    )
    assert [(d.command_id, d.state) for d in plan.decided] == [("c-0000000000000001", "failed")]
    assert plan.decided[0].detail.startswith("refused by the hub: ")
    assert [sent_ids(m) for _, m in plan.messages] == [["c-0000000000000002"]]


@pytest.mark.parametrize(
    ("commands", "cancels", "sizes"),
    [
        (COMMANDS_PER_MESSAGE_MAX, 0, [COMMANDS_PER_MESSAGE_MAX]),
        (COMMANDS_PER_MESSAGE_MAX + 1, 0, [COMMANDS_PER_MESSAGE_MAX, 1]),
        (300, 300, [256, 256, 88]),
        (0, 3, [3]),
    ],
)
def test_a_long_queue_is_split_into_messages_of_at_most_the_limit(commands, cancels, sizes) -> None:
    rows = [row(f"c-{i:016x}") for i in range(commands)] + [
        row(f"c-{i + 100_000:016x}", state="sent", cancel_requested=True) for i in range(cancels)
    ]
    plan = plan_dispatch(rows, now_ms=NOW_MS)
    assert [len(sent_ids(m)) for _, m in plan.messages] == sizes
    for gw, message in plan.messages:
        decode_gateway_commands(encode_gateway_commands(message), gateway_id=gw)


def test_large_commands_are_split_by_size_too() -> None:
    big = {f"a{i:02d}": "€" * 200 for i in range(16)}  # ~9.7 KB of UTF-8 each
    rows = [
        row(f"c-{i:016x}", name="show_message", args=big) for i in range(COMMANDS_PER_MESSAGE_MAX)
    ]
    # The catalog is not asked here: check_command_message checks the form only.
    plan = plan_dispatch(rows, now_ms=NOW_MS)
    assert len(plan.messages) > 1
    assert sum(len(sent_ids(m)) for _, m in plan.messages) == COMMANDS_PER_MESSAGE_MAX
    for _, message in plan.messages:
        assert len(encode_gateway_commands(message)) <= GATEWAY_COMMANDS_MAX_BYTES


# --- reports ----------------------------------------------------------------------------

GW = "gw-hk-1"
TOPIC = command_report_topic(GW, "p1")


def reports_payload(*reports, gateway_id: str = GW, ts_ms: int = NOW_MS) -> bytes:
    return encode_command_reports(
        CommandReports(gateway_id=gateway_id, ts_ms=ts_ms, reports=list(reports))
    )


SENT = make_report("c-0000000000000001", "aq-hk-01", "sent", NOW_MS)
DONE = make_report("c-0000000000000001", "aq-hk-01", "succeeded", NOW_MS + 5, detail="ok")


def test_good_reports_are_kept_in_order() -> None:
    item = prepare_reports(TOPIC, reports_payload(SENT, DONE), prefix="p1")
    assert isinstance(item, ReportsMessage)
    assert (item.gateway_id, item.reports, item.refused) == (GW, [SENT, DONE], [])


@pytest.mark.parametrize(
    ("topic", "payload", "reason", "gateway_id"),
    [
        (TOPIC, b"\xff{", "malformed", GW),
        (TOPIC, b'{"gateway_id": "gw-hk-1"}', "wrong_type", GW),
        (TOPIC, b"[" * 2_000_000, "too_large", GW),  # size first
        (TOPIC, reports_payload(), "wrong_type", GW),  # no report at all
        (TOPIC, reports_payload(SENT, ts_ms=-1), "out_of_range", GW),
        (TOPIC, reports_payload(SENT, gateway_id="gw-hk-2"), GATEWAY_MISMATCH, GW),
        (TOPIC, reports_payload(SENT, gateway_id="bad id"), "bad_id", GW),
        (command_report_topic(GW, "p2"), reports_payload(SENT), "bad_topic", None),
        (batch_topic(GW, "p1"), reports_payload(SENT), "bad_topic", None),
    ],
)
def test_messages_refused_whole(topic, payload, reason, gateway_id) -> None:
    item = prepare_reports(topic, payload, prefix="p1")
    assert isinstance(item, PoisonReports)
    assert (item.reason, item.gateway_id, item.payload) == (reason, gateway_id, payload)


def test_a_bad_report_is_refused_alone_and_still_acked_when_its_id_reads() -> None:
    long_detail = msgspec.structs.replace(SENT, detail="x" * 501)
    bad_state = msgspec.structs.replace(
        SENT, state="queued", report_id="c-0000000000000002.queued", command_id="c-0000000000000002"
    )
    unreadable = msgspec.structs.replace(SENT, report_id="nonsense")
    item = prepare_reports(
        TOPIC, reports_payload(long_detail, DONE, bad_state, unreadable), prefix="p1"
    )
    assert isinstance(item, ReportsMessage)
    assert item.reports == [DONE]
    assert [x.reason for x in item.refused] == ["wrong_type", "wrong_type", "wrong_type"]
    ack = report_ack(item, now_ms=NOW_MS)
    assert ack is not None
    assert ack.reports == [DONE.report_id, SENT.report_id, "c-0000000000000002.queued"]
    assert ack.batch_ids == []
    # The gateway's own check of the ack passes.
    check_ack(msgspec.json.decode(encode_ack(ack), type=type(ack)), gateway_id=GW)


@pytest.mark.parametrize(
    ("stored", "reason"),
    [
        (StoredCommand(GW, "aq-hk-01"), None),
        (None, UNKNOWN_COMMAND),
        (StoredCommand("gw-hk-2", "aq-hk-01"), COMMAND_NOT_OWNED),
        (StoredCommand(GW, "aq-hk-02"), COMMAND_NOT_OWNED),
    ],
)
def test_a_report_touches_only_a_command_of_its_gateway_and_device(stored, reason) -> None:
    refusal = refuse_report(SENT, stored, gateway_id=GW)
    assert (refusal.reason if refusal else None) == reason


def test_the_ack_names_each_report_once() -> None:
    item = prepare_reports(TOPIC, reports_payload(SENT, SENT, DONE), prefix="p1")
    assert isinstance(item, ReportsMessage)
    ack = report_ack(item, now_ms=NOW_MS + 7)
    assert ack is not None
    assert (ack.reports, ack.ts_ms) == ([SENT.report_id, DONE.report_id], NOW_MS + 7)
