"""Process plumbing for the private servers: who they run as, spawning, stopping, ports.

PostgreSQL refuses to run as root, so when cityhub runs as root the servers
run as their system users (``postgres``, ``mosquitto``) and their directories
belong to those users. Each server is started in a session of its own so that
it outlives the command that started it and so that its whole process group
(postmaster and backends) can be signalled at once.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from contracts.errors import MissingDependencyError, PortInUseError, ServiceStopError

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class RunAs:
    """A system user a server runs as when cityhub itself runs as root."""

    user: str
    uid: int
    gid: int
    home: str

    @classmethod
    def lookup(cls, user: str) -> RunAs:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise MissingDependencyError(
                f"system user {user!r} does not exist; it comes with the server's package "
                "(run scripts/install-system-deps)"
            ) from None
        return cls(user=user, uid=entry.pw_uid, gid=entry.pw_gid, home=entry.pw_dir)


def run_as_for(user: str, *, is_root: bool) -> RunAs | None:
    """The user to switch to, or None to run as ourselves."""
    return RunAs.lookup(user) if is_root else None


def make_owned_dir(path: Path, run_as: RunAs | None, mode: int = 0o700) -> None:
    """Create ``path`` (and parents) and hand it to the server's user."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)
    if run_as is not None:
        os.chown(path, run_as.uid, run_as.gid)


def write_owned_file(path: Path, text: str, run_as: RunAs | None, mode: int = 0o600) -> None:
    """Write a file readable by the server's user only (secrets, configs)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    path.chmod(mode)
    if run_as is not None:
        os.chown(path, run_as.uid, run_as.gid)


def check_reachable(path: Path, run_as: RunAs | None) -> None:
    """Fail early, naming the directory, if the server's user cannot reach ``path``."""
    if run_as is None:
        return
    for parent in reversed(path.resolve().parents):
        st = parent.stat()
        if st.st_uid == run_as.uid:
            continue
        others_x = st.st_mode & 0o001
        group_x = st.st_mode & 0o010 and st.st_gid == run_as.gid
        if not (others_x or group_x):
            raise MissingDependencyError(
                f"user {run_as.user!r} cannot enter {parent} (mode {st.st_mode & 0o777:o}); "
                "choose a state directory outside it (setting local.state_dir)"
            )


def run_checked(
    argv: list[str], run_as: RunAs | None, *, what: str, timeout_s: float = 120.0
) -> str:
    """Run a short program (initdb, mosquitto_passwd) to completion; raise with its output."""
    try:
        proc = subprocess.run(
            argv,
            user=run_as.uid if run_as else None,
            group=run_as.gid if run_as else None,
            extra_groups=[] if run_as else None,
            env=_child_env(run_as),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except FileNotFoundError as exc:
        raise MissingDependencyError(f"{what}: program {argv[0]!r} not found") from exc
    if proc.returncode != 0:
        output = (proc.stderr or proc.stdout).strip()
        raise MissingDependencyError(f"{what} failed (exit {proc.returncode}): {output}")
    return proc.stdout


def _child_env(run_as: RunAs | None) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8", "TZ": "UTC"}
    env["HOME"] = run_as.home if run_as else os.environ.get("HOME", "/")
    return env


def spawn_daemon(argv: list[str], run_as: RunAs | None, *, log_path: Path, cwd: Path) -> int:
    """Start a long-running server detached from us; return its pid.

    The child gets its own session (so Ctrl-C of the starting command does not
    reach it and its group can be killed at once), stdin from /dev/null and its
    output appended to ``log_path``.
    """
    with log_path.open("ab") as log, open(os.devnull, "rb") as devnull:  # noqa: PTH123
        try:
            proc = subprocess.Popen(
                argv,
                user=run_as.uid if run_as else None,
                group=run_as.gid if run_as else None,
                extra_groups=[] if run_as else None,
                env=_child_env(run_as),
                cwd=cwd,
                stdin=devnull,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            raise MissingDependencyError(f"program {argv[0]!r} not found") from exc
    # The server is not our child to wait for once we exit; reap it if it dies
    # while we are still here so it does not linger as a zombie.
    _DAEMONS[proc.pid] = proc
    return proc.pid


_DAEMONS: dict[int, subprocess.Popen[bytes]] = {}


def pid_alive(pid: int) -> bool:
    proc = _DAEMONS.get(pid)
    if proc is not None and proc.poll() is not None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def pid_runs(pid: int, program: str) -> bool:
    """True if ``pid`` is alive and is ``program`` (guards against pid reuse)."""
    if not pid_alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmdline) and Path(cmdline[0].decode(errors="replace")).name == program


def stop_process_group(
    pid: int, *, first_signal: signal.Signals, timeout_s: float, what: str
) -> None:
    """Signal a server's process group, wait, then SIGKILL what is left."""
    deadline = time.monotonic() + timeout_s
    for sig in (first_signal, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        except PermissionError as exc:
            raise ServiceStopError(f"{what}: not allowed to signal pid {pid}") from exc
        while time.monotonic() < deadline:
            if not pid_alive(pid) and not group_alive(pid):
                _reap(pid)
                return
            time.sleep(0.05)
        logger.warning("%s (pid %d) did not stop after %s; killing it", what, pid, sig.name)
        deadline = time.monotonic() + 10.0
    if pid_alive(pid) or group_alive(pid):
        raise ServiceStopError(f"{what} (pid {pid}) survived SIGKILL")


def group_alive(pgid: int) -> bool:
    """Whether process group ``pgid`` has a member that is not a zombie."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Zombies of the group keep it "alive" for killpg; look for a live member.
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _reap(pid: int) -> None:
    proc = _DAEMONS.pop(pid, None)
    if proc is not None:
        proc.wait(timeout=5)


def with_log_tail(what: str, log_path: Path, lines: int = 5) -> str:
    """An error message ending with the last lines of a server's log."""
    try:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        tail = []
    return f"{what}; last lines of {log_path}:\n  " + "\n  ".join(tail)


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """True if a server could listen on ``port`` now.

    SO_REUSEADDR as the servers themselves set it: connections of a stopped
    server lingering in TIME_WAIT do not make the port busy.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def require_free_port(port: int, service: str) -> None:
    if not port_is_free(port):
        raise PortInUseError(port, service)


# Ports for private servers are drawn below the kernel's ephemeral range: a
# port the kernel hands out (bind to 0) is one every outgoing connection may
# take as its source port meanwhile, and a simulated fleet opens hundreds
# (a test once lost its Alertmanager port that way). 12,000 ports below the
# range's start are plenty for the servers of one machine's tests.
_EPHEMERAL_RANGE_FILE: Final = Path("/proc/sys/net/ipv4/ip_local_port_range")
_DEFAULT_EPHEMERAL_LOW: Final = 32_768
_SERVER_PORTS_SPAN: Final = 12_000
_FREE_PORT_TRIES: Final = 100


def _ephemeral_low() -> int:
    try:
        return int(_EPHEMERAL_RANGE_FILE.read_text(encoding="ascii").split()[0])
    except (OSError, ValueError, IndexError):
        return _DEFAULT_EPHEMERAL_LOW


def free_port() -> int:
    """A port free now, outside the ephemeral range (another process may take it; callers retry)."""
    high = _ephemeral_low()
    low = max(1024, high - _SERVER_PORTS_SPAN)
    for _ in range(_FREE_PORT_TRIES):
        port = secrets.randbelow(high - low) + low
        if port_is_free(port):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))  # a machine that full: let the kernel choose
        chosen: int = sock.getsockname()[1]
        return chosen


def tcp_answers(port: int, host: str = LOOPBACK, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False
