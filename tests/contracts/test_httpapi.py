"""The HTTP device API's pure parts: bodies split into uplinks, answers, tokens, settings."""

from __future__ import annotations

import pytest

from contracts.errors import InputError, SettingsError
from contracts.httpapi import (
    HTTP_MAX_READINGS,
    HttpAnswer,
    decode_answer,
    encode_answer,
    encode_readings,
    readings_path,
    split_readings,
    token_sha256,
)
from contracts.messages import TOKEN_SHA256_RE
from contracts.settings import GatewaySettings, load_settings

ONE = b'{"seq": 1, "ts": 1790000000000, "m": {"uptime": 1}}'


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (ONE, [ONE]),
        # Not an array: one uplink, checked (and refused) by its own decoding.
        (b"{not json", [b"{not json"]),
        (b"  [" + ONE + b"]", [ONE]),
        (b"[" + ONE + b"," + ONE + b"]", [ONE, ONE]),
        (b'[{"seq": 1}, 7]', [b'{"seq": 1}', b"7"]),
    ],
)
def test_split_readings(body, expected):
    assert split_readings(body) == expected


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"[", "malformed"),
        (b"[1,]", "malformed"),
        (b"[]", "wrong_type"),
        (b"[" + b",".join([ONE] * (HTTP_MAX_READINGS + 1)) + b"]", "too_large"),
    ],
)
def test_split_readings_refuses_bad_arrays_by_reason(body, reason):
    with pytest.raises(InputError) as info:
        split_readings(body)
    assert info.value.reason == reason


def test_encode_readings_is_what_split_readings_takes_apart():
    assert split_readings(encode_readings([ONE])) == [ONE]
    assert split_readings(encode_readings([ONE] * HTTP_MAX_READINGS)) == [ONE] * HTTP_MAX_READINGS


def test_answers_round_trip_and_leave_defaults_out():
    answer = HttpAnswer(accepted=2, error="out_of_range", detail="x", rejected=((1, "ts"),))
    assert decode_answer(encode_answer(answer)) == answer
    assert encode_answer(HttpAnswer(accepted=1)) == b'{"accepted":1}'


def test_token_hash_is_what_a_device_config_holds():
    assert TOKEN_SHA256_RE.fullmatch(token_sha256("a token")) is not None
    assert readings_path("kiosk-01") == "/v1/devices/kiosk-01/readings"


def test_http_endpoint_settings_default_off_on_loopback(tmp_path):
    settings = GatewaySettings()
    assert settings.http_port == 0
    assert settings.http_host == "127.0.0.1"
    path = tmp_path / "c.toml"
    path.write_text('[gateway]\nhttp_host = "gateway.local"\nhttp_port = 8080\n')
    with pytest.raises(SettingsError) as info:
        load_settings(path, {})
    assert info.value.key == "gateway.http_host"
