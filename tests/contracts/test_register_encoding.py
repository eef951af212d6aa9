"""Register values as words and back: encode_register / encode_write against decode_register."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contracts.errors import OutOfRangeError
from contracts.registermaps import (
    REGISTER_TYPES,
    Register,
    RegisterWrite,
    char_bits,
    decode_register,
    encode_register,
    encode_write,
    read_answer_bytes,
    transaction_s,
)

ORDERS = ("big", "little")
BOUNDS = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
}


@st.composite
def register_and_raw(draw: st.DrawFn) -> tuple[Register, float]:
    kind = draw(st.sampled_from(REGISTER_TYPES))
    reg = Register(
        metric="m",
        function=draw(st.sampled_from((3, 4))),
        address=draw(st.integers(0, 1000)),
        type=kind,
        word_order=draw(st.sampled_from(ORDERS)),
        byte_order=draw(st.sampled_from(ORDERS)),
        scale=draw(st.sampled_from((1.0, 0.1, 0.01, -100.0, 10.0))),
        offset=draw(st.sampled_from((0.0, 400.0, -40.0))),
    )
    if kind == "float32":
        raw = draw(st.floats(-1e6, 1e6, allow_nan=False, width=32))
    else:
        raw = draw(st.integers(*BOUNDS[kind]))
    return reg, float(raw)


@given(register_and_raw())
def test_every_type_and_order_round_trips(case: tuple[Register, float]) -> None:
    reg, raw = case
    value = raw * reg.scale + reg.offset
    words = encode_register(reg, value)
    assert len(words) == reg.words
    assert all(0 <= w <= 0xFFFF for w in words)
    back = decode_register(reg, words)
    if reg.type == "float32":
        # One float32 step of the raw value, times the scale.
        assert math.isclose(back, value, rel_tol=1e-6, abs_tol=abs(reg.scale) * 1e-3 + 1e-9)
    else:
        assert math.isclose(back, value, rel_tol=1e-12, abs_tol=abs(reg.scale) / 2 + 1e-9)


@given(register_and_raw())
def test_a_write_encodes_as_the_register_that_reads_it(case: tuple[Register, float]) -> None:
    reg, raw = case
    write = RegisterWrite(
        command="c",
        function=16,
        address=reg.address,
        arg="x",
        type=reg.type,
        word_order=reg.word_order,
        byte_order=reg.byte_order,
        scale=reg.scale,
        offset=reg.offset,
    )
    value = raw * reg.scale + reg.offset
    assert encode_write(write, value) == encode_register(reg, value)


@pytest.mark.parametrize(
    ("word_order", "byte_order", "words"),
    [
        ("big", "big", [0x4148, 0x0000]),  # ABCD
        ("little", "big", [0x0000, 0x4148]),  # CDAB
        ("big", "little", [0x4841, 0x0000]),  # BADC
        ("little", "little", [0x0000, 0x4841]),  # DCBA
    ],
)
def test_float32_orders_are_the_vendor_names(word_order, byte_order, words) -> None:
    assert struct.pack(">f", 12.5).hex() == "41480000"
    reg = Register(
        metric="m",
        function=4,
        address=0,
        type="float32",
        word_order=word_order,
        byte_order=byte_order,
    )
    assert encode_register(reg, 12.5) == words
    assert decode_register(reg, words) == 12.5


def test_status_codes_encode_as_the_first_raw_code_of_the_value() -> None:
    reg = Register(metric="s", function=4, address=2307, values=((0, 0.0), (1, 3.0), (2, 3.0)))
    assert encode_register(reg, 3.0) == [1]
    assert decode_register(reg, encode_register(reg, 0.0)) == 0.0
    with pytest.raises(OutOfRangeError):
        encode_register(reg, 1.0)  # no_echo: the register has no code for it


@pytest.mark.parametrize(
    ("kind", "raw"), [("uint16", -1), ("uint16", 65536), ("int16", 40000), ("float32", 1e39)]
)
def test_a_value_the_type_cannot_hold_is_refused(kind, raw) -> None:
    reg = Register(metric="m", function=3, address=0, type=kind)
    with pytest.raises(OutOfRangeError):
        encode_register(reg, raw)


def test_the_line_time_of_a_poll() -> None:
    assert char_bits("N", 1) == 10
    assert char_bits("E", 1) == char_bits("N", 2) == 11
    # 9600 baud, one register: 8 + 3.5 + 7 + 3.5 = 22 characters of 10 bits.
    assert read_answer_bytes(1) == 7
    assert transaction_s(9600, request_bytes=8, answer_bytes=7) == pytest.approx(22 * 10 / 9600)
