"""deploy/systemd: the units pass systemd-analyze, and install-gateway lays out a board.

systemd is not PID 1 on the test machines (containers): ``systemd-analyze
verify`` and ``security --offline=true`` read unit files without a running
manager, and ``systemd-sysusers --root`` / ``systemctl --root`` work on a
directory. The units are copied with ExecStart pointing at a program that
exists (verify checks it is executable); everything else is as shipped.
The install script runs for real into a temporary root (``--root``, with the
worktree's cityhub standing in for the venv: ``--no-venv``) and as
``--dry-run``; its venv step (pip from the lock file) is the packaging
test's (tests/project/test_packaging.py).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from contracts.errors import SettingsError
from contracts.settings import load_settings
from devices.bundle import MqttAccess, encode_bundle, gateway_bundle
from devices.bundlefiles import install_gateway_bundle

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "systemd"
INSTALL = DEPLOY / "install-gateway"
CITYHUB_BIN = "/opt/cityhub/bin/cityhub"
BASH = shutil.which("bash") or "/bin/bash"
# The template is verified as an instance (its %i expanded).
UNITS = {
    "cityhub-gateway.service": "cityhub-gateway.service",
    "cityhub-ingest@.service": "cityhub-ingest@main.service",
    "cityhub-alerts.service": "cityhub-alerts.service",
}
# systemd-analyze security's 0-10 exposure scale ("OK" below 2.0 at 252):
# the gateway needs serial devices, the network and a supplementary group.
EXPOSURE_THRESHOLD = 2.0

analyze = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    analyze is None, reason="systemd-analyze missing (Debian package systemd)"
)


def unit_copy(tmp_path: Path, name: str, text: str | None = None) -> Path:
    """The unit under its verified name, ExecStart pointing at an executable in tmp_path."""
    program = tmp_path / "cityhub"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    body = (DEPLOY / name).read_text() if text is None else text
    assert CITYHUB_BIN in body
    path = tmp_path / UNITS[name]
    path.write_text(body.replace(CITYHUB_BIN, str(program)))
    return path


def systemd_analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert analyze is not None
    return subprocess.run(
        [analyze, *args], capture_output=True, text=True, cwd=cwd, timeout=120, check=False
    )


@needs_analyze
@pytest.mark.parametrize("name", sorted(UNITS))
def test_units_verify_without_a_word(name, tmp_path):
    unit = unit_copy(tmp_path, name)
    done = systemd_analyze("verify", f"./{unit.name}", cwd=tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


@needs_analyze
def test_verify_speaks_up_about_a_mistyped_key(tmp_path):
    """The check above can fail: a misspelt setting is a warning (exit 0, one line)."""
    text = (DEPLOY / "cityhub-gateway.service").read_text()
    unit = unit_copy(tmp_path, "cityhub-gateway.service", text.replace("LockPersonality", "LockP"))
    done = systemd_analyze("verify", f"./{unit.name}", cwd=tmp_path)
    assert "Unknown key 'LockP'" in done.stdout + done.stderr


@needs_analyze
@pytest.mark.parametrize("name", sorted(UNITS))
def test_units_exposure_is_low(name, tmp_path):
    unit = unit_copy(tmp_path, name)
    done = systemd_analyze(
        "security",
        "--offline=true",
        f"--threshold={EXPOSURE_THRESHOLD * 10:.0f}",  # the option counts tenths
        f"./{unit.name}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Overall exposure level" in done.stdout


def test_the_gateway_unit_is_a_watched_notify_service():
    text = (DEPLOY / "cityhub-gateway.service").read_text()
    settings = {
        line.split("=", 1)[0]: line.split("=", 1)[1]
        for line in text.splitlines()
        if "=" in line and not line.startswith("#")
    }
    assert settings["Type"] == "notify"
    assert settings["WatchdogSec"] == "30s"
    assert settings["ExecStart"] == f"{CITYHUB_BIN} gateway run"
    assert settings["User"] == "cityhub"
    assert "DynamicUser" not in settings


# --- install-gateway --------------------------------------------------------------------


def write_bundle(path: Path, *, tls: bool) -> Path:
    def access(host: str, user: str) -> MqttAccess:
        return MqttAccess(
            host=host,
            port=8883 if tls else 1883,
            tls=tls,
            username=user,
            password="bí-mật-123",
            client_id=user,
        )

    bundle = gateway_bundle(
        gateway_id="gw-hk-hall",
        site_id="hk-hall-ubnd",
        label="Trạm UBND Hoàn Kiếm",
        location="tầng 1",
        central=access("hub.example.vn", "gw-hk-hall"),
        site=access("127.0.0.1", "gw-hk-hall"),
        prefix="",
        ca_pem="CA PEM\n" if tls else "",
        cert_pem="CERT PEM\n" if tls else "",
        key_pem="KEY PEM\n" if tls else "",
        issued_at="2026-12-06T10:00:00+07:00",
        issued_by="technician",
    )
    path.write_bytes(encode_bundle(bundle))
    return path


def board_root(tmp_path: Path) -> Path:
    """An empty file system root whose /opt/cityhub/bin/cityhub is this worktree's."""
    root = tmp_path / "board"
    program = root / "opt" / "cityhub" / "bin" / "cityhub"
    program.parent.mkdir(parents=True)
    program.write_text(f'#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} -m cityhub "$@"\n')
    program.chmod(0o755)
    return root


def install(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITYHUB_")}
    return subprocess.run(
        [BASH, str(INSTALL), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def tree(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every path under root: (mode, gid, link target or '')."""
    found = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        target = str(path.readlink()) if path.is_symlink() else ""
        found[str(path.relative_to(root))] = (stat.S_IMODE(info.st_mode), info.st_gid, target)
    return found


@pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None or shutil.which("systemctl") is None,
    reason="systemd-sysusers or systemctl missing (Debian package systemd)",
)
def test_install_into_a_board_root_twice_gives_the_same_board(tmp_path):
    root = board_root(tmp_path)
    bundle = write_bundle(tmp_path / "gateway-gw-hk-hall.json", tls=True)
    first = install("--root", root, "--no-venv", bundle)
    assert first.returncode == 0, first.stderr
    laid_out = tree(root)
    again = install("--root", root, "--no-venv", bundle)
    assert again.returncode == 0, again.stderr
    assert tree(root) == laid_out

    passwd = (root / "etc" / "passwd").read_text().splitlines()
    users = [line for line in passwd if line.startswith("cityhub:")]
    assert len(users) == 1
    gid = int(users[0].split(":")[3])
    settings = root / "etc" / "cityhub" / "gateway.toml"
    for path in (settings, *(root / "etc" / "cityhub" / "tls").iterdir()):
        assert laid_out[str(path.relative_to(root))][:2] == (0o640, gid), path
        assert path.stat().st_uid == 0
    assert laid_out["etc/cityhub/tls"][:2] == (0o750, gid)
    text = settings.read_text()
    assert 'gateway_id = "gw-hk-hall"' in text
    # The paths as the board sees them, not the image's.
    assert 'key_file = "/etc/cityhub/tls/client.key"' in text
    unit = "etc/systemd/system/cityhub-gateway.service"
    assert laid_out[unit][0] == 0o644
    wants = "etc/systemd/system/multi-user.target.wants/cityhub-gateway.service"
    assert laid_out[wants][2].endswith("cityhub-gateway.service")


def test_a_device_bundle_is_refused(tmp_path):
    root = board_root(tmp_path)
    bundle = tmp_path / "device.json"
    bundle.write_text('{"kind": "device"}')
    done = install("--root", root, "--no-venv", bundle)
    assert done.returncode != 0
    assert not (root / "etc" / "cityhub" / "gateway.toml").exists()


def test_dry_run_prints_every_step_and_changes_nothing(tmp_path):
    root = tmp_path / "untouched"
    bundle = write_bundle(tmp_path / "gateway-gw-hk-hall.json", tls=False)
    done = install("--dry-run", "--root", root, bundle)
    assert done.returncode == 0, done.stderr
    steps = [line for line in done.stdout.splitlines() if line.startswith("+ ")]
    joined = "\n".join(steps)
    for expected in (
        "systemd-sysusers",
        "-m venv",
        "--require-hashes -r " + str(ROOT / "requirements" / "gateway.txt"),
        "gateway install-bundle",
        "cityhub-gateway.service",
        "enable cityhub-gateway.service",
    ):
        assert expected in joined, expected
    assert not root.exists()


def test_an_installed_bundle_is_owner_only_without_a_group_and_loads_as_settings(tmp_path):
    bundle = write_bundle(tmp_path / "gateway-gw-hk-hall.json", tls=False)
    config_dir = tmp_path / "etc-cityhub"
    written = install_gateway_bundle(bundle, config_dir)
    assert [p.name for p in written] == ["gateway.toml"]
    assert stat.S_IMODE(written[0].stat().st_mode) == 0o600
    assert not (config_dir / "tls").exists()
    settings = load_settings(written[0], {})
    assert settings.gateway.gateway_id == "gw-hk-hall"
    assert settings.broker.password == "bí-mật-123"
    assert settings.gateway.site_broker.host == "127.0.0.1"


def test_a_group_that_does_not_exist_is_a_settings_error(tmp_path):
    bundle = write_bundle(tmp_path / "gateway-gw-hk-hall.json", tls=False)
    with pytest.raises(SettingsError, match="--group"):
        install_gateway_bundle(bundle, tmp_path / "etc", group="no-such-group-xyz")


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b'{"kind": "gateway", "gateway_id": ',  # cut off in transit
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 64,  # the QR picture copied instead of the bundle
        b'{"kind": "gateway", "gateway_id": "../../etc"}',  # a hostile id
        b"{" + b" " * (2 << 20) + b"}",  # large and empty
    ],
    ids=["empty", "truncated", "binary", "hostile-id", "large"],
)
def test_a_broken_bundle_is_a_settings_error_and_writes_nothing(tmp_path, content):
    bundle = tmp_path / "gateway-gw-hk-hall.json"
    bundle.write_bytes(content)
    config_dir = tmp_path / "etc-cityhub"
    with pytest.raises(SettingsError, match=str(bundle)):
        install_gateway_bundle(bundle, config_dir)
    assert not config_dir.exists() or not any(config_dir.iterdir())
