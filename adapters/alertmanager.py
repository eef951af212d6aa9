"""Prometheus Alertmanager's v2 API: post alerts, with the standard library only.

``post_alerts`` sends one JSON list to ``POST {url}/api/v2/alerts`` and
translates what can go wrong, once, here:

    what happened                                   project error
    no connection, refused, timed out, reset,       AlertmanagerUnavailableError (post again)
      a 5xx answer
    a 4xx answer (a malformed alert)                AlertmanagerRefusedError, with the first
                                                    200 characters of the answer

Building the alerts (labels, annotations, times) is ``alerts.notify``'s
business; when to post and how to back off is the alerts job's.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any, Final

from contracts.errors import AlertmanagerRefusedError, AlertmanagerUnavailableError

# Alertmanager answers a post with an empty body; an error body is a short
# message. 64 KiB is far more than either, and bounds a misbehaving server.
MAX_ANSWER_BYTES: Final = 64 << 10
# What a refusal's message keeps of the answer.
ANSWER_PREVIEW_CHARS: Final = 200


def _read_answer(response: Any) -> str:
    data: bytes = response.read(MAX_ANSWER_BYTES)
    return data.decode("utf-8", "replace")[:ANSWER_PREVIEW_CHARS]


def post_alerts(url: str, alerts: Sequence[Mapping[str, Any]], timeout_s: float) -> None:
    """POST ``alerts`` (v2 ``postableAlerts``) to Alertmanager at ``url`` (its base URL)."""
    endpoint = f"{url.rstrip('/')}/api/v2/alerts"
    body = json.dumps(list(alerts), ensure_ascii=False).encode("utf-8")
    request = urllib.request.Request(  # noqa: S310 - the operator's configured URL
        endpoint,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "Accept": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            _read_answer(response)
    except urllib.error.HTTPError as exc:
        answer = _read_answer(exc)
        exc.close()
        if exc.code >= 500:
            raise AlertmanagerUnavailableError(
                f"Alertmanager at {url} answered {exc.code}: {answer}"
            ) from exc
        raise AlertmanagerRefusedError(
            f"Alertmanager at {url} refused the alerts ({exc.code}): {answer}"
        ) from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise AlertmanagerUnavailableError(f"Alertmanager at {url} unreachable: {reason}") from exc
