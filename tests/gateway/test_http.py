"""HTTP devices against a real gateway: every answer, storage before 200, limits, stop, kill -9."""

from __future__ import annotations

import datetime as dt
import http.client
import os
import signal
import ssl
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import msgspec
import pytest

from cityhub.localstack.procs import free_port
from contracts.errors import SettingsError
from contracts.httpapi import (
    HTTP_MAX_READINGS,
    HttpAnswer,
    decode_answer,
    encode_readings,
    readings_path,
    token_sha256,
)
from contracts.messages import DeviceConfig, GatewayConfig
from devices.pki import Pki
from gateway.counters import GatewayCounters
from gateway.httpserver import HttpEndpoint
from gateway.routing import Router
from tests.gateway.test_faults import (
    gateway_config_file,
    outbox_readings,
    start_gateway_process,
)
from tests.plugins.gateway import (
    FakeIngest,
    broker_settings,
    client,
    gateway_in_thread,
    gateway_settings,
    kiosk_uplink,
    mqtt_devices,
    now_ms,
    publish_config,
    wait_for,
    watch_states,
)

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    answer: HttpAnswer | None
    raw: bytes


def http_devices(
    prefix: str, n: int, *, rate_per_s: float = 1000.0
) -> tuple[list[DeviceConfig], list[str]]:
    tokens = [f"token-{prefix}-{i}-{uuid.uuid4().hex}" for i in range(n)]
    devices = [
        DeviceConfig(
            device_id=f"{prefix}-http-{i:03d}",
            device_type="kiosk",
            transport="http",
            token_sha256=token_sha256(token),
            rate_limit_per_s=rate_per_s,
        )
        for i, token in enumerate(tokens)
    ]
    return devices, tokens


def post(
    conn: http.client.HTTPConnection,
    path: str,
    body: bytes,
    *,
    token: str | None,
    content_type: str = "application/json",
    method: str = "POST",
) -> Reply:
    headers = {"Content-Type": content_type}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    raw = response.read()
    answer = None
    if response.getheader("Content-Type", "").startswith("application/json"):
        answer = decode_answer(raw)
    return Reply(response.status, dict(response.getheaders()), answer, raw)


_OPEN: list[http.client.HTTPConnection] = []


def connect(port: int, timeout_s: float = 10.0) -> http.client.HTTPConnection:
    """A keep-alive connection to the gateway, closed after the test (``close_connections``)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    _OPEN.append(conn)
    return conn


@pytest.fixture(autouse=True)
def close_connections() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


def test_each_answer_of_the_endpoint(mqtt_server, tmp_path, ids):  # noqa: PLR0915 - one gateway, every answer
    gateway_id, prefix = ids
    (device, other, disabled), (token, other_token, disabled_token) = http_devices(prefix, 3)
    disabled = msgspec.structs.replace(disabled, enabled=False)
    (mqtt_device,) = mqtt_devices(prefix, 1)
    pub = client(mqtt_server)
    publish_config(
        pub,
        gateway_id=gateway_id,
        prefix=prefix,
        devices=[device, other, disabled, mqtt_device],
        version=1,
    )
    broker = broker_settings(mqtt_server)
    port = free_port()
    with gateway_in_thread(
        settings=gateway_settings(gateway_id, prefix, http_port=port),
        central=broker,
        site=broker,
        outbox=tmp_path / "o.sqlite3",
    ) as gw:
        wait_for(lambda: len(gw.devices) == 4, 10, "config applied")
        conn = connect(port)
        path = readings_path(device.device_id)
        good = kiosk_uplink(0, now_ms())

        ok = post(conn, path, good, token=token)
        assert ok.status == 200, ok.raw
        assert ok.answer == HttpAnswer(accepted=1)

        for who, path_, tok in [
            ("no token", path, None),
            ("wrong token", path, "nope"),
            ("another device's token (spoofed id)", path, other_token),
            ("unknown id", readings_path(f"{prefix}-nobody"), token),
            ("an MQTT device", readings_path(mqtt_device.device_id), token),
        ]:
            reply = post(conn, path_, good, token=tok)
            assert reply.status == 401, who
            assert reply.headers["WWW-Authenticate"].startswith("Bearer"), who
            assert reply.answer is not None
            assert reply.answer.error == "unauthorized", who

        reply = post(conn, readings_path(disabled.device_id), good, token=disabled_token)
        assert reply.status == 403
        assert post(conn, "/v1/devices/x/other", good, token=token).status == 404
        assert post(conn, path, b"", token=token, method="GET").status == 405
        reply = post(conn, path, good, token=token, content_type="text/plain")
        assert reply.status == 415

        # Over the body limit: 413, and the gateway keeps serving.
        oversized = kiosk_uplink(1, now_ms())[:-1] + b', "pad": "' + b"x" * 5000 + b'"}'
        reply = post(connect(port), path, oversized, token=token)
        assert reply.status == 413
        too_many = encode_readings(
            [kiosk_uplink(i, now_ms()) for i in range(HTTP_MAX_READINGS + 1)]
        )
        conn = connect(port)
        reply = post(conn, path, too_many, token=token)
        assert reply.status == 413
        assert reply.answer is not None
        assert reply.answer.error == "too_large"
        assert post(conn, path, kiosk_uplink(2, now_ms()), token=token).status == 200

        # Refused readings: 400 with the reject reason, counted like MQTT rejects.
        before = dict(gw.counters.rejects)
        reply = post(conn, path, b"{not json", token=token)
        assert reply.status == 400
        assert reply.answer is not None
        assert reply.answer.error == "malformed"
        late = kiosk_uplink(3, now_ms() - 40 * 86_400_000)
        reply = post(conn, path, late, token=token)
        assert reply.status == 400
        assert reply.answer is not None
        assert reply.answer.error == "ts_window"
        assert "ts" in reply.answer.detail
        # An array with one refused reading: the others are stored.
        mixed = encode_readings([kiosk_uplink(4, now_ms()), late, kiosk_uplink(5, now_ms())])
        reply = post(conn, path, mixed, token=token)
        assert reply.status == 400
        assert reply.answer is not None
        assert reply.answer.accepted == 2
        assert reply.answer.rejected == ((1, "ts_window"),)
        assert gw.counters.rejects["ts_window"] == before.get("ts_window", 0) + 2
        assert gw.counters.rejects["malformed"] == before.get("malformed", 0) + 1
        assert gw.counters.rejects["unauthorized"] >= 5
        assert gw.counters.device_rejects[device.device_id, "unauthorized"] >= 2
    stored, _ids = outbox_readings(tmp_path / "o.sqlite3")
    assert {(d, s) for d, s, _t in stored} == {(device.device_id, s) for s in (0, 2, 4, 5)}
    pub.disconnect()


def test_a_200_comes_only_once_the_reading_is_in_the_outbox(mqtt_server, tmp_path, ids):
    gateway_id, prefix = ids
    devices, tokens = http_devices(prefix, 1)
    pub = client(mqtt_server)
    publish_config(pub, gateway_id=gateway_id, prefix=prefix, devices=devices, version=1)
    broker = broker_settings(mqtt_server)
    port = free_port()
    outbox = tmp_path / "o.sqlite3"
    # A long batch age: a 200 that did not wait for the cut would come first.
    settings = gateway_settings(gateway_id, prefix, http_port=port, batch_max_ms=60_000)
    with gateway_in_thread(settings=settings, central=broker, site=broker, outbox=outbox) as gw:
        wait_for(lambda: len(gw.devices) == 1, 10, "config applied")
        conn = connect(port)
        path = readings_path(devices[0].device_id)
        base = now_ms()
        for seq in range(20):
            reply = post(conn, path, kiosk_uplink(seq, base + seq), token=tokens[0])
            assert reply.status == 200
            # Read by another connection the moment the answer arrived.
            stored, _ids = outbox_readings(outbox)
            assert (devices[0].device_id, seq, base + seq) in stored
        # Repeated (same seq and ts): answered 200 again, stored once.
        again = post(conn, path, kiosk_uplink(7, base + 7), token=tokens[0])
        assert again.status == 200
        assert again.answer == HttpAnswer(accepted=1, duplicates=1)
        assert gw.counters.readings_stored == 20
    stored, _ids = outbox_readings(outbox)
    assert len(stored) == 20
    pub.disconnect()


def test_the_rate_limit_answers_429_with_retry_after_keeping_what_it_took(
    mqtt_server, tmp_path, ids
):
    gateway_id, prefix = ids
    devices, tokens = http_devices(prefix, 1, rate_per_s=0.5)
    pub = client(mqtt_server)
    publish_config(pub, gateway_id=gateway_id, prefix=prefix, devices=devices, version=1)
    broker = broker_settings(mqtt_server)
    port = free_port()
    outbox = tmp_path / "o.sqlite3"
    settings = gateway_settings(gateway_id, prefix, http_port=port, device_burst=3.0)
    with gateway_in_thread(settings=settings, central=broker, site=broker, outbox=outbox) as gw:
        wait_for(lambda: len(gw.devices) == 1, 10, "config applied")
        path = readings_path(devices[0].device_id)
        base = now_ms()
        backlog = [kiosk_uplink(seq, base + seq) for seq in range(5)]
        reply = post(connect(port), path, encode_readings(backlog), token=tokens[0])
        assert reply.status == 429
        assert reply.answer is not None
        assert reply.answer.error == "rate_limited"
        assert reply.answer.accepted == 3
        # 0.5 tokens a second: the next one in 2 s.
        assert reply.headers["Retry-After"] == "2"
        stored, _ids = outbox_readings(outbox)
        assert {s for _d, s, _t in stored} == {0, 1, 2}
        assert gw.counters.rate_limited == 2
    pub.disconnect()


def test_a_full_outbox_answers_503_and_a_stop_answers_what_waits(mqtt_server, tmp_path, ids):
    gateway_id, prefix = ids
    devices, tokens = http_devices(prefix, 1)
    ingest = FakeIngest(mqtt_server, gateway_id=gateway_id, prefix=prefix)  # never acks
    pub = client(mqtt_server)
    publish_config(pub, gateway_id=gateway_id, prefix=prefix, devices=devices, version=1)
    broker = broker_settings(mqtt_server)
    port = free_port()
    # A one-reading kiosk batch is ~200 bytes: a few fit.
    settings = gateway_settings(
        gateway_id, prefix, http_port=port, outbox_max_bytes=1500, outbox_full_policy="refuse"
    )
    path = readings_path(devices[0].device_id)
    held: list[Reply] = []
    with gateway_in_thread(
        settings=settings, central=broker, site=broker, outbox=tmp_path / "o.sqlite3"
    ) as gw:
        wait_for(lambda: len(gw.devices) == 1, 10, "config applied")
        base = now_ms()
        seq = 0
        while True:
            # The request whose batch does not fit waits (held with its batch).
            waiter = threading.Thread(
                target=lambda s=seq: held.append(
                    post(connect(port, 60), path, kiosk_uplink(s, base + s), token=tokens[0])
                )
            )
            waiter.start()
            waiter.join(2.0)
            if waiter.is_alive():
                break
            assert held.pop().status == 200
            seq += 1
            assert seq < 50, "the outbox never filled"
        wait_for(lambda: gw.router.outbox_full_since_ms is not None, 5, "outbox full")
        reply = post(connect(port), path, kiosk_uplink(seq + 1, base + seq + 1), token=tokens[0])
        assert reply.status == 503
        assert reply.answer is not None
        assert reply.answer.error == "outbox_full"
        assert reply.headers["Retry-After"] == "10"
        assert not held
    # The stop answered the held request: 503, its reading not acknowledged.
    waiter.join(10)
    assert [r.status for r in held] == [503]
    assert held[0].answer is not None
    assert held[0].answer.error == "unavailable"
    pub.disconnect()
    ingest.close()


def test_router_answers_http_requests_only_with_the_store_of_their_cut():
    """The pure part: request ids wait in cut order; a hold keeps them waiting."""
    settings = gateway_settings("gw-x", "tx", batch_max_ms=10_000)
    router = Router(settings=settings, boot_id="b0", counters=GatewayCounters())
    devices, _tokens = http_devices("tx", 1)
    router.apply_config(GatewayConfig(gateway_id="gw-x", version=1, site_id="s", devices=devices))
    now = now_ms()
    first = router.http_readings(devices[0], [kiosk_uplink(0, now)], request_id=1, now=now)
    assert first.waits
    ready = router.take_ready(now, force=False)  # cut at once: a request waits
    assert len(ready) == 1
    router.hold(ready)
    router.http_readings(devices[0], [kiosk_uplink(1, now)], request_id=2, now=now)
    ready = router.take_ready(now, force=False)
    assert len(ready) == 2
    assert router.released(ready[:1], frozenset()) == [(1, True)]
    router.hold(ready[1:])
    again = router.take_ready(now, force=False)
    refused = frozenset({again[0][0].batch_id}) if again[0][0] else frozenset()
    assert router.released(again, refused) == [(2, False)]
    # A refused batch's readings are taken again, not answered as repeats.
    retry = router.http_readings(devices[0], [kiosk_uplink(1, now)], request_id=3, now=now)
    assert retry.duplicates == 0
    assert router.http_unanswered() == [3]


def test_gateway_kill_9_right_after_200s_loses_no_acknowledged_reading(  # noqa: PLR0915
    mqtt_server, tmp_path
):
    tag = uuid.uuid4().hex[:6]
    gateway_id, prefix = f"gw-{tag}", f"t{tag}"
    port = free_port()
    config = tmp_path / "gateway.toml"
    gateway_config_file(config, mqtt_server, gateway_id=gateway_id, prefix=prefix, http_port=port)
    devices, tokens = http_devices(prefix, 4)
    ingest = FakeIngest(mqtt_server, gateway_id=gateway_id, prefix=prefix)  # not acking yet
    pub = client(mqtt_server)
    publish_config(pub, gateway_id=gateway_id, prefix=prefix, devices=devices, version=1)
    states = watch_states(pub, gateway_id=gateway_id, prefix=prefix)
    log = tmp_path / "gateway.log"
    proc = start_gateway_process(config, log)
    acknowledged: set[tuple[str, int, int]] = set()
    lock = threading.Lock()
    stop = threading.Event()

    def device_loop(device: DeviceConfig, token: str) -> None:
        conn = connect(port, 5)
        seq = 0
        while not stop.is_set():
            ts = now_ms()
            try:
                reply = post(
                    conn, readings_path(device.device_id), kiosk_uplink(seq, ts), token=token
                )
            except (OSError, http.client.HTTPException):
                return  # the gateway is gone
            if reply.status == 200:
                with lock:
                    acknowledged.add((device.device_id, seq, ts))
            seq += 1

    try:
        wait_for(lambda: any(s.status == "online" for s in states), 15, "gateway online")
        threads = [
            threading.Thread(target=device_loop, args=(d, t), daemon=True)
            for d, t in zip(devices, tokens, strict=True)
        ]
        for thread in threads:
            thread.start()
        wait_for(lambda: len(acknowledged) >= 400, 30, "readings answered 200")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        stop.set()
        for thread in threads:
            thread.join(10)
        with lock:
            answered = set(acknowledged)
        stored, _ids = outbox_readings(tmp_path / "outbox.sqlite3")
        # Everything answered 200 is on disk (and maybe more: stored, the answer lost).
        # Ingest never acked: nothing has left the outbox.
        assert answered <= stored
        with ingest.lock:
            ingest.readings.clear()
        ingest.acking = True
        proc = start_gateway_process(config, log)
        wait_for(lambda: answered <= ingest.readings, 30, "acknowledged readings delivered")
        wait_for(lambda: not outbox_readings(tmp_path / "outbox.sqlite3")[0], 30, "outbox acked")
    finally:
        stop.set()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        pub.disconnect()
        ingest.close()
    assert proc.returncode == 0, log.read_text()[-2000:]


def test_the_endpoint_serves_tls_with_its_certificate(mqtt_server, tmp_path, ids):
    gateway_id, prefix = ids
    pki = Pki(tmp_path / "pki")
    now = dt.datetime.now(dt.UTC)
    pki.create_ca(now=now)
    server = pki.issue_server(["127.0.0.1"], now=now)
    devices, tokens = http_devices(prefix, 1)
    pub = client(mqtt_server)
    publish_config(pub, gateway_id=gateway_id, prefix=prefix, devices=devices, version=1)
    broker = broker_settings(mqtt_server)
    port = free_port()
    settings = gateway_settings(
        gateway_id,
        prefix,
        http_port=port,
        http_cert_file=str(server.cert),
        http_key_file=str(server.key),
    )
    with gateway_in_thread(
        settings=settings, central=broker, site=broker, outbox=tmp_path / "o.sqlite3"
    ) as gw:
        wait_for(lambda: len(gw.devices) == 1, 10, "config applied")
        context = ssl.create_default_context(cafile=str(pki.ca.cert))
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
        _OPEN.append(conn)
        path = readings_path(devices[0].device_id)
        reply = post(conn, path, kiosk_uplink(0, now_ms()), token=tokens[0])
        assert reply.status == 200
        assert conn.sock is not None
        assert conn.sock.version() is not None  # an SSLSocket
        # Closed while the gateway runs: a TLS connection it must close itself
        # is left to the loop's end, and the test's loop closes at once.
        conn.close()
    pub.disconnect()


def test_tls_needs_both_the_certificate_and_its_key(tmp_path):
    settings = gateway_settings("gw-x", "tx", http_port=free_port(), http_cert_file="c.pem")
    with pytest.raises(SettingsError) as info:
        HttpEndpoint(
            settings=settings,
            router=Router(settings=settings, boot_id="b", counters=GatewayCounters()),
            lock=threading.Lock(),
            clock=now_ms,
            flush_soon=lambda: None,
            log_events=lambda: None,
        )
    assert info.value.key == "gateway.http_key_file"
