"""docker-compose.yml against the Compose Specification's JSON schema, and its files.

No Docker engine here: the file is checked as data. The schema is the
specification's own (deploy/compose-spec/, with its source and licence).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
SCHEMA = ROOT / "deploy" / "compose-spec" / "compose-spec.json"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def _validator() -> jsonschema.Draft201909Validator:
    # The file's $schema names draft 2019-09 by an old URI that jsonschema does
    # not recognise; the draft is chosen here instead.
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    assert "2019-09" in schema["$schema"]
    jsonschema.Draft201909Validator.check_schema(schema)
    return jsonschema.Draft201909Validator(schema)


def test_compose_file_validates_against_the_compose_specification(compose) -> None:
    errors = sorted(_validator().iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_the_schema_catches_a_mistake(compose) -> None:
    broken = json.loads(json.dumps(compose))
    broken["services"]["grafana"]["helthcheck"] = {"test": "true"}
    assert list(_validator().iter_errors(broken))


def _bind_sources(compose: dict) -> list[tuple[str, str]]:
    """(service, host path) of every bind mount (short and long syntax)."""
    named = set(compose.get("volumes") or {})
    found = []
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.get("source") if isinstance(volume, dict) else volume.split(":")[0]
            if source and source not in named:
                found.append((name, source))
    return found


def test_every_mounted_file_exists(compose) -> None:
    binds = _bind_sources(compose)
    assert binds, "expected bind mounts (broker config, provisioning, boards)"
    for service, source in binds:
        assert source.startswith("./"), f"{service}: mount {source} is not relative"
        assert (ROOT / source).exists(), f"{service}: {source} does not exist"


def test_named_volumes_are_declared(compose) -> None:
    named = set(compose.get("volumes") or {})
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source")
            if source and not source.startswith(("./", "/")):
                assert source in named, f"volume {source} is not declared"


def test_env_files_have_an_example_and_no_secrets_are_committed(compose) -> None:
    for service in compose["services"].values():
        env_file = service.get("env_file")
        for path in [env_file] if isinstance(env_file, str) else env_file or []:
            assert (ROOT / f"{path}.example").is_file(), f"{path}.example missing"
    for name, service in compose["services"].items():
        environment = service.get("environment") or {}
        for key, value in environment.items():
            if "PASSWORD" in key:
                # Passwords come from secret files (deploy/make-secrets), never values.
                assert key.endswith("_FILE"), f"{name}: {key} is written into the file"
                assert str(value).startswith("/run/secrets/"), f"{name}: {key} is not a secret"


def test_images_are_pinned_and_services_have_health_checks(compose) -> None:
    services = compose["services"]
    for name, service in services.items():
        image = service.get("image", "")
        if "build" not in service:
            assert re.search(r":v?\d+\.\d+", image), f"{name}: image {image!r} is not pinned"
    assert services["timescaledb"]["image"].startswith("timescale/timescaledb:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    for name in ("mosquitto", "timescaledb", "grafana", "ingest", "alerts", "gateway"):
        assert "healthcheck" in services[name], f"{name} has no health check"
    assert services["simulator"]["profiles"] == ["sim"]


def test_grafana_mounts_the_generated_boards_and_provisioning(compose) -> None:
    mounts = [v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"]]
    targets = {target: source for source, target in mounts}
    assert targets["/var/lib/grafana/dashboards/cityhub"] == "./grafana/dashboards"
    provider = yaml.safe_load(
        (ROOT / "grafana/provisioning/dashboards/cityhub.yaml").read_text(encoding="utf-8")
    )
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards/cityhub"
    assert any(t.startswith("/etc/grafana/provisioning") for t in targets)


def test_dockerfile_is_multi_stage_and_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\w+)", text, flags=re.MULTILINE)
    assert len(stages) >= 2
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)
    assert users
    assert users[-1] not in {"root", "0"}
    for source in re.findall(r"^COPY\s+(?!--from)(\S+)", text, flags=re.MULTILINE):
        assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"
