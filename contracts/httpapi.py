"""The HTTP device API: where a device POSTs its readings to its gateway, and the answers.

``POST /v1/devices/{device_id}/readings`` with ``Authorization: Bearer
<token>`` and ``Content-Type: application/json``; the body is one device
uplink as a device publishes it on ``d/{id}/up`` (``{"seq", "ts", "m"}``,
``contracts.messages.decode_device_uplink``) or a JSON array of up to
``HTTP_MAX_READINGS`` of them, oldest first (a device sending its backlog).
The gateway keeps only the SHA-256 of each device's token
(``DeviceConfig.token_sha256``, ``token_sha256`` here).

Answers carry a small JSON body (``HttpAnswer``): 200 once every accepted
reading is in the gateway's fsynced outbox; 400 ``{"error": reason, "detail"}``
for a refused reading (the reject reason codes of ``contracts.errors``); 401
(a missing or wrong token, or an id that is not an HTTP device of this
gateway: which ids exist is never said); 403 (the device is disabled); 413
(over ``HTTP_BODY_MAX_BYTES`` or ``HTTP_MAX_READINGS``); 415 (not JSON); 429
and 503 with ``Retry-After`` in whole seconds. ``accepted`` counts the
readings of the body, from the first, that the gateway has stored (or had
stored before: a repeat); on a 429 the rest were not looked at and are to be
sent again later.

Pure: splitting a body into its uplinks, the limits, the answer's layout.
Serving (``gateway.httpserver``) and posting (``firmware_sim.httpdevice``)
are the services'.
"""

from __future__ import annotations

import hashlib
from typing import Final

import msgspec

from contracts.errors import FieldTypeError, MalformedPayloadError, PayloadTooLargeError
from contracts.messages import DEVICE_PAYLOAD_MAX_BYTES

READINGS_PATH: Final = "/v1/devices/{device_id}/readings"
# The request body limit is the MQTT uplink's own (4 KiB): a device gets the
# same room over either transport, and a small gateway parses no more per
# request than per MQTT message.
HTTP_BODY_MAX_BYTES: Final = DEVICE_PAYLOAD_MAX_BYTES
# Readings in one request at most. Each costs a token of the device's bucket,
# whose default burst is 20 (gateway.device_burst): a longer array would be cut
# by the rate limit anyway. 20 compact readings (~70-200 bytes each) also fit
# the body limit, so a backlog leaves in requests of a useful size, each
# answered after one fsync.
HTTP_MAX_READINGS: Final = 20
CONTENT_TYPE: Final = "application/json"


class HttpAnswer(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The JSON body of every answer the gateway gives a device."""

    accepted: int = 0  # readings from the first that are stored (or were before)
    duplicates: int = 0  # of those, repeats of readings stored before
    error: str = ""  # the reject reason (400), or why not (401, 403, 413, 415, 429, 503)
    detail: str = ""
    # 400 for an array: each refused reading (its index and reason); the
    # others are stored.
    rejected: tuple[tuple[int, str], ...] = ()


_ANSWER_ENCODER: Final = msgspec.json.Encoder()
_ANSWER_DECODER: Final = msgspec.json.Decoder(HttpAnswer)
_ARRAY_DECODER: Final = msgspec.json.Decoder(list[msgspec.Raw])
_JSON_SPACE: Final = b" \t\r\n"


def readings_path(device_id: str) -> str:
    return READINGS_PATH.format(device_id=device_id)


def token_sha256(token: str) -> str:
    """What the gateway keeps of a device's bearer token (64 lower-case hex digits)."""
    return hashlib.sha256(token.encode()).hexdigest()


def encode_answer(answer: HttpAnswer) -> bytes:
    return _ANSWER_ENCODER.encode(answer)


def decode_answer(body: bytes) -> HttpAnswer:
    """A gateway's answer (a device reads it); MalformedPayloadError if it is not one."""
    try:
        return _ANSWER_DECODER.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise MalformedPayloadError(f"answer: {exc}") from None


def split_readings(body: bytes) -> list[bytes]:
    """A request body as the uplinks it carries, each as its own JSON bytes.

    A body that is not a JSON array is one uplink (its own checks come with
    its decoding). An array must hold 1 to HTTP_MAX_READINGS values:
    MalformedPayloadError if it is not valid JSON, FieldTypeError if empty,
    PayloadTooLargeError if longer.
    """
    if body.lstrip(_JSON_SPACE)[:1] != b"[":
        return [body]
    try:
        items = _ARRAY_DECODER.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise MalformedPayloadError(f"body: {exc}") from None
    if not items:
        raise FieldTypeError("body: an empty array (send one reading or more)")
    if len(items) > HTTP_MAX_READINGS:
        raise PayloadTooLargeError(
            f"body: {len(items)} readings, over the limit of {HTTP_MAX_READINGS} a request"
        )
    return [bytes(item) for item in items]


def encode_readings(payloads: list[bytes]) -> bytes:
    """Encoded uplinks as one body: the uplink itself, or an array of several."""
    if len(payloads) == 1:
        return payloads[0]
    return b"[" + b",".join(payloads) + b"]"
