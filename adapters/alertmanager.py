"""Prometheus Alertmanager's v2 API: post alerts, create and expire silences, stdlib only.

``post_alerts`` sends one JSON list to ``POST {url}/api/v2/alerts``;
``create_silence`` sends one silence to ``POST {url}/api/v2/silences`` and
returns its id; ``expire_silence`` asks ``DELETE {url}/api/v2/silence/{id}``.
What can go wrong is translated once, here:

    what happened                                   project error
    no connection, refused, timed out, reset,       AlertmanagerUnavailableError (try again)
      a 5xx answer
    a 4xx answer (a malformed alert or silence)     AlertmanagerRefusedError, with the first
                                                    200 characters of the answer

Expiring a silence that is already over (it ended, or was expired) or that
Alertmanager no longer knows (it restarted without its storage) is done, not
an error: what the caller wanted is true.

Building the alerts and silences (labels, matchers, times) is
``alerts.notify``'s business; when to post and how to back off is the alerts
job's and the commands'.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any, Final
from urllib.parse import quote

from contracts.errors import AlertmanagerRefusedError, AlertmanagerUnavailableError

# Alertmanager answers a post with an empty body or a silence id; an error
# body is a short message. 64 KiB is far more than either, and bounds a
# misbehaving server.
MAX_ANSWER_BYTES: Final = 64 << 10
# What a refusal's message keeps of the answer.
ANSWER_PREVIEW_CHARS: Final = 200
# Alertmanager 0.25 answers the expiry of a silence that is over, or that it
# does not know, with a 500 and one of these texts (silence.Silences.Expire;
# newer versions answer 404): for the caller, that is done.
GONE_ANSWERS: Final = ("already expired", "silence not found")


def _read_answer(response: Any) -> str:
    data: bytes = response.read(MAX_ANSWER_BYTES)
    return data.decode("utf-8", "replace")


def _call(
    url: str,
    path: str,
    method: str,
    payload: object,
    *,
    timeout_s: float,
    what: str,
    gone_is_done: bool = False,
) -> str:
    """One request to Alertmanager at ``url`` (its base URL); returns the answer's text.

    ``gone_is_done``: a silence unknown (404) or already over is an empty answer.
    """
    endpoint = f"{url.rstrip('/')}{path}"
    body = None if payload is None else json.dumps(payload, ensure_ascii=False).encode("utf-8")
    request = urllib.request.Request(  # noqa: S310 - the operator's configured URL
        endpoint,
        data=body,
        method=method,
        headers={"Content-Type": "application/json", "Accept": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            return _read_answer(response)
    except urllib.error.HTTPError as exc:
        answer = _read_answer(exc)[:ANSWER_PREVIEW_CHARS]
        exc.close()
        if gone_is_done and (exc.code == 404 or any(g in answer for g in GONE_ANSWERS)):
            return ""
        if exc.code >= 500:
            raise AlertmanagerUnavailableError(
                f"Alertmanager at {url} answered {exc.code}: {answer}"
            ) from exc
        raise AlertmanagerRefusedError(
            f"Alertmanager at {url} refused {what} ({exc.code}): {answer}"
        ) from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise AlertmanagerUnavailableError(f"Alertmanager at {url} unreachable: {reason}") from exc


def post_alerts(url: str, alerts: Sequence[Mapping[str, Any]], timeout_s: float) -> None:
    """POST ``alerts`` (v2 ``postableAlerts``) to Alertmanager at ``url`` (its base URL)."""
    _call(url, "/api/v2/alerts", "POST", list(alerts), timeout_s=timeout_s, what="the alerts")


def create_silence(url: str, silence: Mapping[str, Any], timeout_s: float) -> str:
    """POST ``silence`` (a v2 ``postableSilence``); returns the id Alertmanager gave it."""
    answer = _call(
        url, "/api/v2/silences", "POST", dict(silence), timeout_s=timeout_s, what="the silence"
    )
    try:
        silence_id = json.loads(answer)["silenceID"]
    except (ValueError, KeyError, TypeError) as exc:
        raise AlertmanagerUnavailableError(
            f"Alertmanager at {url} answered a silence without its id: "
            f"{answer[:ANSWER_PREVIEW_CHARS]}"
        ) from exc
    if not isinstance(silence_id, str) or not silence_id:
        raise AlertmanagerUnavailableError(f"Alertmanager at {url} gave an empty silence id")
    return silence_id


def expire_silence(url: str, silence_id: str, timeout_s: float) -> None:
    """Expire silence ``silence_id`` now; one already over or unknown counts as expired."""
    path = f"/api/v2/silence/{quote(silence_id, safe='')}"
    _call(
        url,
        path,
        "DELETE",
        None,
        timeout_s=timeout_s,
        what=f"silence {silence_id}",
        gone_is_done=True,
    )
