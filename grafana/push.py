"""Adapters of ``cityhub grafana push``: Grafana's HTTP API (grafana-client) and the transitions.

``GrafanaPush`` uploads the boards into a folder (created when missing,
boards overwritten by uid) and posts annotations; grafana-client's and the
HTTP library's errors become ``GrafanaUnavailableError`` (no answer, 5xx:
retry later) or ``GrafanaRefusedError`` (4xx: bad token, bad board).
``read_transitions`` reads alert transitions with their alert's rule and
device from the database (errors translated by ``adapters.database``). Which
annotations to post is ``grafana.annotations``'.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Final

import niquests
from grafana_client.api import GrafanaApi
from grafana_client.client import GrafanaClientError, GrafanaException

from adapters.database import Connection, database_errors
from contracts.errors import GrafanaRefusedError, GrafanaUnavailableError
from contracts.schema import check_schema_name
from grafana.annotations import ALERT_TAG, Annotation, Transition, existing_keys

logger = logging.getLogger(__name__)

FOLDER_UID: Final = "cityhub"
FOLDER_TITLE: Final = "cityhub · Hà Nội"
# Grafana returns at most `limit` annotations per query; a day of a large
# fleet's transitions fits in this many.
ANNOTATION_LIMIT: Final = 100_000


@contextmanager
def _errors(what: str) -> Iterator[None]:
    try:
        yield
    except GrafanaClientError as exc:
        raise GrafanaRefusedError(f"{what}: Grafana refused ({exc.status_code}): {exc}") from exc
    except GrafanaException as exc:
        raise GrafanaUnavailableError(f"{what}: {exc}") from exc
    except (niquests.exceptions.RequestException, OSError) as exc:
        raise GrafanaUnavailableError(f"{what}: Grafana is unreachable: {exc}") from exc


class GrafanaPush:
    """One Grafana, reached with a service-account token."""

    def __init__(self, *, url: str, token: str, timeout_s: float = 10.0) -> None:
        self.url = url
        self._api = GrafanaApi.from_url(url=url, credential=token, timeout=timeout_s)

    def version(self) -> str:
        with _errors("health check"):
            return str(self._api.health.check().get("version", "unknown"))

    def ensure_folder(self, uid: str = FOLDER_UID, title: str = FOLDER_TITLE) -> str:
        with _errors(f"folder {uid}"):
            try:
                self._api.folder.get_folder(uid)
            except GrafanaClientError as exc:
                if exc.status_code != 404:
                    raise
                self._api.folder.create_folder(title, uid=uid)
                logger.info("created folder %s", uid)
        return uid

    def upload_board(self, board: Mapping[str, Any], *, folder_uid: str = FOLDER_UID) -> str:
        """Create or overwrite one board (matched by uid); returns its URL path."""
        document = {k: v for k, v in board.items() if k not in {"id", "version"}}
        with _errors(f"board {document.get('uid')}"):
            answer = self._api.dashboard.update_dashboard(
                {
                    "dashboard": document,
                    "folderUid": folder_uid,
                    "overwrite": True,
                    "message": "cityhub grafana push",
                }
            )
        return str(answer.get("url", ""))

    def annotation_keys(self, start_ms: int, end_ms: int) -> set[str]:
        """Keys of the transitions already posted between the two times."""
        with _errors("annotations"):
            found = self._api.annotations.find_annotations(
                time_from=start_ms,
                time_to=end_ms,
                tags=[ALERT_TAG],
                ann_type="annotation",
                limit=ANNOTATION_LIMIT,
            )
        return existing_keys(found if isinstance(found, list) else [])

    def post_annotations(self, annotations: Sequence[Annotation]) -> int:
        for annotation in annotations:
            with _errors("annotation"):
                self._api.annotations.add_annotation(
                    time_from=annotation.time_ms,
                    time_to=annotation.time_ms,
                    tags=list(annotation.tags),
                    text=annotation.text,
                )
        return len(annotations)


def read_transitions(
    conn: Connection[Any], *, schema: str, start: datetime, end: datetime
) -> list[Transition]:
    """Alert transitions in [start, end), oldest first, with their alert's rule and device."""
    s = check_schema_name(schema)
    with database_errors("reading alert transitions", schema=s):
        rows = conn.execute(
            f"""SELECT t.alert_id, t.ts, t.from_state, t.to_state, t.severity, t.value,
                a.rule_id, a.device_id, a.site_id, d.device_type, a.message
            FROM {s}.alert_transitions t
            JOIN {s}.alerts a ON a.alert_id = t.alert_id
            LEFT JOIN {s}.devices d ON d.device_id = a.device_id
            WHERE t.ts >= %s AND t.ts < %s
            ORDER BY t.ts, t.alert_id""",
            (start, end),
        ).fetchall()
    return [
        Transition(
            alert_id=int(r[0]),
            ts_ms=round(r[1].timestamp() * 1000),
            from_state=r[2],
            to_state=str(r[3]),
            severity=str(r[4]),
            value=None if r[5] is None else float(r[5]),
            rule_id=str(r[6]),
            device_id=str(r[7]),
            site_id=r[8],
            device_type=r[9],
            message=str(r[10] or ""),
        )
        for r in rows
    ]
