"""Commands and their reports in the outbox file: one transaction, kept until acked, reopened."""

from __future__ import annotations

from contracts.commands import Command, make_report
from gateway.commanding import DELIVERING, Change, Held, start_delivery
from gateway.outbox import Outbox

NOW = 1_767_225_600_000


def _outbox(path):
    return Outbox(path / "outbox.sqlite3", max_bytes=1 << 20, full_policy="refuse")


def _held(cid: str, state: str = "sent") -> Held:
    command = Command(
        command_id=cid, device_id="k-1", name="open_queue", args={}, ttl_s=60, created_ms=NOW
    )
    return Held(cid, "k-1", command, state, command.expires_ms)


def test_a_command_and_its_report_survive_a_reopen_and_leave_only_on_ack(tmp_path):
    outbox = _outbox(tmp_path)
    held = _held("c-1")
    tomb = Held("c-2", "unknown", None, "cancelled", NOW + 1000)
    added = outbox.apply_changes(
        [
            Change(held, make_report("c-1", "k-1", "sent", NOW)),
            Change(tomb, make_report("c-2", "unknown", "cancelled", NOW)),
        ],
        NOW,
    )
    assert added == 2
    # The same report again (a copy of the command) is stored once.
    assert outbox.apply_changes([Change(held, make_report("c-1", "k-1", "sent", NOW))], NOW) == 0
    delivering = start_delivery(held, timeout_s=30, now_ms=NOW + 5)
    outbox.apply_changes([delivering], NOW + 5)
    outbox.close()

    outbox = _outbox(tmp_path)
    loaded = {h.command_id: h for h in outbox.load_commands()}
    assert loaded["c-1"] == delivering.held
    assert loaded["c-1"].state == DELIVERING
    assert loaded["c-2"] == tomb
    assert outbox.reports_pending() == 2
    due = outbox.due_reports(NOW, resend_after_ms=2000, limit=256)
    assert [d.report.report_id for d in due] == ["c-1.sent", "c-2.cancelled"]
    assert not any(d.resend for d in due)
    outbox.mark_reports_sent(["c-1.sent", "c-2.cancelled"], NOW)
    assert outbox.due_reports(NOW + 1999, resend_after_ms=2000, limit=256) == []
    again = outbox.due_reports(NOW + 2000, resend_after_ms=2000, limit=256)
    assert all(d.resend for d in again)
    assert outbox.ack_reports(["c-1.sent", "c-9.sent"]) == 1  # an id not held is ignored
    assert outbox.reports_pending() == 1
    outbox.prune_commands(["c-2"])
    assert {h.command_id for h in outbox.load_commands()} == {"c-1"}
    outbox.close()
