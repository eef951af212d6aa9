"""PostgreSQL binary COPY, encoded from whole numpy columns at once.

``encode_copy_binary`` turns columns (numbers, timestamps as integer Unix
milliseconds, text as codes into a small label list) into one
``COPY ... FROM STDIN (FORMAT BINARY)`` stream: header, tuples, trailer.
Building a Python object per value (``datetime`` above all) costs as much as
decoding the batch; here each column is converted with
one numpy cast.

How: a binary tuple is a field count, then per field a 4-byte length (-1 for
NULL) and the value's bytes. Rows whose NULL pattern (and text lengths) are
the same have the same layout, so each such group is one numpy structured
array with big-endian fields, filled column by column and written with
``tobytes``. A sensor batch usually has one or two groups.

The column types must be exactly the target columns' types: binary COPY sends
no type names and the server reads the bytes as its column's type. Checking
values (finite, in range, timestamps in the window) is the caller's business;
this module only encodes. It does no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

# 2000-01-01T00:00:00Z, PostgreSQL's timestamp epoch, in Unix milliseconds.
PG_EPOCH_MS: Final = 946_684_800_000

HEADER: Final = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
TRAILER: Final = b"\xff\xff"

# Fixed-width PostgreSQL types and their binary (big-endian) numpy layout.
# timestamptz travels as int64 microseconds since PG_EPOCH_MS.
FIXED_TYPES: Final[dict[str, str]] = {
    "smallint": ">i2",
    "integer": ">i4",
    "bigint": ">i8",
    "real": ">f4",
    "double precision": ">f8",
    "boolean": "u1",
    "timestamptz": ">i8",
}
TEXT_TYPE: Final = "text"

# A row's layout key packs the NULL pattern (one bit a column) and, for each
# text column, its value's byte length (12 bits) into one int64, so grouping
# is a single 1-D np.unique. 63 usable bits: e.g. 39 columns and 2 text columns.
_TEXT_LENGTH_BITS: Final = 12
_KEY_BITS: Final = 63


@dataclass(frozen=True, slots=True)
class CopyColumn:
    """One column to encode.

    ``values``: numbers for numeric and boolean types (non-zero is true),
    integer Unix milliseconds for ``timestamptz``, integer codes into
    ``labels`` for ``text``. ``null``: True where the value is NULL (its
    entry in ``values`` is then ignored); None means no NULLs.
    """

    pg_type: str
    values: NDArray[Any]
    null: NDArray[np.bool_] | None = None
    labels: Sequence[str] = ()


def _wire_values(column: CopyColumn, rows: NDArray[np.intp]) -> NDArray[Any]:
    """The selected rows of a fixed-width column, cast to its wire layout."""
    selected: NDArray[Any] = column.values[rows]
    if column.pg_type == "timestamptz":
        return (selected.astype(np.int64) - PG_EPOCH_MS) * 1000
    if column.pg_type == "boolean":
        flags: NDArray[np.bool_] = np.not_equal(selected, 0)
        return flags.astype(np.uint8)
    return selected


def _check(columns: Sequence[CopyColumn], rows: int) -> None:
    texts = 0
    for index, column in enumerate(columns):
        if column.pg_type == TEXT_TYPE:
            texts += 1
            too_long = [label for label in column.labels if len(label.encode()) >= 1 << 12]
            if too_long:
                raise ValueError(f"column {index}: text longer than 4095 bytes")
        elif column.pg_type not in FIXED_TYPES:
            raise ValueError(f"column {index}: unsupported type {column.pg_type!r}")
        if len(column.values) != rows or (column.null is not None and len(column.null) != rows):
            raise ValueError(f"column {index} does not have {rows} rows")
    if len(columns) + _TEXT_LENGTH_BITS * texts > _KEY_BITS:
        raise ValueError(f"{len(columns)} columns with {texts} text columns is too wide")


def encode_copy_binary(columns: Sequence[CopyColumn], rows: int) -> bytes:
    """The complete binary COPY stream (header, ``rows`` tuples, trailer) for ``columns``."""
    _check(columns, rows)
    if rows == 0:
        return HEADER + TRAILER
    key = np.zeros(rows, dtype=np.int64)
    text_bytes: dict[int, list[bytes]] = {}
    text_lengths: dict[int, NDArray[np.int64]] = {}
    shift = len(columns)
    for index, column in enumerate(columns):
        if column.null is not None:
            key |= column.null.astype(np.int64) << index
        if column.pg_type == TEXT_TYPE:
            encoded = [label.encode() for label in column.labels]
            text_bytes[index] = encoded
            per_label = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
            lengths = per_label[column.values] if encoded else np.zeros(rows, np.int64)
            text_lengths[index] = lengths
            key |= lengths << shift
            shift += _TEXT_LENGTH_BITS
    keys, inverse = np.unique(key, return_inverse=True)
    parts = [HEADER]
    if len(keys) == 1:
        groups: list[NDArray[np.intp]] = [np.arange(rows)]
    else:
        order = np.argsort(inverse, kind="stable")
        bounds = np.cumsum(np.bincount(inverse))[:-1]
        groups = np.split(order, bounds)
    parts.extend(_encode_group(columns, group, text_bytes, text_lengths) for group in groups)
    parts.append(TRAILER)
    return b"".join(parts)


def _encode_group(
    columns: Sequence[CopyColumn],
    rows: NDArray[np.intp],
    text_bytes: dict[int, list[bytes]],
    text_lengths: dict[int, NDArray[np.int64]],
) -> bytes:
    """Rows that share one layout: a packed structured array, filled column by column."""
    first = int(rows[0])
    fields: list[tuple[str, str]] = [("count", ">i2")]
    lengths: list[int] = []
    for index, column in enumerate(columns):
        fields.append((f"len{index}", ">i4"))
        if column.null is not None and column.null[first]:
            lengths.append(-1)
        elif column.pg_type == TEXT_TYPE:
            width = int(text_lengths[index][first])
            lengths.append(width)
            if width:
                fields.append((f"val{index}", f"S{width}"))
        else:
            wire = FIXED_TYPES[column.pg_type]
            lengths.append(np.dtype(wire).itemsize)
            fields.append((f"val{index}", wire))
    record = np.empty(len(rows), dtype=np.dtype(fields))
    record["count"] = len(columns)
    for index, column in enumerate(columns):
        record[f"len{index}"] = lengths[index]
        if lengths[index] <= 0:
            continue
        if column.pg_type == TEXT_TYPE:
            width = lengths[index]
            # Labels of other lengths are never selected in this group; they
            # are cut or padded only to fit the fixed-width array.
            labels = np.array(
                [b[:width].ljust(width, b"\0") for b in text_bytes[index]], dtype=f"S{width}"
            )
            record[f"val{index}"] = labels[column.values[rows]]
        else:
            record[f"val{index}"] = _wire_values(column, rows)
    return record.tobytes()
