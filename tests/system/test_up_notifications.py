"""`cityhub up --receivers`: a kiosk's printer runs out of paper and people are told, then told
it is over.

The whole system runs as a user runs it (a real `cityhub up` process, its own
Alertmanager); the fleet is one kiosk whose roll is empty from the first
reading and is changed exactly REFILL_AFTER_S later (``refill_after_out_s``:
the simulator's random refill could come before the alert is raised or
after the run, and a 24/7 street site keeps staff on duty whatever the
hour). The shipped rule kiosk-printer-fault (major, printer_status >= 2 for
60 s) raises the alert; the receivers file sends major alerts to a webhook
and to an SMTP sink in this test, with a short group_wait and group_interval
(its [timing.major]) so that the resolved message, which Alertmanager sends
at the group's next interval, comes within the run.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import tomllib
from email.header import decode_header, make_header
from email.message import Message
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cityhub.localstack.postgres import DB_NAME, DB_USER
from cityhub.localstack.procs import port_is_free
from contracts.schema import readings_table
from contracts.severity import SEVERITY_NAMES
from tests.plugins.alertmanager import SmtpSink, Webhook, wait_for
from tests.plugins.servers import processes_under

SITE = "hk-aq-hang-dau"  # a street site, open 24/7: staff change the roll at any hour
KIOSK = f"kiosk-{SITE}-01"
RULE_ID = "kiosk-printer-fault"
# The roll is changed this long after the printer runs out: after the rule's
# 60 s and the evaluation that raises the alert (at most one 10 s interval
# and the 2 s evaluation delay later), with 13 s to spare.
REFILL_AFTER_S = 85.0
FOR_S = 60.0  # the rule's for_s (checked below)
INTERVAL_S = 10.0  # `up` runs the alerts job every 10 s
EVALUATION_DELAY_S = 2.0  # alerts.evaluation_delay_s
GROUP_WAIT_S = 5.0
GROUP_INTERVAL_S = 10.0
# The machine: process start-up, an evaluation's own time, the post, one poll.
MARGIN_S = 8.0
# Start-up (servers, schema, fleet, processes) plus the refill, the clear and
# the resolved message; more only on a machine in trouble.
RUN_TIMEOUT_S = 200.0

FLEET = f"""
sites = ["{SITE}"]

[devices.street_monitor]
kiosk = 1

[kiosks."{KIOSK}"]
initial_paper_pct = 0.0
refill_after_out_s = {REFILL_AFTER_S}
"""


def _receivers(webhook_url: str, smtp_port: int) -> str:
    return f"""
[[receiver]]
name = "test-hook"
kind = "webhook"
url = "{webhook_url}"

[[receiver]]
name = "ops-email"
kind = "email"
to = ["noc@cityhub.test"]
from = "cityhub@cityhub.test"
smarthost = "127.0.0.1:{smtp_port}"
require_tls = false

[severity]
critical = ["test-hook", "ops-email"]
major = ["test-hook", "ops-email"]
minor = []
warning = []

[timing.major]
group_wait = "{GROUP_WAIT_S:.0f}s"
group_interval = "{GROUP_INTERVAL_S:.0f}s"
"""


def _rule() -> dict[str, Any]:
    rules = tomllib.loads((Path("alerts") / "data" / "rules.toml").read_text(encoding="utf-8"))
    (rule,) = [r for r in rules["rule"] if r["rule_id"] == RULE_ID]
    return rule


def _first_reading_s(state_dir: Path, pg_port: int) -> float | None:
    """When the kiosk's first reading (out of paper) was taken, epoch seconds."""
    password = (state_dir / "postgres.password").read_text().strip()
    with psycopg.connect(
        f"postgresql://{DB_USER}:{password}@127.0.0.1:{pg_port}/{DB_NAME}", connect_timeout=5
    ) as conn:
        row = conn.execute(
            f"SELECT extract(epoch FROM min(ts)), bool_and(printer_status >= 2) "
            f"FROM cityhub.{readings_table('kiosk')} WHERE device_id = %s AND ts < "
            f"(SELECT min(ts) FROM cityhub.{readings_table('kiosk')} "
            f" WHERE device_id = %s) + %s * interval '1 second'",
            (KIOSK, KIOSK, FOR_S),
        ).fetchone()
    assert row is not None
    first, all_out = row
    if first is None:
        return None
    assert all_out, "the kiosk printed before the roll was changed: not out of paper"
    return float(first)


def _alerts_in(bodies: list[tuple[float, dict[str, Any]]], status: str) -> list[tuple[float, Any]]:
    """(arrival time, alert) of the kiosk's printer alert with ``status``, in arrival order."""
    return [
        (arrived, alert)
        for arrived, body in bodies
        for alert in body["alerts"]
        if alert["labels"].get("alertname") == RULE_ID
        and alert["labels"].get("device_id") == KIOSK
        and alert["status"] == status
    ]


def _subject(message: Message) -> str:
    return str(make_header(decode_header(message["Subject"])))


def _body(message: Message) -> str:
    for part in message.walk():
        if part.get_content_type() == "text/plain":
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            return payload.decode(part.get_content_charset() or "utf-8")
    raise AssertionError(f"no text/plain part in {message}")


def _check_mails(smtp_sink: SmtpSink, summary_vi: str) -> None:
    """The e-mail people read: the severity's word and the summary in Vietnamese,
    English after; then the same alert over."""
    major = SEVERITY_NAMES["major"]
    resolved_subject = f"[Đã hết / Resolved] Cảnh báo {major.vi} / {major.en} alert"
    wait_for(
        lambda: any(_subject(m).startswith(resolved_subject) for m in smtp_sink.messages),
        MARGIN_S,
        "the resolved e-mail",
    )
    mails = [(m, _subject(m)) for m in smtp_sink.messages]
    firing_mails = [(m, s) for m, s in mails if not s.startswith("[Đã hết / Resolved]")]
    assert firing_mails, [s for _m, s in mails]
    mail, subject = firing_mails[0]
    assert subject.startswith(f"Cảnh báo {major.vi} / {major.en} alert: {summary_vi}{KIOSK}")
    assert f"{summary_vi}{KIOSK}" in _body(mail)
    assert "Đang xảy ra / Firing (1)" in _body(mail)


@pytest.mark.slow
def test_a_kiosk_out_of_paper_is_notified_in_vietnamese_and_its_end_too(
    up_dir: tuple[Path, dict[str, str]], webhook: Webhook, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    state_dir, env = up_dir
    rule = _rule()
    assert rule["severity"] == "major"
    assert rule["condition"]["for_s"] == FOR_S
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(FLEET, encoding="utf-8")
    receivers = tmp_path / "receivers.toml"
    receivers.write_text(_receivers(webhook.url, smtp_sink.port), encoding="utf-8")
    out_path = tmp_path / "up.out"
    with out_path.open("wb") as out:
        up = subprocess.Popen(
            [
                *(sys.executable, "-m", "cityhub", "up", "--fleet", str(fleet)),
                *("--receivers", str(receivers), "--for", f"{RUN_TIMEOUT_S:.0f}s"),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    arrivals: list[tuple[float, dict[str, Any]]] = []

    def collect() -> None:
        arrivals.extend((time.time(), body) for body in webhook.received()[len(arrivals) :])
        if up.poll() is not None:
            raise AssertionError(f"cityhub up exited: {out_path.read_text()[-3000:]}")

    def resolved() -> bool:
        collect()
        return bool(_alerts_in(arrivals, "resolved"))

    try:
        wait_for(resolved, RUN_TIMEOUT_S, "the resolved notification of the printer alert")
        first = _first_reading_s(state_dir, int(env["CITYHUB_LOCAL__PG_PORT"]))
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)  # Ctrl-C: stop, drain, summarise
        up.wait(timeout=120)
    output = out_path.read_text()
    assert up.returncode == 0, output[-3000:]
    am_port = env["CITYHUB_LOCAL__ALERTMANAGER_PORT"]
    assert f"Alertmanager: http://127.0.0.1:{am_port} (notifications to the receivers of " in (
        output
    )

    # Raised within one evaluation interval (and the evaluation delay) of the
    # condition holding for the rule's 60 s, and at Alertmanager's webhook one
    # group_wait after that.
    assert first is not None, "no reading of the kiosk stored"
    firing = _alerts_in(arrivals, "firing")
    assert firing, [body for _t, body in arrivals]
    fired_at, alert = firing[0]
    condition_held = first + FOR_S
    assert fired_at - condition_held <= INTERVAL_S + EVALUATION_DELAY_S + GROUP_WAIT_S + MARGIN_S
    # Vietnamese first, English after: the rule's two summaries, for this kiosk.
    summary_vi = rule["summary_vi"].split("{")[0]  # "Máy in phiếu số hỏng: "
    summary_en = rule["summary_en"].split("{")[0]  # "Ticket printer down: "
    summary = alert["annotations"]["summary"]
    assert summary.startswith(f"{summary_vi}{KIOSK} tại "), summary
    assert f" / {summary_en}{KIOSK} at " in summary, summary
    assert alert["labels"]["severity"] == "major"

    # Cleared once the roll is changed, not before: resolved within an
    # evaluation interval of the refill and the group's next interval.
    refilled = first + REFILL_AFTER_S
    resolved_at, _ = _alerts_in(arrivals, "resolved")[0]
    assert resolved_at > refilled
    assert resolved_at - refilled <= (INTERVAL_S + EVALUATION_DELAY_S + GROUP_INTERVAL_S + MARGIN_S)

    _check_mails(smtp_sink, summary_vi)

    # Nothing of the run is left, Alertmanager included.
    assert processes_under(state_dir) == []
    assert port_is_free(int(am_port))
