"""The log handler of every process: one stream on stderr, text lines or JSON lines.

``configure_logging`` is what a service's ``__main__`` (and the ``cityhub``
command) calls once, with the settings' ``log_format``: ``"text"`` for a
person at a terminal, ``"json"`` for journald or a log shipper, one object a
line with ``ts`` (ISO 8601, UTC with its ``+00:00`` offset), ``level``,
``logger``, ``message`` (the %-formatted text), ``exc_info`` (the traceback
as text) and the fields a log call names with ``extra=`` (``device_id``,
``gateway_id``, ``batch_id``, ``alert_id``, ``site_id``). Process-wide fields
(``service``, a gateway's own ``gateway_id``) come from ``add_log_fields``;
a field a log call names itself wins over them.

Which ids a log call carries is the caller's business; what is logged
where is each service's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Final, Literal, TextIO

from pythonjsonlogger.json import JsonFormatter

LogFormat = Literal["text", "json"]

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The record attributes a JSON line starts with, renamed to the shipped names.
_JSON_FIELDS: Final = "%(levelname)s %(name)s %(message)s"
_JSON_RENAMES: Final = {"levelname": "level", "name": "logger"}
# Record attributes that Python adds and a reader of the lines does not need.
_JSON_DROPPED: Final = frozenset({"taskName", "color_message"})


class ProcessFields(logging.Filter):
    """Adds fields to every record a handler sees, unless the log call named them itself."""

    def __init__(self, fields: Mapping[str, str]) -> None:
        super().__init__()
        self.fields = dict(fields)

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in self.fields.items():
            if not hasattr(record, name):
                setattr(record, name, value)
        return True


class _TimeFirst(JsonFormatter):
    """python-json-logger's formatter with ``ts`` moved to the front of the line."""

    def process_log_record(self, log_record: dict[str, Any]) -> dict[str, Any]:
        return {"ts": log_record.pop("ts", None), **log_record}


def json_formatter() -> logging.Formatter:
    """One JSON object a line, non-ASCII text (Vietnamese) kept readable."""
    reserved = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | _JSON_DROPPED
    reserved |= {"message", "asctime"}
    return _TimeFirst(
        _JSON_FIELDS,
        rename_fields=_JSON_RENAMES,
        reserved_attrs=sorted(reserved),
        timestamp="ts",
        json_ensure_ascii=False,
    )


def configure_logging(
    level: int,
    *,
    log_format: LogFormat = "text",
    service: str,
    text_format: str = TEXT_FORMAT,
) -> None:
    """Install the process's one handler (stderr) at ``level``, tagging lines with ``service``.

    A second call (a spawned worker calls it again in its own interpreter)
    leaves an existing handler alone, as ``logging.basicConfig`` does.
    """
    handler = log_handler(log_format=log_format, service=service, text_format=text_format)
    logging.basicConfig(level=level, handlers=[handler])


def log_handler(
    *,
    log_format: LogFormat,
    service: str,
    text_format: str = TEXT_FORMAT,
    stream: TextIO | None = None,
) -> logging.Handler:
    """The handler ``configure_logging`` installs: on ``stream`` (default stderr)."""
    handler = logging.StreamHandler(stream)
    formatter = json_formatter() if log_format == "json" else logging.Formatter(text_format)
    handler.setFormatter(formatter)
    handler.addFilter(ProcessFields({"service": service}))
    return handler


def add_log_fields(**fields: str) -> None:
    """Put ``fields`` on every line from now on (the service, a gateway's own id).

    Replaces earlier values of the same names (``cityhub gateway run`` turns
    the command's ``service`` into ``gateway``).
    """
    for handler in logging.getLogger().handlers:
        for existing in handler.filters:
            if isinstance(existing, ProcessFields):
                existing.fields.update(fields)
                break
        else:
            handler.addFilter(ProcessFields(fields))
