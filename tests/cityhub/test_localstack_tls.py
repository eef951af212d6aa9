"""The embedded broker's TLS listener, with a real Mosquitto: what TLS it speaks.

TLS 1.2 with ECDHE and AEAD ciphers only, and TLS 1.3: a client that offers
only an old CBC-SHA1 suite is refused.
"""

from __future__ import annotations

import datetime as dt
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from cityhub.localstack.mosquitto import MosquittoServer
from devices.pki import Pki
from tests.plugins.broker import OLD_TLS12_CIPHER, make_pki, tls_handshake, tls_mosquitto
from tests.plugins.servers import start_or_skip

pytestmark = pytest.mark.slow


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki", now=dt.datetime.now(dt.UTC))


@pytest.fixture
def tls_broker(servers_dir: Path, pki: Pki, mosquitto_bin: str) -> Iterator[MosquittoServer]:
    server = start_or_skip(
        tls_mosquitto(servers_dir, pki, mosquitto_bin, name="ciphers"),
        "Mosquitto's dynamic-security plugin",
    )
    yield server
    server.stop()


def _tls_port(server: MosquittoServer) -> int:
    assert server.tls is not None
    return server.tls.port


def test_an_old_cbc_sha1_suite_is_refused_on_tls_1_2(tls_broker: MosquittoServer, pki: Pki):
    with pytest.raises(ssl.SSLError):
        tls_handshake(
            _tls_port(tls_broker), pki, version=ssl.TLSVersion.TLSv1_2, ciphers=OLD_TLS12_CIPHER
        )


def test_tls_1_2_agrees_on_an_aead_suite_and_tls_1_3_still_works(
    tls_broker: MosquittoServer, pki: Pki
):
    port = _tls_port(tls_broker)
    protocol, cipher = tls_handshake(port, pki, version=ssl.TLSVersion.TLSv1_2)
    assert protocol == "TLSv1.2"
    assert cipher.startswith("ECDHE-ECDSA-"), cipher
    assert "GCM" in cipher or "CHACHA20" in cipher, cipher
    for offered in ("ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305"):
        assert tls_handshake(port, pki, version=ssl.TLSVersion.TLSv1_2, ciphers=offered) == (
            "TLSv1.2",
            offered,
        )
    assert tls_handshake(port, pki)[0] == "TLSv1.3"
    assert tls_handshake(port, pki, version=ssl.TLSVersion.TLSv1_3)[0] == "TLSv1.3"


def test_the_listener_config_names_the_minimum_version_and_the_suites(
    tls_broker: MosquittoServer,
):
    lines = tls_broker.config_path.read_text(encoding="utf-8").splitlines()
    assert "tls_version tlsv1.2" in lines
    (ciphers,) = [line for line in lines if line.startswith("ciphers ")]
    for suite in ciphers.removeprefix("ciphers ").split(":"):
        assert suite.startswith("ECDHE-"), suite
        assert suite.endswith(("GCM-SHA256", "GCM-SHA384", "CHACHA20-POLY1305")), suite
