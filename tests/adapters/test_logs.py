"""The log handler: JSON lines with their fields, text lines as before; no servers."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from datetime import datetime

import pytest

from adapters.logs import ProcessFields, add_log_fields, json_formatter, log_handler


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("gateway.service", logging.WARNING, __file__, 1, message, args, None)
    made.__dict__.update(extra)
    return made


def test_a_json_line_has_the_shipped_fields_and_ids():
    line = json_formatter().format(
        record("rejected reading from %s (%s)", "kiosk-001", "range", device_id="kiosk-001")
    )
    fields = json.loads(line)
    assert fields == {
        "ts": fields["ts"],
        "level": "WARNING",
        "logger": "gateway.service",
        "message": "rejected reading from kiosk-001 (range)",
        "device_id": "kiosk-001",
    }
    assert next(iter(fields)) == "ts"
    # ISO 8601 with its offset: a reader in Hanoi converts without guessing.
    stamp = datetime.fromisoformat(fields["ts"])
    assert stamp.utcoffset() is not None
    assert stamp.utcoffset().total_seconds() == 0


def test_vietnamese_text_stays_readable_in_json():
    line = json_formatter().format(record("Thiết bị %s mất kết nối", "trạm-đo"))
    assert "Thiết bị trạm-đo mất kết nối" in line
    assert "\\u" not in line
    assert json.loads(line)["message"] == "Thiết bị trạm-đo mất kết nối"


def test_an_exception_is_one_text_field():
    try:
        int("bad frame")
    except ValueError:
        made = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    fields = json.loads(json_formatter().format(made))
    assert "\n" not in json_formatter().format(made)
    assert fields["exc_info"].startswith("Traceback")
    assert "ValueError: invalid literal" in fields["exc_info"]


def test_process_fields_fill_in_but_never_override_a_calls_own():
    fields = ProcessFields({"service": "gateway", "gateway_id": "gw-own"})
    own = record("x")
    other = record("x", gateway_id="gw-other")
    assert fields.filter(own)
    assert fields.filter(other)
    assert (own.__dict__["gateway_id"], own.__dict__["service"]) == ("gw-own", "gateway")
    assert other.__dict__["gateway_id"] == "gw-other"


@pytest.fixture
def root_stream() -> Iterator[io.StringIO]:
    """A JSON handler for service "cityhub" on the root logger (as the CLI's), at INFO."""
    stream = io.StringIO()
    handler = log_handler(log_format="json", service="cityhub", stream=stream)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


def test_json_lines_with_process_fields(root_stream):
    # `cityhub gateway run` turns the command's service into the gateway's.
    add_log_fields(service="gateway", gateway_id="gw-a")
    logging.getLogger("gateway.service").info("batch %s sent", "b-1", extra={"batch_id": "b-1"})
    logging.getLogger("x").debug("not at INFO")
    lines = root_stream.getvalue().splitlines()
    assert len(lines) == 1
    fields = json.loads(lines[0])
    assert fields["service"] == "gateway"
    assert fields["gateway_id"] == "gw-a"
    assert fields["batch_id"] == "b-1"
    assert fields["message"] == "batch b-1 sent"
    assert "taskName" not in fields


def test_text_lines_keep_their_format():
    stream = io.StringIO()
    handler = log_handler(log_format="text", service="ingest", stream=stream)
    made = record("rejected (%s)", "range", device_id="d")
    handler.handle(made)
    line = stream.getvalue()
    assert line.endswith(" WARNING gateway.service: rejected (range)\n")
    assert not line.startswith("{")
