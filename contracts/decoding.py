"""msgspec decoding with the project's errors: the one translation for every wire message.

``check_size`` refuses a payload over its bound before a byte of it is
parsed (PayloadTooLargeError); ``decode_payload`` runs a msgspec decoder and
turns its failures into the most specific InputError: a value of the wrong
type (FieldTypeError), broken syntax, invalid UTF-8 or nesting too deep
(MalformedPayloadError). The messages' own checks (ids, ranges, the
catalog) are their modules' (``contracts.messages``, ``contracts.commands``).
"""

from __future__ import annotations

from typing import TypeVar

import msgspec

from contracts.errors import FieldTypeError, MalformedPayloadError, PayloadTooLargeError

_T = TypeVar("_T")


def check_size(payload: bytes, max_bytes: int, what: str) -> None:
    if len(payload) > max_bytes:
        raise PayloadTooLargeError(f"{what}: {len(payload)} bytes exceeds the limit of {max_bytes}")


def decode_payload(
    decoder: msgspec.json.Decoder[_T] | msgspec.msgpack.Decoder[_T], payload: bytes, what: str
) -> _T:
    """Run a msgspec decoder, translating its errors into the project's."""
    try:
        return decoder.decode(payload)
    # ValidationError is a subclass of DecodeError: it must come first.
    except msgspec.ValidationError as exc:
        raise FieldTypeError(f"{what}: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise MalformedPayloadError(f"{what}: {exc}") from exc
    # msgspec raises UnicodeDecodeError, not DecodeError, for invalid UTF-8
    # inside some strings and keys.
    except UnicodeDecodeError as exc:
        raise MalformedPayloadError(f"{what}: invalid UTF-8: {exc}") from exc
    # Untyped (Any) fields recurse once per nesting level: `[[[[...` in a
    # value would otherwise escape as RecursionError.
    except RecursionError as exc:
        raise MalformedPayloadError(f"{what}: nested too deeply") from exc
