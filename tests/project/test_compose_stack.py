"""The compose stack's secrets, networks, images, health checks and monitoring, checked as data
and with the real tools that run here.

No Docker engine here: docker-compose.yml is walked as data (which secret reaches which
service, which port is published where, which account a service uses); deploy/make-secrets
runs for real into a temporary directory; promtool and amtool check the Prometheus and
Alertmanager files; a private Prometheus evaluates the project's rules against a real
/metrics; the health checks' Python runs against real exporters.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from alerts.metrics import serve_metrics as serve_alerts_metrics
from alerts.service import JobCounters
from cityhub.localstack.procs import free_port, stop_process_group
from gateway.counters import GatewayCounters
from gateway.metrics import serve_metrics as serve_gateway_metrics
from ingest.metrics import IngestCounters, IngestMetrics
from ingest.metrics import serve_metrics as serve_ingest_metrics

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
MAKE_SECRETS = ROOT / "deploy" / "make-secrets"
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
ALERTMANAGER_YML = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
PINNED = re.compile(r"^[a-z0-9./_-]+:[A-Za-z0-9._-]+@sha256:[0-9a-f]{64}$")
# Who may hold the broker's admin account: the account-file writer and the provisioning jobs.
ADMIN_HOLDERS = {"mosquitto-init", "provision-demo", "provision-sim", "cli"}
SECRETS_GID = 10001
BASH = shutil.which("bash") or "/bin/bash"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def secret_names() -> list[str]:
    listed = subprocess.run(
        [BASH, str(MAKE_SECRETS), "--list"], capture_output=True, text=True, check=True
    )
    return listed.stdout.split()


def mounted(service: dict[str, Any]) -> list[str]:
    return [s if isinstance(s, str) else s["source"] for s in service.get("secrets", [])]


# --- deploy/make-secrets ----------------------------------------------------------------


def run_make_secrets(directory: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CITYHUB_")}
    environ |= {
        "MAKE_SECRETS_DIR": str(directory),
        "MAKE_SECRETS_CLI": f"env PYTHONPATH={ROOT} {sys.executable} -m cityhub",
        **env,
    }
    return subprocess.run(
        [BASH, str(MAKE_SECRETS)], env=environ, capture_output=True, text=True, check=False
    )


def _san(path: Path) -> list[str]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(name.value) for name in alt]


@pytest.mark.skipif(os.geteuid() != 0, reason="giving files group 10001 needs root")
def test_make_secrets_creates_every_file_once(tmp_path) -> None:
    directory = tmp_path / "secrets"
    made = run_make_secrets(directory, MAKE_SECRETS_MQTT_HOSTS="mqtt.hub.example.vn 203.0.113.7")
    assert made.returncode == 0, made.stderr
    names = secret_names()
    assert sorted(p.name for p in directory.iterdir()) == sorted(names)
    assert directory.stat().st_mode & 0o777 == 0o750
    for path in directory.iterdir():
        st = path.stat()
        assert st.st_mode & 0o777 == 0o640, path.name
        assert st.st_gid == SECRETS_GID, path.name
    passwords = [(directory / n).read_text() for n in names if n.endswith("_password")]
    assert len(set(passwords)) == len(passwords)
    for password in passwords:
        assert re.fullmatch(r"[A-Za-z0-9_-]{32}", password)

    # Server certificates signed by the CA, for the names their clients use.
    ca = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    for name in ("mqtt_server", "grafana"):
        cert = x509.load_pem_x509_certificate((directory / f"{name}.crt").read_bytes())
        cert.verify_directly_issued_by(ca)
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert ExtendedKeyUsageOID.SERVER_AUTH in usage
    assert set(_san(directory / "mqtt_server.crt")) == {
        "mosquitto",
        "mqtt.hub.example.vn",
        "203.0.113.7",
    }
    assert set(_san(directory / "grafana.crt")) == {"localhost", "127.0.0.1"}

    # Again: nothing is overwritten.
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    again = run_make_secrets(directory)
    assert again.returncode == 0, again.stderr
    assert "0 file(s) created" in again.stdout
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before

    # A removed file comes back alone; the others stay as they were.
    (directory / "db_alerts_password").unlink()
    (directory / "grafana.key").unlink()
    (directory / "grafana.crt").unlink()
    refilled = run_make_secrets(directory)
    assert refilled.returncode == 0, refilled.stderr
    after = {p.name: p.read_bytes() for p in directory.iterdir()}
    assert set(after) == set(before)
    changed = {n for n in after if after[n] != before[n]}
    assert changed == {"db_alerts_password", "grafana.key", "grafana.crt"}
    x509.load_pem_x509_certificate(after["grafana.crt"]).verify_directly_issued_by(ca)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving files group 10001 needs root")
def test_make_secrets_refuses_half_a_ca(tmp_path) -> None:
    directory = tmp_path / "secrets"
    assert run_make_secrets(directory).returncode == 0
    (directory / "ca.key").unlink()
    (directory / "mqtt_server.crt").unlink()
    refused = run_make_secrets(directory)
    assert refused.returncode != 0
    assert "ca.key" in refused.stderr
    assert not (directory / "mqtt_server.crt").exists()


def test_make_secrets_list_is_the_compose_files_secrets(compose) -> None:
    names = secret_names()
    assert len(names) == len(set(names))
    declared = compose["secrets"]
    assert sorted(declared) == sorted(names)
    for name, secret in declared.items():
        assert secret == {"file": f"deploy/secrets/{name}"}, name
    assert "/deploy/secrets/" in (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()


# --- docker-compose.yml walked ---------------------------------------------------------


def test_every_mounted_secret_is_declared_and_made(compose) -> None:
    names = set(secret_names())
    used: set[str] = set()
    for service_name, service in compose["services"].items():
        for name in mounted(service):
            assert name in compose["secrets"], f"{service_name}: {name} undeclared"
            assert name in names, f"{service_name}: {name} not made by deploy/make-secrets"
            used.add(name)
    assert used == names, f"made but mounted nowhere: {names - used}"


def test_the_admin_account_and_broker_secrets_reach_only_their_services(compose) -> None:
    services = compose["services"]
    holders = {n for n, s in services.items() if "mqtt_admin_password" in mounted(s)}
    assert holders <= ADMIN_HOLDERS
    assert "mosquitto-init" in holders
    for name, service in services.items():
        environment = service.get("environment") or {}
        if environment.get("CITYHUB_BROKER__USERNAME") == "cityhub-admin":
            assert name in ADMIN_HOLDERS, name
    alerts = services["alerts"]
    assert not [s for s in mounted(alerts) if s.startswith("mqtt_")]
    assert not [k for k in alerts["environment"] if "BROKER" in k]
    assert mounted(services["mosquitto"]) == []  # mosquitto-init hands it its files


def test_each_service_uses_its_own_account(compose) -> None:
    services = compose["services"]

    def env(name: str) -> dict[str, str]:
        return services[name]["environment"]

    def role(name: str) -> str:
        url = env(name)["CITYHUB_DATABASE__URL"]
        return url.split("//", 1)[1].split("@", 1)[0]

    assert role("ingest") == "${HUB_SCHEMA:-cityhub}_ingest"
    assert role("alerts") == "${HUB_SCHEMA:-cityhub}_alerts"
    assert role("provision-demo") == "${HUB_SCHEMA:-cityhub}_technician"
    assert role("migrate") == role("seed") == "${POSTGRES_USER:-cityhub}"
    assert env("grafana")["GRAFANA_DB_USER"] == "${HUB_SCHEMA:-cityhub}_reader"
    assert env("ingest")["CITYHUB_BROKER__USERNAME"] == "ingest.compose"
    assert env("ingest")["CITYHUB_INGEST__WORKERS"] == "1"
    assert env("simulator")["CITYHUB_GATEWAY__SITE_BROKER__USERNAME"] == "sim.compose"
    accounts = env("mosquitto-init")["MQTT_SERVICE_ACCOUNTS"].split()
    assert accounts == [
        "ingest.compose=/run/secrets/mqtt_ingest_password",
        "sim.compose=/run/secrets/mqtt_sim_password",
    ]
    # Each *_FILE names a secret mounted into that service.
    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            if key.endswith("_FILE") and str(value).startswith("/run/secrets/"):
                assert value.removeprefix("/run/secrets/") in mounted(service), (name, key)
    # The migrate job gives the four roles their passwords, from their files.
    script = services["migrate"]["command"][0]
    assert "cityhub db set-password" in script
    assert "for kind in ingest alerts reader technician" in script
    # The gateway runs from the bundle provision-demo writes, TLS to 8883.
    assert "gateway-bundle:/var/lib/cityhub/bundles:ro" in services["gateway"]["volumes"]
    assert not [k for k in env("gateway") if "BROKER" in k]
    assert env("provision-demo")["CITYHUB_PROVISIONING__CENTRAL_TLS_PORT"] == "8883"


def test_the_pki_register_and_crl_outlive_the_provisioning_containers(compose) -> None:
    """`pki revoke` in the cli container writes the register and CRL into a volume
    that provision-demo shares and mosquitto-init reads the CRL from."""
    services = compose["services"]
    for name in ("provision-demo", "cli"):
        pki_dir = services[name]["environment"]["CITYHUB_PROVISIONING__PKI_DIR"]
        assert f"pki:{pki_dir}" in services[name]["volumes"], name
    init = services["mosquitto-init"]
    mounts = [v for v in init["volumes"] if v.startswith("pki:")]
    assert mounts == ["pki:/pki-state:ro"]
    assert init["environment"]["MQTT_CRL_FILE"] == "/pki-state/crl.pem"
    assert "pki" in compose["volumes"]


def test_no_password_is_written_into_the_environment(compose) -> None:
    for name, service in compose["services"].items():
        environment = service.get("environment") or {}
        assert isinstance(environment, dict), f"{name}: environment as a list"
        for key, value in environment.items():
            if "PASSWORD" in key:
                assert key.endswith("_FILE"), f"{name}: {key}={value} is a plain password"
            text = str(value)
            if "://" in text and "@" in text:
                # ${VAR:-default} interpolations are not passwords.
                userinfo = re.sub(r"\$\{[^}]*\}", "", text.split("://", 1)[1].split("@", 1)[0])
                assert ":" not in userinfo, f"{name}: {key} has a password in its URL"
        assert "env_file" not in service, f"{name}: env_file puts every variable everywhere"


def _published(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host ip, container port) of every published port; "" = all interfaces."""
    found = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            found.append((port.get("host_ip", ""), str(port["target"])))
            continue
        parts = str(port).split(":")
        ip = parts[0] if len(parts) == 3 else ""
        found.append((ip, parts[-1].split("/")[0]))
    return found


def test_only_tls_listeners_face_the_outside(compose) -> None:
    services = compose["services"]
    for name, service in services.items():
        for ip, target in _published(service):
            if target in {"1883", "5432", "9090", "9093", "9101", "9102", "9103"}:
                assert ip == "127.0.0.1", f"{name}: {target} published on {ip or 'all'}"
    assert _published(services["mosquitto"]) == [("", "8883")]
    assert _published(services["timescaledb"]) == [("127.0.0.1", "5432")]
    assert _published(services["prometheus"]) == [("127.0.0.1", "9090")]
    assert _published(services["alertmanager"]) == [("127.0.0.1", "9093")]
    grafana = services["grafana"]["environment"]
    assert grafana["GF_SERVER_PROTOCOL"] == "https"
    assert grafana["GF_SERVER_CERT_FILE"] == "/run/secrets/grafana.crt"
    assert compose["networks"]["internal"]["internal"] is True
    # A published port needs a network with a way out; the rest stay internal only.
    for name, service in services.items():
        networks = service.get("networks", [])
        assert "internal" in networks, name
        if service.get("ports"):
            assert "edge" in networks, name
    for name in ("ingest", "alerts", "gateway", "migrate"):
        assert services[name]["networks"] == ["internal"], name


def _default(value: str) -> str:
    """The default of a ``${NAME:-default}`` value (the value itself when it has none)."""
    found = re.fullmatch(r"\$\{[A-Z_]+:-([^}]*)\}", value)
    return found.group(1) if found else value


def test_plain_mqtt_listens_only_on_the_internal_network(compose) -> None:
    """Issue 20 item 4: 1883 not on `edge`, the network the Docker host and published ports use.

    The broker's config listens on the container's loopback (its health check) and
    mosquitto-init adds the broker's fixed address on `internal`, nothing else.
    """
    conf = (ROOT / "deploy" / "mosquitto" / "mosquitto.conf").read_text(encoding="utf-8")
    listeners = [line.split() for line in conf.splitlines() if line.startswith("listener ")]
    assert listeners == [["listener", "1883", "127.0.0.1"]]
    services = compose["services"]
    address = services["mosquitto"]["networks"]["internal"]["ipv4_address"]
    assert services["mosquitto-init"]["environment"]["MQTT_INTERNAL_ADDRESS"] == address
    (subnet,) = compose["networks"]["internal"]["ipam"]["config"]
    assert ipaddress.ip_address(_default(address)) in ipaddress.ip_network(
        _default(subnet["subnet"])
    )
    assert services["mosquitto"]["networks"]["edge"] == {}


def test_every_image_is_pinned_by_tag_and_digest(compose) -> None:
    for name, service in compose["services"].items():
        if "build" in service:
            assert service["image"] == "cityhub:0.1.0", name  # built here, from the Dockerfile
            continue
        assert PINNED.match(service["image"]), f"{name}: {service['image']}"
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    (python_image,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", text, flags=re.MULTILINE)
    assert PINNED.match(python_image), python_image
    for base in re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE):
        assert base == "${PYTHON_IMAGE}", base


def test_the_image_installs_from_the_hash_checked_lock() -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(
        r'pip install --require-hashes -r "requirements/\$\{CITYHUB_LOCK\}\.txt"', text
    )
    assert re.search(r"pip install --no-deps \.", text)
    (default,) = re.findall(r"^ARG CITYHUB_LOCK=(\S+)$", text, flags=re.MULTILINE)
    for lock in {default, "central"}:
        requirements = (ROOT / "requirements" / f"{lock}.txt").read_text(encoding="utf-8")
        entries = re.split(r"\n(?=[A-Za-z0-9])", requirements)
        pinned = [e for e in entries if re.match(r"[A-Za-z0-9][\w.-]*(\[.*\])?==", e)]
        assert pinned, lock
        for entry in pinned:
            assert "--hash=sha256:" in entry, f"{lock}: {entry.splitlines()[0]} has no hash"


def _healthcheck_code(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    return str(test[3])


def _run_check(code: str, port: int, original: int) -> int:
    code = code.replace(f"127.0.0.1:{original}", f"127.0.0.1:{port}")
    return subprocess.run([sys.executable, "-c", code], check=False, timeout=30).returncode


def test_ingest_health_check_needs_broker_and_database(compose) -> None:
    code = _healthcheck_code(compose["services"]["ingest"])
    metrics = IngestMetrics(IngestCounters(), worker_id="0")
    port = free_port()
    server = serve_ingest_metrics(metrics, "127.0.0.1", port)
    try:
        assert _run_check(code, port, 9101) == 1  # neither yet
        metrics.db_connected = True
        assert _run_check(code, port, 9101) == 1  # no broker
        metrics.broker_connected = lambda: True
        assert _run_check(code, port, 9101) == 0
        metrics.db_connected = False
        assert _run_check(code, port, 9101) == 1
    finally:
        server.close()
    assert _run_check(code, free_port(), 9101) != 0  # nothing listening


def test_gateway_health_check_needs_the_uplink(compose) -> None:
    code = _healthcheck_code(compose["services"]["gateway"])
    gauges = dict.fromkeys(
        [
            "outbox_readings",
            "outbox_batches",
            "outbox_bytes",
            "devices_online",
            "command_reports_pending",
            "commands_held",
        ],
        0,
    )
    gauges["uplink_connected"] = 0
    port = free_port()
    server = serve_gateway_metrics(
        "127.0.0.1", port, gateway_id="gw-demo", counters=GatewayCounters(), gauges=lambda: gauges
    )
    try:
        assert _run_check(code, port, 9102) == 1
        gauges["uplink_connected"] = 1
        assert _run_check(code, port, 9102) == 0
    finally:
        server.close()


def test_alerts_health_check_is_the_cycle_age(compose) -> None:
    alerts = compose["services"]["alerts"]
    assert alerts["healthcheck"]["test"][:4] == ["CMD", "cityhub", "alerts", "health"]
    assert alerts["environment"]["CITYHUB_ALERTS__METRICS_PORT"] == "9103"
    assert alerts["environment"]["CITYHUB_ALERTS__NOTIFY__ALERTMANAGER_URL"] == (
        "http://alertmanager:9093"
    )


# --- Prometheus and Alertmanager -------------------------------------------------------

PROMTOOL = shutil.which("promtool")
AMTOOL = shutil.which("amtool")
PROMETHEUS = shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool missing (Debian prometheus), run scripts/install-system-deps"
)


@needs_promtool
def test_promtool_accepts_the_config_and_rules() -> None:
    assert PROMTOOL is not None
    for args in (
        ["check", "config", str(PROMETHEUS_DIR / "prometheus.yml")],
        ["check", "rules", str(PROMETHEUS_DIR / "rules.yml")],
    ):
        checked = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, check=False)
        assert checked.returncode == 0, checked.stdout + checked.stderr


@needs_promtool
def test_promtool_rejects_a_broken_rule(tmp_path) -> None:
    assert PROMTOOL is not None
    rules = yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text(encoding="utf-8"))
    rules["groups"][0]["rules"][0]["expr"] = "up{job= == 0"
    broken = tmp_path / "rules.yml"
    broken.write_text(yaml.safe_dump(rules), encoding="utf-8")
    checked = subprocess.run(
        [PROMTOOL, "check", "rules", str(broken)], capture_output=True, text=True, check=False
    )
    assert checked.returncode != 0


def test_prometheus_scrapes_every_hub_service_and_alerts_the_stack(compose) -> None:
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text(encoding="utf-8"))
    targets = {
        job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]
    }
    env = {name: s.get("environment") or {} for name, s in compose["services"].items()}
    assert targets["cityhub-ingest"] == [f"ingest:{env['ingest']['CITYHUB_INGEST__METRICS_PORT']}"]
    assert targets["cityhub-gateway"] == [
        f"gateway:{env['gateway']['CITYHUB_GATEWAY__METRICS_PORT']}"
    ]
    assert targets["cityhub-alerts"] == [f"alerts:{env['alerts']['CITYHUB_ALERTS__METRICS_PORT']}"]
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == [
        "alertmanager:9093"
    ]
    rules = yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text(encoding="utf-8"))
    severities = {r["labels"]["severity"] for g in rules["groups"] for r in g["rules"]}
    assert severities <= {"critical", "major", "minor", "warning"}
    names = [r["alert"] for g in rules["groups"] for r in g["rules"]]
    assert not [n for n in names if n.endswith("-offline")]  # kept for device inhibition


@pytest.mark.skipif(AMTOOL is None, reason="amtool missing (Debian prometheus-alertmanager)")
def test_amtool_accepts_the_stacks_alertmanager_config() -> None:
    assert AMTOOL is not None
    checked = subprocess.run(
        [AMTOOL, "check-config", str(ALERTMANAGER_YML)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback http
        return json.loads(response.read())


@pytest.fixture
def prometheus_on(tmp_path) -> Iterator[Any]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(scrape_port: int) -> int:
        if PROMETHEUS is None:
            pytest.skip("prometheus missing (Debian prometheus), run scripts/install-system-deps")
        port = free_port()
        config = {
            # 1 s, so the test sees a scrape and an evaluation within seconds.
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(PROMETHEUS_DIR / "rules.yml")],
            "scrape_configs": [
                {
                    "job_name": "cityhub-alerts",
                    "static_configs": [{"targets": [f"127.0.0.1:{scrape_port}"]}],
                }
            ],
        }
        path = tmp_path / "prometheus.yml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        log = (tmp_path / "prometheus.log").open("wb")
        procs.append(
            subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={path}",
                    f"--storage.tsdb.path={tmp_path / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        log.close()
        return port

    yield start
    for proc in procs:
        if proc.poll() is None:
            stop_process_group(proc.pid, first_signal=signal.SIGTERM, timeout_s=10, what="prom")
        proc.wait(10)


def test_a_real_prometheus_scrapes_the_alerts_job_and_a_rule_fires(prometheus_on, tmp_path):
    # An alerts job /metrics whose last cycle is 10 minutes old: hung, for the rules.
    port = free_port()
    counters = JobCounters(cycles=1, last_cycle_end_s=time.time() - 600)
    server = serve_alerts_metrics("127.0.0.1", port, job_id="alerts", counters=counters)
    try:
        prom = prometheus_on(port)
        base = f"http://127.0.0.1:{prom}/api/v1"
        deadline = time.monotonic() + 25
        state = None
        while time.monotonic() < deadline:
            try:
                targets = _get_json(f"{base}/targets")["data"]["activeTargets"]
                rules = _get_json(f"{base}/rules")["data"]["groups"]
            except OSError:
                time.sleep(0.3)
                continue
            healths = {t["labels"]["job"]: t["health"] for t in targets}
            by_name = {r["name"]: r for g in rules for r in g["rules"]}
            stale = by_name.get("cityhub-alerts-job-stale", {})
            state = (healths.get("cityhub-alerts"), stale.get("health"), stale.get("state"))
            if state[0] == "up" and stale.get("state") in {"pending", "firing"}:
                break
            time.sleep(0.3)
        log = (tmp_path / "prometheus.log").read_text(errors="replace")
        assert state is not None, log
        assert state[0] == "up", (state, log)
        assert state[1] == "ok", (state, log)
        assert state[2] in {"pending", "firing"}, (state, log)
        # The job is up: its down rule stays inactive, evaluated without error.
        down = by_name["cityhub-alerts-job-down"]
        assert (down["health"], down["state"]) == ("ok", "inactive")
        assert all(r["health"] == "ok" for r in by_name.values()), by_name
    finally:
        server.close()


def test_the_compose_scripts_parse(compose) -> None:
    for name, service in compose["services"].items():
        entrypoint = service.get("entrypoint") or []
        if entrypoint[:2] != ["/bin/sh", "-ec"]:
            continue
        script = entrypoint[2] if len(entrypoint) > 2 else service["command"][0]
        # Compose turns $$ into $ before the shell sees it.
        checked = subprocess.run(
            ["/bin/sh", "-n", "-c", script.replace("$$", "$")],
            capture_output=True,
            text=True,
            check=False,
        )
        assert checked.returncode == 0, f"{name}: {checked.stderr}"


def test_the_demo_gateway_runs_from_its_tls_bundle_with_the_compose_settings(
    compose, tmp_path
) -> None:
    """A bundle as provision-demo's `cityhub gateways add` writes it, read the way the gateway
    service reads it (`gateway run --config BUNDLE.toml` with its compose environment)."""
    from devices.bundle import MqttAccess, gateway_bundle
    from devices.bundlefiles import write_bundle
    from devices.pki import Pki

    now = dt.datetime.now(dt.UTC)
    pki = Pki(tmp_path / "pki")
    pki.create_ca(now=now)
    client = pki.issue_client("gw-hk-hall-quan", now=now)
    provision = compose["services"]["provision-demo"]["environment"]
    bundle = gateway_bundle(
        gateway_id="gw-hk-hall-quan",
        site_id="hk-hall-quan",
        label="compose demo",
        location="",
        central=MqttAccess(
            host=provision["CITYHUB_PROVISIONING__CENTRAL_PUBLIC_HOST"],
            port=int(provision["CITYHUB_PROVISIONING__CENTRAL_TLS_PORT"]),
            tls=True,
            username="gw-hk-hall-quan.central",
            password="s3cret-central",
            client_id="gw-hk-hall-quan.central",
        ),
        site=MqttAccess(
            host=provision["CITYHUB_PROVISIONING__SITE_PUBLIC_HOST"],
            port=int(provision["CITYHUB_PROVISIONING__SITE_PUBLIC_PORT"]),
            tls=False,
            username="gw-hk-hall-quan.site",
            password="s3cret-site",
            client_id="gw-hk-hall-quan.site",
        ),
        prefix="",
        ca_pem=pki.ca_pem(),
        cert_pem=client.cert.read_text(),
        key_pem=client.key.read_text(),
        issued_at=now.isoformat(),
        issued_by="provision-demo",
    )
    files = write_bundle(tmp_path / "bundles", bundle)
    assert files.settings is not None
    gateway = compose["services"]["gateway"]
    # The bundle's file names are absolute: the gateway mounts the volume where they were written.
    bundle_dir = provision["CITYHUB_PROVISIONING__BUNDLE_DIR"]
    assert f"gateway-bundle:{bundle_dir}:ro" in gateway["volumes"]
    assert f"gateway-bundle:{bundle_dir}" in compose["services"]["provision-demo"]["volumes"]
    assert (
        gateway["command"][-1] == f"{bundle_dir}/gateway-${{DEMO_GATEWAY_ID:-gw-hk-hall-quan}}.toml"
    )

    from contracts.settings import load_settings

    environ = {**compose["x-cityhub-environment"], **gateway["environment"]}
    environ = {k: str(v) for k, v in environ.items() if not isinstance(v, dict)}
    settings = load_settings(files.settings, environ)
    central, site = settings.broker, settings.gateway.site_broker
    assert (central.host, central.port, central.tls) == ("mosquitto", 8883, True)
    assert central.username == "gw-hk-hall-quan.central"
    for path in (central.ca_file, central.cert_file, central.key_file):
        assert Path(path).is_file(), path
        assert Path(path).stat().st_mode & 0o077 == 0, path
    assert (site.host, site.port, site.tls) == ("mosquitto", 1883, False)
    assert settings.gateway.gateway_id == "gw-hk-hall-quan"
    assert settings.gateway.outbox_path == "/var/lib/cityhub/outbox/outbox.sqlite3"
    assert settings.gateway.metrics_port == 9102
