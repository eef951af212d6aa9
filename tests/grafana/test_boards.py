"""The generated boards: committed files up to date, valid for the SDK's types, as designed."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from alerts.aqi import VN_BANDS
from contracts.schema import SEVERITIES
from contracts.severity import SEVERITY_NAMES
from grafana.annotations import (
    ALERT_TAG,
    Transition,
    annotation_for,
    existing_keys,
    plan_annotations,
    transition_key,
)
from grafana.palette import SEVERITY_LABELS, VN_AQI_BANDS
from grafana.render import (
    DASHBOARDS_DIR,
    PROVISIONING_DIR,
    board_files,
    decode_board,
    encode_board,
    stale_files,
    write_boards,
)
from grafana.sqlquery import DATASOURCE_UID, POSTGRES_TYPE, SqlQuery

FILES = board_files()


def test_committed_boards_match_the_code() -> None:
    assert stale_files(DASHBOARDS_DIR) == [], "run `cityhub grafana build` and commit"


def test_write_boards_fixes_a_changed_file_and_removes_an_unknown_one(tmp_path: Path) -> None:
    assert sorted(write_boards(tmp_path)) == sorted(FILES)
    (tmp_path / "alerts.json").write_text("{}", encoding="utf-8")
    (tmp_path / "old-board.json").write_text("{}", encoding="utf-8")
    assert sorted(stale_files(tmp_path)) == ["alerts.json", "old-board.json"]
    write_boards(tmp_path)
    assert stale_files(tmp_path) == []
    assert not (tmp_path / "old-board.json").exists()


def _contains(outer: object, inner: object, path: str = "$") -> list[str]:
    """Where ``inner`` has something ``outer`` lacks (dict keys recursively, lists by index)."""
    if isinstance(inner, dict):
        if not isinstance(outer, dict):
            return [path]
        problems = []
        for key, value in inner.items():
            if key not in outer:
                problems.append(f"{path}.{key}")
            else:
                problems += _contains(outer[key], value, f"{path}.{key}")
        return problems
    if isinstance(inner, list):
        if not isinstance(outer, list) or len(outer) != len(inner):
            return [path]
        return [p for i, v in enumerate(inner) for p in _contains(outer[i], v, f"{path}[{i}]")]
    return [] if outer == inner else [path]


@pytest.mark.parametrize("name", sorted(FILES))
def test_board_json_is_what_the_sdk_types_read_and_write(name: str) -> None:
    """Decoding with the SDK's types loses nothing, and re-encoding gives the same file."""
    text = (DASHBOARDS_DIR / name).read_text(encoding="utf-8")
    document = json.loads(text)
    decoded = decode_board(document)
    again = json.loads(encode_board(decoded))
    assert _contains(again, document) == []
    assert encode_board(decoded) == text
    for panel in decoded.panels or []:
        for target in getattr(panel, "targets", None) or []:
            assert isinstance(target, SqlQuery), f"{name}: {type(target).__name__} target"


def test_the_sql_query_type_refuses_keys_it_does_not_know() -> None:
    with pytest.raises(ValueError, match="unknown keys"):
        SqlQuery.from_json({"refId": "A", "rawSql": "SELECT 1", "rawsql": "typo"})


# Variables that hold one value: the drill-down boards' subjects.
SINGLE = {("site.json", "site"), ("device.json", "device")}


def test_seven_boards_in_vietnamese_in_hanoi_time() -> None:
    boards = {name: json.loads(text) for name, text in FILES.items()}
    assert set(boards) == {
        "city-overview.json",
        "air-quality.json",
        "service-halls.json",
        "fleet-health.json",
        "alerts.json",
        "site.json",
        "device.json",
    }
    uids = [b["uid"] for b in boards.values()]
    assert len(set(uids)) == 7
    assert boards["site.json"]["uid"] == "cityhub-site"
    assert boards["device.json"]["uid"] == "cityhub-device"  # notifications link to it
    for name, board in boards.items():
        assert board["timezone"] == "Asia/Ho_Chi_Minh", name
        assert "·" in board["title"], name  # "Vietnamese · English"
        variables = {v["name"]: v for v in board["templating"]["list"]}
        if name == "device.json":
            assert list(variables) == ["device"]
        else:
            assert [v["name"] for v in board["templating"]["list"]][:2] == ["ward", "site"], name
            assert variables["ward"]["label"] == "Phường/Xã (ward/commune)"
            assert variables["ward"]["sort"] == 0, name  # the query orders the names
            assert "${ward:sqlstring}" in variables["site"]["query"], name  # sites follow ward
        assert "district" not in variables, name  # the former district is shown, not a filter
        for variable in variables.values():
            single = (name, variable["name"]) in SINGLE
            assert variable["multi"] is not single, (name, variable["name"])
            assert variable["includeAll"] is not single, (name, variable["name"])
            assert variable["datasource"]["uid"] == DATASOURCE_UID
        ids = [p["id"] for p in board["panels"]]
        assert ids == list(range(1, len(ids) + 1)), name
        for panel in board["panels"]:
            assert panel["datasource"] == {"type": POSTGRES_TYPE, "uid": DATASOURCE_UID}
    assert "device_type" in {v["name"] for v in boards["fleet-health.json"]["templating"]["list"]}
    overview_types = {p["type"] for p in boards["city-overview.json"]["panels"]}
    assert "geomap" in overview_types


def _data_links(node: object) -> Iterator[dict[str, str]]:
    """Every data link in a panel's field config (defaults and overrides)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if (key == "links" and isinstance(value, list)) or (
                key == "value" and node.get("id") == "links"
            ):
                yield from value
            else:
                yield from _data_links(value)
    elif isinstance(node, list):
        for item in node:
            yield from _data_links(item)


_URL = re.compile(r"^/d/(?P<uid>[\w-]+)/(?:\?(?P<query>.*))?$")
_QUERY_VARIABLE = re.compile(r"var-(\w+)=|\$\{(\w+):queryparam\}")


def _link_target(url: str, uids: dict[str, dict]) -> tuple[str, set[str]]:
    """The board a link opens and the variables it passes; both must exist there."""
    match = _URL.match(url)
    assert match, url
    uid = match["uid"]
    assert uid in uids, f"{url}: no board {uid}"
    names = {a or b for a, b in _QUERY_VARIABLE.findall(match["query"] or "")}
    defined = {v["name"] for v in uids[uid]["templating"]["list"]}
    assert names <= defined, f"{url}: {uid} has no variable {names - defined}"
    return uid, names


def test_every_link_opens_a_board_with_the_variables_it_passes() -> None:
    boards = [json.loads(text) for text in FILES.values()]
    uids = {b["uid"]: b for b in boards}
    for board in boards:
        # Dashboard links: every other board, keeping the time range.
        assert not any(link["includeVars"] for link in board["links"])  # they name their vars
        assert all(link["keepTime"] for link in board["links"])
        targets = {_link_target(link["url"], uids)[0] for link in board["links"]}
        assert targets == set(uids) - {board["uid"]}, board["uid"]
        for link in board["links"]:  # and passes only variables the board has
            own = {v["name"] for v in board["templating"]["list"]}
            assert _link_target(link["url"], {board["uid"]: board, **uids})[1] <= own
        # Data links: to the site and device boards, with the time range.
        for panel in board["panels"]:
            for link in _data_links(panel.get("fieldConfig", {})):
                uid, names = _link_target(link["url"], uids)
                assert uid in {"cityhub-site", "cityhub-device"}
                assert names == ({"site"} if uid == "cityhub-site" else {"device"})
                assert link["url"].endswith("&${__url_time_range}"), link["url"]


def test_the_boards_drill_down_from_the_map_the_alerts_and_the_fleet() -> None:
    boards = {name: json.loads(text) for name, text in FILES.items()}

    def linked(name: str) -> set[str]:
        return {
            link["url"].split("?")[0]
            for panel in boards[name]["panels"]
            for link in _data_links(panel.get("fieldConfig", {}))
        }

    assert linked("city-overview.json") == {"/d/cityhub-site/"}
    assert linked("fleet-health.json") == {"/d/cityhub-site/", "/d/cityhub-device/"}
    assert linked("alerts.json") == {"/d/cityhub-site/", "/d/cityhub-device/"}
    assert linked("site.json") == {"/d/cityhub-device/"}
    assert linked("device.json") == {"/d/cityhub-site/"}
    # The notifications' form: /d/cityhub-device/?var-device=<id>
    device_links = [
        link["url"]
        for board in boards.values()
        for panel in board["panels"]
        for link in _data_links(panel.get("fieldConfig", {}))
        if "cityhub-device" in link["url"]
    ]
    assert device_links
    assert all(u.startswith("/d/cityhub-device/?var-device=${__value.raw}") for u in device_links)
    # A multi-value site goes to the site board as its ward only.
    overview = boards["city-overview.json"]
    (to_site,) = [link for link in overview["links"] if "cityhub-site" in link["url"]]
    assert to_site["url"] == "/d/cityhub-site/?${ward:queryparam}"
    site = boards["site.json"]
    (to_fleet,) = [link for link in site["links"] if "cityhub-fleet-health" in link["url"]]
    assert to_fleet["url"] == "/d/cityhub-fleet-health/?${ward:queryparam}&${site:queryparam}"


def test_aqi_bands_match_the_alerts_job() -> None:
    assert [(b.low, b.name_vi, b.name_en, b.rgb) for b in VN_AQI_BANDS] == [
        (b.low, b.name_vi, b.name_en, b.rgb) for b in VN_BANDS
    ]


def test_aqi_panels_carry_the_band_colours_and_names() -> None:
    board = json.loads(FILES["air-quality.json"])
    aqi_now = board["panels"][0]
    steps = aqi_now["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [s["color"] for s in steps] == [
        "#00e400",
        "#ffff00",
        "#ff7e00",
        "#ff0000",
        "#8f3f97",
        "#7e0023",
    ]
    assert [s["value"] for s in steps] == [None, 51, 101, 151, 201, 301]
    texts = json.dumps(aqi_now["fieldConfig"]["defaults"]["mappings"], ensure_ascii=False)
    for band in ("Tốt", "Trung bình", "Kém", "Xấu", "Rất xấu", "Nguy hại"):
        assert band in texts


def test_alert_annotations_come_from_the_pushed_tags() -> None:
    for name in ("alerts.json", "air-quality.json", "service-halls.json"):
        annotations = json.loads(FILES[name])["annotations"]["list"]
        tagged = [a for a in annotations if a.get("target", {}).get("type") == "tags"]
        assert tagged, name
        assert ALERT_TAG in tagged[0]["target"]["tags"]


def test_provisioned_datasource_is_the_one_the_boards_use() -> None:
    doc = yaml.safe_load((PROVISIONING_DIR / "datasources" / "cityhub.yaml").read_text("utf-8"))
    (source,) = doc["datasources"]
    assert source["uid"] == DATASOURCE_UID
    assert source["type"] == POSTGRES_TYPE
    assert source["jsonData"]["timescaledb"] is True
    assert "password" in source["secureJsonData"]
    # From the environment or a file (the compose secret), never written in the file.
    assert source["secureJsonData"]["password"].startswith(("${", "$__file{"))


# --- annotations (pure) --------------------------------------------------------------


def _transition(alert_id: int, ts_ms: int, to_state: str = "active_unack") -> Transition:
    return Transition(
        alert_id=alert_id,
        ts_ms=ts_ms,
        from_state=None,
        to_state=to_state,
        severity="major",
        value=42.0,
        rule_id="kiosk-offline",
        device_id="kiosk-hk-hall-quan-01",
        site_id="hk-hall-quan",
        device_type="kiosk",
        message="kiosk silent for 400 s",
    )


def test_annotation_tags_let_each_board_find_its_transitions() -> None:
    a = annotation_for(_transition(7, 1_000))
    assert a.time_ms == 1_000
    assert {ALERT_TAG, "kiosk", "major", "kiosk-offline", "active_unack"} <= set(a.tags)
    assert transition_key(_transition(7, 1_000)) in a.tags
    assert "kiosk silent" in a.text
    assert a.text.startswith("[Cao / Major] kiosk-offline")


# Every severity label the shared vocabulary has, and the word that must not be one.
_SEVERITY_TEXTS = {name.label for name in SEVERITY_NAMES.values()}


def _strings(node: object) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


def test_boards_name_severities_in_the_shared_vocabulary() -> None:
    alerts = json.loads(FILES["alerts.json"])
    texts = _strings(alerts)
    # Value mappings and series names use the vocabulary, for every severity...
    assert set(texts) >= _SEVERITY_TEXTS
    assert {s: SEVERITY_NAMES[s].label for s in SEVERITIES} == SEVERITY_LABELS
    # ... and "Cảnh báo" (alert) is never a severity on any board.
    for name, raw in FILES.items():
        for text in _strings(json.loads(raw)):
            lowered = text.lower()
            if "cảnh báo" in lowered:
                assert "warning" not in lowered, (name, text)
                assert text not in _SEVERITY_TEXTS, (name, text)
    assert all("Cảnh báo" not in label for label in _SEVERITY_TEXTS)


def test_planning_skips_transitions_grafana_already_has() -> None:
    transitions = [
        _transition(2, 2_000),
        _transition(1, 1_000),
        _transition(1, 3_000, "cleared_unack"),
    ]
    first = plan_annotations(transitions, set())
    assert [a.time_ms for a in first] == [1_000, 2_000, 3_000]
    returned: list[dict[str, object]] = [{"tags": list(a.tags), "text": a.text} for a in first[:2]]
    have = existing_keys(returned)
    again = plan_annotations(transitions, have)
    assert [a.time_ms for a in again] == [3_000]
    assert (
        plan_annotations(transitions, existing_keys([{"tags": list(first[2].tags)}, *returned]))
        == []
    )
