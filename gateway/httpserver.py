"""The gateway's HTTP endpoint: devices POST readings, answered once they are stored.

An aiohttp server on the gateway's event loop (``contracts.httpapi`` has the
API): it authenticates the device (its bearer token against the config's
``token_sha256``, compared in constant time; an unknown id, or one that is
not an HTTP device, gets the same 401 as a wrong token), refuses what is
not JSON or too large, and hands the body's uplinks to the pure
``Router.http_readings`` under the gateway's lock, which checks, rate-limits
and batches them exactly as it does MQTT uplinks. A request whose readings
were taken waits on a future until the gateway's flusher has stored the batch
cut after them in the fsynced outbox (``release``); only then is it answered
200. Outcomes that are not a store are answered at once: 400 for refused
readings (counted rejects, as for MQTT), 429 with the device's token bucket's
Retry-After, 503 while the outbox is full (``refuse`` policy) or the
gateway stops (``stop``: every request still waiting is answered 503).

Logging the router's events and storing batches are the gateway shell's
(``gateway.service``), which calls ``release`` after each store.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import ssl
import threading
from collections.abc import Callable
from typing import Final

from aiohttp import web

from contracts.errors import InputError, SettingsError
from contracts.httpapi import (
    CONTENT_TYPE,
    HTTP_BODY_MAX_BYTES,
    READINGS_PATH,
    HttpAnswer,
    encode_answer,
    split_readings,
)
from contracts.ids import is_valid_id
from contracts.messages import DeviceConfig
from contracts.settings import GatewaySettings
from gateway.routing import HttpIntake, Router

logger = logging.getLogger(__name__)

# A device told the outbox is full comes back after this long: the outbox
# makes room as ingest acks batches (a fraction of a second each while the
# uplink is up); 10 s lets a retry find room without a whole hall's devices
# hammering a gateway whose uplink is down.
OUTBOX_FULL_RETRY_S: Final = 10
# A stopping gateway is back (restarted) within a few seconds.
STOPPING_RETRY_S: Final = 5
# How long a request waits for the store of its readings before it is
# answered 503: a store takes one fsync (milliseconds); a batch held back by a
# full outbox waits for ingest's acks, and the device had better try again
# later than keep a connection open. Its readings stay in the held batch and
# are stored when it fits: the repeat is then recognised and answered 200.
ANSWER_TIMEOUT_S: Final = 30.0
# A stopping endpoint gives open connections this long to finish.
SHUTDOWN_TIMEOUT_S: Final = 2.0
# Compared with a token when the id is unknown or not an HTTP device, so
# that an unknown id takes as long to refuse as a wrong token.
_NO_DEVICE_SHA256: Final = "0" * 64
_BEARER: Final = "bearer "
# RFC 6750 section 3: the challenge of a protected resource.
_CHALLENGE: Final = 'Bearer realm="cityhub"'
_WRONG_TOKEN_CHALLENGE: Final = _CHALLENGE + ', error="invalid_token"'


def _answer(status: int, answer: HttpAnswer, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=encode_answer(answer), content_type=CONTENT_TYPE, headers=headers
    )


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def _server_ssl_context(settings: GatewaySettings) -> ssl.SSLContext | None:
    """TLS from gateway.http_cert_file / http_key_file (both or neither)."""
    cert, key = settings.http_cert_file, settings.http_key_file
    if not cert and not key:
        return None
    if not cert or not key:
        missing = "gateway.http_key_file" if cert else "gateway.http_cert_file"
        raise SettingsError(missing, "TLS needs both a certificate and its key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError("gateway.http_cert_file", f"{cert} / {key}: {exc}") from exc
    return context


class HttpEndpoint:
    """Serves ``POST /v1/devices/{device_id}/readings`` for the gateway's HTTP devices."""

    def __init__(
        self,
        *,
        settings: GatewaySettings,
        router: Router,
        lock: threading.Lock,
        clock: Callable[[], int],
        flush_soon: Callable[[], None],
        log_events: Callable[[], None],
    ) -> None:
        self.host = settings.http_host
        self.port = settings.http_port
        self.ssl_context = _server_ssl_context(settings)
        self.router = router
        self.lock = lock
        self.clock = clock
        self.flush_soon = flush_soon
        self.log_events = log_events
        self.stopping = False
        self._next_id = 0
        self._waiters: dict[int, asyncio.Future[bool]] = {}
        self._runner: web.AppRunner | None = None

    # -- life cycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Listen; an address that cannot be bound is a SettingsError naming the setting."""
        app = web.Application(client_max_size=HTTP_BODY_MAX_BYTES)
        app.router.add_post(READINGS_PATH, self._readings)
        runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, ssl_context=self.ssl_context)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise SettingsError(
                "gateway.http_port", f"cannot listen on {self.host}:{self.port}: {exc}"
            ) from exc
        self._runner = runner
        logger.info(
            "HTTP devices: %s://%s:%d%s",
            "https" if self.ssl_context else "http",
            self.host,
            self.port,
            READINGS_PATH,
        )

    def release(self, answers: list[tuple[int, bool]]) -> None:
        """Answer the requests whose readings the flusher has stored (True) or refused."""
        for request_id, stored in answers:
            future = self._waiters.pop(request_id, None)
            if future is not None and not future.done():
                future.set_result(stored)

    def refuse_new(self) -> None:
        """The gateway stops: requests from now on are answered 503."""
        self.stopping = True

    async def stop(self) -> None:
        """Answer every request still waiting 503 (its readings are not stored), then close."""
        self.stopping = True
        with self.lock:
            unanswered = self.router.http_unanswered()
        self.release([(request_id, False) for request_id in unanswered])
        self.release([(request_id, False) for request_id in list(self._waiters)])
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- requests --------------------------------------------------------------------

    def _device(self, request: web.Request) -> DeviceConfig | web.Response:
        """The authenticated HTTP device the request names, or the 401/403 to answer."""
        device_id = request.match_info["device_id"]
        header = request.headers.get("Authorization", "")
        token = header[len(_BEARER) :].strip() if header[:7].lower() == _BEARER else ""
        with self.lock:
            device = self.router.devices.get(device_id)
        known = device is not None and device.transport == "http" and device.token_sha256
        expected = device.token_sha256 if known and device is not None else None
        given = hashlib.sha256(token.encode()).hexdigest()
        matches = hmac.compare_digest(given, expected or _NO_DEVICE_SHA256)
        if not token or not matches or expected is None or device is None:
            detail = "no bearer token" if not token else "wrong token, or not an HTTP device here"
            self._reject("unauthorized", device_id, detail, request.remote)
            return _answer(
                401,
                HttpAnswer(error="unauthorized", detail="a valid bearer token is needed"),
                {"WWW-Authenticate": _WRONG_TOKEN_CHALLENGE if token else _CHALLENGE},
            )
        if not device.enabled:
            # As for a disabled MQTT device, whose messages are not routed.
            self._reject("unknown_device", device_id, "disabled", request.remote)
            return _answer(403, HttpAnswer(error="disabled", detail="this device is disabled"))
        return device

    def _reject(self, reason: str, device_id: str, detail: str, remote: str | None) -> None:
        with self.lock:
            self.router.reject(
                reason,
                device_id if is_valid_id(device_id) else "?",
                f"HTTP from {remote}: {detail}",
                b"",
                self.clock(),
            )
        self.log_events()

    async def _readings(self, request: web.Request) -> web.Response:
        if self.stopping:
            return self._stopping()
        device = self._device(request)
        if isinstance(device, web.Response):
            return device
        if request.content_type != CONTENT_TYPE:
            return _answer(
                415,
                HttpAnswer(
                    error="unsupported_media_type",
                    detail=f"Content-Type {request.content_type!r}: send {CONTENT_TYPE}",
                ),
            )
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            self._reject(
                "too_large",
                device.device_id,
                f"body over the limit of {HTTP_BODY_MAX_BYTES} bytes",
                request.remote,
            )
            raise
        try:
            payloads = split_readings(body)
        except InputError as exc:
            with self.lock:
                self.router.counters.received += 1
                self.router.reject(exc.reason, device.device_id, str(exc), body, self.clock())
            self.log_events()
            status = 413 if exc.reason == "too_large" else 400
            return _answer(status, HttpAnswer(error=exc.reason, detail=str(exc)))
        return await self._take(device, payloads)

    async def _take(self, device: DeviceConfig, payloads: list[bytes]) -> web.Response:
        """Hand the readings to the router; answer when they are stored, or why not."""
        if self.stopping:
            return self._stopping()
        request_id = self._next_id
        self._next_id += 1
        with self.lock:
            intake = self.router.http_readings(
                device, payloads, request_id=request_id, now=self.clock()
            )
        if self.router.events:
            self.log_events()
        if intake.outbox_full:
            return _answer(
                503,
                HttpAnswer(error="outbox_full", detail="the gateway cannot store readings now"),
                _retry_after(OUTBOX_FULL_RETRY_S),
            )
        if intake.waits and not await self._stored(request_id):
            return self._stopping()
        return self._outcome(intake, len(payloads))

    async def _stored(self, request_id: int) -> bool:
        """Wait until the flusher has stored the request's readings; False if it never will."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters[request_id] = future
        self.flush_soon()
        try:
            async with asyncio.timeout(ANSWER_TIMEOUT_S):
                return await future
        except TimeoutError:
            return False
        finally:
            self._waiters.pop(request_id, None)

    def _stopping(self) -> web.Response:
        if self.stopping:
            detail = "the gateway is stopping"
            retry_s = STOPPING_RETRY_S
        else:
            detail = "the readings could not be stored in time; send them again"
            retry_s = OUTBOX_FULL_RETRY_S
        return _answer(503, HttpAnswer(error="unavailable", detail=detail), _retry_after(retry_s))

    @staticmethod
    def _outcome(intake: HttpIntake, sent: int) -> web.Response:
        """200, 400 (refused readings, the first one's reason) or 429 (rate limit)."""
        rejected = tuple((index, reason) for index, reason, _detail in intake.rejected)
        if intake.retry_after_ms:
            taken = intake.accepted + len(rejected)
            return _answer(
                429,
                HttpAnswer(
                    accepted=intake.accepted,
                    duplicates=intake.duplicates,
                    error="rate_limited",
                    detail=f"the first {taken} of {sent} readings were taken "
                    f"({intake.accepted} stored); send the rest later",
                    rejected=rejected,
                ),
                _retry_after(intake.retry_after_ms / 1000),
            )
        if intake.rejected:
            _index, reason, detail = intake.rejected[0]
            return _answer(
                400,
                HttpAnswer(
                    accepted=intake.accepted,
                    duplicates=intake.duplicates,
                    error=reason,
                    detail=detail,
                    rejected=rejected,
                ),
            )
        return _answer(200, HttpAnswer(accepted=intake.accepted, duplicates=intake.duplicates))
