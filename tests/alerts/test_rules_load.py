"""Loading rule files: shipped defaults, operator overrides, errors naming file, rule and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from alerts.rules import (
    AllOf,
    AnyOf,
    AqiBand,
    Flatline,
    NoData,
    RateOfChange,
    Threshold,
    ZScore,
    leaves,
    load_rules,
    lookback_ms,
)
from contracts.catalog import DEVICE_TYPES
from contracts.errors import HubError, RuleError

GOOD = """
[[rule]]
rule_id = "{rule_id}"
name = "Loss"
device_type = "conference_endpoint"
severity = "minor"
condition = {{ kind = "threshold", metric = "packet_loss", op = ">", threshold = 5, for_s = 60 }}
"""


def write(tmp_path: Path, text: str, name: str = "rules.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_cover_every_kind_and_device_type():
    rules = load_rules()
    ids = [r.rule_id for r in rules]
    assert len(ids) == len(set(ids))
    assert {r.device_type for r in rules} == set(DEVICE_TYPES)
    kinds = {type(leaf) for r in rules for leaf in leaves(r.condition)}
    assert kinds == {Threshold, RateOfChange, Flatline, NoData, ZScore, AqiBand}
    assert {type(r.condition) for r in rules} >= {AnyOf}
    assert any(isinstance(c, AllOf) for r in rules for c in getattr(r.condition, "conditions", ()))
    by_id = {r.rule_id: r for r in rules}
    for expected in (
        "aq-pm25-high",
        "aq-vn-aqi-band",
        "kiosk-paper-low",
        "kiosk-printer-fault",
        "kiosk-queue-long",
        "camera-counter-stuck",
        "aq-offline",
        "kiosk-offline",
        "camera-offline",
        "conference-packet-loss",
    ):
        assert expected in by_id
    assert [s.severity for s in by_id["aq-pm25-high"].escalate] == ["major", "critical"]


def test_lookback_is_the_longest_duration():
    by_id = {r.rule_id: r for r in load_rules()}
    assert lookback_ms(by_id["camera-counter-stuck"]) == 3_600_000
    assert lookback_ms(by_id["kiosk-offline"]) == 0
    assert lookback_ms(by_id["conference-endpoint-down"]) == 300_000


def test_operator_rules_replace_add_and_disable(tmp_path):
    path = write(
        tmp_path,
        GOOD.format(rule_id="aq-pm25-high")
        .replace('"conference_endpoint"', '"air_quality"')
        .replace('"packet_loss"', '"pm25"')
        + GOOD.format(rule_id="site-loss")
        + '[[rule]]\nrule_id = "kiosk-offline"\nenabled = false\n'
        + GOOD.format(rule_id="kiosk-queue-long")
        .replace('severity = "minor"', 'severity = "minor"\nenabled = false')
        .replace('"conference_endpoint"', '"kiosk"')
        .replace('"packet_loss"', '"queue_length"'),
    )
    default_ids = [r.rule_id for r in load_rules()]
    rules = load_rules([path])
    ids = [r.rule_id for r in rules]
    assert "kiosk-offline" not in ids
    assert "kiosk-queue-long" not in ids
    assert ids[-1] == "site-loss"
    # The replacement keeps the default's place and takes the operator's content.
    assert ids.index("aq-pm25-high") == default_ids.index("aq-pm25-high")
    replaced = rules[ids.index("aq-pm25-high")]
    assert replaced.name == "Loss"
    assert replaced.escalate == ()
    assert load_rules([path], include_defaults=False) == tuple(
        r for r in rules if r.rule_id in {"aq-pm25-high", "site-loss"}
    )


def test_later_files_win(tmp_path):
    first = write(tmp_path, GOOD.format(rule_id="x-loss"), "a.toml")
    second = write(tmp_path, GOOD.format(rule_id="x-loss").replace('"minor"', '"major"'), "b.toml")
    (rule,) = load_rules([first, second], include_defaults=False)
    assert rule.severity == "major"
    assert load_rules(None, include_defaults=False) == ()


CONDITION = (
    'condition = { kind = "threshold", metric = "packet_loss", op = ">", '
    "threshold = 5, for_s = 60 }"
)


@pytest.mark.parametrize(
    ("old", "new", "key", "problem"),
    [
        ('"packet_loss"', '"packetloss"', "condition.metric", "has no metric 'packetloss'"),
        ('severity = "minor"', 'severity = "urgent"', "severity", "must be one of critical"),
        ("for_s = 60", "for_s = 0", "condition.for_s", "> 0"),
        ("for_s = 60", "for_s = -5", "condition.for_s", "> 0"),
        ("for_s = 60", 'for_s = "1m"', "condition.for_s", "Expected `float`"),
        ("for_s = 60", "for_s = 60, clear = 8", "condition.clear", "at or below the threshold"),
        ("for_s = 60", "for_s = 60, thresold = 8", "condition.thresold", "unknown key"),
        ('kind = "threshold"', 'kind = "treshold"', "condition.kind", "Invalid value 'treshold'"),
        ('op = ">"', 'op = "=>"', "condition.op", "Invalid enum value '=>'"),
        ('rule_id = "my-loss"', 'rule_id = "My Loss!"', "rule_id", "does not match"),
        ('name = "Loss"', 'name = " "', "name", "must not be empty"),
        ('"conference_endpoint"', '"toaster"', "device_type", "must be one of"),
        ('name = "Loss"', 'name = "Loss"\nsites = ["Site A"]', "sites[0]", "does not match"),
        ('name = "Loss"', 'name = "Loss"\nmessage = "{temp}"', "message", "unknown fields"),
        ('name = "Loss"', 'name = "Loss"\nmessage = "{value"', "message", "not a valid template"),
        (
            'name = "Loss"',
            'name = "Loss"\nsummary_vi = "{gia_tri}"',
            "summary_vi",
            "unknown fields",
        ),
        ('name = "Loss"', 'name = "Loss"\nsummary_en = "{site}"', "summary_en", "unknown fields"),
        (
            'name = "Loss"',
            'name = "Loss"\ndescription_vi = "Mất {value:.1f}% tại {phuong}"',
            "description_vi",
            "unknown fields ['phuong']",
        ),
        (
            'name = "Loss"',
            'name = "Loss"\ndescription_en = "{site_name:.1f}"',
            "description_en",
            "does not render",
        ),
        ('name = "Loss"', 'name = "Loss"\nsummary_vi = " "', "summary_vi", "must not be empty"),
        ('name = "Loss"', 'name = "Loss"\ncolour = "red"', "colour", "unknown key"),
        ('name = "Loss"\n', "", "<rule>", "missing required field `name`"),
        (
            CONDITION,
            'condition = { kind = "aqi_band", band = "bad" }',
            "condition.kind",
            "air_quality rules only",
        ),
        (
            CONDITION,
            (
                'condition = { kind = "any_of", conditions = [{ kind = "no_data", silence_s = 60 },'
                ' { kind = "flatline", metric = "pm25", window_s = 60 }] }'
            ),
            "condition.conditions[1].metric",
            "has no metric 'pm25'",
        ),
        (
            CONDITION,
            'condition = { kind = "all_of", conditions = [] }',
            "condition.conditions",
            "length >= 1",
        ),
        (
            CONDITION,
            'condition = { kind = "flatline", metric = "jitter", window_s = 60, min_samples = 1 }',
            "condition.min_samples",
            ">= 2",
        ),
        (
            CONDITION,
            (
                'condition = { kind = "rate_of_change", metric = "jitter", op = ">", '
                "threshold_per_min = 5, window_s = 60, min_span_s = 90 }"
            ),
            "condition.min_span_s",
            "exceeds window_s 60",
        ),
        (
            CONDITION,
            CONDITION + '\nescalate = [{ severity = "warning", threshold = 10 }]',
            "escalate[0].severity",
            "more severe than 'minor'",
        ),
        (
            CONDITION,
            CONDITION + '\nescalate = [{ severity = "major", threshold = 4 }]',
            "escalate[0].threshold",
            "must be above 5",
        ),
        (
            CONDITION,
            CONDITION + '\nescalate = [{ severity = "major", threshold = 10 },'
            ' { severity = "critical", threshold = 10 }]',
            "escalate[1].threshold",
            "must be above 10",
        ),
        (
            CONDITION,
            CONDITION + '\nescalate = [{ severity = "major", band = "bad" }]',
            "escalate[0].band",
            "aqi_band rules",
        ),
        (
            CONDITION,
            CONDITION + '\nescalate = [{ severity = "major" }]',
            "escalate[0]",
            "exactly one of threshold and band",
        ),
        (
            CONDITION,
            (
                'condition = { kind = "any_of", conditions = '
                '[{ kind = "no_data", silence_s = 60 }] }'
                '\nescalate = [{ severity = "major", threshold = 600 }]'
            ),
            "escalate",
            "needs a single",
        ),
    ],
)
def test_bad_rules_name_file_rule_and_key(tmp_path, old, new, key, problem):
    text = GOOD.format(rule_id="my-loss")
    assert old in text
    path = write(tmp_path, text.replace(old, new, 1))
    with pytest.raises(RuleError) as info:
        load_rules([path], include_defaults=False)
    err = info.value
    assert err.source == str(path)
    assert err.rule_id in {"my-loss", "My Loss!"}
    assert err.key == key
    assert problem in err.problem
    assert str(path) in str(err)
    assert key in str(err)


@pytest.mark.parametrize(
    ("text", "rule_id", "key", "problem"),
    [
        ("[[rule]\n", None, None, "not valid TOML"),
        ("[settings]\nx = 1\n", None, "settings", "unknown top-level key"),
        ("rule = 3\n", None, "rule", "array of tables"),
        ('[[rule]]\nname = "x"\n', "#1", "rule_id", "missing"),
        (GOOD.format(rule_id="a-b") * 2, "a-b", "rule_id", "appears twice"),
        ('[[rule]]\nrule_id = "no-such-rule"\nenabled = false\n', "no-such-rule", "enabled", ""),
    ],
)
def test_bad_files(tmp_path, text, rule_id, key, problem):
    path = write(tmp_path, text)
    with pytest.raises(RuleError) as info:
        load_rules([path])
    assert info.value.rule_id == rule_id
    assert info.value.key == key
    assert problem in info.value.problem
    assert isinstance(info.value, HubError)


def test_missing_file(tmp_path):
    with pytest.raises(RuleError, match="does not exist") as info:
        load_rules([tmp_path / "nope.toml"])
    assert info.value.source.endswith("nope.toml")


def test_ints_are_accepted_for_float_fields_and_lower_ops_check_clear_above(tmp_path):
    text = (
        GOOD.format(rule_id="low-paper")
        .replace(
            CONDITION,
            'condition = { kind = "threshold", metric = "paper_level", op = "<", threshold = 10,'
            " clear = 5, for_s = 60 }",
        )
        .replace('"conference_endpoint"', '"kiosk"')
    )
    with pytest.raises(RuleError, match="at or above the threshold"):
        load_rules([write(tmp_path, text)], include_defaults=False)
    (rule,) = load_rules(
        [write(tmp_path, text.replace("clear = 5", "clear = 20"))], include_defaults=False
    )
    assert rule.condition == Threshold(
        metric="paper_level", op="<", threshold=10.0, clear=20.0, for_s=60.0
    )


def _no_data_silences(rule) -> list[float | None]:
    return [leaf.silence_s for leaf in leaves(rule.condition) if isinstance(leaf, NoData)]


def test_a_no_data_condition_without_silence_waits_the_types_offline_after_s(tmp_path):
    defaults = {r.rule_id: r for r in load_rules()}
    for rule_id, device_type in (
        ("kiosk-offline", "kiosk"),
        ("aq-offline", "air_quality"),
        ("water-sensor-offline", "water_level"),
    ):
        offline_after_s = DEVICE_TYPES[device_type].offline_after_s
        assert _no_data_silences(defaults[rule_id]) == [offline_after_s], rule_id
    text = GOOD.format(rule_id="rain-silent").replace(
        '{ kind = "threshold", metric = "packet_loss", op = ">", threshold = 5, for_s = 60 }',
        '{ kind = "any_of", conditions = [{ kind = "no_data" },'
        ' { kind = "no_data", silence_s = 30 }] }',
    )
    (rule,) = load_rules([write(tmp_path, text)], include_defaults=False)
    assert _no_data_silences(rule) == [DEVICE_TYPES["conference_endpoint"].offline_after_s, 30]
