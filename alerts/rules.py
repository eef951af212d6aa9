"""Alert rules as data: the rule structs, the device windows they read, loading and scope.

A rule file is TOML with an array of ``[[rule]]`` tables::

    [[rule]]
    rule_id = "kiosk-queue-long"          # allow-listed like every id
    name = "Queue too long"
    device_type = "kiosk"                 # a catalog device type
    severity = "minor"                    # one of contracts.schema.SEVERITIES
    summary_vi = "Hàng chờ dài: {value:.0f} người tại {site_name}"
    summary_en = "Long queue: {value:.0f} waiting at {site_name}"
    description_vi = "..."                # a sentence with context (optional)
    description_en = "..."
    sites = []                            # scope; empty = all (also districts, device_ids)
    condition = { kind = "threshold", metric = "queue_length", op = ">", threshold = 40,
                  clear = 25, for_s = 900 }   # (one line in a real file: TOML 1.0)
    escalate = [{ severity = "major", threshold = 80 }]

Condition kinds (``kind``): ``threshold``, ``rate_of_change``, ``flatline``,
``no_data``, ``zscore``, ``aqi_band``, and the combinators ``any_of`` /
``all_of`` with a ``conditions`` list. What each computes is in
``alerts.evaluate``. Durations are seconds in the file (``for_s``,
``window_s``, ``silence_s``, ``max_age_s``; all > 0) and integer
milliseconds once evaluated (``duration_ms``).

Escalation steps name a more severe severity and a level (``threshold``, or
``band`` for an AQI rule) in the unit of the condition's value; they apply to
a rule whose condition is a single threshold, rate_of_change, zscore,
aqi_band or no_data condition, and must get strictly more severe and
strictly further from the condition's own threshold, step by step.

``load_rules`` reads the shipped defaults (``alerts/data/rules.toml``) and
then the operator's files: a rule whose ``rule_id`` is already loaded
replaces it; ``enabled = false`` (alone with the rule_id, or on a full rule)
drops it. Every problem raises ``RuleError`` naming the file, the rule and
the key. Metric names are checked against the catalog for the rule's device
type; ``vn_aqi`` is the derived hourly VN_AQI that the job adds to
air-quality windows and only ``aqi_band`` reads it.

Texts. A rule's texts are templates (``str.format``) over ``MESSAGE_FIELDS``:
``summary_vi`` / ``summary_en`` (short, a title) and ``description_vi`` /
``description_en`` (a sentence with context). Each alert stores them as
"<vi> / <en>" (``AlertTexts``). ``message``, the only text before, is still
read as the English summary; a missing Vietnamese text (or description) is a
generic one built from the severity, the device type and the rule's name, so
an operator's old file keeps working. Every template is checked at load: an
unknown field is a ``RuleError`` naming the key.

``Window`` is the numpy view of one device type's recent readings that the
job builds; ``scope_mask`` picks a rule's devices out of it. Reading rule
files from disk is the only I/O here; the job decides when to do it.
"""

from __future__ import annotations

import re
import string
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec
import numpy as np
from numpy.typing import NDArray

from alerts.aqi import VN_BANDS
from contracts.catalog import DEVICE_TYPES
from contracts.errors import InvalidIdError, RuleError
from contracts.ids import check_id
from contracts.schema import SEVERITIES
from contracts.severity import SEVERITY_NAMES

NO_TS: Final[int] = int(np.iinfo(np.int64).min)
VN_AQI_METRIC: Final = "vn_aqi"
DEFAULTS_SOURCE: Final = "<defaults: alerts/data/rules.toml>"

Op = Literal[">", ">=", "<", "<="]
UPPER_OPS: Final = frozenset({">", ">="})
BandName = Literal["good", "moderate", "poor", "bad", "very_bad", "hazardous"]
# The lowest VN_AQI of each band (reference/aqi.md): "bad" is 151 and above.
BAND_NAMES: Final = ("good", "moderate", "poor", "bad", "very_bad", "hazardous")
BAND_LOW_AQI: Final[dict[str, int]] = {
    name: band.low for name, band in zip(BAND_NAMES, VN_BANDS, strict=True)
}
MESSAGE_FIELDS: Final = frozenset(
    {
        "rule_id",
        "name",
        "device_id",
        "device_type",
        "site_id",
        "site_name",  # the site's name (its id if unknown)
        "ward",  # the site's current ward/commune (its former district if it has none)
        "district",  # the site's former district ("" if none)
        "severity",  # critical, major, minor, warning
        "severity_vi",  # contracts.severity: "Cao"
        "severity_en",  # "Major"
        "value",
    }
)
TEXT_KEYS: Final = ("message", "summary_vi", "summary_en", "description_vi", "description_en")
# What a device of each shipped type is called in the generic Vietnamese texts.
DEVICE_TYPE_VI: Final = {
    "air_quality": "trạm quan trắc không khí",
    "kiosk": "ki-ốt lấy số",
    "camera_counter": "camera đếm",
    "conference_endpoint": "thiết bị hội nghị truyền hình",
    "noise_meter": "máy đo tiếng ồn",
    "water_level": "cảm biến mực nước",
    "satisfaction_terminal": "thiết bị đánh giá hài lòng",
}
_GENERIC_SUMMARY_VI: Final = "{severity_vi}: {name} ({device_kind_vi} {device_id} tại {site_name})"
_GENERIC_SUMMARY_EN: Final = "{name}: {device_id} at {site_name} ({value:g})"
_GENERIC_DESCRIPTION_VI: Final = (
    "Quy tắc {rule_id} ({name}), mức {severity_vi}: {device_kind_vi} {device_id} "
    "tại {site_name} ({ward}), giá trị {value:g}."
)
_GENERIC_DESCRIPTION_EN: Final = (
    "Rule {rule_id} ({name}), severity {severity_en}: {device_type} {device_id} "
    "at {site_name} ({ward}), value {value:g}."
)

Seconds = Annotated[float, msgspec.Meta(gt=0)]


def duration_ms(seconds: float) -> int:
    """A duration from a rule file (seconds) in integer milliseconds."""
    return round(seconds * 1000)


@dataclass(frozen=True, slots=True)
class Window:
    """Recent readings of the ``n`` devices of one type, ``w`` samples each.

    Rows are right-aligned: a row's samples are in time order, ascending, and
    the newest is in the last column; unused slots on the left hold ``NO_TS``
    and NaN. ``values`` maps each metric to a float64 (n, w) matrix, NaN where
    the sample lacks the metric. ``last_seen_ms`` is the device's last-seen
    time from the device state (``NO_TS`` if never seen).
    """

    device_type: str
    device_ids: tuple[str, ...]
    site_ids: tuple[str, ...]
    districts: tuple[str, ...]
    ts_ms: NDArray[np.int64]
    values: Mapping[str, NDArray[np.float64]]
    last_seen_ms: NDArray[np.int64]

    def __post_init__(self) -> None:
        n = len(self.device_ids)
        if len(self.site_ids) != n or len(self.districts) != n:
            raise ValueError("device_ids, site_ids and districts must have the same length")
        if self.ts_ms.ndim != 2 or self.ts_ms.shape[0] != n or self.ts_ms.dtype != np.int64:
            raise ValueError(f"ts_ms must be int64 of shape ({n}, w), got {self.ts_ms.shape}")
        if self.ts_ms.shape[1] < 1:
            raise ValueError("ts_ms must have at least one column")
        if self.last_seen_ms.shape != (n,) or self.last_seen_ms.dtype != np.int64:
            raise ValueError(f"last_seen_ms must be int64 of shape ({n},)")
        for metric, matrix in self.values.items():
            if matrix.shape != self.ts_ms.shape or matrix.dtype != np.float64:
                raise ValueError(f"values[{metric!r}] must be float64 of shape {self.ts_ms.shape}")

    @property
    def n_devices(self) -> int:
        return len(self.device_ids)

    def select(self, rows: NDArray[np.intp]) -> Window:
        """The same window restricted to ``rows`` (indexes into the devices)."""
        picked = rows.tolist()
        return Window(
            device_type=self.device_type,
            device_ids=tuple(self.device_ids[i] for i in picked),
            site_ids=tuple(self.site_ids[i] for i in picked),
            districts=tuple(self.districts[i] for i in picked),
            ts_ms=self.ts_ms[rows],
            values={metric: matrix[rows] for metric, matrix in self.values.items()},
            last_seen_ms=self.last_seen_ms[rows],
        )


class _Condition(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="kind"
):
    pass


class Threshold(_Condition, tag="threshold", frozen=True):
    metric: str
    op: Op
    threshold: float
    for_s: Seconds
    clear: float | None = None  # None: clears where it stops meeting ``threshold``


class RateOfChange(_Condition, tag="rate_of_change", frozen=True):
    metric: str
    op: Op
    threshold_per_min: float  # metric units per minute
    window_s: Seconds
    # The first and latest samples in range must be at least this far apart
    # (None: half of window_s): a rate over two samples 10 s apart turns one
    # step of a noisy signal into a steep slope.
    min_span_s: Seconds | None = None

    @property
    def min_span_ms(self) -> int:
        return duration_ms(self.window_s / 2 if self.min_span_s is None else self.min_span_s)


class Flatline(_Condition, tag="flatline", frozen=True):
    metric: str
    window_s: Seconds
    min_samples: Annotated[int, msgspec.Meta(ge=2)] = 3
    tolerance: Annotated[float, msgspec.Meta(ge=0)] = 0.0


class NoData(_Condition, tag="no_data", frozen=True):
    # None in a file: the device type's offline_after_s from the catalog (the
    # one definition of offline), filled in when the rule is loaded.
    silence_s: Seconds | None = None

    @property
    def silence(self) -> float:
        if self.silence_s is None:  # pragma: no cover - load_rules fills it in
            raise ValueError("no_data silence_s not resolved from the catalog")
        return self.silence_s


class ZScore(_Condition, tag="zscore", frozen=True):
    metric: str
    op: Op
    threshold: float
    window_s: Seconds
    min_samples: Annotated[int, msgspec.Meta(ge=2)] = 10
    min_std: Annotated[float, msgspec.Meta(ge=0)] = 0.0


class AqiBand(_Condition, tag="aqi_band", frozen=True):
    band: BandName
    max_age_s: Seconds = 7200.0  # VN_AQI is hourly: the last two hours' value


class AnyOf(_Condition, tag="any_of", frozen=True):
    conditions: Annotated[tuple[Condition, ...], msgspec.Meta(min_length=1)]


class AllOf(_Condition, tag="all_of", frozen=True):
    conditions: Annotated[tuple[Condition, ...], msgspec.Meta(min_length=1)]


Condition = Threshold | RateOfChange | Flatline | NoData | ZScore | AqiBand | AnyOf | AllOf
Leaf = Threshold | RateOfChange | Flatline | NoData | ZScore | AqiBand


class Escalation(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    severity: str
    threshold: float | None = None
    band: BandName | None = None  # aqi_band rules only, instead of threshold


class Rule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    rule_id: str
    name: str
    device_type: str
    severity: str
    condition: Condition
    message: str | None = None  # the English summary of rule files from before summary_en
    summary_vi: str | None = None
    summary_en: str | None = None
    description_vi: str | None = None
    description_en: str | None = None
    sites: tuple[str, ...] = ()
    districts: tuple[str, ...] = ()
    device_ids: tuple[str, ...] = ()
    escalate: tuple[Escalation, ...] = ()
    enabled: bool = True

    @property
    def severity_index(self) -> int:
        """Index of the base severity in ``contracts.schema.SEVERITIES`` (0 = critical)."""
        return SEVERITIES.index(self.severity)


def leaves(condition: Condition) -> Iterator[Leaf]:
    """The leaf conditions of a condition tree, in file order."""
    if isinstance(condition, AnyOf | AllOf):
        for child in condition.conditions:
            yield from leaves(child)
    else:
        yield condition


def lookback_ms(rule: Rule) -> int:
    """How far back from ``now`` a window must reach for this rule.

    A threshold also needs the sample just before ``now - for_s``, so the job
    should add one reporting interval to this. ``no_data`` reads
    ``last_seen_ms`` and needs no samples.
    """
    spans = [0]
    for leaf in leaves(rule.condition):
        match leaf:
            case Threshold():
                spans.append(duration_ms(leaf.for_s))
            case RateOfChange() | Flatline() | ZScore():
                spans.append(duration_ms(leaf.window_s))
            case AqiBand():
                spans.append(duration_ms(leaf.max_age_s))
            case NoData():
                pass
    return max(spans)


def escalation_levels(rule: Rule) -> tuple[Op, tuple[tuple[int, float], ...]]:
    """The comparison and the ``(severity index, level)`` steps of a rule's escalation.

    The rule's value escalates to a step's severity where ``value op level``.
    """
    cond = rule.condition
    match cond:
        case Threshold() | RateOfChange() | ZScore():
            op: Op = cond.op
        case AqiBand():
            op = ">="
        case _:
            op = ">"
    steps = []
    for step in rule.escalate:
        level = float(BAND_LOW_AQI[step.band]) if step.band is not None else step.threshold
        if level is not None:
            steps.append((SEVERITIES.index(step.severity), level))
    return op, tuple(steps)


class AlertTexts(msgspec.Struct, frozen=True, kw_only=True):
    """One alert's rendered texts, in both languages."""

    summary_vi: str
    summary_en: str
    description_vi: str
    description_en: str

    @property
    def summary(self) -> str:
        """What ``alerts.message`` stores: "<vi> / <en>"."""
        return f"{self.summary_vi} / {self.summary_en}"

    @property
    def description(self) -> str:
        """What ``alerts.description`` stores: "<vi> / <en>"."""
        return f"{self.description_vi} / {self.description_en}"


def templates(rule: Rule) -> tuple[str, str, str, str]:
    """The rule's (summary_vi, summary_en, description_vi, description_en) templates.

    Missing ones are the generic texts; ``message`` stands in for ``summary_en``.
    """
    kind_vi = DEVICE_TYPE_VI.get(rule.device_type, rule.device_type)
    generic_summary_vi = _GENERIC_SUMMARY_VI.replace("{device_kind_vi}", kind_vi)
    generic_description_vi = _GENERIC_DESCRIPTION_VI.replace("{device_kind_vi}", kind_vi)
    return (
        rule.summary_vi if rule.summary_vi is not None else generic_summary_vi,
        rule.summary_en or rule.message or _GENERIC_SUMMARY_EN,
        rule.description_vi if rule.description_vi is not None else generic_description_vi,
        rule.description_en if rule.description_en is not None else _GENERIC_DESCRIPTION_EN,
    )


def render_texts(
    rule: Rule,
    *,
    device_id: str,
    site_id: str,
    district: str,
    value: float,
    severity: str,
    site_name: str | None = None,
    ward: str | None = None,
) -> AlertTexts:
    """The rule's texts for one device (fields: ``MESSAGE_FIELDS``)."""
    name = SEVERITY_NAMES.get(severity)
    fields = {
        "rule_id": rule.rule_id,
        "name": rule.name,
        "device_type": rule.device_type,
        "device_id": device_id,
        "site_id": site_id,
        "site_name": site_name or site_id,
        "ward": ward or district or "-",
        "district": district,
        "severity": severity,
        "severity_vi": name.vi if name else severity,
        "severity_en": name.en if name else severity,
        "value": value,
    }
    summary_vi, summary_en, description_vi, description_en = templates(rule)
    return AlertTexts(
        summary_vi=summary_vi.format(**fields),
        summary_en=summary_en.format(**fields),
        description_vi=description_vi.format(**fields),
        description_en=description_en.format(**fields),
    )


def render_message(
    rule: Rule,
    *,
    device_id: str,
    site_id: str,
    district: str,
    value: float,
    severity: str,
) -> str:
    """The rule's bilingual summary for one device ("<vi> / <en>")."""
    return render_texts(
        rule,
        device_id=device_id,
        site_id=site_id,
        district=district,
        value=value,
        severity=severity,
    ).summary


def scope_mask(rule: Rule, window: Window) -> NDArray[np.bool_]:
    """Which of the window's devices the rule applies to (bool, one per device)."""
    if rule.device_type != window.device_type:
        raise ValueError(
            f"rule {rule.rule_id!r} is for {rule.device_type!r}, the window for "
            f"{window.device_type!r}"
        )
    mask = np.ones(window.n_devices, dtype=np.bool_)
    scopes = (
        (rule.sites, window.site_ids),
        (rule.districts, window.districts),
        (rule.device_ids, window.device_ids),
    )
    for wanted, have in scopes:
        if wanted:
            mask &= np.isin(np.asarray(have, dtype=np.str_), np.asarray(wanted, dtype=np.str_))
    return mask


# --- loading ---------------------------------------------------------------------------


class _RuleProblemError(Exception):
    def __init__(self, key: str, problem: str) -> None:
        super().__init__(problem)
        self.key = key
        self.problem = problem


def _check_leaf(leaf: Leaf, device_type: str, key: str) -> None:
    metrics = DEVICE_TYPES[device_type].metric_names
    if isinstance(leaf, AqiBand):
        if device_type != "air_quality":
            raise _RuleProblemError(f"{key}.kind", "aqi_band applies to air_quality rules only")
        return
    if isinstance(leaf, NoData):
        return
    if leaf.metric not in metrics:
        raise _RuleProblemError(
            f"{key}.metric",
            f"{device_type} has no metric {leaf.metric!r} (known: {', '.join(metrics)})",
        )
    span = leaf.min_span_s if isinstance(leaf, RateOfChange) else None
    if isinstance(leaf, RateOfChange) and span is not None and span > leaf.window_s:
        raise _RuleProblemError(
            f"{key}.min_span_s", f"min_span_s {span:g} exceeds window_s {leaf.window_s:g}"
        )
    if isinstance(leaf, Threshold) and leaf.clear is not None:
        upper = leaf.op in UPPER_OPS
        if (upper and leaf.clear > leaf.threshold) or (not upper and leaf.clear < leaf.threshold):
            side = "at or below" if upper else "at or above"
            raise _RuleProblemError(
                f"{key}.clear",
                f"clear {leaf.clear:g} must be {side} the threshold {leaf.threshold:g} "
                f"for op {leaf.op!r}",
            )


def _check_tree(condition: Condition, device_type: str, key: str) -> None:
    if isinstance(condition, AnyOf | AllOf):
        for i, child in enumerate(condition.conditions):
            _check_tree(child, device_type, f"{key}.conditions[{i}]")
    else:
        _check_leaf(condition, device_type, key)


def _base_level(cond: Condition) -> float | None:
    match cond:
        case Threshold() | ZScore():
            return cond.threshold
        case RateOfChange():
            return cond.threshold_per_min
        case AqiBand():
            return float(BAND_LOW_AQI[cond.band])
        case NoData():
            return cond.silence
        case _:
            return None


def _check_escalation(rule: Rule) -> None:
    base = _base_level(rule.condition)
    if base is None:
        raise _RuleProblemError(
            "escalate",
            "escalation needs a single threshold, rate_of_change, zscore, aqi_band "
            f"or no_data condition, not {rule.condition.__struct_config__.tag!r}",
        )
    op, _ = escalation_levels(rule)
    upper = op in UPPER_OPS
    previous_severity, previous_level = rule.severity_index, base
    for i, step in enumerate(rule.escalate):
        key = f"escalate[{i}]"
        if step.severity not in SEVERITIES:
            raise _RuleProblemError(f"{key}.severity", f"must be one of {', '.join(SEVERITIES)}")
        if (step.threshold is None) == (step.band is None):
            raise _RuleProblemError(key, "give exactly one of threshold and band")
        if step.band is not None and not isinstance(rule.condition, AqiBand):
            raise _RuleProblemError(f"{key}.band", "band is for aqi_band rules; use threshold")
        level = float(BAND_LOW_AQI[step.band]) if step.band is not None else step.threshold
        if level is None:
            raise _RuleProblemError(key, "give exactly one of threshold and band")
        severity = SEVERITIES.index(step.severity)
        if severity >= previous_severity:
            raise _RuleProblemError(
                f"{key}.severity",
                f"{step.severity!r} must be more severe than {SEVERITIES[previous_severity]!r}",
            )
        if (upper and level <= previous_level) or (not upper and level >= previous_level):
            raise _RuleProblemError(
                f"{key}.threshold" if step.band is None else f"{key}.band",
                f"level {level:g} must be {'above' if upper else 'below'} {previous_level:g}",
            )
        previous_severity, previous_level = severity, level


# A sample value for each field, to try a template's format specs at load.
_SAMPLE_FIELDS: Final = {f: 1.5 if f == "value" else f for f in MESSAGE_FIELDS}


def _check_template(rule: Rule, key: str) -> None:
    template = getattr(rule, key)
    if template is None:
        return
    if not template.strip():
        raise _RuleProblemError(key, "must not be empty (leave the key out instead)")
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise _RuleProblemError(key, f"not a valid template: {exc}") from None
    unknown = fields - MESSAGE_FIELDS
    if unknown:
        raise _RuleProblemError(
            key,
            f"unknown fields {sorted(unknown)} (known: {', '.join(sorted(MESSAGE_FIELDS))})",
        )
    try:
        template.format(**_SAMPLE_FIELDS)
    except (ValueError, KeyError, IndexError, AttributeError) as exc:
        raise _RuleProblemError(key, f"does not render: {exc}") from None


def _check_rule(rule: Rule) -> None:
    try:
        check_id(rule.rule_id, "rule_id")
    except InvalidIdError as exc:
        raise _RuleProblemError("rule_id", str(exc)) from None
    if not rule.name.strip():
        raise _RuleProblemError("name", "must not be empty")
    if rule.device_type not in DEVICE_TYPES:
        raise _RuleProblemError("device_type", f"must be one of {', '.join(sorted(DEVICE_TYPES))}")
    if rule.severity not in SEVERITIES:
        raise _RuleProblemError("severity", f"must be one of {', '.join(SEVERITIES)}")
    for key, ids in (("sites", rule.sites), ("device_ids", rule.device_ids)):
        for i, value in enumerate(ids):
            try:
                check_id(value, key)
            except InvalidIdError as exc:
                raise _RuleProblemError(f"{key}[{i}]", str(exc)) from None
    if any(not d.strip() for d in rule.districts):
        raise _RuleProblemError("districts", "district names must not be empty")
    for key in TEXT_KEYS:
        _check_template(rule, key)
    _check_tree(rule.condition, rule.device_type, "condition")
    if rule.escalate:
        _check_escalation(rule)


def _decode_rule(entry: Any) -> Rule:
    try:
        rule = msgspec.convert(entry, Rule)
    except msgspec.ValidationError as exc:
        problem, _, where = str(exc).partition(" - at `$")
        key = where.rstrip("`").lstrip(".")
        unknown = re.fullmatch(r"Object contains unknown field `(.+)`", problem)
        if unknown is not None:
            key = f"{key}.{unknown.group(1)}" if key else unknown.group(1)
            problem = "unknown key"
        raise _RuleProblemError(key or "<rule>", problem) from None
    if rule.device_type in DEVICE_TYPES:
        offline_after_s = DEVICE_TYPES[rule.device_type].offline_after_s
        rule = msgspec.structs.replace(
            rule, condition=_with_silence(rule.condition, offline_after_s)
        )
    _check_rule(rule)
    return rule


def _with_silence(condition: Condition, offline_after_s: float) -> Condition:
    """``condition`` with every no_data silence left out set to the type's offline_after_s."""
    match condition:
        case NoData(silence_s=None):
            return msgspec.structs.replace(condition, silence_s=offline_after_s)
        case AnyOf() | AllOf():
            children = tuple(_with_silence(c, offline_after_s) for c in condition.conditions)
            return msgspec.structs.replace(condition, conditions=children)
        case _:
            return condition


def _parse(source: str, text: str) -> list[tuple[str, Rule | None]]:
    """The rules of one file in order: ``(rule_id, rule)``; rule None for a bare disable."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RuleError(source, None, None, f"not valid TOML: {exc}") from None
    extra = sorted(set(document) - {"rule"})
    if extra:
        raise RuleError(source, None, extra[0], "unknown top-level key (rules go in [[rule]])")
    entries = document.get("rule", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise RuleError(source, None, "rule", "must be an array of tables ([[rule]])")
    parsed: list[tuple[str, Rule | None]] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        raw_id = entry.get("rule_id")
        rule_id = raw_id if isinstance(raw_id, str) else f"#{index + 1}"
        if not isinstance(raw_id, str):
            raise RuleError(source, rule_id, "rule_id", "missing or not a string")
        if rule_id in seen:
            raise RuleError(source, rule_id, "rule_id", "appears twice in this file")
        seen.add(rule_id)
        if entry.get("enabled") is False and set(entry) <= {"rule_id", "enabled"}:
            parsed.append((rule_id, None))
            continue
        try:
            rule = _decode_rule(entry)
        except _RuleProblemError as exc:
            raise RuleError(source, rule_id, exc.key, exc.problem) from None
        parsed.append((rule_id, rule))
    return parsed


def _default_text() -> str:
    return resources.files("alerts").joinpath("data/rules.toml").read_text(encoding="utf-8")


def load_rules(
    paths: Sequence[Path] | None = None, *, include_defaults: bool = True
) -> tuple[Rule, ...]:
    """The enabled rules: the shipped defaults, then each file of ``paths`` in order.

    A rule replaces an earlier one with the same ``rule_id`` (keeping its
    place); ``enabled = false`` removes it. Disabling an id that neither the
    shipped defaults (included or not) nor an earlier file defines is an
    error: a typo would otherwise disable nothing.
    """
    defaults = _parse(DEFAULTS_SOURCE, _default_text())
    known = {rule_id for rule_id, _ in defaults}
    sources: list[tuple[str, str]] = []
    for path in paths or ():
        try:
            sources.append((str(path), path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise RuleError(str(path), None, None, "file does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise RuleError(str(path), None, None, f"cannot be read: {exc}") from None
    parsed = [(source, _parse(source, text)) for source, text in sources]
    if include_defaults:
        parsed.insert(0, (DEFAULTS_SOURCE, defaults))
    rules: dict[str, Rule | None] = {}
    for source, entries in parsed:
        for rule_id, rule in entries:
            if rule is None and rule_id not in known:
                raise RuleError(source, rule_id, "enabled", "disables a rule that no file defines")
            known.add(rule_id)
            rules[rule_id] = rule if rule is not None and rule.enabled else None
    return tuple(rule for rule in rules.values() if rule is not None)
