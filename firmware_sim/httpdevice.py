"""A simulated HTTP device's uplink: POST readings to the gateway, keep what is unanswered.

The device's readings queue up in a backlog (bounded, as a device's memory
is); a sender posts the oldest first, one reading or an array of up to
``contracts.httpapi.HTTP_MAX_READINGS`` within the body limit, on one
keep-alive connection (aiohttp), with the device's bearer token. A reading
is acknowledged only by a 2xx, or by the ``accepted`` count of a 429 or 400
answer (the readings the gateway stored before the limit, or beside the
refused ones); it is then handed to ``on_settled`` as acknowledged and leaves
the backlog. A reading the gateway refused (400: its reason) leaves it
unacknowledged: sending it again cannot help. Everything else (no
connection, a timeout, 401/403 while the gateway has no config yet, 429, 503)
keeps the backlog and tries again, after the answer's ``Retry-After`` or
with full-jitter backoff.

How an answer settles a request (``settle``) is pure; this module owns the
HTTP session. The readings themselves and their schedule are
``firmware_sim.service``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import aiohttp

from adapters.backoff import backoff_delay_s
from contracts.errors import InputError
from contracts.httpapi import (
    CONTENT_TYPE,
    HTTP_BODY_MAX_BYTES,
    HTTP_MAX_READINGS,
    HttpAnswer,
    decode_answer,
    encode_readings,
    readings_path,
)
from contracts.messages import encode_device_uplink
from firmware_sim.faults import Emission

logger = logging.getLogger(__name__)

# A device keeps this many unsent readings (an hour at one a second is
# ~1,800 of ~100-300 bytes: half a megabyte, what a small board can spare);
# past it the oldest go, unacknowledged.
BACKLOG_MAX_READINGS: Final = 1800
# A gateway answers within one fsync; 10 s means it is gone or stuck.
REQUEST_TIMEOUT_S: Final = 10.0
# Retry backoff without a Retry-After (no connection, a 401 before the
# gateway has its config): as the MQTT devices reconnect.
RETRY_MIN_S: Final = 0.5
RETRY_MAX_S: Final = 10.0


@dataclass(frozen=True, slots=True)
class Settlement:
    """What one answer did to the readings of its request (indexes into it)."""

    acknowledged: tuple[int, ...] = ()  # stored: acknowledged to the device
    refused: tuple[int, ...] = ()  # refused for good (400): dropped, unacknowledged
    retry_after_s: float | None = None  # None: send the rest at once; else wait this long


def settle(
    status: int, answer: HttpAnswer | None, sent: int, retry_after: str | None
) -> Settlement:
    """How an answer settles a request of ``sent`` readings; the rest stay in the backlog.

    ``accepted`` counts the stored readings among the first ones the gateway
    took (on a 429, the first ``accepted`` + refused ones; the rest were not
    looked at).
    """
    wait_s = _retry_after_s(retry_after)
    if 200 <= status < 300:
        return Settlement(acknowledged=tuple(range(sent)))
    if status in {400, 429} and answer is not None:
        refused = tuple(index for index, _reason in answer.rejected)
        taken = sent if status == 400 else answer.accepted + len(refused)
        if status == 400 and sent == 1:
            refused = (0,)
        acknowledged = tuple(i for i in range(min(taken, sent)) if i not in refused)
        return Settlement(
            acknowledged=acknowledged,
            refused=refused,
            retry_after_s=wait_s if status == 429 else None,
        )
    if status in {413, 415} and sent == 1:
        return Settlement(refused=(0,))  # cannot pass as it is
    return Settlement(retry_after_s=wait_s)


def _retry_after_s(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return max(0.0, seconds)


def pack(payloads: list[bytes], *, max_readings: int = HTTP_MAX_READINGS) -> int:
    """How many of the oldest ``payloads`` go in one body within the limits (at least one)."""
    size = 1  # "["
    count = 0
    for payload in payloads[:max_readings]:
        size += len(payload) + 1  # "," or "]"
        if count and size > HTTP_BODY_MAX_BYTES:
            break
        count += 1
    return max(1, count)


class HttpUplink:
    """One device's backlog and the task that posts it (``run``)."""

    def __init__(
        self,
        *,
        base_url: str,
        device_id: str,
        token: str,
        on_settled: Callable[[Emission, bool], None],
    ) -> None:
        self.url = base_url.rstrip("/") + readings_path(device_id)
        self.device_id = device_id
        self.token = token
        self.on_settled = on_settled
        self.backlog: deque[tuple[Emission, bytes]] = deque()
        self.pending = asyncio.Event()
        self.posts = 0
        self.failures = 0
        # Tests set it to shorten the answer timeout.
        self.timeout_s = REQUEST_TIMEOUT_S

    def add(self, emission: Emission) -> None:
        """Queue a reading (the oldest goes when the backlog is full)."""
        payload = emission.payload or encode_device_uplink(emission.uplink)
        self.backlog.append((emission, payload))
        if len(self.backlog) > BACKLOG_MAX_READINGS:
            dropped, _payload = self.backlog.popleft()
            self.on_settled(dropped, False)
        self.pending.set()

    def abandon(self) -> None:
        """The device stops: what is left was never acknowledged."""
        while self.backlog:
            emission, _payload = self.backlog.popleft()
            self.on_settled(emission, False)

    async def run(self) -> None:
        """Post the backlog, oldest first, until cancelled."""
        connector = aiohttp.TCPConnector(limit=1)  # one keep-alive connection, as a device
        async with aiohttp.ClientSession(connector=connector) as session:
            while True:
                if not self.backlog:
                    self.pending.clear()
                    await self.pending.wait()
                    continue
                wait_s = await self._post_once(session)
                if wait_s:
                    await asyncio.sleep(wait_s)

    async def _post_once(self, session: aiohttp.ClientSession) -> float:
        """Post the head of the backlog once; how long to wait before the next post."""
        payloads = [payload for _e, payload in list(self.backlog)[:HTTP_MAX_READINGS]]
        count = pack(payloads)
        body = encode_readings(payloads[:count])
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": CONTENT_TYPE}
        try:
            async with session.post(
                self.url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            ) as response:
                raw = await response.read()
                status = response.status
                retry_after = response.headers.get("Retry-After")
        except (aiohttp.ClientError, TimeoutError) as exc:
            return self._failed(f"{type(exc).__name__}: {exc}")
        self.posts += 1
        answer: HttpAnswer | None = None
        with contextlib.suppress(InputError):
            answer = decode_answer(raw)
        outcome = settle(status, answer, count, retry_after)
        done = set(outcome.acknowledged) | set(outcome.refused)
        if status >= 300:
            logger.debug("device %s: HTTP %d %s", self.device_id, status, raw[:200])
        if not done:
            if outcome.retry_after_s is not None:
                self.failures = 0
                return outcome.retry_after_s
            return self._failed(f"HTTP {status}")
        self.failures = 0
        # The settled readings are the head of the request: the gateway takes
        # them in order and stops only at the rate limit.
        for index in range(max(done) + 1):
            emission, _payload = self.backlog.popleft()
            self.on_settled(emission, index in outcome.acknowledged)
        return outcome.retry_after_s or 0.0

    def _failed(self, why: str) -> float:
        self.failures += 1
        delay = backoff_delay_s(
            self.failures,
            min_s=RETRY_MIN_S,
            max_s=RETRY_MAX_S,
            draw=random.random(),  # noqa: S311 - jitter, not security
        )
        logger.warning("device %s: %s; posting again in %.1f s", self.device_id, why, delay)
        return delay
