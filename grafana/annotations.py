"""Alert transitions as Grafana annotations: which to post, with which tags and text.

Pure. Each transition becomes one organisation annotation (no dashboard), so
every board whose annotation query asks for its tags shows it: all of them
carry ``cityhub-alert``, plus the device type (the air-quality and
service-hall boards ask for ``air_quality`` / ``kiosk``), severity, rule,
new state, and a key naming the transition. The key makes a push
idempotent: transitions whose key Grafana already has are not posted again.
Reading transitions from the database and talking to Grafana are
``grafana.push``'s business.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

import msgspec

from grafana.palette import ALERT_STATE_LABELS, SEVERITY_LABELS

ALERT_TAG: Final = "cityhub-alert"
KEY_PREFIX: Final = "transition-"


class Transition(msgspec.Struct, frozen=True, kw_only=True):
    alert_id: int
    ts_ms: int
    from_state: str | None
    to_state: str
    severity: str
    value: float | None
    rule_id: str
    device_id: str
    site_id: str | None
    device_type: str | None
    message: str


class Annotation(msgspec.Struct, frozen=True, kw_only=True):
    time_ms: int
    tags: tuple[str, ...]
    text: str


def transition_key(t: Transition) -> str:
    return f"{KEY_PREFIX}{t.alert_id}-{t.ts_ms}-{t.to_state}"


def annotation_for(t: Transition) -> Annotation:
    tags = [ALERT_TAG, transition_key(t), t.severity, t.rule_id, t.to_state]
    if t.device_type:
        tags.append(t.device_type)
    state = ALERT_STATE_LABELS.get(t.to_state, t.to_state)
    value = "" if t.value is None else f" = {t.value:g}"
    where = f" @ {t.site_id}" if t.site_id else ""
    severity = SEVERITY_LABELS.get(t.severity, t.severity)
    text = f"[{severity}] {t.rule_id} · {t.device_id}{where}{value}: {state}"
    if t.message:
        text += f"<br>{t.message}"
    return Annotation(time_ms=t.ts_ms, tags=tuple(tags), text=text)


def existing_keys(annotations: Iterable[dict[str, object]]) -> set[str]:
    """The transition keys among the tags of annotations Grafana returned."""
    keys: set[str] = set()
    for annotation in annotations:
        tags = annotation.get("tags")
        if isinstance(tags, list):
            keys.update(t for t in tags if isinstance(t, str) and t.startswith(KEY_PREFIX))
    return keys


def plan_annotations(transitions: Sequence[Transition], have: set[str]) -> list[Annotation]:
    """Annotations for the transitions Grafana does not have yet, oldest first."""
    planned: dict[str, Annotation] = {}
    for t in sorted(transitions, key=lambda x: (x.ts_ms, x.alert_id)):
        key = transition_key(t)
        if key not in have and key not in planned:
            planned[key] = annotation_for(t)
    return list(planned.values())
