"""systemd's notify protocol: the environment read once, datagrams on a real AF_UNIX socket."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters.sdnotify import Notifier
from contracts.errors import SettingsError


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    sock.bind(str(path))
    sock.settimeout(5)
    yield str(path), sock
    sock.close()


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, Notifier()),
        ({"NOTIFY_SOCKET": "/run/x"}, Notifier(address="/run/x")),
        ({"NOTIFY_SOCKET": "@abs", "WATCHDOG_USEC": "30000000"}, Notifier("@abs", 30.0)),
        # The watchdog is another process's (a child inherited the variables).
        ({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}, None),
    ],
)
def test_from_environ(environ, expected):
    if expected is None:
        expected = Notifier(address="/run/x") if os.getpid() != 1 else Notifier("/run/x", 1.0)
    assert Notifier.from_environ(environ) == expected


def test_our_own_pid_gets_the_watchdog():
    environ = {"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_environ(environ).watchdog_s == 0.5


@pytest.mark.parametrize("usec", ["soon", "-5", "0", "1e6"])
def test_a_bad_watchdog_interval_is_a_settings_error(usec):
    with pytest.raises(SettingsError, match="WATCHDOG_USEC"):
        Notifier.from_environ({"WATCHDOG_USEC": usec})


def test_notify_sends_one_datagram_of_lines(listener):
    path, sock = listener
    Notifier(address=path).notify(READY="1", STATUS="uplink connected, outbox 0 readings")
    assert sock.recv(4096) == b"READY=1\nSTATUS=uplink connected, outbox 0 readings"


def test_abstract_socket_names_start_with_an_at_sign():
    name = f"cityhub-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        Notifier(address="@" + name).notify(WATCHDOG="1")
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_without_a_socket_nothing_is_sent_and_a_gone_manager_is_no_crash(tmp_path, caplog):
    Notifier().notify(READY="1")
    Notifier(address=str(tmp_path / "gone")).notify(READY="1")
    assert "notify socket" in caplog.text
