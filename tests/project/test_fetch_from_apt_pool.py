"""scripts/fetch-from-apt-pool against a local HTTP server standing in for a package mirror.

The mirror is named only in a temporary apt configuration (APT_CONFIG pointing
at a sources list of the test's own), the way a city's servers reach packages
through a local mirror or proxy that apt is set up for. The script must find
the pool there, keep only a copy whose checksum matches, and leave nothing
behind otherwise.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "scripts" / "fetch-from-apt-pool"
POOL_PATH = "pool/main/t/timescaledb/timescaledb_9.9.9+dfsg.orig.tar.xz"
CONTENT = b"a tarball standing in for TimescaleDB's source\n" * 100
GOOD_SHA = hashlib.sha256(CONTENT).hexdigest()

pytestmark = pytest.mark.skipif(
    shutil.which("apt-config") is None or shutil.which("curl") is None,
    reason="needs apt-config and curl (Debian/Ubuntu; scripts/install-system-deps installs curl)",
)


class _Mirror:
    """Files under ``root`` served on 127.0.0.1; every requested path is recorded."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        mirror = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args: object, **kwargs: object) -> None:
                super().__init__(*args, directory=str(mirror.root), **kwargs)  # type: ignore[arg-type]

            def do_GET(self) -> None:
                mirror.requests.append(self.path)
                super().do_GET()

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def put(self, archive: str, content: bytes) -> None:
        path = self.root / archive / POOL_PATH
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[_Mirror]:
    server = _Mirror(tmp_path / "www")
    server.root.mkdir()
    yield server
    server.close()


def _apt_config(tmp_path: Path, *, sources_list: str = "", sources_parts: dict[str, str]) -> Path:
    """An apt configuration whose only sources are the ones given."""
    etc = tmp_path / "apt"
    parts = etc / "sources.list.d"
    parts.mkdir(parents=True)
    (etc / "sources.list").write_text(sources_list, encoding="utf-8")
    for name, text in sources_parts.items():
        (parts / name).write_text(text, encoding="utf-8")
    conf = etc / "apt.conf"
    conf.write_text(
        f'Dir::Etc::sourcelist "{etc / "sources.list"}";\nDir::Etc::sourceparts "{parts}";\n',
        encoding="utf-8",
    )
    return conf


def _fetch(
    apt_conf: Path, dest: Path, sha256: str = GOOD_SHA, url: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "APT_CONFIG": str(apt_conf)}
    args = [str(SCRIPT), POOL_PATH, sha256, str(dest), *([url] if url else [])]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=60, check=False)


def _deb822(uri: str, *, enabled: bool = True, types: str = "deb") -> str:
    lines = [f"Types: {types}", f"URIs: {uri}", "Suites: bookworm", "Components: main"]
    if not enabled:
        lines.append("Enabled: no")
    return "\n".join(lines) + "\n"


def test_fetches_from_the_mirror_named_in_a_deb822_sources_file(
    tmp_path: Path, mirror: _Mirror
) -> None:
    mirror.put("debian", CONTENT)
    conf = _apt_config(tmp_path, sources_parts={"local.sources": _deb822(f"{mirror.url}/debian")})
    dest = tmp_path / "dest"
    dest.mkdir()
    result = _fetch(conf, dest)
    assert result.returncode == 0, result.stderr
    assert (dest / Path(POOL_PATH).name).read_bytes() == CONTENT
    assert sorted(p.name for p in dest.iterdir()) == [Path(POOL_PATH).name]
    assert mirror.requests == [f"/debian/{POOL_PATH}"]


def test_fetches_from_a_one_line_entry_with_options(tmp_path: Path, mirror: _Mirror) -> None:
    mirror.put("mirror", CONTENT)
    sources = (
        "# a comment\n"
        f"deb [arch=amd64 signed-by=/usr/share/keyrings/x.gpg] {mirror.url}/mirror/ bookworm main\n"
    )
    conf = _apt_config(tmp_path, sources_list=sources, sources_parts={})
    dest = tmp_path / "dest"
    dest.mkdir()
    result = _fetch(conf, dest)
    assert result.returncode == 0, result.stderr
    assert (dest / Path(POOL_PATH).name).read_bytes() == CONTENT


def test_a_wrong_checksum_is_refused_and_nothing_is_left(tmp_path: Path, mirror: _Mirror) -> None:
    mirror.put("debian", CONTENT + b"tampered")
    conf = _apt_config(tmp_path, sources_parts={"local.sources": _deb822(f"{mirror.url}/debian")})
    dest = tmp_path / "dest"
    dest.mkdir()
    result = _fetch(conf, dest)
    assert result.returncode == 1
    assert "checksum mismatch" in result.stderr
    assert list(dest.iterdir()) == []
    assert mirror.requests == [f"/debian/{POOL_PATH}"]


def test_archives_are_tried_in_apt_order_past_a_missing_or_bad_copy(
    tmp_path: Path, mirror: _Mirror
) -> None:
    mirror.put("bad", CONTENT[:-1])
    mirror.put("good", CONTENT)
    parts = {
        # Files in sources.list.d are read in name order, .list before .sources.
        "a.list": f"deb {mirror.url}/missing bookworm main\n",
        "b.sources": _deb822(f"{mirror.url}/disabled", enabled=False)
        + "\n"
        + _deb822(f"{mirror.url}/bad {mirror.url}/good", types="deb deb-src"),
    }
    conf = _apt_config(tmp_path, sources_parts=parts)
    dest = tmp_path / "dest"
    dest.mkdir()
    result = _fetch(conf, dest)
    assert result.returncode == 0, result.stderr
    assert (dest / Path(POOL_PATH).name).read_bytes() == CONTENT
    # The disabled archive is never asked.
    assert mirror.requests == [f"/{name}/{POOL_PATH}" for name in ("missing", "bad", "good")]


def test_an_explicit_url_is_the_only_one_tried(tmp_path: Path, mirror: _Mirror) -> None:
    mirror.put("debian", CONTENT)
    mirror.put("override", CONTENT)
    conf = _apt_config(tmp_path, sources_parts={"local.sources": _deb822(f"{mirror.url}/debian")})
    dest = tmp_path / "dest"
    dest.mkdir()
    result = _fetch(conf, dest, url=f"{mirror.url}/override/{POOL_PATH}")
    assert result.returncode == 0, result.stderr
    assert mirror.requests == [f"/override/{POOL_PATH}"]


def test_no_archive_configured_is_a_clear_error(tmp_path: Path) -> None:
    conf = _apt_config(tmp_path, sources_parts={})
    dest = tmp_path / "dest"
    dest.mkdir()
    result = _fetch(conf, dest)
    assert result.returncode == 1
    assert "no archive configured" in result.stderr
    assert list(dest.iterdir()) == []


def test_a_malformed_checksum_argument_is_refused(tmp_path: Path) -> None:
    conf = _apt_config(tmp_path, sources_parts={})
    result = _fetch(conf, tmp_path, sha256="not-a-checksum")
    assert result.returncode == 1
    assert "not a sha256 checksum" in result.stderr


def test_setup_scripts_name_no_archive_host() -> None:
    # Where packages come from is the machine's apt configuration, not the project's.
    for script in (ROOT / "scripts").iterdir():
        text = script.read_text(encoding="utf-8")
        assert not re.search(r"\b(?:https?|ftp)://[A-Za-z0-9]", text), (
            f"{script.name} names an address"
        )
