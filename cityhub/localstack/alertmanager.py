"""A private Prometheus Alertmanager in a directory of its own, for `cityhub up`.

Runs Debian's ``prometheus-alertmanager`` (``local.alertmanager_bin``) on
127.0.0.1:``local.alertmanager_port`` with no clustering
(``--cluster.listen-address=``: one instance, no gossip port), its
notification log and silences under ``base_dir/data`` and the configuration
it is given (``alertmanager.yml`` and the templates beside it) written there
at every start. ``start`` returns once ``/-/ready`` answers. Building the
configuration is ``cityhub.alertmanager``'s; keeping the process alive and
stopping it is the caller's (`cityhub up` runs it as one of its children).
"""

from __future__ import annotations

import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

from cityhub.localstack.procs import LOOPBACK, make_owned_dir, require_free_port, with_log_tail
from contracts.errors import ServiceStartError


def find_alertmanager(binary: str) -> str | None:
    """The Alertmanager program's path (``binary`` on PATH, or a path), None if missing."""
    return shutil.which(binary)


class AlertmanagerServer:
    """One private Alertmanager under ``base_dir`` (config, templates, storage, log)."""

    def __init__(self, *, base_dir: Path, port: int, binary: str, start_timeout_s: float) -> None:
        self.base_dir = base_dir
        self.port = port
        self.binary = binary
        self.start_timeout_s = start_timeout_s

    @property
    def config_path(self) -> Path:
        return self.base_dir / "alertmanager.yml"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "alertmanager.log"

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def write_config(self, files: Mapping[str, str]) -> None:
        """Write ``alertmanager.yml`` and its templates (name -> text; 0600: it may hold
        passwords or bot tokens)."""
        make_owned_dir(self.base_dir, None)
        make_owned_dir(self.base_dir / "data", None)
        for name, text in files.items():
            path = self.base_dir / name
            path.write_text(text, encoding="utf-8")
            path.chmod(0o600)

    def argv(self) -> list[str]:
        require_free_port(self.port, "Alertmanager")
        return [
            self.binary,
            f"--config.file={self.config_path}",
            f"--storage.path={self.base_dir / 'data'}",
            f"--web.listen-address={LOOPBACK}:{self.port}",
            "--cluster.listen-address=",
            "--log.level=warn",
        ]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:  # noqa: S310 - our own loopback URL
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def wait_ready(self, alive: Callable[[], bool]) -> None:
        """Poll ``/-/ready`` until it answers; ServiceStartError with the log's tail if the
        process exits (``alive()`` False) or the start timeout passes."""
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.ready():
                return
            if not alive():
                raise ServiceStartError(
                    with_log_tail("Alertmanager exited during start", self.log_path)
                )
            time.sleep(0.1)
        raise ServiceStartError(
            with_log_tail(f"Alertmanager did not answer on {self.url}", self.log_path)
        )
