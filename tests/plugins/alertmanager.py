"""A private Prometheus Alertmanager, a webhook receiver and an SMTP sink for notification tests.

``alertmanager`` starts ``prometheus-alertmanager`` (Debian's package, from
``scripts/install-system-deps``; ``CITYHUB_TEST_ALERTMANAGER_BIN`` names
another) on a free port with no cluster, its storage in the test's
temporary directory, routing every alert to the ``webhook`` receiver (a
threaded HTTP server in the test process that records POST bodies) and to
the ``smtp_sink`` (aiosmtpd) when the test asks for it. Grouping waits 1 s
so a notification arrives within a couple of seconds. The test may
``kill()`` it (SIGKILL) and ``start()`` it again on the same port, with or
without its storage. When the binary is missing the test is skipped naming
it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from cityhub.localstack.procs import free_port

ALERTMANAGER_BIN_ENV = "CITYHUB_TEST_ALERTMANAGER_BIN"
# Alertmanager is ready in well under a second here; 20 s covers a loaded machine.
READY_TIMEOUT_S = 20.0


def wait_for(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll ``check`` every 0.1 s until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)


class Webhook:
    """An HTTP server recording the JSON bodies POSTed to it (Alertmanager's webhook)."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length))
                with hook._lock:
                    hook.bodies.append(body)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def received(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.bodies)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class SmtpSink:
    """An SMTP server (aiosmtpd) keeping every message it receives."""

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller  # type: ignore[import-not-found,unused-ignore]

        self.messages: list[Message] = []
        sink = self

        class Handler:
            async def handle_DATA(  # noqa: N802 - aiosmtpd's name
                self, _server: Any, _session: Any, envelope: Any
            ) -> str:
                sink.messages.append(message_from_bytes(envelope.content))
                return "250 OK"

        self.port = free_port()
        self._controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)
        self._controller.start()

    def close(self) -> None:
        self._controller.stop()


class Alertmanager:
    """One private Alertmanager process."""

    def __init__(
        self, *, binary: str, base_dir: Path, webhook_url: str, smtp_port: int | None = None
    ) -> None:
        self.binary = binary
        self.base_dir = base_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.storage = base_dir / "data"
        self.config = base_dir / "alertmanager.yml"
        self.log = base_dir / "alertmanager.log"
        self.config.write_text(self._config(webhook_url, smtp_port), encoding="utf-8")
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def _config(webhook_url: str, smtp_port: int | None) -> str:
        # JSON is YAML: no YAML writer needed.
        receiver: dict[str, Any] = {
            "name": "test",
            "webhook_configs": [{"url": webhook_url, "send_resolved": True}],
        }
        if smtp_port is not None:
            receiver["email_configs"] = [
                {
                    "to": "ops@cityhub.test",
                    "from": "alertmanager@cityhub.test",
                    "smarthost": f"127.0.0.1:{smtp_port}",
                    "require_tls": False,
                    "send_resolved": True,
                }
            ]
        config = {
            "route": {
                "receiver": "test",
                "group_by": ["alertname", "device_id"],
                "group_wait": "1s",
                "group_interval": "1s",
                # Long: a test sees one notification per change, never a repeat.
                "repeat_interval": "1h",
            },
            "receivers": [receiver],
        }
        return json.dumps(config, indent=2)

    def start(self, *, keep_storage: bool = True) -> None:
        if not keep_storage:
            shutil.rmtree(self.storage, ignore_errors=True)
        self.storage.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={self.config}",
                    f"--storage.path={self.storage}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--cluster.listen-address=",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(self._ready, READY_TIMEOUT_S, f"Alertmanager on {self.url} (log {self.log})")

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(
                f"Alertmanager exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}"
            )
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:  # noqa: S310
                return bool(response.status == 200)
        except OSError:
            return False

    def alerts(self) -> list[dict[str, Any]]:
        """What Alertmanager holds now (GET /api/v2/alerts)."""
        with urllib.request.urlopen(f"{self.url}/api/v2/alerts", timeout=5) as response:  # noqa: S310
            result: list[dict[str, Any]] = json.loads(response.read())
        return result

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing is flushed."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture(scope="session")
def alertmanager_bin() -> str:
    name = os.environ.get(ALERTMANAGER_BIN_ENV, "prometheus-alertmanager")
    found = shutil.which(name) or shutil.which("alertmanager")
    if found is None:
        pytest.skip(
            f"Alertmanager ({name!r}, not on PATH) missing: run scripts/install-system-deps"
        )
    return found


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    pytest.importorskip("aiosmtpd", reason="aiosmtpd (the dev extra) missing")
    sink = SmtpSink()
    yield sink
    sink.close()


@pytest.fixture
def alertmanager(alertmanager_bin: str, webhook: Webhook, tmp_path: Path) -> Iterator[Alertmanager]:
    """A started Alertmanager sending to ``webhook``."""
    server = Alertmanager(binary=alertmanager_bin, base_dir=tmp_path, webhook_url=webhook.url)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def mailing_alertmanager(
    alertmanager_bin: str, webhook: Webhook, smtp_sink: SmtpSink, tmp_path: Path
) -> Iterator[Alertmanager]:
    """A started Alertmanager sending to ``webhook`` and by email to ``smtp_sink``."""
    server = Alertmanager(
        binary=alertmanager_bin,
        base_dir=tmp_path,
        webhook_url=webhook.url,
        smtp_port=smtp_sink.port,
    )
    server.start()
    yield server
    server.stop()
