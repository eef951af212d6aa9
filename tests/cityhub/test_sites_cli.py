"""`cityhub sites add / list / show / import / export / units` through typer's CliRunner.

Against a real migrated database: what is stored, what the audit log says,
and that every refusal is one line, exit status 1, and changes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cityhub.cli.main import app
from contracts.sites import MAX_FILE_BYTES

HALL = [
    "hk-hall-test",
    "--name",
    "Điểm phục vụ hành chính công phường Hoàn Kiếm",
    "--kind",
    "service_hall",
    "--ward",
    "hoan kiem",
    "--latitude",
    "21.0270",
    "--longitude",
    "105.8502",
    "--former-district",
    "Quận Hoàn Kiếm",
    "--address",
    "126 Hàng Trống, phường Hoàn Kiếm, Hà Nội",
    "--opening-hours",
    "Mon-Fri 08:00-12:00,13:00-17:00; Sat 08:00-12:00",
]

CSV_TEXT = (
    "site_id,name,kind,ward_code,ward,former_district,address,latitude,longitude,opening_hours\n"
    'ss-hall-a,"UBND xã Sóc Sơn, bộ phận một cửa",service_hall,,Xã Sóc Sơn,Sóc Sơn,'
    '"Thị trấn Sóc Sơn cũ, xã Sóc Sơn",21.2565,105.8487,Mon-Fri 08:00-17:00\n'
    "bd-aq-b,Trạm quan trắc Ba Đình,street_monitor,00004,,,,21.0405,105.8390,\n"
    "hd-ward-c,Trụ sở phường Hà Đông,ward_office,09556,Phường Hà Đông,Hà Đông,,"
    "20.9710,105.7780,Mon-Fri 08:00-12:00\n"
)


@pytest.fixture
def env(db_url, migrated):
    return {
        "CITYHUB_DATABASE__URL": db_url,
        "CITYHUB_DATABASE__SCHEMA": migrated,
        "CITYHUB_OPERATOR": "Nguyễn Văn An",
        "COLUMNS": "250",
    }


def cli(env: dict[str, str], *args: str, stdin: str | None = None):
    return CliRunner().invoke(app, ["sites", *args], env=env, input=stdin)


def ok(env: dict[str, str], *args: str, stdin: str | None = None) -> str:
    result = cli(env, *args, stdin=stdin)
    assert result.exit_code == 0, result.output
    return result.output


def refused(env: dict[str, str], *args: str, stdin: str | None = None) -> str:
    result = cli(env, *args, stdin=stdin)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    message = result.output.strip()
    assert message.startswith("error:"), message
    return " ".join(message.split())


def sites_json(env: dict[str, str]) -> dict[str, dict]:
    return {s["site_id"]: s for s in json.loads(ok(env, "list", "--json"))}


def audit_rows(db_conn, schema: str) -> list[tuple[str, str, str, dict]]:
    return db_conn.execute(
        f"""SELECT operator, action, subject_id, detail FROM {schema}.audit_log
            WHERE subject_kind = 'site' ORDER BY audit_id"""
    ).fetchall()


def test_add_list_show_and_audit(env, db_conn, migrated):
    out = ok(env, "add", *HALL)
    assert "added site hk-hall-test in Phường Hoàn Kiếm (00070)" in out
    site = sites_json(env)["hk-hall-test"]
    assert site["unit_code"] == "00070"
    assert site["ward"] == "Phường Hoàn Kiếm"
    assert site["former_district"] == "Hoàn Kiếm"  # stored without its prefix
    assert (site["gateways"], site["devices"]) == (0, 0)
    shown = ok(env, "show", "hk-hall-test")
    assert "Phường Hoàn Kiếm (00070)" in shown
    assert "Sat 08:00-12:00" in shown
    assert json.loads(ok(env, "show", "hk-hall-test", "--json"))["name"].startswith("Điểm phục vụ")
    [(operator, action, subject, detail)] = audit_rows(db_conn, migrated)
    assert (operator, action, subject) == ("Nguyễn Văn An", "site.add", "hk-hall-test")
    assert detail["unit_code"] == "00070"

    # The same request again changes nothing; another one for the same id is refused.
    assert "already registered with these values" in ok(env, "add", *HALL)
    moved = [*HALL]
    moved[moved.index("hoan kiem")] = "Cửa Nam"
    assert "already registered with other values" in refused(env, "add", *moved)
    assert sites_json(env)["hk-hall-test"]["unit_code"] == "00070"
    assert len(audit_rows(db_conn, migrated)) == 1

    assert [s["site_id"] for s in json.loads(ok(env, "list", "--json", "--ward", "70"))] == [
        "hk-hall-test"
    ]
    assert json.loads(ok(env, "list", "--json", "--ward", "Cửa Nam")) == []
    assert json.loads(ok(env, "list", "--json", "--kind", "street_monitor")) == []


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"--ward": "Hoan Kiem Lake"}, "is not one of Hanoi's 126 wards/communes"),
        ({"--ward": "Quận Ba Đình"}, "is not one of Hanoi's 126"),  # a district is not a ward
        ({"--ward": "99999"}, "is not the code of one of Hanoi's 126"),
        ({"--latitude": "105.8502", "--longitude": "21.0270"}, "swapped?"),
        ({"--latitude": "nan"}, "not a finite number"),
        ({"--kind": "market"}, "kind: 'market' is not one of"),
        ({"--former-district": "Quận 1"}, "is not one of Hanoi's 30 former districts"),
        ({"--opening-hours": "Mon-Fri 8-17"}, "opening_hours"),
        ({"--name": "a\x1b[31mred"}, "control characters"),
        ({"--name": "x" * 301}, "longer than 300"),
    ],
)
def test_add_refusals_are_one_line_and_store_nothing(env, db_conn, migrated, change, words):
    args = [*HALL]
    for option, value in change.items():
        args[args.index(option) + 1] = value
    assert words in refused(env, "add", *args)
    assert sites_json(env) == {}
    assert audit_rows(db_conn, migrated) == []


@pytest.mark.parametrize("site_id", ["HK-hall", "hk/hall", "hk+hall", "#", "a" * 65, "hk hall"])
def test_add_refuses_ids_outside_the_allow_list(env, site_id):
    args = [site_id, *HALL[1:]]
    assert "site_id" in refused(env, "add", *args)
    assert sites_json(env) == {}


def test_add_needs_an_operator(env):
    assert "operator" in refused({**env, "CITYHUB_OPERATOR": ""}, "add", *HALL)
    assert sites_json(env) == {}


def test_import_export_round_trip_and_update(env, db_conn, migrated, tmp_path: Path):
    source = tmp_path / "sites.csv"
    source.write_text(CSV_TEXT, encoding="utf-8")
    out = ok(env, "import", str(source))
    assert "added 3" in out
    stored = sites_json(env)
    assert {k: v["ward"] for k, v in stored.items()} == {
        "ss-hall-a": "Xã Sóc Sơn",
        "bd-aq-b": "Phường Ba Đình",
        "hd-ward-c": "Phường Hà Đông",
    }
    assert stored["bd-aq-b"]["former_district"] is None
    assert stored["bd-aq-b"]["opening_hours"] == "24/7"

    # Export, in both formats, reads back as the same sites: importing it changes nothing.
    csv_out, geo_out = tmp_path / "out.csv", tmp_path / "out.geojson"
    ok(env, "export", "--output", str(csv_out))
    ok(env, "export", "-o", str(geo_out))
    document = json.loads(geo_out.read_text("utf-8"))
    assert document["type"] == "FeatureCollection"
    assert len(document["features"]) == 3
    assert "unchanged 3" in ok(env, "import", str(csv_out))
    assert "unchanged 3" in ok(env, "import", str(geo_out))
    assert ok(env, "export") == csv_out.read_text("utf-8")  # standard output
    assert "unchanged 3" in ok(env, "import", "-", "--format", "csv", stdin=csv_out.read_text())
    assert len(audit_rows(db_conn, migrated)) == 3

    # A changed site is refused without --update, and nothing of the file is stored.
    changed = CSV_TEXT.replace("Trạm quan trắc Ba Đình", "Trạm quan trắc hồ Trúc Bạch")
    changed += "new-site-d,Mới,street_monitor,00004,,,,21.04,105.84,\n"
    source.write_text(changed, encoding="utf-8")
    assert "'bd-aq-b' is already registered with other values" in refused(
        env, "import", str(source)
    )
    assert "new-site-d" not in sites_json(env)
    out = ok(env, "import", str(source), "--update")
    assert "added 1: new-site-d" in out
    assert "updated 1: bd-aq-b" in out
    assert "unchanged 2" in out
    assert sites_json(env)["bd-aq-b"]["name"] == "Trạm quan trắc hồ Trúc Bạch"
    latest = {
        subject: (action, detail) for _, action, subject, detail in audit_rows(db_conn, migrated)
    }
    assert latest["bd-aq-b"] == (
        "site.import",
        {"name": "Trạm quan trắc Ba Đình -> Trạm quan trắc hồ Trúc Bạch"},
    )
    assert latest["new-site-d"][0] == "site.import"


def test_import_refusals_name_the_file_and_row_and_store_nothing(env, tmp_path: Path):
    bad_row = CSV_TEXT.replace("09556,Phường Hà Đông", "09556,Phường Hoàn Kiếm")
    path = tmp_path / "bad.csv"
    path.write_text(bad_row, encoding="utf-8")
    message = refused(env, "import", str(path))
    assert f"{path}, row 4: ward_code 09556 is Phường Hà Đông" in message
    assert sites_json(env) == {}

    twice = CSV_TEXT + CSV_TEXT.splitlines()[1] + "\n"
    path.write_text(twice, encoding="utf-8")
    assert "row 5: site_id 'ss-hall-a' is already in row 2" in refused(env, "import", str(path))

    path.write_bytes(CSV_TEXT.encode("utf-16"))
    assert "not UTF-8" in refused(env, "import", str(path))

    path.write_bytes(b"site_id\n" + b"x" * (MAX_FILE_BYTES + 1))
    assert "larger than 8 MiB" in refused(env, "import", str(path))

    assert "cannot be read" in refused(env, "import", str(tmp_path / "missing.csv"))
    assert "unknown format 'xlsx'" in refused(env, "import", str(path), "--format", "xlsx")

    geo = tmp_path / "bad.geojson"
    geo.write_text('{"type": "FeatureCollection", "features": [{"type": "Feature"}]}')
    assert "row 1: geometry is not a Point" in refused(env, "import", str(geo))
    assert sites_json(env) == {}


def test_a_site_stored_before_the_geography_is_listed_unassigned_until_updated(
    env, db_conn, migrated, tmp_path: Path
):
    db_conn.execute(
        f"""INSERT INTO {migrated}.sites (site_id, name, district, kind, latitude, longitude)
            VALUES ('old-hall', 'Bộ phận Một cửa cũ', 'Ba Đình', 'service_hall', 21.03, 105.82)"""
    )
    listed = ok(env, "list")
    assert "(chưa gán / unassigned)" in listed
    assert sites_json(env)["old-hall"]["unit_code"] is None
    # Its export cannot be imported as it is: the ward must be filled in first.
    out = tmp_path / "old.csv"
    ok(env, "export", "-o", str(out))
    assert "ward: missing" in refused(env, "import", str(out), "--update")
    out.write_text(out.read_text("utf-8").replace(",,,Ba Đình,", ",,Ngọc Hà,Ba Đình,"))
    assert "updated 1: old-hall" in ok(env, "import", str(out), "--update")
    assert sites_json(env)["old-hall"]["ward"] == "Phường Ngọc Hà"


def test_units_lists_hanoi_wards_and_communes(env):
    out = ok(env, "units")
    assert "126 of Hanoi's 126 wards and communes" in out
    assert "00070" in out
    assert "51 of" in ok(env, "units", "--kind", "ward")
    assert "75 of" in ok(env, "units", "--kind", "commune")
    found = ok(env, "units", "--search", "son tay")
    assert "Phường Sơn Tây" in found
    assert "1 of" in found


def test_show_unknown_site(env):
    assert "site 'nowhere' is not registered" in refused(env, "show", "nowhere")


def test_units_refuses_an_unknown_kind(env):
    assert "is not 'ward' or 'commune'" in refused(env, "units", "--kind", "district")
