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


def test_a_command_the_site_broker_refuses_fails_with_the_reason_code(tmp_path):
    """The PUBACK bookkeeping without a broker: packet id -> command -> failed, reported."""
    import asyncio
    from typing import Any, cast

    from contracts.messages import GatewayConfig
    from contracts.mqttcodec import Puback
    from contracts.settings import BrokerSettings
    from gateway.service import Gateway
    from tests.plugins.gateway import gateway_settings, mqtt_devices

    (device,) = mqtt_devices("tpub", 1)
    nowhere = BrokerSettings(host="127.0.0.1", port=1)
    gw = Gateway(
        settings=gateway_settings("gw-pub", "tpub"),
        central=nowhere,
        site=nowhere,
        outbox_path=tmp_path / "o.sqlite3",
    )
    try:
        gw.apply_config(
            GatewayConfig(gateway_id="gw-pub", version=1, site_id="s", devices=[device]),
            persist=False,
        )
        held = start_delivery(
            Held(
                "c-1",
                device.device_id,
                Command(
                    command_id="c-1",
                    device_id=device.device_id,
                    name="open_queue",
                    args={},
                    ttl_s=600,
                    created_ms=gw.clock(),
                ),
                "sent",
                gw.clock() + 600_000,
            ),
            timeout_s=30,
            now_ms=gw.clock(),
        ).held
        downlink = gw.downlink
        downlink.held["c-1"] = downlink.open["c-1"] = held

        async def refused() -> None:
            task = asyncio.create_task(downlink.run())
            while downlink._events is None:
                await asyncio.sleep(0.01)
            downlink._inflight = {7: "c-1"}
            downlink._inflight_generation = gw.site.generation
            # As the site link hands over a PUBACK with reason code 0x87.
            gw.site.on_control(cast(Any, None), Puback(7, 0x87))
            while downlink.held["c-1"].state == DELIVERING:
                await asyncio.sleep(0.01)
            task.cancel()

        asyncio.run(asyncio.wait_for(refused(), 10))
        assert downlink.held["c-1"].state == "failed"
        (due,) = gw.outbox.due_reports(gw.clock(), resend_after_ms=0, limit=10)
        assert due.report.report_id == "c-1.failed"
        assert "0x87 (not authorized)" in due.report.detail
        assert gw.counters.commands_failed == 1
    finally:
        gw.outbox.close()
