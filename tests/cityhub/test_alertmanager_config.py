"""`cityhub alertmanager config`: the generated alertmanager.yml and templates, checked by
Alertmanager 0.25's own tools.

amtool checks the configuration, picks the receivers for sample label sets
(`amtool config routes test`) and renders the templates with sample alerts;
a real Alertmanager shows the inhibition at work. Refusals of bad receivers
files are one line naming the file and the key. CI installs Alertmanager
(Debian's prometheus-alertmanager); without amtool those tests skip.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from cityhub.alertmanager import (
    OFFLINE_RULES_RE,
    build_config,
    null_config,
    parse_receivers,
    render_yaml,
)
from cityhub.cli.main import app
from cityhub.localstack.procs import free_port
from contracts.errors import ReceiversError

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "alertmanager"
EXAMPLE = DEPLOY / "receivers.example.toml"
AMTOOL = shutil.which("amtool")
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
ENV = {"COLUMNS": "400"}

needs_amtool = pytest.mark.skipif(
    AMTOOL is None, reason="amtool (Alertmanager 0.25, Debian prometheus-alertmanager) missing"
)


def generate(tmp_path: Path, receivers_text: str | None = None) -> Path:
    source = EXAMPLE
    if receivers_text is not None:
        source = tmp_path / "receivers.toml"
        source.write_text(receivers_text, encoding="utf-8")
    out = tmp_path / "am" / "alertmanager.yml"
    result = CliRunner().invoke(
        app, ["alertmanager", "config", "--receivers", str(source), "-o", str(out)], env=ENV
    )
    assert result.exit_code == 0, result.output
    return out


def amtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert AMTOOL is not None
    return subprocess.run([AMTOOL, *args], capture_output=True, text=True, timeout=30, check=False)


@needs_amtool
def test_generated_config_passes_amtool_check_config(tmp_path):
    out = generate(tmp_path)
    assert (out.parent / "cityhub.tmpl").is_file()
    # The example holds a password and a bot token.
    assert out.stat().st_mode & 0o777 == 0o600
    checked = amtool("check-config", str(out))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "1 templates" in checked.stdout
    assert "2 inhibit rules" in checked.stdout


@needs_amtool
@pytest.mark.parametrize(
    ("labels", "receivers"),
    [
        # Hoàn Kiếm's own Zalo group, then the on-call and the operations centre.
        (["severity=critical", "ward_code=00070"], "hoan-kiem-zalo,oncall-telegram,noc-email"),
        (["severity=major", "ward_code=00070"], "hoan-kiem-zalo,oncall-telegram,noc-email"),
        (["severity=minor", "ward_code=00070"], "hoan-kiem-zalo,noc-email"),
        # The ward route leaves warnings out.
        (["severity=warning", "ward_code=00070"], "noc-email"),
        # Another ward (Ba Đình): the severity routes only.
        (["severity=critical", "ward_code=00004"], "oncall-telegram,noc-email"),
        (["severity=warning", "ward_code=00004"], "noc-email"),
        # No known severity: the default receiver.
        (["severity=unknown"], "noc-email"),
    ],
)
def test_routes_by_severity_and_ward(tmp_path, labels, receivers):
    out = generate(tmp_path)
    routed = amtool("config", "routes", "test", f"--config.file={out}", *labels)
    assert routed.returncode == 0, routed.stderr
    assert routed.stdout.strip() == receivers


def test_pacing_and_grouping_per_severity():
    config = build_config(parse_receivers(EXAMPLE.read_text("utf-8"), source="example"))
    assert config["route"]["group_by"] == ["site_id", "alertname"]
    waits = {}
    for route in config["route"]["routes"]:
        severity = next(m for m in route["matchers"] if m.startswith("severity="))
        waits[severity] = route["group_wait"]
        assert route["continue"] is True
    # Critical pages within seconds; warnings are batched for minutes.
    assert waits == {
        'severity="critical"': "10s",
        'severity="major"': "30s",
        'severity="minor"': "5m",
        'severity="warning"': "10m",
    }


def _offline_rule_ids() -> list[str]:
    """The shipped rules whose condition is, or includes, no_data."""
    rules = tomllib.loads((ROOT / "alerts" / "data" / "rules.toml").read_text("utf-8"))["rule"]

    def has_no_data(condition: dict) -> bool:
        if condition["kind"] == "no_data":
            return True
        return any(has_no_data(c) for c in condition.get("conditions", []))

    return [r["rule_id"] for r in rules if has_no_data(r["condition"])]


def test_inhibition_rules_cover_every_offline_rule():
    config = build_config(parse_receivers(EXAMPLE.read_text("utf-8"), source="example"))
    device_rule, site_rule = config["inhibit_rules"]
    assert device_rule == {
        "source_matchers": [f'alertname=~"{OFFLINE_RULES_RE}"'],
        "target_matchers": [f'alertname!~"{OFFLINE_RULES_RE}"'],
        "equal": ["device_id"],
    }
    assert site_rule["source_matchers"] == ['alertname="gateway-offline"']
    assert site_rule["equal"] == ["site_id"]

    offline = _offline_rule_ids()
    assert {"aq-offline", "kiosk-offline", "camera-offline", "conference-endpoint-down"} <= set(
        offline
    )
    for rule_id in [*offline, "gateway-offline"]:
        assert re.fullmatch(OFFLINE_RULES_RE, rule_id), rule_id
    for rule_id in ["kiosk-paper-low", "aq-pm25-high", "camera-counter-stuck", "offline"]:
        assert not re.fullmatch(OFFLINE_RULES_RE, rule_id), rule_id


def _post_alerts(port: int, alerts: list[dict]) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v2/alerts",
        data=json.dumps(alerts).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - a local server
        assert response.status == 200


def _alert_states(port: int) -> dict[tuple[str, str], str]:
    url = f"http://127.0.0.1:{port}/api/v2/alerts"
    with urllib.request.urlopen(url, timeout=5) as response:
        alerts = json.load(response)
    return {
        (a["labels"]["alertname"], a["labels"]["device_id"]): a["status"]["state"] for a in alerts
    }


def _alert(rule_id: str, device_id: str, site_id: str) -> dict:
    return {
        "labels": {
            "alertname": rule_id,
            "rule_id": rule_id,
            "severity": "major",
            "device_id": device_id,
            "site_id": site_id,
            "ward_code": "00070",
        },
        "annotations": {"summary": rule_id},
    }


@pytest.mark.slow
@pytest.mark.skipif(ALERTMANAGER is None, reason="prometheus-alertmanager (0.25) missing")
def test_a_real_alertmanager_inhibits_an_offline_devices_other_alerts(tmp_path):
    # Only a webhook to this machine, so nothing tries to reach a mail server.
    out = generate(
        tmp_path,
        '[[receiver]]\nname = "bridge"\nkind = "webhook"\nurl = "http://127.0.0.1:9/x"\n'
        '[severity]\ncritical = ["bridge"]\nmajor = ["bridge"]\nminor = []\nwarning = []\n',
    )
    port = free_port()
    assert ALERTMANAGER is not None
    proc = subprocess.Popen(
        [
            ALERTMANAGER,
            f"--config.file={out}",
            f"--storage.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                _post_alerts(
                    port,
                    [
                        _alert("kiosk-offline", "k1", "s1"),
                        _alert("kiosk-paper-low", "k1", "s1"),
                        _alert("kiosk-paper-low", "k2", "s1"),
                        _alert("gateway-offline", "gw-s2", "s2"),
                        _alert("aq-offline", "aq1", "s2"),
                    ],
                )
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "Alertmanager did not start"
                time.sleep(0.2)
        expected = {
            ("kiosk-offline", "k1"): "active",
            ("kiosk-paper-low", "k1"): "suppressed",  # its device is offline
            ("kiosk-paper-low", "k2"): "active",  # another device at the site
            ("gateway-offline", "gw-s2"): "active",
            ("aq-offline", "aq1"): "suppressed",  # behind the offline gateway
        }
        deadline = time.monotonic() + 10
        while (states := _alert_states(port)) != expected and time.monotonic() < deadline:
            time.sleep(0.2)
        assert states == expected
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()


SAMPLE: dict[str, Any] = {
    "receiver": "noc-email",
    "status": "firing",
    "alerts": [
        {
            "status": "firing",
            "labels": {
                "alertname": "kiosk-offline",
                "severity": "critical",
                "device_type": "kiosk",
                "device_id": "hk-kiosk-01",
                "site_id": "hk-hall",
                "ward": "Phường Hoàn Kiếm",
                "ward_code": "00070",
                "district": "Hoàn Kiếm",
            },
            "annotations": {
                "summary": "Kiosk mất kết nối / Kiosk offline",
                "description": "im lặng 600 s / silent for 600 s",
                "value": "600",
                "board_url": "https://grafana.example.vn/d/kiosks",
                "alert_id": "42",
            },
            # 01:02 UTC is 08:02 in Hanoi.
            "startsAt": "2026-12-06T01:02:03Z",
            "endsAt": "0001-01-01T00:00:00Z",
        }
    ],
    "groupLabels": {"site_id": "hk-hall", "alertname": "kiosk-offline"},
    "commonLabels": {"severity": "critical", "ward": "Phường Hoàn Kiếm", "site_id": "hk-hall"},
    "commonAnnotations": {"summary": "Kiosk mất kết nối / Kiosk offline"},
    "externalURL": "http://127.0.0.1:9093",
}


def render(tmp_path: Path, data: dict, text: str, kind: str = "text") -> str:
    out = generate(tmp_path)
    data_file = tmp_path / "data.json"
    data_file.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    rendered = amtool(
        "template",
        "render",
        f"--template.glob={out.parent / 'cityhub.tmpl'}",
        f"--template.text={text}",
        f"--template.data={data_file}",
        f"--template.type={kind}",
    )
    assert rendered.returncode == 0, rendered.stderr
    return rendered.stdout


@needs_amtool
@pytest.mark.parametrize(
    ("severity", "title"),
    [
        ("critical", "Cảnh báo Nghiêm trọng / Critical alert"),
        ("major", "Cảnh báo Cao / Major alert"),
        ("minor", "Cảnh báo Trung bình / Minor alert"),
        ("warning", "Cảnh báo Thấp / Warning alert"),
    ],
)
def test_title_names_the_severity_in_vietnamese_then_english(tmp_path, severity, title):
    data = {**SAMPLE, "commonLabels": {**SAMPLE["commonLabels"], "severity": severity}}
    text = render(tmp_path, data, '{{ template "cityhub.title" . }}')
    assert text == f"{title}: Kiosk mất kết nối / Kiosk offline · hk-hall, Phường Hoàn Kiếm"


@needs_amtool
def test_body_lists_each_alert_in_hanoi_time(tmp_path):
    body = render(tmp_path, SAMPLE, '{{ template "cityhub.body" . }}')
    assert body.startswith("Đang xảy ra / Firing (1):\n• Kiosk mất kết nối / Kiosk offline\n")
    for line in [
        "Phường/Xã (ward/commune): Phường Hoàn Kiếm (00070)",
        "Quận/huyện cũ (former district): Hoàn Kiếm",
        "Điểm (site): hk-hall · Thiết bị (device): hk-kiosk-01 (kiosk)",
        "Giá trị (value): 600",
        "Bắt đầu (started): 08:02 06/12/2026 (giờ Hà Nội / Hanoi time, UTC+7)",
        "im lặng 600 s / silent for 600 s",
        "Bảng theo dõi (board): https://grafana.example.vn/d/kiosks",
    ]:
        assert f"\n  {line}\n" in body, line
    assert "Đã hết" not in body


@needs_amtool
def test_resolved_notifications_say_so(tmp_path):
    alert = {**SAMPLE["alerts"][0], "status": "resolved", "endsAt": "2026-12-06T02:30:00Z"}
    data = {**SAMPLE, "status": "resolved", "alerts": [alert]}
    message = render(tmp_path, data, '{{ template "cityhub.message" . }}')
    assert message.startswith("[Đã hết / Resolved] Cảnh báo Nghiêm trọng / Critical alert")
    assert "\n\nĐã hết / Resolved (1):\n" in message
    assert "Đã hết lúc (resolved at): 09:30 06/12/2026" in message
    assert "Đang xảy ra" not in message


@needs_amtool
def test_email_html_escapes_what_the_alert_says(tmp_path):
    alert = {**SAMPLE["alerts"][0]}
    alert["annotations"] = {**alert["annotations"], "description": "<script>x</script>"}
    html = render(
        tmp_path, {**SAMPLE, "alerts": [alert]}, '{{ template "cityhub.email.html" . }}', "html"
    )
    assert "&lt;script&gt;" in html
    assert "<script>" not in html


def test_shipped_example_config_is_current():
    result = CliRunner().invoke(
        app,
        [
            "alertmanager",
            "config",
            "--receivers",
            str(EXAMPLE),
            "-o",
            str(DEPLOY / "alertmanager.yml"),
            "--check",
        ],
        env=ENV,
    )
    assert result.exit_code == 0, (
        f"{result.output}\nregenerate: cityhub alertmanager config --receivers "
        "deploy/alertmanager/receivers.example.toml -o deploy/alertmanager/alertmanager.yml"
    )


def test_check_reports_a_stale_copy(tmp_path):
    out = generate(tmp_path)
    out.write_text(out.read_text("utf-8") + "# edited by hand\n", encoding="utf-8")
    result = CliRunner().invoke(
        app,
        ["alertmanager", "config", "--receivers", str(EXAMPLE), "-o", str(out), "--check"],
        env=ENV,
    )
    assert result.exit_code == 1
    assert f"out of date: {out}" in result.output


def test_yaml_is_what_was_built():
    config = build_config(parse_receivers(EXAMPLE.read_text("utf-8"), source="example"))
    assert yaml.safe_load(render_yaml(config, source="example")) == config


# Surrogates cannot be written as UTF-8, so no receivers file holds one.
@given(st.text(st.characters(exclude_categories=["Cs"])))
def test_any_string_survives_the_yaml(text):
    assert yaml.safe_load(render_yaml({"s": text, "l": [text]}, source="x")) == {
        "s": text,
        "l": [text],
    }


EXAMPLE_TEXT = EXAMPLE.read_text("utf-8")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            ('url = "https://zalo', 'urll = "https://zalo'),
            (
                "key 'receiver \"hoan-kiem-zalo\".urll': unknown key (known: kind, name, "
                "send_resolved, url)"
            ),
        ),
        (
            ('url = "https://zalo', 'xrl = "https://zalo'),
            "key 'receiver \"hoan-kiem-zalo\".xrl': unknown key",
        ),
        (
            ('ward = "Phường Hoàn Kiếm"', 'ward = "Phường Atlantis"'),
            "key 'route[0].ward': 'Phường Atlantis' is not one of Hanoi's 126 wards/communes",
        ),
        (
            ("https://zalo-bridge.example.vn", "http://zalo-bridge.example.vn"),
            (
                "key 'receiver \"hoan-kiem-zalo\".url': 'http://zalo-bridge.example.vn/"
                "alertmanager/hoan-kiem' must be https:// (http:// only to localhost)"
            ),
        ),
        (
            ('minor = ["noc-email"]\n', ""),
            "key 'severity.minor': missing (write [] to send this severity nowhere)",
        ),
        (
            ('receivers = ["hoan-kiem-zalo"]', 'receivers = ["hoan-kiem-viber"]'),
            "key 'route[0].receivers': no receiver is named 'hoan-kiem-viber'",
        ),
        (
            ("chat_id = -1001234567890", 'chat_id = "-100"'),
            "key 'receiver \"oncall-telegram\".chat_id': required",
        ),
        (
            ('smarthost = "smtp.example.vn:587"', 'smarthost = "smtp.example.vn"'),
            "key 'receiver \"noc-email\".smarthost': 'smtp.example.vn' must be host:port",
        ),
        (
            ('default_receiver = "noc-email"', 'default_reciever = "noc-email"'),
            "key 'default_reciever': unknown key",
        ),
        (('kind = "telegram"', 'kind = "viber"'), "key 'receiver \"oncall-telegram\".kind'"),
        (("[severity]", "[severity"), "not valid TOML"),
    ],
)
def test_bad_receivers_files_are_refused_in_one_line(tmp_path, edit, message):
    old, new = edit
    assert old in EXAMPLE_TEXT
    bad = tmp_path / "receivers.toml"
    bad.write_text(EXAMPLE_TEXT.replace(old, new, 1), encoding="utf-8")
    out = tmp_path / "alertmanager.yml"
    result = CliRunner().invoke(
        app, ["alertmanager", "config", "--receivers", str(bad), "-o", str(out)], env=ENV
    )
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"error: {bad}: "), lines[0]
    assert message in lines[0]
    assert not out.exists()


def test_a_ward_route_accepts_a_code_or_a_bare_name():
    for ward in ['"00070"', "70", '"hoan kiem"']:
        text = EXAMPLE_TEXT.replace('ward = "Phường Hoàn Kiếm"', f"ward = {ward}")
        plan = parse_receivers(text, source="r.toml")
        assert plan.ward_routes[0].ward_code == "00070"
        assert plan.ward_routes[0].ward == "Phường Hoàn Kiếm"


def test_a_file_without_receivers_is_refused():
    with pytest.raises(ReceiversError, match="at least one"):
        parse_receivers("", source="r.toml")


def test_timing_tables_override_one_severitys_pacing_and_are_checked():
    text = EXAMPLE.read_text("utf-8") + '\n[timing.major]\ngroup_wait = "5s"\n'
    config = build_config(parse_receivers(text, source="r.toml"))
    major = [r for r in config["route"]["routes"] if 'severity="major"' in r["matchers"]]
    assert major
    # The key given replaces the shipped one; the others keep theirs.
    assert {(r["group_wait"], r["group_interval"], r["repeat_interval"]) for r in major} == {
        ("5s", "5m", "4h")
    }
    critical = [r for r in config["route"]["routes"] if 'severity="critical"' in r["matchers"]]
    assert {r["group_wait"] for r in critical} == {"10s"}
    for bad, key in (
        ('[timing.major]\ngroup_wait = "soon"\n', "timing.major.group_wait"),
        ("[timing.major]\ngroup_wait = 5\n", "timing.major.group_wait"),
        ('[timing.major]\nwait = "5s"\n', "timing.major.wait"),
        ('[timing.urgent]\ngroup_wait = "5s"\n', "timing.urgent"),
        ('timing = "fast"\n', "timing"),
    ):
        # A table goes after the example's tables, a bare key before them.
        example = EXAMPLE.read_text("utf-8")
        text = f"{example}\n{bad}" if bad.startswith("[") else bad + example
        with pytest.raises(ReceiversError) as info:
            parse_receivers(text, source="r.toml")
        assert info.value.key == key, info.value


@needs_amtool
def test_null_configuration_passes_amtool(tmp_path):
    path = tmp_path / "alertmanager.yml"
    path.write_text(render_yaml(null_config(), source="none"), encoding="utf-8")
    result = amtool("check-config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 receivers" in result.stdout
